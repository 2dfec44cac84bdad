//! The idempotency store suite: [`idempotency_suite`].

use std::time::Duration;

use super::{random_key, token};
use crate::store::{ClaimRequest, IdempotencyStore};

/// Runs every check of the idempotency suite against `store`.
pub async fn idempotency_suite<S: IdempotencyStore>(store: &S) {
    tokio::join!(
        claim_complete_and_replay(store),
        foreign_token_changes_nothing(store),
        killed_holder_expires_and_its_late_completion_stores_nothing(store),
        extended_claim_stays_exclusive(store),
        a_claim_resent_by_its_token_is_claimed_again(store),
    );
}

fn claim_request<'a>(token: &'a str, fingerprint: &'a [u8], lease: Duration) -> ClaimRequest<'a> {
    ClaimRequest {
        token,
        fingerprint,
        lease,
        retention: Duration::from_secs(60),
    }
}

/// Claims `key` for `token` (fingerprint `fp`), which must succeed: the fencing token.
async fn claimed<S: IdempotencyStore>(
    store: &S,
    key: &crate::StoreKey,
    token: &str,
    lease: Duration,
    why: &str,
) -> u64 {
    match store.claim(key, claim_request(token, b"fp", lease)).await {
        Ok(crate::store::Claim::Claimed { fence }) => fence,
        other => panic!("{why}: {other:?}"),
    }
}

/// absent -> in flight -> completed, with mismatches detected at every stage.
async fn claim_complete_and_replay<S: IdempotencyStore>(store: &S) {
    use crate::store::Claim;
    let key = random_key();
    let lease = Duration::from_secs(10);
    let (a, b) = (token(), token());
    let claimed = store
        .claim(&key, claim_request(&a, b"fp-1", lease))
        .await
        .unwrap();
    assert!(matches!(claimed, Claim::Claimed { .. }), "{claimed:?}");
    let dup = store
        .claim(&key, claim_request(&b, b"fp-1", lease))
        .await
        .unwrap();
    assert!(matches!(dup, Claim::InFlight { .. }), "{dup:?}");
    let other = store
        .claim(&key, claim_request(&b, b"fp-2", lease))
        .await
        .unwrap();
    assert_eq!(other, Claim::Mismatch);
    let retention = Duration::from_secs(60);
    assert!(!store
        .complete(&key, &b, b"theirs".to_vec(), retention)
        .await
        .unwrap());
    assert!(store
        .complete(&key, &a, b"response \x00\xff".to_vec(), retention)
        .await
        .unwrap());
    let replay = store
        .claim(&key, claim_request(&b, b"fp-1", lease))
        .await
        .unwrap();
    assert_eq!(replay, Claim::Completed(b"response \x00\xff".to_vec()));
    let other = store
        .claim(&key, claim_request(&b, b"fp-2", lease))
        .await
        .unwrap();
    assert_eq!(other, Claim::Mismatch);
    assert!(
        !store.release_claim(&key, &a).await.unwrap(),
        "a completed record is not released"
    );
}

/// Release and extend with a foreign token do nothing; a released key can be claimed again
/// with a larger fence.
async fn foreign_token_changes_nothing<S: IdempotencyStore>(store: &S) {
    use crate::store::Claim;
    let key = random_key();
    let lease = Duration::from_secs(10);
    let (a, b) = (token(), token());
    let Claim::Claimed { fence: first } = store
        .claim(&key, claim_request(&a, b"fp", lease))
        .await
        .unwrap()
    else {
        panic!("not claimed");
    };
    assert!(!store.release_claim(&key, &b).await.unwrap());
    assert!(!store.extend_claim(&key, &b, lease).await.unwrap());
    let dup = store
        .claim(&key, claim_request(&b, b"fp", lease))
        .await
        .unwrap();
    assert!(
        matches!(dup, Claim::InFlight { .. }),
        "a foreign release freed the key: {dup:?}"
    );
    assert!(store.release_claim(&key, &a).await.unwrap());
    match store
        .claim(&key, claim_request(&b, b"fp", lease))
        .await
        .unwrap()
    {
        Claim::Claimed { fence } => assert!(fence > first, "fence {fence} after {first}"),
        other => panic!("a released key must be claimable: {other:?}"),
    }
}

