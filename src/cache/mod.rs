//! A response cache in a store shared by every replica, safe by default for a shared cache and
//! protected against stampedes.
//!
//! A [`CacheLayer`] stores responses to `GET` (and serves `HEAD` from them), keyed by host, path,
//! query (parameters in a canonical order), the request headers named by the response's `Vary`,
//! and an optional [partition](CacheLayer::partition). Keys are hashed: a Redis key never holds
//! request text.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{body::Body, extract::Path, routing::{get, post}, Router};
//! use http::Request;
//! use tower::ServiceExt;
//! use tower_redis_layers::{cache::CacheLayer, store::MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = CacheLayer::new(MemoryStore::new())
//!     .scope("users")
//!     .ttl(Duration::from_secs(30))
//!     .stale_while_revalidate(Duration::from_secs(10))
//!     .stale_if_error(Duration::from_secs(300));
//! let handle = cache.handle();
//!
//! let app = Router::new()
//!     .route("/users/{id}", get(|Path(id): Path<u64>| async move { format!("user {id}") }).layer(cache))
//!     .route("/users/invalidate", post(move || async move {
//!         // One version bump per shard: every entry of the segment is gone at once.
//!         let _ = handle.invalidate().await;
//!     }));
//!
//! let user = || Request::get("/users/7").header("host", "example.com").body(Body::empty());
//! let first = app.clone().oneshot(user()?).await?;
//! assert_eq!(first.headers()["cache-status"], "tower-redis-layers; fwd=miss; stored");
//! let second = app.clone().oneshot(user()?).await?;
//! assert_eq!(second.headers()["cache-status"], "tower-redis-layers; hit");
//! # Ok(()) }
//! ```
//!
//! [`Cache::new`] wraps one service with the defaults, and [`Cache::layer`] is
//! [`CacheLayer::new`].
//!
//! # What is stored, and what is not
//!
//! - Freshness follows RFC 9111 section 4.2: `s-maxage`, else `max-age`, else `Expires` −
//!   `Date` (in any of the three HTTP date formats). A response with explicit freshness is stored
//!   whatever its final status (but `206` and `304`); one without is stored for
//!   [`CacheLayer::ttl`] (the heuristic) only when its status is heuristically cacheable (200,
//!   203, 204, 300, 301, 404, 405, 410, 414, 501) or it is `public`. [`CacheLayer::statuses`]
//!   replaces that rule with a list. The heuristic TTL gets a random jitter (±10% by default); an
//!   explicit lifetime is only ever shortened by it.
//! - The response's age counts: the corrected initial age (its `Age`, its `Date` and the time the
//!   inner service took, RFC 9111 section 4.2.3) is taken off its lifetime, and the `Age` sent
//!   with a hit is that age plus the time spent in the cache. A response already stale on
//!   arrival, or with invalid freshness information (`max-age` negative, quoted or not a number,
//!   conflicting duplicates, an `Expires` that is not a date), is not stored.
//! - After a 2xx or 3xx response to an unsafe method (`POST`, `PUT`, `DELETE`, `PATCH`...), the
//!   entries of the target URI and of `Location` / `Content-Location` on the same host are
//!   deleted from the store (RFC 9111 section 4.4), so every replica misses next
//!   ([`CacheLayer::no_unsafe_invalidation`] turns it off).
//! - `Cache-Control` directive names are case-insensitive; quoted values and several fields are
//!   understood.
//! - Never stored: responses with `Set-Cookie`, `Cache-Control: private` or `no-store`,
//!   `Vary: *`, or a body larger than [`CacheLayer::max_body`] (1 MiB by default; such a body is
//!   streamed through, and the layer never buffers more than the cap). Hop-by-hop headers are
//!   not stored. A `no-cache` response, or one already stale, is stored only when it has a
//!   validator, and then only to be revalidated.
//! - [`CacheLayer::heuristic`] replaces the fixed TTL with a fraction of the time since
//!   `Last-Modified`; [`CacheLayer::targeted_field`] names a field (RFC 9213, for example
//!   `CDN-Cache-Control`) whose directives replace `Cache-Control` and `Expires` when a response
//!   has it; [`CacheLayer::hosts`] / [`CacheLayer::fixed_host`] keep invented `Host` values
//!   from making entries of their own.
//! - Requests with `Authorization` or `Cookie` bypass the cache unless
//!   [`CacheLayer::allow_authorized`] says otherwise. A request's `Cache-Control: no-store`
//!   bypasses it; `no-cache` skips the lookup but stores the fresh response; `max-age` and
//!   `min-fresh` refuse an entry too old or not fresh enough (the response is fetched and
//!   stored); `max-stale` takes an entry the store still holds past its freshness;
//!   `only-if-cached` gets `504 Gateway Timeout` when nothing usable is stored.
//! - A client's `If-None-Match` / `If-Modified-Since` on a hit gets `304 Not Modified`; on a
//!   miss it is forwarded unchanged, and a `304` is never stored.
//!
//! # Validation
//!
//! An entry with a validator (`ETag`, `Last-Modified`) is kept past its freshness for
//! [`CacheLayer::revalidation_window`] (10 minutes by default). When it is stale (or was stored
//! `no-cache`, or the request says `no-cache` / `max-age=0`), the inner service gets a
//! conditional request (`If-None-Match` from the `ETag` and `If-Modified-Since` from
//! `Last-Modified`, in place of the client's own preconditions). A `304` updates the stored
//! fields with its own, refreshes the entry's head and freshness in one store call (the body is
//! not written again) and serves the stored body with `Cache-Status: ...; fwd=stale;
//! fwd-status=304; stored`; a `200` replaces the entry. The fill lock and early recompute cover
//! revalidations as they cover fills: one request across replicas revalidates an entry.
//! `must-revalidate`, `proxy-revalidate`, `s-maxage` and `no-cache` responses are never served
//! stale without it, even to `max-stale`.
//!
//! # Stampedes
//!
//! Three mechanisms, each switchable:
//!
//! 1. **Fill lock** ([`CacheLayer::fill_lock`], on by default): on a miss, one request across
//!    every replica takes a short lock (`SET NX PX`, in the same script as the lookup) and runs the
//!    handler; the others poll for the entry up to a bound, then run the handler without storing.
//!    The store script writes only while the lock holds and releases it (compare and delete).
//! 2. **Early recompute** ([`CacheLayer::early_recompute`], XFetch, on with `beta = 1`;
//!    [`CacheLayer::no_early_recompute`] turns it off): a
//!    lookup recomputes a still-fresh entry with a probability that grows as its expiry nears,
//!    weighted by how long the handler took; the others keep getting the entry meanwhile.
//! 3. **Stale serving** ([`CacheLayer::stale_while_revalidate`],
//!    [`CacheLayer::stale_if_error`], off by default): the stale entry is served while one request
//!    refreshes it, or when the handler fails (an error, or 500, 502, 503, 504).
//!
//! The refresh runs inside the request that took the lock (it gets the new response).
//!
//! # Invalidation
//!
//! Every entry belongs to a segment (one per layer by default, or named by
//! [`CacheLayer::segment`]). A segment has a version; entries record the version they were
//! written under and a lookup ignores older ones, so [`CacheHandle::invalidate_segment`] is one
//! increment whatever the segment's size. [`CacheHandle::invalidate_request`] deletes one entry.
//!
//! # Segments and Redis Cluster slots
//!
//! Every store call is one script on one hash slot, so a segment cannot keep one version for
//! entries spread over several slots. Instead a segment is split into *shards*
//! ([`CacheLayer::segment_shards`]): a hash of the entry's key (URI, host, partition; not the
//! `Vary` values, so a resource's variants and its fill lock stay together) picks the shard, and
//! each shard has its own version key in its own slot. The layer's default segment has 16 shards;
//! a segment named by a closure has one unless the layer asks for more.
//!
//! | | one shard | `n` shards |
//! |---|---|---|
//! | a lookup, a store, a refresh | one call, one slot | one call, one slot (the entry's shard) |
//! | invalidating the segment | one call | `n` calls, in parallel (one version bump each) |
//! | a slot migrating, a node hot or down | the whole segment | the entries of its shards, about `1/n` |
//!
//! When some of a segment's shard bumps fail, the invalidation returns the error and the others
//! stay done: invalidate again.
//!
//! # Headers and round trips
//!
//! Served entries carry `Age` and every response of a `GET`/`HEAD` carries `Cache-Status`
//! (RFC 9211), for example `tower-redis-layers; hit`, `tower-redis-layers; fwd=miss; stored`,
//! `tower-redis-layers; hit; detail=stale`, `tower-redis-layers; fwd=bypass; detail=cookie`.
//!
//! On Redis, a hit is one script call (the lookup reads the version, the entry and takes the
//! lock when needed); a miss is two (lookup, then store, which also releases the lock); a
//! revalidation is two (lookup, then refresh, which also releases the lock); the invalidation
//! after an unsafe method is one per shard touched (its URIs may fall in different shards).
//!
//! # Observability
//!
//! Events go to `tracing` (target `tower_redis_layers::cache`): warnings for store failures and
//! corrupt entries, debug events for responses not stored. With the `metrics` feature,
//! `tower_redis_layers_cache_requests_total{outcome}` counts `hit`, `stale`, `stale_if_error`,
//! `revalidated`, `miss`, `miss_stored`, `bypass`, `not_cached` and `unavailable` (the `503` of
//! a failed lookup, see below).
//!
//! # When the store fails
//!
//! Every call to a remote store is bounded by [`CacheLayer::store_timeout`] (250 ms by default;
//! calls to [`MemoryStore`](crate::store::MemoryStore) are not bounded). When a lookup fails or
//! times out, [`CacheLayer::on_store_error`] decides (a warning is logged either way):
//!
//! - [`FailureMode::Open`] (the default): the request goes to the inner service as a miss, and
//!   its response is not stored.
//! - [`FailureMode::Closed`]: the layer answers `503 Service Unavailable` with `Retry-After: 1`,
//!   a problem details body (RFC 9457) and `Cache-Status: tower-redis-layers;
//!   detail=store-unavailable`; the inner service is not called. [`CacheLayer::rejection`]
//!   builds that response (and the `504` of `only-if-cached`) instead.
//!
//! Once the handler has run, its response is served whatever the store does: a failed write (or
//! lock release) is logged and dropped. A corrupt or undecodable entry is a miss and is deleted.
//! The methods of [`CacheHandle`] return the store's error.

mod conditional;
mod config;
mod entry;
mod fill;
mod freshness;
mod future;
mod invalidate;
mod key;
mod layer;
mod lookup;
mod policy;
mod request;
mod response;
mod revalidate;
mod service;
mod target;

pub use self::{
    future::ResponseFuture,
    layer::{CacheHandle, CacheLayer, Rejection},
    service::Cache,
};
pub use crate::{store::FailureMode, ResponseBody};

/// The `tracing` target of the layer's events.
const TARGET: &str = "tower_redis_layers::cache";
