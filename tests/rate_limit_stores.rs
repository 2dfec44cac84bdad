//! `RateLimitLayer` on every store (see `stores!`): exactness across two services that share a
//! store, and what a 429 reports; then against real Redis: round trips, the local deny cache, and
//! Redis slow, down and back.
#![cfg(feature = "redis")]

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    stores::{stores, Env},
    RedisServer,
};
use futures_util::future::join_all;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{FailureMode, KeyExtractor, Policy, RateLimitLayer, Rule},
    store::{RateLimitStore, RedisStore},
};

type Req = Request<Full<Bytes>>;
type Svc = BoxCloneService<
    Req,
    Response<tower_redis_layers::rate_limit::ResponseBody<Full<Bytes>>>,
    Infallible,
>;

fn request() -> Req {
    let mut req = Request::builder().uri("/").body(Full::default()).unwrap();
    req.extensions_mut()
        .insert::<SocketAddr>("10.9.8.7:1000".parse().unwrap());
    req
}

fn service<B: RateLimitStore>(layer: RateLimitLayer<B>, runs: Arc<AtomicUsize>) -> Svc {
    let inner = service_fn(move |_req: Req| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Response::new(Full::from("ok")))
        }
    });
    BoxCloneService::new(ServiceBuilder::new().layer(layer).service(inner))
}

async fn status(svc: &Svc) -> StatusCode {
    svc.clone().oneshot(request()).await.unwrap().status()
}

/// Fires `total` concurrent requests, alternating between the services; returns how many passed.
async fn flood(services: &[Svc], total: usize) -> usize {
    let calls = (0..total).map(|i| {
        let svc = services[i % services.len()].clone();
        tokio::spawn(async move { svc.oneshot(request()).await.unwrap().status() })
    });
    join_all(calls)
        .await
        .into_iter()
        .filter(|s| *s.as_ref().unwrap() == StatusCode::OK)
        .count()
}

