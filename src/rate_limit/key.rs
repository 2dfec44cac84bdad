use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::{header::HeaderName, request::Parts};

use crate::key::StoreKey;

/// Where the rate-limit key of a request comes from.
///
/// A key source is tried in order with [`or`](KeyExtractor::or) fallbacks; the first that yields
/// a value wins. Whatever is extracted is hashed (with the source and the layer's and the
/// policy's scopes) before it reaches a store, so a client can neither make a huge or odd store
/// key nor pick another's. See the [module docs](super) for an example of a layer.
///
/// ```
/// use http::HeaderName;
/// use tower_redis_layers::rate_limit::KeyExtractor;
///
/// // The API key when there is one, else the peer address.
/// let key = KeyExtractor::header(HeaderName::from_static("x-api-key")).or(KeyExtractor::peer_ip());
/// ```
#[derive(Clone)]
pub struct KeyExtractor {
    sources: Vec<Source>,
}

type CustomFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

#[derive(Clone)]
enum Source {
    PeerIp,
    Header(HeaderName),
    ForwardedFor(usize),
    Global,
    Custom(Arc<CustomFn>),
}

/// A key taken from a request, before hashing.
pub(crate) struct RawKey<'a> {
    tag: &'static [u8],
    value: Value<'a>,
}

/// The raw bytes of a key; an address is kept inline (no allocation on the request path).
enum Value<'a> {
    Inline([u8; 16], usize),
    Header(&'a [u8], &'a [u8]),
    Owned(Vec<u8>),
}

impl RawKey<'_> {
    /// The store key of this raw key under `namespace` (the layer's and the policy's scopes).
    pub(crate) fn hash(&self, namespace: &str) -> StoreKey {
        match &self.value {
            Value::Inline(bytes, len) => StoreKey::from_parts([
                namespace.as_bytes(),
                self.tag,
                bytes.get(..*len).unwrap_or(bytes),
            ]),
            Value::Header(name, value) => {
                StoreKey::from_parts([namespace.as_bytes(), self.tag, name, value])
            }
            Value::Owned(v) => StoreKey::from_parts([namespace.as_bytes(), self.tag, v]),
        }
    }
}

impl KeyExtractor {
    /// The peer's IP address, from axum's `ConnectInfo<SocketAddr>` (serve with
    /// `into_make_service_with_connect_info::<SocketAddr>()`) or from a `SocketAddr` that a
    /// hyper service put in the request extensions.
    pub fn peer_ip() -> Self {
        Self::one(Source::PeerIp)
    }

    /// The value of a request header (for example `"x-api-key"` or a [`HeaderName`]). Any bytes
    /// are accepted, including non-UTF-8; an empty value counts as missing.
    ///
    /// An invalid header name is logged as an error and never extracts a key (so requests are
    /// handled as [`MissingKey`](super::MissingKey) says).
    pub fn header<N>(name: N) -> Self
    where
        N: TryInto<HeaderName>,
        N::Error: fmt::Display,
    {
        match name.try_into() {
            Ok(name) => Self::one(Source::Header(name)),
            Err(error) => {
                tracing::error!(%error, "invalid header name for a rate-limit key");
                Self {
                    sources: Vec::new(),
                }
            }
        }
    }

    /// The client address from `X-Forwarded-For`, trusting exactly `trusted_proxies` reverse
    /// proxies in front of this service: the address that the outermost trusted proxy saw, which
    /// is the `trusted_proxies`-th entry from the right. Entries to its left were written by the
    /// client and are never used. With fewer entries than trusted proxies, or an entry that is
    /// not an IP address, the key is missing. `0` never extracts (no proxy is trusted).
    pub fn forwarded_for(trusted_proxies: usize) -> Self {
        Self::one(Source::ForwardedFor(trusted_proxies))
    }

    /// One key for every request: a global limit.
    pub fn global() -> Self {
        Self::one(Source::Global)
    }

    /// A key computed by a closure (for example a tenant from an extension set by an auth layer).
    /// `None` means the key is missing.
    pub fn custom<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self::one(Source::Custom(Arc::new(f)))
    }

    /// Tries `other` when this one finds no key.
    pub fn or(mut self, other: KeyExtractor) -> Self {
        self.sources.extend(other.sources);
        self
    }

    fn one(source: Source) -> Self {
        Self {
            sources: vec![source],
        }
    }

    pub(crate) fn extract<'a>(&'a self, parts: &'a Parts) -> Option<RawKey<'a>> {
        self.sources.iter().find_map(|s| s.extract(parts))
    }
}

impl Default for KeyExtractor {
    /// The peer IP address.
    fn default() -> Self {
        Self::peer_ip()
    }
}

