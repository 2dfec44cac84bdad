//! The store matrix: one scenario, run against every store the crate ships (memory, redis-rs and
//! fred, each standalone and on a 3-master cluster), with `stores!`.
//!
//! A scenario is an `async fn name(env: Env)`; `env.store().await` makes a new client each time
//! (for the Redis stores), as a separate replica would have, and `AnyStore` implements every
//! store trait, so one scenario body serves every store.
#![allow(unused_macros)] // not every test crate (or bench) that includes the harness uses them

use std::{future::Future, pin::Pin, time::Duration};

use tower_redis_layers::{
    store::{
        CacheStore, Claim, ClaimRequest, Decision, FillToken, IdempotencyStore, LockStore, Lookup,
        LookupRequest, MemoryStore, Override, RateCheck, RateLimitStore, RateSettlement,
        RefreshRequest, Rule, StoreFuture, StoreOutcome, StoreRequest,
    },
    StoreError, StoreKey,
};

use super::{RedisCluster, RedisServer};

/// Where a scenario's store lives.
#[allow(dead_code)] // variants of stores that are not compiled in
pub enum Env {
    Memory(MemoryStore),
    Redis(RedisServer),
    Fred(RedisServer),
    RedisCluster(RedisCluster),
    FredCluster(RedisCluster),
}

impl Env {
    pub fn memory() -> Self {
        Env::Memory(MemoryStore::new())
    }
    pub fn redis() -> Self {
        Env::Redis(RedisServer::start())
    }
    pub fn fred() -> Self {
        Env::Fred(RedisServer::start())
    }
    pub fn redis_cluster() -> Self {
        Env::RedisCluster(RedisCluster::start())
    }
    pub fn fred_cluster() -> Self {
        Env::FredCluster(RedisCluster::start())
    }

    /// A new client of this environment's store (the memory store is shared).
    pub async fn store(&self) -> AnyStore {
        match self {
            Env::Memory(m) => AnyStore::Memory(m.clone()),
            #[cfg(feature = "redis")]
            Env::Redis(s) => AnyStore::Redis(connect_redis(&s.url()).await),
            #[cfg(feature = "redis")]
            Env::RedisCluster(c) => AnyStore::Redis(connect_redis(&c.url()).await),
            #[cfg(feature = "fred")]
            Env::Fred(s) => AnyStore::Fred(connect_fred(&s.url()).await),
            #[cfg(feature = "fred")]
            Env::FredCluster(c) => AnyStore::Fred(connect_fred(&c.url()).await),
            #[allow(unreachable_patterns)]
            _ => panic!("store not compiled in"),
        }
    }

    /// The Redis servers behind this environment (none for the memory store).
    pub fn servers(&self) -> Vec<&RedisServer> {
        match self {
            Env::Memory(_) => Vec::new(),
            Env::Redis(s) | Env::Fred(s) => vec![s],
            Env::RedisCluster(c) | Env::FredCluster(c) => c.nodes.iter().collect(),
        }
    }

    /// The Redis servers behind this environment, to stop, pause or restart them.
    pub fn servers_mut(&mut self) -> Vec<&mut RedisServer> {
        match self {
            Env::Memory(_) => Vec::new(),
            Env::Redis(s) | Env::Fred(s) => vec![s],
            Env::RedisCluster(c) | Env::FredCluster(c) => c.nodes.iter_mut().collect(),
        }
    }

    /// Whether the store is a Redis cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Env::RedisCluster(_) | Env::FredCluster(_))
    }

    /// The keys matching `pattern` on every node (standalone or cluster), with their node.
    pub fn keys(&self, pattern: &str) -> Vec<(&RedisServer, String)> {
        let mut out = Vec::new();
        for node in self.servers() {
            let listed = node
                .cli(&["--scan", "--pattern", pattern])
                .unwrap_or_default();
            for key in listed.lines().filter(|l| !l.is_empty()) {
                out.push((node, key.to_owned()));
            }
        }
        out
    }
}

#[cfg(feature = "redis")]
async fn connect_redis(url: &str) -> tower_redis_layers::store::RedisStore {
    tower_redis_layers::store::RedisStore::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect redis-rs to {url}: {e}"))
}

#[cfg(feature = "fred")]
async fn connect_fred(url: &str) -> tower_redis_layers::store::FredStore {
    tower_redis_layers::store::FredStore::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect fred to {url}: {e}"))
}

/// Any store the crate ships, as one type that implements every store trait.
#[derive(Clone, Debug)]
pub enum AnyStore {
    Memory(MemoryStore),
    #[cfg(feature = "redis")]
    Redis(tower_redis_layers::store::RedisStore),
    #[cfg(feature = "fred")]
    Fred(tower_redis_layers::store::FredStore),
}

