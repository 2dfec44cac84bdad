//! A caching reverse proxy: `CacheLayer` in front of any HTTP origin, configured as a
//! standards-following shared cache, to try the cache with your own tools (curl, a browser, an
//! HTTP-cache conformance suite).
//!
//! ```text
//! UPSTREAM=http://127.0.0.1:8000 PORT=8001 cargo run --example proxy
//! UPSTREAM=http://127.0.0.1:8000 REDIS_URL=redis://127.0.0.1:6379 cargo run --example proxy
//! ```
//!
//! - `UPSTREAM` (required): the origin, `http://host:port` (an optional path prefix is kept).
//! - `PORT` (default 8001; `0` picks a free port): serves on `127.0.0.1:PORT` and prints
//!   `listening on http://127.0.0.1:PORT` (the real port) once ready.
//! - `REDIS_URL` (optional): the Redis store (redis-rs); else the in-process memory store.
//!
//! Every request (method, path and query, headers but the hop-by-hop ones, body, streamed) is
//! forwarded to the upstream with `Host` set to the upstream's authority, so the cache keys
//! every request under that one host whatever `Host` the client sent. The cache:
//!
//! - follows the response's freshness (`s-maxage`, `max-age`, `Expires`); with none, a
//!   heuristic freshness of 10% of the time since `Last-Modified` (at most a day), for the
//!   heuristically cacheable statuses and `public` responses only; no fixed TTL;
//! - reads `CDN-Cache-Control` (RFC 9213) in preference to `Cache-Control`;
//! - serves stale within a response's own `stale-while-revalidate` / `stale-if-error` (RFC
//!   5861, up to a week), never for responses without them;
//! - revalidates stale entries that have a validator with a conditional request;
//! - invalidates the target URI (and same-host `Location` / `Content-Location`) after a
//!   successful unsafe method;
//! - answers `Cache-Status` (RFC 9211) on every response to `GET` / `HEAD`.
//!
//! When the upstream cannot be reached, the answer is `502 Bad Gateway` (`504 Gateway Timeout`
//! after 30 s without response headers), with a problem details body. Ctrl-C (SIGINT) or
//! SIGTERM stops it gracefully.

use std::{
    convert::Infallible,
    future::Future,
    io::Write,
    pin::Pin,
    process::ExitCode,
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, Router};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tower::{Service, ServiceBuilder};
use tower_redis_layers::{
    cache::CacheLayer,
    store::{CacheStore, MemoryStore},
};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long the upstream may take to send its response headers.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// The fields that concern one connection only (RFC 9110 section 7.6.1), and `Expect` (the
/// proxy's server side answers `100 Continue` itself): never forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::EXPECT,
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

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
    let upstream = upstream()?;
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p
            .parse()
            .map_err(|_| format!("PORT must be a port number, got {p:?}"))?,
        Err(_) => 8001,
    };
    let redis_url = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    let (app, store) = match &redis_url {
        Some(url) => (redis_app(url, &upstream).await?, format!("redis at {url}")),
        None => (
            app(MemoryStore::new(), &upstream),
            "memory (in this process)".to_owned(),
        ),
    };
    // Installed before the listening line, so that no signal sent after it is missed.
    let shutdown = shutdown_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port} (PORT): {e}"))?;
    let port = listener.local_addr()?.port();
    let text = format!(
        "listening on http://127.0.0.1:{port}\nupstream: {}\nstore: {store}\n",
        upstream.base
    );
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    drop(out);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// The origin: `http://`, its authority and path prefix (without a trailing `/`), and the
/// authority alone.
#[derive(Clone)]
struct Upstream {
    base: String,
    authority: String,
}

fn upstream() -> Result<Upstream, String> {
    let raw = std::env::var("UPSTREAM")
        .map_err(|_| "UPSTREAM is not set (for example UPSTREAM=http://127.0.0.1:8000)")?;
    let uri: Uri = raw
        .parse()
        .map_err(|e| format!("UPSTREAM is not a URI ({raw:?}): {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("UPSTREAM must be an http:// URI, got {raw:?}"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("UPSTREAM has no host: {raw:?}"))?
        .to_string();
    let prefix = uri.path().trim_end_matches('/').to_owned();
    Ok(Upstream {
        base: format!("http://{authority}{prefix}"),
        authority,
    })
}

#[cfg(feature = "redis")]
async fn redis_app(url: &str, upstream: &Upstream) -> Result<Router, Error> {
    let store = tower_redis_layers::store::RedisStore::connect(url)
        .await
        .map_err(|e| format!("cannot connect to Redis at {url} (REDIS_URL): {e}"))?;
    Ok(app(store, upstream))
}

#[cfg(not(feature = "redis"))]
async fn redis_app(_url: &str, _upstream: &Upstream) -> Result<Router, Error> {
    Err("REDIS_URL is set but the `redis` feature is off".into())
}

/// The proxy: the cache over the forwarding service, for every path.
fn app<B: CacheStore>(store: B, upstream: &Upstream) -> Router {
    let cache = CacheLayer::new(store)
        .scope("proxy")
        // One origin: every request is keyed under its host, whatever the client's `Host`.
        .fixed_host(upstream.authority.clone())
        .heuristic(0.1, Duration::from_secs(24 * 3600))
        .targeted_field(HeaderName::from_static("cdn-cache-control"))
        // RFC 5861 windows only when the origin asks for them, up to a week.
        .stale_directives_up_to(Duration::from_secs(7 * 24 * 3600))
        .max_body(8 * 1024 * 1024);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let forward = Forward {
        client: Client::builder(TokioExecutor::new()).build(connector),
        upstream: upstream.clone(),
    };
    Router::new().fallback_service(ServiceBuilder::new().layer(cache).service(forward))
}

/// Forwards a request to the upstream; answers `502` / `504` itself when it cannot.
#[derive(Clone)]
struct Forward {
    client: Client<HttpConnector, Body>,
    upstream: Upstream,
}

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(req).await) })
    }
}

impl Forward {
    async fn forward(self, req: Request<Body>) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = format!("{}{path}", self.upstream.base);
        parts.uri = match uri.parse() {
            Ok(uri) => uri,
            Err(_) => return problem(StatusCode::BAD_REQUEST, "the request target is invalid"),
        };
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        if let Ok(host) = HeaderValue::from_str(&self.upstream.authority) {
            parts.headers.insert(header::HOST, host);
        }
        parts.headers.append(
            header::VIA,
            HeaderValue::from_static("1.1 tower-redis-layers"),
        );
        let call = self.client.request(Request::from_parts(parts, body));
        match tokio::time::timeout(UPSTREAM_TIMEOUT, call).await {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                // The client's connection is HTTP/1.1 whatever the upstream's.
                parts.version = http::Version::HTTP_11;
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "upstream request failed");
                problem(StatusCode::BAD_GATEWAY, "the upstream could not be reached")
            }
            Err(_) => problem(
                StatusCode::GATEWAY_TIMEOUT,
                "the upstream did not answer in time",
            ),
        }
    }
}

/// Removes the hop-by-hop fields, and those named in `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

/// A problem details response (RFC 9457) made by the proxy itself.
fn problem(status: StatusCode, detail: &str) -> Response<Body> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or(""),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
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
