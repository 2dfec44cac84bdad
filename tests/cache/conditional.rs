//! A client's conditional requests, against every store: `304` on a hit, forwarded unchanged
//! on a miss (and that `304` not stored).

use super::*;

const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

fn conditional(path: &str, pairs: &[(&'static str, &'static str)]) -> Req {
    let mut b = get(path);
    for (k, v) in pairs {
        b = b.header(*k, *v);
    }
    b.body(Full::default()).unwrap()
}

/// Answers `304` when the request carries `If-None-Match: "v1"`, else `200` with that `ETag`.
fn origin(req: Req, n: usize) -> std::future::Ready<Result<Response<Body>, Error>> {
    let matched = req
        .headers()
        .get("if-none-match")
        .is_some_and(|v| v == "\"v1\"");
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
    h.insert("last-modified", LAST_MODIFIED.parse().unwrap());
    h.insert("cache-control", "max-age=60".parse().unwrap());
    h.insert("content-type", "text/plain".parse().unwrap());
    std::future::ready(Ok(r))
}

async fn conditional_requests_on_a_hit_get_304(env: Env) {
    let runs = Runs::default();
    let svc = service(layer(env.store().await), runs.clone(), origin);
    assert_eq!(send(&svc, req("/c")).await.text(), "run 1");
    for pairs in [
        &[("if-none-match", "\"v1\"")][..],
        &[("if-none-match", "\"v0\", W/\"v1\"")],
        &[("if-none-match", "*")],
        &[("if-modified-since", LAST_MODIFIED)],
        &[("if-modified-since", "Sunday, 06-Nov-94 10:00:00 GMT")],
    ] {
        let got = send(&svc, conditional("/c", pairs)).await;
        assert_eq!(got.status, StatusCode::NOT_MODIFIED, "{pairs:?}");
        assert!(got.body.is_empty());
        assert!(got.hit(), "{}", got.cache_status());
        assert_eq!(got.headers["etag"], "\"v1\"");
        assert_eq!(got.headers["cache-control"], "max-age=60");
        assert!(got.headers.contains_key("age"));
        assert!(!got.headers.contains_key("content-type"));
    }
    for pairs in [
        &[("if-none-match", "\"v2\"")][..],
        // If-None-Match wins over If-Modified-Since.
        &[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", "Sun, 06 Nov 1994 10:00:00 GMT"),
        ],
        &[("if-modified-since", "Sun Nov  6 08:00:00 1994")],
    ] {
        let got = send(&svc, conditional("/c", pairs)).await;
        assert_eq!(got.status, StatusCode::OK, "{pairs:?}");
        assert_eq!(got.text(), "run 1");
        assert!(got.hit());
    }
    assert_eq!(runs.get(), 1);
}

async fn conditional_requests_on_a_miss_are_forwarded(env: Env) {
    let runs = Runs::default();
    let svc = service(layer(env.store().await), runs.clone(), origin);
    let got = send(&svc, conditional("/m", &[("if-none-match", "\"v1\"")])).await;
    assert_eq!(
        got.status,
        StatusCode::NOT_MODIFIED,
        "not forwarded unchanged"
    );
    assert!(!got.cache_status().contains("stored"));
    // The 304 was not stored: a plain request gets the full response.
    let full = send(&svc, req("/m")).await;
    assert_eq!(
        (full.status, full.text().as_str()),
        (StatusCode::OK, "run 2")
    );
    assert_eq!(send(&svc, req("/m")).await.text(), "run 2");
}

stores!(
    conditional_requests_on_a_hit_get_304,
    conditional_requests_on_a_miss_are_forwarded,
);
