//! `CacheLayer` over HTTP, against every store: memory, redis-rs and fred on one server, and
//! redis-rs on a 3-master cluster. Each scenario runs once per store (see `stores!` at the end).

mod common;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use common::stores::{stores, AnyStore, Env};
use futures_util::future::join_all;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use tower::{service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    cache::{Cache, CacheLayer, ResponseBody},
    store::{CacheStore, FailureMode, MemoryStore},
};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, Infallible>;
type Req = Request<Full<Bytes>>;
type Svc = BoxCloneService<Req, Response<ResponseBody<Body>>, Error>;
type Store = AnyStore;

/// Counts handler runs.
#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    fn next(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

/// A service: `layer` over `handler`, which gets the request and the run number.
fn service<B, F, Fut>(layer: CacheLayer<B>, runs: Runs, handler: F) -> Svc
where
    B: CacheStore,
    F: Fn(Req, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Error>> + Send + 'static,
{
    let inner = service_fn(move |req: Req| {
        let n = runs.next();
        handler(req, n)
    });
    BoxCloneService::new(ServiceBuilder::new().layer(layer).service(inner))
}

/// A handler answering `run <n>` with 200 and the given extra headers.
fn answer(
    headers: &'static [(&'static str, &'static str)],
) -> impl Fn(Req, usize) -> std::future::Ready<Result<Response<Body>, Error>> + Clone + Send + Sync
{
    move |_req, n| {
        let mut r = Response::new(full(format!("run {n}")));
        for (k, v) in headers {
            r.headers_mut().append(*k, v.parse().unwrap());
        }
        std::future::ready(Ok(r))
    }
}

fn get(path: &str) -> http::request::Builder {
    Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", "example.com")
}

fn req(path: &str) -> Req {
    get(path).body(Full::default()).unwrap()
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Got {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn cache_status(&self) -> String {
        self.headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }
    fn hit(&self) -> bool {
        self.cache_status().contains("; hit")
    }
}

fn send(svc: &Svc, req: Req) -> impl std::future::Future<Output = Got> + Send + 'static {
    // The service is cloned before the future starts, so the future is `Send`.
    let call = svc.clone().oneshot(req);
    async move {
        let response = call.await.unwrap();
        let (parts, body) = response.into_parts();
        Got {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
}

/// A layer with deterministic timing: no jitter, no early recompute.
fn layer(store: Store) -> CacheLayer<Store> {
    CacheLayer::new(store)
        .jitter(0.0)
        .no_early_recompute()
        .store_timeout(Duration::from_secs(2))
}

/// RFC 9111 rules (freshness, age, statuses), each against every store.
#[path = "cache/rfc.rs"]
mod rfc;

/// Invalidation after unsafe methods, seen by another replica, against every store.
#[path = "cache/unsafe_methods.rs"]
mod unsafe_methods;

/// A request's own `Cache-Control`, against every store.
#[path = "cache/request_directives.rs"]
mod request_directives;

/// RFC 5861 directives read from the response, against every store.
#[path = "cache/stale_directives.rs"]
mod stale_directives;

/// A client's conditional requests, against every store.
#[path = "cache/conditional.rs"]
mod conditional;

/// Validation of stored entries (conditional requests, `304` refresh), against every store.
#[path = "cache/revalidation.rs"]
mod revalidation;

/// The builder's options for a cache in front of an origin: hosts, heuristic, targeted field,
/// rejection responses, against every store.
#[path = "cache/options.rs"]
mod options;

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

async fn hit_miss_expiry(env: Env) {
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await).ttl(Duration::from_millis(1500)),
        runs.clone(),
        answer(&[("content-type", "text/plain")]),
    );
    let first = send(&svc, req("/a?x=1&y=2")).await;
    assert_eq!(first.text(), "run 1");
    assert!(
        first.cache_status().contains("fwd=miss; stored"),
        "{}",
        first.cache_status()
    );
    // Same query, parameters in another order: the same entry.
    let second = send(&svc, req("/a?y=2&x=1")).await;
    assert_eq!(second.text(), "run 1");
    assert!(second.hit(), "{}", second.cache_status());
    assert!(second.headers.contains_key("age"));
    assert_eq!(second.headers["content-type"], "text/plain");
    // HEAD is served from the GET entry, without a body.
    let head = send(
        &svc,
        get("/a?x=1&y=2")
            .method(Method::HEAD)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert!(
        head.hit() && head.body.is_empty(),
        "{}",
        head.cache_status()
    );
    // Another path, another host: other entries.
    assert_eq!(send(&svc, req("/b")).await.text(), "run 2");
    let other_host = Request::get("/a?x=1&y=2")
        .header("host", "other.example")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&svc, other_host).await.text(), "run 3");
    assert_eq!(runs.get(), 3);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let expired = send(&svc, req("/a?x=1&y=2")).await;
    assert_eq!(expired.text(), "run 4", "entry outlived its TTL");
    assert_eq!(send(&svc, req("/a?x=1&y=2")).await.text(), "run 4");
}

