use std::{fmt, sync::Arc, time::Duration};

use http::{request::Parts, HeaderName, Method, StatusCode};
use tower_layer::Layer;

use super::IdempotencyLock;

type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
type StoreIfFn = dyn Fn(StatusCode) -> bool + Send + Sync;

/// Runs each request with an `Idempotency-Key` once and replays its response to duplicates;
/// see the [module docs](super) for an example.
pub struct IdempotencyLockLayer<B> {
    pub(crate) store: Arc<B>,
    pub(crate) config: Arc<Config>,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) header: HeaderName,
    pub(crate) required: bool,
    pub(crate) scope: Option<Arc<ScopeFn>>,
    pub(crate) max_body: usize,
    pub(crate) lease: Duration,
    pub(crate) retention: Duration,
    pub(crate) in_flight_wait: Option<Duration>,
    pub(crate) store_if: Arc<StoreIfFn>,
    pub(crate) fail_open: bool,
    pub(crate) timeout: Duration,
}

impl<B> IdempotencyLockLayer<B> {
    /// Idempotency for `POST` and `PATCH` requests that carry an `Idempotency-Key`, on `store`.
    pub fn new(store: B) -> Self {
        Self {
            store: Arc::new(store),
            config: Arc::new(Config {
                methods: vec![Method::POST, Method::PATCH],
                header: HeaderName::from_static("idempotency-key"),
                required: false,
                scope: None,
                max_body: 1024 * 1024,
                lease: Duration::from_secs(10),
                retention: Duration::from_secs(24 * 3600),
                in_flight_wait: None,
                store_if: Arc::new(|status: StatusCode| !status.is_server_error()),
                fail_open: false,
                timeout: Duration::from_secs(1),
            }),
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

    /// Scopes records by a value of the request (for example the caller's tenant), on top of
    /// the method and path: the same key from another scope is another record.
    pub fn scope<F>(mut self, scope: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config_mut().scope = Some(Arc::new(scope));
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

    /// The lease of an in-flight request (default 10 s), renewed every third of it while the
    /// handler runs. It bounds how long a crashed replica blocks the key.
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

    /// When the store fails or times out: `false` (the default) answers `503` with
    /// `Retry-After` and does not run the request; `true` runs it unprotected.
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.config_mut().fail_open = fail_open;
        self
    }

    /// How long each store call may take (default 1 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().timeout = timeout;
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
            .field("max_body", &c.max_body)
            .field("lease", &c.lease)
            .field("retention", &c.retention)
            .field("in_flight_wait", &c.in_flight_wait)
            .field("fail_open", &c.fail_open)
            .finish_non_exhaustive()
    }
}

impl<S, B> Layer<S> for IdempotencyLockLayer<B> {
    type Service = IdempotencyLock<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyLock::from_layer(inner, self)
    }
}
