use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{request::Parts, HeaderName, Request, Response, StatusCode};
use tower_layer::Layer;

use super::{
    config::{Config, FillLock, Heuristic, Shared},
    key::{Hosts, Keying, VaryRegistry, DEFAULT_SEGMENT},
    Cache,
};
use crate::store::{CacheStore, FailureMode, StoreError};

/// Why the layer answered a request itself: what a [`CacheLayer::rejection`] builder is given.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The lookup failed and the layer fails closed ([`FailureMode::Closed`]): `503` by
    /// default.
    Unavailable,
    /// The request said `only-if-cached` and nothing usable is stored: `504` by default.
    NotCached,
}

pub(crate) type RejectionFn = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;

/// Caches responses in a store.
///
/// See the [module docs](super) for an example.
///
/// Holds the configuration and the store. Cloning is cheap; every service made by one layer
/// shares the store.
pub struct CacheLayer<B> {
    store: Arc<B>,
    config: Arc<Config>,
    vary: Arc<VaryRegistry>,
}

impl<B> CacheLayer<B> {
    /// A cache in `store` with the defaults: the response's own freshness (`s-maxage`, else
    /// `max-age`, else `Expires` − `Date`) or else a TTL of 60 s for the heuristically cacheable
    /// statuses and `public` responses, ±10% jitter, a 1 MiB body cap, a
    /// 250 ms store timeout, [`FailureMode::Open`] when the store fails, the fill lock on,
    /// early recompute with `beta = 1`, no stale serving, and requests with `Authorization` or
    /// `Cookie` passed through.
    pub fn new(store: B) -> Self {
        Self {
            store: Arc::new(store),
            config: Arc::new(Config {
                keys: Keying {
                    scope: "default".to_owned(),
                    hosts: Hosts::Any,
                    partition: None,
                    segment: None,
                    shards: None,
                    shard_memo: Arc::default(),
                },
                ttl: Duration::from_secs(60),
                jitter: 0.1,
                statuses: None,
                response_ttl: true,
                max_body: 1024 * 1024,
                store_timeout: Duration::from_millis(250),
                on_store_error: FailureMode::Open,
                fill_lock: Some(FillLock {
                    ttl: Duration::from_secs(5),
                    wait: Duration::from_secs(3),
                    poll: Duration::from_millis(25),
                }),
                early_beta: 1.0,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                stale_directive_cap: Duration::ZERO,
                allow_authorized: false,
                invalidate_unsafe: true,
                heuristic: None,
                targeted: None,
                keep: Duration::from_secs(600),
                rejection: None,
            }),
            vary: Arc::new(VaryRegistry::default()),
        }
    }

