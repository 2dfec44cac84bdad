//! The in-process store: the default, needs no server.
//!
//! One file per concern (`rate_limit.rs`, `cache.rs`, `lock.rs`, `idempotency.rs`), each with
//! the same semantics as the Redis scripts; this file holds what they share: the store itself,
//! its one clock, sharded state behind one lock helper, and the record map that locks and
//! idempotency records both live in.

use std::{
    collections::HashMap,
    future::ready,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;

use super::{StoreError, StoreFuture};
use crate::StoreKey;

mod cache;
mod idempotency;
mod lock;
mod rate_limit;

#[cfg(feature = "test-support")]
pub(crate) use self::rate_limit::calendar_period;

/// An in-process store with the same semantics as the Redis scripts.
///
/// It is sharded (a request locks one shard, never the whole map) and forgets expired state on
/// its own: each shard sweeps itself at most once a second and whenever it has doubled since its
/// last sweep, and a background task (started when the store is made inside a Tokio runtime)
/// sweeps idle shards, so memory stays bounded under a flood of distinct keys and falls back once
/// they expire.
///
/// State is per process: with several replicas, use a Redis store so that limits hold across all
/// of them. Cloning is cheap and shares the state.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    clock: Clock,
    rate_limit: Shards<rate_limit::Shard>,
    /// Locks and idempotency records (see [`Records`]).
    records: Shards<Records>,
    cache: Shards<cache::Shard>,
}

/// How often state is swept at the latest.
const SWEEP_EVERY_US: u64 = 1_000_000;

impl MemoryStore {
    /// A new, empty store with one shard per 4 threads of parallelism (at least 16).
    pub fn new() -> Self {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self::with_shards((cpus * 4).max(16))
    }

    /// A new, empty store with `shards` shards (rounded up to a power of two).
    pub fn with_shards(shards: usize) -> Self {
        let inner = Arc::new(Inner {
            clock: Clock::new(),
            rate_limit: Shards::new(shards),
            records: Shards::new(shards),
            cache: Shards::new(shards),
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(sweeper(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    /// Forgets every expired entry now (the store also does this on its own).
    pub fn sweep(&self) {
        self.inner.sweep_all();
    }

    /// How many rate-limit entries (key and rule pairs) the store holds, expired ones not yet
    /// swept included.
    pub fn len(&self) -> usize {
        self.inner.rate_limit.iter().map(|s| s.len()).sum()
    }

    /// Whether the store holds no rate-limit entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn now_us(&self) -> u64 {
        self.inner.clock.now_us()
    }

    /// Sets the civil time that [calendar rules](crate::rate_limit::Rule::calendar) read (the
    /// system time by default) to `now`; it then moves with the store's clock (real or
    /// `tokio::time::pause()`d time). Counters of an earlier period are ignored. For tests.
    #[cfg(feature = "test-support")]
    #[doc(hidden)]
    pub fn set_wall_clock(&self, now: SystemTime) {
        self.inner.clock.set_wall(now);
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.rate_limit.shards.len())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn sweep_all(&self) {
        let now = self.clock.now_us();
        for mut shard in self.rate_limit.iter() {
            shard.sweep(now);
        }
        for mut shard in self.records.iter() {
            shard.sweep(now);
        }
        for mut shard in self.cache.iter() {
            shard.sweep(now);
        }
    }
}

async fn sweeper(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_micros(SWEEP_EVERY_US));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match inner.upgrade() {
            Some(inner) => inner.sweep_all(),
            None => return,
        }
    }
}

/// The store's one clock: microseconds since an origin taken when the store was made, offset by
/// one hour so that "zero" state is always in the past. It follows `tokio::time::pause()` in
/// tests. Calendar rules also need the civil time: the system time at the origin, plus the same
/// elapsed time (so the calendar moves with paused time too).
#[derive(Debug)]
struct Clock {
    origin: Instant,
    /// System time at `origin`, in µs since the Unix epoch (set again by `set_wall_clock`).
    wall_at_origin: AtomicU64,
}

/// The one-hour offset of the store clock.
const CLOCK_OFFSET_US: u64 = 3_600_000_000;

impl Clock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            wall_at_origin: AtomicU64::new(system_us(SystemTime::now())),
        }
    }

    #[inline]
    fn now_us(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.origin);
        // `as_micros` in `u64` rather than `u128`: the same value, and `u64::MAX / 2` when it
        // does not fit (after some 580,000 years), but cheaper on the hot path.
        elapsed
            .as_secs()
            .checked_mul(1_000_000)
            .and_then(|us| us.checked_add(u64::from(elapsed.subsec_micros())))
            .unwrap_or(u64::MAX / 2)
            .saturating_add(CLOCK_OFFSET_US)
    }

    /// The civil time (µs since the Unix epoch) at the store time `now` (from `now_us`).
    fn wall_us(&self, now: u64) -> u64 {
        self.wall_at_origin
            .load(Ordering::Relaxed)
            .saturating_add(now.saturating_sub(CLOCK_OFFSET_US))
    }

    /// Makes the civil time `wall` now (tests).
    #[cfg(any(test, feature = "test-support"))]
    fn set_wall(&self, wall: SystemTime) {
        let elapsed = self.now_us().saturating_sub(CLOCK_OFFSET_US);
        let at_origin = system_us(wall).saturating_sub(elapsed);
        self.wall_at_origin.store(at_origin, Ordering::Relaxed);
    }
}

