//! The rate-limit store: the trait, what it is asked ([`RateCheck`]) and what it answers
//! ([`Decision`]), and the rules it enforces ([`Rule`], [`Strategy`]) with their wire form (the
//! strategy codes and numbers that the scripts and the memory store read, and the signature that
//! names a rule's state in a store key). The rate-limit layer re-exports `Rule` and `Strategy`.

use std::{fmt, future::Future, time::Duration};

use super::{StoreError, StoreFuture};
use crate::StoreKey;

/// One rate-limit rule: a strategy with its numbers, and a name used in the `RateLimit` fields.
///
/// Several rules on one route (for example 10 per second *and* 1000 per hour) are checked in the
/// same atomic store call: a request denied by one rule consumes nothing from the others.
#[derive(Clone, PartialEq, Eq)]
pub struct Rule {
    pub(crate) strategy: Strategy,
    pub(crate) name: Option<String>,
}

/// How a [`Rule`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// At most `limit` units per fixed window that starts with the first request (`INCRBY` plus
    /// an expiry). Cheapest; allows up to twice the limit across a window edge.
    FixedWindow {
        /// Units allowed per window.
        limit: u64,
        /// Window length.
        window: Duration,
    },
    /// Exact sliding window: a log of every admitted unit (a sorted set). A rejected request is
    /// not recorded. Memory grows with the limit (one entry per admitted unit in the window): for
    /// large limits prefer [`Strategy::SlidingWindow`].
    SlidingLog {
        /// Units allowed in any window of this length.
        limit: u64,
        /// Window length.
        window: Duration,
    },
    /// Approximate sliding window from two fixed windows (O(1) memory):
    /// `estimate = previous * (1 - elapsed / window) + current`.
    ///
    /// Error bound: the estimate is exact when the previous window's requests were spread
    /// evenly. It never admits more than `limit` within one fixed window, so any sliding window
    /// sees at most `2 * limit` in the worst case (all of the previous window's requests at its
    /// very end, then a burst early in the current one). It errs the other way (denies early)
    /// when the previous window's requests came at its start.
    SlidingWindow {
        /// Units allowed per window.
        limit: u64,
        /// Window length.
        window: Duration,
    },
    /// Token bucket: holds up to `capacity` tokens, refilled continuously at `refill` tokens
    /// every `every`. A request takes `cost` tokens.
    TokenBucket {
        /// Bucket size (the largest burst).
        capacity: u64,
        /// Tokens added per `every`.
        refill: u64,
        /// Refill period.
        every: Duration,
    },
    /// Generic cell rate algorithm: `rate` units per `period`, with bursts of up to `burst`
    /// units. Same admissions as a token bucket of capacity `burst`, stored as one timestamp.
    Gcra {
        /// Units per period (sustained rate).
        rate: u64,
        /// Period of the rate.
        period: Duration,
        /// Largest burst.
        burst: u64,
    },
}

impl Rule {
    /// `limit` units per fixed `window`.
    pub fn fixed_window(limit: u64, window: Duration) -> Self {
        Self::from(Strategy::FixedWindow { limit, window })
    }

    /// `limit` units in any sliding `window`, exact (a log of admitted units).
    pub fn sliding_log(limit: u64, window: Duration) -> Self {
        Self::from(Strategy::SlidingLog { limit, window })
    }

    /// `limit` units per sliding `window`, approximated from two fixed windows (O(1) memory).
    pub fn sliding_window(limit: u64, window: Duration) -> Self {
        Self::from(Strategy::SlidingWindow { limit, window })
    }

    /// A bucket of `capacity` tokens, refilled with `refill` tokens every `every`.
    pub fn token_bucket(capacity: u64, refill: u64, every: Duration) -> Self {
        Self::from(Strategy::TokenBucket {
            capacity,
            refill,
            every,
        })
    }

    /// GCRA: `rate` units per `period` with bursts of up to `burst`.
    pub fn gcra(rate: u64, period: Duration, burst: u64) -> Self {
        Self::from(Strategy::Gcra {
            rate,
            period,
            burst,
        })
    }

