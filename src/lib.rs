//! Tower and axum middleware that keeps its state in Redis, so that limits hold across every
//! replica of a service behind a load balancer.
//!
//! - [`RateLimitLayer`](rate_limit::RateLimitLayer): fixed window, sliding window (exact log and
//!   approximate counter), token bucket and GCRA; several rules per route checked in one atomic
//!   call; `429` with `Retry-After` and the IETF `RateLimit` / `RateLimit-Policy` fields.
//! - [`CacheLayer`](cache::CacheLayer): a response cache shared by every replica, safe by default
//!   for a shared cache (RFC 9111), with O(1) segment invalidation and three kinds of stampede
//!   protection (fill lock, early recompute, stale serving).
//!
//! State lives in a store: [`MemoryStore`](store::MemoryStore) (in process, the default
//! that needs no server), [`RedisStore`](store::RedisStore) (redis-rs, feature `redis`, on by
//! default) and [`FredStore`](store::FredStore) (feature `fred`). Every Redis operation is one
//! Lua script call (one round trip, atomic, time read from the Redis server), with every key of a
//! call in one hash slot so that Redis Cluster works.
//!
//! # Quickstart (axum)
//!
//! ```no_run
//! use std::{net::SocketAddr, time::Duration};
//! use axum::{routing::get, Router};
//! use tower_redis_layers::{store::MemoryStore, rate_limit::{KeyExtractor, RateLimitLayer, Rule}};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = MemoryStore::new();
//! let limit = RateLimitLayer::new(store, Rule::fixed_window(5, Duration::from_secs(10)))
//!     .key(KeyExtractor::header("x-api-key").or(KeyExtractor::peer_ip()));
//!
//! let app = Router::new().route("/", get(|| async { "hello" })).layer(limit);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(()) }
//! ```
//!
//! # Failure behaviour
//!
//! Every store call has a timeout (see
//! [`RateLimitLayer::store_timeout`](rate_limit::RateLimitLayer::store_timeout)). When it fails
//! or times out the rate limiter fails open by default (the request goes through and a warning
//! is logged), or closed (`503 Service Unavailable`) when configured so.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    rust_2018_idioms,
    unreachable_pub,
    missing_debug_implementations
)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

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
mod time;

pub use body::ResponseBody;
pub use key::StoreKey;
pub use store::{FailureMode, StoreError};
