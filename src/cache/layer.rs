use std::{fmt, sync::Arc, time::Duration};

use http::{request::Parts, Request, StatusCode};
use tower_layer::Layer;

use super::{
    key::{self, VaryRegistry},
    Cache,
};
use crate::store::{CacheStore, StoreError};

type PartitionFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
type SegmentFn = dyn Fn(&Parts) -> String + Send + Sync;

/// The name of the segment used when no [`CacheLayer::segment`] closure is set.
pub(crate) const DEFAULT_SEGMENT: &str = "";

/// Caches responses in a store; see the [module docs](super) for an example.
///
/// Holds the configuration and the store. Cloning is cheap; every service made by one layer
/// shares the store.
pub struct CacheLayer<B> {
    pub(crate) store: Arc<B>,
    pub(crate) config: Arc<Config>,
    pub(crate) vary: Arc<VaryRegistry>,
}

/// The fill lock's settings (see [`CacheLayer::fill_lock`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FillLock {
    pub(crate) ttl: Duration,
    pub(crate) wait: Duration,
    pub(crate) poll: Duration,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) scope: String,
    pub(crate) ttl: Duration,
    pub(crate) jitter: f64,
    pub(crate) statuses: Vec<StatusCode>,
    pub(crate) response_ttl: bool,
    pub(crate) partition: Option<Arc<PartitionFn>>,
    pub(crate) segment: Option<Arc<SegmentFn>>,
    pub(crate) max_body: usize,
    pub(crate) timeout: Duration,
    pub(crate) fill_lock: Option<FillLock>,
    pub(crate) early_beta: f64,
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) stale_if_error: Duration,
    pub(crate) allow_authorized: bool,
}

/// The statuses RFC 9111 calls heuristically cacheable (RFC 9110 section 15.1).
pub(crate) const HEURISTIC_STATUSES: [u16; 10] = [200, 203, 204, 300, 301, 404, 405, 410, 414, 501];

impl<B> CacheLayer<B> {
    /// A cache in `store` with the defaults: a TTL of 60 s (or the response's `s-maxage` /
    /// `max-age`), ±10% jitter, the heuristically cacheable statuses, a 1 MiB body cap, a
    /// 250 ms store timeout, the fill lock on, early recompute with `beta = 1`, no stale
    /// serving, and requests with `Authorization` or `Cookie` passed through.
    pub fn new(store: B) -> Self {
        Self {
            store: Arc::new(store),
            config: Arc::new(Config {
                scope: "default".to_owned(),
                ttl: Duration::from_secs(60),
                jitter: 0.1,
                statuses: HEURISTIC_STATUSES
                    .iter()
                    .filter_map(|s| StatusCode::from_u16(*s).ok())
                    .collect(),
                response_ttl: true,
                partition: None,
                segment: None,
                max_body: 1024 * 1024,
                timeout: Duration::from_millis(250),
                fill_lock: Some(FillLock {
                    ttl: Duration::from_secs(5),
                    wait: Duration::from_secs(3),
                    poll: Duration::from_millis(25),
                }),
                early_beta: 1.0,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                allow_authorized: false,
            }),
            vary: Arc::new(VaryRegistry::default()),
        }
    }

