//! Validation of stored entries (RFC 9111 section 4.3), against every store: the inner service
//! gets the conditional request, a `304` refreshes the entry in one store call and the stored
//! body is served, a `200` replaces it; `must-revalidate` is never served stale; a request's
//! `no-cache` / `max-age=0` revalidates; one revalidation across replicas.

use std::{collections::HashMap, sync::Mutex};

use tower_redis_layers::{
    store::{
        FillToken, Lookup, LookupRequest, RefreshRequest, StoreFuture, StoreOutcome, StoreRequest,
    },
    StoreKey,
};

use super::*;

/// A store that counts the calls made to it, by operation.
#[derive(Clone)]
struct Counting {
    inner: Store,
    calls: Arc<Mutex<HashMap<&'static str, usize>>>,
}

impl Counting {
    fn new(inner: Store) -> Self {
        Self {
            inner,
            calls: Arc::default(),
        }
    }
    fn count(&self, op: &'static str) {
        *self.calls.lock().unwrap().entry(op).or_default() += 1;
    }
    /// The calls since the last `take`, by operation, sorted.
    fn take(&self) -> Vec<(&'static str, usize)> {
        let mut calls: Vec<_> = self.calls.lock().unwrap().drain().collect();
        calls.sort();
        calls
    }
}

impl CacheStore for Counting {
    fn lookup(&self, request: LookupRequest) -> StoreFuture<Lookup> {
        self.count("lookup");
        self.inner.lookup(request)
    }
    fn store(&self, request: StoreRequest) -> StoreFuture<StoreOutcome> {
        self.count("store");
        self.inner.store(request)
    }
    fn release_fill(&self, s: StoreKey, k: StoreKey, t: FillToken) -> StoreFuture<bool> {
        self.count("release");
        self.inner.release_fill(s, k, t)
    }
    fn invalidate_segment(&self, segment: StoreKey) -> StoreFuture<u64> {
        self.count("invalidate_segment");
        self.inner.invalidate_segment(segment)
    }
    fn invalidate_key(&self, segment: StoreKey, key: StoreKey) -> StoreFuture<bool> {
        self.count("invalidate_key");
        self.inner.invalidate_key(segment, key)
    }
    fn refresh(&self, request: RefreshRequest) -> StoreFuture<StoreOutcome> {
        self.count("refresh");
        self.inner.refresh(request)
    }
    fn invalidate_keys(&self, segment: StoreKey, keys: Vec<StoreKey>) -> StoreFuture<u64> {
        self.count("invalidate_keys");
        self.inner.invalidate_keys(segment, keys)
    }
    fn is_remote(&self) -> bool {
        CacheStore::is_remote(&self.inner)
    }
}

/// The validator fields of one request: `If-None-Match`, `If-Modified-Since`.
type Validators = (Option<String>, Option<String>);

/// What the origin saw of each request: its validator fields.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Validators>>>);

