//! Where the state lives: the store traits and their implementations.
//!
//! Each concern has one narrow trait at the level of the operation ("check these rules for this
//! key at cost N"), not a wrapper around Redis commands. The crate ships three stores:
//!
//! | store | feature | notes |
//! |---|---|---|
//! | [`MemoryStore`] | always | in process, sharded, forgets expired keys on its own |
//! | [`RedisStore`] | `redis` (default) | redis-rs; standalone or cluster |
//! | [`FredStore`] | `fred` | fred; standalone or cluster |
//!
//! Both Redis stores run the same Lua script text: one `EVALSHA` per operation (loaded again on
//! `NOSCRIPT`), atomic, with the time read from the Redis server and every key of a call in one
//! hash slot.
//!
//! To plug in a store of your own, implement [`RateLimitStore`] (and [`CacheStore`] for the
//! response cache) and run the conformance suite
//! (feature `test-support`, module `conformance`) against it.

use std::{future::Future, time::Duration};

use crate::{key::StoreKey, rate_limit::Rule};

mod cache;
#[cfg(any(feature = "redis", feature = "fred"))]
pub(crate) mod cache_scripts;
mod call;
mod memory;
mod memory_records;
#[cfg(any(feature = "redis", feature = "fred"))]
pub(crate) mod records;
#[cfg(any(feature = "redis", feature = "fred"))]
pub(crate) mod script;

#[cfg(feature = "fred")]
mod fred;
#[cfg(feature = "redis")]
mod redis;

pub use self::cache::{
    CacheStore, FillRequest, FillState, FillToken, Freshness, Lookup, LookupRequest, StoreOutcome,
    StoreRequest,
};
pub use self::call::FailureMode;
pub(crate) use self::call::{bounded, Bounded};
#[cfg(feature = "fred")]
pub use self::fred::FredStore;
pub use self::memory::MemoryStore;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

/// The Lua source that the `redis` and `fred` stores run to check `rules`: one script per
/// strategy for a single rule, one for several rules. For auditing, or for loading it with
/// `SCRIPT LOAD` ahead of time (the stores load it themselves on `NOSCRIPT`).
#[cfg(any(feature = "redis", feature = "fred"))]
pub fn rate_limit_script(rules: &[Rule]) -> &'static str {
    script::rate_limit_script(rules).text
}

/// What a store answers when it could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The call did not finish in time.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store could not be reached or reported an error.
    #[error("store error: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store answered something this crate does not understand (for example a script of
    /// another version under the same name).
    #[error("unexpected reply from the store: {0}")]
    Reply(String),
    /// The request cannot be expressed for this store (for example an invalid rule).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl StoreError {
    /// Wraps any error of a store.
    pub fn store(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Store(Box::new(err))
    }
}

/// One rate-limit check: consume `cost` units for `key` from every rule, or from none.
#[derive(Debug, Clone, Copy)]
pub struct RateCheck<'a> {
    /// The hashed key of the caller (already namespaced by the policy).
    pub key: &'a StoreKey,
    /// The rules, each with its own state under the key. All are checked; if any denies,
    /// nothing is consumed from any.
    pub rules: &'a [Rule],
    /// Units to consume (0 only reports the state).
    pub cost: u64,
    /// Whether the per-rule state (remaining, reset) is needed in the answer. A store may skip
    /// work when it is not: the per-rule fields of an admitted request may then be zero (the
    /// Redis stores skip building them).
    pub want_state: bool,
}

/// A store's answer to a [`RateCheck`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request was admitted (and its cost consumed from every rule).
    pub allowed: bool,
    /// When denied: the index (into [`RateCheck::rules`]) of the rule with the longest wait.
    pub denied_by: Option<usize>,
    /// When denied: how long until a request of the same cost can be admitted (the longest wait
    /// over all denying rules). Zero when allowed.
    pub retry_after: Duration,
    /// The state of each rule after the decision, in the order of [`RateCheck::rules`]. A
    /// denied request consumes nothing, so each rule then reports what it has left (a rule that
    /// would have admitted the cost has not given it).
    pub rules: Vec<RuleState>,
}

/// The state of one rule after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleState {
    /// Units left in the current window or bucket.
    pub remaining: u64,
    /// Time until the rule's quota is fully available again (rounded up to whole seconds in the
    /// HTTP fields).
    pub reset: Duration,
}

