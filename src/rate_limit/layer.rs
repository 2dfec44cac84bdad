use std::{fmt, marker::PhantomData, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{request::Parts, Method, Response};

use super::{
    deny_cache::DenyCache,
    fallback::Local,
    head::Head,
    headers::Fields,
    policy::{CompiledPolicy, Route},
    resolver::{Context, PolicySet, ResolverFn},
    Headers, KeyExtractor, LocalFallback, Policy, Settlement,
};
use crate::{
    body::{InnerBody, Wrapped},
    store::FailureMode,
};

/// Applies rate limits to requests; see the [module docs](super) for an example.
///
/// Holds the configuration and the store. Cloning is cheap, and every service made by one layer
/// (and its clones) shares the store and the local deny cache.
///
/// `K` is the [body](crate::BodyKind) of its responses: a [`ResponseBody`](crate::ResponseBody)
/// around the inner service's body ([`Wrapped`], the default), or the inner body type itself
/// ([`InnerBody`], see [`inner_body`](Self::inner_body)).
pub struct RateLimitLayer<B, K = Wrapped> {
    pub(crate) shared: Arc<Shared<B>>,
    kind: PhantomData<fn() -> K>,
}

/// What a layer and every service it makes share.
pub(crate) struct Shared<B> {
    pub(crate) store: Arc<B>,
    pub(crate) config: Config,
    pub(crate) deny_cache: Arc<DenyCache>,
    /// The local fallback's counts.
    pub(crate) local: Arc<Local>,
}

// Not derived: a store need not be `Clone`.
impl<B> Clone for Shared<B> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            config: self.config.clone(),
            deny_cache: Arc::clone(&self.deny_cache),
            local: Arc::clone(&self.local),
        }
    }
}

/// What to do with a request whose key cannot be extracted (for example no `x-api-key` header
/// and no peer address); see [`RateLimitLayer::on_missing_key`].
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

/// Why the layer answered a request itself: what a [`RateLimitLayer::rejection`] builder is
/// given.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// A rule denied the request.
    #[non_exhaustive]
    Limited {
        /// The name of the rule with the longest wait.
        rule: String,
        /// The names of every rule the request exceeded, `rule` among them, in the order of
        /// the `RateLimit` field: the `violated-policies` of the default body.
        violated_policies: Vec<String>,
        /// How long until a request of the same cost can pass.
        retry_after: Duration,
    },
    /// The store failed and the layer fails closed.
    Unavailable,
    /// The key could not be extracted and [`MissingKey::Reject`] is set.
    MissingKey,
}

pub(crate) type RejectionFn = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;
type CostFn = dyn Fn(&Parts) -> u64 + Send + Sync;

/// The configuration of a layer.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) routes: Vec<Route>,
    /// The named policies (the default policy among them), changed at runtime through
    /// [`RateLimitLayer::policies`].
    pub(crate) policies: PolicySet,
    /// Names the policy of a request that no route matches.
    pub(crate) resolver: Option<Arc<ResolverFn>>,
    pub(crate) scope: String,
    pub(crate) key: KeyExtractor,
    pub(crate) cost: Option<Arc<CostFn>>,
    /// Whether a closure above reads a request's `Parts` (a resolver, a custom key, a cost):
    /// only then is a request taken apart (see [`Head`]). Set with each of them.
    reads_parts: bool,
    pub(crate) settlement: Option<Settlement>,
    pub(crate) store_timeout: Duration,
    pub(crate) failure_mode: FailureMode,
    pub(crate) local_fallback: Option<LocalFallback>,
    pub(crate) missing_key: MissingKey,
    pub(crate) deny_cache: bool,
    pub(crate) shadow: bool,
    pub(crate) headers: Headers,
    pub(crate) legacy_headers: bool,
    pub(crate) rejection: Option<Arc<RejectionFn>>,
}

impl Config {
    /// The replicas the local fallback divides quotas among (1 without a fallback).
    fn replicas(&self) -> u32 {
        self.local_fallback.map_or(1, |f| f.replicas)
    }

    /// What the named policies are compiled with.
    fn context(&self) -> Context {
        Context {
            layer_scope: self.scope.clone(),
            replicas: self.replicas(),
            metered: self.settlement.is_some(),
        }
    }
}

impl Config {
    /// The fields of an admitted response.
    pub(crate) fn admission_fields(&self) -> Fields {
        Fields {
            ietf: self.headers == Headers::All,
            legacy: self.legacy_headers,
        }
    }

    /// The fields of a response the layer denies (or, in shadow mode, would deny).
    pub(crate) fn denial_fields(&self) -> Fields {
        Fields {
            ietf: true,
            legacy: self.legacy_headers,
        }
    }