impl Seen {
    fn take(&self) -> Vec<Validators> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

/// An origin with `ETag: "v1"` and the `cache-control` given: `304` (with `x-run` and the
/// same `cache-control`) to `If-None-Match: "v1"`, else `200` `run <n>`. Records what it saw.
fn etag_origin(
    cc: &'static str,
    seen: Seen,
) -> impl Fn(Req, usize) -> std::future::Ready<Result<Response<Body>, Error>> + Clone + Send + Sync
{
    move |req, n| {
        let field = |name| {
            req.headers()
                .get(name)
                .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
        };
        let inm = field("if-none-match");
        seen.0
            .lock()
            .unwrap()
            .push((inm.clone(), field("if-modified-since")));
        let matched = inm.as_deref() == Some("\"v1\"");
        let mut r = Response::new(full(if matched {
            String::new()
        } else {
            format!("run {n}")
        }));
        if matched {
            *r.status_mut() = StatusCode::NOT_MODIFIED;
        }
        let h = r.headers_mut();
        h.insert("etag", "\"v1\"".parse().unwrap());
        h.insert("cache-control", cc.parse().unwrap());
        h.insert("x-run", n.to_string().parse().unwrap());
        if !matched {
            h.insert("content-type", "text/plain".parse().unwrap());
        }
        std::future::ready(Ok(r))
    }
}

fn with(path: &str, pairs: &[(&'static str, &'static str)]) -> Req {
    let mut b = get(path);
    for (k, v) in pairs {
        b = b.header(*k, *v);
    }
    b.body(Full::default()).unwrap()
}

async fn stale_entries_are_revalidated_with_one_refresh_call(env: Env) {
    let runs = Runs::default();
    let seen = Seen::default();
    let store = Counting::new(env.store().await);
    let svc = service(
        CacheLayer::new(store.clone())
            .jitter(0.0)
            .no_early_recompute(),
        runs.clone(),
        etag_origin("max-age=1", seen.clone()),
    );
    assert_eq!(send(&svc, req("/r")).await.text(), "run 1");
    assert_eq!(seen.take(), [(None, None)]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    store.take();
    let got = send(&svc, req("/r")).await;
    // The handler saw the conditional request; the stored body is served with the new headers.
    assert_eq!(seen.take(), [(Some("\"v1\"".to_owned()), None)]);
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.text(), "run 1");
    assert_eq!(got.headers["x-run"], "2");
    assert_eq!(got.headers["content-type"], "text/plain");
    assert_eq!(got.headers["age"], "0");
    assert_eq!(
        got.cache_status(),
        "tower-redis-layers; fwd=stale; fwd-status=304; stored"
    );
    // One lookup (which took the fill lock) and one refresh (which released it).
    assert_eq!(store.take(), [("lookup", 1), ("refresh", 1)]);
    // Fresh again: a hit, with the refreshed headers.
    let hit = send(&svc, req("/r")).await;
    assert!(hit.hit(), "{}", hit.cache_status());
    assert_eq!(hit.text(), "run 1");
    assert_eq!(hit.headers["x-run"], "2");
    assert_eq!(runs.get(), 2);
}

async fn a_200_replaces_and_last_modified_validates(env: Env) {
    let runs = Runs::default();
    let seen = Seen::default();
    let origin = {
        let seen = seen.clone();
        move |req: Req, n: usize| {
            let ims = req
                .headers()
                .get("if-modified-since")
                .map(|v| v.to_str().unwrap().to_owned());
            seen.0.lock().unwrap().push((None, ims.clone()));
            // The second request gets a new representation whatever it asked.
            let not_modified = ims.is_some() && n != 2;
            let mut r = Response::new(full(if not_modified {
                String::new()
            } else {
                format!("run {n}")
            }));
            if not_modified {
                *r.status_mut() = StatusCode::NOT_MODIFIED;
            }
            let h = r.headers_mut();
            h.insert("last-modified", LAST_MODIFIED.parse().unwrap());
            h.insert("cache-control", "no-cache".parse().unwrap());
            std::future::ready(Ok::<_, Error>(r))
        }
    };
    let svc = service(layer(env.store().await), runs.clone(), origin);
    assert_eq!(send(&svc, req("/lm")).await.text(), "run 1");
    // `no-cache`: stored, but validated before every use.
    let second = send(&svc, req("/lm")).await;
    assert_eq!(second.text(), "run 2");
    assert!(second.cache_status().contains("fwd=stale; stored"));
    let third = send(&svc, req("/lm")).await;
    assert_eq!(third.text(), "run 2");
    assert!(third.cache_status().contains("fwd-status=304"));
    let ims = Some(LAST_MODIFIED.to_owned());
    assert_eq!(
        seen.take(),
        [(None, None), (None, ims.clone()), (None, ims)]
    );
}

async fn must_revalidate_is_never_served_stale(env: Env) {
    let store = env.store().await;
    let seen = Seen::default();
    let strict = service(
        layer(store.clone()).scope("strict"),
        Runs::default(),
        etag_origin("max-age=1, must-revalidate", seen.clone()),
    );
    let lax = service(
        layer(store).scope("lax"),
        Runs::default(),
        etag_origin("max-age=1", Seen::default()),
    );
    send(&strict, req("/m")).await;
    send(&lax, req("/m")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let max_stale = || with("/m", &[("cache-control", "max-stale=60")]);
    // Without must-revalidate, max-stale takes the stale entry; with it, never.
    let got = send(&lax, max_stale()).await;
    assert_eq!(
        got.cache_status(),
        "tower-redis-layers; hit; detail=max-stale"
    );
    seen.take();
    let got = send(&strict, max_stale()).await;
    assert!(got.cache_status().contains("fwd=stale; fwd-status=304"));
    assert_eq!(seen.take(), [(Some("\"v1\"".to_owned()), None)]);
    assert_eq!(got.text(), "run 1");
}

async fn request_no_cache_and_max_age_0_revalidate(env: Env) {
    let seen = Seen::default();
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await),
        runs.clone(),
        etag_origin("max-age=60", seen.clone()),
    );
    send(&svc, req("/q")).await;
    seen.take();
    for cc in ["no-cache", "max-age=0"] {
        let got = send(&svc, with("/q", &[("cache-control", cc)])).await;
        assert_eq!(got.text(), "run 1", "{cc}");
        assert!(
            got.cache_status().contains("fwd=request; fwd-status=304"),
            "{cc}: {}",
            got.cache_status()
        );
    }
    let v1 = Some("\"v1\"".to_owned());
    assert_eq!(seen.take(), [(v1.clone(), None), (v1, None)]);
    // A client's own precondition: replaced by the cache's validator upstream, then answered
    // on the confirmed entry.
    let got = send(
        &svc,
        with(
            "/q",
            &[("cache-control", "no-cache"), ("if-none-match", "\"v1\"")],
        ),
    )
    .await;
    assert_eq!(got.status, StatusCode::NOT_MODIFIED);
    let got = send(
        &svc,
        with(
            "/q",
            &[("cache-control", "no-cache"), ("if-none-match", "\"v0\"")],
        ),
    )
    .await;
    assert_eq!((got.status, got.text().as_str()), (StatusCode::OK, "run 1"));
    let v1 = Some("\"v1\"".to_owned());
    assert_eq!(seen.take(), [(v1.clone(), None), (v1, None)]);
}

