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
//! (including the ones a script runs inside Redis). Every row shows wrk's `Non-2xx or 3xx
//! responses` over its runs; a row whose limit is never reached warns when it is not 0 (a route
//! that fails would look fast).
//!
//! Rows `10.` put leased quotas over their limit (`--only "10."` runs only them): two replicas
//! (two `Leased` stores, each on its own connection) share one hot key, one wrk alternating
//! between them far above the limit. Their own table counts, per window, what was admitted
//! (over-admission must be 0; under-admission is what leasing costs) against the documented
//! bounds; `support/limited.rs` says how the windows are located and counted.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/limited.rs"]
mod limited;
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
use limited::{Observed, Outcome, Recorder, Stamped};
use redis::aio::ConnectionManager;
use strategies::{strategies, HUGE};
use tower::{ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{
        KeyExtractor, Lease, LeaseStats, Leased, MissingKey, Policy, RateLimitLayer, Rule,
    },
    store::{
        Decision, FredStore, MemoryStore, RateCheck, RateLimitStore, RedisStore, RuleState,
        RuleStates, StoreError,
    },
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
    /// A fred client with the timeouts `FredStore::connect` sets (a 2 s command timeout, the
    /// unresponsive-connection check), to tell their cost from the store's own.
    fred_timed: fred::prelude::Client,
    sha: Arc<str>,
    key: Arc<str>,
    args: Arc<Vec<String>>,
    nonce: bool,
}

async fn ok() -> &'static str {
    "ok"
}

/// A store that admits every request at once and keeps nothing (row 2c): the layer's own
/// cost, apart from any store's.
#[derive(Clone)]
struct AdmitAll;

impl AdmitAll {
    fn decision(check: &RateCheck<'_>) -> Decision {
        let state = RuleState {
            remaining: 0,
            reset: Duration::ZERO,
        };
        Decision {
            allowed: true,
            denied_by: None,
            retry_after: Duration::ZERO,
            rules: RuleStates::repeat(state, check.rules.len()),
        }
    }
}

impl RateLimitStore for AdmitAll {
    type Future = std::future::Ready<Result<Decision, StoreError>>;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        std::future::ready(Ok(Self::decision(&check)))
    }

    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        Some(Ok(Self::decision(&check)))
    }

    fn is_remote(&self) -> bool {
        false
    }
}

/// The name a row shows for a client's route segment (`redis` is redis-rs).
fn client_name(client: &str) -> &str {
    if client == "redis" {
        "redis-rs"
    } else {
        client
    }
}

/// The `429` that the flood rows get from the layer (`RateLimit` fields, `Retry-After`, the
/// problem details body), sent by a handler without any layer: what sending that response costs
/// by itself, against `ok`.
async fn same_429() -> axum::response::Response {
    const BODY: &str = concat!(
        r#"{"type":"https://iana.org/assignments/http-problem-types#quota-exceeded","#,
        r#""title":"Quota Exceeded","status":429,"#,
        r#""detail":"rate limit exceeded; retry after the time in Retry-After","#,
        r#""violated-policies":["fixed-1-600s"]}"#
    );
    let mut response = axum::response::Response::new(axum::body::Body::from(BODY));
    *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-type", "application/problem+json"),
        ("retry-after", "600"),
        ("ratelimit", "\"fixed-1-600s\";r=0;t=600"),
        ("ratelimit-policy", "\"fixed-1-600s\";q=1;w=600"),
    ] {
        headers.insert(name, http::HeaderValue::from_static(value));
    }
    response
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

/// The same on a fred client with the store's timeouts.
async fn evalsha_fred_timed(State(mut hand): State<Hand>) -> &'static str {
    hand.fred = hand.fred_timed.clone();
    evalsha_fred(State(hand)).await
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

/// Leased quotas with demand far above the limit (rows `10.`): two replicas, each a `Leased`
/// store over its own connection, share one hot key (the peer IP) under one policy.
struct Limited {
    label: String,
    /// `redis` or `fred`.
    client: &'static str,
    /// `fixed` or `gcra`.
    strategy: &'static str,
    recorder: Arc<Recorder>,
    /// The replicas' `Leased::stats`, set when the routes are built.
    stats: std::sync::Mutex<Vec<StatsFn>>,
}

type StatsFn = Box<dyn Fn() -> LeaseStats + Send + Sync>;

