//! Leased quotas on real Redis (redis-rs and fred, standalone and one cluster case): two
//! replicas (two stores, two layers) × 64 concurrent callers on one key never admit more than
//! the limit per fixed window, admit at least `limit − replicas × max lease` of it, lease less
//! near the limit, lose at most a lease when a replica dies, and make far fewer Redis calls
//! than requests on a hot key. The GCRA burst bound is measured. The memory store is checked
//! too: a `Leased` memory store is the memory store.
#![cfg(any(feature = "redis", feature = "fred"))]

mod common;

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{RedisCluster, RedisServer};
use http::{Request, Response, StatusCode};
use tower::{service_fn, util::BoxCloneSyncService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{KeyExtractor, Lease, Leased, Policy, RateLimitLayer, Rule},
    store::{LeaseGrant, MemoryStore, RateLease, RateLeaseStore, RateLimitStore},
    StoreKey,
};

type Svc = BoxCloneSyncService<Request<()>, StatusCode, Infallible>;

/// A layer on `store` for one rule on one global key, with a log of admission times.
fn service<B: RateLimitStore>(store: B, rule: Rule, log: Arc<Mutex<Vec<Instant>>>) -> Svc {
    service_named(store, "lease", rule, Duration::from_secs(2), log)
}

/// [`service`] with a policy name and a store timeout of its own.
fn service_named<B: RateLimitStore>(
    store: B,
    name: &str,
    rule: Rule,
    store_timeout: Duration,
    log: Arc<Mutex<Vec<Instant>>>,
) -> Svc {
    let layer = RateLimitLayer::new(store, Policy::new(name, rule))
        .key(KeyExtractor::global())
        .store_timeout(store_timeout);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_req: Request<()>| {
            log.lock().unwrap().push(Instant::now());
            std::future::ready(Ok::<_, Infallible>(Response::new(String::new())))
        }))
        .map_response(|r| r.status());
    BoxCloneSyncService::new(svc)
}

/// `callers` tasks per service, each sending requests back to back until `until`.
async fn hammer(services: &[Svc], callers: usize, until: Instant) -> (u64, u64) {
    let mut tasks = Vec::new();
    for svc in services {
        for _ in 0..callers {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut denied) = (0u64, 0u64);
                while Instant::now() < until {
                    match svc.clone().oneshot(Request::new(())).await.unwrap() {
                        StatusCode::OK => ok += 1,
                        _ => {
                            denied += 1;
                            // A denied caller comes back a little later, as a client would.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                }
                (ok, denied)
            }));
        }
    }
    let mut total = (0, 0);
    for t in tasks {
        let (ok, denied) = t.await.unwrap();
        total.0 += ok;
        total.1 += denied;
    }
    total
}

#[derive(Clone, Copy)]
enum Client {
    #[cfg(feature = "redis")]
    Redis,
    #[cfg(feature = "fred")]
    Fred,
}

/// A new client of the server at `url` (a replica of its own), wrapped in a lease.
async fn leased(client: Client, url: &str, lease: Lease) -> Leased<AnyRemote> {
    let store = match client {
        #[cfg(feature = "redis")]
        Client::Redis => AnyRemote::Redis(
            tower_redis_layers::store::RedisStore::connect(url)
                .await
                .unwrap(),
        ),
        #[cfg(feature = "fred")]
        Client::Fred => AnyRemote::Fred(
            tower_redis_layers::store::FredStore::connect(url)
                .await
                .unwrap(),
        ),
    };
    Leased::new(store, lease)
}

/// Either Redis store, as one type.
#[derive(Clone, Debug)]
enum AnyRemote {
    #[cfg(feature = "redis")]
    Redis(tower_redis_layers::store::RedisStore),
    #[cfg(feature = "fred")]
    Fred(tower_redis_layers::store::FredStore),
}

macro_rules! each {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            #[cfg(feature = "redis")]
            AnyRemote::Redis($s) => $call,
            #[cfg(feature = "fred")]
            AnyRemote::Fred($s) => $call,
        }
    };
}

impl RateLimitStore for AnyRemote {
    type Future = tower_redis_layers::store::StoreFuture<tower_redis_layers::store::Decision>;

    fn check(&self, check: tower_redis_layers::store::RateCheck<'_>) -> Self::Future {
        each!(self, s => Box::pin(s.check(check)))
    }

    fn settle(
        &self,
        settlement: tower_redis_layers::store::RateSettlement<'_>,
    ) -> tower_redis_layers::store::StoreFuture<()> {
        each!(self, s => s.settle(settlement))
    }
}

