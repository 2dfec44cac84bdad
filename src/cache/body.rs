use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The response body of a cached service: a body served from the cache, or the inner service's
/// body (possibly with its first part already read by the layer, up to the size cap).
pub struct ResponseBody<B: Body> {
    /// Frames already read, sent first.
    pending: VecDeque<Frame<Bytes>>,
    /// The rest of the inner body.
    rest: Option<Pin<Box<B>>>,
    /// An error the inner body returned while the layer read it, sent after `pending`.
    error: Option<B::Error>,
}

impl<B: Body> ResponseBody<B> {
    /// A complete body (from the cache, or read whole by the layer).
    pub(crate) fn full(data: Bytes) -> Self {
        let mut pending = VecDeque::new();
        if !data.is_empty() {
            pending.push_back(Frame::data(data));
        }
        Self {
            pending,
            rest: None,
            error: None,
        }
    }

    /// The inner body untouched.
    pub(crate) fn service(body: B) -> Self {
        Self::resumed(VecDeque::new(), Some(Box::pin(body)), None)
    }

    /// Frames already read, then the rest of the inner body (or the error it returned).
    pub(crate) fn resumed(
        pending: VecDeque<Frame<Bytes>>,
        rest: Option<Pin<Box<B>>>,
        error: Option<B::Error>,
    ) -> Self {
        Self {
            pending,
            rest,
            error,
        }
    }
}

// No field is ever pinned: the inner body is boxed, and the rest moves freely.
impl<B: Body> Unpin for ResponseBody<B> {}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        // Every field is `Unpin` (the inner body is boxed).
        let this = self.get_mut();
        if let Some(frame) = this.pending.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        match this.rest.as_mut() {
            Some(rest) => rest.as_mut().poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .pending
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        match &self.rest {
            None => SizeHint::with_exact(buffered),
            Some(rest) => {
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + buffered);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
}

impl<B: Body> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("pending_frames", &self.pending.len())
            .field("streaming", &self.rest.is_some())
            .finish()
    }
}