fn system_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

/// The maps of the store's own state (records, cache entries): keyed by [`StoreKey`]s (already
/// hashes), hashed in process with rapidhash (seeded per map at random), which is several times
/// faster than the standard library's SipHash for these short keys. The rate-limit slots, on
/// the hottest path, have a hash of their own (`rate_limit::SlotHash`).
type Map<K, V> = HashMap<K, V, rapidhash::fast::RandomState>;

/// State split in shards by key, each behind its own lock: a request locks one shard.
///
/// The lock is a reader-writer lock: a rate-limit decision on a key that already has a lock-free
/// cell (a GCRA TAT) takes it shared and updates the cell with a compare-and-swap, so the
/// threads deciding for one hot key do not wait for each other; everything else takes it
/// exclusively.
struct Shards<T> {
    shards: Box<[RwLock<T>]>,
}

impl<T: Default> Shards<T> {
    /// `count` shards, rounded up to a power of two.
    fn new(count: usize) -> Self {
        let count = count.max(1).next_power_of_two();
        Self {
            shards: (0..count).map(|_| RwLock::new(T::default())).collect(),
        }
    }
}

impl<T> Shards<T> {
    /// Locks the shard of `key`. A shard whose lock was poisoned (a thread panicked while
    /// holding it) answers [`StoreError::Poisoned`].
    fn lock(&self, key: &StoreKey) -> Result<RwLockWriteGuard<'_, T>, StoreError> {
        self.shard(key)?.write().map_err(|_| StoreError::Poisoned)
    }

    /// Locks the shard of `key` shared (see [`Shards`]).
    fn read(&self, key: &StoreKey) -> Result<RwLockReadGuard<'_, T>, StoreError> {
        self.shard(key)?.read().map_err(|_| StoreError::Poisoned)
    }

    fn shard(&self, key: &StoreKey) -> Result<&RwLock<T>, StoreError> {
        let b = key.as_bytes();
        let v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        // The number of shards is a power of two.
        let index = (v as usize) & (self.shards.len() - 1);
        // `ok_or_else`: an error made eagerly would be dropped on every call.
        self.shards.get(index).ok_or_else(|| StoreError::Poisoned)
    }

    /// Every shard that is not poisoned, locked in turn.
    fn iter(&self) -> impl Iterator<Item = RwLockWriteGuard<'_, T>> {
        self.shards.iter().filter_map(|s| s.write().ok())
    }
}

/// An answer that is ready at once, as a store future.
fn done<T: Send + 'static>(result: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(ready(result))
}

