//! End to end: the demo binary (and the other examples), as a user runs them: with and without
//! `REDIS_URL`, what they print, how they fail at startup, and how they stop.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Demo {
    child: Child,
    port: u16,
    /// Every line the process printed on stdout so far, the listening line first.
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Demo {
    /// Sends SIGTERM, as Docker, Kubernetes and systemd do.
    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit on its own.
    async fn exit_status(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The stdout lines once the process has printed at least `n` of them.
    async fn lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.stdout.lock().unwrap().clone();
            if lines.len() >= n {
                return lines;
            }
            assert!(Instant::now() < deadline, "only printed {lines:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Builds the examples with this test's features (quick when they are up to date) and returns
/// the path of `name`.
fn example_binary(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--example",
            "demo",
            "--example",
            "hyper",
        ]);
        if cfg!(feature = "redis") {
            cmd.args(["--example", "axum"]);
        }
        if cfg!(feature = "fred") {
            cmd.args(["--features", "fred"]);
        }
        assert!(
            cmd.status().unwrap().success(),
            "building the examples failed"
        );
        dir.join("examples")
    });
    dir.join(name)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A command for an example with a clean environment: no `REDIS_URL`, `DEMO_BACKEND`, `RUST_LOG`.
fn example_command(name: &str, envs: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(example_binary(name));
    for var in ["REDIS_URL", "DEMO_BACKEND", "RUST_LOG", "PORT"] {
        cmd.env_remove(var);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Starts an example on a free port and waits for its listening line; the rest of its stdout
/// is collected in the background (so that the process never writes to a closed pipe).
fn start_example(name: &str, envs: &[(&str, String)]) -> Demo {
    let port = free_port();
    let mut cmd = example_command(name, envs);
    cmd.env("PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("listening on http://127.0.0.1:{port}"));
    let stdout = Arc::new(Mutex::new(vec![line.trim_end().to_owned()]));
    let collected = Arc::clone(&stdout);
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { break };
            collected.lock().unwrap().push(line);
        }
    });
    Demo {
        child,
        port,
        stdout,
    }
}

