//! A rate-limit call that ran on the server and whose reply was lost (the connection cut after
//! the server answered): a settlement is applied at most once on every client (a refund applied
//! twice would admit more than the limit); a check or a lease is applied at most once on
//! redis-rs standalone (it fails the call), and at most twice on fred and on a redis-rs
//! cluster, whose clients send a call again after they reconnect (fred even when told to write
//! it once, `max_attempts: 1`, and to fail fast): the request is counted twice (the limit holds,
//! one request's cost is lost from the window), never admitted twice.

#![cfg(any(feature = "redis", feature = "fred"))]

mod common;

use std::time::Duration;

use common::{fault_proxy::FaultProxy, RedisCluster, RedisServer};
use tower_redis_layers::{
    store::{
        Decision, LeaseGrant, RateCheck, RateLease, RateLeaseStore, RateLimitStore, RateSettlement,
        Rule,
    },
    StoreError, StoreKey,
};

const LIMIT: u64 = 100;

/// The proxies in front of every node: the next reply of whichever node answers is cut.
struct Proxies(Vec<FaultProxy>);

impl Proxies {
    fn arm(&self) {
        for proxy in &self.0 {
            proxy.cut_next_reply();
        }
    }

    fn fired(&self) -> bool {
        self.0.iter().any(|p| p.resets() >= 1)
    }

    /// The proxies that were not in the call's way forget their fault.
    fn disarm(&self) {
        for proxy in &self.0 {
            proxy.disarm();
        }
    }
}

fn rule() -> Rule {
    Rule::fixed_window(LIMIT, Duration::from_secs(60))
}

fn key() -> StoreKey {
    StoreKey::from_parts([
        b"reply-cut".as_slice(),
        &rand::random::<u64>().to_be_bytes(),
    ])
}

/// What the rule has left for `key`, read on a connection without faults.
async fn remaining<B: RateLimitStore>(store: &B, key: &StoreKey) -> u64 {
    let rules = [rule()];
    let decision: Decision = store
        .check(RateCheck::new(key, &rules, 0, true))
        .await
        .expect("a quota read");
    decision.rules[0].remaining
}

/// Waits past the client's own reconnect and re-send, so that a call re-sent would have run.
async fn settled() {
    tokio::time::sleep(Duration::from_millis(1_500)).await;
}

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call answered (a result or an error) within 5 s")
}

/// Runs `call` with the proxy armed to cut its reply, checks that it did, and waits until
/// anything the client sends again has landed: the call's result.
async fn with_reply_cut<T>(
    proxy: &Proxies,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    proxy.arm();
    let result = bounded(call).await;
    assert!(proxy.fired(), "the reply was not cut");
    proxy.disarm();
    settled().await;
    result
}

/// A check of cost 10 whose reply is cut: charged once or not at all.
async fn check_reply_cut<B: RateLimitStore>(proxied: B, direct: B, proxy: &Proxies, once: bool) {
    let key = key();
    let rules = [rule()];
    assert_eq!(remaining(&direct, &key).await, LIMIT);
    // The script is loaded and the connection made before the fault.
    bounded(proxied.check(RateCheck::new(&key, &rules, 1, true)))
        .await
        .expect("a first check");
    let result = with_reply_cut(proxy, proxied.check(RateCheck::new(&key, &rules, 10, true))).await;
    let left = remaining(&direct, &key).await;
    println!(
        "check with its reply cut: {:?}, {left} left",
        result.is_ok()
    );
    let twice = !once && left == LIMIT - 21;
    assert!(
        left == LIMIT - 1 || left == LIMIT - 11 || twice,
        "a check of 10 was applied more than {}: {left} left of {} before it",
        if once { "once" } else { "twice" },
        LIMIT - 1
    );
}

/// A refund of 8 whose reply is cut: refunded once or not at all, never twice.
async fn refund_reply_cut<B: RateLimitStore>(proxied: B, direct: B, proxy: &Proxies) {
    let key = key();
    let rules = [rule()];
    bounded(proxied.check(RateCheck::new(&key, &rules, 20, true)))
        .await
        .expect("a check of 20");
    assert_eq!(remaining(&direct, &key).await, LIMIT - 20);
    let settlement = RateSettlement::new(&key, &rules, -8, Duration::from_millis(1));
    let result = with_reply_cut(proxy, proxied.settle(settlement)).await;
    let left = remaining(&direct, &key).await;
    println!(
        "refund with its reply cut: {:?}, {left} left",
        result.is_ok()
    );
    assert!(
        left == LIMIT - 20 || left == LIMIT - 12,
        "a refund of 8 was applied more than once: {left} left after 20 taken"
    );
}