async fn response_max_age_sets_the_ttl(env: Env) {
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await).ttl(Duration::from_secs(60)),
        runs.clone(),
        answer(&[("cache-control", "public, max-age=60, s-maxage=1")]),
    );
    assert_eq!(send(&svc, req("/")).await.text(), "run 1");
    assert_eq!(send(&svc, req("/")).await.text(), "run 1");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        send(&svc, req("/")).await.text(),
        "run 2",
        "s-maxage ignored"
    );
}

async fn only_configured_statuses_are_stored(env: Env) {
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await),
        runs.clone(),
        |req: Req, n| async move {
            let status = if req.uri().path() == "/created" {
                201
            } else {
                404
            };
            let mut r = Response::new(full(format!("run {n}")));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok(r)
        },
    );
    for _ in 0..2 {
        send(&svc, req("/created")).await;
    }
    assert_eq!(runs.get(), 2, "201 was stored");
    for _ in 0..2 {
        let got = send(&svc, req("/missing")).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(runs.get(), 3, "404 was not stored");
}

async fn vary(env: Env) {
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await),
        runs.clone(),
        |req: Req, n| async move {
            let lang = req
                .headers()
                .get("accept-language")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let mut r = Response::new(full(format!("{lang} {n}")));
            r.headers_mut()
                .insert("vary", "Accept-Language".parse().unwrap());
            Ok(r)
        },
    );
    let lang = |l: &str| {
        get("/v")
            .header("accept-language", l)
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&svc, lang("fr")).await.text(), "fr 1");
    assert_eq!(send(&svc, lang("fr")).await.text(), "fr 1");
    assert_eq!(
        send(&svc, lang("en")).await.text(),
        "en 2",
        "served another variant"
    );
    assert_eq!(send(&svc, lang("en")).await.text(), "en 2");
    assert_eq!(send(&svc, lang("fr")).await.text(), "fr 1");
    // A second replica that has not seen the Vary yet never serves the wrong variant.
    let runs2 = Runs::default();
    let other = service(
        layer(env.store().await),
        runs2.clone(),
        |_req: Req, n| async move {
            let mut r = Response::new(full(format!("de {n}")));
            r.headers_mut()
                .insert("vary", "accept-language".parse().unwrap());
            Ok(r)
        },
    );
    assert_eq!(send(&other, lang("de")).await.text(), "de 1");
    assert_eq!(runs.get(), 2);
}

async fn partition_isolation(env: Env) {
    let runs = Runs::default();
    let l = layer(env.store().await).partition(|parts| {
        parts
            .headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let svc = service(l, runs.clone(), |req: Req, n| async move {
        let tenant = req
            .headers()
            .get("x-tenant")
            .map(|v| v.to_str().unwrap().to_owned());
        Ok(Response::new(full(format!("{tenant:?} {n}"))))
    });
    let tenant = |t: &str| {
        get("/p")
            .header("x-tenant", t)
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&svc, tenant("a")).await.text(), "Some(\"a\") 1");
    assert_eq!(send(&svc, tenant("b")).await.text(), "Some(\"b\") 2");
    assert_eq!(send(&svc, tenant("a")).await.text(), "Some(\"a\") 1");
    assert_eq!(send(&svc, tenant("b")).await.text(), "Some(\"b\") 2");
    // No partition: bypass.
    let none = send(&svc, req("/p")).await;
    assert_eq!(none.text(), "None 3");
    assert!(none.cache_status().contains("fwd=bypass"));
    assert_eq!(send(&svc, req("/p")).await.text(), "None 4");
}

async fn authorization_bypasses(env: Env) {
    let runs = Runs::default();
    let svc = service(layer(env.store().await), runs.clone(), answer(&[]));
    let auth = || {
        get("/x")
            .header("authorization", "Bearer t")
            .body(Full::default())
            .unwrap()
    };
    for n in 1..=2 {
        let got = send(&svc, auth()).await;
        assert_eq!(got.text(), format!("run {n}"));
        assert!(got
            .cache_status()
            .contains("fwd=bypass; detail=authorization"));
    }
    // Nor is the response stored for others.
    assert_eq!(send(&svc, req("/x")).await.text(), "run 3");
    // Opt in.
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await)
            .scope("opt-in")
            .allow_authorized(true),
        runs.clone(),
        answer(&[]),
    );
    assert_eq!(send(&svc, auth()).await.text(), "run 1");
    assert_eq!(send(&svc, auth()).await.text(), "run 1");
}

