//! The response-cache store suite: [`cache_suite`].

use std::time::Duration;

use futures_util::future::join_all;

use super::random_key;
use crate::store::{
    CacheStore, FillRequest, FillState, FillToken, Freshness, Lookup, LookupRequest,
    RefreshRequest, StoreOutcome, StoreRequest,
};
use crate::StoreKey;

/// One lookup through `store`, panicking on a store error.
async fn lookup<S: CacheStore>(
    store: &S,
    segment: StoreKey,
    key: StoreKey,
    fill: Option<FillToken>,
    early_beta: f64,
    random: f64,
) -> Lookup {
    let request = LookupRequest {
        segment,
        key,
        fill: fill.map(|token| FillRequest {
            ttl: Duration::from_secs(5),
            token,
        }),
        early_beta,
        random,
    };
    match store.lookup(request).await {
        Ok(l) => l,
        Err(e) => panic!("store error: {e}"),
    }
}

/// A store request with a 10 s TTL and no stale windows.
fn store_request(
    segment: StoreKey,
    key: StoreKey,
    version: u64,
    body: &'static str,
) -> StoreRequest {
    StoreRequest {
        segment,
        key,
        version,
        fill: None,
        entry: bytes::Bytes::from_static(body.as_bytes()),
        ttl: Duration::from_secs(10),
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        compute_time: Duration::from_millis(5),
        keep: Duration::ZERO,
    }
}

async fn put<S: CacheStore>(store: &S, request: StoreRequest) -> StoreOutcome {
    match store.store(request).await {
        Ok(o) => o,
        Err(e) => panic!("store error: {e}"),
    }
}

/// Runs every check of the cache suite against `store`.
pub async fn cache_suite<S: CacheStore>(store: &S) {
    tokio::join!(
        cache_miss_store_hit_expire(store),
        cache_stale_windows(store),
        cache_segment_invalidation(store),
        cache_key_invalidation_and_isolation(store),
        cache_fill_lock(store),
        cache_early_recompute(store),
        cache_revalidation_and_refresh(store),
        cache_several_keys_in_one_call(store),
    );
}

/// A miss, a store, a fresh hit with its age, and a miss after expiry.
async fn cache_miss_store_hit_expire<S: CacheStore>(store: &S) {
    let (seg, key) = (random_key(), random_key());
    let l = lookup(store, seg, key, None, 0.0, 1.0).await;
    assert_eq!(l.freshness, Freshness::Miss);
    assert!(l.entry.is_none());
    assert_eq!(l.fill, FillState::NotTried);
    let mut req = store_request(seg, key, l.version, "one");
    req.ttl = Duration::from_millis(400);
    assert_eq!(put(store, req).await, StoreOutcome::Stored);
    let l = lookup(store, seg, key, None, 0.0, 1.0).await;
    assert_eq!(l.freshness, Freshness::Fresh);
    assert_eq!(l.entry.as_deref(), Some(&b"one"[..]));
    assert!(l.age < Duration::from_millis(400));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let l = lookup(store, seg, key, None, 0.0, 1.0).await;
    assert_eq!(l.freshness, Freshness::Miss, "entry outlived its TTL");
    assert!(l.entry.is_none());
}

/// Past its TTL an entry is stale inside the stale-while-revalidate window, then usable only on
/// error inside the stale-if-error window, then gone.
async fn cache_stale_windows<S: CacheStore>(store: &S) {
    let (seg, key) = (random_key(), random_key());
    let mut req = store_request(seg, key, 0, "old");
    req.ttl = Duration::from_millis(300);
    req.stale_while_revalidate = Duration::from_millis(600);
    req.stale_if_error = Duration::from_millis(1500);
    assert_eq!(put(store, req).await, StoreOutcome::Stored);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let l = lookup(store, seg, key, None, 0.0, 1.0).await;
    assert_eq!(l.freshness, Freshness::Stale);
    assert_eq!(l.entry.as_deref(), Some(&b"old"[..]));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let l = lookup(store, seg, key, None, 0.0, 1.0).await;
    assert_eq!(l.freshness, Freshness::StaleIfError);
    assert_eq!(l.entry.as_deref(), Some(&b"old"[..]));
    tokio::time::sleep(Duration::from_millis(900)).await;
    let l = lookup(store, seg, key, None, 0.0, 1.0).await;
    assert_eq!(l.freshness, Freshness::Miss);
}

