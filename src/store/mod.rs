//! Where the state lives: the store traits by concern, and their implementations.
//!
//! Each concern has one narrow trait at the level of the operation ("check these rules for this
//! key at cost N", "claim this record"), not a wrapper around Redis commands:
//!
//! | concern | trait | used by |
//! |---|---|---|
//! | rate limiting | [`RateLimitStore`] | [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) |
//! | response cache | [`CacheStore`] | [`CacheLayer`](crate::cache::CacheLayer) |
//! | locks | [`LockStore`] | [`Lock`](crate::lock::Lock) |
//! | idempotency records | [`IdempotencyStore`] | [`IdempotencyLockLayer`](crate::idempotency::IdempotencyLockLayer) |
//!
//! The crate ships three stores, each implementing every trait:
//!
//! | store | feature | notes |
//! |---|---|---|
//! | [`MemoryStore`] | always | in process, sharded, forgets expired keys on its own |
//! | [`RedisStore`] | `redis` (default) | redis-rs; standalone or cluster |
//! | [`FredStore`] | `fred` | fred; standalone or cluster |
//!
//! Both Redis stores are [`ScriptRunner`]s and share one implementation of every trait: each
//! operation is one `EVALSHA` of the same Lua text (sent with `EVAL` on `NOSCRIPT`), atomic, with
//! the time read from the Redis server and every key of a call in one hash slot.
//!
//! Every layer bounds each store call with its store timeout and does what its
//! [`FailureMode`] says when a call fails (see each layer's docs for its defaults). Each Redis
//! store has a [`CircuitBreaker`] (on by default), shared by every layer on it: after a run of
//! failures, calls fail at once with [`StoreError::CircuitOpen`] until a probe call succeeds,
//! so no request waits on a Redis that is away.
//!
//! To plug in a store of your own, implement the traits you need and run the conformance suites
//! against it (feature `test-support`, module `conformance`).

use std::{future::Future, time::Duration};

pub(crate) mod breaker;
mod cache;
mod call;
mod idempotency;
mod lock;
mod memory;
mod rate_limit;
#[cfg(any(feature = "redis", feature = "fred"))]
mod redis;

#[cfg_attr(not(any(feature = "redis", feature = "fred")), allow(unused_imports))]
pub(crate) use self::breaker::Breaker;
pub use self::breaker::CircuitBreaker;
pub(crate) use self::cache::VERSION_RETENTION;
pub use self::cache::{
    CacheStore, FillRequest, FillState, FillToken, Freshness, Lookup, LookupRequest,
    RefreshRequest, StoreOutcome, StoreRequest,
};
pub use self::call::FailureMode;
pub(crate) use self::call::{bounded, Bounded};
pub use self::idempotency::{Claim, ClaimRequest, IdempotencyStore};
pub use self::lock::LockStore;
#[cfg(feature = "test-support")]
pub(crate) use self::memory::calendar_period;
pub use self::memory::MemoryStore;
pub use self::rate_limit::{
    Calendar, Decision, InvalidUtcOffset, LeaseGrant, Override, RateCheck, RateLease,
    RateLeaseStore, RateLimitStore, RateSettlement, Rule, RuleState, RuleStates,
    RuleStatesIntoIter, Strategy, UtcOffset,
};
#[cfg(feature = "fred")]
pub use self::redis::FredStore;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;
#[cfg(all(any(feature = "redis", feature = "fred"), feature = "test-support"))]
#[doc(hidden)]
pub use self::redis::{calendar_period_script, calendar_spec};
#[cfg(any(feature = "redis", feature = "fred"))]
pub use self::redis::{rate_limit_script, ConnectOptions, ScriptRunner};

/// What a store answers when it could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The call did not finish in time.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store's [circuit breaker](CircuitBreaker) is open after a run of failed calls: the
    /// call was not sent. Retry after the duration (the time until the breaker lets a probe
    /// call through), or later.
    #[error(
        "the store is unavailable (its circuit breaker opened after repeated failures); retry \
         in {0:?} or later"
    )]
    CircuitOpen(Duration),
    /// The store could not be reached or reported an error.
    #[error("store error: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The Redis server refused this crate's commands when the store connected: no password or
    /// a wrong one (`NOAUTH`, `WRONGPASS`), or an ACL user without the scripting commands
    /// (`NOPERM`). The message is the server's.
    #[error(
        "the Redis server refused this crate's commands at connect: {0}; give the password in \
         the URL (redis://user:password@host:port) and let the user run EVAL, EVALSHA and \
         SCRIPT LOAD"
    )]
    Refused(String),
    /// The TLS handshake with a Redis server failed when the store connected to a `rediss://`
    /// URL: its certificate is not signed by a trusted CA (the system's roots, or the one given
    /// with [`ConnectOptions::ca_certificate`](crate::store::ConnectOptions)), does not name the
    /// host connected to, or the server does not speak TLS on that port. The message is the
    /// client's.
    #[error(
        "the TLS handshake with the Redis server failed at connect: {0}; check that the server's \
         certificate names the host in the URL and is signed by a CA the store trusts (the \
         system's roots, or ConnectOptions::ca_certificate)"
    )]
    Tls(String),
    /// The store answered something this crate does not understand (for example a script of
    /// another version under the same name).
    #[error("unexpected reply from the store: {0}")]
    Reply(String),
    /// The request cannot be expressed for this store (for example an invalid rule).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Part of the in-process store's state is unusable: a thread panicked while it held it.
    #[error(
        "the in-process store's state was poisoned by a thread that panicked while holding it"
    )]
    Poisoned,
}

impl StoreError {
    /// Wraps any error of a store.
    pub fn store(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Store(Box::new(err))
    }
}

/// The boxed future of a lock or idempotency store operation.
pub type StoreFuture<T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;
