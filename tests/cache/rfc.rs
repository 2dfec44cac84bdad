//! RFC 9111 rules, against every store: freshness (`s-maxage` > `max-age` > `Expires` − `Date`,
//! all three date formats, invalid values), the response's age, the statuses stored.

use std::time::{Duration, SystemTime};

use super::*;

/// A handler answering `run <n>` with `status` and the headers `headers()` makes (called per
/// response, so dates are current).
fn answer_with<H>(
    status: u16,
    headers: H,
) -> impl Fn(Req, usize) -> std::future::Ready<Result<Response<Body>, Error>> + Clone + Send + Sync
where
    H: Fn() -> Vec<(&'static str, String)> + Clone + Send + Sync + 'static,
{
    move |_req, n| {
        let mut r = Response::new(full(format!("run {n}")));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers() {
            r.headers_mut().append(k, v.parse().unwrap());
        }
        std::future::ready(Ok(r))
    }
}

/// An HTTP date `offset` seconds from now, in the format `style` names: `imf` (IMF-fixdate),
/// `rfc850` or `asctime`.
fn date(offset: i64, style: &str) -> String {
    let now = SystemTime::now();
    let t = if offset >= 0 {
        now + Duration::from_secs(offset as u64)
    } else {
        now - Duration::from_secs(offset.unsigned_abs())
    };
    let imf = httpdate::fmt_http_date(t);
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let p: Vec<&str> = imf.split([' ', ',']).filter(|s| !s.is_empty()).collect();
    let (wkday, day, mon, year, time) = (p[0], p[1], p[2], p[3], p[4]);
    match style {
        "imf" => imf,
        "rfc850" => {
            let long = [
                ("Mon", "Monday"),
                ("Tue", "Tuesday"),
                ("Wed", "Wednesday"),
                ("Thu", "Thursday"),
                ("Fri", "Friday"),
                ("Sat", "Saturday"),
                ("Sun", "Sunday"),
            ]
            .iter()
            .find(|(s, _)| *s == wkday)
            .unwrap()
            .1;
            format!("{long}, {day}-{mon}-{} {time} GMT", &year[2..])
        }
        "asctime" => format!(
            "{wkday} {mon} {:>2} {time} {year}",
            day.trim_start_matches('0')
        ),
        _ => unreachable!(),
    }
}

/// Sends a new path three times to a fresh layer answering with `status` and `headers()`; answers
/// how many times the handler ran.
async fn runs_for<H>(env: &Env, status: u16, headers: H) -> usize
where
    H: Fn() -> Vec<(&'static str, String)> + Clone + Send + Sync + 'static,
{
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await).ttl(Duration::from_secs(60)),
        runs.clone(),
        answer_with(status, headers),
    );
    // A path of its own: the store is shared by the calls of a scenario.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = format!("/p{}", N.fetch_add(1, Ordering::SeqCst));
    for _ in 0..3 {
        send(&svc, req(&path)).await;
    }
    runs.get()
}

