//! What the lock and the idempotency layer share: holder tokens, the lease renewed in the
//! background, and releasing without waiting.

use std::{future::Future, time::Duration};

use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::store::{bounded, StoreFuture};

/// 128 random bits, as 32 hex digits.
pub(crate) fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Runs a release in the background, bounded by `timeout`, if there is a runtime; its result is
/// only logged.
pub(crate) fn spawn_detached(timeout: Duration, release: StoreFuture<bool>) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            if let Err(error) = bounded(Some(timeout), release).await {
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
    /// Renews with `extend` every third of `lease`, each call bounded by `timeout` and by that
    /// third. The lease is lost when `extend` answers `false`, or when no renewal succeeded for
    /// a whole lease.
    pub(crate) fn start<F>(lease: Duration, timeout: Duration, extend: F) -> Self
    where
        F: Fn() -> StoreFuture<bool> + Send + 'static,
    {
        let (tx, rx) = watch::channel(false);
        let every = lease / 3;
        let bound = timeout.min(every);
        let task = tokio::spawn(async move {
            let mut last_renewed = Instant::now();
            loop {
                tokio::time::sleep(every).await;
                match bounded(Some(bound), extend()).await {
                    Ok(true) => last_renewed = Instant::now(),
                    Ok(false) => {
                        tracing::warn!("lease lost: the lock is held by someone else");
                        let _ = tx.send(true);
                        return;
                    }
                    Err(error) => {
                        if last_renewed.elapsed() >= lease {
                            tracing::warn!(%error, "lease lost: not renewed for a whole lease");
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
