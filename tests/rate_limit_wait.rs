//! `ThrottleLayer` (wait instead of reject) on every store (see `stores!`): two services that
//! share a store send every call, never more than the limit per window reaches the inner
//! service, and a call that cannot pass within the maximum wait fails with a typed error.

mod common;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::stores::{stores, AnyStore, Env};
use futures_util::future::join_all;
use http::{Request, Response};
use tokio::time::Instant;
use tower::{service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{FailureMode, KeyExtractor, Policy, Rule},
    store::{Decision, RateCheck, RateLimitStore},
    throttle::{ThrottleError, ThrottleLayer},
    StoreError,
};

type Svc = BoxCloneService<Request<()>, Response<()>, ThrottleError<Infallible>>;

/// A store that counts the checks it is asked (each one is one script call on Redis).
#[derive(Clone, Debug)]
struct Counted {
    store: AnyStore,
    checks: Arc<AtomicUsize>,
}

impl RateLimitStore for Counted {
    type Future = <AnyStore as RateLimitStore>::Future;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        self.checks.fetch_add(1, Ordering::SeqCst);
        self.store.check(check)
    }

    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        let answer = self.store.check_now(check);
        if answer.is_some() {
            self.checks.fetch_add(1, Ordering::SeqCst);
        }
        answer
    }

    fn is_remote(&self) -> bool {
        RateLimitStore::is_remote(&self.store)
    }
}

