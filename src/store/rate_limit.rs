//! The rate-limit store: the trait, what it is asked ([`RateCheck`]) and what it answers
//! ([`Decision`]), and the rules it enforces ([`Rule`], [`Strategy`]) with their wire form (the
//! strategy codes and numbers that the scripts and the memory store read, and the signature that
//! names a rule's state in a store key). The rate-limit layer re-exports `Rule`, `Strategy`,
//! `Calendar` and `UtcOffset`.

use std::{fmt, future::Future, str::FromStr, time::Duration};

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
    /// At most `limit` units per calendar period (a day, an ISO week, a month) in a fixed
    /// offset from UTC: a fixed window whose edges are the calendar's, so "1,000 per day" starts
    /// again at midnight and "50,000 per month" on the 1st, whenever the first request came.
    ///
    /// The period is read from the store's clock (the Redis server's `TIME`; the memory store's
    /// system clock). Months have their real lengths (28 to 31 days, leap years by the Gregorian
    /// rule); weeks start on Monday at 00:00 (ISO 8601), so the first week of a year may start
    /// in December. Only fixed offsets: there are no time zones with daylight saving time (a
    /// zone that changes offset needs a rule per offset, or UTC).
    ///
    /// `Retry-After` and the `RateLimit` field's `t` point at the next boundary;
    /// `RateLimit-Policy`'s `w` is the period's nominal length: 86400 s for a day, 604800 s for
    /// a week and 2592000 s (30 days) for any month. Like any fixed window it admits up to twice
    /// the limit across a boundary (the end of one period and the start of the next).
    Calendar {
        /// Units allowed per period.
        limit: u64,
        /// The period: a day, an ISO week or a month.
        period: Calendar,
        /// The offset from UTC of the clock whose midnight starts a period.
        offset: UtcOffset,
    },
}

/// A calendar period, for [`Rule::calendar`] ([`Strategy::Calendar`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Calendar {
    /// From midnight to midnight.
    Day,
    /// An ISO 8601 week: from Monday 00:00 to the next Monday 00:00.
    Week,
    /// From the 1st at 00:00 to the 1st of the next month (28, 29, 30 or 31 days).
    Month,
}

impl Calendar {
    /// The period's nominal length, as `RateLimit-Policy`'s `w` shows it: a month is 30 days.
    pub fn nominal(self) -> Duration {
        const DAY: u64 = 86_400;
        Duration::from_secs(match self {
            Calendar::Day => DAY,
            Calendar::Week => 7 * DAY,
            Calendar::Month => 30 * DAY,
        })
    }

    fn code(self) -> u64 {
        match self {
            Calendar::Day => 1,
            Calendar::Week => 2,
            Calendar::Month => 3,
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Calendar::Day => "day",
            Calendar::Week => "week",
            Calendar::Month => "month",
        }
    }
}

/// A fixed offset from UTC, in whole minutes, for a [`Calendar`] rule (default: UTC).
///
/// Parsed from `"+05:30"`, `"-08:00"` (also `"+0530"`, `"-08"`), `"Z"` or `"UTC"`, or made with [`UtcOffset::hours`] and
/// [`UtcOffset::minutes`]. No daylight saving time: the offset never changes.
///
/// ```
/// use tower_redis_layers::rate_limit::UtcOffset;
///
/// let india: UtcOffset = "+05:30".parse().unwrap();
/// assert_eq!(india, UtcOffset::minutes(330));
/// assert_eq!(UtcOffset::hours(-8).to_string(), "-08:00");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UtcOffset {
    minutes: i16,
}

impl UtcOffset {
    /// UTC itself.
    pub const UTC: UtcOffset = UtcOffset { minutes: 0 };

    /// `hours` hours east of UTC (negative: west).
    pub const fn hours(hours: i8) -> Self {
        Self {
            minutes: hours as i16 * 60,
        }
    }

    /// `minutes` minutes east of UTC (negative: west). A rule checks that it is less than a
    /// day.
    pub const fn minutes(minutes: i16) -> Self {
        Self { minutes }
    }

    /// Minutes east of UTC.
    pub const fn as_minutes(self) -> i16 {
        self.minutes
    }
}

impl fmt::Display for UtcOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.minutes < 0 { '-' } else { '+' };
        let m = self.minutes.unsigned_abs();
        write!(f, "{sign}{:02}:{:02}", m / 60, m % 60)
    }
}

