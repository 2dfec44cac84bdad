//! The options for a cache in front of an origin, against every store: the host allow-list and
//! the fixed host, heuristic freshness from `Last-Modified`, a targeted field (RFC 9213), and
//! the rejection builder.

use std::time::SystemTime;

use tower_redis_layers::cache::Rejection;

use super::*;

fn on_host(path: &str, host: &str) -> Req {
    Request::get(path)
        .header("host", host)
        .body(Full::default())
        .unwrap()
}

async fn host_allow_list_and_fixed_host(env: Env) {
    let store = env.store().await;
    let runs = Runs::default();
    let listed = service(
        layer(store.clone())
            .scope("listed")
            .hosts(["example.com", "api.example.com:8443"]),
        runs.clone(),
        answer(&[("cache-control", "max-age=60")]),
    );
    // 30 invented hosts: 30 bypasses, no entry made.
    for i in 0..30 {
        let got = send(&listed, on_host("/h", &format!("h{i}.invalid"))).await;
        assert_eq!(
            got.cache_status(),
            "tower-redis-layers; fwd=bypass; detail=host"
        );
    }
    assert_eq!(runs.get(), 30);
    for host in ["EXAMPLE.com", "example.com:80", "api.example.com:8443"] {
        send(&listed, on_host("/h", host)).await;
        assert!(send(&listed, on_host("/h", host)).await.hit(), "{host}");
    }
    assert!(!send(&listed, on_host("/h", "api.example.com:9"))
        .await
        .hit());
    // A fixed host: every client host shares the one entry.
    let runs = Runs::default();
    let fixed = service(
        layer(store).scope("fixed").fixed_host("origin.internal"),
        runs.clone(),
        answer(&[("cache-control", "max-age=60")]),
    );
    for i in 0..30 {
        send(&fixed, on_host("/f", &format!("h{i}.invalid"))).await;
    }
    assert_eq!(runs.get(), 1);
}

async fn heuristic_freshness_from_last_modified(env: Env) {
    let runs = Runs::default();
    let origin = |_req: Req, n: usize| {
        let mut r = Response::new(full(format!("run {n}")));
        let ago = |s| httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(s));
        let h = r.headers_mut();
        h.insert("date", ago(0).parse().unwrap());
        // Modified 20 s ago: 10% is 2 s of freshness.
        h.insert("last-modified", ago(20).parse().unwrap());
        std::future::ready(Ok::<_, Error>(r))
    };
    let svc = service(
        layer(env.store().await)
            .heuristic(0.1, Duration::from_secs(3600))
            .revalidation_window(Duration::ZERO),
        runs.clone(),
        origin,
    );
    send(&svc, req("/lm")).await;
    assert!(send(&svc, req("/lm")).await.hit());
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(!send(&svc, req("/lm")).await.hit());
    // No fixed TTL: without Last-Modified (or explicit freshness), nothing is stored.
    let plain = service(
        layer(env.store().await)
            .scope("plain")
            .heuristic(0.1, Duration::from_secs(3600)),
        runs.clone(),
        answer(&[]),
    );
    send(&plain, req("/p")).await;
    assert!(!send(&plain, req("/p")).await.hit());
}

async fn targeted_field_takes_precedence(env: Env) {
    let runs = Runs::default();
    let origin = |req: Req, n: usize| {
        let (cc, cdn) = match req.uri().path() {
            "/cdn-allows" => ("no-store", "max-age=60"),
            "/cdn-forbids" => ("max-age=60", "private"),
            // Not a Structured Field dictionary (RFC 9213 section 2.1): ignored as a whole.
            "/cdn-invalid" => ("no-store", "max-age=10000, &&&&&"),
            _ => ("max-age=60", ""),
        };
        let mut r = Response::new(full(format!("run {n}")));
        r.headers_mut().insert("cache-control", cc.parse().unwrap());
        if !cdn.is_empty() {
            r.headers_mut()
                .insert("cdn-cache-control", cdn.parse().unwrap());
        }
        std::future::ready(Ok::<_, Error>(r))
    };
    let targeted =
        layer(env.store().await).targeted_field(http::HeaderName::from_static("cdn-cache-control"));
    let svc = service(targeted, runs.clone(), origin);
    send(&svc, req("/cdn-allows")).await;
    let hit = send(&svc, req("/cdn-allows")).await;
    assert!(hit.hit());
    // Passed on unchanged.
    assert_eq!(hit.headers["cdn-cache-control"], "max-age=60");
    assert_eq!(hit.headers["cache-control"], "no-store");
    send(&svc, req("/cdn-forbids")).await;
    assert!(!send(&svc, req("/cdn-forbids")).await.hit());
    send(&svc, req("/none")).await;
    assert!(send(&svc, req("/none")).await.hit());
    send(&svc, req("/cdn-invalid")).await;
    assert!(!send(&svc, req("/cdn-invalid")).await.hit());
    // Without the option, the field means nothing to the layer.
    let plain = service(layer(env.store().await).scope("plain"), runs, origin);
    send(&plain, req("/cdn-forbids")).await;
    assert!(send(&plain, req("/cdn-forbids")).await.hit());
}

async fn rejection_builds_the_layers_own_answers(env: Env) {
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await).rejection(|why| {
            let mut r = Response::new(Bytes::from(format!("{why:?}")));
            *r.status_mut() = StatusCode::GATEWAY_TIMEOUT;
            r
        }),
        runs.clone(),
        answer(&[]),
    );
    let got = send(
        &svc,
        get("/x")
            .header("cache-control", "only-if-cached")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(got.text(), "NotCached");
    assert!(got.cache_status().contains("detail=only-if-cached"));
    assert_eq!(runs.get(), 0);
    assert!(matches!(Rejection::Unavailable, Rejection::Unavailable));
}

stores!(
    host_allow_list_and_fixed_host,
    heuristic_freshness_from_last_modified,
    targeted_field_takes_precedence,
    rejection_builds_the_layers_own_answers,
);

#[tokio::test]
async fn rejection_builds_the_503_of_a_failed_lookup() {
    let svc = service(
        CacheLayer::new(super::FailingStore { hang: false })
            .on_store_error(FailureMode::Closed)
            .rejection(|why| {
                assert_eq!(*why, Rejection::Unavailable);
                let mut r = Response::new(Bytes::from_static(b"down"));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                r
            }),
        Runs::default(),
        answer(&[]),
    );
    let got = send(&svc, req("/x")).await;
    assert_eq!(
        (got.status, got.text().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "down")
    );
    assert_eq!(got.headers["retry-after"], "1");
    assert!(got.cache_status().contains("detail=store-unavailable"));
}
