//! The one response body the layers share, and reading a body up to a cap.
//!
//! Every layer answers with [`ResponseBody`]: the inner service's body untouched, a body the
//! layer built or took from the store (a rejection, a cache hit, a replay), or a body the layer
//! read in part (to store it) followed by the rest of the inner body.
//!
//! One rule for trailers, in every layer: a body that ends with trailers is passed on whole,
//! trailers included, and is never stored (a stored body could not replay them).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body of every layer of this crate: the inner service's body, a body built
    /// by the layer (a rejection, a cache hit, a replayed response), or the part of the inner
    /// body the layer read followed by the rest of it.
    pub struct ResponseBody<B: Body> {
        #[pin]
        inner: Inner<B, B::Error>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<B, E> {
        Service { #[pin] body: B },
        Full { data: Option<Bytes> },
        // Boxed: rare (a body a layer read to store it), and four times the size of the others,
        // which every response of every layer would otherwise carry and move.
        Read { read: Box<Read<B, E>> },
    }
}

/// What a layer read of a body and what it left: see [`ResponseBody::read`].
struct Read<B, E> {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    error: Option<E>,
    rest: Option<Pin<Box<B>>>,
}

impl<B: Body> ResponseBody<B> {
    /// The inner service's body, untouched.
    pub(crate) fn service(body: B) -> Self {
        Self {
            inner: Inner::Service { body },
        }
    }

    /// A complete body held in memory.
    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            inner: Inner::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// What [`read_up_to`] read, then whatever of the body it left: the rest of the body, the
    /// trailers, or the error the body ended with.
    pub(crate) fn read(read: ReadBody<B>) -> Self {
        let data = (!read.data.is_empty()).then_some(read.data);
        let (trailers, error, rest) = match read.end {
            ReadEnd::Complete { trailers } => (trailers, None, None),
            ReadEnd::OverCap { rest } => (None, None, Some(rest)),
            ReadEnd::Failed { error } => (None, Some(error), None),
        };
        Self {
            inner: Inner::Read {
                read: Box::new(Read {
                    data,
                    trailers,
                    error,
                    rest,
                }),
            },
        }
    }
}

/// Which body a layer's responses carry: the type parameter `K` of a layer that lets you
/// choose ([`RateLimitLayer`](crate::rate_limit::RateLimitLayer)). Sealed: [`Wrapped`] (the
/// default) and [`InnerBody`] are the two kinds.
pub trait BodyKind<B>: sealed::Sealed {
    /// The body of the layer's responses, when the inner service's body is `B`.
    type Body;

    /// The inner service's body, as the layer passes it on.
    #[doc(hidden)]
    fn service(body: B) -> Self::Body;

    /// A body the layer made (a rejection).
    #[doc(hidden)]
    fn full(data: Bytes) -> Self::Body;
}

/// Responses carry a [`ResponseBody`]: the inner service's body untouched, or the body of the
/// layer's own response. Works with any inner body; the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wrapped;

/// Responses carry the inner service's own body type, and the layer makes the body of its own
/// responses (a rejection) with `From<Bytes>`: for an inner body that can be made from bytes,
/// such as axum's `Body` or `http_body_util::Full<Bytes>`.
///
/// With axum, the router boxes every body that is not its own `Body` once more on the way
/// out; a layer that returns `Body` itself saves that allocation on every response. A body
/// that cannot be made from bytes (hyper's `Incoming`, as a proxy passes it on) needs
/// [`Wrapped`].
#[derive(Clone, Copy, Debug, Default)]
pub struct InnerBody;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Wrapped {}
    impl Sealed for super::InnerBody {}
}

impl<B: Body> BodyKind<B> for Wrapped {
    type Body = ResponseBody<B>;

    #[inline]
    fn service(body: B) -> Self::Body {
        ResponseBody::service(body)
    }

    fn full(data: Bytes) -> Self::Body {
        ResponseBody::full(data)
    }
}

impl<B: From<Bytes>> BodyKind<B> for InnerBody {
    type Body = B;

    #[inline]
    fn service(body: B) -> Self::Body {
        body
    }

    fn full(data: Bytes) -> Self::Body {
        B::from(data)
    }
}

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
        match self.project().inner.project() {
            InnerProj::Service { body } => body.poll_frame(cx),
            InnerProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            InnerProj::Read { read } => {
                let Read {
                    data,
                    trailers,
                    error,
                    rest,
                } = &mut **read;
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if let Some(trailers) = trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                if let Some(error) = error.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                match rest {
                    Some(rest) => rest.as_mut().poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Service { body } => body.is_end_stream(),
            Inner::Full { data } => data.is_none(),
            Inner::Read { read } => {
                let Read {
                    data,
                    trailers,
                    error,
                    rest,
                } = &**read;
                data.is_none()
                    && trailers.is_none()
                    && error.is_none()
                    && rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let len = |d: &Option<Bytes>| d.as_ref().map_or(0, |d| d.len() as u64);
        match &self.inner {
            Inner::Service { body } => body.size_hint(),
            Inner::Full { data } => SizeHint::with_exact(len(data)),
            Inner::Read { read } => match &read.rest {
                None => SizeHint::with_exact(len(&read.data)),
                Some(rest) => {
                    let inner = rest.size_hint();
                    let mut hint = SizeHint::new();
                    hint.set_lower(inner.lower().saturating_add(len(&read.data)));
                    if let Some(upper) = inner.upper() {
                        hint.set_upper(upper.saturating_add(len(&read.data)));
                    }
                    hint
                }
            },
        }
    }
}

impl<B: Body> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Service { .. } => f.write_str("ResponseBody::Service"),
            Inner::Full { data } => f
                .debug_tuple("ResponseBody::Full")
                .field(&data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Inner::Read { read } => f
                .debug_struct("ResponseBody::Read")
                .field("read", &read.data.as_ref().map_or(0, Bytes::len))
                .field("streaming", &read.rest.is_some())
                .finish(),
        }
    }
}