/// A [`UtcOffset`] that could not be parsed: not `+HH:MM`, `-HH:MM`, `Z` or `UTC`, or a day or
/// more.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid UTC offset {0:?}: expected +HH:MM or -HH:MM (less than 24 hours), Z or UTC")]
pub struct InvalidUtcOffset(String);

impl FromStr for UtcOffset {
    type Err = InvalidUtcOffset;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidUtcOffset(s.to_owned());
        let t = s.trim();
        if t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") {
            return Ok(Self::UTC);
        }
        let (sign, rest) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => return Err(err()),
        };
        // `+HH:MM`, `+HHMM` or `+HH`.
        let (h, m) = match rest.split_once(':') {
            Some(hm) => hm,
            None if rest.len() == 4 && rest.is_ascii() => rest.split_at(2),
            None => (rest, "00"),
        };
        let digits = |v: &str| {
            (!v.is_empty() && v.len() <= 2 && v.bytes().all(|b| b.is_ascii_digit()))
                .then(|| v.parse::<i16>().ok())
                .flatten()
        };
        let (h, m) = (digits(h).ok_or_else(err)?, digits(m).ok_or_else(err)?);
        if h >= 24 || m >= 60 {
            return Err(err());
        }
        Ok(Self::minutes(sign * (h * 60 + m)))
    }
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

    /// `limit` units per calendar `period` (a day, an ISO week, a month), starting again at each
    /// of its boundaries in UTC; [`Rule::utc_offset`] moves the boundaries to another offset.
    ///
    /// ```
    /// use tower_redis_layers::rate_limit::{Calendar, Rule, UtcOffset};
    ///
    /// // 1,000 a day, from midnight to midnight in India.
    /// let daily = Rule::calendar(1_000, Calendar::Day).utc_offset(UtcOffset::minutes(330));
    /// // 50,000 a month, starting on the 1st at 00:00 UTC.
    /// let monthly = Rule::calendar(50_000, Calendar::Month);
    /// # let _ = (daily, monthly);
    /// ```
    pub fn calendar(limit: u64, period: Calendar) -> Self {
        Self::from(Strategy::Calendar {
            limit,
            period,
            offset: UtcOffset::UTC,
        })
    }

    /// The offset from UTC of a [`Rule::calendar`]'s boundaries (default UTC). Other rules
    /// have no calendar: it changes nothing for them.
    pub fn utc_offset(mut self, offset: UtcOffset) -> Self {
        if let Strategy::Calendar { offset: o, .. } = &mut self.strategy {
            *o = offset;
        }
        self
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
            Strategy::Calendar {
                limit,
                period,
                offset,
            } if offset == UtcOffset::UTC => format!("calendar-{limit}-{}", period.noun()),
            Strategy::Calendar {
                limit,
                period,
                offset,
            } => format!("calendar-{limit}-{}-utc{offset}", period.noun()),
        }
    }

    /// The quota advertised in `RateLimit-Policy` (`q`).
    pub fn quota(&self) -> u64 {
        match self.strategy {
            Strategy::FixedWindow { limit, .. }
            | Strategy::SlidingLog { limit, .. }
            | Strategy::SlidingWindow { limit, .. }
            | Strategy::Calendar { limit, .. } => limit,
            Strategy::TokenBucket { capacity, .. } => capacity,
            Strategy::Gcra { burst, .. } => burst,
        }
    }

    /// The window advertised in `RateLimit-Policy` (`w`): the window, for a bucket the time
    /// to refill it from empty, for a calendar period its nominal length (a month is 30 days,
    /// see [`Calendar::nominal`]).
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
            Strategy::Calendar { period, .. } => period.nominal(),
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
        if let Strategy::Calendar { offset, .. } = self.strategy {
            if offset.minutes.unsigned_abs() >= 1440 {
                return Err(format!(
                    "rule {}: the UTC offset must be less than a day",
                    self.policy_name()
                ));
            }
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
            Strategy::Calendar { .. } => 6,
        }
    }

    /// Kind 6, a calendar period: a = limit, b = the nominal length in ms (the scripts compute
    /// the real period from `c`), c = `unit * 10000 + offset minutes + 1440` (unit 1 day, 2 ISO
    /// week, 3 month; the offset is checked to be less than a day, so this is positive).
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
            Strategy::Calendar {
                limit,
                period,
                offset,
            } => {
                let minutes = i64::from(offset.minutes).clamp(-1439, 1439) + 1440;
                let minutes = u64::try_from(minutes).unwrap_or(1440);
                (
                    limit,
                    ms(period.nominal()),
                    period.code() * 10_000 + minutes,
                )
            }
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
    pub rules: RuleStates,
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

