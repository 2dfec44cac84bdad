//! Reading and administering the quotas of a layer's keys: [`RateLimitHandle`].

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http::{request::Parts, HeaderName, HeaderValue, Request};

use super::{layer::Shared, policy::CompiledPolicy, KeyExtractor};
use crate::{
    key::KeyHash,
    store::{Override, RateCheck, RateLimitStore, StoreError},
    StoreKey,
};

/// Reads and administers the quotas of a [`RateLimitLayer`](super::RateLimitLayer)'s keys,
/// from an admin endpoint, a job or a test: a key's remaining quota per rule (without
/// consuming), a reset, and blocking or allowing a key for a while.
///
/// Obtained with [`RateLimitLayer::handle`](super::RateLimitLayer::handle); cheap to clone.
/// Every operation is one call to the layer's store (bounded by its store timeout): what it
/// changes, every replica sees at once, except that a replica's local deny cache keeps
/// answering a denial it already holds until that denial's wait ends (this handle's own layer
/// forgets the key's denials; see [`RateLimitLayer::no_deny_cache`](super::RateLimitLayer::no_deny_cache)).
///
/// Operations name the policy by its [name](super::Policy::new): the layer's default policy or
/// a named policy of its [resolver](super::RateLimitLayer::resolver) (as it is now), and every
/// route with a policy of that name (a route counts on its own, so each has its own state). A key is given as the layer's [`KeyExtractor`] would see it: a [`RateKey`], or the
/// key of a request with [`key_of`](Self::key_of).
///
/// ```
/// use std::time::Duration;
/// use tower_redis_layers::{
///     rate_limit::{KeyExtractor, Policy, RateKey, RateLimitLayer, Rule},
///     store::MemoryStore,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_redis_layers::StoreError> {
/// let policy = Policy::new("api", Rule::fixed_window(100, Duration::from_secs(60)).name("per-minute"));
/// let layer = RateLimitLayer::new(MemoryStore::new(), policy).key(KeyExtractor::header("x-api-key"));
/// let handle = layer.handle();
///
/// let customer = RateKey::header("x-api-key", "k-123");
/// let quota = handle.quota("api", &customer).await?;
/// assert_eq!((quota.rules[0].name.as_str(), quota.rules[0].remaining), ("per-minute", 100));
///
/// handle.block("api", &customer, Duration::from_secs(3600)).await?; // every replica denies it
/// assert!(handle.quota("api", &customer).await?.blocked.is_some());
/// handle.unblock("api", &customer).await?;
/// handle.reset("api", &customer).await?; // a fresh budget
/// # Ok(()) }
/// ```
pub struct RateLimitHandle<B> {
    shared: Arc<Shared<B>>,
}

impl<B> RateLimitHandle<B> {
    pub(crate) fn new(shared: &Arc<Shared<B>>) -> Self {
        Self {
            shared: Arc::clone(shared),
        }
    }
}

/// A key as a [`KeyExtractor`] sees it, before the layer hashes it with a policy's namespace:
/// an API key in a header, an address, a custom value. See [`RateLimitHandle`].
#[derive(Clone)]
pub struct RateKey {
    extractor: KeyExtractor,
    parts: Arc<Parts>,
}

impl RateKey {
    /// The value `value` of header `name`, as [`KeyExtractor::header`] keys it. An invalid
    /// name or value gives a key no request can have.
    pub fn header(name: impl AsRef<str>, value: impl AsRef<[u8]>) -> Self {
        let name = HeaderName::from_bytes(name.as_ref().as_bytes());
        let value = HeaderValue::from_bytes(value.as_ref());
        let mut parts = empty_parts();
        let extractor = match (name, value) {
            (Ok(name), Ok(value)) => {
                parts.headers.insert(name.clone(), value);
                KeyExtractor::header(name)
            }
            // Extracts nothing: operations answer that the key is not valid.
            _ => KeyExtractor::custom(|_| None),
        };
        Self::of(extractor, parts)
    }