/// Microseconds of `d`, at least one millisecond (the scripts' smallest expiry).
fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX / 4)
        .max(1000)
}

/// Locks and idempotency records, keyed by kind and key, so that both keys of one operation (a
/// lock and its fence counter, a record and its fence counter) are in one shard.
#[derive(Default)]
struct Records {
    map: Map<(Kind, StoreKey), Slot>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Lock,
    LockFence,
    Record,
    RecordFence,
}

enum Value {
    Lock {
        token: String,
    },
    Fence(u64),
    InFlight {
        token: String,
        fingerprint: Vec<u8>,
        fence: u64,
    },
    Completed {
        fingerprint: Vec<u8>,
        response: Vec<u8>,
        /// The token that completed the record: its completion, re-sent, answers `true`.
        token: String,
    },
}

struct Slot {
    value: Value,
    /// Microseconds on the store clock; `u64::MAX` for no expiry.
    expires_at: u64,
}

impl Records {
    /// The slot at `key` unless it expired (an expired slot is removed).
    fn live(&mut self, key: (Kind, StoreKey), now: u64) -> Option<&mut Slot> {
        if self.map.get(&key).is_some_and(|s| s.expires_at <= now) {
            self.map.remove(&key);
        }
        self.map.get_mut(&key)
    }

    /// Increments the fence counter at `key` (from 1), kept for `ttl` (`None`: for ever).
    fn next_fence(&mut self, key: (Kind, StoreKey), now: u64, ttl: Option<Duration>) -> u64 {
        let expires_at = ttl.map_or(u64::MAX, |t| now.saturating_add(us(t)));
        let fence = match self.live(key, now) {
            Some(Slot {
                value: Value::Fence(n),
                ..
            }) => *n + 1,
            _ => 1,
        };
        self.map.insert(
            key,
            Slot {
                value: Value::Fence(fence),
                expires_at,
            },
        );
        fence
    }

    /// The live lock or in-flight record at `key`, if `token` holds it.
    fn held(&mut self, key: (Kind, StoreKey), token: &str, now: u64) -> Option<&mut Slot> {
        self.live(key, now).filter(|slot| match &slot.value {
            Value::Lock { token: t } | Value::InFlight { token: t, .. } => t == token,
            Value::Fence(_) | Value::Completed { .. } => false,
        })
    }

    /// Renews the lease of what `token` holds at `key`; `false` when it holds nothing.
    fn renew(&mut self, key: (Kind, StoreKey), token: &str, now: u64, lease: Duration) -> bool {
        self.held(key, token, now)
            .map(|slot| slot.expires_at = now + us(lease))
            .is_some()
    }

    /// Deletes what `token` holds at `key`; `false` when it holds nothing.
    fn release(&mut self, key: (Kind, StoreKey), token: &str, now: u64) -> bool {
        let held = self.held(key, token, now).is_some();
        if held {
            self.map.remove(&key);
        }
        held
    }

    fn sweep(&mut self, now: u64) {
        self.map.retain(|_, slot| slot.expires_at > now);
        if self.map.capacity() > 4 * self.map.len() + 64 {
            self.map.shrink_to_fit();
        }
    }
}

impl MemoryStore {
    /// Renews the lease of what `token` holds at (`kind`, `key`).
    fn renew(&self, kind: Kind, key: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        done(self.with_records(key, |r, now| r.renew((kind, *key), token, now, lease)))
    }

    /// Deletes what `token` holds at (`kind`, `key`).
    fn release(&self, kind: Kind, key: &StoreKey, token: &str) -> StoreFuture<bool> {
        done(self.with_records(key, |r, now| r.release((kind, *key), token, now)))
    }

    /// Runs `f` on the records shard of `key`, with the store's time.
    fn with_records<T>(
        &self,
        key: &StoreKey,
        f: impl FnOnce(&mut Records, u64) -> T,
    ) -> Result<T, StoreError> {
        let now = self.now_us();
        let mut records = self.inner.records.lock(key)?;
        Ok(f(&mut records, now))
    }
}
