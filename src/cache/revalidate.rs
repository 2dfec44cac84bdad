//! Validation of a stored entry (RFC 9111 section 4.3): the conditional request sent for it
//! (`If-None-Match` from its `ETag`, `If-Modified-Since` from its `Last-Modified`), and a
//! `304 Not Modified` that confirms it: the stored headers are updated with the `304`'s
//! (section 3.2), the entry's head and freshness are refreshed in one store call (its body is
//! not written again), and the stored body is served.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response};
use http_body::Body;

use super::{
    conditional::{self, Conditional},
    entry::Entry,
    fill::fresh_ttl,
    freshness::{self, Exchange},
    policy, response,
    target::Target,
    ResponseBody, TARGET,
};
use crate::store::{CacheStore, FillToken, Lookup, RefreshRequest};

/// The client's preconditions, removed from a request the cache validates its own entry with
/// (the origin's `304` must be about the stored entry).
const PRECONDITIONS: [HeaderName; 5] = [
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

/// A stored entry a fill replaces.
pub(super) struct Prior {
    pub(super) entry: Entry,
    /// Time since it was stored.
    pub(super) age: Duration,
    /// It may be served when the handler fails (inside its stale-if-error window).
    pub(super) stand_in: bool,
    /// The first bytes of the stored entry, up to the body (what a refresh replaces).
    old_head: Option<Bytes>,
}

impl Prior {
    /// The entry `lookup` found (decoded as `entry`); it stands in on failure if `stand_in`.
    pub(super) fn new(entry: Entry, lookup: &Lookup, stand_in: bool) -> Self {
        Self {
            entry,
            age: lookup.age,
            stand_in,
            old_head: lookup.entry.as_ref().and_then(Entry::head_of),
        }
    }
}

/// Makes `headers` (a request's) ask whether `prior` still holds: its validators in place of
/// the client's own preconditions (RFC 9111 section 4.3.1: `If-None-Match` with its `ETag`,
/// and `If-Modified-Since` with its `Last-Modified`). `false` (the request unchanged) when it
/// has neither.
pub(super) fn condition(headers: &mut HeaderMap, prior: &Prior) -> bool {
    let stored = &prior.entry.headers;
    let etag = stored.get(header::ETAG);
    let modified = stored.get(header::LAST_MODIFIED);
    if etag.is_none() && modified.is_none() {
        return false;
    }
    for name in PRECONDITIONS {
        headers.remove(name);
    }
    if let Some(etag) = etag {
        headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = modified {
        headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
    }
    true
}

/// The stored headers updated with those of a `304` (RFC 9111 section 3.2): each field the
/// `304` carries replaces the stored one, but `Content-Length`, the hop-by-hop fields, `Age`
/// and `Cache-Status`.
fn merged(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let mut headers = stored.clone();
    let fresh = policy::stored_headers(not_modified);
    for name in fresh.keys() {
        if name != header::CONTENT_LENGTH {
            headers.remove(name);
        }
    }
    for (name, value) in &fresh {
        if name != header::CONTENT_LENGTH {
            headers.append(name.clone(), HeaderValue::clone(value));
        }
    }
    headers
}

/// A validation the origin answered with `304`.
pub(super) struct Revalidation {
    pub(super) prior: Prior,
    /// The segment version the lookup read (`None`: not refreshed in the store).
    pub(super) version: Option<u64>,
    pub(super) lock: Option<FillToken>,
    pub(super) conditional: Option<Conditional>,
    /// The fill's `Cache-Status` parameters (`; fwd-status=304` is added).
    pub(super) status: &'static str,
}

impl Revalidation {
    /// Refreshes the entry with the `304`'s headers (one store call, which also releases the
    /// fill lock) and serves it, or `304` when the client's own preconditions match it.
    pub(super) async fn confirmed<B: CacheStore, T: Body>(
        self,
        target: &Target<'_, B>,
        not_modified: &HeaderMap,
        exchange: Exchange,
    ) -> Response<ResponseBody<T>> {
        let config = target.config();
        let mut headers = merged(&self.prior.entry.headers, not_modified);
        // The stored `Date` is the old response's: without a new one, the confirmation is dated
        // when it arrived (RFC 9110 section 6.6.1), so the entry is not as old as the original.
        if !not_modified.contains_key(header::DATE) {
            let now = httpdate::fmt_http_date(exchange.received);
            if let Ok(date) = HeaderValue::from_str(&now) {
                headers.insert(header::DATE, date);
            }
        }
        // The `304`'s own `Age` counts (it is not stored).
        let mut aged = headers.clone();
        if let Some(age) = not_modified.get(header::AGE) {
            aged.insert(header::AGE, age.clone());
        }
        let mut entry = Entry {
            headers,
            ..self.prior.entry
        };
        let storable = policy::storable(entry.status, &aged, config, exchange);
        entry.initial_age = match &storable {
            Ok(s) => s.initial_age,
            Err(_) => freshness::initial_age(&aged, exchange),
        };
        let refresh = match (storable, self.version, self.prior.old_head) {
            (Ok(storable), Some(version), Some(old_head)) => {
                entry.fresh_for = fresh_ttl(config, storable);
                entry.encode_head().ok().map(|new_head| RefreshRequest {
                    segment: target.keys.segment,
                    key: target.keys.variant(&entry.vary),
                    version,
                    fill: self.lock.map(|t| (target.keys.entry, t)),
                    old_head,
                    new_head,
                    ttl: entry.fresh_for,
                    stale_while_revalidate: storable.stale_while_revalidate,
                    stale_if_error: storable.stale_if_error,
                    keep: storable.keep,
                })
            }
            (Err(why), ..) => {
                tracing::debug!(target: TARGET, ?why, "revalidated entry no longer storable");
                None
            }
            _ => None,
        };
        let stored = match refresh {
            Some(request) => target.refresh(request).await,
            None => {
                target.release(self.lock).await;
                false
            }
        };
        let status = format!(
            "{}; fwd-status=304{}",
            self.status,
            if stored { "; stored" } else { "" }
        );
        if self
            .conditional
            .as_ref()
            .is_some_and(|c| c.not_modified(&entry.headers))
        {
            return conditional::not_modified(entry, Duration::ZERO, &status);
        }
        response::serve(entry, Duration::ZERO, target.head, &status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::tests::h;

    #[test]
    fn the_conditional_request_carries_both_validators() {
        let prior = |stored| Prior {
            entry: Entry {
                status: http::StatusCode::OK,
                initial_age: Duration::ZERO,
                fresh_for: Duration::ZERO,
                headers: stored,
                vary: Vec::new(),
                body: Bytes::new(),
            },
            age: Duration::ZERO,
            stand_in: false,
            old_head: None,
        };
        let client = || h(&[("if-none-match", "\"mine\""), ("if-match", "*"), ("x", "1")]);
        let mut request = client();
        let both = prior(h(&[
            ("etag", "\"1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]));
        assert!(condition(&mut request, &both));
        assert_eq!(request["if-none-match"], "\"1\"");
        assert_eq!(
            request["if-modified-since"],
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert!(!request.contains_key("if-match") && request.contains_key("x"));
        let mut request = client();
        assert!(!condition(&mut request, &prior(h(&[]))));
        assert_eq!(request, client());
    }

    #[test]
    fn a_304_updates_the_stored_fields() {
        let stored = h(&[
            ("content-type", "text/plain"),
            ("content-length", "5"),
            ("etag", "\"1\""),
            ("x-a", "old"),
            ("x-a", "older"),
        ]);
        let not_modified = h(&[
            ("x-a", "new"),
            ("content-length", "0"),
            ("connection", "close"),
            ("age", "9"),
            ("cache-control", "max-age=5"),
        ]);
        let m = merged(&stored, &not_modified);
        assert_eq!(m.get_all("x-a").iter().collect::<Vec<_>>(), ["new"]);
        assert_eq!(m["content-length"], "5");
        assert_eq!(m["cache-control"], "max-age=5");
        assert_eq!(m["content-type"], "text/plain");
        assert!(!m.contains_key("connection") && !m.contains_key("age"));
    }
}
