//! The Redis stores as Redis is run in production: scripts lost by the server (`SCRIPT FLUSH`, a
//! restart), a server that answers late, on both clients, standalone and on a cluster.
#![cfg(any(feature = "redis", feature = "fred"))]

mod common;

use std::time::Duration;

use common::stores::{store_module, AnyStore, Env};
use tower_redis_layers::{
    store::{LockStore, Override, RateCheck, RateLimitStore, RateSettlement, Rule},
    StoreKey,
};

/// How many scripts the crate runs (rate limit 6, cache 5, lock 3, idempotency 3).
const SCRIPTS: u64 = 17;

fn cached_scripts(env: &Env) -> Vec<u64> {
    env.servers()
        .iter()
        .map(|node| {
            let info = node.cli(&["INFO", "memory"]).unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("number_of_cached_scripts:"))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

fn flush_scripts(env: &Env) {
    for node in env.servers() {
        assert_eq!(node.cli(&["SCRIPT", "FLUSH"]).as_deref(), Some("OK\n"));
    }
}

fn eval_calls(env: &Env) -> u64 {
    env.servers().iter().map(|n| n.command_calls("eval")).sum()
}

async fn remaining(store: &AnyStore, key: &StoreKey, rules: &[Rule]) -> u64 {
    let decision = store
        .check(RateCheck::new(key, rules, 0, true))
        .await
        .expect("a check of the state answers");
    decision.rules[0].remaining
}

async fn admit(store: &AnyStore, key: &StoreKey, rules: &[Rule]) -> bool {
    store
        .check(RateCheck::new(key, rules, 1, false))
        .await
        .expect("the check answers")
        .allowed
}

/// Connecting loads every script on every node (every primary of a cluster), so the first call
/// of each operation finds its script.
async fn connect_loads_every_script(env: Env) {
    let before = cached_scripts(&env);
    assert!(before.iter().all(|&n| n == 0), "fresh servers: {before:?}");
    let _store = env.store().await;
    let after = cached_scripts(&env);
    assert!(
        after.iter().all(|&n| n >= SCRIPTS),
        "every node has every script after connect: {after:?}"
    );
}

/// A server that lost its scripts between two calls (`SCRIPT FLUSH`) still answers every call:
/// the call falls back to `EVAL`, the scripts are loaded again, and the counts stay exact.
async fn script_flush_between_calls(env: Env) {
    let store = env.store().await;
    let rules = [Rule::fixed_window(3, Duration::from_secs(60))];
    let key = StoreKey::from_parts([b"flush".as_slice()]);
    assert!(admit(&store, &key, &rules).await);
    flush_scripts(&env);
    let evals = eval_calls(&env);
    assert!(admit(&store, &key, &rules).await, "second request");
    assert!(eval_calls(&env) > evals, "the call fell back to EVAL");
    all_scripts_reloaded(&env).await;
    flush_scripts(&env);
    assert!(admit(&store, &key, &rules).await, "third request");
    all_scripts_reloaded(&env).await;
    flush_scripts(&env);
    assert!(!admit(&store, &key, &rules).await, "fourth request is over");
    assert_eq!(remaining(&store, &key, &rules).await, 0);
    all_scripts_reloaded(&env).await;
}

/// The rate-limit store's other scripts (a metered settlement, a block and its end, a reset)
/// also answer, exactly, when the server lost them just before; flushes that come while the
/// reload of the previous one runs still end with every script loaded again.
async fn settle_override_and_reset_after_a_flush(env: Env) {
    let store = env.store().await;
    let rules = [Rule::fixed_window(10, Duration::from_secs(60))];
    let key = StoreKey::from_parts([b"flush-admin".as_slice()]);
    let taken = store
        .check(RateCheck::new(&key, &rules, 5, false))
        .await
        .expect("the check answers");
    assert!(taken.allowed);
    flush_scripts(&env);
    store
        .settle(RateSettlement::new(&key, &rules, -3, Duration::ZERO))
        .await
        .expect("the settlement answers after a flush");
    assert_eq!(remaining(&store, &key, &rules).await, 8, "3 refunded");
    flush_scripts(&env);
    store
        .set_override(&key, Some(Override::Block(Duration::from_secs(60))))
        .await
        .expect("the block answers after a flush");
    assert!(!admit(&store, &key, &rules).await, "blocked");
    flush_scripts(&env);
    store
        .set_override(&key, None)
        .await
        .expect("the unblock answers after a flush");
    assert!(admit(&store, &key, &rules).await, "unblocked");
    flush_scripts(&env);
    store
        .reset(&key, &rules)
        .await
        .expect("the reset answers after a flush");
    assert_eq!(remaining(&store, &key, &rules).await, 10, "reset");
    all_scripts_reloaded(&env).await;
}

/// Waits until the reload after a `NOSCRIPT` put every script back on every node.
async fn all_scripts_reloaded(env: &Env) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while cached_scripts(env).iter().any(|&n| n < SCRIPTS) {
        let counts = cached_scripts(env);
        assert!(
            tokio::time::Instant::now() < deadline,
            "scripts reloaded: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call whose caller stopped waiting (the layer's store timeout) while the server was stalled,
/// and whose script the server had lost, still lands: the `NOSCRIPT` answer arrives after the
/// caller left, and the fallback runs anyway, as the `EVALSHA` would have (here a lock taken by
/// a caller that gave up holds; a rate-limit check is the exception, given up with its caller).
async fn noscript_fallback_after_the_caller_left(env: Env) {
    let store = env.store().await;
    let lease = Duration::from_secs(60);
    let key = StoreKey::from_parts([b"late".as_slice()]);
    flush_scripts(&env);
    for node in env.servers() {
        assert_eq!(
            node.cli(&["CLIENT", "PAUSE", "600", "ALL"]).as_deref(),
            Some("OK\n")
        );
    }
    let late = tokio::time::timeout(
        Duration::from_millis(100),
        store.acquire_lock(&key, "a", lease),
    )
    .await;
    assert!(late.is_err(), "the caller stopped waiting");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let other = store.acquire_lock(&key, "b", lease).await.expect("answers");
    assert_eq!(
        other, None,
        "the abandoned acquire landed: the lock is held"
    );
}

/// The scenarios on every Redis store (the memory store has no server to lose scripts).
macro_rules! redis_stores {
    ($($name:ident),* $(,)?) => {
        store_module!(redis, redis, "redis", $($name),*);
        store_module!(fred, fred, "fred", $($name),*);
        store_module!(redis_cluster, redis_cluster, "redis", $($name),*);
        store_module!(fred_cluster, fred_cluster, "fred", $($name),*);
    };
}

redis_stores!(
    connect_loads_every_script,
    script_flush_between_calls,
    settle_override_and_reset_after_a_flush,
    noscript_fallback_after_the_caller_left
);

/// The warnings a store logs while it connects (the test runs on one thread, so the subscriber
/// sees the connect future's events).
mod warnings {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    #[derive(Clone, Default)]
    pub struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        pub fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `connect` with the warnings captured, and returns them.
    pub async fn during<F: std::future::Future>(connect: F) -> (F::Output, Vec<String>) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        let out = connect.await;
        drop(guard);
        (out, captured.lines())
    }
}

/// Connects the client named by `client` ("redis" or "fred") to `url`.
async fn connect(client: &str, url: &str) -> Result<AnyStore, tower_redis_layers::StoreError> {
    match client {
        #[cfg(feature = "redis")]
        "redis" => tower_redis_layers::store::RedisStore::connect(url)
            .await
            .map(AnyStore::Redis),
        #[cfg(feature = "fred")]
        "fred" => tower_redis_layers::store::FredStore::connect(url)
            .await
            .map(AnyStore::Fred),
        other => panic!("client {other} not compiled in"),
    }
}

fn set(server: &common::RedisServer, name: &str, value: &str) {
    assert_eq!(
        server.cli(&["CONFIG", "SET", name, value]).as_deref(),
        Some("OK\n"),
        "CONFIG SET {name} {value}"
    );
}

/// Every eviction policy but `noeviction` is warned about (each of the crate's keys has a TTL,
/// so `volatile-*` evicts them too), and so is a server without an append-only file.
async fn warns_for_eviction_and_no_aof(client: &str) {
    let server = common::RedisServer::start();
    for policy in [
        "allkeys-lru",
        "allkeys-lfu",
        "allkeys-random",
        "volatile-lru",
        "volatile-lfu",
        "volatile-random",
        "volatile-ttl",
    ] {
        set(&server, "maxmemory-policy", policy);
        let (store, lines) = warnings::during(connect(client, &server.url())).await;
        store.expect("connects");
        let evict = lines.iter().filter(|l| l.contains("may evict")).count();
        assert_eq!(evict, 1, "{client} {policy}: {lines:?}");
        assert!(lines.iter().any(|l| l.contains(policy)), "{lines:?}");
        assert!(
            lines.iter().any(|l| l.contains("no append-only file")),
            "{client}: {lines:?}"
        );
    }
    set(&server, "maxmemory-policy", "noeviction");
    set(&server, "appendonly", "yes");
    let (store, lines) = warnings::during(connect(client, &server.url())).await;
    store.expect("connects");
    assert!(lines.is_empty(), "{client}: noeviction with AOF: {lines:?}");
}

/// On a cluster, every node is checked.
async fn warns_for_every_cluster_node(client: &str) {
    let cluster = common::RedisCluster::start();
    for node in &cluster.nodes {
        set(node, "maxmemory-policy", "volatile-lru");
    }
    let (store, lines) = warnings::during(connect(client, &cluster.url())).await;
    store.expect("connects");
    let evict = lines.iter().filter(|l| l.contains("may evict")).count();
    assert_eq!(evict, 3, "{client}: {lines:?}");
    for node in &cluster.nodes {
        let port = format!(":{}", node.port);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("may evict") && l.contains(&port)),
            "{client}: node {port} named: {lines:?}"
        );
    }
}

/// A server with a password, reached without it (or with a wrong one), refuses at connect with a
/// clear error; with the password in the URL the store connects.
async fn requirepass_refused_at_connect(client: &str) {
    let server = common::RedisServer::start();
    set(&server, "requirepass", "s3cret");
    let url = server.url();
    let err = connect(client, &url).await.expect_err("no password");
    assert!(
        matches!(err, tower_redis_layers::StoreError::Refused(ref m) if m.contains("NOAUTH")),
        "{client}: {err}"
    );
    assert!(err.to_string().contains("password in the URL"), "{err}");
    let wrong = url.replace("redis://", "redis://:wrong@");
    let err = connect(client, &wrong).await.expect_err("wrong password");
    assert!(
        matches!(err, tower_redis_layers::StoreError::Refused(_)),
        "{client}: {err}"
    );
    let right = url.replace("redis://", "redis://:s3cret@");
    connect(client, &right)
        .await
        .expect("the password in the URL");
}

/// An ACL user without the scripting commands is refused at connect.
async fn acl_user_without_scripts_refused_at_connect(client: &str) {
    let server = common::RedisServer::start();
    let user = [
        "ACL",
        "SETUSER",
        "app",
        "on",
        ">pw",
        "~*",
        "+@all",
        "-@scripting",
    ];
    assert_eq!(server.cli(&user).as_deref(), Some("OK\n"));
    let url = server.url().replace("redis://", "redis://app:pw@");
    let err = connect(client, &url).await.expect_err("no scripting");
    assert!(
        matches!(err, tower_redis_layers::StoreError::Refused(ref m)
            if m.to_ascii_uppercase().contains("NOPERM")),
        "{client}: {err}"
    );
}

/// An ACL user allowed every command but no key under the crate's prefix is refused at connect
/// (the store probes a key under its prefix), not on every call later.
async fn acl_user_without_key_rights_refused_at_connect(client: &str) {
    let server = common::RedisServer::start();
    let user = ["ACL", "SETUSER", "app", "on", ">pw", "~other:*", "+@all"];
    assert_eq!(server.cli(&user).as_deref(), Some("OK\n"));
    let url = server.url().replace("redis://", "redis://app:pw@");
    let err = connect(client, &url).await.expect_err("no rights to trl:*");
    assert!(
        matches!(err, tower_redis_layers::StoreError::Refused(ref m)
            if m.to_ascii_uppercase().contains("NOPERM")),
        "{client}: {err}"
    );
    let user = ["ACL", "SETUSER", "app", "~trl:*"];
    assert_eq!(server.cli(&user).as_deref(), Some("OK\n"));
    connect(client, &url).await.expect("rights to trl:*");
}

/// One cluster URL with the password, `redis+cluster://:password@a,b,c`, works for both clients
/// (the password applies to every node); without it, connect is refused.
async fn cluster_url_with_password(client: &str) {
    let cluster = common::RedisCluster::start();
    let url = cluster.url();
    for node in &cluster.nodes {
        set(node, "requirepass", "s3cret");
    }
    let err = connect(client, &url).await.expect_err("no password");
    assert!(
        matches!(err, tower_redis_layers::StoreError::Refused(_)),
        "{client}: {err}"
    );
    let with_password = url.replace("redis+cluster://", "redis+cluster://:s3cret@");
    let store = connect(client, &with_password)
        .await
        .unwrap_or_else(|e| panic!("{client}: {with_password}: {e}"));
    let rules = [Rule::fixed_window(2, Duration::from_secs(60))];
    for i in 0..20u8 {
        let key = StoreKey::from_parts([b"password".as_slice(), &[i]]);
        assert!(admit(&store, &key, &rules).await, "{client}: key {i}");
    }
}

/// A full server (`maxmemory` reached under `noeviction`, so every write is refused) never turns a
/// deny into an allow: a key at its limit is denied without a write, for every strategy; a key
/// under its limit fails (and the layer applies its failure mode).
async fn full_server_keeps_denying_at_limit(client: &str) {
    let server = common::RedisServer::start();
    set(&server, "maxmemory-policy", "noeviction");
    let store = connect(client, &server.url()).await.expect("connects");
    let minute = Duration::from_secs(60);
    let strategies = [
        Rule::fixed_window(2, minute),
        Rule::sliding_log(2, minute),
        Rule::sliding_window(2, minute),
        Rule::token_bucket(2, 1, minute),
        Rule::gcra(2, minute, 2),
    ];
    for (i, rule) in strategies.iter().enumerate() {
        let rules = std::slice::from_ref(rule);
        let key = StoreKey::from_parts([b"full".as_slice(), &[i as u8]]);
        while admit(&store, &key, rules).await {}
    }
    let several = [Rule::fixed_window(2, minute), Rule::gcra(100, minute, 100)];
    let several_key = StoreKey::from_parts([b"full-several".as_slice()]);
    while admit(&store, &several_key, &several).await {}

    set(&server, "maxmemory", "1");
    for (i, rule) in strategies.iter().enumerate() {
        let rules = std::slice::from_ref(rule);
        let key = StoreKey::from_parts([b"full".as_slice(), &[i as u8]]);
        for want_state in [false, true] {
            let decision = store
                .check(RateCheck::new(&key, rules, 1, want_state))
                .await
                .unwrap_or_else(|e| panic!("{client} {rule:?}: a full server still denies: {e}"));
            assert!(!decision.allowed, "{client} {rule:?}");
        }
    }
    let decision = store
        .check(RateCheck::new(&several_key, &several, 1, false))
        .await
        .expect("several rules: a full server still denies");
    assert!(!decision.allowed);
    let fresh = StoreKey::from_parts([b"full-fresh".as_slice()]);
    let err = store
        .check(RateCheck::new(&fresh, &strategies[..1], 1, false))
        .await
        .expect_err("a key under its limit cannot be counted on a full server");
    assert!(err.to_string().contains("OOM"), "{client}: {err}");
    set(&server, "maxmemory", "0");
}

/// A store given a client timeout longer than the default 2 s (for a layer whose `store_timeout`
/// is longer): a call the server answers after 2.5 s succeeds, where 2 s would have cut it.
async fn client_timeout_is_the_stores(client: &str) {
    let server = common::RedisServer::start();
    let url = server.url();
    let timeout = Duration::from_secs(4);
    let store = match client {
        #[cfg(feature = "redis")]
        "redis" => tower_redis_layers::store::RedisStore::connect_with_timeout(&url, timeout)
            .await
            .map(AnyStore::Redis),
        #[cfg(feature = "fred")]
        "fred" => tower_redis_layers::store::FredStore::connect_with_timeout(&url, timeout)
            .await
            .map(AnyStore::Fred),
        other => panic!("client {other} not compiled in"),
    }
    .expect("connects");
    let rules = [Rule::fixed_window(5, Duration::from_secs(60))];
    let key = StoreKey::from_parts([b"slow".as_slice()]);
    assert!(admit(&store, &key, &rules).await);
    server.pause();
    let resume = async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        server.resume();
    };
    let (decision, ()) = tokio::join!(store.check(RateCheck::new(&key, &rules, 1, false)), resume);
    let decision = decision.unwrap_or_else(|e| panic!("{client}: answered after 2.5 s: {e}"));
    assert!(decision.allowed);
}

