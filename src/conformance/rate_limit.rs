//! The rate-limit store suite: [`rate_limit_suite`].

use std::time::Duration;

use futures_util::future::join_all;

use super::random_key;
use crate::{
    store::{
        Calendar, Decision, Override, RateCheck, RateLimitStore, RateSettlement, Rule, Strategy,
        UtcOffset,
    },
    StoreKey,
};

/// One check through `store`, with the per-rule state asked for, panicking on a store error.
async fn check<S: RateLimitStore>(
    store: &S,
    key: &StoreKey,
    rules: &[Rule],
    cost: u64,
) -> Decision {
    check_with(store, key, rules, cost, true).await
}

/// [`check`], saying whether the per-rule state is wanted.
async fn check_with<S: RateLimitStore>(
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

/// One rule of every strategy, each admitting `limit` units at once and refilling slowly (one
/// unit per `window` for the bucket and GCRA).
fn every_strategy(limit: u64, window: Duration) -> [Rule; 5] {
    [
        Rule::fixed_window(limit, window),
        Rule::sliding_log(limit, window),
        Rule::sliding_window(limit, window),
        Rule::token_bucket(limit, 1, window),
        Rule::gcra(1, window, limit),
    ]
}

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
        zero_cost_consumes_nothing_on_any_strategy(store),
        decides_the_same_without_state(store),
        keys_are_isolated(store),
        concurrent_checks_admit_exactly_the_limit(store),
        calendar_periods_end_at_the_next_boundary(store),
        calendar_rules_combine_with_the_others(store),
    );
}

