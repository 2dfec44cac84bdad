//! Quickstart: rate-limit a plain hyper service, with one layer holding per-route policies.
//!
//! ```text
//! cargo run --example hyper
//! ```
//! Serves on `127.0.0.1:$PORT` (default 3002).

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{KeyExtractor, RateLimitLayer, Rule},
    store::MemoryStore,
};

async fn handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::from(format!(
        "{} {}\n",
        req.method(),
        req.uri().path()
    ))))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let limit = RateLimitLayer::routed(MemoryStore::new())
        .key(KeyExtractor::peer_ip())
        .route(
            Some(Method::POST),
            "/login",
            Rule::sliding_log(5, Duration::from_secs(60)),
        )
        .route(None, "/api/*", Rule::gcra(100, Duration::from_secs(1), 50));
    let service = ServiceBuilder::new().layer(limit).service_fn(handler);

    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3002);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "listening on http://127.0.0.1:{}",
        listener.local_addr()?.port()
    );
    loop {
        let (stream, peer) = listener.accept().await?;
        let service = service.clone();
        tokio::spawn(async move {
            // The layer reads the peer address from the request extensions.
            let with_peer = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert::<SocketAddr>(peer);
                service.clone().oneshot(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(with_peer));
            if let Err(err) = conn.await {
                tracing::debug!(%err, "connection closed");
            }
        });
    }
}