impl RateLeaseStore for AnyRemote {
    fn lease(&self, lease: RateLease<'_>) -> tower_redis_layers::store::StoreFuture<LeaseGrant> {
        each!(self, s => s.lease(lease))
    }
}

fn clients() -> Vec<Client> {
    vec![
        #[cfg(feature = "redis")]
        Client::Redis,
        #[cfg(feature = "fred")]
        Client::Fred,
    ]
}

const LIMIT: u64 = 300;
const MAX_LEASE: u64 = 32;
const WINDOW: Duration = Duration::from_millis(1000);

/// 2 replicas × 64 callers, one key, a fixed window of `LIMIT`, several windows: each phase of
/// demand lies inside one Redis window (the window opens with the phase's first lease and the
/// callers stop before it ends; the next phase starts after it ended), so each phase's
/// admissions are one window's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_window_never_over_admits_across_replicas() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    for client in clients() {
        let server = RedisServer::start();
        let rule = Rule::fixed_window(LIMIT, WINDOW);
        let log = Arc::new(Mutex::new(Vec::new()));
        let a = leased(client, &server.url(), Lease::up_to(MAX_LEASE)).await;
        let b = leased(client, &server.url(), Lease::up_to(MAX_LEASE)).await;
        let services = [
            service(a.clone(), rule.clone(), Arc::clone(&log)),
            service(b.clone(), rule.clone(), Arc::clone(&log)),
        ];
        let mut phases = Vec::new();
        for _ in 0..4 {
            let start = Instant::now();
            let (ok, denied) = hammer(&services, 64, start + WINDOW.mul_f64(0.6)).await;
            phases.push((ok, denied));
            eprintln!("phase: {ok} admitted; {:?} {:?}", a.stats(), b.stats());
            assert!(ok <= LIMIT, "admitted {ok} > {LIMIT} in one window");
            assert!(
                ok >= LIMIT - 2 * MAX_LEASE,
                "admitted {ok} < {} with demand above the limit",
                LIMIT - 2 * MAX_LEASE
            );
            assert!(denied > 0, "the demand was above the limit");
            tokio::time::sleep_until((start + WINDOW.mul_f64(1.3)).into()).await;
        }
        let stats = [a.stats(), b.stats()];
        let requests: u64 = phases.iter().map(|p| p.0 + p.1).sum();
        eprintln!("fixed window, phases (admitted, denied): {phases:?}; stats {stats:?}; {requests} requests");
    }
}

/// The same, with demand that keeps on across window ends: the units of a window die with it,
/// so whatever the replicas hold, each window's count in Redis bounds its admissions, and over
/// the whole run the admissions never exceed `LIMIT` per window Redis opened (counted as the
/// fresh windows' `PEXPIRE`s: leases also expire their replica set, so the count subtracts
/// the leases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_window_units_die_with_their_window() {
    let client = clients()[0];
    let server = RedisServer::start();
    let window = Duration::from_millis(400);
    let rule = Rule::fixed_window(LIMIT, window);
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = leased(client, &server.url(), Lease::up_to(MAX_LEASE)).await;
    let b = leased(client, &server.url(), Lease::up_to(MAX_LEASE)).await;
    let services = [
        service(a.clone(), rule.clone(), Arc::clone(&log)),
        service(b.clone(), rule.clone(), Arc::clone(&log)),
    ];
    let start = Instant::now();
    let (ok, _) = hammer(&services, 64, start + window * 5).await;
    let (sa, sb) = (a.stats(), b.stats());
    let leases = sa.leases - sa.denied_leases + sb.leases - sb.denied_leases;
    // Every lease granted PEXPIREs the replica set; a fresh window's counter is PEXPIREd once (by a
    // lease or a direct check).
    let windows = server.command_calls("pexpire") - leases;
    eprintln!("continuous demand: {ok} admitted over {windows} windows ({leases} leases)");
    assert!(windows >= 5, "{windows} windows");
    assert!(ok <= LIMIT * windows, "{ok} > {LIMIT} × {windows}");
}