/// Calls `$call` on whichever store `$store` holds.
macro_rules! each {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            AnyStore::Memory($s) => $call,
            #[cfg(feature = "redis")]
            AnyStore::Redis($s) => $call,
            #[cfg(feature = "fred")]
            AnyStore::Fred($s) => $call,
        }
    };
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl RateLimitStore for AnyStore {
    type Future = BoxFuture<Result<Decision, StoreError>>;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        each!(self, s => Box::pin(s.check(check)))
    }

    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        each!(self, s => s.check_now(check))
    }

    fn is_remote(&self) -> bool {
        each!(self, s => RateLimitStore::is_remote(s))
    }

    fn settle(&self, settlement: RateSettlement<'_>) -> StoreFuture<()> {
        each!(self, s => s.settle(settlement))
    }

    fn settle_now(&self, settlement: RateSettlement<'_>) -> Option<Result<(), StoreError>> {
        each!(self, s => s.settle_now(settlement))
    }

    fn reset(&self, key: &StoreKey, rules: &[Rule]) -> StoreFuture<()> {
        each!(self, s => s.reset(key, rules))
    }

    fn set_override(&self, key: &StoreKey, state: Option<Override>) -> StoreFuture<()> {
        each!(self, s => s.set_override(key, state))
    }
}

impl CacheStore for AnyStore {
    fn lookup(&self, request: LookupRequest) -> StoreFuture<Lookup> {
        each!(self, s => s.lookup(request))
    }

    fn store(&self, request: StoreRequest) -> StoreFuture<StoreOutcome> {
        each!(self, s => s.store(request))
    }

    fn release_fill(
        &self,
        segment: StoreKey,
        key: StoreKey,
        token: FillToken,
    ) -> StoreFuture<bool> {
        each!(self, s => s.release_fill(segment, key, token))
    }

    fn invalidate_segment(&self, segment: StoreKey) -> StoreFuture<u64> {
        each!(self, s => s.invalidate_segment(segment))
    }

    fn invalidate_key(&self, segment: StoreKey, key: StoreKey) -> StoreFuture<bool> {
        each!(self, s => s.invalidate_key(segment, key))
    }

    fn refresh(&self, request: RefreshRequest) -> StoreFuture<StoreOutcome> {
        each!(self, s => s.refresh(request))
    }

    fn invalidate_keys(&self, segment: StoreKey, keys: Vec<StoreKey>) -> StoreFuture<u64> {
        each!(self, s => s.invalidate_keys(segment, keys))
    }

    fn is_remote(&self) -> bool {
        each!(self, s => CacheStore::is_remote(s))
    }
}

impl LockStore for AnyStore {
    fn acquire_lock(&self, r: &StoreKey, token: &str, lease: Duration) -> StoreFuture<Option<u64>> {
        each!(self, s => s.acquire_lock(r, token, lease))
    }

    fn extend_lock(&self, r: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        each!(self, s => s.extend_lock(r, token, lease))
    }

    fn release_lock(&self, r: &StoreKey, token: &str) -> StoreFuture<bool> {
        each!(self, s => s.release_lock(r, token))
    }
}

impl IdempotencyStore for AnyStore {
    fn claim(&self, key: &StoreKey, request: ClaimRequest<'_>) -> StoreFuture<Claim> {
        each!(self, s => s.claim(key, request))
    }

    fn complete(
        &self,
        key: &StoreKey,
        token: &str,
        response: Vec<u8>,
        retention: Duration,
    ) -> StoreFuture<bool> {
        each!(self, s => s.complete(key, token, response, retention))
    }

    fn extend_claim(&self, key: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        each!(self, s => s.extend_claim(key, token, lease))
    }

    fn release_claim(&self, key: &StoreKey, token: &str) -> StoreFuture<bool> {
        each!(self, s => s.release_claim(key, token))
    }
}

/// Runs each scenario `async fn name(env: Env)` of the list against every store: one test per
/// scenario and store, in modules `memory`, `redis`, `fred`, `redis_cluster`, `fred_cluster`.
macro_rules! stores {
    ($($name:ident),* $(,)?) => {
        $crate::common::stores::store_module!(memory, memory, any, $($name),*);
        $crate::common::stores::store_module!(redis, redis, "redis", $($name),*);
        $crate::common::stores::store_module!(fred, fred, "fred", $($name),*);
        $crate::common::stores::store_module!(redis_cluster, redis_cluster, "redis", $($name),*);
        $crate::common::stores::store_module!(fred_cluster, fred_cluster, "fred", $($name),*);
    };
}

/// One module of [`stores!`]: the scenarios against the store that `Env::$env()` makes, compiled
/// when the store's feature is on (`any`: always).
macro_rules! store_module {
    ($module:ident, $env:ident, any, $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::stores::Env::$env()).await;
                }
            )*
        }
    };
    ($module:ident, $env:ident, $feature:literal, $($name:ident),*) => {
        #[cfg(feature = $feature)]
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::stores::Env::$env()).await;
                }
            )*
        }
    };
}

#[allow(unused_imports)]
pub(crate) use {store_module, stores};
