//! The demo: every layer of the crate on one small service.
//!
//! ```text
//! cargo run --example demo                                   # in-memory store
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example demo  # redis-rs store
//! DEMO_BACKEND=fred REDIS_URL=redis://127.0.0.1:6379 cargo run --example demo --features fred
//! ```
//!
//! Serves on `127.0.0.1:$PORT` (default 3000) and prints `listening on http://127.0.0.1:PORT`
//! once ready, then the store in use and every route with a `curl` line to try. The rate-limit
//! key is the `x-api-key` header, else the peer IP. The demo does not check API keys, so each
//! new `x-api-key` value is a new budget: a real service keys on a header only once it is
//! authenticated.
//!
//! Behind reverse proxies, set `TRUSTED_PROXIES` to how many proxies are in front of the demo
//! (`TRUSTED_PROXIES=1`) or to their CIDR ranges (`TRUSTED_PROXIES=10.0.0.0/8,127.0.0.1/32`):
//! then the key without an `x-api-key` is the client address those proxies wrote to
//! `X-Forwarded-For` (IPv6 clients grouped by /64), not the proxy's address. Unset, it is the
//! peer IP.
//!
//! - `GET /fixed`: fixed window, 5 requests per 10 s
//! - `GET /sliding`: sliding window log, 5 requests per 10 s
//! - `GET /bucket`: token bucket, capacity 5, refill 1 token per second
//! - `POST /orders`: idempotent with an `Idempotency-Key` header; the handler takes 300 ms and
//!   answers `201` with an order number and the echoed request body
//! - `GET /cached/{id}`: cached for 30 s; the handler sleeps 200 ms and answers JSON with the
//!   `id` and how many times it has run in this process
//! - `POST /cached/invalidate`: invalidates every `/cached/{id}` entry (one segment)
//! - `POST /generate`: a metered budget of 10,000 tokens per minute (rule `tokens`); the handler
//!   answers `200` with `{"tokens": n}`, n random from 50 to 500, and reports n to the layer
//!   ([`ActualCost`]): a request is admitted if the estimate (500, the largest answer) fits,
//!   and the difference is refunded after the response
//! - `GET /stats`: how many times each handler ran in this process (JSON); for `/orders`, also
//!   how many began (`orders_started`, counted before the 300 ms of work), so that a handler
//!   cancelled half-way shows as `orders_started` > `orders`; `tokens`, the tokens `/generate`
//!   reported for settlement in this process
//!
//! Ctrl-C (SIGINT) or SIGTERM stops it gracefully: it stops accepting connections and lets the
//! requests in flight finish (an order being made completes and its record is stored). A startup
//! error is one line on stderr, `error: ...`, naming what failed and the URL or port, and the
//! exit code is 1.

use std::{
    future::Future,
    io::Write,
    net::SocketAddr,
    process::ExitCode,
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
    Extension, Json, Router,
};
use serde_json::{json, Value};
use tower_redis_layers::{
    cache::CacheLayer,
    idempotency::IdempotencyLockLayer,
    rate_limit::{
        ActualCost, Headers, KeyExtractor, Policy, RateLimitLayer, Rule, Settlement, Trusted,
    },
    store::{CacheStore, IdempotencyStore, MemoryStore, RateLimitStore},
};

