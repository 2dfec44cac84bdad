//! Cacheability rules for a shared cache (RFC 9111 sections 3, 3.5, 4.2 and 5.2).

use std::time::{Duration, SystemTime};

use http::{header, request::Parts, HeaderMap, HeaderName, Method, StatusCode};

use super::{
    config::{Config, Heuristic, HEURISTIC_STATUSES},
    freshness::{self, Delta, Directives, Exchange, Lifetime},
};

/// Why a request does not use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bypass {
    /// Not GET or HEAD: passed through untouched.
    Method,
    Authorization,
    Cookie,
    /// `Cache-Control: no-store` on the request.
    NoStore,
    /// The partition closure returned `None`.
    NoPartition,
    /// The request's host is not on the layer's list.
    Host,
}

impl Bypass {
    pub(crate) fn detail(self) -> &'static str {
        match self {
            Bypass::Method => "method",
            Bypass::Authorization => "authorization",
            Bypass::Cookie => "cookie",
            Bypass::NoStore => "no-store",
            Bypass::NoPartition => "no-partition",
            Bypass::Host => "host",
        }
    }
}

fn has_directive(headers: &HeaderMap, name: &str) -> bool {
    Directives::parse(headers).has(name)
}

/// What a request may do with the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestUse {
    /// Look up, and store on a miss.
    Normal,
    /// `Cache-Control: no-cache` (or `Pragma: no-cache`): do not serve from the cache, but the
    /// fresh response may be stored.
    Refresh,
}

pub(crate) fn request_use(parts: &Parts, allow_authorized: bool) -> Result<RequestUse, Bypass> {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Err(Bypass::Method);
    }
    if !allow_authorized {
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return Err(Bypass::Authorization);
        }
        if parts.headers.contains_key(header::COOKIE) {
            return Err(Bypass::Cookie);
        }
    }
    if has_directive(&parts.headers, "no-store") {
        return Err(Bypass::NoStore);
    }
    let pragma_no_cache = parts.headers.get_all(header::PRAGMA).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache"))
    });
    if has_directive(&parts.headers, "no-cache") || pragma_no_cache {
        return Ok(RequestUse::Refresh);
    }
    Ok(RequestUse::Normal)
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStored {
    Status,
    SetCookie,
    Private,
    NoStore,
    NoCache,
    VaryStar,
    /// Stale on arrival: no freshness left (or invalid freshness information).
    Stale,
    TooLarge,
}

/// The `Vary` header names of a response (lowercase, sorted, deduplicated), or `Err` for `*`.
pub(crate) fn vary_names(headers: &HeaderMap) -> Result<Vec<HeaderName>, NotStored> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(value) = value.to_str() else {
            return Err(NotStored::VaryStar);
        };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(NotStored::VaryStar);
            }
            match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                Ok(n) => names.push(n),
                Err(_) => return Err(NotStored::VaryStar),
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Ok(names)
}

/// How a storable response is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Storable {
    /// How long it stays fresh from now: its freshness lifetime minus its initial age.
    pub(crate) ttl: Duration,
    /// Its corrected initial age (RFC 9111 section 4.2.3).
    pub(crate) initial_age: Duration,
    /// The lifetime is the origin's (`s-maxage`, `max-age`, `Expires`), not the layer's TTL.
    pub(crate) explicit: bool,
    /// How long past its freshness it may be served while one request refreshes it.
    pub(crate) stale_while_revalidate: Duration,
    /// How long past its freshness it may be served when the inner service fails.
    pub(crate) stale_if_error: Duration,
    /// How long it is kept past its freshness to be revalidated (zero without a validator).
    pub(crate) keep: Duration,
}

/// Whether a response has a validator (`ETag` or `Last-Modified`) a conditional request can
/// use.
pub(crate) fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// Whether a stored response may never be served stale, even to a request's `max-stale`:
/// `must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache` (RFC 9111 sections
/// 4.2.4, 5.2.2).
pub(crate) fn forbids_stale(headers: &HeaderMap, config: &Config) -> bool {
    let (cc, _) = response_directives(headers, config);
    [
        "must-revalidate",
        "proxy-revalidate",
        "s-maxage",
        "no-cache",
    ]
    .iter()
    .any(|d| cc.has(d))
}