/// Near the limit the store leases less, down to 1: a lease is at most
/// `need + remaining after need / (2 × replicas seen)`.
#[tokio::test]
async fn leases_shrink_to_one_near_the_limit() {
    for client in clients() {
        let server = RedisServer::start();
        let store = leased(client, &server.url(), Lease::up_to(64)).await;
        let store = store.store().clone();
        let rule = Rule::fixed_window(200, Duration::from_secs(60));
        let key = StoreKey::from_parts([b"shrink".as_slice()]);
        let mut remaining = 200u64;
        let mut grants = Vec::new();
        for i in 0.. {
            let replica = if i % 2 == 0 { "a" } else { "b" };
            match store
                .lease(RateLease::new(&key, &rule, 1, 64, replica))
                .await
                .unwrap()
            {
                LeaseGrant::Granted {
                    units, replicas, ..
                } => {
                    let seen = if i == 0 { 1 } else { 2 };
                    assert_eq!(replicas, seen);
                    assert!(
                        units <= 1 + (remaining - 1) / (2 * seen),
                        "{units} of {remaining}"
                    );
                    remaining -= units;
                    grants.push(units);
                }
                LeaseGrant::Denied { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        eprintln!("grants: {grants:?}");
        assert_eq!(remaining, 0, "every unit was leased");
        assert_eq!(grants.iter().sum::<u64>(), 200);
        assert_eq!(grants.first(), Some(&64));
        // The last leases are single units: a nearly exhausted key is checked per request.
        assert!(grants.iter().rev().take(4).all(|g| *g == 1), "{grants:?}");
    }
}

/// A replica that dies holding a lease loses at most that lease; one that is dropped returns
/// what it did not use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_loses_at_most_its_lease() {
    for client in clients() {
        for returned in [false, true] {
            let server = RedisServer::start();
            let rule = Rule::fixed_window(LIMIT, Duration::from_secs(30));
            let log = Arc::new(Mutex::new(Vec::new()));
            let lease = if returned {
                Lease::up_to(MAX_LEASE)
            } else {
                Lease::up_to(MAX_LEASE).no_return()
            };
            let a = leased(client, &server.url(), lease).await;
            let svc_a = service(a.clone(), rule.clone(), Arc::clone(&log));
            // Warm `a` up until it holds a batch of more than one unit.
            let mut admitted_a = 0;
            for _ in 0..64 {
                if svc_a.clone().oneshot(Request::new(())).await.unwrap() == StatusCode::OK {
                    admitted_a += 1;
                }
                if a.held() >= 8 {
                    break;
                }
            }
            // A lease sent ahead of need may be in flight: let it land, then count.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let held = a.held();
            assert!(held >= 8, "a holds {held}");
            // It dies: dropped without returning (no_return), or dropped and returning.
            drop(svc_a);
            drop(a);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let b = leased(client, &server.url(), Lease::up_to(MAX_LEASE)).await;
            let svc_b = service(b.clone(), rule.clone(), Arc::clone(&log));
            let (admitted_b, _) =
                hammer(&[svc_b], 64, Instant::now() + Duration::from_millis(700)).await;
            // What `b` still holds when its callers stop was debited but not used.
            let total = admitted_a + admitted_b + b.held();
            eprintln!("returned {returned}: a admitted {admitted_a}, held {held}; b admitted {admitted_b}");
            assert!(total <= LIMIT);
            if returned {
                // Best effort: the return is one store call spawned when the store is dropped.
                assert!(total >= LIMIT - held);
                assert_eq!(
                    total, LIMIT,
                    "the dropped replica returned its {held} units"
                );
            } else {
                assert!(total >= LIMIT - held, "lost more than the lease");
                assert_eq!(total, LIMIT - held, "the lease died with the replica");
            }
        }
    }
}

/// Redis calls per request on a hot key far from its limit (GCRA): counted with
/// `INFO commandstats` on the server the test started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_far_from_its_limit_makes_few_redis_calls() {
    for client in clients() {
        for max in [64, 256] {
            let server = RedisServer::start();
            let rule = Rule::gcra(1_000_000, Duration::from_secs(1), 10_000);
            let log = Arc::new(Mutex::new(Vec::new()));
            let a = leased(client, &server.url(), Lease::up_to(max)).await;
            let b = leased(client, &server.url(), Lease::up_to(max)).await;
            let services = [
                service(a.clone(), rule.clone(), Arc::clone(&log)),
                service(b.clone(), rule.clone(), Arc::clone(&log)),
            ];
            let calls = || server.command_calls("evalsha") + server.command_calls("eval");
            let before = calls();
            let (ok, denied) = hammer(&services, 64, Instant::now() + Duration::from_secs(2)).await;
            let calls = calls() - before;
            let per_request = calls as f64 / (ok + denied) as f64;
            let stats = [a.stats(), b.stats()];
            eprintln!(
                "hot GCRA key, max lease {max}: {} requests, {denied} denied, {calls} Redis calls: {per_request:.4} per request; {stats:?}",
                ok + denied
            );
            assert_eq!(denied, 0);
            // Well below one call per request (the figure depends on the machine's load: it is
            // reported, not asserted tightly).
            assert!(per_request < 0.25, "{per_request} Redis calls per request");
        }
    }
}

/// GCRA with leases: in any interval Δ at most `burst + rate × Δ + min(rate × τ, replicas ×
/// max lease)` admissions, τ the lease time (default: emission interval × max lease, at least
/// 100 ms). Measured on the admission log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_burst_bound_holds() {
    let client = clients()[0];
    let server = RedisServer::start();
    let (rate, burst, max) = (400u64, 20u64, 16u64);
    let rule = Rule::gcra(rate, Duration::from_secs(1), burst);
    let tau = Lease::up_to(max).lease_time(&rule).unwrap();
    assert_eq!(tau, Duration::from_millis(100));
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = leased(client, &server.url(), Lease::up_to(max)).await;
    let b = leased(client, &server.url(), Lease::up_to(max)).await;
    let services = [
        service(a.clone(), rule.clone(), Arc::clone(&log)),
        service(b.clone(), rule.clone(), Arc::clone(&log)),
    ];
    let start = Instant::now();
    let (ok, _) = hammer(&services, 64, start + Duration::from_secs(2)).await;
    let mut times = log.lock().unwrap().clone();
    times.sort();
    assert_eq!(times.len() as u64, ok);
    for delta in [
        Duration::from_millis(1),
        Duration::from_millis(50),
        Duration::from_millis(250),
        Duration::from_secs(1),
    ] {
        let mut most = 0;
        let mut j = 0;
        for i in 0..times.len() {
            while times[i].duration_since(times[j]) >= delta {
                j += 1;
            }
            most = most.max(i - j + 1);
        }
        let plain = burst as f64 + rate as f64 * delta.as_secs_f64();
        // Leased units add at most min(rate × τ, replicas × max lease).
        let bound = plain + (rate as f64 * tau.as_secs_f64()).min(2.0 * max as f64);
        eprintln!(
            "GCRA {rate}/s burst {burst}, lease {max}, τ {tau:?}: at most {most} in {delta:?} (bound {bound:.0}, without leases {plain:.0})"
        );
        // A few units of slack for the time between a debit on the server and its log here.
        assert!(
            (most as f64) <= bound + 3.0,
            "{most} in {delta:?} > {bound}"
        );
    }
    let elapsed = times.last().unwrap().duration_since(start);
    let long_run = burst as f64 + rate as f64 * elapsed.as_secs_f64() + 2.0 * max as f64;
    assert!((ok as f64) <= long_run + 3.0, "{ok} > {long_run}");
}

