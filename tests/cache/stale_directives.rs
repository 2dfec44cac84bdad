//! RFC 5861 `stale-while-revalidate` / `stale-if-error` read from the response, with the
//! layer's windows as defaults and upper bounds, and `must-revalidate`, `proxy-revalidate`,
//! `s-maxage` forbidding stale serving; against every store.

use super::*;

/// A layer over a handler answering `cache-control: cc` while `failing` is 0, else 503.
fn flaky(l: CacheLayer<Store>, cc: &'static str, failing: Arc<AtomicUsize>) -> Svc {
    service(l, Runs::default(), move |_req: Req, n| {
        let failing = failing.load(Ordering::SeqCst) != 0;
        async move {
            let mut r = Response::new(full(format!("run {n}")));
            if failing {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            } else {
                r.headers_mut().insert("cache-control", cc.parse().unwrap());
            }
            Ok(r)
        }
    })
}

async fn stale_if_error_from_the_response(env: Env) {
    // (response Cache-Control, layer stale-if-error window, stale entry served on a 503)
    let cases: [(&'static str, u64, bool); 7] = [
        ("max-age=1", 60, true),
        ("max-age=1, stale-if-error=30", 60, true),
        ("max-age=1, stale-if-error=0", 60, false),
        ("max-age=1, stale-if-error=30, must-revalidate", 60, false),
        ("max-age=1, proxy-revalidate", 60, false),
        ("s-maxage=1", 60, false),
        // The layer's window is an upper bound: off by default.
        ("max-age=1, stale-if-error=30", 0, false),
    ];
    let failing = Arc::new(AtomicUsize::new(0));
    let mut services = Vec::new();
    for (i, (cc, window, _)) in cases.iter().enumerate() {
        let l = layer(env.store().await)
            .scope(format!("sie{i}"))
            .stale_if_error(Duration::from_secs(*window));
        let svc = flaky(l, cc, failing.clone());
        assert_eq!(send(&svc, req("/x")).await.text(), "run 1");
        services.push(svc);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    failing.store(1, Ordering::SeqCst);
    for ((cc, window, served), svc) in cases.iter().zip(&services) {
        let got = send(svc, req("/x")).await;
        let stale = got.status == StatusCode::OK && got.text() == "run 1";
        assert_eq!(
            stale,
            *served,
            "{cc} (layer window {window} s): {}",
            got.cache_status()
        );
    }
}

async fn stale_while_revalidate_from_the_response(env: Env) {
    // (response Cache-Control, layer window, stale entries served while one request refreshes)
    let cases: [(&'static str, u64, bool); 5] = [
        ("max-age=1", 60, true),
        ("max-age=1, stale-while-revalidate=30", 60, true),
        ("max-age=1, stale-while-revalidate=0", 60, false),
        ("max-age=1, must-revalidate", 60, false),
        ("max-age=1, stale-while-revalidate=30", 0, false),
    ];
    let mut services = Vec::new();
    for (i, (cc, window, _)) in cases.iter().enumerate() {
        let l = layer(env.store().await)
            .scope(format!("swr{i}"))
            .stale_while_revalidate(Duration::from_secs(*window));
        let cc: &'static str = cc;
        let svc = service(l, Runs::default(), move |_req: Req, n| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut r = Response::new(full(format!("run {n}")));
            r.headers_mut().insert("cache-control", cc.parse().unwrap());
            Ok(r)
        });
        assert_eq!(send(&svc, req("/w")).await.text(), "run 1");
        services.push(svc);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for ((cc, window, served), svc) in cases.iter().zip(&services) {
        let calls = (0..4).map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { send(&svc, req("/w")).await })
        });
        let all: Vec<Got> = join_all(calls)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let stale = all
            .iter()
            .filter(|g| g.cache_status().contains("detail=stale"))
            .count();
        assert_eq!(stale > 0, *served, "{cc} (layer window {window} s)");
    }
}

async fn response_windows_up_to_the_cap(env: Env) {
    // `.stale_directives_up_to(cap)` with the layer's windows off: only the responses that ask
    // for stale serving get it (the proxy example's configuration).
    let sie = [
        ("max-age=1, stale-if-error=3600", true),
        ("max-age=1", false),
    ];
    let swr = [
        ("max-age=1, stale-while-revalidate=3600", true),
        ("max-age=1", false),
    ];
    let failing = Arc::new(AtomicUsize::new(0));
    let mut services = Vec::new();
    for (i, (cc, _)) in sie.iter().chain(&swr).enumerate() {
        let capped = layer(env.store().await)
            .scope(format!("cap{i}"))
            .stale_directives_up_to(Duration::from_secs(7200));
        let cc: &'static str = cc;
        let svc = if i < sie.len() {
            flaky(capped, cc, failing.clone())
        } else {
            // A slow handler: the other requests find the refresh under way.
            service(capped, Runs::default(), move |_req: Req, n| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut r = Response::new(full(format!("run {n}")));
                r.headers_mut().insert("cache-control", cc.parse().unwrap());
                Ok(r)
            })
        };
        assert_eq!(send(&svc, req("/c")).await.text(), "run 1");
        services.push(svc);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for ((cc, served), svc) in swr.iter().zip(&services[2..]) {
        let calls = (0..4).map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { send(&svc, req("/c")).await })
        });
        let stale = join_all(calls)
            .await
            .into_iter()
            .filter(|g| g.as_ref().unwrap().cache_status().contains("detail=stale"))
            .count();
        assert_eq!(stale > 0, *served, "{cc}");
    }
    failing.store(1, Ordering::SeqCst);
    for ((cc, served), svc) in sie.iter().zip(&services) {
        let got = send(svc, req("/c")).await;
        let stale = got.status == StatusCode::OK && got.text() == "run 1";
        assert_eq!(stale, *served, "{cc}: {}", got.cache_status());
    }
}

stores!(
    stale_if_error_from_the_response,
    stale_while_revalidate_from_the_response,
    response_windows_up_to_the_cap,
);
