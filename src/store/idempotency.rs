//! The idempotency store: records that go from absent to in flight to completed, the ground of
//! [`IdempotencyLockLayer`](crate::idempotency::IdempotencyLockLayer).

use std::time::Duration;

use super::StoreFuture;
use crate::StoreKey;

/// What a claim of an idempotency record found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// The record was free: the caller holds it now, with this fencing token. A claim re-sent
    /// by the token that holds the record (after a lost reply) answers this again, with the
    /// same fence, and changes nothing.
    Claimed {
        /// Grows with every claim of the same record.
        fence: u64,
    },
    /// Another request holds the record and is still running.
    InFlight {
        /// Time left on its lease.
        lease_left: Duration,
    },
    /// The record is complete: the stored response, as given to
    /// [`IdempotencyStore::complete`].
    Completed(Vec<u8>),
    /// The record was made by a request with another fingerprint (another body).
    Mismatch,
}

/// A claim request: who claims, for which request, for how long.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ClaimRequest<'a> {
    /// Random token of the claimant.
    pub token: &'a str,
    /// Lease of the in-flight claim; renewed while the request runs.
    pub lease: Duration,
    /// Fingerprint of the request (SHA-256 of the body).
    pub fingerprint: &'a [u8],
    /// How long completed records are kept (the fence counter lives as long).
    pub retention: Duration,
}

impl<'a> ClaimRequest<'a> {
    /// A claim by `token` for a request of `fingerprint`, leased for `lease`, the completed
    /// record kept for `retention`.
    pub fn new(
        token: &'a str,
        fingerprint: &'a [u8],
        lease: Duration,
        retention: Duration,
    ) -> Self {
        Self {
            token,
            fingerprint,
            lease,
            retention,
        }
    }
}

/// A store of idempotency records: absent, then in flight (a lease with a token), then
/// completed (the stored response).
///
/// Every operation is atomic; `complete`, `extend_claim` and `release_claim` act only while the
/// token still holds the in-flight claim, so a request whose lease was lost stores nothing.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims the record `key`, or reports what holds it. Idempotent for its token: sending the
    /// same claim twice answers [`Claim::Claimed`] twice, with the same fence.
    fn claim(&self, key: &StoreKey, request: ClaimRequest<'_>) -> StoreFuture<Claim>;

    /// Stores `response` and keeps the record for `retention`, if `token` still holds the claim.
    /// Safe to send twice: once `token` has completed the record, completing it again answers
    /// `true` and changes nothing (the first reply may have been lost).
    fn complete(
        &self,
        key: &StoreKey,
        token: &str,
        response: Vec<u8>,
        retention: Duration,
    ) -> StoreFuture<bool>;

    /// Extends the in-flight lease, if `token` still holds the claim.
    fn extend_claim(&self, key: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool>;

    /// Deletes the in-flight record, if `token` still holds the claim, so the request may be
    /// retried.
    fn release_claim(&self, key: &StoreKey, token: &str) -> StoreFuture<bool>;
}

impl<T: IdempotencyStore> IdempotencyStore for std::sync::Arc<T> {
    fn claim(&self, k: &StoreKey, r: ClaimRequest<'_>) -> StoreFuture<Claim> {
        (**self).claim(k, r)
    }
    fn complete(&self, k: &StoreKey, t: &str, r: Vec<u8>, d: Duration) -> StoreFuture<bool> {
        (**self).complete(k, t, r, d)
    }
    fn extend_claim(&self, k: &StoreKey, t: &str, l: Duration) -> StoreFuture<bool> {
        (**self).extend_claim(k, t, l)
    }
    fn release_claim(&self, k: &StoreKey, t: &str) -> StoreFuture<bool> {
        (**self).release_claim(k, t)
    }
}