    /// Separates this layer's entries and segments from other layers on the same store (default
    /// `"default"`). Layers with the same scope (for example the same route on two replicas)
    /// share entries.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.config_mut().keys.scope = scope.into();
        self
    }

    /// How long an entry is fresh when the response says nothing (default 60 s): the heuristic
    /// freshness of RFC 9111 section 4.2.2, used only for a response without `s-maxage`,
    /// `max-age` or `Expires`, and only for the heuristically cacheable statuses (200, 203, 204,
    /// 300, 301, 404, 405, 410, 414, 501), a `public` response, or the
    /// [`statuses`](Self::statuses) named. A response's own freshness always wins, whether
    /// longer or shorter. The response's age (its `Age` field, its `Date`, and the time the
    /// inner service took) counts against it. [`heuristic`](Self::heuristic) replaces it
    /// (except with [`no_response_ttl`](Self::no_response_ttl)).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config_mut().ttl = ttl;
        self
    }

    /// Ignores the response's `s-maxage`, `max-age` and `Expires`: every stored entry lives for
    /// [`ttl`](Self::ttl) (as with nginx's `proxy_ignore_headers`). This departs from RFC 9111
    /// and is meant for origins whose freshness information is known to be wrong. By default
    /// the response's own freshness wins, and an expired or invalid one means "do not store".
    /// [`heuristic`](Self::heuristic) is then not used.
    pub fn no_response_ttl(mut self) -> Self {
        self.config_mut().response_ttl = false;
        self
    }

    /// Random spread of every TTL, as a fraction (default `0.1`: ±10%), so that entries written
    /// together do not expire together. Clamped to `0..=0.5`.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.config_mut().jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 0.5)
        } else {
            0.0
        };
        self
    }

    /// Stores only responses with these statuses, and gives those of them without explicit
    /// freshness the [`ttl`](Self::ttl).
    ///
    /// By default (RFC 9111 section 3) any final status except `206` and `304` is stored when
    /// the response has explicit freshness (`s-maxage`, `max-age`, `Expires`), and the TTL
    /// applies only to the heuristically cacheable statuses (200, 203, 204, 300, 301, 404, 405,
    /// 410, 414, 501) and to `public` responses.
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.config_mut().statuses = Some(statuses.into_iter().collect());
        self
    }

    /// Adds a partition to the key (for example the tenant), so that requests of two partitions
    /// never share an entry. A request for which the closure returns `None` bypasses the cache.
    pub fn partition<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config_mut().keys.partition = Some(Arc::new(f));
        self
    }

    /// Names the segment of a request's entry (for example from its path), so that a
    /// [`CacheHandle`] can invalidate that segment alone. Default: one segment for the layer.
    ///
    /// With a segment closure each segment is one shard unless
    /// [`segment_shards`](Self::segment_shards) says otherwise: all entries of a segment then
    /// live in one Redis Cluster slot, so a huge segment is one hot node (prefer finer segments,
    /// or shards).
    pub fn segment<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> String + Send + Sync + 'static,
    {
        self.config_mut().keys.segment = Some(Arc::new(f));
        self
    }

    /// Spreads each segment's entries over `shards` shards (default: 16 for the layer's default
    /// segment, used when no [`segment`](Self::segment) closure is set; 1 with a closure).
    /// Clamped to `1..=1024`.
    ///
    /// A hash of the entry's key (its URI, host and partition: every `Vary` variant of a
    /// resource lands in the same shard) picks the shard; each shard has its own version, and on
    /// Redis its own hash tag, so its own cluster slot. Every store call still touches one
    /// shard, so one slot. What it buys: a slot that migrates or a node that is hot or down
    /// affects only the entries of its shards (about `1/shards` of the segment), not the whole
    /// segment. What it costs: [`CacheHandle::invalidate_segment`] makes one store call per shard
    /// (in parallel), and an invalidation after an unsafe method one call per shard touched.
    ///
    /// Every replica sharing a [`scope`](Self::scope) must use the same count: a replica with
    /// fewer shards invalidates only those it knows. Shard 0 has the key of an unsharded
    /// segment.
    pub fn segment_shards(mut self, shards: u16) -> Self {
        self.config_mut().keys.shards = Some(shards);
        self
    }

    /// The largest body stored (default 1 MiB). A larger body is streamed through untouched and
    /// not stored; the layer never buffers more than this (plus one frame).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.config_mut().max_body = bytes;
        self
    }

    /// How long a call to a remote store may take (default 250 ms); a call that takes longer
    /// fails with [`StoreError::Timeout`]. A lookup that fails is handled as
    /// [`on_store_error`](Self::on_store_error) says; a failed write is logged and dropped.
    /// Calls to an in-process store ([`CacheStore::is_remote`] is `false`) are not bounded.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().store_timeout = timeout;
        self
    }

    /// What a request gets when its lookup fails or times out (default [`FailureMode::Open`]):
    ///
    /// - [`FailureMode::Open`]: the request goes to the inner service as a miss, and its
    ///   response is not stored.
    /// - [`FailureMode::Closed`]: the layer answers `503 Service Unavailable` with
    ///   `Retry-After: 1` and a problem details body (RFC 9457); the inner service is not
    ///   called.
    ///
    /// A warning is logged either way. Once the handler has run, its response is always served:
    /// a failed write, lock release or deletion is logged and dropped.
    pub fn on_store_error(mut self, mode: FailureMode) -> Self {
        self.config_mut().on_store_error = mode;
        self
    }

    /// The fill lock taken on a miss (on by default: `ttl` 5 s, `wait` 3 s): one request across
    /// every replica runs the handler while the others poll the store for the entry (every
    /// 25 ms at first, the interval growing to 100 ms), up to `wait`, then run the handler
    /// themselves without storing. `ttl` must outlast the handler: a fill that outlives its lock
    /// is not stored.
    pub fn fill_lock(mut self, ttl: Duration, wait: Duration) -> Self {
        let poll = self
            .config
            .fill_lock
            .map_or(Duration::from_millis(25), |l| l.poll);
        self.config_mut().fill_lock = Some(FillLock { ttl, wait, poll });
        self
    }

    /// Turns the fill lock off: every request that misses runs the handler.
    pub fn no_fill_lock(mut self) -> Self {
        self.config_mut().fill_lock = None;
        self
    }

    /// Probabilistic early recompute (XFetch) with this `beta` (default 1; larger recomputes
    /// earlier). A lookup recomputes a fresh entry early with a probability that grows as its
    /// expiry nears and with how long it took to compute; with the fill lock on, one request
    /// recomputes (or revalidates) while the others get the cached entry.
    /// [`no_early_recompute`](Self::no_early_recompute) turns it off (as does a `beta` that is
    /// not a positive number).
    pub fn early_recompute(mut self, beta: f64) -> Self {
        self.config_mut().early_beta = if beta.is_finite() { beta.max(0.0) } else { 0.0 };
        self
    }

    /// Turns early recompute off: an entry is recomputed once it is stale.
    pub fn no_early_recompute(mut self) -> Self {
        self.config_mut().early_beta = 0.0;
        self
    }

    /// Serves an entry up to `window` past its freshness while one request refreshes it
    /// (default: off).
    ///
    /// A response's own `stale-while-revalidate` (RFC 5861) sets its window, capped by this one
    /// (so with the default, stale serving stays off); this window applies to responses without
    /// it. `must-revalidate`, `proxy-revalidate` and `s-maxage` turn stale serving off for
    /// their response (RFC 9111 section 4.2.4).
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.config_mut().stale_while_revalidate = window;
        self
    }

    /// Serves an entry up to `window` past its freshness when the handler fails: an error, or a
    /// 500, 502, 503 or 504 response, as RFC 5861 defines it (default: off).
    ///
    /// A response's own `stale-if-error` sets its window, capped by this one; this window
    /// applies to responses without it. `must-revalidate`, `proxy-revalidate` and `s-maxage`
    /// turn it off for their response.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.config_mut().stale_if_error = window;
        self
    }

    /// Lets a response's own `stale-while-revalidate` / `stale-if-error` (RFC 5861) set its
    /// window up to `cap`, even when the layer's window is shorter or off (default: zero, so
    /// the layer's windows are the caps).
    ///
    /// Responses without the directives keep the layer's windows: with
    /// `.stale_directives_up_to(d)` alone, only an origin that asks for stale serving gets it,
    /// as a shared cache in front of an origin should (what the proxy example does).
    pub fn stale_directives_up_to(mut self, cap: Duration) -> Self {
        self.config_mut().stale_directive_cap = cap;
        self
    }

    /// Turns off the invalidation after unsafe methods (on by default, as RFC 9111 section 4.4
    /// requires): after a 2xx or 3xx response to a `POST`, `PUT`, `DELETE`, `PATCH` (any method
    /// but `GET`, `HEAD`, `OPTIONS`, `TRACE`), the layer deletes the entry of the request's
    /// target URI, and of its `Location` and `Content-Location` URIs when they are on the
    /// request's host. The entry is deleted in the store, so every replica misses next.
    ///
    /// The entries deleted are those keyed like the unsafe request (same host, partition and
    /// values of the `Vary` headers): a variant selected by other header values is left to
    /// expire.
    pub fn no_unsafe_invalidation(mut self) -> Self {
        self.config_mut().invalidate_unsafe = false;
        self
    }

    /// Whether requests with `Authorization` or `Cookie` use the cache (default `false`: they
    /// bypass it). Turn it on only with a [`partition`](Self::partition) that separates users,
    /// or for responses that are the same for everyone.
    pub fn allow_authorized(mut self, allow: bool) -> Self {
        self.config_mut().allow_authorized = allow;
        self
    }

    /// Heuristic freshness from `Last-Modified` (RFC 9111 section 4.2.2), in place of the fixed
    /// [`ttl`](Self::ttl): a response without explicit freshness (`s-maxage`, `max-age`,
    /// `Expires`) is fresh for `fraction` of the time since its `Last-Modified` (measured at
    /// its `Date`, else when it arrived), at most `cap`. The usual value is `0.1` (10%) with a
    /// cap of a day.
    ///
    /// As with the fixed TTL, it applies only to the heuristically cacheable statuses (200, 203,
    /// 204, 300, 301, 404, 405, 410, 414, 501), `public` responses or the
    /// [`statuses`](Self::statuses) named. A response without `Last-Modified` (or with one not
    /// in its past) then gets no heuristic freshness at all: the TTL is not used, and it is not
    /// stored (but to be revalidated, when it has an `ETag`).
    /// [`no_response_ttl`](Self::no_response_ttl) overrides this (every entry lives for the
    /// TTL). `fraction` is clamped to `0..=1`.
    pub fn heuristic(mut self, fraction: f64, cap: Duration) -> Self {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.config_mut().heuristic = Some(Heuristic { fraction, cap });
        self
    }

    /// A targeted cache-control field (RFC 9213) for this cache, for example
    /// `CDN-Cache-Control` (off by default). When a response carries it with a valid, non-empty
    /// value, its directives replace the response's `Cache-Control` and `Expires` for this
    /// cache's decisions (storing, freshness, stale windows, revalidation); otherwise
    /// `Cache-Control` applies as usual. Responses are passed on with both fields unchanged: the
    /// RFC leaves forwarding to the cache, and a further cache of the same class may use it.
    pub fn targeted_field(mut self, name: HeaderName) -> Self {
        self.config_mut().targeted = Some(name);
        self
    }

    /// Serves only requests for these hosts (`Host`, else the URI's authority; compared
    /// without case, with or without the port): a request for any other host bypasses the
    /// cache (`Cache-Status: ...; fwd=bypass; detail=host`). Behind a proxy that forwards any
    /// client `Host`, this keeps invented hosts from making entries of their own.
    pub fn hosts<I, H>(mut self, hosts: I) -> Self
    where
        I: IntoIterator<Item = H>,
        H: Into<String>,
    {
        let list = hosts
            .into_iter()
            .map(|h| h.into().to_ascii_lowercase())
            .collect();
        self.config_mut().keys.hosts = Hosts::Allowed(list);
        self
    }

    /// Keys every request under `host`, whatever its own `Host`: for a cache in front of one
    /// origin. Replaces [`hosts`](Self::hosts).
    pub fn fixed_host(mut self, host: impl Into<String>) -> Self {
        self.config_mut().keys.hosts = Hosts::Fixed(host.into().to_ascii_lowercase());
        self
    }

    /// How long an entry with a validator (`ETag` or `Last-Modified`) is kept past its
    /// freshness and stale windows, so that it can be revalidated with a conditional request
    /// instead of fetched again (default 10 minutes; zero keeps none).
    pub fn revalidation_window(mut self, window: Duration) -> Self {
        self.config_mut().keep = window;
        self
    }

    /// Builds the responses the layer sends itself: the `503` when a lookup fails under
    /// [`FailureMode::Closed`] and the `504` for `only-if-cached` with nothing usable stored.
    /// The layer adds `Cache-Status` (and `Retry-After: 1` to a `503`) unless the response has
    /// them.
    pub fn rejection<F>(mut self, f: F) -> Self
    where
        F: Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
    {
        self.config_mut().rejection = Some(Arc::new(f));
        self
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }
}

