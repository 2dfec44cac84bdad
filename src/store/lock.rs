//! The lock store: leases with fencing tokens, the ground of [`Lock`](crate::lock::Lock).

use std::time::Duration;

use super::StoreFuture;
use crate::StoreKey;

/// A store of leases with fencing tokens: the safe distributed lock.
///
/// Only the holder of the random token can extend or release a lock (compare-and-extend,
/// compare-and-delete), so a slow holder whose lease ran out cannot release the next holder's
/// lock. Each acquisition returns a fencing token that grows per resource; storage guarded by the
/// lock should reject writes that carry an older token. The per-resource fence counter is kept
/// without expiry (a few bytes per resource ever locked).
pub trait LockStore: Send + Sync + 'static {
    /// Takes the lock on `resource` for `lease` if it is free (`SET NX PX`). Returns the fencing
    /// token, or `None` when someone holds it.
    fn acquire_lock(
        &self,
        resource: &StoreKey,
        token: &str,
        lease: Duration,
    ) -> StoreFuture<Option<u64>>;

    /// Extends the lease if `token` still holds the lock; `false` when it does not.
    fn extend_lock(&self, resource: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool>;

    /// Releases the lock if `token` still holds it; `false` (and nothing changes) otherwise.
    fn release_lock(&self, resource: &StoreKey, token: &str) -> StoreFuture<bool>;
}

impl<T: LockStore> LockStore for std::sync::Arc<T> {
    fn acquire_lock(&self, r: &StoreKey, t: &str, l: Duration) -> StoreFuture<Option<u64>> {
        (**self).acquire_lock(r, t, l)
    }
    fn extend_lock(&self, r: &StoreKey, t: &str, l: Duration) -> StoreFuture<bool> {
        (**self).extend_lock(r, t, l)
    }
    fn release_lock(&self, r: &StoreKey, t: &str) -> StoreFuture<bool> {
        (**self).release_lock(r, t)
    }
}
