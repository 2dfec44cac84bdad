//! A fill: the handler runs for a request the cache did not serve, the response body is read up
//! to the cap, and the response is stored when it may be.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use super::{
    conditional::Conditional,
    entry::Entry,
    freshness::Exchange,
    key, policy, response,
    revalidate::{self, Prior, Revalidation},
    target::Target,
    ResponseBody, TARGET,
};
use crate::{
    body::read_up_to,
    store::{CacheStore, FillToken, StoreRequest},
};

/// One run of the handler on behalf of the cache: what the lookup decided about it.
pub(super) struct Fill {
    /// The segment version the lookup read; `None` when the response must not be stored (the
    /// lookup failed, or the wait for another request's fill gave up).
    version: Option<u64>,
    /// The fill lock, when this request holds it; released (or handed to the write) whatever
    /// happens.
    lock: Option<FillToken>,
    /// The stored entry this fill replaces: revalidated with a conditional request when it
    /// has a validator, and served instead when the handler fails if it may stand in.
    prior: Option<Prior>,
    /// The client's own preconditions, evaluated on the entry a `304` confirms.
    conditional: Option<Conditional>,
    /// The `Cache-Status` parameters of the response (`; stored` is added when it is stored).
    status: &'static str,
}

/// What storing a response needs besides the response.
struct Storing {
    /// The segment version the lookup read.
    version: u64,
    /// The freshness left and the initial age (the TTL before jitter).
    storable: policy::Storable,
    /// The request's headers: they select the variant stored.
    request_headers: HeaderMap,
    /// When the handler was called.
    started: Instant,
}

impl Fill {
    /// A fill that stores the response when allowed, under the segment `version` the lookup
    /// read (`None`: never stored), holding `lock` if the lookup took it.
    pub(super) fn new(version: Option<u64>, lock: Option<FillToken>, status: &'static str) -> Self {
        Self {
            version,
            lock,
            prior: None,
            conditional: None,
            status,
        }
    }

    /// A fill whose response is never stored.
    pub(super) fn unstored(status: &'static str) -> Self {
        Self::new(None, None, status)
    }

    /// Revalidates `prior` (when it has a validator), and serves it instead if the handler
    /// fails and it may stand in (stale-if-error).
    pub(super) fn replacing(mut self, prior: Prior) -> Self {
        self.prior = Some(prior);
        self
    }

    /// Evaluates the client's `conditional` on an entry a `304` confirms.
    pub(super) fn answering(mut self, conditional: Option<Conditional>) -> Self {
        self.conditional = conditional;
        self
    }

