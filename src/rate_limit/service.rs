use std::{
    marker::PhantomData,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::{
    decision::{self, Answer, Check, Pending, TARGET},
    future::ResponseFuture,
    head::{Head, Incoming},
    layer::{Config, Shared},
    policy::{CompiledPolicy, METERED_STRATEGIES},
    settle::Reservation,
    MissingKey, Policy, RateLimitLayer,
};
use crate::{
    body::{BodyKind, Wrapped},
    key::{KeyHash, StoreKey},
    store::{RateCheck, RateLimitStore},
};

/// Middleware that rate-limits requests; see the [module docs](super) for an example.
///
/// Made by a [`RateLimitLayer`]; [`RateLimit::new`] is the short form for one policy with the
/// default options.
pub struct RateLimit<S, B, K = Wrapped> {
    inner: S,
    shared: Arc<Shared<B>>,
    kind: PhantomData<fn() -> K>,
}

impl<S, B> RateLimit<S, B> {
    /// Limits `inner` with `policy`, keeping the counters in `store`, with the default options
    /// of [`RateLimitLayer::new`].
    pub fn new(inner: S, store: B, policy: Policy) -> Self {
        RateLimitLayer::new(store, policy).layer(inner)
    }
}

// Not in the block above: there `S` could not be inferred from a call to `layer`.
impl<B> RateLimit<(), B> {
    /// A [`RateLimitLayer`] for `policy` (the same as [`RateLimitLayer::new`]).
    pub fn layer(store: B, policy: Policy) -> RateLimitLayer<B> {
        RateLimitLayer::new(store, policy)
    }
}

impl<S, B, K> Layer<S> for RateLimitLayer<B, K> {
    type Service = RateLimit<S, B, K>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            shared: Arc::clone(&self.shared),
            kind: PhantomData,
        }
    }
}

middleware_service!(RateLimit<K> { shared });

impl<S, B, K, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, B, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    B: RateLimitStore,
    K: BodyKind<ResBody>,
{
    type Response = Response<K::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, ReqBody, K>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Read in place, unless a closure of the configuration needs the request's `Parts`.
        if self.shared.config.reads_parts() {
            self.limit(req.into_parts())
        } else {
            self.limit(req)
        }
    }
}

impl<S, B, K> RateLimit<S, B, K>
where
    B: RateLimitStore,
{
    /// `call`, for a request whole or taken apart (see [`Incoming`]).
    #[inline(always)]
    fn limit<ReqBody, ResBody, R>(&mut self, req: R) -> ResponseFuture<S, B, ReqBody, K>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
        R: Incoming<ReqBody>,
    {
        let shared = &self.shared;
        let config = &shared.config;
        let head = req.head();
        // A route's policy, else the named policy the resolver picks (or the default one), as
        // the layer's policies are now: a lock-free read, held until `call` returns (a request
        // waiting for the store holds its policy itself).
        let named;
        let policy = match config.route(head) {
            Some(policy) => policy,
            None => {
                named = config.policies.load();
                match named.select(config.resolver.as_deref(), head) {
                    Some(policy) => policy,
                    None => {
                        drop(named);
                        let req = req.into_request();
                        return ResponseFuture::running(self.inner.call(req), None, None);
                    }
                }
            }
        };
        let remote = shared.store.is_remote();
        let key = match key_of(config, policy, head, KeyHash::of_store(remote)) {
            Keyed::Key(key) => key,
            Keyed::Answered(answer) => {
                return respond(&mut self.inner, req.into_request(), answer, None);
            }
        };
        // A layer with a cost takes each request apart for it (`Config::reads_parts`).
        let cost = match (&config.cost, head.parts) {
            (Some(f), Some(parts)) => f(parts),
            _ => 1,
        };
        let req = req.into_request();

        if remote && config.deny_cache && !config.shadow {
            if let Some((wait, rule)) = shared.deny_cache.get(policy.id, &key, cost) {
                let response = decision::denied_locally(config, policy, &key, rule, wait);
                return ResponseFuture::rejected(response);
            }
        }

        let rate_check = RateCheck {
            key: &key,
            rules: &policy.rules,
            cost,
            want_state: config.wants_state(),
        };
        let reservation = Reservation::new(shared, policy, key, cost);
        let check = Check {
            key,
            cost,
            remote,
            #[cfg(feature = "metrics")]
            started: remote.then(std::time::Instant::now),
        };
        // A store that can answer at once (in process, or from a leased batch) does: call the
        // inner service from here, as a synchronous limiter would (no clone of it, no state
        // machine around the check).
        if let Some(result) = shared.store.check_now(rate_check) {
            let answer = check.answer(shared, policy, result);
            return respond(&mut self.inner, req, answer, reservation);
        }
        let future = shared.store.check(rate_check);
        let pending = Pending::new(shared, policy, check);
        let timeout = remote.then_some(config.store_timeout);
        let ready = self.take_ready();
        ResponseFuture::checking(future, timeout, ready, req, pending, reservation)
    }
}

/// The store key of a request, or the answer when the store is not asked.
enum Keyed {
    Key(StoreKey),
    Answered(Answer),
}

/// The store key of a request under `policy` (hashed as `hash` says), or what to do instead
/// when there is none.
fn key_of(config: &Config, policy: &CompiledPolicy, head: Head<'_>, hash: KeyHash) -> Keyed {
    if let Some(problem) = &policy.invalid {
        tracing::error!(target: TARGET, %problem, "invalid rate-limit policy");
        return Keyed::Answered(decision::failed(config));
    }
    if config.settlement.is_some() && !policy.settles {
        let problem = METERED_STRATEGIES;
        tracing::error!(target: TARGET, policy = policy.name, %problem, "invalid rate-limit policy");
        return Keyed::Answered(decision::failed(config));
    }
    if let Some(raw) = config.key.extract_head(head) {
        return Keyed::Key(raw.hash_with(&policy.namespace, hash));
    }
    match config.missing_key {
        MissingKey::Allow => Keyed::Answered(Answer::Admit(None)),
        MissingKey::Shared => Keyed::Key(policy.namespace.key(hash, [b"missing".as_slice()])),
        MissingKey::Reject => {
            tracing::warn!(
                target: TARGET,
                method = %head.method,
                path = head.uri.path(),
                "no rate-limit key in the request (for the peer IP, serve with \
                 into_make_service_with_connect_info::<SocketAddr>())"
            );
            Keyed::Answered(Answer::Reject(decision::missing_key(config)))
        }
    }
}

/// Runs the inner service or rejects, as `answer` says; a metered request's `reservation` is
/// taken when the answer took its cost.
fn respond<S, B, K, ReqBody, ResBody>(
    inner: &mut S,
    req: Request<ReqBody>,
    answer: Answer,
    reservation: Option<Reservation<B>>,
) -> ResponseFuture<S, B, ReqBody, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    B: RateLimitStore,
{
    match answer {
        Answer::Admit(headers) => ResponseFuture::running(inner.call(req), headers, None),
        Answer::Taken(headers, taken) => {
            let reservation = reservation.map(|r| r.taken(taken));
            ResponseFuture::running(inner.call(req), headers, reservation)
        }
        Answer::Reject(response) => ResponseFuture::rejected(response),
    }
}
