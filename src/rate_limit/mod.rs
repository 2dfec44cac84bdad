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
//! `into_make_service_with_connect_info::<SocketAddr>()` for the peer IP. With
//! [`inner_body`](RateLimitLayer::inner_body) the layer answers with axum's own `Body`, which
//! the router passes on without boxing it again. For a plain hyper or
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
//! | [`Rule::calendar`] | one counter | per period | a day, ISO week or month in a fixed UTC offset; up to 2x the limit across a boundary |
//!
//! # Calendar quotas
//!
//! [`Rule::calendar`] counts per calendar period: "1,000 per day" starts again at midnight,
//! "50,000 per month" on the 1st ([`Calendar`]: days, ISO weeks from Monday 00:00, months of
//! 28 to 31 days with leap years), in UTC or a fixed [`UtcOffset`] (no time zones, so no
//! daylight saving time). The period is read from the store's clock (the Redis server's `TIME`).
//! `Retry-After` and `t` count the seconds to the next boundary; `RateLimit-Policy`'s `w` is
//! the nominal length of the period (a month is 30 days). See [`Strategy::Calendar`].
//!
//! ```
//! use tower_redis_layers::rate_limit::{Calendar, Policy, Rule, UtcOffset};
//!
//! // 1,000 a day from midnight to midnight in California (UTC-08:00, all year).
//! let daily = Rule::calendar(1_000, Calendar::Day).utc_offset(UtcOffset::hours(-8));
//! let policy = Policy::new("daily", daily);
//! # let _ = policy;
//! ```
//!
//! # Where the counters live
//!
//! A request's counters are named by the layer's [scope](RateLimitLayer::scope) (default: none),
//! the policy's [scope](Policy::scope) (default: the policy's [name](Policy::new), and for a
//! route also its method and path), the request's [key](RateLimitLayer::key) (hashed: no
//! request text reaches the store) and the rule with its numbers. So each policy counts on its
//! own: two programs whose policies have identical rules but different names do not share a
//! budget on one Redis. Replicas of a service share their counters because their policies have
//! the same names; policies that must share one budget across routes, layers or programs say so
//! with the same [`Policy::scope`].
//!
//! # Keys
//!
//! The default key is the peer IP address, grouped by network (IPv6 by `/64`) so that a client
//! cannot rotate through its allocation. Behind a load balancer the peer is the proxy: key on
//! the client address that the proxies you [trust](Trusted) wrote, with
//! [`KeyExtractor::forwarded_for`] (`X-Forwarded-For`) or [`KeyExtractor::forwarded`] (RFC 7239
//! `Forwarded`). A header is only a key once a layer in front has authenticated it: a client
//! that invents a new value per request has a fresh budget each. See [`KeyExtractor`].
//!
//! # Limits chosen at runtime
//!
//! With a [`resolver`](RateLimitLayer::resolver), the policy of each request is chosen from
//! the request, among named policies added with [`policy`](RateLimitLayer::policy): for
//! example by the customer's tier, which an authentication layer in front put in the
//! extensions. The layer's [`PolicySet`] ([`RateLimitLayer::policies`]) changes them while the
//! service runs (a tier's quota raised, a configuration reloaded) with no new layer.
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use http::{Request, Response, StatusCode};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_redis_layers::store::MemoryStore;
//! use tower_redis_layers::rate_limit::{KeyExtractor, Policy, RateLimitLayer, Rule};
//!
//! /// What the authentication layer found out about the customer.
//! #[derive(Clone, Copy)]
//! enum Tier { Free, Pro }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let minute = Duration::from_secs(60);
//! let day = Duration::from_secs(86_400);
//! let free = |per_minute| {
//!     Policy::new("free", Rule::fixed_window(per_minute, minute).name("per-minute"))
//!         .rule(Rule::fixed_window(1_000, day).name("per-day"))
//! };
//! // "free" is the default: the policy of a request the resolver names no policy for.
//! let layer = RateLimitLayer::new(MemoryStore::new(), free(2))
//!     .policy(Policy::new("pro", Rule::fixed_window(100, minute)))
//!     .resolver(|parts| match parts.extensions.get::<Tier>()? {
//!         Tier::Free => Some("free"),
//!         Tier::Pro => Some("pro"),
//!     })
//!     .key(KeyExtractor::header("x-api-key"));
//! let policies = layer.policies();
//!
//! let svc = ServiceBuilder::new()
//!     .map_request(|mut req: Request<String>| {
//!         // The authentication layer (here: any key but "k-pro" is on the free tier).
//!         let tier = if req.headers()["x-api-key"] == "k-pro" { Tier::Pro } else { Tier::Free };
//!         req.extensions_mut().insert(tier);
//!         req
//!     })
//!     .layer(layer)
//!     .service(service_fn(|_req: Request<String>| async {
//!         Ok::<_, Infallible>(Response::new(String::from("hi")))
//!     }));
//! let status = |key: &'static str| {
//!     let req = Request::builder().header("x-api-key", key).body(String::new()).unwrap();
//!     let svc = svc.clone();
//!     async move { svc.oneshot(req).await.unwrap().status() }
//! };
//! assert_eq!(status("k-free").await, StatusCode::OK);
//! assert_eq!(status("k-free").await, StatusCode::OK);
//! assert_eq!(status("k-free").await, StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(status("k-pro").await, StatusCode::OK);
//!
//! // The free tier gets 5 a minute, from the next request on: the changed rule starts
//! // afresh, the unchanged "per-day" rule keeps its count (2 of 1,000 used).
//! policies.insert(free(5)).unwrap();
//! assert_eq!(status("k-free").await, StatusCode::OK);
//! # }
//! ```
//!
//! - **Which policy.** A [route](RateLimitLayer::route) that matches comes first. Else the
//!   resolver names the policy; a request it names none for (`None`), or a policy the layer
//!   does not have (logged as a warning, at most every 10 s), gets the layer's default policy,
//!   the one given to [`RateLimitLayer::new`]; a [`routed`](RateLimitLayer::routed) layer has none, and lets
//!   such a request pass unlimited, as it does a request that matches no route. So build the
//!   layer with `new` and the most restrictive tier when every request must be limited.
//! - **Counters.** Each named policy counts on its own (its name is in its counters' names,
//!   unless it has a [scope](Policy::scope)): a customer who moves to another tier counts
//!   under that tier's counters. Replacing a policy keeps the counters of each rule whose
//!   numbers did not change and starts afresh each rule whose numbers changed (see
//!   [`PolicySet`]).
//! - **Cost.** A policy is compiled (fields, local fallback rules, validation) when it is
//!   added, never per request; a request reads the current policies without a lock
//!   (`arc-swap`) and looks the name up in a hash map. A decision is still one store call (one
//!   script call on Redis), two with a [settlement](Settlement).
//! - **Requests under way** keep the policy they were checked with: their metered settlement
//!   goes to the same counters, whatever changed in between.
//! - **Deny cache.** Its denials are remembered per policy as compiled: neither another tier's
//!   denial nor one of the policy before a change is ever served for a request.
//! - **Replicas.** A [`PolicySet`] is this process's: apply a change on every replica (each
//!   reloading its configuration, say).
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
//! # Metered costs
//!
//! Some budgets are counted in units known only once the handler ran: tokens an LLM generated,
//! bytes sent, rows scanned. With a [`Settlement`], the layer admits a request if its estimate
//! (the [`cost`](RateLimitLayer::cost), default 1) fits and takes it, then settles with the
//! actual cost that the response reports (an [`ActualCost`] extension set by the handler, or a
//! [header](Settlement::header)): the difference is charged or refunded in one more store call,
//! sent in the background so the response does not wait for it. So a metered request is two
//! store calls (one script call each on Redis), one when the actual cost equals the estimate.
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use http::{Request, Response, StatusCode};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_redis_layers::store::MemoryStore;
//! use tower_redis_layers::rate_limit::{
//!     ActualCost, KeyExtractor, Policy, RateLimitLayer, Rule, Settlement,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // 10,000 tokens per minute; a request is admitted if its estimate of 500 fits.
//! let budget = Policy::new("tokens", Rule::fixed_window(10_000, Duration::from_secs(60)));
//! let layer = RateLimitLayer::new(MemoryStore::new(), budget)
//!     .key(KeyExtractor::global())
//!     .cost(|_| 500)
//!     .settlement(Settlement::extension());
//! let svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|_req: Request<String>| async {
//!         let tokens = 120; // known once the work is done
//!         let mut response = Response::new(format!(r#"{{"tokens":{tokens}}}"#));
//!         response.extensions_mut().insert(ActualCost(tokens));
//!         Ok::<_, Infallible>(response)
//!     }));
//! let res = svc.oneshot(Request::new(String::new())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK); // 120 charged, not 500
//! # }
//! ```
//!
//! - **Estimates.** Only the estimate must fit. A settlement is never denied: a request that
//!   costs more than was left pushes its key past the limit, and later requests wait until the
//!   debt is paid back (the window's end for a fixed window, the refill for a token bucket or
//!   GCRA). A generous estimate keeps the overshoot small; a tight one lets more requests in.
//! - **No actual cost.** An error of the inner service, or a response future dropped before the
//!   response (the client went away), refunds the estimate. A response that reports no actual
//!   cost keeps the estimate.
//! - **Strategies.** Fixed window, calendar, token bucket and GCRA rules settle, all the rules
//!   of a policy in one script call, on the same keys as the check. A policy with a sliding log or sliding
//!   window rule is invalid in a metered layer (their state is a log or a weighted estimate that
//!   a later correction cannot apply to exactly): it is logged as an error and handled by the
//!   failure mode, like every invalid policy.
//! - **A settlement after its window.** A fixed window's settlement that arrives after the
//!   window the estimate was taken in has ended changes nothing: the old request is not charged
//!   to the fresh window, and the fresh window is not refunded units it never gave. (The layer
//!   tells windows apart by the time since the check answered; within one round trip of a
//!   window's edge a settlement may go to either side.) A bucket or a GCRA key has no windows:
//!   its settlement applies to its state now, never above its capacity.
//! - **Fields.** The `RateLimit` fields of a metered response report the state after the
//!   estimate was taken, before the settlement.
//! - **No deny cache.** A metered layer asks the store for every request, denied ones too: a
//!   refund may make room before a denial's `Retry-After` is up, so the local deny cache, which
//!   would repeat the denial until then, is off.
//! - **When the store fails.** A settlement is bounded by the
//!   [store timeout](RateLimitLayer::store_timeout) and goes through the store's circuit
//!   breaker; if it fails it is logged (and counted with feature `metrics`, in
//!   `tower_redis_layers_rate_limit_settlements_total` by outcome) and the estimate stands; the
//!   client never sees it. A request that the [local fallback](LocalFallback) admitted is
//!   settled in the fallback's counts. A settlement is applied at most once, even when the
//!   connection breaks after Redis ran it and the client sends it again: each carries its own
//!   key, which the script sets first (see "When a reply is lost" in the README).
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
mod head;
mod headers;
mod key;
mod layer;
mod lease;
mod policy;
mod resolver;
mod service;
mod settle;

pub(crate) use self::policy::CompiledPolicy;
pub use self::{
    fallback::LocalFallback,
    forwarded::{InvalidRange, Trusted},
    future::ResponseFuture,
    handle::{KeyQuota, RateKey, RateLimitHandle, RuleQuota},
    headers::Headers,
    key::KeyExtractor,
    layer::{MissingKey, RateLimitLayer, Rejection},
    lease::{Lease, LeaseStats, Leased},
    policy::Policy,
    resolver::{InvalidPolicy, PolicySet},
    service::RateLimit,
    settle::{ActualCost, Settlement},
};
pub use crate::{
    store::{Calendar, FailureMode, InvalidUtcOffset, Rule, Strategy, UtcOffset},
    BodyKind, InnerBody, ResponseBody, Wrapped,
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
