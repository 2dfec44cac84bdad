//! The client address behind reverse proxies: which proxies are trusted, and the `Forwarded`
//! (RFC 7239) and `X-Forwarded-For` fields read from the right.
//!
//! Proxies append to these fields, so the right end was written by the proxies in front of this
//! service and the left end by whoever sent the request. Both fields are parsed from the right,
//! one entry at a time and only as far as the walk needs: whatever a client wrote to the left
//! (garbage, an unterminated quote) cannot change how the proxies' entries are read.

use std::{borrow::Cow, net::IpAddr, str::FromStr, sync::Arc};

use http::{header::HeaderName, HeaderMap};
use ipnet::IpNet;

/// Which reverse proxies in front of this service are trusted to report the client's address;
/// see [`KeyExtractor::forwarded`](super::KeyExtractor::forwarded).
///
/// ```
/// use tower_redis_layers::rate_limit::Trusted;
///
/// // Exactly one proxy (a load balancer) in front of every replica.
/// let one = Trusted::hops(1);
/// // Every proxy inside these networks.
/// let ranges = Trusted::ranges(["10.0.0.0/8", "fd00::/8", "127.0.0.1"])?;
/// // Either, from a setting: a number is a hop count, anything else a list of ranges.
/// let from_env: Trusted = "10.0.0.0/8,127.0.0.1/32".parse()?;
/// assert_eq!(from_env, Trusted::ranges(["10.0.0.0/8", "127.0.0.1/32"])?);
/// # Ok::<(), tower_redis_layers::rate_limit::InvalidRange>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trusted(Kind);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Hops(usize),
    Ranges(Arc<[IpNet]>),
}

impl Trusted {
    /// Exactly `hops` proxies in front of this service, each appending one entry: the client is
    /// the `hops`-th entry from the right, the address the outermost proxy saw. With fewer
    /// entries the key is missing. `0` trusts no proxy: the client is the peer.
    ///
    /// Must be the real number of proxies: one too many lets a client choose its own key by
    /// sending the field itself; one too few keys every client on a proxy's address.
    pub fn hops(hops: usize) -> Self {
        Self(Kind::Hops(hops))
    }

    /// Every proxy whose address is inside one of `ranges` (CIDR ranges such as `10.0.0.0/8` or
    /// `fd00::/8`, or single addresses): the client is the first address, from the right, that
    /// is not in a range, counting the peer as the rightmost. When the peer is not trusted the
    /// field is not read at all and the client is the peer; when every address is trusted, the
    /// leftmost one. The peer address must be known (else the key is missing).
    ///
    /// # Errors
    ///
    /// When a range is neither an address nor a CIDR range.
    pub fn ranges<I>(ranges: I) -> Result<Self, InvalidRange>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let ranges = ranges
            .into_iter()
            .map(|r| parse_range(r.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(Kind::Ranges(ranges.into())))
    }
}

impl From<usize> for Trusted {
    /// [`Trusted::hops`].
    fn from(hops: usize) -> Self {
        Self::hops(hops)
    }
}

impl FromStr for Trusted {
    type Err = InvalidRange;

    /// A number is a hop count ([`Trusted::hops`]); anything else is a comma-separated list of
    /// ranges ([`Trusted::ranges`]), such as `10.0.0.0/8,127.0.0.1/32`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.parse::<usize>() {
            Ok(hops) => Ok(Self::hops(hops)),
            Err(_) => Self::ranges(s.split(',')),
        }
    }
}

fn parse_range(range: &str) -> Result<IpNet, InvalidRange> {
    let text = range.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| InvalidRange {
            range: range.to_owned(),
        })
}

/// A trusted proxy range that is neither an IP address nor a CIDR range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid trusted proxy range {range:?}: expected an IP address or a CIDR range such as \
     10.0.0.0/8, or a hop count"
)]
pub struct InvalidRange {
    range: String,
}

/// The field a proxy writes the client's address to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    /// RFC 7239 `Forwarded`: the `for=` parameter of each element.
    Forwarded,
    /// `X-Forwarded-For`: a list of addresses.
    XForwardedFor,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

impl Field {
    fn name(self) -> HeaderName {
        match self {
            Field::Forwarded => http::header::FORWARDED,
            Field::XForwardedFor => X_FORWARDED_FOR,
        }
    }
}