/// The states of a [`Decision`]'s rules: a list of [`RuleState`] that holds the states of up to
/// two rules in place, so that deciding a policy of one or two rules allocates nothing (more
/// are kept on the heap). It dereferences to `[RuleState]`.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_layers::store::{RuleState, RuleStates};
///
/// let state = RuleState { remaining: 4, reset: Duration::from_secs(1) };
/// let states: RuleStates = [state, state, state].into_iter().collect();
/// assert_eq!((states.len(), states[2].remaining), (3, 4));
/// assert_eq!(RuleStates::one(state), RuleStates::from(vec![state]));
/// ```
#[derive(Clone)]
pub struct RuleStates(States);

/// How many states a [`RuleStates`] holds in place.
const INLINE_STATES: usize = 2;

#[derive(Clone)]
enum States {
    /// The first `len` states are the list's.
    Inline {
        len: u8,
        states: [RuleState; INLINE_STATES],
    },
    Heap(Vec<RuleState>),
}

/// What fills the unused room of an inline [`RuleStates`].
const NO_STATE: RuleState = RuleState {
    remaining: 0,
    reset: Duration::ZERO,
};

impl RuleStates {
    /// An empty list.
    pub const fn new() -> Self {
        Self(States::Inline {
            len: 0,
            states: [NO_STATE; INLINE_STATES],
        })
    }

    /// The list of one state (a policy of one rule).
    pub const fn one(state: RuleState) -> Self {
        Self(States::Inline {
            len: 1,
            states: [state, NO_STATE],
        })
    }

    /// `count` copies of `state`.
    pub fn repeat(state: RuleState, count: usize) -> Self {
        std::iter::repeat_n(state, count).collect()
    }

    /// Adds `state` at the end.
    pub fn push(&mut self, state: RuleState) {
        match &mut self.0 {
            States::Inline { len, states } => match states.get_mut(usize::from(*len)) {
                Some(slot) => {
                    *slot = state;
                    *len += 1;
                }
                None => {
                    let mut heap = Vec::with_capacity(INLINE_STATES * 2);
                    heap.extend_from_slice(states);
                    heap.push(state);
                    self.0 = States::Heap(heap);
                }
            },
            States::Heap(heap) => heap.push(state),
        }
    }

    /// The states, as a slice.
    pub fn as_slice(&self) -> &[RuleState] {
        match &self.0 {
            States::Inline { len, states } => states.get(..usize::from(*len)).unwrap_or_default(),
            States::Heap(heap) => heap,
        }
    }

    /// The states, as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [RuleState] {
        match &mut self.0 {
            States::Inline { len, states } => {
                states.get_mut(..usize::from(*len)).unwrap_or_default()
            }
            States::Heap(heap) => heap,
        }
    }
}

impl Default for RuleStates {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for RuleStates {
    type Target = [RuleState];