/// A version bump hides every entry of the segment, and a store made with the old version is
/// dropped.
async fn cache_segment_invalidation<S: CacheStore>(store: &S) {
    let seg = random_key();
    let (a, b) = (random_key(), random_key());
    let other_seg = random_key();
    for key in [a, b] {
        assert_eq!(
            put(store, store_request(seg, key, 0, "x")).await,
            StoreOutcome::Stored
        );
    }
    assert_eq!(
        put(store, store_request(other_seg, a, 0, "y")).await,
        StoreOutcome::Stored
    );
    let version = store.invalidate_segment(seg).await.expect("invalidate");
    assert!(version >= 1);
    for key in [a, b] {
        let l = lookup(store, seg, key, None, 0.0, 1.0).await;
        assert_eq!(l.freshness, Freshness::Miss, "entry survived invalidation");
        assert_eq!(l.version, version);
    }
    let l = lookup(store, other_seg, a, None, 0.0, 1.0).await;
    assert_eq!(
        l.freshness,
        Freshness::Fresh,
        "another segment was invalidated"
    );
    assert_eq!(
        put(store, store_request(seg, a, 0, "late")).await,
        StoreOutcome::VersionChanged,
        "a store read before the invalidation was written"
    );
    assert_eq!(
        put(store, store_request(seg, a, version, "new")).await,
        StoreOutcome::Stored
    );
    let l = lookup(store, seg, a, None, 0.0, 1.0).await;
    assert_eq!(l.entry.as_deref(), Some(&b"new"[..]));
}

/// Deleting one key leaves its neighbours.
async fn cache_key_invalidation_and_isolation<S: CacheStore>(store: &S) {
    let seg = random_key();
    let (a, b) = (random_key(), random_key());
    put(store, store_request(seg, a, 0, "a")).await;
    put(store, store_request(seg, b, 0, "b")).await;
    assert!(store.invalidate_key(seg, a).await.expect("delete"));
    assert!(!store.invalidate_key(seg, a).await.expect("delete"));
    assert_eq!(
        lookup(store, seg, a, None, 0.0, 1.0).await.freshness,
        Freshness::Miss
    );
    let l = lookup(store, seg, b, None, 0.0, 1.0).await;
    assert_eq!(l.entry.as_deref(), Some(&b"b"[..]));
}

/// One caller gets the fill lock, the others see it held; a store with the token writes and
/// releases it; a store with another token is dropped; a released lock can be taken again.
async fn cache_fill_lock<S: CacheStore>(store: &S) {
    let (seg, key) = (random_key(), random_key());
    let (t1, t2) = (FillToken::random(), FillToken::random());
    let l1 = lookup(store, seg, key, Some(t1), 0.0, 1.0).await;
    assert_eq!(l1.fill, FillState::Acquired);
    let l2 = lookup(store, seg, key, Some(t2), 0.0, 1.0).await;
    assert_eq!(l2.fill, FillState::Held);
    let mut wrong = store_request(seg, key, 0, "x");
    wrong.fill = Some((key, t2));
    assert_eq!(put(store, wrong).await, StoreOutcome::LockLost);
    let mut right = store_request(seg, key, l1.version, "filled");
    right.fill = Some((key, t1));
    assert_eq!(put(store, right).await, StoreOutcome::Stored);
    let l = lookup(store, seg, key, Some(t2), 0.0, 1.0).await;
    assert_eq!(l.freshness, Freshness::Fresh);
    assert_eq!(l.fill, FillState::NotTried, "a fresh hit takes no lock");
    // Release: only with the holder's token.
    let other = random_key();
    assert_eq!(
        lookup(store, seg, other, Some(t1), 0.0, 1.0).await.fill,
        FillState::Acquired
    );
    assert!(!store.release_fill(seg, other, t2).await.expect("release"));
    assert!(store.release_fill(seg, other, t1).await.expect("release"));
    assert_eq!(
        lookup(store, seg, other, Some(t2), 0.0, 1.0).await.fill,
        FillState::Acquired
    );
    // Concurrent lookups: exactly one gets the lock.
    let contested = random_key();
    let all = join_all(
        (0..20).map(|_| lookup(store, seg, contested, Some(FillToken::random()), 0.0, 1.0)),
    )
    .await;
    let acquired = all.iter().filter(|l| l.fill == FillState::Acquired).count();
    assert_eq!(acquired, 1, "{acquired} callers got the fill lock");
}

