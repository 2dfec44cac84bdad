//! When Redis is away: stalled (SIGSTOP), killed then restarted, behind a proxy that cuts 30% of
//! commands, and a master killed in a 3-master + 3-replica cluster; on both clients.
//!
//! Per layer: the rate limiter admits no more than its local fallback's bound during the fault,
//! decides in well under a millisecond while the circuit breaker is open, and is exact again
//! (two replicas sharing one budget) soon after Redis returns; the cache serves from the inner
//! service without waiting, and from its entries again after; idempotency answers `503` at once
//! and never runs a handler twice.
//!
//! Each scenario prints one line of figures (`OUTAGE | ...`); `cargo test --all-features --test
//! outage -- --nocapture --test-threads 1` gives the table in BENCHMARKS.md, and with
//! `OUTAGE_BEFORE=1` the same scenarios without breaker or local fallback (fail open).
#![cfg(all(feature = "redis", feature = "fred"))]

mod common;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::{fault_proxy::FaultProxy, stores::AnyStore, RedisCluster, RedisServer};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{service_fn, util::BoxCloneSyncService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    cache::CacheLayer,
    idempotency::IdempotencyLockLayer,
    rate_limit::{FailureMode, KeyExtractor, LocalFallback, RateLimitLayer, Rule},
    store::{CircuitBreaker, FredStore, RedisStore, ScriptRunner},
    StoreError,
};

const LIMIT: u64 = 5;
/// The replicas the local fallback divides the limit among (the tests run two).
const REPLICAS: u32 = 2;
const PROBE: Duration = Duration::from_millis(200);
const FAULT: Duration = Duration::from_millis(1500);

fn before() -> bool {
    std::env::var_os("OUTAGE_BEFORE").is_some()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Client {
    Redis,
    Fred,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The server is stopped (SIGSTOP): connections stay open, nothing answers.
    Stall,
    /// The server is killed, then started again (empty).
    Kill,
    /// 30% of the commands cut every connection and are lost.
    Drops,
}

async fn connect(client: Client, url: &str) -> AnyStore {
    let breaker = CircuitBreaker::default().failures(3).probe_interval(PROBE);
    match client {
        Client::Redis => {
            let store = RedisStore::connect(url).await.unwrap();
            AnyStore::Redis(if before() {
                store.no_breaker()
            } else {
                store.breaker(breaker)
            })
        }
        Client::Fred => {
            let store = FredStore::connect(url).await.unwrap();
            AnyStore::Fred(if before() {
                store.no_breaker()
            } else {
                store.breaker(breaker)
            })
        }
    }
}

fn breaker_open(store: &AnyStore) -> bool {
    match store {
        AnyStore::Redis(s) => s.breaker_open(),
        AnyStore::Fred(s) => s.breaker_open(),
        AnyStore::Memory(_) => false,
    }
}

type Svc<R = String> = BoxCloneSyncService<Request<R>, StatusCode, Infallible>;

fn ok_handler() -> impl tower::Service<
    Request<String>,
    Response = Response<String>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<String>, Infallible>>,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_req: Request<String>| std::future::ready(Ok(Response::new(String::new()))))
}

/// One replica's rate limiter: `LIMIT` per minute per `x-key`, a local fallback for
/// `REPLICAS` replicas (fail open, no fallback, in the "before" runs).
fn rate_limiter(store: AnyStore) -> Svc {
    let layer = RateLimitLayer::new(store, Rule::fixed_window(LIMIT, Duration::from_secs(60)))
        .key(KeyExtractor::header("x-key"))
        .store_timeout(Duration::from_millis(100))
        // Every decision asks the store (the deny cache would answer most of them locally).
        .no_deny_cache();
    let layer = if before() {
        layer.on_store_error(FailureMode::Open)
    } else {
        layer.local_fallback(LocalFallback::new(REPLICAS).hold(PROBE / 4))
    };
    let svc = ServiceBuilder::new().layer(layer).service(ok_handler());
    BoxCloneSyncService::new(svc.map_response(|r| r.status()))
}

fn keyed(key: &str) -> Request<String> {
    Request::builder()
        .header("x-key", key)
        .body(String::new())
        .unwrap()
}

