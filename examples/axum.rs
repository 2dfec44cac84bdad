//! Quickstart: rate-limit an axum app, per API key (else per peer IP).
//!
//! ```text
//! cargo run --example axum                                   # in-memory store
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example axum  # shared through Redis
//! ```
//! Serves on `127.0.0.1:$PORT` (default 3001).

use std::{net::SocketAddr, time::Duration};

use axum::{http::HeaderName, routing::get, Router};
use tower_redis_layers::{
    rate_limit::{Headers, KeyExtractor, Policy, RateLimitLayer, Rule},
    store::{MemoryStore, RateLimitStore, RedisStore},
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let app = match std::env::var("REDIS_URL") {
        Ok(url) => app(RedisStore::connect(&url).await?),
        Err(_) => app(MemoryStore::new()),
    };
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3001);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "listening on http://127.0.0.1:{}",
        listener.local_addr()?.port()
    );
    // ConnectInfo gives the layer the peer address.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

fn app<B: RateLimitStore + Clone>(store: B) -> Router {
    let key =
        KeyExtractor::header(HeaderName::from_static("x-api-key")).or(KeyExtractor::peer_ip());
    // 10 per second AND 1000 per hour, checked in one atomic call.
    let api = Policy::new(Rule::gcra(10, Duration::from_secs(1), 10).name("per-second"))
        .rule(Rule::fixed_window(1000, Duration::from_secs(3600)).name("per-hour"));
    let api_limit = RateLimitLayer::new(store.clone(), api)
        .key(key.clone())
        .headers(Headers::All);
    // A stricter, exact limit on one route only.
    let login_limit =
        RateLimitLayer::new(store, Rule::sliding_log(5, Duration::from_secs(60))).key(key);

    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/items", get(|| async { "[1, 2, 3]" }))
        .layer(api_limit)
        .route(
            "/login",
            axum::routing::post(|| async { "welcome" }).layer(login_limit),
        )
}