    /// Runs the handler with `request` and answers its response, stored when allowed; or the
    /// stale entry when the handler fails (an error, or 500, 502, 503, 504: RFC 5861 section 4)
    /// and one may stand in.
    pub(super) async fn run<S, B, ReqBody, ResBody>(
        mut self,
        target: &Target<'_, B>,
        inner: &mut S,
        mut request: Request<ReqBody>,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        B: CacheStore,
        ResBody: Body<Data = Bytes>,
    {
        let version = self.version.filter(|_| !target.head);
        // The request's headers select the variant stored.
        let request_headers = version.is_some().then(|| request.headers().clone());
        // A `GET` for a stored entry with a validator asks the origin whether it still holds.
        let validating = match &self.prior {
            Some(prior) if !target.head => revalidate::condition(request.headers_mut(), prior),
            _ => false,
        };
        let started = Instant::now();
        let result = inner.call(request).await;
        let exchange = Exchange {
            received: SystemTime::now(),
            delay: started.elapsed(),
        };
        let failed = match &result {
            Err(_) => true,
            Ok(r) => matches!(r.status().as_u16(), 500 | 502 | 503 | 504),
        };
        if let Some(prior) = self.stand_in(failed) {
            target.release(self.lock).await;
            tracing::info!(target: TARGET, "handler failed; serving the stale entry");
            let status = "fwd=stale; detail=stale-if-error";
            return Ok(response::serve(prior.entry, prior.age, target.head, status));
        }
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                target.release(self.lock).await;
                return Err(error);
            }
        };
        let not_modified = validating && response.status() == http::StatusCode::NOT_MODIFIED;
        if let Some(prior) = self.prior.take().filter(|_| not_modified) {
            let revalidation = Revalidation {
                prior,
                version,
                lock: self.lock,
                conditional: self.conditional.take(),
                status: self.status,
            };
            return Ok(revalidation
                .confirmed(target, response.headers(), exchange)
                .await);
        }
        let (Some(version), Some(request_headers)) = (version, request_headers) else {
            return Ok(self.pass(target, response).await);
        };
        let config = target.config();
        match policy::storable(response.status(), response.headers(), config, exchange) {
            Ok(storable) => {
                let storing = Storing {
                    version,
                    storable,
                    request_headers,
                    started,
                };
                Ok(self.keep(target, response, storing).await)
            }
            Err(why) => {
                tracing::debug!(target: TARGET, ?why, "response not stored");
                Ok(self.pass(target, response).await)
            }
        }
    }

    /// The stored entry to serve instead of a failed response, if it may stand in.
    fn stand_in(&mut self, failed: bool) -> Option<Prior> {
        if failed && self.prior.as_ref().is_some_and(|p| p.stand_in) {
            self.prior.take()
        } else {
            None
        }
    }

    /// Reads the body of a storable response up to the cap and stores it if it was read whole
    /// (within the cap, without trailers); else passes it on whole, unstored.
    async fn keep<B, T>(
        &self,
        target: &Target<'_, B>,
        response: Response<T>,
        storing: Storing,
    ) -> Response<ResponseBody<T>>
    where
        B: CacheStore,
        T: Body<Data = Bytes>,
    {
        let (mut parts, body) = response.into_parts();
        let read = read_up_to(body, target.config().max_body).await;
        let Some(data) = read.storable().cloned() else {
            target.release(self.lock).await;
            response::mark(&mut parts.headers, self.status);
            return Response::from_parts(parts, ResponseBody::read(read));
        };
        let names = policy::vary_names(&parts.headers).unwrap_or_default();
        target.learn_vary(&names);
        let entry = Entry {
            status: parts.status,
            initial_age: storing.storable.initial_age,
            fresh_for: fresh_ttl(target.config(), storing.storable),
            headers: policy::stored_headers(&parts.headers),
            vary: key::vary_values(&storing.request_headers, &names),
            body: data,
        };
        if self.store(target, &entry, &storing).await {
            response::mark(&mut parts.headers, &format!("{}; stored", self.status));
        } else {
            response::mark(&mut parts.headers, self.status);
        }
        Response::from_parts(parts, ResponseBody::full(entry.body))
    }

    /// The handler's response, passed on unstored.
    async fn pass<B, T>(
        &self,
        target: &Target<'_, B>,
        response: Response<T>,
    ) -> Response<ResponseBody<T>>
    where
        B: CacheStore,
        T: Body,
    {
        target.release(self.lock).await;
        response::passed(response, self.status)
    }

    /// Writes `entry` as `storing` says (its TTL with jitter); the write releases the fill
    /// lock. Answers whether it was written.
    async fn store<B: CacheStore>(
        &self,
        target: &Target<'_, B>,
        entry: &Entry,
        storing: &Storing,
    ) -> bool {
        let encoded = match entry.encode() {
            Ok(encoded) => encoded,
            Err(error) => {
                tracing::warn!(target: TARGET, %error, "could not encode the cache entry");
                target.release(self.lock).await;
                return false;
            }
        };
        let request = StoreRequest {
            segment: target.keys.segment,
            key: target.keys.variant(&entry.vary),
            version: storing.version,
            fill: self.lock.map(|t| (target.keys.entry, t)),
            entry: encoded,
            ttl: entry.fresh_for,
            stale_while_revalidate: storing.storable.stale_while_revalidate,
            stale_if_error: storing.storable.stale_if_error,
            // The handler's time and the body's: what a recompute costs (XFetch).
            compute_time: storing.started.elapsed(),
            keep: storing.storable.keep,
        };
        target.write(request).await
    }
}

/// The TTL an entry is written with: its freshness left, with jitter. The heuristic TTL spreads
/// both ways; an explicit lifetime only ever gets shorter (a shared cache must not serve past
/// it). Zero (revalidate before every use) stays zero.
pub(super) fn fresh_ttl(config: &super::config::Config, storable: policy::Storable) -> Duration {
    if storable.ttl.is_zero() {
        return Duration::ZERO;
    }
    let jitter = match (config.jitter > 0.0, storable.explicit) {
        (false, _) => 1.0,
        (true, false) => 1.0 + rand::random_range(-config.jitter..=config.jitter),
        (true, true) => 1.0 - rand::random_range(0.0..=config.jitter),
    };
    storable.ttl.mul_f64(jitter).max(Duration::from_millis(1))
}
