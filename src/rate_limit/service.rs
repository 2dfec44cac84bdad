use std::{
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::{
    decision::{self, Answer, Check, Pending, TARGET},
    future::{checking, Checking, ResponseFuture},
    head::Head,
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

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // What to do is decided from the request read in place (unless a closure of the
        // configuration needs its `Parts`), and the request is moved once: to the inner
        // service, or into the future that waits for a remote store.
        let step = if self.shared.config.reads_parts() {
            let (parts, body) = req.into_parts();
            let step = step(&self.shared, Head::of_parts(&parts));
            req = Request::from_parts(parts, body);
            step
        } else {
            step(&self.shared, Head::of_request(&req))
        };
        match step {
            Step::Call(headers, reservation) => {
                ResponseFuture::running(self.inner.call(req), headers, reservation)
            }
            Step::Reject(response) => ResponseFuture::rejected(response),
            Step::Wait(checking, reservation) => {
                let ready = self.take_ready();
                ResponseFuture::checking(checking, ready, req, reservation)
            }
        }
    }
}

/// What the service does with a request, as [`step`] decides it from the request's head (`S`
/// and `R`: the inner service and the request a wait hands over).
enum Step<B: RateLimitStore, S, R> {
    /// Call the inner service, then add these fields to its response (and settle the
    /// reservation, already taken, with it).
    Call(Option<Box<HeaderMap>>, Option<Reservation<B>>),
    /// Answer with this response; the inner service is not called.
    Reject(Response<Bytes>),
    /// Wait for a remote store's answer (the wait boxed once, here), with the request's
    /// reservation, not yet taken.
    Wait(Pin<Box<Checking<B, S, R>>>, Option<Reservation<B>>),
}

impl<B: RateLimitStore, S, R> Step<B, S, R> {
    /// The step of `answer`; a metered request's `reservation` is taken when the answer took
    /// its cost.
    #[inline]
    fn of(answer: Answer, reservation: Option<Reservation<B>>) -> Self {
        match answer {
            Answer::Admit(headers) => Self::Call(headers, None),
            Answer::Taken(headers, taken) => {
                Self::Call(headers, reservation.map(|r| r.taken(taken)))
            }
            Answer::Reject(response) => Self::Reject(response),
        }
    }
}

/// What to do with the request whose head is `head`: its policy (a route's, else the named
/// policy the resolver picks, or the default one), its key and cost, and the store's answer
/// when the store answers at once (in process, or from a leased batch), as a synchronous
/// limiter would (no clone of the inner service, no state machine around the check).
fn step<B: RateLimitStore, S, R>(shared: &Arc<Shared<B>>, head: Head<'_>) -> Step<B, S, R> {
    let config = &shared.config;
    // The layer's policies as they are now: a lock-free read, held until the step is decided
    // (a request waiting for the store holds its policy itself).
    let loaded;
    let policy = match config.route(head) {
        Some(policy) => policy,
        None => {
            let named = match config.policies.unchanged() {
                Some(first) => first,
                None => {
                    loaded = config.policies.load();
                    &**loaded
                }
            };
            match named.select(config.resolver.as_deref(), head) {
                Some(policy) => policy,
                None => return Step::Call(None, None),
            }
        }
    };
    let remote = shared.store.is_remote();
    let key = match key_of(config, policy, head, KeyHash::of_store(remote)) {
        Keyed::Key(key) => key,
        Keyed::Answered(answer) => return Step::of(answer, None),
    };
    // A layer with a cost takes each request apart for it (`Config::reads_parts`).
    let cost = match (&config.cost, head.parts) {
        (Some(f), Some(parts)) => f(parts),
        _ => 1,
    };

    if remote && config.deny_cache && !config.shadow {
        if let Some((wait, rule)) = shared.deny_cache.get(policy.id, &key, cost) {
            return Step::Reject(decision::denied_locally(config, policy, &key, rule, wait));
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
    if let Some(result) = shared.store.check_now(rate_check) {
        return Step::of(check.answer(shared, policy, result), reservation);
    }
    let check_future = shared.store.check(rate_check);
    let pending = Pending::new(shared, policy, check);
    let timeout = remote.then_some(config.store_timeout);
    Step::Wait(checking(check_future, timeout, pending), reservation)
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