async fn cookie_bypasses(env: Env) {
    let runs = Runs::default();
    let svc = service(layer(env.store().await), runs.clone(), answer(&[]));
    let cookie = || {
        get("/x")
            .header("cookie", "session=1")
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&svc, cookie()).await.text(), "run 1");
    let got = send(&svc, cookie()).await;
    assert_eq!(got.text(), "run 2");
    assert!(got.cache_status().contains("fwd=bypass; detail=cookie"));
    assert_eq!(send(&svc, req("/x")).await.text(), "run 3");
    assert_eq!(send(&svc, req("/x")).await.text(), "run 3");
}

async fn assert_not_stored(env: &Env, headers: &'static [(&'static str, &'static str)]) {
    let runs = Runs::default();
    let svc = service(layer(env.store().await), runs.clone(), answer(headers));
    for n in 1..=3 {
        let got = send(&svc, req("/n")).await;
        assert_eq!(got.text(), format!("run {n}"), "{headers:?} was stored");
        assert!(!got.cache_status().contains("stored"));
    }
}

async fn set_cookie_is_not_stored(env: Env) {
    assert_not_stored(&env, &[("set-cookie", "id=1")]).await;
}

async fn private_is_not_stored(env: Env) {
    assert_not_stored(&env, &[("cache-control", "private, max-age=60")]).await;
}

async fn no_store_response_is_not_stored(env: Env) {
    assert_not_stored(&env, &[("cache-control", "no-store")]).await;
}

async fn vary_star_is_not_stored(env: Env) {
    assert_not_stored(&env, &[("vary", "*")]).await;
}

async fn request_no_store_bypasses(env: Env) {
    let runs = Runs::default();
    let svc = service(layer(env.store().await), runs.clone(), answer(&[]));
    let no_store = || {
        get("/r")
            .header("cache-control", "no-store")
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&svc, no_store()).await.text(), "run 1");
    // Nothing was stored...
    assert_eq!(send(&svc, req("/r")).await.text(), "run 2");
    // ...and nothing is read.
    assert_eq!(send(&svc, no_store()).await.text(), "run 3");
}

async fn request_no_cache_refreshes(env: Env) {
    let runs = Runs::default();
    let svc = service(layer(env.store().await), runs.clone(), answer(&[]));
    assert_eq!(send(&svc, req("/r")).await.text(), "run 1");
    let no_cache = get("/r")
        .header("cache-control", "no-cache")
        .body(Full::default())
        .unwrap();
    let got = send(&svc, no_cache).await;
    assert_eq!(got.text(), "run 2", "no-cache served from the cache");
    assert!(got.cache_status().contains("fwd=request"));
    // The refreshed response replaced the entry.
    assert_eq!(send(&svc, req("/r")).await.text(), "run 2");
}

async fn hop_by_hop_headers_are_not_stored(env: Env) {
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await),
        runs.clone(),
        answer(&[
            ("connection", "x-private-hop"),
            ("x-private-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-end-to-end", "kept"),
        ]),
    );
    send(&svc, req("/h")).await;
    let hit = send(&svc, req("/h")).await;
    assert!(hit.hit());
    assert_eq!(hit.headers["x-end-to-end"], "kept");
    for hop in ["connection", "x-private-hop", "keep-alive"] {
        assert!(!hit.headers.contains_key(hop), "{hop} was stored");
    }
}

async fn size_cap(env: Env) {
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await).max_body(1000),
        runs.clone(),
        |req: Req, n| async move {
            if req.uri().path() == "/big" {
                // 50 chunks of 100 bytes, no length: streamed.
                let chunks = (0..50).map(move |i| {
                    Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(vec![
                        b'a' + (i % 26)
                            as u8;
                        100
                    ])))
                });
                let _ = n;
                Ok(Response::new(BodyExt::boxed(StreamBody::new(
                    futures_util::stream::iter(chunks),
                ))))
            } else {
                Ok(Response::new(full(vec![b'z'; 1000])))
            }
        },
    );
    for _ in 0..2 {
        let got = send(&svc, req("/big")).await;
        assert_eq!(got.body.len(), 5000, "the large body was cut");
        assert_eq!(got.body[4999], b'a' + 23);
        assert!(!got.cache_status().contains("stored"));
    }
    assert_eq!(runs.get(), 2, "a body over the cap was stored");
    // At the cap: stored.
    send(&svc, req("/small")).await;
    let hit = send(&svc, req("/small")).await;
    assert!(hit.hit());
    assert_eq!(hit.body.len(), 1000);
    assert_eq!(runs.get(), 3);
}