/// `limit` requests pass with decreasing `remaining`, the next is denied with a wait no longer
/// than the window, and after that wait a request passes again.
async fn admits_exactly_the_limit<S: RateLimitStore>(store: &S, rule: Rule) {
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
async fn sliding_log_does_not_record_rejections<S: RateLimitStore>(store: &S) {
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
async fn sliding_log_counts_every_unit_of_one_call<S: RateLimitStore>(store: &S) {
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
async fn sliding_window_weighs_the_previous_window<S: RateLimitStore>(store: &S) {
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
async fn token_bucket_refills_steadily<S: RateLimitStore>(store: &S) {
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
async fn rules_are_all_or_nothing<S: RateLimitStore>(store: &S) {
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
async fn denial_names_the_longest_wait<S: RateLimitStore>(store: &S) {
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
async fn cost_is_weighted<S: RateLimitStore>(store: &S) {
    for rule in every_strategy(10, Duration::from_secs(30)) {
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
async fn cost_above_the_limit_is_always_denied<S: RateLimitStore>(store: &S) {
    for rule in every_strategy(5, Duration::from_secs(30)) {
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
async fn zero_cost_reads_without_consuming<S: RateLimitStore>(store: &S) {
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
async fn decides_the_same_without_state<S: RateLimitStore>(store: &S) {
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
async fn keys_are_isolated<S: RateLimitStore>(store: &S) {
    let (a, b) = (random_key(), random_key());
    let rules = [Rule::sliding_log(1, Duration::from_secs(30))];
    assert!(check(store, &a, &rules, 1).await.allowed);
    assert!(!check(store, &a, &rules, 1).await.allowed);
    assert!(check(store, &b, &rules, 1).await.allowed);
}

/// Many concurrent checks of one key admit exactly the limit, for every exact strategy.
async fn concurrent_checks_admit_exactly_the_limit<S: RateLimitStore>(store: &S) {
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

/// A cost of 0 consumes nothing, whatever the strategy and for several rules at once: after
/// any number of such reads, the same units are left.
async fn zero_cost_consumes_nothing_on_any_strategy<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(30);
    let mut policies: Vec<Vec<Rule>> = every_strategy(3, long)
        .into_iter()
        .map(|r| vec![r])
        .collect();
    policies.push(every_strategy(3, long).to_vec());
    for rules in policies {
        let key = random_key();
        assert!(check(store, &key, &rules, 1).await.allowed, "{rules:?}");
        for _ in 0..5 {
            for want_state in [true, false] {
                let d = check_with(store, &key, &rules, 0, want_state).await;
                assert!(d.allowed, "{rules:?}: a read was denied");
            }
            let d = check(store, &key, &rules, 0).await;
            for (rule, state) in rules.iter().zip(&d.rules) {
                assert_eq!(state.remaining, 2, "{rule:?}: a read consumed");
            }
        }
        for _ in 0..2 {
            assert!(check(store, &key, &rules, 1).await.allowed, "{rules:?}");
        }
        assert!(!check(store, &key, &rules, 1).await.allowed, "{rules:?}");
    }
}

/// Runs the checks of a store's administration methods ([`RateLimitStore::reset`] and
/// [`RateLimitStore::set_override`]) against `store`. Separate from [`rate_limit_suite`]: a
/// store may leave them out (their defaults answer an error).
pub async fn rate_limit_admin_suite<S: RateLimitStore>(store: &S) {
    tokio::join!(
        reset_starts_a_key_afresh(store),
        a_blocked_key_is_denied_until_the_block_ends(store),
        an_allowed_key_is_admitted_without_consuming(store),
        a_cleared_override_restores_the_rules(store),
        an_allowed_key_is_not_settled(store),
    );
}

/// A metered request of an allowed key consumed nothing, so a settlement (charge or refund)
/// changes nothing while the key is allowed. Skipped for a store that does not settle.
async fn an_allowed_key_is_not_settled<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(30);
    let rules = [
        Rule::fixed_window(2, long),
        Rule::token_bucket(2, 1, long),
        Rule::gcra(1, long, 2),
    ];
    let key = random_key();
    assert!(check(store, &key, &rules, 2).await.allowed);
    set_override(store, &key, Some(Override::Allow(long))).await;
    assert!(check(store, &key, &rules, 2).await.allowed);
    // A refund would show (a charge would not: the rules are at 0 already).
    let settlement = RateSettlement::new(&key, &rules, -2, Duration::ZERO);
    if store.settle(settlement).await.is_err() {
        return;
    }
    set_override(store, &key, None).await;
    let d = check(store, &key, &rules, 0).await;
    let left: Vec<u64> = d.rules.iter().map(|s| s.remaining).collect();
    assert_eq!(
        left,
        [0, 0, 0],
        "an allowed key's settlement changed its state"
    );
}

async fn reset<S: RateLimitStore>(store: &S, key: &StoreKey, rules: &[Rule]) {
    if let Err(e) = store.reset(key, rules).await {
        panic!("reset failed: {e}");
    }
}

async fn set_override<S: RateLimitStore>(store: &S, key: &StoreKey, state: Option<Override>) {
    if let Err(e) = store.set_override(key, state).await {
        panic!("set_override failed: {e}");
    }
}

/// A key at its limit on every strategy starts afresh after a reset of its rules; another key,
/// and a rule that was not reset, keep their state.
async fn reset_starts_a_key_afresh<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(30);
    let rules = every_strategy(2, long);
    let (key, other) = (random_key(), random_key());
    for k in [&key, &other] {
        for _ in 0..2 {
            assert!(check(store, k, &rules, 1).await.allowed);
        }
        assert!(!check(store, k, &rules, 1).await.allowed);
    }
    reset(store, &key, &rules[..4]).await;
    let d = check(store, &key, &rules, 0).await;
    let left: Vec<u64> = d.rules.iter().map(|s| s.remaining).collect();
    assert_eq!(
        left,
        [2, 2, 2, 2, 0],
        "the four rules reset, the fifth kept"
    );
    reset(store, &key, &rules).await;
    for _ in 0..2 {
        assert!(check(store, &key, &rules, 1).await.allowed, "reset key");
    }
    assert!(!check(store, &key, &rules, 1).await.allowed, "reset key");
    assert!(!check(store, &other, &rules, 1).await.allowed, "other key");
    // Resetting a key with no state is not an error.
    reset(store, &random_key(), &rules).await;
}

/// A blocked key is denied at any cost (0 included), with every rule at 0 remaining and a wait
/// of the block's remaining time; nothing is consumed, a reset does not lift the block, and
/// once it ends the key's rules decide again.
async fn a_blocked_key_is_denied_until_the_block_ends<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(30);
    let rules = [Rule::fixed_window(5, long), Rule::gcra(1, long, 5)];
    let key = random_key();
    assert!(check(store, &key, &rules, 1).await.allowed);
    let block = Duration::from_millis(1200);
    set_override(store, &key, Some(Override::Block(block))).await;
    for cost in [1, 0, 100] {
        let d = check(store, &key, &rules, cost).await;
        assert!(!d.allowed, "cost {cost}: a blocked key was admitted");
        assert_eq!(d.denied_by, Some(0), "cost {cost}");
        assert!(
            d.retry_after <= block && d.retry_after > block / 2,
            "cost {cost}: retry after {:?}",
            d.retry_after
        );
        for state in &d.rules {
            assert_eq!(state.remaining, 0, "cost {cost}");
            assert_eq!(state.reset, d.retry_after, "cost {cost}");
        }
        let d = check_with(store, &key, &rules, cost, false).await;
        assert!(!d.allowed, "cost {cost}, without state");
    }
    reset(store, &key, &rules).await;
    let d = check(store, &key, &rules, 1).await;
    assert!(!d.allowed, "a reset lifted the block");
    tokio::time::sleep(d.retry_after + MARGIN).await;
    let d = check(store, &key, &rules, 1).await;
    assert!(d.allowed, "still blocked after the block: {d:?}");
    assert_eq!(
        d.rules[0].remaining, 4,
        "the reset took effect, the block consumed nothing"
    );
}

/// An allowed key is admitted at any cost without consuming anything, and reports its state.
async fn an_allowed_key_is_admitted_without_consuming<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(30);
    for rules in [
        vec![Rule::sliding_log(2, long)],
        every_strategy(2, long).to_vec(),
    ] {
        let key = random_key();
        assert!(check(store, &key, &rules, 1).await.allowed);
        assert!(check(store, &key, &rules, 1).await.allowed);
        assert!(!check(store, &key, &rules, 1).await.allowed);
        set_override(store, &key, Some(Override::Allow(long))).await;
        for cost in [1, 1, 5, 0] {
            let d = check(store, &key, &rules, cost).await;
            assert!(
                d.allowed,
                "{rules:?}, cost {cost}: an allowed key was denied"
            );
            assert!(d.rules.iter().all(|s| s.remaining == 0), "{rules:?}: {d:?}");
            assert!(check_with(store, &key, &rules, cost, false).await.allowed);
        }
        set_override(store, &key, None).await;
        assert!(
            !check(store, &key, &rules, 1).await.allowed,
            "{rules:?}: the allowed requests consumed or the override stayed"
        );
    }
}

/// Clearing a block restores the rules at once, with their state as it was; an override of one
/// key leaves other keys alone.
async fn a_cleared_override_restores_the_rules<S: RateLimitStore>(store: &S) {
    let rules = [Rule::token_bucket(3, 1, Duration::from_secs(30))];
    let (key, other) = (random_key(), random_key());
    assert!(check(store, &key, &rules, 1).await.allowed);
    set_override(store, &key, Some(Override::Block(Duration::from_secs(60)))).await;
    assert!(!check(store, &key, &rules, 1).await.allowed);
    assert!(
        check(store, &other, &rules, 1).await.allowed,
        "another key was blocked"
    );
    set_override(store, &key, None).await;
    let d = check(store, &key, &rules, 1).await;
    assert!(d.allowed, "still blocked after the block was cleared");
    assert_eq!(d.rules[0].remaining, 1);
    // Clearing a key without an override is not an error.
    set_override(store, &random_key(), None).await;
}

/// The seconds from the system clock's now to the end of `rule`'s calendar period (the store's
/// clock may differ from this process's by its skew: the checks allow a few seconds).
fn to_boundary(rule: &Rule) -> Duration {
    let spec = rule.encode().2;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let now = i64::try_from(now.as_micros()).unwrap_or(i64::MAX / 4);
    let (_, end) = crate::store::calendar_period(now, spec);
    Duration::from_micros(u64::try_from(end - now).unwrap_or(0))
}

/// How far apart a calendar answer and the system clock's boundary may be: the store's clock
/// skew and the time the check takes.
const CLOCK_SKEW: Duration = Duration::from_secs(5);

fn near(a: Duration, b: Duration) -> bool {
    a.abs_diff(b) <= CLOCK_SKEW
}

/// A calendar rule (day, ISO week, month; UTC and two offsets) admits exactly its limit, and
/// its reset and the wait of a denial are the time to the next boundary of the period.
async fn calendar_periods_end_at_the_next_boundary<S: RateLimitStore>(store: &S) {
    for (period, offset) in [
        (Calendar::Day, 0),
        (Calendar::Week, 0),
        (Calendar::Month, 0),
        (Calendar::Day, 330),
        (Calendar::Month, -480),
    ] {
        let rule = Rule::calendar(3, period).utc_offset(UtcOffset::minutes(offset));
        let rules = [rule.clone()];
        let key = random_key();
        for i in 0..3 {
            let d = check(store, &key, &rules, 1).await;
            assert!(d.allowed, "{rule:?}: request {} denied", i + 1);
            assert_eq!(d.rules[0].remaining, 2 - i, "{rule:?}");
            let boundary = to_boundary(&rule);
            assert!(
                near(d.rules[0].reset, boundary),
                "{rule:?}: reset in {:?}, the period ends in {boundary:?}",
                d.rules[0].reset
            );
        }
        let d = check(store, &key, &rules, 1).await;
        let boundary = to_boundary(&rule);
        assert!(!d.allowed, "{rule:?}: over the limit admitted");
        assert_eq!(
            (d.denied_by, d.rules[0].remaining),
            (Some(0), 0),
            "{rule:?}"
        );
        assert!(
            near(d.retry_after, boundary) && !d.retry_after.is_zero(),
            "{rule:?}: retry after {:?}, the period ends in {boundary:?}",
            d.retry_after
        );
        // Without the state asked for, the same decision.
        let d = check_with(store, &key, &rules, 1, false).await;
        assert!(
            !d.allowed && near(d.retry_after, boundary),
            "{rule:?}: {d:?}"
        );
        // A cost above the limit waits for the boundary too, and takes nothing.
        let other = random_key();
        let d = check(store, &other, &rules, 4).await;
        assert!(!d.allowed && !d.retry_after.is_zero(), "{rule:?}: {d:?}");
        assert_eq!(check(store, &other, &rules, 0).await.rules[0].remaining, 3);
    }
    // The offset is part of the rule: the same key counts apart under two offsets.
    let key = random_key();
    let utc = [Rule::calendar(1, Calendar::Day)];
    let india = [Rule::calendar(1, Calendar::Day).utc_offset(UtcOffset::minutes(330))];
    assert!(check(store, &key, &utc, 1).await.allowed);
    assert!(check(store, &key, &india, 1).await.allowed);
    assert!(matches!(
        utc[0].strategy(),
        Strategy::Calendar { limit: 1, .. }
    ));
}

/// A calendar rule among others is all or nothing, like every rule, and concurrent checks
/// admit exactly its limit.
async fn calendar_rules_combine_with_the_others<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(30);
    for other in every_strategy(10, long) {
        let key = random_key();
        let rules = [Rule::calendar(2, Calendar::Month), other.clone()];
        assert!(check(store, &key, &rules, 1).await.allowed);
        let d = check(store, &key, &rules, 1).await;
        assert!(d.allowed, "{other:?}");
        assert_eq!(d.rules[0].remaining, 0, "{other:?}");
        for _ in 0..3 {
            let d = check(store, &key, &rules, 1).await;
            assert!(!d.allowed, "{other:?}");
            assert_eq!(d.denied_by, Some(0), "{other:?}");
            assert_eq!(
                d.rules[1].remaining, 8,
                "{other:?}: the other rule gave nothing"
            );
        }
    }
    // Denied by the other rule: the calendar rule gives nothing either.
    let key = random_key();
    let rules = [
        Rule::calendar(10, Calendar::Week),
        Rule::fixed_window(1, long),
    ];
    assert!(check(store, &key, &rules, 1).await.allowed);
    let d = check(store, &key, &rules, 1).await;
    assert_eq!((d.allowed, d.denied_by), (false, Some(1)));
    assert_eq!(
        d.rules[0].remaining, 9,
        "the week gave nothing to a denied request"
    );
    let key = random_key();
    let rules = [Rule::calendar(20, Calendar::Day)];
    let all = join_all((0..100).map(|_| check(store, &key, &rules, 1))).await;
    let admitted = all.iter().filter(|d| d.allowed).count();
    assert_eq!(admitted, 20, "calendar: {admitted} of 100 admitted");
}

/// One settlement through `store`, panicking on a store error.
async fn settle<S: RateLimitStore>(
    store: &S,
    key: &StoreKey,
    rules: &[Rule],
    delta: i64,
    age: Duration,
) {
    let settlement = RateSettlement::new(key, rules, delta, age);
    if let Err(e) = store.settle(settlement).await {
        panic!("store error settling {delta} on {rules:?}: {e}");
    }
}

/// What each rule has left (a check of cost 0, which may deny a key charged past its limit).
async fn left<S: RateLimitStore>(store: &S, key: &StoreKey, rules: &[Rule]) -> Vec<u64> {
    let d = check(store, key, rules, 0).await;
    d.rules.iter().map(|s| s.remaining).collect()
}

/// Runs every check of the settlement of metered costs ([`RateLimitStore::settle`]) against
/// `store`: charges and refunds on fixed windows, token buckets and GCRA, all rules at once, a
/// charge past the limit, a late settlement of a fixed window, and sliding rules left as they
/// are. A store that keeps the trait's default `settle` fails it.
pub async fn rate_limit_settlement_suite<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(60);
    tokio::join!(
        settles_charges_and_refunds(store, Rule::fixed_window(100, long)),
        settles_charges_and_refunds(store, Rule::token_bucket(100, 1, long)),
        settles_charges_and_refunds(store, Rule::gcra(1, long, 100)),
        settles_charges_and_refunds(store, Rule::calendar(100, Calendar::Month)),
        a_charge_may_pass_the_limit(store, Rule::fixed_window(100, long)),
        a_charge_may_pass_the_limit(store, Rule::token_bucket(100, 1, long)),
        a_charge_may_pass_the_limit(store, Rule::gcra(1, long, 100)),
        a_charge_may_pass_the_limit(store, Rule::calendar(100, Calendar::Day)),
        every_rule_is_settled_at_once(store),
        a_late_fixed_window_settlement_changes_nothing(store),
        sliding_rules_are_left_as_they_are(store),
    );
}

/// A charge takes more, a refund gives back, never more than the quota.
async fn settles_charges_and_refunds<S: RateLimitStore>(store: &S, rule: Rule) {
    let key = random_key();
    let rules = [rule.clone()];
    assert!(check(store, &key, &rules, 10).await.allowed);
    settle(store, &key, &rules, 20, Duration::ZERO).await;
    assert_eq!(left(store, &key, &rules).await, [70], "charge: {rule:?}");
    settle(store, &key, &rules, -15, Duration::ZERO).await;
    assert_eq!(left(store, &key, &rules).await, [85], "refund: {rule:?}");
    settle(store, &key, &rules, 0, Duration::ZERO).await;
    assert_eq!(left(store, &key, &rules).await, [85], "nothing: {rule:?}");
    settle(store, &key, &rules, -1000, Duration::ZERO).await;
    assert_eq!(
        left(store, &key, &rules).await,
        [100],
        "at most the quota: {rule:?}"
    );
    // A key never checked: a refund changes nothing.
    let fresh = random_key();
    settle(store, &fresh, &rules, -5, Duration::ZERO).await;
    assert_eq!(
        left(store, &fresh, &rules).await,
        [100],
        "fresh key: {rule:?}"
    );
}

/// A settlement is never denied: a key charged past its limit denies the next request.
async fn a_charge_may_pass_the_limit<S: RateLimitStore>(store: &S, rule: Rule) {
    let key = random_key();
    let rules = [rule.clone()];
    assert!(check(store, &key, &rules, 10).await.allowed);
    settle(store, &key, &rules, 120, Duration::ZERO).await;
    let d = check(store, &key, &rules, 1).await;
    assert!(!d.allowed, "over the limit: {rule:?}: {d:?}");
    assert_eq!(d.rules[0].remaining, 0, "{rule:?}");
    assert!(d.retry_after > Duration::ZERO, "{rule:?}");
    // Refunding the overshoot makes room again.
    settle(store, &key, &rules, -40, Duration::ZERO).await;
    assert_eq!(left(store, &key, &rules).await, [10], "{rule:?}");
}

/// Every rule of a check is settled by the same difference.
async fn every_rule_is_settled_at_once<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(60);
    let key = random_key();
    let rules = [
        Rule::fixed_window(100, long),
        Rule::token_bucket(200, 1, long),
        Rule::gcra(1, long, 300),
    ];
    assert!(check(store, &key, &rules, 10).await.allowed);
    settle(store, &key, &rules, 30, Duration::ZERO).await;
    assert_eq!(left(store, &key, &rules).await, [60, 160, 260]);
    settle(store, &key, &rules, -20, Duration::ZERO).await;
    assert_eq!(left(store, &key, &rules).await, [80, 180, 280]);
}

/// A fixed window's settlement for a check answered before the current window began changes
/// nothing; within the check's window it applies.
async fn a_late_fixed_window_settlement_changes_nothing<S: RateLimitStore>(store: &S) {
    let window = Duration::from_millis(400);
    let key = random_key();
    let rules = [Rule::fixed_window(100, window)];
    assert!(check(store, &key, &rules, 10).await.allowed);
    tokio::time::sleep(window + MARGIN).await;
    // Expired: nothing to settle.
    settle(store, &key, &rules, 50, window + MARGIN).await;
    assert_eq!(
        left(store, &key, &rules).await,
        [100],
        "charged a fresh window"
    );
    // A new window, then a settlement for a check older than it.
    assert!(check(store, &key, &rules, 10).await.allowed);
    settle(store, &key, &rules, -10, window).await;
    assert_eq!(
        left(store, &key, &rules).await,
        [90],
        "refunded a fresh window"
    );
    settle(store, &key, &rules, -5, Duration::ZERO).await;
    assert_eq!(left(store, &key, &rules).await, [95], "the current window");
}

/// Sliding logs and windows are not settled (the layer refuses them in a metered policy).
async fn sliding_rules_are_left_as_they_are<S: RateLimitStore>(store: &S) {
    let long = Duration::from_secs(60);
    for rule in [Rule::sliding_log(10, long), Rule::sliding_window(10, long)] {
        let key = random_key();
        let rules = [rule.clone()];
        assert!(check(store, &key, &rules, 3).await.allowed);
        settle(store, &key, &rules, 4, Duration::ZERO).await;
        settle(store, &key, &rules, -2, Duration::ZERO).await;
        assert_eq!(left(store, &key, &rules).await, [7], "{rule:?}");
    }
}
