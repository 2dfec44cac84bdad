//! Redis Cluster slots that move while the stores are in use: a slot migrated by hand and held
//! in MIGRATING / IMPORTING (`ASK` redirections, `TRYAGAIN` for multi-key calls), handed over
//! (`MOVED`), and `redis-cli --cluster reshard`, on both clients.
//!
//! Run with `--nocapture` for the figures (admitted against the limit, errors, time to recover).
#![cfg(any(feature = "redis", feature = "fred"))]

mod common;

use std::time::{Duration, Instant};

use common::stores::{AnyStore, Env};
use tower_redis_layers::{
    store::{Claim, ClaimRequest, IdempotencyStore, RateCheck, RateLimitStore, Rule},
    StoreKey,
};

async fn admit(store: &AnyStore, key: &StoreKey, rules: &[Rule]) -> bool {
    store
        .check(RateCheck::new(key, rules, 1, false))
        .await
        .expect("the check answers")
        .allowed
}

/// Connects the client named by `client` ("redis" or "fred") to `url`.
async fn connect(client: &str, url: &str) -> AnyStore {
    match client {
        #[cfg(feature = "redis")]
        "redis" => tower_redis_layers::store::RedisStore::connect(url)
            .await
            .map(AnyStore::Redis)
            .expect("connects"),
        #[cfg(feature = "fred")]
        "fred" => tower_redis_layers::store::FredStore::connect(url)
            .await
            .map(AnyStore::Fred)
            .expect("connects"),
        other => panic!("client {other} not compiled in"),
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
    tryagain_is_retried,
    slot_migration_held_for_three_seconds,
    reshard_under_traffic
);

/// A multi-key call whose slot is migrating with its keys split between the two nodes gets
/// `TRYAGAIN`; the store tries again (within its bounds) and the call succeeds once the keys are
/// together and the slot handed over, here 800 ms later (longer than the client's own retries,
/// about 500 ms for redis-rs). A check's keys include the key's override, which does not exist
/// (no node has it), so its keys are never all on one node before the hand-over.
async fn tryagain_is_retried(client: &str) {
    let cluster = common::RedisCluster::start();
    let store = connect(client, &cluster.url()).await;
    let minute = Duration::from_secs(60);
    let two = [
        Rule::sliding_window(10, minute),
        Rule::token_bucket(10, 1, minute),
    ];
    let key = StoreKey::from_parts([b"tryagain".as_slice()]);
    assert!(admit(&store, &key, &two).await);
    let env = Env::RedisCluster(cluster);
    let keys: Vec<String> = env.keys("trl:*").into_iter().map(|(_, k)| k).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let Env::RedisCluster(cluster) = env else {
        unreachable!()
    };
    let migration = migration::Migration::start(&cluster, &keys[0]);
    migration.migrate(&keys[..1]);
    let check = store.check(RateCheck::new(&key, &two, 1, false));
    let rest = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        migration.migrate(&keys[1..]);
        migration.finish();
    };
    let (decision, ()) = tokio::join!(check, rest);
    let decision = decision.unwrap_or_else(|e| panic!("{client}: TRYAGAIN retried: {e}"));
    assert!(decision.allowed);
    let decision = store
        .check(RateCheck::new(&key, &two, 0, true))
        .await
        .expect("after the hand-over");
    assert_eq!(
        decision.rules[0].remaining, 8,
        "{client}: both requests counted once"
    );
}

/// A slot migrated by hand on a 3-master cluster: `CLUSTER SETSLOT .. IMPORTING / MIGRATING`,
/// keys moved with `MIGRATE` one by one, the slot held for 3 s, then handed over.
mod migration {
    use std::time::Instant;

    use super::common::{RedisCluster, RedisServer};

