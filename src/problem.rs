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

/// The default `429` (draft-ietf-httpapi-ratelimit-headers, "Quota Exceeded"): the
/// `quota-exceeded` problem type with its registered title, and the names of the policies the
/// request exceeded in the `violated-policies` extension member, as the `RateLimit` field of the
/// same response names them. The names are valid structured-field strings (see
/// [`Rule::name`](crate::rate_limit::Rule::name)), so they need no escaping in JSON; anything else
/// is left out anyway. The body is built in one allocation (this is the flood path).
pub(crate) fn quota_exceeded(policies: &[&str]) -> Response<Bytes> {
    quota_exceeded_response(quota_exceeded_body(policies))
}

/// The default `429` with a body made by [`quota_exceeded_body`] (kept and cloned: no
/// allocation per response for the body).
pub(crate) fn quota_exceeded_response(body: Bytes) -> Response<Bytes> {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// The body of [`quota_exceeded`].
pub(crate) fn quota_exceeded_body(policies: &[&str]) -> Bytes {
    const HEAD: &str = concat!(
        r#"{"type":"https://iana.org/assignments/http-problem-types#quota-exceeded","#,
        r#""title":"Quota Exceeded","status":429,"#,
        r#""detail":"rate limit exceeded; retry after the time in Retry-After","#,
        r#""violated-policies":["#
    );
    let safe = |c: &char| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\';
    let names: usize = policies.iter().map(|p| p.len() + 3).sum();
    let mut body = String::with_capacity(HEAD.len() + names + 2);
    body.push_str(HEAD);
    for (i, name) in policies.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push('"');
        body.extend(name.chars().filter(safe));
        body.push('"');
    }
    body.push_str("]}");
    Bytes::from(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problem type of a `429` (draft-ietf-httpapi-ratelimit-headers, "Problem Types").
    pub(crate) const QUOTA_EXCEEDED: &str =
        "https://iana.org/assignments/http-problem-types#quota-exceeded";

    /// The detail of the default `429`.
    pub(crate) const QUOTA_EXCEEDED_DETAIL: &str =
        "rate limit exceeded; retry after the time in Retry-After";

    #[test]
    fn quota_exceeded_is_the_drafts_problem_type() {
        let response = quota_exceeded(&["a", "per-10s"]);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = std::str::from_utf8(response.body()).unwrap();
        assert!(
            body.starts_with(&format!("{{\"type\":\"{QUOTA_EXCEEDED}\"")),
            "{body}"
        );
        assert!(
            body.contains(&format!("\"detail\":\"{QUOTA_EXCEEDED_DETAIL}\"")),
            "{body}"
        );
        assert!(
            body.ends_with(r#""violated-policies":["a","per-10s"]}"#),
            "{body}"
        );
        let none = quota_exceeded(&[]);
        let body = std::str::from_utf8(none.body()).unwrap();
        assert!(body.ends_with(r#""violated-policies":[]}"#), "{body}");
        // A name that is not a structured-field string cannot break the JSON.
        let odd = quota_exceeded(&["a\"b\\c\u{1}"]);
        let body = std::str::from_utf8(odd.body()).unwrap();
        assert!(body.ends_with(r#""violated-policies":["abc"]}"#), "{body}");
    }
}
