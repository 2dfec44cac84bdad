//! Where a rate limit's counters live and what a request is keyed by, on every store (see
//! `stores!`): each policy counts on its own by its name, sharing is an explicit scope; keys that
//! a client cannot dodge (addresses grouped by network, forwarding fields read from the right,
//! garbage never a key), and what an unauthenticated header key is worth.
#![cfg(feature = "redis")]

mod common;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::stores::{stores, Env};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{KeyExtractor, MissingKey, Policy, RateLimitLayer, ResponseBody, Rule, Trusted},
    store::RateLimitStore,
};

type Req = Request<Full<Bytes>>;
type Svc = BoxCloneService<Req, Response<ResponseBody<Full<Bytes>>>, Infallible>;

fn service<B: RateLimitStore>(layer: RateLimitLayer<B>) -> Svc {
    let inner =
        service_fn(|_req: Req| async { Ok::<_, Infallible>(Response::new(Full::from("ok"))) });
    BoxCloneService::new(ServiceBuilder::new().layer(layer).service(inner))
}

fn request() -> Req {
    let mut req = Request::builder().uri("/").body(Full::default()).unwrap();
    req.extensions_mut()
        .insert::<SocketAddr>("192.0.2.7:1000".parse().unwrap());
    req
}

/// How many of `n` requests, sent one after the other, `svc` admits.
async fn admitted(svc: &Svc, n: usize) -> usize {
    let mut admitted = 0;
    for _ in 0..n {
        let res = svc.clone().oneshot(request()).await.unwrap();
        match res.status() {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    admitted
}

/// A layer of one "program": its own client of the store, the policy, one key for everyone.
async fn program(env: &Env, policy: Policy) -> Svc {
    service(
        RateLimitLayer::new(env.store().await, policy)
            .key(KeyExtractor::global())
            .store_timeout(Duration::from_secs(5)),
    )
}

/// Two programs whose policies have identical rules but different names count on their own on
/// one store; policies with the same scope share one budget whatever their names; the same name
/// (the replicas of one program) shares.
async fn policies_count_by_name_and_share_by_scope(env: Env) {
    let long = Duration::from_secs(60);
    for (strategy, rule) in [
        ("fixed", Rule::fixed_window(3, long)),
        ("sliding-log", Rule::sliding_log(3, long)),
        ("sliding", Rule::sliding_window(3, long)),
        ("bucket", Rule::token_bucket(3, 1, long)),
        ("gcra", Rule::gcra(1, long, 3)),
    ] {
        let name = |n: &str| format!("{strategy}-{n}");
        let orders = program(&env, Policy::new(name("orders"), rule.clone())).await;
        let search = program(&env, Policy::new(name("search"), rule.clone())).await;
        assert_eq!(admitted(&orders, 5).await, 3, "{strategy}: orders");
        assert_eq!(
            admitted(&search, 5).await,
            3,
            "{strategy}: another name counts on its own"
        );
        let replica = program(&env, Policy::new(name("orders"), rule.clone())).await;
        assert_eq!(
            admitted(&replica, 2).await,
            0,
            "{strategy}: the same name shares (replicas of one program)"
        );

        let scope = name("shared");
        let a = program(&env, Policy::new("a", rule.clone()).scope(&scope)).await;
        let b = program(&env, Policy::new("b", rule.clone()).scope(&scope)).await;
        assert_eq!(admitted(&a, 2).await, 2, "{strategy}");
        assert_eq!(
            admitted(&b, 5).await,
            1,
            "{strategy}: the same scope shares one budget"
        );
        assert_eq!(admitted(&a, 1).await, 0, "{strategy}");
    }
}

/// A request from `peer` with `headers`.
fn from(peer: &str, headers: &[(&str, String)]) -> Req {
    let mut req = Request::builder().uri("/");
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let mut req = req.body(Full::default()).unwrap();
    req.extensions_mut()
        .insert::<SocketAddr>(peer.parse().unwrap());
    req
}

/// The statuses of `requests`, sent one after the other.
async fn statuses(svc: &Svc, requests: impl IntoIterator<Item = Req>) -> Vec<u16> {
    let mut statuses = Vec::new();
    for req in requests {
        statuses.push(svc.clone().oneshot(req).await.unwrap().status().as_u16());
    }
    statuses
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// A layer keyed by `key`, 3 requests a minute, with its own name so that scenarios don't share.
async fn keyed(env: &Env, name: &str, key: KeyExtractor) -> Svc {
    let policy = Policy::new(name, Rule::fixed_window(3, Duration::from_secs(60)));
    service(
        RateLimitLayer::new(env.store().await, policy)
            .key(key)
            .store_timeout(Duration::from_secs(5)),
    )
}

/// A client behind one proxy (10.0.0.1) who writes a new address to the left of the forwarding
/// field on each request gets one budget: the proxy's entry decides, by hop count or by range.
async fn spoofed_entries_to_the_left_are_ignored(env: Env) {
    let proxy = "10.0.0.1:50000";
    let spoofed = |i: usize| {
        from(
            proxy,
            &[(
                "x-forwarded-for",
                format!("198.51.100.{i}, 203.0.113.{i}, 192.0.2.7"),
            )],
        )
    };
    for (name, trusted) in [
        ("hops", Trusted::hops(1)),
        ("ranges", Trusted::ranges(["10.0.0.0/8"]).unwrap()),
    ] {
        let svc = keyed(&env, name, KeyExtractor::forwarded_for(trusted.clone())).await;
        let got = statuses(&svc, (0..10).map(spoofed)).await;
        assert_eq!(count(&got, 200), 3, "{name}: {got:?}");
        // Another client behind the same proxy has its own budget.
        let other = from(proxy, &[("x-forwarded-for", "192.0.2.8".to_owned())]);
        assert_eq!(statuses(&svc, [other]).await, [200], "{name}");
    }
    // Ranges: a client that reaches the replica directly is keyed on its own address, whatever
    // it writes.
    let ranges = Trusted::ranges(["10.0.0.0/8"]).unwrap();
    let svc = keyed(&env, "direct", KeyExtractor::forwarded_for(ranges)).await;
    let direct = (0..10).map(|i| {
        from(
            "198.51.100.9:1",
            &[("x-forwarded-for", format!("192.0.2.{i}"))],
        )
    });
    assert_eq!(count(&statuses(&svc, direct).await, 200), 3);
}

/// A client that rotates through the addresses of its /64 gets one budget; its neighbour's
/// /64 has its own; a wider prefix groups more.
async fn rotating_ipv6_addresses_in_a_64_share_one_budget(env: Env) {
    let svc = keyed(&env, "v6", KeyExtractor::peer_ip()).await;
    let rotating = (0..10).map(|i| from(&format!("[2001:db8:0:1:{i:x}::{i:x}]:443"), &[]));
    let got = statuses(&svc, rotating).await;
    assert_eq!(count(&got, 200), 3, "{got:?}");
    assert_eq!(
        statuses(&svc, [from("[2001:db8:0:2::1]:443", &[])]).await,
        [200]
    );
    // The same through a proxy, with a /56.
    let key = KeyExtractor::forwarded(Trusted::hops(1)).ipv6_prefix(56);
    let svc = keyed(&env, "v6-56", key).await;
    let rotating = (0..10).map(|i| {
        from(
            "10.0.0.1:1",
            &[("forwarded", format!("for=\"[2001:db8:0:{i:x}::1]:{i}\""))],
        )
    });
    assert_eq!(count(&statuses(&svc, rotating).await, 200), 3);
}

/// `Forwarded` is read: quoted IPv6 with a port, several elements and lines, spoofed elements to
/// the left ignored; `unknown` and obfuscated nodes give no key.
async fn forwarded_is_parsed(env: Env) {
    let svc = keyed(&env, "forwarded", KeyExtractor::forwarded(Trusted::hops(2))).await;
    // The client wrote the first element; proxy 1 the second line's first; proxy 2 the last.
    let request = |spoof: usize| {
        let mut req = from(
            "10.0.0.2:1",
            &[(
                "forwarded",
                format!("for=\"198.51.100.{spoof}\";proto=https, for=_junk\""),
            )],
        );
        let line = "for=\"[2001:db8:cafe::17]:4711\";by=10.0.0.1, for=10.0.0.1;host=\"a,b\"";
        req.headers_mut().append("forwarded", line.parse().unwrap());
        req
    };
    let got = statuses(&svc, (0..6).map(request)).await;
    assert_eq!(count(&got, 200), 3, "{got:?}");
    // The same client without a port, in another request: the same key.
    let same = from(
        "10.0.0.2:1",
        &[(
            "forwarded",
            "for=\"[2001:db8:cafe::1]\", for=10.0.0.1".to_owned(),
        )],
    );
    assert_eq!(statuses(&svc, [same]).await, [429], "the same /64");
    for node in ["unknown", "_hidden", "\"_x:1\""] {
        let req = from(
            "10.0.0.2:1",
            &[("forwarded", format!("for={node}, for=10.0.0.1"))],
        );
        assert_eq!(statuses(&svc, [req]).await, [400], "{node}: no key");
    }
}

/// Entries that are not addresses never become keys: the key is missing, and `MissingKey`
/// decides (400 by default; one shared budget with `Shared`).
async fn garbage_entries_are_a_missing_key(env: Env) {
    let garbage = [
        "not-an-ip",
        "",
        "1.2.3.4.5",
        "1.2.3.4 5.6.7.8",
        "[::1",
        "::1]",
        "300.0.0.1",
        "'192.0.2.1'",
        "\"192.0.2.1\"",
        "192.0.2.1/24",
    ];
    let requests = || {
        garbage
            .iter()
            .map(|g| from("10.0.0.1:1", &[("x-forwarded-for", g.to_string())]))
    };
    let svc = keyed(
        &env,
        "garbage",
        KeyExtractor::forwarded_for(Trusted::hops(1)),
    )
    .await;
    let got = statuses(&svc, requests()).await;
    assert_eq!(count(&got, 400), garbage.len(), "{got:?}");
    let policy = Policy::new(
        "garbage-shared",
        Rule::fixed_window(3, Duration::from_secs(60)),
    );
    let shared = service(
        RateLimitLayer::new(env.store().await, policy)
            .key(KeyExtractor::forwarded_for(Trusted::hops(1)))
            .on_missing_key(MissingKey::Shared)
            .store_timeout(Duration::from_secs(5)),
    );
    let got = statuses(&shared, requests()).await;
    assert_eq!(
        count(&got, 200),
        3,
        "one budget for every request without a key: {got:?}"
    );
}

/// The key a (hypothetical) auth layer put in the extensions once it checked the API key.
#[derive(Clone)]
struct Authenticated(String);

/// 30 requests from one address, each with a new invented `x-api-key`: keyed on the header,
/// each value is a fresh budget and all 30 pass (as the docs of `KeyExtractor::header` say);
/// keyed on what an auth layer authenticated, with the address as the fallback, 5 pass.
async fn invented_api_keys_are_a_fresh_budget_each(env: Env) {
    let bucket = |name: &str| Policy::new(name, Rule::token_bucket(5, 1, Duration::from_secs(60)));
    let invented =
        || (0..30).map(|i| from("192.0.2.1:1", &[("x-api-key", format!("made-up-{i}"))]));
    let header = KeyExtractor::header("x-api-key").or(KeyExtractor::peer_ip());
    let svc = service(
        RateLimitLayer::new(env.store().await, bucket("header"))
            .key(header)
            .store_timeout(Duration::from_secs(5)),
    );
    assert_eq!(count(&statuses(&svc, invented()).await, 200), 30);

    let authenticated =
        KeyExtractor::custom(|parts| parts.extensions.get::<Authenticated>().map(|a| a.0.clone()))
            .or(KeyExtractor::peer_ip());
    let svc = service(
        RateLimitLayer::new(env.store().await, bucket("authenticated"))
            .key(authenticated)
            .store_timeout(Duration::from_secs(5)),
    );
    assert_eq!(count(&statuses(&svc, invented()).await, 200), 5);
    // A checked key has a budget of its own.
    let mut req = from("192.0.2.1:1", &[]);
    req.extensions_mut()
        .insert(Authenticated("customer-1".into()));
    assert_eq!(statuses(&svc, [req]).await, [200]);
}

stores!(
    policies_count_by_name_and_share_by_scope,
    spoofed_entries_to_the_left_are_ignored,
    rotating_ipv6_addresses_in_a_64_share_one_budget,
    forwarded_is_parsed,
    garbage_entries_are_a_missing_key,
    invented_api_keys_are_a_fresh_budget_each,
);
