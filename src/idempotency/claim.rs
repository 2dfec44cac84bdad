//! The claim step: one store call that takes the record, or finds it in flight, completed, or
//! made by another request body.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Response};
use tokio::time::Instant;

use super::{config::Config, record::StoredResponse, rejection::Rejection, TARGET};
use crate::{
    lock::Unsettled,
    store::{bounded, Claim, ClaimRequest, IdempotencyStore, StoreError, StoreFuture},
    StoreKey,
};

/// How often a duplicate that waits for an in-flight request asks again.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(50);

/// What claiming a record came to.
pub(super) enum Claimed {
    /// The record is this request's, under this fencing token: the handler runs. `sent`: when
    /// the claim that took it was sent (its lease started then at the earliest).
    Fence { fence: u64, sent: Instant },
    /// The layer answers: the stored response, or a rejection (in flight, another body).
    Answer(Response<Bytes>),
    /// The store failed or did not answer in time.
    StoreFailed(StoreError),
}

/// Claims `record` for `token`. A duplicate of an in-flight request asks again until the
/// [in-flight wait](super::IdempotencyLockLayer::in_flight_wait) is over.
pub(super) async fn claim(
    store: &dyn IdempotencyStore,
    config: &Config,
    record: &StoreKey,
    token: &str,
    fingerprint: &[u8],
) -> Claimed {
    let deadline = config.in_flight_wait.map(|w| Instant::now() + w);
    loop {
        let sent = Instant::now();
        let claim = store.claim(
            record,
            ClaimRequest {
                token,
                fingerprint,
                lease: config.lease,
                retention: config.retention,
            },
        );
        let why = match bounded(Some(config.store_timeout), claim).await {
            Ok(Claim::Claimed { fence }) => return Claimed::Fence { fence, sent },
            Err(error) => return Claimed::StoreFailed(error),
            Ok(Claim::Completed(stored)) => {
                tracing::debug!(target: TARGET, record = %record, outcome = "replayed");
                return Claimed::Answer(replay(config, &stored));
            }
            Ok(Claim::InFlight { .. }) if deadline.is_some_and(|d| Instant::now() < d) => {
                tokio::time::sleep(IN_FLIGHT_POLL).await;
                continue;
            }
            Ok(Claim::InFlight { lease_left }) => {
                tracing::debug!(target: TARGET, record = %record, outcome = "in_flight");
                return Claimed::Answer(in_flight(config, lease_left));
            }
            Ok(Claim::Mismatch) => {
                tracing::debug!(target: TARGET, record = %record, outcome = "mismatch");
                Rejection::Mismatch
            }
        };
        return Claimed::Answer(config.reject(why));
    }
}

/// A claim under way. Dropped before it is settled (the claim's answer was lost to an error or
/// a timeout, or the request was dropped while waiting for it), it releases in the background
/// the claim the token may hold: the claim may have reached the store, and a key whose handler
/// never ran must not stay blocked for a whole lease. The release is tried as soon as the store
/// answers again, with backoff (100 ms doubling up to 1 s), until the store answers or the lease
/// is over (the claim, if it landed, has then expired).
pub(super) fn pending_claim(
    store: Arc<dyn IdempotencyStore>,
    config: &Config,
    record: StoreKey,
    token: String,
) -> Unsettled<impl Fn() -> StoreFuture<bool> + Send + 'static> {
    Unsettled::new(config.store_timeout, config.lease, move || {
        tracing::debug!(target: TARGET, record = %record, "releasing a claim whose answer was lost");
        store.release_claim(&record, &token)
    })
}

/// `409` for a request still in flight, with `Retry-After` from the time left on its lease (at
/// least 1 s): by then it is complete, or its key is free again.
fn in_flight(config: &Config, lease_left: Duration) -> Response<Bytes> {
    let secs = u64::try_from(lease_left.as_millis().div_ceil(1000)).unwrap_or(u64::MAX);
    config.reject_retry_after(Rejection::InFlight, secs.max(1))
}

/// The stored response, marked `Idempotent-Replayed: true`; a rejection when it was not stored
/// or cannot be read.
fn replay(config: &Config, stored: &[u8]) -> Response<Bytes> {
    let Some(stored) = StoredResponse::decode(stored) else {
        tracing::error!(target: TARGET, "a stored idempotent response is unreadable");
        return config.reject(Rejection::UnreadableRecord);
    };
    match stored.to_response() {
        Some(mut response) => {
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            response
        }
        None => config.reject(Rejection::NotReplayable),
    }
}
