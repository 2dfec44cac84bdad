//! `Idempotency-Key` handling (draft-ietf-httpapi-idempotency-key-header) on top of the safe
//! lock: one execution per key, its response replayed to duplicates.
//!
//! For each `POST` or `PATCH` with an `Idempotency-Key`, the layer reads the body (up to a cap,
//! `413` above it), fingerprints it (SHA-256), and claims a record scoped by method, path and an
//! optional scope. Each step is one store call:
//!
//! - **claimed**: the handler runs under a lease renewed every third of its length; its
//!   response (status, end-to-end headers, body up to the cap) is stored for the retention time,
//!   only if this request still holds the claim. By default a 5xx response is not stored: the
//!   claim is released so the client may retry. The fencing token of the claim is in the
//!   request's extensions as [`FencingToken`].
//! - **in flight**: a duplicate gets `409 Conflict` with `Retry-After` (or waits for the result,
//!   with [`IdempotencyLockLayer::in_flight_wait`]).
//! - **completed**: a duplicate gets the stored response, with `Idempotent-Replayed: true`.
//! - **another body**: `422 Unprocessable Content`.
//!
//! A key that is empty, longer than 255 characters or not visible ASCII gets `400`; so does a
//! missing key when it is [`required`](IdempotencyLockLayer::required). Error bodies are
//! `application/problem+json`. If the handler fails, panics, or its future is dropped (the
//! client went away), the claim is released. When the store is slow or down the layer answers
//! `503` with `Retry-After` and does not run the request unprotected, unless
//! [`fail_open`](IdempotencyLockLayer::fail_open) says so.
//!
//! Redis is not durable by default: keeping records across a Redis restart needs AOF
//! (`appendonly yes`, `appendfsync everysec` at least), and an `allkeys-*` eviction policy can
//! drop records; use `noeviction` or a `volatile-*` policy.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::post, Router, Extension};
//! use tower_redis_layers::store::MemoryStore;
//! use tower_redis_layers::idempotency::{FencingToken, IdempotencyLockLayer};
//!
//! async fn create_order(Extension(fence): Extension<FencingToken>, body: String) -> String {
//!     format!("order made under fence {}: {body}", fence.0)
//! }
//!
//! let layer = IdempotencyLockLayer::new(MemoryStore::new())
//!     .lease(Duration::from_secs(10))
//!     .retention(Duration::from_secs(24 * 3600));
//! let app: Router = Router::new().route("/orders", post(create_order)).layer(layer);
//! ```

mod body;
mod future;
mod layer;
mod record;
mod service;

pub use self::{
    body::IdempotencyBody, future::ResponseFuture, layer::IdempotencyLockLayer,
    service::IdempotencyLock,
};

/// The fencing token of the claim a request runs under, in the request's extensions. It grows
/// with every claim of the same record: storage that remembers the highest token it saw can
/// reject a late write from a request whose claim was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);
