//! Freshness and age of a response for a shared cache (RFC 9111 sections 4.2 and 5.2), with a
//! `Cache-Control` parser that holds up against what origins send: directive names in any case,
//! whitespace, quoted values (with commas inside), several fields, and duplicates.
//!
//! Invalid freshness information makes a response stale (section 4.2.1): a `max-age` or
//! `s-maxage` that is negative, quoted, not a number, or given twice with different values; an
//! `Expires` that is not an HTTP date, or given twice with different values (section 5.3).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap};

/// The largest delta-seconds value a cache keeps (RFC 9111 section 1.2.2): 2^31.
pub(crate) const MAX_DELTA: u64 = 1 << 31;

/// The directives of every `Cache-Control` field of a message: lowercase name, and the value
/// (unquoted) with whether it was quoted.
#[derive(Debug, Default, Clone)]
pub(crate) struct Directives(Vec<(String, Option<Value>)>);

/// A directive's argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Value {
    pub(crate) text: String,
    pub(crate) quoted: bool,
}

/// A directive's delta-seconds argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delta {
    /// The directive is absent.
    Absent,
    /// Seconds (capped at [`MAX_DELTA`]).
    Seconds(u64),
    /// Present but unusable (no value, quoted, negative, not a number, conflicting duplicates).
    Invalid,
}

impl Directives {
    /// Parses every `Cache-Control` field of `headers`.
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        Self::parse_fields(headers, &header::CACHE_CONTROL)
    }

    /// Parses every field `name` of `headers` with the `Cache-Control` grammar.
    pub(crate) fn parse_fields(headers: &HeaderMap, name: &header::HeaderName) -> Self {
        let mut out = Vec::new();
        for value in headers.get_all(name) {
            // A field that is not visible ASCII is parsed on its bytes read as Latin-1: names
            // still match, odd values are invalid.
            let text: String = value.as_bytes().iter().map(|&b| b as char).collect();
            parse_field(&text, &mut out);
        }
        Self(out)
    }

    /// Whether no directive was found.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every directive name is a Structured Field key once lowercased (RFC 8941
    /// section 3.2: a lowercase letter or `*`, then lowercase letters, digits, `_-.*`): a
    /// targeted field (RFC 9213) with another name is invalid and ignored as a whole.
    pub(crate) fn names_are_keys(&self) -> bool {
        self.0.iter().all(|(n, _)| {
            let mut bytes = n.bytes();
            bytes
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
                && bytes
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b))
        })
    }

    /// Whether directive `name` (lowercase) is present, with or without an argument.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    /// Whether directive `name` (lowercase) is present without an argument.
    pub(crate) fn has_bare(&self, name: &str) -> bool {
        self.0.iter().any(|(n, v)| n == name && v.is_none())
    }

    /// The delta-seconds argument of directive `name` (lowercase).
    pub(crate) fn delta(&self, name: &str) -> Delta {
        let mut found = Delta::Absent;
        for (_, value) in self.0.iter().filter(|(n, _)| n == name) {
            let this = match value {
                Some(Value {
                    text,
                    quoted: false,
                }) => delta_seconds(text),
                _ => Delta::Invalid,
            };
            found = match (found, this) {
                (Delta::Absent, this) => this,
                (Delta::Seconds(a), Delta::Seconds(b)) if a == b => found,
                // Duplicates that disagree: treat as invalid (section 4.2.1).
                _ => Delta::Invalid,
            };
        }
        found
    }
}

/// Splits one field value into directives, honouring quoted strings (commas and escapes inside
/// them).
fn parse_field(text: &str, out: &mut Vec<(String, Option<Value>)>) {
    let mut chars = text.chars().peekable();
    loop {
        // The name, up to `=`, `,` or the end.
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            name.push(c);
            chars.next();
        }
        let name = name.trim().to_ascii_lowercase();
        let mut value = None;
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                let mut text = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => text.extend(chars.next()),
                        c => text.push(c),
                    }
                }
                // Anything between the closing quote and the next comma is ignored.
                while chars.peek().is_some_and(|c| *c != ',') {
                    chars.next();
                }
                value = Some(Value { text, quoted: true });
            } else {
                let mut text = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    text.push(c);
                    chars.next();
                }
                value = Some(Value {
                    text: text.trim().to_owned(),
                    quoted: false,
                });
            }
        }
        if !name.is_empty() {
            out.push((name, value));
        }
        if chars.next().is_none() {
            break;
        }
    }
}