async fn one_revalidation_across_replicas(env: Env) {
    let seen = Seen::default();
    let runs = Runs::default();
    let origin = {
        let inner = etag_origin("max-age=1", seen.clone());
        move |req: Req, n: usize| {
            let response = inner(req, n);
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                response.await
            }
        }
    };
    let replicas: Vec<Svc> = join_all(
        (0..2).map(|_| async { service(layer(env.store().await), runs.clone(), origin.clone()) }),
    )
    .await;
    send(&replicas[0], req("/o")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    seen.take();
    let all = join_all((0..10).map(|i| {
        let svc = replicas[i % 2].clone();
        tokio::spawn(async move { send(&svc, req("/o")).await })
    }))
    .await;
    for got in all {
        assert_eq!(got.unwrap().text(), "run 1");
    }
    assert_eq!(seen.take(), [(Some("\"v1\"".to_owned()), None)]);
    assert_eq!(runs.get(), 2);
}

stores!(
    stale_entries_are_revalidated_with_one_refresh_call,
    a_200_replaces_and_last_modified_validates,
    must_revalidate_is_never_served_stale,
    request_no_cache_and_max_age_0_revalidate,
    one_revalidation_across_replicas,
);

/// Round trips on Redis, counted by the server: a revalidation is two script calls (the
/// lookup, which takes the fill lock, and the refresh, which releases it); the invalidation
/// after an unsafe method with `Location` and `Content-Location` is one per shard its three
/// URIs fall in: one with a single shard.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_revalidation() {
    let env = Env::redis();
    let Env::Redis(server) = &env else {
        unreachable!()
    };
    let calls = || server.command_calls("evalsha") + server.command_calls("eval");
    let svc = service(
        layer(env.store().await),
        Runs::default(),
        etag_origin("no-cache", Seen::default()),
    );
    send(&svc, req("/warm")).await;
    send(&svc, req("/warm")).await;
    send(&svc, req("/rv")).await;
    let before = calls();
    let got = send(&svc, req("/rv")).await;
    assert!(got.cache_status().contains("fwd-status=304; stored"));
    let per_revalidation = calls() - before;
    println!("round trips: revalidation {per_revalidation}");
    assert_eq!(per_revalidation, 2);

    let created = |_req: Req, _n: usize| {
        let mut r = Response::new(full("created"));
        *r.status_mut() = StatusCode::CREATED;
        r.headers_mut().insert("location", "/a/1".parse().unwrap());
        r.headers_mut()
            .insert("content-location", "/a/view".parse().unwrap());
        std::future::ready(Ok::<_, Error>(r))
    };
    let svc = service(
        layer(env.store().await).segment_shards(1),
        Runs::default(),
        created,
    );
    let post = || {
        get("/a")
            .method(Method::POST)
            .body(Full::default())
            .unwrap()
    };
    send(&svc, post()).await;
    let before = calls();
    send(&svc, post()).await;
    let per_unsafe = calls() - before;
    println!("round trips: unsafe-method invalidation {per_unsafe}");
    assert_eq!(per_unsafe, 1);
}

/// A store that keeps the trait's default `refresh` (answers `Missing`, touches nothing).
struct NoRefresh(MemoryStore);

impl CacheStore for NoRefresh {
    fn lookup(&self, request: LookupRequest) -> StoreFuture<Lookup> {
        self.0.lookup(request)
    }
    fn store(&self, request: StoreRequest) -> StoreFuture<StoreOutcome> {
        self.0.store(request)
    }
    fn release_fill(&self, s: StoreKey, k: StoreKey, t: FillToken) -> StoreFuture<bool> {
        self.0.release_fill(s, k, t)
    }
    fn invalidate_segment(&self, segment: StoreKey) -> StoreFuture<u64> {
        self.0.invalidate_segment(segment)
    }
    fn invalidate_key(&self, segment: StoreKey, key: StoreKey) -> StoreFuture<bool> {
        self.0.invalidate_key(segment, key)
    }
}

/// With a store that cannot refresh in place, a `304` still serves the stored body, and the
/// fill lock is released (the next request revalidates at once instead of waiting for it).
#[tokio::test]
async fn a_store_without_refresh_still_serves_the_304() {
    let seen = Seen::default();
    let runs = Runs::default();
    let svc = service(
        CacheLayer::new(NoRefresh(MemoryStore::new()))
            .jitter(0.0)
            .fill_lock(Duration::from_secs(30), Duration::from_secs(30)),
        runs.clone(),
        etag_origin("no-cache", seen.clone()),
    );
    send(&svc, req("/n")).await;
    for _ in 0..2 {
        let got = tokio::time::timeout(Duration::from_secs(5), send(&svc, req("/n")))
            .await
            .expect("waited for a lock that was never released");
        assert_eq!(got.text(), "run 1");
        assert_eq!(
            got.cache_status(),
            "tower-redis-layers; fwd=stale; fwd-status=304"
        );
    }
    assert_eq!(runs.get(), 3);
}
