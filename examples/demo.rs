//! The demo: every layer of the crate on one small service.
//!
//! ```text
//! cargo run --example demo                                   # in-memory store
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example demo  # redis-rs store
//! DEMO_BACKEND=fred REDIS_URL=redis://127.0.0.1:6379 cargo run --example demo --features fred
//! ```
//!
//! Serves on `127.0.0.1:$PORT` (default 3000) and prints `listening on http://127.0.0.1:PORT`
//! once ready. The rate-limit key is the `x-api-key` header, else the peer IP.
//!
//! - `GET /fixed`: fixed window, 5 requests per 10 s
//! - `GET /sliding`: sliding window log, 5 requests per 10 s
//! - `GET /bucket`: token bucket, capacity 5, refill 1 token per second
//! - `POST /orders`: idempotent with an `Idempotency-Key` header; the handler takes 300 ms and
//!   answers `201` with an order number and the echoed request body
//! - `GET /cached/{id}`: cached for 30 s; the handler sleeps 200 ms and answers JSON with the
//!   `id` and how many times it has run in this process
//! - `POST /cached/invalidate`: invalidates every `/cached/{id}` entry (one segment)
//! - `GET /stats`: how many times each handler ran in this process (JSON)

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::{HeaderName, StatusCode},
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Value};
use tower_redis_layers::{
    cache::CacheLayer,
    idempotency::IdempotencyLockLayer,
    rate_limit::{Headers, KeyExtractor, RateLimitLayer, Rule},
    store::{CacheStore, IdempotencyStore, MemoryStore, RateLimitStore},
};

#[derive(Default)]
struct Stats {
    fixed: AtomicU64,
    sliding: AtomicU64,
    bucket: AtomicU64,
    orders: AtomicU64,
    cached: AtomicU64,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p
            .parse()
            .map_err(|_| format!("PORT must be a port number, got {p:?}"))?,
        Err(_) => 3000,
    };
    let redis_url = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    let store_name = std::env::var("DEMO_BACKEND").unwrap_or_default();

    let app = match (store_name.as_str(), redis_url) {
        ("fred", url) => fred_app(url.as_deref().unwrap_or("redis://127.0.0.1:6379")).await?,
        ("" | "redis", Some(url)) => redis_app(&url).await?,
        ("" | "memory", None) => app(MemoryStore::new()),
        (other, _) => {
            return Err(format!("unknown DEMO_BACKEND {other:?} (memory, redis, fred)").into())
        }
    };

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let port = listener.local_addr()?.port();
    println!("listening on http://127.0.0.1:{port}");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

#[cfg(feature = "redis")]
async fn redis_app(url: &str) -> Result<Router, Error> {
    let store = tower_redis_layers::store::RedisStore::connect(url).await?;
    eprintln!("rate-limit store: redis at {url}");
    Ok(app(store))
}

#[cfg(not(feature = "redis"))]
async fn redis_app(_url: &str) -> Result<Router, Error> {
    Err("REDIS_URL is set but the `redis` feature is off".into())
}

#[cfg(feature = "fred")]
async fn fred_app(url: &str) -> Result<Router, Error> {
    let store = tower_redis_layers::store::FredStore::connect(url).await?;
    eprintln!("rate-limit store: fred at {url}");
    Ok(app(store))
}

#[cfg(not(feature = "fred"))]
async fn fred_app(_url: &str) -> Result<Router, Error> {
    Err("DEMO_BACKEND=fred needs `--features fred`".into())
}

fn app<B: RateLimitStore + IdempotencyStore + CacheStore + Clone>(store: B) -> Router {
    let stats = Arc::new(Stats::default());
    let key =
        KeyExtractor::header(HeaderName::from_static("x-api-key")).or(KeyExtractor::peer_ip());
    let limit = |rule: Rule| {
        RateLimitLayer::new(store.clone(), rule)
            .key(key.clone())
            .headers(Headers::All)
    };
    let ten_s = Duration::from_secs(10);
    let cache = CacheLayer::new(store.clone())
        .scope("demo-cached")
        .ttl(Duration::from_secs(30));
    let cache_handle = cache.handle();
    Router::new()
        .route(
            "/fixed",
            get(|State(s): State<Arc<Stats>>| async move { run(&s.fixed, "fixed") })
                .layer(limit(Rule::fixed_window(5, ten_s).name("fixed"))),
        )
        .route(
            "/sliding",
            get(|State(s): State<Arc<Stats>>| async move { run(&s.sliding, "sliding") })
                .layer(limit(Rule::sliding_log(5, ten_s).name("sliding"))),
        )
        .route(
            "/bucket",
            get(|State(s): State<Arc<Stats>>| async move { run(&s.bucket, "bucket") }).layer(
                limit(Rule::token_bucket(5, 1, Duration::from_secs(1)).name("bucket")),
            ),
        )
        .route(
            "/orders",
            post(create_order).layer(IdempotencyLockLayer::new(store.clone())),
        )
        .route("/cached/{id}", get(cached_handler).layer(cache))
        .route(
            "/cached/invalidate",
            post(move || async move {
                match cache_handle.invalidate().await {
                    Ok(()) => (StatusCode::OK, Json(json!({ "invalidated": true }))),
                    Err(error) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({ "invalidated": false, "error": error.to_string() })),
                    ),
                }
            }),
        )
        .route("/stats", get(stats_handler))
        .with_state(stats)
}

fn run(counter: &AtomicU64, route: &str) -> Json<Value> {
    let runs = counter.fetch_add(1, Ordering::Relaxed) + 1;
    Json(json!({ "route": route, "runs": runs }))
}

async fn create_order(State(s): State<Arc<Stats>>, body: String) -> (StatusCode, Json<Value>) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let order = s.orders.fetch_add(1, Ordering::Relaxed) + 1;
    let echoed = serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body));
    (
        StatusCode::CREATED,
        Json(json!({ "order": order, "body": echoed })),
    )
}

async fn cached_handler(State(s): State<Arc<Stats>>, Path(id): Path<String>) -> Json<Value> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let runs = s.cached.fetch_add(1, Ordering::Relaxed) + 1;
    Json(json!({ "id": id, "runs": runs }))
}

async fn stats_handler(State(s): State<Arc<Stats>>) -> Json<Value> {
    Json(json!({
        "fixed": s.fixed.load(Ordering::Relaxed),
        "sliding": s.sliding.load(Ordering::Relaxed),
        "bucket": s.bucket.load(Ordering::Relaxed),
        "orders": s.orders.load(Ordering::Relaxed),
        "cached": s.cached.load(Ordering::Relaxed),
    }))
}
