use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use super::{
    future::{Next, ResponseFuture, Waiting},
    layer::Shared,
    ThrottleError, ThrottleLayer,
};
use crate::{
    rate_limit::Policy,
    store::{RateCheck, RateLimitStore, StoreError},
};

/// Middleware that delays requests until a rate limit lets them through; see the
/// [module docs](super) for an example.
///
/// Made by a [`ThrottleLayer`]; [`Throttle::new`] is the short form with the default options.
pub struct Throttle<S, B> {
    inner: S,
    shared: Arc<Shared<B>>,
}

impl<S, B> Throttle<S, B> {
    /// Throttles `inner` with `policy`, keeping the counters in `store`, with the default
    /// options of [`ThrottleLayer::new`].
    pub fn new(inner: S, store: B, policy: Policy) -> Self {
        ThrottleLayer::new(store, policy).layer(inner)
    }
}

// Not in the block above: there `S` could not be inferred from a call to `layer`.
impl<B> Throttle<(), B> {
    /// A [`ThrottleLayer`] for `policy` (the same as [`ThrottleLayer::new`]).
    pub fn layer(store: B, policy: Policy) -> ThrottleLayer<B> {
        ThrottleLayer::new(store, policy)
    }
}

impl<S, B> Layer<S> for ThrottleLayer<B> {
    type Service = Throttle<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        Throttle {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

middleware_service!(Throttle { shared });

impl<S, B, ReqBody> Service<Request<ReqBody>> for Throttle<S, B>
where
    S: Service<Request<ReqBody>> + Clone,
    B: RateLimitStore,
{
    type Response = S::Response;
    type Error = ThrottleError<S::Error>;
    type Future = ResponseFuture<S, B, ReqBody>;

    /// The inner service's readiness: the wait happens after `call`, in the response future
    /// (see the module docs on readiness).
    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ThrottleError::Inner)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        let policy = &config.policy;
        if let Some(problem) = &policy.invalid {
            tracing::error!(target: super::TARGET, %problem, "invalid throttle policy");
            let error = StoreError::Invalid(problem.clone());
            return ResponseFuture::failed(ThrottleError::Store(error));
        }
        let (parts, body) = req.into_parts();
        let Some(raw) = config.key.extract(&parts) else {
            tracing::warn!(target: super::TARGET, "no throttle key in the request");
            return ResponseFuture::failed(ThrottleError::MissingKey);
        };
        let key = raw.hash(&policy.namespace);
        let cost = config.cost.as_ref().map_or(1, |f| f(&parts));
        if let Some(rule) = policy.rules.iter().find(|r| cost > r.quota()) {
            return ResponseFuture::failed(ThrottleError::OverQuota {
                rule: rule.policy_name(),
                cost,
                quota: rule.quota(),
            });
        }
        let req = Request::from_parts(parts, body);
        let store = &self.shared.store;
        let check = RateCheck::new(&key, &policy.rules, cost, false);
        if !store.is_remote() {
            // An in-process store answers at once: a request that passes is sent from here.
            if let Some(result) = store.check_now(check) {
                let mut waiting = Waiting::new(&self.shared, key, cost);
                return match waiting.next(result) {
                    Next::Send => ResponseFuture::running(self.inner.call(req)),
                    Next::Sleep(wait) => {
                        ResponseFuture::sleeping(waiting, wait, self.take_ready(), req)
                    }
                    Next::Fail(error) => ResponseFuture::failed(error),
                };
            }
        }
        let future = store.check(check);
        let waiting = Waiting::new(&self.shared, key, cost);
        ResponseFuture::checking(waiting, future, self.take_ready(), req)
    }
}
