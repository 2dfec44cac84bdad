//! Cacheability rules for a shared cache (RFC 9111 sections 3, 3.5 and 5.2), with
//! `Cache-Control` parsed by the `headers` crate.

use std::time::Duration;

use headers::{CacheControl, HeaderMapExt};
use http::{header, request::Parts, HeaderMap, HeaderName, Method, StatusCode};

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
}

impl Bypass {
    pub(crate) fn detail(self) -> &'static str {
        match self {
            Bypass::Method => "method",
            Bypass::Authorization => "authorization",
            Bypass::Cookie => "cookie",
            Bypass::NoStore => "no-store",
            Bypass::NoPartition => "no-partition",
        }
    }
}

/// The directive names of every `Cache-Control` field, lowercase (`private="x"` gives
/// `private`). The typed parse skips the field-name forms, which must still count.
fn directive_names(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| {
            d.split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

fn has_directive(headers: &HeaderMap, name: &str) -> bool {
    directive_names(headers).any(|d| d == name)
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
    ZeroTtl,
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

/// Whether a response may be stored, and for how long (before jitter).
pub(crate) fn storable(
    status: StatusCode,
    headers: &HeaderMap,
    statuses: &[StatusCode],
    default_ttl: Duration,
    response_ttl: bool,
    max_body: usize,
) -> Result<Duration, NotStored> {
    if !statuses.contains(&status) {
        return Err(NotStored::Status);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    for name in directive_names(headers) {
        match name.as_str() {
            "private" => return Err(NotStored::Private),
            "no-store" => return Err(NotStored::NoStore),
            "no-cache" => return Err(NotStored::NoCache),
            _ => {}
        }
    }
    vary_names(headers)?;
    let too_large = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > max_body as u64);
    if too_large {
        return Err(NotStored::TooLarge);
    }
    let ttl = if response_ttl {
        headers
            .typed_get::<CacheControl>()
            .and_then(|cc| cc.s_max_age().or_else(|| cc.max_age()))
            .unwrap_or(default_ttl)
    } else {
        default_ttl
    };
    if ttl.is_zero() {
        return Err(NotStored::ZeroTtl);
    }
    Ok(ttl)
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
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn response_rules() {
        let ok = [StatusCode::OK];
        let d = Duration::from_secs(9);
        let s = |hs: &[(&'static str, &'static str)]| {
            storable(StatusCode::OK, &h(hs), &ok, d, true, 10)
        };
        assert_eq!(s(&[]), Ok(d));
        assert_eq!(
            s(&[("cache-control", "public, max-age=5, s-maxage=7")]),
            Ok(Duration::from_secs(7))
        );
        assert_eq!(
            s(&[("cache-control", "max-age=5")]),
            Ok(Duration::from_secs(5))
        );
        assert_eq!(
            s(&[("cache-control", "max-age=0")]),
            Err(NotStored::ZeroTtl)
        );
        assert_eq!(
            s(&[("cache-control", "private=\"x\"")]),
            Err(NotStored::Private)
        );
        assert_eq!(s(&[("cache-control", "No-Store")]), Err(NotStored::NoStore));
        assert_eq!(s(&[("set-cookie", "a=b")]), Err(NotStored::SetCookie));
        assert_eq!(s(&[("vary", "accept, *")]), Err(NotStored::VaryStar));
        assert_eq!(s(&[("content-length", "11")]), Err(NotStored::TooLarge));
        assert_eq!(
            storable(StatusCode::CREATED, &h(&[]), &ok, d, true, 10),
            Err(NotStored::Status)
        );
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