impl Limited {
    /// The replicas' lease statistics, summed.
    fn stats(&self) -> LeaseStats {
        let fns = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut sum = LeaseStats::default();
        for f in fns.iter() {
            let s = f();
            sum.leases += s.leases;
            sum.denied_leases += s.denied_leases;
            sum.leased_units += s.leased_units;
            sum.direct_checks += s.direct_checks;
            sum.local_admissions += s.local_admissions;
            sum.returns += s.returns;
            sum.returned_units += s.returned_units;
            sum.expired_units += s.expired_units;
        }
        sum
    }

    fn keep_stats<B: Send + Sync + 'static>(&self, store: &Leased<B>) {
        let store = store.clone();
        self.stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(move || store.stats()));
    }
}

/// The limited rows' quota: 2,000 per second; GCRA burst; the largest batch; replicas.
const LIMIT: u64 = 2_000;
const BURST: u64 = 200;
const LEASE_MAX: u64 = 256;
const REPLICAS: u64 = 2;

impl Limited {
    fn rule(&self) -> Rule {
        if self.strategy == "fixed" {
            Rule::fixed_window(LIMIT, Duration::from_secs(1))
        } else {
            Rule::gcra(LIMIT, Duration::from_secs(1), BURST)
        }
    }

    /// The path of replica `replica` (`a` or `b`).
    fn path(&self, replica: &str) -> String {
        format!("/limited/{}/{}/{replica}", self.client, self.strategy)
    }

    /// GCRA: what a lease may add to `burst + rate × Δ`, `min(rate × τ, replicas × max)`.
    fn slack(&self) -> u64 {
        let tau = Lease::up_to(LEASE_MAX)
            .lease_time(&self.rule())
            .unwrap_or_default();
        ((LIMIT as f64 * tau.as_secs_f64()) as u64).min(REPLICAS * LEASE_MAX)
    }

    /// GCRA: the most any 1 s interval may admit.
    fn bound_1s(&self) -> u64 {
        BURST + LIMIT + self.slack()
    }
}