    fn cli(node: &RedisServer, args: &[&str]) -> String {
        node.cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?}"))
            .trim()
            .to_owned()
    }

    /// One hand-made migration of `slot` from the node that owns it to another.
    pub struct Migration<'a> {
        pub source: &'a RedisServer,
        pub target: &'a RedisServer,
        others: Vec<&'a RedisServer>,
        slot: String,
        target_id: String,
    }

    /// The id of `node` in the cluster.
    pub fn node_id(node: &RedisServer) -> String {
        cli(node, &["CLUSTER", "MYID"])
    }

    impl<'a> Migration<'a> {
        /// Puts `slot` (of `key`) in MIGRATING on its owner and IMPORTING on another node.
        pub fn start(cluster: &'a RedisCluster, key: &str) -> Self {
            let first = &cluster.nodes[0];
            let slot = cli(first, &["CLUSTER", "KEYSLOT", key]);
            let owner = |n: &&RedisServer| cli(n, &["CLUSTER", "COUNTKEYSINSLOT", &slot]) != "0";
            let source = cluster
                .nodes
                .iter()
                .find(owner)
                .expect("a node holds the key");
            let target = cluster
                .nodes
                .iter()
                .find(|n| n.port != source.port)
                .expect("another node");
            let others = cluster
                .nodes
                .iter()
                .filter(|n| n.port != source.port && n.port != target.port)
                .collect();
            let source_id = cli(source, &["CLUSTER", "MYID"]);
            let target_id = cli(target, &["CLUSTER", "MYID"]);
            let ok = |s: String| assert_eq!(s, "OK");
            ok(cli(
                target,
                &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id],
            ));
            ok(cli(
                source,
                &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id],
            ));
            Self {
                source,
                target,
                others,
                slot,
                target_id,
            }
        }

        /// The slot that moves.
        pub fn slot(&self) -> u16 {
            self.slot.parse().expect("a slot number")
        }

        /// The keys still on the source node.
        pub fn remaining_keys(&self) -> Vec<String> {
            cli(
                self.source,
                &["CLUSTER", "GETKEYSINSLOT", &self.slot, "1000"],
            )
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
        }

        /// Moves `keys` to the target node.
        pub fn migrate(&self, keys: &[String]) {
            let port = self.target.port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let reply = cli(self.source, &args);
            assert!(reply == "OK" || reply == "NOKEY", "MIGRATE: {reply}");
        }

        /// Moves what is left and gives the slot to the target on every node.
        pub fn finish(self) -> Instant {
            let keys = self.remaining_keys();
            if !keys.is_empty() {
                self.migrate(&keys);
            }
            let node = ["CLUSTER", "SETSLOT", &self.slot, "NODE", &self.target_id];
            for n in [self.target, self.source].into_iter().chain(self.others) {
                assert_eq!(cli(n, &node), "OK");
            }
            Instant::now()
        }
    }
}

/// What bursts of checks against two clients saw.
#[derive(Debug, Default)]
struct Tally {
    admitted: u64,
    denied: u64,
    errors: u64,
    first_error: Option<String>,
}

/// A burst of `n` concurrent checks, spread over the stores.
async fn burst(stores: &[AnyStore], key: &StoreKey, rules: &[Rule], n: usize, tally: &mut Tally) {
    burst_waiting(stores, key, rules, n, WAIT, tally).await;
}

/// How long a call may take during the tests (as a layer's `store_timeout` of 1 s would), and
/// while waiting for the recovery (as the rate-limit layer's default of 250 ms would).
const WAIT: Duration = Duration::from_secs(1);
const RECOVERY_WAIT: Duration = Duration::from_millis(250);

/// [`burst`], each call waited for `wait` at most.
async fn burst_waiting(
    stores: &[AnyStore],
    key: &StoreKey,
    rules: &[Rule],
    n: usize,
    wait: Duration,
    tally: &mut Tally,
) {
    let calls = (0..n).map(|i| {
        let store = stores[i % stores.len()].clone();
        let key = *key;
        let rules = rules.to_vec();
        async move {
            let check = RateCheck::new(&key, &rules, 1, false);
            tokio::time::timeout(wait, store.check(check)).await
        }
    });
    for result in futures_util::future::join_all(calls).await {
        match result {
            Ok(Ok(d)) if d.allowed => tally.admitted += 1,
            Ok(Ok(_)) => tally.denied += 1,
            Ok(Err(e)) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e.to_string());
            }
            Err(_) => {
                tally.errors += 1;
                tally.first_error.get_or_insert("timeout".into());
            }
        }
    }
}

