use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use sha2::{Digest, Sha256};
use tower_service::Service;
use tracing::Instrument;

use super::{
    claim::{claim, pending_claim, Claimed},
    complete::complete,
    config::Config,
    execute::Execution,
    rejection::Rejection,
    request::{self, Keyed},
    ResponseFuture, TARGET,
};
use crate::{
    lock::new_token,
    store::{FailureMode, IdempotencyStore},
    ResponseBody,
};

/// Middleware that runs each request with an `Idempotency-Key` once and replays its response
/// to duplicates. See the [module docs](super) for an example.
pub struct IdempotencyLock<S, B> {
    inner: S,
    store: Arc<B>,
    config: Arc<Config>,
}

impl<S, B> IdempotencyLock<S, B> {
    pub(crate) fn with_config(inner: S, store: Arc<B>, config: Arc<Config>) -> Self {
        Self {
            inner,
            store,
            config,
        }
    }
}

middleware_service!(IdempotencyLock { store, config });

impl<S, B, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyLock<S, B>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: IdempotencyStore,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<Result<Self::Response, S::Error>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let inner = self.take_ready();
        let store: Arc<dyn IdempotencyStore> = Arc::clone(&self.store) as _;
        ResponseFuture {
            inner: Box::pin(run(inner, store, Arc::clone(&self.config), req)),
        }
    }
}

/// One request: its key and body, the claim, then the handler under the claim and the
/// completion; or the inner service alone for a request the layer is not concerned with.
async fn run<S, ReqBody, ResBody>(
    mut inner: S,
    store: Arc<dyn IdempotencyStore>,
    config: Arc<Config>,
    req: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let (parts, body) = req.into_parts();
    let key = match request::key(&config, &parts) {
        Keyed::Key(key) => key,
        Keyed::Pass => return pass(&mut inner, Request::from_parts(parts, body)).await,
        Keyed::Reject(why) => return Ok(rejected(&config, why)),
    };
    let body = match request::read_body(&config, &parts, body).await {
        Ok(body) => body,
        Err(why) => return Ok(rejected(&config, why)),
    };
    let record = request::record_key(&config, &parts, &key);
    let token = new_token();
    // Until the store answers, the claim may or may not have landed: if this future is dropped
    // meanwhile, or the answer is lost, `pending` takes it back once the store answers.
    let pending = pending_claim(Arc::clone(&store), &config, record, token.clone());
    let claimed = claim(&*store, &config, &record, &token, &Sha256::digest(&body)).await;
    let (fence, sent) = match claimed {
        Claimed::Fence { fence, sent } => {
            pending.settled();
            (fence, sent)
        }
        Claimed::Answer(response) => {
            pending.settled();
            return Ok(response.map(ResponseBody::full));
        }
        Claimed::StoreFailed(error) => {
            if matches!(error, crate::StoreError::CircuitOpen(_)) {
                // The breaker refused the call: it was never sent, there is nothing to release.
                pending.settled();
            } else {
                drop(pending);
            }
            let open = matches!(config.on_store_error, FailureMode::Open);
            log_store_failure!(error, target: TARGET, %error, fail_open = open, "idempotency store failed");
            if open {
                let request = Request::from_parts(parts, ReqBody::from(body));
                return pass(&mut inner, request).await;
            }
            return Ok(rejected(&config, Rejection::Unavailable));
        }
    };
    let execution = Execution::start(store, &config, record, token, fence, sent);
    let mut request = Request::from_parts(parts, ReqBody::from(body));
    request.extensions_mut().insert(execution.fence());
    // The claim is held: from here the handler runs to its end and its response is recorded,
    // even when the client goes away (this future is dropped), so that a retry gets the replay
    // instead of running the handler again. On an error or a panic, `execution` releases the
    // claim.
    let task_config = Arc::clone(&config);
    // The handler keeps the request's span (its logs stay the request's).
    let handler = tokio::spawn(
        async move {
            let response = inner.call(request).await?;
            Ok(complete(execution, &task_config, response).await)
        }
        .in_current_span(),
    );
    match handler.await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Ok(rejected(&config, Rejection::Unavailable)), // the runtime shuts down
    }
}

/// The inner service's response to `request`, untouched.
async fn pass<S, ReqBody, ResBody>(
    inner: &mut S,
    request: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    Ok(inner.call(request).await?.map(ResponseBody::service))
}

fn rejected<B: Body>(config: &Config, why: Rejection) -> Response<ResponseBody<B>> {
    config.reject(why).map(ResponseBody::full)
}
