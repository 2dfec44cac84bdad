//! The response-cache store trait, [`CacheStore`], and the types of its operations.
//!
//! Entries live in *segments*. Each segment has a version counter; every entry records the
//! version it was written under, and a lookup treats an entry of another version as absent. So
//! invalidating a whole segment is one increment, whatever its size, and the old entries simply
//! expire. On Redis, every key of a segment carries the segment's hash tag, so a segment lives
//! in one cluster slot. The [`CacheLayer`](crate::cache::CacheLayer) spreads a large segment
//! over several store segments, its shards (see
//! [`CacheLayer::segment_shards`](crate::cache::CacheLayer::segment_shards)): to a store each
//! shard is a segment like any other.

use std::{fmt, time::Duration};

use bytes::Bytes;

use super::StoreFuture;
use crate::key::StoreKey;

/// How long a segment version made by an invalidation lives when no entry extends it: longer
/// than any fill in flight, so that a fill that read the old version is always rejected.
pub(crate) const VERSION_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// A random token proving who holds a fill lock (128 bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FillToken(pub u128);

impl FillToken {
    /// A fresh random token.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The token as 32 hex digits (what the Redis stores write).
    pub fn to_hex(&self) -> String {
        format!("{:032x}", self.0)
    }
}

impl fmt::Debug for FillToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FillToken(..)")
    }
}

/// A request for the fill lock, made together with a lookup.
#[derive(Debug, Clone, Copy)]
pub struct FillRequest {
    /// How long the lock holds unless released (it must outlast the handler).
    pub ttl: Duration,
    /// The token to store if the lock is free.
    pub token: FillToken,
}

/// One lookup: read the segment version and the entry, and (when the entry is absent, due for
/// an early recompute, or stale) try to take the fill lock, all in one atomic call.
#[derive(Debug, Clone, Copy)]
pub struct LookupRequest {
    /// The hashed segment.
    pub segment: StoreKey,
    /// The hashed entry key (also the key of its fill lock).
    pub key: StoreKey,
    /// Take the fill lock when the entry needs computing. `None`: never lock.
    pub fill: Option<FillRequest>,
    /// XFetch `beta` (0 turns early recompute off; 1 is the usual value).
    pub early_beta: f64,
    /// A uniform random number in `(0, 1]` for the XFetch draw.
    pub random: f64,
}

/// How usable the entry found by a lookup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Freshness {
    /// No usable entry (absent, expired, of an old segment version, or corrupt).
    Miss,
    /// Fresh: serve it.
    Fresh,
    /// Fresh, but the XFetch draw says to recompute it now.
    Early,
    /// Past its freshness, inside the stale-while-revalidate window.
    Stale,
    /// Past the stale-while-revalidate window but inside the stale-if-error window: usable only
    /// when the handler fails.
    StaleIfError,
    /// Past its freshness and every stale window, but kept to be revalidated (see
    /// [`StoreRequest::keep`]): usable once the origin confirms it (a `304`).
    Expired,
}

/// What happened to the fill lock during a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FillState {
    /// Not requested, or not needed (a fresh entry).
    NotTried,
    /// This caller holds it now, with the token of its [`FillRequest`].
    Acquired,
    /// Another caller holds it.
    Held,
}

/// A store's answer to a [`LookupRequest`].
#[derive(Debug, Clone)]
pub struct Lookup {
    /// How usable the entry is.
    pub freshness: Freshness,
    /// The stored entry bytes (present unless [`Freshness::Miss`]).
    pub entry: Option<Bytes>,
    /// The segment version read; pass it back to [`CacheStore::store`].
    pub version: u64,
    /// Time since the entry was stored (zero on a miss).
    pub age: Duration,
    /// The fill lock.
    pub fill: FillState,
    /// The stored value was unreadable by the store and has been deleted (a miss).
    pub corrupt: bool,
}

/// One write of an entry.
#[derive(Debug, Clone)]
pub struct StoreRequest {
    /// The hashed segment.
    pub segment: StoreKey,
    /// The hashed entry key.
    pub key: StoreKey,
    /// The segment version read at lookup: the write is dropped if it changed since.
    pub version: u64,
    /// The fill lock held (its key and token): the write is dropped unless it still holds, and
    /// the lock is released with the write.
    pub fill: Option<(StoreKey, FillToken)>,
    /// The encoded entry.
    pub entry: Bytes,
    /// How long the entry is fresh.
    pub ttl: Duration,
    /// Stale-while-revalidate window after `ttl`.
    pub stale_while_revalidate: Duration,
    /// Stale-if-error window after `ttl`.
    pub stale_if_error: Duration,
    /// How long the response took to compute (XFetch's `delta`).
    pub compute_time: Duration,
    /// How long the entry is kept after `ttl` to be revalidated ([`Freshness::Expired`] once
    /// past the stale windows); zero for an entry without a validator.
    pub keep: Duration,
}

