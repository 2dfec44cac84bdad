//! The Redis stores: every operation is one Lua script call, written once here for any
//! [`ScriptRunner`], and the two clients that run them.
//!
//! - `script.rs`: the script text and SHA-1, the call buffer, the reply;
//! - `rate_limit.rs`, `cache.rs`, `lock.rs`, `idempotency.rs`: each concern's scripts, the
//!   keys and arguments of its calls, the decoding of its replies, and its store trait
//!   implemented for every [`ScriptRunner`];
//! - `redis_rs.rs` ([`RedisStore`]) and `fred.rs` ([`FredStore`]): thin runners that send a call
//!   with `EVALSHA` (then `EVAL` on `NOSCRIPT`) and read the reply.
//!
//! Every key of a call carries one hash tag, so each call runs on one Redis Cluster slot.

use std::{future::Future, sync::Arc};

mod cache;
mod idempotency;
mod lock;
mod rate_limit;
mod script;

#[cfg(feature = "fred")]
mod fred;
#[cfg(feature = "redis")]
mod redis_rs;

#[cfg(feature = "fred")]
pub use self::fred::FredStore;
pub use self::rate_limit::rate_limit_script;
#[cfg(feature = "redis")]
pub use self::redis_rs::RedisStore;

use self::script::{Lua, Reply, ScriptCall};
use crate::store::StoreError;

/// A Redis client that runs this crate's scripts: [`RedisStore`] and [`FredStore`].
///
/// Every store trait ([`RateLimitStore`](crate::store::RateLimitStore),
/// [`CacheStore`](crate::store::CacheStore), [`LockStore`](crate::store::LockStore),
/// [`IdempotencyStore`](crate::store::IdempotencyStore)) is implemented once for every runner:
/// the scripts, keys and reply decoding are shared, and a runner only sends a call and reads the
/// reply. The trait is sealed: it names the stores this crate ships, and cannot be implemented
/// outside it.
pub trait ScriptRunner: sealed::Runner {}

impl<T: sealed::Runner> ScriptRunner for T {}

pub(crate) mod sealed {
    use super::*;

    /// What a runner does; private, so [`ScriptRunner`] is sealed.
    pub trait Runner: Send + Sync + 'static {
        /// Runs `call.lua` with the call's keys (all in one hash slot) and arguments: one round
        /// trip (`EVALSHA`, then `EVAL` on `NOSCRIPT`).
        fn call(
            &self,
            call: ScriptCall,
        ) -> impl Future<Output = Result<Reply, StoreError>> + Send + 'static;

        /// [`Runner::call`] with owned keys and arguments.
        fn run(
            &self,
            lua: &'static Lua,
            keys: Vec<String>,
            args: Vec<Vec<u8>>,
        ) -> impl Future<Output = Result<Reply, StoreError>> + Send + 'static {
            self.call(ScriptCall::from_vecs(lua, keys, args))
        }

        /// The prefix of every key.
        fn prefix(&self) -> &str;
    }
}

/// The prefix of every key a Redis store writes (default `trl`), without `{` or `}` so that it
/// can never become a hash tag.
#[derive(Clone, Debug)]
pub(crate) struct KeyPrefix(Arc<str>);

impl KeyPrefix {
    pub(crate) fn new(prefix: impl Into<String>) -> Self {
        Self(prefix.into().replace(['{', '}'], "").into())
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self(Arc::from("trl"))
    }
}

/// The two keys of a lock or an idempotency record, under one hash tag: the value and its fence
/// counter (`<prefix>:<kind>:{<key>}` and `<prefix>:<kind>-fence:{<key>}`).
pub(crate) fn fenced_keys(prefix: &str, kind: &str, key: &crate::StoreKey) -> [String; 2] {
    let tag = key.to_hex();
    [
        format!("{prefix}:{kind}:{{{tag}}}"),
        format!("{prefix}:{kind}-fence:{{{tag}}}"),
    ]
}

/// Splits `redis+cluster://a:1,b:2` (or `rediss+cluster://`) into the scheme without `+cluster`
/// and the nodes; `None` for a URL of one server.
pub(crate) fn cluster_nodes(url: &str) -> Option<(&str, impl Iterator<Item = &str>)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.strip_suffix("+cluster")?;
    Some((
        scheme,
        rest.split(',').map(str::trim).filter(|n| !n.is_empty()),
    ))
}
