//! Quickstart: rate-limit a plain hyper service, with one layer holding per-route policies.
//!
//! ```text
//! cargo run --example hyper
//! ```
//!
//! Serves on `127.0.0.1:$PORT` (default 3002) with the in-memory store. Ctrl-C or SIGTERM stops
//! it: it stops accepting, lets each connection finish the request in flight, then exits.

use std::{
    convert::Infallible, future::Future, net::SocketAddr, process::ExitCode, time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{KeyExtractor, Policy, RateLimitLayer, Rule},
    store::MemoryStore,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::from(format!(
        "{} {}\n",
        req.method(),
        req.uri().path()
    ))))
}

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
        Err(_) => 3002,
    };
    let shutdown = shutdown_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port} (PORT): {e}"))?;
    println!(
        "listening on http://127.0.0.1:{}",
        listener.local_addr()?.port()
    );
    println!("store: memory (in this process)");
    accept_until(listener, shutdown).await
}

/// Serves every connection until `shutdown` resolves, then lets each one finish its request in
/// flight (hyper's `graceful_shutdown`) and waits for them all.
async fn accept_until(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let limit = RateLimitLayer::routed(MemoryStore::new())
        .key(KeyExtractor::peer_ip())
        .route(
            Some(Method::POST),
            "/login",
            Policy::new("login", Rule::sliding_log(5, Duration::from_secs(60))),
        )
        .route(
            None,
            "/api/*",
            Policy::new("api", Rule::gcra(100, Duration::from_secs(1), 50)),
        );
    let service = ServiceBuilder::new().layer(limit).service_fn(handler);

    let (stop, stopping) = watch::channel(());
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut shutdown => break,
        };
        let service = service.clone();
        let mut stopping = stopping.clone();
        connections.spawn(async move {
            // The layer reads the peer address from the request extensions.
            let with_peer = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert::<SocketAddr>(peer);
                service.clone().oneshot(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(with_peer));
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stopping.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%err, "connection closed");
            }
        });
        // Forget the connections that are done.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop.send(());
    while connections.join_next().await.is_some() {}
    Ok(())
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
