//! A request's own `Cache-Control` limits on what it may be served (RFC 9111 section 5.2.1):
//! `max-age`, `min-fresh`, `max-stale` and `only-if-cached`. (`no-cache` and `no-store` are
//! decided before the lookup, in [`policy::request_use`](super::policy::request_use).)

use std::time::Duration;

use http::HeaderMap;

use super::{
    entry::Entry,
    freshness::{Delta, Directives},
};

/// What a request accepts from the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Limits {
    /// The oldest response accepted (`max-age`; invalid counts as 0).
    max_age: Option<Duration>,
    /// The freshness a response must still have (`min-fresh`; invalid is ignored).
    min_fresh: Duration,
    /// How far past its freshness a response is accepted (`max-stale`; without a value: any;
    /// invalid: none).
    max_stale: Option<Duration>,
    /// `only-if-cached`: answer `504` rather than call the inner service.
    pub(super) only_if_cached: bool,
}

impl Limits {
    /// The limits a request's `Cache-Control` sets.
    pub(super) fn of(headers: &HeaderMap) -> Self {
        let cc = Directives::parse(headers);
        let secs = Duration::from_secs;
        Self {
            max_age: match cc.delta("max-age") {
                Delta::Absent => None,
                Delta::Seconds(s) => Some(secs(s)),
                Delta::Invalid => Some(Duration::ZERO),
            },
            min_fresh: match cc.delta("min-fresh") {
                Delta::Seconds(s) => secs(s),
                _ => Duration::ZERO,
            },
            max_stale: match cc.delta("max-stale") {
                Delta::Seconds(s) => Some(secs(s)),
                // `max-stale` without a value: any staleness.
                Delta::Invalid if cc.has_bare("max-stale") => Some(Duration::MAX),
                _ => None,
            },
            only_if_cached: cc.has("only-if-cached"),
        }
    }

    /// Whether the request accepts `entry`, which has spent `resident` in the store, as far as
    /// its age and freshness left go (`max-age`, `min-fresh`). `max-age=0` accepts no stored
    /// response without validation, whatever its age.
    pub(super) fn allows(&self, entry: &Entry, resident: Duration) -> bool {
        let age = entry.initial_age + resident;
        let left = entry.fresh_for.saturating_sub(resident);
        self.max_age.is_none_or(|max| !max.is_zero() && age <= max) && left >= self.min_fresh
    }

    /// Whether the request accepts `entry` stale (`max-stale` covers its staleness).
    pub(super) fn takes_stale(&self, entry: &Entry, resident: Duration) -> bool {
        let stale_for = resident.saturating_sub(entry.fresh_for);
        self.max_stale.is_some_and(|max| stale_for <= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderValue, StatusCode};

    fn limits(cc: &'static str) -> Limits {
        let mut h = HeaderMap::new();
        h.insert("cache-control", HeaderValue::from_static(cc));
        Limits::of(&h)
    }

    #[test]
    fn request_limits() {
        let entry = Entry {
            status: StatusCode::OK,
            initial_age: Duration::from_secs(5),
            fresh_for: Duration::from_secs(10),
            headers: HeaderMap::new(),
            vary: Vec::new(),
            body: Bytes::new(),
        };
        let s = Duration::from_secs;
        // Age 5 + 3 = 8, 7 s of freshness left.
        assert!(limits("max-age=8").allows(&entry, s(3)));
        assert!(!limits("Max-Age=7").allows(&entry, s(3)));
        assert!(!limits("max-age=\"60\"").allows(&entry, s(3)));
        assert!(!limits("max-age=0").allows(&entry, s(0)));
        assert!(limits("min-fresh=7").allows(&entry, s(3)));
        assert!(!limits("min-fresh=8").allows(&entry, s(3)));
        assert!(limits("").allows(&entry, s(3)));
        // 4 s stale.
        assert!(limits("max-stale").takes_stale(&entry, s(14)));
        assert!(limits("max-stale=4").takes_stale(&entry, s(14)));
        assert!(!limits("max-stale=3").takes_stale(&entry, s(14)));
        assert!(!limits("max-stale=x").takes_stale(&entry, s(14)));
        assert!(!limits("").takes_stale(&entry, s(14)));
        assert!(limits("only-if-cached").only_if_cached);
    }
}
