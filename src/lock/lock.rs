use std::{fmt, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{guard::LockGuard, lease::new_token, Lease, Unsettled};
use crate::{
    store::{bounded, LockStore, StoreError},
    StoreKey,
};

/// Acquires leases on named resources. See the [module docs](super) for an example.
pub struct Lock<B> {
    store: Arc<B>,
    lease: Duration,
    store_timeout: Duration,
}

impl<B> Clone for Lock<B> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            lease: self.lease,
            store_timeout: self.store_timeout,
        }
    }
}

impl<B> fmt::Debug for Lock<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("lease", &self.lease)
            .field("store_timeout", &self.store_timeout)
            .finish_non_exhaustive()
    }
}

impl<B: LockStore> Lock<B> {
    /// Locks on `store` with a 10 s lease and a 1 s store timeout.
    pub fn new(store: B) -> Self {
        Self {
            store: Arc::new(store),
            lease: Duration::from_secs(10),
            store_timeout: Duration::from_secs(1),
        }
    }

    /// The lease (default 10 s, at least 30 ms). It is renewed every third of its length while
    /// the guard lives, so it bounds how long a crashed holder keeps the lock.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// How long each store call may take (default 1 s): acquiring, each renewal (also bounded
    /// by a third of the lease) and releasing. A call that does not answer in time fails with
    /// [`StoreError::Timeout`].
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// Takes the lock on `resource` if it is free.
    pub async fn try_acquire(&self, resource: &str) -> Result<Option<LockGuard>, StoreError> {
        let key = StoreKey::from_parts([b"lock".as_slice(), resource.as_bytes()]);
        let token = new_token();
        let sent = Instant::now();
        let acquire = self.store.acquire_lock(&key, &token, self.lease);
        let store: Arc<dyn LockStore> = self.store.clone();
        // Until the store answers, the acquisition may or may not have landed: if the answer is
        // lost, or this future is dropped meanwhile, `unsettled` releases it once the store
        // answers again.
        let unsettled = {
            let (store, token) = (Arc::clone(&store), token.clone());
            Unsettled::new(self.store_timeout, self.lease, move || {
                store.release_lock(&key, &token)
            })
        };
        let answer = bounded(Some(self.store_timeout), acquire).await;
        if let Err(StoreError::CircuitOpen(_)) = answer {
            // The breaker refused the call: it was never sent, there is nothing to release.
            unsettled.settled();
            return answer.map(|_| None);
        }
        let fence = match answer? {
            Some(fence) => fence,
            None => {
                unsettled.settled();
                return Ok(None);
            }
        };
        unsettled.settled();
        let renewal = {
            let (store, key, token, lease) = (Arc::clone(&store), key, token.clone(), self.lease);
            Lease::start(sent, self.lease, self.store_timeout, move || {
                store.extend_lock(&key, &token, lease)
            })
        };
        Ok(Some(LockGuard {
            store,
            key,
            token,
            fence,
            lease: renewal,
            store_timeout: self.store_timeout,
            released: false,
        }))
    }

