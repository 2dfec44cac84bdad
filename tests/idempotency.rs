//! IdempotencyLockLayer over HTTP, on every store: memory, redis-rs and fred, each standalone
//! and on a 3-master cluster (see `stores!`). Two services that share a store stand for two replicas.

mod common;

use std::{
    convert::Infallible,
    io,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use common::{
    stores::{stores, Env},
    RedisServer,
};
use futures_util::future::join_all;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{service_fn, util::BoxCloneSyncService, Service, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    idempotency::{FencingToken, IdempotencyLockLayer, ResponseBody},
    store::{Claim, ClaimRequest, IdempotencyStore, MemoryStore, StoreFuture},
    FailureMode, StoreKey,
};

type Req = Request<Full<Bytes>>;
type Svc = BoxCloneSyncService<Req, Response<ResponseBody<Full<Bytes>>>, Infallible>;

struct Handler {
    runs: Arc<AtomicUsize>,
    delay: Duration,
    fail_first: bool,
}

/// A handler that counts its runs, sleeps, and answers 201 with the fence and the body.
fn service<B: IdempotencyStore>(layer: IdempotencyLockLayer<B>, h: Handler) -> Svc {
    let runs = h.runs.clone();
    let inner = service_fn(move |req: Req| {
        let runs = runs.clone();
        let (delay, fail_first) = (h.delay, h.fail_first);
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(delay).await;
            let fence = req
                .extensions()
                .get::<FencingToken>()
                .map_or(0, |f| f.get());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut res = Response::new(Full::from(format!(
                "run={n} fence={fence} body={}",
                String::from_utf8_lossy(&body)
            )));
            *res.status_mut() = if fail_first && n == 1 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::CREATED
            };
            res.headers_mut().insert("x-order", HeaderValue::from(n));
            res.headers_mut()
                .append("x-multi", HeaderValue::from_static("a"));
            res.headers_mut()
                .append("x-multi", HeaderValue::from_static("b"));
            Ok::<_, Infallible>(res)
        }
    });
    BoxCloneSyncService::new(ServiceBuilder::new().layer(layer).service(inner))
}

fn handler(delay_ms: u64) -> (Arc<AtomicUsize>, Handler) {
    let runs = Arc::new(AtomicUsize::new(0));
    let h = Handler {
        runs: runs.clone(),
        delay: Duration::from_millis(delay_ms),
        fail_first: false,
    };
    (runs, h)
}

/// Another handler that counts its runs on `runs`, without delay.
fn sharing(runs: &Arc<AtomicUsize>) -> Handler {
    Handler {
        runs: runs.clone(),
        delay: Duration::ZERO,
        fail_first: false,
    }
}

fn post(path: &str, key: Option<&str>, body: &str) -> Req {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .body(Full::from(body.to_owned()))
        .unwrap();
    if let Some(key) = key {
        req.headers_mut()
            .insert("idempotency-key", HeaderValue::from_str(key).unwrap());
    }
    req
}

struct Answer {
    status: u16,
    replayed: bool,
    retry_after: Option<String>,
    order: Option<String>,
    multi: usize,
    body: String,
}

async fn send(svc: &Svc, req: Req) -> Answer {
    let res = svc.clone().oneshot(req).await.unwrap();
    let h = res.headers();
    let answer = Answer {
        status: res.status().as_u16(),
        replayed: h.get("idempotent-replayed").is_some_and(|v| v == "true"),
        retry_after: h.get("retry-after").map(|v| v.to_str().unwrap().to_owned()),
        order: h.get("x-order").map(|v| v.to_str().unwrap().to_owned()),
        multi: h.get_all("x-multi").iter().count(),
        body: String::new(),
    };
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        body: String::from_utf8_lossy(&body).into_owned(),
        ..answer
    }
}

