//! The response cache in the in-process store: the same semantics as the Redis scripts
//! (`cache_*.lua`), sharded by segment (like Redis, a segment lives in one place).

use std::time::Duration;

use bytes::Bytes;

use super::{done, Map, MemoryStore, SWEEP_EVERY_US};
use crate::{
    store::{
        CacheStore, FillState, FillToken, Freshness, Lookup, LookupRequest, RefreshRequest,
        StoreError, StoreFuture, StoreOutcome, StoreRequest, VERSION_RETENTION,
    },
    StoreKey,
};

#[derive(Default)]
pub(super) struct Shard {
    /// Version and when it may be forgotten (after every entry written under it).
    versions: Map<StoreKey, (u64, u64)>,
    entries: Map<(StoreKey, StoreKey), MemEntry>,
    locks: Map<(StoreKey, StoreKey), (FillToken, u64)>,
    next_sweep: u64,
}

struct MemEntry {
    version: u64,
    stored_at: u64,
    fresh_until: u64,
    swr_until: u64,
    sie_until: u64,
    /// Kept until then to be revalidated.
    keep_until: u64,
    delta: u64,
    body: Bytes,
}

impl MemEntry {
    fn expires_at(&self) -> u64 {
        self.swr_until.max(self.sie_until).max(self.keep_until)
    }
}

/// Microseconds in `d` (whole milliseconds, as the Redis scripts take them).
fn us(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4) * 1000
}

/// The freshness deadlines of an entry written at `now`: fresh, stale-while-revalidate,
/// stale-if-error, kept for revalidation.
fn deadlines(now: u64, ttl: Duration, swr: Duration, sie: Duration, keep: Duration) -> [u64; 4] {
    let fresh_until = now + us(ttl);
    [
        fresh_until,
        fresh_until + us(swr),
        fresh_until + us(sie),
        fresh_until + us(keep),
    ]
}

fn lookup(shard: &mut Shard, now: u64, req: &LookupRequest) -> Result<Lookup, StoreError> {
    shard.maybe_sweep(now);
    let version = shard.version(&req.segment, now);
    let id = (req.segment, req.key);
    let mut freshness = Freshness::Miss;
    let mut entry = None;
    let mut age = Duration::ZERO;
    if let Some(e) = shard.entries.get(&id) {
        if e.version == version && now < e.expires_at() {
            freshness = if now < e.fresh_until {
                let rnd = if req.random > 0.0 && req.random <= 1.0 {
                    req.random
                } else {
                    1.0
                };
                let early = req.early_beta > 0.0
                    && e.delta > 0
                    && (now as f64 - e.delta as f64 * req.early_beta * rnd.ln())
                        >= e.fresh_until as f64;
                if early {
                    Freshness::Early
                } else {
                    Freshness::Fresh
                }
            } else if now < e.swr_until {
                Freshness::Stale
            } else if now < e.sie_until {
                Freshness::StaleIfError
            } else if now < e.keep_until {
                Freshness::Expired
            } else {
                Freshness::Miss
            };
            if freshness != Freshness::Miss {
                entry = Some(e.body.clone());
                age = Duration::from_millis(now.saturating_sub(e.stored_at) / 1000);
            }
        }
    }
    let mut fill = FillState::NotTried;
    if let Some(request) = req.fill.filter(|_| freshness != Freshness::Fresh) {
        let held = shard.locks.get(&id).is_some_and(|(_, until)| *until > now);
        if held {
            fill = FillState::Held;
        } else {
            let ttl = u64::try_from(request.ttl.as_micros()).unwrap_or(u64::MAX / 4);
            shard
                .locks
                .insert(id, (request.token, now.saturating_add(ttl.max(1000))));
            fill = FillState::Acquired;
        }
    }
    Ok(Lookup {
        freshness,
        entry,
        version,
        age,
        fill,
        corrupt: false,
    })
}

/// Checks (and releases) the fill lock a write names: `false` when it no longer holds.
fn take_lock(
    shard: &mut Shard,
    now: u64,
    segment: StoreKey,
    fill: Option<&(StoreKey, FillToken)>,
) -> bool {
    let Some((lock, token)) = fill else {
        return true;
    };
    let id = (segment, *lock);
    let holds = shard
        .locks
        .get(&id)
        .is_some_and(|(t, until)| t == token && *until > now);
    if holds {
        shard.locks.remove(&id);
    }
    holds
}

fn store(shard: &mut Shard, now: u64, req: &StoreRequest) -> Result<StoreOutcome, StoreError> {
    if !take_lock(shard, now, req.segment, req.fill.as_ref()) {
        return Ok(StoreOutcome::LockLost);
    }
    let version = shard.version(&req.segment, now);
    if version != req.version {
        return Ok(StoreOutcome::VersionChanged);
    }
    let [fresh_until, swr_until, sie_until, keep_until] = deadlines(
        now,
        req.ttl,
        req.stale_while_revalidate,
        req.stale_if_error,
        req.keep,
    );
    let entry = MemEntry {
        version,
        stored_at: now,
        fresh_until,
        swr_until,
        sie_until,
        keep_until,
        delta: u64::try_from(req.compute_time.as_micros()).unwrap_or(0),
        body: req.entry.clone(),
    };
    let slot = shard.versions.entry(req.segment).or_insert((version, 0));
    slot.1 = slot.1.max(entry.expires_at());
    shard.entries.insert((req.segment, req.key), entry);
    Ok(StoreOutcome::Stored)
}

