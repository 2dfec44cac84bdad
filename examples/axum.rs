//! Quickstart: rate-limit an axum app, per API key (else per peer IP).
//!
//! ```text
//! cargo run --example axum                                   # in-memory store
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example axum  # shared through Redis
//! ```
//!
//! Serves on `127.0.0.1:$PORT` (default 3001); an empty `REDIS_URL` counts as unset, and a
//! `PORT` that is not a port number is an error, as in the demo. Ctrl-C or SIGTERM stops it
//! once the requests in flight are done.

use std::{future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use axum::{http::HeaderName, routing::get, Router};
use tower_redis_layers::{
    rate_limit::{Headers, KeyExtractor, Policy, RateLimitLayer, Rule},
    store::{MemoryStore, RateLimitStore, RedisStore},
    StoreError,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    // Logs go to stderr (RUST_LOG, default warn): stdout starts with the listening line.
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
        Err(_) => 3001,
    };
    let (app, store) = match std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) {
        Some(url) => {
            let redis = RedisStore::connect(&url).await.map_err(|e| {
                let cause = match e {
                    StoreError::Store(inner) => inner.to_string(),
                    other => other.to_string(),
                };
                format!("cannot connect to Redis at {url} (REDIS_URL): {cause}")
            })?;
            (app(redis), format!("redis at {url}"))
        }
        None => (app(MemoryStore::new()), "memory (in this process)".into()),
    };
    let shutdown = shutdown_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port} (PORT): {e}"))?;
    println!(
        "listening on http://127.0.0.1:{}",
        listener.local_addr()?.port()
    );
    println!("store: {store}");
    // ConnectInfo gives the layer the peer address; the requests in flight finish on shutdown.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    Ok(())
}

fn app<B: RateLimitStore + Clone>(store: B) -> Router {
    let key =
        KeyExtractor::header(HeaderName::from_static("x-api-key")).or(KeyExtractor::peer_ip());
    // 10 per second AND 1000 per hour, checked in one atomic call.
    let api = Policy::new(
        "api",
        Rule::gcra(10, Duration::from_secs(1), 10).name("per-second"),
    )
    .rule(Rule::fixed_window(1000, Duration::from_secs(3600)).name("per-hour"));
    let api_limit = RateLimitLayer::new(store.clone(), api)
        .key(key.clone())
        .headers(Headers::All)
        // axum's own `Body` in the responses: the router does not box it again.
        .inner_body();
    // A stricter, exact limit on one route only.
    let login_limit = RateLimitLayer::new(
        store,
        Policy::new("login", Rule::sliding_log(5, Duration::from_secs(60))),
    )
    .key(key);

    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/items", get(|| async { "[1, 2, 3]" }))
        .layer(api_limit)
        .route(
            "/login",
            axum::routing::post(|| async { "welcome" }).layer(login_limit),
        )
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM (what Docker, Kubernetes and systemd send). The
/// handlers are installed when this is called, so no signal is missed once the server listens.
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
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