fn unique(name: &str) -> String {
    format!("{name}-{:x}", rand_id())
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Every scenario, against two handles on one store (two replicas).
async fn scenarios<B: IdempotencyStore + Clone>(a: B, b: B) {
    tokio::join!(
        concurrent_duplicates_on_two_services_run_once(a.clone(), b.clone()),
        duplicate_in_flight_gets_409_then_the_replay(a.clone()),
        another_body_gets_422(a.clone()),
        bad_keys_get_400(a.clone()),
        routes_and_tenants_are_isolated(a.clone()),
        renewal_keeps_a_long_handler_exclusive(a.clone(), b.clone()),
        a_dropped_request_runs_to_its_end_and_is_replayed(a.clone()),
        server_errors_are_not_stored_and_fences_grow(a.clone()),
        scopes_keep_two_layers_apart(a.clone()),
        trailers_are_passed_on_and_not_replayed(a.clone()),
        a_failed_response_body_releases_the_key(a.clone()),
        a_panicking_handler_releases_the_key(a.clone()),
        large_bodies(a),
    );
}

async fn concurrent_duplicates_on_two_services_run_once<B: IdempotencyStore + Clone>(a: B, b: B) {
    let (runs, h1) = handler(300);
    let h2 = Handler {
        runs: runs.clone(),
        delay: h1.delay,
        fail_first: false,
    };
    let wait = Duration::from_secs(10);
    let services = [
        service(IdempotencyLockLayer::new(a).in_flight_wait(wait), h1),
        service(IdempotencyLockLayer::new(b).in_flight_wait(wait), h2),
    ];
    let key = unique("dup");
    let calls = (0..20).map(|i| send(&services[i % 2], post("/orders", Some(&key), "{\"n\":1}")));
    let answers = join_all(calls).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran more than once"
    );
    let first = &answers[0].body;
    assert!(
        answers.iter().all(|a| a.status == 201 && &a.body == first),
        "not the same response"
    );
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
}

