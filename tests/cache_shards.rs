//! The cache's default segment spread over shards on a 3-master cluster, per client: the
//! entries of one segment land on several slots and nodes, an invalidation of the segment still
//! removes every entry, and a slot held in MIGRATING affects only the entries of that slot (the
//! others keep hitting).
//!
//! Run with `--nocapture` for the figures (entries per node, hits during the migration).
#![cfg(any(feature = "redis", feature = "fred"))]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::{Request, Response};
use http_body_util::Full;
use tower::{service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};

use common::{stores::AnyStore, RedisCluster, RedisServer};
use tower_redis_layers::{
    cache::{CacheHandle, CacheLayer},
    ResponseBody,
};

/// How many entries the segment holds.
const ENTRIES: usize = 1000;

type Svc = BoxCloneService<Request<Full<Bytes>>, Response<ResponseBody<Full<Bytes>>>, Infallible>;

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

/// A cached service on the layer's default segment (16 shards), counting its handler's runs.
fn service(store: AnyStore, runs: Arc<AtomicUsize>) -> (Svc, CacheHandle) {
    let layer = CacheLayer::new(store)
        .scope("shards")
        .ttl(Duration::from_secs(300));
    let handle = layer.handle();
    let inner = service_fn(move |req: Request<Full<Bytes>>| {
        runs.fetch_add(1, Ordering::SeqCst);
        let body = Bytes::from(req.uri().path().to_owned());
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    });
    (
        BoxCloneService::new(ServiceBuilder::new().layer(layer).service(inner)),
        handle,
    )
}

/// Requests every entry (20 at a time): the entries that were hits.
async fn pass(svc: &Svc) -> BTreeSet<usize> {
    stream::iter(0..ENTRIES)
        .map(|i| {
            let svc = svc.clone();
            async move {
                let req = Request::get(format!("/items/{i}"))
                    .header("host", "example.com")
                    .body(Full::default())
                    .unwrap();
                let res = svc.oneshot(req).await.unwrap();
                let status = res.headers()["cache-status"].to_str().unwrap().to_owned();
                status.ends_with("; hit").then_some(i)
            }
        })
        .buffer_unordered(20)
        .filter_map(|hit| async move { hit })
        .collect()
        .await
}

/// Passes until every entry hits in one (a call that timed out on this busy machine is stored
/// again by the next pass), at most 5: how many passes it took.
async fn until_all_hit(svc: &Svc, client: &str) -> usize {
    for passes in 1..=5 {
        if pass(svc).await.len() == ENTRIES {
            return passes;
        }
    }
    panic!("{client}: some entries never hit");
}

fn cli(node: &RedisServer, args: &[&str]) -> String {
    node.cli(args)
        .unwrap_or_else(|| panic!("redis-cli {args:?}"))
        .trim()
        .to_owned()
}

/// The cache entries on each node, by slot.
fn entries_by_node(cluster: &RedisCluster) -> Vec<(u16, BTreeMap<u16, usize>)> {
    cluster
        .nodes
        .iter()
        .map(|node| {
            let mut slots = BTreeMap::new();
            for key in cli(node, &["KEYS", "*:c:{*}:e:*"]).lines() {
                let slot: u16 = cli(node, &["CLUSTER", "KEYSLOT", key]).parse().unwrap();
                *slots.entry(slot).or_insert(0) += 1;
            }
            (node.port, slots)
        })
        .collect()
}

