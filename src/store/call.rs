//! The store-call policy that every layer and [`Lock`](crate::lock::Lock) share: each store call
//! is bounded by a timeout ([`Bounded`]), and a layer does what its [`FailureMode`] says when a
//! call fails or times out.

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::StoreError;

/// What a layer does with a request when its store call fails or does not answer within the
/// store timeout. Every layer takes it through `.on_store_error(mode)`; each documents its own
/// default.
///
/// | layer | `Open` | `Closed` | default |
/// |---|---|---|---|
/// | [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) | the request is admitted without a limit | `503` | its [local fallback](crate::rate_limit::LocalFallback), which `.on_store_error` replaces |
/// | [`CacheLayer`](crate::cache::CacheLayer) | the request goes to the inner service, nothing is stored | `503` | `Open` |
/// | [`IdempotencyLockLayer`](crate::idempotency::IdempotencyLockLayer) | the handler runs without protection | `503` | `Closed` |
///
/// Either way a warning is logged (`tracing`). A `503` carries `Retry-After: 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureMode {
    /// Serve the request without what the layer adds (no limit, no cache, no protection).
    Open,
    /// Answer `503 Service Unavailable` with `Retry-After: 1`.
    Closed,
}

pin_project! {
    /// A store call bounded by a timeout: it ends with [`StoreError::Timeout`] when the call has
    /// not answered in time. Made by [`bounded`]; without a timeout it is the call itself.
    #[derive(Debug)]
    pub(crate) struct Bounded<F> {
        #[pin]
        call: F,
        #[pin]
        sleep: Option<Sleep>,
        timeout: Duration,
    }
}

/// Bounds `call` by `timeout` (`None`: no bound, for an in-process store).
pub(crate) fn bounded<F>(timeout: Option<Duration>, call: F) -> Bounded<F> {
    Bounded {
        call,
        sleep: timeout.map(tokio::time::sleep),
        timeout: timeout.unwrap_or_default(),
    }
}

impl<F, T> Future for Bounded<F>
where
    F: Future<Output = Result<T, StoreError>>,
{
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.call.poll(cx) {
            return Poll::Ready(result);
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => {
                ready!(sleep.poll(cx));
                Poll::Ready(Err(StoreError::Timeout(*this.timeout)))
            }
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_that_does_not_answer_times_out() {
        let call = std::future::pending::<Result<(), StoreError>>();
        let result = bounded(Some(Duration::from_millis(250)), call).await;
        assert!(matches!(result, Err(StoreError::Timeout(d)) if d == Duration::from_millis(250)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_passes_through() {
        let call = async { Ok::<_, StoreError>(7) };
        assert_eq!(
            bounded(Some(Duration::from_millis(1)), call).await.ok(),
            Some(7)
        );
        let call = async { Ok::<_, StoreError>(8) };
        assert_eq!(bounded(None, call).await.ok(), Some(8));
    }
}
