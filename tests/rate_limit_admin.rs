//! Quota administration on every store (see `stores!`): the store's reset and override
//! (the conformance suite), and `RateLimitHandle` across two replicas: reading a key's quota
//! without consuming, resetting it, blocking and allowing it, with keys given as the extractor
//! sees them; on Redis, a check with an override still costs one script call.

mod common;

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use common::stores::{stores, Env};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    conformance::rate_limit_admin_suite,
    rate_limit::{
        KeyExtractor, Policy, RateKey, RateLimitHandle, RateLimitLayer, ResponseBody, Rule,
    },
    store::RateLimitStore,
};

type Req = Request<Full<Bytes>>;
type Svc = BoxCloneService<Req, Response<ResponseBody<Full<Bytes>>>, Infallible>;

fn service<B: RateLimitStore>(layer: RateLimitLayer<B>) -> Svc {
    let inner =
        service_fn(|_req: Req| async { Ok::<_, Infallible>(Response::new(Full::from("ok"))) });
    BoxCloneService::new(ServiceBuilder::new().layer(layer).service(inner))
}

fn request(api_key: Option<&str>, peer: &str) -> Req {
    let mut req = Request::builder().uri("/");
    if let Some(key) = api_key {
        req = req.header("x-api-key", key);
    }
    let mut req = req.body(Full::default()).unwrap();
    req.extensions_mut()
        .insert::<SocketAddr>(format!("{peer}:1000").parse().unwrap());
    req
}

async fn status(svc: &Svc, req: Req) -> (StatusCode, Option<String>) {
    let res = svc.clone().oneshot(req).await.unwrap();
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (res.status(), retry)
}

fn scope() -> String {
    format!("admin-{}", rand::random::<u64>())
}

/// Two replicas (their own store clients) of one service, with a handle on the first.
async fn replicas(
    env: &Env,
    policy: Policy,
    scope: &str,
) -> ([Svc; 2], RateLimitHandle<impl RateLimitStore>) {
    let key = KeyExtractor::header("x-api-key").or(KeyExtractor::peer_ip());
    let layer = |store| {
        RateLimitLayer::new(store, policy.clone())
            .scope(scope)
            .key(key.clone())
            .store_timeout(Duration::from_secs(5))
    };
    let first = layer(env.store().await);
    let handle = first.handle();
    let second = layer(env.store().await);
    ([service(first), service(second)], handle)
}

async fn the_store_resets_and_overrides(env: Env) {
    rate_limit_admin_suite(&env.store().await).await;
}

