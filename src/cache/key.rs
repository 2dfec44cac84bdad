//! Cache keys: what a request is looked up by, hashed before it reaches a store.
//!
//! The entry key covers the method class (`GET` for both GET and HEAD), the host, the path, the
//! query with its parameters in a canonical (sorted) order, the partition, and the values of
//! the request headers named by the response's `Vary`. The segment key covers the layer's scope
//! and the segment name. Both are [`StoreKey`]s: SHA-256, truncated, so a Redis key never holds
//! request text.
//!
//! A segment is spread over [`Shards`]: the primary key (so every `Vary` variant of a resource,
//! and its fill lock) picks one shard, and each shard is a segment of its own in the store (its
//! own version, and on Redis its own hash tag, so its own cluster slot). Shard 0 of a segment
//! has the key an unsharded segment has. Invalidating a segment invalidates each of its shards.
//!
//! [`Keying::keys`] is the one place a request's keys are derived: the service looks the request
//! up by them, and [`CacheHandle::invalidate_request`](super::CacheHandle::invalidate_request)
//! deletes by them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use http::{request::Parts, HeaderMap, HeaderName, HeaderValue};

use crate::key::StoreKey;

pub(crate) type PartitionFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
pub(crate) type SegmentFn = dyn Fn(&Parts) -> String + Send + Sync;

/// The name of the segment used when no [`CacheLayer::segment`](super::CacheLayer::segment)
/// closure is set.
pub(crate) const DEFAULT_SEGMENT: &str = "";

/// How many shards each segment is spread over when the layer names none: this many for the
/// layer's default segment (no segment closure), one when a closure names the segments.
pub(crate) const DEFAULT_SHARDS: u16 = 16;

/// The most shards a segment can have (an invalidation makes one store call per shard).
pub(crate) const MAX_SHARDS: u16 = 1024;

/// What a layer's keys are made of: its static scope, and the per-request partition and segment.
#[derive(Clone)]
pub(crate) struct Keying {
    pub(crate) scope: String,
    pub(crate) hosts: Hosts,
    pub(crate) partition: Option<Arc<PartitionFn>>,
    pub(crate) segment: Option<Arc<SegmentFn>>,
    /// The shards of every segment; `None`: [`DEFAULT_SHARDS`] without a segment closure, else 1.
    pub(crate) shards: Option<u16>,
    /// The shard keys found so far (shared by clones of the layer).
    pub(crate) shard_memo: Arc<ShardMemo>,
}

/// The shards a segment is spread over: `count` segments of the store (the segment's own key
/// when `count` is 1).
///
/// On Redis a segment's keys carry its key's hex digits as their hash tag, so each shard has a
/// cluster slot of its own; the shard keys are chosen so that the slots of a segment's shards
/// fall evenly across the slot space (shard `i` in the `i`-th of `min(count, 16)` equal bands,
/// cycling). A cluster's nodes own contiguous ranges of slots, mostly of about equal size (what
/// `redis-cli --cluster create` makes), so a segment's entries spread about evenly over the
/// nodes, not by the luck of 16 random slots.
#[derive(Debug, Clone)]
pub(crate) struct Shards<'a> {
    segment: StoreKey,
    count: u16,
    memo: &'a ShardMemo,
}

impl Shards<'_> {
    /// The shard of the entries under `primary`: the same for every variant of a resource.
    pub(crate) fn of(&self, primary: PrimaryKey) -> StoreKey {
        let bytes = primary.0.as_bytes();
        let mut head = [0u8; 8];
        head.copy_from_slice(&bytes[..8]);
        let index = u64::from_le_bytes(head) % u64::from(self.count.max(1));
        // `index` < `count`, a u16.
        self.shard(u16::try_from(index).unwrap_or(0))
    }

    /// Every shard's key, shard 0 first.
    pub(crate) fn all(&self) -> Vec<StoreKey> {
        (0..self.count.max(1))
            .map(|index| self.shard(index))
            .collect()
    }

    /// The key of shard `index`.
    fn shard(&self, index: u16) -> StoreKey {
        if self.count <= 1 {
            return self.segment;
        }
        self.memo
            .get_or_insert((self.segment, self.count, index), || {
                shard_key(self.segment, self.count, index)
            })
    }
}

/// How many bands of the slot space a segment's shards are placed in, at most.
const SLOT_BANDS: u16 = 16;

