//! Hashed keys: what goes into a store key is never raw request text.

use rapidhash::v3::{rapidhash_v3_inline, RapidSecrets};
use sha2::{Digest, Sha256};
use std::{fmt, sync::OnceLock};

/// A key derived from request data, hashed so that no client can make a huge or odd store key,
/// pick another tenant's slot, or inject a hash tag of its own.
///
/// It holds 128 bits of a SHA-256 digest over a namespace and the raw key bytes, and displays as
/// 32 lowercase hex digits. (A rate-limit layer whose store is in process hashes its keys with a
/// faster hash seeded at random for the process instead: such keys never leave it.)
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey([u8; 16]);

/// How a layer hashes the keys it gives its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyHash {
    /// SHA-256 ([`StoreKey::from_parts`]): the same in every process, for keys that leave the
    /// process (a Redis store shared by replicas, across restarts).
    Sha256,
    /// Two rapidhash hashes under seeds drawn at random for the process and the namespace
    /// ([`Namespace::key`]): for a store in this process, whose keys no other process reads.
    Local,
}

impl KeyHash {
    /// The hash of the keys of a store that is remote (or not).
    #[inline]
    pub(crate) fn of_store(remote: bool) -> Self {
        if remote {
            Self::Sha256
        } else {
            Self::Local
        }
    }
}

/// A namespace of store keys (a layer's and a policy's scopes), with the seeds of its
/// [local](KeyHash::Local) keys: the process's two seeds, each mixed with the namespace once,
/// when the namespace is made, so that a request hashes only its own key's bytes.
#[derive(Clone)]
pub(crate) struct Namespace {
    name: String,
    local: [RapidSecrets; 2],
}

impl Namespace {
    pub(crate) fn new(name: String) -> Self {
        let local = local_secrets().map(|secrets| {
            // A seed per namespace: distinct namespaces hash under unrelated seeds, as if the
            // namespace were the first part of every key.
            RapidSecrets::seed(rapidhash_v3_inline::<true, false, true>(
                name.as_bytes(),
                &secrets,
            ))
        });
        Self { name, local }
    }

    /// The store key of `[tag, value]`, as [`key`](Self::key) makes it, without its loop over
    /// the parts for a local key of at most [`SHORT`] bytes (the usual one: an address, a short
    /// header value): the same bytes are hashed.
    #[inline]
    pub(crate) fn pair_key(&self, hash: KeyHash, tag: &[u8], value: &[u8]) -> StoreKey {
        match hash {
            KeyHash::Local if tag.len() + value.len() + 2 <= SHORT && value.len() < 255 => {
                let mut data = [0u8; SHORT];
                let (tag_len, rest) = data.split_at_mut(1);
                let (tag_bytes, rest) = rest.split_at_mut(tag.len());
                let (value_len, rest) = rest.split_at_mut(1);
                // Lengths below 255: one byte each (checked above; tags are a few bytes).
                tag_len[0] = tag.len() as u8;
                tag_bytes.copy_from_slice(tag);
                value_len[0] = value.len() as u8;
                let end = tag.len() + value.len() + 2;
                if let Some(room) = rest.get_mut(..value.len()) {
                    room.copy_from_slice(value);
                }
                StoreKey::hashed(&self.local, data.get(..end).unwrap_or(&data))
            }
            _ => self.key(hash, [tag, value]),
        }
    }

    /// The namespace's name.
    pub(crate) fn as_str(&self) -> &str {
        &self.name
    }

    /// The store key of `parts` in this namespace, hashed as `hash` says: SHA-256 over the
    /// name and the parts ([`StoreKey::from_parts`]), or the parts alone under the
    /// namespace's local seeds ([`StoreKey::local`]).
    #[inline]
    pub(crate) fn key<'a>(
        &'a self,
        hash: KeyHash,
        parts: impl IntoIterator<Item = &'a [u8]>,
    ) -> StoreKey {
        match hash {
            KeyHash::Sha256 => {
                StoreKey::from_parts(std::iter::once(self.name.as_bytes()).chain(parts))
            }
            KeyHash::Local => StoreKey::local(&self.local, parts),
        }
    }
}

