use std::{fmt, future::Future, sync::Arc, time::Duration};

use super::{spawn_detached, Lease};
use crate::{
    store::{bounded, LockStore, StoreError},
    StoreKey,
};

/// A held lock. Renews its lease in the background; dropping it releases the lock. See the
/// [module docs](super) for an example.
pub struct LockGuard {
    pub(super) store: Arc<dyn LockStore>,
    pub(super) key: StoreKey,
    pub(super) token: String,
    pub(super) fence: u64,
    pub(super) lease: Lease,
    pub(super) store_timeout: Duration,
    pub(super) released: bool,
}

impl LockGuard {
    /// The fencing token of this acquisition: larger than every earlier one for the resource.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// Resolves when the lease is lost: a renewal found that the token no longer holds the lock
    /// (it expired, or it was taken over). A renewal that fails or times out is retried, and is
    /// not a loss.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.lease.lost()
    }

    /// Whether the store answered that the lease is lost.
    pub fn is_lost(&self) -> bool {
        self.lease.is_lost()
    }

    /// Releases the lock now. `Ok(false)` when it was no longer ours (nothing changed); an
    /// error (a [timeout](StoreError::Timeout) included) when the store did not confirm it, in
    /// which case the lock expires with its lease.
    pub async fn release(mut self) -> Result<bool, StoreError> {
        self.released = true;
        self.lease.stop();
        let release = self.store.release_lock(&self.key, &self.token);
        bounded(Some(self.store_timeout), release).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.lease.stop();
        if !self.released {
            let release = self.store.release_lock(&self.key, &self.token);
            spawn_detached(self.store_timeout, release);
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("fence", &self.fence)
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}
