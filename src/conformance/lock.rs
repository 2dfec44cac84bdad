//! The lock store suite: [`lock_suite`].

use std::time::Duration;

use super::{random_key, token};
use crate::store::LockStore;

/// Runs every check of the lock suite against `store`.
pub async fn lock_suite<S: LockStore>(store: &S) {
    tokio::join!(
        lock_is_exclusive_and_fenced(store),
        lock_release_and_extend_need_the_token(store),
        expired_lock_is_free_and_safe_from_its_old_holder(store),
        acquire_resent_by_its_holder_changes_nothing(store),
    );
}

/// Only one holder at a time; each acquisition gets a larger fencing token.
async fn lock_is_exclusive_and_fenced<S: LockStore>(store: &S) {
    let key = random_key();
    let lease = Duration::from_secs(10);
    let (a, b) = (token(), token());
    let first = store.acquire_lock(&key, &a, lease).await.unwrap();
    assert!(first.is_some(), "a free lock was not taken");
    assert_eq!(
        store.acquire_lock(&key, &b, lease).await.unwrap(),
        None,
        "lock taken twice"
    );
    assert!(store.release_lock(&key, &a).await.unwrap());
    let second = store.acquire_lock(&key, &b, lease).await.unwrap();
    assert!(
        second > first,
        "fencing tokens must grow: {first:?} then {second:?}"
    );
}

/// Release and extend with a foreign token do nothing.
async fn lock_release_and_extend_need_the_token<S: LockStore>(store: &S) {
    let key = random_key();
    let lease = Duration::from_secs(10);
    let (a, b) = (token(), token());
    assert!(store.acquire_lock(&key, &a, lease).await.unwrap().is_some());
    assert!(
        !store.release_lock(&key, &b).await.unwrap(),
        "a foreign token released the lock"
    );
    assert!(
        !store.extend_lock(&key, &b, lease).await.unwrap(),
        "a foreign token extended the lock"
    );
    assert!(store.extend_lock(&key, &a, lease).await.unwrap());
    assert_eq!(
        store.acquire_lock(&key, &b, lease).await.unwrap(),
        None,
        "still held"
    );
}

/// A lease that ran out frees the lock; the old holder cannot release the new holder's lock.
async fn expired_lock_is_free_and_safe_from_its_old_holder<S: LockStore>(store: &S) {
    let key = random_key();
    let (a, b) = (token(), token());
    let first = store
        .acquire_lock(&key, &a, Duration::from_millis(200))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = store
        .acquire_lock(&key, &b, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        second > first,
        "an expired lock must be free, with a larger fence"
    );
    assert!(
        !store.release_lock(&key, &a).await.unwrap(),
        "the old holder released the new lock"
    );
    assert!(!store
        .extend_lock(&key, &a, Duration::from_secs(10))
        .await
        .unwrap());
    assert_eq!(
        store
            .acquire_lock(&key, &token(), Duration::from_secs(1))
            .await
            .unwrap(),
        None
    );
}

/// An acquisition re-sent with the holder's own token (a client that re-sends a command after a
/// cut reply) answers the same fence again, and changes nothing.
async fn acquire_resent_by_its_holder_changes_nothing<S: LockStore>(store: &S) {
    let key = random_key();
    let lease = Duration::from_secs(10);
    let (a, b) = (token(), token());
    let fence = store.acquire_lock(&key, &a, lease).await.unwrap();
    assert!(fence.is_some(), "a free lock was not taken");
    assert_eq!(
        store.acquire_lock(&key, &a, lease).await.unwrap(),
        fence,
        "a re-sent acquisition must answer the same fence"
    );
    assert_eq!(store.acquire_lock(&key, &b, lease).await.unwrap(), None);
    assert!(store.release_lock(&key, &a).await.unwrap());
    let next = store.acquire_lock(&key, &b, lease).await.unwrap();
    assert!(
        next > fence,
        "fencing tokens must grow: {fence:?} then {next:?}"
    );
}