async fn duplicate_in_flight_gets_409_then_the_replay<B: IdempotencyStore + Clone>(store: B) {
    let (runs, h) = handler(500);
    let svc = service(IdempotencyLockLayer::new(store), h);
    let key = unique("inflight");
    let first = tokio::spawn({
        let svc = svc.clone();
        let key = key.clone();
        async move { send(&svc, post("/orders", Some(&key), "x")).await }
    });
    // The duplicate goes once the handler has begun (the first holds the claim then), however
    // long the claim took on a loaded machine.
    let began = tokio::time::Instant::now();
    while runs.load(Ordering::SeqCst) == 0 {
        assert!(began.elapsed() < Duration::from_secs(5), "never began");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dup = send(&svc, post("/orders", Some(&key), "x")).await;
    assert_eq!(dup.status, 409);
    // Retry-After: the time left on the 10 s lease, rounded up (issue 11; it was a constant 1).
    assert_eq!(dup.retry_after.as_deref(), Some("10"));
    assert!(dup.body.contains("\"status\":409"));
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    assert!(!first.replayed);
    // The replay keeps status, headers (repeated ones too) and body.
    let replay = send(&svc, post("/orders", Some(&key), "x")).await;
    assert!(replay.replayed);
    assert_eq!(
        (replay.status, &replay.body, &replay.order),
        (201, &first.body, &first.order)
    );
    assert_eq!(replay.multi, 2);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn another_body_gets_422<B: IdempotencyStore + Clone>(store: B) {
    let (runs, h) = handler(0);
    let svc = service(IdempotencyLockLayer::new(store), h);
    let key = unique("body");
    assert_eq!(
        send(&svc, post("/orders", Some(&key), "one")).await.status,
        201
    );
    let other = send(&svc, post("/orders", Some(&key), "two")).await;
    assert_eq!(other.status, 422);
    assert!(other.body.contains("problem") || other.body.contains("\"status\":422"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn bad_keys_get_400<B: IdempotencyStore + Clone>(store: B) {
    let (runs, h) = handler(0);
    let svc = service(IdempotencyLockLayer::new(store.clone()), h);
    let long = "k".repeat(256);
    for key in ["", long.as_str(), "has space", "tab\tkey", "\"", "\"\""] {
        let mut req = post("/orders", None, "x");
        req.headers_mut()
            .insert("idempotency-key", HeaderValue::from_str(key).unwrap());
        assert_eq!(send(&svc, req).await.status, 400, "{key:?}");
    }
    let mut req = post("/orders", None, "x");
    req.headers_mut().insert(
        "idempotency-key",
        HeaderValue::from_bytes(&[0xc3, 0xa9]).unwrap(),
    );
    assert_eq!(send(&svc, req).await.status, 400, "non-ASCII");
    // Two fields, even two valid and equal ones: which one was meant is unknown.
    for second in ["k2", "k1"] {
        let mut req = post("/orders", Some("k1"), "x");
        req.headers_mut()
            .append("idempotency-key", HeaderValue::from_static(second));
        assert_eq!(send(&svc, req).await.status, 400, "two fields");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Without a key: passes through, or 400 when required. GET is not concerned.
    assert_eq!(send(&svc, post("/orders", None, "x")).await.status, 201);
    let (_, h) = handler(0);
    let required = service(IdempotencyLockLayer::new(store).required(true), h);
    assert_eq!(
        send(&required, post("/orders", None, "x")).await.status,
        400
    );
    let get = Request::builder()
        .uri("/orders")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&required, get).await.status, 201);
}

async fn routes_and_tenants_are_isolated<B: IdempotencyStore + Clone>(store: B) {
    let (runs, h) = handler(0);
    let layer = IdempotencyLockLayer::new(store).partition(|parts| {
        parts
            .headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let svc = service(layer, h);
    let key = unique("iso");
    let tenant = |t: &str, path: &str| {
        let mut req = post(path, Some(&key), "x");
        req.headers_mut()
            .insert("x-tenant", HeaderValue::from_str(t).unwrap());
        req
    };
    for (t, path) in [("a", "/orders"), ("b", "/orders"), ("a", "/refunds")] {
        let answer = send(&svc, tenant(t, path)).await;
        assert_eq!((answer.status, answer.replayed), (201, false), "{t} {path}");
    }
    assert!(send(&svc, tenant("a", "/orders")).await.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

async fn renewal_keeps_a_long_handler_exclusive<B: IdempotencyStore + Clone>(a: B, b: B) {
    // The handler takes over 3 leases; the renewal keeps the claim, so a duplicate on another
    // replica is refused instead of running again. (A 600 ms lease leaves a renewal 400 ms to
    // land, enough on a loaded machine; 300 ms was not.)
    let (runs, h1) = handler(2000);
    let h2 = Handler {
        runs: runs.clone(),
        delay: h1.delay,
        fail_first: false,
    };
    let lease = Duration::from_millis(600);
    let first = service(IdempotencyLockLayer::new(a).lease(lease), h1);
    let second = service(IdempotencyLockLayer::new(b).lease(lease), h2);
    let key = unique("renew");
    let running = tokio::spawn({
        let key = key.clone();
        async move { send(&first, post("/orders", Some(&key), "x")).await }
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            send(&second, post("/orders", Some(&key), "x")).await.status,
            409
        );
    }
    assert_eq!(running.await.unwrap().status, 201);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        send(&second, post("/orders", Some(&key), "x"))
            .await
            .replayed
    );
}

/// The client goes away while the handler runs (the response future is dropped): the handler
/// is not cancelled, it runs to its end and its response is recorded. A duplicate meanwhile gets
/// 409; the retry gets the replay. (Before issue 11 the drop cancelled the handler and freed the
/// key, so the retry ran the handler a second time.)
async fn a_dropped_request_runs_to_its_end_and_is_replayed<B: IdempotencyStore + Clone>(store: B) {
    let (runs, h) = handler(400);
    let svc = service(IdempotencyLockLayer::new(store), h);
    let key = unique("drop");
    // Drop the request once its handler has begun (it holds the claim then), however long the
    // claim took on a loaded machine.
    let first = {
        let (svc, key) = (svc.clone(), key.clone());
        tokio::spawn(async move { send(&svc, post("/orders", Some(&key), "x")).await })
    };
    let started = tokio::time::Instant::now();
    while runs.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the handler never began"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    assert!(first.await.is_err_and(|e| e.is_cancelled()));
    let dup = send(&svc, post("/orders", Some(&key), "x")).await;
    assert_eq!(dup.status, 409, "the dropped request's claim was released");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retry = send(&svc, post("/orders", Some(&key), "x")).await;
    assert_eq!(
        (retry.status, retry.replayed, retry.order.as_deref()),
        (201, true, Some("1")),
        "the retry ran the handler again"
    );
    assert!(retry.body.starts_with("run=1 "), "{}", retry.body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A handler that panics: the panic reaches the caller and the claim is released, so the retry
/// runs.
async fn a_panicking_handler_releases_the_key<B: IdempotencyStore + Clone>(store: B) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let inner = service_fn(move |_req: Req| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(n > 1, "the handler panics on its first run");
            Ok::<_, Infallible>(Response::new(Full::from(format!("run={n}"))))
        }
    });
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLockLayer::new(store))
        .service(inner);
    let key = unique("panic");
    let first = tokio::spawn(svc.clone().oneshot(post("/orders", Some(&key), "x"))).await;
    assert!(
        first.is_err_and(|e| e.is_panic()),
        "the panic was swallowed"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retry = svc.oneshot(post("/orders", Some(&key), "x")).await.unwrap();
    assert_eq!(retry.status(), 200);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

async fn server_errors_are_not_stored_and_fences_grow<B: IdempotencyStore + Clone>(store: B) {
    let (runs, mut h) = handler(0);
    h.fail_first = true;
    let svc = service(IdempotencyLockLayer::new(store), h);
    let key = unique("5xx");
    let first = send(&svc, post("/orders", Some(&key), "x")).await;
    assert_eq!(first.status, 500);
    let second = send(&svc, post("/orders", Some(&key), "x")).await;
    assert_eq!(
        (second.status, second.replayed),
        (201, false),
        "a 5xx must not be replayed"
    );
    let fence = |body: &str| -> u64 {
        body.split("fence=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        fence(&second.body) > fence(&first.body),
        "fencing tokens must grow"
    );
    assert!(send(&svc, post("/orders", Some(&key), "x")).await.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

async fn scopes_keep_two_layers_apart<B: IdempotencyStore + Clone>(store: B) {
    let (runs, h) = handler(0);
    let layer = |scope: &str| IdempotencyLockLayer::new(store.clone()).scope(scope);
    let orders = service(layer("orders"), h);
    let refunds = service(layer("refunds"), sharing(&runs));
    let orders_replica = service(layer("orders"), sharing(&runs));
    let key = unique("scope");
    let first = send(&orders, post("/pay", Some(&key), "x")).await;
    assert_eq!((first.status, first.replayed), (201, false));
    // Another scope: another record, the handler runs.
    let other = send(&refunds, post("/pay", Some(&key), "x")).await;
    assert_eq!((other.status, other.replayed), (201, false));
    // The same scope on another replica: the same record, replayed.
    let replay = send(&orders_replica, post("/pay", Some(&key), "x")).await;
    assert!(replay.replayed);
    assert_eq!(replay.body, first.body);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

type FrameStream =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, io::Error>>>>;

/// A layer over a handler that answers `201` with `frames` as its body.
fn streaming<B: IdempotencyStore>(
    layer: IdempotencyLockLayer<B>,
    runs: Arc<AtomicUsize>,
    frames: fn() -> Vec<Result<Frame<Bytes>, io::Error>>,
) -> impl Service<Req, Response = Response<ResponseBody<FrameStream>>, Error = Infallible> + Clone {
    let inner = service_fn(move |_req: Req| {
        runs.fetch_add(1, Ordering::SeqCst);
        let mut res = Response::new(StreamBody::new(futures_util::stream::iter(frames())));
        *res.status_mut() = StatusCode::CREATED;
        async move { Ok::<_, Infallible>(res) }
    });
    ServiceBuilder::new().layer(layer).service(inner)
}

fn with_trailers() -> Vec<Result<Frame<Bytes>, io::Error>> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    vec![
        Ok(Frame::data(Bytes::from_static(b"made"))),
        Ok(Frame::trailers(trailers)),
    ]
}

fn failing() -> Vec<Result<Frame<Bytes>, io::Error>> {
    vec![
        Ok(Frame::data(Bytes::from_static(b"half"))),
        Err(io::Error::other("the handler's body failed")),
    ]
}

async fn trailers_are_passed_on_and_not_replayed<B: IdempotencyStore + Clone>(store: B) {
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = streaming(
        IdempotencyLockLayer::new(store),
        runs.clone(),
        with_trailers,
    );
    let key = unique("trailers");
    let first = svc
        .clone()
        .oneshot(post("/orders", Some(&key), "x"))
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let body = first.into_body().collect().await.unwrap();
    assert_eq!(
        body.trailers().map(|t| &t["grpc-status"]),
        Some(&HeaderValue::from_static("0")),
        "the trailers were dropped"
    );
    assert_eq!(body.to_bytes(), Bytes::from_static(b"made"));
    // Recorded as done but not replayable, like a response over the cap.
    let dup = svc.oneshot(post("/orders", Some(&key), "x")).await.unwrap();
    assert_eq!(dup.status(), 409);
    assert!(dup.headers().get("retry-after").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn a_failed_response_body_releases_the_key<B: IdempotencyStore + Clone>(store: B) {
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = streaming(IdempotencyLockLayer::new(store), runs.clone(), failing);
    let key = unique("failed");
    let first = svc
        .clone()
        .oneshot(post("/orders", Some(&key), "x"))
        .await
        .unwrap();
    assert!(first.into_body().collect().await.is_err());
    // The key was released: the retry runs.
    let retry = svc.oneshot(post("/orders", Some(&key), "x")).await.unwrap();
    assert_eq!(retry.status(), 201);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

async fn large_bodies<B: IdempotencyStore + Clone>(store: B) {
    let (runs, h) = handler(0);
    let svc = service(IdempotencyLockLayer::new(store).max_body(64), h);
    // A request body over the cap: 413, and the handler does not run.
    let big = "b".repeat(65);
    assert_eq!(
        send(&svc, post("/orders", Some(&unique("big")), &big))
            .await
            .status,
        413
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // A response over the cap is streamed whole; the request is done and not run again.
    let key = unique("bigresp");
    let body = "r".repeat(60);
    let first = send(&svc, post("/orders", Some(&key), &body)).await;
    assert_eq!(first.status, 201);
    assert!(first.body.ends_with(&body), "the large response was cut");
    assert_eq!(
        send(&svc, post("/orders", Some(&key), &body)).await.status,
        409
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Every scenario on one store, through two clients (two replicas).
async fn every_scenario(env: Env) {
    scenarios(env.store().await, env.store().await).await;
}

stores!(every_scenario);

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_503_or_runs_when_failing_open() {
    use tower_redis_layers::store::RedisStore;
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let (runs, h) = handler(0);
    let closed = service(
        IdempotencyLockLayer::new(store.clone()).store_timeout(Duration::from_millis(300)),
        h,
    );
    let h = Handler {
        runs: runs.clone(),
        delay: Duration::ZERO,
        fail_first: false,
    };
    let open = service(
        IdempotencyLockLayer::new(store)
            .store_timeout(Duration::from_millis(300))
            .on_store_error(FailureMode::Open),
        h,
    );
    server.stop();
    let answer = send(&closed, post("/orders", Some("k1"), "x")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.retry_after.as_deref(), Some("1"));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the request ran unprotected"
    );
    assert_eq!(
        send(&open, post("/orders", Some("k1"), "x")).await.status,
        201
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Back: protected again.
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let answer = send(&closed, post("/orders", Some("k2"), "x")).await;
        if answer.status == 201 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        send(&closed, post("/orders", Some("k2"), "x"))
            .await
            .replayed
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_first_execution_and_per_replay() {
    use tower_redis_layers::store::RedisStore;
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let (_, h) = handler(0);
    let svc = service(IdempotencyLockLayer::new(store), h);
    // Warm up: load the scripts.
    send(&svc, post("/orders", Some("warm"), "x")).await;
    let calls = || server.command_calls("evalsha") + server.command_calls("eval");
    let before = calls();
    assert!(!send(&svc, post("/orders", Some("rt"), "x")).await.replayed);
    let first = calls() - before;
    let before = calls();
    assert!(send(&svc, post("/orders", Some("rt"), "x")).await.replayed);
    let replay = calls() - before;
    println!("round trips: first execution {first}, replay {replay}");
    assert_eq!(first, 2, "claim + complete");
    assert_eq!(replay, 1, "claim only");
}

#[tokio::test]
async fn a_rejection_builder_shapes_the_layers_own_responses() {
    use tower_redis_layers::idempotency::Rejection;
    let (runs, h) = handler(300);
    let layer = IdempotencyLockLayer::new(MemoryStore::new())
        .required(true)
        .max_body(8)
        .rejection(|why: &Rejection| {
            let mut res = Response::new(Bytes::from(format!("custom {why:?}")));
            *res.status_mut() = why.status();
            if *why == Rejection::MissingKey {
                res.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("7"));
            }
            res
        });
    let svc = service(layer, h);
    let missing = send(&svc, post("/orders", None, "x")).await;
    assert_eq!(
        (missing.status, missing.body.as_str()),
        (400, "custom MissingKey")
    );
    assert_eq!(missing.retry_after.as_deref(), Some("7"));
    let invalid = send(&svc, post("/orders", Some("has space"), "x")).await;
    assert_eq!(
        (invalid.status, invalid.body.as_str()),
        (400, "custom InvalidKey")
    );
    let large = send(&svc, post("/orders", Some("big"), "123456789")).await;
    assert_eq!(
        (large.status, large.body.as_str()),
        (413, "custom TooLarge")
    );
    // In flight: the layer adds `Retry-After` (the time left on the 10 s lease) since the
    // builder gave none (issue 11; it was a constant 1).
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, post("/orders", Some("k"), "one")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dup = send(&svc, post("/orders", Some("k"), "one")).await;
    assert_eq!((dup.status, dup.body.as_str()), (409, "custom InFlight"));
    assert_eq!(dup.retry_after.as_deref(), Some("10"));
    assert_eq!(first.await.unwrap().status, 201);
    let other = send(&svc, post("/orders", Some("k"), "two")).await;
    assert_eq!(
        (other.status, other.body.as_str()),
        (422, "custom Mismatch")
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A memory store whose idempotency calls never answer while `stalled` is set (a stopped
/// server).
#[derive(Clone, Default)]
struct Stalling {
    store: MemoryStore,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    /// The next claim reaches the store, but its answer never comes back.
    lose_next_claim_answer: Arc<std::sync::atomic::AtomicBool>,
}

impl Stalling {
    /// `call()`, or, while stalled, a call that never reaches the store and never answers.
    fn call<T: Send + 'static>(&self, call: impl FnOnce() -> StoreFuture<T>) -> StoreFuture<T> {
        if self.stalled.load(Ordering::SeqCst) {
            Box::pin(std::future::pending())
        } else {
            call()
        }
    }
}

impl IdempotencyStore for Stalling {
    fn claim(&self, k: &StoreKey, r: ClaimRequest<'_>) -> StoreFuture<Claim> {
        if self.lose_next_claim_answer.swap(false, Ordering::SeqCst) {
            drop(self.store.claim(k, r)); // the memory store acts when called
            return Box::pin(std::future::pending());
        }
        self.call(|| self.store.claim(k, r))
    }
    fn complete(&self, k: &StoreKey, t: &str, r: Vec<u8>, d: Duration) -> StoreFuture<bool> {
        self.call(|| self.store.complete(k, t, r, d))
    }
    fn extend_claim(&self, k: &StoreKey, t: &str, l: Duration) -> StoreFuture<bool> {
        self.call(|| self.store.extend_claim(k, t, l))
    }
    fn release_claim(&self, k: &StoreKey, t: &str) -> StoreFuture<bool> {
        self.call(|| self.store.release_claim(k, t))
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_store_answers_503_within_the_store_timeout_or_runs_when_open() {
    let store = Stalling::default();
    store.stalled.store(true, Ordering::SeqCst);
    let (runs, h) = handler(0);
    let closed = service(IdempotencyLockLayer::new(store.clone()), h);
    let start = tokio::time::Instant::now();
    let answer = send(&closed, post("/orders", Some("k1"), "x")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.retry_after.as_deref(), Some("1"));
    assert!(answer.body.contains("\"status\":503"));
    assert_eq!(start.elapsed(), Duration::from_secs(1), "the default bound");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the request ran unprotected"
    );

    let open = IdempotencyLockLayer::new(store)
        .store_timeout(Duration::from_millis(200))
        .on_store_error(FailureMode::Open);
    let open = service(open, sharing(&runs));
    let start = tokio::time::Instant::now();
    let answer = send(&open, post("/orders", Some("k1"), "x")).await;
    assert_eq!((answer.status, answer.replayed), (201, false));
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn storing_the_response_is_bounded_by_the_store_timeout() {
    // Storing the response and renewing the lease time out; the response is still passed on.
    let store = Stalling::default();
    let stalled = store.stalled.clone();
    let inner = service_fn(move |_req: Req| {
        stalled.store(true, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::from("made"))) }
    });
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLockLayer::new(store).store_timeout(Duration::from_millis(300)))
        .service(inner);
    let start = tokio::time::Instant::now();
    let res = svc.oneshot(post("/orders", Some("k"), "x")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(b"made"));
}

#[tokio::test]
async fn the_service_is_built_and_taken_apart_like_tower_http_services() {
    use tower_redis_layers::idempotency::IdempotencyLock;
    let (runs, h) = handler(0);
    let inner = service(IdempotencyLockLayer::new(MemoryStore::new()), h);
    // `new` with the default options, or `layer` for a layer to configure.
    let mut svc = IdempotencyLock::new(inner, MemoryStore::new());
    let _: &Svc = svc.get_ref();
    let _: &mut Svc = svc.get_mut();
    let answer = svc
        .ready()
        .await
        .unwrap()
        .call(post("/orders", Some("k"), "x"))
        .await
        .unwrap();
    assert_eq!(answer.status(), 201);
    let inner: Svc = svc.into_inner();
    assert_eq!(send(&inner, post("/other", None, "x")).await.status, 201);
    let layer = IdempotencyLock::layer(MemoryStore::new()).required(true);
    let wrapped = ServiceBuilder::new().layer(layer).service(inner);
    let answer = wrapped.oneshot(post("/orders", None, "x")).await.unwrap();
    assert_eq!(answer.status(), 400);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A handler that counts its runs, answers `run=<n>`, and stalls `store` once it has run.
fn stalling_after_run(
    store: &Stalling,
    layer: IdempotencyLockLayer<Stalling>,
) -> (Arc<AtomicUsize>, Svc) {
    let runs = Arc::new(AtomicUsize::new(0));
    let (counted, stalled) = (runs.clone(), store.stalled.clone());
    let inner = service_fn(move |_req: Req| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        stalled.store(true, Ordering::SeqCst);
        async move { Ok::<_, Infallible>(Response::new(Full::from(format!("run={n}")))) }
    });
    let svc = BoxCloneSyncService::new(ServiceBuilder::new().layer(layer).service(inner));
    (runs, svc)
}

#[tokio::test(start_paused = true)]
async fn a_failed_completion_is_retried_in_the_background_until_it_lands() {
    // The store stops answering once the handler has run: storing the response times out. The
    // client still gets its response after one store timeout; the claim stays in flight (409
    // with Retry-After from the lease) and the completion lands once the store answers again.
    // Before issue 11 the response was never stored and the retry ran the handler again.
    let store = Stalling::default();
    let layer = IdempotencyLockLayer::new(store.clone()).store_timeout(Duration::from_millis(300));
    let (runs, svc) = stalling_after_run(&store, layer);
    let start = tokio::time::Instant::now();
    let first = send(&svc, post("/orders", Some("k"), "x")).await;
    assert_eq!((first.status, first.body.as_str()), (200, "run=1"));
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(300),
        "the client waited"
    );
    // The store is away for 2 s (duplicates meanwhile get 503: the claim cannot be read).
    tokio::time::sleep(Duration::from_secs(2)).await;
    store.stalled.store(false, Ordering::SeqCst);
    let dup = send(&svc, post("/orders", Some("k"), "x")).await;
    assert_eq!(dup.status, 409, "the claim was dropped: {}", dup.body);
    assert_eq!(
        dup.retry_after.as_deref(),
        Some("8"),
        "10 s lease, 2.3 s in"
    );
    // The next retry of the completion (backoff 100 ms doubling) lands.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let replay = send(&svc, post("/orders", Some("k"), "x")).await;
    assert_eq!(
        (replay.status, replay.replayed, replay.body.as_str()),
        (200, true, "run=1")
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran again");
}

#[tokio::test(start_paused = true)]
async fn a_background_completion_stops_when_the_store_says_the_claim_is_gone() {
    // The store is away for longer than the lease: the record expires, and when the store
    // answers again the retried completion is refused (the token no longer holds) and stops:
    // it does not overwrite the response of the request that ran next.
    let store = Stalling::default();
    let layer = IdempotencyLockLayer::new(store.clone())
        .store_timeout(Duration::from_millis(300))
        .lease(Duration::from_secs(2));
    let (runs, svc) = stalling_after_run(&store, layer);
    assert_eq!(
        send(&svc, post("/orders", Some("k"), "x")).await.status,
        200
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    store.stalled.store(false, Ordering::SeqCst);
    // The record expired with its lease: the next request claims it and runs.
    let next = send(&svc, post("/orders", Some("k"), "x")).await;
    assert_eq!(
        (next.status, next.replayed, next.body.as_str()),
        (200, false, "run=2")
    );
    store.stalled.store(false, Ordering::SeqCst);
    // Let the first request's background completion try again (backoff up to 5 s).
    tokio::time::sleep(Duration::from_secs(20)).await;
    let replay = send(&svc, post("/orders", Some("k"), "x")).await;
    assert_eq!(
        (replay.status, replay.replayed, replay.body.as_str()),
        (200, true, "run=2"),
        "a late completion overwrote the record"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_claim_whose_answer_was_lost_is_released_once_the_store_answers() {
    // The claim reaches the store but its answer is lost: 503 after the store timeout. The store
    // then stops answering for 2 s; once it answers again, the layer releases the claim with the
    // request's token, so the retry runs instead of getting 409 for the whole 10 s lease.
    let store = Stalling::default();
    let (runs, h) = handler(0);
    let svc = service(IdempotencyLockLayer::new(store.clone()), h);
    store.lose_next_claim_answer.store(true, Ordering::SeqCst);
    let lost = send(&svc, post("/orders", Some("k"), "x")).await;
    assert_eq!(lost.status, 503);
    store.stalled.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    store.stalled.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let retry = send(&svc, post("/orders", Some("k"), "x")).await;
    assert_eq!(
        (retry.status, retry.replayed),
        (201, false),
        "the key stayed blocked: {}",
        retry.body
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
