//! Rate limiting that holds across replicas.
//!
//! A [`RateLimitLayer`] checks each request against a [`Policy`] of one or more [`Rule`]s in one
//! atomic store call, keyed by a [`KeyExtractor`] (peer IP by default). A denied request gets
//! `429 Too Many Requests` with `Retry-After` and the IETF `RateLimit` / `RateLimit-Policy`
//! fields; the inner service is not called.
//!
//! # Choosing a strategy
//!
//! | strategy | state per key | exact? | notes |
//! |---|---|---|---|
//! | [`Rule::fixed_window`] | one counter | per window | cheapest; up to 2x the limit across a window edge |
//! | [`Rule::sliding_log`] | one entry per admitted unit | yes | memory grows with the limit |
//! | [`Rule::sliding_window`] | two counters | approximate | O(1); see [`Strategy::SlidingWindow`] for the bound |
//! | [`Rule::token_bucket`] | tokens + time | yes | bursts up to the capacity, steady refill |
//! | [`Rule::gcra`] | one timestamp | yes | same admissions as a token bucket, cheapest exact one |
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use http::HeaderName;
//! use tower_redis_layers::store::MemoryStore;
//! use tower_redis_layers::rate_limit::{KeyExtractor, Policy, RateLimitLayer, Rule};
//!
//! let store = MemoryStore::new();
//! // 10 per second AND 1000 per hour, per API key (else per peer IP).
//! let policy = Policy::new(Rule::gcra(10, Duration::from_secs(1), 10))
//!     .rule(Rule::fixed_window(1000, Duration::from_secs(3600)));
//! let layer = RateLimitLayer::new(store, policy)
//!     .key(KeyExtractor::header(HeaderName::from_static("x-api-key")).or(KeyExtractor::peer_ip()))
//!     .timeout(Duration::from_millis(100));
//!
//! let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(layer);
//! ```
//!
//! Per route in axum, use `.route_layer(...)` or `get(handler).layer(...)`; for a plain hyper
//! service, one [`RateLimitLayer::routed`] layer holds several policies matched on method and
//! path.
//!
//! # When the store fails
//!
//! Every store call has a timeout ([`RateLimitLayer::timeout`], default 250 ms). On an error or
//! a timeout the layer logs a warning and, by default, lets the request through
//! ([`FailureMode::Open`]); with [`FailureMode::Closed`] it answers `503` with `Retry-After: 1`.
//! Nothing is cached about the failure: the next request asks the store again, so the layer
//! recovers by itself when Redis comes back.

mod deny_cache;
mod future;
mod headers;
mod key;
mod layer;
mod service;

pub use self::{
    future::ResponseFuture,
    headers::Headers,
    key::KeyExtractor,
    layer::{MissingKey, Policy, RateLimitLayer, Rejection},
    service::RateLimit,
};
pub use crate::{
    store::{FailureMode, Rule, Strategy},
    ResponseBody,
};

#[cfg(test)]
pub(crate) fn default_rejection_bodies() -> [(http::StatusCode, &'static str, &'static str); 3] {
    service::DEFAULT_BODIES
}