async fn segment_and_key_invalidation(env: Env) {
    let runs = Runs::default();
    let l = layer(env.store().await)
        .segment(|parts| parts.uri.path().split('/').nth(1).unwrap_or("").to_owned());
    let handle = l.handle();
    let svc = service(l, runs.clone(), |req: Req, n| async move {
        Ok(Response::new(full(format!("{} {n}", req.uri().path()))))
    });
    for path in ["/users/1", "/users/2", "/posts/1"] {
        send(&svc, req(path)).await;
    }
    assert_eq!(runs.get(), 3);
    for path in ["/users/1", "/users/2", "/posts/1"] {
        assert!(send(&svc, req(path)).await.hit());
    }
    handle.invalidate_segment("users").await.unwrap();
    assert_eq!(send(&svc, req("/users/1")).await.text(), "/users/1 4");
    assert_eq!(send(&svc, req("/users/2")).await.text(), "/users/2 5");
    assert_eq!(send(&svc, req("/posts/1")).await.text(), "/posts/1 3");
    // One key.
    assert!(handle.invalidate_request(&req("/users/1")).await.unwrap());
    assert_eq!(send(&svc, req("/users/1")).await.text(), "/users/1 6");
    assert_eq!(send(&svc, req("/users/2")).await.text(), "/users/2 5");

    // The default segment: one per layer.
    let runs = Runs::default();
    let l = layer(env.store().await).scope("plain");
    let handle = l.handle();
    let svc = service(l, runs.clone(), answer(&[]));
    send(&svc, req("/a")).await;
    send(&svc, req("/b")).await;
    assert_eq!(send(&svc, req("/a")).await.text(), "run 1");
    handle.invalidate().await.unwrap();
    assert_eq!(send(&svc, req("/a")).await.text(), "run 3");
    assert_eq!(send(&svc, req("/b")).await.text(), "run 4");
}

/// A handler that sleeps, then answers `run <n>`.
fn slow(
    delay: Duration,
) -> impl Fn(Req, usize) -> futures_util::future::BoxFuture<'static, Result<Response<Body>, Error>>
       + Clone
       + Send
       + Sync {
    move |_req, n| {
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(Response::new(full(format!("run {n}"))))
        })
    }
}

async fn stampede_runs_the_handler_once(env: Env) {
    let runs = Runs::default();
    // Two services with their own store clients, as two replicas have.
    let a = service(
        layer(env.store().await),
        runs.clone(),
        slow(Duration::from_millis(300)),
    );
    let b = service(
        layer(env.store().await),
        runs.clone(),
        slow(Duration::from_millis(300)),
    );
    let calls = (0..50).map(|i| {
        let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move { send(&svc, req("/cold")).await })
    });
    let all = join_all(calls).await;
    for got in &all {
        let got = got.as_ref().unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.text(), "run 1");
    }
    assert_eq!(runs.get(), 1, "the handler ran {} times", runs.get());
}

async fn early_recompute(env: Env) {
    // With a huge beta nearly every lookup of a fresh entry is due early; the fill lock lets one
    // request recompute while the others get the entry.
    let runs = Runs::default();
    let l = layer(env.store().await)
        .ttl(Duration::from_secs(30))
        .early_recompute(1e6);
    let svc = service(l, runs.clone(), slow(Duration::from_millis(300)));
    assert_eq!(send(&svc, req("/e")).await.text(), "run 1");
    let calls = (0..20).map(|_| {
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, req("/e")).await })
    });
    let all: Vec<Got> = join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let recomputed = all
        .iter()
        .filter(|g| g.cache_status().contains("early-recompute"))
        .count();
    let served = all
        .iter()
        .filter(|g| g.hit() && g.text() == "run 1")
        .count();
    assert!(recomputed >= 1, "no early recompute");
    assert!(
        served >= 1,
        "nobody got the cached entry during the recompute"
    );
    assert_eq!(recomputed + served, 20);
    assert_eq!(runs.get(), 1 + recomputed);
    // With it off, a fresh entry is never recomputed.
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await)
            .scope("off")
            .ttl(Duration::from_secs(30)),
        runs.clone(),
        slow(Duration::from_millis(50)),
    );
    for _ in 0..10 {
        send(&svc, req("/e")).await;
    }
    assert_eq!(runs.get(), 1);
}

