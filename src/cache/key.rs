//! Cache keys: what a request is looked up by, hashed before it reaches a store.
//!
//! The entry key covers the method class (`GET` for both GET and HEAD), the host, the path, the
//! query with its parameters in a canonical (sorted) order, the partition, and the values of
//! the request headers named by the response's `Vary`. The segment key covers the layer's scope
//! and the segment name. Both are [`StoreKey`]s: SHA-256, truncated, so a Redis key never holds
//! request text.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use http::{request::Parts, HeaderName, HeaderValue};

use crate::key::StoreKey;

/// The key of the segment `name` in `scope`.
pub(crate) fn segment_key(scope: &str, name: &str) -> StoreKey {
    StoreKey::from_parts([
        b"trl-cache-segment".as_slice(),
        scope.as_bytes(),
        name.as_bytes(),
    ])
}

/// The query with its parameters sorted (byte order), empty parameters dropped.
pub(crate) fn canonical_query(query: Option<&str>) -> String {
    let mut params: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .collect();
    params.sort_unstable();
    params.join("&")
}

/// The request's host: the `Host` header, else the URI's authority; lowercase.
fn host(parts: &Parts) -> String {
    parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// The part of the key that does not depend on `Vary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PrimaryKey(pub(crate) StoreKey);

pub(crate) fn primary_key(scope: &str, parts: &Parts, partition: Option<&str>) -> PrimaryKey {
    let host = host(parts);
    let query = canonical_query(parts.uri.query());
    let partition = partition.unwrap_or("");
    PrimaryKey(StoreKey::from_parts([
        b"trl-cache-entry".as_slice(),
        scope.as_bytes(),
        b"GET",
        host.as_bytes(),
        parts.uri.path().as_bytes(),
        query.as_bytes(),
        partition.as_bytes(),
    ]))
}

/// The request's values for the headers named in `names` (all values of a name, joined).
pub(crate) fn vary_values(
    parts: &Parts,
    names: &[HeaderName],
) -> Vec<(HeaderName, Option<HeaderValue>)> {
    names
        .iter()
        .map(|name| {
            let values: Vec<&[u8]> = parts
                .headers
                .get_all(name)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect();
            let value = if values.is_empty() {
                None
            } else {
                HeaderValue::from_bytes(&values.join(&b", "[..])).ok()
            };
            (name.clone(), value)
        })
        .collect()
}

/// The full entry key: the primary key and the `Vary` values.
pub(crate) fn entry_key(
    primary: PrimaryKey,
    vary: &[(HeaderName, Option<HeaderValue>)],
) -> StoreKey {
    if vary.is_empty() {
        return primary.0;
    }
    let mut parts: Vec<&[u8]> = vec![b"vary".as_slice(), primary.0.as_bytes().as_slice()];
    for (name, value) in vary {
        parts.push(name.as_str().as_bytes());
        match value {
            Some(v) => {
                parts.push(b"1");
                parts.push(v.as_bytes());
            }
            None => parts.push(b"0"),
        }
    }
    StoreKey::from_parts(parts)
}

/// Which headers the responses under a primary key vary on, learned from responses, so that a
/// lookup can build the full key in one round trip. Bounded: it is forgotten when it grows too
/// big (a lookup then misses once and learns again). The entry itself records the values it was
/// selected by, and a hit is checked against them, so a stale registry never serves the wrong
/// variant.
#[derive(Debug, Default)]
pub(crate) struct VaryRegistry {
    map: Mutex<HashMap<PrimaryKey, Arc<[HeaderName]>>>,
}

const VARY_REGISTRY_MAX: usize = 10_000;

impl VaryRegistry {
    pub(crate) fn get(&self, key: PrimaryKey) -> Option<Arc<[HeaderName]>> {
        self.map.lock().ok()?.get(&key).cloned()
    }

    pub(crate) fn learn(&self, key: PrimaryKey, names: &[HeaderName]) {
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        if map.get(&key).map(|n| &n[..]) == Some(names) {
            return;
        }
        if names.is_empty() {
            map.remove(&key);
            return;
        }
        if map.len() >= VARY_REGISTRY_MAX {
            map.clear();
        }
        map.insert(key, Arc::from(names));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_order_does_not_matter() {
        assert_eq!(canonical_query(Some("b=2&a=1&&c")), "a=1&b=2&c");
        let a = http::Request::get("http://x/p?b=2&a=1").body(()).unwrap();
        let b = http::Request::get("http://x/p?a=1&b=2").body(()).unwrap();
        let c = http::Request::get("http://x/p?a=1&b=3").body(()).unwrap();
        let (a, b, c) = (a.into_parts().0, b.into_parts().0, c.into_parts().0);
        assert_eq!(primary_key("s", &a, None), primary_key("s", &b, None));
        assert_ne!(primary_key("s", &a, None), primary_key("s", &c, None));
        assert_ne!(primary_key("s", &a, None), primary_key("s", &a, Some("t")));
    }
}
