use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::time::{timeout, Instant};
use tower_service::Service;

use super::{
    layer::Config, record::StoredResponse, FencingToken, IdempotencyBody, IdempotencyLockLayer,
    ResponseFuture,
};
use crate::{
    lock::{new_token, spawn_detached, Lease},
    problem::problem,
    store::{Claim, ClaimRequest, IdempotencyStore},
    StoreKey,
};

const TARGET: &str = "tower_redis_layers::idempotency";

/// Middleware that runs each keyed request once; see the [module docs](super).
pub struct IdempotencyLock<S, B> {
    inner: S,
    store: Arc<B>,
    config: Arc<Config>,
}

impl<S, B> IdempotencyLock<S, B> {
    pub(crate) fn from_layer(inner: S, layer: &IdempotencyLockLayer<B>) -> Self {
        Self {
            inner,
            store: Arc::clone(&layer.store),
            config: Arc::clone(&layer.config),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, B> Clone for IdempotencyLock<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            store: Arc::clone(&self.store),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: std::fmt::Debug, B> std::fmt::Debug for IdempotencyLock<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLock")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

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
    type Response = Response<IdempotencyBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<Result<Self::Response, S::Error>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            inner: Box::pin(run(
                inner,
                Arc::clone(&self.store),
                Arc::clone(&self.config),
                req,
            )),
        }
    }
}

fn layer_response<B: Body>(response: Response<Bytes>) -> Response<IdempotencyBody<B>> {
    response.map(IdempotencyBody::full)
}

fn with_retry_after(mut response: Response<Bytes>, secs: u64) -> Response<Bytes> {
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    response
}

/// The key, if it is 1 to 255 visible ASCII characters. A Structured Fields string
/// (`"..."`, as the draft writes it) is accepted without its quotes.
fn parse_key(value: &HeaderValue) -> Option<&str> {
    let raw = value.to_str().ok()?;
    let key = raw
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .unwrap_or(raw);
    let valid = !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic());
    valid.then_some(key)
}

enum ReadError {
    TooLarge,
    Failed,
}

