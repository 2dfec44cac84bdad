use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tower_service::Service;

use super::{
    deny_cache::DenyCache,
    future::ResponseFuture,
    headers::{insert_retry_after, insert_state, secs_up, RATELIMIT, RATELIMIT_POLICY},
    layer::{CompiledPolicy, Config, DEFAULT_POLICY},
    Headers, MissingKey, RateLimitLayer, Rejection,
};
use crate::{
    key::StoreKey,
    store::{Decision, RateCheck, RateLimitStore},
};

pub(crate) const TARGET: &str = "tower_redis_layers::rate_limit";

/// Middleware that rate-limits requests; see the [module docs](super) for an example.
pub struct RateLimit<S, B> {
    inner: S,
    shared: Arc<Shared<B>>,
}

pub(crate) struct Shared<B> {
    pub(crate) store: Arc<B>,
    pub(crate) config: Arc<Config>,
    pub(crate) deny_cache: Arc<DenyCache>,
}

impl<B> Shared<B> {
    pub(crate) fn policy(&self, index: usize) -> Option<&CompiledPolicy> {
        if index == DEFAULT_POLICY {
            self.config.default.as_deref()
        } else {
            self.config.policies.get(index).map(|r| &r.policy)
        }
    }
}

impl<S, B> RateLimit<S, B> {
    pub(crate) fn from_layer(inner: S, layer: &RateLimitLayer<B>) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared {
                store: Arc::clone(&layer.store),
                config: Arc::clone(&layer.config),
                deny_cache: Arc::clone(&layer.deny_cache),
            }),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, B> Clone for RateLimit<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: std::fmt::Debug, B> std::fmt::Debug for RateLimit<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// What the future needs once the store has answered.
pub(crate) struct Pending<B> {
    pub(crate) shared: Arc<Shared<B>>,
    pub(crate) policy: usize,
    pub(crate) key: StoreKey,
    pub(crate) cost: u64,
    pub(crate) remote: bool,
    #[cfg(feature = "metrics")]
    /// When a remote store was called (its latency is recorded; an in-process store's is not).
    pub(crate) started: Option<std::time::Instant>,
}

impl<S, B, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, B>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    B: RateLimitStore,
    ResBody: http_body::Body,
{
    type Response = Response<super::ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, ReqBody>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        let config = &shared.config;
        let (parts, body) = req.into_parts();
        let Some((index, policy)) = config.select(&parts) else {
            return ResponseFuture::running(self.inner.call(Request::from_parts(parts, body)));
        };
        if let Some(problem) = &policy.invalid {
            tracing::error!(target: TARGET, %problem, "invalid rate-limit policy");
            return on_store_failure(&mut self.inner, config, Request::from_parts(parts, body));
        }
        let key = match config.key.extract(&parts) {
            Some(raw) => raw.hash(&policy.scope),
            None => match config.missing_key {
                MissingKey::Allow => {
                    return ResponseFuture::running(
                        self.inner.call(Request::from_parts(parts, body)),
                    );
                }
                MissingKey::Shared => StoreKey::from_parts([policy.scope.as_bytes(), b"missing"]),
                MissingKey::Reject => {
                    tracing::warn!(
                        target: TARGET,
                        method = %parts.method,
                        path = parts.uri.path(),
                        "no rate-limit key in the request (for the peer IP, serve with \
                         into_make_service_with_connect_info::<SocketAddr>())"
                    );
                    count("missing_key");
                    return ResponseFuture::rejected(rejection(config, &Rejection::MissingKey));
                }
            },
        };
        let cost = config.cost.as_ref().map_or(1, |f| f(&parts));
        let req = Request::from_parts(parts, body);

        let remote = shared.store.is_remote();
        if remote && config.deny_cache && !config.shadow {
            if let Some((wait, rule)) = shared.deny_cache.get(index, &key, cost) {
                count("denied_local");
                let name = policy.names.get(rule).map_or("", String::as_str);
                tracing::debug!(target: TARGET, key = %key, rule = name, outcome = "denied_local", retry_after_ms = wait.as_millis() as u64);
                let mut response = limited(config, name, wait);
                let headers = response.headers_mut();
                if !headers.contains_key(http::header::RETRY_AFTER) {
                    insert_retry_after(headers, wait);
                }
                if !headers.contains_key(&RATELIMIT) {
                    // `"name";r=0;t=N`, built in one exact allocation (this is the flood path).
                    let mut secs = itoa::Buffer::new();
                    let secs = secs.format(secs_up(wait)).as_bytes();
                    let mut value = Vec::with_capacity(name.len() + 9 + secs.len());
                    value.push(b'"');
                    value.extend_from_slice(name.as_bytes());
                    value.extend_from_slice(b"\";r=0;t=");
                    value.extend_from_slice(secs);
                    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
                        headers.insert(RATELIMIT.clone(), v);
                    }
                    if let Some(p) = &policy.policy_header {
                        headers.insert(RATELIMIT_POLICY.clone(), p.clone());
                    }
                }
                return ResponseFuture::rejected(response);
            }
        }

        let check = RateCheck {
            key: &key,
            rules: &policy.rules,
            cost,
            want_state: config.wants_state(),
        };
        let pending = Pending {
            shared: Arc::clone(shared),
            policy: index,
            key,
            cost,
            remote,
            #[cfg(feature = "metrics")]
            started: remote.then(std::time::Instant::now),
        };
        // An in-process store answers at once: call the inner service from here, as a
        // synchronous limiter would (no clone of it, no state machine around the check).
        if !remote {
            if let Some(result) = shared.store.check_now(check) {
                return match pending.finish(result) {
                    Next::Run(headers) => {
                        ResponseFuture::running_with(self.inner.call(req), headers)
                    }
                    Next::Reject(response) => ResponseFuture::rejected(response),
                };
            }
        }
        let check = shared.store.check(check);
        let timeout = remote.then_some(config.timeout);
        let inner = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, inner);
        ResponseFuture::checking(check, timeout, ready, req, pending)
    }
}