/// A holder that stops renewing loses the key when its lease ends; its late completion stores
/// nothing and the new holder's result wins.
async fn killed_holder_expires_and_its_late_completion_stores_nothing<S: IdempotencyStore>(
    store: &S,
) {
    use crate::store::Claim;
    let key = random_key();
    let (a, b) = (token(), token());
    let retention = Duration::from_secs(60);
    let first = claimed(store, &key, &a, Duration::from_millis(200), "not claimed").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let expired = "an expired claim must be claimable again";
    let second = claimed(store, &key, &b, Duration::from_secs(10), expired).await;
    assert!(second > first);
    assert!(
        !store
            .complete(&key, &a, b"late".to_vec(), retention)
            .await
            .unwrap(),
        "a lost claim stored its response"
    );
    assert!(store
        .complete(&key, &b, b"winner".to_vec(), retention)
        .await
        .unwrap());
    let replay = store
        .claim(&key, claim_request(&token(), b"fp", Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(replay, Claim::Completed(b"winner".to_vec()));
}

/// Extending the lease keeps the claim past its first lease.
async fn extended_claim_stays_exclusive<S: IdempotencyStore>(store: &S) {
    use crate::store::Claim;
    let key = random_key();
    let lease = Duration::from_millis(300);
    let a = token();
    assert!(matches!(
        store
            .claim(&key, claim_request(&a, b"fp", lease))
            .await
            .unwrap(),
        Claim::Claimed { .. }
    ));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(
            store.extend_claim(&key, &a, lease).await.unwrap(),
            "renewal failed"
        );
    }
    let dup = store
        .claim(&key, claim_request(&token(), b"fp", lease))
        .await
        .unwrap();
    assert!(matches!(dup, Claim::InFlight { .. }), "{dup:?}");
}

/// A claim re-sent by its own token (a client re-sending after a cut reply) answers "claimed"
/// again with the same fence and changes nothing: the holder may complete, others still see
/// it in flight, and no new fence is drawn.
async fn a_claim_resent_by_its_token_is_claimed_again<S: IdempotencyStore>(store: &S) {
    use crate::store::Claim;
    let key = random_key();
    let lease = Duration::from_secs(10);
    let (a, b) = (token(), token());
    let first = claimed(store, &key, &a, lease, "not claimed").await;
    let again = claimed(store, &key, &a, lease, "a re-sent claim was refused").await;
    assert_eq!(again, first, "a re-sent claim drew another fence");
    let dup = store
        .claim(&key, claim_request(&b, b"fp", lease))
        .await
        .unwrap();
    assert!(matches!(dup, Claim::InFlight { .. }), "{dup:?}");
    let other_body = store
        .claim(&key, claim_request(&a, b"other", lease))
        .await
        .unwrap();
    assert_eq!(
        other_body,
        Claim::Mismatch,
        "the same token with another body"
    );
    let retention = Duration::from_secs(60);
    assert!(store
        .complete(&key, &a, b"done".to_vec(), retention)
        .await
        .unwrap());
    assert!(
        store
            .complete(&key, &a, b"again".to_vec(), retention)
            .await
            .unwrap(),
        "a completion re-sent by its token must answer true"
    );
    assert!(!store
        .complete(&key, &b, b"theirs".to_vec(), retention)
        .await
        .unwrap());
    // Once completed, the holder's own claim is a replay like any other (the first response).
    let replay = store
        .claim(&key, claim_request(&a, b"fp", lease))
        .await
        .unwrap();
    assert_eq!(replay, Claim::Completed(b"done".to_vec()));
    // Released, then claimed anew: the fence grows past the re-sent one.
    let key = random_key();
    let first = claimed(store, &key, &a, lease, "not claimed").await;
    assert!(store.release_claim(&key, &a).await.unwrap());
    let next = claimed(store, &key, &a, lease, "a released key must be claimable").await;
    assert!(next > first, "fence {next} after {first}");
}
