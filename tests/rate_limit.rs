//! `RateLimitLayer`'s HTTP behaviour, on the in-memory store (no server needed).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{
        FailureMode, Headers, KeyExtractor, MissingKey, Policy, RateLimitLayer, Rejection, Rule,
    },
    store::MemoryStore,
};

type Req = Request<Full<Bytes>>;

fn request(path: &str) -> Req {
    let mut req = Request::builder().uri(path).body(Full::default()).unwrap();
    req.extensions_mut()
        .insert::<SocketAddr>("10.1.2.3:4567".parse().unwrap());
    req
}

fn counting() -> (
    Arc<AtomicUsize>,
    impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible> + Clone,
) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let svc = service_fn(move |_req: Req| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Response::new(Full::from("ok")))
        }
    });
    (runs, svc)
}

async fn body_of<B: http_body::Body>(res: Response<B>) -> Bytes
where
    B::Error: std::fmt::Debug,
{
    res.into_body().collect().await.unwrap().to_bytes()
}

/// The status of `svc`'s answer to `req`, once `svc` is ready.
async fn status_of<S, B>(svc: &mut S, req: Req) -> StatusCode
where
    S: Service<Req, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(req).await.unwrap().status()
}

fn header<'a, B>(res: &'a Response<B>, name: &str) -> Option<&'a str> {
    res.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn denies_over_the_limit_with_retry_after_and_ratelimit_fields() {
    let (runs, inner) = counting();
    let layer = RateLimitLayer::new(
        MemoryStore::new(),
        Policy::new(
            "limit",
            Rule::fixed_window(2, Duration::from_secs(10)).name("per10s"),
        ),
    );
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    for _ in 0..2 {
        let res = svc.ready().await.unwrap().call(request("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            res.headers().get("ratelimit").is_none(),
            "fields only on rejections by default"
        );
    }
    let res = svc.ready().await.unwrap().call(request("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("10"));
    assert_eq!(header(&res, "ratelimit"), Some("\"per10s\";r=0;t=10"));
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some("\"per10s\";q=2;w=10")
    );
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    let body = body_of(res).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["status"], 429);
    // RFC 9457 with draft-ietf-httpapi-ratelimit-headers' problem type, naming the policy of
    // the `RateLimit` field.
    assert_eq!(
        json["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(json["title"], "Quota Exceeded");
    assert_eq!(json["violated-policies"], serde_json::json!(["per10s"]));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the handler must not run for a denied request"
    );
}

#[tokio::test]
async fn fields_on_every_response_and_legacy_fields() {
    let (_, inner) = counting();
    let policy = Policy::new(
        "limit",
        Rule::fixed_window(5, Duration::from_secs(10)).name("a"),
    )
    .rule(Rule::fixed_window(3, Duration::from_secs(60)).name("b"));
    let layer = RateLimitLayer::new(MemoryStore::new(), policy)
        .headers(Headers::All)
        .legacy_headers(true);
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    let res = svc.ready().await.unwrap().call(request("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        header(&res, "ratelimit"),
        Some("\"a\";r=4;t=10, \"b\";r=2;t=60")
    );
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some("\"a\";q=5;w=10, \"b\";q=3;w=60")
    );
    assert_eq!(header(&res, "x-ratelimit-limit"), Some("3"));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("2"));
    assert_eq!(header(&res, "x-ratelimit-reset"), Some("60"));
}

#[tokio::test]
async fn missing_key_is_rejected_allowed_or_shared() {
    let key = KeyExtractor::header(HeaderName::from_static("x-api-key"));
    let rule = Policy::new("limit", Rule::fixed_window(1, Duration::from_secs(10)));
    let no_key = || {
        Request::builder()
            .uri("/")
            .body(Full::<Bytes>::default())
            .unwrap()
    };

    let (runs, inner) = counting();
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(MemoryStore::new(), rule.clone()).key(key.clone()))
        .service(inner.clone());
    let res = svc.ready().await.unwrap().call(no_key()).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    let mut svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::new(), rule.clone())
                .key(key.clone())
                .on_missing_key(MissingKey::Allow),
        )
        .service(inner.clone());
    for _ in 0..3 {
        assert_eq!(status_of(&mut svc, no_key()).await, StatusCode::OK);
    }

    let mut svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::new(), rule)
                .key(key)
                .on_missing_key(MissingKey::Shared),
        )
        .service(inner);
    assert_eq!(status_of(&mut svc, no_key()).await, StatusCode::OK);
    assert_eq!(
        status_of(&mut svc, no_key()).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn shadow_mode_reports_but_never_rejects() {
    let (runs, inner) = counting();
    let layer = RateLimitLayer::new(
        MemoryStore::new(),
        Policy::new("limit", Rule::fixed_window(1, Duration::from_secs(10))),
    )
    .shadow(true);
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    assert_eq!(status_of(&mut svc, request("/")).await, StatusCode::OK);
    let res = svc.ready().await.unwrap().call(request("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(header(&res, "ratelimit").unwrap().contains(";r=0;"));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn custom_rejection_and_cost() {
    let (_, inner) = counting();
    let layer = RateLimitLayer::new(
        MemoryStore::new(),
        Policy::new("limit", Rule::fixed_window(10, Duration::from_secs(10))),
    )
    .cost(|parts| {
        if parts.uri.path() == "/expensive" {
            6
        } else {
            1
        }
    })
    .rejection(|why| {
        let text = match why {
            Rejection::Limited { rule, .. } => format!("slow down ({rule})"),
            _ => "nope".to_owned(),
        };
        let mut res = Response::new(Bytes::from(text));
        *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        res
    });
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    assert_eq!(
        status_of(&mut svc, request("/expensive")).await,
        StatusCode::OK
    );
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(request("/expensive"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        res.headers().contains_key("retry-after"),
        "the layer adds Retry-After to a custom rejection"
    );
    assert_eq!(body_of(res).await, Bytes::from("slow down (fixed-10-10s)"));
    // The cheaper request still fits (4 left).
    assert_eq!(status_of(&mut svc, request("/cheap")).await, StatusCode::OK);
}

#[tokio::test]
async fn routed_policies_match_method_and_path() {
    let (_, inner) = counting();
    let layer = RateLimitLayer::routed(MemoryStore::new())
        .route(
            Some(Method::POST),
            "/login",
            Policy::new("login", Rule::fixed_window(1, Duration::from_secs(60))),
        )
        .route(
            None,
            "/api/*",
            Policy::new("api", Rule::fixed_window(2, Duration::from_secs(60))),
        );
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    let call = |method: Method, path: &str| {
        let mut req = request(path);
        *req.method_mut() = method;
        req
    };
    let mut statuses = Vec::new();
    for (m, p) in [
        (Method::POST, "/login"),
        (Method::POST, "/login"),
        (Method::GET, "/login"), // other method: not limited
        (Method::GET, "/api/a"),
        (Method::POST, "/api/b"),
        (Method::GET, "/api/c"),
        (Method::GET, "/free"),
        (Method::GET, "/free"),
        (Method::GET, "/free"),
    ] {
        statuses.push(status_of(&mut svc, call(m, p)).await.as_u16());
    }
    assert_eq!(statuses, [200, 429, 200, 200, 200, 429, 200, 200, 200]);
}

#[tokio::test]
async fn separate_scopes_have_separate_budgets() {
    let (_, inner) = counting();
    let rule = Rule::fixed_window(1, Duration::from_secs(60));
    let store = MemoryStore::new();
    let mut a = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            store.clone(),
            Policy::new("limit", rule.clone()).scope("a"),
        ))
        .service(inner.clone());
    let mut b = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            store,
            Policy::new("limit", rule).scope("b"),
        ))
        .service(inner);
    assert_eq!(status_of(&mut a, request("/")).await, StatusCode::OK);
    assert_eq!(status_of(&mut b, request("/")).await, StatusCode::OK);
    assert_eq!(
        status_of(&mut a, request("/")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn inner_errors_pass_through_unchanged() {
    #[derive(Debug, PartialEq)]
    struct Boom;
    let inner = service_fn(|_req: Req| async { Err::<Response<Full<Bytes>>, _>(Boom) });
    let layer = RateLimitLayer::new(
        MemoryStore::new(),
        Policy::new("limit", Rule::fixed_window(5, Duration::from_secs(10))),
    );
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request("/"))
        .await
        .unwrap_err();
    assert_eq!(err, Boom);
}

#[tokio::test]
async fn invalid_rule_fails_open_or_closed() {
    let (runs, inner) = counting();
    let bad = Policy::new("limit", Rule::fixed_window(0, Duration::from_secs(10)));
    let mut open = ServiceBuilder::new()
        .layer(RateLimitLayer::new(MemoryStore::new(), bad.clone()))
        .service(inner.clone());
    assert_eq!(status_of(&mut open, request("/")).await, StatusCode::OK);
    let mut closed = ServiceBuilder::new()
        .layer(RateLimitLayer::new(MemoryStore::new(), bad).on_store_error(FailureMode::Closed))
        .service(inner);
    let res = closed
        .ready()
        .await
        .unwrap()
        .call(request("/"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&res, "retry-after"), Some("1"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_input_never_panics() {
    let (runs, inner) = counting();
    let key = KeyExtractor::header(HeaderName::from_static("x-api-key"))
        .or(KeyExtractor::forwarded_for(1))
        .or(KeyExtractor::peer_ip());
    let layer = RateLimitLayer::new(
        MemoryStore::new(),
        Policy::new("limit", Rule::fixed_window(1, Duration::from_secs(60))),
    )
    .key(key);
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);

    // Non-UTF-8 key, and a huge key: each is its own (hashed) key, limited as usual.
    for value in [
        HeaderValue::from_bytes(&[0xff, 0xfe, 0x80]).unwrap(),
        HeaderValue::from_str(&"k".repeat(32 * 1024)).unwrap(),
    ] {
        let mut req = request("/");
        req.headers_mut().insert("x-api-key", value);
        let mut again = request("/");
        again.headers_mut().clone_from(req.headers());
        assert_eq!(status_of(&mut svc, req).await, StatusCode::OK);
        assert_eq!(
            status_of(&mut svc, again).await,
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    // A spoofed X-Forwarded-For: the left entries change, the trusted right one does not, so
    // the client is still limited.
    for spoof in ["1.1.1.1, 9.9.9.9", "2.2.2.2, 9.9.9.9", "garbage, 9.9.9.9"] {
        let mut req = request("/");
        req.headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_str(spoof).unwrap());
        let status = status_of(&mut svc, req).await;
        let first = spoof.starts_with("1.1.1.1");
        assert_eq!(
            status,
            if first {
                StatusCode::OK
            } else {
                StatusCode::TOO_MANY_REQUESTS
            },
            "{spoof}"
        );
    }

    // No peer address and no other key: a 400, not a panic.
    let req = Request::builder()
        .uri("/")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(status_of(&mut svc, req).await, StatusCode::BAD_REQUEST);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn token_bucket_refills_with_paused_time() {
    let (_, inner) = counting();
    let layer = RateLimitLayer::new(
        MemoryStore::new(),
        Policy::new("limit", Rule::token_bucket(2, 1, Duration::from_secs(1))),
    );
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(status_of(&mut svc, request("/")).await.as_u16());
    }
    tokio::time::advance(Duration::from_millis(1001)).await;
    statuses.push(status_of(&mut svc, request("/")).await.as_u16());
    statuses.push(status_of(&mut svc, request("/")).await.as_u16());
    assert_eq!(statuses, [200, 200, 429, 200, 429]);
}

#[tokio::test]
async fn axum_route_layer_with_connect_info() {
    use axum::{extract::connect_info::MockConnectInfo, routing::get, Router};
    let app = Router::new()
        .route("/limited", get(|| async { "limited" }))
        .route_layer(RateLimitLayer::new(
            MemoryStore::new(),
            Policy::new("limit", Rule::sliding_log(1, Duration::from_secs(60))),
        ))
        .route("/open", get(|| async { "open" }))
        .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9999))));
    let get = |path: &str| {
        Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    assert_eq!(
        app.clone().oneshot(get("/limited")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        app.clone().oneshot(get("/limited")).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        app.clone().oneshot(get("/open")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        app.clone().oneshot(get("/open")).await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn inner_body_answers_with_the_inner_services_own_body_type() {
    // `Full<Bytes>` can be made from bytes: the layer's responses are `Response<Full<Bytes>>`,
    // the inner body passed on as it is and the rejection's body made from its bytes.
    let (runs, inner) = counting();
    let layer = RateLimitLayer::new(
        MemoryStore::new(),
        Policy::new("limit", Rule::fixed_window(1, Duration::from_secs(10))),
    )
    .headers(Headers::All)
    .inner_body();
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    let res: Response<Full<Bytes>> = svc.ready().await.unwrap().call(request("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(header(&res, "ratelimit").is_some(), "the fields are added");
    assert_eq!(body_of(res).await, "ok");
    let res = svc.ready().await.unwrap().call(request("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("10"));
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    let json: serde_json::Value = serde_json::from_slice(&body_of(res).await).unwrap();
    assert_eq!(json["status"], 429);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // In axum, whose router passes its own `Body` on without boxing it again.
    use axum::{extract::connect_info::MockConnectInfo, routing::get, Router};
    let app = Router::new()
        .route("/", get(|| async { "hi" }))
        .layer(
            RateLimitLayer::new(
                MemoryStore::new(),
                Policy::new("limit", Rule::gcra(1, Duration::from_secs(60), 1)),
            )
            .inner_body(),
        )
        .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9999))));
    let get = || Request::get("/").body(axum::body::Body::empty()).unwrap();
    let res = app.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body_of(res).await, "hi");
    let res = app.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(header(&res, "retry-after").is_some());
    let json: serde_json::Value = serde_json::from_slice(&body_of(res).await).unwrap();
    assert_eq!(json["title"], "Quota Exceeded");
}

#[tokio::test(start_paused = true)]
async fn memory_store_forgets_expired_keys() {
    let store = MemoryStore::new();
    let (_, inner) = counting();
    let layer = RateLimitLayer::new(
        store.clone(),
        Policy::new("limit", Rule::fixed_window(5, Duration::from_secs(1))),
    )
    .key(KeyExtractor::header(HeaderName::from_static("x-api-key")));
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    for i in 0..5000 {
        let mut req = request("/");
        req.headers_mut().insert("x-api-key", HeaderValue::from(i));
        svc.ready().await.unwrap().call(req).await.unwrap();
    }
    assert!(store.len() >= 5000);
    tokio::time::advance(Duration::from_secs(3)).await;
    store.sweep();
    assert_eq!(store.len(), 0, "expired keys must be forgotten");
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
#[tokio::test]
async fn a_denial_reports_the_quota_the_other_rules_have_left() {
    let long = Duration::from_secs(3600);
    for other in [
        Rule::fixed_window(5, long),
        Rule::sliding_log(5, long),
        Rule::sliding_window(5, long),
        Rule::token_bucket(5, 1, long),
        Rule::gcra(1, long, 5),
    ] {
        let store = MemoryStore::new();
        let (_, inner) = counting();
        let other = other.name("other");
        let both = Policy::new("limit", Rule::fixed_window(2, long).name("tight"))
            .rule(other.clone())
            .scope("left");
        let mut svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(store.clone(), both))
            .service(inner.clone());
        for _ in 0..2 {
            let res = svc.ready().await.unwrap().call(request("/")).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
        let res = svc.ready().await.unwrap().call(request("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let field = header(&res, "ratelimit").unwrap().to_owned();
        assert_eq!(remaining_of(&field, "tight"), Some(0), "{field}");
        let left = remaining_of(&field, "other").unwrap();
        assert_eq!(left, 3, "{other:?}: {field}");
        // The other rule alone, under the same scope and key, shares its counter: it admits
        // exactly what the 429 said was left.
        let mut alone = ServiceBuilder::new()
            .layer(RateLimitLayer::new(
                store,
                Policy::new("limit", other.clone()).scope("left"),
            ))
            .service(inner);
        let mut admitted = 0;
        while status_of(&mut alone, request("/")).await == StatusCode::OK {
            admitted += 1;
            assert!(admitted <= 5, "{other:?}: more than the limit admitted");
        }
        assert_eq!(admitted, left, "{other:?}: {field}");
    }
}

/// A layer's scope is a namespace for all of its counters: layers with the same policy share a
/// budget under the same scope (or none) and never across scopes; a policy's scope separates
/// budgets inside a layer's scope, and a route is scoped by its method and path.
#[tokio::test]
async fn layer_scopes_separate_budgets() {
    let (_, inner) = counting();
    let policy = Policy::new("limit", Rule::fixed_window(1, Duration::from_secs(60)));
    let store = MemoryStore::new();
    let status = |layer: RateLimitLayer<MemoryStore>| {
        let svc = ServiceBuilder::new().layer(layer).service(inner.clone());
        async move { svc.oneshot(request("/a")).await.unwrap().status().as_u16() }
    };
    let plain = || RateLimitLayer::new(store.clone(), policy.clone());
    let scoped = |scope: &str| plain().scope(scope);
    assert_eq!(status(plain()).await, 200);
    assert_eq!(status(plain()).await, 429, "no scope: one shared budget");
    assert_eq!(status(scoped("x")).await, 200, "a layer scope is apart");
    assert_eq!(status(scoped("x")).await, 429, "the same scope shares");
    assert_eq!(status(scoped("y")).await, 200);
    let in_x = |p: &str| RateLimitLayer::new(store.clone(), policy.clone().scope(p)).scope("x");
    assert_eq!(status(in_x("p")).await, 200, "a policy scope inside x");
    assert_eq!(status(in_x("p")).await, 429);
    let outside = RateLimitLayer::new(store.clone(), policy.clone().scope("p"));
    assert_eq!(
        status(outside).await,
        200,
        "the same policy scope, no layer scope"
    );
    // A route is scoped by method and path, under the layer's scope; set before or after.
    let routed = |scope: &str, first: bool| {
        let layer = RateLimitLayer::routed(store.clone());
        if first {
            layer.scope(scope).route(None, "/a", policy.clone())
        } else {
            layer.route(None, "/a", policy.clone()).scope(scope)
        }
    };
    assert_eq!(status(routed("r", true)).await, 200);
    assert_eq!(
        status(routed("r", false)).await,
        429,
        "the same route and scope"
    );
    assert_eq!(status(routed("s", false)).await, 200);
}

#[tokio::test]
async fn the_service_is_made_with_new_or_its_layer() {
    use tower::Layer;
    use tower_redis_layers::rate_limit::RateLimit;
    let (_, inner) = counting();
    let rule = Policy::new("limit", Rule::fixed_window(1, Duration::from_secs(60)));
    let mut svc = RateLimit::new(inner.clone(), MemoryStore::new(), rule.clone());
    let _: &_ = svc.get_ref();
    let _: &mut _ = svc.get_mut();
    let codes = [
        svc.clone().oneshot(request("/")).await.unwrap().status(),
        svc.oneshot(request("/")).await.unwrap().status(),
    ];
    assert_eq!(codes, [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
    let svc = RateLimit::layer(MemoryStore::new(), rule).layer(inner);
    let _inner = svc.clone().into_inner();
    assert_eq!(
        svc.oneshot(request("/")).await.unwrap().status(),
        StatusCode::OK
    );
}
