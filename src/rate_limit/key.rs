use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::{header::HeaderName, request::Parts, Extensions};
use ipnet::{Ipv4Net, Ipv6Net};

use super::{
    forwarded::{self, canonical, Field, Trusted},
    head::Head,
};
use crate::key::{KeyHash, Namespace, StoreKey};

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
///
/// # Addresses are grouped by network
///
/// A client can change its address within what its provider gave it: an IPv6 client usually
/// holds a whole `/64` (often a `/56` or a `/48`). So an address key is the network the address
/// is in: by default its `/64` for IPv6 and the address itself (`/32`) for IPv4, with an
/// IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) counted as IPv4. Change the prefixes with
/// [`ipv4_prefix`](Self::ipv4_prefix) and [`ipv6_prefix`](Self::ipv6_prefix); they apply to
/// the peer address and to an address read from a forwarding field alike.
///
/// ```
/// use tower_redis_layers::rate_limit::KeyExtractor;
///
/// // Every address of a /56 shares one budget; IPv4 clients by /32 (the default).
/// let key = KeyExtractor::peer_ip().ipv6_prefix(56);
/// ```
///
/// # Behind reverse proxies
///
/// Behind a load balancer the peer is the proxy, so [`peer_ip`](Self::peer_ip) would give every
/// client the proxy's one budget. [`forwarded`](Self::forwarded) and
/// [`forwarded_for`](Self::forwarded_for) read the client address that the proxies you
/// [trust](Trusted) wrote, walking from the right so that what a client wrote itself is never
/// used. See the README section "Deploying behind a load balancer".
///
/// ```
/// use tower_redis_layers::rate_limit::{KeyExtractor, Trusted};
///
/// // nginx (proxy_add_x_forwarded_for) or HAProxy (option forwardfor) on 10.0.0.0/8.
/// let key = KeyExtractor::forwarded_for(Trusted::ranges(["10.0.0.0/8"])?);
/// // One proxy writing RFC 7239 `Forwarded`.
/// let key = KeyExtractor::forwarded(Trusted::hops(1));
/// # Ok::<(), tower_redis_layers::rate_limit::InvalidRange>(())
/// ```
///
/// # A header is only a key once it is authenticated
///
/// [`header`](Self::header) keys on whatever the client sends: a client that invents a new
/// `x-api-key` for each request gets a fresh budget for each. Key on a header only behind a
/// layer that rejects unknown values, or take the key that such a layer put in the request
/// extensions with [`custom`](Self::custom), with the peer (or forwarded) address as the
/// fallback for requests without one.
#[derive(Clone)]
pub struct KeyExtractor {
    sources: Vec<Source>,
}

type CustomFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

#[derive(Clone)]
enum Source {
    /// The peer address, or the client address that trusted proxies wrote to a field.
    Address {
        forwarded: Option<(Field, Trusted)>,
        prefix: Prefix,
    },
    Header(HeaderName),
    Global,
    Custom(Arc<CustomFn>),
}

/// The network lengths addresses are grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Prefix {
    v4: u8,
    v6: u8,
}

impl Default for Prefix {
    fn default() -> Self {
        Self { v4: 32, v6: 64 }
    }
}

/// A key taken from a request, before hashing.
pub(crate) struct RawKey<'a> {
    tag: &'static [u8],
    value: Value<'a>,
}

/// The raw bytes of a key; a network is kept inline (no allocation on the request path).
enum Value<'a> {
    Inline([u8; 17], usize),
    Header(&'a [u8], &'a [u8]),
    Owned(Vec<u8>),
}

