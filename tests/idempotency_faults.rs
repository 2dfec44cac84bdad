//! IdempotencyLockLayer under faults, on redis-rs and fred: two replicas share one store, and a
//! fault hits the connection (through the fault-injecting proxy of tests/common/fault_proxy.rs
//! in front of one replica) or the server itself (SIGSTOP, `kill -9` and a restart with AOF,
//! `CLIENT KILL` on a cluster). Each case asserts that the handler ran exactly once across the
//! two replicas, that every later duplicate gets the first response (status, headers, body) with
//! `Idempotent-Replayed: true`, and that the key was not blocked longer than one lease after
//! Redis was reachable again; it prints a `fault table` line (run with `--nocapture`).
//!
//! (redis-rs and fred both re-send a command after reconnecting, so a single reset is often
//! survived by the client library; Redis unreachable across the completion is not, and needs the
//! layer's background retry.) The cases are in `idempotency_faults/standalone.rs` and
//! `idempotency_faults/cluster.rs`.
#![cfg(any(feature = "redis", feature = "fred"))]

mod common;

#[path = "idempotency_faults/cluster.rs"]
mod cluster;
#[path = "idempotency_faults/standalone.rs"]
mod standalone;

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use common::{fault_proxy::FaultProxy, stores::AnyStore};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{service_fn, util::BoxCloneSyncService, ServiceBuilder, ServiceExt};
use tower_redis_layers::idempotency::{IdempotencyLockLayer, ResponseBody};

type Req = Request<Full<Bytes>>;
type Svc = BoxCloneSyncService<Req, Response<ResponseBody<Full<Bytes>>>, Infallible>;

/// The layer's lease in these tests: a key must not stay blocked longer than this once Redis is
/// reachable again.
const LEASE: Duration = Duration::from_secs(5);
/// The layer's store timeout in these tests.
const STORE_TIMEOUT: Duration = Duration::from_millis(300);

/// The client library under test.
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)] // a client whose feature is off
enum Client {
    RedisRs,
    Fred,
}

impl Client {
    async fn connect(self, url: &str) -> AnyStore {
        match self {
            #[cfg(feature = "redis")]
            Client::RedisRs => AnyStore::Redis(
                tower_redis_layers::store::RedisStore::connect(url)
                    .await
                    .unwrap_or_else(|e| panic!("connect redis-rs to {url}: {e}")),
            ),
            #[cfg(feature = "fred")]
            Client::Fred => AnyStore::Fred(
                tower_redis_layers::store::FredStore::connect(url)
                    .await
                    .unwrap_or_else(|e| panic!("connect fred to {url}: {e}")),
            ),
            #[allow(unreachable_patterns)]
            _ => panic!("{self:?} is not compiled in"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Client::RedisRs => "redis-rs",
            Client::Fred => "fred",
        }
    }
}

/// One test per case and client, in modules `redis_rs` and `fred`: each case is an
/// `async fn case(client: Client)`.
macro_rules! clients {
    ($($case:ident),* $(,)?) => {
        #[cfg(feature = "redis")]
        mod redis_rs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::Client::RedisRs).await;
                }
            )*
        }
        #[cfg(feature = "fred")]
        mod fred {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::Client::Fred).await;
                }
            )*
        }
    };
}
pub(crate) use clients;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a handler sets off on its first run (the fault), awaited by the handler.
type Trigger = Arc<dyn Fn() -> BoxFuture + Send + Sync>;

/// A trigger from a closure that sets the fault off and returns at once.
fn trigger(f: impl Fn() + Send + Sync + 'static) -> Trigger {
    Arc::new(move || {
        f();
        Box::pin(async {})
    })
}

/// When Redis was reachable again after the fault (set by the fault; earlier is stricter; unset
/// while the fault goes on).
#[derive(Clone, Default)]
struct Reachable(Arc<Mutex<Option<Instant>>>);

impl Reachable {
    fn at(&self, when: Instant) {
        *self.0.lock().unwrap() = Some(when);
    }
    fn now(&self) {
        self.at(Instant::now());
    }
    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap()
    }
}

/// The handler of a replica: counts its runs on `runs` (its side effect, first thing), works for
/// `work`, and answers `201` with `x-order: <n>` and `run=<n>`. On its first run in a replica
/// it awaits `at_start` before its work and `at_end` after it.
#[derive(Clone, Default)]
struct Handler {
    runs: Arc<AtomicUsize>,
    work: Duration,
    at_start: Option<Trigger>,
    at_end: Option<Trigger>,
}

