use std::{fmt, sync::Arc, time::Duration};

use http::request::Parts;

use crate::{
    rate_limit::{CompiledPolicy, KeyExtractor, Policy},
    store::FailureMode,
};

/// Delays requests to an inner (client) service until a rate limit kept in a store lets them
/// through; see the [module docs](super) for an example.
///
/// Holds the configuration and the store. Cloning is cheap, and every service made by one layer
/// (and its clones) shares the store.
pub struct ThrottleLayer<B> {
    pub(crate) shared: Arc<Shared<B>>,
}

/// What a layer and every service it makes share.
pub(crate) struct Shared<B> {
    pub(crate) store: Arc<B>,
    pub(crate) config: Config,
}

// Not derived: a store need not be `Clone`.
impl<B> Clone for Shared<B> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            config: self.config.clone(),
        }
    }
}

type CostFn = dyn Fn(&Parts) -> u64 + Send + Sync;

/// The configuration of a layer.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) policy: CompiledPolicy,
    pub(crate) scope: String,
    pub(crate) key: KeyExtractor,
    pub(crate) cost: Option<Arc<CostFn>>,
    pub(crate) max_wait: Duration,
    pub(crate) store_timeout: Duration,
    pub(crate) failure_mode: FailureMode,
    pub(crate) jitter: f64,
}

impl<B> ThrottleLayer<B> {
    /// Delays requests until `policy` lets them through, one global budget unless
    /// [`key`](Self::key) says otherwise, for at most 10 seconds (see
    /// [`max_wait`](Self::max_wait)). The counters are named by the policy's name (or its
    /// [scope](Policy::scope)), as a [`RateLimitLayer`](crate::rate_limit::RateLimitLayer)'s
    /// are.
    pub fn new(store: B, policy: Policy) -> Self {
        Self {
            shared: Arc::new(Shared {
                store: Arc::new(store),
                config: Config {
                    policy: CompiledPolicy::new(policy, "", ""),
                    scope: String::new(),
                    key: KeyExtractor::global(),
                    cost: None,
                    max_wait: Duration::from_secs(10),
                    store_timeout: Duration::from_millis(250),
                    failure_mode: FailureMode::Closed,
                    jitter: 0.1,
                },
            }),
        }
    }

    /// A namespace for this layer's counters in the store (default: none), exactly as
    /// [`RateLimitLayer::scope`](crate::rate_limit::RateLimitLayer::scope): a throttle and a
    /// rate-limit layer with the same scopes, policy name, rules and key share their counters.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        let config = self.config_mut();
        config.scope = scope.into();
        config.policy.set_layer_scope(&config.scope);
        self
    }

    /// Where the key of a request comes from (default: [`KeyExtractor::global`], one budget for
    /// every request, as a third party's limit on one API account is). A request without a key
    /// fails with [`ThrottleError::MissingKey`](super::ThrottleError::MissingKey).
    pub fn key(mut self, key: KeyExtractor) -> Self {
        self.config_mut().key = key;
        self
    }

    /// The cost of a request, in units of the rules' limits (default 1). A request that costs
    /// more than a rule's quota would never pass: it fails at once with
    /// [`ThrottleError::OverQuota`](super::ThrottleError::OverQuota).
    pub fn cost<F>(mut self, cost: F) -> Self
    where
        F: Fn(&Parts) -> u64 + Send + Sync + 'static,
    {
        self.config_mut().cost = Some(Arc::new(cost));
        self
    }

    /// The longest a request waits for the limit (default 10 s). When the store says a request
    /// can pass only later than that, it fails at once with
    /// [`ThrottleError::Timeout`](super::ThrottleError::Timeout) rather than sleeping first;
    /// no sleep goes past this deadline. `Duration::ZERO` never waits (a denied request fails
    /// at once).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.config_mut().max_wait = max_wait;
        self
    }

    /// How long one store call may take before it counts as failed (default 250 ms); then
    /// [`on_store_error`](Self::on_store_error) applies. Not applied to an in-process store.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().store_timeout = timeout;
        self
    }

    /// What a request does when a store call fails or times out (default
    /// [`FailureMode::Closed`]): with `Closed` it fails with
    /// [`ThrottleError::Store`](super::ThrottleError::Store) and is not sent (the limit you
    /// respect is someone else's, and exceeding it can get an account suspended); with `Open`
    /// it is sent at once, unthrottled. A warning is logged either way.
    pub fn on_store_error(mut self, mode: FailureMode) -> Self {
        self.config_mut().failure_mode = mode;
        self
    }

    /// Random extra delay added to each sleep, as a fraction of it (default `0.1`: up to 10%
    /// more), so that requests told to wait the same time do not all ask the store again at the
    /// same instant. Never negative (a request never asks before the store said it could pass),
    /// never past the maximum wait. Clamped to `0..=1`.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.config_mut().jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    fn config_mut(&mut self) -> &mut Config {
        &mut Arc::make_mut(&mut self.shared).config
    }
}

// The layer's `Layer` impl sits beside the service it makes, in `service.rs`.

impl<B> Clone for ThrottleLayer<B> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for ThrottleLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.shared.config;
        f.debug_struct("ThrottleLayer")
            .field("store", &self.shared.store)
            .field("rules", &c.policy.rules)
            .field("scope", &c.scope)
            .field("key", &c.key)
            .field("max_wait", &c.max_wait)
            .field("store_timeout", &c.store_timeout)
            .field("failure_mode", &c.failure_mode)
            .field("jitter", &c.jitter)
            .finish_non_exhaustive()
    }
}
