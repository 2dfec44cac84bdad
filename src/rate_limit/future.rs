use std::{
    future::Future,
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
    ResponseBody,
};
use crate::store::RateLimitStore;

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit).
    ///
    /// It waits for the store when the store is remote, then runs the inner service or answers
    /// with the rejection. See the [module docs](super) for an example.
    pub struct ResponseFuture<S, B, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        B: RateLimitStore,
    {
        #[pin]
        state: State<B::Future, S::Future, S, Request<ReqBody>>,
        pending: Option<Pending<B>>,
        headers: Option<HeaderMap>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<C, F, S, R> {
        Checking {
            #[pin]
            check: crate::store::Bounded<C>,
            call: Option<(S, R)>,
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

impl<S, B, ReqBody> ResponseFuture<S, B, ReqBody>
where
    S: Service<Request<ReqBody>>,
    B: RateLimitStore,
{
    /// Runs the inner service's `future`, then adds `headers` to its response.
    pub(crate) fn running(future: S::Future, headers: Option<HeaderMap>) -> Self {
        Self {
            state: State::Running { future },
            pending: None,
            headers,
        }
    }

    pub(crate) fn rejected(response: Response<Bytes>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
            pending: None,
            headers: None,
        }
    }

    pub(crate) fn checking(
        check: B::Future,
        timeout: Option<Duration>,
        service: S,
        request: Request<ReqBody>,
        pending: Pending<B>,
    ) -> Self {
        Self {
            state: State::Checking {
                check: crate::store::bounded(timeout, check),
                call: Some((service, request)),
            },
            pending: Some(pending),
            headers: None,
        }
    }
}

impl<S, B, ReqBody, ResBody> Future for ResponseFuture<S, B, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    B: RateLimitStore,
    ResBody: http_body::Body,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking { check, call } => {
                    let result = ready!(check.poll(cx));
                    let answer = match this.pending.take() {
                        Some(pending) => pending.finish(result),
                        None => Answer::Admit(None),
                    };
                    match answer {
                        Answer::Admit(headers) => {
                            // `call` is `Some` until this transition, which happens once.
                            let Some((mut service, request)) = call.take() else {
                                return Poll::Pending;
                            };
                            *this.headers = headers;
                            this.state.set(State::Running {
                                future: service.call(request),
                            });
                        }
                        Answer::Reject(response) => {
                            this.state.set(State::Rejected {
                                response: Some(response),
                            });
                        }
                    }
                }
                StateProj::Running { future } => {
                    let mut response = ready!(future.poll(cx))?;
                    if let Some(extra) = this.headers.take() {
                        for (name, value) in extra {
                            if let Some(name) = name {
                                response.headers_mut().insert(name, value);
                            }
                        }
                    }
                    return Poll::Ready(Ok(response.map(ResponseBody::service)));
                }
                StateProj::Rejected { response } => {
                    // Taken once: a future is not polled again after it returned `Ready`.
                    let response = response.take().unwrap_or_default();
                    return Poll::Ready(Ok(response.map(ResponseBody::full)));
                }
            }
        }
    }
}
