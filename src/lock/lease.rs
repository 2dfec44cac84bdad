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

/// How long after it was sent a call may still land: the clients retry a call (`TRYAGAIN`, the
/// full script after `NOSCRIPT`) for up to their client timeout (2 s by default) after its
/// caller stopped waiting; with a margin.
const LATE_LANDING: Duration = Duration::from_secs(3);

/// After a call whose answer was lost (an error or a timeout: it may have reached the store and
/// taken a lease for `token`), releases that lease in the background as soon as the store
/// answers again, so that what never ran does not block a resource for a whole lease. Tried
/// with backoff (100 ms doubling up to 1 s), each try bounded by `timeout`, until the store
/// answers or `lease` has passed (a lease that landed has then expired). Needs a runtime.
pub(crate) fn release_unknown<F>(timeout: Duration, lease: Duration, release: F)
where
    F: Fn() -> StoreFuture<bool> + Send + 'static,
{
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let start = Instant::now();
    let deadline = start + lease;
    handle.spawn(async move {
        let mut pause = Duration::from_millis(100);
        let mut looked_late = false;
        while Instant::now() < deadline {
            match bounded(Some(timeout), release()).await {
                Ok(false) if !looked_late && start + LATE_LANDING < deadline => {
                    // Nothing to release yet, but the call may still be under way in the
                    // client (retried after `TRYAGAIN`, or sent in full after `NOSCRIPT`):
                    // look once more when the client has surely given up on it.
                    looked_late = true;
                    tokio::time::sleep_until(start + LATE_LANDING).await;
                    continue;
                }
                Ok(released) => {
                    tracing::debug!(released, "a lease whose answer was lost is released");
                    return;
                }
                Err(error) => {
                    tracing::debug!(%error, "releasing a lease whose answer was lost failed; retrying");
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    });
}

/// A store call that may take a lease for a token, until its answer arrives. Dropped before it
/// is [settled](Unsettled::settled) (the answer was lost to an error or a timeout, or the caller
/// went away while waiting), it releases that lease with [`release_unknown`].
pub(crate) struct Unsettled<F>
where
    F: Fn() -> StoreFuture<bool> + Send + 'static,
{
    release: Option<F>,
    timeout: Duration,
    lease: Duration,
}

impl<F> Unsettled<F>
where
    F: Fn() -> StoreFuture<bool> + Send + 'static,
{
    /// A call under way whose lease `release` gives back; see [`release_unknown`].
    pub(crate) fn new(timeout: Duration, lease: Duration, release: F) -> Self {
        Self {
            release: Some(release),
            timeout,
            lease,
        }
    }

    /// The store answered: nothing to give back.
    pub(crate) fn settled(mut self) {
        self.release = None;
    }
}

impl<F> Drop for Unsettled<F>
where
    F: Fn() -> StoreFuture<bool> + Send + 'static,
{
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release_unknown(self.timeout, self.lease, release);
        }
    }
}

/// The first pause before a failed renewal is tried again (doubling up to a sixth of the lease).
const RENEW_RETRY: Duration = Duration::from_millis(50);

/// A lease renewed in the background every third of its length.
pub(crate) struct Lease {
    lost: watch::Receiver<bool>,
    task: Option<JoinHandle<()>>,
}

impl Lease {
    /// Renews with `extend` every third of `lease`, each call bounded by `timeout` and by that
    /// third. The first renewal is due a third of the lease after `since`, the moment the call
    /// that took the lease was sent: the store started the lease when it ran that call, at the
    /// earliest then, so a slow answer does not eat into the lease before the first renewal. The lease is lost only when `extend` answers `false` (the store says the token no
    /// longer holds). A failed or timed-out renewal is not a loss: it is tried again within the
    /// lease, after 50 ms, then twice as long each time (at most a sixth of the lease), for as
    /// long as the store does not answer; the first answer decides.
    pub(crate) fn start<F>(since: Instant, lease: Duration, timeout: Duration, extend: F) -> Self
    where
        F: Fn() -> StoreFuture<bool> + Send + 'static,
    {
        let (tx, rx) = watch::channel(false);
        let every = lease / 3;
        let bound = timeout.min(every);
        let task = tokio::spawn(async move {
            let mut pause = (since + every).saturating_duration_since(Instant::now());
            let mut failing_since: Option<Instant> = None;
            loop {
                tokio::time::sleep(pause).await;
                match bounded(Some(bound), extend()).await {
                    Ok(true) => {
                        if let Some(since) = failing_since.take() {
                            tracing::info!(failed_for = ?since.elapsed(), "lease renewed again");
                        }
                        pause = every;
                    }
                    Ok(false) => {
                        tracing::warn!("lease lost: the store says the token no longer holds");
                        let _ = tx.send(true);
                        return;
                    }
                    Err(error) => {
                        if failing_since.is_none() {
                            failing_since = Some(Instant::now());
                            tracing::warn!(%error, "renewing a lease failed; retrying");
                            pause = RENEW_RETRY.min(every);
                        } else {
                            tracing::debug!(%error, "renewing a lease failed again; retrying");
                            pause = (pause * 2).min(every / 2);
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
