//! Invalidation after unsafe methods (RFC 9111 section 4.4), against every store: seen by
//! another replica on the same store.

use super::*;

fn request(method: Method, path: &str) -> Req {
    get(path).method(method).body(Full::default()).unwrap()
}

/// Whether a `GET` of `path` on `host` is served from the cache.
async fn hit(svc: &Svc, host: &str, path: &str) -> bool {
    let r = Request::get(path)
        .header("host", host)
        .body(Full::default())
        .unwrap();
    send(svc, r).await.hit()
}

/// Stores `paths` on example.com through `svc`.
async fn fill(svc: &Svc, paths: &[&str]) {
    for path in paths {
        send(svc, req(path)).await;
        assert!(hit(svc, "example.com", path).await, "{path} not stored");
    }
}

/// Answers `GET`s with a cacheable `run <n>`; unsafe methods by path: `/fail` 500, `/created`
/// 201 with `Location` and `Content-Location` on this host, `/moved` 303 to another host.
fn origin(req: Req, n: usize) -> std::future::Ready<Result<Response<Body>, Error>> {
    let mut r = Response::new(full(format!("run {n}")));
    let h = r.headers_mut();
    if req.method() == Method::GET {
        h.insert("cache-control", "max-age=60".parse().unwrap());
    }
    match (req.method() == Method::GET, req.uri().path()) {
        (false, "/fail") => *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
        (false, "/created") => {
            *r.status_mut() = StatusCode::CREATED;
            let h = r.headers_mut();
            h.insert("location", "items/1?full".parse().unwrap());
            h.insert(
                "content-location",
                "HTTP://Example.com/items/view".parse().unwrap(),
            );
        }
        (false, "/moved") => {
            *r.status_mut() = StatusCode::SEE_OTHER;
            let h = r.headers_mut();
            h.insert("location", "http://other.example/items/1".parse().unwrap());
        }
        _ => {}
    }
    std::future::ready(Ok(r))
}

async fn unsafe_methods_invalidate_on_every_replica(env: Env) {
    let runs = Runs::default();
    // Two replicas: two layers (each with its own memory of `Vary`) on one store.
    let one = service(layer(env.store().await), runs.clone(), origin);
    let two = service(layer(env.store().await), runs.clone(), origin);

    // A successful POST invalidates its target, `Location` and `Content-Location`.
    fill(
        &one,
        &["/created", "/items/1?full", "/items/view", "/other"],
    )
    .await;
    let got = send(&two, request(Method::POST, "/created")).await;
    assert_eq!(got.status, StatusCode::CREATED);
    for path in ["/created", "/items/1?full", "/items/view"] {
        assert!(!hit(&one, "example.com", path).await, "{path} still cached");
    }
    assert!(
        hit(&one, "example.com", "/other").await,
        "an unrelated entry went"
    );

    // An error leaves the entry.
    fill(&one, &["/fail"]).await;
    let got = send(&two, request(Method::POST, "/fail")).await;
    assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        hit(&one, "example.com", "/fail").await,
        "invalidated after a 500"
    );

    // Another host's `Location` is left alone; the target is invalidated.
    fill(&one, &["/moved"]).await;
    let other = Request::get("/items/1")
        .header("host", "other.example")
        .body(Full::default())
        .unwrap();
    send(&one, other).await;
    assert!(hit(&one, "other.example", "/items/1").await);
    send(&two, request(Method::PUT, "/moved")).await;
    assert!(!hit(&one, "example.com", "/moved").await);
    assert!(
        hit(&one, "other.example", "/items/1").await,
        "other host invalidated"
    );

    // PUT, DELETE, PATCH (and any unsafe method) invalidate; OPTIONS does not.
    for method in [
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::from_bytes(b"PURGE").unwrap(),
    ] {
        fill(&one, &["/thing"]).await;
        send(&two, request(method.clone(), "/thing")).await;
        assert!(
            !hit(&one, "example.com", "/thing").await,
            "{method} left the entry"
        );
    }
    fill(&one, &["/thing"]).await;
    send(&two, request(Method::OPTIONS, "/thing")).await;
    assert!(
        hit(&one, "example.com", "/thing").await,
        "OPTIONS invalidated"
    );

    // Turned off.
    let off = service(
        layer(env.store().await).no_unsafe_invalidation(),
        runs.clone(),
        origin,
    );
    send(&off, request(Method::POST, "/thing")).await;
    assert!(
        hit(&one, "example.com", "/thing").await,
        "invalidated while off"
    );
}

stores!(unsafe_methods_invalidate_on_every_replica);