/// The stale windows of a response (RFC 5861): its `stale-while-revalidate` and
/// `stale-if-error`, each capped by the layer's window or `.stale_directives_up_to` if larger
/// (the layer's window is also the default when the response has none; an invalid value is 0). `must-revalidate`, `proxy-revalidate` and
/// `s-maxage` forbid serving it stale at all (RFC 9111 sections 4.2.4, 5.2.2.2, 5.2.2.8, 5.2.2.10).
fn stale_windows(cc: &Directives, config: &Config) -> (Duration, Duration) {
    if cc.has("must-revalidate")
        || cc.has("proxy-revalidate")
        || cc.has("s-maxage")
        || cc.has("no-cache")
    {
        return (Duration::ZERO, Duration::ZERO);
    }
    let window = |name: &str, layer: Duration| match cc.delta(name) {
        Delta::Absent => layer,
        Delta::Seconds(s) => Duration::from_secs(s).min(layer.max(config.stale_directive_cap)),
        Delta::Invalid => Duration::ZERO,
    };
    (
        window("stale-while-revalidate", config.stale_while_revalidate),
        window("stale-if-error", config.stale_if_error),
    )
}

/// The cache directives of a response for this cache: those of the layer's targeted field
/// (RFC 9213) when the response has it with a valid, non-empty value (then `true`: `Expires` is
/// ignored too), else those of `Cache-Control`.
pub(crate) fn response_directives(headers: &HeaderMap, config: &Config) -> (Directives, bool) {
    if let Some(name) = &config.targeted {
        let targeted = Directives::parse_fields(headers, name);
        if !targeted.is_empty() && targeted.names_are_keys() {
            return (targeted, true);
        }
    }
    (Directives::parse(headers), false)
}

/// The heuristic freshness lifetime from `Last-Modified` (RFC 9111 section 4.2.2): a fraction
/// of the time between it and the response's `Date` (else its arrival), capped. `None`
/// without a valid `Last-Modified` in the past.
fn heuristic_lifetime(headers: &HeaderMap, h: Heuristic, received: SystemTime) -> Option<Duration> {
    let date = |name| {
        let value = headers.get(name)?.to_str().ok()?;
        httpdate::parse_http_date(value.trim()).ok()
    };
    let modified = date(header::LAST_MODIFIED)?;
    let now = date(header::DATE).unwrap_or(received);
    let since = now.duration_since(modified).ok()?;
    Some(since.mul_f64(h.fraction).min(h.cap))
}

/// Whether a response may be stored, and for how long (before jitter).
///
/// The freshness lifetime is the response's own (`s-maxage`, else `max-age`, else `Expires` −
/// `Date`) whenever it gives one; the layer's TTL is the heuristic for the others, used only for
/// the heuristically cacheable statuses or a `public` response. With `.statuses(..)` set, only
/// those statuses are stored, and the TTL applies to any of them. A response already stale on
/// arrival (its age is past its lifetime, or its freshness information is invalid) is not
/// stored.
pub(crate) fn storable(
    status: StatusCode,
    headers: &HeaderMap,
    config: &Config,
    exchange: Exchange,
) -> Result<Storable, NotStored> {
    // Partial content and `304` complete nothing the cache could serve whole.
    let final_status = status.as_u16() >= 200 && !matches!(status.as_u16(), 206 | 304);
    let listed = config.statuses.as_ref().map(|l| l.contains(&status));
    if !final_status || listed == Some(false) {
        return Err(NotStored::Status);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    let (cc, targeted) = response_directives(headers, config);
    if cc.has("private") {
        return Err(NotStored::Private);
    }
    if cc.has("no-store") {
        return Err(NotStored::NoStore);
    }
    // With a validator, a response that must be revalidated before each use (`no-cache`) or
    // that is stale already is kept to be revalidated, never served without it.
    let validated = !config.keep.is_zero() && has_validator(headers);
    let no_cache = cc.has("no-cache");
    if no_cache && !validated {
        return Err(NotStored::NoCache);
    }
    vary_names(headers)?;
    let too_large = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > config.max_body as u64);
    if too_large {
        return Err(NotStored::TooLarge);
    }
    let lifetime = if config.response_ttl {
        freshness::lifetime(headers, &cc, !targeted, exchange.received)
    } else {
        Lifetime::None
    };
    let (lifetime, explicit) = match lifetime {
        Lifetime::Explicit(lifetime) => (lifetime, true),
        Lifetime::None => {
            let heuristic = listed == Some(true)
                || HEURISTIC_STATUSES.contains(&status.as_u16())
                || cc.has("public");
            if !heuristic {
                return Err(NotStored::Status);
            }
            match config.heuristic.filter(|_| config.response_ttl) {
                Some(h) => (
                    heuristic_lifetime(headers, h, exchange.received).unwrap_or_default(),
                    false,
                ),
                None => (config.ttl, false),
            }
        }
    };
    let initial_age = freshness::initial_age(headers, exchange);
    let ttl = if no_cache {
        Duration::ZERO
    } else {
        lifetime.saturating_sub(initial_age)
    };
    if ttl.is_zero() && !validated {
        return Err(NotStored::Stale);
    }
    let (stale_while_revalidate, stale_if_error) = stale_windows(&cc, config);
    Ok(Storable {
        ttl,
        initial_age,
        explicit,
        stale_while_revalidate,
        stale_if_error,
        keep: if validated {
            config.keep
        } else {
            Duration::ZERO
        },
    })
}