impl RawKey<'_> {
    /// The store key of this raw key under `namespace` (the layer's and the policy's scopes),
    /// hashed with SHA-256.
    pub(crate) fn hash(&self, namespace: &Namespace) -> StoreKey {
        self.hash_with(namespace, KeyHash::Sha256)
    }

    /// The store key of this raw key in `namespace`, hashed as `hash` says (the layer's store
    /// decides: see [`KeyHash::of_store`]).
    pub(crate) fn hash_with(&self, namespace: &Namespace, hash: KeyHash) -> StoreKey {
        match &self.value {
            Value::Inline(bytes, len) => {
                namespace.pair_key(hash, self.tag, bytes.get(..*len).unwrap_or(bytes))
            }
            Value::Header(name, value) => namespace.key(hash, [self.tag, name, value]),
            Value::Owned(v) => namespace.pair_key(hash, self.tag, v),
        }
    }
}

impl KeyExtractor {
    /// The peer's IP address (grouped by network: see [above](Self#addresses-are-grouped-by-network)),
    /// from axum's `ConnectInfo<SocketAddr>` (serve with
    /// `into_make_service_with_connect_info::<SocketAddr>()`) or from a `SocketAddr` that a
    /// hyper service put in the request extensions.
    ///
    /// Behind a reverse proxy this is the proxy's address: use [`forwarded`](Self::forwarded)
    /// or [`forwarded_for`](Self::forwarded_for) there.
    pub fn peer_ip() -> Self {
        Self::one(Source::Address {
            forwarded: None,
            prefix: Prefix::default(),
        })
    }

    /// The value of a request header (for example `"x-api-key"` or a [`HeaderName`]). Any bytes
    /// are accepted, including non-UTF-8; an empty value counts as missing.
    ///
    /// The value is not checked: each new value is a new budget, so a client that makes one up
    /// per request is not limited at all. Use a header only once a layer in front has
    /// authenticated it (see [above](Self#a-header-is-only-a-key-once-it-is-authenticated)).
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

    /// The client address from the RFC 7239 `Forwarded` field, as written by the `trusted`
    /// proxies (a [`Trusted`] hop count or ranges), grouped by network like the peer address.
    ///
    /// Every line of the field is read, in order, as one list; entries are read from the right
    /// and only as far as needed, so what a client wrote to the left is never used, and cannot
    /// stop the proxies' entries from being read. The key is missing when the entry that names
    /// the client is malformed, `unknown` or obfuscated (`for=_hidden`), or when there are
    /// fewer entries than trusted hops. Only `Forwarded` is read, never `X-Forwarded-For`: a
    /// field your proxies do not write is the client's (so do not chain the two with
    /// [`or`](Self::or)).
    pub fn forwarded(trusted: impl Into<Trusted>) -> Self {
        Self::one(Source::Address {
            forwarded: Some((Field::Forwarded, trusted.into())),
            prefix: Prefix::default(),
        })
    }

