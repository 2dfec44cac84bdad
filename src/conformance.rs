//! Conformance suites for [`RateLimitStore`] and [`CacheStore`] implementations (feature
//! `test-support`): [`rate_limit_suite`] and [`cache_suite`].
//!
//! The crate runs it against the memory, `redis` and `fred` stores (standalone and cluster).
//! Run it against a store of your own from a test:
//!
//! ```no_run
//! # async fn run() {
//! use tower_redis_layers::{store::MemoryStore, conformance};
//! conformance::rate_limit_suite(&MemoryStore::new()).await;
//! conformance::cache_suite(&MemoryStore::new()).await;
//! # }
//! ```
//!
//! Every check uses fresh random keys, so the suite may run against a store that holds other
//! data, and the checks run concurrently. Time is real: the suite takes a few seconds. A failed
//! check panics with a message naming it.

use std::time::Duration;

use futures_util::future::join_all;

use crate::{
    rate_limit::Rule,
    store::{Decision, RateCheck, RateLimitStore},
    StoreKey,
};

/// A fresh random key.
pub fn random_key() -> StoreKey {
    let bytes: [u8; 16] = rand::random();
    StoreKey::from_parts([bytes.as_slice()])
}

/// One check through `store`, with the per-rule state asked for, panicking on a store error.
pub async fn check<S: RateLimitStore>(
    store: &S,
    key: &StoreKey,
    rules: &[Rule],
    cost: u64,
) -> Decision {
    check_with(store, key, rules, cost, true).await
}

/// [`check`], saying whether the per-rule state is wanted.
pub async fn check_with<S: RateLimitStore>(
    store: &S,
    key: &StoreKey,
    rules: &[Rule],
    cost: u64,
    want_state: bool,
) -> Decision {
    let decision = store
        .check(RateCheck {
            key,
            rules,
            cost,
            want_state,
        })
        .await;
    match decision {
        Ok(d) => {
            assert_eq!(d.rules.len(), rules.len(), "one state per rule");
            d
        }
        Err(e) => panic!("store error: {e}"),
    }
}

const MARGIN: Duration = Duration::from_millis(60);

/// Runs every check of the suite against `store`.
pub async fn rate_limit_suite<S: RateLimitStore>(store: &S) {
    // Windows long enough that nothing refills while a check counts, even on a loaded machine.
    let window = Duration::from_millis(1500);
    tokio::join!(
        admits_exactly_the_limit(store, Rule::fixed_window(5, window)),
        admits_exactly_the_limit(store, Rule::sliding_log(5, window)),
        admits_exactly_the_limit(store, Rule::sliding_window(5, window)),
        admits_exactly_the_limit(store, Rule::token_bucket(5, 1, window)),
        admits_exactly_the_limit(store, Rule::gcra(5, 5 * window, 5)),
        sliding_log_does_not_record_rejections(store),
        sliding_log_counts_every_unit_of_one_call(store),
        sliding_window_weighs_the_previous_window(store),
        token_bucket_refills_steadily(store),
        rules_are_all_or_nothing(store),
        denial_names_the_longest_wait(store),
        cost_is_weighted(store),
        cost_above_the_limit_is_always_denied(store),
        zero_cost_reads_without_consuming(store),
        decides_the_same_without_state(store),
        keys_are_isolated(store),
        concurrent_checks_admit_exactly_the_limit(store),
    );
}

/// `limit` requests pass with decreasing `remaining`, the next is denied with a wait no longer
/// than the window, and after that wait a request passes again.
pub async fn admits_exactly_the_limit<S: RateLimitStore>(store: &S, rule: Rule) {
    let key = random_key();
    let rules = [rule.clone()];
    let limit = rule.quota();
    for i in 0..limit {
        let d = check(store, &key, &rules, 1).await;
        assert!(
            d.allowed,
            "{rule:?}: request {} of {limit} denied: {d:?}",
            i + 1
        );
        assert_eq!(
            d.rules[0].remaining,
            limit - i - 1,
            "{rule:?}: remaining after {} requests",
            i + 1
        );
        assert!(d.denied_by.is_none() && d.retry_after.is_zero());
    }
    let d = check(store, &key, &rules, 1).await;
    assert!(!d.allowed, "{rule:?}: request over the limit admitted");
    assert_eq!(d.denied_by, Some(0), "{rule:?}");
    assert_eq!(d.rules[0].remaining, 0, "{rule:?}");
    // The approximate window may have to wait into the next window.
    let bound = match rule.strategy() {
        crate::rate_limit::Strategy::SlidingWindow { window, .. } => 2 * *window,
        _ => rule.window(),
    };
    assert!(
        !d.retry_after.is_zero() && d.retry_after <= bound + MARGIN,
        "{rule:?}: retry after {:?}",
        d.retry_after
    );
    tokio::time::sleep(d.retry_after + MARGIN).await;
    let d = check(store, &key, &rules, 1).await;
    assert!(d.allowed, "{rule:?}: still denied after Retry-After: {d:?}");
}

