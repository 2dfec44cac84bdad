//! A client's conditional request answered from the cache (RFC 9110 section 13.2, RFC 9111
//! section 4.3.2): `If-None-Match` (weak comparison), else `If-Modified-Since` against the
//! stored `Last-Modified` (else its `Date`). A match gets `304 Not Modified` with the fields
//! section 15.4.5 asks for, without a body.

use std::time::Duration;

use http::{header, HeaderMap, HeaderName, Response, StatusCode};
use http_body::Body;

use super::{entry::Entry, ResponseBody};

/// The fields of the stored response a `304` carries (RFC 9110 section 15.4.5, and
/// `Last-Modified`, which guides cache updates).
const KEPT: [HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::VARY,
];

/// A request's preconditions that the cache evaluates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Conditional {
    /// `If-None-Match`: `*`, or the entity tags listed.
    NoneMatch(Option<Vec<String>>),
    /// `If-Modified-Since` (without `If-None-Match`), as seconds since the epoch.
    ModifiedSince(u64),
}

impl Conditional {
    /// The preconditions of a request's headers, if any the cache evaluates.
    pub(super) fn of(headers: &HeaderMap) -> Option<Self> {
        let none_match: Vec<&str> = headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !none_match.is_empty() {
            if none_match.iter().any(|v| v.trim() == "*") {
                return Some(Self::NoneMatch(None));
            }
            let tags = none_match.iter().flat_map(|v| entity_tags(v)).collect();
            return Some(Self::NoneMatch(Some(tags)));
        }
        let since = headers.get(header::IF_MODIFIED_SINCE)?.to_str().ok()?;
        let since = httpdate::parse_http_date(since.trim()).ok()?;
        Some(Self::ModifiedSince(epoch_secs(since)))
    }

    /// Whether the stored response, with `stored` headers, satisfies the request's cached copy
    /// (the condition is false: answer `304`).
    pub(super) fn not_modified(&self, stored: &HeaderMap) -> bool {
        match self {
            Self::NoneMatch(None) => true,
            Self::NoneMatch(Some(tags)) => {
                let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
                    return false;
                };
                let etag = opaque(etag.trim());
                tags.iter().any(|t| opaque(t) == etag)
            }
            Self::ModifiedSince(since) => {
                let modified = [header::LAST_MODIFIED, header::DATE]
                    .into_iter()
                    .find_map(|n| {
                        let v = stored.get(n)?.to_str().ok()?;
                        httpdate::parse_http_date(v.trim()).ok()
                    });
                modified.is_some_and(|m| epoch_secs(m) <= *since)
            }
        }
    }
}

/// The opaque part of an entity tag (weak comparison ignores `W/`).
fn opaque(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// The entity tags of an `If-None-Match` value (commas inside quotes do not split).
fn entity_tags(value: &str) -> Vec<String> {
    let mut tags = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ',' if !quoted => tags.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    tags.push(current);
    tags.into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

fn epoch_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `304 Not Modified` for a request whose cached copy `entry` matches: the fields of
/// [`KEPT`], its `Age`, no body.
pub(super) fn not_modified<B: Body>(
    entry: Entry,
    resident: Duration,
    params: &str,
) -> Response<ResponseBody<B>> {
    let mut kept = HeaderMap::new();
    for name in KEPT {
        for value in entry.headers.get_all(&name) {
            kept.append(name.clone(), value.clone());
        }
    }
    let served = Entry {
        status: StatusCode::NOT_MODIFIED,
        headers: kept,
        body: bytes::Bytes::new(),
        ..entry
    };
    super::response::serve(served, resident, true, params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::tests::h;

    #[test]
    fn preconditions() {
        let stored = h(&[
            ("etag", "W/\"a,1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let nm = |v: &'static str| Conditional::of(&h(&[("if-none-match", v)])).unwrap();
        assert!(nm("\"a,1\"").not_modified(&stored));
        assert!(nm("\"x\", W/\"a,1\"").not_modified(&stored));
        assert!(nm("*").not_modified(&stored));
        assert!(!nm("\"a\"").not_modified(&stored));
        let ims = |v: &'static str| Conditional::of(&h(&[("if-modified-since", v)])).unwrap();
        assert!(ims("Sun, 06 Nov 1994 08:49:37 GMT").not_modified(&stored));
        assert!(ims("Sunday, 06-Nov-94 09:00:00 GMT").not_modified(&stored));
        assert!(!ims("Sun Nov  6 08:00:00 1994").not_modified(&stored));
        // If-None-Match wins over If-Modified-Since.
        let both = Conditional::of(&h(&[
            ("if-none-match", "\"b\""),
            ("if-modified-since", "Sun, 06 Nov 1994 09:49:37 GMT"),
        ]))
        .unwrap();
        assert!(!both.not_modified(&stored));
        assert_eq!(Conditional::of(&h(&[("if-modified-since", "soon")])), None);
        assert!(!ims("Sun, 06 Nov 1994 09:49:37 GMT").not_modified(&h(&[])));
    }
}
