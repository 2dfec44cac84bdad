//! The responses the layer marks or builds: the `Cache-Status` field (RFC 9211) and the metric
//! counted with it, a response served from an entry, the `503` of a failed lookup under
//! [`FailureMode::Closed`](crate::FailureMode::Closed), and the `504` of an `only-if-cached`
//! request with nothing usable stored.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::Body;

use super::{config::Config, entry::Entry, freshness, layer::Rejection, ResponseBody};

/// The `Cache-Status` field (RFC 9211).
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// The cache's name in `Cache-Status`.
const CACHE_NAME: &str = "tower-redis-layers";

/// The `Cache-Status` parameters of the `503` answered when a lookup fails and the layer fails
/// closed.
const UNAVAILABLE_STATUS: &str = "detail=store-unavailable";

/// The body of that `503` (problem details, RFC 9457), written out so that an outage formats
/// nothing per request.
const UNAVAILABLE_BODY: &str = r#"{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"the cache store is unavailable; retry shortly"}"#;

/// Adds this cache's member, `params`, to `Cache-Status` (after those of the caches nearer the
/// origin, RFC 9211 section 2) and counts the outcome it says.
pub(super) fn mark(headers: &mut HeaderMap, params: &str) {
    count(outcome_of(params));
    let ours = format!("{CACHE_NAME}; {params}");
    let upstream: Vec<&str> = headers
        .get_all(CACHE_STATUS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let value = if upstream.is_empty() {
        ours
    } else {
        format!("{}, {ours}", upstream.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(CACHE_STATUS, v);
    }
}

/// The inner service's response, marked with `params`.
pub(super) fn passed<B: Body>(
    mut response: Response<B>,
    params: &str,
) -> Response<ResponseBody<B>> {
    mark(response.headers_mut(), params);
    response.map(ResponseBody::service)
}

/// A response built from a stored entry, with its `Age` (its age when stored plus `resident`,
/// the time since); without a body for a `HEAD` request.
pub(super) fn serve<B: Body>(
    entry: Entry,
    resident: Duration,
    head: bool,
    params: &str,
) -> Response<ResponseBody<B>> {
    let age = freshness::current_age(entry.initial_age, resident);
    let body = if head { Bytes::new() } else { entry.body };
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = entry.status;
    *response.headers_mut() = entry.headers;
    response
        .headers_mut()
        .insert(http::header::AGE, HeaderValue::from(age));
    mark(response.headers_mut(), params);
    response
}

/// `503 Service Unavailable` with `Retry-After: 1`: the store failed and the layer fails closed.
/// From the configured rejection builder if there is one.
pub(super) fn unavailable<B: Body>(config: &Config) -> Response<ResponseBody<B>> {
    let mut response = match &config.rejection {
        Some(f) => f(&Rejection::Unavailable),
        None => crate::problem::problem_static(StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE_BODY),
    };
    if !response.headers().contains_key(http::header::RETRY_AFTER) {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    mark_own(response.headers_mut(), UNAVAILABLE_STATUS);
    response.map(ResponseBody::full)
}

/// [`mark`], unless a rejection builder set `Cache-Status` itself (still counted).
fn mark_own(headers: &mut HeaderMap, params: &str) {
    if headers.contains_key(CACHE_STATUS) {
        count(outcome_of(params));
    } else {
        mark(headers, params);
    }
}

/// The `Cache-Status` parameters of the `504` answered to `only-if-cached` when nothing usable
/// is stored.
const NOT_CACHED_STATUS: &str = "detail=only-if-cached";

/// `504 Gateway Timeout`: the request said `only-if-cached` and nothing usable is stored (RFC
/// 9111 section 5.2.1.7); the inner service is not called.
pub(super) fn not_cached<B: Body>(config: &Config) -> Response<ResponseBody<B>> {
    let mut response = match &config.rejection {
        Some(f) => f(&Rejection::NotCached),
        None => crate::problem::problem(
            StatusCode::GATEWAY_TIMEOUT,
            "only-if-cached: no usable response is stored",
        ),
    };
    mark_own(response.headers_mut(), NOT_CACHED_STATUS);
    response.map(ResponseBody::full)
}

/// The metric label of a `Cache-Status` value.
fn outcome_of(params: &str) -> &'static str {
    if params.starts_with("hit; detail=stale") {
        "stale"
    } else if params.starts_with("hit") {
        "hit"
    } else if params.contains("fwd-status=304") {
        "revalidated"
    } else if params.contains("stale-if-error") {
        "stale_if_error"
    } else if params.starts_with("fwd=bypass") {
        "bypass"
    } else if params == UNAVAILABLE_STATUS {
        "unavailable"
    } else if params == NOT_CACHED_STATUS {
        "not_cached"
    } else if params.contains("stored") {
        "miss_stored"
    } else {
        "miss"
    }
}

/// Counts a request's outcome (feature `metrics`).
#[inline]
fn count(outcome: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("tower_redis_layers_cache_requests_total", "outcome" => outcome).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unavailable_body_matches_the_formatted_one() {
        let formatted = crate::problem::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cache store is unavailable; retry shortly",
        );
        assert_eq!(
            formatted.into_body(),
            Bytes::from_static(UNAVAILABLE_BODY.as_bytes())
        );
    }

    #[test]
    fn cache_status_keeps_the_members_nearer_the_origin() {
        let mut headers = HeaderMap::new();
        mark(&mut headers, "hit");
        assert_eq!(headers[CACHE_STATUS], "tower-redis-layers; hit");
        let mut headers = HeaderMap::new();
        headers.append(
            CACHE_STATUS,
            HeaderValue::from_static("origin; fwd=uri-miss"),
        );
        headers.append(CACHE_STATUS, HeaderValue::from_static("cdn; hit"));
        mark(&mut headers, "fwd=miss");
        assert_eq!(
            headers[CACHE_STATUS],
            "origin; fwd=uri-miss, cdn; hit, tower-redis-layers; fwd=miss"
        );
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome_of("hit"), "hit");
        assert_eq!(outcome_of("hit; detail=stale"), "stale");
        assert_eq!(
            outcome_of("fwd=stale; detail=stale-if-error"),
            "stale_if_error"
        );
        assert_eq!(outcome_of("fwd=bypass; detail=cookie"), "bypass");
        assert_eq!(outcome_of("fwd=miss; stored"), "miss_stored");
        assert_eq!(outcome_of("fwd=miss"), "miss");
        assert_eq!(
            outcome_of("fwd=stale; fwd-status=304; stored"),
            "revalidated"
        );
        assert_eq!(outcome_of(UNAVAILABLE_STATUS), "unavailable");
        assert_eq!(outcome_of(NOT_CACHED_STATUS), "not_cached");
    }
}
