//! The stored response of a completed request, encoded with `postcard` behind a version byte.

use bytes::Bytes;
use http::{header::CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::body::is_hop_by_hop;

const VERSION: u8 = 1;

/// A response as stored for replay.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    /// `None` when the body was not stored (larger than the cap, or it ended with trailers): the
    /// request ran, but cannot be replayed.
    pub(crate) body: Option<Vec<u8>>,
}

impl StoredResponse {
    /// The response to store: its status, its end-to-end fields (not hop-by-hop ones, nor
    /// `Content-Length`, which the replayed body sets) and its body (`None`: not replayable).
    pub(crate) fn new(status: StatusCode, headers: &HeaderMap, body: Option<&[u8]>) -> Self {
        let headers = headers
            .iter()
            .filter(|(name, _)| !is_hop_by_hop(headers, name) && *name != CONTENT_LENGTH)
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect();
        Self {
            status: status.as_u16(),
            headers,
            body: body.map(<[u8]>::to_vec),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        // Serialising plain owned data into a Vec cannot fail; an empty record would be refused
        // at decode and count as unreadable.
        if let Ok(bytes) = postcard::to_stdvec(self) {
            out.extend(bytes);
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes.split_first() {
            Some((&VERSION, rest)) => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }

    /// The response to replay, or `None` when the body was not stored.
    pub(crate) fn to_response(&self) -> Option<Response<Bytes>> {
        let body = self.body.as_ref()?;
        let mut response = Response::new(Bytes::copy_from_slice(body));
        *response.status_mut() = StatusCode::from_u16(self.status).ok()?;
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                response.headers_mut().append(name, value);
            }
        }
        Some(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_without_hop_by_hop_fields() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("connection", HeaderValue::from_static("close, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.append("set-thing", HeaderValue::from_static("a"));
        headers.append("set-thing", HeaderValue::from_static("b"));
        let stored = StoredResponse::new(StatusCode::CREATED, &headers, Some(b"{}"));
        let back = StoredResponse::decode(&stored.encode())
            .unwrap()
            .to_response()
            .unwrap();
        assert_eq!(back.status(), StatusCode::CREATED);
        assert_eq!(back.headers()["content-type"], "application/json");
        assert_eq!(back.headers().get_all("set-thing").iter().count(), 2);
        assert!(back.headers().get("connection").is_none());
        assert!(back.headers().get("x-private").is_none());
        assert!(back.headers().get("transfer-encoding").is_none());
        assert_eq!(back.body().as_ref(), b"{}");
    }

    #[test]
    fn garbage_is_unreadable_not_a_panic() {
        assert!(StoredResponse::decode(b"").is_none());
        assert!(StoredResponse::decode(&[VERSION, 0xff, 0xff, 0xff]).is_none());
        assert!(StoredResponse::decode(&[9, 1, 2]).is_none());
    }
}
