//! Hashed keys: what goes into a store key is never raw request text.

use sha2::{Digest, Sha256};
use std::fmt;

/// A key derived from request data, hashed so that no client can make a huge or odd store key,
/// pick another tenant's slot, or inject a hash tag of its own.
///
/// It holds 128 bits of a SHA-256 digest over a namespace and the raw key bytes, and displays as
/// 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey([u8; 16]);

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
}
