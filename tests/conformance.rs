//! The conformance suite against every store: memory, redis-rs and fred, standalone and on a
//! 3-master cluster, each with its own servers.

mod common;

use common::{RedisCluster, RedisServer};
use tower_redis_layers::{
    backend::MemoryBackend,
    conformance::{cache_suite, rate_limit_suite},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store() {
    rate_limit_suite(&MemoryBackend::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cache_store() {
    cache_suite(&MemoryBackend::new()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_store_standalone_and_cluster() {
    use tower_redis_layers::backend::RedisBackend;
    let server = RedisServer::start();
    let store = RedisBackend::connect(&server.url()).await.unwrap();
    cache_suite(&store).await;

    let cluster = RedisCluster::start();
    let store = RedisBackend::connect(&cluster.url()).await.unwrap();
    cache_suite(&store).await;
    let busy = cluster
        .nodes
        .iter()
        .filter(|n| n.command_calls("evalsha") + n.command_calls("eval") > 0)
        .count();
    assert!(busy >= 2, "only {busy} master(s) served calls");
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_cache_store_standalone_and_cluster() {
    use tower_redis_layers::backend::FredBackend;
    let server = RedisServer::start();
    let store = FredBackend::connect(&server.url()).await.unwrap();
    cache_suite(&store).await;

    let cluster = RedisCluster::start();
    let store = FredBackend::connect(&cluster.url()).await.unwrap();
    cache_suite(&store).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_standalone_and_cluster() {
    use tower_redis_layers::backend::RedisBackend;
    let server = RedisServer::start();
    let store = RedisBackend::connect(&server.url()).await.unwrap();
    let before = server.command_calls("evalsha");
    rate_limit_suite(&store).await;
    assert!(server.command_calls("evalsha") > before);

    let cluster = RedisCluster::start();
    let store = RedisBackend::connect(&cluster.url()).await.unwrap();
    rate_limit_suite(&store).await;
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
    use tower_redis_layers::backend::FredBackend;
    let server = RedisServer::start();
    let store = FredBackend::connect(&server.url()).await.unwrap();
    rate_limit_suite(&store).await;
    assert!(server.command_calls("evalsha") > 0);

    let cluster = RedisCluster::start();
    let store = FredBackend::connect(&cluster.url()).await.unwrap();
    rate_limit_suite(&store).await;
}