/// The hash slot of a key whose hash tag is `tag` (CRC16/XMODEM modulo 16384, as Redis Cluster).
fn slot_of(tag: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in tag {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// `n` idempotency keys (orders) whose records live in `slot`.
fn orders_in(slot: u16, n: usize) -> Vec<StoreKey> {
    (0u64..)
        .map(|i| StoreKey::from_parts([b"order".as_slice(), &i.to_be_bytes()]))
        .filter(|key| slot_of(key.to_hex().as_bytes()) == slot)
        .take(n)
        .collect()
}

/// What the orders saw: how many services ran each, and the failed claims.
#[derive(Debug, Default)]
struct Orders {
    /// For each order, the services (0 or 1) that ran it.
    ran: Vec<Vec<usize>>,
    errors: u64,
}

impl Orders {
    fn new(n: usize) -> Self {
        Self {
            ran: vec![Vec::new(); n],
            errors: 0,
        }
    }

    fn ran_twice(&self) -> usize {
        self.ran
            .iter()
            .filter(|services| services.len() > 1)
            .count()
    }
}

/// Each service claims every order at once (one token per service and order, as a client
/// retrying the same request would send): a service that gets the claim runs the order and
/// completes the record.
async fn order_round(stores: &[AnyStore], orders: &[StoreKey], wait: Duration, tally: &mut Orders) {
    let calls = orders.iter().enumerate().flat_map(|(i, key)| {
        stores.iter().enumerate().map(move |(s, store)| {
            let store = store.clone();
            let key = *key;
            async move {
                let token = format!("service{s}-order{i}");
                let minute = Duration::from_secs(60);
                let claim = ClaimRequest::new(&token, b"body", Duration::from_secs(5), minute);
                let claimed = tokio::time::timeout(wait, store.claim(&key, claim)).await;
                match claimed {
                    Ok(Ok(Claim::Claimed { .. })) => {
                        let done = store.complete(&key, &token, b"done".to_vec(), minute);
                        let _ = tokio::time::timeout(wait, done).await;
                        (i, s, Some(true))
                    }
                    Ok(Ok(_)) => (i, s, Some(false)),
                    _ => (i, s, None),
                }
            }
        })
    });
    for (i, s, outcome) in futures_util::future::join_all(calls).await {
        match outcome {
            Some(true) if !tally.ran[i].contains(&s) => tally.ran[i].push(s),
            Some(_) => {}
            None => tally.errors += 1,
        }
    }
}

/// The rules of the tests: one (one key) and two (two keys, so that a migration splits them).
fn rules(limit: u64) -> ([Rule; 1], [Rule; 2]) {
    let minute = Duration::from_secs(60);
    (
        [Rule::fixed_window(limit, minute)],
        [
            Rule::sliding_window(limit, minute),
            Rule::token_bucket(limit, 1, minute),
        ],
    )
}

/// Bursts of 10 single- and multi-key checks and a round of orders, each call waited for 250 ms,
/// until every call answers: how long after `since` the calls that all answered were sent, or
/// `None` after 10 s.
async fn recovery(
    stores: &[AnyStore],
    key: &StoreKey,
    limit: u64,
    orders: &[StoreKey],
    since: Instant,
) -> Option<Duration> {
    let (one, two) = rules(limit);
    while since.elapsed() < Duration::from_secs(10) {
        let (mut t, mut m) = (Tally::default(), Tally::default());
        let mut o = Orders::new(orders.len());
        let round = Instant::now();
        tokio::join!(
            burst_waiting(stores, key, &one, 10, RECOVERY_WAIT, &mut t),
            burst_waiting(stores, key, &two, 10, RECOVERY_WAIT, &mut m),
            order_round(stores, orders, RECOVERY_WAIT, &mut o),
        );
        if t.errors == 0 && m.errors == 0 && o.errors == 0 {
            return Some(round.duration_since(since));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A slot holding keys in use (a rate-limit key of one and two rules, idempotency records) is
/// migrated by hand and held in MIGRATING / IMPORTING for 3 s while two services send bursts of
/// 100 concurrent checks at one key and claim the same orders, the keys moved one at a time
/// (`ASK`, and `TRYAGAIN` while a multi-key call's keys are split), then handed over (`MOVED`):
/// never more admitted than the limit, no order run twice, and every call answers again within
/// one second of the hand-over.
async fn slot_migration_held_for_three_seconds(client: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = common::RedisCluster::start();
    let url = cluster.url();
    let stores = [connect(client, &url).await, connect(client, &url).await];
    let limit = 150;
    let key = StoreKey::from_parts([b"migrating".as_slice()]);
    let (one, two) = rules(limit);
    let mut single = Tally::default();
    let mut multi = Tally::default();
    burst(&stores, &key, &one, 10, &mut single).await;
    burst(&stores, &key, &two, 10, &mut multi).await;
    let sample = Env::RedisCluster(cluster);
    let keys: Vec<String> = sample.keys("trl:*").into_iter().map(|(_, k)| k).collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    let Env::RedisCluster(cluster) = sample else {
        unreachable!()
    };
    let migration = migration::Migration::start(&cluster, &keys[0]);
    let orders = orders_in(migration.slot(), 8);
    let mut ran = Orders::new(orders.len());
    let started = Instant::now();
    let mut moved = 0;
    while started.elapsed() < Duration::from_secs(3) {
        tokio::join!(
            burst(&stores, &key, &one, 100, &mut single),
            burst(&stores, &key, &two, 100, &mut multi),
            order_round(&stores, &orders, WAIT, &mut ran),
        );
        let left = migration.remaining_keys();
        if moved < 6 && !left.is_empty() && started.elapsed() > Duration::from_millis(200) {
            migration.migrate(&left[..1]);
            moved += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let handed_over = migration.finish();
    tracing::warn!("handed over");
    let recovered = recovery(&stores, &key, limit, &orders, handed_over).await;
    println!(
        "{client} migration held 3 s: single-key {single:?}, multi-key {multi:?} (limit \
         {limit} each); orders run twice {}, failed claims {}; every call answered {recovered:?} \
         after the hand-over",
        ran.ran_twice(),
        ran.errors
    );
    assert!(single.admitted <= limit, "{client}: single {single:?}");
    assert!(multi.admitted <= limit, "{client}: multi {multi:?}");
    assert_eq!(ran.ran_twice(), 0, "{client}: {ran:?}");
    let recovered = recovered.unwrap_or_else(|| panic!("{client}: no recovery"));
    assert!(
        recovered < Duration::from_secs(1),
        "{client}: {recovered:?}"
    );
}

/// `redis-cli --cluster reshard` moves every slot of the node that holds a key in use to another
/// node while two services send bursts at it: the same guarantees as a migration by hand.
async fn reshard_under_traffic(client: &str) {
    let cluster = common::RedisCluster::start();
    let url = cluster.url();
    let stores = [connect(client, &url).await, connect(client, &url).await];
    let limit = 400;
    let key = StoreKey::from_parts([b"resharded".as_slice()]);
    let (one, two) = rules(limit);
    let mut single = Tally::default();
    let mut multi = Tally::default();
    burst(&stores, &key, &one, 10, &mut single).await;
    let slot = slot_of(key.to_hex().as_bytes());
    let orders = orders_in(slot, 4);
    let owner = cluster
        .nodes
        .iter()
        .find(|n| {
            let slot = slot.to_string();
            n.cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot])
                .is_some_and(|c| c.trim() != "0")
        })
        .expect("a node holds the key");
    let target = cluster
        .nodes
        .iter()
        .find(|n| n.port != owner.port)
        .expect("another node");
    let (from, to) = (migration::node_id(owner), migration::node_id(target));
    let entry = format!("127.0.0.1:{}", owner.port);
    let reshard = std::thread::spawn(move || {
        let args = [
            "--cluster",
            "reshard",
            &entry,
            "--cluster-from",
            &from,
            "--cluster-to",
            &to,
            "--cluster-slots",
            "5461",
            "--cluster-yes",
        ];
        std::process::Command::new("redis-cli")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let mut ran = Orders::new(orders.len());
    let started = Instant::now();
    while !reshard.is_finished() && started.elapsed() < Duration::from_secs(60) {
        burst(&stores, &key, &one, 100, &mut single).await;
        burst(&stores, &key, &two, 100, &mut multi).await;
        order_round(&stores, &orders, WAIT, &mut ran).await;
    }
    let resharded = reshard.join().expect("the reshard thread");
    let done = Instant::now();
    let recovered = recovery(&stores, &key, limit, &orders, done).await;
    println!(
        "{client} reshard ({:?}): single-key {single:?}, multi-key {multi:?} (limit {limit} \
         each); orders run twice {}, failed claims {}; every call answered {recovered:?} after",
        started.elapsed(),
        ran.ran_twice(),
        ran.errors
    );
    assert!(resharded, "redis-cli --cluster reshard failed");
    assert!(single.admitted <= limit, "{client}: single {single:?}");
    assert!(multi.admitted <= limit, "{client}: multi {multi:?}");
    assert_eq!(ran.ran_twice(), 0, "{client}: {ran:?}");
    let recovered = recovered.unwrap_or_else(|| panic!("{client}: no recovery"));
    assert!(
        recovered < Duration::from_secs(1),
        "{client}: {recovered:?}"
    );
}
