//! The stored entry: a response (status, end-to-end headers, body) and the request header
//! values it was selected by (`Vary`), encoded with `postcard`.
//!
//! Layout: one format byte ([`FORMAT`]), the length of the head (u32, big endian), the head
//! (postcard), then the raw body. Anything else decodes to an error, and the layer treats the
//! entry as a miss and deletes it.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

/// The version of the encoding; bump it when the head changes.
const FORMAT: u8 = 3;

#[derive(Serialize, Deserialize)]
struct Head {
    status: u16,
    /// The corrected initial age, in milliseconds.
    initial_age_ms: u64,
    /// How long it was fresh from when it was stored, in milliseconds.
    fresh_for_ms: u64,
    headers: Vec<(String, Vec<u8>)>,
    vary: Vec<(String, Option<Vec<u8>>)>,
}

/// A decoded entry.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) status: StatusCode,
    /// The response's age when it was stored (RFC 9111 section 4.2.3): the `Age` sent with it
    /// is this plus the time it spent in the store.
    pub(crate) initial_age: Duration,
    /// How long it is fresh from when it was stored (its freshness lifetime minus its initial
    /// age, after jitter): what the request's `max-age`, `min-fresh` and `max-stale` are
    /// measured against.
    pub(crate) fresh_for: Duration,
    pub(crate) headers: HeaderMap,
    /// The request header values (lowercase name, value) the response varies on.
    pub(crate) vary: Vec<(HeaderName, Option<HeaderValue>)>,
    pub(crate) body: Bytes,
}

/// Why an entry could not be decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EntryError {
    #[error("unknown entry format {0}")]
    Format(u8),
    #[error("truncated entry")]
    Truncated,
    #[error("undecodable entry head: {0}")]
    Head(#[from] postcard::Error),
    #[error("invalid field in entry: {0}")]
    Field(&'static str),
}

impl Entry {
    /// The encoded entry: its head, then the body.
    pub(crate) fn encode(&self) -> Result<Bytes, postcard::Error> {
        let head = self.encode_head()?;
        let mut out = BytesMut::with_capacity(head.len() + self.body.len());
        out.put_slice(&head);
        out.put_slice(&self.body);
        Ok(out.freeze())
    }

    /// The first bytes of the encoded entry, up to the body: what a refresh after a `304`
    /// replaces.
    pub(crate) fn encode_head(&self) -> Result<Bytes, postcard::Error> {
        let head = Head {
            status: self.status.as_u16(),
            initial_age_ms: u64::try_from(self.initial_age.as_millis()).unwrap_or(u64::MAX),
            fresh_for_ms: u64::try_from(self.fresh_for.as_millis()).unwrap_or(u64::MAX),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            vary: self
                .vary
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        v.as_ref().map(|v| v.as_bytes().to_vec()),
                    )
                })
                .collect(),
        };
        let head = postcard::to_stdvec(&head)?;
        let mut out = BytesMut::with_capacity(5 + head.len());
        out.put_u8(FORMAT);
        out.put_u32(u32::try_from(head.len()).map_err(|_| postcard::Error::SerializeBufferFull)?);
        out.put_slice(&head);
        Ok(out.freeze())
    }

    /// The head of encoded entry bytes (as [`encode_head`](Self::encode_head) made it), or
    /// `None` when they are not an entry.
    pub(crate) fn head_of(raw: &Bytes) -> Option<Bytes> {
        let len: [u8; 4] = raw.get(1..5)?.try_into().ok()?;
        let end = 5 + u32::from_be_bytes(len) as usize;
        (raw.first() == Some(&FORMAT) && raw.len() >= end).then(|| raw.slice(..end))
    }

    pub(crate) fn decode(raw: &Bytes) -> Result<Self, EntryError> {
        let (&format, rest) = raw.split_first().ok_or(EntryError::Truncated)?;
        if format != FORMAT {
            return Err(EntryError::Format(format));
        }
        let len_bytes: [u8; 4] = rest
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(EntryError::Truncated)?;
        let len = u32::from_be_bytes(len_bytes) as usize;
        let head_bytes = rest.get(4..4 + len).ok_or(EntryError::Truncated)?;
        let head: Head = postcard::from_bytes(head_bytes)?;
        let status = StatusCode::from_u16(head.status).map_err(|_| EntryError::Field("status"))?;
        let mut headers = HeaderMap::with_capacity(head.headers.len());
        for (name, value) in head.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| EntryError::Field("header name"))?;
            let value =
                HeaderValue::from_bytes(&value).map_err(|_| EntryError::Field("header value"))?;
            headers.append(name, value);
        }
        let mut vary = Vec::with_capacity(head.vary.len());
        for (name, value) in head.vary {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| EntryError::Field("vary name"))?;
            let value = value
                .map(|v| HeaderValue::from_bytes(&v))
                .transpose()
                .map_err(|_| EntryError::Field("vary value"))?;
            vary.push((name, value));
        }
        Ok(Self {
            status,
            initial_age: Duration::from_millis(head.initial_age_ms),
            fresh_for: Duration::from_millis(head.fresh_for_ms),
            headers,
            vary,
            body: raw.slice(1 + 4 + len..),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let entry = Entry {
            status: StatusCode::NOT_FOUND,
            initial_age: Duration::from_millis(7_250),
            fresh_for: Duration::from_secs(60),
            headers,
            vary: vec![(
                HeaderName::from_static("accept-language"),
                Some(HeaderValue::from_static("fr")),
            )],
            body: Bytes::from_static(b"hello"),
        };
        let raw = entry.encode().unwrap();
        let back = Entry::decode(&raw).unwrap();
        let head = Entry::head_of(&raw).unwrap();
        assert_eq!(head, entry.encode_head().unwrap());
        assert_eq!(&raw[head.len()..], b"hello");
        assert_eq!(back.status, StatusCode::NOT_FOUND);
        assert_eq!(back.initial_age, entry.initial_age);
        assert_eq!(back.fresh_for, entry.fresh_for);
        assert_eq!(back.headers.get_all("x-multi").iter().count(), 2);
        assert_eq!(back.body, "hello");
        assert_eq!(back.vary, entry.vary);
        for bad in [
            &b""[..],
            b"\x01",
            b"\x02abc",
            // Earlier formats read as a miss.
            b"\x01\x00\x00\x00\x00",
            b"\x02\x00\x00\x00\x00",
            b"\x01\x00\x00\x00\x09abc",
            b"garbage",
        ] {
            assert!(Entry::decode(&Bytes::copy_from_slice(bad)).is_err());
        }
    }
}
