//! IdempotencyLockLayer under connection faults, on redis-rs and fred: one replica's store
//! talks to Redis through a fault-injecting proxy (tests/common/fault_proxy.rs), the other
//! directly. (redis-rs and fred both re-send a command after reconnecting, so a single reset
//! is survived by the client library; Redis unreachable across the completion is not, and needs
//! the layer's background retry.) Each case asserts that the handler ran exactly once across the two replicas and that
//! every later duplicate gets the first response with `Idempotent-Replayed: true`.
#![cfg(any(feature = "redis", feature = "fred"))]

mod common;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use common::{fault_proxy::FaultProxy, RedisServer};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{service_fn, util::BoxCloneSyncService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    idempotency::{IdempotencyLockLayer, ResponseBody},
    store::IdempotencyStore,
};

type Req = Request<Full<Bytes>>;
type Svc = BoxCloneSyncService<Req, Response<ResponseBody<Full<Bytes>>>, Infallible>;

/// What the fault does to the proxied replica, set off by its handler once it has run (so it
/// hits the completion).
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The connection is cut when the completion is sent; the completion is lost.
    ResetAtCompletion,
    /// From the completion on, every command cuts the connection for 1.5 s (Redis unreachable):
    /// the client library's own re-sends fail too, and the layer stops waiting after its store
    /// timeout.
    DownAtCompletion,
    /// The server's replies are swallowed for 1.5 s (the completion runs, its reply is lost),
    /// then the connection is cut.
    SwallowCompletionReply,
}

/// A replica: the layer (store timeout 300 ms) over a handler that counts its runs on `runs`,
/// answers `201` with `run=<n>`, and sets off `fault` on `proxy` on its first run.
fn replica<B: IdempotencyStore>(
    store: B,
    runs: Arc<AtomicUsize>,
    fault: Option<(Fault, Arc<FaultProxy>)>,
) -> Svc {
    let trigger =
        fault.map(|(fault, proxy)| -> Trigger { Arc::new(move || set_off(fault, proxy.clone())) });
    replica_with(store, runs, trigger)
}

/// Something the handler sets off on its first run.
type Trigger = Arc<dyn Fn() + Send + Sync>;

fn set_off(fault: Fault, proxy: Arc<FaultProxy>) {
    match fault {
        Fault::ResetAtCompletion => proxy.reset_on_next_command(),
        Fault::DownAtCompletion => proxy.down_for(Duration::from_millis(1500)),
        Fault::SwallowCompletionReply => {
            proxy.swallow_replies(true);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                proxy.swallow_replies(false);
                proxy.reset();
            });
        }
    }
}

fn replica_with<B: IdempotencyStore>(
    store: B,
    runs: Arc<AtomicUsize>,
    trigger: Option<Trigger>,
) -> Svc {
    let inner = service_fn(move |_req: Req| {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        if let (1, Some(trigger)) = (n, &trigger) {
            trigger();
        }
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut res = Response::new(Full::from(format!("run={n}")));
            *res.status_mut() = StatusCode::CREATED;
            Ok::<_, Infallible>(res)
        }
    });
    let layer = IdempotencyLockLayer::new(store).store_timeout(Duration::from_millis(300));
    BoxCloneSyncService::new(ServiceBuilder::new().layer(layer).service(inner))
}

struct Answer {
    status: u16,
    replayed: bool,
    body: String,
}