    /// The address `ip`, as [`KeyExtractor::peer_ip`] and the forwarded-address extractors key
    /// it with their default networks (IPv4 alone, IPv6 by its /64): any address of the network
    /// names it. For other networks, use [`RateKey::network`].
    pub fn ip(ip: IpAddr) -> Self {
        Self::address(KeyExtractor::peer_ip(), ip)
    }

    /// The address `ip` grouped as an extractor with
    /// [`ipv4_prefix(v4)`](KeyExtractor::ipv4_prefix) and
    /// [`ipv6_prefix(v6)`](KeyExtractor::ipv6_prefix) groups it.
    pub fn network(ip: IpAddr, v4: u8, v6: u8) -> Self {
        let extractor = KeyExtractor::peer_ip().ipv4_prefix(v4).ipv6_prefix(v6);
        Self::address(extractor, ip)
    }

    /// The one key of [`KeyExtractor::global`].
    pub fn global() -> Self {
        Self::of(KeyExtractor::global(), empty_parts())
    }

    /// The value a [`KeyExtractor::custom`] closure returned.
    pub fn custom(value: impl Into<String>) -> Self {
        let value: String = value.into();
        Self::of(
            KeyExtractor::custom(move |_| Some(value.clone())),
            empty_parts(),
        )
    }

    fn address(extractor: KeyExtractor, ip: IpAddr) -> Self {
        let mut parts = empty_parts();
        parts.extensions.insert(SocketAddr::new(ip, 0));
        Self::of(extractor, parts)
    }

    fn of(extractor: KeyExtractor, parts: Parts) -> Self {
        Self {
            extractor,
            parts: Arc::new(parts),
        }
    }

    /// The store key under `policy`, as the layer hashes it for its store (`hash`).
    fn hash(&self, policy: &CompiledPolicy, hash: KeyHash) -> Result<StoreKey, StoreError> {
        match self.extractor.extract(&self.parts) {
            Some(raw) => Ok(raw.hash_with(&policy.namespace, hash)),
            None => Err(StoreError::Invalid(
                "the rate-limit key is not valid (no key extracted from it)".to_owned(),
            )),
        }
    }
}

fn empty_parts() -> Parts {
    Request::new(()).into_parts().0
}

impl fmt::Debug for RateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be secrets (API keys): only the source is shown.
        f.debug_struct("RateKey")
            .field("extractor", &self.extractor)
            .finish_non_exhaustive()
    }
}

/// A key's quota under one policy, read without consuming: see [`RateLimitHandle::quota`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyQuota {
    /// Each rule of the policy, in its order.
    pub rules: Vec<RuleQuota>,
    /// When the key is [blocked](RateLimitHandle::block): how long the block still lasts (every
    /// rule then reports 0 remaining). An [allowed](RateLimitHandle::allow) key is not marked:
    /// it reports its rules' state, which its requests do not consume.
    pub blocked: Option<Duration>,
}

/// One rule's state for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuleQuota {
    /// The rule's name, as in the `RateLimit` fields.
    pub name: String,
    /// The rule's quota (`q` in `RateLimit-Policy`).
    pub quota: u64,
    /// Units left now.
    pub remaining: u64,
    /// Time until the quota is fully available again.
    pub reset: Duration,
}

impl<B: RateLimitStore> RateLimitHandle<B> {
    /// The key of `request` under the layer's [`KeyExtractor`] (the very key the layer would
    /// count it under), or `None` when the request has none.
    pub fn key_of<T>(&self, request: &Request<T>) -> Option<RateKey> {
        let mut parts = empty_parts();
        parts.method = request.method().clone();
        parts.uri = request.uri().clone();
        parts.version = request.version();
        parts.headers = request.headers().clone();
        parts.extensions = request.extensions().clone();
        let key = RateKey::of(self.shared.config.key.clone(), parts);
        key.extractor.extract(&key.parts).is_some().then_some(key)
    }