impl Source {
    fn extract<'a>(&'a self, parts: &'a Parts) -> Option<RawKey<'a>> {
        match self {
            Source::PeerIp => peer_addr(parts).map(|ip| ip_key(b"ip", ip)),
            Source::Header(name) => {
                let value = parts.headers.get(name)?.as_bytes();
                if value.is_empty() {
                    return None;
                }
                Some(RawKey {
                    tag: b"header",
                    value: Value::Header(name.as_str().as_bytes(), value),
                })
            }
            Source::ForwardedFor(trusted) => {
                forwarded_for(parts, *trusted).map(|ip| ip_key(b"ip", ip))
            }
            Source::Global => Some(RawKey {
                tag: b"global",
                value: Value::Inline([0; 16], 0),
            }),
            Source::Custom(f) => f(parts).map(|v| RawKey {
                tag: b"custom",
                value: Value::Owned(v.into_bytes()),
            }),
        }
    }
}

fn ip_key(tag: &'static [u8], ip: IpAddr) -> RawKey<'static> {
    // The same address reached over IPv4 and IPv4-mapped IPv6 is one client.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let mut bytes = [0u8; 16];
    let len = match ip {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            bytes.copy_from_slice(&v6.octets());
            16
        }
    };
    RawKey {
        tag,
        value: Value::Inline(bytes, len),
    }
}

fn peer_addr(parts: &Parts) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = parts
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(info.0.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(mock) = parts
        .extensions
        .get::<axum::extract::connect_info::MockConnectInfo<SocketAddr>>()
    {
        return Some(mock.0.ip());
    }
    parts.extensions.get::<SocketAddr>().map(SocketAddr::ip)
}

fn forwarded_for(parts: &Parts, trusted: usize) -> Option<IpAddr> {
    if trusted == 0 {
        return None;
    }
    let mut entries: Vec<&[u8]> = Vec::new();
    for value in parts.headers.get_all("x-forwarded-for") {
        entries.extend(value.as_bytes().split(|b| *b == b','));
    }
    let index = entries.len().checked_sub(trusted)?;
    parse_ip(entries.get(index)?)
}

fn parse_ip(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    // `1.2.3.4:5678` or `[::1]:5678`
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    text.strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse().ok())
}

impl fmt::Debug for KeyExtractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self
            .sources
            .iter()
            .map(|s| match s {
                Source::PeerIp => "peer_ip".to_owned(),
                Source::Header(h) => format!("header({h})"),
                Source::ForwardedFor(n) => format!("forwarded_for({n})"),
                Source::Global => "global".to_owned(),
                Source::Custom(_) => "custom".to_owned(),
            })
            .collect();
        f.debug_tuple("KeyExtractor").field(&names).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(headers: &[(&str, &[u8])]) -> Parts {
        let mut req = Request::builder();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn forwarded_for_takes_the_entry_of_the_outermost_trusted_proxy() {
        let p = parts(&[("x-forwarded-for", b"6.6.6.6, 1.1.1.1, 10.0.0.1")]);
        let one = KeyExtractor::forwarded_for(1).extract(&p).unwrap().hash("");
        let two = KeyExtractor::forwarded_for(2).extract(&p).unwrap().hash("");
        let real = KeyExtractor::forwarded_for(1)
            .extract(&parts(&[("x-forwarded-for", b"10.0.0.1")]))
            .unwrap()
            .hash("");
        let client = KeyExtractor::forwarded_for(1)
            .extract(&parts(&[("x-forwarded-for", b"1.1.1.1")]))
            .unwrap()
            .hash("");
        assert_eq!(one, real);
        assert_eq!(two, client);
        assert!(KeyExtractor::forwarded_for(4).extract(&p).is_none());
        assert!(KeyExtractor::forwarded_for(0).extract(&p).is_none());
    }

    #[test]
    fn spoofed_garbage_in_forwarded_for_is_missing() {
        let p = parts(&[("x-forwarded-for", b"not-an-ip")]);
        assert!(KeyExtractor::forwarded_for(1).extract(&p).is_none());
    }

    #[test]
    fn non_utf8_and_huge_headers_hash_to_fixed_size_keys() {
        let long = vec![b'a'; 64 * 1024];
        let p = parts(&[("x-api-key", &[0xff, 0xfe, 0x80]), ("x-long", &long)]);
        let a = KeyExtractor::header(HeaderName::from_static("x-api-key"))
            .extract(&p)
            .unwrap()
            .hash("s");
        let b = KeyExtractor::header(HeaderName::from_static("x-long"))
            .extract(&p)
            .unwrap()
            .hash("s");
        assert_eq!(a.to_hex().len(), 32);
        assert_eq!(b.to_hex().len(), 32);
    }

    #[test]
    fn fallback_and_missing() {
        let p = parts(&[]);
        assert!(KeyExtractor::peer_ip().extract(&p).is_none());
        assert!(KeyExtractor::peer_ip()
            .or(KeyExtractor::global())
            .extract(&p)
            .is_some());
    }
}