/// Leases run on a cluster: the rule, its override and its replica set share a hash tag.
#[tokio::test]
async fn leases_run_on_a_cluster() {
    let cluster = RedisCluster::start();
    let store = leased(clients()[0], &cluster.url(), Lease::up_to(8)).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let svc = service(
        store.clone(),
        Rule::fixed_window(20, Duration::from_secs(30)),
        log,
    );
    let mut ok = 0;
    for _ in 0..30 {
        if svc.clone().oneshot(Request::new(())).await.unwrap() == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 20);
    assert!(store.stats().leases < 20, "{:?}", store.stats());
}

/// A `Leased` memory store is the memory store (leasing in process would gain nothing).
#[tokio::test]
async fn a_leased_memory_store_checks_directly() {
    let store = Leased::new(MemoryStore::new(), Lease::up_to(64));
    let log = Arc::new(Mutex::new(Vec::new()));
    let svc = service(
        store.clone(),
        Rule::fixed_window(10, Duration::from_secs(30)),
        log,
    );
    let mut ok = 0;
    for _ in 0..15 {
        if svc.clone().oneshot(Request::new(())).await.unwrap() == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(store.stats().leases, 0);
    // Its lease function grants as the script does, for one replica.
    let key = StoreKey::from_parts([b"k".as_slice()]);
    let rule = Rule::fixed_window(100, Duration::from_secs(30));
    let grant = store
        .store()
        .lease(RateLease::new(&key, &rule, 1, 64, "x"))
        .await
        .unwrap();
    assert!(
        matches!(
            grant,
            LeaseGrant::Granted {
                units: 50,
                remaining: 50,
                ..
            }
        ),
        "{grant:?}"
    );
}

/// The lease conformance suite on every store: memory, redis-rs and fred, standalone and on a
/// cluster.
#[tokio::test]
async fn the_lease_suite_passes_on_every_store() {
    tower_redis_layers::conformance::rate_limit_lease_suite(&MemoryStore::new()).await;
    let server = RedisServer::start();
    let cluster = RedisCluster::start();
    for client in clients() {
        for url in [server.url(), cluster.url()] {
            let store = leased(client, &url, Lease::up_to(1)).await;
            tower_redis_layers::conformance::rate_limit_lease_suite(store.store()).await;
        }
    }
}

/// A key idle for the idle time gives its unused units back (one store call), so another
/// replica can admit them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keys_return_their_units() {
    let client = clients()[0];
    let server = RedisServer::start();
    let rule = Rule::fixed_window(LIMIT, Duration::from_secs(30));
    let log = Arc::new(Mutex::new(Vec::new()));
    let lease = Lease::up_to(MAX_LEASE).idle(Duration::from_millis(200));
    let a = leased(client, &server.url(), lease).await;
    let svc_a = service(a.clone(), rule.clone(), Arc::clone(&log));
    let mut admitted_a = 0;
    while a.held() < 8 {
        assert_eq!(
            svc_a.clone().oneshot(Request::new(())).await.unwrap(),
            StatusCode::OK
        );
        admitted_a += 1;
    }
    // A lease sent ahead of need may be in flight: let it land (well within the idle time).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let held = a.held();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(a.held(), 0, "the idle key was forgotten");
    assert_eq!(a.stats().returned_units, held, "{:?}", a.stats());
    let b = leased(client, &server.url(), Lease::up_to(MAX_LEASE)).await;
    let svc_b = service(b.clone(), rule.clone(), Arc::clone(&log));
    let (admitted_b, _) = hammer(&[svc_b], 64, Instant::now() + Duration::from_millis(700)).await;
    assert_eq!(
        admitted_a + admitted_b + b.held(),
        LIMIT,
        "a returned its {held} units"
    );
    drop(svc_a);
}