    /// Names the rule in the `RateLimit` / `RateLimit-Policy` fields (default: a name made from
    /// the strategy and its numbers, like `fixed-5-10s`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let name: String = name.into();
        // Keep what is valid inside a structured-field string.
        let name: String = name
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
            .collect();
        self.name = Some(name);
        self
    }

    /// The strategy and its numbers.
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }

    /// The name shown in the `RateLimit` fields.
    pub fn policy_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.default_name())
    }

    fn default_name(&self) -> String {
        match self.strategy {
            Strategy::FixedWindow { limit, window } => format!("fixed-{limit}-{}", dur(window)),
            Strategy::SlidingLog { limit, window } => {
                format!("sliding-log-{limit}-{}", dur(window))
            }
            Strategy::SlidingWindow { limit, window } => format!("sliding-{limit}-{}", dur(window)),
            Strategy::TokenBucket {
                capacity,
                refill,
                every,
            } => format!("bucket-{capacity}-{refill}-{}", dur(every)),
            Strategy::Gcra {
                rate,
                period,
                burst,
            } => format!("gcra-{rate}-{}-{burst}", dur(period)),
        }
    }

    /// The quota advertised in `RateLimit-Policy` (`q`).
    pub fn quota(&self) -> u64 {
        match self.strategy {
            Strategy::FixedWindow { limit, .. }
            | Strategy::SlidingLog { limit, .. }
            | Strategy::SlidingWindow { limit, .. } => limit,
            Strategy::TokenBucket { capacity, .. } => capacity,
            Strategy::Gcra { burst, .. } => burst,
        }
    }

    /// The window advertised in `RateLimit-Policy` (`w`): the window, or for a bucket the time
    /// to refill it from empty.
    pub fn window(&self) -> Duration {
        match self.strategy {
            Strategy::FixedWindow { window, .. }
            | Strategy::SlidingLog { window, .. }
            | Strategy::SlidingWindow { window, .. } => window,
            Strategy::TokenBucket {
                capacity,
                refill,
                every,
            } => every.mul_f64(capacity as f64 / refill.max(1) as f64),
            Strategy::Gcra {
                rate,
                period,
                burst,
            } => period.mul_f64(burst as f64 / rate.max(1) as f64),
        }
    }

    /// Checks the numbers: every limit and period must be positive, and periods at least 1 ms.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let (a, p, c) = self.encode();
        if a == 0 {
            return Err(format!(
                "rule {}: the limit must be positive",
                self.policy_name()
            ));
        }
        if p == 0 {
            return Err(format!(
                "rule {}: the period must be at least 1 ms",
                self.policy_name()
            ));
        }
        if matches!(
            self.strategy,
            Strategy::TokenBucket { .. } | Strategy::Gcra { .. }
        ) && c == 0
        {
            return Err(format!(
                "rule {}: refill and burst must be positive",
                self.policy_name()
            ));
        }
        if a > MAX_NUMBER || c > MAX_NUMBER || p > MAX_NUMBER / 1000 {
            return Err(format!(
                "rule {}: numbers are too large",
                self.policy_name()
            ));
        }
        Ok(())
    }

    /// The wire form shared by the script and the memory store: kind, a, b (ms), c.
    pub(crate) fn kind(&self) -> u8 {
        match self.strategy {
            Strategy::FixedWindow { .. } => 1,
            Strategy::SlidingLog { .. } => 2,
            Strategy::SlidingWindow { .. } => 3,
            Strategy::TokenBucket { .. } => 4,
            Strategy::Gcra { .. } => 5,
        }
    }

    pub(crate) fn encode(&self) -> (u64, u64, u64) {
        match self.strategy {
            Strategy::FixedWindow { limit, window }
            | Strategy::SlidingLog { limit, window }
            | Strategy::SlidingWindow { limit, window } => (limit, ms(window), 0),
            Strategy::TokenBucket {
                capacity,
                refill,
                every,
            } => (capacity, ms(every), refill),
            Strategy::Gcra {
                rate,
                period,
                burst,
            } => (rate, ms(period), burst),
        }
    }

    /// Writes a short signature of the strategy and numbers to `buf`, for store key names, so
    /// that changing a rule starts from fresh state.
    #[cfg_attr(not(any(feature = "redis", feature = "fred")), allow(dead_code))]
    pub(crate) fn write_signature(&self, buf: &mut Vec<u8>) {
        let (a, b, c) = self.encode();
        let mut n = itoa::Buffer::new();
        buf.extend_from_slice(n.format(self.kind()).as_bytes());
        for v in [a, b, c] {
            buf.push(b'.');
            buf.extend_from_slice(n.format(v).as_bytes());
        }
    }
}

/// Numbers stay well below 2^53 so Lua's doubles hold them exactly.
const MAX_NUMBER: u64 = 1 << 50;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn dur(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl From<Strategy> for Rule {
    fn from(strategy: Strategy) -> Self {
        Self {
            strategy,
            name: None,
        }
    }
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.policy_name())
            .field("strategy", &self.strategy)
            .finish()
    }
}

/// One rate-limit check: consume `cost` units for `key` from every rule, or from none.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RateCheck<'a> {
    /// The hashed key of the caller (already namespaced by the policy).
    pub key: &'a StoreKey,
    /// The rules, each with its own state under the key. All are checked; if any denies,
    /// nothing is consumed from any.
    pub rules: &'a [Rule],
    /// Units to consume (0 only reports the state).
    pub cost: u64,
    /// Whether the per-rule state (remaining, reset) is needed in the answer. A store may skip
    /// work when it is not: the per-rule fields of an admitted request may then be zero (the
    /// Redis stores skip building them).
    pub want_state: bool,
}