/// The key of shard `index` of `count`: the first of a series of hashes of the segment key and
/// `index` whose cluster slot is in the shard's band (16 tries on average, at most 16).
fn shard_key(segment: StoreKey, count: u16, index: u16) -> StoreKey {
    let bands = u32::from(count.clamp(1, SLOT_BANDS));
    let band = u32::from(index) % bands;
    let (low, high) = (band * SLOTS / bands, (band + 1) * SLOTS / bands);
    let mut key = segment;
    // A miss is 15 in 16 at worst: 1,000 misses in a row never happen, and would only cost the
    // even spread of this one shard.
    for attempt in 0u32..1000 {
        key = StoreKey::from_parts([
            b"trl-cache-shard".as_slice(),
            segment.as_bytes().as_slice(),
            &index.to_le_bytes(),
            &attempt.to_le_bytes(),
        ]);
        let slot = u32::from(cluster_slot(&key));
        if (low..high).contains(&slot) {
            break;
        }
    }
    key
}

/// The number of Redis Cluster hash slots.
const SLOTS: u32 = 16384;

/// The Redis Cluster slot of the keys of segment `key` in the Redis stores (their hash tag is
/// the key's 32 hex digits; see `src/store/redis/cache.rs`): CRC16 (XMODEM) modulo 16384.
pub(crate) fn cluster_slot(key: &StoreKey) -> u16 {
    let mut crc: u16 = 0;
    for byte in key.to_hex().bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    // The modulo keeps it below 16384.
    u16::try_from(u32::from(crc) % SLOTS).unwrap_or(0)
}

/// The shard keys already found (finding one takes about 16 hashes), by segment, count and
/// index. Bounded: forgotten when it grows too big.
#[derive(Debug, Default)]
pub(crate) struct ShardMemo {
    map: Mutex<HashMap<(StoreKey, u16, u16), StoreKey>>,
}

const SHARD_MEMO_MAX: usize = 10_000;

impl ShardMemo {
    fn get_or_insert(&self, id: (StoreKey, u16, u16), make: impl FnOnce() -> StoreKey) -> StoreKey {
        if let Some(key) = self.map.lock().ok().and_then(|map| map.get(&id).copied()) {
            return key;
        }
        let key = make();
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= SHARD_MEMO_MAX {
                map.clear();
            }
            map.insert(id, key);
        }
        key
    }
}

/// Which request hosts the cache serves, and the host in the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hosts {
    /// Every host; the request's host is in the key.
    Any,
    /// Only these hosts (lowercase, with or without a port); others bypass the cache.
    Allowed(Vec<String>),
    /// Every request is keyed under this host, whatever its own.
    Fixed(String),
}

impl Hosts {
    /// The host a request is keyed under, or `None` when its host is not allowed.
    pub(crate) fn key_host(&self, parts: &Parts) -> Option<String> {
        match self {
            Hosts::Any => Some(host(parts)),
            Hosts::Fixed(host) => Some(host.clone()),
            Hosts::Allowed(list) => {
                let host = host(parts);
                let name = host_name(&host);
                list.iter().any(|h| *h == host || h == name).then_some(host)
            }
        }
    }
}

/// A host without its port (`[::1]:80` -> `[::1]`).
fn host_name(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

/// The keys of a request's entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryKeys {
    /// The segment the entry belongs to.
    pub(crate) segment: StoreKey,
    /// The key without the `Vary` values.
    pub(crate) primary: PrimaryKey,
    /// The key looked up: the primary key and the values of the `Vary` names known for it.
    pub(crate) entry: StoreKey,
}

impl Keying {
    /// The keys of the entry a request is served from, with the `Vary` names `vary` knows for
    /// it. `None` when the partition closure gives no partition or the host is not allowed: the
    /// request bypasses the cache.
    pub(crate) fn keys(&self, parts: &Parts, vary: &VaryRegistry) -> Option<EntryKeys> {
        let host = self.hosts.key_host(parts)?;
        let partition = match &self.partition {
            Some(f) => Some(f(parts)?),
            None => None,
        };
        let segment = match &self.segment {
            Some(f) => self.shards(&f(parts)),
            None => self.shards(DEFAULT_SEGMENT),
        };
        let primary = primary_key(&self.scope, &host, parts, partition.as_deref());
        let segment = segment.of(primary);
        let names = vary.get(primary);
        let values = vary_values(&parts.headers, names.as_deref().unwrap_or(&[]));
        Some(EntryKeys {
            segment,
            primary,
            entry: entry_key(primary, &values),
        })
    }

