use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

/// Response future of [`IdempotencyLock`](super::IdempotencyLock).
///
/// The layer awaits the request body, several store calls and the response body in sequence;
/// it runs them as one boxed future (one allocation per request, next to network round trips).
pub struct ResponseFuture<T> {
    pub(crate) inner: Pin<Box<dyn Future<Output = T> + Send + 'static>>,
}

impl<T> Future for ResponseFuture<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T> fmt::Debug for ResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