fn start_demo(envs: &[(&str, String)]) -> Demo {
    start_example("demo", envs)
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

/// `POST /generate` with an API key; returns the status, the raw head (lower case) and the body.
async fn generate(port: u16, api_key: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "POST /generate HTTP/1.1\r\nhost: localhost\r\nx-api-key: {api_key}\r\n\
         content-length: 0\r\nconnection: close\r\n\r\n"
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

/// `POST /generate` until its budget of 10,000 tokens per minute is spent: each answer reports
/// 50 to 500 tokens, a request is admitted while its estimate (500) fits, and the budget is
/// charged what the answers reported, so it ends with less than one estimate left. `/stats`
/// counts the tokens. Returns the API key whose budget is spent.
async fn check_generate(demo: &Demo) -> String {
    let key = format!("generate-{}", demo.port);
    let (mut total, mut admitted) = (0u64, 0u64);
    let mut denied_since = None;
    loop {
        let (status, head, body) = generate(demo.port, &key).await;
        if status == 200 {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            let tokens = json["tokens"].as_u64().unwrap();
            assert!((50..=500).contains(&tokens), "{body}");
            // What is left after this request's estimate: at most what the earlier answers
            // leave (less while a refund is on its way: a Redis store settles in the background).
            let field = head
                .lines()
                .find_map(|l| l.strip_prefix("ratelimit: "))
                .unwrap_or_default();
            assert!(field.starts_with("\"tokens\""), "{head}");
            let left: u64 = field
                .split(';')
                .find_map(|p| p.strip_prefix("r="))
                .and_then(|r| r.parse().ok())
                .unwrap();
            assert!(left <= 10_000 - total - 500, "{left} left after {total}");
            total += tokens;
            admitted += 1;
            denied_since = None;
            continue;
        }
        assert_eq!(status, 429, "{head}");
        // Denied for 2 s in a row: every refund has landed, the budget is spent.
        let since = *denied_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Charged what the answers reported, not the estimates: less than one estimate is left.
    assert!(
        total <= 10_000 && total > 10_000 - 500,
        "{admitted} admitted, {total} tokens"
    );
    assert!(admitted >= 20, "{admitted} admitted, {total} tokens");
    let (_, body) = get(demo.port, "/stats", None).await;
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["tokens"], total);
    key
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
    assert_eq!(stats["orders_started"], 1, "an order handler began twice");

    check_generate(demo).await;
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
    let spent = format!("generate-{}", a.port);
    assert_eq!(
        generate(b.port, &spent).await.0,
        429,
        "the token budget is shared"
    );
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

/// The `(method, path)` of every route line of the banner (`  GET  /fixed  ...`), with the
/// `curl` line printed under it.
fn banner_routes(lines: &[String]) -> Vec<(String, String, String)> {
    let mut routes = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let mut words = line.split_whitespace();
        if let (Some(method @ ("GET" | "POST")), Some(path)) = (words.next(), words.next()) {
            let curl = lines.get(i + 1).cloned().unwrap_or_default();
            routes.push((method.to_owned(), path.to_owned(), curl.trim().to_owned()));
        }
    }
    routes
}

/// The `(method, path)` of every row of the README's table of demo routes (the table whose
/// header starts with `| route |`).
fn readme_routes() -> Vec<(String, String)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .lines()
        .skip_while(|line| !line.starts_with("| route |"))
        .take_while(|line| line.starts_with('|'))
        .filter_map(|line| {
            let cell = line.strip_prefix("| `")?.split('`').next()?;
            let (method, path) = cell.split_once(' ')?;
            matches!(method, "GET" | "POST").then(|| (method.to_owned(), path.to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn demo_prints_the_store_and_every_route_with_a_curl_line_that_works() {
    let demo = start_demo(&[]);
    let lines = demo.lines(3).await;
    assert_eq!(lines[1], "store: memory (in this process)");
    let last = "Ctrl-C or SIGTERM stops the server once the requests in flight are done";
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let lines = demo.lines(1).await;
        if lines.last().map(String::as_str) == Some(last) || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.last().map(String::as_str), Some(last), "{lines:#?}");

    let routes = banner_routes(&lines);
    let base = format!("http://127.0.0.1:{}", demo.port);
    for (method, path, curl) in &routes {
        let path = path.replace("{id}", "7");
        assert!(curl.starts_with("curl "), "{method} {path}: {curl:?}");
        assert!(
            curl.contains(&format!("{base}{path}")),
            "{method} {path}: {curl:?}"
        );
        let status = match (method.as_str(), path.as_str()) {
            ("POST", "/orders") => {
                post(demo.port, &path, "banner", "{\"item\":\"book\"}")
                    .await
                    .0
            }
            _ => request(demo.port, method, &path).await.0,
        };
        let expected = if path == "/orders" { 201 } else { 200 };
        assert_eq!(status, expected, "{method} {path}");
    }
    // The README's table of routes lists exactly these.
    let mut printed: Vec<_> = routes.into_iter().map(|(m, p, _)| (m, p)).collect();
    let mut documented = readme_routes();
    printed.sort();
    documented.sort();
    assert_eq!(printed.len(), 8, "{printed:?}");
    assert_eq!(
        documented, printed,
        "the README's routes table differs from the demo"
    );
}

#[tokio::test]
async fn demo_finishes_the_requests_in_flight_on_sigterm_and_exits_0() {
    let mut demo = start_demo(&[]);
    let port = demo.port;
    let (order, cached, ()) = tokio::join!(
        post(port, "/orders", "in-flight", "{\"item\":\"book\"}"),
        request(port, "GET", "/cached/9"),
        async {
            // Both handlers are running (300 ms and 200 ms) when the signal arrives.
            tokio::time::sleep(Duration::from_millis(100)).await;
            demo.sigterm();
        }
    );
    assert_eq!(order.0, 201, "{order:?}");
    let body: serde_json::Value = serde_json::from_str(&order.1).unwrap();
    assert_eq!(body["order"], 1);
    assert_eq!(body["body"]["item"], "book");
    assert_eq!(cached.0, 200, "{cached:?}");
    assert!(cached.1.contains("fwd=miss; stored"), "{}", cached.1);
    let status = demo.exit_status(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status}");
    // It no longer accepts connections.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
}

/// The point of a graceful stop: an order in flight completes and its record is stored, so a
/// retry on another replica gets the same answer instead of a key blocked for a whole lease.
#[cfg(feature = "redis")]
#[tokio::test]
async fn demo_on_redis_an_order_in_flight_at_sigterm_is_replayed_by_the_next_replica() {
    let server = RedisServer::start();
    let mut a = start_demo(&[("REDIS_URL", server.url())]);
    let port = a.port;
    let (first, ()) = tokio::join!(
        post(port, "/orders", "rolling-deploy", "{\"item\":\"pen\"}"),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            a.sigterm();
        }
    );
    assert_eq!(first.0, 201);
    assert_eq!(a.exit_status(Duration::from_secs(10)).await.code(), Some(0));

    let b = start_demo(&[("REDIS_URL", server.url())]);
    let retry = post(b.port, "/orders", "rolling-deploy", "{\"item\":\"pen\"}").await;
    assert_eq!(retry, first, "the retry was not the stored answer");
    let (_, body) = get(b.port, "/stats", None).await;
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["orders"], 0, "replica b ran the order again");
}

/// Runs an example that must fail at startup; returns its stderr.
fn startup_error(name: &str, envs: &[(&str, String)]) -> String {
    let out = example_command(name, envs).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    assert!(out.stdout.is_empty(), "{name} printed {:?}", out.stdout);
    assert!(stderr.starts_with("error: "), "{name}: {stderr}");
    assert!(!stderr.contains("Error: "), "a Debug dump: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
    stderr.trim_end().to_owned()
}

#[tokio::test]
async fn demo_startup_errors_name_the_port_or_url_and_exit_1() {
    let bad_port = startup_error("demo", &[("PORT", "eighty".into())]);
    assert_eq!(
        bad_port,
        "error: PORT must be a port number, got \"eighty\""
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let in_use = startup_error("demo", &[("PORT", port.to_string())]);
    let expected = format!("error: cannot listen on 127.0.0.1:{port} (PORT): ");
    assert!(in_use.starts_with(&expected), "{in_use}");
    assert!(
        in_use.to_lowercase().contains("address already in use"),
        "{in_use}"
    );

    let unknown = startup_error("demo", &[("DEMO_BACKEND", "mongo".into())]);
    assert_eq!(
        unknown,
        "error: unknown DEMO_BACKEND \"mongo\" (memory, redis, fred)"
    );
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn demo_and_axum_example_name_an_unreachable_redis_url() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    for example in ["demo", "axum"] {
        let refused = startup_error(example, &[("REDIS_URL", url.clone())]);
        let expected = format!("error: cannot connect to Redis at {url} (REDIS_URL): ");
        assert!(refused.starts_with(&expected), "{example}: {refused}");
        assert!(
            refused.to_lowercase().contains("refused"),
            "{example}: {refused}"
        );
    }
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn axum_example_treats_an_empty_redis_url_and_a_bad_port_like_the_demo() {
    let mut example = start_example("axum", &[("REDIS_URL", String::new())]);
    assert_eq!(example.lines(2).await[1], "store: memory (in this process)");
    let (status, body) = get(example.port, "/", None).await;
    assert_eq!((status, body.as_str()), (200, "hello"));
    example.sigterm();
    assert_eq!(
        example.exit_status(Duration::from_secs(10)).await.code(),
        Some(0)
    );

    let bad_port = startup_error("axum", &[("PORT", "eighty".into())]);
    assert_eq!(
        bad_port,
        "error: PORT must be a port number, got \"eighty\""
    );
}

#[tokio::test]
async fn hyper_example_stops_on_sigterm_and_exits_0() {
    let mut example = start_example("hyper", &[]);
    let (status, body) = get(example.port, "/api/items", None).await;
    assert_eq!((status, body.as_str()), (200, "GET /api/items\n"));
    example.sigterm();
    assert_eq!(
        example.exit_status(Duration::from_secs(10)).await.code(),
        Some(0)
    );
    let bad_port = startup_error("hyper", &[("PORT", "eighty".into())]);
    assert_eq!(
        bad_port,
        "error: PORT must be a port number, got \"eighty\""
    );
}
