//! Cache and idempotency through a stalled Redis (see the [parent](super) for the figures).

use super::*;
use tower_redis_layers::cache::CacheHandle;

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

/// Tries `attempt` every 10 ms until it says yes, for at most 5 s; how long since `from`.
async fn until<F, Fut>(from: Instant, what: &str, mut attempt: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    while !attempt().await {
        assert!(from.elapsed() < Duration::from_secs(5), "no {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    from.elapsed()
}

/// A cache (store timeout 1 s) over a handler that counts its runs on `runs`, and its handle.
fn cache_service(store: AnyStore, runs: Arc<Mutex<usize>>) -> (Svc, CacheHandle) {
    let layer = CacheLayer::new(store)
        .jitter(0.0)
        .early_recompute(0.0)
        .store_timeout(Duration::from_secs(1));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_req: Request<String>| {
            let n = {
                let mut runs = runs.lock().unwrap();
                *runs += 1;
                *runs
            };
            std::future::ready(Ok::<_, Infallible>(Response::new(format!("run {n}"))))
        }))
        .map_response(|r| r.status());
    (BoxCloneSyncService::new(svc), handle)
}

/// The idempotency layer (store timeout 1 s) over a handler that counts its runs per key.
fn idempotency_service(
    store: AnyStore,
    runs: Arc<Mutex<HashMap<String, usize>>>,
) -> Svc<Full<Bytes>> {
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLockLayer::new(store).store_timeout(Duration::from_secs(1)))
        .service(service_fn(move |req: Request<Full<Bytes>>| {
            let key = req.headers()["idempotency-key"]
                .to_str()
                .unwrap()
                .to_owned();
            *runs.lock().unwrap().entry(key).or_default() += 1;
            let body = Full::new(Bytes::from("done"));
            std::future::ready(Ok::<_, Infallible>(Response::new(body)))
        }))
        .map_response(|r| r.status());
    BoxCloneSyncService::new(svc)
}

async fn cache_through_a_stall(client: Client) {
    let server = RedisServer::start();
    let store = connect(client, &server.url()).await;
    let runs = Arc::new(Mutex::new(0usize));
    let (svc, handle) = cache_service(store.clone(), runs.clone());
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
    let served_again = until(back, "a hit after the outage", || async {
        let runs_before = *runs.lock().unwrap();
        let res = svc.clone().oneshot(get(0)).await.unwrap();
        assert_eq!(res, StatusCode::OK);
        *runs.lock().unwrap() == runs_before
    })
    .await;
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
    let svc = idempotency_service(store.clone(), runs.clone());
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
    let replayed = until(back, "no 503 after the outage", || async {
        let status = svc.clone().oneshot(post("first")).await.unwrap();
        assert!(matches!(
            status,
            StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE
        ));
        status == StatusCode::OK
    })
    .await;
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
