use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use http::Request;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::{layer::Shared, ThrottleError, TARGET};
use crate::{
    store::{Bounded, Decision, FailureMode, RateCheck, RateLimitStore, StoreError},
    StoreKey,
};

pin_project! {
    /// Response future of [`Throttle`](super::Throttle).
    ///
    /// It asks the store, sleeps as long as the store said (plus jitter) and asks again, until
    /// the request passes (then it runs the inner service) or cannot pass within the maximum
    /// wait. See the [module docs](super) for an example.
    pub struct ResponseFuture<S, B, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        B: RateLimitStore,
    {
        #[pin]
        state: State<B::Future, S::Future>,
        waiting: Option<Waiting<S, B, Request<ReqBody>>>,
        error: Option<ThrottleError<S::Error>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<C, F> {
        Checking {
            #[pin]
            check: Bounded<C>,
        },
        Sleeping {
            #[pin]
            sleep: Sleep,
        },
        Running {
            #[pin]
            future: F,
        },
        Failed,
    }
}

/// What to do after a store answer.
pub(crate) enum Next<E> {
    /// The request passed: send it.
    Send,
    /// Denied: ask again after this long.
    Sleep(Duration),
    /// Give up with this error.
    Fail(ThrottleError<E>),
}

/// A request waiting for the limit: what each new store call needs, and the request itself.
pub(crate) struct Waiting<S, B, R> {
    shared: Arc<Shared<B>>,
    key: StoreKey,
    cost: u64,
    started: Instant,
    /// How many times the store was asked.
    checks: u32,
    call: Option<(S, R)>,
}

impl<S, B, R> Waiting<S, B, R> {
    pub(crate) fn new(shared: &Arc<Shared<B>>, key: StoreKey, cost: u64) -> Self {
        Self {
            shared: Arc::clone(shared),
            key,
            cost,
            started: Instant::now(),
            checks: 0,
            call: None,
        }
    }

    /// What to do after the store answered `result`.
    pub(crate) fn next<E>(&mut self, result: Result<Decision, StoreError>) -> Next<E> {
        self.checks += 1;
        let config = &self.shared.config;
        let decision = match result {
            Ok(decision) => decision,
            Err(error) => {
                let open = config.failure_mode == FailureMode::Open;
                log_store_failure!(error, target: TARGET, key = %self.key, %error, fail_open = open, "throttle store failed");
                return if open {
                    Next::Send
                } else {
                    Next::Fail(ThrottleError::Store(error))
                };
            }
        };
        let waited = self.started.elapsed();
        if decision.allowed {
            tracing::debug!(target: TARGET, key = %self.key, checks = self.checks, waited_ms = waited.as_millis() as u64, "throttled request passes");
            return Next::Send;
        }
        // A denial always says how long to wait; 1 ms at least, so a rounded-down answer does
        // not make a busy loop.
        let retry_after = decision.retry_after.max(Duration::from_millis(1));
        let left = config.max_wait.saturating_sub(waited);
        if retry_after > left {
            tracing::debug!(target: TARGET, key = %self.key, checks = self.checks, waited_ms = waited.as_millis() as u64, retry_after_ms = retry_after.as_millis() as u64, "throttled request gives up");
            return Next::Fail(ThrottleError::Timeout {
                waited,
                retry_after,
            });
        }
        let jitter = retry_after.mul_f64(config.jitter * rand::random::<f64>());
        let sleep = (retry_after + jitter).min(left);
        tracing::trace!(target: TARGET, key = %self.key, sleep_ms = sleep.as_millis() as u64, "throttled request waits");
        Next::Sleep(sleep)
    }
}

impl<S, B: RateLimitStore, R> Waiting<S, B, R> {
    /// Asks the store again.
    fn check(&self) -> Bounded<B::Future> {
        let config = &self.shared.config;
        let store = &self.shared.store;
        let check = RateCheck::new(&self.key, &config.policy.rules, self.cost, false);
        let timeout = store.is_remote().then_some(config.store_timeout);
        crate::store::bounded(timeout, store.check(check))
    }
}

impl<S, B, ReqBody> ResponseFuture<S, B, ReqBody>
where
    S: Service<Request<ReqBody>>,
    B: RateLimitStore,
{
    /// Runs the inner service's `future`.
    pub(crate) fn running(future: S::Future) -> Self {
        Self {
            state: State::Running { future },
            waiting: None,
            error: None,
        }
    }

    /// Fails with `error`; the request is not sent.
    pub(crate) fn failed(error: ThrottleError<S::Error>) -> Self {
        Self {
            state: State::Failed,
            waiting: None,
            error: Some(error),
        }
    }

    /// Waits for the store's answer `check`, then sends `request` with `service` (made ready)
    /// or waits as the answer says.
    pub(crate) fn checking(
        mut waiting: Waiting<S, B, Request<ReqBody>>,
        check: B::Future,
        service: S,
        request: Request<ReqBody>,
    ) -> Self {
        let config = &waiting.shared.config;
        let timeout = waiting
            .shared
            .store
            .is_remote()
            .then_some(config.store_timeout);
        let check = crate::store::bounded(timeout, check);
        waiting.call = Some((service, request));
        Self {
            state: State::Checking { check },
            waiting: Some(waiting),
            error: None,
        }
    }

    /// Sleeps `wait`, then asks the store again.
    pub(crate) fn sleeping(
        mut waiting: Waiting<S, B, Request<ReqBody>>,
        wait: Duration,
        service: S,
        request: Request<ReqBody>,
    ) -> Self {
        waiting.call = Some((service, request));
        Self {
            state: State::Sleeping {
                sleep: tokio::time::sleep(wait),
            },
            waiting: Some(waiting),
            error: None,
        }
    }
}

impl<S, B, ReqBody> Future for ResponseFuture<S, B, ReqBody>
where
    S: Service<Request<ReqBody>>,
    B: RateLimitStore,
{
    type Output = Result<S::Response, ThrottleError<S::Error>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking { check } => {
                    let result = ready!(check.poll(cx));
                    let Some(waiting) = this.waiting.as_mut() else {
                        return Poll::Pending;
                    };
                    match waiting.next(result) {
                        Next::Send => {
                            // `call` is `Some` until the request is sent, which happens once.
                            let Some((mut service, request)) = waiting.call.take() else {
                                return Poll::Pending;
                            };
                            *this.waiting = None;
                            this.state.set(State::Running {
                                future: service.call(request),
                            });
                        }
                        Next::Sleep(wait) => this.state.set(State::Sleeping {
                            sleep: tokio::time::sleep(wait),
                        }),
                        Next::Fail(error) => {
                            *this.waiting = None;
                            *this.error = Some(error);
                            this.state.set(State::Failed);
                        }
                    }
                }
                StateProj::Sleeping { sleep } => {
                    ready!(sleep.poll(cx));
                    let Some(waiting) = this.waiting.as_ref() else {
                        return Poll::Pending;
                    };
                    this.state.set(State::Checking {
                        check: waiting.check(),
                    });
                }
                StateProj::Running { future } => {
                    return future.poll(cx).map_err(ThrottleError::Inner);
                }
                StateProj::Failed => {
                    // Taken once: a future is not polled again after it returned `Ready`.
                    return match this.error.take() {
                        Some(error) => Poll::Ready(Err(error)),
                        None => Poll::Pending,
                    };
                }
            }
        }
    }
}