    /// The key of the segment `name` (unsharded: its shard 0).
    pub(crate) fn segment_key(&self, name: &str) -> StoreKey {
        segment_key(&self.scope, name)
    }

    /// The shards of the segment `name`.
    pub(crate) fn shards(&self, name: &str) -> Shards<'_> {
        Shards {
            segment: self.segment_key(name),
            count: self.shard_count(),
            memo: &self.shard_memo,
        }
    }

    /// How many shards every segment of the layer has.
    pub(crate) fn shard_count(&self) -> u16 {
        let default = if self.segment.is_some() {
            1
        } else {
            DEFAULT_SHARDS
        };
        self.shards.unwrap_or(default).clamp(1, MAX_SHARDS)
    }
}

impl EntryKeys {
    /// The key of the variant selected by `vary` (the values of a response's `Vary` names).
    pub(crate) fn variant(&self, vary: &[(HeaderName, Option<HeaderValue>)]) -> StoreKey {
        entry_key(self.primary, vary)
    }
}

/// The parts of a `GET` request for `uri` with `headers`: what the keys of the entry of
/// another request's target (an invalidation's) are derived from.
pub(crate) fn get_parts(uri: http::Uri, headers: &HeaderMap) -> Option<Parts> {
    let mut request = http::Request::get(uri).body(()).ok()?;
    *request.headers_mut() = headers.clone();
    Some(request.into_parts().0)
}

/// The key of the segment `name` in `scope`.
fn segment_key(scope: &str, name: &str) -> StoreKey {
    StoreKey::from_parts([
        b"trl-cache-segment".as_slice(),
        scope.as_bytes(),
        name.as_bytes(),
    ])
}

