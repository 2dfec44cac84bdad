//! Metered costs (`RateLimitLayer::settlement`) on every store (see `stores!`): an estimate is
//! taken before the handler runs, and the difference with the actual cost that the response
//! reports is charged or refunded in one more store call; an error or a dropped response future
//! refunds the estimate.

mod common;

use std::{
    io,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::stores::{stores, Env};
use http::{HeaderName, Request, Response, StatusCode};
use tokio::sync::Semaphore;
use tower::{service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{
        ActualCost, FailureMode, Headers, KeyExtractor, Policy, RateLimitLayer, ResponseBody, Rule,
        Settlement,
    },
    store::{MemoryStore, RateLimitStore},
};

type Svc = BoxCloneService<Request<String>, Response<ResponseBody<String>>, io::Error>;

const MINUTE: Duration = Duration::from_secs(60);

/// A metered service: the estimate is the `x-estimate` header (default 1); the handler reports
/// the `x-actual` header as its [`ActualCost`] (none without it), fails when it is `error`, and
/// first waits for a permit of `gate` when the request has `x-gate`.
struct Metered {
    svc: Svc,
    gate: Arc<Semaphore>,
    started: Arc<AtomicUsize>,
}

fn metered<B: RateLimitStore>(store: B, policy: Policy, settlement: Settlement) -> Metered {
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let (g, s) = (gate.clone(), started.clone());
    let handler = service_fn(move |req: Request<String>| {
        let (gate, started) = (g.clone(), s.clone());
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            if req.headers().contains_key("x-gate") {
                let _permit = gate.acquire().await;
            }
            let actual = req.headers().get("x-actual").map(|v| v.to_str().unwrap());
            let mut response = Response::new(String::from("ok"));
            match actual {
                Some("error") => return Err(io::Error::other("the handler failed")),
                Some(n) => {
                    response
                        .extensions_mut()
                        .insert(ActualCost(n.parse().unwrap()));
                }
                None => {}
            }
            Ok(response)
        }
    });
    let layer = RateLimitLayer::new(store, policy)
        .key(KeyExtractor::global())
        .headers(Headers::All)
        .store_timeout(Duration::from_secs(5))
        .cost(|parts| {
            let estimate = parts.headers.get("x-estimate");
            estimate.map_or(1, |v| v.to_str().unwrap().parse().unwrap())
        })
        .settlement(settlement);
    let svc = BoxCloneService::new(ServiceBuilder::new().layer(layer).service(handler));
    Metered { svc, gate, started }
}

fn request(estimate: u64, actual: Option<&str>, gate: bool) -> Request<String> {
    let mut req = Request::builder().header("x-estimate", estimate.to_string());
    if let Some(actual) = actual {
        req = req.header("x-actual", actual);
    }
    if gate {
        req = req.header("x-gate", "1");
    }
    req.body(String::new()).unwrap()
}

/// Sends a request of `estimate` units that reports `actual`; its status.
async fn send(m: &Metered, estimate: u64, actual: Option<&str>) -> Result<StatusCode, io::Error> {
    let response = m
        .svc
        .clone()
        .oneshot(request(estimate, actual, false))
        .await?;
    Ok(response.status())
}

/// What every rule has left (the `r` of each item of the `RateLimit` field), read with a
/// request of estimate 0 that reports nothing (so settles nothing). A key charged past its
/// limit denies even that request, with the same fields.
async fn remaining(m: &Metered) -> Vec<u64> {
    let response = m
        .svc
        .clone()
        .oneshot(request(0, None, false))
        .await
        .unwrap();
    let field = response.headers()["ratelimit"].to_str().unwrap().to_owned();
    field
        .split(", ")
        .map(|item| {
            let r = item.split(';').find_map(|p| p.strip_prefix("r=")).unwrap();
            r.parse().unwrap()
        })
        .collect()
}

