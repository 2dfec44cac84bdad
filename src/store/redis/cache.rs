//! The response cache on Redis: the `cache_*.lua` scripts, and [`CacheStore`] for every
//! [`ScriptRunner`].
//!
//! Key layout (every key of one call shares the segment's hash tag, so one cluster slot):
//!
//! | key | type | content |
//! |---|---|---|
//! | `<prefix>:c:{<segment>}:v` | string | the segment version (INCR to invalidate); expires after its last entry |
//! | `<prefix>:c:{<segment>}:e:<key>` | hash | one entry (see `cache_lookup.lua`); a `304` rewrites its head in place (`cache_refresh.lua`) |
//! | `<prefix>:c:{<segment>}:l:<key>` | string | the fill lock: a random token, `PX` |
//!
//! `<segment>` and `<key>` are hashes ([`StoreKey`]): no request text reaches a key. A
//! segment of the layer spread over shards is one such segment per shard (each its own tag, so
//! its own slot); see `src/cache/key.rs`.

use std::time::Duration;

use bytes::Bytes;

use super::{
    script::{Lua, Reply},
    sealed::Runner,
    ScriptRunner,
};
use crate::{
    store::{
        CacheStore, FillState, FillToken, Freshness, Lookup, LookupRequest, RefreshRequest,
        StoreError, StoreFuture, StoreOutcome, StoreRequest, VERSION_RETENTION,
    },
    StoreKey,
};

static CACHE_LOOKUP: Lua = Lua::new(include_str!("../../scripts/cache_lookup.lua"));
static CACHE_STORE: Lua = Lua::new(include_str!("../../scripts/cache_store.lua"));
static CACHE_RELEASE: Lua = Lua::new(include_str!("../../scripts/cache_release.lua"));
static CACHE_INVALIDATE: Lua = Lua::new(include_str!("../../scripts/cache_invalidate.lua"));
static CACHE_DELETE: Lua = Lua::new(include_str!("../../scripts/cache_delete.lua"));
static CACHE_REFRESH: Lua = Lua::new(include_str!("../../scripts/cache_refresh.lua"));

/// Every cache script, loaded on each (re)connect.
pub(super) static SCRIPTS: [&Lua; 6] = [
    &CACHE_LOOKUP,
    &CACHE_STORE,
    &CACHE_RELEASE,
    &CACHE_INVALIDATE,
    &CACHE_DELETE,
    &CACHE_REFRESH,
];

fn base(prefix: &str, segment: &StoreKey) -> String {
    format!("{prefix}:c:{{{}}}", segment.to_hex())
}

fn version_key(prefix: &str, segment: &StoreKey) -> String {
    format!("{}:v", base(prefix, segment))
}

fn entry_key(prefix: &str, segment: &StoreKey, key: &StoreKey) -> String {
    format!("{}:e:{}", base(prefix, segment), key.to_hex())
}

fn lock_key(prefix: &str, segment: &StoreKey, key: &StoreKey) -> String {
    format!("{}:l:{}", base(prefix, segment), key.to_hex())
}

fn millis(d: Duration) -> Vec<u8> {
    d.as_millis().to_string().into_bytes()
}

fn lookup<R: Runner + ?Sized>(runner: &R, req: LookupRequest) -> StoreFuture<Lookup> {
    let p = runner.prefix();
    let keys = vec![
        version_key(p, &req.segment),
        entry_key(p, &req.segment, &req.key),
        lock_key(p, &req.segment, &req.key),
    ];
    let (ttl, token) = match req.fill {
        Some(fill) => (fill.ttl.max(Duration::from_millis(1)), fill.token.to_hex()),
        None => (Duration::ZERO, String::new()),
    };
    let args = vec![
        millis(ttl),
        token.into_bytes(),
        format!("{}", req.early_beta.max(0.0)).into_bytes(),
        format!("{}", req.random).into_bytes(),
    ];
    let call = runner.run(&CACHE_LOOKUP, keys, args);
    Box::pin(async move { decode_lookup(call.await?) })
}

fn decode_lookup(reply: Reply) -> Result<Lookup, StoreError> {
    let mut items = reply.array()?.into_iter();
    let mut next_int = || -> Result<i64, StoreError> {
        items
            .next()
            .ok_or_else(|| StoreError::Reply("cache lookup: short reply".into()))?
            .int()
    };
    let state = next_int()?;
    let version = u64::try_from(next_int()?).unwrap_or(0);
    let age = Duration::from_millis(u64::try_from(next_int()?).unwrap_or(0));
    let lock = next_int()?;
    let body = match items.next() {
        Some(Reply::Bytes(b)) => Some(Bytes::from(b)),
        _ => None,
    };
    let freshness = match state {
        1 => Freshness::Fresh,
        2 => Freshness::Early,
        3 => Freshness::Stale,
        4 => Freshness::StaleIfError,
        6 => Freshness::Expired,
        _ => Freshness::Miss,
    };
    let fill = match lock {
        1 => FillState::Acquired,
        2 => FillState::Held,
        _ => FillState::NotTried,
    };
    Ok(Lookup {
        entry: if freshness == Freshness::Miss {
            None
        } else {
            body
        },
        freshness,
        version,
        age,
        fill,
        corrupt: state == 5,
    })
}

