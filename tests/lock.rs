//! `lock::Lock` on its own, against the memory store, redis-rs and fred (standalone, and the
//! cheap scenarios on a 3-master cluster): acquiring with backoff, extending, `lost()` firing
//! when the lease really expired (and not on a transient error), release on drop, fencing
//! tokens, foreign tokens, and store timeouts under a stalled server. The scenarios that stall
//! the server (SIGSTOP) do nothing on the memory store: the unit tests of `src/lock/lock.rs` run
//! them on a memory store that stops answering.

mod common;

use std::time::Duration;

use common::stores::{store_module, AnyStore, Env};
use tokio::time::{sleep, Instant};
use tower_redis_layers::{
    lock::{Lock, LockGuard},
    store::LockStore,
    StoreError, StoreKey,
};

fn resource() -> String {
    use std::hash::{BuildHasher, Hasher};
    let n = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("resource-{n:x}")
}

/// Polls `lock.try_acquire(resource)` until it takes the lock, for up to `within`.
async fn taken_within(lock: &Lock<AnyStore>, resource: &str, within: Duration) -> LockGuard {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(guard)) = lock.try_acquire(resource).await {
            return guard;
        }
        assert!(
            Instant::now() < deadline,
            "{resource} still held after {within:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// `acquire` waits for a held lock (backing off) and takes it once released; against a lock
/// that stays held it gives up after its bound.
async fn acquire_waits_with_backoff_and_gives_up_after_its_bound(env: Env) {
    let (a, b) = (Lock::new(env.store().await), Lock::new(env.store().await));
    let r = resource();
    let held = a.try_acquire(&r).await.unwrap().expect("a free lock");
    let start = Instant::now();
    assert!(b
        .acquire(&r, Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "gave up early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(2),
        "overstayed its bound: {waited:?}"
    );
    let fence = held.fence();
    tokio::spawn(async move {
        sleep(Duration::from_millis(300)).await;
        held.release().await.unwrap();
    });
    let start = Instant::now();
    let guard = b.acquire(&r, Duration::from_secs(5)).await.unwrap();
    let guard = guard.expect("taken once released");
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert!(guard.fence() > fence);
}

/// `extend_lock` lengthens the holder's lease (and not another token's); the guard renews its
/// lease in the background while it lives, past several leases.
async fn extend_and_renewal_keep_the_lock(env: Env) {
    let store = env.store().await;
    let key = StoreKey::from_parts([resource().as_bytes()]);
    let short = Duration::from_millis(800);
    assert!(store
        .acquire_lock(&key, "a", short)
        .await
        .unwrap()
        .is_some());
    assert!(store
        .extend_lock(&key, "a", Duration::from_secs(5))
        .await
        .unwrap());
    assert!(!store.extend_lock(&key, "b", short).await.unwrap());
    sleep(short + Duration::from_millis(400)).await;
    assert_eq!(
        store.acquire_lock(&key, "b", short).await.unwrap(),
        None,
        "not extended"
    );
    assert!(store.release_lock(&key, "a").await.unwrap());

    let lease = Duration::from_millis(600);
    let lock = Lock::new(env.store().await).lease(lease);
    let other = Lock::new(env.store().await).lease(lease);
    let r = resource();
    let guard = lock.try_acquire(&r).await.unwrap().expect("a free lock");
    sleep(lease * 3).await;
    assert!(!guard.is_lost());
    assert!(
        other.try_acquire(&r).await.unwrap().is_none(),
        "not renewed"
    );
    assert!(guard.release().await.unwrap());
}

/// Dropping the guard releases the lock (in the background), long before its lease ends.
async fn dropping_the_guard_releases_the_lock(env: Env) {
    let lock = Lock::new(env.store().await).lease(Duration::from_secs(30));
    let other = Lock::new(env.store().await);
    let r = resource();
    let guard = lock.try_acquire(&r).await.unwrap().expect("a free lock");
    assert!(other.try_acquire(&r).await.unwrap().is_none());
    drop(guard);
    taken_within(&other, &r, Duration::from_secs(2)).await;
}

/// Every acquisition, by either of two clients, gets a larger fencing token than the one before.
async fn fencing_tokens_strictly_increase(env: Env) {
    let locks = [Lock::new(env.store().await), Lock::new(env.store().await)];
    let r = resource();
    let mut last = 0;
    for i in 0..6 {
        let guard = taken_within(&locks[i % 2], &r, Duration::from_secs(2)).await;
        assert!(guard.fence() > last, "{} after {last}", guard.fence());
        last = guard.fence();
        if i % 2 == 0 {
            drop(guard);
        } else {
            assert!(guard.release().await.unwrap());
        }
    }
}

/// A token that does not hold the lock changes nothing: its release and its extension answer
/// `false`, and the holder keeps the lock with its lease.
async fn a_foreign_token_changes_nothing(env: Env) {
    let (store, other) = (env.store().await, env.store().await);
    let key = StoreKey::from_parts([resource().as_bytes()]);
    let lease = Duration::from_millis(800);
    let fence = store.acquire_lock(&key, "holder", lease).await.unwrap();
    assert!(fence.is_some());
    assert!(!other.release_lock(&key, "foreign").await.unwrap());
    assert!(!other
        .extend_lock(&key, "foreign", Duration::from_secs(60))
        .await
        .unwrap());
    assert_eq!(
        other.acquire_lock(&key, "foreign", lease).await.unwrap(),
        None
    );
    // Still the holder's, and its lease was not lengthened: free once it ends.
    sleep(lease + Duration::from_millis(200)).await;
    let next = other.acquire_lock(&key, "foreign", lease).await.unwrap();
    assert!(next > fence, "{fence:?} then {next:?}");
    assert!(!store.release_lock(&key, "holder").await.unwrap());
}

/// `f`'s output and how long it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

fn pause(env: &Env) {
    env.servers().iter().for_each(|s| s.pause());
}

fn resume(env: &Env) {
    env.servers().iter().for_each(|s| s.resume());
}

/// `lost()` fires when the lease really ended: the server stalled (SIGSTOP) for longer than the
/// lease, and the first renewal it answers finds the token gone. A stall shorter than the lease,
/// across a renewal, is not a loss: the renewal is retried and the lock stays held.
async fn lost_fires_when_the_lease_really_expired_not_on_a_stall(env: Env) {
    if env.servers().is_empty() {
        return;
    }
    let lease = Duration::from_secs(1);
    let lock = Lock::new(env.store().await)
        .lease(lease)
        .store_timeout(Duration::from_millis(200));
    let other = Lock::new(env.store().await);
    let r = resource();
    let guard = lock.try_acquire(&r).await.unwrap().expect("a free lock");
    // A 450 ms stall across the renewal due at 667 ms.
    sleep(Duration::from_millis(400)).await;
    pause(&env);
    sleep(Duration::from_millis(450)).await;
    resume(&env);
    sleep(lease).await;
    assert!(!guard.is_lost(), "a stall shorter than the lease lost it");
    assert!(other.try_acquire(&r).await.unwrap().is_none());
    // A stall longer than the lease (shorter than the cluster's node timeout, 2 s): the lease
    // ends on the server.
    pause(&env);
    sleep(lease + Duration::from_millis(600)).await;
    resume(&env);
    let resumed = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("lost() did not fire once the server answered");
    println!(
        "lost() fired {:?} after the server answered",
        resumed.elapsed()
    );
    let next = taken_within(&other, &r, Duration::from_secs(1)).await;
    assert!(next.fence() > guard.fence());
}

/// With the server stalled (SIGSTOP), every call fails within the store timeout (1 s by
/// default, as in the layers) instead of hanging: `try_acquire`, `acquire` (which does not
/// wait out its 10 s), and `release`. The acquisitions that reached the stalled server are
/// released once it answers again, and the release that timed out lands then too.
async fn a_stalled_server_fails_calls_within_the_store_timeout(env: Env) {
    if env.servers().is_empty() {
        return;
    }
    let lock = Lock::new(env.store().await);
    let other = Lock::new(env.store().await);
    let (r, held) = (resource(), resource());
    let guard = lock.try_acquire(&held).await.unwrap().expect("a free lock");
    pause(&env);
    // The three at once, so that the stall stays shorter than the cluster's node timeout (2 s).
    let bound = Duration::from_millis(1800);
    let ((tried, t1), (waited, t2), (released, t3)) = tokio::join!(
        timed(Box::pin(async {
            lock.try_acquire(&r).await.map(|g| g.is_some())
        })),
        timed(async {
            let wait = Duration::from_secs(10);
            lock.acquire(&r, wait).await.map(|g| g.is_some())
        }),
        timed(guard.release()),
    );
    println!("on a stalled server: try_acquire {tried:?} after {t1:?}, acquire {waited:?} after {t2:?}, release {released:?} after {t3:?}");
    assert!(
        matches!(tried, Err(StoreError::Timeout(d)) if d == Duration::from_secs(1)),
        "{tried:?}"
    );
    assert!(
        waited.is_err() && released.is_err(),
        "{waited:?} {released:?}"
    );
    assert!(t1.max(t2).max(t3) < bound, "{t1:?} {t2:?} {t3:?}");
    resume(&env);
    // Neither the lost acquisitions nor the timed-out release block the locks for a lease.
    taken_within(&other, &r, Duration::from_secs(3)).await;
    taken_within(&other, &held, Duration::from_secs(3)).await;
}

store_module!(
    memory,
    memory,
    any,
    acquire_waits_with_backoff_and_gives_up_after_its_bound,
    extend_and_renewal_keep_the_lock,
    dropping_the_guard_releases_the_lock,
    fencing_tokens_strictly_increase,
    a_foreign_token_changes_nothing
);
store_module!(
    redis,
    redis,
    "redis",
    acquire_waits_with_backoff_and_gives_up_after_its_bound,
    extend_and_renewal_keep_the_lock,
    dropping_the_guard_releases_the_lock,
    fencing_tokens_strictly_increase,
    a_foreign_token_changes_nothing,
    lost_fires_when_the_lease_really_expired_not_on_a_stall,
    a_stalled_server_fails_calls_within_the_store_timeout
);
store_module!(
    fred,
    fred,
    "fred",
    acquire_waits_with_backoff_and_gives_up_after_its_bound,
    extend_and_renewal_keep_the_lock,
    dropping_the_guard_releases_the_lock,
    fencing_tokens_strictly_increase,
    a_foreign_token_changes_nothing,
    lost_fires_when_the_lease_really_expired_not_on_a_stall,
    a_stalled_server_fails_calls_within_the_store_timeout
);
// On a cluster, the scenarios that touch every node: a stalled cluster and real expiry.
store_module!(
    redis_cluster,
    redis_cluster,
    "redis",
    fencing_tokens_strictly_increase,
    lost_fires_when_the_lease_really_expired_not_on_a_stall,
    a_stalled_server_fails_calls_within_the_store_timeout
);
store_module!(
    fred_cluster,
    fred_cluster,
    "fred",
    fencing_tokens_strictly_increase,
    lost_fires_when_the_lease_really_expired_not_on_a_stall,
    a_stalled_server_fails_calls_within_the_store_timeout
);

/// The reply to an acquisition is cut (it ran on the server): redis-rs fails the call, and the
/// acquisition is released in the background once the server answers; fred re-sends it, and
/// the re-sent acquisition takes the lock for the same token. Either way the lock is not left
/// blocked for a lease by an acquisition nobody holds.
#[cfg(any(feature = "redis", feature = "fred"))]
async fn acquire_reply_cut(
    proxied: AnyStore,
    direct: AnyStore,
    proxy: &common::fault_proxy::FaultProxy,
) {
    let lease = Duration::from_secs(10);
    let lock = Lock::new(proxied)
        .lease(lease)
        .store_timeout(Duration::from_millis(300));
    let other = Lock::new(direct).lease(lease);
    let r = resource();
    proxy.cut_next_reply();
    let first = lock.try_acquire(&r).await;
    assert!(proxy.resets() >= 1, "the reply was not cut");
    println!(
        "acquisition with its reply cut: {:?}",
        first.as_ref().map(Option::is_some)
    );
    match first {
        Ok(Some(guard)) => {
            assert!(other.try_acquire(&r).await.unwrap().is_none());
            assert!(guard.release().await.unwrap());
        }
        Ok(None) => panic!("its own acquisition, re-sent, blocked it"),
        Err(_) => {}
    }
    taken_within(&other, &r, Duration::from_secs(3)).await;
}

/// An acquisition whose caller goes away while it is on the way (the connection stalls, the
/// future is dropped, then the acquisition lands): it is released once the store answers, so
/// the lock is not blocked for a lease by an acquisition nobody holds.
#[cfg(any(feature = "redis", feature = "fred"))]
async fn acquire_dropped_on_the_way(
    proxied: AnyStore,
    direct: AnyStore,
    proxy: &common::fault_proxy::FaultProxy,
) {
    let lock = Lock::new(proxied).lease(Duration::from_secs(10));
    let other = Lock::new(direct);
    // The script is loaded first, so that the held-up acquisition is one `EVALSHA` that runs.
    let warm = lock.try_acquire(&resource()).await.unwrap().expect("free");
    assert!(warm.release().await.unwrap());
    let r = resource();
    proxy.stall(true);
    let attempt = {
        let (lock, r) = (lock.clone(), r.clone());
        tokio::spawn(async move { lock.try_acquire(&r).await.map(|g| g.is_some()) })
    };
    sleep(Duration::from_millis(200)).await;
    attempt.abort();
    assert!(attempt.await.is_err_and(|e| e.is_cancelled()));
    proxy.stall(false);
    sleep(Duration::from_millis(100)).await; // the acquisition lands
    taken_within(&other, &r, Duration::from_secs(3)).await;
}

/// One client's stores for the proxy cases: through the proxy, and direct.
macro_rules! proxy_cases {
    ($module:ident, $feature:literal, $variant:ident, $store:ident) => {
        #[cfg(feature = $feature)]
        mod $module {
            use super::*;
            use common::{fault_proxy::FaultProxy, RedisServer};
            use tower_redis_layers::store::$store;

            async fn stores() -> (RedisServer, FaultProxy, AnyStore, AnyStore) {
                let server = RedisServer::start();
                let proxy = FaultProxy::start(server.port).await;
                let proxied = AnyStore::$variant($store::connect(&proxy.url()).await.unwrap());
                let direct = AnyStore::$variant($store::connect(&server.url()).await.unwrap());
                (server, proxy, proxied, direct)
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn acquire_reply_cut() {
                let (_server, proxy, proxied, direct) = stores().await;
                super::acquire_reply_cut(proxied, direct, &proxy).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn acquire_dropped_on_the_way() {
                let (_server, proxy, proxied, direct) = stores().await;
                super::acquire_dropped_on_the_way(proxied, direct, &proxy).await;
            }
        }
    };
}

proxy_cases!(redis_rs_faults, "redis", Redis, RedisStore);
proxy_cases!(fred_faults, "fred", Fred, FredStore);
