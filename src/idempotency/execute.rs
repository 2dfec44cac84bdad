//! The execution step: the handler runs under the claim, whose lease is renewed in the
//! background; the claim ends stored (retried in the background when the store does not answer)
//! or released, and is released when the handler fails or panics.

use std::{fmt, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{config::Config, record::StoredResponse, TARGET};
use crate::{
    lock::{spawn_detached, Lease},
    store::{bounded, IdempotencyStore, StoreError},
    StoreKey,
};

/// The fencing token of the claim a request runs under, in the request's extensions. It grows
/// with every claim of the same record: storage that remembers the highest token it saw can
/// reject a late write from a request whose claim was lost. See the [module docs](super) for
/// an example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// The token as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl From<FencingToken> for u64 {
    fn from(token: FencingToken) -> Self {
        token.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The first pause before a failed completion is tried again; it doubles up to
/// [`COMPLETE_RETRY_MAX`].
const COMPLETE_RETRY: Duration = Duration::from_millis(100);
const COMPLETE_RETRY_MAX: Duration = Duration::from_secs(5);

/// A claimed record while its request runs. Dropped before [`Execution::complete`] or
/// [`Execution::release`], it releases the claim in the background.
pub(super) struct Execution {
    claim: Option<Held>,
    fence: u64,
}

/// What holding a claim takes: the record, the token, and the lease renewed in the background.
struct Held {
    store: Arc<dyn IdempotencyStore>,
    record: StoreKey,
    token: String,
    fence: u64,
    lease: Lease,
    store_timeout: Duration,
}

impl Execution {
    /// Starts renewing the lease of the claim `token` holds on `record` under `fence`, taken
    /// by a claim sent at `sent`.
    pub(super) fn start(
        store: Arc<dyn IdempotencyStore>,
        config: &Config,
        record: StoreKey,
        token: String,
        fence: u64,
        sent: Instant,
    ) -> Self {
        let lease = {
            let (store, token, lease) = (Arc::clone(&store), token.clone(), config.lease);
            Lease::start(sent, config.lease, config.store_timeout, move || {
                store.extend_claim(&record, &token, lease)
            })
        };
        let claim = Held {
            store,
            record,
            token,
            fence,
            lease,
            store_timeout: config.store_timeout,
        };
        Self {
            claim: Some(claim),
            fence,
        }
    }

    /// The fencing token of the claim.
    pub(super) fn fence(&self) -> FencingToken {
        FencingToken(self.fence)
    }

    /// Releases the claim now, so that the request may be retried.
    pub(super) async fn release(mut self) {
        let Some(mut claim) = self.claim.take() else {
            return;
        };
        claim.lease.stop();
        let release = claim.store.release_claim(&claim.record, &claim.token);
        if let Err(error) = bounded(Some(claim.store_timeout), release).await {
            tracing::warn!(target: TARGET, record = %claim.record, %error, "releasing an idempotency claim failed; it expires with its lease");
        }
    }

    /// Stores `response` for `retention`, if the claim is still held. Waits for one store call
    /// at most (the store timeout): when it fails or times out, the claim's lease is kept
    /// renewed and the completion retried in the background with backoff, until it lands, until
    /// the store answers that the token no longer holds, or until `retention` has passed.
    pub(super) async fn complete(mut self, response: StoredResponse, retention: Duration) {
        let Some(claim) = self.claim.take() else {
            return;
        };
        if claim.lease.is_lost() {
            tracing::warn!(target: TARGET, record = %claim.record, "the claim was lost while the handler ran; the response is not stored");
            return;
        }
        let response = response.encode();
        match claim.try_complete(&response, retention).await {
            Ok(stored) => claim.completed(stored, 1),
            Err(error) => {
                tracing::warn!(target: TARGET, record = %claim.record, %error, "storing the response failed; retrying in the background while the claim is held");
                tokio::spawn(claim.complete_in_background(response, retention));
            }
        }
    }
}

impl Held {
    async fn try_complete(&self, response: &[u8], retention: Duration) -> Result<bool, StoreError> {
        let complete = self
            .store
            .complete(&self.record, &self.token, response.to_vec(), retention);
        bounded(Some(self.store_timeout), complete).await
    }

    /// The completion retried with backoff: the lease (`self.lease`) is renewed meanwhile, so
    /// duplicates find the record in flight and the handler does not run again.
    async fn complete_in_background(self, response: Vec<u8>, retention: Duration) {
        let deadline = Instant::now() + retention;
        let mut pause = COMPLETE_RETRY;
        for attempt in 2u32.. {
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            if Instant::now() >= deadline {
                tracing::error!(target: TARGET, record = %self.record, attempts = attempt - 1, "storing the response did not succeed within the retention; the claim expires with its lease");
                return;
            }
            pause = (pause * 2).min(COMPLETE_RETRY_MAX);
            match self.try_complete(&response, retention).await {
                Ok(stored) => return self.completed(stored, attempt),
                Err(error) => {
                    tracing::debug!(target: TARGET, record = %self.record, %error, attempt, "storing the response failed again");
                }
            }
        }
    }

    /// Logs how the completion ended; dropping `self` stops the renewal.
    fn completed(self, stored: bool, attempts: u32) {
        if stored {
            tracing::debug!(target: TARGET, record = %self.record, fence = self.fence, attempts, outcome = "stored");
        } else {
            tracing::warn!(target: TARGET, record = %self.record, attempts, "the claim was lost before completion; the response is not stored");
        }
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            let release = claim.store.release_claim(&claim.record, &claim.token);
            spawn_detached(claim.store_timeout, release);
        }
    }
}
