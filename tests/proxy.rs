//! End to end: the `proxy` example as a user runs it, in front of a small origin started here,
//! with the memory store and (feature `redis`) a Redis store: hits, invalidation after `POST`,
//! the `Last-Modified` heuristic, `CDN-Cache-Control` precedence, `304` revalidation, one entry
//! whatever the client's `Host`, and `502` once the origin is gone.

mod common;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

/// Requests the origin got, by `METHOD path`, and the conditional ones.
#[derive(Clone, Default)]
struct Origin {
    seen: Arc<Mutex<HashMap<String, usize>>>,
    conditional: Arc<Mutex<Vec<String>>>,
}

impl Origin {
    fn count(&self, key: &str) -> usize {
        self.seen.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

fn http_date(ago: Duration) -> String {
    httpdate::fmt_http_date(SystemTime::now() - ago)
}

/// The origin: what each path answers (see the scenarios).
async fn origin(State(o): State<Origin>, method: Method, uri: Uri, h: HeaderMap) -> Response {
    let path = uri.path().to_owned();
    let n = {
        let mut seen = o.seen.lock().unwrap();
        let n = seen.entry(format!("{method} {path}")).or_default();
        *n += 1;
        *n
    };
    if method != Method::GET && method != Method::HEAD {
        return (StatusCode::OK, "done").into_response();
    }
    let body = format!("{path} run {n}");
    let day = Duration::from_secs(24 * 3600);
    let date = ("date", http_date(Duration::ZERO));
    match path.as_str() {
        "/fresh" | "/hosts" => ([("cache-control", "max-age=60".to_owned())], body).into_response(),
        "/old" => ([date, ("last-modified", http_date(10 * day))], body).into_response(),
        "/new" => ([date, ("last-modified", http_date(Duration::ZERO))], body).into_response(),
        "/plain" => body.into_response(),
        "/private" => ([("cache-control", "private, max-age=60")], body).into_response(),
        "/vary" => {
            let lang = h
                .get("accept-language")
                .map_or(String::new(), |v| v.to_str().unwrap_or_default().to_owned());
            (
                [
                    ("cache-control", "max-age=60".to_owned()),
                    ("vary", "Accept-Language".to_owned()),
                ],
                format!("{body} {lang}"),
            )
                .into_response()
        }
        "/cdn" => (
            [
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=60"),
            ],
            body,
        )
            .into_response(),
        "/cdn-no-store" => (
            [
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "no-store"),
            ],
            body,
        )
            .into_response(),
        "/validated" => {
            let inm = h.get("if-none-match").and_then(|v| v.to_str().ok());
            if let Some(tag) = inm {
                o.conditional.lock().unwrap().push(tag.to_owned());
            }
            let headers = [
                ("cache-control", "no-cache"),
                ("etag", "\"v1\""),
                ("x-run", if n == 1 { "first" } else { "later" }),
            ];
            if inm == Some("\"v1\"") {
                (StatusCode::NOT_MODIFIED, headers).into_response()
            } else {
                (headers, body).into_response()
            }
        }
        _ => (StatusCode::NOT_FOUND, body).into_response(),
    }
}

struct Proxy {
    child: Child,
    port: u16,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the proxy example with this test's features and returns its path.
fn proxy_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let dir = exe.parent().unwrap().parent().unwrap();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "--example", "proxy"]);
            if !cfg!(feature = "redis") {
                cmd.args(["--no-default-features", "--features", "axum"]);
            }
            assert!(cmd.status().unwrap().success(), "building the proxy failed");
            dir.join("examples").join("proxy")
        })
        .clone()
}