    /// The client address from `X-Forwarded-For`, as written by the `trusted` proxies: a
    /// [`Trusted`] hop count (a number, as in `forwarded_for(1)`) or ranges. The same as
    /// [`forwarded`](Self::forwarded) otherwise: every line, read from the right, grouped by
    /// network; an entry that is not an IP address (optionally with a port) never becomes a
    /// key. With `0` hops the key is the peer address.
    pub fn forwarded_for(trusted: impl Into<Trusted>) -> Self {
        Self::one(Source::Address {
            forwarded: Some((Field::XForwardedFor, trusted.into())),
            prefix: Prefix::default(),
        })
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

    /// Groups IPv4 addresses by their first `len` bits (default 32: each address on its own;
    /// at most 32). Applies to the address sources of this extractor so far, not to those
    /// added later with [`or`](Self::or).
    pub fn ipv4_prefix(mut self, len: u8) -> Self {
        for prefix in self.prefixes() {
            prefix.v4 = len.min(32);
        }
        self
    }

    /// Groups IPv6 addresses by their first `len` bits (default 64, the usual allocation of
    /// one subscriber line; at most 128). Applies to the address sources of this extractor so
    /// far, not to those added later with [`or`](Self::or).
    pub fn ipv6_prefix(mut self, len: u8) -> Self {
        for prefix in self.prefixes() {
            prefix.v6 = len.min(128);
        }
        self
    }

    fn prefixes(&mut self) -> impl Iterator<Item = &mut Prefix> {
        self.sources.iter_mut().filter_map(|s| match s {
            Source::Address { prefix, .. } => Some(prefix),
            _ => None,
        })
    }

    fn one(source: Source) -> Self {
        Self {
            sources: vec![source],
        }
    }

    pub(crate) fn extract<'a>(&'a self, parts: &'a Parts) -> Option<RawKey<'a>> {
        self.extract_head(Head::of_parts(parts))
    }

    /// The raw key of the request `head` is of, from the first source that has one.
    pub(crate) fn extract_head<'a>(&'a self, head: Head<'a>) -> Option<RawKey<'a>> {
        self.sources.iter().find_map(|s| s.extract(head))
    }

    /// Whether a source is a [custom](Self::custom) closure, which reads the request's `Parts`.
    pub(crate) fn reads_parts(&self) -> bool {
        self.sources.iter().any(|s| matches!(s, Source::Custom(_)))
    }
}

impl Default for KeyExtractor {
    /// The peer IP address.
    fn default() -> Self {
        Self::peer_ip()
    }
}

impl Source {
    fn extract<'a>(&'a self, head: Head<'a>) -> Option<RawKey<'a>> {
        match self {
            Source::Address { forwarded, prefix } => {
                let ip = match forwarded {
                    None => peer_addr(head.extensions)?,
                    Some((field, trusted)) => forwarded::client(
                        trusted,
                        *field,
                        head.headers,
                        peer_addr(head.extensions),
                    )?,
                };
                Some(network_key(ip, *prefix))
            }
            Source::Header(name) => {
                let value = head.headers.get(name)?.as_bytes();
                if value.is_empty() {
                    return None;
                }
                Some(RawKey {
                    tag: b"header",
                    value: Value::Header(name.as_str().as_bytes(), value),
                })
            }
            Source::Global => Some(RawKey {
                tag: b"global",
                value: Value::Inline([0; 17], 0),
            }),
            // A layer with a custom key takes each request apart for it
            // (`Config::reads_parts`); a handle's key is its parts.
            Source::Custom(f) => f(head.parts?).map(|v| RawKey {
                tag: b"custom",
                value: Value::Owned(v.into_bytes()),
            }),
        }
    }
}

/// The key of the network `ip` is in: its first `prefix` bits and the prefix length.
fn network_key(ip: IpAddr, prefix: Prefix) -> RawKey<'static> {
    let mut bytes = [0u8; 17];
    let len = match canonical(ip) {
        IpAddr::V4(v4) => {
            let net = Ipv4Net::new(v4, prefix.v4).map_or(v4, |n| n.network());
            bytes[..4].copy_from_slice(&net.octets());
            bytes[4] = prefix.v4;
            5
        }
        IpAddr::V6(v6) => {
            let net = Ipv6Net::new(v6, prefix.v6).map_or(v6, |n| n.network());
            bytes[..16].copy_from_slice(&net.octets());
            bytes[16] = prefix.v6;
            17
        }
    };
    RawKey {
        tag: b"ip",
        value: Value::Inline(bytes, len),
    }
}

fn peer_addr(extensions: &Extensions) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = extensions.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(info.0.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(mock) = extensions.get::<axum::extract::connect_info::MockConnectInfo<SocketAddr>>()
    {
        return Some(mock.0.ip());
    }
    extensions.get::<SocketAddr>().map(SocketAddr::ip)
}