/// The client address, as `trusted` proxies report it in `field` of `headers`, with `peer` the
/// address of the connection. `None` when it cannot be told: too few entries, or the entry
/// that names the client is malformed, `unknown` or obfuscated.
pub(crate) fn client(
    trusted: &Trusted,
    field: Field,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Option<IpAddr> {
    let mut entries = Entries::new(headers, field);
    match &trusted.0 {
        Kind::Hops(0) => peer,
        Kind::Hops(hops) => entries.nth(hops - 1)?,
        Kind::Ranges(ranges) => {
            let inside = |ip: IpAddr| ranges.iter().any(|net| net.contains(&ip));
            let mut client = canonical(peer?);
            while inside(client) {
                match entries.next() {
                    Some(entry) => client = canonical(entry?),
                    // Every address is trusted: the request came from inside.
                    None => break,
                }
            }
            Some(client)
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, from a dual-stack socket) as IPv4.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The entries of every line of a field, from the right (the last line's last entry first):
/// the address each one names, `None` for one that names no address.
struct Entries<'a> {
    field: Field,
    lines: http::header::ValueIter<'a, http::HeaderValue>,
    line: Option<&'a [u8]>,
}

impl<'a> Entries<'a> {
    fn new(headers: &'a HeaderMap, field: Field) -> Self {
        Self {
            field,
            lines: headers.get_all(field.name()).into_iter(),
            line: None,
        }
    }
}

impl Iterator for Entries<'_> {
    type Item = Option<IpAddr>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(line) = self.line {
                let (rest, entry) = split_last(line);
                self.line = rest;
                return Some(match self.field {
                    Field::Forwarded => forwarded_for(entry),
                    Field::XForwardedFor => address(entry),
                });
            }
            self.line = Some(self.lines.next_back()?.as_bytes());
        }
    }
}

/// Splits the last entry of a list off `line`, at the last comma outside a quoted string:
/// (what is left of it, if anything; the entry). Scanned from the right, so that only the bytes
/// right of the comma decide where it is.
fn split_last(line: &[u8]) -> (Option<&[u8]>, &[u8]) {
    let mut quoted = false;
    for (i, b) in line.iter().enumerate().rev() {
        match b {
            b'"' if !escaped(line, i) => quoted = !quoted,
            b',' if !quoted => return (line.get(..i), line.get(i + 1..).unwrap_or_default()),
            _ => {}
        }
    }
    (None, line)
}

/// Whether the byte at `i` follows an odd number of backslashes.
fn escaped(line: &[u8], i: usize) -> bool {
    let before = line.get(..i).unwrap_or_default();
    before.iter().rev().take_while(|b| **b == b'\\').count() % 2 == 1
}

/// The address an `X-Forwarded-For` entry names: an IP address, optionally with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`) or in brackets.
fn address(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim_matches([' ', '\t']);
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Some(addr.ip());
    }
    text.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// The address in the `for` parameter of a `Forwarded` element (`for=192.0.2.1`,
/// `for="[2001:db8::1]:4711"`). `None` for a malformed element, one without `for` or with it
/// twice, and for the `unknown` and obfuscated (`_hidden`) nodes.
fn forwarded_for(element: &[u8]) -> Option<IpAddr> {
    let mut found = None;
    let mut rest = trim(element);
    while !rest.is_empty() {
        let eq = rest.iter().position(|b| *b == b'=')?;
        let (name, after) = (rest.get(..eq)?, rest.get(eq + 1..)?);
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            return None;
        }
        let (value, after) = value(after)?;
        if name.eq_ignore_ascii_case(b"for") {
            if found.is_some() {
                return None; // a parameter occurs at most once per element
            }
            found = Some(value);
        }
        rest = trim(after);
        if let Some(next) = rest.strip_prefix(b";") {
            rest = trim(next);
        } else if !rest.is_empty() {
            return None;
        }
    }
    node(&found?)
}

/// A parameter value at the start of `input` (a token or a quoted string, unescaped), and what
/// follows it. Borrowed unless it holds a quoted pair.
fn value(input: &[u8]) -> Option<(Cow<'_, [u8]>, &[u8])> {
    let Some(quoted) = input.strip_prefix(b"\"") else {
        let end = input
            .iter()
            .position(|b| !is_tchar(*b))
            .unwrap_or(input.len());
        let (token, rest) = input.split_at(end);
        return (!token.is_empty()).then_some((Cow::Borrowed(token), rest));
    };
    let end = quoted.iter().position(|b| matches!(b, b'"' | b'\\'))?;
    if quoted.get(end) == Some(&b'"') {
        return Some((Cow::Borrowed(quoted.get(..end)?), quoted.get(end + 1..)?));
    }
    let mut value = Vec::new();
    let mut bytes = quoted.iter().enumerate();
    while let Some((i, b)) = bytes.next() {
        match b {
            b'"' => return Some((Cow::Owned(value), quoted.get(i + 1..)?)),
            b'\\' => value.push(*bytes.next()?.1),
            _ => value.push(*b),
        }
    }
    None // unterminated
}