/// The handle reads what the layer counted (the same key hashing), without consuming: reading
/// any number of times leaves the same quota.
async fn the_handle_reads_a_quota_without_consuming(env: Env) {
    let long = Duration::from_secs(60);
    let policy = Policy::new("api", Rule::fixed_window(5, long).name("per-minute"))
        .rule(Rule::gcra(1, long, 3).name("burst"));
    let ([a, b], handle) = replicas(&env, policy, &scope()).await;
    assert_eq!(
        status(&a, request(Some("k1"), "192.0.2.1")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        status(&b, request(Some("k1"), "192.0.2.2")).await.0,
        StatusCode::OK
    );
    let k1 = RateKey::header("x-api-key", "k1");
    for _ in 0..5 {
        let quota = handle.quota("api", &k1).await.expect("quota");
        assert_eq!(quota.blocked, None);
        let left: Vec<(&str, u64, u64)> = (quota.rules.iter())
            .map(|r| (r.name.as_str(), r.quota, r.remaining))
            .collect();
        assert_eq!(left, [("per-minute", 5, 3), ("burst", 3, 1)]);
        assert!(quota.rules[0].reset <= long && quota.rules[0].reset > long / 2);
    }
    // Another key, and the same key as the layer takes it from a request.
    let fresh = handle
        .quota("api", &RateKey::header("x-api-key", "k2"))
        .await
        .unwrap();
    assert_eq!(fresh.rules[1].remaining, 3);
    let of = handle
        .key_of(&request(Some("k1"), "198.51.100.1"))
        .expect("a key");
    assert_eq!(
        handle.quota("api", &of).await.unwrap().rules[1].remaining,
        1
    );
    // An address, grouped as the extractor groups it (IPv6 by its /64).
    let v6 = "2001:db8:1:2::10";
    assert_eq!(
        status(&a, request(None, &format!("[{v6}]"))).await.0,
        StatusCode::OK
    );
    let same_net: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
    let quota = handle.quota("api", &RateKey::ip(same_net)).await.unwrap();
    assert_eq!(quota.rules[0].remaining, 4);
    // Nothing was consumed by the reads: the burst rule had 1 left, so exactly 1 more passes.
    assert_eq!(
        status(&b, request(Some("k1"), "192.0.2.2")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        status(&a, request(Some("k1"), "192.0.2.2")).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // An unknown policy name is an error.
    assert!(handle.quota("nope", &k1).await.is_err());
}

/// A reset through the handle on one replica gives the key its full quota on both.
async fn a_reset_gives_the_full_quota_back_on_every_replica(env: Env) {
    let policy = Policy::new("login", Rule::sliding_log(2, Duration::from_secs(60)));
    let ([a, b], handle) = replicas(&env, policy, &scope()).await;
    let req = || request(Some("user-7"), "192.0.2.9");
    assert_eq!(status(&a, req()).await.0, StatusCode::OK);
    assert_eq!(status(&b, req()).await.0, StatusCode::OK);
    // The second replica denies, and remembers it in its deny cache.
    assert_eq!(status(&b, req()).await.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(status(&a, req()).await.0, StatusCode::TOO_MANY_REQUESTS);
    handle
        .reset("login", &RateKey::header("x-api-key", "user-7"))
        .await
        .expect("reset");
    // The handle's own replica forgot its denial at once.
    assert_eq!(status(&a, req()).await.0, StatusCode::OK);
    let quota = handle
        .quota("login", &RateKey::header("x-api-key", "user-7"))
        .await
        .unwrap();
    assert_eq!(quota.rules[0].remaining, 1);
}

/// A block set through one replica denies the key on the other, with `Retry-After` the block's
/// remaining time, consumes nothing, and other keys pass; unblocking restores the rules.
/// An allowance admits past the limit without consuming.
async fn block_and_allow_hold_on_every_replica(env: Env) {
    let policy = Policy::new("api", Rule::token_bucket(2, 1, Duration::from_secs(60)));
    let ([a, b], handle) = replicas(&env, policy, &scope()).await;
    let abuser = || request(None, "203.0.113.5");
    let key = RateKey::ip("203.0.113.5".parse().unwrap());
    assert_eq!(status(&a, abuser()).await.0, StatusCode::OK);
    handle
        .block("api", &key, Duration::from_secs(120))
        .await
        .expect("block");
    let (code, retry) = status(&b, abuser()).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((100..=120).contains(&retry), "Retry-After {retry}");
    let quota = handle.quota("api", &key).await.unwrap();
    assert!(
        quota.blocked.is_some_and(|d| d > Duration::from_secs(100)),
        "{quota:?}"
    );
    assert_eq!(
        status(&b, request(None, "203.0.113.6")).await.0,
        StatusCode::OK,
        "another key was blocked"
    );
    handle.unblock("api", &key).await.expect("unblock");
    // The other replica holds its denial in its deny cache: the handle's replica passes at once.
    assert_eq!(status(&a, abuser()).await.0, StatusCode::OK);
    assert_eq!(status(&a, abuser()).await.0, StatusCode::TOO_MANY_REQUESTS);

    handle
        .allow("api", &key, Duration::from_secs(120))
        .await
        .expect("allow");
    for _ in 0..5 {
        assert_eq!(
            status(&a, abuser()).await.0,
            StatusCode::OK,
            "an allowed key was denied"
        );
    }
    handle
        .unblock("api", &key)
        .await
        .expect("clear the allowance");
    assert_eq!(
        status(&a, abuser()).await.0,
        StatusCode::TOO_MANY_REQUESTS,
        "the allowed requests consumed, or the allowance stayed"
    );
}

/// A route's policy is found by its name, and counts on its own per route.
async fn routes_are_found_by_policy_name(env: Env) {
    let store = env.store().await;
    let policy = Policy::new("writes", Rule::fixed_window(1, Duration::from_secs(60)));
    let layer = RateLimitLayer::routed(store)
        .scope(scope())
        .route(Some(Method::POST), "/orders", policy.clone())
        .route(Some(Method::POST), "/carts", policy)
        .key(KeyExtractor::global())
        .store_timeout(Duration::from_secs(5));
    let handle = layer.handle();
    let svc = service(layer);
    let post = |path: &str| {
        Request::builder()
            .method(Method::POST)
            .uri(path)
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(status(&svc, post("/orders")).await.0, StatusCode::OK);
    assert_eq!(
        status(&svc, post("/orders")).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    handle
        .block("writes", &RateKey::global(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        status(&svc, post("/carts")).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    handle.unblock("writes", &RateKey::global()).await.unwrap();
    handle.reset("writes", &RateKey::global()).await.unwrap();
    assert_eq!(status(&svc, post("/carts")).await.0, StatusCode::OK);
    assert_eq!(status(&svc, post("/orders")).await.0, StatusCode::OK);
}

/// With the override read in the same script, a request is still one script call, blocked or
/// not; the handle's operations are one call each.
async fn one_script_call_per_decision(env: Env) {
    let servers = env.servers();
    if servers.is_empty() {
        return;
    }
    let calls = || -> u64 {
        env.servers()
            .iter()
            .map(|s| s.command_calls("evalsha"))
            .sum()
    };
    let policy = Policy::new("api", Rule::gcra(10, Duration::from_secs(1), 10))
        .rule(Rule::fixed_window(100, Duration::from_secs(60)));
    let layer = RateLimitLayer::new(env.store().await, policy)
        .scope(scope())
        .key(KeyExtractor::header("x-api-key"))
        .no_deny_cache()
        .store_timeout(Duration::from_secs(5));
    let handle = layer.handle();
    let svc = service(layer);
    let key = RateKey::header("x-api-key", "k");
    let before = calls();
    for _ in 0..5 {
        assert_eq!(
            status(&svc, request(Some("k"), "192.0.2.1")).await.0,
            StatusCode::OK
        );
    }
    handle
        .block("api", &key, Duration::from_secs(60))
        .await
        .unwrap();
    for _ in 0..5 {
        let code = status(&svc, request(Some("k"), "192.0.2.1")).await.0;
        assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    }
    handle.quota("api", &key).await.unwrap();
    handle.reset("api", &key).await.unwrap();
    let used = calls() - before;
    println!("10 decisions, block, quota, reset: {used} script calls");
    assert_eq!(used, 13);
}

stores!(
    the_store_resets_and_overrides,
    the_handle_reads_a_quota_without_consuming,
    a_reset_gives_the_full_quota_back_on_every_replica,
    block_and_allow_hold_on_every_replica,
    routes_are_found_by_policy_name,
    one_script_call_per_decision,
);

/// A key from a custom closure: the handle's `RateKey::custom` names the value the closure
/// returned, under the same hashing.
#[tokio::test]
async fn a_custom_key_is_named_by_its_value() {
    use tower_redis_layers::store::MemoryStore;
    let policy = Policy::new("tenants", Rule::fixed_window(3, Duration::from_secs(60)));
    let layer =
        RateLimitLayer::new(MemoryStore::new(), policy).key(KeyExtractor::custom(|parts| {
            parts
                .headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .map(|t| format!("tenant:{t}"))
        }));
    let handle = layer.handle();
    let svc = service(layer);
    let req = Request::builder()
        .header("x-tenant", "acme")
        .body(Full::default())
        .unwrap();
    assert_eq!(status(&svc, req).await.0, StatusCode::OK);
    let quota = handle
        .quota("tenants", &RateKey::custom("tenant:acme"))
        .await
        .unwrap();
    assert_eq!(quota.rules[0].remaining, 2);
    // A request without the key has none.
    assert!(handle.key_of(&Request::new(())).is_none());
    // An invalid header value names no key: an error, not another key's quota.
    assert!(handle
        .quota("tenants", &RateKey::header("x-tenant", "\n"))
        .await
        .is_err());
}

/// A named policy of a resolver is administered by its name, like the default policy.
#[tokio::test]
async fn a_resolver_policy_is_administered_by_name() {
    use tower_redis_layers::store::MemoryStore;
    let hour = Duration::from_secs(3600);
    let layer = RateLimitLayer::new(
        MemoryStore::new(),
        Policy::new("free", Rule::fixed_window(1, hour)),
    )
    .policy(Policy::new("pro", Rule::fixed_window(2, hour)))
    .resolver(|parts| parts.headers.get("x-tier").and_then(|v| v.to_str().ok()))
    .key(KeyExtractor::header("x-api-key"));
    let handle = layer.handle();
    let svc = service(layer);
    let pro = || {
        Request::builder()
            .header("x-tier", "pro")
            .header("x-api-key", "k")
            .body(Full::default())
            .unwrap()
    };
    let key = RateKey::header("x-api-key", "k");
    assert_eq!(status(&svc, pro()).await.0, StatusCode::OK);
    assert_eq!(
        handle.quota("pro", &key).await.unwrap().rules[0].remaining,
        1
    );
    assert_eq!(
        handle.quota("free", &key).await.unwrap().rules[0].remaining,
        1
    );
    handle.block("pro", &key, hour).await.unwrap();
    assert_eq!(status(&svc, pro()).await.0, StatusCode::TOO_MANY_REQUESTS);
    handle.unblock("pro", &key).await.unwrap();
    assert_eq!(status(&svc, pro()).await.0, StatusCode::OK);
    assert_eq!(status(&svc, pro()).await.0, StatusCode::TOO_MANY_REQUESTS);
}