    /// Whether admitted responses carry the rules' state, so the store must report it (a
    /// denial's state is always reported).
    pub(crate) fn wants_state(&self) -> bool {
        let fields = self.admission_fields();
        fields.ietf || fields.legacy
    }

    /// Whether a closure of the configuration reads a request's `Parts` (a custom key, a
    /// cost, a resolver): only then is a request taken apart (see [`Head`]).
    #[inline]
    pub(crate) fn reads_parts(&self) -> bool {
        self.reads_parts
    }

    /// Notes whether a closure reads a request's `Parts`, after one was set.
    fn closures_set(&mut self) {
        self.reads_parts = self.cost.is_some() || self.resolver.is_some() || self.key.reads_parts();
    }

    /// The policy of the first route that matches a request, if one does; else the request's
    /// policy is selected from the named ones (`Policies::select`).
    #[inline]
    pub(crate) fn route(&self, head: Head<'_>) -> Option<&Arc<CompiledPolicy>> {
        self.routes
            .iter()
            .find(|r| r.matches(head))
            .map(|r| &r.policy)
    }

    /// Every policy named `name`, as it is now: the routes' (in their order), then the named
    /// policy of that name (the default policy among them).
    pub(crate) fn policies_named(&self, name: &str) -> Vec<Arc<CompiledPolicy>> {
        let routes = self.routes.iter().map(|r| &r.policy);
        let mut found: Vec<_> = routes.filter(|p| p.name == name).cloned().collect();
        found.extend(self.policies.load().get(name).cloned());
        found
    }
}

impl<B> RateLimitLayer<B> {
    /// Limits every request with `policy`, keyed by the peer IP address unless
    /// [`key`](Self::key) says otherwise. The policy's counters are its own (named by the
    /// policy's name) unless it has a [scope](Policy::scope).
    ///
    /// The policy is also the layer's default named policy: with a
    /// [`resolver`](Self::resolver), the policy of every request that the resolver does not
    /// name, and its limits can change at runtime through [`policies`](Self::policies).
    pub fn new(store: B, policy: Policy) -> Self {
        let mut layer = Self::routed(store);
        layer.configure_policies(Some((policy, true)));
        layer
    }

    /// A layer with no default policy: only requests that match a [`route`](Self::route) are
    /// limited, each by its own policy. For a plain hyper or tower service that has no router.
    pub fn routed(store: B) -> Self {
        Self {
            shared: Arc::new(Shared {
                store: Arc::new(store),
                config: Config {
                    routes: Vec::new(),
                    policies: PolicySet::empty(),
                    resolver: None,
                    scope: String::new(),
                    key: KeyExtractor::default(),
                    cost: None,
                    reads_parts: false,
                    settlement: None,
                    store_timeout: Duration::from_millis(250),
                    failure_mode: FailureMode::Open,
                    local_fallback: Some(LocalFallback::default()),
                    missing_key: MissingKey::default(),
                    deny_cache: true,
                    shadow: false,
                    headers: Headers::default(),
                    legacy_headers: false,
                    rejection: None,
                },
                deny_cache: Arc::new(DenyCache::new()),
                local: Arc::new(Local::new()),
            }),
            kind: PhantomData,
        }
    }
}

impl<B, K> RateLimitLayer<B, K> {
    /// Answers with the inner service's own body type instead of a
    /// [`ResponseBody`](crate::ResponseBody) around it, making the body of the layer's own
    /// responses (a rejection) with `From<Bytes>`: see [`InnerBody`].
    ///
    /// For axum, whose `Body` can be made from bytes: the router then passes the layer's
    /// responses on as they are instead of boxing each body once more.
    ///
    /// ```
    /// use std::time::Duration;
    /// use axum::{routing::get, Router};
    /// use tower_redis_layers::rate_limit::{Policy, RateLimitLayer, Rule};
    /// use tower_redis_layers::store::MemoryStore;
    ///
    /// let policy = Policy::new("api", Rule::gcra(100, Duration::from_secs(1), 20));
    /// let app: Router = Router::new()
    ///     .route("/", get(|| async { "hi" }))
    ///     .layer(RateLimitLayer::new(MemoryStore::new(), policy).inner_body());
    /// # let _ = app;
    /// ```
    pub fn inner_body(self) -> RateLimitLayer<B, InnerBody> {
        RateLimitLayer {
            shared: self.shared,
            kind: PhantomData,
        }
    }

    /// Limits requests with this `method` (or any method for `None`) and `path` by `policy`.
    /// A path that ends in `*` matches every path with that prefix. The first matching route
    /// wins; requests that match none use the default policy, or pass unlimited in a
    /// [`routed`](Self::routed) layer.
    ///
    /// The route's counters are its own: they are named by the policy's name, the method and
    /// the path, unless the policy has a [scope](Policy::scope).
    pub fn route(mut self, method: Option<Method>, path: &str, policy: Policy) -> Self {
        let config = self.config_mut();
        let mut route = Route::new(method, path, policy, &config.scope);
        Arc::make_mut(&mut route.policy).set_replicas(config.replicas());
        config.routes.push(route);
        self
    }

