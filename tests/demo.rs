//! End to end: the demo binary, as a user runs it, with and without `REDIS_URL`.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Demo {
    child: Child,
    port: u16,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the demo with this test's features (quick when it is up to date) and returns its path.
fn demo_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let dir = exe.parent().unwrap().parent().unwrap();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "--example", "demo"]);
            if cfg!(feature = "fred") {
                cmd.args(["--features", "fred"]);
            }
            assert!(cmd.status().unwrap().success(), "building the demo failed");
            dir.join("examples").join("demo")
        })
        .clone()
}

fn start_demo(envs: &[(&str, String)]) -> Demo {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(demo_binary());
    cmd.env_remove("REDIS_URL").env_remove("DEMO_BACKEND");
    cmd.env("PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), format!("listening on http://127.0.0.1:{port}"));
    Demo { child, port }
}

/// A minimal HTTP/1.1 GET; returns the status and the body.
async fn get(port: u16, path: &str, api_key: Option<&str>) -> (u16, String) {
    let key = api_key
        .map(|k| format!("x-api-key: {k}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{key}connection: close\r\n\r\n");
    exchange(port, &req).await
}

/// A minimal HTTP/1.1 POST with an `Idempotency-Key`.
async fn post(port: u16, path: &str, idempotency_key: &str, body: &str) -> (u16, String) {
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\nidempotency-key: {idempotency_key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    exchange(port, &req).await
}

async fn exchange(port: u16, req: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// A minimal HTTP/1.1 request; returns the status, the raw head and the body.
async fn request(port: u16, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// `GET /cached/{id}`: a miss, a hit (the handler does not run again), and a miss after
/// `POST /cached/invalidate`. Returns the handler's run count after the last call.
async fn check_cached(demo: &Demo, expect_first_runs: u64) -> u64 {
    let (status, head, body) = request(demo.port, "GET", "/cached/7").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["id"], "7");
    let runs = json["runs"].as_u64().unwrap();
    assert_eq!(runs, expect_first_runs, "{head}");
    let (_, head, body) = request(demo.port, "GET", "/cached/7").await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json["runs"].as_u64(),
        Some(runs),
        "the second GET ran the handler"
    );
    assert!(
        head.contains("cache-status: tower-redis-layers; hit"),
        "{head}"
    );
    assert!(head.contains("\r\nage: "), "{head}");
    let (status, _, _) = request(demo.port, "POST", "/cached/invalidate").await;
    assert_eq!(status, 200);
    let (_, head, body) = request(demo.port, "GET", "/cached/7").await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(head.contains("fwd=miss"), "{head}");
    json["runs"].as_u64().unwrap()
}

async fn statuses(port: u16, path: &str, n: usize, key: Option<&str>) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(port, path, key).await.0);
    }
    out
}

async fn check_routes(demo: &Demo) {
    let five_then_429 = vec![200, 200, 200, 200, 200, 429];
    for route in ["/fixed", "/sliding", "/bucket"] {
        assert_eq!(
            statuses(demo.port, route, 6, None).await,
            five_then_429,
            "{route}"
        );
    }
    // Another API key has its own budget.
    assert_eq!(statuses(demo.port, "/fixed", 1, Some("alice")).await, [200]);
    let (status, body) = get(demo.port, "/stats", None).await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["fixed"], 6);
    assert_eq!(stats["sliding"], 5);
    assert_eq!(stats["bucket"], 5);
    // The bucket refills one token per second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(statuses(demo.port, "/bucket", 2, None).await, [200, 429]);

    // Orders: one execution per Idempotency-Key, the same answer to the retry.
    let key = format!("order-{}", demo.port);
    let (first, second) = tokio::join!(
        post(demo.port, "/orders", &key, "{\"item\":\"book\"}"),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            post(demo.port, "/orders", &key, "{\"item\":\"book\"}").await
        }
    );
    assert_eq!(first.0, 201);
    let order: serde_json::Value = serde_json::from_str(&first.1).unwrap();
    assert_eq!(order["body"]["item"], "book");
    assert_eq!(second.0, 409, "a duplicate while the first runs");
    let replay = post(demo.port, "/orders", &key, "{\"item\":\"book\"}").await;
    assert_eq!(replay, first);
    assert_eq!(post(demo.port, "/orders", &key, "{}").await.0, 422);
    let (_, body) = get(demo.port, "/stats", None).await;
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["orders"], 1);
}

#[tokio::test]
async fn demo_in_memory() {
    let demo = start_demo(&[]);
    check_routes(&demo).await;
    assert_eq!(check_cached(&demo, 1).await, 2);
    let (_, body) = get(demo.port, "/stats", None).await;
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["cached"], 2);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn demo_on_redis_limits_hold_across_two_replicas() {
    let server = RedisServer::start();
    let a = start_demo(&[("REDIS_URL", server.url())]);
    check_routes(&a).await;
    // A second replica on the same Redis shares the budget: still limited.
    let b = start_demo(&[("REDIS_URL", server.url())]);
    assert_eq!(statuses(b.port, "/fixed", 1, None).await, [429]);
    assert_eq!(statuses(b.port, "/sliding", 1, Some("bob")).await, [200]);
    assert_eq!(
        statuses(a.port, "/sliding", 4, Some("bob")).await,
        [200, 200, 200, 200]
    );
    assert_eq!(statuses(b.port, "/sliding", 1, Some("bob")).await, [429]);
    // The cache is shared too: replica b is served what replica a computed.
    assert_eq!(check_cached(&a, 1).await, 2);
    let (_, head, body) = request(b.port, "GET", "/cached/7").await;
    assert!(head.contains("; hit"), "{head}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["runs"], 2);
    let (_, body) = get(b.port, "/stats", None).await;
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["cached"], 0, "replica b ran the cached handler");
}

#[cfg(feature = "fred")]
#[tokio::test]
async fn demo_on_fred() {
    let server = RedisServer::start();
    let demo = start_demo(&[("REDIS_URL", server.url()), ("DEMO_BACKEND", "fred".into())]);
    check_routes(&demo).await;
    assert_eq!(check_cached(&demo, 1).await, 2);
}
