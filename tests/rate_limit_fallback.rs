//! The rate limiter's local fallback, on a remote store that fails when told to (a memory store
//! that claims to be remote): no server needed.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use http::{Request, Response, StatusCode};
use tower::{service_fn, util::BoxCloneSyncService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{FailureMode, LocalFallback, Policy, RateLimitLayer, Rule},
    store::{Decision, MemoryStore, RateCheck, RateLimitStore},
    StoreError,
};

/// A "remote" store that fails at once while `down`.
#[derive(Clone, Default)]
struct Flaky {
    store: MemoryStore,
    down: Arc<AtomicBool>,
}

type Check = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

impl RateLimitStore for Flaky {
    type Future = Check;

    fn check(&self, check: RateCheck<'_>) -> Check {
        let result = if self.down.load(Ordering::SeqCst) {
            Err(StoreError::CircuitOpen(Duration::from_millis(100)))
        } else {
            self.store.check_now(check).unwrap()
        };
        Box::pin(std::future::ready(result))
    }
}

type Svc = BoxCloneSyncService<Request<String>, StatusCode, Infallible>;

fn service(layer: RateLimitLayer<Flaky>) -> Svc {
    let svc = ServiceBuilder::new()
        .layer(layer.no_deny_cache())
        .service(service_fn(|_req: Request<String>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(String::new())))
        }))
        .map_response(|r| r.status());
    BoxCloneSyncService::new(svc)
}

fn request() -> Request<String> {
    let mut req = Request::new(String::new());
    req.extensions_mut()
        .insert::<SocketAddr>("10.1.2.3:4567".parse().unwrap());
    req
}

async fn admitted(svc: &Svc, n: usize) -> usize {
    let mut admitted = 0;
    for _ in 0..n {
        if svc.clone().oneshot(request()).await.unwrap() == StatusCode::OK {
            admitted += 1;
        }
    }
    admitted
}

fn minute(limit: u64) -> Policy {
    Policy::new("minute", Rule::fixed_window(limit, Duration::from_secs(60)))
}

#[tokio::test]
async fn by_default_the_full_limit_holds_in_process_during_an_outage() {
    let store = Flaky::default();
    store.down.store(true, Ordering::SeqCst);
    let svc = service(RateLimitLayer::new(store, minute(5)));
    assert_eq!(admitted(&svc, 20).await, 5);
}

#[tokio::test]
async fn each_replica_gets_its_share_rounded_down() {
    for (replicas, share) in [(2, 3), (3, 2), (7, 1)] {
        let store = Flaky::default();
        store.down.store(true, Ordering::SeqCst);
        let svc = service(
            RateLimitLayer::new(store, minute(7)).local_fallback(LocalFallback::new(replicas)),
        );
        assert_eq!(admitted(&svc, 20).await, share, "{replicas} replicas");
    }
}

#[tokio::test]
async fn a_share_that_rounds_to_nothing_denies_with_retry_after() {
    let store = Flaky::default();
    store.down.store(true, Ordering::SeqCst);
    let layer = RateLimitLayer::new(store, minute(2)).local_fallback(LocalFallback::new(3));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|_req: Request<String>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(String::new())))
        }));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "1");
}

#[tokio::test]
async fn on_store_error_replaces_the_fallback() {
    let store = Flaky::default();
    store.down.store(true, Ordering::SeqCst);
    let closed =
        service(RateLimitLayer::new(store.clone(), minute(5)).on_store_error(FailureMode::Closed));
    assert_eq!(
        closed.clone().oneshot(request()).await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let open = service(RateLimitLayer::new(store.clone(), minute(5)).no_local_fallback());
    assert_eq!(admitted(&open, 20).await, 20, "fail open, the old default");
    let back = service(
        RateLimitLayer::new(store, minute(5))
            .on_store_error(FailureMode::Closed)
            .local_fallback(LocalFallback::default()),
    );
    assert_eq!(admitted(&back, 20).await, 5);
}

#[tokio::test(start_paused = true)]
async fn the_store_decides_again_once_the_hold_has_passed_and_local_counts_are_not_merged() {
    let store = Flaky::default();
    let hold = Duration::from_millis(100);
    let svc = service(
        RateLimitLayer::new(store.clone(), minute(5))
            .local_fallback(LocalFallback::new(1).hold(hold)),
    );
    assert_eq!(admitted(&svc, 2).await, 2, "the store admits");
    store.down.store(true, Ordering::SeqCst);
    // The local counts know of the store's two admissions (this replica made them).
    assert_eq!(
        admitted(&svc, 10).await,
        3,
        "the local limit, with what was admitted before"
    );
    store.down.store(false, Ordering::SeqCst);
    // Within the hold a request needs the local limit's consent too (the store counted it).
    assert_eq!(admitted(&svc, 1).await, 0, "held");
    tokio::time::sleep(hold).await;
    // Then the store alone: it saw 3, so 2 more (the 3 local admissions are not merged).
    assert_eq!(admitted(&svc, 10).await, 2);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_fails_now_and_then_cannot_double_the_budget() {
    let store = Flaky::default();
    let svc = service(RateLimitLayer::new(store.clone(), minute(5)));
    let mut total = 0;
    for i in 0..60 {
        // Every third call fails.
        store.down.store(i % 3 == 0, Ordering::SeqCst);
        total += admitted(&svc, 1).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(total, 5);
}