    /// Chooses the policy of each request at runtime: `resolver` names it, among the policies
    /// added with [`policy`](Self::policy) (and the default policy of
    /// [`new`](Self::new)), from anything in the request, typically what an authentication
    /// layer in front put in its extensions (the customer's tier).
    ///
    /// A request whose policy the resolver does not name (`None`), or names a policy the layer
    /// does not have (logged as a warning), is limited by the default policy, or passes
    /// unlimited in a [`routed`](Self::routed) layer, as a request that matches no route does.
    /// [Routes](Self::route) come first: the resolver is asked only for a request that matches
    /// none.
    ///
    /// Each named policy counts on its own (its name is in its counters' names): a key that
    /// moves from one tier to another starts with the other tier's own counters. The policies
    /// can change while the service runs, through [`policies`](Self::policies). See the
    /// [module docs](super#limits-chosen-at-runtime) for an example.
    pub fn resolver<F>(mut self, resolver: F) -> Self
    where
        F: for<'a> Fn(&'a Parts) -> Option<&'a str> + Send + Sync + 'static,
    {
        let config = self.config_mut();
        config.resolver = Some(Arc::new(resolver));
        config.closures_set();
        self
    }

    /// Adds a named policy for the [`resolver`](Self::resolver) to choose (replacing one of
    /// the same name, the default policy too). Its counters are its own, named by the policy's
    /// name unless it has a [scope](Policy::scope). A policy that cannot limit requests is
    /// handled like every invalid policy: logged as an error on each request, and by
    /// [`on_store_error`](Self::on_store_error) (at runtime, [`PolicySet::insert`] refuses it).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.configure_policies(Some((policy, false)));
        self
    }

    /// The named policies of this layer (the default policy among them), to change them while
    /// the service runs: see [`PolicySet`]. Every clone of the set, of this layer and of the
    /// services it made, shares them.
    ///
    /// Take it once the layer is configured: [`policy`](Self::policy),
    /// [`scope`](Self::scope), [`local_fallback`](Self::local_fallback) and
    /// [`settlement`](Self::settlement) give the layer they return a set of its own (as every
    /// builder method gives it a configuration of its own), which a set taken before does not
    /// change.
    pub fn policies(&self) -> PolicySet {
        self.shared.config.policies.clone()
    }

    /// A namespace for every counter of this layer in the store (default: none), so that layers
    /// or services sharing a store never share a budget by accident.
    ///
    /// The counters of a request are named by the layer's scope, then the policy's
    /// [scope](Policy::scope) (by default its name, and for a route its method and path), then
    /// the request's [key](Self::key), then the rule. Layers with the same scope (or none) and
    /// policies with the same names (or scopes) and rules share their counters: that is how the
    /// replicas of one service agree.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        let config = self.config_mut();
        config.scope = scope.into();
        let layer_scope = &config.scope;
        for route in &mut config.routes {
            Arc::make_mut(&mut route.policy).set_layer_scope(layer_scope);
        }
        self.configure_policies(None);
        self
    }

    /// Where the key of a request comes from (default: the peer IP address).
    pub fn key(mut self, key: KeyExtractor) -> Self {
        let config = self.config_mut();
        config.key = key;
        config.closures_set();
        self
    }

    /// The cost of a request, in units of the rules' limits (default 1). A cost of 0 only reads
    /// the state. With a [`settlement`](Self::settlement), it is the estimate taken before the
    /// inner service runs.
    pub fn cost<F>(mut self, cost: F) -> Self
    where
        F: Fn(&Parts) -> u64 + Send + Sync + 'static,
    {
        let config = self.config_mut();
        config.cost = Some(Arc::new(cost));
        config.closures_set();
        self
    }

    /// Meters requests whose cost is known only once the inner service answered (default off):
    /// a request is admitted if its estimate (the [`cost`](Self::cost)) fits and takes it, then
    /// the difference with the actual cost that the response reports (see [`Settlement`]) is
    /// charged or refunded in one more store call, in the background. An error of the inner
    /// service, or a response future dropped unfinished, refunds the estimate.
    ///
    /// Fixed window, calendar, token bucket and GCRA rules settle; a policy with a sliding log or
    /// sliding window rule is invalid in a metered layer (logged as an error on each request,
    /// and handled by [`on_store_error`](Self::on_store_error), default open). See the
    /// [module docs](super#metered-costs).
    ///
    /// It turns the local deny cache off (see [`no_deny_cache`](Self::no_deny_cache)): a
    /// refund can make room before a cached denial's time is up, so every request of a metered
    /// layer asks the store.
    pub fn settlement(mut self, settlement: Settlement) -> Self {
        let config = self.config_mut();
        config.settlement = Some(settlement);
        config.deny_cache = false;
        self.configure_policies(None);
        self
    }

    /// How long a store call may take before it counts as failed (default 250 ms); then
    /// [`on_store_error`](Self::on_store_error) applies. Not applied to an in-process store.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().store_timeout = timeout;
        self
    }

    /// What to do when the store fails or times out, instead of the
    /// [local fallback](Self::local_fallback) (which this turns off): [`FailureMode::Open`]
    /// lets the request through unlimited, [`FailureMode::Closed`] answers `503` with
    /// `Retry-After: 1`. A warning is logged either way. An invalid policy is handled by this
    /// mode in every case (default [`FailureMode::Open`]).
    pub fn on_store_error(mut self, mode: FailureMode) -> Self {
        let config = self.config_mut();
        config.failure_mode = mode;
        config.local_fallback = None;
        self
    }

    /// When the store fails or times out, enforce the same rules in this process, each quota
    /// divided among `fallback`'s replicas: during an outage at most
    /// `limit × replicas running / replicas configured` requests per window are admitted. The
    /// default, with one replica ([`LocalFallback::default`]). See [`LocalFallback`].
    pub fn local_fallback(mut self, fallback: LocalFallback) -> Self {
        let config = self.config_mut();
        config.local_fallback = Some(fallback);
        let replicas = fallback.replicas;
        for route in &mut config.routes {
            Arc::make_mut(&mut route.policy).set_replicas(replicas);
        }
        self.configure_policies(None);
        self
    }

    /// Turns the local fallback off: on a store failure,
    /// [`on_store_error`](Self::on_store_error) applies (default [`FailureMode::Open`]).
    pub fn no_local_fallback(mut self) -> Self {
        self.config_mut().local_fallback = None;
        self
    }

    /// What to do when a request has no key (default [`MissingKey::Reject`]).
    pub fn on_missing_key(mut self, action: MissingKey) -> Self {
        self.config_mut().missing_key = action;
        self
    }

    /// Turns off the local deny cache. With it on (the default), once the store says a key is
    /// denied for `t`, this process rejects that key (at the same or a higher cost) for `t`
    /// without asking the store. It never admits more than the store would. Its answers carry
    /// the fields of the denying rule only (the others' state is not known without the store).
    pub fn no_deny_cache(mut self) -> Self {
        self.config_mut().deny_cache = false;
        self
    }

    /// Shadow mode (default off): decide, log and add headers as usual, but never reject.
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
    /// `X-RateLimit-Reset` (seconds) fields, for the rule closest to denying (default off).
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
        &mut Arc::make_mut(&mut self.shared).config
    }

    /// Gives the layer a set of named policies of its own, compiled with its configuration
    /// now, with `added` put in (as the default policy when its flag is set).
    fn configure_policies(&mut self, added: Option<(Policy, bool)>) {
        let config = self.config_mut();
        config.policies = config.policies.configured(config.context(), added);
    }
}

