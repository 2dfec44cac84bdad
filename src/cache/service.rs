use std::{
    collections::VecDeque,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{request::Parts, HeaderValue, Method, Request, Response};
use http_body::{Body, Frame};
use tokio::time::Instant;
use tower_service::Service;

use super::{
    entry::Entry,
    future::ResponseFuture,
    key::{self, PrimaryKey, VaryRegistry},
    layer::{Config, DEFAULT_SEGMENT},
    policy::{self, Bypass, RequestUse},
    CacheLayer, ResponseBody,
};
use crate::{
    key::StoreKey,
    store::{
        CacheStore, FillRequest, FillState, FillToken, Freshness, Lookup, LookupRequest,
        StoreError, StoreFuture, StoreOutcome, StoreRequest,
    },
};

pub(crate) const TARGET: &str = "tower_redis_layers::cache";

/// The `Cache-Status` field (RFC 9211).
pub(crate) const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");
const CACHE_NAME: &str = "tower-redis-layers";

/// Middleware that caches responses; see the [module docs](super) for an example.
pub struct Cache<S, B> {
    inner: S,
    shared: Arc<Shared<B>>,
}

struct Shared<B> {
    store: Arc<B>,
    config: Arc<Config>,
    vary: Arc<VaryRegistry>,
}

impl<S, B> Cache<S, B> {
    pub(crate) fn from_layer(inner: S, layer: &CacheLayer<B>) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared {
                store: Arc::clone(&layer.store),
                config: Arc::clone(&layer.config),
                vary: Arc::clone(&layer.vary),
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

impl<S: Clone, B> Clone for Cache<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: std::fmt::Debug, B> std::fmt::Debug for Cache<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, ReqBody, ResBody> Service<Request<ReqBody>> for Cache<S, B>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: CacheStore,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, S::Error>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The service that `poll_ready` prepared goes with this request; a clone stays.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        ResponseFuture::new(run(shared, inner, req))
    }
}

/// Where a request's entry lives.
struct Target {
    segment: StoreKey,
    primary: PrimaryKey,
    /// The key looked up (the primary key and the known `Vary` values).
    key: StoreKey,
    head: bool,
}

async fn run<S, B, ReqBody, ResBody>(
    shared: Arc<Shared<B>>,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    B: CacheStore,
    ResBody: Body<Data = Bytes>,
{
    let config = &shared.config;
    let (parts, body) = req.into_parts();
    let mode = match policy::request_use(&parts, config.allow_authorized) {
        Ok(mode) => mode,
        Err(Bypass::Method) => {
            let response = inner.call(Request::from_parts(parts, body)).await?;
            return Ok(response.map(ResponseBody::service));
        }
        Err(why) => return bypass(&mut inner, parts, body, why).await,
    };
    let partition = match &config.partition {
        Some(f) => match f(&parts) {
            Some(p) => Some(p),
            None => return bypass(&mut inner, parts, body, Bypass::NoPartition).await,
        },
        None => None,
    };
    let segment_name = config
        .segment
        .as_ref()
        .map_or_else(|| DEFAULT_SEGMENT.to_owned(), |f| f(&parts));
    let primary = key::primary_key(&config.scope, &parts, partition.as_deref());
    let known_vary = shared.vary.get(primary);
    let vary_now = key::vary_values(&parts, known_vary.as_deref().unwrap_or(&[]));
    let target = Target {
        segment: key::segment_key(&config.scope, &segment_name),
        primary,
        key: key::entry_key(primary, &vary_now),
        head: parts.method == Method::HEAD,
    };

    let ctx = Ctx {
        shared: &shared,
        target: &target,
    };
    if mode == RequestUse::Refresh {
        // Read the version only (no lock, no entry served), then forward and store.
        let version = match ctx.lookup(None).await {
            Ok(lookup) => Some(lookup.version),
            Err(_) => None,
        };
        return ctx
            .forward(&mut inner, parts, body, version, None, None, "fwd=request")
            .await;
    }

    let token = FillToken::random();
    let fill = config.fill_lock.map(|l| FillRequest { ttl: l.ttl, token });
    let mut lookup = match ctx.lookup(fill).await {
        Ok(lookup) => lookup,
        Err(error) => {
            tracing::warn!(target: TARGET, %error, "cache lookup failed; serving as a miss");
            return ctx
                .forward(&mut inner, parts, body, None, None, None, "fwd=miss")
                .await;
        }
    };
    let wait_until = config.fill_lock.map(|l| Instant::now() + l.wait);
    // Waiters poll with a growing interval (x1.5, up to 4x the base): fewer calls while a
    // slow handler runs, little delay for a fast one.
    let mut poll = config.fill_lock.map_or(Duration::ZERO, |l| l.poll);
    loop {
        let entry = ctx.usable_entry(&lookup, &parts).await;
        let holds = lookup.fill == FillState::Acquired;
        let lock = holds.then_some(token);
        match (lookup.freshness, entry) {
            (Freshness::Fresh, Some(entry)) => {
                return Ok(serve(entry, lookup.age, target.head, "hit"));
            }
            (Freshness::Early | Freshness::Stale, Some(entry))
                if lookup.fill == FillState::Held =>
            {
                let status = if lookup.freshness == Freshness::Stale {
                    "hit; detail=stale"
                } else {
                    "hit"
                };
                return Ok(serve(entry, lookup.age, target.head, status));
            }
            (Freshness::Early, Some(entry)) => {
                return ctx
                    .forward(
                        &mut inner,
                        parts,
                        body,
                        Some(lookup.version),
                        lock,
                        Some((entry, lookup.age)),
                        "fwd=stale; detail=early-recompute",
                    )
                    .await;
            }
            (Freshness::StaleIfError, Some(_)) if lookup.fill == FillState::Held => {
                // Only usable on error, and another request is refreshing it: wait below.
            }
            (Freshness::Stale | Freshness::StaleIfError, Some(entry)) => {
                return ctx
                    .forward(
                        &mut inner,
                        parts,
                        body,
                        Some(lookup.version),
                        lock,
                        Some((entry, lookup.age)),
                        "fwd=stale",
                    )
                    .await;
            }
            _ if lookup.fill != FillState::Held => {
                return ctx
                    .forward(
                        &mut inner,
                        parts,
                        body,
                        Some(lookup.version),
                        lock,
                        None,
                        "fwd=miss",
                    )
                    .await;
            }
            _ => {}
        }
        // Another request is filling this entry: wait for it, up to the bound.
        let (Some(until), Some(lock_cfg)) = (wait_until, config.fill_lock) else {
            break;
        };
        if Instant::now() >= until {
            break;
        }
        tokio::time::sleep(poll.min(until - Instant::now())).await;
        poll = poll.mul_f64(1.5).min(lock_cfg.poll * 4);
        lookup = match ctx.lookup(fill).await {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(target: TARGET, %error, "cache lookup failed while waiting");
                break;
            }
        };
    }
    tracing::debug!(target: TARGET, "gave up waiting for the fill; running the handler");
    ctx.forward(
        &mut inner,
        parts,
        body,
        None,
        None,
        None,
        "fwd=miss; detail=lock-wait",
    )
    .await
}

async fn bypass<S, ReqBody, ResBody>(
    inner: &mut S,
    parts: Parts,
    body: ReqBody,
    why: Bypass,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let mut response = inner.call(Request::from_parts(parts, body)).await?;
    set_status(
        &mut response,
        &format!("fwd=bypass; detail={}", why.detail()),
    );
    Ok(response.map(ResponseBody::service))
}

fn set_status<T>(response: &mut Response<T>, params: &str) {
    count(outcome_of(params));
    if let Ok(v) = HeaderValue::from_str(&format!("{CACHE_NAME}; {params}")) {
        response.headers_mut().insert(CACHE_STATUS, v);
    }
}

/// A response built from a stored entry.
fn serve<B: Body>(
    entry: Entry,
    age: Duration,
    head: bool,
    status: &str,
) -> Response<ResponseBody<B>> {
    let body = if head { Bytes::new() } else { entry.body };
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = entry.status;
    *response.headers_mut() = entry.headers;
    response
        .headers_mut()
        .insert(http::header::AGE, HeaderValue::from(age.as_secs()));
    set_status(&mut response, status);
    response
}

struct Ctx<'a, B> {
    shared: &'a Shared<B>,
    target: &'a Target,
}