/// The query with its parameters sorted (byte order), empty parameters dropped.
fn canonical_query(query: Option<&str>) -> String {
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

fn primary_key(scope: &str, host: &str, parts: &Parts, partition: Option<&str>) -> PrimaryKey {
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
    headers: &HeaderMap,
    names: &[HeaderName],
) -> Vec<(HeaderName, Option<HeaderValue>)> {
    names
        .iter()
        .map(|name| {
            let values: Vec<&[u8]> = headers
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
fn entry_key(primary: PrimaryKey, vary: &[(HeaderName, Option<HeaderValue>)]) -> StoreKey {
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
        let key = |p: &Parts, t| primary_key("s", "x", p, t);
        assert_eq!(key(&a, None), key(&b, None));
        assert_ne!(key(&a, None), key(&c, None));
        assert_ne!(key(&a, None), key(&a, Some("t")));
    }

    #[test]
    fn keys_follow_the_partition_the_segment_and_the_known_vary_names() {
        let parts = |lang: &str| {
            http::Request::get("http://x/users/1")
                .header("accept-language", lang)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let vary = VaryRegistry::default();
        let mut keying = Keying {
            scope: "s".to_owned(),
            hosts: Hosts::Any,
            partition: None,
            segment: None,
            shards: None,
            shard_memo: Arc::default(),
        };
        let plain = keying.keys(&parts("fr"), &vary).unwrap();
        assert_eq!(
            plain.segment,
            keying.shards(DEFAULT_SEGMENT).of(plain.primary)
        );
        assert_eq!(plain.entry, plain.primary.0);
        // Once `Vary: accept-language` is known, the entry key holds the request's value.
        let names = [HeaderName::from_static("accept-language")];
        vary.learn(plain.primary, &names);
        let fr = keying.keys(&parts("fr"), &vary).unwrap();
        let de = keying.keys(&parts("de"), &vary).unwrap();
        assert_eq!(fr.primary, de.primary);
        assert_ne!(fr.entry, de.entry);
        let fr_values = vary_values(&parts("fr").headers, &names);
        assert_eq!(fr.variant(&fr_values), fr.entry);
        // The segment closure names the segment; a partition closure without an answer bypasses.
        keying.segment = Some(Arc::new(|p: &Parts| p.uri.path().to_owned()));
        let segmented = keying.keys(&parts("fr"), &vary).unwrap();
        // One shard per named segment by default: the segment's own key.
        assert_eq!(segmented.segment, keying.segment_key("/users/1"));
        keying.partition = Some(Arc::new(|_: &Parts| None));
        assert!(keying.keys(&parts("fr"), &vary).is_none());
        keying.partition = Some(Arc::new(|_: &Parts| Some("tenant".to_owned())));
        let partitioned = keying.keys(&parts("fr"), &vary).unwrap();
        assert_ne!(partitioned.primary, fr.primary);
    }

    #[test]
    fn shards_spread_entries_and_keep_variants_together() {
        let mut keying = Keying {
            scope: "s".to_owned(),
            hosts: Hosts::Any,
            partition: None,
            segment: None,
            shards: None,
            shard_memo: Arc::default(),
        };
        assert_eq!(keying.shard_count(), DEFAULT_SHARDS);
        let all = keying.shards(DEFAULT_SEGMENT).all();
        assert_eq!(all.len(), usize::from(DEFAULT_SHARDS));
        assert_eq!(
            all,
            keying.shards(DEFAULT_SEGMENT).all(),
            "the same keys every time"
        );
        // Shard i in the i-th sixteenth of the slot space.
        for (i, shard) in all.iter().enumerate() {
            let band = usize::from(cluster_slot(shard)) * 16 / 16384;
            assert_eq!(band, i, "shard {i}");
        }
        // Beyond 16 shards the bands cycle; one shard is the segment itself.
        keying.shards = Some(40);
        let forty = keying.shards(DEFAULT_SEGMENT).all();
        for (i, shard) in forty.iter().enumerate() {
            assert_eq!(usize::from(cluster_slot(shard)) * 16 / 16384, i % 16);
        }
        keying.shards = Some(1);
        assert_eq!(
            keying.shards(DEFAULT_SEGMENT).all(),
            [keying.segment_key(DEFAULT_SEGMENT)]
        );
        keying.shards = None;
        // 1,000 resources land on every shard, and always on one of them.
        let vary = VaryRegistry::default();
        let mut used = std::collections::HashSet::new();
        for i in 0..1000 {
            let parts = http::Request::get(format!("http://x/items/{i}"))
                .body(())
                .unwrap()
                .into_parts()
                .0;
            let keys = keying.keys(&parts, &vary).unwrap();
            assert!(all.contains(&keys.segment));
            assert_eq!(
                keys.segment,
                keying.shards(DEFAULT_SEGMENT).of(keys.primary)
            );
            used.insert(keys.segment);
        }
        assert_eq!(used.len(), all.len());
        // A segment closure: one shard unless asked; the count is clamped.
        keying.segment = Some(Arc::new(|_: &Parts| "named".to_owned()));
        assert_eq!(keying.shard_count(), 1);
        keying.shards = Some(0);
        assert_eq!(keying.shard_count(), 1);
        keying.shards = Some(u16::MAX);
        assert_eq!(keying.shard_count(), MAX_SHARDS);
    }

    #[test]
    fn cluster_slots_as_redis_computes_them() {
        // CRC16/XMODEM of "123456789" is 0x31C3; a key's slot is that of its hex digits.
        let crc = |s: &str| {
            let mut crc: u16 = 0;
            for byte in s.bytes() {
                crc ^= u16::from(byte) << 8;
                for _ in 0..8 {
                    crc = if crc & 0x8000 != 0 {
                        (crc << 1) ^ 0x1021
                    } else {
                        crc << 1
                    };
                }
            }
            crc
        };
        assert_eq!(crc("123456789"), 0x31C3);
        let key = StoreKey::from_parts([b"x".as_slice()]);
        assert_eq!(cluster_slot(&key), crc(&key.to_hex()) % 16384);
    }

    #[test]
    fn host_rules() {
        let parts = |host: &str| {
            http::Request::get("/p")
                .header("host", host)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let allowed = Hosts::Allowed(vec!["example.com".into(), "[::1]:8080".into()]);
        assert_eq!(
            allowed.key_host(&parts("Example.COM:8443")).as_deref(),
            Some("example.com:8443")
        );
        assert!(allowed.key_host(&parts("[::1]:8080")).is_some());
        assert!(allowed.key_host(&parts("[::1]")).is_none());
        assert!(allowed.key_host(&parts("evil.example")).is_none());
        let fixed = Hosts::Fixed("origin".into());
        assert_eq!(fixed.key_host(&parts("a")), fixed.key_host(&parts("b")));
    }
}
