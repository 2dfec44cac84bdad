//! Waiting instead of rejecting: a rate limit for the calls *you* make.
//!
//! Around a client service (calls to a third-party API that limits your account), a
//! [`ThrottleLayer`] delays each request until the limit lets it through, for at most a
//! [maximum wait](ThrottleLayer::max_wait), then fails with a typed [`ThrottleError`]. The
//! limit is a [`Policy`](crate::rate_limit::Policy) of [`Rule`](crate::rate_limit::Rule)s kept
//! in the same [`RateLimitStore`](crate::store::RateLimitStore) as the
//! [`RateLimitLayer`](crate::rate_limit::RateLimitLayer)'s, so every replica that calls the
//! API shares one budget: each replica's waiting requests ask the store, and the store decides.
//!
//! # Example
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use http::{Request, Response};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_redis_layers::{
//!     rate_limit::{Policy, Rule},
//!     store::MemoryStore,
//!     throttle::{ThrottleError, ThrottleLayer},
//! };
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // The API allows our account 2 calls per second; a call may wait up to 5 seconds for its turn.
//! let policy = Policy::new("partner-api", Rule::fixed_window(2, Duration::from_secs(1)));
//! let throttle = ThrottleLayer::new(MemoryStore::new(), policy)
//!     .max_wait(Duration::from_secs(5))
//!     .cost(|parts| if parts.uri.path() == "/batch" { 2 } else { 1 });
//! let client = ServiceBuilder::new().layer(throttle).service(service_fn(
//!     |req: Request<String>| async move { Ok::<_, Infallible>(Response::new(req.uri().to_string())) },
//! ));
//!
//! let started = tokio::time::Instant::now();
//! for _ in 0..4 {
//!     let response = client.clone().oneshot(Request::new(String::new())).await.unwrap();
//!     assert_eq!(response.into_body(), "/");
//! }
//! // The last two calls waited for the next window.
//! assert!(started.elapsed() >= Duration::from_secs(1));
//!
//! // A call that costs more than the quota would never pass: it fails at once.
//! let batch = Request::builder().uri("/batch").body(String::new()).unwrap();
//! let policy = Policy::new("small", Rule::fixed_window(1, Duration::from_secs(1)));
//! let small = ThrottleLayer::new(MemoryStore::new(), policy).cost(|_| 2);
//! let err = ServiceBuilder::new()
//!     .layer(small)
//!     .service(service_fn(|_: Request<String>| async { Ok::<_, Infallible>(Response::new(())) }))
//!     .oneshot(batch)
//!     .await
//!     .unwrap_err();
//! assert!(matches!(err, ThrottleError::OverQuota { cost: 2, quota: 1, .. }));
//! # }
//! ```
//!
//! # How a request waits
//!
//! Each try is one store call (one script call on Redis), of the same kind as the rate-limit
//! layer's check: admitted requests consume their cost there, atomically, on every replica's
//! behalf. A denied request is told how long until a request of its cost could pass; it sleeps
//! that long (plus up to [`jitter`](ThrottleLayer::jitter) more, 10% by default, so that
//! requests told the same time do not all come back at once) and asks again. When that answer
//! already lies beyond the maximum wait, the request fails at once with
//! [`ThrottleError::Timeout`] (it does not sleep first); no sleep goes past the deadline. A
//! request that costs more than a rule's quota fails at once with [`ThrottleError::OverQuota`].
//!
//! Store calls per request: one when the request passes at once, one more per wait. The order
//! in which waiting requests pass is not first-come-first-served: after a wait, whichever asks
//! first gets the freed quota (fair across replicas, since no replica has an advantage, but
//! a request can be overtaken until its maximum wait ends).
//!
//! # Readiness
//!
//! `poll_ready` only reports the inner service's readiness, and the wait happens after `call`,
//! in the response future. Unlike tower's `RateLimit` (which holds callers back in
//! `poll_ready`, is not `Clone`, and so is shared behind a `Buffer` where waiting requests
//! queue), a throttle is `Clone` and needs no buffer: each waiting request is its own future.
//! Two consequences: whatever the inner service reserved when it said it was ready (a permit
//! of a `ConcurrencyLimit` below the throttle, a pooled connection) is held for the whole wait;
//! and nothing bounds how many requests wait at once, so put a `ConcurrencyLimit` (or a
//! `LoadShed`) in front of the throttle if callers can outpace the limit for long. A `Timeout`
//! in front of the throttle counts the wait.
//!
//! # When the store fails
//!
//! Every call to a remote store is bounded by [`ThrottleLayer::store_timeout`] (default
//! 250 ms). On an error or a timeout, by default the request fails with
//! [`ThrottleError::Store`] and is not sent: the limit is the third party's, and going over it
//! can get an account suspended. With [`on_store_error(FailureMode::Open)`](ThrottleLayer::on_store_error)
//! it is sent at once, unthrottled. The error is logged either way.

mod error;
mod future;
mod layer;
mod service;

pub use self::{
    error::ThrottleError, future::ResponseFuture, layer::ThrottleLayer, service::Throttle,
};

const TARGET: &str = "tower_redis_layers::throttle";