async fn app(redis: &RedisServer, limited: &[Limited]) -> Router {
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
    let fred_timed = {
        use fred::prelude::{Builder, ClientLike, Config};
        let client = Builder::from_config(Config::from_url(&url).expect("fred url"))
            .with_connection_config(|c| {
                c.unresponsive.max_timeout = Some(Duration::from_secs(2));
                c.unresponsive.interval = Duration::from_millis(500);
            })
            .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
            .build()
            .expect("fred client");
        client.init().await.expect("fred connect");
        client
    };
    let shared = Shared { conn: conn.clone() };
    // The same fred store on a pool of two clients (two connections, round robin).
    let fred_pool = {
        use fred::prelude::{Builder, ClientLike, Config};
        let pool = Builder::from_config(Config::from_url(&url).expect("fred url"))
            .build_pool(2)
            .expect("fred pool");
        pool.init().await.expect("fred pool connect");
        FredStore::from_pool(pool)
    };

    let governor = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .finish()
        .expect("governor config");

    let mut router = Router::new()
        .route("/bare", get(ok))
        .route(
            "/memory",
            get(ok).layer(
                RateLimitLayer::new(
                    memory.clone(),
                    Policy::new("memory", Rule::gcra(HUGE, Duration::from_secs(1), HUGE)),
                )
                .inner_body(),
            ),
        )
        .route(
            "/admit-all",
            get(ok).layer(
                RateLimitLayer::new(
                    AdmitAll,
                    Policy::new("admit-all", Rule::gcra(HUGE, Duration::from_secs(1), HUGE)),
                )
                .inner_body(),
            ),
        )
        .route(
            "/memory-wrapped",
            get(ok).layer(RateLimitLayer::new(
                memory.clone(),
                Policy::new("wrapped", Rule::gcra(HUGE, Duration::from_secs(1), HUGE)),
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
                &format!("/fred-pool/{name}"),
                get(ok).layer(RateLimitLayer::new(fred_pool.clone(), policy.clone())),
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
            fred_timed: fred_timed.clone(),
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
                &format!("/evalsha-fred-timed/{name}"),
                get(evalsha_fred_timed).with_state(hand.clone()),
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
    // Leased quotas: fixed window and GCRA on both clients, one hot key (the peer IP) and
    // 10,000 keys (`x-api-key`).
    {
        let leased_redis = Leased::new(redis_store.clone(), Lease::up_to(256));
        let leased_fred = Leased::new(fred_store.clone(), Lease::up_to(256));
        for (name, rule) in [
            ("fixed", Rule::fixed_window(HUGE, Duration::from_secs(60))),
            ("gcra", Rule::gcra(HUGE, Duration::from_secs(1), HUGE)),
        ] {
            let policy = Policy::new(format!("leased-{name}"), rule);
            router = router
                .route(
                    &format!("/leased/redis/{name}"),
                    get(ok).layer(RateLimitLayer::new(leased_redis.clone(), policy.clone())),
                )
                .route(
                    &format!("/leased/fred/{name}"),
                    get(ok).layer(RateLimitLayer::new(leased_fred.clone(), policy.clone())),
                )
                .route(
                    &format!("/leased-keys/redis/{name}"),
                    get(ok).layer(
                        RateLimitLayer::new(leased_redis.clone(), policy.clone())
                            .key(KeyExtractor::header(HeaderName::from_static("x-api-key")))
                            .on_missing_key(MissingKey::Shared),
                    ),
                )
                .route(
                    &format!("/leased-keys/fred/{name}"),
                    get(ok).layer(
                        RateLimitLayer::new(leased_fred.clone(), policy)
                            .key(KeyExtractor::header(HeaderName::from_static("x-api-key")))
                            .on_missing_key(MissingKey::Shared),
                    ),
                );
        }
    }
    // Leased quotas over their limit: two replicas per configuration, each a `Leased` store
    // over its own connection; demand counted before the layer, admissions when decided (and
    // again in the handler).
    for spec in limited {
        let policy = Policy::new(
            format!("limited-{}-{}", spec.client, spec.strategy),
            spec.rule(),
        );
        for replica in ["a", "b"] {
            let counted = {
                let recorder = Arc::clone(&spec.recorder);
                get(move || {
                    recorder.admitted();
                    async { "ok" }
                })
            };
            let observed = Arc::clone(&spec.recorder);
            let lease = Lease::up_to(LEASE_MAX);
            let route: axum::routing::MethodRouter = if spec.client == "redis" {
                let store = RedisStore::connect(&url).await.expect("redis store");
                let leased = Leased::new(Observed::new(store, Arc::clone(&observed)), lease);
                spec.keep_stats(&leased);
                let stamped = Stamped::new(leased, observed);
                counted.layer(RateLimitLayer::new(stamped, policy.clone()))
            } else {
                let store = FredStore::connect(&url).await.expect("fred store");
                let leased = Leased::new(Observed::new(store, Arc::clone(&observed)), lease);
                spec.keep_stats(&leased);
                let stamped = Stamped::new(leased, observed);
                counted.layer(RateLimitLayer::new(stamped, policy.clone()))
            };
            let recorder = Arc::clone(&spec.recorder);
            router = router.route(
                &spec.path(replica),
                route.layer(tower::util::MapRequestLayer::new(
                    move |req: axum::extract::Request| {
                        recorder.demand();
                        req
                    },
                )),
            );
        }
    }
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
        .route("/flood/same-429", get(same_429))
}

struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Responses completed, and those that were not 2xx or 3xx (wrk's
    /// `Non-2xx or 3xx responses`).
    requests: u64,
    non2xx: u64,
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
        requests: 0,
        non2xx: 0,
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some((n, _)) = line.split_once(" requests in ") {
            run.requests = n.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.non2xx = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
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
    /// Responses that were not 2xx or 3xx, summed over every run of the configuration.
    non2xx: u64,
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

/// The runs of one limited configuration.
#[derive(Default)]
struct LimitedOutcome {
    outcome: Outcome,
    /// Scripts Redis ran (`EVALSHA` + `EVAL`) during the runs.
    scripts: u64,
    /// Admissions (decided), and requests the handler ran.
    admitted: u64,
    served: u64,
    /// Responses wrk received, and the ones not 2xx or 3xx.
    requests: u64,
    non2xx: u64,
    /// The replicas' store calls during the runs (`Leased::stats`): leases (and the denied
    /// ones), direct checks, returns; and units that expired unused.
    leases: u64,
    denied_leases: u64,
    direct_checks: u64,
    returns: u64,
    expired_units: u64,
}

struct Config {
    label: String,
    path: &'static str,
    connections: usize,
    script: Option<String>,
}

/// How long the returns of a leased row's idle batches take to land: the idle time (1 s), the
/// sweep's period (1 s) and a margin.
const LEASE_RETURNS: Duration = Duration::from_millis(2300);

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
        // A leased row's batches are returned once idle (`Lease::idle`, 1 s, swept every
        // second): up to 10,000 return calls after a 10,000-key row. They land before this
        // row is counted, and this row's land before the next one is.
        let leased = c.label.starts_with("9. ");
        if leased {
            std::thread::sleep(LEASE_RETURNS);
        }
        let before = calls(self.redis);
        let (app_before, redis_before) = (own_cpu(), redis_cpu(self.redis));
        let run = wrk(&url, c.connections, self.seconds, c.script.as_deref());
        let (app_after, redis_after) = (own_cpu(), redis_cpu(self.redis));
        let after = calls(self.redis);
        if leased {
            std::thread::sleep(LEASE_RETURNS);
        }
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
            non2xx: run.non2xx,
        }
    }

    /// Drives the two replicas of `spec` together (one wrk, alternating paths) `rounds` times
    /// for `seconds` each, and pools what each run admitted per window.
    fn limited(&self, spec: &Limited, rounds: usize, seconds: u64) -> LimitedOutcome {
        let url = format!("http://127.0.0.1:{}{}", self.port, spec.path("a"));
        let script = format!(
            "local paths = {{\"{}\", \"{}\"}}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(nil, paths[i % 2 + 1])\nend\n",
            spec.path("a"),
            spec.path("b")
        );
        let mut out = LimitedOutcome::default();
        for _ in 0..rounds {
            // The previous run's window and leases end (and idle batches are returned).
            std::thread::sleep(Duration::from_millis(1500));
            spec.recorder.start();
            let before = calls(self.redis);
            let stats_before = spec.stats();
            let run = wrk(&url, 64, seconds, Some(&script));
            let after = calls(self.redis);
            let stats_after = spec.stats();
            let d = |f: fn(&LeaseStats) -> u64| f(&stats_after) - f(&stats_before);
            out.leases += d(|s| s.leases);
            out.denied_leases += d(|s| s.denied_leases);
            out.direct_checks += d(|s| s.direct_checks);
            out.returns += d(|s| s.returns);
            out.expired_units += d(|s| s.expired_units);
            // Requests still in the server when wrk stopped.
            std::thread::sleep(Duration::from_millis(100));
            let trace = spec.recorder.trace();
            out.outcome.denials(&trace);
            if spec.strategy == "fixed" {
                out.outcome.fixed(&trace, LIMIT, Duration::from_secs(1));
            } else {
                out.outcome
                    .gcra(&trace, LIMIT, spec.bound_1s(), BURST, spec.slack());
            }
            out.scripts += after.scripts - before.scripts;
            out.admitted += trace.admitted();
            out.served += trace.served;
            out.requests += run.requests;
            out.non2xx += run.non2xx;
            eprintln!(
                "  {}: {} requests, {} admitted, {} non-2xx, {} scripts",
                spec.label,
                run.requests,
                trace.admitted(),
                run.non2xx,
                after.scripts - before.scripts
            );
        }
        out
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
                    "  {} (c={}): {:.0} req/s, {} non-2xx",
                    configs[i].label, configs[i].connections, s.rps, s.non2xx
                );
                samples[i].push(s);
            }
        }
        samples
            .into_iter()
            .map(|mut runs| {
                let non2xx = runs.iter().map(|r| r.non2xx).sum();
                runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                let mut median = runs.swap_remove(runs.len() / 2);
                median.non2xx = non2xx;
                median
            })
            .collect()
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The table of the leased quotas over their limit, and a line of details per row.
fn print_limited(limited: &[Limited], outcomes: &[LimitedOutcome], rounds: usize, seconds: u64) {
    println!();
    println!(
        "Leased quotas over their limit: two replicas (two `Leased` stores, each on its own \
         connection, up to {LEASE_MAX} units a batch) share one hot key; one `wrk -t2 -c64` \
         alternates between them, far above the limit. Runs: {rounds} of {seconds} s, pooled. \
         Admissions are stamped when decided (a store wrapper above `Leased`). \
         Fixed window: per Redis window (located from the leases' `PTTL`, counted \
         pessimistically over the boundary's uncertainty); GCRA: per 1 s from the first request. \
         Full windows: inside the demand, which exceeded the limit."
    );
    println!();
    println!("| configuration | windows (full) | limit | admitted per full window (min / mean / max) | over-admission (total) | under-admission per full window (mean / max) | shortfall over the demand (vs limit × T) | bound | Redis scripts per admitted request | requests (non-2xx) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (l, o) in limited.iter().zip(outcomes) {
        let out = &o.outcome;
        let expected = LIMIT * out.run_ms / 1000;
        let shortfall = expected as i64 - out.run_admitted as i64;
        let shortfall = format!(
            "{shortfall} of {} ({:.1}%)",
            thousands(expected),
            100.0 * shortfall as f64 / expected.max(1) as f64
        );
        let per_window = out.per_window().map_or("-".into(), |(min, mean, max)| {
            format!(
                "{} / {} / {}",
                thousands(min),
                thousands(mean.round() as u64),
                thousands(max)
            )
        });
        let under = out
            .under(LIMIT)
            .map_or("-".into(), |(mean, max)| format!("{mean:.0} / {max}"));
        let scripts = o.scripts as f64 / o.admitted.max(1) as f64;
        let (limit, over, bound) = if l.strategy == "fixed" {
            (
                format!("{} per window", thousands(LIMIT)),
                out.over.to_string(),
                format!(
                    "over 0; under ≤ {} ({REPLICAS} × {LEASE_MAX})",
                    REPLICAS * LEASE_MAX
                ),
            )
        } else {
            (
                format!("{}/s", thousands(LIMIT)),
                format!("{}; whole runs {}", out.over, out.run_over),
                format!(
                    "≤ {} per 1 s ({BURST} + {} + min(rate × τ, {REPLICAS} × {LEASE_MAX}) = {})",
                    thousands(l.bound_1s()),
                    thousands(LIMIT),
                    l.slack()
                ),
            )
        };
        println!(
            "| {} | {} ({}) | {limit} | {per_window} | {over} | {under} | {shortfall} | {bound} | {scripts:.4} | {} ({}) |",
            l.label,
            out.windows,
            out.full.len(),
            thousands(o.requests),
            thousands(o.non2xx)
        );
    }
    println!();
    for (l, o) in limited.iter().zip(outcomes) {
        let out = &o.outcome;
        let seen = o.requests.saturating_sub(o.non2xx);
        let calls = format!(
            "store calls (`Leased::stats`, both replicas): {} leases ({} denied), {} direct \
             checks, {} returns; {} units expired unused",
            thousands(o.leases),
            thousands(o.denied_leases),
            thousands(o.direct_checks),
            thousands(o.returns),
            thousands(o.expired_units)
        );
        let expected = LIMIT * out.run_ms / 1000;
        let shortfall = expected as i64 - out.run_admitted as i64;
        if l.strategy == "fixed" {
            println!(
                "- {}: window ends located to within {} ms (the widest); {} admissions fell in \
                 milliseconds two windows may claim (counted in both), {} in no located window; \
                 the leases of {} windows disagreed on its end; at most {} units debited in one \
                 window; between a window's end and the next start {} ms on average, {} ms at \
                 most, {} of {} gaps of half a period or more (a window's time without one); {} admitted in {:.1} s of demand, limit × T / period = {}: shortfall {} \
                 ({:.2}%); {} denied leases, {} of them answering a retry of 1 s or more \
                 (longest {} ms); 2xx seen by wrk {}, admissions decided {}, run by the handler {}; {calls}.",
                l.label,
                out.widest_ms,
                out.shared,
                out.unattributed,
                out.inconsistent,
                thousands(out.most_debited),
                out.gaps.iter().sum::<u64>() / out.gaps.len().max(1) as u64,
                out.gaps.iter().max().copied().unwrap_or(0),
                out.gaps.iter().filter(|g| **g >= 500).count(),
                out.gaps.len(),
                thousands(out.run_admitted),
                out.run_ms as f64 / 1000.0,
                thousands(expected),
                shortfall,
                100.0 * shortfall as f64 / expected.max(1) as f64,
                out.denials,
                out.retries_of_a_second,
                out.longest_retry_ms,
                thousands(seen),
                thousands(o.admitted),
                thousands(o.served)
            );
        } else {
            println!(
                "- {}: most admitted in any 1 s interval (1 ms steps) {} (bound {}); {} admitted \
                 in {:.1} s of demand, rate × T = {}: shortfall {} ({:.2}%), whole-run bound \
                 `burst + rate × T + {}` exceeded by {}; 2xx seen by wrk {}, admissions decided {}, run by the handler {}; \
                 {calls}.",
                l.label,
                thousands(out.sliding_max),
                thousands(l.bound_1s()),
                thousands(out.run_admitted),
                out.run_ms as f64 / 1000.0,
                thousands(expected),
                shortfall,
                100.0 * shortfall as f64 / expected.max(1) as f64,
                l.slack(),
                out.run_over,
                thousands(seen),
                thousands(o.admitted),
                thousands(o.served)
            );
        }
    }
}

fn row(c: &Config, s: &Sample, baseline: f64) -> String {
    format!(
        "| {} | {} | {:.0} | {:.2} | {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {} |",
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
        s.redis_cpu,
        s.non2xx
    )
}

/// The physical limit: `redis-benchmark` running the layer's own GCRA script (`EVALSHA`, the
/// arguments the layer sends, `-c 64`) against the same Redis, with one hot key or with 10,000
/// keys (`__rand_int__`). Requests/s, and Redis µs per script from `INFO commandstats`.
fn ceiling(redis: &RedisServer, sha: &str, args: &[String], keys: Option<u64>) -> (f64, f64) {
    let port = redis.port.to_string();
    let mut cmd = Command::new("redis-benchmark");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-c",
        "64",
        "-n",
        "300000",
        "-q",
    ]);
    let key = match keys {
        Some(n) => {
            cmd.args(["-r", &n.to_string()]);
            "ceiling:{k}:__rand_int__"
        }
        None => "ceiling:{k}:hot",
    };
    cmd.args(["EVALSHA", sha, "2", key, "ceiling:{k}:o"])
        .args(args);
    let before = calls(redis);
    let out = cmd.output();
    let after = calls(redis);
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // `-q` prints `EVALSHA ...: 61236.22 requests per second, p50=...` (after `\r` updates).
    let rps = text
        .rsplit_once("requests per second")
        .and_then(|(head, _)| head.rsplit([':', ' ']).find(|w| !w.is_empty()))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let scripts = (after.scripts - before.scripts).max(1) as f64;
    let usec = (after.script_usec - before.script_usec) as f64 / scripts;
    (rps, usec)
}