/// A delta-seconds value (RFC 9111 section 1.2.2): digits only; larger than 2^31 is 2^31.
fn delta_seconds(text: &str) -> Delta {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Delta::Invalid;
    }
    // Digits only: the parse fails on overflow alone.
    Delta::Seconds(text.parse::<u64>().map_or(MAX_DELTA, |s| s.min(MAX_DELTA)))
}

/// The one value of a date field: `None` when absent, `Some(None)` when invalid (not an HTTP
/// date in any of its three formats, or given twice with different values).
fn date_field(headers: &HeaderMap, name: &header::HeaderName) -> Option<Option<SystemTime>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.any(|v| v != first) {
        return Some(None);
    }
    Some(
        first
            .to_str()
            .ok()
            .and_then(|v| httpdate::parse_http_date(v.trim()).ok()),
    )
}

/// Seconds since the epoch (0 before it).
fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How long a response is fresh after its `Date`, as its origin said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// `s-maxage`, `max-age` or `Expires` − `Date` (zero when invalid or already expired).
    Explicit(Duration),
    /// No explicit freshness: a heuristic may apply.
    None,
}

/// The freshness lifetime of a response (RFC 9111 section 4.2.1, for a shared cache), received
/// at `received`; `Expires` is read only when `expires` says so (a targeted field, RFC 9213,
/// replaces it).
pub(crate) fn lifetime(
    headers: &HeaderMap,
    cc: &Directives,
    expires: bool,
    received: SystemTime,
) -> Lifetime {
    for name in ["s-maxage", "max-age"] {
        match cc.delta(name) {
            Delta::Absent => {}
            Delta::Seconds(s) => return Lifetime::Explicit(Duration::from_secs(s)),
            Delta::Invalid => return Lifetime::Explicit(Duration::ZERO),
        }
    }
    let Some(expires) = date_field(headers, &header::EXPIRES).filter(|_| expires) else {
        return Lifetime::None;
    };
    let Some(expires) = expires else {
        // An invalid `Expires` means already expired (section 5.3).
        return Lifetime::Explicit(Duration::ZERO);
    };
    // No (valid) `Date`: the time of receipt stands in (RFC 9110 section 6.6.1).
    let date = date_field(headers, &header::DATE)
        .flatten()
        .unwrap_or(received);
    let secs = epoch_secs(expires).saturating_sub(epoch_secs(date));
    Lifetime::Explicit(Duration::from_secs(secs.min(MAX_DELTA)))
}

/// The times around one exchange with the inner service.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exchange {
    /// The wall-clock time the response was received (compared with `Date`).
    pub(crate) received: SystemTime,
    /// How long the inner service took to answer (`response_time − request_time`).
    pub(crate) delay: Duration,
}

/// The response's `Age` field (section 5.1): `None` when absent or invalid; capped at 2^31.
fn age_value(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::AGE).iter();
    // A list value: its first member counts (section 5.1).
    let first = values.next()?.to_str().ok()?.split(',').next()?.trim();
    match delta_seconds(first) {
        Delta::Seconds(s) => Some(s),
        _ => None,
    }
}

/// The corrected initial age of a response (RFC 9111 section 4.2.3): the larger of its age by
/// `Date` (`apparent_age`) and its `Age` plus the time the inner service took.
pub(crate) fn initial_age(headers: &HeaderMap, exchange: Exchange) -> Duration {
    let apparent = date_field(headers, &header::DATE)
        .flatten()
        .map_or(0, |date| {
            epoch_secs(exchange.received).saturating_sub(epoch_secs(date))
        });
    let corrected = Duration::from_secs(age_value(headers).unwrap_or(0)) + exchange.delay;
    corrected
        .max(Duration::from_secs(apparent))
        .min(Duration::from_secs(MAX_DELTA))
}

