use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{request::Parts, HeaderName, Method, Response, StatusCode};
use tower_layer::Layer;

use super::{config::Config, IdempotencyLock, Rejection};
use crate::store::FailureMode;

/// Runs each request with an `Idempotency-Key` once and replays its response to duplicates.
/// See the [module docs](super) for an example.
pub struct IdempotencyLockLayer<B> {
    pub(crate) store: Arc<B>,
    pub(crate) config: Arc<Config>,
}

impl<B> IdempotencyLockLayer<B> {
    /// Idempotency for `POST` and `PATCH` requests that carry an `Idempotency-Key`, on `store`.
    pub fn new(store: B) -> Self {
        Self {
            store: Arc::new(store),
            config: Arc::new(Config::default()),
        }
    }

    /// The methods the layer applies to (default `POST` and `PATCH`); others pass through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config_mut().methods = methods.into_iter().collect();
        self
    }

    /// The header that carries the key (default `Idempotency-Key`).
    pub fn header(mut self, name: HeaderName) -> Self {
        self.config_mut().header = name;
        self
    }

    /// Whether a request without a key is refused with `400` (default: it passes through).
    pub fn required(mut self, required: bool) -> Self {
        self.config_mut().required = required;
        self
    }

    /// The namespace of this layer's records in the store (default `"idempotency"`). Layers
    /// with the same scope (the same route on two replicas) share records; give two layers on
    /// one store different scopes to keep their records apart.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.config_mut().scope = scope.into();
        self
    }

    /// Partitions records by a value of the request (for example the caller's tenant), on top
    /// of the scope, the method and the path: the same key in another partition is another
    /// record. `None` is the partition of requests without such a value.
    pub fn partition<F>(mut self, partition: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config_mut().partition = Some(Arc::new(partition));
        self
    }

    /// The largest request body (fingerprinted; `413` above) and response body (stored for
    /// replay) the layer reads into memory (default 1 MiB). A larger response is streamed
    /// through; its request is still recorded as done, and duplicates get `409` since it cannot
    /// be replayed.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.config_mut().max_body = bytes;
        self
    }

    /// The lease of an in-flight request (default 10 s, at least 30 ms), renewed every third of
    /// it while the handler runs. It bounds how long a crashed replica blocks the key.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config_mut().lease = lease.max(Duration::from_millis(30));
        self
    }

    /// How long a completed response is kept for replay (default 24 h).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.config_mut().retention = retention;
        self
    }

    /// Makes a duplicate that arrives while the first request runs wait up to `wait` for its
    /// response instead of getting `409 Conflict` at once.
    pub fn in_flight_wait(mut self, wait: Duration) -> Self {
        self.config_mut().in_flight_wait = Some(wait);
        self
    }

    /// Which responses are stored for replay (default: all but 5xx). A response that is not
    /// stored releases the key, so the client may retry.
    pub fn store_if<F>(mut self, f: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.config_mut().store_if = Arc::new(f);
        self
    }

    /// What to do when the store fails or does not answer within the
    /// [store timeout](Self::store_timeout) while claiming a key (default
    /// [`FailureMode::Closed`]): `Closed` answers `503` with `Retry-After: 1` and does not run
    /// the request; `Open` runs it without protection. A warning is logged either way.
    pub fn on_store_error(mut self, mode: FailureMode) -> Self {
        self.config_mut().on_store_error = mode;
        self
    }

    /// How long each store call may take (default 1 s): claiming, each renewal of the lease
    /// (also bounded by a third of it), storing the response and releasing the key.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().store_timeout = timeout;
        self
    }

    /// Builds the responses the layer sends itself (see [`Rejection`] for each case and its
    /// default status). Unless the response has one, the layer adds `Retry-After` to
    /// [`Rejection::InFlight`] (the time left on the running request's lease, at least 1 s) and
    /// `Retry-After: 1` to [`Rejection::Unavailable`]. The default is
    /// `application/problem+json` (RFC 9457).
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

impl<B> Clone for IdempotencyLockLayer<B> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            config: Arc::clone(&self.config),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for IdempotencyLockLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("IdempotencyLockLayer")
            .field("store", &self.store)
            .field("methods", &c.methods)
            .field("header", &c.header)
            .field("required", &c.required)
            .field("scope", &c.scope)
            .field("max_body", &c.max_body)
            .field("lease", &c.lease)
            .field("retention", &c.retention)
            .field("in_flight_wait", &c.in_flight_wait)
            .field("on_store_error", &c.on_store_error)
            .field("store_timeout", &c.store_timeout)
            .finish_non_exhaustive()
    }
}

impl<S, B> Layer<S> for IdempotencyLockLayer<B> {
    type Service = IdempotencyLock<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyLock::with_config(inner, Arc::clone(&self.store), Arc::clone(&self.config))
    }
}

impl<S, B> IdempotencyLock<S, B> {
    /// Wraps `inner` with idempotency on `store`, with the default options (use
    /// [`IdempotencyLock::layer`] to change them).
    pub fn new(inner: S, store: B) -> Self {
        IdempotencyLockLayer::new(store).layer(inner)
    }
}

// Not in the block above: there `S` could not be inferred from a call to `layer`.
impl<B> IdempotencyLock<(), B> {
    /// A layer that wraps services with idempotency on `store`: [`IdempotencyLockLayer::new`].
    pub fn layer(store: B) -> IdempotencyLockLayer<B> {
        IdempotencyLockLayer::new(store)
    }
}
