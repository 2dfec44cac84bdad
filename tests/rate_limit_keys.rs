//! Where a rate limit's counters live and what a request is keyed by, on every store (see
//! `stores!`): each policy counts on its own by its name, sharing is an explicit scope.
#![cfg(feature = "redis")]

mod common;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::stores::{stores, Env};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};
use tower_redis_layers::{
    rate_limit::{KeyExtractor, Policy, RateLimitLayer, ResponseBody, Rule},
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

stores!(policies_count_by_name_and_share_by_scope);