/// Starts the proxy with `PORT=0` and reads the port from its listening line.
fn start_proxy(upstream: &str, redis_url: Option<String>) -> Proxy {
    let mut cmd = Command::new(proxy_binary());
    cmd.env_remove("REDIS_URL")
        .env_remove("RUST_LOG")
        .env("UPSTREAM", upstream)
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(url) = redis_url {
        cmd.env("REDIS_URL", url);
    }
    let mut child = cmd.spawn().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("listening on http://127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    std::thread::spawn(move || for _ in reader.lines() {});
    Proxy { child, port }
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Got {
    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

struct Client2 {
    client: Client<HttpConnector, Full<Bytes>>,
    port: u16,
}

impl Client2 {
    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Got {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{}{path}", self.port));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = self
            .client
            .request(req.body(Full::default()).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Got {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn get(&self, path: &str) -> Got {
        self.send(Method::GET, path, &[]).await
    }
}

async fn scenarios(redis_url: Option<String>) {
    let o = Origin::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new().fallback(origin).with_state(o.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let proxy = start_proxy(&upstream, redis_url);
    let c = Client2 {
        client: Client::builder(TokioExecutor::new()).build_http(),
        port: proxy.port,
    };

    // A fresh response: stored, then a hit with `Age`.
    let first = c.get("/fresh").await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        first.cache_status().contains("fwd=miss; stored"),
        "{}",
        first.cache_status()
    );
    let second = c.get("/fresh").await;
    assert_eq!(second.body, "/fresh run 1");
    assert!(
        second.cache_status().ends_with("; hit"),
        "{}",
        second.cache_status()
    );
    assert!(second.headers.contains_key("age"));
    // HEAD is served from the GET entry.
    let head = c.send(Method::HEAD, "/fresh", &[]).await;
    assert!(head.cache_status().ends_with("; hit") && head.body.is_empty());
    assert_eq!(o.count("GET /fresh"), 1);

    // A successful POST invalidates the entry.
    assert_eq!(
        c.send(Method::POST, "/fresh", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(c.get("/fresh").await.body, "/fresh run 2");
    assert_eq!(o.count("GET /fresh"), 2);

    // Heuristic freshness from Last-Modified only; no fixed TTL.
    for (path, stored) in [("/old", true), ("/new", false), ("/plain", false)] {
        c.get(path).await;
        let again = c.get(path).await;
        assert_eq!(again.cache_status().ends_with("; hit"), stored, "{path}");
    }

    // `private` is never stored; `Vary` selects the variant.
    c.get("/private").await;
    assert!(!c.get("/private").await.cache_status().contains("hit"));
    for (lang, hit) in [("fr", false), ("de", false), ("fr", true), ("de", true)] {
        let got = c
            .send(Method::GET, "/vary", &[("accept-language", lang)])
            .await;
        assert_eq!(got.cache_status().ends_with("; hit"), hit, "{lang}");
        assert!(got.body.ends_with(lang));
    }
    // A client's own conditional request on a hit gets 304.
    let etag_less = c
        .send(
            Method::GET,
            "/fresh",
            &[("if-modified-since", &http_date(Duration::ZERO))],
        )
        .await;
    assert_eq!(etag_less.status, StatusCode::NOT_MODIFIED);

    // CDN-Cache-Control wins over Cache-Control, both ways.
    c.get("/cdn").await;
    assert!(c.get("/cdn").await.cache_status().ends_with("; hit"));
    c.get("/cdn-no-store").await;
    assert!(!c.get("/cdn-no-store").await.cache_status().contains("hit"));
    assert_eq!(o.count("GET /cdn"), 1);
    assert_eq!(o.count("GET /cdn-no-store"), 2);

    // `no-cache` with an ETag: stored, revalidated on every use; the 304 serves the stored body
    // with the refreshed headers.
    let v1 = c.get("/validated").await;
    assert_eq!(v1.body, "/validated run 1");
    let v2 = c.get("/validated").await;
    assert_eq!(v2.status, StatusCode::OK);
    assert_eq!(v2.body, "/validated run 1");
    assert_eq!(v2.headers["x-run"], "later");
    assert!(
        v2.cache_status().contains("fwd=stale; fwd-status=304"),
        "{}",
        v2.cache_status()
    );
    assert_eq!(*o.conditional.lock().unwrap(), ["\"v1\""]);

    // Invented hosts share the one entry of the upstream.
    for i in 0..30 {
        let host = format!("host-{i}.invalid");
        c.send(Method::GET, "/hosts", &[("host", &host)]).await;
    }
    assert_eq!(o.count("GET /hosts"), 1);

    // The origin is gone: 502, well-formed.
    server.abort();
    let _ = server.await;
    let down = c.get("/elsewhere").await;
    assert_eq!(down.status, StatusCode::BAD_GATEWAY);
    assert_eq!(down.headers["content-type"], "application/problem+json");
    assert!(down.body.contains("\"status\":502"));
    // A stored entry is still served.
    assert!(c.get("/cdn").await.cache_status().ends_with("; hit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_with_the_memory_store() {
    scenarios(None).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_with_redis() {
    let redis = common::RedisServer::start();
    scenarios(Some(redis.url())).await;
}

/// A startup error is one line on stderr, and the exit code is 1.
#[test]
fn proxy_without_upstream_fails_with_one_line() {
    for (upstream, expected) in [
        (None, "error: UPSTREAM is not set"),
        (Some("ftp://x"), "error: UPSTREAM must be an http:// URI"),
    ] {
        let mut cmd = Command::new(proxy_binary());
        cmd.env_remove("UPSTREAM")
            .env_remove("REDIS_URL")
            .env("PORT", "0");
        if let Some(u) = upstream {
            cmd.env("UPSTREAM", u);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with(expected), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(out.stdout.is_empty());
    }
}