async fn stale_while_revalidate(env: Env) {
    let runs = Runs::default();
    let l = layer(env.store().await)
        .ttl(Duration::from_millis(800))
        .stale_while_revalidate(Duration::from_secs(30));
    let svc = service(l, runs.clone(), slow(Duration::from_millis(300)));
    assert_eq!(send(&svc, req("/s")).await.text(), "run 1");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let calls = (0..10).map(|_| {
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, req("/s")).await })
    });
    let all: Vec<Got> = join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let refreshed = all.iter().filter(|g| g.text() == "run 2").count();
    let stale = all
        .iter()
        .filter(|g| g.text() == "run 1" && g.cache_status().contains("detail=stale"))
        .count();
    assert_eq!(refreshed, 1, "one request refreshes");
    assert_eq!(stale, 9, "the others get the stale entry");
    assert_eq!(runs.get(), 2);
    let after = send(&svc, req("/s")).await;
    assert_eq!(after.text(), "run 2");
    assert!(after.hit());
}

async fn stale_if_error(env: Env) {
    let runs = Runs::default();
    let failing = Arc::new(AtomicUsize::new(0));
    let mode = failing.clone();
    let l = layer(env.store().await)
        .ttl(Duration::from_millis(800))
        .stale_if_error(Duration::from_secs(30));
    let svc = service(l, runs.clone(), move |_req: Req, n| {
        let mode = mode.load(Ordering::SeqCst);
        async move {
            match mode {
                0 => Ok(Response::new(full(format!("run {n}")))),
                1 => {
                    let mut r = Response::new(full("boom"));
                    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    Ok(r)
                }
                _ => Err::<Response<Body>, Error>("handler failed".into()),
            }
        }
    });
    assert_eq!(send(&svc, req("/f")).await.text(), "run 1");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    failing.store(1, Ordering::SeqCst);
    let got = send(&svc, req("/f")).await;
    assert_eq!((got.status, got.text().as_str()), (StatusCode::OK, "run 1"));
    assert!(got.cache_status().contains("stale-if-error"));
    failing.store(2, Ordering::SeqCst);
    let got = send(&svc, req("/f")).await;
    assert_eq!(
        got.text(),
        "run 1",
        "an error was not covered by the stale entry"
    );
    // Recovery: the handler works again and refreshes the entry.
    failing.store(0, Ordering::SeqCst);
    assert_eq!(send(&svc, req("/f")).await.text(), "run 4");
    assert_eq!(send(&svc, req("/f")).await.text(), "run 4");
    // Without the window, a failure goes through.
    let svc = service(
        layer(env.store().await)
            .scope("strict")
            .ttl(Duration::from_millis(300)),
        Runs::default(),
        |_req: Req, _n| async move {
            let mut r = Response::new(full("down"));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            Ok(r)
        },
    );
    assert_eq!(
        send(&svc, req("/f")).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

// ---------------------------------------------------------------------------------------------
// Every scenario against every store.
// ---------------------------------------------------------------------------------------------

stores!(
    hit_miss_expiry,
    response_max_age_sets_the_ttl,
    only_configured_statuses_are_stored,
    vary,
    partition_isolation,
    authorization_bypasses,
    cookie_bypasses,
    set_cookie_is_not_stored,
    private_is_not_stored,
    no_store_response_is_not_stored,
    vary_star_is_not_stored,
    request_no_store_bypasses,
    request_no_cache_refreshes,
    hop_by_hop_headers_are_not_stored,
    size_cap,
    segment_and_key_invalidation,
    stampede_runs_the_handler_once,
    early_recompute,
    stale_while_revalidate,
    stale_if_error,
);

// ---------------------------------------------------------------------------------------------
// Redis only: the server down, corrupt entries, round trips.
// ---------------------------------------------------------------------------------------------

async fn redis_slow_or_down_responses_still_served(mut env: Env) {
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await).store_timeout(Duration::from_millis(200)),
        runs.clone(),
        answer(&[]),
    );
    assert_eq!(send(&svc, req("/d")).await.text(), "run 1");
    assert_eq!(send(&svc, req("/d")).await.text(), "run 1");
    // Slow: every client paused longer than the timeout. The lookup times out: a miss.
    let pause = Duration::from_millis(1500);
    match &env {
        Env::Redis(s) | Env::Fred(s) => {
            s.cli(&["CLIENT", "PAUSE", "1500", "ALL"]).unwrap();
        }
        _ => unreachable!(),
    }
    let started = tokio::time::Instant::now();
    let got = send(&svc, req("/d")).await;
    assert_eq!((got.status, got.text().as_str()), (StatusCode::OK, "run 2"));
    assert!(
        started.elapsed() < pause,
        "waited for Redis instead of timing out"
    );
    tokio::time::sleep(pause).await;
    // Down.
    match &mut env {
        Env::Redis(s) | Env::Fred(s) => s.stop(),
        _ => unreachable!(),
    }
    for n in 3..=5 {
        let got = send(&svc, req("/d")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(
            got.text(),
            format!("run {n}"),
            "a response failed with the cache"
        );
        assert!(!got.cache_status().contains("stored"));
    }
    // Back (empty): caching resumes on its own. (`FredStore::connect` sets no reconnect
    // policy, so only the redis-rs client, whose connection manager reconnects, is checked.)
    match &mut env {
        Env::Redis(s) => s.restart(),
        Env::Fred(s) => {
            s.restart();
            return;
        }
        _ => unreachable!(),
    }
    let mut stored = false;
    for _ in 0..50 {
        let got = send(&svc, req("/d")).await;
        assert_eq!(got.status, StatusCode::OK);
        if got.cache_status().contains("stored") {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stored, "the cache did not recover");
    let hit = send(&svc, req("/d")).await;
    assert!(hit.hit(), "{}", hit.cache_status());
}

async fn corrupt_entry_is_a_miss_and_deleted(env: Env) {
    let runs = Runs::default();
    let svc = service(layer(env.store().await), runs.clone(), answer(&[]));
    assert_eq!(send(&svc, req("/c")).await.text(), "run 1");
    let keys = env.keys("*:c:{*}:e:*");
    assert_eq!(
        keys.len(),
        1,
        "{:?}",
        keys.iter().map(|k| &k.1).collect::<Vec<_>>()
    );
    let (node, key) = &keys[0];
    // Not even a hash.
    node.cli(&["SET", key, "garbage"]).unwrap();
    let got = send(&svc, req("/c")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.text(), "run 2", "a corrupt entry was served");
    assert_eq!(
        node.cli(&["TYPE", key]).unwrap().trim(),
        "hash",
        "not replaced"
    );
    // A hash whose response does not decode.
    node.cli(&["HSET", key, "b", "\u{1}garbage"]).unwrap();
    let got = send(&svc, req("/c")).await;
    assert_eq!(got.text(), "run 3", "an undecodable entry was served");
    // Missing fields.
    node.cli(&["HDEL", key, "f"]).unwrap();
    assert_eq!(send(&svc, req("/c")).await.text(), "run 4");
    // And it heals: the next request is a hit.
    let hit = send(&svc, req("/c")).await;
    assert!(hit.hit() && hit.text() == "run 4", "{}", hit.cache_status());
}

/// Round trips, counted by the server (`INFO commandstats`): a hit is one script call, a miss
/// two (lookup, then store, which also releases the fill lock).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_hit_and_miss() {
    let env = Env::redis();
    let Env::Redis(server) = &env else {
        unreachable!()
    };
    let calls = || server.command_calls("evalsha") + server.command_calls("eval");
    let runs = Runs::default();
    let svc = service(layer(env.store().await), runs.clone(), answer(&[]));
    // Load the scripts.
    send(&svc, req("/warm")).await;
    send(&svc, req("/warm")).await;

    let before = calls();
    let miss = send(&svc, req("/rt")).await;
    let after_miss = calls();
    assert!(miss.cache_status().contains("stored"));
    let hit = send(&svc, req("/rt")).await;
    let after_hit = calls();
    assert!(hit.hit());
    let (per_miss, per_hit) = (after_miss - before, after_hit - after_miss);
    println!("round trips: miss {per_miss}, hit {per_hit}");
    assert_eq!(per_hit, 1, "a hit took {per_hit} script calls");
    assert_eq!(per_miss, 2, "a miss took {per_miss} script calls");
    // What a stampede costs: 20 concurrent requests on a cold key, handler 200 ms; the waiters
    // poll every 25 ms. Reported, not asserted (it depends on timing).
    let runs = Runs::default();
    let slow_svc = service(
        layer(env.store().await).scope("stampede"),
        runs.clone(),
        slow(Duration::from_millis(200)),
    );
    let before_stampede = calls();
    let all = join_all((0..20).map(|_| {
        let svc = slow_svc.clone();
        tokio::spawn(async move { send(&svc, req("/cold")).await })
    }))
    .await;
    assert!(all.iter().all(|g| g.as_ref().unwrap().text() == "run 1"));
    println!(
        "stampede: 20 requests, handler runs {}, script calls {}",
        runs.get(),
        calls() - before_stampede
    );
    let after_hit = calls();
    // A bypassed request never reaches Redis.
    let bypass = get("/rt")
        .header("cookie", "a=b")
        .body(Full::default())
        .unwrap();
    send(&svc, bypass).await;
    assert_eq!(calls(), after_hit);
    // No key lives forever: version keys expire after the entries written under them.
    let l = layer(env.store().await).scope("versions");
    let handle = l.handle();
    let svc = service(l, Runs::default(), answer(&[]));
    send(&svc, req("/v")).await;
    handle.invalidate().await.unwrap();
    let keys = env.keys("*:c:{*}:*");
    assert!(!keys.is_empty());
    for (node, key) in keys {
        let ttl: i64 = node.cli(&["PTTL", &key]).unwrap().trim().parse().unwrap();
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
    }
}

#[cfg(feature = "redis")]
mod redis_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_slow_or_down_responses_still_served() {
        super::redis_slow_or_down_responses_still_served(super::Env::redis()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_entry_is_a_miss_and_deleted() {
        super::corrupt_entry_is_a_miss_and_deleted(super::Env::redis()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_entry_is_a_miss_and_deleted_on_the_cluster() {
        super::corrupt_entry_is_a_miss_and_deleted(super::Env::redis_cluster()).await;
    }
}

#[cfg(feature = "fred")]
mod fred_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_slow_or_down_responses_still_served() {
        super::redis_slow_or_down_responses_still_served(super::Env::fred()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_entry_is_a_miss_and_deleted() {
        super::corrupt_entry_is_a_miss_and_deleted(super::Env::fred()).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The store failing: `on_store_error`, and the service's own constructors.
// ---------------------------------------------------------------------------------------------

/// A store whose every call fails at once, or (`hang`) never answers, so that only the store
/// timeout ends it.
struct FailingStore {
    hang: bool,
}

impl FailingStore {
    fn fail<T: Send + 'static>(&self) -> tower_redis_layers::store::StoreFuture<T> {
        if self.hang {
            Box::pin(std::future::pending())
        } else {
            Box::pin(async {
                Err(tower_redis_layers::StoreError::store(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "the store is down",
                )))
            })
        }
    }
}

impl CacheStore for FailingStore {
    fn lookup(
        &self,
        _: tower_redis_layers::store::LookupRequest,
    ) -> tower_redis_layers::store::StoreFuture<tower_redis_layers::store::Lookup> {
        self.fail()
    }
    fn store(
        &self,
        _: tower_redis_layers::store::StoreRequest,
    ) -> tower_redis_layers::store::StoreFuture<tower_redis_layers::store::StoreOutcome> {
        self.fail()
    }
    fn release_fill(
        &self,
        _: tower_redis_layers::StoreKey,
        _: tower_redis_layers::StoreKey,
        _: tower_redis_layers::store::FillToken,
    ) -> tower_redis_layers::store::StoreFuture<bool> {
        self.fail()
    }
    fn invalidate_segment(
        &self,
        _: tower_redis_layers::StoreKey,
    ) -> tower_redis_layers::store::StoreFuture<u64> {
        self.fail()
    }
    fn invalidate_key(
        &self,
        _: tower_redis_layers::StoreKey,
        _: tower_redis_layers::StoreKey,
    ) -> tower_redis_layers::store::StoreFuture<bool> {
        self.fail()
    }
}

/// Asserts the `503` of a layer that fails closed.
fn assert_unavailable(got: &Got) {
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(got.headers["retry-after"], "1");
    assert_eq!(got.headers["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(problem["status"], 503);
    assert_eq!(
        got.cache_status(),
        "tower-redis-layers; detail=store-unavailable"
    );
}

#[tokio::test]
async fn on_store_error_closed_answers_503_without_calling_the_handler() {
    let runs = Runs::default();
    let svc = service(
        CacheLayer::new(FailingStore { hang: false }).on_store_error(FailureMode::Closed),
        runs.clone(),
        answer(&[]),
    );
    assert_unavailable(&send(&svc, req("/x")).await);
    // A refresh reads the version first: that lookup fails too.
    let refresh = get("/x")
        .header("cache-control", "no-cache")
        .body(Full::default())
        .unwrap();
    assert_unavailable(&send(&svc, refresh).await);
    assert_eq!(
        runs.get(),
        0,
        "the handler ran although the layer fails closed"
    );
    // Requests that do not use the cache never reach the store.
    let post = get("/x")
        .method(Method::POST)
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&svc, post).await.status, StatusCode::OK);
    let cookie = get("/x")
        .header("cookie", "a=b")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&svc, cookie).await.status, StatusCode::OK);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn on_store_error_open_by_default_serves_a_miss_unstored() {
    let runs = Runs::default();
    let svc = service(
        CacheLayer::new(FailingStore { hang: false }),
        runs.clone(),
        answer(&[]),
    );
    for n in 1..=2 {
        let got = send(&svc, req("/x")).await;
        assert_eq!(
            (got.status, got.text()),
            (StatusCode::OK, format!("run {n}"))
        );
        assert_eq!(got.cache_status(), "tower-redis-layers; fwd=miss");
    }
    let handle = CacheLayer::new(FailingStore { hang: false }).handle();
    assert!(handle.invalidate().await.is_err());
    assert!(handle.invalidate_request(&req("/x")).await.is_err());
}

#[tokio::test]
async fn a_store_that_does_not_answer_is_bounded_by_the_store_timeout() {
    let runs = Runs::default();
    let closed = service(
        CacheLayer::new(FailingStore { hang: true })
            .store_timeout(Duration::from_millis(50))
            .on_store_error(FailureMode::Closed),
        runs.clone(),
        answer(&[]),
    );
    let started = tokio::time::Instant::now();
    assert_unavailable(&send(&closed, req("/x")).await);
    assert!(started.elapsed() < Duration::from_secs(2), "not bounded");
    assert_eq!(runs.get(), 0);
    let open = service(
        CacheLayer::new(FailingStore { hang: true }).store_timeout(Duration::from_millis(50)),
        runs.clone(),
        answer(&[]),
    );
    let got = send(&open, req("/x")).await;
    assert_eq!(got.text(), "run 1");
    let handle = CacheLayer::new(FailingStore { hang: true })
        .store_timeout(Duration::from_millis(50))
        .handle();
    assert!(matches!(
        handle.invalidate().await,
        Err(tower_redis_layers::StoreError::Timeout(_))
    ));
}

#[tokio::test]
async fn no_response_ttl_ignores_max_age() {
    let runs = Runs::default();
    let svc = service(
        layer(AnyStore::Memory(MemoryStore::new())).no_response_ttl(),
        runs.clone(),
        answer(&[("cache-control", "max-age=0")]),
    );
    send(&svc, req("/t")).await;
    let hit = send(&svc, req("/t")).await;
    assert!(hit.hit(), "{}", hit.cache_status());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn the_service_has_its_own_constructors() {
    let runs = Runs::default();
    let handler = answer(&[]);
    let counted = runs.clone();
    let inner = service_fn(move |req: Req| {
        let n = counted.next();
        handler(req, n)
    });
    let mut cache = Cache::new(inner, MemoryStore::new());
    let _: &_ = cache.get_ref();
    let _: &mut _ = cache.get_mut();
    let svc = BoxCloneService::new(cache);
    send(&svc, req("/c")).await;
    assert!(send(&svc, req("/c")).await.hit());
    assert_eq!(runs.get(), 1);
    let layer = Cache::layer(MemoryStore::new()).scope("x");
    let svc = service(layer, Runs::default(), answer(&[]));
    send(&svc, req("/c")).await;
    assert!(send(&svc, req("/c")).await.hit());
    let inner = Cache::new(1_u8, MemoryStore::new()).into_inner();
    assert_eq!(inner, 1);
}

/// A Redis store whose server stopped: with `FailureMode::Closed`, a `503`.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed() {
    let mut env = Env::redis();
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await)
            .store_timeout(Duration::from_millis(200))
            .on_store_error(FailureMode::Closed),
        runs.clone(),
        answer(&[]),
    );
    assert_eq!(send(&svc, req("/d")).await.text(), "run 1");
    assert!(send(&svc, req("/d")).await.hit());
    match &mut env {
        Env::Redis(s) => s.stop(),
        _ => unreachable!(),
    }
    assert_unavailable(&send(&svc, req("/d")).await);
    assert_eq!(runs.get(), 1);
}