/// An in-place refresh of an entry that a `304 Not Modified` confirmed: new head bytes, new
/// freshness, the stored body kept (it is not sent again).
///
/// The entry's bytes start with `old_head`, which the refresh replaces with `new_head`; the
/// refresh is dropped when the entry is gone, was replaced (it no longer starts with
/// `old_head`), or belongs to another segment version.
#[derive(Debug, Clone)]
pub struct RefreshRequest {
    /// The hashed segment.
    pub segment: StoreKey,
    /// The hashed entry key.
    pub key: StoreKey,
    /// The segment version read at lookup.
    pub version: u64,
    /// The fill lock held (its key and token): the refresh is dropped unless it still holds,
    /// and the lock is released with it.
    pub fill: Option<(StoreKey, FillToken)>,
    /// The first bytes of the stored entry, as read.
    pub old_head: Bytes,
    /// What replaces them.
    pub new_head: Bytes,
    /// How long the entry is fresh from now.
    pub ttl: Duration,
    /// Stale-while-revalidate window after `ttl`.
    pub stale_while_revalidate: Duration,
    /// Stale-if-error window after `ttl`.
    pub stale_if_error: Duration,
    /// How long the entry is kept after `ttl` to be revalidated.
    pub keep: Duration,
}

/// The outcome of a [`StoreRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreOutcome {
    /// Written.
    Stored,
    /// Dropped: the segment was invalidated since the lookup.
    VersionChanged,
    /// Dropped: the fill lock expired or is held by someone else.
    LockLost,
    /// Dropped: the entry to refresh is gone or was replaced.
    Missing,
}

/// A store for [`CacheLayer`](crate::cache::CacheLayer).
///
/// Every call is atomic across every process sharing the store, and uses the store's clock. The
/// trait is object safe; futures are boxed (a cache call already does network I/O).
pub trait CacheStore: Send + Sync + 'static {
    /// Reads the segment version and the entry, decides its [`Freshness`], and takes the fill
    /// lock if asked and the entry is not plainly fresh.
    fn lookup(&self, request: LookupRequest) -> StoreFuture<Lookup>;

    /// Writes an entry if the segment version and the fill lock (if any) still hold; releases
    /// the lock.
    fn store(&self, request: StoreRequest) -> StoreFuture<StoreOutcome>;

    /// Releases a fill lock if `token` still holds it. Answers whether it did.
    fn release_fill(&self, segment: StoreKey, key: StoreKey, token: FillToken)
        -> StoreFuture<bool>;

    /// Invalidates every entry of a segment (bumps its version). Answers the new version.
    ///
    /// A store may forget a version once every entry written under it has expired (and a day
    /// has passed since the bump): the version then reads 0 again.
    fn invalidate_segment(&self, segment: StoreKey) -> StoreFuture<u64>;

    /// Deletes one entry. Answers whether it existed.
    fn invalidate_key(&self, segment: StoreKey, key: StoreKey) -> StoreFuture<bool>;

    /// Refreshes an entry in place after a `304` (one atomic call): see [`RefreshRequest`].
    /// Releases the fill lock the request names.
    ///
    /// The default answers [`StoreOutcome::Missing`] without touching the store: the layer
    /// then serves the stored body and releases the lock, and the entry is revalidated again
    /// next time. Every store of this crate implements it.
    fn refresh(&self, request: RefreshRequest) -> StoreFuture<StoreOutcome> {
        let _ = request;
        Box::pin(std::future::ready(Ok(StoreOutcome::Missing)))
    }

    /// Deletes several entries of one segment in one atomic call. Answers how many existed.
    ///
    /// The default deletes them one by one with [`invalidate_key`](Self::invalidate_key).
    fn invalidate_keys(&self, segment: StoreKey, keys: Vec<StoreKey>) -> StoreFuture<u64> {
        let calls: Vec<_> = keys
            .into_iter()
            .map(|key| self.invalidate_key(segment, key))
            .collect();
        Box::pin(async move {
            let mut deleted = 0;
            for call in calls {
                deleted += u64::from(call.await?);
            }
            Ok(deleted)
        })
    }

    /// Whether calls leave the process (the layer puts a timeout only around those that do).
    /// Defaults to `true`.
    fn is_remote(&self) -> bool {
        true
    }
}

impl<T: CacheStore + ?Sized> CacheStore for std::sync::Arc<T> {
    fn lookup(&self, request: LookupRequest) -> StoreFuture<Lookup> {
        (**self).lookup(request)
    }

    fn store(&self, request: StoreRequest) -> StoreFuture<StoreOutcome> {
        (**self).store(request)
    }

    fn release_fill(
        &self,
        segment: StoreKey,
        key: StoreKey,
        token: FillToken,
    ) -> StoreFuture<bool> {
        (**self).release_fill(segment, key, token)
    }

    fn invalidate_segment(&self, segment: StoreKey) -> StoreFuture<u64> {
        (**self).invalidate_segment(segment)
    }

    fn invalidate_key(&self, segment: StoreKey, key: StoreKey) -> StoreFuture<bool> {
        (**self).invalidate_key(segment, key)
    }

    fn refresh(&self, request: RefreshRequest) -> StoreFuture<StoreOutcome> {
        (**self).refresh(request)
    }

    fn invalidate_keys(&self, segment: StoreKey, keys: Vec<StoreKey>) -> StoreFuture<u64> {
        (**self).invalidate_keys(segment, keys)
    }

    fn is_remote(&self) -> bool {
        (**self).is_remote()
    }
}
