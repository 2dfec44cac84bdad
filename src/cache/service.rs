use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{request::Parts, Method, Request, Response};
use http_body::Body;
use tower_service::Service;

use super::{
    conditional::Conditional,
    config::Shared,
    fill::Fill,
    future::ResponseFuture,
    invalidate::Unsafe,
    lookup,
    policy::{self, Bypass, RequestUse},
    request::Limits,
    response,
    revalidate::Prior,
    target::Target,
    ResponseBody,
};
use crate::store::CacheStore;

/// Middleware that caches responses in a store.
///
/// See the [module docs](super) for an example.
pub struct Cache<S, B> {
    inner: S,
    shared: Arc<Shared<B>>,
}

impl<S, B> Cache<S, B> {
    pub(crate) fn with_shared(inner: S, shared: Arc<Shared<B>>) -> Self {
        Self { inner, shared }
    }
}

middleware_service!(Cache { shared });

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
        let inner = self.take_ready();
        let shared = Arc::clone(&self.shared);
        ResponseFuture::new(run(shared, inner, req))
    }
}

/// Handles one request: passes it on (invalidating entries after an unsafe method), bypasses
/// the cache, refreshes the entry (`Cache-Control: no-cache`), or
/// looks it up.
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
            let unsafe_method = Unsafe::of(&parts).filter(|_| config.invalidate_unsafe);
            let response = inner.call(Request::from_parts(parts, body)).await?;
            if let Some(request) = unsafe_method {
                let (status, headers) = (response.status(), response.headers());
                request.invalidate(&shared, status, headers).await;
            }
            return Ok(response.map(ResponseBody::service));
        }
        Err(why) => return bypass(&mut inner, parts, body, why).await,
    };
    if config.keys.hosts.key_host(&parts).is_none() {
        return bypass(&mut inner, parts, body, Bypass::Host).await;
    }
    let Some(keys) = config.keys.keys(&parts, &shared.vary) else {
        return bypass(&mut inner, parts, body, Bypass::NoPartition).await;
    };
    let target = Target {
        shared: &shared,
        keys,
        head: parts.method == Method::HEAD,
    };
    match mode {
        RequestUse::Normal => lookup::serve_or_fill(&target, &mut inner, parts, body).await,
        // `no-cache` with `only-if-cached`: nothing may be served, nothing forwarded.
        RequestUse::Refresh if Limits::of(&parts.headers).only_if_cached => {
            Ok(response::not_cached(config))
        }
        RequestUse::Refresh => {
            // No entry is served unvalidated: read it (no lock), then revalidate it when it has
            // a validator, or run the handler and store.
            let (version, prior) = match target.lookup(None).await {
                Ok(lookup) => {
                    let entry = target.usable_entry(&lookup, &parts.headers).await;
                    let prior = entry.map(|e| Prior::new(e, &lookup, false));
                    (Some(lookup.version), prior)
                }
                Err(error) => match target.lookup_failed(&error, "refresh") {
                    Some(unavailable) => return Ok(unavailable),
                    None => (None, None),
                },
            };
            let mut fill =
                Fill::new(version, None, "fwd=request").answering(Conditional::of(&parts.headers));
            if let Some(prior) = prior {
                fill = fill.replacing(prior);
            }
            fill.run(&target, &mut inner, Request::from_parts(parts, body))
                .await
        }
    }
}

/// Passes a request the cache does not handle to the inner service, saying why in
/// `Cache-Status`.
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
    let response = inner.call(Request::from_parts(parts, body)).await?;
    let status = format!("fwd=bypass; detail={}", why.detail());
    Ok(response::passed(response, &status))
}