fn store<R: Runner + ?Sized>(runner: &R, req: StoreRequest) -> StoreFuture<StoreOutcome> {
    let (keys, token) = write_keys(runner.prefix(), &req.segment, &req.key, &req.fill);
    let args = vec![
        req.version.to_string().into_bytes(),
        token.into_bytes(),
        millis(req.ttl),
        millis(req.stale_while_revalidate),
        millis(req.stale_if_error),
        req.compute_time.as_micros().to_string().into_bytes(),
        req.entry.to_vec(),
        millis(req.keep),
    ];
    let call = runner.run(&CACHE_STORE, keys, args);
    Box::pin(async move { outcome(call.await?) })
}

/// The keys of a store or refresh script (version, entry, fill lock) and the fill lock's token
/// (empty when the write holds no fill lock).
fn write_keys(
    p: &str,
    segment: &StoreKey,
    key: &StoreKey,
    fill: &Option<(StoreKey, FillToken)>,
) -> (Vec<String>, String) {
    let (lock, token) = match fill {
        Some((lock, token)) => (lock_key(p, segment, lock), token.to_hex()),
        None => (lock_key(p, segment, key), String::new()),
    };
    (
        vec![version_key(p, segment), entry_key(p, segment, key), lock],
        token,
    )
}

/// The outcome of a store or refresh script.
fn outcome(reply: Reply) -> Result<StoreOutcome, StoreError> {
    Ok(match reply.int()? {
        1 => StoreOutcome::Stored,
        0 => StoreOutcome::VersionChanged,
        2 => StoreOutcome::Missing,
        _ => StoreOutcome::LockLost,
    })
}

fn refresh<R: Runner + ?Sized>(runner: &R, req: RefreshRequest) -> StoreFuture<StoreOutcome> {
    let (keys, token) = write_keys(runner.prefix(), &req.segment, &req.key, &req.fill);
    let args = vec![
        req.version.to_string().into_bytes(),
        token.into_bytes(),
        millis(req.ttl),
        millis(req.stale_while_revalidate),
        millis(req.stale_if_error),
        millis(req.keep),
        req.old_head.to_vec(),
        req.new_head.to_vec(),
    ];
    let call = runner.run(&CACHE_REFRESH, keys, args);
    Box::pin(async move { outcome(call.await?) })
}

impl<R: ScriptRunner> CacheStore for R {
    fn lookup(&self, request: LookupRequest) -> StoreFuture<Lookup> {
        lookup(self, request)
    }

    fn store(&self, request: StoreRequest) -> StoreFuture<StoreOutcome> {
        store(self, request)
    }

    fn release_fill(&self, segment: StoreKey, key: StoreKey, t: FillToken) -> StoreFuture<bool> {
        let keys = vec![lock_key(self.prefix(), &segment, &key)];
        let call = self.run(&CACHE_RELEASE, keys, vec![t.to_hex().into_bytes()]);
        Box::pin(async move { Ok(call.await?.int()? == 1) })
    }

    fn invalidate_segment(&self, segment: StoreKey) -> StoreFuture<u64> {
        let keys = vec![version_key(self.prefix(), &segment)];
        let call = self.run(&CACHE_INVALIDATE, keys, vec![millis(VERSION_RETENTION)]);
        Box::pin(async move { Ok(u64::try_from(call.await?.int()?).unwrap_or(0)) })
    }

    fn invalidate_key(&self, segment: StoreKey, key: StoreKey) -> StoreFuture<bool> {
        let keys = vec![entry_key(self.prefix(), &segment, &key)];
        let call = self.run(&CACHE_DELETE, keys, Vec::new());
        Box::pin(async move { Ok(call.await?.int()? == 1) })
    }

    fn refresh(&self, request: RefreshRequest) -> StoreFuture<StoreOutcome> {
        refresh(self, request)
    }

    fn invalidate_keys(&self, segment: StoreKey, keys: Vec<StoreKey>) -> StoreFuture<u64> {
        if keys.is_empty() {
            return Box::pin(std::future::ready(Ok(0)));
        }
        let p = self.prefix();
        let keys = keys.iter().map(|k| entry_key(p, &segment, k)).collect();
        let call = self.run(&CACHE_DELETE, keys, Vec::new());
        Box::pin(async move { Ok(u64::try_from(call.await?.int()?).unwrap_or(0)) })
    }
}
