use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{request::Parts, HeaderValue, Method, Response};
use tower_layer::Layer;

use crate::store::FailureMode;

use super::{deny_cache::DenyCache, headers::policy_value, Headers, KeyExtractor, RateLimit, Rule};

/// Applies rate limits to requests; see the [module docs](super) for an example.
///
/// Holds the configuration and the store. Cloning is cheap, and every service made by one layer
/// (and its clones) shares the store and the local deny cache.
pub struct RateLimitLayer<B> {
    pub(crate) store: Arc<B>,
    pub(crate) config: Arc<Config>,
    pub(crate) deny_cache: Arc<DenyCache>,
}

/// A set of rules checked together for one request, all-or-nothing.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    scope: Option<String>,
}

impl Policy {
    /// A policy of one rule.
    pub fn new(rule: Rule) -> Self {
        Self {
            rules: vec![rule],
            scope: None,
        }
    }

    /// Adds a rule, checked in the same atomic call as the others.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Separates this policy's counters from other policies with the same rules and key.
    ///
    /// By default a policy's counters are shared by every layer with the same rules (state is
    /// keyed by the rules, so that every replica agrees). Give two routes different scopes when
    /// each should have its own budget. Route policies of a routed layer are scoped by their
    /// method and path unless a scope is given.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }
}

impl From<Rule> for Policy {
    fn from(rule: Rule) -> Self {
        Self::new(rule)
    }
}

/// What to do with a request whose key cannot be extracted (for example no `x-api-key` header
/// and no peer address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// Answer `400 Bad Request` (the default), through the rejection response if one is set.
    #[default]
    Reject,
    /// Let the request through without a limit.
    Allow,
    /// Count every such request under one shared key.
    Shared,
}

/// Why the layer answered a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// A rule denied the request.
    Limited {
        /// The name of the rule with the longest wait.
        rule: String,
        /// How long until a request of the same cost can pass.
        retry_after: Duration,
    },
    /// The store failed and the layer fails closed.
    Unavailable,
    /// The key could not be extracted and [`MissingKey::Reject`] is set.
    MissingKey,
}

type RejectionFn = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;
type CostFn = dyn Fn(&Parts) -> u64 + Send + Sync;

/// A compiled policy: rules, scope, and what can be computed once.
#[derive(Clone)]
pub(crate) struct CompiledPolicy {
    pub(crate) rules: Vec<Rule>,
    pub(crate) names: Vec<String>,
    pub(crate) scope: String,
    pub(crate) policy_header: Option<HeaderValue>,
    pub(crate) invalid: Option<String>,
}