/// The headers to store: end-to-end ones only (RFC 9110 section 7.6.1), without `Age` (the
/// age is computed when the entry is served) and our own `Cache-Status`.
pub(crate) fn stored_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let ours = name == header::AGE || name.as_str() == "cache-status";
        if !ours && !crate::body::is_hop_by_hop(headers, name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http::HeaderValue;

    /// A header map of `pairs` (shared with the other cache unit tests).
    pub(in crate::cache) fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    fn config(statuses: Option<Vec<StatusCode>>) -> Config {
        let layer = crate::cache::CacheLayer::new(crate::store::MemoryStore::new())
            .ttl(Duration::from_secs(9))
            .max_body(10);
        let mut config = (*layer.shared().config).clone();
        config.statuses = statuses;
        config
    }

    const NOW: Exchange = Exchange {
        received: std::time::UNIX_EPOCH,
        delay: Duration::ZERO,
    };

    #[test]
    fn response_rules() {
        let config = config(None);
        let d = Duration::from_secs(9);
        let st = |status: u16, hs: &[(&'static str, &'static str)]| {
            storable(StatusCode::from_u16(status).unwrap(), &h(hs), &config, NOW)
                .map(|s| (s.ttl, s.explicit))
        };
        let s = |hs: &[(&'static str, &'static str)]| st(200, hs);
        assert_eq!(s(&[]), Ok((d, false)));
        assert_eq!(
            s(&[("cache-control", "public, max-age=5, s-maxage=7")]),
            Ok((Duration::from_secs(7), true))
        );
        assert_eq!(
            s(&[("cache-control", "max-age=5")]),
            Ok((Duration::from_secs(5), true))
        );
        assert_eq!(s(&[("cache-control", "max-age=0")]), Err(NotStored::Stale));
        assert_eq!(s(&[("cache-control", "Max-Age=0")]), Err(NotStored::Stale));
        assert_eq!(
            s(&[("cache-control", "S-MAXAGE=0, max-age=60")]),
            Err(NotStored::Stale)
        );
        assert_eq!(s(&[("cache-control", "max-age=-1")]), Err(NotStored::Stale));
        assert_eq!(
            s(&[("cache-control", "max-age=\"60\"")]),
            Err(NotStored::Stale)
        );
        assert_eq!(s(&[("expires", "0")]), Err(NotStored::Stale));
        // The response's age counts.
        assert_eq!(
            s(&[("cache-control", "max-age=10"), ("age", "4")]),
            Ok((Duration::from_secs(6), true))
        );
        assert_eq!(
            s(&[("cache-control", "max-age=3600"), ("age", "7200")]),
            Err(NotStored::Stale)
        );
        assert_eq!(s(&[("age", "20")]), Err(NotStored::Stale));
        assert_eq!(
            s(&[("cache-control", "private=\"x\"")]),
            Err(NotStored::Private)
        );
        assert_eq!(s(&[("cache-control", "No-Store")]), Err(NotStored::NoStore));
        assert_eq!(s(&[("set-cookie", "a=b")]), Err(NotStored::SetCookie));
        assert_eq!(s(&[("vary", "accept, *")]), Err(NotStored::VaryStar));
        assert_eq!(s(&[("content-length", "11")]), Err(NotStored::TooLarge));
        // Explicit freshness makes any final status storable; the heuristic needs a
        // heuristically cacheable status or `public`.
        assert_eq!(st(201, &[]), Err(NotStored::Status));
        assert_eq!(st(201, &[("cache-control", "public")]), Ok((d, false)));
        assert_eq!(
            st(201, &[("cache-control", "max-age=5")]),
            Ok((Duration::from_secs(5), true))
        );
        assert_eq!(
            st(206, &[("cache-control", "max-age=5")]),
            Err(NotStored::Status)
        );
        assert_eq!(
            st(304, &[("cache-control", "max-age=5")]),
            Err(NotStored::Status)
        );
        // A list replaces the rule: only those, with the TTL as heuristic.
        let listed = super::tests::config(Some(vec![StatusCode::CREATED]));
        let l = |status: u16, hs: &[(&'static str, &'static str)]| {
            storable(StatusCode::from_u16(status).unwrap(), &h(hs), &listed, NOW).map(|s| s.ttl)
        };
        assert_eq!(l(201, &[]), Ok(d));
        assert_eq!(
            l(200, &[("cache-control", "max-age=5")]),
            Err(NotStored::Status)
        );
    }

    #[test]
    fn heuristic_and_targeted_field() {
        let mut config = config(None);
        config.heuristic = Some(Heuristic {
            fraction: 0.1,
            cap: Duration::from_secs(3600),
        });
        config.targeted = Some(HeaderName::from_static("cdn-cache-control"));
        let date = "Thu, 01 Jan 1970 10:00:00 GMT";
        let st = |status: u16, hs: &[(&'static str, &'static str)]| {
            storable(StatusCode::from_u16(status).unwrap(), &h(hs), &config, NOW)
                .map(|s| (s.ttl.as_secs(), s.explicit))
        };
        // 10% of 1000 s; capped at an hour; none without Last-Modified.
        let lm = ("last-modified", "Thu, 01 Jan 1970 09:43:20 GMT");
        assert_eq!(st(200, &[("date", date), lm]), Ok((100, false)));
        let old = ("last-modified", "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(st(200, &[("date", date), old]), Ok((3600, false)));
        assert_eq!(st(200, &[("date", date)]), Err(NotStored::Stale));
        // With a validator, kept to be revalidated (never fresh).
        let etag = ("etag", "\"1\"");
        assert_eq!(st(200, &[("date", date), etag]), Ok((0, false)));
        assert_eq!(
            st(200, &[("cache-control", "no-cache, max-age=60"), etag]),
            Ok((0, true))
        );
        assert_eq!(
            st(200, &[("cache-control", "max-age=0, must-revalidate"), lm]),
            Ok((0, true))
        );
        assert_eq!(
            st(200, &[("cache-control", "no-cache, max-age=60")]),
            Err(NotStored::NoCache)
        );
        assert_eq!(st(201, &[("date", date), lm]), Err(NotStored::Status));
        assert_eq!(
            st(201, &[("date", date), lm, ("cache-control", "public")]),
            Ok((100, false))
        );
        // The targeted field wins over Cache-Control and Expires, when valid and non-empty.
        let cdn = |v| ("cdn-cache-control", v);
        assert_eq!(
            st(200, &[("cache-control", "no-store"), cdn("max-age=30")]),
            Ok((30, true))
        );
        assert_eq!(
            st(200, &[("cache-control", "max-age=30"), cdn("no-store")]),
            Err(NotStored::NoStore)
        );
        assert_eq!(
            st(200, &[("expires", "0"), cdn("public"), ("date", date), lm]),
            Ok((100, false))
        );
        assert_eq!(
            st(200, &[("cache-control", "max-age=30"), cdn(" ")]),
            Ok((30, true))
        );
    }

    #[test]
    fn stale_windows_from_the_response() {
        let mut config = config(None);
        config.stale_while_revalidate = Duration::from_secs(30);
        config.stale_if_error = Duration::from_secs(60);
        let w = |cc: &'static str| {
            let s = storable(StatusCode::OK, &h(&[("cache-control", cc)]), &config, NOW).unwrap();
            (
                s.stale_while_revalidate.as_secs(),
                s.stale_if_error.as_secs(),
            )
        };
        assert_eq!(w("max-age=5"), (30, 60));
        assert_eq!(
            w("max-age=5, stale-while-revalidate=10, Stale-If-Error=20"),
            (10, 20)
        );
        assert_eq!(
            w("max-age=5, stale-while-revalidate=100, stale-if-error=600"),
            (30, 60)
        );
        assert_eq!(
            w("max-age=5, stale-while-revalidate=\"10\", stale-if-error=-1"),
            (0, 0)
        );
        assert_eq!(w("max-age=5, must-revalidate, stale-if-error=20"), (0, 0));
        assert_eq!(w("max-age=5, proxy-revalidate"), (0, 0));
        assert_eq!(w("s-maxage=5, stale-while-revalidate=10"), (0, 0));
    }

    #[test]
    fn hop_by_hop_headers_are_not_stored() {
        let stored = stored_headers(&h(&[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/plain"),
            ("age", "3"),
            ("cache-status", "upstream; hit"),
        ]));
        assert_eq!(stored.len(), 1);
        assert!(stored.contains_key("content-type"));
    }
}
