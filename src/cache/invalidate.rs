//! Invalidation after an unsafe method (RFC 9111 section 4.4): once the inner service has
//! answered a `POST`, `PUT`, `DELETE`, `PATCH` (any method but `GET`, `HEAD`, `OPTIONS` and
//! `TRACE`) with a non-error status (2xx or 3xx), the entries of the target URI and of the
//! `Location` and `Content-Location` URIs on the same host are deleted, in one store call (all
//! three are in the request's segment unless a segment closure says otherwise). The entries are
//! in the store, so every replica sees it.

use http::{header, request::Parts, HeaderMap, Method, StatusCode, Uri};

use super::{config::Shared, key, TARGET};
use crate::{store::CacheStore, StoreKey};

/// Whether `method` is unsafe (RFC 9110 section 9.2.1).
pub(super) fn is_unsafe(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// What an unsafe request's invalidation needs once the response is known: its target and the
/// headers its keys are derived from (host, partition, `Vary` values).
pub(super) struct Unsafe {
    uri: Uri,
    headers: HeaderMap,
}

impl Unsafe {
    /// The request's target, if its method is unsafe.
    pub(super) fn of(parts: &Parts) -> Option<Self> {
        is_unsafe(&parts.method).then(|| Self {
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        })
    }

    /// Deletes the entries a response to this request invalidates: none for an error (or
    /// informational) status. A failed deletion is logged and dropped.
    pub(super) async fn invalidate<B: CacheStore>(
        &self,
        shared: &Shared<B>,
        status: StatusCode,
        response: &HeaderMap,
    ) {
        if !(status.is_success() || status.is_redirection()) {
            return;
        }
        let host = self.headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let mut uris = vec![self.uri.clone()];
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let value = response.get(&name).and_then(|v| v.to_str().ok());
            if let Some(uri) = value.and_then(|v| same_host(&self.uri, host, v)) {
                if !uris.contains(&uri) {
                    uris.push(uri);
                }
            }
        }
        // Grouped by segment: one atomic call per segment (one, unless a segment closure puts
        // these URIs in different segments, which live in different cluster slots).
        let mut groups: Vec<(StoreKey, Vec<StoreKey>)> = Vec::new();
        for uri in uris {
            let Some(keys) = key::get_parts(uri, &self.headers)
                .and_then(|parts| shared.config.keys.keys(&parts, &shared.vary))
            else {
                continue;
            };
            match groups.iter_mut().find(|(s, _)| *s == keys.segment) {
                Some((_, entries)) if !entries.contains(&keys.entry) => entries.push(keys.entry),
                Some(_) => {}
                None => groups.push((keys.segment, vec![keys.entry])),
            }
        }
        let calls = groups.into_iter().map(|(segment, entries)| {
            let call = shared.store.invalidate_keys(segment, entries);
            shared.config.bound(&*shared.store, call)
        });
        for result in futures_util::future::join_all(calls).await {
            if let Err(error) = result {
                tracing::warn!(target: TARGET, %error, "could not invalidate cache entries after an unsafe method");
            }
        }
    }
}

/// The target of `reference` (a `Location` or `Content-Location` value) resolved against the
/// request's `target`, when it is on the request's host; `None` otherwise or when unparsable.
fn same_host(target: &Uri, host: Option<&str>, reference: &str) -> Option<Uri> {
    let reference = reference.trim();
    let request_host = host
        .or_else(|| target.authority().map(|a| a.as_str()))?
        .to_ascii_lowercase();
    let (authority, rest) = if let Some(rest) = reference.strip_prefix("//") {
        split_authority(rest)
    } else if let Some((scheme, rest)) = reference.split_once("://") {
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return None;
        }
        split_authority(rest)
    } else {
        (None, reference)
    };
    // Without the fragment.
    let rest = rest.split('#').next().unwrap_or("");
    if let Some(authority) = authority {
        if !authority.eq_ignore_ascii_case(&request_host) {
            return None;
        }
        // An absolute URI's empty path is `/`.
        return if rest.starts_with('/') {
            rest.parse().ok()
        } else {
            format!("/{rest}").parse().ok()
        };
    }
    let path_and_query = if rest.starts_with('/') {
        rest.to_owned()
    } else if rest.is_empty() || rest.starts_with('?') {
        format!("{}{rest}", target.path())
    } else {
        // A relative path: against the target's directory (dot segments are left as they are).
        let path = target.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{}{rest}", if dir.is_empty() { "/" } else { dir })
    };
    path_and_query.parse().ok()
}

/// Splits `authority/path?query` into the authority and the rest.
fn split_authority(rest: &str) -> (Option<&str>, &str) {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    (Some(&rest[..end]), &rest[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_on_the_same_host() {
        let target: Uri = "/a/b?x=1".parse().unwrap();
        let h = Some("Example.com");
        let r = |v| same_host(&target, h, v).map(|u| u.to_string());
        assert_eq!(r("/c?y"), Some("/c?y".to_owned()));
        assert_eq!(r("c"), Some("/a/c".to_owned()));
        assert_eq!(r("?z=2"), Some("/a/b?z=2".to_owned()));
        assert_eq!(r("http://example.COM/d#top"), Some("/d".to_owned()));
        assert_eq!(r("https://example.com"), Some("/".to_owned()));
        assert_eq!(r("//example.com/e"), Some("/e".to_owned()));
        assert_eq!(r("http://other.example/d"), None);
        assert_eq!(r("//other.example/d"), None);
        assert_eq!(r("ftp://example.com/d"), None);
        assert!(is_unsafe(&Method::POST) && is_unsafe(&Method::from_bytes(b"PURGE").unwrap()));
        assert!(!is_unsafe(&Method::OPTIONS));
    }
}
