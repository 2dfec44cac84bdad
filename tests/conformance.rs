//! The conformance suites against every store: memory, redis-rs and fred, standalone and on a
//! 3-master cluster, each with its own servers.

mod common;

use common::{RedisCluster, RedisServer};
use tower_redis_layers::{
    conformance::{cache_suite, idempotency_suite, lock_suite, rate_limit_suite},
    store::{CacheStore, IdempotencyStore, LockStore, MemoryStore, RateLimitStore},
};

/// Every suite, concurrently.
async fn all_suites<S>(store: &S)
where
    S: RateLimitStore + LockStore + IdempotencyStore + CacheStore,
{
    tokio::join!(
        rate_limit_suite(store),
        lock_suite(store),
        idempotency_suite(store),
        cache_suite(store),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store() {
    all_suites(&MemoryStore::new()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_standalone_and_cluster() {
    use tower_redis_layers::store::RedisStore;
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let before = server.command_calls("evalsha");
    all_suites(&store).await;
    assert!(server.command_calls("evalsha") > before);

    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    all_suites(&store).await;
    // The calls were spread over the masters: the key's hash tag picks the slot.
    let busy = cluster
        .nodes
        .iter()
        .filter(|n| n.command_calls("evalsha") > 0)
        .count();
    assert!(busy >= 2, "only {busy} master(s) served calls");
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_store_standalone_and_cluster() {
    use tower_redis_layers::store::FredStore;
    let server = RedisServer::start();
    let store = FredStore::connect(&server.url()).await.unwrap();
    all_suites(&store).await;
    assert!(server.command_calls("evalsha") > 0);

    let cluster = RedisCluster::start();
    let store = FredStore::connect(&cluster.url()).await.unwrap();
    all_suites(&store).await;
}