impl<B: CacheStore> Ctx<'_, B> {
    async fn bounded<T>(&self, call: StoreFuture<T>) -> Result<T, StoreError> {
        if !self.shared.store.is_remote() {
            return call.await;
        }
        let timeout = self.shared.config.timeout;
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    async fn lookup(&self, fill: Option<FillRequest>) -> Result<Lookup, StoreError> {
        let config = &self.shared.config;
        let request = LookupRequest {
            segment: self.target.segment,
            key: self.target.key,
            fill,
            early_beta: config.early_beta,
            random: 1.0 - rand::random::<f64>(),
        };
        let lookup = self.bounded(self.shared.store.lookup(request)).await?;
        if lookup.corrupt {
            tracing::warn!(target: TARGET, key = %self.target.key, "deleted a corrupt cache entry");
        }
        Ok(lookup)
    }

    /// The entry of a lookup, decoded and checked against the request's `Vary` values. A
    /// corrupt entry is deleted.
    async fn usable_entry(&self, lookup: &Lookup, parts: &Parts) -> Option<Entry> {
        let raw = lookup.entry.as_ref()?;
        let entry = match Entry::decode(raw) {
            Ok(entry) => entry,
            Err(error) => {
                tracing::warn!(target: TARGET, key = %self.target.key, %error, "undecodable cache entry; deleting it");
                let delete = self
                    .shared
                    .store
                    .invalidate_key(self.target.segment, self.target.key);
                if let Err(error) = self.bounded(delete).await {
                    tracing::warn!(target: TARGET, %error, "could not delete a corrupt cache entry");
                }
                return None;
            }
        };
        let names: Vec<_> = entry.vary.iter().map(|(n, _)| n.clone()).collect();
        if key::vary_values(parts, &names) != entry.vary {
            // Built from an outdated view of `Vary`: not this request's variant.
            self.shared.vary.learn(self.target.primary, &names);
            return None;
        }
        Some(entry)
    }

    async fn release(&self, lock: Option<FillToken>) {
        if let Some(token) = lock {
            let call = self
                .shared
                .store
                .release_fill(self.target.segment, self.target.key, token);
            if let Err(error) = self.bounded(call).await {
                tracing::warn!(target: TARGET, %error, "could not release the fill lock");
            }
        }
    }

    /// Runs the handler; stores its response when allowed (`version` is the segment version
    /// read, `None` when the lookup failed: then nothing is stored); serves `stale` instead when
    /// the handler fails and a stale entry may stand in.
    #[allow(clippy::too_many_arguments)]
    async fn forward<S, ReqBody, ResBody>(
        &self,
        inner: &mut S,
        parts: Parts,
        body: ReqBody,
        version: Option<u64>,
        lock: Option<FillToken>,
        stale: Option<(Entry, Duration)>,
        status: &str,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body<Data = Bytes>,
    {
        let config = &self.shared.config;
        let vary_request = parts.clone();
        let started = Instant::now();
        let result = inner.call(Request::from_parts(parts, body)).await;
        // The errors of RFC 5861 section 4: an error, or 500, 502, 503, 504.
        let failed = match &result {
            Err(_) => true,
            Ok(r) => matches!(r.status().as_u16(), 500 | 502 | 503 | 504),
        };
        if failed {
            if let Some((entry, age)) = stale {
                self.release(lock).await;
                tracing::info!(target: TARGET, "handler failed; serving the stale entry");
                return Ok(serve(
                    entry,
                    age,
                    self.target.head,
                    "fwd=stale; detail=stale-if-error",
                ));
            }
        }
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                self.release(lock).await;
                return Err(error);
            }
        };
        let Some(version) = version.filter(|_| !self.target.head) else {
            self.release(lock).await;
            let mut response = response;
            set_status(&mut response, status);
            return Ok(response.map(ResponseBody::service));
        };
        let ttl = policy::storable(
            response.status(),
            response.headers(),
            &config.statuses,
            config.ttl,
            config.response_ttl,
            config.max_body,
        );
        let ttl = match ttl {
            Ok(ttl) => ttl,
            Err(why) => {
                tracing::debug!(target: TARGET, ?why, "response not stored");
                self.release(lock).await;
                let mut response = response;
                set_status(&mut response, status);
                return Ok(response.map(ResponseBody::service));
            }
        };
        let (mut head, body) = response.into_parts();
        let mut body = Box::pin(body);
        let cap = config.max_body;
        let mut buf = BytesMut::new();
        let mut pending = VecDeque::new();
        let mut error = None;
        let mut complete = false;
        if body.size_hint().lower() <= cap as u64 {
            loop {
                match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                    None => {
                        complete = true;
                        break;
                    }
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            buf.extend_from_slice(&data);
                            if buf.len() > cap {
                                break;
                            }
                        }
                        Err(frame) => {
                            // Trailers: not stored; pass them on.
                            pending.push_back(frame);
                            break;
                        }
                    },
                    Some(Err(e)) => {
                        error = Some(e);
                        break;
                    }
                }
            }
        }
        let data = buf.freeze();
        if !complete || !pending.is_empty() || error.is_some() {
            self.release(lock).await;
            set_status_parts(&mut head, status);
            if !data.is_empty() {
                pending.push_front(Frame::data(data));
            }
            let rest = (!complete).then_some(body);
            return Ok(Response::from_parts(
                head,
                ResponseBody::resumed(pending, rest, error),
            ));
        }
        let compute_time = started.elapsed();
        let names = policy::vary_names(&head.headers).unwrap_or_default();
        self.shared.vary.learn(self.target.primary, &names);
        let vary = key::vary_values(&vary_request, &names);
        let entry = Entry {
            status: head.status,
            headers: policy::stored_headers(&head.headers),
            vary: vary.clone(),
            body: data.clone(),
        };
        let stored = match entry.encode() {
            Ok(encoded) => {
                let jitter = if config.jitter > 0.0 {
                    1.0 + rand::random_range(-config.jitter..=config.jitter)
                } else {
                    1.0
                };
                let request = StoreRequest {
                    segment: self.target.segment,
                    key: key::entry_key(self.target.primary, &vary),
                    version,
                    fill: lock.map(|t| (self.target.key, t)),
                    entry: encoded,
                    ttl: ttl.mul_f64(jitter).max(Duration::from_millis(1)),
                    stale_while_revalidate: config.stale_while_revalidate,
                    stale_if_error: config.stale_if_error,
                    compute_time,
                };
                match self.bounded(self.shared.store.store(request)).await {
                    Ok(StoreOutcome::Stored) => true,
                    Ok(outcome) => {
                        tracing::debug!(target: TARGET, ?outcome, "cache entry not stored");
                        false
                    }
                    Err(error) => {
                        tracing::warn!(target: TARGET, %error, "cache store failed; dropped");
                        false
                    }
                }
            }
            Err(error) => {
                tracing::warn!(target: TARGET, %error, "could not encode the cache entry");
                self.release(lock).await;
                false
            }
        };
        let status = if stored {
            format!("{status}; stored")
        } else {
            status.to_owned()
        };
        set_status_parts(&mut head, &status);
        Ok(Response::from_parts(head, ResponseBody::full(data)))
    }
}

/// The metric label of a `Cache-Status` value.
fn outcome_of(params: &str) -> &'static str {
    if params.starts_with("hit; detail=stale") {
        "stale"
    } else if params.starts_with("hit") {
        "hit"
    } else if params.contains("stale-if-error") {
        "stale_if_error"
    } else if params.starts_with("fwd=bypass") {
        "bypass"
    } else if params.contains("stored") {
        "miss_stored"
    } else {
        "miss"
    }
}

/// Counts a request's outcome (feature `metrics`).
#[inline]
fn count(outcome: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("tower_redis_layers_cache_requests_total", "outcome" => outcome).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

fn set_status_parts(head: &mut http::response::Parts, params: &str) {
    count(outcome_of(params));
    if let Ok(v) = HeaderValue::from_str(&format!("{CACHE_NAME}; {params}")) {
        head.headers.insert(CACHE_STATUS, v);
    }
}