/// What [`read_up_to`] read of a body.
pub(crate) struct ReadBody<B: Body> {
    /// The data read. At most the cap when the body was read whole; when it was over the cap,
    /// what had been read when that became known (possibly more than the cap).
    pub(crate) data: Bytes,
    /// How the reading ended.
    pub(crate) end: ReadEnd<B>,
}

/// How [`read_up_to`] ended.
pub(crate) enum ReadEnd<B: Body> {
    /// The body ended within the cap, with trailers or without.
    Complete {
        /// The trailers the body ended with. A body with trailers is never stored.
        trailers: Option<HeaderMap>,
    },
    /// The body is larger than the cap (its size hint said so, or more data came): the rest.
    OverCap {
        /// The unread rest of the body.
        rest: Pin<Box<B>>,
    },
    /// The body failed.
    Failed {
        /// Its error.
        error: B::Error,
    },
}

impl<B: Body> ReadBody<B> {
    /// The data, when the body was read whole within the cap and had no trailers: the only
    /// case in which a layer may store it.
    pub(crate) fn storable(&self) -> Option<&Bytes> {
        matches!(self.end, ReadEnd::Complete { trailers: None }).then_some(&self.data)
    }
}

/// Reads `body` into memory until it ends, fails, or holds more than `cap` bytes. A body whose
/// size hint already says it is larger than `cap` is not read at all.
pub(crate) async fn read_up_to<B>(body: B, cap: usize) -> ReadBody<B>
where
    B: Body,
    B::Data: Buf,
{
    let mut body = Box::pin(body);
    let mut buf = BytesMut::new();
    if body.size_hint().lower() > cap as u64 {
        return ReadBody {
            data: Bytes::new(),
            end: ReadEnd::OverCap { rest: body },
        };
    }
    loop {
        if buf.len() > cap {
            return ReadBody {
                data: buf.freeze(),
                end: ReadEnd::OverCap { rest: body },
            };
        }
        let end = match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            None => ReadEnd::Complete { trailers: None },
            Some(Err(error)) => ReadEnd::Failed { error },
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    while data.has_remaining() {
                        let chunk = data.chunk();
                        let n = chunk.len();
                        buf.extend_from_slice(chunk);
                        data.advance(n);
                    }
                    continue;
                }
                Err(frame) => ReadEnd::Complete {
                    trailers: frame.into_trailers().ok(),
                },
            },
        };
        return ReadBody {
            data: buf.freeze(),
            end,
        };
    }
}

/// Whether a field is hop-by-hop (RFC 9110 section 7.6.1): one of the fields defined so, or a
/// field named in `Connection`. Hop-by-hop fields are never stored or replayed.
pub(crate) fn is_hop_by_hop(headers: &HeaderMap, name: &http::HeaderName) -> bool {
    const HOP_BY_HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    let name = name.as_str();
    HOP_BY_HOP.contains(&name)
        || headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|listed| listed.trim().eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn frames(parts: Vec<Frame<Bytes>>) -> impl Body<Data = Bytes, Error = std::io::Error> {
        StreamBody::new(futures_util::stream::iter(
            parts.into_iter().map(Ok::<_, std::io::Error>),
        ))
    }

    #[tokio::test]
    async fn reads_a_small_body_whole_and_replays_it() {
        let read = read_up_to(Full::new(Bytes::from_static(b"hello")), 10).await;
        assert_eq!(read.storable(), Some(&Bytes::from_static(b"hello")));
        let body = ResponseBody::read(read).collect().await.expect("body");
        assert_eq!(body.to_bytes(), Bytes::from_static(b"hello"));
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_not_storable_and_is_passed_on_whole() {
        let parts = vec![
            Frame::data(Bytes::from_static(b"abc")),
            Frame::data(Bytes::from_static(b"def")),
            Frame::data(Bytes::from_static(b"ghi")),
        ];
        let read = read_up_to(frames(parts), 4).await;
        assert!(read.storable().is_none());
        assert!(matches!(read.end, ReadEnd::OverCap { .. }));
        let body = ResponseBody::read(read).collect().await.expect("body");
        assert_eq!(body.to_bytes(), Bytes::from_static(b"abcdefghi"));
    }

    #[tokio::test]
    async fn the_size_hint_stops_reading_early() {
        let read = read_up_to(Full::new(Bytes::from_static(b"0123456789")), 4).await;
        assert!(read.data.is_empty());
        let body = ResponseBody::read(read).collect().await.expect("body");
        assert_eq!(body.to_bytes(), Bytes::from_static(b"0123456789"));
    }

    #[tokio::test]
    async fn trailers_are_passed_on_and_make_a_body_unstorable() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let parts = vec![
            Frame::data(Bytes::from_static(b"abc")),
            Frame::trailers(trailers.clone()),
        ];
        let read = read_up_to(frames(parts), 100).await;
        assert!(read.storable().is_none());
        let collected = ResponseBody::read(read).collect().await.expect("body");
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"abc"));
    }

    #[test]
    fn hop_by_hop_fields_include_those_named_in_connection() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", http::HeaderValue::from_static("close, X-Hop"));
        let is = |n: &'static str| is_hop_by_hop(&headers, &http::HeaderName::from_static(n));
        assert!(is("transfer-encoding"));
        assert!(is("x-hop"));
        assert!(!is("etag"));
    }
}