impl Handler {
    fn new(work: Duration) -> Self {
        Self {
            work,
            ..Self::default()
        }
    }

    /// The same handler (same run counter), without triggers: the other replica's.
    fn plain(&self) -> Self {
        Self::new(self.work).counting(&self.runs)
    }

    fn counting(mut self, runs: &Arc<AtomicUsize>) -> Self {
        self.runs = runs.clone();
        self
    }

    fn at_start(mut self, trigger: Trigger) -> Self {
        self.at_start = Some(trigger);
        self
    }

    fn at_end(mut self, trigger: Trigger) -> Self {
        self.at_end = Some(trigger);
        self
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// A replica: the layer (store timeout 300 ms, lease 5 s) on `store` over this handler.
    fn replica(&self, store: AnyStore) -> Svc {
        let handler = self.clone();
        let ran = Arc::new(AtomicBool::new(false));
        let inner = service_fn(move |_req: Req| {
            let handler = handler.clone();
            let first = !ran.swap(true, Ordering::SeqCst);
            async move {
                let n = handler.runs.fetch_add(1, Ordering::SeqCst) + 1;
                if let (true, Some(t)) = (first, &handler.at_start) {
                    t().await;
                }
                tokio::time::sleep(handler.work).await;
                if let (true, Some(t)) = (first, &handler.at_end) {
                    t().await;
                }
                let res = Response::builder()
                    .status(StatusCode::CREATED)
                    .header("x-order", n.to_string())
                    .header("content-type", "text/plain")
                    .body(Full::from(format!("run={n}")))
                    .unwrap();
                Ok::<_, Infallible>(res)
            }
        });
        let layer = IdempotencyLockLayer::new(store)
            .store_timeout(STORE_TIMEOUT)
            .lease(LEASE);
        BoxCloneSyncService::new(ServiceBuilder::new().layer(layer).service(inner))
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    /// Status, headers (but `Idempotent-Replayed`) and body.
    fn content(&self) -> (u16, Vec<(String, String)>, &str) {
        let mut headers: Vec<_> = self
            .headers
            .iter()
            .filter(|(name, _)| *name != "idempotent-replayed")
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect();
        headers.sort();
        (self.status, headers, &self.body)
    }
}

async fn send(svc: &Svc, key: &str) -> Answer {
    let req = Request::post("/orders")
        .header("idempotency-key", key)
        .body(Full::from("{}"))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Sends a request to `svc` and drops it (the client goes away) once its handler has begun.
async fn send_and_drop(svc: &Svc, key: &str, handler: &Handler) {
    let request = {
        let (svc, key) = (svc.clone(), key.to_owned());
        tokio::spawn(async move { send(&svc, &key).await })
    };
    let began = Instant::now();
    while handler.runs() == 0 {
        assert!(began.elapsed() < Duration::from_secs(5), "never began");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    request.abort();
    assert!(request.await.is_err_and(|e| e.is_cancelled()));
}

/// Sends a request to `svc` while the proxy in front of it stalls, drops it 200 ms later (its
/// claim not answered), then lets the proxy go (the claim lands) and marks Redis reachable.
async fn drop_during_claim(svc: &Svc, key: &str, proxy: &FaultProxy, reachable: &Reachable) {
    proxy.stall(true);
    let request = {
        let (svc, key) = (svc.clone(), key.to_owned());
        tokio::spawn(async move { send(&svc, &key).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    request.abort();
    assert!(request.await.is_err_and(|e| e.is_cancelled()));
    proxy.stall(false);
    reachable.now();
    // The held-up claim lands before the duplicates begin.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// One fault case: the request goes to `first` (whose handler or proxy sets off the fault), its
/// duplicates to `second`.
struct Case {
    name: String,
    first: Svc,
    second: Svc,
    handler: Handler,
    reachable: Reachable,
    /// Whether the client drops the first request, and when.
    dropped: Dropped,
    /// How long the key may stay blocked once Redis is reachable: a lease, or less where a
    /// whole lease would be the bug.
    max_blocked: Duration,
}

/// Whether (and when) the client drops the first request.
enum Dropped {
    No,
    /// Once its handler has begun.
    InHandler,
    /// While its claim is held up (the proxy in front of the first replica stalls), before the
    /// claim's answer arrives: the claim lands after the drop.
    InClaim(Arc<FaultProxy>),
}

/// Runs `case`: the request to `first`, then duplicates to `second` every 50 ms until one is
/// replayed. The first request either gets the handler's response without waiting past the
/// store timeout, or `503` without the handler running (its claim's answer was lost); then
/// the first duplicate that claims the key runs it. Asserts that the handler ran exactly once,
/// that every later duplicate, on both replicas, gets the first response with
/// `Idempotent-Replayed: true`, and that the key was blocked (409 or 503) no longer than one
/// lease after Redis was reachable again. Prints the figures.
async fn exactly_once(case: Case) {
    let Case {
        name,
        first,
        second,
        handler,
        reachable,
        dropped,
        max_blocked,
    } = case;
    let key = format!("fault-{:x}", rand_id());
    let start = Instant::now();
    let mut original = None;
    let mut first_status = "dropped".to_owned();
    if let Dropped::InHandler = dropped {
        send_and_drop(&first, &key, &handler).await;
    } else if let Dropped::InClaim(proxy) = &dropped {
        drop_during_claim(&first, &key, proxy, &reachable).await;
        assert_eq!(handler.runs(), 0);
    } else {
        let answer = send(&first, &key).await;
        let waited = start.elapsed();
        let bound = handler.work + STORE_TIMEOUT * 3 + Duration::from_millis(600);
        assert!(waited < bound, "{name}: the client waited {waited:?}");
        first_status = answer.status.to_string();
        match answer.status {
            201 => original = Some(answer),
            503 => assert_eq!(handler.runs(), 0, "{name}: 503 after the handler ran"),
            _ => panic!("{name}: first answer {answer:?}"),
        }
    }
    let (mut conflicts, mut unavailable) = (0, 0);
    let (replay, unblocked) = loop {
        let dup = send(&second, &key).await;
        match dup.status {
            409 => conflicts += 1,
            503 => unavailable += 1,
            201 if dup.replayed() => break (dup, Instant::now()),
            201 => {
                assert!(original.is_none(), "{name}: ran again: {}", dup.body);
                original = Some(dup);
            }
            _ => panic!("{name}: a duplicate got {dup:?}"),
        }
        assert!(start.elapsed() < LEASE * 3, "{name}: no replay");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let to_replay = unblocked - start;
    // A replay served while the fault still went on (to the other replica) blocked nothing.
    let blocked = reachable
        .get()
        .map_or(Duration::ZERO, |at| unblocked.saturating_duration_since(at));
    assert_first_response(&name, original.as_ref(), &replay);
    assert!(
        blocked < max_blocked,
        "{name}: the key was blocked {blocked:?} after Redis was reachable again"
    );
    later_duplicates(&name, &first, &second, &key, &replay).await;
    assert_eq!(handler.runs(), 1, "{name}: ran again");
    println!(
        "fault table | {name} | first answer {first_status} | handler runs {} | \
         409s {conflicts} | 503s {unavailable} | replay after {to_replay:.2?} | \
         blocked after reachable {blocked:.2?}",
        handler.runs()
    );
}

/// The replay is the first response (the dropped request's, unseen, is run 1's).
fn assert_first_response(name: &str, original: Option<&Answer>, replay: &Answer) {
    assert!(replay.replayed());
    match original {
        Some(original) => assert_eq!(replay.content(), original.content(), "{name}"),
        None => {
            assert_eq!(
                (replay.status, replay.body.as_str()),
                (201, "run=1"),
                "{name}"
            );
            assert_eq!(replay.headers["x-order"], "1", "{name}");
        }
    }
}

/// Later duplicates, on both replicas, get the replay. The faulty replica's client may still be
/// reconnecting (its calls fail, and the layer answers 503 rather than run unprotected): it gets
/// the replay once its client is back, within a few seconds.
async fn later_duplicates(name: &str, first: &Svc, second: &Svc, key: &str, replay: &Answer) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    for svc in [second, first, second] {
        let back = Instant::now() + Duration::from_secs(6);
        let mut dup = send(svc, key).await;
        while dup.status == 503 && Instant::now() < back {
            tokio::time::sleep(Duration::from_millis(100)).await;
            dup = send(svc, key).await;
        }
        assert!(dup.replayed(), "{name}: a later duplicate: {dup:?}");
        assert_eq!(dup.content(), replay.content(), "{name}: a later duplicate");
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Both replicas of `client` on `url`, the first with `handler`.
async fn replicas(client: Client, url: &str, handler: &Handler) -> (Svc, Svc) {
    let a = client.connect(url).await;
    let b = client.connect(url).await;
    (handler.replica(a), handler.plain().replica(b))
}