impl fmt::Debug for KeyExtractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self
            .sources
            .iter()
            .map(|s| match s {
                Source::Address {
                    forwarded: None,
                    prefix,
                } => format!("peer_ip(/{}, /{})", prefix.v4, prefix.v6),
                Source::Address {
                    forwarded: Some((field, trusted)),
                    prefix,
                } => format!("{field:?}({trusted:?}, /{}, /{})", prefix.v4, prefix.v6),
                Source::Header(h) => format!("header({h})"),
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
        let one = KeyExtractor::forwarded_for(1)
            .extract(&p)
            .unwrap()
            .hash(&ns(""));
        let two = KeyExtractor::forwarded_for(2)
            .extract(&p)
            .unwrap()
            .hash(&ns(""));
        let real = KeyExtractor::forwarded_for(1)
            .extract(&parts(&[("x-forwarded-for", b"10.0.0.1")]))
            .unwrap()
            .hash(&ns(""));
        let client = KeyExtractor::forwarded_for(1)
            .extract(&parts(&[("x-forwarded-for", b"1.1.1.1")]))
            .unwrap()
            .hash(&ns(""));
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
            .hash(&ns("s"));
        let b = KeyExtractor::header(HeaderName::from_static("x-long"))
            .extract(&p)
            .unwrap()
            .hash(&ns("s"));
        assert_eq!(a.to_hex().len(), 32);
        assert_eq!(b.to_hex().len(), 32);
    }

    fn ns(name: &str) -> Namespace {
        Namespace::new(name.to_owned())
    }

    fn key_of(key: &KeyExtractor, peer: &str, headers: &[(&str, &[u8])]) -> Option<StoreKey> {
        let mut p = parts(headers);
        p.extensions.insert(peer.parse::<SocketAddr>().unwrap());
        key.extract(&p).map(|k| k.hash(&ns("")))
    }

    #[test]
    fn addresses_are_grouped_by_network() {
        let peer = KeyExtractor::peer_ip();
        let k = |addr: &str| key_of(&peer, addr, &[]).unwrap();
        assert_eq!(k("[2001:db8:1:2::1]:1"), k("[2001:db8:1:2:ffff::9]:2"));
        assert_ne!(k("[2001:db8:1:2::1]:1"), k("[2001:db8:1:3::1]:1"));
        assert_ne!(k("192.0.2.1:1"), k("192.0.2.2:1"));
        assert_eq!(
            k("192.0.2.1:1"),
            k("[::ffff:192.0.2.1]:1"),
            "mapped is IPv4"
        );
        let wide = KeyExtractor::peer_ip().ipv6_prefix(56).ipv4_prefix(24);
        let w = |addr: &str| key_of(&wide, addr, &[]).unwrap();
        assert_eq!(w("[2001:db8:1:2::1]:1"), w("[2001:db8:1:ff::1]:1"));
        assert_ne!(w("[2001:db8:1:2::1]:1"), w("[2001:db8:1:100::1]:1"));
        assert_eq!(w("192.0.2.1:1"), w("192.0.2.200:1"));
        assert_ne!(
            w("192.0.2.1:1"),
            k("192.0.2.1:1"),
            "another prefix, another key"
        );
        // Out of range lengths are the whole address.
        let all = KeyExtractor::peer_ip().ipv6_prefix(200).ipv4_prefix(40);
        assert_ne!(
            key_of(&all, "[2001:db8::1]:1", &[]),
            key_of(&all, "[2001:db8::2]:1", &[])
        );
        // Forwarded addresses are grouped alike; the prefix applies to sources so far.
        let fwd = KeyExtractor::forwarded_for(1).ipv6_prefix(48);
        let f = |xff: &[u8]| key_of(&fwd, "10.0.0.1:1", &[("x-forwarded-for", xff)]).unwrap();
        assert_eq!(f(b"2001:db8:1:1::1"), f(b"2001:db8:1:ffff::1"));
        let later = KeyExtractor::header("x-id")
            .ipv6_prefix(48)
            .or(KeyExtractor::peer_ip());
        assert_ne!(
            key_of(&later, "[2001:db8:1:1::1]:1", &[]),
            key_of(&later, "[2001:db8:1:2::1]:1", &[])
        );
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