/// fred loads every script again when it connects again to a restarted server, before any call
/// (redis-rs has no reconnect hook: its first call after a restart falls back to `EVAL`).
#[cfg(feature = "fred")]
#[tokio::test]
async fn fred_reloads_scripts_on_reconnect() {
    let mut server = common::RedisServer::start();
    let _store = connect("fred", &server.url()).await.expect("connects");
    server.restart();
    let cached = |server: &common::RedisServer| -> u64 {
        let info = server.cli(&["INFO", "memory"]).unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("number_of_cached_scripts:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cached(&server) < SCRIPTS {
        assert!(
            std::time::Instant::now() < deadline,
            "scripts after the reconnect: {}",
            cached(&server)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

macro_rules! per_client {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "redis")]
        mod redis_rs {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name("redis").await;
                }
            )*
        }
        #[cfg(feature = "fred")]
        mod fred_client {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name("fred").await;
                }
            )*
        }
    };
}

per_client!(
    warns_for_eviction_and_no_aof,
    warns_for_every_cluster_node,
    requirepass_refused_at_connect,
    acl_user_without_scripts_refused_at_connect,
    full_server_keeps_denying_at_limit,
    client_timeout_is_the_stores,
    acl_user_without_key_rights_refused_at_connect,
    cluster_url_with_password
);