fn on_store_failure<S, B, ReqBody, ResBody>(
    inner: &mut S,
    config: &Config,
    req: Request<ReqBody>,
) -> ResponseFuture<S, B, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    B: RateLimitStore,
{
    match config.failure_mode {
        crate::store::FailureMode::Open => ResponseFuture::running(inner.call(req)),
        crate::store::FailureMode::Closed => ResponseFuture::rejected(unavailable(config)),
    }
}

/// Where the answer of the store leads.
pub(crate) enum Next {
    /// Call the inner service, then add these headers to its response.
    Run(Option<HeaderMap>),
    /// Answer with this response.
    Reject(Response<Bytes>),
}

impl<B> Pending<B> {
    pub(crate) fn finish(self, result: Result<Decision, crate::StoreError>) -> Next {
        #[cfg(feature = "metrics")]
        if let Some(started) = self.started {
            metrics::histogram!("tower_redis_layers_rate_limit_store_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        let shared = &self.shared;
        let config = &shared.config;
        let Some(policy) = shared.policy(self.policy) else {
            return Next::Run(None);
        };
        let decision = match result {
            Ok(decision) => decision,
            Err(error) => {
                count("store_error");
                tracing::warn!(target: TARGET, key = %self.key, %error, fail_open = matches!(config.failure_mode, crate::store::FailureMode::Open), "rate-limit store failed");
                return match config.failure_mode {
                    crate::store::FailureMode::Open => Next::Run(None),
                    crate::store::FailureMode::Closed => Next::Reject(unavailable(config)),
                };
            }
        };
        let rule = decision
            .denied_by
            .and_then(|i| policy.names.get(i))
            .map(String::as_str);
        let remaining = decision
            .rules
            .iter()
            .map(|s| s.remaining)
            .min()
            .unwrap_or(0);
        if decision.allowed {
            count("allowed");
            if config.wants_state() {
                tracing::debug!(target: TARGET, key = %self.key, outcome = "allowed", remaining);
            } else {
                // The store was not asked for the state: `remaining` means nothing here.
                tracing::debug!(target: TARGET, key = %self.key, outcome = "allowed");
            }
            let headers = config.wants_state().then(|| {
                let mut h = HeaderMap::new();
                if config.headers == Headers::All {
                    insert_state(
                        &mut h,
                        &policy.rules,
                        &policy.names,
                        policy.policy_header.as_ref(),
                        &decision,
                        config.legacy_headers,
                    );
                } else {
                    legacy_only(&mut h, policy, &decision);
                }
                h
            });
            return Next::Run(headers);
        }
        let retry_after_ms = decision.retry_after.as_millis() as u64;
        if config.shadow {
            count("denied_shadow");
            tracing::info!(target: TARGET, key = %self.key, rule, outcome = "denied_shadow", retry_after_ms);
            let mut h = HeaderMap::new();
            insert_state(
                &mut h,
                &policy.rules,
                &policy.names,
                policy.policy_header.as_ref(),
                &decision,
                config.legacy_headers,
            );
            return Next::Run(Some(h));
        }
        count("denied");
        tracing::info!(target: TARGET, key = %self.key, rule, outcome = "denied", retry_after_ms);
        if config.deny_cache && self.remote && !decision.retry_after.is_zero() {
            shared.deny_cache.insert(
                self.policy,
                self.key,
                super::deny_cache::Entry {
                    until: tokio::time::Instant::now() + decision.retry_after,
                    cost: self.cost,
                    rule: decision.denied_by.unwrap_or(0),
                },
            );
        }
        let mut response = limited(config, rule.unwrap_or_default(), decision.retry_after);
        let headers = response.headers_mut();
        if !headers.contains_key(http::header::RETRY_AFTER) {
            insert_retry_after(headers, decision.retry_after);
        }
        if !headers.contains_key(&RATELIMIT) {
            insert_state(
                headers,
                &policy.rules,
                &policy.names,
                policy.policy_header.as_ref(),
                &decision,
                config.legacy_headers,
            );
        }
        Next::Reject(response)
    }
}

fn legacy_only(h: &mut HeaderMap, policy: &CompiledPolicy, decision: &Decision) {
    let mut all = HeaderMap::new();
    insert_state(&mut all, &policy.rules, &policy.names, None, decision, true);
    for name in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        if let Some(v) = all.remove(name) {
            h.insert(name, v);
        }
    }
}

fn unavailable(config: &Config) -> Response<Bytes> {
    let mut response = rejection(config, &Rejection::Unavailable);
    if !response.headers().contains_key(http::header::RETRY_AFTER) {
        insert_retry_after(response.headers_mut(), std::time::Duration::from_secs(1));
    }
    response
}

/// The `429` for `rule`: the rule's name is copied only for a configured rejection builder.
fn limited(config: &Config, rule: &str, retry_after: std::time::Duration) -> Response<Bytes> {
    match &config.rejection {
        Some(f) => f(&Rejection::Limited {
            rule: rule.to_owned(),
            retry_after,
        }),
        None => {
            let (status, _, body) = DEFAULT_BODIES[0];
            crate::problem::problem_static(status, body)
        }
    }
}

/// The response for `why`, from the configured rejection builder or the default problem
/// details (RFC 9457).
pub(crate) fn rejection(config: &Config, why: &Rejection) -> Response<Bytes> {
    if let Some(f) = &config.rejection {
        return f(why);
    }
    let [limited, unavailable, missing] = DEFAULT_BODIES;
    let (status, _, body) = match why {
        Rejection::Limited { .. } => limited,
        Rejection::Unavailable => unavailable,
        Rejection::MissingKey => missing,
    };
    crate::problem::problem_static(status, body)
}

/// The default rejections: status, detail, and the problem details body (written out, so that
/// a flood of rejections formats nothing).
pub(crate) const DEFAULT_BODIES: [(StatusCode, &str, &str); 3] = [
    (
        StatusCode::TOO_MANY_REQUESTS,
        "rate limit exceeded; retry after the time in Retry-After",
        r#"{"type":"about:blank","title":"Too Many Requests","status":429,"detail":"rate limit exceeded; retry after the time in Retry-After"}"#,
    ),
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the rate limiter is unavailable; retry shortly",
        r#"{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"the rate limiter is unavailable; retry shortly"}"#,
    ),
    (
        StatusCode::BAD_REQUEST,
        "the request carries no rate-limit key",
        r#"{"type":"about:blank","title":"Bad Request","status":400,"detail":"the request carries no rate-limit key"}"#,
    ),
];

#[inline]
fn count(outcome: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("tower_redis_layers_rate_limit_decisions_total", "outcome" => outcome)
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}