/// Redis stalled (SIGSTOP) under a leased key, then back: every request is answered (200 or
/// 429, within the store timeout plus a margin), never more than the limit plus the units the
/// replica held and its local fallback's share is admitted in the window, and once Redis is
/// back the key is leased from Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_keeps_the_leased_key_bounded() {
    const LIMIT: u64 = 100;
    let window = Duration::from_secs(30);
    for client in clients() {
        let server = RedisServer::start();
        let store = leased(client, &server.url(), Lease::up_to(16)).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let svc = service_named(
            store,
            "stall",
            Rule::fixed_window(LIMIT, window),
            Duration::from_millis(100),
            log.clone(),
        );
        // Warm the key up: some units leased from Redis.
        for _ in 0..20 {
            assert_eq!(
                svc.clone().oneshot(Request::new(())).await.unwrap(),
                StatusCode::OK
            );
        }
        server.pause();
        let mut answered = 0;
        for _ in 0..300 {
            let started = Instant::now();
            let status = svc.clone().oneshot(Request::new(())).await.unwrap();
            assert!(
                status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
                "a stalled store gives a well-formed answer, got {status}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "answered in time"
            );
            answered += 1;
        }
        server.resume();
        let during = log.lock().unwrap().len() as u64;
        // The limit (Redis) plus what the local fallback (one replica: the whole limit) admits
        // while the store is away: never more than twice the limit in the window.
        assert!(
            during <= 2 * LIMIT,
            "{during} admitted with Redis stalled (limit {LIMIT})"
        );
        assert_eq!(answered, 300);
        println!("lease, Redis stalled: {during} admitted of 320 requests (limit {LIMIT})");
        // Back: the key is decided by Redis again (the fallback's hold ends within its hold).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = log.lock().unwrap().len();
        for _ in 0..(2 * LIMIT) {
            let _ = svc.clone().oneshot(Request::new(())).await.unwrap();
        }
        let after = log.lock().unwrap().len();
        assert!(
            (after as u64) <= 2 * LIMIT + 16,
            "after Redis came back, {after} admitted in all (limit {LIMIT} per window)"
        );
        println!(
            "lease, Redis back: {} more admitted of {} requests",
            after - before,
            2 * LIMIT
        );
    }
}