    fn deref(&self) -> &[RuleState] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for RuleStates {
    fn deref_mut(&mut self) -> &mut [RuleState] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for RuleStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl PartialEq for RuleStates {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for RuleStates {}

impl FromIterator<RuleState> for RuleStates {
    fn from_iter<I: IntoIterator<Item = RuleState>>(iter: I) -> Self {
        let mut states = Self::new();
        for state in iter {
            states.push(state);
        }
        states
    }
}

impl From<Vec<RuleState>> for RuleStates {
    fn from(states: Vec<RuleState>) -> Self {
        if states.len() <= INLINE_STATES {
            states.into_iter().collect()
        } else {
            Self(States::Heap(states))
        }
    }
}

impl From<RuleStates> for Vec<RuleState> {
    fn from(states: RuleStates) -> Self {
        match states.0 {
            States::Heap(heap) => heap,
            States::Inline { .. } => states.as_slice().to_vec(),
        }
    }
}

impl<'a> IntoIterator for &'a RuleStates {
    type Item = &'a RuleState;
    type IntoIter = std::slice::Iter<'a, RuleState>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl<'a> IntoIterator for &'a mut RuleStates {
    type Item = &'a mut RuleState;
    type IntoIter = std::slice::IterMut<'a, RuleState>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_mut_slice().iter_mut()
    }
}

impl IntoIterator for RuleStates {
    type Item = RuleState;
    type IntoIter = RuleStatesIntoIter;

    fn into_iter(self) -> RuleStatesIntoIter {
        RuleStatesIntoIter {
            states: self,
            next: 0,
        }
    }
}

/// The states of a [`RuleStates`], by value.
#[derive(Debug, Clone)]
pub struct RuleStatesIntoIter {
    states: RuleStates,
    next: usize,
}

impl Iterator for RuleStatesIntoIter {
    type Item = RuleState;

    fn next(&mut self) -> Option<RuleState> {
        let state = self.states.as_slice().get(self.next).copied()?;
        self.next += 1;
        Some(state)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.states.len().saturating_sub(self.next);
        (left, Some(left))
    }
}

impl ExactSizeIterator for RuleStatesIntoIter {}

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

    /// Settles a metered request that an earlier [`check`](Self::check) admitted at an
    /// estimated cost: charges (`delta > 0`) or refunds (`delta < 0`) the difference between
    /// its actual cost and the estimate, on every rule of the check at once (see
    /// [`RateSettlement`] for what each strategy does). Nothing is denied: a charge may push a
    /// key past its limit, and later requests wait longer.
    ///
    /// The default (for a store that predates settlement) changes nothing and answers
    /// [`StoreError::Invalid`], so the layer logs that the estimate stands; a store of its own
    /// implements it to meter costs, and runs the conformance suite
    /// `conformance::rate_limit_settlement_suite` (feature `test-support`) against it.
    fn settle(&self, settlement: RateSettlement<'_>) -> super::StoreFuture<()> {
        let _ = settlement;
        Box::pin(std::future::ready(Err(StoreError::Invalid(
            "this rate-limit store does not settle metered costs; the estimate stands".into(),
        ))))
    }

    /// Settles at once when the store can do it without waiting (an in-process store), as
    /// [`check_now`](Self::check_now) does for a check. `None` (the default) sends the
    /// settlement through [`RateLimitStore::settle`].
    fn settle_now(&self, settlement: RateSettlement<'_>) -> Option<Result<(), StoreError>> {
        let _ = settlement;
        None
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

    fn settle(&self, settlement: RateSettlement<'_>) -> super::StoreFuture<()> {
        (**self).settle(settlement)
    }

    fn settle_now(&self, settlement: RateSettlement<'_>) -> Option<Result<(), StoreError>> {
        (**self).settle_now(settlement)
    }

    fn reset(&self, key: &StoreKey, rules: &[Rule]) -> StoreFuture<()> {
        (**self).reset(key, rules)
    }

    fn set_override(&self, key: &StoreKey, state: Option<Override>) -> StoreFuture<()> {
        (**self).set_override(key, state)
    }
}

/// A settlement of a metered request: the difference between its actual cost and the estimate
/// that its [`RateCheck`] consumed, applied to the same key and rules.
///
/// What each strategy does with it:
///
/// - fixed window: the counter of the window the check counted in goes up by `delta` (down for
///   a refund, never below 0). When that window has already ended (its counter expired, or a
///   new window started more recently than `age` ago), nothing changes: an old request is not
///   charged to a fresh window, and a fresh window is not handed units it never gave;
/// - token bucket: the bucket, refilled up to now, loses `delta` tokens (it may go below zero:
///   the debt is paid back by the refill before the next request passes), or gets `-delta`
///   back, never more than its capacity;
/// - GCRA: the theoretical arrival time moves by `delta` emission intervals (from now at the
///   earliest), or back by `-delta`, never before now;
/// - calendar: as a fixed window, the count of the calendar period the check counted in (not
///   a later period's);
/// - sliding log and sliding window: left as they are (the layer refuses a metered policy with
///   such a rule).
///
/// A settlement is not idempotent: a store must apply it once (as a check).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RateSettlement<'a> {
    /// The key of the check being settled.
    pub key: &'a StoreKey,
    /// The rules of the check being settled.
    pub rules: &'a [Rule],
    /// Units to charge (positive) or refund (negative).
    pub delta: i64,
    /// How long ago the check was answered, at least (measured by the caller from the moment it
    /// received the answer): a fixed window that started more recently than this is not the
    /// check's window.
    pub age: Duration,
}

impl<'a> RateSettlement<'a> {
    /// A settlement of `delta` units (a charge when positive, a refund when negative) for a
    /// check of `rules` for `key` answered `age` ago.
    pub fn new(key: &'a StoreKey, rules: &'a [Rule], delta: i64, age: Duration) -> Self {
        Self {
            key,
            rules,
            delta: delta.clamp(-(MAX_NUMBER as i64), MAX_NUMBER as i64),
            age,
        }
    }