/// Waits (at most 10 s) until the rules have `expected` left: a Redis store settles in the
/// background.
async fn eventually(m: &Metered, expected: &[u64], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = remaining(m).await;
        if now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: remaining {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The script calls the environment's servers have run (none for the memory store).
fn script_calls(env: &Env) -> u64 {
    env.servers()
        .iter()
        .map(|n| n.command_calls("evalsha") + n.command_calls("eval"))
        .sum()
}

/// Waits (at most 10 s) until the servers have run `calls` script calls in all.
async fn wait_for_calls(env: &Env, calls: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while script_calls(env) < calls {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} script calls, expected {calls}",
            script_calls(env)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A rule of each strategy that settles, with 100 units and next to no refill while a test runs.
fn settling_rules() -> [(&'static str, Rule); 3] {
    [
        ("fixed", Rule::fixed_window(100, MINUTE)),
        ("bucket", Rule::token_bucket(100, 1, MINUTE)),
        ("gcra", Rule::gcra(1, MINUTE, 100)),
    ]
}

/// An actual cost above the estimate is charged: what is left goes down by the actual cost.
async fn an_under_estimate_is_charged(env: Env) {
    for (name, rule) in settling_rules() {
        let policy = Policy::new("metered", rule).scope(format!("under-{name}"));
        let m = metered(env.store().await, policy, Settlement::extension());
        assert_eq!(send(&m, 10, Some("30")).await.unwrap(), StatusCode::OK);
        eventually(&m, &[70], name).await;
        assert_eq!(send(&m, 10, Some("25")).await.unwrap(), StatusCode::OK);
        eventually(&m, &[45], name).await;
    }
}

/// An actual cost below the estimate is refunded.
async fn an_over_estimate_is_refunded(env: Env) {
    for (name, rule) in settling_rules() {
        let policy = Policy::new("metered", rule).scope(format!("over-{name}"));
        let m = metered(env.store().await, policy, Settlement::extension());
        assert_eq!(send(&m, 30, Some("5")).await.unwrap(), StatusCode::OK);
        eventually(&m, &[95], name).await;
        // An actual cost of 0 refunds all of the estimate; a response that reports nothing
        // keeps it.
        assert_eq!(send(&m, 20, Some("0")).await.unwrap(), StatusCode::OK);
        eventually(&m, &[95], name).await;
        assert_eq!(send(&m, 20, None).await.unwrap(), StatusCode::OK);
        eventually(&m, &[75], name).await;
    }
}

/// A handler error refunds the estimate, and the error passes through.
async fn a_handler_error_refunds(env: Env) {
    for (name, rule) in settling_rules() {
        let policy = Policy::new("metered", rule).scope(format!("error-{name}"));
        let m = metered(env.store().await, policy, Settlement::extension());
        assert_eq!(send(&m, 10, Some("10")).await.unwrap(), StatusCode::OK);
        let error = send(&m, 40, Some("error")).await.unwrap_err();
        assert_eq!(error.to_string(), "the handler failed");
        eventually(&m, &[90], name).await;
    }
}

/// A response future dropped while the handler runs (the client went away) refunds the
/// estimate.
async fn a_dropped_request_refunds(env: Env) {
    for (name, rule) in settling_rules() {
        let policy = Policy::new("metered", rule).scope(format!("dropped-{name}"));
        let m = metered(env.store().await, policy, Settlement::extension());
        let call = m.svc.clone().oneshot(request(30, Some("50"), true));
        let task = tokio::spawn(call);
        while m.started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The estimate is taken while the handler runs.
        eventually(&m, &[70], name).await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        eventually(&m, &[100], name).await;
    }
}

/// Several rules are settled together, each by the same difference.
async fn every_rule_of_a_policy_is_settled(env: Env) {
    let policy = Policy::new("metered", Rule::fixed_window(100, MINUTE))
        .rule(Rule::token_bucket(200, 1, MINUTE))
        .rule(Rule::gcra(1, MINUTE, 300))
        .scope("multi");
    let m = metered(env.store().await, policy, Settlement::extension());
    assert_eq!(send(&m, 10, Some("40")).await.unwrap(), StatusCode::OK);
    eventually(&m, &[60, 160, 260], "charge").await;
    assert_eq!(send(&m, 50, Some("20")).await.unwrap(), StatusCode::OK);
    eventually(&m, &[40, 140, 240], "refund").await;
    assert!(send(&m, 30, Some("error")).await.is_err());
    eventually(&m, &[40, 140, 240], "error").await;
}

/// A request is admitted only if its estimate fits; a charge may push a key past its limit,
/// and later requests wait until it is paid back.
async fn an_estimate_larger_than_what_is_left_is_denied(env: Env) {
    for (name, rule) in settling_rules() {
        let policy = Policy::new("metered", rule).scope(format!("deny-{name}"));
        let m = metered(env.store().await, policy, Settlement::extension());
        assert_eq!(send(&m, 10, Some("95")).await.unwrap(), StatusCode::OK);
        eventually(&m, &[5], name).await;
        let status = send(&m, 6, Some("1")).await.unwrap();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{name}");
        // 5 fit; the handler then reports 50: 45 over the limit.
        assert_eq!(send(&m, 5, Some("50")).await.unwrap(), StatusCode::OK);
        eventually(&m, &[0], name).await;
        let status = send(&m, 1, Some("1")).await.unwrap();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{name}");
    }
}

/// A refund makes room at once, even for a key just denied (no deny cache repeats the denial
/// until its `Retry-After`).
async fn a_refund_makes_room_at_once(env: Env) {
    for (name, rule) in settling_rules() {
        let policy = Policy::new("metered", rule).scope(format!("room-{name}"));
        let m = metered(env.store().await, policy, Settlement::extension());
        let big = tokio::spawn(m.svc.clone().oneshot(request(90, Some("10"), true)));
        while m.started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let status = send(&m, 20, Some("20")).await.unwrap();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{name}");
        m.gate.add_permits(1);
        assert_eq!(big.await.unwrap().unwrap().status(), StatusCode::OK);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while send(&m, 20, Some("20")).await.unwrap() != StatusCode::OK {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: still denied"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eventually(&m, &[70], name).await;
    }
}

/// The actual cost read from a configured response header, which reaches the client.
async fn a_header_reports_the_actual_cost(env: Env) {
    let store = env.store().await;
    let policy = Policy::new("metered", Rule::fixed_window(100, MINUTE)).scope("header");
    let handler = service_fn(|req: Request<String>| async move {
        let mut response = Response::builder();
        if req.headers().contains_key("x-report") {
            response = response.header("x-tokens-used", "42");
        }
        Ok::<_, io::Error>(response.body(String::from("ok")).unwrap())
    });
    let layer = RateLimitLayer::new(store, policy)
        .key(KeyExtractor::global())
        .headers(Headers::All)
        .store_timeout(Duration::from_secs(5))
        .cost(|parts| u64::from(parts.headers.contains_key("x-report")))
        .settlement(Settlement::header(HeaderName::from_static("x-tokens-used")));
    let svc = ServiceBuilder::new().layer(layer).service(handler);
    let report = Request::builder()
        .header("x-report", "1")
        .body(String::new());
    let response = svc.clone().oneshot(report.unwrap()).await.unwrap();
    // The fields report the state after the estimate (1 unit).
    assert_eq!(response.headers()["x-tokens-used"], "42");
    assert!(response.headers()["ratelimit"]
        .to_str()
        .unwrap()
        .contains("r=99;"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = svc
            .clone()
            .oneshot(Request::new(String::new()))
            .await
            .unwrap();
        let field = response.headers()["ratelimit"].to_str().unwrap().to_owned();
        if field.contains("r=58;") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{field}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fixed window's settlement that comes after the window ended changes nothing: an old
/// request is not charged to a fresh window, and a fresh window is not refunded units it never
/// gave.
async fn a_settlement_after_its_window_changes_nothing(env: Env) {
    let window = Duration::from_secs(1);
    let policy = Policy::new("metered", Rule::fixed_window(100, window)).scope("late");
    let m = metered(env.store().await, policy, Settlement::extension());
    let svc = m.svc.clone();
    let refund = tokio::spawn(svc.clone().oneshot(request(50, Some("0"), true)));
    let charge = tokio::spawn(svc.oneshot(request(20, Some("80"), true)));
    while m.started.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(window + Duration::from_millis(100)).await;
    // A new window, with 10 taken.
    assert_eq!(send(&m, 10, None).await.unwrap(), StatusCode::OK);
    let calls = script_calls(&env);
    m.gate.add_permits(2);
    assert_eq!(refund.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(charge.await.unwrap().unwrap().status(), StatusCode::OK);
    // Both settlements ran (on Redis: two more script calls).
    if !env.servers().is_empty() {
        wait_for_calls(&env, calls + 2).await;
    }
    assert_eq!(remaining(&m).await, [90]);
}

/// On Redis a settled request is exactly two script calls (the check, then the settlement),
/// and a request whose actual cost is its estimate is one.
async fn a_settled_request_is_two_script_calls(env: Env) {
    if env.servers().is_empty() {
        return;
    }
    let policy = Policy::new("metered", Rule::gcra(1, MINUTE, 100))
        .rule(Rule::fixed_window(100, MINUTE))
        .scope("calls");
    let m = metered(env.store().await, policy, Settlement::extension());
    let policy = Policy::new("metered", Rule::token_bucket(100, 1, MINUTE)).scope("calls-one");
    let one = metered(env.store().await, policy, Settlement::extension());
    for (m, name) in [(&m, "two rules"), (&one, "one rule")] {
        let before = script_calls(&env);
        assert_eq!(send(m, 10, Some("30")).await.unwrap(), StatusCode::OK);
        wait_for_calls(&env, before + 2).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(script_calls(&env), before + 2, "{name}: a settled request");
        let before = script_calls(&env);
        assert_eq!(send(m, 10, Some("10")).await.unwrap(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(script_calls(&env), before + 1, "{name}: actual = estimate");
    }
}

stores!(
    an_under_estimate_is_charged,
    an_over_estimate_is_refunded,
    a_handler_error_refunds,
    a_dropped_request_refunds,
    every_rule_of_a_policy_is_settled,
    an_estimate_larger_than_what_is_left_is_denied,
    a_refund_makes_room_at_once,
    a_header_reports_the_actual_cost,
    a_settlement_after_its_window_changes_nothing,
    a_settled_request_is_two_script_calls,
);

/// A metered policy with a rule that cannot be settled (sliding log, sliding window) is
/// invalid: handled by the failure mode, like every invalid policy.
#[tokio::test]
async fn a_sliding_rule_in_a_metered_policy_is_refused() {
    for rule in [
        Rule::sliding_log(5, MINUTE),
        Rule::sliding_window(5, MINUTE),
    ] {
        let policy = Policy::new("metered", Rule::fixed_window(5, MINUTE)).rule(rule);
        let layer = RateLimitLayer::new(MemoryStore::new(), policy)
            .key(KeyExtractor::global())
            .settlement(Settlement::extension())
            .on_store_error(FailureMode::Closed);
        let svc =
            ServiceBuilder::new()
                .layer(layer)
                .service(service_fn(|_req: Request<String>| async {
                    Ok::<_, io::Error>(Response::new(String::new()))
                }));
        let response = svc.oneshot(Request::new(String::new())).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}

/// Without a settlement the layer charges the estimate, whatever the response says.
#[tokio::test]
async fn without_a_settlement_the_estimate_stands() {
    let layer = RateLimitLayer::new(
        MemoryStore::new(),
        Policy::new("metered", Rule::fixed_window(100, MINUTE)),
    )
    .key(KeyExtractor::global())
    .headers(Headers::All)
    .cost(|_| 10);
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|_req: Request<String>| async {
                let mut response = Response::new(String::new());
                response.extensions_mut().insert(ActualCost(50));
                Ok::<_, io::Error>(response)
            }));
    for r in ["r=90", "r=80"] {
        let response = svc
            .clone()
            .oneshot(Request::new(String::new()))
            .await
            .unwrap();
        assert!(response.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .contains(r));
    }
}

/// With Redis down, the local fallback admits a metered request and settles it in its own
/// counts; the client never sees the store's failure.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_local_fallback_settles() {
    let mut server = common::RedisServer::start();
    let store = tower_redis_layers::store::RedisStore::connect(&server.url())
        .await
        .unwrap();
    let policy = Policy::new("metered", Rule::fixed_window(100, MINUTE)).scope("down");
    let m = metered(store, policy, Settlement::extension());
    assert_eq!(send(&m, 10, Some("30")).await.unwrap(), StatusCode::OK);
    eventually(&m, &[70], "on Redis").await;
    server.stop();
    // The fallback's counts (the full quota, one replica) shadowed the store's while it worked,
    // settlement included (30 used); now they decide alone: 30 more, then 5.
    assert_eq!(send(&m, 10, Some("30")).await.unwrap(), StatusCode::OK);
    assert_eq!(remaining(&m).await, [40]);
    assert_eq!(send(&m, 20, Some("5")).await.unwrap(), StatusCode::OK);
    assert_eq!(remaining(&m).await, [35]);
    assert!(send(&m, 30, Some("error")).await.is_err());
    assert_eq!(remaining(&m).await, [35]);
}
