//! HTTP load benchmark: every layer side by side with what users would use instead.
//!
//! ```text
//! bash scripts/install-redis.sh && apt-get install -y wrk   # once
//! cargo bench --bench http                                  # the whole report (about 5 minutes)
//! cargo bench --bench http -- --seconds 5 --rounds 3       # longer runs, fewer rounds
//! cargo bench --bench http -- --serve                       # only serve, for profiling
//! ```
//!
//! It starts its own `redis-server` on a free loopback port and one axum server (one route per
//! configuration), drives each route with `wrk -t2 -c64 --latency` five times in alternating
//! order (the median run is kept), and prints Markdown tables: requests/s, the ratio to the bare
//! handler of the same run, p50 and p99 latency, and
//! Redis calls per request from `INFO commandstats` deltas: `scripts/req` counts client round
//! trips that ran a script (`EVALSHA` + `EVAL`), `cmds/req` every command Redis executed
//! (including the ones a script runs inside Redis).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/strategies.rs"]
mod strategies;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    convert::Infallible,
    net::SocketAddr,
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    sync::Arc,
    time::Duration,
};

use axum::{extract::State, http::HeaderName, routing::get, Router};
use common::RedisServer;
use redis::aio::ConnectionManager;
use strategies::{strategies, HUGE};
use tower::{ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{KeyExtractor, MissingKey, Policy, RateLimitLayer, Rule},
    store::{FredStore, MemoryStore, RateCheck, RateLimitStore, RedisStore},
    StoreKey,
};

/// Counts allocations, to report allocations per request.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

/// The script's arguments for a single rule, as the layer sends them (cost 1, no state wanted;
/// the nonce of a sliding log is added per call).
fn script_args(rule: &Rule) -> Vec<String> {
    use tower_redis_layers::rate_limit::Strategy::*;
    let ms = |d: Duration| d.as_millis().to_string();
    let (a, b, c) = match *rule.strategy() {
        FixedWindow { limit, window } => (limit, ms(window), None),
        SlidingLog { limit, window } | SlidingWindow { limit, window } => {
            (limit, ms(window), Some(0))
        }
        TokenBucket {
            capacity,
            refill,
            every,
        } => (capacity, ms(every), Some(refill)),
        Gcra {
            rate,
            period,
            burst,
        } => (rate, ms(period), Some(burst)),
        _ => unreachable!(),
    };
    let mut args = vec!["1".to_owned(), "0".to_owned(), a.to_string(), b];
    args.extend(c.map(|c| c.to_string()));
    args
}

#[derive(Clone)]
struct Shared {
    conn: ConnectionManager,
}

/// What a hand-written handler needs: both clients, and the script of its rule.
#[derive(Clone)]
struct Hand {
    conn: ConnectionManager,
    fred: fred::prelude::Client,
    sha: Arc<str>,
    key: Arc<str>,
    args: Arc<Vec<String>>,
    nonce: bool,
}

async fn ok() -> &'static str {
    "ok"
}

/// Hand-written best case: the handler runs one EVALSHA of the layer's script itself.
/// The override key of the hand-made calls' key `hand:{k}:<name>` (see `rate_limit_override.lua`).
const OVERRIDE_KEY: &str = "hand:{k}:o";

async fn evalsha(State(hand): State<Hand>) -> &'static str {
    let mut conn = hand.conn.clone();
    let mut cmd = redis::cmd("EVALSHA");
    // The rule's key, then the key's override (same hash tag), as the stores send them.
    cmd.arg(&*hand.sha)
        .arg(2)
        .arg(&*hand.key)
        .arg(OVERRIDE_KEY)
        .arg(&hand.args[..]);
    if hand.nonce {
        cmd.arg(format!("{:016x}", rand::random::<u64>()));
    }
    let _: redis::RedisResult<redis::Value> = cmd.query_async(&mut conn).await;
    "ok"
}

/// The same on fred's client.
async fn evalsha_fred(State(hand): State<Hand>) -> &'static str {
    use fred::prelude::LuaInterface;
    let mut args: Vec<String> = hand.args.to_vec();
    if hand.nonce {
        args.push(format!("{:016x}", rand::random::<u64>()));
    }
    let keys = vec![&*hand.key, OVERRIDE_KEY];
    let _: Result<fred::types::Value, _> = hand.fred.evalsha(&*hand.sha, keys, args).await;
    "ok"
}

