//! Conformance suites for store implementations (feature `test-support`), one per concern:
//! [`rate_limit_suite`], [`cache_suite`], [`lock_suite`] and [`idempotency_suite`], and
//! [`rate_limit_settlement_suite`] for a rate-limit store that settles metered costs, and
//! [`rate_limit_admin_suite`] for one that resets keys and keeps overrides, and
//! [`rate_limit_lease_suite`] for one that leases quotas ([`RateLeaseStore`](crate::store::RateLeaseStore)).
//!
//! The crate runs them against the memory, `redis` and `fred` stores (standalone and cluster).
//! Run them against a store of your own from a test:
//!
//! ```no_run
//! # async fn run() {
//! use tower_redis_layers::{conformance, store::MemoryStore};
//! let store = MemoryStore::new();
//! conformance::rate_limit_suite(&store).await;
//! conformance::rate_limit_settlement_suite(&store).await;
//! conformance::cache_suite(&store).await;
//! conformance::lock_suite(&store).await;
//! conformance::idempotency_suite(&store).await;
//! # }
//! ```
//!
//! Every check uses fresh random keys, so a suite may run against a store that holds other
//! data, and the checks of a suite run concurrently. Time is real: a suite takes a few seconds.
//! A failed check panics with a message naming it.

mod cache;
mod idempotency;
mod lease;
mod lock;
mod rate_limit;

pub use self::{
    cache::cache_suite,
    idempotency::idempotency_suite,
    lease::rate_limit_lease_suite,
    lock::lock_suite,
    rate_limit::{rate_limit_admin_suite, rate_limit_settlement_suite, rate_limit_suite},
};

use crate::StoreKey;

/// A fresh random key.
fn random_key() -> StoreKey {
    let bytes: [u8; 16] = rand::random();
    StoreKey::from_parts([bytes.as_slice()])
}

/// A fresh random lock or claim token.
fn token() -> String {
    crate::lock::new_token()
}