impl CompiledPolicy {
    fn new(policy: Policy, default_scope: String) -> Self {
        let invalid = if policy.rules.is_empty() {
            Some("a policy needs at least one rule".to_owned())
        } else {
            policy.rules.iter().find_map(|r| r.validate().err())
        };
        Self {
            names: policy.rules.iter().map(Rule::policy_name).collect(),
            policy_header: policy_value(&policy.rules),
            scope: policy.scope.unwrap_or(default_scope),
            rules: policy.rules,
            invalid,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Route {
    method: Option<Method>,
    path: String,
    prefix: bool,
    pub(crate) policy: CompiledPolicy,
}

impl Route {
    fn matches(&self, parts: &Parts) -> bool {
        if self.method.as_ref().is_some_and(|m| m != parts.method) {
            return false;
        }
        let path = parts.uri.path();
        if self.prefix {
            path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) policies: Arc<Vec<Route>>,
    pub(crate) default: Option<Arc<CompiledPolicy>>,
    pub(crate) key: KeyExtractor,
    pub(crate) cost: Option<Arc<CostFn>>,
    pub(crate) timeout: Duration,
    pub(crate) failure_mode: FailureMode,
    pub(crate) missing_key: MissingKey,
    pub(crate) deny_cache: bool,
    pub(crate) shadow: bool,
    pub(crate) headers: Headers,
    pub(crate) legacy_headers: bool,
    pub(crate) rejection: Option<Arc<RejectionFn>>,
}

/// Index of the default policy in the deny cache; routes use their position.
pub(crate) const DEFAULT_POLICY: usize = usize::MAX;

impl Config {
    /// Whether responses carry the rules' state, so the store must report it.
    pub(crate) fn wants_state(&self) -> bool {
        self.headers == Headers::All || self.legacy_headers
    }

    /// The policy for a request, with its index for the deny cache.
    pub(crate) fn select(&self, parts: &Parts) -> Option<(usize, &CompiledPolicy)> {
        self.policies
            .iter()
            .position(|r| r.matches(parts))
            .and_then(|i| Some((i, &self.policies.get(i)?.policy)))
            .or_else(|| self.default.as_deref().map(|p| (DEFAULT_POLICY, p)))
    }
}

impl<B> RateLimitLayer<B> {
    /// Limits every request with `policy` (a [`Rule`] or a [`Policy`] of several rules), keyed by
    /// the peer IP address unless [`key`](Self::key) says otherwise.
    pub fn new(store: B, policy: impl Into<Policy>) -> Self {
        let mut layer = Self::routed(store);
        layer.config_mut().default =
            Some(Arc::new(CompiledPolicy::new(policy.into(), String::new())));
        layer
    }

    /// A layer with no default policy: only requests that match a [`route`](Self::route) are
    /// limited, each by its own policy. For a plain hyper or tower service that has no router.
    pub fn routed(store: B) -> Self {
        Self {
            store: Arc::new(store),
            config: Arc::new(Config {
                policies: Arc::new(Vec::new()),
                default: None,
                key: KeyExtractor::default(),
                cost: None,
                timeout: Duration::from_millis(250),
                failure_mode: FailureMode::Open,
                missing_key: MissingKey::default(),
                deny_cache: true,
                shadow: false,
                headers: Headers::default(),
                legacy_headers: false,
                rejection: None,
            }),
            deny_cache: Arc::new(DenyCache::new()),
        }
    }

    /// Limits requests with this `method` (or any method for `None`) and `path` by `policy`.
    /// A path that ends in `*` matches every path with that prefix. The first matching route
    /// wins; requests that match none use the default policy, or pass unlimited in a
    /// [`routed`](Self::routed) layer.
    pub fn route(mut self, method: Option<Method>, path: &str, policy: impl Into<Policy>) -> Self {
        let (path, prefix) = match path.strip_suffix('*') {
            Some(p) => (p.to_owned(), true),
            None => (path.to_owned(), false),
        };
        let scope = format!(
            "{} {}{}",
            method.as_ref().map_or("*", Method::as_str),
            path,
            if prefix { "*" } else { "" }
        );
        let route = Route {
            method,
            path,
            prefix,
            policy: CompiledPolicy::new(policy.into(), scope),
        };
        Arc::make_mut(&mut self.config_mut().policies).push(route);
        self
    }

    /// Where the key of a request comes from (default: the peer IP address).
    pub fn key(mut self, key: KeyExtractor) -> Self {
        self.config_mut().key = key;
        self
    }

    /// The cost of a request, in units of the rules' limits (default 1). A cost of 0 only reads
    /// the state.
    pub fn cost<F>(mut self, cost: F) -> Self
    where
        F: Fn(&Parts) -> u64 + Send + Sync + 'static,
    {
        self.config_mut().cost = Some(Arc::new(cost));
        self
    }

    /// How long a store call may take before it counts as failed (default 250 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().timeout = timeout;
        self
    }

    /// What to do when the store fails or times out (default [`FailureMode::Open`]).
    pub fn on_store_error(mut self, mode: FailureMode) -> Self {
        self.config_mut().failure_mode = mode;
        self
    }

    /// What to do when a request has no key (default [`MissingKey::Reject`]).
    pub fn on_missing_key(mut self, action: MissingKey) -> Self {
        self.config_mut().missing_key = action;
        self
    }

    /// Turns off the local deny cache. With it on (the default), once the store says a key is
    /// denied for `t`, this process rejects that key (at the same or a higher cost) for `t`
    /// without asking the store. It never admits more than the store would.
    pub fn no_deny_cache(mut self) -> Self {
        self.config_mut().deny_cache = false;
        self
    }

    /// Shadow mode: decide, log and add headers as usual, but never reject.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.config_mut().shadow = shadow;
        self
    }

    /// Which responses carry the `RateLimit` / `RateLimit-Policy` fields (default: rejections).
    pub fn headers(mut self, headers: Headers) -> Self {
        self.config_mut().headers = headers;
        self
    }

    /// Also sends the legacy `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
    /// `X-RateLimit-Reset` (seconds) fields, for the rule closest to denying.
    pub fn legacy_headers(mut self, legacy: bool) -> Self {
        self.config_mut().legacy_headers = legacy;
        self
    }

    /// Builds the responses the layer sends itself (429, 503, and 400 for a missing key). The
    /// layer adds `Retry-After` and the `RateLimit` fields unless the response has them.
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

impl<B> Clone for RateLimitLayer<B> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            config: Arc::clone(&self.config),
            deny_cache: Arc::clone(&self.deny_cache),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for RateLimitLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("RateLimitLayer")
            .field("store", &self.store)
            .field("default", &c.default.as_ref().map(|p| &p.rules))
            .field("routes", &c.policies.len())
            .field("key", &c.key)
            .field("timeout", &c.timeout)
            .field("failure_mode", &c.failure_mode)
            .field("missing_key", &c.missing_key)
            .field("deny_cache", &c.deny_cache)
            .field("shadow", &c.shadow)
            .field("headers", &c.headers)
            .finish_non_exhaustive()
    }
}

impl<S, B> Layer<S> for RateLimitLayer<B> {
    type Service = RateLimit<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::from_layer(inner, self)
    }
}