/// The blog recipe: a pipeline of ZREMRANGEBYSCORE + ZADD + ZCARD + EXPIRE, caller's clock.
async fn blog(State(shared): State<Shared>) -> &'static str {
    let mut conn = shared.conn.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    let key = "blog:{k}";
    let member = format!("{now}-{}", rand::random::<u32>());
    let _: redis::RedisResult<(i64, i64, i64, i64)> = redis::pipe()
        .zrembyscore(key, 0, now.saturating_sub(1_000_000))
        .zadd(key, member, now)
        .zcard(key)
        .expire(key, 1)
        .query_async(&mut conn)
        .await;
    "ok"
}

async fn app(redis: &RedisServer) -> Router {
    let url = redis.url();
    let redis_store = RedisStore::connect(&url).await.expect("redis store");
    let fred_store = FredStore::connect(&url).await.expect("fred store");
    let memory = MemoryStore::new();
    let client = redis::Client::open(url.as_str()).expect("client");
    let conn = ConnectionManager::new(client).await.expect("connection");
    let fred_client = {
        use fred::prelude::{Builder, ClientLike, Config};
        let client = Builder::from_config(Config::from_url(&url).expect("fred url"))
            .build()
            .expect("fred client");
        client.init().await.expect("fred connect");
        client
    };
    let shared = Shared { conn: conn.clone() };

    let governor = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .finish()
        .expect("governor config");

    let mut router = Router::new()
        .route("/bare", get(ok))
        .route(
            "/memory",
            get(ok).layer(RateLimitLayer::new(
                memory.clone(),
                Policy::new("memory", Rule::gcra(HUGE, Duration::from_secs(1), HUGE)),
            )),
        )
        .route(
            "/governor",
            get(ok).layer(tower_governor::GovernorLayer::new(governor)),
        )
        .route("/blog", get(blog).with_state(shared.clone()))
        .route(
            "/keys",
            get(ok).layer(
                RateLimitLayer::new(
                    redis_store.clone(),
                    Policy::new("keys", Rule::gcra(HUGE, Duration::from_secs(1), HUGE)),
                )
                .key(KeyExtractor::header(HeaderName::from_static("x-api-key")))
                .on_missing_key(MissingKey::Shared),
            ),
        );
    for (name, rule) in strategies() {
        // redis-rs and fred count under one name, as two replicas of a service would.
        let policy = Policy::new(name, rule.clone());
        router = router
            .route(
                &format!("/redis/{name}"),
                get(ok).layer(RateLimitLayer::new(redis_store.clone(), policy.clone())),
            )
            .route(
                &format!("/fred/{name}"),
                get(ok).layer(RateLimitLayer::new(fred_store.clone(), policy)),
            );
        let script = tower_redis_layers::store::rate_limit_script(std::slice::from_ref(&rule));
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(script)
            .query_async(&mut conn.clone())
            .await
            .expect("script load");
        let hand = Hand {
            conn: conn.clone(),
            fred: fred_client.clone(),
            sha: Arc::from(sha),
            key: Arc::from(format!("hand:{{k}}:{name}")),
            args: Arc::new(script_args(&rule)),
            nonce: name == "sliding-log",
        };
        router = router
            .route(
                &format!("/evalsha/{name}"),
                get(evalsha).with_state(hand.clone()),
            )
            .route(
                &format!("/evalsha-fred/{name}"),
                get(evalsha_fred).with_state(hand),
            );
    }
    // The cache: a handler doing 5 ms of work, uncached and behind the cache (all hits).
    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_millis(5)).await;
        "computed"
    }
    router = router.route("/cache/uncached", get(slow)).route(
        "/cache/hit",
        get(slow).layer(
            tower_redis_layers::cache::CacheLayer::new(redis_store.clone())
                .scope("bench")
                .ttl(Duration::from_secs(3600)),
        ),
    );
    // Idempotency: a first execution per key, and replays of one key.
    router = router.route(
        "/orders",
        axum::routing::post(|| async { (http::StatusCode::CREATED, "order") }).layer(
            tower_redis_layers::idempotency::IdempotencyLockLayer::new(redis_store.clone()),
        ),
    );
    // A flood from one key that is over its limit.
    let over = Policy::new("flood", Rule::fixed_window(1, Duration::from_secs(600)));
    router
        .route(
            "/flood/deny-cache",
            get(ok).layer(RateLimitLayer::new(redis_store.clone(), over.clone())),
        )
        .route(
            "/flood/no-deny-cache",
            get(ok).layer(RateLimitLayer::new(redis_store, over).no_deny_cache()),
        )
}

struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn parse_latency(text: &str) -> f64 {
    let text = text.trim();
    let (num, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        (text, 1.0)
    };
    num.trim().parse::<f64>().unwrap_or(f64::NAN) * factor
}

fn wrk(url: &str, connections: usize, seconds: u64, script: Option<&str>) -> Run {
    let mut cmd = Command::new("wrk");
    let threads = connections.clamp(1, 2);
    cmd.args([
        &format!("-t{threads}"),
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    let script_file;
    if let Some(script) = script {
        script_file = std::env::temp_dir().join(format!("trl-wrk-{}.lua", std::process::id()));
        // `RUN` is replaced by a fresh number on every run (unique idempotency keys).
        let script = script.replace("RUN", &rand::random::<u64>().to_string());
        std::fs::write(&script_file, script).expect("write wrk script");
        cmd.arg("-s").arg(&script_file);
    }
    cmd.arg(url);
    let out = cmd
        .output()
        .expect("wrk must be installed (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = Run {
        rps: 0.0,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("50%") {
            run.p50_us = parse_latency(v);
        } else if let Some(v) = line.strip_prefix("99%") {
            run.p99_us = parse_latency(v);
        }
    }
    run
}

struct Calls {
    scripts: u64,
    total: u64,
    /// Microseconds Redis spent in scripts.
    script_usec: u64,
    /// Microseconds Redis spent in all commands (a script's inner commands count twice).
    all_usec: u64,
}

fn calls(redis: &RedisServer) -> Calls {
    let info = redis.cli(&["INFO", "commandstats"]).unwrap_or_default();
    let (mut scripts, mut total, mut script_usec, mut all_usec) = (0, 0, 0, 0);
    for line in info.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let field = |f: &str| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(f))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if name == "cmdstat_info" {
            continue;
        }
        total += field("calls=");
        all_usec += field("usec=");
        if name == "cmdstat_evalsha" || name == "cmdstat_eval" {
            scripts += field("calls=");
            script_usec += field("usec=");
        }
    }
    Calls {
        scripts,
        total,
        script_usec,
        all_usec,
    }
}

fn ms(us: f64) -> String {
    if us.is_nan() {
        "-".into()
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    scripts: f64,
    total: f64,
    usec: f64,
    /// CPU time of this process (the axum server) per request, µs.
    app_cpu: f64,
    /// CPU time of `redis-server` per request (commands, I/O, event loop), µs.
    redis_cpu: f64,
}

/// CPU seconds (user + system, all threads) this process has used.
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime and stime are the 12th
    // and 13th, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds `redis-server` has used (`INFO cpu`).
fn redis_cpu(redis: &RedisServer) -> f64 {
    let info = redis.cli(&["INFO", "cpu"]).unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| *k == "used_cpu_sys" || *k == "used_cpu_user")
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

struct Bench<'a> {
    redis: &'a RedisServer,
    port: u16,
    seconds: u64,
}

struct Config {
    label: String,
    path: &'static str,
    connections: usize,
    script: Option<String>,
}

fn config(label: impl Into<String>, path: &'static str) -> Config {
    Config {
        label: label.into(),
        path,
        connections: 64,
        script: None,
    }
}

impl Bench<'_> {
    fn sample(&self, c: &Config) -> Sample {
        let url = format!("http://127.0.0.1:{}{}", self.port, c.path);
        let before = calls(self.redis);
        let (app_before, redis_before) = (own_cpu(), redis_cpu(self.redis));
        let run = wrk(&url, c.connections, self.seconds, c.script.as_deref());
        let (app_after, redis_after) = (own_cpu(), redis_cpu(self.redis));
        let after = calls(self.redis);
        let requests = (run.rps * self.seconds as f64).max(1.0);
        // Commands run by a script are counted on their own too: with scripts, the scripts'
        // time already holds theirs.
        let usec = if after.scripts > before.scripts {
            after.script_usec - before.script_usec
        } else {
            after.all_usec - before.all_usec
        };
        Sample {
            rps: run.rps,
            p50_us: run.p50_us,
            p99_us: run.p99_us,
            scripts: (after.scripts - before.scripts) as f64 / requests,
            total: (after.total - before.total) as f64 / requests,
            usec: usec as f64 / requests,
            app_cpu: (app_after - app_before) * 1e6 / requests,
            redis_cpu: (redis_after - redis_before) * 1e6 / requests,
        }
    }

    /// Measures every configuration `rounds` times, in alternating order (A B C, C B A, ...),
    /// and keeps each one's median run, so that drift during the run favours no one.
    fn group(&self, configs: &[Config], rounds: usize) -> Vec<Sample> {
        for c in configs {
            let url = format!("http://127.0.0.1:{}{}", self.port, c.path);
            wrk(&url, c.connections, 1, c.script.as_deref()); // warm up
        }
        let mut samples: Vec<Vec<Sample>> = configs.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..configs.len()).collect()
            } else {
                (0..configs.len()).rev().collect()
            };
            for i in order {
                let s = self.sample(&configs[i]);
                eprintln!(
                    "  {} (c={}): {:.0} req/s",
                    configs[i].label, configs[i].connections, s.rps
                );
                samples[i].push(s);
            }
        }
        samples
            .into_iter()
            .map(|mut runs| {
                runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                runs.swap_remove(runs.len() / 2)
            })
            .collect()
    }
}