impl PartialEq for Namespace {
    fn eq(&self, other: &Self) -> bool {
        // The seeds follow from the name (in one process).
        self.name == other.name
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The two seeds of local keys, drawn once per process (each namespace mixes its name in: see
/// [`Namespace`]).
fn local_secrets() -> &'static [RapidSecrets; 2] {
    static SECRETS: OnceLock<[RapidSecrets; 2]> = OnceLock::new();
    SECRETS.get_or_init(|| {
        [
            RapidSecrets::seed(rand::random()),
            RapidSecrets::seed(rand::random()),
        ]
    })
}

/// The length prefix of a part of 255 bytes or more: 255, then its length in eight bytes.
fn long_len(len: usize) -> [u8; 9] {
    let mut prefix = [u8::MAX; 9];
    let (_, rest) = prefix.split_at_mut(1);
    rest.copy_from_slice(&(len as u64).to_le_bytes());
    prefix
}

/// How many bytes of a length-prefixed tag and value [`Namespace::pair_key`] hashes without a
/// loop: a tag and an IPv6 network, or a header value of about 40 bytes.
const SHORT: usize = 64;

/// How many bytes of length-prefixed parts [`StoreKey::local`] hashes from the stack; longer
/// keys (long header values) are copied to the heap.
const LOCAL_INLINE: usize = 160;

impl StoreKey {
    /// Hashes `parts` (each length-prefixed, so `["ab", "c"]` and `["a", "bc"]` differ).
    pub fn from_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        let digest = hasher.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        Self(out)
    }

    /// Hashes `parts` for a store in this process: two 64-bit rapidhash hashes (its protected
    /// variant) under two seeds drawn at random when the process first hashes a key (and mixed
    /// with the key's namespace, see [`Namespace`]), several times cheaper than SHA-256 for the
    /// short keys of a request.
    ///
    /// Each part is prefixed with its length, in one byte below 255 (else a 255 and eight
    /// bytes): a prefix-free code, so distinct lists of parts hash distinct byte strings, and
    /// the usual key (a namespace, a tag and an address) stays within the 16 bytes that
    /// rapidhash hashes fastest.
    ///
    /// The key differs from process to process, so it must never leave the process. Clients
    /// cannot aim at a collision: they know neither seed, and two distinct keys share 128
    /// pseudo-random bits with a probability of about 2⁻¹²⁸ (a birthday bound of 2⁻⁶⁴ even
    /// among billions of keys).
    fn local<'a>(secrets: &[RapidSecrets; 2], parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut inline = [0u8; LOCAL_INLINE];
        let mut len = 0;
        let mut heap: Option<Vec<u8>> = None;
        for part in parts {
            // The prefix, in its first byte alone or in all nine (fixed-size copies).
            let (prefix, long) = match u8::try_from(part.len()) {
                Ok(n) if n < u8::MAX => ([n; 9], false),
                _ => (long_len(part.len()), true),
            };
            let plen = if long { prefix.len() } else { 1 };
            let end = len + plen + part.len();
            match (&mut heap, inline.get_mut(len..end)) {
                (None, Some(room)) => {
                    let (head, tail) = room.split_at_mut(plen);
                    match head {
                        [byte] => *byte = prefix[0],
                        nine => nine.copy_from_slice(&prefix),
                    }
                    tail.copy_from_slice(part);
                    len = end;
                }
                (heap, _) => {
                    let bytes =
                        heap.get_or_insert_with(|| inline.get(..len).unwrap_or_default().to_vec());
                    bytes.extend_from_slice(prefix.get(..plen).unwrap_or_default());
                    bytes.extend_from_slice(part);
                }
            }
        }
        let data = match &heap {
            Some(bytes) => bytes.as_slice(),
            None => inline.get(..len).unwrap_or_default(),
        };
        Self::hashed(secrets, data)
    }

