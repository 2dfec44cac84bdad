//! A rate-limit call that ran on the server and whose reply was lost (the connection cut after
//! the server answered) is applied at most once, on both clients: a check, a settlement (a
//! refund applied twice would let more through than the limit) and a lease. The client may
//! fail the call or re-send it after it reconnects; the store must not let a re-sent call run a
//! second time on the server.

#![cfg(any(feature = "redis", feature = "fred"))]

mod common;

use std::time::Duration;

use common::{fault_proxy::FaultProxy, RedisServer};
use tower_redis_layers::{
    store::{
        Decision, LeaseGrant, RateCheck, RateLease, RateLeaseStore, RateLimitStore,
        RateSettlement, Rule,
    },
    StoreError, StoreKey,
};

const LIMIT: u64 = 100;

fn rule() -> Rule {
    Rule::fixed_window(LIMIT, Duration::from_secs(60))
}

fn key() -> StoreKey {
    StoreKey::from_parts([b"reply-cut".as_slice(), &rand::random::<u64>().to_be_bytes()])
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

/// A check of cost 10 whose reply is cut: charged once or not at all.
async fn check_reply_cut<B: RateLimitStore>(proxied: B, direct: B, proxy: &FaultProxy) {
    let key = key();
    let rules = [rule()];
    assert_eq!(remaining(&direct, &key).await, LIMIT);
    // The script is loaded and the connection made before the fault.
    bounded(proxied.check(RateCheck::new(&key, &rules, 1, true)))
        .await
        .expect("a first check");
    proxy.cut_next_reply();
    let result = bounded(proxied.check(RateCheck::new(&key, &rules, 10, true))).await;
    assert!(proxy.resets() >= 1, "the reply was not cut");
    settled().await;
    let left = remaining(&direct, &key).await;
    println!("check with its reply cut: {:?}, {left} left", result.is_ok());
    assert!(
        left == LIMIT - 1 || left == LIMIT - 11,
        "a check of 10 was applied more than once: {left} left of {} after it",
        LIMIT - 1
    );
}

/// A refund of 8 whose reply is cut: refunded once or not at all, never twice.
async fn refund_reply_cut<B: RateLimitStore>(proxied: B, direct: B, proxy: &FaultProxy) {
    let key = key();
    let rules = [rule()];
    bounded(proxied.check(RateCheck::new(&key, &rules, 20, true)))
        .await
        .expect("a check of 20");
    assert_eq!(remaining(&direct, &key).await, LIMIT - 20);
    proxy.cut_next_reply();
    let settlement = RateSettlement::new(&key, &rules, -8, Duration::from_millis(1));
    let result = bounded(proxied.settle(settlement)).await;
    assert!(proxy.resets() >= 1, "the reply was not cut");
    settled().await;
    let left = remaining(&direct, &key).await;
    println!("refund with its reply cut: {:?}, {left} left", result.is_ok());
    assert!(
        left == LIMIT - 20 || left == LIMIT - 12,
        "a refund of 8 was applied more than once: {left} left after 20 taken"
    );
}

/// A lease of 30 whose reply is cut: debited once or not at all.
async fn lease_reply_cut<B: RateLeaseStore>(proxied: B, direct: B, proxy: &FaultProxy) {
    let key = key();
    let rule = rule();
    bounded(proxied.check(RateCheck::new(&key, std::slice::from_ref(&rule), 1, true)))
        .await
        .expect("a first check");
    proxy.cut_next_reply();
    let result = bounded(proxied.lease(RateLease::new(&key, &rule, 30, 30, "replica-a"))).await;
    assert!(proxy.resets() >= 1, "the reply was not cut");
    settled().await;
    let left = remaining(&direct, &key).await;
    println!(
        "lease with its reply cut: {:?}, {left} left",
        result.as_ref().map(|g| matches!(g, LeaseGrant::Granted { .. }))
    );
    assert!(
        left == LIMIT - 1 || left == LIMIT - 31,
        "a lease of 30 was debited more than once: {left} left of {} before it",
        LIMIT - 1
    );
}

macro_rules! client_cases {
    ($module:ident, $feature:literal, $store:path) => {
        #[cfg(feature = $feature)]
        mod $module {
            use super::*;

            async fn stores() -> (RedisServer, FaultProxy, $store, $store) {
                let server = RedisServer::start();
                let proxy = FaultProxy::start(server.port).await;
                let proxied = <$store>::connect(&proxy.url()).await.expect("connect");
                let direct = <$store>::connect(&server.url()).await.expect("connect");
                (server, proxy, proxied, direct)
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_check_whose_reply_is_cut_is_charged_at_most_once() {
                let (_server, proxy, proxied, direct) = stores().await;
                check_reply_cut(proxied, direct, &proxy).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_refund_whose_reply_is_cut_is_applied_at_most_once() {
                let (_server, proxy, proxied, direct) = stores().await;
                refund_reply_cut(proxied, direct, &proxy).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_lease_whose_reply_is_cut_is_debited_at_most_once() {
                let (_server, proxy, proxied, direct) = stores().await;
                lease_reply_cut(proxied, direct, &proxy).await;
            }
        }
    };
}

client_cases!(redis_rs, "redis", tower_redis_layers::store::RedisStore);
client_cases!(fred, "fred", tower_redis_layers::store::FredStore);