/// A client that keeps retrying while denied gets through once the window has slid.
pub async fn sliding_log_does_not_record_rejections<S: RateLimitStore>(store: &S) {
    let key = random_key();
    let rules = [Rule::sliding_log(3, Duration::from_millis(500))];
    for _ in 0..3 {
        assert!(check(store, &key, &rules, 1).await.allowed);
    }
    let mut wait = Duration::ZERO;
    for _ in 0..20 {
        let d = check(store, &key, &rules, 1).await;
        assert!(!d.allowed);
        wait = d.retry_after;
    }
    tokio::time::sleep(wait + MARGIN).await;
    let d = check(store, &key, &rules, 1).await;
    assert!(d.allowed, "rejected requests were counted: {d:?}");
}

/// A cost of 3 in one call (all in the same microsecond) takes 3 units.
pub async fn sliding_log_counts_every_unit_of_one_call<S: RateLimitStore>(store: &S) {
    let key = random_key();
    let rules = [Rule::sliding_log(4, Duration::from_secs(5))];
    let d = check(store, &key, &rules, 3).await;
    assert!(d.allowed);
    assert_eq!(d.rules[0].remaining, 1);
    assert!(check(store, &key, &rules, 1).await.allowed);
    assert!(
        !check(store, &key, &rules, 1).await.allowed,
        "units of one call collapsed"
    );
}

/// The approximate window counts the previous window's units, weighted by the overlap.
pub async fn sliding_window_weighs_the_previous_window<S: RateLimitStore>(store: &S) {
    let key = random_key();
    let window = Duration::from_millis(1000);
    let rules = [Rule::sliding_window(4, window)];
    for _ in 0..4 {
        assert!(check(store, &key, &rules, 1).await.allowed);
    }
    let d = check(store, &key, &rules, 1).await;
    assert!(!d.allowed);
    assert!(
        d.retry_after <= 2 * window + MARGIN,
        "retry after {:?}",
        d.retry_after
    );
    tokio::time::sleep(d.retry_after + MARGIN).await;
    assert!(check(store, &key, &rules, 1).await.allowed);
    // Right after, the previous window still weighs: not all 4 units are free.
    let mut admitted = 1;
    while check(store, &key, &rules, 1).await.allowed {
        admitted += 1;
        assert!(admitted <= 4, "more than the limit admitted");
    }
}

/// A drained bucket gives one token per refill period.
pub async fn token_bucket_refills_steadily<S: RateLimitStore>(store: &S) {
    let key = random_key();
    let every = Duration::from_millis(800);
    let rules = [Rule::token_bucket(2, 1, every)];
    assert!(check(store, &key, &rules, 1).await.allowed);
    assert!(check(store, &key, &rules, 1).await.allowed);
    let d = check(store, &key, &rules, 1).await;
    assert!(!d.allowed);
    assert!(
        d.retry_after <= every + MARGIN,
        "retry after {:?}",
        d.retry_after
    );
    tokio::time::sleep(d.retry_after + MARGIN).await;
    assert!(check(store, &key, &rules, 1).await.allowed, "no refill");
    assert!(
        !check(store, &key, &rules, 1).await.allowed,
        "refilled more than one token"
    );
}

/// A request denied by one rule consumes nothing from the others.
pub async fn rules_are_all_or_nothing<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(30);
    for other in [
        Rule::fixed_window(10, long),
        Rule::sliding_log(10, long),
        Rule::sliding_window(10, long),
        Rule::token_bucket(10, 1, long),
        Rule::gcra(1, long, 10),
    ] {
        let key = random_key();
        let rules = [Rule::fixed_window(2, long), other.clone()];
        assert!(check(store, &key, &rules, 1).await.allowed);
        assert!(check(store, &key, &rules, 1).await.allowed);
        for _ in 0..5 {
            let d = check(store, &key, &rules, 1).await;
            assert!(!d.allowed);
            assert_eq!(d.denied_by, Some(0));
            assert_eq!(
                d.rules[1].remaining, 8,
                "{other:?}: a denial reports what the other rule has left"
            );
        }
        let d = check(store, &key, &rules[1..], 0).await;
        assert_eq!(
            d.rules[0].remaining, 8,
            "{other:?}: a denied request consumed from another rule"
        );
    }
}