    /// The local key of the length-prefixed `data` (see [`StoreKey::local`]).
    #[inline]
    fn hashed(secrets: &[RapidSecrets; 2], data: &[u8]) -> Self {
        let [one, two] = secrets;
        let a = rapidhash_v3_inline::<true, false, true>(data, one);
        let b = rapidhash_v3_inline::<true, false, true>(data, two);
        let mut out = [0u8; 16];
        let (lo, hi) = out.split_at_mut(8);
        lo.copy_from_slice(&a.to_le_bytes());
        hi.copy_from_slice(&b.to_le_bytes());
        Self(out)
    }

    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The key as 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hex = [0u8; 32];
        // 16 bytes always fit in 32 hex digits, which are ASCII.
        let _ = hex::encode_to_slice(self.0, &mut hex);
        f.write_str(std::str::from_utf8(&hex).unwrap_or_default())
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefix_separates_parts() {
        let a = StoreKey::from_parts([b"ab".as_slice(), b"c"]);
        let b = StoreKey::from_parts([b"a".as_slice(), b"bc"]);
        assert_ne!(a, b);
        assert_eq!(a.to_hex().len(), 32);
        assert!(a.to_hex().bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn local_keys_are_stable_in_the_process_and_separate_parts() {
        let ns = Namespace::new("ns".to_owned());
        let local = |parts: &[&[u8]]| ns.key(KeyHash::Local, parts.iter().copied());
        let a = local(&[b"ab", b"c"]);
        assert_eq!(a, local(&[b"ab", b"c"]));
        assert_eq!(
            a,
            Namespace::new("ns".to_owned()).key(KeyHash::Local, [b"ab".as_slice(), b"c"])
        );
        assert_ne!(a, local(&[b"a", b"bc"]));
        // Another namespace, another key.
        let other = Namespace::new("nt".to_owned());
        assert_ne!(a, other.key(KeyHash::Local, [b"ab".as_slice(), b"c"]));
        assert_ne!(a, StoreKey::from_parts([b"ns".as_slice(), b"ab", b"c"]));
        assert_eq!(
            ns.key(KeyHash::Sha256, [b"ab".as_slice(), b"c"]),
            StoreKey::from_parts([b"ns".as_slice(), b"ab", b"c"])
        );
        // Keys longer than the inline buffer hash the same bytes from the heap.
        let long = vec![7u8; LOCAL_INLINE * 2];
        let split = local(&[b"x", &long]);
        assert_eq!(split, local(&[b"x", &long]));
        assert_ne!(split, local(&[b"x", &long[1..]]));
        let just = vec![7u8; LOCAL_INLINE - 9 - 3];
        assert_ne!(local(&[b"x", &just]), local(&[b"x", &just[1..]]));
        // Lengths of 254, 255 and 256 bytes are told apart (one-byte and nine-byte prefixes).
        let parts = [vec![1u8; 254], vec![1u8; 255], vec![1u8; 256]];
        let keys: Vec<StoreKey> = parts.iter().map(|p| local(&[p])).collect();
        assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);
        assert_ne!(local(&[&[255u8], &[1]]), local(&[&[1u8; 256]]));
    }

    #[test]
    fn pair_keys_are_the_keys_of_the_two_parts() {
        let ns = Namespace::new("ns".to_owned());
        for tag in [b"".as_slice(), b"ip", b"custom"] {
            for len in [
                0,
                1,
                17,
                SHORT - 2 - tag.len(),
                SHORT - 1 - tag.len(),
                254,
                255,
                300,
            ] {
                let value = vec![9u8; len];
                for hash in [KeyHash::Local, KeyHash::Sha256] {
                    assert_eq!(
                        ns.pair_key(hash, tag, &value),
                        ns.key(hash, [tag, value.as_slice()]),
                        "{tag:?} and {len} bytes"
                    );
                }
            }
        }
    }
}
