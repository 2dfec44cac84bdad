//! The execution step: the handler runs under the claim, whose lease is renewed in the
//! background; the claim ends stored or released, and is released when the request ends any
//! other way (the handler failed or panicked, or the client went away).

use std::{fmt, sync::Arc, time::Duration};

use super::{config::Config, record::StoredResponse, TARGET};
use crate::{
    lock::{spawn_detached, Lease},
    store::{bounded, IdempotencyStore},
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

/// A claimed record while its request runs. Dropped before [`Execution::complete`] or
/// [`Execution::release`], it releases the claim in the background.
pub(super) struct Execution {
    store: Arc<dyn IdempotencyStore>,
    record: StoreKey,
    token: String,
    fence: u64,
    lease: Lease,
    store_timeout: Duration,
    armed: bool,
}

impl Execution {
    /// Starts renewing the lease of the claim `token` holds on `record`.
    pub(super) fn start(
        store: Arc<dyn IdempotencyStore>,
        config: &Config,
        record: StoreKey,
        token: String,
        fence: u64,
    ) -> Self {
        let lease = {
            let (store, token, lease) = (Arc::clone(&store), token.clone(), config.lease);
            Lease::start(config.lease, config.store_timeout, move || {
                store.extend_claim(&record, &token, lease)
            })
        };
        Self {
            store,
            record,
            token,
            fence,
            lease,
            store_timeout: config.store_timeout,
            armed: true,
        }
    }

    /// The fencing token of the claim.
    pub(super) fn fence(&self) -> FencingToken {
        FencingToken(self.fence)
    }

    /// Releases the claim now, so that the request may be retried.
    pub(super) async fn release(mut self) {
        self.armed = false;
        self.lease.stop();
        let release = self.store.release_claim(&self.record, &self.token);
        if let Err(error) = bounded(Some(self.store_timeout), release).await {
            tracing::warn!(target: TARGET, record = %self.record, %error, "releasing an idempotency claim failed; it expires with its lease");
        }
    }

    /// Stores `response` for `retention`, if the claim is still held.
    pub(super) async fn complete(mut self, response: StoredResponse, retention: Duration) {
        self.armed = false;
        let lost = self.lease.is_lost();
        self.lease.stop();
        let record = &self.record;
        if lost {
            tracing::warn!(target: TARGET, record = %record, "the lease was lost while the handler ran; the response is not stored");
            return;
        }
        let complete = self
            .store
            .complete(record, &self.token, response.encode(), retention);
        match bounded(Some(self.store_timeout), complete).await {
            Ok(true) => {
                tracing::debug!(target: TARGET, record = %record, fence = self.fence, outcome = "stored");
            }
            Ok(false) => {
                tracing::warn!(target: TARGET, record = %record, "the claim was lost before completion; the response is not stored");
            }
            Err(error) => {
                tracing::warn!(target: TARGET, record = %record, %error, "storing the response failed");
            }
        }
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        if self.armed {
            let release = self.store.release_claim(&self.record, &self.token);
            spawn_detached(self.store_timeout, release);
        }
    }
}