async fn read_request<B: Body>(body: B, max: usize) -> Result<Bytes, ReadError> {
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ReadError::Failed)?;
        if let Ok(mut data) = frame.into_data() {
            use bytes::Buf;
            if buf.len() + data.remaining() > max {
                return Err(ReadError::TooLarge);
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                buf.extend_from_slice(chunk);
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    Ok(buf.freeze())
}

enum ReadResponse<B: Body> {
    Full(Bytes),
    TooLarge(Bytes, std::pin::Pin<Box<B>>),
    Failed(Bytes, B::Error),
}

async fn read_response<B: Body<Data = Bytes>>(body: B, max: usize) -> ReadResponse<B> {
    let mut body = Box::pin(body);
    let mut buf = BytesMut::new();
    loop {
        if buf.len() > max {
            return ReadResponse::TooLarge(buf.freeze(), body);
        }
        match body.frame().await {
            None => return ReadResponse::Full(buf.freeze()),
            Some(Err(e)) => return ReadResponse::Failed(buf.freeze(), e),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

/// Releases the claim when dropped while armed: the handler failed, panicked or was dropped.
struct ClaimGuard {
    store: Arc<dyn IdempotencyStore>,
    record: StoreKey,
    token: String,
    armed: bool,
}

impl ClaimGuard {
    async fn release_now(mut self, limit: Duration) {
        self.armed = false;
        let release = self.store.release_claim(&self.record, &self.token);
        match timeout(limit, release).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(target: TARGET, %error, "releasing an idempotency claim failed; it expires with its lease");
            }
            Err(_) => {
                tracing::warn!(target: TARGET, "releasing an idempotency claim timed out; it expires with its lease");
            }
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if self.armed {
            spawn_detached(self.store.release_claim(&self.record, &self.token));
        }
    }
}

async fn run<S, B, ReqBody, ResBody>(
    mut inner: S,
    store: Arc<B>,
    config: Arc<Config>,
    req: Request<ReqBody>,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    B: IdempotencyStore,
    ReqBody: Body + From<Bytes>,
    ResBody: Body<Data = Bytes>,
{
    let (parts, body) = req.into_parts();
    let pass = |inner: &mut S, parts, body| {
        let call = inner.call(Request::from_parts(parts, body));
        async move { Ok(call.await?.map(IdempotencyBody::passed)) }
    };
    if !config.methods.contains(&parts.method) {
        return pass(&mut inner, parts, body).await;
    }
    let key = match parts.headers.get(&config.header) {
        None if config.required => {
            return Ok(layer_response(problem(
                StatusCode::BAD_REQUEST,
                "this request needs an Idempotency-Key header",
            )));
        }
        None => return pass(&mut inner, parts, body).await,
        Some(value) => match parse_key(value) {
            Some(key) => key.to_owned(),
            None => {
                return Ok(layer_response(problem(
                    StatusCode::BAD_REQUEST,
                    "the Idempotency-Key must be 1 to 255 visible ASCII characters",
                )));
            }
        },
    };

    let too_large = || {
        layer_response(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is larger than this endpoint accepts with an Idempotency-Key",
        ))
    };
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > config.max_body as u64) {
        return Ok(too_large());
    }
    let body = match read_request(body, config.max_body).await {
        Ok(body) => body,
        Err(ReadError::TooLarge) => return Ok(too_large()),
        Err(ReadError::Failed) => {
            return Ok(layer_response(problem(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            )));
        }
    };
    let fingerprint = Sha256::digest(&body);
    let scope = config
        .scope
        .as_ref()
        .and_then(|f| f(&parts))
        .unwrap_or_default();
    let record = StoreKey::from_parts([
        b"idempotency".as_slice(),
        scope.as_bytes(),
        parts.method.as_str().as_bytes(),
        parts.uri.path().as_bytes(),
        key.as_bytes(),
    ]);
    let token = new_token();
    let deadline = config.in_flight_wait.map(|w| Instant::now() + w);

    let fence = loop {
        let claim = store.claim(
            &record,
            ClaimRequest {
                token: &token,
                fingerprint: &fingerprint,
                lease: config.lease,
                retention: config.retention,
            },
        );
        let error = match timeout(config.timeout, claim).await {
            Ok(Ok(Claim::Claimed { fence })) => break fence,
            Ok(Ok(Claim::InFlight { .. })) => {
                if deadline.is_some_and(|d| Instant::now() < d) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                tracing::debug!(target: TARGET, record = %record, outcome = "in_flight");
                return Ok(layer_response(with_retry_after(
                    problem(
                        StatusCode::CONFLICT,
                        "a request with this Idempotency-Key is still being processed",
                    ),
                    1,
                )));
            }
            Ok(Ok(Claim::Completed(stored))) => {
                tracing::debug!(target: TARGET, record = %record, outcome = "replayed");
                return Ok(layer_response(replay(&stored)));
            }
            Ok(Ok(Claim::Mismatch)) => {
                tracing::debug!(target: TARGET, record = %record, outcome = "mismatch");
                return Ok(layer_response(problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "this Idempotency-Key was already used with a different request body",
                )));
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {:?}", config.timeout),
        };
        tracing::warn!(target: TARGET, %error, fail_open = config.fail_open, "idempotency store failed");
        if config.fail_open {
            return pass(&mut inner, parts, ReqBody::from(body)).await;
        }
        return Ok(layer_response(with_retry_after(
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "idempotency cannot be guaranteed right now; retry shortly",
            ),
            1,
        )));
    };

    let dyn_store: Arc<dyn IdempotencyStore> = store;
    let guard = ClaimGuard {
        store: Arc::clone(&dyn_store),
        record,
        token: token.clone(),
        armed: true,
    };
    let lease = {
        let (store, token, lease) = (Arc::clone(&dyn_store), token.clone(), config.lease);
        Lease::start(config.lease, move || {
            store.extend_claim(&record, &token, lease)
        })
    };

    let mut request = Request::from_parts(parts, ReqBody::from(body));
    request.extensions_mut().insert(FencingToken(fence));
    // On an error, a panic, or when this future is dropped, `guard` releases the claim.
    let response = inner.call(request).await?;
    let (head, body) = response.into_parts();

    if !(config.store_if)(head.status) {
        drop(lease);
        guard.release_now(config.timeout).await;
        return Ok(Response::from_parts(head, IdempotencyBody::passed(body)));
    }
    let (stored, body) = match read_response(body, config.max_body).await {
        ReadResponse::Full(bytes) => (
            StoredResponse::new(head.status, &head.headers, Some(&bytes)),
            IdempotencyBody::full(bytes),
        ),
        ReadResponse::TooLarge(prefix, rest) => (
            StoredResponse::new(head.status, &head.headers, None),
            IdempotencyBody::prefixed(prefix, rest),
        ),
        ReadResponse::Failed(prefix, error) => {
            drop(lease);
            guard.release_now(config.timeout).await;
            return Ok(Response::from_parts(
                head,
                IdempotencyBody::failed(prefix, error),
            ));
        }
    };
    let lost = lease.is_lost();
    drop(lease);
    if lost {
        tracing::warn!(target: TARGET, record = %record, "the lease was lost while the handler ran; the response is not stored");
    } else {
        let complete = dyn_store.complete(&record, &token, stored.encode(), config.retention);
        match timeout(config.timeout, complete).await {
            Ok(Ok(true)) => {
                tracing::debug!(target: TARGET, record = %record, fence, outcome = "stored");
            }
            Ok(Ok(false)) => {
                tracing::warn!(target: TARGET, record = %record, "the claim was lost before completion; the response is not stored");
            }
            Ok(Err(error)) => {
                tracing::warn!(target: TARGET, record = %record, %error, "storing the response failed");
            }
            Err(_) => {
                tracing::warn!(target: TARGET, record = %record, "storing the response timed out");
            }
        }
    }
    let mut guard = guard;
    guard.armed = false;
    Ok(Response::from_parts(head, body))
}

fn replay(stored: &[u8]) -> Response<Bytes> {
    let Some(stored) = StoredResponse::decode(stored) else {
        tracing::error!(target: TARGET, "a stored idempotent response is unreadable");
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the stored response of this Idempotency-Key is unreadable",
        );
    };
    match stored.to_response() {
        Some(mut response) => {
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            response
        }
        None => problem(
            StatusCode::CONFLICT,
            "this Idempotency-Key was already used; its response was too large to replay",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_syntax() {
        let ok = |s: &str| parse_key(&HeaderValue::from_str(s).unwrap()).is_some();
        assert!(ok("8e03978e-40d5-43e8-bc93-6894a57f9324"));
        assert!(ok("\"8e03978e-40d5\""));
        assert!(!ok(""));
        assert!(!ok("\"\""));
        assert!(!ok("has space"));
        assert!(!ok(&"a".repeat(256)));
        assert!(ok(&"a".repeat(255)));
        assert!(parse_key(&HeaderValue::from_bytes(&[0xff, 0x41]).unwrap()).is_none());
    }
}
