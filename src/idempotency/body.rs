use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body of [`IdempotencyLock`](super::IdempotencyLock): the inner body, a body
    /// read into memory (to store it, or replayed), or a body read up to the cap followed by the
    /// rest of the inner body.
    pub struct IdempotencyBody<B: Body> {
        #[pin]
        inner: Inner<B, B::Error>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<B, E> {
        Passed { #[pin] body: B },
        Full { data: Option<Bytes> },
        Prefixed { prefix: Option<Bytes>, rest: Pin<Box<B>> },
        Failed { prefix: Option<Bytes>, error: Option<E> },
    }
}

impl<B: Body> IdempotencyBody<B> {
    pub(crate) fn passed(body: B) -> Self {
        Self {
            inner: Inner::Passed { body },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            inner: Inner::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn failed(prefix: Bytes, error: B::Error) -> Self {
        Self {
            inner: Inner::Failed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                error: Some(error),
            },
        }
    }

    pub(crate) fn prefixed(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            inner: Inner::Prefixed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }
}

impl<B: Body<Data = Bytes>> Body for IdempotencyBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().inner.project() {
            InnerProj::Passed { body } => body.poll_frame(cx),
            InnerProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            InnerProj::Prefixed { prefix, rest } => match prefix.take() {
                Some(d) => Poll::Ready(Some(Ok(Frame::data(d)))),
                None => rest.as_mut().poll_frame(cx),
            },
            InnerProj::Failed { prefix, error } => match prefix.take() {
                Some(d) => Poll::Ready(Some(Ok(Frame::data(d)))),
                None => Poll::Ready(error.take().map(Err)),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Passed { body } => body.is_end_stream(),
            Inner::Full { data } => data.is_none(),
            Inner::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Inner::Failed { prefix, error } => prefix.is_none() && error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Passed { body } => body.size_hint(),
            Inner::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Inner::Prefixed { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let hint = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower() + extra);
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper + extra);
                }
                out
            }
            Inner::Failed { .. } => SizeHint::new(),
        }
    }
}

impl<B: Body> std::fmt::Debug for IdempotencyBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            Inner::Passed { .. } => "IdempotencyBody::Passed",
            Inner::Full { .. } => "IdempotencyBody::Full",
            Inner::Prefixed { .. } => "IdempotencyBody::Prefixed",
            Inner::Failed { .. } => "IdempotencyBody::Failed",
        })
    }
}
