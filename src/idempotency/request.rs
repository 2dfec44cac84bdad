//! What the layer takes from a request before claiming: the key, the body read into memory and
//! the record the request belongs to.

use bytes::Bytes;
use http::{request::Parts, HeaderValue};
use http_body::Body;

use super::{config::Config, Rejection};
use crate::{
    body::{read_up_to, ReadBody, ReadEnd},
    StoreKey,
};

/// What the layer does with a request, by its method and key.
pub(super) enum Keyed {
    /// Not concerned (another method, or no key when none is required): passed through.
    Pass,
    /// Answered by the layer.
    Reject(Rejection),
    /// A valid key.
    Key(String),
}

/// Whether `parts` is a request the layer handles, and with which key.
pub(super) fn key(config: &Config, parts: &Parts) -> Keyed {
    if !config.methods.contains(&parts.method) {
        return Keyed::Pass;
    }
    let mut fields = parts.headers.get_all(&config.header).iter();
    match (fields.next(), fields.next()) {
        (None, _) if config.required => Keyed::Reject(Rejection::MissingKey),
        (None, _) => Keyed::Pass,
        // Two fields: which one the client meant is unknown (a proxy may have added one).
        (Some(_), Some(_)) => Keyed::Reject(Rejection::InvalidKey),
        (Some(value), None) => match parse_key(value) {
            Some(key) => Keyed::Key(key.to_owned()),
            None => Keyed::Reject(Rejection::InvalidKey),
        },
    }
}

/// The key, if it is 1 to 255 visible ASCII characters. A Structured Fields string
/// (`"..."`, as the draft writes it) is accepted without its quotes; a value that opens a
/// quote must close it (a lone `"` is not a key).
fn parse_key(value: &HeaderValue) -> Option<&str> {
    let raw = value.to_str().ok()?;
    let key = match raw.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?,
        None => raw,
    };
    let valid = !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic());
    valid.then_some(key)
}

/// The request body, read into memory to fingerprint it and to hand it to the handler:
/// [`Rejection::TooLarge`] over `max_body` (a `Content-Length` over it is refused before
/// reading), [`Rejection::UnreadableBody`] when it fails. The handler gets the data only:
/// request trailers are not passed on.
pub(super) async fn read_body<B: Body>(
    config: &Config,
    parts: &Parts,
    body: B,
) -> Result<Bytes, Rejection> {
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > config.max_body as u64) {
        return Err(Rejection::TooLarge);
    }
    let read = read_up_to(body, config.max_body).await;
    whole(read)
}

fn whole<B: Body>(read: ReadBody<B>) -> Result<Bytes, Rejection> {
    match read.end {
        ReadEnd::Complete { .. } => Ok(read.data),
        ReadEnd::OverCap { .. } => Err(Rejection::TooLarge),
        ReadEnd::Failed { .. } => Err(Rejection::UnreadableBody),
    }
}

/// The record of a request: the layer's scope, the request's partition, its method and path,
/// and the key. With the default scope, records keep the keys of earlier versions.
pub(super) fn record_key(config: &Config, parts: &Parts, key: &str) -> StoreKey {
    let partition = config
        .partition
        .as_ref()
        .and_then(|f| f(parts))
        .unwrap_or_default();
    StoreKey::from_parts([
        config.scope.as_bytes(),
        partition.as_bytes(),
        parts.method.as_str().as_bytes(),
        parts.uri.path().as_bytes(),
        key.as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_syntax() {
        let ok = |s: &str| parse_key(&HeaderValue::from_str(s).unwrap()).is_some();
        assert!(ok("8e03978e-40d5-43e8-bc93-6894a57f9324"));
        assert!(ok("\"8e03978e-40d5\""));
        assert!(!ok(""));
        assert!(!ok("\"\""));
        assert!(!ok("\""), "a lone quote");
        assert!(!ok("\"abc"), "an open quote");
        assert!(!ok("has space"));
        assert!(!ok(&"a".repeat(256)));
        assert!(ok(&"a".repeat(255)));
        assert!(parse_key(&HeaderValue::from_bytes(&[0xff, 0x41]).unwrap()).is_none());
    }

    #[test]
    fn the_default_scope_keeps_the_record_keys_of_earlier_versions() {
        let (parts, ()) = http::Request::post("/orders?x=1")
            .body(())
            .unwrap()
            .into_parts();
        let earlier =
            StoreKey::from_parts([b"idempotency".as_slice(), b"", b"POST", b"/orders", b"k1"]);
        assert_eq!(record_key(&Config::default(), &parts, "k1"), earlier);
        let other = Config {
            scope: "orders".to_owned(),
            ..Config::default()
        };
        assert_ne!(record_key(&other, &parts, "k1"), earlier);
    }
}