impl<B> CacheLayer<B> {
    /// The state the services of this layer share.
    pub(crate) fn shared(&self) -> Shared<B> {
        Shared {
            store: Arc::clone(&self.store),
            config: Arc::clone(&self.config),
            vary: Arc::clone(&self.vary),
        }
    }
}

impl<B: CacheStore> CacheLayer<B> {
    /// A handle that invalidates this layer's entries; cloneable, usable from handlers.
    pub fn handle(&self) -> CacheHandle {
        CacheHandle {
            store: Arc::clone(&self.store) as Arc<dyn CacheStore>,
            config: Arc::clone(&self.config),
            vary: Arc::clone(&self.vary),
        }
    }
}

impl<B> Clone for CacheLayer<B> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            config: Arc::clone(&self.config),
            vary: Arc::clone(&self.vary),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for CacheLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("CacheLayer")
            .field("store", &self.store)
            .field("scope", &c.keys.scope)
            .field("segment_shards", &c.keys.shard_count())
            .field("ttl", &c.ttl)
            .field("jitter", &c.jitter)
            .field("statuses", &c.statuses)
            .field("max_body", &c.max_body)
            .field("response_ttl", &c.response_ttl)
            .field("store_timeout", &c.store_timeout)
            .field("on_store_error", &c.on_store_error)
            .field("fill_lock", &c.fill_lock)
            .field("early_beta", &c.early_beta)
            .field("stale_while_revalidate", &c.stale_while_revalidate)
            .field("stale_if_error", &c.stale_if_error)
            .field("stale_directives_up_to", &c.stale_directive_cap)
            .field("allow_authorized", &c.allow_authorized)
            .field("invalidate_unsafe", &c.invalidate_unsafe)
            .field("heuristic", &c.heuristic)
            .field("targeted_field", &c.targeted)
            .field("hosts", &c.keys.hosts)
            .field("revalidation_window", &c.keep)
            .finish_non_exhaustive()
    }
}

