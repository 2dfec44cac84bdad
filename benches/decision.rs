//! The decision path of each strategy on each store: one call, and 64 concurrent callers sharing
//! one client.
//!
//! ```text
//! cargo bench --bench decision
//! ```
//!
//! Starts its own `redis-server` on a free loopback port.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/strategies.rs"]
mod strategies;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::future::join_all;
use strategies::strategies;
use tower_redis_layers::{
    rate_limit::Rule,
    store::{FredStore, MemoryStore, RateCheck, RateLimitStore, RedisStore},
    StoreKey,
};

async fn one<S: RateLimitStore>(store: &S, key: &StoreKey, rules: &[Rule]) {
    let _ = store.check(RateCheck::new(key, rules, 1, false)).await;
}

fn bench_store<S: RateLimitStore>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: &S,
) {
    let mut group = c.benchmark_group(name);
    group.measurement_time(Duration::from_secs(3));
    for (strategy, rule) in strategies() {
        let rules = [rule];
        let key = StoreKey::from_parts([name.as_bytes(), strategy.as_bytes()]);
        group.bench_function(format!("{strategy}/single"), |b| {
            b.to_async(rt).iter(|| one(store, &key, &rules));
        });
        group.bench_function(format!("{strategy}/64-concurrent"), |b| {
            b.to_async(rt)
                .iter(|| join_all((0..64).map(|_| one(store, &key, &rules))));
        });
    }
    group.finish();
}

fn decision(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = common::RedisServer::start();
    let memory = MemoryStore::new();
    let redis = rt
        .block_on(RedisStore::connect(&server.url()))
        .expect("redis");
    let fred = rt
        .block_on(FredStore::connect(&server.url()))
        .expect("fred");
    bench_store(c, &rt, "memory", &memory);
    bench_store(c, &rt, "redis", &redis);
    bench_store(c, &rt, "fred", &fred);
}

criterion_group!(benches, decision);
criterion_main!(benches);