fn row(c: &Config, s: &Sample, baseline: f64) -> String {
    format!(
        "| {} | {} | {:.0} | {:.2} | {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} |",
        c.label,
        c.connections,
        s.rps,
        s.rps / baseline,
        ms(s.p50_us),
        ms(s.p99_us),
        s.scripts,
        s.total,
        s.usec,
        s.app_cpu,
        s.redis_cpu
    )
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn allocations_per_request() -> (f64, f64) {
    let bare = ServiceBuilder::new().service_fn(|_req: http::Request<String>| async {
        Ok::<_, Infallible>(http::Response::new(String::from("ok")))
    });
    let limited = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            MemoryStore::new(),
            Policy::new("bench", Rule::gcra(HUGE, Duration::from_secs(1), HUGE)),
        ))
        .service(bare);
    let request = || {
        let mut req = http::Request::new(String::new());
        req.extensions_mut()
            .insert::<SocketAddr>("10.0.0.1:1234".parse().unwrap_or_else(|_| unreachable!()));
        req
    };
    let n = 20_000u64;
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..n {
        let _ = bare.oneshot(request()).await;
    }
    let mid = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..n {
        let _ = limited.clone().oneshot(request()).await;
    }
    let after = ALLOCS.load(Ordering::Relaxed);
    (
        (mid - before) as f64 / n as f64,
        (after - mid) as f64 / n as f64,
    )
}

async fn memory_store_rss() -> (u64, u64, u64, usize, usize) {
    let store = MemoryStore::new();
    let rules = [Rule::fixed_window(10, Duration::from_secs(2))];
    let before = rss_kib();
    for i in 0u32..1_000_000 {
        let key = StoreKey::from_parts([i.to_le_bytes().as_slice()]);
        let _ = store.check(RateCheck::new(&key, &rules, 1, false)).await;
    }
    let full = rss_kib();
    let len_full = store.len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    store.sweep();
    let after = rss_kib();
    (before, full, after, len_full, store.len())
}

async fn redis_memory_per_key(redis: &RedisServer) -> Vec<String> {
    let store = RedisStore::connect(&redis.url()).await.expect("store");
    let mut rows = Vec::new();
    for (name, rule) in [
        (
            "fixed window",
            Rule::fixed_window(100, Duration::from_secs(600)),
        ),
        (
            "sliding log",
            Rule::sliding_log(100, Duration::from_secs(600)),
        ),
        (
            "sliding window",
            Rule::sliding_window(100, Duration::from_secs(600)),
        ),
        (
            "token bucket",
            Rule::token_bucket(100, 1, Duration::from_secs(600)),
        ),
        ("GCRA", Rule::gcra(100, Duration::from_secs(600), 100)),
    ] {
        let key = StoreKey::from_parts([name.as_bytes()]);
        let rules = [rule];
        for _ in 0..100 {
            let _ = store.check(RateCheck::new(&key, &rules, 1, false)).await;
        }
        let pattern = format!("trl:{{{}}}:*", key.to_hex());
        let found = redis
            .cli(&["--scan", "--pattern", &pattern])
            .unwrap_or_default();
        let bytes: u64 = found
            .lines()
            .filter(|k| !k.is_empty())
            .filter_map(|k| redis.cli(&["MEMORY", "USAGE", k, "SAMPLES", "0"]))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum();
        rows.push(format!("| {name} | 100 | {bytes} |"));
    }
    rows
}