/// With several denying rules, the answer names the one with the longest wait.
pub async fn denial_names_the_longest_wait<S: RateLimitStore>(store: &S) {
    let key = random_key();
    let rules = [
        Rule::fixed_window(1, Duration::from_secs(2)),
        Rule::fixed_window(1, Duration::from_secs(20)),
    ];
    assert!(check(store, &key, &rules, 1).await.allowed);
    let d = check(store, &key, &rules, 1).await;
    assert!(!d.allowed);
    assert_eq!(d.denied_by, Some(1));
    assert!(d.retry_after > Duration::from_secs(10), "{d:?}");
}

/// The cost of a request is taken from the budget.
pub async fn cost_is_weighted<S: RateLimitStore>(store: &S) {
    for rule in [
        Rule::fixed_window(10, Duration::from_secs(30)),
        Rule::sliding_log(10, Duration::from_secs(30)),
        Rule::sliding_window(10, Duration::from_secs(30)),
        Rule::token_bucket(10, 1, Duration::from_secs(30)),
        Rule::gcra(1, Duration::from_secs(30), 10),
    ] {
        let key = random_key();
        let rules = [rule.clone()];
        assert!(check(store, &key, &rules, 4).await.allowed);
        let d = check(store, &key, &rules, 4).await;
        assert!(d.allowed);
        assert_eq!(d.rules[0].remaining, 2, "{rule:?}");
        assert!(!check(store, &key, &rules, 4).await.allowed, "{rule:?}");
        assert!(
            check(store, &key, &rules, 2).await.allowed,
            "{rule:?}: a smaller cost should pass"
        );
    }
}

/// A cost above the limit can never pass; it is denied and consumes nothing.
pub async fn cost_above_the_limit_is_always_denied<S: RateLimitStore>(store: &S) {
    for rule in [
        Rule::fixed_window(5, Duration::from_secs(30)),
        Rule::sliding_log(5, Duration::from_secs(30)),
        Rule::sliding_window(5, Duration::from_secs(30)),
        Rule::token_bucket(5, 1, Duration::from_secs(30)),
        Rule::gcra(1, Duration::from_secs(30), 5),
    ] {
        let key = random_key();
        let rules = [rule.clone()];
        let d = check(store, &key, &rules, 6).await;
        assert!(!d.allowed, "{rule:?}");
        assert!(!d.retry_after.is_zero(), "{rule:?}");
        let d = check(store, &key, &rules, 1).await;
        assert!(d.allowed);
        assert_eq!(d.rules[0].remaining, 4, "{rule:?}");
    }
}

/// A cost of 0 reports the state and consumes nothing.
pub async fn zero_cost_reads_without_consuming<S: RateLimitStore>(store: &S) {
    let key = random_key();
    let rules = [Rule::fixed_window(3, Duration::from_secs(30))];
    assert!(check(store, &key, &rules, 1).await.allowed);
    for _ in 0..5 {
        let d = check(store, &key, &rules, 0).await;
        assert!(d.allowed);
        assert_eq!(d.rules[0].remaining, 2);
    }
}

/// Without the per-rule state asked for (`want_state: false`, what the layer asks when no
/// response carries `RateLimit` fields), a store still admits exactly the limit, for one rule and
/// for several, and a denial still names the rule and the wait.
pub async fn decides_the_same_without_state<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(30);
    let policies = [
        vec![Rule::fixed_window(2, long)],
        vec![Rule::sliding_log(2, long)],
        vec![Rule::sliding_window(2, long)],
        vec![Rule::token_bucket(2, 1, long)],
        vec![Rule::gcra(1, long, 2)],
        vec![Rule::fixed_window(5, long), Rule::gcra(1, long, 2)],
    ];
    for rules in policies {
        let key = random_key();
        for _ in 0..2 {
            let d = check_with(store, &key, &rules, 1, false).await;
            assert!(d.allowed, "within the limit: {rules:?}");
        }
        let denied = check_with(store, &key, &rules, 1, false).await;
        assert!(!denied.allowed, "the third request is denied: {rules:?}");
        assert_eq!(denied.denied_by, Some(rules.len() - 1), "{rules:?}");
        assert!(denied.retry_after > Duration::ZERO, "{rules:?}");
        let Some(d) = check(store, &key, &rules, 0).await.rules.last().copied() else {
            panic!("no state for {rules:?}");
        };
        assert_eq!(d.remaining, 0, "two admitted, nothing left: {rules:?}");
    }
}