    /// Separates this layer's entries and segments from other layers on the same store (default
    /// `"default"`). Layers with the same scope (for example the same route on two replicas)
    /// share entries.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.config_mut().scope = scope.into();
        self
    }

    /// How long an entry is fresh when the response says nothing (default 60 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config_mut().ttl = ttl;
        self
    }

    /// Whether the response's `s-maxage` / `max-age` set the TTL when present (default `true`).
    /// `max-age=0` then means "do not store".
    pub fn response_ttl(mut self, use_it: bool) -> Self {
        self.config_mut().response_ttl = use_it;
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

    /// The response statuses that are stored (default: 200, 203, 204, 300, 301, 404, 405, 410,
    /// 414, 501).
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.config_mut().statuses = statuses.into_iter().collect();
        self
    }

    /// Adds a partition to the key (for example the tenant), so that requests of two partitions
    /// never share an entry. A request for which the closure returns `None` bypasses the cache.
    pub fn partition<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config_mut().partition = Some(Arc::new(f));
        self
    }

    /// Names the segment of a request's entry (for example from its path), so that a
    /// [`CacheHandle`] can invalidate that segment alone. Default: one segment for the layer.
    ///
    /// All entries of a segment live in one Redis Cluster slot: a huge segment is one hot node,
    /// so prefer finer segments.
    pub fn segment<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> String + Send + Sync + 'static,
    {
        self.config_mut().segment = Some(Arc::new(f));
        self
    }

    /// The largest body stored (default 1 MiB). A larger body is streamed through untouched and
    /// not stored; the layer never buffers more than this (plus one frame).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.config_mut().max_body = bytes;
        self
    }

    /// How long a store call may take (default 250 ms). A lookup that takes longer is a miss; a
    /// store that does is dropped.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().timeout = timeout;
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

    /// Probabilistic early recompute (XFetch) with this `beta` (default 1; 0 turns it off). A
    /// lookup recomputes a fresh entry early with a probability that grows as its expiry nears
    /// and with how long it took to compute; with the fill lock on, one request recomputes while
    /// the others get the cached entry.
    pub fn early_recompute(mut self, beta: f64) -> Self {
        self.config_mut().early_beta = if beta.is_finite() { beta.max(0.0) } else { 0.0 };
        self
    }

    /// Serves an entry up to `window` past its freshness while one request refreshes it
    /// (default: off).
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.config_mut().stale_while_revalidate = window;
        self
    }

    /// Serves an entry up to `window` past its freshness when the handler fails: an error, or a
    /// 500, 502, 503 or 504 response, as RFC 5861 defines it (default: off).
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.config_mut().stale_if_error = window;
        self
    }

    /// Whether requests with `Authorization` or `Cookie` use the cache (default `false`: they
    /// bypass it). Turn it on only with a [`partition`](Self::partition) that separates users,
    /// or for responses that are the same for everyone.
    pub fn allow_authorized(mut self, allow: bool) -> Self {
        self.config_mut().allow_authorized = allow;
        self
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
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
            .field("scope", &c.scope)
            .field("ttl", &c.ttl)
            .field("jitter", &c.jitter)
            .field("statuses", &c.statuses)
            .field("max_body", &c.max_body)
            .field("timeout", &c.timeout)
            .field("fill_lock", &c.fill_lock)
            .field("early_beta", &c.early_beta)
            .field("stale_while_revalidate", &c.stale_while_revalidate)
            .field("stale_if_error", &c.stale_if_error)
            .field("allow_authorized", &c.allow_authorized)
            .finish_non_exhaustive()
    }
}

impl<S, B> Layer<S> for CacheLayer<B> {
    type Service = Cache<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache::from_layer(inner, self)
    }
}

/// Invalidates the entries of a [`CacheLayer`]; made by [`CacheLayer::handle`].
///
/// Cloning is cheap. Every method is one store call, bounded by the layer's timeout.
#[derive(Clone)]
pub struct CacheHandle {
    store: Arc<dyn CacheStore>,
    config: Arc<Config>,
    vary: Arc<VaryRegistry>,
}

impl CacheHandle {
    /// Invalidates every entry of the layer's default segment (the one used when no
    /// [`CacheLayer::segment`] closure is set): one version bump, O(1).
    pub async fn invalidate(&self) -> Result<(), StoreError> {
        self.invalidate_segment(DEFAULT_SEGMENT).await
    }

    /// Invalidates every entry of the segment `name` (as returned by the
    /// [`CacheLayer::segment`] closure): one version bump, O(1).
    pub async fn invalidate_segment(&self, name: &str) -> Result<(), StoreError> {
        let segment = key::segment_key(&self.config.scope, name);
        self.bounded(self.store.invalidate_segment(segment))
            .await
            .map(|_| ())
    }

    /// Deletes the entry that `request` would be served from (its segment, partition and `Vary`
    /// values are computed as the layer does). Answers whether there was one.
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
        let config = &self.config;
        let segment_name = config
            .segment
            .as_ref()
            .map_or_else(|| DEFAULT_SEGMENT.to_owned(), |f| f(&parts));
        let partition = match &config.partition {
            Some(f) => match f(&parts) {
                Some(p) => Some(p),
                None => return Ok(false),
            },
            None => None,
        };
        let primary = key::primary_key(&config.scope, &parts, partition.as_deref());
        let names = self.vary.get(primary);
        let vary = key::vary_values(&parts, names.as_deref().unwrap_or(&[]));
        let segment = key::segment_key(&config.scope, &segment_name);
        self.bounded(
            self.store
                .invalidate_key(segment, key::entry_key(primary, &vary)),
        )
        .await
    }

    async fn bounded<T>(&self, call: crate::store::StoreFuture<T>) -> Result<T, StoreError> {
        if !self.store.is_remote() {
            return call.await;
        }
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.config.timeout)),
        }
    }
}

impl fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheHandle")
            .field("scope", &self.config.scope)
            .finish_non_exhaustive()
    }
}