/// Two services with their own clients, as two replicas would have, admit exactly the limit
/// together.
async fn exactly_the_limit_passes_across_two_services(env: Env) {
    let long = Duration::from_secs(60);
    for (name, rule) in [
        ("fixed", Rule::fixed_window(25, long)),
        ("sliding-log", Rule::sliding_log(25, long)),
        ("token-bucket", Rule::token_bucket(25, 1, long)),
        ("gcra", Rule::gcra(1, long, 25)),
    ] {
        // Two services with their own connections, as two replicas would have.
        let runs = Arc::new(AtomicUsize::new(0));
        let policy = Policy::new("limit", rule).scope(name);
        let mut services = Vec::new();
        for _ in 0..2 {
            let layer = RateLimitLayer::new(env.store().await, policy.clone())
                .key(KeyExtractor::global())
                .store_timeout(Duration::from_secs(5));
            services.push(service(layer, runs.clone()));
        }
        let passed = flood(&services, 300).await;
        assert_eq!(passed, 25, "{name}: {passed} of 300 passed");
        assert_eq!(runs.load(Ordering::SeqCst), 25, "{name}");
    }
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_and_fred_services_share_one_budget() {
    use tower_redis_layers::store::FredStore;
    let server = RedisServer::start();
    let runs = Arc::new(AtomicUsize::new(0));
    let policy = Policy::new("shared", Rule::sliding_log(30, Duration::from_secs(60)));
    let a = RateLimitLayer::new(
        RedisStore::connect(&server.url()).await.unwrap(),
        policy.clone(),
    )
    .key(KeyExtractor::global())
    .store_timeout(Duration::from_secs(5));
    let b = RateLimitLayer::new(FredStore::connect(&server.url()).await.unwrap(), policy)
        .key(KeyExtractor::global())
        .store_timeout(Duration::from_secs(5));
    let services = [service(a, runs.clone()), service(b, runs.clone())];
    assert_eq!(flood(&services, 200).await, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_per_decision_and_none_when_the_deny_cache_answers() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    // The store loads its scripts at connect; flushed, the first call finds none.
    server.cli(&["SCRIPT", "FLUSH"]).unwrap();
    // Three rules, one call.
    let policy = Policy::new("limit", Rule::fixed_window(10, Duration::from_secs(60)))
        .rule(Rule::sliding_log(10, Duration::from_secs(60)))
        .rule(Rule::gcra(10, Duration::from_secs(60), 10));
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = service(
        RateLimitLayer::new(store.clone(), policy.clone()),
        runs.clone(),
    );
    status(&svc).await; // loads the script
    let before = server.command_calls("evalsha");
    for _ in 0..9 {
        assert_eq!(status(&svc).await, StatusCode::OK);
    }
    assert_eq!(
        server.command_calls("evalsha") - before,
        9,
        "one EVALSHA per decision"
    );
    // The script was sent once, with EVAL, after the first NOSCRIPT.
    assert_eq!(server.command_calls("eval"), 1);

    // The 11th is denied by Redis, and the next 50 by the local deny cache.
    assert_eq!(status(&svc).await, StatusCode::TOO_MANY_REQUESTS);
    let before = server.command_calls("evalsha");
    for _ in 0..50 {
        assert_eq!(status(&svc).await, StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(
        server.command_calls("evalsha"),
        before,
        "the deny cache answered without Redis"
    );
    // A deny-cache answer is the same 429 as Redis's: problem details, Retry-After, RateLimit.
    let res = svc.clone().oneshot(request()).await.unwrap();
    let field = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        field("content-type").as_deref(),
        Some("application/problem+json")
    );
    let wait: u64 = field("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    let ratelimit = field("ratelimit").unwrap();
    assert!(
        ratelimit.ends_with(&format!(";r=0;t={wait}")) && ratelimit.starts_with('"'),
        "{ratelimit}"
    );

    // Without the deny cache every request asks Redis.
    let svc = service(RateLimitLayer::new(store, policy).no_deny_cache(), runs);
    let before = server.command_calls("evalsha");
    for _ in 0..5 {
        assert_eq!(status(&svc).await, StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(server.command_calls("evalsha") - before, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_slow_and_back() {
    let mut server = RedisServer::start();
    let rule = Rule::fixed_window(2, Duration::from_secs(60));
    let runs = Arc::new(AtomicUsize::new(0));
    let timeout = Duration::from_millis(300);
    let open = service(
        RateLimitLayer::new(
            RedisStore::connect(&server.url()).await.unwrap(),
            Policy::new("limit", rule.clone()).scope("open"),
        )
        .store_timeout(timeout)
        .on_store_error(FailureMode::Open),
        runs.clone(),
    );
    let closed = service(
        RateLimitLayer::new(
            RedisStore::connect(&server.url()).await.unwrap(),
            Policy::new("limit", rule).scope("closed"),
        )
        .store_timeout(timeout)
        .on_store_error(FailureMode::Closed),
        runs.clone(),
    );
    assert_eq!(status(&open).await, StatusCode::OK);
    assert_eq!(status(&closed).await, StatusCode::OK);

    // Slow: every client paused for 2 s, longer than the timeout.
    server.cli(&["CLIENT", "PAUSE", "2000", "ALL"]).unwrap();
    let started = Instant::now();
    assert_eq!(
        status(&open).await,
        StatusCode::OK,
        "fail-open lets the request through"
    );
    let res = closed.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "answered within the timeouts, not after the pause"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;

    // Down.
    server.stop();
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(status(&open).await, StatusCode::OK);
        assert_eq!(status(&closed).await, StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    // Back, empty (and without the script loaded): limiting works again with the same layers.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut statuses = Vec::new();
    loop {
        let s = status(&open).await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        statuses.push(s);
        assert!(
            Instant::now() < deadline,
            "limiting did not come back: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut closed_statuses = Vec::new();
    loop {
        let s = status(&closed).await;
        closed_statuses.push(s.as_u16());
        if s == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fail-closed layer did not recover: {closed_statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once reconnected, exactly two passed in the new window.
    let after: Vec<u16> = closed_statuses
        .iter()
        .copied()
        .filter(|s| *s != 503)
        .collect();
    assert_eq!(after, [200, 200, 429]);
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_store_recovers_after_a_restart() {
    use tower_redis_layers::store::FredStore;
    let mut server = RedisServer::start();
    let store = FredStore::connect(&server.url()).await.unwrap();
    let closed = service(
        RateLimitLayer::new(
            store,
            Policy::new("limit", Rule::fixed_window(2, Duration::from_secs(60))),
        )
        .store_timeout(Duration::from_millis(300))
        .on_store_error(FailureMode::Closed),
        Arc::new(AtomicUsize::new(0)),
    );
    assert_eq!(status(&closed).await, StatusCode::OK);
    server.stop();
    assert_eq!(status(&closed).await, StatusCode::SERVICE_UNAVAILABLE);
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    loop {
        let s = status(&closed).await;
        seen.push(s.as_u16());
        if s == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fred did not come back: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after: Vec<u16> = seen.into_iter().filter(|s| *s != 503).collect();
    assert_eq!(after, [200, 200, 429]);
}

/// The `r` of rule `name` in a `RateLimit` field (`"a";r=1;t=2, "b";r=3;t=4`).
fn remaining_of(field: &str, name: &str) -> Option<u64> {
    let item = field
        .split(", ")
        .find(|item| item.starts_with(&format!("\"{name}\";")))?;
    item.split(';')
        .find_map(|param| param.strip_prefix("r="))?
        .parse()
        .ok()
}

/// A `429` reports, for a rule that did not deny, the quota it actually has left: exactly the
/// number of further requests (of the same cost) that rule admits. The denying rule reports 0.
async fn a_denial_reports_what_is_left(env: Env) {
    let store = env.store().await;
    let long = Duration::from_secs(3600);
    for (name, other) in [
        ("fixed", Rule::fixed_window(5, long)),
        ("sliding-log", Rule::sliding_log(5, long)),
        ("sliding", Rule::sliding_window(5, long)),
        ("bucket", Rule::token_bucket(5, 1, long)),
        ("gcra", Rule::gcra(1, long, 5)),
    ] {
        let scope = name.to_owned();
        let runs = Arc::new(AtomicUsize::new(0));
        let other = other.name("other");
        let both = Policy::new("limit", Rule::fixed_window(2, long).name("tight"))
            .rule(other.clone())
            .scope(scope.clone());
        let svc = service(RateLimitLayer::new(store.clone(), both), runs.clone());
        for _ in 0..2 {
            assert_eq!(status(&svc).await, StatusCode::OK, "{name}");
        }
        let res = svc.clone().oneshot(request()).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{name}");
        let field = res.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert_eq!(remaining_of(&field, "tight"), Some(0), "{name}: {field}");
        let left = remaining_of(&field, "other").unwrap();
        assert_eq!(left, 3, "{name}: {field}");
        // The other rule alone, under the same scope and key, shares its counter: it admits
        // exactly what the 429 said was left.
        let alone = service(
            RateLimitLayer::new(store.clone(), Policy::new("limit", other).scope(scope)),
            runs,
        );
        let mut admitted = 0;
        while status(&alone).await == StatusCode::OK {
            admitted += 1;
            assert!(admitted <= 5, "{name}: more than the limit admitted");
        }
        assert_eq!(admitted, left, "{name}: {field}");
    }
}

stores!(
    exactly_the_limit_passes_across_two_services,
    a_denial_reports_what_is_left
);