fn fixed(pairs: &'static [(&'static str, &'static str)]) -> Vec<(&'static str, String)> {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

async fn explicit_expiry_beats_the_ttl(env: Env) {
    // Expired, invalid or unusable freshness: never stored, whatever the layer's 60 s TTL.
    for headers in [
        &[("expires", "0")][..],
        &[("expires", "Sun, 06 Nov 1994 08:49:37 GMT")],
        &[("expires", "tomorrow")],
        &[("cache-control", "max-age=-1")],
        &[("cache-control", "max-age=\"60\"")],
        &[("cache-control", "max-age=ten")],
        &[("cache-control", "Max-Age=0")],
        &[("cache-control", "S-MAXAGE=0, max-age=60")],
        &[("cache-control", "max-age=60, max-age=0")],
        &[("cache-control", "max-age=60"), ("age", "61")],
        &[("cache-control", "max-age=3600"), ("age", "7200")],
    ] {
        assert_eq!(
            runs_for(&env, 200, move || fixed(headers)).await,
            3,
            "{headers:?}"
        );
    }
    // `max-age` beats an expired `Expires`.
    let runs = runs_for(&env, 200, || {
        vec![
            ("cache-control", "max-age=60".to_owned()),
            ("expires", date(-60, "imf")),
        ]
    })
    .await;
    assert_eq!(runs, 1);
    // An expired `Expires` in each date format, with a current `Date`.
    for style in ["imf", "rfc850", "asctime"] {
        let runs = runs_for(&env, 200, move || {
            vec![("date", date(0, "imf")), ("expires", date(-10, style))]
        })
        .await;
        assert_eq!(runs, 3, "expired Expires in {style} stored");
    }
}

async fn expires_in_every_date_format(env: Env) {
    for style in ["imf", "rfc850", "asctime"] {
        let runs = Runs::default();
        let svc = service(
            // A heuristic TTL far longer than `Expires` − `Date` (2 s).
            layer(env.store().await).ttl(Duration::from_secs(60)),
            runs.clone(),
            answer_with(200, move || {
                vec![("date", date(0, style)), ("expires", date(2, style))]
            }),
        );
        let path = format!("/e/{style}");
        assert_eq!(send(&svc, req(&path)).await.text(), "run 1");
        assert_eq!(send(&svc, req(&path)).await.text(), "run 1", "{style}");
        tokio::time::sleep(Duration::from_millis(3100)).await;
        assert_eq!(
            send(&svc, req(&path)).await.text(),
            "run 2",
            "Expires in {style} outlived"
        );
    }
}

async fn the_origin_age_counts(env: Env) {
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await).ttl(Duration::from_secs(60)),
        runs.clone(),
        answer(&[("cache-control", "max-age=3"), ("age", "2")]),
    );
    let miss = send(&svc, req("/age")).await;
    assert_eq!(miss.headers["age"], "2", "the origin's Age is passed on");
    let hit = send(&svc, req("/age")).await;
    assert!(hit.hit(), "{}", hit.cache_status());
    assert_eq!(
        hit.headers["age"], "2",
        "Age = received age + resident time"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hit = send(&svc, req("/age")).await;
    assert_eq!(hit.text(), "run 1");
    assert_eq!(hit.headers["age"], "2");
    // One second of freshness was left when it arrived.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(send(&svc, req("/age")).await.text(), "run 2");
    // By `Date`: 30 s old on arrival, 60 s lifetime.
    let svc = service(
        layer(env.store().await),
        runs.clone(),
        answer_with(200, || {
            vec![
                ("cache-control", "max-age=60".to_owned()),
                ("date", date(-30, "imf")),
            ]
        }),
    );
    send(&svc, req("/dated")).await;
    let hit = send(&svc, req("/dated")).await;
    assert!(hit.hit(), "{}", hit.cache_status());
    let age: u64 = hit.headers["age"].to_str().unwrap().parse().unwrap();
    assert!((30..=32).contains(&age), "Age {age}");
}

async fn a_list_age_counts_its_first_member(env: Env) {
    // RFC 9111 section 5.1: a list-based `Age` uses its first member.
    let stale = || fixed(&[("cache-control", "max-age=3600"), ("age", "7200, 0")]);
    assert_eq!(runs_for(&env, 200, stale).await, 3);
    let fresh = || fixed(&[("cache-control", "max-age=3600"), ("age", "0, 7200")]);
    assert_eq!(runs_for(&env, 200, fresh).await, 1);
}

async fn statuses_with_explicit_freshness_are_stored(env: Env) {
    let with = |cc: &'static str| move || vec![("cache-control", cc.to_owned())];
    assert_eq!(runs_for(&env, 201, with("max-age=60")).await, 1);
    assert_eq!(runs_for(&env, 302, with("s-maxage=60")).await, 1);
    // Heuristic freshness (the layer's TTL): a heuristically cacheable status, or `public`.
    assert_eq!(runs_for(&env, 201, Vec::new).await, 3);
    assert_eq!(runs_for(&env, 201, with("public")).await, 1);
    assert_eq!(runs_for(&env, 404, Vec::new).await, 1);
    // Never: partial content.
    assert_eq!(runs_for(&env, 206, with("max-age=60")).await, 3);
    // `.statuses(..)` is a list: only those, with the TTL as heuristic.
    let runs = Runs::default();
    let svc = service(
        layer(env.store().await).statuses([StatusCode::CREATED]),
        runs.clone(),
        |req: Req, n| async move {
            let status = if req.uri().path() == "/ok" { 200 } else { 201 };
            let mut r = Response::new(full(format!("run {n}")));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            r.headers_mut()
                .insert("cache-control", "max-age=60".parse().unwrap());
            Ok(r)
        },
    );
    for path in ["/ok", "/ok", "/created", "/created"] {
        send(&svc, req(path)).await;
    }
    assert_eq!(runs.get(), 3, "only the listed status was stored");
}

stores!(
    explicit_expiry_beats_the_ttl,
    expires_in_every_date_format,
    the_origin_age_counts,
    a_list_age_counts_its_first_member,
    statuses_with_explicit_freshness_are_stored,
);