/// An inner (client) service that records when each call reached it.
fn client(layer: ThrottleLayer<Counted>, arrivals: Arc<Mutex<Vec<Instant>>>) -> Svc {
    let inner = service_fn(move |_req: Request<()>| {
        let arrivals = arrivals.clone();
        async move {
            arrivals.lock().unwrap().push(Instant::now());
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    BoxCloneService::new(ServiceBuilder::new().layer(layer).service(inner))
}

fn scope() -> String {
    format!("wait-{}", rand::random::<u64>())
}

/// Two services with their own store clients (two replicas calling one API) send 12 calls at
/// once through a limit of 3 per second (an exact sliding log): every call is sent, and any 4
/// consecutive calls reaching the inner service span at least a window (less a margin for the
/// time between the store's admission and the call reaching the inner service).
async fn every_call_passes_and_at_most_the_limit_per_window(env: Env) {
    let window = Duration::from_secs(1);
    let (limit, calls) = (3, 12);
    let checks = Arc::new(AtomicUsize::new(0));
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let scope = scope();
    let mut services = Vec::new();
    for _ in 0..2 {
        let store = Counted {
            store: env.store().await,
            checks: checks.clone(),
        };
        let layer =
            ThrottleLayer::new(store, Policy::new("wait", Rule::sliding_log(limit, window)))
                .scope(scope.clone())
                .max_wait(Duration::from_secs(30))
                .store_timeout(Duration::from_secs(2));
        services.push(client(layer, arrivals.clone()));
    }
    let started = Instant::now();
    let results = join_all((0..calls).map(|i| {
        let svc = services[i % 2].clone();
        tokio::spawn(async move { svc.oneshot(Request::new(())).await })
    }))
    .await;
    let elapsed = started.elapsed();
    for result in results {
        let result = result.expect("the call's task");
        assert!(result.is_ok(), "a call failed: {:?}", result.err());
    }
    let mut arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(
        arrivals.len(),
        calls,
        "every call reached the inner service once"
    );
    arrivals.sort();
    let margin = Duration::from_millis(250);
    for pair in arrivals.windows(limit as usize + 1) {
        let span = pair[limit as usize] - pair[0];
        assert!(
            span >= window - margin,
            "{} calls reached the inner service within {span:?}",
            limit + 1
        );
    }
    // 12 calls at 3 per window need 3 more windows after the first burst.
    assert!(
        elapsed >= 3 * window - margin,
        "all passed within {elapsed:?}"
    );
    let checks = checks.load(Ordering::SeqCst);
    println!(
        "{calls} calls, limit {limit}/{window:?}: {checks} store checks ({:.2} per call), {elapsed:?}",
        checks as f64 / calls as f64
    );
    assert!(checks >= calls, "at least one check per call");
}

/// Every strategy: a burst twice the limit, from two services, all passes.
async fn every_strategy_lets_a_burst_through_in_time(env: Env) {
    let window = Duration::from_millis(600);
    let rules = [
        Rule::fixed_window(2, window),
        Rule::sliding_window(2, window),
        Rule::token_bucket(2, 2, window),
        Rule::gcra(2, window, 2),
    ];
    for rule in rules {
        let checks = Arc::new(AtomicUsize::new(0));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let scope = scope();
        let mut services = Vec::new();
        for _ in 0..2 {
            let store = Counted {
                store: env.store().await,
                checks: checks.clone(),
            };
            let layer = ThrottleLayer::new(store, Policy::new("wait", rule.clone()))
                .scope(scope.clone())
                .max_wait(Duration::from_secs(30))
                .store_timeout(Duration::from_secs(2));
            services.push(client(layer, arrivals.clone()));
        }
        let results =
            join_all((0..4).map(|i| services[i % 2].clone().oneshot(Request::new(())))).await;
        for result in results {
            assert!(result.is_ok(), "{rule:?}: {:?}", result.err());
        }
        assert_eq!(arrivals.lock().unwrap().len(), 4, "{rule:?}");
    }
}

/// A call whose wait would exceed the maximum fails at once with `Timeout` (it does not sleep
/// first), and is not sent; a call costing more than the quota fails with `OverQuota` without
/// asking the store.
async fn a_wait_beyond_the_maximum_fails_at_once(env: Env) {
    let checks = Arc::new(AtomicUsize::new(0));
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let store = Counted {
        store: env.store().await,
        checks: checks.clone(),
    };
    let max_wait = Duration::from_millis(500);
    let layer = ThrottleLayer::new(
        store,
        Policy::new("wait", Rule::fixed_window(1, Duration::from_secs(30))),
    )
    .scope(scope())
    .max_wait(max_wait)
    .store_timeout(Duration::from_secs(2));
    let svc = client(layer.clone(), arrivals.clone());
    svc.clone()
        .oneshot(Request::new(()))
        .await
        .expect("the first call passes");
    match svc.clone().oneshot(Request::new(())).await {
        Err(ThrottleError::Timeout {
            waited,
            retry_after,
            ..
        }) => {
            assert!(waited < max_wait, "it gave up without sleeping: {waited:?}");
            assert!(retry_after > max_wait, "{retry_after:?}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(
        arrivals.lock().unwrap().len(),
        1,
        "the second call was not sent"
    );
    assert_eq!(checks.load(Ordering::SeqCst), 2, "one store call each");

    let costly = client(layer.cost(|_| 5), arrivals.clone());
    match costly.oneshot(Request::new(())).await {
        Err(ThrottleError::OverQuota { cost, quota, .. }) => assert_eq!((cost, quota), (5, 1)),
        other => panic!("expected over quota, got {other:?}"),
    }
    assert_eq!(checks.load(Ordering::SeqCst), 2, "the store was not asked");
}

/// A short wait within the maximum: the second call waits for the window, then passes.
async fn a_wait_within_the_maximum_passes(env: Env) {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let store = Counted {
        store: env.store().await,
        checks: Arc::new(AtomicUsize::new(0)),
    };
    let window = Duration::from_millis(300);
    let layer = ThrottleLayer::new(store, Policy::new("wait", Rule::gcra(1, window, 1)))
        .scope(scope())
        .key(KeyExtractor::header("x-account"))
        .max_wait(Duration::from_secs(10))
        .store_timeout(Duration::from_secs(2));
    let svc = client(layer, arrivals.clone());
    let request = |account: &str| {
        Request::builder()
            .header("x-account", account)
            .body(())
            .unwrap()
    };
    svc.clone().oneshot(request("a")).await.expect("first");
    // Another account has its own budget.
    svc.clone()
        .oneshot(request("b"))
        .await
        .expect("other account");
    svc.clone()
        .oneshot(request("a"))
        .await
        .expect("after a wait");
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 3);
    let margin = Duration::from_millis(100);
    assert!(arrivals[2] - arrivals[0] >= window - margin);
    // Without the key, the call is not sent.
    let missing = svc.oneshot(Request::new(())).await;
    assert!(
        matches!(missing, Err(ThrottleError::MissingKey)),
        "{missing:?}"
    );
}

/// Redis stalled: by default the call fails with the store's error and is not sent; with
/// `FailureMode::Open` it is sent unthrottled.
async fn a_store_failure_fails_closed_by_default(env: Env) {
    if env.servers().is_empty() {
        return; // the memory store does not fail
    }
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let store = Counted {
        store: env.store().await,
        checks: Arc::new(AtomicUsize::new(0)),
    };
    let layer = ThrottleLayer::new(
        store,
        Policy::new("wait", Rule::fixed_window(10, Duration::from_secs(30))),
    )
    .scope(scope())
    .store_timeout(Duration::from_millis(200));
    let closed = client(layer.clone(), arrivals.clone());
    let open = client(layer.on_store_error(FailureMode::Open), arrivals.clone());
    closed
        .clone()
        .oneshot(Request::new(()))
        .await
        .expect("Redis up");
    for server in env.servers() {
        server.pause();
    }
    let failed = closed.oneshot(Request::new(())).await;
    let sent = open.oneshot(Request::new(())).await;
    for server in env.servers() {
        server.resume();
    }
    assert!(
        matches!(failed, Err(ThrottleError::Store(StoreError::Timeout(_)))),
        "{failed:?}"
    );
    assert!(sent.is_ok(), "{sent:?}");
    assert_eq!(
        arrivals.lock().unwrap().len(),
        2,
        "the closed call was not sent"
    );
}

stores!(
    every_call_passes_and_at_most_the_limit_per_window,
    every_strategy_lets_a_burst_through_in_time,
    a_wait_beyond_the_maximum_fails_at_once,
    a_wait_within_the_maximum_passes,
    a_store_failure_fails_closed_by_default,
);

/// Under a paused clock (the memory store follows Tokio's clock), the throttle sleeps exactly
/// what the store said, plus jitter, and never past the deadline.
#[tokio::test(start_paused = true)]
async fn sleeps_follow_the_store_and_stop_at_the_deadline() {
    use tower_redis_layers::store::MemoryStore;
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let store = Counted {
        store: AnyStore::Memory(MemoryStore::new()),
        checks: Arc::new(AtomicUsize::new(0)),
    };
    let layer = ThrottleLayer::new(
        store,
        Policy::new("wait", Rule::fixed_window(1, Duration::from_secs(1))),
    )
    .jitter(0.0)
    .max_wait(Duration::from_secs(3));
    let svc = client(layer, arrivals.clone());
    let started = Instant::now();
    for _ in 0..3 {
        svc.clone().oneshot(Request::new(())).await.expect("passes");
    }
    // One per window, windows of exactly 1 s on the paused clock.
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    // Four at once, one passing per second: three pass within 3 s, the fourth would wait 4 s.
    let results = join_all((0..4).map(|_| svc.clone().oneshot(Request::new(())))).await;
    let timeouts = results
        .iter()
        .filter(|r| matches!(r, Err(ThrottleError::Timeout { .. })))
        .count();
    assert_eq!(timeouts, 1, "{results:?}");
}