#[derive(Default)]
struct Stats {
    fixed: AtomicU64,
    sliding: AtomicU64,
    bucket: AtomicU64,
    /// `/orders` handlers that began (counted before the 300 ms of work): more than `orders`
    /// when a handler was cancelled half-way.
    orders_started: AtomicU64,
    orders: AtomicU64,
    cached: AtomicU64,
    /// The tokens `/generate` reported (the actual costs settled).
    tokens: AtomicU64,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Every route: method, path, what it does, and the arguments of a `curl` line to try it.
const ROUTES: &[(&str, &str, &str, &str)] = &[
    (
        "GET",
        "/fixed",
        "fixed window, 5 requests per 10 s",
        "-i {base}/fixed",
    ),
    (
        "GET",
        "/sliding",
        "sliding window log, 5 requests per 10 s",
        "-i {base}/sliding",
    ),
    (
        "GET",
        "/bucket",
        "token bucket, capacity 5, refill 1 token per second",
        "-i -H 'x-api-key: alice' {base}/bucket",
    ),
    (
        "POST",
        "/orders",
        "idempotent per Idempotency-Key; takes 300 ms, answers 201",
        "-i -X POST -H 'Idempotency-Key: a1' -d '{\"item\":\"book\"}' {base}/orders",
    ),
    (
        "GET",
        "/cached/{id}",
        "cached 30 s; the handler sleeps 200 ms",
        "-i {base}/cached/7",
    ),
    (
        "POST",
        "/cached/invalidate",
        "invalidates every /cached/{id} entry",
        "-i -X POST {base}/cached/invalidate",
    ),
    (
        "POST",
        "/generate",
        "10,000 tokens per minute, settled after the response",
        "-i -X POST {base}/generate",
    ),
    (
        "GET",
        "/stats",
        "how many times each handler ran (JSON)",
        "-s {base}/stats",
    ),
];

/// The store the environment asks for, and where that choice came from.
enum StoreChoice {
    Memory,
    Redis { url: String },
    Fred { url: String, from: &'static str },
}

#[tokio::main]
async fn main() -> ExitCode {
    // Logs go to stderr: stdout starts with the listening line, which scripts wait for.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> Result<(), Error> {
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p
            .parse()
            .map_err(|_| format!("PORT must be a port number, got {p:?}"))?,
        Err(_) => 3000,
    };
    let choice = store_choice()?;
    // Checked here so that a bad TRUSTED_PROXIES is a startup error; `app` reads it again.
    rate_limit_key()?;
    let (app, store) = match &choice {
        StoreChoice::Memory => (
            app(MemoryStore::new()),
            "memory (in this process)".to_owned(),
        ),
        StoreChoice::Redis { url } => (redis_app(url).await?, format!("redis at {url}")),
        StoreChoice::Fred { url, from } => (fred_app(url, from).await?, format!("fred at {url}")),
    };
    // Installed before the listening line, so that no signal sent after it is missed.
    let shutdown = shutdown_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port} (PORT): {e}"))?;
    let port = listener.local_addr()?.port();
    print_banner(port, &store);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    Ok(())
}

/// Reads `DEMO_BACKEND` (memory, redis, fred; empty: memory, or redis when `REDIS_URL` is set)
/// and `REDIS_URL` (empty counts as unset).
fn store_choice() -> Result<StoreChoice, String> {
    let redis_url = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    let name = std::env::var("DEMO_BACKEND").unwrap_or_default();
    match (name.as_str(), redis_url) {
        ("fred", Some(url)) => Ok(StoreChoice::Fred {
            url,
            from: "REDIS_URL",
        }),
        ("fred", None) => Ok(StoreChoice::Fred {
            url: "redis://127.0.0.1:6379".into(),
            from: "the default; set REDIS_URL",
        }),
        ("" | "redis", Some(url)) => Ok(StoreChoice::Redis { url }),
        ("" | "memory", None) => Ok(StoreChoice::Memory),
        ("redis", None) => Err("DEMO_BACKEND=redis needs REDIS_URL (for example \
                                redis://127.0.0.1:6379)"
            .into()),
        ("memory", Some(url)) => Err(format!(
            "DEMO_BACKEND=memory but REDIS_URL is set ({url}): unset one of them"
        )),
        (other, _) => Err(format!(
            "unknown DEMO_BACKEND {other:?} (memory, redis, fred)"
        )),
    }
}