    /// Takes the lock on `resource`, retrying with jittered backoff for up to `wait`. A store
    /// error (a timeout included) ends the attempt at once.
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

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };

    use super::*;
    use crate::store::{MemoryStore, StoreFuture};

    /// A memory store whose calls never answer while `stalled` is set (a stopped server).
    #[derive(Clone, Default)]
    struct Stalling {
        store: MemoryStore,
        stalled: Arc<AtomicBool>,
    }

    impl Stalling {
        /// `call()`, or, while stalled, a call that never reaches the store nor answers.
        fn call<T: Send + 'static>(&self, call: impl FnOnce() -> StoreFuture<T>) -> StoreFuture<T> {
            if self.stalled.load(Ordering::SeqCst) {
                Box::pin(std::future::pending())
            } else {
                call()
            }
        }
    }

    impl LockStore for Stalling {
        fn acquire_lock(&self, r: &StoreKey, t: &str, l: Duration) -> StoreFuture<Option<u64>> {
            self.call(|| self.store.acquire_lock(r, t, l))
        }
        fn extend_lock(&self, r: &StoreKey, t: &str, l: Duration) -> StoreFuture<bool> {
            self.call(|| self.store.extend_lock(r, t, l))
        }
        fn release_lock(&self, r: &StoreKey, t: &str) -> StoreFuture<bool> {
            self.call(|| self.store.release_lock(r, t))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_store_makes_acquire_fail_within_the_store_timeout() {
        let store = Stalling::default();
        store.stalled.store(true, Ordering::SeqCst);
        let lock = Lock::new(store).store_timeout(Duration::from_millis(200));
        let start = Instant::now();
        let result = lock.acquire("r", Duration::from_secs(30)).await;
        assert!(
            matches!(result, Err(StoreError::Timeout(d)) if d == Duration::from_millis(200)),
            "{result:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        // The default bound is 1 s.
        let lock = Lock::new(Stalling {
            stalled: Arc::new(AtomicBool::new(true)),
            ..Stalling::default()
        });
        let start = Instant::now();
        let result = lock.try_acquire("r").await;
        assert!(matches!(result, Err(StoreError::Timeout(_))), "{result:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_store_bounds_release_and_loses_the_lease_only_when_it_answers() {
        let store = Stalling::default();
        let lock = Lock::new(store.clone())
            .lease(Duration::from_secs(3))
            .store_timeout(Duration::from_millis(100));
        let guard = lock.try_acquire("r").await.unwrap().expect("a free lock");
        store.stalled.store(true, Ordering::SeqCst);
        // Renewals time out and are retried; a store that does not answer loses nothing.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!guard.is_lost(), "a timed-out renewal counted as a loss");
        // The store answers again: the lease expired meanwhile, so the next renewal finds the
        // token gone, and the lease is lost.
        store.stalled.store(false, Ordering::SeqCst);
        let start = Instant::now();
        guard.lost().await;
        assert!(guard.is_lost());
        assert!(
            start.elapsed() <= Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        store.stalled.store(true, Ordering::SeqCst);
        let start = Instant::now();
        let result = guard.release().await;
        assert!(matches!(result, Err(StoreError::Timeout(_))), "{result:?}");
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_error_is_retried_within_the_lease() {
        // The store stalls for less than a lease: the renewals that time out are retried, one
        // lands before the lease ends, and the lock is still held (not taken by another).
        let store = Stalling::default();
        let lock = Lock::new(store.clone())
            .lease(Duration::from_secs(3))
            .store_timeout(Duration::from_millis(100));
        let guard = lock.try_acquire("r").await.unwrap().expect("a free lock");
        tokio::time::sleep(Duration::from_millis(1100)).await; // just after a renewal
        store.stalled.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        store.stalled.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!guard.is_lost());
        assert!(
            lock.try_acquire("r").await.unwrap().is_none(),
            "the lease ran out"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!guard.is_lost());
        assert!(guard.release().await.unwrap());
    }

    /// A memory store whose acquisitions answer 250 ms after they took the lock (a slow reply).
    #[derive(Clone, Default)]
    struct SlowReply(MemoryStore);

    impl LockStore for SlowReply {
        fn acquire_lock(&self, r: &StoreKey, t: &str, l: Duration) -> StoreFuture<Option<u64>> {
            let taken = self.0.acquire_lock(r, t, l); // the memory store acts when called
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(250)).await;
                taken.await
            })
        }
        fn extend_lock(&self, r: &StoreKey, t: &str, l: Duration) -> StoreFuture<bool> {
            self.0.extend_lock(r, t, l)
        }
        fn release_lock(&self, r: &StoreKey, t: &str) -> StoreFuture<bool> {
            self.0.release_lock(r, t)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_renewal_counts_from_when_the_acquisition_was_sent() {
        // The lease (300 ms) began when the store ran the acquisition; its answer came 250 ms
        // later. Renewing a third of the lease after the answer (at 350 ms) would come too late.
        let lock = Lock::new(SlowReply::default()).lease(Duration::from_millis(300));
        let guard = lock.try_acquire("r").await.unwrap().expect("a free lock");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !guard.is_lost(),
            "the lease ran out before its first renewal"
        );
        assert!(guard.release().await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_lock_is_renewed_and_released() {
        let lock = Lock::new(MemoryStore::new()).lease(Duration::from_secs(3));
        let guard = lock.try_acquire("r").await.unwrap().expect("a free lock");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!guard.is_lost());
        assert!(lock.try_acquire("r").await.unwrap().is_none());
        assert!(guard.release().await.unwrap());
        assert!(lock.try_acquire("r").await.unwrap().is_some());
    }
}