/// Writes the SVG chart: requests/s (left) and Redis µs per decision (right) per configuration.
fn chart(
    path: &std::path::Path,
    bars: &[(String, f64, f64)],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let n = bars.len();
    let rows = n as f64;
    let height = 70 + 20 * n as u32;
    let root = SVGBackend::new(path, (1500, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(1050);
    let font = ("sans-serif", 12);
    let max = |f: fn(&(String, f64, f64)) -> f64| {
        bars.iter()
            .map(f)
            .filter(|v| v.is_finite())
            .fold(1.0, f64::max)
            * 1.08
    };
    let mut rps = ChartBuilder::on(&left)
        .caption("requests/s (one run, medians)", ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(430)
        .build_cartesian_2d(0.0..max(|b| b.1), 0.0..rows)?;
    rps.configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(6)
        .x_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .draw()?;
    let y = |i: usize| rows - i as f64;
    let colour = |label: &str| {
        if label.starts_with("1.") {
            BLACK.mix(0.6)
        } else if label.contains("ceiling") {
            RED.mix(0.6)
        } else if label.contains("memory") || label.contains("governor") || label.starts_with("2") {
            GREEN.mix(0.6)
        } else if label.contains("hand-written") || label.contains("blog") {
            BLUE.mix(0.35)
        } else {
            BLUE.mix(0.7)
        }
    };
    rps.draw_series(bars.iter().enumerate().map(|(i, (label, v, _))| {
        Rectangle::new(
            [(0.0, y(i) - 0.8), (v.max(0.0), y(i) - 0.2)],
            colour(label).filled(),
        )
    }))?;
    rps.draw_series(bars.iter().enumerate().map(|(i, (label, _, _))| {
        EmptyElement::at((0.0, y(i) - 0.5))
            + Text::new(
                label.clone(),
                (-6, 0),
                font.into_font().into_text_style(&left).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Right,
                        plotters::style::text_anchor::VPos::Center,
                    ),
                ),
            )
    }))?;
    let mut usec = ChartBuilder::on(&right)
        .caption("Redis µs per decision", ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(10)
        .build_cartesian_2d(0.0..max(|b| b.2), 0.0..rows)?;
    usec.configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(6)
        .draw()?;
    usec.draw_series(bars.iter().enumerate().map(|(i, (label, _, v))| {
        Rectangle::new(
            [(0.0, y(i) - 0.8), (v.max(0.0), y(i) - 0.2)],
            colour(label).filled(),
        )
    }))?;
    root.present()?;
    Ok(())
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
    let mut limited: Vec<Limited> = Vec::new();
    for strategy in ["fixed", "gcra"] {
        for client in ["redis", "fred"] {
            let shown = client_name(client);
            let rule = if strategy == "fixed" {
                "fixed window 2,000 per 1 s"
            } else {
                "GCRA 2,000/s, burst 200"
            };
            limited.push(Limited {
                label: format!("10. leased (up to 256), 2 replicas, {shown}: {rule}, one hot key"),
                client,
                strategy,
                recorder: Recorder::new(),
                stats: std::sync::Mutex::new(Vec::new()),
            });
        }
    }
    if let Some(only) = &only {
        limited.retain(|l| l.label.contains(only.as_str()));
    }
    let redis = RedisServer::start();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let app = server_rt.block_on(app(&redis, &limited));
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
            "serving on http://127.0.0.1:{port} (routes /bare, /memory, /memory-wrapped, /admit-all, /governor, /blog, \
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
        config(
            "2b. the same, default body (ResponseBody, boxed again by axum)",
            "/memory-wrapped",
        ),
        config(
            "2c. RateLimitLayer over a store that admits at once (the layer's own cost)",
            "/admit-all",
        ),
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
            format!("4. RateLimitLayer, fred pool of 2: {name}"),
            leak(format!("/fred-pool/{name}")),
        ));
        main.push(config(
            format!("6. hand-written EVALSHA, redis-rs: {name}"),
            leak(format!("/evalsha/{name}")),
        ));
        main.push(config(
            format!("6. hand-written EVALSHA, fred: {name}"),
            leak(format!("/evalsha-fred/{name}")),
        ));
        main.push(config(
            format!("6. hand-written EVALSHA, fred with the store's timeouts: {name}"),
            leak(format!("/evalsha-fred-timed/{name}")),
        ));
    }
    for name in ["fixed", "gcra"] {
        for client in ["redis", "fred"] {
            let shown = client_name(client);
            main.push(config(
                format!("9. leased (up to 256), {shown}: {name}, one hot key"),
                leak(format!("/leased/{client}/{name}")),
            ));
            main.push(Config {
                script: Some(
                    "request = function()\n  return wrk.format(nil, nil, {[\"x-api-key\"] = \"k\" .. math.random(0, 9999)})\nend\n"
                        .to_owned(),
                ),
                ..config(
                    format!("9. leased (up to 256), {shown}: {name}, 10,000 keys"),
                    leak(format!("/leased-keys/{client}/{name}")),
                )
            });
        }
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
    main.push(config(
        "7. bare handler sending the same 429 (no layer)",
        "/flood/same-429",
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
    let limited_outcomes: Vec<LimitedOutcome> = limited
        .iter()
        .map(|l| bench.limited(l, rounds, seconds.max(5)))
        .collect();
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

    // The ceiling: Redis alone running the layer's GCRA script, as fast as 64 clients can.
    let gcra = Rule::gcra(HUGE, Duration::from_secs(1), HUGE);
    let script = tower_redis_layers::store::rate_limit_script(std::slice::from_ref(&gcra));
    let sha = redis
        .cli(&["SCRIPT", "LOAD", script])
        .unwrap_or_default()
        .trim()
        .to_owned();
    let args = script_args(&gcra);
    let ceilings = [
        (
            "0. ceiling: redis-benchmark -c 64, GCRA EVALSHA, one hot key",
            None,
        ),
        (
            "0. ceiling: redis-benchmark -c 64, GCRA EVALSHA, 10,000 keys",
            Some(10_000),
        ),
    ]
    .map(|(label, keys)| {
        let (rps, usec) = ceiling(&redis, &sha, &args, keys);
        eprintln!("  {label}: {rps:.0} req/s, {usec:.1} Redis µs per script");
        (label, rps, usec)
    });
    let hot_ceiling = ceilings[0].1;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (bare_allocs, layer_allocs) = rt.block_on(allocations_per_request());
    let (rss0, rss1, rss2, len1, len2) = rt.block_on(memory_store_rss());
    let per_key = rt.block_on(redis_memory_per_key(&redis));

    println!("Each configuration ran {rounds} times for {seconds} s, in alternating order; the median run is shown.");
    println!();
    println!("| configuration | conns | req/s | vs bare | p50 | p99 | scripts/req | cmds/req | Redis µs/req | app CPU µs/req | Redis CPU µs/req | non-2xx (all runs) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (c, s) in main.iter().zip(&samples) {
        println!("{}", row(c, s, baseline));
    }
    for (label, rps, usec) in &ceilings {
        println!(
            "| {label} | 64 | {rps:.0} | {:.2} | - | - | 1.00 | - | {usec:.1} | - | - | - |",
            rps / baseline
        );
    }
    // Every row but the floods of one key over its limit (all 429) and the idempotency replays
    // (a 409 while the first request is in flight) never sees a limit: a failing route there
    // would look fast.
    for (c, s) in main.iter().zip(&samples) {
        if s.non2xx > 0 && !c.label.starts_with("7.") && !c.label.contains("replay") {
            println!();
            println!(
                "**Warning**: {}: {} responses were not 2xx or 3xx in a row whose limit is never reached.",
                c.label, s.non2xx
            );
        }
    }
    println!();
    println!(
        "Each Redis row as a fraction of the ceiling (one hot key, {hot_ceiling:.0} scripts/s): "
    );
    println!();
    println!("| configuration | req/s | scripts/req | fraction of the ceiling (scripts/s) |");
    println!("|---|---|---|---|");
    for (c, s) in main.iter().zip(&samples) {
        if s.scripts > 0.0 {
            println!(
                "| {} | {:.0} | {:.2} | {:.2} |",
                c.label,
                s.rps,
                s.scripts,
                s.rps * s.scripts / hot_ceiling
            );
        }
    }
    println!();
    if !limited.is_empty() {
        print_limited(&limited, &limited_outcomes, rounds, seconds.max(5));
    }
    let mut bars: Vec<(String, f64, f64)> = main
        .iter()
        .zip(&samples)
        .map(|(c, s)| (c.label.clone(), s.rps, s.usec))
        .collect();
    bars.extend(ceilings.iter().map(|(l, r, u)| (l.to_string(), *r, *u)));
    let svg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/chart.svg");
    match chart(&svg, &bars) {
        Ok(()) => println!("Chart: {}", svg.display()),
        Err(e) => eprintln!("chart not written: {e}"),
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
    println!(
        "| memory store, default body / tower_governor | {:.2} | reported |",
        ratio(
            "2b. the same, default body (ResponseBody, boxed again by axum)",
            "3. tower_governor (GCRA, in memory)"
        )
    );
    println!(
        "| layer over a store that admits at once / tower_governor | {:.2} | reported |",
        ratio(
            "2c. RateLimitLayer over a store that admits at once (the layer's own cost)",
            "3. tower_governor (GCRA, in memory)"
        )
    );
    println!(
        "| memory store / layer over a store that admits at once | {:.2} | reported |",
        ratio(
            memory,
            "2c. RateLimitLayer over a store that admits at once (the layer's own cost)"
        )
    );
    for name in names {
        println!(
            "| fred layer / hand-written EVALSHA on a client with the store's timeouts, {name} | {:.2} | (report) |",
            ratio(
                &format!("4. RateLimitLayer, fred: {name}"),
                &format!("6. hand-written EVALSHA, fred with the store's timeouts: {name}")
            )
        );
        println!(
            "| hand-written EVALSHA, fred with / without the store's timeouts, {name} | {:.2} | (report) |",
            ratio(
                &format!("6. hand-written EVALSHA, fred with the store's timeouts: {name}"),
                &format!("6. hand-written EVALSHA, fred: {name}")
            )
        );
        println!(
            "| fred pool of 2 / hand-written EVALSHA (one fred client), {name} | {:.2} | (report) |",
            ratio(
                &format!("4. RateLimitLayer, fred pool of 2: {name}"),
                &format!("6. hand-written EVALSHA, fred: {name}")
            )
        );
    }
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
    for (l, o) in limited.iter().zip(&limited_outcomes) {
        println!(
            "| over-admission, {} | {} | = 0 |",
            l.label,
            o.outcome.over + o.outcome.run_over
        );
    }
    println!(
        "| one key over its limit, deny cache on / bare | {:.2} | >= 0.90 |",
        ratio("7. one key over its limit, deny cache on", bare)
    );
    println!(
        "| bare handler sending the same 429 / bare (the response alone) | {:.2} | (report) |",
        ratio("7. bare handler sending the same 429 (no layer)", bare)
    );
    println!(
        "| one key over its limit, deny cache on / bare handler sending the same 429 | {:.2} | (report) |",
        ratio(
            "7. one key over its limit, deny cache on",
            "7. bare handler sending the same 429 (no layer)"
        )
    );
    println!(
        "| CacheLayer hit / uncached 5 ms handler | {:.2} | (report) |",
        ratio(
            "8. the same behind CacheLayer, redis-rs (hits)",
            "8. handler doing 5 ms of work, uncached"
        )
    );
    println!();
    println!("| how cost grows | conns | req/s | vs bare (64 conns) | p50 | p99 | scripts/req | cmds/req | Redis µs/req | app CPU µs/req | Redis CPU µs/req | non-2xx |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
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