async fn send(svc: &Svc, key: &str) -> Answer {
    let req = Request::post("/orders")
        .header("idempotency-key", key)
        .body(Full::from("{}"))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        replayed,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Runs `fault` against the replica behind the proxy (see [`exactly_once`]).
async fn fault_case<B: IdempotencyStore>(
    client: &str,
    fault: Fault,
    proxy: Arc<FaultProxy>,
    proxied: B,
    direct: B,
) {
    let runs = Arc::new(AtomicUsize::new(0));
    let first = replica(proxied, runs.clone(), Some((fault, proxy.clone())));
    let second = replica(direct, runs.clone(), None);
    exactly_once(&format!("{client} {fault:?}"), first, second, runs).await;
    assert!(proxy.resets() >= 1, "the fault did not fire");
}

/// Sends a request to `first` (whose handler sets off the fault), then duplicates to `second`
/// every 50 ms until one is replayed. Asserts that the client was not kept waiting, that the
/// handler ran exactly once, and that every later duplicate, on both replicas, gets the first
/// response with `Idempotent-Replayed: true`; prints the 409 and 503 counts and the time until
/// the replay.
async fn exactly_once(case: &str, first: Svc, second: Svc, runs: Arc<AtomicUsize>) {
    let key = format!("fault-{:x}", rand_id());
    let start = Instant::now();
    let answer = send(&first, &key).await;
    assert_eq!((answer.status, answer.body.as_str()), (201, "run=1"));
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "the client waited past the store timeout: {:?}",
        start.elapsed()
    );
    let (mut conflicts, mut unavailable) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(12);
    let replay = loop {
        let dup = send(&second, &key).await;
        match dup.status {
            409 => conflicts += 1,
            503 => unavailable += 1,
            _ => break dup,
        }
        assert!(Instant::now() < deadline, "{case}: no replay after 12 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let to_replay = start.elapsed();
    assert_eq!(
        (replay.status, replay.replayed, replay.body.as_str()),
        (201, true, "run=1"),
        "{case}: not the first response"
    );
    // Later duplicates, on both replicas, get it too. The faulty replica's client may still be
    // reconnecting (its calls fail, and the layer answers 503 rather than run unprotected): it
    // gets the replay once its client is back, within a few seconds.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for svc in [&second, &first, &second] {
        let back = Instant::now() + Duration::from_secs(6);
        let mut dup = send(svc, &key).await;
        while dup.status == 503 && Instant::now() < back {
            tokio::time::sleep(Duration::from_millis(100)).await;
            dup = send(svc, &key).await;
        }
        assert_eq!(
            (dup.status, dup.replayed, dup.body.as_str()),
            (201, true, "run=1"),
            "{case}: a later duplicate"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "{case}: ran again");
    println!(
        "{case}: handler runs 1, 409s {conflicts}, 503s {unavailable}, replay after {to_replay:?}"
    );
}

/// Redis stopped (SIGSTOP) for 2 s from the moment the handler begins, both replicas on it;
/// the completion script was never loaded on this fresh server, so the first completion call
/// after SIGCONT may meet `NOSCRIPT`.
async fn redis_stopped_case<B: IdempotencyStore>(
    client: &str,
    server: Arc<RedisServer>,
    a: B,
    b: B,
) {
    let runs = Arc::new(AtomicUsize::new(0));
    let trigger: Trigger = Arc::new(move || {
        server.pause();
        let server = server.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            server.resume();
        });
    });
    let first = replica_with(a, runs.clone(), Some(trigger));
    let second = replica(b, runs.clone(), None);
    exactly_once(
        &format!("{client} SIGSTOP across the completion"),
        first,
        second,
        runs,
    )
    .await;
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(feature = "redis")]
mod redis_rs {
    use super::*;
    use tower_redis_layers::store::RedisStore;

    async fn case(fault: Fault) {
        let server = RedisServer::start();
        let proxy = Arc::new(FaultProxy::start(server.port).await);
        let proxied = RedisStore::connect(&proxy.url()).await.unwrap();
        let direct = RedisStore::connect(&server.url()).await.unwrap();
        fault_case("redis-rs", fault, proxy, proxied, direct).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_stopped_across_the_completion() {
        let server = Arc::new(RedisServer::start());
        let a = RedisStore::connect(&server.url()).await.unwrap();
        let b = RedisStore::connect(&server.url()).await.unwrap();
        redis_stopped_case("redis-rs", server, a, b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_reset_during_the_completion() {
        case(Fault::ResetAtCompletion).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_unreachable_across_the_completion() {
        case(Fault::DownAtCompletion).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn completion_reply_swallowed() {
        case(Fault::SwallowCompletionReply).await;
    }
}

#[cfg(feature = "fred")]
mod fred {
    use super::*;
    use tower_redis_layers::store::FredStore;

    async fn case(fault: Fault) {
        let server = RedisServer::start();
        let proxy = Arc::new(FaultProxy::start(server.port).await);
        let proxied = FredStore::connect(&proxy.url()).await.unwrap();
        let direct = FredStore::connect(&server.url()).await.unwrap();
        fault_case("fred", fault, proxy, proxied, direct).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_stopped_across_the_completion() {
        let server = Arc::new(RedisServer::start());
        let a = FredStore::connect(&server.url()).await.unwrap();
        let b = FredStore::connect(&server.url()).await.unwrap();
        redis_stopped_case("fred", server, a, b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_reset_during_the_completion() {
        case(Fault::ResetAtCompletion).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_unreachable_across_the_completion() {
        case(Fault::DownAtCompletion).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn completion_reply_swallowed() {
        case(Fault::SwallowCompletionReply).await;
    }
}
