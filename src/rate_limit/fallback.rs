//! The local fallback: the same rules, enforced in process with a [`MemoryStore`] (each quota
//! divided by the number of replicas) when the store fails.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    key::StoreKey,
    store::{
        Decision, MemoryStore, RateCheck, RateLimitStore, RateSettlement, Rule, StoreError,
        Strategy,
    },
};

/// Limits enforced in this process when the store fails: the default of a
/// [`RateLimitLayer`](super::RateLimitLayer), set with
/// [`local_fallback`](super::RateLimitLayer::local_fallback).
///
/// Each replica enforces the layer's rules in memory with every quota (a window's limit, a
/// bucket's capacity, a GCRA burst) divided by `replicas` and rounded down, and every rate
/// (refill, GCRA rate) divided by `replicas` exactly. So while the store is away, `n` replicas
/// admit at most `limit × n / replicas` per window between them (at most `limit` when `replicas`
/// is the real number of replicas), instead of everything. A quota that rounds down to 0 denies
/// every request during the outage (`429` with `Retry-After: 1`).
///
/// A [calendar](super::Rule::calendar) quota is divided the same way and keeps its periods,
/// on this process's system clock rather than the Redis server's (they differ by the clocks'
/// skew). The local counts cover what this replica admitted since the period began (or since
/// it started): during an outage each replica admits up to its share minus what it already
/// admitted in the period, so a period holding an outage admits less than twice the limit, and
/// a replica that took its share before the outage denies until the next boundary (or the
/// store's return).
///
/// While the store works, each replica also counts what it admitted in memory, and for
/// [`hold`](Self::hold) after a failed (or breaker-refused) call a request needs the local
/// rules' consent as well as the store's, so that a store that fails now and then (a lossy
/// network, a breaker that closes and opens again during a cluster failover) cannot double the
/// budget. When the store is back the local counts are not merged into it: `hold` after the
/// last failure the store alone decides again.
///
/// What it costs while the store works: one in-memory check per admitted request, and in each
/// process one memory-store entry per active key and rule (expired entries are swept). A service
/// with a huge number of keys per window that would rather fail open can turn it off with
/// [`no_local_fallback`](super::RateLimitLayer::no_local_fallback).
///
/// See the [module docs](super) for an example.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalFallback {
    pub(crate) replicas: u32,
    pub(crate) hold: Duration,
}

impl LocalFallback {
    /// A fallback for a service run as `replicas` replicas (at least 1).
    pub fn new(replicas: u32) -> Self {
        Self {
            replicas: replicas.max(1),
            hold: Duration::from_millis(100),
        }
    }

    /// How long after the last store failure the local limits still apply to requests that the
    /// store admits (default 100 ms). Once Redis is back, limits are exact again after the
    /// breaker's probe closes it plus this.
    pub fn hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }
}

impl Default for LocalFallback {
    /// One replica: the full limits in this process.
    fn default() -> Self {
        Self::new(1)
    }
}

/// The local rules of a policy: its rules for one of `replicas` replicas, or `None` when a
/// quota rounds down to 0 (every request is denied during an outage).
pub(crate) fn divide(rules: &[Rule], replicas: u32) -> Option<Vec<Rule>> {
    rules.iter().map(|r| divide_rule(r, replicas)).collect()
}

fn divide_rule(rule: &Rule, replicas: u32) -> Option<Rule> {
    let d = u64::from(replicas.max(1));
    let longer = |p: Duration| p.saturating_mul(replicas.max(1));
    let strategy = match rule.strategy {
        Strategy::FixedWindow { limit, window } => Strategy::FixedWindow {
            limit: limit / d,
            window,
        },
        Strategy::SlidingLog { limit, window } => Strategy::SlidingLog {
            limit: limit / d,
            window,
        },
        Strategy::SlidingWindow { limit, window } => Strategy::SlidingWindow {
            limit: limit / d,
            window,
        },
        Strategy::TokenBucket {
            capacity,
            refill,
            every,
        } => Strategy::TokenBucket {
            capacity: capacity / d,
            refill,
            every: longer(every),
        },
        Strategy::Gcra {
            rate,
            period,
            burst,
        } => Strategy::Gcra {
            rate,
            period: longer(period),
            burst: burst / d,
        },
        // A calendar quota is divided like a window's limit; the period stays the calendar's
        // (on this process's clock, see `LocalFallback`).
        Strategy::Calendar {
            limit,
            period,
            offset,
        } => Strategy::Calendar {
            limit: limit / d,
            period,
            offset,
        },
    };
    let local = Rule {
        strategy,
        name: rule.name.clone(),
    };
    (local.quota() > 0).then_some(local)
}