impl<B: crate::store::RateLimitStore, K> RateLimitLayer<B, K> {
    /// A handle that reads a key's quota without consuming it, resets a key, and blocks or
    /// allows a key for a while, on every replica (the state is in the store): see
    /// [`RateLimitHandle`](super::RateLimitHandle). Take it once the layer is configured: it
    /// sees the policies, scope, key extractor and store timeout the layer has now.
    pub fn handle(&self) -> super::RateLimitHandle<B> {
        super::RateLimitHandle::new(&self.shared)
    }
}

// The layer's `Layer` impl sits beside the service it makes, in `service.rs`.

impl<B, K> Clone for RateLimitLayer<B, K> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            kind: PhantomData,
        }
    }
}

impl<B: fmt::Debug, K> fmt::Debug for RateLimitLayer<B, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.shared.config;
        f.debug_struct("RateLimitLayer")
            .field("store", &self.shared.store)
            .field("policies", &c.policies)
            .field("resolver", &c.resolver.is_some())
            .field("routes", &c.routes.len())
            .field("scope", &c.scope)
            .field("key", &c.key)
            .field("settlement", &c.settlement)
            .field("store_timeout", &c.store_timeout)
            .field("failure_mode", &c.failure_mode)
            .field("local_fallback", &c.local_fallback)
            .field("missing_key", &c.missing_key)
            .field("deny_cache", &c.deny_cache)
            .field("shadow", &c.shadow)
            .field("headers", &c.headers)
            .field("legacy_headers", &c.legacy_headers)
            .finish_non_exhaustive()
    }
}