impl<S, B> Layer<S> for CacheLayer<B> {
    type Service = Cache<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache::with_shared(inner, Arc::new(self.shared()))
    }
}

impl<S, B> Cache<S, B> {
    /// Caches the responses of `inner` in `store`, with the defaults of [`CacheLayer::new`].
    pub fn new(inner: S, store: B) -> Self {
        CacheLayer::new(store).layer(inner)
    }
}

// Not in the block above: there `S` could not be inferred from a call to `layer`.
impl<B> Cache<(), B> {
    /// A [`CacheLayer`] over `store`, to configure and wrap services with (the same as
    /// [`CacheLayer::new`]).
    pub fn layer(store: B) -> CacheLayer<B> {
        CacheLayer::new(store)
    }
}

/// Invalidates the entries of a [`CacheLayer`]; made by [`CacheLayer::handle`].
///
/// See the [module docs](super) for an example.
///
/// Cloning is cheap. Every method is one store call per shard it touches (see
/// [`CacheLayer::segment_shards`]), each bounded by the layer's
/// [store timeout](CacheLayer::store_timeout); an error is returned whatever the layer's
/// [`on_store_error`](CacheLayer::on_store_error).
#[derive(Clone)]
pub struct CacheHandle {
    store: Arc<dyn CacheStore>,
    config: Arc<Config>,
    vary: Arc<VaryRegistry>,
}

