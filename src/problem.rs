//! Problem details (RFC 9457) for the responses the layers build themselves.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

/// An `application/problem+json` response with `status` and `detail` (plain ASCII text).
pub(crate) fn problem(status: StatusCode, detail: &str) -> Response<Bytes> {
    let detail: String = detail
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
        .collect();
    let body = format!(
        "{{\"type\":\"about:blank\",\"title\":\"{}\",\"status\":{},\"detail\":\"{detail}\"}}",
        status.canonical_reason().unwrap_or(""),
        status.as_u16()
    );
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// [`problem`] for a body known at compile time (no formatting per response).
pub(crate) fn problem_static(status: StatusCode, body: &'static str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from_static(body.as_bytes()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}
