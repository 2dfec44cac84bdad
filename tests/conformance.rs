//! The public conformance suites against every store: memory, redis-rs and fred, each
//! standalone and on a 3-master cluster, each with its own servers.

mod common;

use common::stores::{stores, Env};
use tower_redis_layers::conformance::{
    cache_suite, idempotency_suite, lock_suite, rate_limit_settlement_suite, rate_limit_suite,
};

/// Every suite, concurrently; on Redis, the calls were script calls, and on a cluster they were
/// spread over the masters (each key's hash tag picks its slot).
async fn every_suite(env: Env) {
    let store = env.store().await;
    tokio::join!(
        rate_limit_suite(&store),
        rate_limit_settlement_suite(&store),
        lock_suite(&store),
        idempotency_suite(&store),
        cache_suite(&store),
    );
    let servers = env.servers();
    let busy = servers
        .iter()
        .filter(|n| n.command_calls("evalsha") > 0)
        .count();
    match servers.len() {
        0 => {}
        1 => assert_eq!(busy, 1, "no EVALSHA reached the server"),
        _ => assert!(busy >= 2, "only {busy} master(s) served calls"),
    }
}

stores!(every_suite);
