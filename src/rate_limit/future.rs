use std::{
    future::Future,
    marker::PhantomData,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::{
    decision::{Answer, Pending},
    settle::Reservation,
};
use crate::{
    body::{BodyKind, Wrapped},
    store::RateLimitStore,
};

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit).
    ///
    /// It waits for the store when the store is remote, then runs the inner service or answers
    /// with the rejection. In a metered layer it holds the request's reservation: the
    /// settlement starts when the inner service's response is ready, and dropping the future
    /// before that refunds the estimate. See the [module docs](super) for an example.
    pub struct ResponseFuture<S, B, ReqBody, K = Wrapped>
    where
        S: Service<Request<ReqBody>>,
        B: RateLimitStore,
    {
        #[pin]
        state: State<S::Future, Checking<B, S, Request<ReqBody>>>,
        // Fields to add to the inner service's response (boxed: rarely there, and the future
        // is moved and boxed by the layers around it).
        headers: Option<Box<HeaderMap>>,
        // A metered request's reservation: not yet taken while checking, then taken (refunded
        // if dropped unsettled).
        reservation: Option<Reservation<B>>,
        // The body of the responses (see `BodyKind`).
        kind: PhantomData<fn() -> K>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C> {
        // Boxed: a store that answers at once (in process, a leased batch) never waits, and
        // the future stays small for it.
        Checking {
            checking: Pin<Box<C>>,
        },
        Running {
            #[pin]
            future: F,
        },
        Rejected {
            response: Option<Response<Bytes>>,
        },
    }
}

pin_project! {
    /// A request waiting for a remote store: the store's call, the inner service and request to
    /// call once it admits, and what the answer is made with.
    pub(crate) struct Checking<B, S, R>
    where
        B: RateLimitStore,
    {
        #[pin]
        check: crate::store::Bounded<B::Future>,
        call: Option<(S, R)>,
        pending: Option<Pending<B>>,
    }
}

impl<S, B, ReqBody, K> ResponseFuture<S, B, ReqBody, K>
where
    S: Service<Request<ReqBody>>,
    B: RateLimitStore,
{
    /// Runs the inner service's `future`, then adds `headers` to its response (and settles
    /// `reservation` with it).
    pub(crate) fn running(
        future: S::Future,
        headers: Option<Box<HeaderMap>>,
        reservation: Option<Reservation<B>>,
    ) -> Self {
        Self {
            state: State::Running { future },
            headers,
            reservation,
            kind: PhantomData,
        }
    }

    pub(crate) fn rejected(response: Response<Bytes>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
            headers: None,
            reservation: None,
            kind: PhantomData,
        }
    }

    /// Waits for the store's call in `checking` (see [`checking`]), then calls `service` with
    /// `request` or rejects; `reservation` (not yet taken) is taken when the store's answer
    /// says the cost was.
    pub(crate) fn checking(
        mut checking: Pin<Box<Checking<B, S, Request<ReqBody>>>>,
        service: S,
        request: Request<ReqBody>,
        reservation: Option<Reservation<B>>,
    ) -> Self {
        *checking.as_mut().project().call = Some((service, request));
        Self {
            state: State::Checking { checking },
            headers: None,
            reservation,
            kind: PhantomData,
        }
    }
}

/// The wait for a remote store's `check` (bounded by `timeout`), boxed once where the call is
/// made: the inner service and the request are put in by [`ResponseFuture::checking`].
pub(crate) fn checking<B, S, R>(
    check: B::Future,
    timeout: Option<Duration>,
    pending: Pending<B>,
) -> Pin<Box<Checking<B, S, R>>>
where
    B: RateLimitStore,
{
    Box::pin(Checking {
        check: crate::store::bounded(timeout, check),
        call: None,
        pending: Some(pending),
    })
}

impl<S, B, ReqBody, ResBody, K> Future for ResponseFuture<S, B, ReqBody, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    B: RateLimitStore,
    K: BodyKind<ResBody>,
{
    type Output = Result<Response<K::Body>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking { checking } => {
                    let checking = checking.as_mut().project();
                    let result = ready!(checking.check.poll(cx));
                    let call = checking.call;
                    let answer = match checking.pending.take() {
                        Some(pending) => pending.finish(result),
                        None => Answer::Admit(None),
                    };
                    let headers = match answer {
                        Answer::Admit(headers) => {
                            // Nothing was taken (fail open, shadow): nothing to settle.
                            *this.reservation = None;
                            Ok(headers)
                        }
                        Answer::Taken(headers, taken) => {
                            *this.reservation = this.reservation.take().map(|r| r.taken(taken));
                            Ok(headers)
                        }
                        Answer::Reject(response) => Err(response),
                    };
                    match headers {
                        Ok(headers) => {
                            // `call` is `Some` until this transition, which happens once.
                            let Some((mut service, request)) = call.take() else {
                                return Poll::Pending;
                            };
                            *this.headers = headers;
                            this.state.set(State::Running {
                                future: service.call(request),
                            });
                        }
                        Err(response) => {
                            *this.reservation = None;
                            this.state.set(State::Rejected {
                                response: Some(response),
                            });
                        }
                    }
                }
                StateProj::Running { future } => {
                    // An error drops the reservation: its estimate is refunded.
                    let result = ready!(future.poll(cx));
                    let reservation = this.reservation.take();
                    let mut response = result?;
                    if let Some(reservation) = reservation {
                        reservation.settle(&response);
                    }
                    if let Some(extra) = this.headers.take() {
                        for (name, value) in *extra {
                            if let Some(name) = name {
                                response.headers_mut().insert(name, value);
                            }
                        }
                    }
                    return Poll::Ready(Ok(response.map(K::service)));
                }
                StateProj::Rejected { response } => {
                    // Taken once: a future is not polled again after it returned `Ready`.
                    let response = response.take().unwrap_or_default();
                    return Poll::Ready(Ok(response.map(K::full)));
                }
            }
        }
    }
}
