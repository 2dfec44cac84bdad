//! Limits chosen per request at runtime (`RateLimitLayer::resolver`, `PolicySet`) on every store
//! (see `stores!`): the policy named by the tier that an authentication layer in front put in
//! the extensions, a request the resolver names no policy for, a quota raised while the service
//! runs (unchanged rules keep their counts), and the deny cache, metered settlements, shadow
//! mode, headers and the local fallback with policies chosen at runtime.

mod common;

use std::{
    collections::HashMap,
    convert::Infallible,
    future::{ready, Future},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::stores::{stores, AnyStore, Env};
use http::{Request, Response, StatusCode};
use tokio::sync::Semaphore;
use tower::{service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{
        ActualCost, Calendar, Headers, KeyExtractor, Policy, PolicySet, RateKey, RateLimitHandle,
        RateLimitLayer, ResponseBody, Rule, Settlement,
    },
    store::{Decision, RateCheck, RateLimitStore, RateSettlement, StoreFuture},
    StoreError,
};

type Svc = BoxCloneService<Request<String>, Response<ResponseBody<String>>, Infallible>;

const HOUR: Duration = Duration::from_secs(3600);

/// The tier an authentication layer found for a request's API key.
#[derive(Clone, Debug)]
struct Tier(String);

/// A service behind an "authentication" layer that puts the tier of the request's `x-api-key`
/// (as `accounts` says now) in the extensions, and a rate-limit layer keyed by that API key
/// whose resolver names the tier's policy. The handler reports the `x-actual` header as its
/// [`ActualCost`], and first waits for a permit of `gate` when the request has `x-gate`.
struct App {
    svc: Svc,
    accounts: Arc<Mutex<HashMap<String, String>>>,
    policies: PolicySet,
    gate: Arc<Semaphore>,
}

impl App {
    fn new<B: RateLimitStore>(layer: RateLimitLayer<B>) -> Self {
        Self::with_handle(layer).0
    }

    /// The app, and the handle of its rate-limit layer.
    fn with_handle<B: RateLimitStore>(layer: RateLimitLayer<B>) -> (Self, RateLimitHandle<B>) {
        let layer = layer
            .resolver(|parts| parts.extensions.get::<Tier>().map(|t| t.0.as_str()))
            .key(KeyExtractor::header("x-api-key"))
            .store_timeout(Duration::from_secs(5));
        let policies = layer.policies();
        let handle = layer.handle();
        let accounts = Arc::new(Mutex::new(HashMap::<String, String>::new()));
        let gate = Arc::new(Semaphore::new(0));
        let (a, g) = (accounts.clone(), gate.clone());
        let handler = service_fn(move |req: Request<String>| {
            let gate = g.clone();
            async move {
                if req.headers().contains_key("x-gate") {
                    let _permit = gate.acquire().await;
                }
                let mut response = Response::new(String::from("ok"));
                if let Some(actual) = req.headers().get("x-actual") {
                    let actual = actual.to_str().unwrap().parse().unwrap();
                    response.extensions_mut().insert(ActualCost(actual));
                }
                Ok::<_, Infallible>(response)
            }
        });
        let svc = ServiceBuilder::new()
            .map_request(move |mut req: Request<String>| {
                let key = req.headers().get("x-api-key").map(|v| v.to_str().unwrap());
                let tier = key.and_then(|k| a.lock().unwrap().get(k).cloned());
                if let Some(tier) = tier {
                    req.extensions_mut().insert(Tier(tier));
                }
                req
            })
            .layer(layer)
            .service(handler);
        let app = Self {
            svc: BoxCloneService::new(svc),
            accounts,
            policies,
            gate,
        };
        (app, handle)
    }

    /// Puts the customer of API key `key` on `tier` (a tier the layer may not have).
    fn account(&self, key: &str, tier: &str) {
        let mut accounts = self.accounts.lock().unwrap();
        accounts.insert(key.to_owned(), tier.to_owned());
    }

    async fn send(&self, req: Request<String>) -> Response<ResponseBody<String>> {
        self.svc.clone().oneshot(req).await.unwrap()
    }

    async fn response(&self, key: &str) -> Response<ResponseBody<String>> {
        self.send(request(key)).await
    }

    async fn status(&self, key: &str) -> StatusCode {
        self.response(key).await.status()
    }

    /// How many of `n` requests of `key`, sent one after the other, the layer admits.
    async fn admitted(&self, key: &str, n: usize) -> usize {
        let mut admitted = 0;
        for _ in 0..n {
            match self.status(key).await {
                StatusCode::OK => admitted += 1,
                StatusCode::TOO_MANY_REQUESTS => {}
                other => panic!("unexpected {other}"),
            }
        }
        admitted
    }
}

fn request(key: &str) -> Request<String> {
    let req = Request::builder().header("x-api-key", key);
    req.body(String::new()).unwrap()
}

/// The value of field `name` of `response`.
fn field(response: &Response<ResponseBody<String>>, name: &str) -> String {
    let value = response.headers().get(name);
    let value = value.unwrap_or_else(|| panic!("no {name} field"));
    value.to_str().unwrap().to_owned()
}

/// A policy of one fixed window of `limit` per hour, its rule named like the policy (so that
/// the `RateLimit` fields say which policy limited a request).
fn hourly(name: &str, limit: u64) -> Policy {
    Policy::new(name, Rule::fixed_window(limit, HOUR).name(name))
}

/// Two tiers chosen from the extension that the authentication layer sets; each counts on its
/// own; a customer who moves to another tier gets that tier's limits from the next request on,
/// and is never answered with the other tier's (cached) denial.
async fn two_tiers_chosen_by_an_auth_layer(env: Env) {
    let layer = RateLimitLayer::new(env.store().await, hourly("free", 3))
        .policy(hourly("pro", 6))
        .policy(hourly("team", 8));
    let app = App::new(layer);
    app.account("k-free", "free");
    app.account("k-pro", "pro");
    assert_eq!(app.admitted("k-free", 5).await, 3);
    assert_eq!(app.admitted("k-pro", 8).await, 6);
    let denied = app.response("k-free").await;
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(field(&denied, "ratelimit").starts_with(r#""free";r=0;"#));
    let denied = app.response("k-pro").await;
    assert!(field(&denied, "ratelimit").starts_with(r#""pro";r=0;"#));

    // The free customer upgrades: their denial under "free" (in the deny cache of a remote
    // store) is not the team tier's; the team tier's counters are their own.
    app.account("k-free", "team");
    assert_eq!(app.status("k-free").await, StatusCode::OK);
    assert_eq!(app.admitted("k-free", 9).await, 7);
    // And back: the free tier's counters were kept.
    app.account("k-free", "free");
    assert_eq!(app.status("k-free").await, StatusCode::TOO_MANY_REQUESTS);
}

/// A request the resolver names no policy for, or a policy the layer does not have, gets the
/// default policy (the one given to `new`); a routed layer (no default) lets it pass. Tiers
/// added, removed and reloaded at runtime; an invalid policy is refused and changes nothing.
async fn an_unknown_tier_gets_the_default_policy(env: Env) {
    let app = App::new(
        RateLimitLayer::new(env.store().await, hourly("free", 3)).policy(hourly("pro", 6)),
    );
    app.account("k-ent", "enterprise");
    assert_eq!(app.admitted("k-ent", 5).await, 3, "an unknown tier");
    let denied = app.response("k-ent").await;
    assert!(field(&denied, "ratelimit").starts_with(r#""free";r=0;"#));
    assert_eq!(app.admitted("k-anonymous", 5).await, 3, "no tier");

    // The tier added at runtime counts on its own from the next request on.
    app.policies.insert(hourly("enterprise", 4)).unwrap();
    assert_eq!(app.policies.names(), ["enterprise", "free", "pro"]);
    assert_eq!(app.admitted("k-ent", 6).await, 4);
    // Removed: the default policy again, with its counts.
    assert!(app.policies.remove("enterprise"));
    assert!(!app.policies.contains("enterprise"));
    assert_eq!(app.status("k-ent").await, StatusCode::TOO_MANY_REQUESTS);
    // The default policy is replaced, never removed.
    assert!(!app.policies.remove("free"));
    assert!(app.policies.contains("free"));

    // An invalid policy is refused: the set is unchanged.
    let error = app
        .policies
        .insert(Policy::new("pro", Rule::fixed_window(0, HOUR)))
        .unwrap_err();
    assert_eq!(error.name(), "pro");
    assert!(
        error.to_string().contains("limit must be positive"),
        "{error}"
    );
    app.account("k-pro", "pro");
    assert_eq!(app.admitted("k-pro", 8).await, 6);
    // A reload replaces every policy at once (and keeps the default); an invalid one in it
    // refuses all of it.
    let reload = [hourly("pro", 6), hourly("gold", 2)];
    assert!(app
        .policies
        .replace([hourly("gold", 2), Policy::new("x", Rule::gcra(1, HOUR, 0))])
        .is_err());
    assert_eq!(app.policies.names(), ["free", "pro"]);
    app.policies.replace(reload).unwrap();
    assert_eq!(app.policies.names(), ["free", "gold", "pro"]);
    // "pro" kept its name and rules, so its counts.
    assert_eq!(app.status("k-pro").await, StatusCode::TOO_MANY_REQUESTS);

    // No default policy: a request the resolver names nothing for passes unlimited.
    let routed = RateLimitLayer::routed(env.store().await).policy(hourly("pro", 6).scope("routed"));
    let app = App::new(routed);
    app.account("k-pro", "pro");
    app.account("k-ent", "enterprise");
    assert_eq!(app.admitted("k-ent", 10).await, 10);
    assert_eq!(app.admitted("k-anonymous", 10).await, 10);
    assert_eq!(app.admitted("k-pro", 8).await, 6);
}

/// A quota raised while the service runs applies on the next request (no cached denial of the
/// policy before is served), and a rule whose numbers did not change keeps its count, for a
/// rule of every strategy.
async fn a_raised_quota_keeps_the_unchanged_rules_counts(env: Env) {
    let store = env.store().await;
    for (strategy, quota) in [
        ("fixed", Rule::fixed_window(5, HOUR)),
        ("sliding-log", Rule::sliding_log(5, HOUR)),
        ("sliding", Rule::sliding_window(5, HOUR)),
        ("bucket", Rule::token_bucket(5, 1, HOUR)),
        ("gcra", Rule::gcra(1, HOUR, 5)),
        ("calendar", Rule::calendar(5, Calendar::Month)),
    ] {
        let pro = |burst| {
            Policy::new("pro", Rule::fixed_window(burst, HOUR).name("burst"))
                .rule(quota.clone().name("quota"))
                .scope(format!("raised-{strategy}"))
        };
        let app = App::new(RateLimitLayer::new(store.clone(), hourly("free", 1)).policy(pro(2)));
        app.account("k", "pro");
        assert_eq!(app.admitted("k", 2).await, 2, "{strategy}");
        let denied = app.response("k").await;
        assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS, "{strategy}");
        assert!(field(&denied, "ratelimit").starts_with(r#""burst";r=0;"#));

        app.policies.insert(pro(100)).unwrap();
        // At once, and the quota rule has 3 of its 5 left.
        assert_eq!(app.status("k").await, StatusCode::OK, "{strategy}: raised");
        assert_eq!(
            app.admitted("k", 2).await,
            2,
            "{strategy}: the quota's count"
        );
        // The store's denial (not the deny cache's, which shows the denying rule only).
        let denied = app.response("k").await;
        let fields = field(&denied, "ratelimit");
        assert!(fields.contains(r#""quota";r=0;"#), "{strategy}: {fields}");
        // The new burst rule counted from 0: 3 of 100 used.
        assert!(
            fields.starts_with(r#""burst";r=97;"#),
            "{strategy}: {fields}"
        );

        // The same policy again changes nothing, and a renamed rule keeps its count.
        app.policies.insert(pro(100)).unwrap();
        let renamed = Policy::new("pro", Rule::fixed_window(100, HOUR).name("per-hour"))
            .rule(quota.clone().name("quota"))
            .scope(format!("raised-{strategy}"));
        app.policies.insert(renamed).unwrap();
        let denied = app.response("k").await;
        let fields = field(&denied, "ratelimit");
        assert!(
            fields.starts_with(r#""per-hour";r=97;"#),
            "{strategy}: {fields}"
        );
    }
}

/// A metered request settles under the policy it was checked with, even when its tier's policy
/// changes while the handler runs; a metered layer refuses a policy it cannot settle.
async fn metered_requests_settle_under_their_policy(env: Env) {
    let tokens = |name: &str, limit| {
        Policy::new(
            name,
            Rule::fixed_window(limit, HOUR).name(format!("{name}-tokens")),
        )
    };
    let layer = RateLimitLayer::new(env.store().await, tokens("free", 100))
        .policy(tokens("pro", 1000))
        .headers(Headers::All)
        .cost(|parts| {
            let estimate = parts.headers.get("x-estimate");
            estimate.map_or(0, |v| v.to_str().unwrap().parse().unwrap())
        })
        .settlement(Settlement::extension());
    let app = App::new(layer);
    app.account("k-pro", "pro");
    let metered = |estimate: u64, actual: u64, gate: bool| {
        let mut req = Request::builder()
            .header("x-api-key", "k-pro")
            .header("x-estimate", estimate.to_string())
            .header("x-actual", actual.to_string());
        if gate {
            req = req.header("x-gate", "1");
        }
        req.body(String::new()).unwrap()
    };
    let res = app.send(metered(100, 10, false)).await;
    assert_eq!(res.status(), StatusCode::OK);
    eventually(&app, r#""pro-tokens";r=990;"#).await;

    // A request under way when the tier's policy changes settles on the counters it took its
    // estimate from.
    let running = {
        let (svc, req) = (app.svc.clone(), metered(100, 50, true));
        tokio::spawn(async move { svc.oneshot(req).await.unwrap().status() })
    };
    eventually(&app, r#""pro-tokens";r=890;"#).await;
    app.policies.insert(tokens("pro", 2000)).unwrap();
    eventually(&app, r#""pro-tokens";r=2000;"#).await;
    app.gate.add_permits(1);
    assert_eq!(running.await.unwrap(), StatusCode::OK);
    app.policies.insert(tokens("pro", 1000)).unwrap();
    eventually(&app, r#""pro-tokens";r=940;"#).await;

    // A sliding rule cannot be settled: refused, the set unchanged.
    let error = app
        .policies
        .insert(Policy::new("pro", Rule::sliding_log(10, HOUR)))
        .unwrap_err();
    assert!(error.reason().contains("metered"), "{error}");
    eventually(&app, r#""pro-tokens";r=940;"#).await;
}

/// Waits (at most 10 s) until a request of `k-pro` that costs nothing shows `expected` in its
/// `RateLimit` field: a Redis store settles in the background.
async fn eventually(app: &App, expected: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res = app.response("k-pro").await;
        let fields = field(&res, "ratelimit");
        if fields.starts_with(expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{fields}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Shadow mode and the `RateLimit` fields follow the policy chosen for each request.
async fn shadow_mode_and_fields_follow_the_chosen_policy(env: Env) {
    let layer = RateLimitLayer::new(env.store().await, hourly("free", 2))
        .policy(hourly("pro", 6))
        .headers(Headers::All)
        .shadow(true);
    let app = App::new(layer);
    app.account("k-free", "free");
    app.account("k-pro", "pro");
    assert_eq!(
        app.admitted("k-free", 4).await,
        4,
        "shadow mode never rejects"
    );
    let res = app.response("k-free").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(field(&res, "ratelimit").starts_with(r#""free";r=0;"#));
    assert_eq!(field(&res, "ratelimit-policy"), r#""free";q=2;w=3600"#);
    let res = app.response("k-pro").await;
    assert!(field(&res, "ratelimit").starts_with(r#""pro";r=5;"#));
    assert_eq!(field(&res, "ratelimit-policy"), r#""pro";q=6;w=3600"#);
    app.policies.insert(hourly("pro", 9)).unwrap();
    let res = app.response("k-pro").await;
    assert_eq!(field(&res, "ratelimit-policy"), r#""pro";q=9;w=3600"#);
}

/// While the store fails, the local fallback limits each request with the policy chosen for it,
/// as it is now.
async fn the_local_fallback_limits_with_the_chosen_policy(env: Env) {
    let store = Switch {
        store: env.store().await,
        down: Arc::new(AtomicBool::new(true)),
    };
    let app =
        App::new(RateLimitLayer::new(store.clone(), hourly("free", 2)).policy(hourly("pro", 5)));
    app.account("k-free", "free");
    app.account("k-pro", "pro");
    assert_eq!(app.admitted("k-free", 4).await, 2);
    assert_eq!(app.admitted("k-pro", 7).await, 5);
    app.policies.insert(hourly("free", 3)).unwrap();
    assert_eq!(
        app.admitted("k-free", 4).await,
        3,
        "a changed rule counts afresh"
    );
    // Back: the store decides, with its own counts (none were taken during the outage).
    store.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await; // the fallback's hold
    assert_eq!(app.admitted("k-pro", 7).await, 5);
}

/// The layer's handle finds the named policies as they are now: it reads, resets and blocks a
/// key under a tier's policy, and follows a change of that policy.
async fn the_handle_finds_the_named_policies(env: Env) {
    let layer = RateLimitLayer::new(env.store().await, hourly("free", 3)).policy(hourly("pro", 6));
    let (app, handle) = App::with_handle(layer);
    app.account("k-pro", "pro");
    let key = RateKey::header("x-api-key", "k-pro");
    let remaining = |quota: tower_redis_layers::rate_limit::KeyQuota| {
        quota.rules.iter().map(|r| r.remaining).collect::<Vec<_>>()
    };
    assert_eq!(app.admitted("k-pro", 2).await, 2);
    assert_eq!(remaining(handle.quota("pro", &key).await.unwrap()), [4]);
    assert_eq!(remaining(handle.quota("free", &key).await.unwrap()), [3]);
    assert!(handle.quota("enterprise", &key).await.is_err());

    // A rule added at runtime: the handle reads it, the unchanged rule kept its count.
    let pro = hourly("pro", 6).rule(Rule::fixed_window(50, HOUR).name("pro-b"));
    app.policies.insert(pro).unwrap();
    assert_eq!(remaining(handle.quota("pro", &key).await.unwrap()), [4, 50]);
    assert_eq!(app.admitted("k-pro", 1).await, 1);
    handle.reset("pro", &key).await.unwrap();
    assert_eq!(remaining(handle.quota("pro", &key).await.unwrap()), [6, 50]);
    handle.block("pro", &key, HOUR).await.unwrap();
    assert_eq!(app.status("k-pro").await, StatusCode::TOO_MANY_REQUESTS);
    handle.unblock("pro", &key).await.unwrap();
    assert_eq!(app.status("k-pro").await, StatusCode::OK);
}

/// A store that fails at once while `down`, else is the environment's store.
#[derive(Clone)]
struct Switch {
    store: AnyStore,
    down: Arc<AtomicBool>,
}

impl RateLimitStore for Switch {
    type Future = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(ready(Err(StoreError::CircuitOpen(HOUR))));
        }
        Box::pin(self.store.check(check))
    }

    fn settle(&self, settlement: RateSettlement<'_>) -> StoreFuture<()> {
        self.store.settle(settlement)
    }
}

stores!(
    two_tiers_chosen_by_an_auth_layer,
    an_unknown_tier_gets_the_default_policy,
    a_raised_quota_keeps_the_unchanged_rules_counts,
    metered_requests_settle_under_their_policy,
    shadow_mode_and_fields_follow_the_chosen_policy,
    the_local_fallback_limits_with_the_chosen_policy,
    the_handle_finds_the_named_policies,
);