fn refresh(shard: &mut Shard, now: u64, req: &RefreshRequest) -> Result<StoreOutcome, StoreError> {
    if !take_lock(shard, now, req.segment, req.fill.as_ref()) {
        return Ok(StoreOutcome::LockLost);
    }
    let version = shard.version(&req.segment, now);
    if version != req.version {
        return Ok(StoreOutcome::VersionChanged);
    }
    let Some(e) = shard.entries.get_mut(&(req.segment, req.key)) else {
        return Ok(StoreOutcome::Missing);
    };
    if e.version != version || now >= e.expires_at() || !e.body.starts_with(&req.old_head) {
        return Ok(StoreOutcome::Missing);
    }
    let mut body = Vec::with_capacity(e.body.len() - req.old_head.len() + req.new_head.len());
    body.extend_from_slice(&req.new_head);
    body.extend_from_slice(&e.body[req.old_head.len()..]);
    [e.fresh_until, e.swr_until, e.sie_until, e.keep_until] = deadlines(
        now,
        req.ttl,
        req.stale_while_revalidate,
        req.stale_if_error,
        req.keep,
    );
    e.stored_at = now;
    e.body = Bytes::from(body);
    let expires = e.expires_at();
    let slot = shard.versions.entry(req.segment).or_insert((version, 0));
    slot.1 = slot.1.max(expires);
    Ok(StoreOutcome::Stored)
}

fn release(
    shard: &mut Shard,
    now: u64,
    segment: StoreKey,
    key: StoreKey,
    token: FillToken,
) -> Result<bool, StoreError> {
    let id = (segment, key);
    let holds = shard
        .locks
        .get(&id)
        .is_some_and(|(t, until)| *t == token && *until > now);
    if holds {
        shard.locks.remove(&id);
    }
    Ok(holds)
}

fn invalidate_segment(shard: &mut Shard, now: u64, segment: StoreKey) -> Result<u64, StoreError> {
    let version = shard.version(&segment, now) + 1;
    let retention = u64::try_from(VERSION_RETENTION.as_micros()).unwrap_or(u64::MAX / 4);
    let slot = shard
        .versions
        .entry(segment)
        .or_insert((0, now + retention));
    slot.1 = slot.1.max(now + retention);
    slot.0 = version;
    Ok(version)
}

fn invalidate_keys(
    shard: &mut Shard,
    now: u64,
    segment: StoreKey,
    keys: &[StoreKey],
) -> Result<u64, StoreError> {
    let mut deleted = 0;
    for key in keys {
        let removed = shard.entries.remove(&(segment, *key));
        deleted += u64::from(removed.is_some_and(|e| e.expires_at() > now));
    }
    Ok(deleted)
}

impl Shard {
    fn version(&self, segment: &StoreKey, now: u64) -> u64 {
        match self.versions.get(segment) {
            Some((v, until)) if *until > now => *v,
            _ => 0,
        }
    }

    fn maybe_sweep(&mut self, now: u64) {
        if now >= self.next_sweep {
            self.sweep(now);
        }
    }

    pub(super) fn sweep(&mut self, now: u64) {
        self.entries.retain(|_, e| e.expires_at() > now);
        self.locks.retain(|_, (_, until)| *until > now);
        self.versions.retain(|_, (_, until)| *until > now);
        self.next_sweep = now + SWEEP_EVERY_US;
    }
}

impl MemoryStore {
    /// Runs `f` on the cache shard of `segment`, with the store's time.
    fn with_cache<T: Send + 'static>(
        &self,
        segment: &StoreKey,
        f: impl FnOnce(&mut Shard, u64) -> Result<T, StoreError>,
    ) -> StoreFuture<T> {
        let now = self.now_us();
        done(
            self.inner
                .cache
                .lock(segment)
                .and_then(|mut shard| f(&mut shard, now)),
        )
    }
}

impl CacheStore for MemoryStore {
    fn lookup(&self, request: LookupRequest) -> StoreFuture<Lookup> {
        self.with_cache(&request.segment, |s, now| lookup(s, now, &request))
    }

    fn store(&self, request: StoreRequest) -> StoreFuture<StoreOutcome> {
        self.with_cache(&request.segment, |s, now| store(s, now, &request))
    }

    fn release_fill(&self, segment: StoreKey, key: StoreKey, t: FillToken) -> StoreFuture<bool> {
        let token = t;
        self.with_cache(&segment, |s, now| release(s, now, segment, key, token))
    }

    fn invalidate_segment(&self, segment: StoreKey) -> StoreFuture<u64> {
        self.with_cache(&segment, |s, now| invalidate_segment(s, now, segment))
    }

    fn invalidate_key(&self, segment: StoreKey, key: StoreKey) -> StoreFuture<bool> {
        self.with_cache(&segment, |s, now| {
            invalidate_keys(s, now, segment, &[key]).map(|n| n > 0)
        })
    }

    fn refresh(&self, request: RefreshRequest) -> StoreFuture<StoreOutcome> {
        self.with_cache(&request.segment, |s, now| refresh(s, now, &request))
    }

    fn invalidate_keys(&self, segment: StoreKey, keys: Vec<StoreKey>) -> StoreFuture<u64> {
        self.with_cache(&segment, |s, now| invalidate_keys(s, now, segment, &keys))
    }

    fn is_remote(&self) -> bool {
        false
    }
}