/// The fallback's state in a layer: the in-process counts, and until when a failure holds.
pub(crate) struct Local {
    store: MemoryStore,
    epoch: Instant,
    /// Until when (ms since `epoch`) the local limits hold after the last failure.
    hold_until: AtomicU64,
}

impl Local {
    pub(crate) fn new() -> Self {
        Self {
            store: MemoryStore::new(),
            epoch: Instant::now(),
            hold_until: AtomicU64::new(0),
        }
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Notes that the store failed now: the local limits hold for `hold`.
    pub(crate) fn failed(&self, hold: Duration) {
        let until = self
            .millis()
            .saturating_add(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
        self.hold_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Whether the local limits still hold after a recent failure.
    pub(crate) fn holding(&self) -> bool {
        let until = self.hold_until.load(Ordering::Acquire);
        // 0: no failure, or its hold ended and a check saw it end: no clock read.
        if until == 0 {
            return false;
        }
        if self.millis() < until {
            return true;
        }
        // The hold ended: forget it, unless a failure moved it on meanwhile.
        let _ = (self.hold_until).compare_exchange(until, 0, Ordering::AcqRel, Ordering::Acquire);
        false
    }

    /// Checks (and consumes) `cost` against the local `rules` for `key`.
    pub(crate) fn check(
        &self,
        key: &StoreKey,
        rules: &[Rule],
        cost: u64,
        want_state: bool,
    ) -> Result<Decision, StoreError> {
        let check = RateCheck::new(key, rules, cost, want_state);
        self.store
            .check_now(check)
            .unwrap_or_else(|| Err(StoreError::Invalid("no local answer".into())))
    }

    /// Settles a metered request that the local `rules` admitted.
    pub(crate) fn settle(&self, settlement: RateSettlement<'_>) -> Result<(), StoreError> {
        self.store
            .settle_now(settlement)
            .unwrap_or_else(|| Err(StoreError::Invalid("no local answer".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_round_down_and_rates_divide_exactly() {
        let s = Duration::from_secs(1);
        let rules = [
            Rule::fixed_window(10, s),
            Rule::token_bucket(10, 3, s),
            Rule::gcra(7, s, 9),
        ];
        let local = divide(&rules, 3).unwrap();
        let strategies: Vec<Strategy> = local.iter().map(|r| *r.strategy()).collect();
        assert_eq!(
            strategies,
            [
                Strategy::FixedWindow {
                    limit: 3,
                    window: s
                },
                Strategy::TokenBucket {
                    capacity: 3,
                    refill: 3,
                    every: 3 * s
                },
                Strategy::Gcra {
                    rate: 7,
                    period: 3 * s,
                    burst: 3
                },
            ]
        );
        assert_eq!(divide(&rules, 1).unwrap(), rules);
        assert!(divide(&[Rule::sliding_log(2, s)], 3).is_none());
    }

    #[test]
    fn calendar_quotas_divide_and_keep_their_periods() {
        use crate::store::{Calendar, UtcOffset};
        let offset = UtcOffset::minutes(330);
        let rule = Rule::calendar(1000, Calendar::Month)
            .utc_offset(offset)
            .name("monthly");
        let local = divide(std::slice::from_ref(&rule), 3).unwrap();
        assert_eq!(
            *local[0].strategy(),
            Strategy::Calendar {
                limit: 333,
                period: Calendar::Month,
                offset
            }
        );
        assert_eq!(local[0].policy_name(), "monthly");
        assert!(divide(&[Rule::calendar(2, Calendar::Day)], 3).is_none());
    }
}