/// The listening line (the first line, which scripts wait for), then the store and the routes.
/// Write errors are ignored: a closed stdout must not stop the server.
fn print_banner(port: u16, store: &str) {
    let base = format!("http://127.0.0.1:{port}");
    let mut text = format!("listening on {base}\nstore: {store}\n");
    let client = match std::env::var("TRUSTED_PROXIES") {
        Ok(t) if !t.trim().is_empty() => format!("the client behind TRUSTED_PROXIES={t}"),
        _ => "the peer IP".to_owned(),
    };
    text.push_str(&format!(
        "routes (rate-limit key: the x-api-key header, else {client}):\n"
    ));
    for (method, path, what, curl) in ROUTES {
        text.push_str(&format!("  {method:<4} {path:<18} {what}\n"));
        text.push_str(&format!("       curl {}\n", curl.replace("{base}", &base)));
    }
    text.push_str("Ctrl-C or SIGTERM stops the server once the requests in flight are done\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM (what Docker, Kubernetes and systemd send).
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            let _ = writeln!(
                std::io::stderr(),
                "shutting down: finishing the requests in flight"
            );
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// A store error as a person reads it: the cause, without the wrapper's Debug form.
#[cfg(any(feature = "redis", feature = "fred"))]
fn cause(error: &tower_redis_layers::StoreError) -> String {
    use tower_redis_layers::StoreError;
    match error {
        StoreError::Store(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

#[cfg(feature = "redis")]
async fn redis_app(url: &str) -> Result<Router, Error> {
    let store = tower_redis_layers::store::RedisStore::connect(url)
        .await
        .map_err(|e| {
            format!(
                "cannot connect to Redis at {url} (REDIS_URL): {}",
                cause(&e)
            )
        })?;
    Ok(app(store))
}

#[cfg(not(feature = "redis"))]
async fn redis_app(_url: &str) -> Result<Router, Error> {
    Err("REDIS_URL is set but the `redis` feature is off".into())
}

#[cfg(feature = "fred")]
async fn fred_app(url: &str, from: &str) -> Result<Router, Error> {
    let store = tower_redis_layers::store::FredStore::connect(url)
        .await
        .map_err(|e| format!("cannot connect to Redis at {url} ({from}): {}", cause(&e)))?;
    Ok(app(store))
}

#[cfg(not(feature = "fred"))]
async fn fred_app(_url: &str, _from: &str) -> Result<Router, Error> {
    Err("DEMO_BACKEND=fred needs `--features fred`".into())
}

/// The rate-limit key: the `x-api-key` header, else the peer IP, or with `TRUSTED_PROXIES` set
/// (a hop count or CIDR ranges) the client address behind those proxies.
fn rate_limit_key() -> Result<KeyExtractor, String> {
    let api_key = KeyExtractor::header(HeaderName::from_static("x-api-key"));
    match std::env::var("TRUSTED_PROXIES") {
        Ok(trusted) if !trusted.trim().is_empty() => {
            let trusted: Trusted = trusted
                .parse()
                .map_err(|e| format!("TRUSTED_PROXIES: {e}"))?;
            Ok(api_key.or(KeyExtractor::forwarded_for(trusted)))
        }
        _ => Ok(api_key.or(KeyExtractor::peer_ip())),
    }
}

fn app<B: RateLimitStore + IdempotencyStore + CacheStore + Clone>(store: B) -> Router {
    let stats = Arc::new(Stats::default());
    // Checked in `serve` before the app is built.
    let key = rate_limit_key().unwrap_or_else(|_| KeyExtractor::peer_ip());
    let limit = |name: &str, rule: Rule| {
        RateLimitLayer::new(store.clone(), Policy::new(name, rule))
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
                .layer(limit("fixed", Rule::fixed_window(5, ten_s).name("fixed"))),
        )
        .route(
            "/sliding",
            get(|State(s): State<Arc<Stats>>| async move { run(&s.sliding, "sliding") }).layer(
                limit("sliding", Rule::sliding_log(5, ten_s).name("sliding")),
            ),
        )
        .route(
            "/bucket",
            get(|State(s): State<Arc<Stats>>| async move { run(&s.bucket, "bucket") }).layer(
                limit(
                    "bucket",
                    Rule::token_bucket(5, 1, Duration::from_secs(1)).name("bucket"),
                ),
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
        .route(
            "/generate",
            post(generate).layer(
                limit(
                    "tokens",
                    Rule::fixed_window(10_000, Duration::from_secs(60)).name("tokens"),
                )
                .cost(|_| MAX_TOKENS)
                .settlement(Settlement::extension()),
            ),
        )
        .route("/stats", get(stats_handler))
        .with_state(stats)
}

fn run(counter: &AtomicU64, route: &str) -> Json<Value> {
    let runs = counter.fetch_add(1, Ordering::Relaxed) + 1;
    Json(json!({ "route": route, "runs": runs }))
}

async fn create_order(State(s): State<Arc<Stats>>, body: String) -> (StatusCode, Json<Value>) {
    s.orders_started.fetch_add(1, Ordering::Relaxed);
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

/// The most tokens `/generate` answers: its estimate, so its budget is never overrun.
const MAX_TOKENS: u64 = 500;

/// "Generates" 50 to 500 tokens and reports how many to the rate-limit layer, which charges
/// them instead of the estimate.
async fn generate(State(s): State<Arc<Stats>>) -> (Extension<ActualCost>, Json<Value>) {
    let tokens = rand::random_range(50..=MAX_TOKENS);
    s.tokens.fetch_add(tokens, Ordering::Relaxed);
    (
        Extension(ActualCost(tokens)),
        Json(json!({ "tokens": tokens })),
    )
}

async fn stats_handler(State(s): State<Arc<Stats>>) -> Json<Value> {
    Json(json!({
        "fixed": s.fixed.load(Ordering::Relaxed),
        "sliding": s.sliding.load(Ordering::Relaxed),
        "bucket": s.bucket.load(Ordering::Relaxed),
        "orders_started": s.orders_started.load(Ordering::Relaxed),
        "orders": s.orders.load(Ordering::Relaxed),
        "cached": s.cached.load(Ordering::Relaxed),
        "tokens": s.tokens.load(Ordering::Relaxed),
    }))
}