/// One request's figures.
struct Sample {
    /// When it finished, from the start of the fault.
    done: Duration,
    latency: Duration,
    status: StatusCode,
    /// Whether the store's breaker was open when it started.
    open: bool,
    /// What `request` was given.
    index: usize,
}

/// Sends requests made by `request` through `svc`, one after another, until `until`.
async fn load<R>(
    svc: Svc<R>,
    store: AnyStore,
    start: Instant,
    until: Instant,
    request: impl Fn(usize) -> Request<R>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut i = 0;
    while Instant::now() < until {
        let open = breaker_open(&store);
        let t = Instant::now();
        let status = svc.clone().oneshot(request(i)).await.unwrap();
        let latency = t.elapsed();
        samples.push(Sample {
            done: start.elapsed(),
            latency,
            status,
            open,
            index: i,
        });
        i += 1;
        if latency > Duration::from_millis(5) || i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    samples
}

fn percentile(latencies: &mut [Duration], p: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    latencies.sort();
    let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
    latencies[index]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Whether the two replicas share one exact budget again: `LIMIT + 3` requests on a fresh key,
/// alternating between them, admit exactly `LIMIT` (the local fallback admits
/// `2 × LIMIT / REPLICAS`, rounded down, and never `LIMIT`).
async fn exact(a: &Svc, b: &Svc, key: &str) -> bool {
    let mut admitted = 0;
    for i in 0..LIMIT + 3 {
        let svc = if i % 2 == 0 { a } else { b };
        if svc.clone().oneshot(keyed(key)).await.unwrap() == StatusCode::OK {
            admitted += 1;
        }
    }
    admitted == LIMIT
}

/// Waits until [`exact`] holds (fresh keys each round); how long it took.
async fn until_exact(a: &Svc, b: &Svc, from: Instant, tag: &str) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(20);
    for round in 0.. {
        if exact(a, b, &format!("{tag}-after-{round}")).await {
            return from.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{tag}: the limits were not exact again within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

/// The p99 of a decision while `store`'s breaker is open: rounds of 1,000 decisions one after
/// another, the best round's p99 (a busy test machine preempts the thread now and then, which
/// is no part of the decision), at most 5 rounds or until one is under 1 ms. `None` when the
/// breaker was not open.
async fn decisions_while_open(svc: &Svc, store: &AnyStore) -> Option<Duration> {
    let mut best: Option<Duration> = None;
    for _ in 0..5 {
        let mut latencies = Vec::with_capacity(1000);
        while latencies.len() < 1000 {
            if !breaker_open(store) {
                return best;
            }
            let t = Instant::now();
            svc.clone().oneshot(keyed("measured")).await.unwrap();
            latencies.push(t.elapsed());
        }
        let p99 = percentile(&mut latencies, 0.99);
        best = Some(best.map_or(p99, |b| b.min(p99)));
        if p99 < Duration::from_millis(1) {
            break;
        }
        tokio::task::yield_now().await;
    }
    best
}

/// A standalone server, behind the fault proxy for [`Fault::Drops`].
struct Target {
    server: RedisServer,
    proxy: Option<FaultProxy>,
}

impl Target {
    async fn start(fault: Fault) -> Self {
        let server = RedisServer::start();
        let proxy = match fault {
            Fault::Drops => Some(FaultProxy::start(server.port).await),
            _ => None,
        };
        Self { server, proxy }
    }

    fn url(&self) -> String {
        self.proxy
            .as_ref()
            .map_or_else(|| self.server.url(), FaultProxy::url)
    }

    fn begin(&mut self, fault: Fault) {
        match fault {
            Fault::Stall => self.server.pause(),
            Fault::Kill => self.server.stop(),
            Fault::Drops => self.proxy.as_ref().unwrap().drop_fraction(0.3),
        }
    }

    fn end(&mut self, fault: Fault) {
        match fault {
            Fault::Stall => self.server.resume(),
            Fault::Kill => tokio::task::block_in_place(|| self.server.restart()),
            Fault::Drops => self.proxy.as_ref().unwrap().drop_fraction(0.0),
        }
    }
}

/// The rate limiter on two replicas through one fault: figures, and the assertions.
async fn rate_limit_through(client: Client, fault: Fault) {
    let mut target = Target::start(fault).await;
    let (a, b) = (
        connect(client, &target.url()).await,
        connect(client, &target.url()).await,
    );
    let (sa, sb) = (rate_limiter(a.clone()), rate_limiter(b.clone()));
    assert!(exact(&sa, &sb, "warm").await, "exact before the fault");

    let start = Instant::now();
    target.begin(fault);
    let until = start + FAULT;
    let mut tasks = Vec::new();
    for (svc, store) in [(&sa, &a), (&sa, &a), (&sb, &b), (&sb, &b)] {
        let (svc, store) = (svc.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            load(svc, store, start, until, |_| keyed("during")).await
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    let decision_p99 = decisions_while_open(&sa, &a).await;
    target.end(fault);
    let back = Instant::now();
    let recovered = until_exact(&sa, &sb, back, &format!("{client:?}-{fault:?}")).await;

    let admitted = samples
        .iter()
        .filter(|s| s.status == StatusCode::OK)
        .count() as u64;
    let bound = LIMIT * u64::from(REPLICAS) / u64::from(REPLICAS);
    let mut all: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    let mut open: Vec<Duration> = samples
        .iter()
        .filter(|s| s.open)
        .map(|s| s.latency)
        .collect();
    let (p50, p99) = (percentile(&mut all, 0.5), percentile(&mut all, 0.99));
    let open_p99 = percentile(&mut open, 0.99);
    println!(
        "OUTAGE | rate limit | {fault:?} {FAULT:?} | {client:?} | admitted {admitted} (bound {bound}) of {} | p50 {} | p99 {} | under load while open: p99 {} ({} decisions); alone: p99 {} | exact again after {}",
        samples.len(),
        ms(p50),
        ms(p99),
        ms(open_p99),
        open.len(),
        decision_p99.map_or_else(|| "-".to_owned(), ms),
        ms(recovered),
    );
    if before() {
        return;
    }
    assert!(
        admitted <= bound,
        "{admitted} admitted during the fault, bound {bound}"
    );
    if fault != Fault::Drops {
        assert!(
            open.len() >= 1000,
            "too few decisions while open: {}",
            open.len()
        );
        let decision_p99 = decision_p99.expect("the breaker stays open during the fault");
        assert!(
            decision_p99 < Duration::from_millis(1),
            "p99 of a decision while the breaker is open: {decision_p99:?}"
        );
    }
    // Within one probe interval of Redis answering again, plus what a client takes to
    // reconnect (generous: a loaded test machine).
    assert!(
        recovered < Duration::from_secs(5),
        "exact again after {recovered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_redis_stalled() {
    rate_limit_through(Client::Redis, Fault::Stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_fred_stalled() {
    rate_limit_through(Client::Fred, Fault::Stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_redis_killed_and_restarted() {
    rate_limit_through(Client::Redis, Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_fred_killed_and_restarted() {
    rate_limit_through(Client::Fred, Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_redis_behind_30_percent_drops() {
    rate_limit_through(Client::Redis, Fault::Drops).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_fred_behind_30_percent_drops() {
    rate_limit_through(Client::Fred, Fault::Drops).await;
}

/// Waits until the store's breaker is `open` (or not); how long it took.
async fn breaker_becomes(store: &AnyStore, open: bool) -> Duration {
    let started = Instant::now();
    while breaker_open(store) != open {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the breaker did not become {}",
            if open { "open" } else { "closed" }
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

async fn cache_through_a_stall(client: Client) {
    let server = RedisServer::start();
    let store = connect(client, &server.url()).await;
    let runs = Arc::new(Mutex::new(0usize));
    let layer = CacheLayer::new(store.clone())
        .jitter(0.0)
        .early_recompute(0.0)
        .store_timeout(Duration::from_secs(1));
    let handle = layer.handle();
    let counter = runs.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_req: Request<String>| {
            let n = {
                let mut runs = counter.lock().unwrap();
                *runs += 1;
                *runs
            };
            std::future::ready(Ok::<_, Infallible>(Response::new(format!("run {n}"))))
        }))
        .map_response(|r| r.status());
    let svc: Svc = BoxCloneSyncService::new(svc);
    let get = |_| Request::get("/a").body(String::new()).unwrap();
    svc.clone().oneshot(get(0)).await.unwrap();
    svc.clone().oneshot(get(0)).await.unwrap();
    assert_eq!(*runs.lock().unwrap(), 1, "the second request is a hit");

    server.pause();
    let start = Instant::now();
    // Enough concurrent requests to open the breaker: they wait for the store timeout.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (svc, store) = (svc.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            load(svc, store, start, start + FAULT, get).await
        }));
    }
    breaker_becomes(&store, true).await;
    let t = Instant::now();
    let invalidated = handle.invalidate().await;
    let invalidation = t.elapsed();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    server.resume();
    let mut open: Vec<Duration> = samples
        .iter()
        .filter(|s| s.open)
        .map(|s| s.latency)
        .collect();
    let slowest = open.iter().max().copied().unwrap_or_default();
    // The first request after the probe interval starts a probe (and goes to the inner
    // service); once the probe closed the breaker, the entry is served again.
    let back = Instant::now();
    let served_again = loop {
        let runs_before = *runs.lock().unwrap();
        let res = svc.clone().oneshot(get(0)).await.unwrap();
        assert_eq!(res, StatusCode::OK);
        if *runs.lock().unwrap() == runs_before {
            break back.elapsed();
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "no hit after the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "OUTAGE | cache | Stall | {client:?} | {} requests while open, p99 {}, slowest {} | invalidation {} | hits again {} after resume",
        open.len(),
        ms(percentile(&mut open, 0.99)),
        ms(slowest),
        ms(invalidation),
        ms(served_again),
    );
    assert!(
        matches!(invalidated, Err(StoreError::CircuitOpen(_))),
        "{invalidated:?}"
    );
    assert!(
        invalidation < Duration::from_millis(250),
        "the invalidation waited"
    );
    assert!(!open.is_empty());
    assert!(
        slowest < Duration::from_millis(500),
        "a request waited on the store while the breaker was open: {slowest:?}"
    );
    assert!(samples.iter().all(|s| s.status == StatusCode::OK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_redis_stalled() {
    cache_through_a_stall(Client::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_fred_stalled() {
    cache_through_a_stall(Client::Fred).await;
}

fn post(key: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("/orders")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn idempotency_through_a_stall(client: Client) {
    let server = RedisServer::start();
    let store = connect(client, &server.url()).await;
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counter = runs.clone();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLockLayer::new(store.clone()).store_timeout(Duration::from_secs(1)))
        .service(service_fn(move |req: Request<Full<Bytes>>| {
            let key = req.headers()["idempotency-key"]
                .to_str()
                .unwrap()
                .to_owned();
            *counter.lock().unwrap().entry(key).or_default() += 1;
            std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                "done",
            )))))
        }))
        .map_response(|r| r.status());
    let svc: Svc<Full<Bytes>> = BoxCloneSyncService::new(svc);
    assert_eq!(
        svc.clone().oneshot(post("first")).await.unwrap(),
        StatusCode::OK
    );

    server.pause();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..4 {
        let (svc, store) = (svc.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            load(svc, store, start, start + FAULT, move |i| {
                post(&format!("k-{task}-{i}"))
            })
            .await
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    // The first key again, while open.
    let t = Instant::now();
    let again = svc.clone().oneshot(post("first")).await.unwrap();
    let again_latency = t.elapsed();
    server.resume();
    let mut open: Vec<Duration> = samples
        .iter()
        .filter(|s| s.open)
        .map(|s| s.latency)
        .collect();
    let slowest = open.iter().max().copied().unwrap_or_default();
    // The first request after the probe interval starts a probe (and gets a 503); once the
    // probe closed the breaker, the completed key is replayed.
    let back = Instant::now();
    let replayed = loop {
        let status = svc.clone().oneshot(post("first")).await.unwrap();
        if status != StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(status, StatusCode::OK);
            break back.elapsed();
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "still 503 after the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "OUTAGE | idempotency | Stall | {client:?} | {} requests while open, p99 {}, slowest {} | replayed {} after resume",
        open.len(),
        ms(percentile(&mut open, 0.99)),
        ms(slowest),
        ms(replayed),
    );
    assert_eq!(again, StatusCode::SERVICE_UNAVAILABLE);
    assert!(again_latency < Duration::from_millis(250));
    assert!(!open.is_empty());
    assert!(
        slowest < Duration::from_millis(500),
        "a request waited on the store while the breaker was open: {slowest:?}"
    );
    assert!(samples
        .iter()
        .all(|s| s.status == StatusCode::SERVICE_UNAVAILABLE));
    // Nothing ran during the outage; the first key is replayed, not run again.
    assert_eq!(runs.lock().unwrap().len(), 1);
    assert_eq!(runs.lock().unwrap()["first"], 1, "no double execution");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_redis_stalled() {
    idempotency_through_a_stall(Client::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_fred_stalled() {
    idempotency_through_a_stall(Client::Fred).await;
}

/// A master of a 3+3 cluster killed under load: its replica is promoted; the limits hold
/// meanwhile, and are exact again soon after.
async fn cluster_failover(client: Client) {
    let mut cluster = tokio::task::block_in_place(|| RedisCluster::start_with_replicas(1));
    let url = cluster.url();
    let (a, b) = (connect(client, &url).await, connect(client, &url).await);
    let (sa, sb) = (rate_limiter(a.clone()), rate_limiter(b.clone()));
    assert!(exact(&sa, &sb, "warm").await, "exact before the failover");
    let victim = cluster.masters()[0];
    let successor = cluster
        .replica_of(victim)
        .expect("the master has a replica");

    let start = Instant::now();
    let until = start + Duration::from_secs(30);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (svc, store) in [(&sa, &a), (&sa, &a), (&sb, &b), (&sb, &b)] {
        let (svc, store, stop) = (svc.clone(), store.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            // 30 keys: about a third on the killed master's slots.
            let key = |i: usize| keyed(&format!("load-{}", i % 30));
            let mut samples = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                samples.extend(
                    load(
                        svc.clone(),
                        store.clone(),
                        start,
                        Instant::now() + Duration::from_millis(50),
                        key,
                    )
                    .await,
                );
            }
            samples
        }));
    }
    tokio::task::block_in_place(|| {
        let node = cluster.nodes.iter_mut().find(|n| n.port == victim).unwrap();
        node.stop();
    });
    // The moment the replica takes over (its role), then until the cluster agrees.
    let promoted = tokio::task::block_in_place(|| loop {
        let node = cluster.nodes.iter().find(|n| n.port == successor).unwrap();
        if node.cli(&["ROLE"]).is_some_and(|r| r.starts_with("master")) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no replica was promoted"
        );
        std::thread::sleep(Duration::from_millis(5));
    });
    tokio::task::block_in_place(|| loop {
        let masters = cluster.masters();
        if masters.len() == 3 && !masters.contains(&victim) && cluster.is_ok() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no replica was promoted: {masters:?}, victim {victim}\n{}",
            cluster
                .nodes
                .iter()
                .find_map(|n| n.cli(&["CLUSTER", "NODES"]))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    });
    let recovered = until_exact(&sa, &sb, start, &format!("{client:?}-failover")).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    // Per key, what was admitted before the promotion (from Redis or the local fallback).
    let mut admitted: HashMap<usize, u64> = HashMap::new();
    let mut during = Vec::new();
    let mut count = 0;
    for s in samples.iter().filter(|s| s.done <= promoted) {
        count += 1;
        during.push(s.latency);
        if s.status == StatusCode::OK {
            *admitted.entry(s.index % 30).or_default() += 1;
        }
    }
    let most = admitted.values().copied().max().unwrap_or(0);
    let total: u64 = admitted.values().sum();
    let (p50, p99) = (percentile(&mut during, 0.5), percentile(&mut during, 0.99));
    println!(
        "OUTAGE | rate limit | master killed (3+3 cluster) | {client:?} | {count} requests until promotion ({:.0}/s), {total} admitted on 30 keys, at most {most} on one (bound {} per key, {} in all) | p50 {} | p99 {} | promoted after {} | exact again after {}",
        count as f64 / promoted.as_secs_f64(),
        LIMIT,
        LIMIT * 30,
        ms(p50),
        ms(p99),
        ms(promoted),
        ms(recovered),
    );
    if before() {
        return;
    }
    assert!(
        most <= LIMIT,
        "{most} admitted on one key before the promotion"
    );
    assert!(
        recovered < promoted + Duration::from_secs(5),
        "exact again {recovered:?} after the kill, promoted after {promoted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_killed_redis() {
    cluster_failover(Client::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_killed_fred() {
    cluster_failover(Client::Fred).await;
}