/// The `Age` sent with a response served from the cache: its age when stored plus the time it
/// spent in the cache, in whole seconds, at most 2^31.
pub(crate) fn current_age(initial: Duration, resident: Duration) -> u64 {
    (initial + resident).as_secs().min(MAX_DELTA)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    fn cc(v: &str) -> Directives {
        Directives::parse(&h(&[("cache-control", v)]))
    }

    #[test]
    fn directives() {
        let d = cc(r#" Max-Age = 10 , S-MAXAGE=5, private="set-cookie, x", NO-cache"#);
        assert_eq!(d.delta("max-age"), Delta::Seconds(10));
        assert_eq!(d.delta("s-maxage"), Delta::Seconds(5));
        assert!(d.has("private") && d.has("no-cache") && !d.has("x\""));
        assert_eq!(cc("max-age=\"10\"").delta("max-age"), Delta::Invalid);
        assert_eq!(cc("max-age=-1").delta("max-age"), Delta::Invalid);
        assert_eq!(cc("max-age=1x").delta("max-age"), Delta::Invalid);
        assert_eq!(cc("max-age").delta("max-age"), Delta::Invalid);
        assert_eq!(cc("max-age=").delta("max-age"), Delta::Invalid);
        assert_eq!(
            cc("max-age=5, max-age=5").delta("max-age"),
            Delta::Seconds(5)
        );
        assert_eq!(cc("max-age=5, max-age=6").delta("max-age"), Delta::Invalid);
        assert_eq!(
            cc("max-age=99999999999999999999999").delta("max-age"),
            Delta::Seconds(MAX_DELTA)
        );
        assert_eq!(cc("public").delta("max-age"), Delta::Absent);
        // Two fields are one list.
        let two = Directives::parse(&h(&[
            ("cache-control", "public"),
            ("cache-control", "max-age=3"),
        ]));
        assert_eq!(two.delta("max-age"), Delta::Seconds(3));
    }

    #[test]
    fn lifetimes() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let life = |pairs: &[(&'static str, &str)]| {
            let headers = h(pairs);
            lifetime(&headers, &Directives::parse(&headers), true, now)
        };
        let secs = |s| Lifetime::Explicit(Duration::from_secs(s));
        assert_eq!(life(&[]), Lifetime::None);
        assert_eq!(life(&[("cache-control", "max-age=5, s-maxage=7")]), secs(7));
        assert_eq!(
            life(&[
                ("cache-control", "max-age=5"),
                ("expires", "Sun, 06 Nov 1994 09:49:37 GMT")
            ]),
            secs(5)
        );
        // The three date formats.
        for expires in [
            "Sun, 06 Nov 1994 08:50:37 GMT",
            "Sunday, 06-Nov-94 08:50:37 GMT",
            "Sun Nov  6 08:50:37 1994",
        ] {
            assert_eq!(life(&[("expires", expires)]), secs(60), "{expires}");
        }
        assert_eq!(
            life(&[
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
                ("date", "Sun, 06 Nov 1994 08:50:27 GMT"),
            ]),
            secs(10)
        );
        assert_eq!(life(&[("expires", "0")]), secs(0));
        assert_eq!(
            life(&[("expires", "Sun, 06 Nov 1994 08:00:00 GMT")]),
            secs(0)
        );
        assert_eq!(
            life(&[
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:51:37 GMT"),
            ]),
            secs(0)
        );
        assert_eq!(life(&[("cache-control", "max-age=\"60\"")]), secs(0));
        // An invalid `Date` is ignored: the time of receipt stands in.
        assert_eq!(
            life(&[
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
                ("date", "yesterday")
            ]),
            secs(60)
        );
    }

    #[test]
    fn ages() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let ex = Exchange {
            received: now,
            delay: Duration::from_secs(2),
        };
        let age = |pairs: &[(&'static str, &str)]| initial_age(&h(pairs), ex).as_secs();
        assert_eq!(age(&[]), 2);
        assert_eq!(age(&[("age", "100")]), 102);
        assert_eq!(age(&[("date", "Sun, 06 Nov 1994 08:48:37 GMT")]), 60);
        assert_eq!(
            age(&[("date", "Sun, 06 Nov 1994 08:48:37 GMT"), ("age", "100")]),
            102
        );
        assert_eq!(age(&[("age", "-5")]), 2);
        assert_eq!(age(&[("age", "100, 0")]), 102);
        assert_eq!(age(&[("age", "0, 100")]), 2);
        assert_eq!(age(&[("age", "99999999999999")]), MAX_DELTA);
        assert_eq!(
            current_age(Duration::from_secs(5), Duration::from_millis(2500)),
            7
        );
        assert_eq!(
            current_age(Duration::from_secs(MAX_DELTA), Duration::from_secs(9)),
            MAX_DELTA
        );
    }
}
