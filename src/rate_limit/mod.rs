//! Rate limiting that holds across replicas.
//!
//! A [`RateLimitLayer`] checks each request against a [`Policy`] of one or more [`Rule`]s in one
//! atomic store call, keyed by a [`KeyExtractor`] (peer IP by default). A denied request gets
//! `429 Too Many Requests` with `Retry-After` and the IETF `RateLimit` / `RateLimit-Policy`
//! fields; the inner service is not called.
//!
//! # Example
//!
//! ```
//! use std::{convert::Infallible, net::SocketAddr, time::Duration};
//! use http::{HeaderName, Request, Response, StatusCode};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_redis_layers::store::MemoryStore;
//! use tower_redis_layers::rate_limit::{KeyExtractor, Policy, RateLimitLayer, Rule};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // 2 per second AND 1000 per hour, per API key (else per peer IP).
//! let policy = Policy::new("api", Rule::gcra(2, Duration::from_secs(1), 2).name("per-second"))
//!     .rule(Rule::fixed_window(1000, Duration::from_secs(3600)).name("per-hour"));
//! let layer = RateLimitLayer::new(MemoryStore::new(), policy)
//!     .scope("api")
//!     .key(KeyExtractor::header(HeaderName::from_static("x-api-key")).or(KeyExtractor::peer_ip()))
//!     .store_timeout(Duration::from_millis(100));
//!
//! let svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|_req: Request<String>| async {
//!         Ok::<_, Infallible>(Response::new(String::from("hi")))
//!     }));
//! let request = || {
//!     Request::builder().header("x-api-key", "k1").body(String::new()).unwrap()
//! };
//! for _ in 0..2 {
//!     let res = svc.clone().oneshot(request()).await.unwrap();
//!     assert_eq!(res.status(), StatusCode::OK);
//! }
//! let res = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(res.headers()["retry-after"], "1");
//! assert_eq!(
//!     res.headers()["ratelimit"],
//!     r#""per-second";r=0;t=1, "per-hour";r=998;t=3600"#
//! );
//! # }
//! ```
//!
//! In axum, `Router::layer(...)` limits every route; per route, use `.route_layer(...)` or
//! `get(handler).layer(...)`, and serve with
//! `into_make_service_with_connect_info::<SocketAddr>()` for the peer IP. For a plain hyper or
//! tower service, one [`RateLimitLayer::routed`] layer holds several policies matched on method
//! and path.
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
//! # Where the counters live
//!
//! A request's counters are named by the layer's [scope](RateLimitLayer::scope) (default: none),
//! the policy's [scope](Policy::scope) (default: none, or a route's method and path), the
//! request's [key](RateLimitLayer::key) (hashed: no request text reaches the store) and the
//! rule. Layers and services with the same scopes and rules share their counters, which is how
//! the replicas of a service agree; give a layer its own scope when another layer or service
//! that uses the same store must not share its budget.
//!
//! # The `RateLimit` fields
//!
//! Rejections carry `Retry-After`, `RateLimit` and `RateLimit-Policy` (with
//! [`Headers::All`], every response does; [`RateLimitLayer::legacy_headers`] adds
//! `X-RateLimit-*`). For the rule that denied, `r=0`: nothing is left for a request of the same
//! cost, until `t` (the same time as `Retry-After`). Every other rule reports what it has left: a
//! denied request takes nothing from any rule. A `429` from the local deny cache reports the
//! denying rule only.
//!
//! # When the store fails
//!
//! Every call to a remote store is bounded by [`RateLimitLayer::store_timeout`] (default
//! 250 ms), and a Redis store's [circuit breaker](crate::store::CircuitBreaker) makes calls fail
//! at once after a run of failures. On an error or a timeout the layer logs a warning and, by
//! default, decides with its [`LocalFallback`]: the same rules, enforced in this process with a
//! [`MemoryStore`](crate::store::MemoryStore), each quota divided by the configured number of
//! replicas (rounded down). During an outage at most `limit × replicas / divisor` requests per
//! window are admitted (`limit` when the divisor is the real number of replicas), not every
//! request; such a decision takes microseconds while the breaker is open. When Redis answers
//! again its state decides at once: the local counts are not merged into it.
//!
//! ```
//! use std::time::Duration;
//! use tower_redis_layers::store::MemoryStore;
//! use tower_redis_layers::rate_limit::{LocalFallback, Policy, RateLimitLayer, Rule};
//!
//! // Three replicas share 300 per minute; during an outage each admits 100 per minute.
//! let policy = Policy::new("api", Rule::fixed_window(300, Duration::from_secs(60)));
//! let layer = RateLimitLayer::new(MemoryStore::new(), policy).local_fallback(LocalFallback::new(3));
//! # let _ = layer;
//! ```
//!
//! [`RateLimitLayer::on_store_error`] replaces the fallback: with [`FailureMode::Open`] a
//! request goes through without a limit; with [`FailureMode::Closed`] the layer answers
//! `503 Service Unavailable` with `Retry-After: 1` (problem details, or the
//! [rejection](RateLimitLayer::rejection) response). A policy with an invalid rule is handled
//! by that mode (default `Open`, and logged as an error). The layer recovers by itself when
//! Redis comes back.

mod decision;
mod deny_cache;
mod fallback;
mod forwarded;
mod future;
mod handle;
mod headers;
mod key;
mod layer;
mod policy;
mod service;

pub(crate) use self::policy::CompiledPolicy;
pub use self::{
    fallback::LocalFallback,
    forwarded::{InvalidRange, Trusted},
    future::ResponseFuture,
    handle::{KeyQuota, RateKey, RateLimitHandle, RuleQuota},
    headers::Headers,
    key::KeyExtractor,
    layer::{MissingKey, RateLimitLayer, Rejection},
    policy::Policy,
    service::RateLimit,
};
pub use crate::{
    store::{FailureMode, Rule, Strategy},
    ResponseBody,
};

#[cfg(test)]
mod tests {
    #[test]
    fn static_rejection_bodies_match_the_formatted_ones() {
        for (status, detail, body) in super::decision::DEFAULT_BODIES {
            let formatted = crate::problem::problem(status, detail).into_body();
            assert_eq!(
                formatted,
                bytes::Bytes::from_static(body.as_bytes()),
                "{status}"
            );
        }
    }
}
