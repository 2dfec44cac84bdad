//! `Idempotency-Key` handling (draft-ietf-httpapi-idempotency-key-header) on top of the safe
//! lock: one execution per key, its response replayed to duplicates.
//!
//! For each `POST` or `PATCH` with an `Idempotency-Key`, the layer reads the body (up to
//! [`max_body`](IdempotencyLockLayer::max_body), `413` above it), fingerprints it (SHA-256),
//! and claims a record named by the layer's [scope](IdempotencyLockLayer::scope), the request's
//! [partition](IdempotencyLockLayer::partition) (if any), the method, the path and the key.
//! Each step is one store call:
//!
//! - **claimed**: the handler runs under a lease renewed every third of its length; its
//!   response (status, end-to-end headers, body up to the cap) is stored for the retention time,
//!   only if this request still holds the claim. By default a 5xx response is not stored: the
//!   claim is released so the client may retry. The fencing token of the claim is in the
//!   request's extensions as [`FencingToken`].
//! - **in flight**: a duplicate gets `409 Conflict` with `Retry-After` set to the time left on
//!   the running request's lease, rounded up to whole seconds (or waits for the
//!   result, with [`in_flight_wait`](IdempotencyLockLayer::in_flight_wait)).
//! - **completed**: a duplicate gets the stored response, with `Idempotent-Replayed: true`.
//! - **another body**: `422 Unprocessable Content`.
//!
//! A key that is empty, longer than 255 characters or not visible ASCII gets `400`; so does a
//! missing key when it is [`required`](IdempotencyLockLayer::required). The responses the layer
//! sends itself are `application/problem+json`, or what
//! [`rejection`](IdempotencyLockLayer::rejection) builds for each [`Rejection`].
//!
//! A response is passed on whole. It is stored for replay when its body is read whole within
//! `max_body` and has no trailers. A larger response, or one that ends with trailers, is
//! recorded as done without its body: a duplicate gets `409` ([`Rejection::NotReplayable`])
//! rather than running the request again. The handler gets the request body read into
//! memory, without request trailers.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{body::Body, routing::post, Extension, Router};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_redis_layers::idempotency::{FencingToken, IdempotencyLockLayer};
//! use tower_redis_layers::store::MemoryStore;
//!
//! async fn create_order(Extension(fence): Extension<FencingToken>, body: String) -> (StatusCode, String) {
//!     (StatusCode::CREATED, format!("order made under fence {fence}: {body}"))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A `RedisStore` or `FredStore` shares the records between replicas.
//! let layer = IdempotencyLockLayer::new(MemoryStore::new())
//!     .lease(Duration::from_secs(10))
//!     .retention(Duration::from_secs(24 * 3600));
//! let app = Router::new().route("/orders", post(create_order)).layer(layer);
//!
//! let order = || {
//!     Request::post("/orders")
//!         .header("idempotency-key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
//!         .body(Body::from("one book"))
//!         .unwrap()
//! };
//! let first = app.clone().oneshot(order()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::CREATED);
//! // The retry does not run the handler again: it gets the stored response.
//! let retry = app.oneshot(order()).await.unwrap();
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! # }
//! ```
//!
//! # Failure behaviour
//!
//! Every store call (claiming, renewing the lease, storing the response, releasing the claim)
//! is bounded by the [store timeout](IdempotencyLockLayer::store_timeout) (default 1 s).
//!
//! - **Claiming fails** or times out: by default ([`FailureMode::Closed`](crate::FailureMode))
//!   the layer answers `503` with `Retry-After: 1` and does not run the request unprotected;
//!   with [`on_store_error(FailureMode::Open)`](IdempotencyLockLayer::on_store_error) it runs
//!   the request without protection. A warning is logged either way. Since the claim may have
//!   reached the store (only its answer was lost), the layer releases it in the background
//!   with the request's token as soon as the store answers again, so the key is not blocked
//!   for a whole lease.
//! - **The client goes away** (the response future is dropped: the client hung up, a proxy
//!   timed out) while the claim is on the way: the claim, if it landed, is released in the
//!   background as soon as the store answers, as above. Once the request holds the claim, the
//!   handler is not cancelled. It runs to its
//!   end in a spawned task and its response is recorded, so the retry gets the replay instead of
//!   running the handler a second time.
//! - **The handler fails or panics**: the claim is released in the background, so the client
//!   may retry (a panic is passed on to the caller).
//! - **Renewing the lease fails** or times out: it is retried within the lease (after 50 ms,
//!   then twice as long each time). The claim counts as lost only when the store answers that
//!   the request's token no longer holds it (then the response is not stored: another request
//!   may have claimed the record).
//! - **Storing the response fails** or times out: the client gets its response without waiting
//!   longer than the store timeout, and a warning is logged. The claim stays in flight (its lease
//!   renewed, duplicates get `409`) while the layer retries storing the response in the
//!   background, with backoff (100 ms doubling up to 5 s), until it lands, until the store answers
//!   that the token no longer holds the claim, or until the retention period has passed. The
//!   handler does not run a second time meanwhile. (A process that exits before then leaves the
//!   record to expire with its lease.)
//! - **Releasing the claim fails**: a warning is logged; the in-flight record expires with its
//!   lease, after which the request may run again.
//!
//! Redis is not durable by default: keeping records across a Redis restart needs AOF
//! (`appendonly yes`, `appendfsync everysec` at least; then a crash of the Redis process loses
//! no acknowledged record, a crash of the machine the last second or two), and every eviction
//! policy but `noeviction` can drop records (they all have a TTL). The crate's README says what
//! each setting guarantees.

mod claim;
mod complete;
mod config;
mod execute;
mod future;
mod layer;
mod record;
mod rejection;
mod request;
mod service;

pub use self::{
    execute::FencingToken, future::ResponseFuture, layer::IdempotencyLockLayer,
    rejection::Rejection, service::IdempotencyLock,
};
pub use crate::ResponseBody;

/// The `tracing` target of the layer's events.
const TARGET: &str = "tower_redis_layers::idempotency";
