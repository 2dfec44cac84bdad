//! `rediss://` (the `tls` feature) on both clients: a TLS-only `redis-server` (`--port 0
//! --tls-port P`) and a 3-master cluster whose clients and bus speak TLS, with a CA and a server
//! certificate made at test time; a rate-limit check, a cache miss then hit, and a lock round
//! trip through each store; a CA that did not sign the server's certificate fails at connect
//! with `StoreError::Tls`.
#![cfg(all(feature = "tls", any(feature = "redis", feature = "fred")))]

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
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, ServiceBuilder, ServiceExt};

use common::{RedisTlsCluster, RedisTlsServer, TlsCerts};
use tower_redis_layers::{
    cache::CacheLayer,
    lock::Lock,
    store::{CacheStore, ConnectOptions, LockStore, RateCheck, RateLimitStore, Rule},
    StoreError, StoreKey,
};

/// Connects the client named `client` ("redis" or "fred") to `url` with `options`.
async fn connect(client: &str, url: &str, options: ConnectOptions) -> Result<Store, StoreError> {
    match client {
        #[cfg(feature = "redis")]
        "redis" => tower_redis_layers::store::RedisStore::connect_with(url, options)
            .await
            .map(Store::Redis),
        #[cfg(feature = "fred")]
        "fred" => tower_redis_layers::store::FredStore::connect_with(url, options)
            .await
            .map(Store::Fred),
        other => panic!("client {other} not compiled in"),
    }
}

enum Store {
    #[cfg(feature = "redis")]
    Redis(tower_redis_layers::store::RedisStore),
    #[cfg(feature = "fred")]
    Fred(tower_redis_layers::store::FredStore),
}

/// A rate-limit check, a cache miss then hit, and a lock taken, refused to another, released.
async fn round_trip<S>(store: S)
where
    S: RateLimitStore + CacheStore + LockStore + Clone,
{
    // Rate limit: 2 per minute, the third denied.
    let key = StoreKey::from_parts([b"tls-limit".as_slice()]);
    let rules = [Rule::fixed_window(2, Duration::from_secs(60))];
    let mut admitted = 0;
    for _ in 0..3 {
        let decision = store
            .check(RateCheck::new(&key, &rules, 1, false))
            .await
            .expect("the check answers over TLS");
        admitted += usize::from(decision.allowed);
    }
    assert_eq!(admitted, 2);

    // Cache: the first request runs the handler and is stored, the second is a hit.
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let svc =
        ServiceBuilder::new()
            .layer(CacheLayer::new(store.clone()).scope("tls"))
            .service(service_fn(move |_req: Request<Full<Bytes>>| {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("run {n}")))))
                }
            }));
    let get = || {
        Request::get("/tls")
            .header("host", "example.com")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let first = svc.clone().oneshot(get()).await.unwrap();
    let status = first.headers()["cache-status"].to_str().unwrap().to_owned();
    assert!(status.contains("stored"), "{status}");
    let second = svc.clone().oneshot(get()).await.unwrap();
    let status = second.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(status.ends_with("; hit"), "{status}");
    let body = second.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "run 1");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Lock: taken, refused to another, released, taken again with a larger fence.
    let lock = Lock::new(store.clone());
    let guard = lock
        .try_acquire("tls-resource")
        .await
        .expect("the lock store answers")
        .expect("the lock is free");
    assert!(lock.try_acquire("tls-resource").await.unwrap().is_none());
    let fence = guard.fence();
    assert!(guard.release().await.unwrap());
    let again = lock.try_acquire("tls-resource").await.unwrap().unwrap();
    assert!(again.fence() > fence);
    again.release().await.unwrap();
}

async fn round_trip_any(store: Store) {
    match store {
        #[cfg(feature = "redis")]
        Store::Redis(s) => round_trip(s).await,
        #[cfg(feature = "fred")]
        Store::Fred(s) => round_trip(s).await,
    }
}

/// What connecting with the wrong trust answers: `StoreError::Tls`, quickly.
async fn refused_without_the_ca(client: &str, url: &str) {
    // A CA that did not sign the server's certificate.
    let wrong = ConnectOptions::new().ca_certificate(TlsCerts::unrelated_ca_pem());
    let err = connect(client, url, wrong)
        .await
        .err()
        .expect("a wrong CA fails at connect");
    assert!(matches!(err, StoreError::Tls(_)), "{client}: {err:?}");
    println!("{client}, wrong CA: {err}");
    // The system's roots do not hold the test CA either.
    let err = connect(client, url, ConnectOptions::new())
        .await
        .err()
        .expect("an unknown issuer fails at connect");
    assert!(matches!(err, StoreError::Tls(_)), "{client}: {err:?}");
}

async fn standalone(client: &str) {
    let certs = TlsCerts::generate();
    let server = RedisTlsServer::start(&certs);
    let options = ConnectOptions::new().ca_certificate(certs.ca_pem.clone());
    let store = connect(client, &server.url(), options)
        .await
        .expect("connects with the CA over TLS");
    round_trip_any(store).await;
    refused_without_the_ca(client, &server.url()).await;

    // The options that cannot go together are refused before connecting.
    let pem_for_plain = ConnectOptions::new().ca_certificate(certs.ca_pem.clone());
    let url = format!("redis://127.0.0.1:{}", server.port);
    let err = connect(client, &url, pem_for_plain).await.err().unwrap();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let not_pem = ConnectOptions::new().ca_certificate(b"not a certificate".to_vec());
    let err = connect(client, &server.url(), not_pem).await.err().unwrap();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}

async fn cluster(client: &str) {
    let certs = TlsCerts::generate();
    let cluster = RedisTlsCluster::start(&certs);
    let options = ConnectOptions::new().ca_certificate(certs.ca_pem.clone());
    let store = connect(client, &cluster.url(), options)
        .await
        .expect("connects to the TLS cluster");
    round_trip_any(store).await;
    refused_without_the_ca(client, &cluster.url()).await;
}

#[cfg(feature = "redis")]
mod redis_rs {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn standalone() {
        super::standalone("redis").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster() {
        super::cluster("redis").await;
    }
}

#[cfg(feature = "fred")]
mod fred_client {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn standalone() {
        super::standalone("fred").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster() {
        super::cluster("fred").await;
    }
}