impl CacheHandle {
    /// Invalidates every entry of the layer's default segment (the one used when no
    /// [`CacheLayer::segment`] closure is set): one version bump per shard (16 by default), in
    /// parallel; O(shards), whatever the number of entries.
    pub async fn invalidate(&self) -> Result<(), StoreError> {
        self.invalidate_segment(DEFAULT_SEGMENT).await
    }

    /// Invalidates every entry of the segment `name` (as returned by the
    /// [`CacheLayer::segment`] closure): one version bump per shard (one unless
    /// [`CacheLayer::segment_shards`] says otherwise), in parallel; O(shards), whatever the
    /// number of entries.
    ///
    /// The shards are separate store calls: when one fails its error is returned, and the
    /// shards whose bump succeeded stay invalidated. Invalidating again is harmless (a bump of
    /// a shard already bumped only misses its entries written since).
    pub async fn invalidate_segment(&self, name: &str) -> Result<(), StoreError> {
        let calls = self
            .config
            .keys
            .shards(name)
            .all()
            .into_iter()
            .map(|shard| {
                let call = self.store.invalidate_segment(shard);
                self.config.bound(&*self.store, call)
            });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .try_for_each(|result| result.map(|_| ()))
    }

    /// Deletes the entry that `request` would be served from (its keys are derived as the
    /// layer derives them: segment, partition, `Vary` values). Answers whether there was one;
    /// `false` for a request the partition closure gives no partition.
    pub async fn invalidate_request<T>(&self, request: &Request<T>) -> Result<bool, StoreError> {
        let mut builder = Request::builder()
            .method(request.method())
            .uri(request.uri())
            .version(request.version());
        if let Some(headers) = builder.headers_mut() {
            headers.extend(request.headers().clone());
        }
        let parts = builder
            .body(())
            .map_err(|e| StoreError::Invalid(e.to_string()))?
            .into_parts()
            .0;
        let Some(keys) = self.config.keys.keys(&parts, &self.vary) else {
            return Ok(false);
        };
        let call = self.store.invalidate_key(keys.segment, keys.entry);
        self.config.bound(&*self.store, call).await
    }
}

impl fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheHandle")
            .field("scope", &self.config.keys.scope)
            .finish_non_exhaustive()
    }
}