/// A store that answers rate-limit checks.
///
/// Implementations must be atomic per call: two concurrent calls for the same key behave as if
/// one ran entirely before the other, across every process that shares the store. Time is the
/// store's own (the Redis stores read `TIME` on the server).
///
/// The returned future owns what it needs (`'static`), so the service future that polls it is
/// a plain, unboxed type for stores whose future type is nameable. A store whose future is an
/// `async` block can return a boxed future.
pub trait RateLimitStore: Send + Sync + 'static {
    /// The future of one check.
    type Future: Future<Output = Result<Decision, StoreError>> + Send + 'static;

    /// Checks `check.rules` for `check.key`, consuming `check.cost` from all of them or none.
    fn check(&self, check: RateCheck<'_>) -> Self::Future;

    /// Answers at once when the store can decide without waiting (an in-process store), so the
    /// layer calls the inner service directly instead of from its own future. `None` (the
    /// default) sends the check through [`RateLimitStore::check`].
    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        let _ = check;
        None
    }

    /// Whether calls leave the process (a network store). The layer puts a timeout and the local
    /// deny cache only in front of stores that do. Defaults to `true`.
    fn is_remote(&self) -> bool {
        true
    }
}

impl<T: RateLimitStore> RateLimitStore for std::sync::Arc<T> {
    type Future = T::Future;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        (**self).check(check)
    }

    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        (**self).check_now(check)
    }

    fn is_remote(&self) -> bool {
        (**self).is_remote()
    }
}

/// The boxed future of a lock or idempotency store operation.
pub type StoreFuture<T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// A store of leases with fencing tokens: the safe distributed lock.
///
/// Only the holder of the random token can extend or release a lock (compare-and-extend,
/// compare-and-delete), so a slow holder whose lease ran out cannot release the next holder's
/// lock. Each acquisition returns a fencing token that grows per resource; storage guarded by the
/// lock should reject writes that carry an older token. The per-resource fence counter is kept
/// without expiry (a few bytes per resource ever locked).
pub trait LockStore: Send + Sync + 'static {
    /// Takes the lock on `resource` for `lease` if it is free (`SET NX PX`). Returns the fencing
    /// token, or `None` when someone holds it.
    fn acquire_lock(
        &self,
        resource: &StoreKey,
        token: &str,
        lease: Duration,
    ) -> StoreFuture<Option<u64>>;

    /// Extends the lease if `token` still holds the lock; `false` when it does not.
    fn extend_lock(&self, resource: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool>;

    /// Releases the lock if `token` still holds it; `false` (and nothing changes) otherwise.
    fn release_lock(&self, resource: &StoreKey, token: &str) -> StoreFuture<bool>;
}

/// What a claim of an idempotency record found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// The record was free: the caller holds it now, with this fencing token.
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
pub struct ClaimRequest<'a> {
    /// Random token of the claimant.
    pub token: &'a str,
    /// Fingerprint of the request (SHA-256 of the body).
    pub fingerprint: &'a [u8],
    /// Lease of the in-flight claim; renewed while the request runs.
    pub lease: Duration,
    /// How long completed records are kept (the fence counter lives as long).
    pub retention: Duration,
}

/// A store of idempotency records: absent, then in flight (a lease with a token), then
/// completed (the stored response).
///
/// Every operation is atomic; `complete`, `extend_claim` and `release_claim` act only while the
/// token still holds the in-flight claim, so a request whose lease was lost stores nothing.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims the record `key`, or reports what holds it.
    fn claim(&self, key: &StoreKey, request: ClaimRequest<'_>) -> StoreFuture<Claim>;

    /// Stores `response` and keeps the record for `retention`, if `token` still holds the claim.
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

impl<T: LockStore> LockStore for std::sync::Arc<T> {
    fn acquire_lock(&self, r: &StoreKey, t: &str, l: Duration) -> StoreFuture<Option<u64>> {
        (**self).acquire_lock(r, t, l)
    }
    fn extend_lock(&self, r: &StoreKey, t: &str, l: Duration) -> StoreFuture<bool> {
        (**self).extend_lock(r, t, l)
    }
    fn release_lock(&self, r: &StoreKey, t: &str) -> StoreFuture<bool> {
        (**self).release_lock(r, t)
    }
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