/// Exhausting one key leaves another untouched.
pub async fn keys_are_isolated<S: RateLimitStore>(store: &S) {
    let (a, b) = (random_key(), random_key());
    let rules = [Rule::sliding_log(1, Duration::from_secs(30))];
    assert!(check(store, &a, &rules, 1).await.allowed);
    assert!(!check(store, &a, &rules, 1).await.allowed);
    assert!(check(store, &b, &rules, 1).await.allowed);
}

/// Many concurrent checks of one key admit exactly the limit, for every exact strategy.
pub async fn concurrent_checks_admit_exactly_the_limit<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(60);
    for rule in [
        Rule::fixed_window(20, long),
        Rule::sliding_log(20, long),
        Rule::token_bucket(20, 1, long),
        Rule::gcra(1, long, 20),
    ] {
        let key = random_key();
        let rules = [rule.clone()];
        let all = join_all((0..100).map(|_| check(store, &key, &rules, 1))).await;
        let admitted = all.iter().filter(|d| d.allowed).count();
        assert_eq!(admitted, 20, "{rule:?}: {admitted} of 100 admitted");
    }
}

/// Runs every check of the lock suite against `store`.
pub async fn lock_suite<S: crate::store::LockStore>(store: &S) {
    tokio::join!(
        lock_is_exclusive_and_fenced(store),
        lock_release_and_extend_need_the_token(store),
        expired_lock_is_free_and_safe_from_its_old_holder(store),
    );
}

fn token() -> String {
    crate::lock::new_token()
}

/// Only one holder at a time; each acquisition gets a larger fencing token.
pub async fn lock_is_exclusive_and_fenced<S: crate::store::LockStore>(store: &S) {
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
pub async fn lock_release_and_extend_need_the_token<S: crate::store::LockStore>(store: &S) {
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
pub async fn expired_lock_is_free_and_safe_from_its_old_holder<S: crate::store::LockStore>(
    store: &S,
) {
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

/// Runs every check of the idempotency suite against `store`.
pub async fn idempotency_suite<S: crate::store::IdempotencyStore>(store: &S) {
    tokio::join!(
        claim_complete_and_replay(store),
        foreign_token_changes_nothing(store),
        killed_holder_expires_and_its_late_completion_stores_nothing(store),
        extended_claim_stays_exclusive(store),
    );
}

fn claim_request<'a>(
    token: &'a str,
    fingerprint: &'a [u8],
    lease: Duration,
) -> crate::store::ClaimRequest<'a> {
    crate::store::ClaimRequest {
        token,
        fingerprint,
        lease,
        retention: Duration::from_secs(60),
    }
}

/// absent -> in flight -> completed, with mismatches detected at every stage.
pub async fn claim_complete_and_replay<S: crate::store::IdempotencyStore>(store: &S) {
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
pub async fn foreign_token_changes_nothing<S: crate::store::IdempotencyStore>(store: &S) {
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
pub async fn killed_holder_expires_and_its_late_completion_stores_nothing<
    S: crate::store::IdempotencyStore,
>(
    store: &S,
) {
    use crate::store::Claim;
    let key = random_key();
    let (a, b) = (token(), token());
    let retention = Duration::from_secs(60);
    let Claim::Claimed { fence: first } = store
        .claim(&key, claim_request(&a, b"fp", Duration::from_millis(200)))
        .await
        .unwrap()
    else {
        panic!("not claimed");
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Claim::Claimed { fence: second } = store
        .claim(&key, claim_request(&b, b"fp", Duration::from_secs(10)))
        .await
        .unwrap()
    else {
        panic!("an expired claim must be claimable again");
    };
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
pub async fn extended_claim_stays_exclusive<S: crate::store::IdempotencyStore>(store: &S) {
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

// ---------------------------------------------------------------------------------------------
// The response-cache store.
// ---------------------------------------------------------------------------------------------

use crate::store::{
    CacheStore, FillRequest, FillState, FillToken, Freshness, Lookup, LookupRequest, StoreOutcome,
    StoreRequest,
};

/// One lookup through `store`, panicking on a store error.
pub async fn lookup<S: CacheStore>(
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
pub fn store_request(
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
    );
}

/// A miss, a store, a fresh hit with its age, and a miss after expiry.
pub async fn cache_miss_store_hit_expire<S: CacheStore>(store: &S) {
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
pub async fn cache_stale_windows<S: CacheStore>(store: &S) {
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
pub async fn cache_segment_invalidation<S: CacheStore>(store: &S) {
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
pub async fn cache_key_invalidation_and_isolation<S: CacheStore>(store: &S) {
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
pub async fn cache_fill_lock<S: CacheStore>(store: &S) {
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
pub async fn cache_early_recompute<S: CacheStore>(store: &S) {
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