/// A lease of 30 whose reply is cut: debited once or not at all.
async fn lease_reply_cut<B: RateLeaseStore>(proxied: B, direct: B, proxy: &Proxies, once: bool) {
    let key = key();
    let rule = rule();
    bounded(proxied.check(RateCheck::new(&key, std::slice::from_ref(&rule), 1, true)))
        .await
        .expect("a first check");
    let lease = RateLease::new(&key, &rule, 30, 30, "replica-a");
    let result = with_reply_cut(proxy, proxied.lease(lease)).await;
    let left = remaining(&direct, &key).await;
    println!(
        "lease with its reply cut: {:?}, {left} left",
        result
            .as_ref()
            .map(|g| matches!(g, LeaseGrant::Granted { .. }))
    );
    let twice = !once && left == LIMIT - 61;
    assert!(
        left == LIMIT - 1 || left == LIMIT - 31 || twice,
        "a lease of 30 was debited more than {}: {left} left of {} before it",
        if once { "once" } else { "twice" },
        LIMIT - 1
    );
}

/// A standalone server behind one proxy.
async fn standalone() -> (RedisServer, Proxies, String, String) {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port).await;
    let (proxied, direct) = (proxy.url(), server.url());
    (server, Proxies(vec![proxy]), proxied, direct)
}

/// A 3-master cluster whose nodes announce their proxies' ports: every client of it, the
/// "direct" one too, reaches the nodes through the proxies (the direct one only reads, after
/// the fault).
async fn cluster() -> (RedisCluster, Proxies, String, String) {
    let cluster = RedisCluster::start();
    let mut proxies = Vec::new();
    for node in &cluster.nodes {
        let proxy = FaultProxy::start(node.port).await;
        let bus = (node.port + 10_000).to_string();
        node.cli(&["CONFIG", "SET", "cluster-announce-bus-port", &bus]);
        node.cli(&[
            "CONFIG",
            "SET",
            "cluster-announce-port",
            &proxy.port.to_string(),
        ]);
        proxies.push(proxy);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let announced = cluster.nodes.iter().all(|node| {
            let slots = node.cli(&["CLUSTER", "SLOTS"]).unwrap_or_default();
            proxies
                .iter()
                .all(|p| slots.lines().any(|l| l.trim() == p.port.to_string()))
        });
        if announced {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the nodes did not announce the proxies' ports"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let nodes: Vec<String> = proxies
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.port))
        .collect();
    let url = format!("redis+cluster://{}", nodes.join(","));
    (cluster, Proxies(proxies), url.clone(), url)
}

macro_rules! client_cases {
    ($module:ident, $feature:literal, $store:path, $env:ident, $once:expr) => {
        #[cfg(feature = $feature)]
        mod $module {
            use super::*;

            async fn stores() -> (impl Sized, Proxies, $store, $store) {
                let (env, proxies, proxied, direct) = $env().await;
                let proxied = <$store>::connect(&proxied).await.expect("connect");
                let direct = <$store>::connect(&direct).await.expect("connect");
                (env, proxies, proxied, direct)
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_check_whose_reply_is_cut_is_charged_at_most_once() {
                let (_env, proxy, proxied, direct) = stores().await;
                check_reply_cut(proxied, direct, &proxy, $once).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_refund_whose_reply_is_cut_is_applied_at_most_once() {
                let (_env, proxy, proxied, direct) = stores().await;
                refund_reply_cut(proxied, direct, &proxy).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_lease_whose_reply_is_cut_is_debited_at_most_once() {
                let (_env, proxy, proxied, direct) = stores().await;
                lease_reply_cut(proxied, direct, &proxy, $once).await;
            }
        }
    };
}

// The last argument: whether a check or a lease is applied at most once (else at most twice).
client_cases!(
    redis_rs,
    "redis",
    tower_redis_layers::store::RedisStore,
    standalone,
    true
);
client_cases!(
    fred,
    "fred",
    tower_redis_layers::store::FredStore,
    standalone,
    false
);
client_cases!(
    redis_rs_cluster,
    "redis",
    tower_redis_layers::store::RedisStore,
    cluster,
    false
);
client_cases!(
    fred_cluster,
    "fred",
    tower_redis_layers::store::FredStore,
    cluster,
    false
);
