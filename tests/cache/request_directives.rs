//! A request's own `Cache-Control` (RFC 9111 section 5.2.1), against every store: `max-age`,
//! `min-fresh`, `max-stale`, `only-if-cached`, and `no-cache` / `no-store` in any case.

use super::*;

fn with_cc(path: &str, cc: &str) -> Req {
    get(path)
        .header("cache-control", cc)
        .body(Full::default())
        .unwrap()
}

async fn request_max_age_and_min_fresh(env: Env) {
    let runs = Runs::default();
    // Stored 5 s old with 55 s of freshness left.
    let svc = service(
        layer(env.store().await),
        runs.clone(),
        answer(&[("cache-control", "max-age=60"), ("age", "5")]),
    );
    assert_eq!(send(&svc, req("/m")).await.text(), "run 1");
    let hit = send(&svc, with_cc("/m", "max-age=10")).await;
    assert!(hit.hit(), "{}", hit.cache_status());
    let refused = send(&svc, with_cc("/m", "Max-Age=3")).await;
    assert_eq!(
        refused.text(),
        "run 2",
        "an entry older than max-age served"
    );
    assert!(
        refused.cache_status().contains("fwd=request"),
        "{}",
        refused.cache_status()
    );
    assert!(send(&svc, with_cc("/m", "min-fresh=50")).await.hit());
    let refused = send(&svc, with_cc("/m", "min-fresh=100")).await;
    assert_eq!(
        refused.text(),
        "run 3",
        "an entry fresh for less than min-fresh"
    );
    // The refreshed response was stored.
    assert_eq!(send(&svc, req("/m")).await.text(), "run 3");
}

async fn request_max_stale(env: Env) {
    let runs = Runs::default();
    // The store keeps the entry 60 s past its 1 s of freshness (for stale-if-error).
    let svc = service(
        layer(env.store().await).stale_if_error(Duration::from_secs(60)),
        runs.clone(),
        answer(&[("cache-control", "max-age=1")]),
    );
    assert_eq!(send(&svc, req("/s")).await.text(), "run 1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stale = send(&svc, with_cc("/s", "max-stale=30")).await;
    assert_eq!(stale.text(), "run 1", "max-stale refused a stale entry");
    assert!(
        stale.cache_status().contains("hit; detail=max-stale"),
        "{}",
        stale.cache_status()
    );
    let any = send(&svc, with_cc("/s", "MAX-STALE")).await;
    assert_eq!(any.text(), "run 1");
    assert_eq!(runs.get(), 1);
    // Not stale enough for max-stale=0, nor for a request without it.
    assert_eq!(
        send(&svc, with_cc("/s", "max-stale=0")).await.text(),
        "run 2"
    );
}

async fn request_only_if_cached(env: Env) {
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await),
        runs.clone(),
        answer(&[("cache-control", "max-age=1")]),
    );
    let none = send(&svc, with_cc("/o", "only-if-cached")).await;
    assert_eq!(none.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(none.cache_status().contains("detail=only-if-cached"));
    assert_eq!(runs.get(), 0, "only-if-cached called the handler");
    send(&svc, req("/o")).await;
    let hit = send(&svc, with_cc("/o", "Only-If-Cached")).await;
    assert!(hit.hit() && hit.text() == "run 1", "{}", hit.cache_status());
    // With `no-cache` nothing is usable.
    let refresh = send(&svc, with_cc("/o", "no-cache, only-if-cached")).await;
    assert_eq!(refresh.status, StatusCode::GATEWAY_TIMEOUT);
    // Stale and no `max-stale`: nothing usable.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let stale = send(&svc, with_cc("/o", "only-if-cached")).await;
    assert_eq!(stale.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(runs.get(), 1);
}

async fn request_no_cache_and_no_store_in_any_case(env: Env) {
    let runs = Runs::default();
    let svc = service(layer(env.store().await), runs.clone(), answer(&[]));
    assert_eq!(send(&svc, req("/c")).await.text(), "run 1");
    assert_eq!(send(&svc, with_cc("/c", "No-Cache")).await.text(), "run 2");
    assert_eq!(send(&svc, req("/c")).await.text(), "run 2");
    let no_store = send(&svc, with_cc("/c", "NO-STORE")).await;
    assert_eq!(no_store.text(), "run 3");
    assert!(no_store.cache_status().contains("bypass"));
}

stores!(
    request_max_age_and_min_fresh,
    request_max_stale,
    request_only_if_cached,
    request_no_cache_and_no_store_in_any_case,
);
