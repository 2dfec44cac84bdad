//! Tower and axum middleware that keeps its state in a store shared by every replica of a
//! service (Redis in production, memory in one process), so that rate limits, cached responses
//! and "exactly once" request handling hold behind a load balancer.
//!
//! # Layers, and the lock
//!
//! - [`RateLimitLayer`](rate_limit::RateLimitLayer): fixed window, sliding window (exact log and
//!   approximate counter), token bucket, GCRA and calendar quotas (per day, ISO week or month,
//!   in a fixed UTC offset); several rules per route checked in one atomic
//!   call; `429` with `Retry-After` and the IETF `RateLimit` / `RateLimit-Policy` fields.
//!   Also: metered costs settled after the response (token budgets), named policies chosen per
//!   request and changed at runtime, quota administration (read, reset, block, allow), keys
//!   grouped by network behind trusted proxies, and leased quotas for hot keys.
//! - [`ThrottleLayer`](throttle::ThrottleLayer): the same limits for the calls a service makes
//!   (a client of a third-party API): a request waits until the limit lets it through, up to a
//!   maximum wait, then fails with a typed error.
//! - [`CacheLayer`](cache::CacheLayer): a response cache shared by every replica, safe by default
//!   for a shared cache (RFC 9111), with O(1) segment invalidation and three kinds of stampede
//!   protection (fill lock, early recompute, stale serving).
//! - [`IdempotencyLockLayer`](idempotency::IdempotencyLockLayer): `Idempotency-Key` handling
//!   (draft-ietf-httpapi-idempotency-key-header): one execution per key, its response replayed
//!   to duplicates, `409` while it runs, `422` for the same key with another body.
//! - [`Lock`](lock::Lock): the safe distributed lock underneath the idempotency layer (random
//!   token, compare-and-delete release, renewal while held, fencing tokens), usable on its own.
//!
//! Every layer is a [`tower_layer::Layer`]: it works with axum (`Router::layer`,
//! `route_layer`, `MethodRouter::layer`), with `tower::ServiceBuilder`, and with plain hyper.
//!
//! # Stores
//!
//! | store | feature | |
//! |---|---|---|
//! | [`MemoryStore`](store::MemoryStore) | always | in one process; needs no server (tests, a single instance) |
//! | `RedisStore` | `redis` (default) | redis-rs, standalone or Redis Cluster |
//! | `FredStore` | `fred` | fred, standalone or Redis Cluster |
//!
//! Every Redis operation is one Lua script call (one round trip, atomic, with the time read from
//! the Redis server), with every key of a call in one hash slot so that Redis Cluster works.
//! Both Redis stores run the same scripts and share state.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redis` | yes | `store::RedisStore`, on [redis-rs](https://docs.rs/redis) |
//! | `fred` | no | `store::FredStore`, on [fred](https://docs.rs/fred) |
//! | `tls` | no | `rediss://` URLs on the Redis stores (rustls with `ring`; `store::ConnectOptions` trusts a CA of your own) |
//! | `axum` | yes | `KeyExtractor::peer_ip()` reads axum's `ConnectInfo<SocketAddr>` (and `MockConnectInfo`) |
//! | `metrics` | no | counters and histograms through the [`metrics`](https://docs.rs/metrics) facade |
//! | `test-support` | no | the `conformance` module: the suites a store of your own must pass |
//!
//! Without `axum`, `peer_ip()` reads a `SocketAddr` from the request extensions (the hyper
//! example inserts it).
//!
//! # Quickstart (axum)
//!
//! ```no_run
//! use std::{net::SocketAddr, time::Duration};
//! use axum::{routing::get, Router};
//! use tower_redis_layers::store::MemoryStore;
//! use tower_redis_layers::rate_limit::{KeyExtractor, Policy, RateLimitLayer, Rule};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = MemoryStore::new(); // or RedisStore::connect("redis://127.0.0.1:6379").await?
//! let policy = Policy::new("hello", Rule::fixed_window(5, Duration::from_secs(10)));
//! let limit = RateLimitLayer::new(store, policy)
//!     .key(KeyExtractor::header("x-api-key").or(KeyExtractor::peer_ip()));
//!
//! let app = Router::new().route("/", get(|| async { "hello" })).layer(limit);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! // ConnectInfo gives the layer the peer address; in-flight requests finish on shutdown.
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
//!     .with_graceful_shutdown(shutdown_signal())
//!     .await?;
//! # Ok(()) }
//!
//! /// Ctrl-C (SIGINT), or SIGTERM as sent by Docker, Kubernetes and systemd.
//! async fn shutdown_signal() {
//!     let ctrl_c = async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     };
//!     #[cfg(unix)]
//!     let terminate = async {
//!         use tokio::signal::unix::{signal, SignalKind};
//!         match signal(SignalKind::terminate()) {
//!             Ok(mut sigterm) => {
//!                 sigterm.recv().await;
//!             }
//!             Err(_) => std::future::pending().await,
//!         }
//!     };
//!     #[cfg(not(unix))]
//!     let terminate = std::future::pending::<()>();
//!     tokio::select! {
//!         _ = ctrl_c => {}
//!         _ = terminate => {}
//!     }
//! }
//! ```
//!
//! The crate's examples (`examples/demo.rs` with every layer, `examples/axum.rs`,
//! `examples/hyper.rs`) are described in the README.
//!
//! # When the store is slow or down
//!
//! Every store call of every layer and of the lock is bounded by a timeout, set with
//! `.store_timeout(d)`. What a layer then does with the request is set with
//! `.on_store_error(mode)` ([`FailureMode`]); either way a `tracing` warning is logged. The
//! rate limiter's default is neither mode but its
//! [local fallback](rate_limit::LocalFallback): the same rules enforced in process, each quota
//! divided among the configured replicas, so that during an outage at most
//! `limit × replicas running / replicas configured` requests per window are admitted.
//!
//! Each Redis store has a [circuit breaker](store::CircuitBreaker), on by default and shared by
//! every layer on that store: after 5 failed calls in a row it opens, and every call fails at
//! once ([`StoreError::CircuitOpen`]) instead of waiting for the store timeout, so each layer
//! answers from its fallback in microseconds. Every 250 ms a probe goes to Redis in the
//! background; its success closes the breaker, with nothing to restart.
//!
//! | | store timeout | on store error (default) | `FailureMode::Open` | `FailureMode::Closed` |
//! |---|---|---|---|---|
//! | rate limit | 250 ms | local fallback | the request goes through, not limited | `503` with `Retry-After: 1` |
//! | cache | 250 ms | `Open` | the request goes to the inner service; nothing is served from or stored in the cache | `503` with `Retry-After: 1` |
//! | idempotency | 1 s | `Closed` | the handler runs without protection | `503` with `Retry-After: 1`; the handler does not run |
//! | [`Lock`](lock::Lock) | 1 s | (not a layer) | | every call returns the [`StoreError`] (`StoreError::Timeout` on a timeout) |
//!
//! A `503` from a layer is `application/problem+json`, like its other rejections. With the
//! cache's default (`Open`) a response never fails because the cache did: a failed lookup is a
//! miss, and a failed store of a fresh response is logged and dropped.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    rust_2018_idioms,
    unreachable_pub,
    missing_debug_implementations
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

mod body;
pub mod cache;
#[cfg(feature = "test-support")]
pub mod conformance;
pub mod idempotency;
mod key;
pub mod lock;
mod problem;
pub mod rate_limit;
pub mod store;
pub mod throttle;

pub use body::{BodyKind, InnerBody, ResponseBody, Wrapped};
pub use key::StoreKey;
pub use store::{FailureMode, StoreError};

/// The README's code blocks, compiled as doctests (those marked `ignore` are fragments).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