/// The address a node names (RFC 7239 section 6): `192.0.2.1`, `[2001:db8::1]`, either with a
/// port (`:4711` or an obfuscated `:_port`); `None` for `unknown`, `_obfuscated` and anything
/// malformed.
fn node(node: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(node).ok()?;
    let (ip, port) = match text.strip_prefix('[') {
        Some(v6) => {
            let (ip, rest) = v6.split_once(']')?;
            let port = match rest {
                "" => None,
                _ => Some(rest.strip_prefix(':')?),
            };
            (IpAddr::V6(ip.parse().ok()?), port)
        }
        None => match text.split_once(':') {
            Some((ip, port)) => (IpAddr::V4(ip.parse().ok()?), Some(port)),
            None => (IpAddr::V4(text.parse().ok()?), None),
        },
    };
    let Some(port) = port else {
        return Some(ip);
    };
    let valid = match port.strip_prefix('_') {
        Some(obfuscated) => {
            !obfuscated.is_empty()
                && obfuscated
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        }
        None => (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit()),
    };
    valid.then_some(ip)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// An RFC 9110 token character.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(field: &str, lines: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        let name = HeaderName::from_bytes(field.as_bytes()).unwrap();
        for line in lines {
            map.append(name.clone(), line.parse().unwrap());
        }
        map
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn forwarded_elements() {
        assert_eq!(
            forwarded_for(b"for=192.0.2.60;proto=http;by=203.0.113.43"),
            ip("192.0.2.60")
        );
        assert_eq!(
            forwarded_for(b"For=\"[2001:db8:cafe::17]:4711\""),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(forwarded_for(b"for=\"[2001:db8::1]\""), ip("2001:db8::1"));
        assert_eq!(forwarded_for(b"for=\"192.0.2.43:47011\""), ip("192.0.2.43"));
        assert_eq!(forwarded_for(b"for=\"192.0.2.43:_p1\""), ip("192.0.2.43"));
        assert_eq!(
            forwarded_for(b" by=x ; for=\"192.0.2.1\" "),
            ip("192.0.2.1")
        );
        assert_eq!(
            forwarded_for(b"for=\"19\\2.0.2.1\""),
            ip("192.0.2.1"),
            "quoted-pair"
        );
        for bad in [
            &b"for=unknown"[..],
            b"for=_hidden",
            b"for=\"_SEVKISEK\"",
            b"for=[2001:db8::1]",      // IPv6 must be quoted
            b"for=2001:db8::1",        //
            b"for=\"2001:db8::1\"",    // and in brackets
            b"for=192.0.2.1:80",       // a port must be quoted
            b"for=\"192.0.2.1:http\"", // a port is digits or _obfuscated
            b"for=\"192.0.2.1:123456\"",
            b"for=\"[::1]x\"",
            b"for=\"192.0.2.1", // unterminated
            b"for=192.0.2.1;for=192.0.2.2",
            b"for=192.0.2.1 junk",
            b"proto=https", // no for
            b"",
            b"for=",
            b"=1.2.3.4",
            b"for=300.1.1.1",
            b"for=01.2.3.4",
        ] {
            assert_eq!(forwarded_for(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_right_end_is_read_whatever_the_left_holds() {
        let h = headers(
            "forwarded",
            &[
                "for=\"unterminated, for=\\\"1.1.1.1",
                "for=192.0.2.1;host=\"a,b\", for=\"[2001:db8::2]:1\"",
            ],
        );
        let all: Vec<_> = Entries::new(&h, Field::Forwarded).collect();
        assert_eq!(all[0], ip("2001:db8::2"));
        assert_eq!(
            all[1],
            ip("192.0.2.1"),
            "a comma inside quotes splits nothing"
        );
        assert!(all[2..].iter().all(Option::is_none), "{all:?}");
    }

    /// Lines as nginx 1.22 wrote them with the README's `Forwarded` settings (captured).
    #[test]
    fn what_nginx_writes() {
        let fwd = Field::Forwarded;
        let peer = ip("127.0.0.1");
        let one = Trusted::hops(1);
        for (line, client_ip) in [
            ("for=127.0.0.21", "127.0.0.21"),
            ("for=\"_x, for=1.1.1.1, for=127.0.0.21", "127.0.0.21"),
            ("for=\"[::1]\"", "::1"),
        ] {
            let h = headers("forwarded", &[line]);
            assert_eq!(client(&one, fwd, &h, peer), ip(client_ip), "{line}");
        }
    }

    #[test]
    fn x_forwarded_for_entries() {
        let h = headers(
            "x-forwarded-for",
            &[
                "6.6.6.6, garbage",
                " 192.0.2.1:80 ,[2001:db8::1]:443,2001:db8::2,, 10.0.0.1",
            ],
        );
        let all: Vec<_> = Entries::new(&h, Field::XForwardedFor).collect();
        assert_eq!(
            all,
            [
                ip("10.0.0.1"),
                None,
                ip("2001:db8::2"),
                ip("2001:db8::1"),
                ip("192.0.2.1"),
                None,
                ip("6.6.6.6")
            ]
        );
    }

    #[test]
    fn hops_and_ranges() {
        let h = headers("x-forwarded-for", &["6.6.6.6, 203.0.113.9, 10.0.0.2"]);
        let peer = ip("10.0.0.1");
        let xff = Field::XForwardedFor;
        assert_eq!(client(&Trusted::hops(0), xff, &h, peer), peer);
        assert_eq!(client(&Trusted::hops(1), xff, &h, peer), ip("10.0.0.2"));
        assert_eq!(client(&Trusted::hops(2), xff, &h, peer), ip("203.0.113.9"));
        assert_eq!(client(&Trusted::hops(4), xff, &h, peer), None);
        let ranges = Trusted::ranges(["10.0.0.0/8"]).unwrap();
        assert_eq!(client(&ranges, xff, &h, peer), ip("203.0.113.9"));
        assert_eq!(
            client(&ranges, xff, &h, None),
            None,
            "the peer must be known"
        );
        // An untrusted peer's field is not read.
        assert_eq!(
            client(&ranges, xff, &h, ip("198.51.100.1")),
            ip("198.51.100.1")
        );
        // A mapped peer is IPv4.
        assert_eq!(
            client(&ranges, xff, &h, ip("::ffff:10.0.0.1")),
            ip("203.0.113.9")
        );
        // Every address trusted: the leftmost.
        let inside = headers("x-forwarded-for", &["10.1.1.1, 10.0.0.2"]);
        assert_eq!(client(&ranges, xff, &inside, peer), ip("10.1.1.1"));
        assert_eq!(client(&ranges, xff, &HeaderMap::new(), peer), peer);
        // A malformed entry where the client should be: no key.
        let bad = headers("x-forwarded-for", &["6.6.6.6, nope, 10.0.0.2"]);
        assert_eq!(client(&ranges, xff, &bad, peer), None);
    }

    /// Arbitrary bytes never panic, and whatever they name was written in them.
    #[test]
    fn arbitrary_bytes() {
        let alphabet = b"for=\"[]:;,_\\ \t0123456789abcdef.unknownFOR";
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            let mut line = Vec::new();
            for _ in 0..(seed % 40) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                line.push(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            let mut rest = Some(&line[..]);
            while let Some(l) = rest {
                let (left, entry) = split_last(l);
                rest = left;
                for ip in [forwarded_for(entry), address(entry)].into_iter().flatten() {
                    let text = String::from_utf8_lossy(entry);
                    let first = ip.to_string();
                    let head = first.split([':', '.']).next().unwrap_or_default();
                    assert!(text.contains(head), "{text} gave {ip}");
                }
            }
        }
    }

    #[test]
    fn parsing_trusted() {
        assert_eq!("2".parse::<Trusted>().unwrap(), Trusted::hops(2));
        assert_eq!(
            " 10.0.0.0/8 , ::1 ".parse::<Trusted>().unwrap(),
            Trusted::ranges(["10.0.0.0/8", "::1/128"]).unwrap()
        );
        assert_eq!(
            Trusted::ranges(["10.1.2.3/8"]).unwrap(),
            Trusted::ranges(["10.0.0.0/8"]).unwrap()
        );
        for bad in ["", "10.0.0.0/33", "ten", "1,", "-1"] {
            let err = bad.parse::<Trusted>().unwrap_err();
            assert!(err.to_string().contains("CIDR"), "{err}");
        }
    }
}
