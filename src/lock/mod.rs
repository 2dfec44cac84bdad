//! A safe distributed lock: a random token per holder, `SET NX PX`, compare-and-delete release,
//! compare-and-extend renewal while held, and a fencing token per acquisition.
//!
//! ```no_run
//! # async fn run() -> Result<(), tower_redis_layers::StoreError> {
//! use std::time::Duration;
//! use tower_redis_layers::{store::RedisStore, lock::Lock};
//!
//! let lock = Lock::new(RedisStore::connect("redis://127.0.0.1:6379").await?)
//!     .lease(Duration::from_secs(10));
//! if let Some(guard) = lock.try_acquire("invoice-42").await? {
//!     // Pass the fencing token to the storage you protect; it rejects older tokens.
//!     let fence = guard.fence();
//!     tokio::select! {
//!         _ = guard.lost() => { /* the lease was lost: stop writing */ }
//!         _ = async { /* the work */ } => {}
//!     }
//!     guard.release().await?;
//! }
//! # Ok(()) }
//! ```
//!
//! The lease is renewed in the background every third of its length while the guard lives.
//! When a renewal finds the lock taken by someone else, or no renewal succeeded for a whole
//! lease, [`LockGuard::lost`] resolves. Dropping the guard releases the lock without blocking
//! (the release is spawned on the runtime).
//!
//! A Redis lock alone does not make a paused process safe (a GC pause or a network delay can
//! outlast the lease): use the fencing token. Single-instance Redis (or a primary with replicas)
//! is the honest baseline; this crate does not implement Redlock.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::{
    store::{LockStore, StoreError, StoreFuture},
    StoreKey,
};

/// Acquires leases on named resources; see the [module docs](self) for an example.
pub struct Lock<B> {
    store: Arc<B>,
    lease: Duration,
}

impl<B> Clone for Lock<B> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            lease: self.lease,
        }
    }
}

impl<B> fmt::Debug for Lock<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl<B: LockStore> Lock<B> {
    /// Locks on `store` with a 10 s lease.
    pub fn new(store: B) -> Self {
        Self {
            store: Arc::new(store),
            lease: Duration::from_secs(10),
        }
    }

    /// The lease (default 10 s, at least 30 ms). It is renewed every third of its length while
    /// the guard lives, so it bounds how long a crashed holder keeps the lock.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// Takes the lock on `resource` if it is free.
    pub async fn try_acquire(&self, resource: &str) -> Result<Option<LockGuard>, StoreError> {
        let key = StoreKey::from_parts([b"lock".as_slice(), resource.as_bytes()]);
        let token = new_token();
        let Some(fence) = self.store.acquire_lock(&key, &token, self.lease).await? else {
            return Ok(None);
        };
        let store: Arc<dyn LockStore> = self.store.clone();
        let renew_store = Arc::clone(&store);
        let (renew_key, renew_token, lease) = (key, token.clone(), self.lease);
        let renewal = Lease::start(self.lease, move || {
            renew_store.extend_lock(&renew_key, &renew_token, lease)
        });
        Ok(Some(LockGuard {
            store,
            key,
            token,
            fence,
            lease: renewal,
            released: false,
        }))
    }

    /// Takes the lock on `resource`, retrying with jittered backoff for up to `wait`.
    pub async fn acquire(
        &self,
        resource: &str,
        wait: Duration,
    ) -> Result<Option<LockGuard>, StoreError> {
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(guard) = self.try_acquire(resource).await? {
                return Ok(Some(guard));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let jitter = pause.mul_f64(rand::random::<f64>() * 0.5);
            tokio::time::sleep((pause + jitter).min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }
}

/// A held lock. Renews its lease in the background; dropping it releases the lock.
pub struct LockGuard {
    store: Arc<dyn LockStore>,
    key: StoreKey,
    token: String,
    fence: u64,
    lease: Lease,
    released: bool,
}

impl LockGuard {
    /// The fencing token of this acquisition: larger than every earlier one for the resource.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// Resolves when the lease is lost (taken over after it expired, or not renewed for a whole
    /// lease).
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.lease.lost()
    }

    /// Whether the lease is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.lease.is_lost()
    }

    /// Releases the lock now. `Ok(false)` when it was no longer ours (nothing changed).
    pub async fn release(mut self) -> Result<bool, StoreError> {
        self.released = true;
        self.lease.stop();
        self.store.release_lock(&self.key, &self.token).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.lease.stop();
        if !self.released {
            spawn_detached(self.store.release_lock(&self.key, &self.token));
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

/// 128 random bits, as 32 hex digits.
pub(crate) fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Runs a store operation in the background, if there is a runtime; its result is only logged.
pub(crate) fn spawn_detached(op: StoreFuture<bool>) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            if let Err(error) = op.await {
                tracing::warn!(%error, "releasing a lease failed; it expires on its own");
            }
        });
    }
}

/// A lease renewed in the background every third of its length.
pub(crate) struct Lease {
    lost: watch::Receiver<bool>,
    task: Option<JoinHandle<()>>,
}

impl Lease {
    pub(crate) fn start<F>(lease: Duration, extend: F) -> Self
    where
        F: Fn() -> StoreFuture<bool> + Send + 'static,
    {
        let (tx, rx) = watch::channel(false);
        let every = lease / 3;
        let task = tokio::spawn(async move {
            let mut last_renewed = Instant::now();
            loop {
                tokio::time::sleep(every).await;
                match tokio::time::timeout(every, extend()).await {
                    Ok(Ok(true)) => last_renewed = Instant::now(),
                    Ok(Ok(false)) => {
                        tracing::warn!("lease lost: the lock is held by someone else");
                        let _ = tx.send(true);
                        return;
                    }
                    Ok(Err(_)) | Err(_) => {
                        if last_renewed.elapsed() >= lease {
                            tracing::warn!("lease lost: not renewed for a whole lease");
                            let _ = tx.send(true);
                            return;
                        }
                    }
                }
            }
        });
        Self {
            lost: rx,
            task: Some(task),
        }
    }

    pub(crate) fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.lost.clone();
        async move {
            if rx.wait_for(|lost| *lost).await.is_err() {
                // Renewal stopped without losing the lease (released): never resolves.
                std::future::pending::<()>().await;
            }
        }
    }

    pub(crate) fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    pub(crate) fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop();
    }
}