async fn spread_over_slots(client: &str) {
    let cluster = RedisCluster::start();
    let runs = Arc::new(AtomicUsize::new(0));
    let (svc, handle) = service(connect(client, &cluster.url()).await, runs.clone());
    assert!(pass(&svc).await.is_empty());
    assert!(runs.load(Ordering::SeqCst) >= ENTRIES);
    until_all_hit(&svc, client).await;

    // One segment, on several slots and every node.
    let by_node = entries_by_node(&cluster);
    let slots: BTreeSet<u16> = by_node
        .iter()
        .flat_map(|(_, s)| s.keys().copied())
        .collect();
    let total: usize = by_node.iter().flat_map(|(_, s)| s.values()).sum();
    assert_eq!(total, ENTRIES);
    for (port, slots) in &by_node {
        println!(
            "{client}: node {port}: {} entries in {} slots",
            slots.values().sum::<usize>(),
            slots.len()
        );
    }
    assert_eq!(slots.len(), 16, "{client}: one slot per shard");
    // The shards' slots are spread evenly over the slot space, and each node owns a third of
    // it: 5 or 6 shards, about a third of the entries, on each.
    for (port, slots) in &by_node {
        let entries: usize = slots.values().sum();
        assert!(
            slots.len() >= 5 && entries >= ENTRIES / 5,
            "{client}: node {port} holds {entries} entries in {} slots",
            slots.len()
        );
    }

    // The slot with the most entries held in MIGRATING (nothing moved, then half its keys
    // moved): only its entries miss.
    let (owner, slot, in_slot) = by_node
        .iter()
        .flat_map(|(port, s)| s.iter().map(move |(slot, n)| (*port, *slot, *n)))
        .max_by_key(|(_, _, n)| *n)
        .unwrap();
    let source = cluster.nodes.iter().find(|n| n.port == owner).unwrap();
    let target = cluster.nodes.iter().find(|n| n.port != owner).unwrap();
    let slot_arg = slot.to_string();
    let source_id = cli(source, &["CLUSTER", "MYID"]);
    let target_id = cli(target, &["CLUSTER", "MYID"]);
    let setslot = |node: &RedisServer, state: &str, id: &str| {
        assert_eq!(
            cli(node, &["CLUSTER", "SETSLOT", &slot_arg, state, id]),
            "OK"
        );
    };
    setslot(target, "IMPORTING", &source_id);
    setslot(source, "MIGRATING", &target_id);
    // The slot held: two passes with nothing moved yet (lookups in the slot get `TRYAGAIN`:
    // their lock key is missing), two with half its keys moved (`ASK`, then `TRYAGAIN` on the
    // importing node). An entry that hit in either pass of a phase counts (a lookup outside the
    // slot may time out on this busy machine).
    let held = Instant::now();
    let phase = |label: &'static str| {
        let svc = svc.clone();
        async move {
            let (a, b) = (pass(&svc).await, pass(&svc).await);
            let hit: BTreeSet<usize> = a.union(&b).copied().collect();
            println!(
                "{client}: slot {slot} ({in_slot} of {ENTRIES} entries) MIGRATING, {label}: \
                 {} then {} hits; {} entries hit at least once",
                a.len(),
                b.len(),
                hit.len(),
            );
            hit.len()
        }
    };
    let hit = phase("nothing moved").await;
    assert!(
        hit >= ENTRIES - in_slot,
        "{client}: {hit} entries hit, but only {in_slot} entries are in the migrating slot"
    );
    let keys: Vec<String> = cli(source, &["CLUSTER", "GETKEYSINSLOT", &slot_arg, "1000"])
        .lines()
        .map(str::to_owned)
        .collect();
    let migrate = |keys: &[String]| {
        if keys.is_empty() {
            return;
        }
        let port = target.port.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().map(String::as_str));
        assert_eq!(cli(source, &args), "OK");
    };
    migrate(&keys[..keys.len() / 2]);
    let hit = phase("half its keys moved").await;
    assert!(
        hit >= ENTRIES - in_slot,
        "{client}: {hit} entries hit, but only {in_slot} entries are in the migrating slot"
    );
    println!("{client}: slot held {:?}", held.elapsed());

    // Handed over: every entry hits again (those of the moved slot once stored again).
    migrate(&keys[keys.len() / 2..]);
    for node in &cluster.nodes {
        assert_eq!(
            cli(node, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &target_id]),
            "OK"
        );
    }
    let passes = until_all_hit(&svc, client).await;
    println!("{client}: after the hand-over, every entry hits after {passes} pass(es)");

    // Invalidating the segment removes every entry, on every shard.
    let before = runs.load(Ordering::SeqCst);
    handle
        .invalidate()
        .await
        .expect("the invalidation succeeds");
    let survivors = pass(&svc).await;
    assert!(survivors.is_empty(), "{client}: {survivors:?} survived");
    assert!(runs.load(Ordering::SeqCst) >= before + ENTRIES);
    until_all_hit(&svc, client).await;
}

macro_rules! per_client {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "redis")]
        mod redis_rs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name("redis").await;
                }
            )*
        }
        #[cfg(feature = "fred")]
        mod fred_client {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name("fred").await;
                }
            )*
        }
    };
}

per_client!(spread_over_slots);