/// XFetch: with a tiny random draw and a big beta, a fresh entry is due early; with the draw 1
/// or beta 0 it is not.
async fn cache_early_recompute<S: CacheStore>(store: &S) {
    let (seg, key) = (random_key(), random_key());
    let mut req = store_request(seg, key, 0, "x");
    req.ttl = Duration::from_secs(2);
    req.compute_time = Duration::from_millis(100);
    put(store, req).await;
    let fresh = lookup(store, seg, key, None, 1.0, 1.0).await;
    assert_eq!(fresh.freshness, Freshness::Fresh);
    let off = lookup(store, seg, key, None, 0.0, 1e-300).await;
    assert_eq!(off.freshness, Freshness::Fresh);
    // 100 ms * 1 * -ln(1e-12) = 2.8 s > the 2 s left.
    let early = lookup(store, seg, key, Some(FillToken::random()), 1.0, 1e-12).await;
    assert_eq!(early.freshness, Freshness::Early);
    assert_eq!(early.entry.as_deref(), Some(&b"x"[..]));
    assert_eq!(early.fill, FillState::Acquired);
    let second = lookup(store, seg, key, Some(FillToken::random()), 1.0, 1e-12).await;
    assert_eq!(second.fill, FillState::Held, "two early recomputes at once");
}

/// An entry kept for revalidation reads `Expired` past its windows (and takes the fill lock);
/// a refresh with the lock replaces its head and freshness in place and keeps the rest of its
/// bytes; a refresh of an entry that was replaced, or without the lock, is dropped.
async fn cache_revalidation_and_refresh<S: CacheStore>(store: &S) {
    let (seg, key) = (random_key(), random_key());
    let mut req = store_request(seg, key, 0, "head1:body");
    req.ttl = Duration::ZERO;
    req.keep = Duration::from_secs(10);
    assert_eq!(put(store, req).await, StoreOutcome::Stored);
    let token = FillToken::random();
    let l = lookup(store, seg, key, Some(token), 0.0, 1.0).await;
    assert_eq!(
        l.freshness,
        Freshness::Expired,
        "a zero TTL entry is never fresh"
    );
    assert_eq!(l.entry.as_deref(), Some(&b"head1:body"[..]));
    assert_eq!(
        l.fill,
        FillState::Acquired,
        "a revalidation takes the fill lock"
    );
    let refresh = |old: &'static str, new: &'static str, fill| RefreshRequest {
        segment: seg,
        key,
        version: l.version,
        fill,
        old_head: bytes::Bytes::from_static(old.as_bytes()),
        new_head: bytes::Bytes::from_static(new.as_bytes()),
        ttl: Duration::from_secs(10),
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        keep: Duration::from_secs(10),
    };
    let other = FillToken::random();
    let outcome = store.refresh(refresh("head1:", "h2:", Some((key, other))));
    assert_eq!(outcome.await.expect("refresh"), StoreOutcome::LockLost);
    let outcome = store.refresh(refresh("head9:", "h2:", Some((key, token))));
    assert_eq!(outcome.await.expect("refresh"), StoreOutcome::Missing);
    // The lock was released by the dropped refresh (its token held): retake it.
    let l2 = lookup(store, seg, key, Some(token), 0.0, 1.0).await;
    assert_eq!(l2.fill, FillState::Acquired);
    let outcome = store.refresh(refresh("head1:", "h2:", Some((key, token))));
    assert_eq!(outcome.await.expect("refresh"), StoreOutcome::Stored);
    let l = lookup(store, seg, key, Some(FillToken::random()), 0.0, 1.0).await;
    assert_eq!(l.freshness, Freshness::Fresh);
    assert_eq!(l.entry.as_deref(), Some(&b"h2:body"[..]));
    assert_eq!(l.fill, FillState::NotTried);
    let gone = random_key();
    let mut missing = refresh("head1:", "h2:", None);
    missing.key = gone;
    assert_eq!(
        store.refresh(missing).await.expect("refresh"),
        StoreOutcome::Missing
    );
}

/// `invalidate_keys` deletes several entries of a segment at once and counts those that
/// existed.
async fn cache_several_keys_in_one_call<S: CacheStore>(store: &S) {
    let seg = random_key();
    let (a, b, c) = (random_key(), random_key(), random_key());
    put(store, store_request(seg, a, 0, "a")).await;
    put(store, store_request(seg, b, 0, "b")).await;
    put(store, store_request(seg, c, 0, "c")).await;
    let deleted = store.invalidate_keys(seg, vec![a, b, random_key()]).await;
    assert_eq!(deleted.expect("delete"), 2);
    for key in [a, b] {
        assert_eq!(
            lookup(store, seg, key, None, 0.0, 1.0).await.freshness,
            Freshness::Miss
        );
    }
    let l = lookup(store, seg, c, None, 0.0, 1.0).await;
    assert_eq!(l.entry.as_deref(), Some(&b"c"[..]));
    assert_eq!(
        store
            .invalidate_keys(seg, Vec::new())
            .await
            .expect("delete"),
        0
    );
}