impl<'a> RateCheck<'a> {
    /// A check of `rules` for `key` at `cost`, with the per-rule state in the answer when
    /// `want_state`.
    pub fn new(key: &'a StoreKey, rules: &'a [Rule], cost: u64, want_state: bool) -> Self {
        Self {
            key,
            rules,
            cost,
            want_state,
        }
    }
}

/// A store's answer to a [`RateCheck`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request was admitted (and its cost consumed from every rule).
    pub allowed: bool,
    /// When denied: the index (into [`RateCheck::rules`]) of the rule with the longest wait.
    pub denied_by: Option<usize>,
    /// When denied: how long until a request of the same cost can be admitted (the longest wait
    /// over all denying rules). Zero when allowed.
    pub retry_after: Duration,
    /// The state of each rule after the decision, in the order of [`RateCheck::rules`]. A
    /// denied request consumes nothing, so each rule then reports what it has left (a rule that
    /// would have admitted the cost has not given it).
    pub rules: Vec<RuleState>,
}

/// The state of one rule after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleState {
    /// Units left in the current window or bucket.
    pub remaining: u64,
    /// Time until the rule's quota is fully available again (rounded up to whole seconds in the
    /// HTTP fields).
    pub reset: Duration,
}

/// A store that answers rate-limit checks.
///
/// Implementations must be atomic per call: two concurrent calls for the same key behave as if
/// one ran entirely before the other, across every process that shares the store. Time is the
/// store's own (the Redis stores read `TIME` on the server).
///
/// The returned future owns what it needs (`'static`), so the service future that polls it is
/// a plain, unboxed type for stores whose future type is nameable. A store whose future is an
/// `async` block can return a boxed future.
pub trait RateLimitStore: Send + Sync + 'static {
    /// The future of one check.
    type Future: Future<Output = Result<Decision, StoreError>> + Send + 'static;

    /// Checks `check.rules` for `check.key`, consuming `check.cost` from all of them or none.
    fn check(&self, check: RateCheck<'_>) -> Self::Future;

    /// Answers at once when the store can decide without waiting (an in-process store), so the
    /// layer calls the inner service directly instead of from its own future. `None` (the
    /// default) sends the check through [`RateLimitStore::check`].
    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        let _ = check;
        None
    }

    /// Whether calls leave the process (a network store). The layer puts a timeout and the local
    /// deny cache only in front of stores that do. Defaults to `true`.
    fn is_remote(&self) -> bool {
        true
    }

    /// Deletes the state of `rules` for `key`, so the key starts afresh on each of them (one
    /// atomic call; an [`Override`] of the key is kept). Rules not given keep their state.
    ///
    /// The default answers [`StoreError::Invalid`] (a store that only checks); every store of
    /// this crate implements it.
    fn reset(&self, key: &StoreKey, rules: &[Rule]) -> StoreFuture<()> {
        let _ = (key, rules);
        unsupported("reset")
    }

    /// Sets the [`Override`] of `key` (every policy's key is its own), or clears it with
    /// `None`. Checks read it in the same atomic call as the rules: a blocked key is denied, an
    /// allowed key admitted without consuming, until the override expires.
    ///
    /// The default answers [`StoreError::Invalid`], and such a store never reports a key as
    /// overridden; every store of this crate implements it.
    fn set_override(&self, key: &StoreKey, state: Option<Override>) -> StoreFuture<()> {
        let _ = (key, state);
        unsupported("set_override")
    }
}

impl<T: RateLimitStore> RateLimitStore for std::sync::Arc<T> {
    type Future = T::Future;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        (**self).check(check)
    }

    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        (**self).check_now(check)
    }

    fn is_remote(&self) -> bool {
        (**self).is_remote()
    }

    fn reset(&self, key: &StoreKey, rules: &[Rule]) -> StoreFuture<()> {
        (**self).reset(key, rules)
    }

    fn set_override(&self, key: &StoreKey, state: Option<Override>) -> StoreFuture<()> {
        (**self).set_override(key, state)
    }
}

// Administration: resetting a key, and overriding its limits for a while.

/// A decision about one key that replaces its rules for a while, kept in the store so that every
/// replica sees it (see [`RateLimitStore::set_override`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Override {
    /// Deny every check of the key for this long: the answer names the first rule, with every
    /// rule at 0 remaining until the block ends and a wait of the block's remaining time.
    Block(Duration),
    /// Admit every check of the key for this long without consuming anything (each rule reports
    /// its state as a check of cost 0 would).
    Allow(Duration),
}

impl Override {
    /// How long the override lasts.
    pub fn duration(&self) -> Duration {
        match *self {
            Self::Block(d) | Self::Allow(d) => d,
        }
    }
}

/// The answer of a store that does not implement an administration method.
fn unsupported<T: Send + 'static>(what: &str) -> StoreFuture<T> {
    let error = StoreError::Invalid(format!("this rate-limit store does not implement {what}"));
    Box::pin(std::future::ready(Err(error)))
}