    /// The remaining quota and reset time of each rule of the policy named `policy` for `key`,
    /// read with a check of cost 0 (which consumes nothing on any strategy). For a route, the
    /// first route of that name (else the default policy).
    pub async fn quota(&self, policy: &str, key: &RateKey) -> Result<KeyQuota, StoreError> {
        let compiled = self
            .policies(policy)?
            .into_iter()
            .next()
            .ok_or_else(|| no_policy(policy))?;
        let store_key = key.hash(&compiled, self.key_hash())?;
        let check = RateCheck::new(&store_key, &compiled.rules, 0, true);
        let decision = self.bound(self.shared.store.check(check)).await?;
        let rules = (compiled.rules.iter().zip(&decision.rules))
            .map(|(rule, state)| RuleQuota {
                name: rule.policy_name(),
                quota: rule.quota(),
                remaining: state.remaining,
                reset: state.reset,
            })
            .collect();
        // A check of cost 0 is denied only by a block.
        let blocked = (!decision.allowed).then_some(decision.retry_after);
        Ok(KeyQuota { rules, blocked })
    }

    /// Deletes `key`'s state under the policy named `policy` (every route of that name): its
    /// next request starts with the full quota of every rule. A block or an allowance stays.
    pub async fn reset(&self, policy: &str, key: &RateKey) -> Result<(), StoreError> {
        for compiled in self.policies(policy)? {
            let store_key = key.hash(&compiled, self.key_hash())?;
            let call = self.shared.store.reset(&store_key, &compiled.rules);
            self.bound(call).await?;
            self.shared.deny_cache.forget(compiled.id, &store_key);
        }
        Ok(())
    }

    /// Denies every request of `key` under the policy named `policy` for `duration`, on every
    /// replica: a `429` whose `Retry-After` is the block's remaining time. Nothing is consumed;
    /// replaces an allowance.
    pub async fn block(
        &self,
        policy: &str,
        key: &RateKey,
        duration: Duration,
    ) -> Result<(), StoreError> {
        self.set(policy, key, Some(Override::Block(duration))).await
    }

    /// Admits every request of `key` under the policy named `policy` for `duration`, on every
    /// replica, without consuming its quota; replaces a block.
    pub async fn allow(
        &self,
        policy: &str,
        key: &RateKey,
        duration: Duration,
    ) -> Result<(), StoreError> {
        self.set(policy, key, Some(Override::Allow(duration))).await
    }

    /// Ends a block or an allowance of `key` under the policy named `policy`: its rules decide
    /// again, with the state they had.
    pub async fn unblock(&self, policy: &str, key: &RateKey) -> Result<(), StoreError> {
        self.set(policy, key, None).await
    }

    async fn set(
        &self,
        policy: &str,
        key: &RateKey,
        state: Option<Override>,
    ) -> Result<(), StoreError> {
        for compiled in self.policies(policy)? {
            let store_key = key.hash(&compiled, self.key_hash())?;
            self.bound(self.shared.store.set_override(&store_key, state))
                .await?;
            if !matches!(state, Some(Override::Block(_))) {
                self.shared.deny_cache.forget(compiled.id, &store_key);
            }
        }
        Ok(())
    }

    /// The policies named `name`, as they are now (the layer's named policies change at
    /// runtime: see [`PolicySet`](super::PolicySet)).
    fn policies(&self, name: &str) -> Result<Vec<Arc<CompiledPolicy>>, StoreError> {
        let found = self.shared.config.policies_named(name);
        if found.is_empty() {
            return Err(no_policy(name));
        }
        Ok(found)
    }

    /// How the layer hashes keys for its store (so the handle names the layer's very keys).
    fn key_hash(&self) -> KeyHash {
        KeyHash::of_store(self.shared.store.is_remote())
    }

    /// `call` bounded by the layer's store timeout (when the store is remote).
    async fn bound<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let timeout = (self.shared.store.is_remote()).then_some(self.shared.config.store_timeout);
        crate::store::bounded(timeout, call).await
    }
}

fn no_policy(name: &str) -> StoreError {
    StoreError::Invalid(format!("the layer has no policy named {name:?}"))
}

impl<B> Clone for RateLimitHandle<B> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B> fmt::Debug for RateLimitHandle<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("scope", &self.shared.config.scope)
            .finish_non_exhaustive()
    }
}
