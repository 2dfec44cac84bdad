//! The lease suite: what a [`RateLeaseStore`] must do for `rate_limit::Leased`.

use std::time::Duration;

use super::random_key;
use crate::store::{LeaseGrant, RateCheck, RateLease, RateLeaseStore, Rule};

/// Runs every lease check against `store`: a store that leases (see
/// [`RateLeaseStore`]) grants the units needed or nothing, never more than the rule has left,
/// less near the limit (down to one unit), debits what it grants (a check sees it), and refuses
/// a rule that cannot be leased.
pub async fn rate_limit_lease_suite<S: RateLeaseStore>(store: &S) {
    let long = Duration::from_secs(60);
    tokio::join!(
        leases_never_exceed_the_limit(store, Rule::fixed_window(100, long)),
        leases_never_exceed_the_limit(store, Rule::token_bucket(100, 1, long)),
        leases_never_exceed_the_limit(store, Rule::gcra(1, long, 100)),
        leased_units_are_debited(store, Rule::fixed_window(100, long)),
        leased_units_are_debited(store, Rule::gcra(1, long, 100)),
        sliding_rules_are_not_leased(store),
    );
}

/// Leases until denied: every unit of the rule is granted once, the grants shrink to 1, and
/// each is at most `need + remaining after need / 2` (one replica).
async fn leases_never_exceed_the_limit<S: RateLeaseStore>(store: &S, rule: Rule) {
    let key = random_key();
    let replica = format!("{:016x}", rand::random::<u64>());
    let (mut left, mut grants) = (100u64, Vec::new());
    loop {
        let lease = RateLease::new(&key, &rule, 1, 64, &replica);
        match store.lease(lease).await {
            Ok(LeaseGrant::Granted { units, .. }) => {
                assert!(units >= 1, "lease: a grant gives the need: {rule:?}");
                assert!(
                    units <= 1 + (left - 1) / 2,
                    "lease: {units} granted of {left} left, one replica: {rule:?}"
                );
                left -= units;
                grants.push(units);
            }
            Ok(LeaseGrant::Denied { retry_after, .. }) => {
                assert!(
                    retry_after > Duration::ZERO,
                    "lease: a denial waits: {rule:?}"
                );
                break;
            }
            other => panic!("lease: unexpected answer {other:?}: {rule:?}"),
        }
        assert!(grants.len() <= 100, "lease: never denied: {rule:?}");
    }
    assert_eq!(
        left, 0,
        "lease: every unit granted once: {grants:?} {rule:?}"
    );
    assert_eq!(
        grants.last(),
        Some(&1),
        "lease: shrinks to 1: {grants:?} {rule:?}"
    );
    let rules = [rule.clone()];
    let denied = store.check(RateCheck::new(&key, &rules, 1, true)).await;
    assert!(
        !denied.expect("lease: check").allowed,
        "lease: leased units are debited: {rule:?}"
    );
}

/// A check after a lease sees the units it took.
async fn leased_units_are_debited<S: RateLeaseStore>(store: &S, rule: Rule) {
    let key = random_key();
    let lease = RateLease::new(&key, &rule, 1, 10, "conformance");
    let units = match store.lease(lease).await {
        Ok(LeaseGrant::Granted { units, .. }) => units,
        other => panic!("lease: unexpected answer {other:?}: {rule:?}"),
    };
    assert_eq!(
        units, 10,
        "lease: a fresh key grants what is asked: {rule:?}"
    );
    let rules = [rule.clone()];
    let state = store
        .check(RateCheck::new(&key, &rules, 0, true))
        .await
        .expect("lease: check");
    assert_eq!(
        state.rules.first().map(|r| r.remaining),
        Some(90),
        "lease: a check sees the leased units: {rule:?}"
    );
}

/// Sliding rules cannot be leased: the store refuses.
async fn sliding_rules_are_not_leased<S: RateLeaseStore>(store: &S) {
    let key = random_key();
    for rule in [
        Rule::sliding_log(10, Duration::from_secs(1)),
        Rule::sliding_window(10, Duration::from_secs(1)),
    ] {
        let lease = RateLease::new(&key, &rule, 1, 10, "conformance");
        assert!(
            store.lease(lease).await.is_err(),
            "lease: a sliding rule is refused: {rule:?}"
        );
    }
}