fn main() {
    let mut seconds = 2;
    let mut only: Option<String> = None;
    let mut serve = false;
    // Five alternating rounds: the median of five resists the machine's own drift (pairs moved
    // by up to 10% between back-to-back runs of three).
    let mut rounds = 5;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--seconds" {
            seconds = args.next().and_then(|s| s.parse().ok()).unwrap_or(seconds);
        } else if arg == "--only" {
            only = args.next();
        } else if arg == "--rounds" {
            rounds = args.next().and_then(|s| s.parse().ok()).unwrap_or(rounds);
        } else if arg == "--serve" {
            serve = true;
        }
    }
    if Command::new("wrk").arg("--version").output().is_err() {
        eprintln!("wrk is not installed: apt-get install -y wrk");
        std::process::exit(2);
    }
    let redis = RedisServer::start();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let app = server_rt.block_on(app(&redis));
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    server_rt.spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });

    if serve {
        // For profiling: the server and Redis stay up, to be driven by hand.
        println!(
            "serving on http://127.0.0.1:{port} (routes /bare, /memory, /governor, /blog, \
             /redis/<strategy>, /fred/<strategy>, /evalsha/<strategy>, /evalsha-fred/<strategy>, \
             ...), Redis at {}; stops when standard input closes (Enter)",
            redis.url()
        );
        let _ = std::io::stdin().read_line(&mut String::new());
        return;
    }
    let bench = Bench {
        redis: &redis,
        port,
        seconds,
    };
    let names = [
        "fixed",
        "sliding-log",
        "sliding-window",
        "token-bucket",
        "gcra",
    ];
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let mut main = vec![
        config("1. bare axum handler (baseline)", "/bare"),
        config("2. RateLimitLayer, memory store (GCRA)", "/memory"),
        config("3. tower_governor (GCRA, in memory)", "/governor"),
        config(
            "5. blog pipeline: ZREMRANGEBYSCORE+ZADD+ZCARD+EXPIRE",
            "/blog",
        ),
    ];
    for name in names {
        main.push(config(
            format!("4. RateLimitLayer, redis-rs: {name}"),
            leak(format!("/redis/{name}")),
        ));
        main.push(config(
            format!("4. RateLimitLayer, fred: {name}"),
            leak(format!("/fred/{name}")),
        ));
        main.push(config(
            format!("6. hand-written EVALSHA, redis-rs: {name}"),
            leak(format!("/evalsha/{name}")),
        ));
        main.push(config(
            format!("6. hand-written EVALSHA, fred: {name}"),
            leak(format!("/evalsha-fred/{name}")),
        ));
    }
    main.push(config(
        "8. handler doing 5 ms of work, uncached",
        "/cache/uncached",
    ));
    main.push(config(
        "8. the same behind CacheLayer, redis-rs (hits)",
        "/cache/hit",
    ));
    main.push(Config {
        script: Some(
            "local n = 0\nlocal counter = 0\nfunction setup(thread) n = n + 1; thread:set(\"tid\", n) end\nrequest = function()\n  counter = counter + 1\n  return wrk.format(\"POST\", nil, {[\"Idempotency-Key\"] = \"RUN-\" .. tid .. \"-\" .. counter}, \"{}\")\nend\n"
                .to_owned(),
        ),
        ..config("8. IdempotencyLockLayer, redis-rs: first execution (unique keys)", "/orders")
    });
    main.push(Config {
        script: Some("request = function()\n  return wrk.format(\"POST\", nil, {[\"Idempotency-Key\"] = \"replayed\"}, \"{}\")\nend\n".to_owned()),
        ..config("8. IdempotencyLockLayer, redis-rs: replay (one key)", "/orders")
    });
    main.push(config(
        "7. one key over its limit, deny cache on",
        "/flood/deny-cache",
    ));
    main.push(config(
        "7. one key over its limit, deny cache off",
        "/flood/no-deny-cache",
    ));
    if let Some(only) = &only {
        // A quick look at some configurations (the baseline is always kept).
        let mut i = 0;
        main.retain(|c| {
            i += 1;
            i == 1 || c.label.contains(only.as_str())
        });
    }
    let samples = bench.group(&main, rounds);
    let baseline = samples[0].rps;
    let rps_of = |label: &str| {
        main.iter()
            .position(|c| c.label == label)
            .map_or(f64::NAN, |i| samples[i].rps)
    };

    let mut scaling = Vec::new();
    for c in [1, 16, 64, 256] {
        for (label, path) in [
            ("bare", "/bare"),
            ("RateLimitLayer, redis-rs gcra", "/redis/gcra"),
        ] {
            scaling.push(Config {
                connections: c,
                ..config(format!("{label}, {c} connections"), path)
            });
        }
    }
    for keys in [1u64, 10_000, 1_000_000] {
        scaling.push(Config {
            script: Some(format!(
                "request = function()\n  return wrk.format(nil, nil, {{[\"x-api-key\"] = \"k\" .. math.random(0, {})}})\nend\n",
                keys - 1
            )),
            ..config(format!("RateLimitLayer, redis-rs gcra, {keys} distinct keys"), "/keys")
        });
    }
    if only.is_some() {
        scaling.clear();
    }
    let scaling_samples = bench.group(&scaling, 1);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (bare_allocs, layer_allocs) = rt.block_on(allocations_per_request());
    let (rss0, rss1, rss2, len1, len2) = rt.block_on(memory_store_rss());
    let per_key = rt.block_on(redis_memory_per_key(&redis));

    println!("Each configuration ran {rounds} times for {seconds} s, in alternating order; the median run is shown.");
    println!();
    println!("| configuration | conns | req/s | vs bare | p50 | p99 | scripts/req | cmds/req | Redis µs/req | app CPU µs/req | Redis CPU µs/req |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (c, s) in main.iter().zip(&samples) {
        println!("{}", row(c, s, baseline));
    }
    println!();
    println!("| ratio (same run) | value | goal |");
    println!("|---|---|---|");
    let ratio = |a: &str, b: &str| rps_of(a) / rps_of(b);
    let bare = "1. bare axum handler (baseline)";
    let memory = "2. RateLimitLayer, memory store (GCRA)";
    let blog = "5. blog pipeline: ZREMRANGEBYSCORE+ZADD+ZCARD+EXPIRE";
    println!(
        "| memory store / bare | {:.2} | >= 0.90 |",
        ratio(memory, bare)
    );
    println!(
        "| memory store / tower_governor | {:.2} | >= 1.00 |",
        ratio(memory, "3. tower_governor (GCRA, in memory)")
    );
    for name in names {
        let layer = format!("4. RateLimitLayer, redis-rs: {name}");
        println!(
            "| redis-rs layer / hand-written EVALSHA, {name} | {:.2} | >= 0.95 |",
            ratio(
                &layer,
                &format!("6. hand-written EVALSHA, redis-rs: {name}")
            )
        );
        println!(
            "| fred layer / hand-written EVALSHA, {name} | {:.2} | >= 0.95 |",
            ratio(
                &format!("4. RateLimitLayer, fred: {name}"),
                &format!("6. hand-written EVALSHA, fred: {name}")
            )
        );
    }
    for (name, goal) in [
        ("fixed", "1.30"),
        ("gcra", "1.30"),
        ("token-bucket", "1.30"),
        ("sliding-log", "1.00"),
    ] {
        println!(
            "| redis-rs layer / blog pipeline, {name} | {:.2} | >= {goal} |",
            ratio(&format!("4. RateLimitLayer, redis-rs: {name}"), blog)
        );
    }
    println!(
        "| one key over its limit, deny cache on / bare | {:.2} | >= 0.90 |",
        ratio("7. one key over its limit, deny cache on", bare)
    );
    println!(
        "| CacheLayer hit / uncached 5 ms handler | {:.2} | (report) |",
        ratio(
            "8. the same behind CacheLayer, redis-rs (hits)",
            "8. handler doing 5 ms of work, uncached"
        )
    );
    println!();
    println!("| how cost grows | conns | req/s | vs bare (64 conns) | p50 | p99 | scripts/req | cmds/req | Redis µs/req | app CPU µs/req | Redis CPU µs/req |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (c, s) in scaling.iter().zip(&scaling_samples) {
        println!("{}", row(c, s, baseline));
    }
    println!();
    println!("Allocations per request, in process (no network): bare service {bare_allocs:.1}, with RateLimitLayer on the memory store {layer_allocs:.1}.");
    println!();
    println!("Memory store with 1,000,000 keys (fixed window, 2 s): RSS {rss0} KiB before, {rss1} KiB with {len1} entries, {rss2} KiB after they expired and were swept ({len2} entries left).");
    println!();
    println!("| strategy (Redis) | units admitted | MEMORY USAGE of the key's state (bytes) |");
    println!("|---|---|---|");
    for row in per_key {
        println!("{row}");
    }
}