    /// Whether the settlement can be skipped (nothing to charge or refund).
    pub fn is_empty(&self) -> bool {
        self.delta == 0
    }
}

impl Strategy {
    /// Whether a metered cost can be settled on a rule of this strategy after the response
    /// (fixed window, token bucket, GCRA, calendar); see [`RateSettlement`].
    pub fn settles(&self) -> bool {
        matches!(
            self,
            Strategy::FixedWindow { .. }
                | Strategy::TokenBucket { .. }
                | Strategy::Gcra { .. }
                | Strategy::Calendar { .. }
        )
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

// Leased quotas: a replica takes a batch of units in one call and admits from it locally.

/// A request for a batch of units of one rule, debited from the store before any is used (see
/// [`RateLeaseStore::lease`]).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RateLease<'a> {
    /// The hashed key of the caller (already namespaced by the policy).
    pub key: &'a StoreKey,
    /// The rule leased from: a fixed window, a token bucket or a GCRA rule.
    pub rule: &'a Rule,
    /// Units the caller needs now: granted in full, or nothing (a denial, as a check's).
    pub need: u64,
    /// The batch the replica asks for (at least `need`). The store grants less when the key is
    /// near its limit: at most `need + (remaining after need) / (2 × replicas seen recently)`.
    pub want: u64,
    /// The id of the replica asking (a random id per [`Leased`](crate::rate_limit::Leased)),
    /// to count the replicas that lease the key.
    pub replica: &'a str,
}

impl<'a> RateLease<'a> {
    /// A lease of `need` units, and up to `want`, of `rule` for `key`, by `replica`.
    pub fn new(key: &'a StoreKey, rule: &'a Rule, need: u64, want: u64, replica: &'a str) -> Self {
        Self {
            key,
            rule,
            need,
            want: want.max(need),
            replica,
        }
    }
}

/// A store's answer to a [`RateLease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseGrant {
    /// `units` (at least the `need`) were debited from the rule: the caller may admit them.
    Granted {
        /// Units debited for the caller.
        units: u64,
        /// What the rule has left after the grant.
        remaining: u64,
        /// Time until the rule's quota is fully available again.
        reset: Duration,
        /// For a fixed window: how long its window has left (the units die with it). Zero for
        /// the other strategies.
        window_left: Duration,
        /// Replicas that leased the key recently, this one included.
        replicas: u64,
    },
    /// The rule cannot give `need` units: nothing was debited.
    Denied {
        /// How long until `need` units can be given.
        retry_after: Duration,
        /// What the rule has left.
        remaining: u64,
        /// Time until the rule's quota is fully available again.
        reset: Duration,
    },
    /// The key has an [`Override`]: the caller checks each request directly instead.
    Overridden,
}

/// A [`RateLimitStore`] that also leases batches of units (fixed window, token bucket and GCRA
/// rules), for [`Leased`](crate::rate_limit::Leased).
///
/// A lease is atomic like a check: the units are debited in the same call that decides.
pub trait RateLeaseStore: RateLimitStore {
    /// Debits `lease.need` units, and more up to `lease.want` while the rule is far from its
    /// limit, or nothing.
    fn lease(&self, lease: RateLease<'_>) -> StoreFuture<LeaseGrant>;
}

impl<T: RateLeaseStore> RateLeaseStore for std::sync::Arc<T> {
    fn lease(&self, lease: RateLease<'_>) -> StoreFuture<LeaseGrant> {
        (**self).lease(lease)
    }
}

impl Strategy {
    /// Whether a rule of this strategy can be leased (fixed window, token bucket, GCRA).
    pub fn leases(&self) -> bool {
        matches!(
            self,
            Strategy::FixedWindow { .. } | Strategy::TokenBucket { .. } | Strategy::Gcra { .. }
        )
    }
}
