//! Rate limiting in the in-process store, with the same semantics as the rate-limit scripts.

use std::{
    collections::VecDeque,
    future::{ready, Ready},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use portable_atomic::AtomicU128;

use super::{Map, MemoryStore, SWEEP_EVERY_US};
use crate::{
    store::{
        Decision, Override, RateCheck, RateLimitStore, RateSettlement, Rule, RuleState, RuleStates,
        StoreError, StoreFuture, Strategy,
    },
    StoreKey,
};

type SlotKey = (StoreKey, u8, u64, u64, u64);

#[derive(Default)]
pub(super) struct Shard {
    map: Map<SlotKey, Slot>,
    /// How many override slots `map` holds (expired ones not yet swept included): while none
    /// does, which is the usual case, a check does not look for its key's override.
    overrides: usize,
    next_sweep: u64,
    len_after_sweep: usize,
}

struct Slot {
    state: State,
    /// Microseconds (store clock) after which the slot is as good as absent (a GCRA cell also
    /// lives while its TAT is ahead, see [`Slot::live`]).
    expires_at: u64,
}

impl Slot {
    /// Whether the slot still holds state at `now`. A GCRA cell is updated in place (its TAT,
    /// with a compare-and-swap under the shared lock), so its `expires_at` may lag: it lives
    /// while its TAT is ahead of `now`. A TAT at or before `now` means the same as no state.
    fn live(&self, now: u64) -> bool {
        self.expires_at > now
            || match &self.state {
                State::Tat(t) => t.load(Ordering::Acquire) > now,
                State::Bucket { full_at, .. } => full_at.load(Ordering::Acquire) > now,
                _ => false,
            }
    }
}

enum State {
    Counter(u64),
    Log {
        entries: VecDeque<(u64, u64)>,
        total: u64,
    },
    Window {
        idx: u64,
        cur: u64,
        prev: u64,
    },
    /// A token bucket: its tokens and the time they were counted, in one lock-free cell (see
    /// [`pack`]), and when it is full again (its expiry, moved on by whoever updates the cell).
    Bucket {
        cell: AtomicU128,
        full_at: AtomicU64,
    },
    /// GCRA's theoretical arrival time: a lock-free cell (see [`MemoryStore::decide_gcra`]).
    Tat(AtomicU64),
    /// A calendar counter: the first day of its period (days since the epoch) and units used.
    Period {
        first: i64,
        used: u64,
    },
    /// The override of a key (see [`override_slot`]): blocked, or allowed.
    Override {
        allow: bool,
    },
}

impl MemoryStore {
    fn decide(&self, check: &RateCheck<'_>) -> Result<Decision, StoreError> {
        if let [rule] = check.rules {
            if matches!(
                rule.strategy(),
                Strategy::Gcra { .. } | Strategy::TokenBucket { .. }
            ) {
                if let Some(decision) = self.decide_cell(check, rule) {
                    return decision;
                }
            }
        }
        let mut shard = self.inner.rate_limit.lock(check.key)?;
        let now = self.now_us();
        let wall = self.inner.clock.wall_us(now);
        shard.maybe_sweep(now);

        // The key's override decides first, as at the head of the scripts.
        let cost = match overridden(&shard, check.key, now) {
            Some(Err(left)) => return Ok(blocked(check.rules.len(), left)),
            Some(Ok(())) => 0,
            None => check.cost,
        };
        let mut states = RuleStates::new();
        let mut allowed = true;
        let mut denied_by = None;
        let mut wait = 0.0_f64;
        // One rule (the common case): decide and write in one pass.
        let mut single_plan = None;
        for (i, rule) in check.rules.iter().enumerate() {
            let slot_key = slot_key(check.key, rule);
            let slot = shard.map.get(&slot_key).filter(|s| s.live(now));
            let eval = evaluate(rule, slot, now, wall, cost);
            if !eval.ok {
                allowed = false;
                if denied_by.is_none() || eval.retry > wait {
                    wait = eval.retry;
                    denied_by = Some(i);
                }
            }
            states.push(RuleState {
                // Several rules take nothing unless all admit: until then, a rule that admits
                // reports what it has now (its cost is taken below, when every rule admitted).
                remaining: if eval.ok && check.rules.len() > 1 {
                    eval.remaining + cost
                } else {
                    eval.remaining
                },
                reset: us_to_duration(eval.reset),
            });
            if check.rules.len() == 1 {
                single_plan = Some((slot_key, eval.plan));
            }
        }
        if allowed && cost > 0 {
            if let Some((slot_key, plan)) = single_plan {
                apply(&mut shard.map, slot_key, plan, now, cost);
            } else {
                // Several rules: every one allowed, so evaluate each again (the state did not
                // change under the lock) and write it. No list of plans is kept.
                for (rule, state) in check.rules.iter().zip(states.iter_mut()) {
                    let slot_key = slot_key(check.key, rule);
                    let slot = shard.map.get(&slot_key).filter(|s| s.live(now));
                    let eval = evaluate(rule, slot, now, wall, cost);
                    state.remaining = eval.remaining;
                    apply(&mut shard.map, slot_key, eval.plan, now, cost);
                }
            }
        }
        Ok(Decision {
            allowed,
            denied_by,
            retry_after: if allowed {
                Duration::ZERO
            } else {
                us_to_duration(wait)
            },
            rules: states,
        })
    }
}

impl MemoryStore {
    /// A single GCRA or token-bucket rule on a key that has its cell already: decided under the
    /// shard's shared lock, the cell (GCRA's TAT, the bucket's tokens and time) moved with a
    /// compare-and-swap (retried if another thread moved it first), so threads deciding for one
    /// hot key never wait for each other. `None` when the key has no cell yet: the caller
    /// decides under the exclusive lock, which creates it.
    fn decide_cell(
        &self,
        check: &RateCheck<'_>,
        rule: &Rule,
    ) -> Option<Result<Decision, StoreError>> {
        let shard = match self.inner.rate_limit.read(check.key) {
            Ok(shard) => shard,
            Err(e) => return Some(Err(e)),
        };
        let now = self.now_us();
        let cost = match overridden(&shard, check.key, now) {
            Some(Err(left)) => return Some(Ok(blocked(1, left))),
            Some(Ok(())) => 0,
            None => check.cost,
        };
        let slot = shard.map.get(&slot_key(check.key, rule))?;
        let (a, period_ms, c) = rule.encode();
        let input = Input {
            slot: None,
            a,
            c,
            period: period_ms * 1000,
            now,
            wall: 0,
            cost,
        };
        let cell = match &slot.state {
            State::Tat(cell) => cell,
            State::Bucket { cell, full_at } => {
                return Some(Ok(bucket_cell(cell, full_at, input)));
            }
            _ => return None,
        };
        let mut tat = cell.load(Ordering::Acquire);
        loop {
            let g = gcra_answer(&input, Some(tat));
            if !g.ok || cost == 0 {
                return Some(Ok(decided(g.ok, g.remaining, g.reset, g.retry)));
            }
            match cell.compare_exchange_weak(tat, g.tat, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Ok(decided(true, g.remaining, g.reset, 0.0))),
                Err(actual) => tat = actual,
            }
        }
    }
}

/// A token bucket decided on its cell (see [`MemoryStore::decide_cell`]).
fn bucket_cell(cell: &AtomicU128, full_at: &AtomicU64, mut input: Input<'_>) -> Decision {
    let now = input.now;
    let mut current = cell.load(Ordering::Acquire);
    loop {
        let (tokens, ts) = unpack(current);
        // Another thread may have counted the tokens a little later than this one read the
        // clock: count from its time, never back (which would refill the same time twice).
        input.now = now.max(ts);
        let eval = token_bucket_at(&input, Some((tokens, ts)));
        let (new, until) = match &eval.plan {
            Some(Plan::Replace(Slot {
                state: State::Bucket { cell, .. },
                expires_at,
            })) if eval.ok && input.cost > 0 => (cell.load(Ordering::Relaxed), *expires_at),
            _ => return single(eval),
        };
        match cell.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                full_at.fetch_max(until, Ordering::AcqRel);
                return single(eval);
            }
            Err(actual) => current = actual,
        }
    }
}

/// A token bucket's state in one 128-bit word: the bits of its tokens (`f64`) above the time
/// they were counted (store µs).
fn pack(tokens: f64, ts: u64) -> u128 {
    (u128::from(tokens.to_bits()) << 64) | u128::from(ts)
}

/// The tokens and time of a packed bucket (see [`pack`]).
fn unpack(cell: u128) -> (f64, u64) {
    // Truncations intended: the high and the low 64 bits.
    (f64::from_bits((cell >> 64) as u64), cell as u64)
}

/// A token bucket's state, full again at `full_at`.
fn bucket(tokens: f64, ts: u64, full_at: u64) -> State {
    State::Bucket {
        cell: AtomicU128::new(pack(tokens, ts)),
        full_at: AtomicU64::new(full_at),
    }
}

/// The tokens and time of a bucket state.
fn bucket_of(state: Option<&State>) -> Option<(f64, u64)> {
    match state {
        Some(State::Bucket { cell, .. }) => Some(unpack(cell.load(Ordering::Acquire))),
        _ => None,
    }
}

/// The decision of a single rule's evaluation.
fn single(eval: Eval) -> Decision {
    decided(eval.ok, eval.remaining, eval.reset, eval.retry)
}

/// The decision of a single rule: admitted (or not), with so many units left, full again in
/// `reset` µs, and (denied) a request of the same cost may pass in `retry` µs.
fn decided(ok: bool, remaining: u64, reset: f64, retry: f64) -> Decision {
    Decision {
        allowed: ok,
        denied_by: (!ok).then_some(0),
        retry_after: if ok {
            Duration::ZERO
        } else {
            us_to_duration(retry)
        },
        rules: RuleStates::one(RuleState {
            remaining,
            reset: us_to_duration(reset),
        }),
    }
}

impl RateLimitStore for MemoryStore {
    type Future = Ready<Result<Decision, StoreError>>;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        ready(self.decide(&check))
    }

    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        Some(self.decide(&check))
    }

    fn is_remote(&self) -> bool {
        false
    }

    fn settle(&self, settlement: RateSettlement<'_>) -> StoreFuture<()> {
        Box::pin(ready(self.settle_rules(&settlement)))
    }

    fn settle_now(&self, settlement: RateSettlement<'_>) -> Option<Result<(), StoreError>> {
        Some(self.settle_rules(&settlement))
    }

    fn reset(&self, key: &StoreKey, rules: &[Rule]) -> StoreFuture<()> {
        Box::pin(ready(self.reset_key(key, rules)))
    }

    fn set_override(&self, key: &StoreKey, state: Option<Override>) -> StoreFuture<()> {
        Box::pin(ready(self.override_key(key, state)))
    }
}

impl Shard {
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    fn maybe_sweep(&mut self, now: u64) {
        if now >= self.next_sweep || self.map.len() > 2 * self.len_after_sweep + 1024 {
            self.sweep(now);
        }
    }

    pub(super) fn sweep(&mut self, now: u64) {
        let mut overrides = self.overrides;
        self.map.retain(|key, slot| {
            let live = slot.live(now);
            if !live && is_override(key) {
                overrides -= 1;
            }
            live
        });
        self.overrides = overrides;
        if self.map.capacity() > 4 * self.map.len() + 64 {
            self.map.shrink_to_fit();
        }
        self.len_after_sweep = self.map.len();
        self.next_sweep = now + SWEEP_EVERY_US;
    }
}

fn slot_key(key: &StoreKey, rule: &Rule) -> SlotKey {
    let (a, b, c) = rule.encode();
    (*key, rule.kind(), a, b, c)
}

fn apply(map: &mut Map<SlotKey, Slot>, key: SlotKey, plan: Option<Plan>, now: u64, cost: u64) {
    match plan {
        Some(Plan::Replace(slot)) => {
            map.insert(key, slot);
        }
        Some(Plan::LogPush { period }) => push_log(map, key, now, cost, period),
        None => {}
    }
}

fn push_log(map: &mut Map<SlotKey, Slot>, key: SlotKey, now: u64, cost: u64, period: u64) {
    let slot = map.entry(key).or_insert_with(|| Slot {
        state: State::Log {
            entries: VecDeque::new(),
            total: 0,
        },
        expires_at: 0,
    });
    if slot.expires_at <= now || !matches!(slot.state, State::Log { .. }) {
        slot.state = State::Log {
            entries: VecDeque::new(),
            total: 0,
        };
    }
    if let State::Log { entries, total } = &mut slot.state {
        while let Some((t, n)) = entries.front().copied() {
            if t + period > now {
                break;
            }
            entries.pop_front();
            *total -= n;
        }
        entries.push_back((now, cost));
        *total += cost;
    }
    slot.expires_at = now + period;
}

fn us_to_duration(us: f64) -> Duration {
    // Milliseconds, rounded up, like the script.
    Duration::from_millis(ceil_u64(us.max(0.0) / 1000.0))
}

struct Eval {
    ok: bool,
    remaining: u64,
    reset: f64,
    retry: f64,
    plan: Option<Plan>,
}

impl Eval {
    /// Admitted: `remaining` left after this call, `plan` writes the new state.
    fn allow(remaining: u64, reset: f64, plan: Plan) -> Self {
        Self {
            ok: true,
            remaining,
            reset,
            retry: 0.0,
            plan: Some(plan),
        }
    }

    /// Denied: `remaining` left, and a call of the same cost may pass after `retry`.
    fn deny(remaining: u64, reset: f64, retry: f64) -> Self {
        Self {
            ok: false,
            remaining,
            reset,
            retry,
            plan: None,
        }
    }
}

enum Plan {
    Replace(Slot),
    LogPush { period: u64 },
}

/// The new state of a slot, expiring at `expires_at`.
fn replace(state: State, expires_at: u64) -> Plan {
    Plan::Replace(Slot { state, expires_at })
}

/// What a strategy decides from: the rule's numbers in wire form (`a` and `c`, and the period
/// in microseconds), the slot, and the call (time in microseconds, cost). Times are `f64`
/// where the strategy divides them.
struct Input<'a> {
    slot: Option<&'a Slot>,
    a: u64,
    c: u64,
    period: u64,
    now: u64,
    /// The civil time (µs since the Unix epoch), for calendar rules.
    wall: u64,
    cost: u64,
}

impl Input<'_> {
    fn state(&self) -> Option<&State> {
        self.slot.map(|s| &s.state)
    }

    /// The period, as `f64` microseconds.
    fn pf(&self) -> f64 {
        self.period as f64
    }

    /// A call that costs more than the limit never passes: it is told to wait a whole period.
    fn over_limit(&self, limit: u64) -> bool {
        self.cost > limit
    }
}

fn evaluate(rule: &Rule, slot: Option<&Slot>, now: u64, wall: u64, cost: u64) -> Eval {
    let (a, period_ms, c) = rule.encode();
    let input = Input {
        slot,
        a,
        c,
        period: period_ms * 1000,
        now,
        wall,
        cost,
    };
    match rule.strategy() {
        Strategy::FixedWindow { .. } => fixed_window(&input),
        Strategy::SlidingLog { .. } => sliding_log(&input),
        Strategy::SlidingWindow { .. } => sliding_window(&input),
        Strategy::TokenBucket { .. } => token_bucket(&input),
        Strategy::Gcra { .. } => gcra(&input),
        Strategy::Calendar { .. } => calendar(&input),
    }
}

/// A fixed window: a counter that expires with its window.
fn fixed_window(i: &Input<'_>) -> Eval {
    let (used, end) = match i.slot {
        Some(Slot {
            state: State::Counter(n),
            expires_at,
        }) => (*n, Some(*expires_at)),
        _ => (0, None),
    };
    let ttl = end.map_or(i.pf(), |e| e.saturating_sub(i.now) as f64);
    if used + i.cost <= i.a {
        let expires_at = end.unwrap_or(i.now + i.period);
        let plan = replace(State::Counter(used + i.cost), expires_at);
        Eval::allow(i.a - used - i.cost, ttl, plan)
    } else {
        let retry = if i.over_limit(i.a) { i.pf() } else { ttl };
        Eval::deny(i.a.saturating_sub(used), ttl, retry)
    }
}

/// The exact sliding log: one entry per admitted request, oldest first.
fn sliding_log(i: &Input<'_>) -> Eval {
    let (a, period, now, cost) = (i.a, i.period, i.now, i.cost);
    let empty = VecDeque::new();
    let (entries, total) = match i.state() {
        Some(State::Log { entries, total }) => (entries, *total),
        _ => (&empty, 0),
    };
    // Entries older than the window no longer count; they sit at the front.
    let expired = entries.iter().take_while(|(t, _)| t + period <= now);
    let (gone, gone_units) = expired.fold((0usize, 0u64), |(k, u), (_, n)| (k + 1, u + n));
    let count = total - gone_units;
    let ok = count + cost <= a;
    let reset = match entries.get(gone) {
        Some((t, _)) => (t + period - now) as f64,
        None if ok && cost > 0 => i.pf(),
        None => 0.0,
    };
    if ok {
        return Eval::allow(a - count - cost, reset, Plan::LogPush { period });
    }
    let retry = if i.over_limit(a) {
        i.pf()
    } else {
        // The (count + cost - a)-th oldest unit must leave the window.
        let mut need = count + cost - a;
        let mut at = now;
        for (t, n) in entries.iter().skip(gone) {
            at = *t;
            if *n >= need {
                break;
            }
            need -= n;
        }
        (at + period - now) as f64
    };
    Eval::deny(a.saturating_sub(count), reset, retry)
}

/// The approximate sliding window: the current and the previous fixed window.
fn sliding_window(i: &Input<'_>) -> Eval {
    let (af, pf, costf) = (i.a as f64, i.pf(), i.cost as f64);
    let idx = i.now / i.period;
    let elapsed = (i.now - idx * i.period) as f64;
    let (cur, prev) = match i.state() {
        Some(State::Window { idx: w, cur, prev }) if *w == idx => (*cur, *prev),
        Some(State::Window { idx: w, cur, .. }) if *w + 1 == idx => (0, *cur),
        _ => (0, 0),
    };
    let est = prev as f64 * (1.0 - elapsed / pf) + cur as f64;
    let reset = pf - elapsed;
    if est + costf <= af {
        let window = State::Window {
            idx,
            cur: cur + i.cost,
            prev,
        };
        let plan = replace(window, (idx + 2) * i.period);
        return Eval::allow((af - est - costf).floor().max(0.0) as u64, reset, plan);
    }
    let retry = if i.over_limit(i.a) {
        pf
    } else if cur + i.cost <= i.a {
        pf * (1.0 - (af - cur as f64 - costf) / prev as f64) - elapsed
    } else {
        let into_next = if cur > 0 {
            pf * (1.0 - (af - costf) / cur as f64)
        } else {
            0.0
        };
        (pf - elapsed) + into_next.max(0.0)
    };
    Eval::deny((af - est).floor().max(0.0) as u64, reset, retry)
}

/// A token bucket: tokens and the time they were counted.
fn token_bucket(i: &Input<'_>) -> Eval {
    token_bucket_at(i, bucket_of(i.state()))
}

/// A token bucket from its stored tokens and time (`None`: no state, a full bucket).
fn token_bucket_at(i: &Input<'_>, state: Option<(f64, u64)>) -> Eval {
    let (capacity, costf) = (i.a as f64, i.cost as f64);
    let per_us = i.c as f64 / i.pf();
    let tokens = match state {
        Some((tokens, ts)) => capacity.min(tokens + i.now.saturating_sub(ts) as f64 * per_us),
        None => capacity,
    };
    if tokens >= costf {
        let left = tokens - costf;
        let full = (capacity - left) / per_us;
        let expires_at = i.now + (full.ceil() as u64).max(1000);
        let plan = replace(bucket(left, i.now, expires_at), expires_at);
        return Eval::allow(left.floor() as u64, full, plan);
    }
    let retry = if i.over_limit(i.a) {
        i.pf()
    } else {
        (costf - tokens) / per_us
    };
    Eval::deny(tokens.floor() as u64, (capacity - tokens) / per_us, retry)
}

/// GCRA: the theoretical arrival time.
fn gcra(i: &Input<'_>) -> Eval {
    let tat = match i.state() {
        Some(State::Tat(t)) => Some(t.load(Ordering::Acquire)),
        _ => None,
    };
    gcra_at(i, tat)
}

/// GCRA from a stored TAT (`None`: no state).
fn gcra_at(i: &Input<'_>, tat: Option<u64>) -> Eval {
    let g = gcra_answer(i, tat);
    if g.ok {
        let plan = replace(State::Tat(AtomicU64::new(g.tat)), g.tat.max(i.now + 1000));
        return Eval::allow(g.remaining, g.reset, plan);
    }
    Eval::deny(g.remaining, g.reset, g.retry)
}

/// GCRA's answer for a TAT (`None`: no state), before anything is written: what
/// [`gcra_at`] plans, and what the lock-free cell ([`MemoryStore::decide_cell`]) swaps in.
struct Gcra {
    ok: bool,
    /// The TAT to store when admitted.
    tat: u64,
    remaining: u64,
    reset: f64,
    retry: f64,
}

fn gcra_answer(i: &Input<'_>, tat: Option<u64>) -> Gcra {
    let now = i.now as f64;
    let interval = i.pf() / i.a as f64;
    let burst = i.c as f64 * interval;
    let tat = tat.map_or(now, |t| (t as f64).max(now));
    let new_tat = tat + i.cost as f64 * interval;
    let allow_at = new_tat - burst;
    if allow_at <= now {
        return Gcra {
            ok: true,
            tat: ceil_u64(new_tat),
            // A cast to `u64` truncates (saturating, 0 below 0): the floor of what is not
            // negative.
            remaining: ((now - allow_at) / interval) as u64,
            reset: new_tat - now,
            retry: 0.0,
        };
    }
    let retry = if i.over_limit(i.c) {
        i.pf()
    } else {
        allow_at - now
    };
    Gcra {
        ok: false,
        tat: 0,
        remaining: ((now - (tat - burst)) / interval) as u64,
        reset: tat - now,
        retry,
    }
}

/// `x.ceil() as u64` without a call to `ceil` (the baseline x86-64 target has no instruction
/// for it): the same for every `x`, NaN and negative values (0) and the saturation included.
#[inline]
fn ceil_u64(x: f64) -> u64 {
    let t = x as u64;
    if (t as f64) < x {
        t.saturating_add(1)
    } else {
        t
    }
}

/// A calendar period: a counter of the period that holds the civil time, expiring at its end.
fn calendar(i: &Input<'_>) -> Eval {
    let wall = i64::try_from(i.wall).unwrap_or(i64::MAX / 2);
    let (first, end) = calendar_period(wall, i.c);
    let used = match i.state() {
        Some(State::Period { first: f, used }) if *f == first => *used,
        _ => 0,
    };
    let left = u64::try_from(end.saturating_sub(wall)).unwrap_or(0);
    let reset = left as f64;
    if used + i.cost <= i.a {
        let state = State::Period {
            first,
            used: used + i.cost,
        };
        Eval::allow(i.a - used - i.cost, reset, replace(state, i.now + left))
    } else {
        Eval::deny(i.a.saturating_sub(used), reset, reset)
    }
}

const DAY_US: i64 = 86_400_000_000;

/// The calendar period that holds `now` (µs since the Unix epoch) for a rule's wire `spec`
/// (`unit * 10000 + offset minutes + 1440`, see `Rule::encode`): its first day (days since the
/// epoch, on the offset's clock) and its end (µs since the epoch). The same arithmetic as
/// `calendar.lua`.
pub(crate) fn calendar_period(now: i64, spec: u64) -> (i64, i64) {
    let unit = spec / 10_000;
    let offset = offset_us(spec);
    let day = (now + offset).div_euclid(DAY_US);
    let (first, after) = match unit {
        2 => {
            // 1970-01-01 was a Thursday: Monday is the day where (day + 3) % 7 == 0.
            let first = day - (day + 3).rem_euclid(7);
            (first, first + 7)
        }
        3 => {
            let (y, m, d) = civil_from_days(day);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (day - (d - 1), days_from_civil(ny, nm, 1))
        }
        _ => (day, day + 1),
    };
    (first, after * DAY_US - offset)
}

/// The start (µs since the Unix epoch) of the calendar period whose first day is `first`.
fn period_start(first: i64, spec: u64) -> i64 {
    first * DAY_US - offset_us(spec)
}

/// The offset of a calendar `spec`, in µs.
fn offset_us(spec: u64) -> i64 {
    (i64::try_from(spec % 10_000).unwrap_or(1440) - 1440) * 60_000_000
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date (year, month, day) of a day since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl MemoryStore {
    /// Applies a settlement to every rule, as the settle script does.
    fn settle_rules(&self, settlement: &RateSettlement<'_>) -> Result<(), StoreError> {
        if settlement.delta == 0 {
            return Ok(());
        }
        let mut shard = self.inner.rate_limit.lock(settlement.key)?;
        let now = self.now_us();
        // An allowed key's requests consumed nothing: nothing to settle.
        if let Some(Ok(())) = overridden(&shard, settlement.key, now) {
            return Ok(());
        }
        let wall = self.inner.clock.wall_us(now);
        let age = u64::try_from(settlement.age.as_micros()).unwrap_or(u64::MAX);
        for rule in settlement.rules {
            let key = slot_key(settlement.key, rule);
            let slot = shard.map.get(&key).filter(|s| s.live(now));
            match settle(rule, slot, (now, wall), age, settlement.delta) {
                Settled::Keep => {}
                Settled::Set(slot) => {
                    shard.map.insert(key, slot);
                }
                Settled::Remove => {
                    shard.map.remove(&key);
                }
            }
        }
        Ok(())
    }
}

/// What a settlement does to one rule's slot.
enum Settled {
    /// Leave it as it is.
    Keep,
    /// Replace it.
    Set(Slot),
    /// Back to the initial state (a full bucket, a TAT of now): as good as absent.
    Remove,
}

/// The state of one rule after a settlement of `delta` units for a check answered at least
/// `age` µs ago, at the store time `now` and the civil time `wall` (for calendar rules).
fn settle(
    rule: &Rule,
    slot: Option<&Slot>,
    (now, wall): (u64, u64),
    age: u64,
    delta: i64,
) -> Settled {
    let (a, period_ms, c) = rule.encode();
    let period = period_ms * 1000;
    let deltaf = delta as f64;
    match rule.strategy() {
        Strategy::FixedWindow { .. } => {
            let Some(Slot {
                state: State::Counter(used),
                expires_at,
            }) = slot
            else {
                // The check's window ended: nothing to charge or refund.
                return Settled::Keep;
            };
            let started = expires_at.saturating_sub(period);
            if now.saturating_sub(age) < started {
                // A newer window: the check counted in one that ended.
                return Settled::Keep;
            }
            let used = used.saturating_add_signed(delta);
            Settled::Set(Slot {
                state: State::Counter(used),
                expires_at: *expires_at,
            })
        }
        Strategy::TokenBucket { .. } => {
            let (capacity, per_us) = (a as f64, c as f64 / period as f64);
            let tokens = match bucket_of(slot.map(|s| &s.state)) {
                Some((tokens, ts)) => capacity.min(tokens + now.saturating_sub(ts) as f64 * per_us),
                None => capacity,
            };
            let left = capacity.min(tokens - deltaf);
            if left >= capacity {
                return Settled::Remove;
            }
            let full = (capacity - left) / per_us;
            let expires_at = now + (full.ceil() as u64).max(1000);
            Settled::Set(Slot {
                state: bucket(left, now, expires_at),
                expires_at,
            })
        }
        Strategy::Gcra { .. } => {
            let interval = period as f64 / a as f64;
            let tat = match slot.map(|s| &s.state) {
                Some(State::Tat(t)) => t.load(Ordering::Acquire).max(now),
                _ => now,
            };
            let moved = (tat as f64 + deltaf * interval).ceil();
            if moved <= now as f64 {
                return Settled::Remove;
            }
            let stored = moved as u64;
            Settled::Set(Slot {
                state: State::Tat(AtomicU64::new(stored)),
                expires_at: stored.max(now + 1000),
            })
        }
        Strategy::Calendar { .. } => {
            let wall = i64::try_from(wall).unwrap_or(i64::MAX / 2);
            let (first, _) = calendar_period(wall, c);
            let Some(Slot {
                state: State::Period { first: f, used },
                expires_at,
            }) = slot
            else {
                return Settled::Keep;
            };
            let age = i64::try_from(age).unwrap_or(i64::MAX / 2);
            if *f != first || wall.saturating_sub(age) < period_start(first, c) {
                // The check counted in a period that ended.
                return Settled::Keep;
            }
            Settled::Set(Slot {
                state: State::Period {
                    first,
                    used: used.saturating_add_signed(delta),
                },
                expires_at: *expires_at,
            })
        }
        // Nothing to settle: the layer refuses metered policies with these rules.
        _ => Settled::Keep,
    }
}

// Administration: resetting a key, and its override.

/// Where the override of `key` lives: a slot of kind 0, which no rule has.
fn override_slot(key: &StoreKey) -> SlotKey {
    (*key, 0, 0, 0, 0)
}

/// Whether `slot` is where an override lives (see [`override_slot`]).
fn is_override(slot: &SlotKey) -> bool {
    slot.1 == 0
}

/// The override of `key` now: admitted without consuming (`Ok`), or blocked for so many more
/// microseconds (`Err`).
fn overridden(shard: &Shard, key: &StoreKey, now: u64) -> Option<Result<(), u64>> {
    if shard.overrides == 0 {
        return None;
    }
    let slot = shard.map.get(&override_slot(key))?;
    match slot.state {
        _ if slot.expires_at <= now => None,
        State::Override { allow: true } => Some(Ok(())),
        State::Override { allow: false } => Some(Err(slot.expires_at - now)),
        _ => None,
    }
}

/// The answer for a blocked key: denied by the first rule, every rule at 0 until the block
/// ends (`left` µs).
fn blocked(rules: usize, left: u64) -> Decision {
    let left = us_to_duration(left as f64);
    Decision {
        allowed: false,
        denied_by: Some(0),
        retry_after: left,
        rules: RuleStates::repeat(
            RuleState {
                remaining: 0,
                reset: left,
            },
            rules,
        ),
    }
}

impl MemoryStore {
    fn reset_key(&self, key: &StoreKey, rules: &[Rule]) -> Result<(), StoreError> {
        let mut shard = self.inner.rate_limit.lock(key)?;
        for rule in rules {
            shard.map.remove(&slot_key(key, rule));
        }
        Ok(())
    }

    fn override_key(&self, key: &StoreKey, state: Option<Override>) -> Result<(), StoreError> {
        let mut shard = self.inner.rate_limit.lock(key)?;
        let Some(state) = state else {
            if shard.map.remove(&override_slot(key)).is_some() {
                shard.overrides -= 1;
            }
            return Ok(());
        };
        let now = self.now_us();
        // At least 1 ms, as on Redis.
        let lasts = u64::try_from(state.duration().as_micros()).unwrap_or(u64::MAX);
        let slot = Slot {
            state: State::Override {
                allow: matches!(state, Override::Allow(_)),
            },
            expires_at: now.saturating_add(lasts.max(1000)),
        };
        if shard.map.insert(override_slot(key), slot).is_none() {
            shard.overrides += 1;
        }
        Ok(())
    }
}

// Leases: the same grant as the lease script, for one replica (this process).

impl crate::store::RateLeaseStore for MemoryStore {
    /// Grants `need`, plus up to half of what is left after it (one replica: this process),
    /// up to `want`. The extra is a second all-or-nothing check, so it never over-admits.
    fn lease(&self, lease: crate::store::RateLease<'_>) -> StoreFuture<crate::store::LeaseGrant> {
        use crate::store::LeaseGrant;
        let grant = (|| {
            if !lease.rule.strategy().leases() {
                return Err(StoreError::Invalid(format!(
                    "rule {} cannot be leased: only fixed window, token bucket and GCRA rules can",
                    lease.rule.policy_name()
                )));
            }
            let rules = std::slice::from_ref(lease.rule);
            let first = self.decide(&RateCheck::new(lease.key, rules, lease.need, true))?;
            let state = first
                .rules
                .first()
                .copied()
                .unwrap_or(crate::store::RuleState {
                    remaining: 0,
                    reset: Duration::ZERO,
                });
            if !first.allowed {
                return Ok(LeaseGrant::Denied {
                    retry_after: first.retry_after,
                    remaining: state.remaining,
                    reset: state.reset,
                });
            }
            let mut units = lease.need;
            let mut last = state;
            let extra = lease
                .want
                .saturating_sub(lease.need)
                .min(state.remaining / 2);
            if extra > 0 {
                let more = self.decide(&RateCheck::new(lease.key, rules, extra, true))?;
                if more.allowed {
                    units += extra;
                    last = more.rules.first().copied().unwrap_or(last);
                }
            }
            let window_left = if lease.rule.kind() == 1 {
                last.reset
            } else {
                Duration::ZERO
            };
            Ok(LeaseGrant::Granted {
                units,
                remaining: last.remaining,
                reset: last.reset,
                window_left,
                replicas: 1,
            })
        })();
        Box::pin(ready(grant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// µs since the epoch of a UTC date and time.
    fn at(y: i64, m: i64, d: i64, h: i64, min: i64) -> i64 {
        days_from_civil(y, m, d) * DAY_US + (h * 60 + min) * 60_000_000
    }

    const UTC: u64 = 1440;

    #[test]
    fn the_lock_free_cells_admit_exactly_their_burst_under_contention() {
        let hour = Duration::from_secs(3600);
        cells_under_contention(Rule::gcra(500, hour, 500));
        cells_under_contention(Rule::token_bucket(500, 1, hour));
    }

    /// 8 threads race on one key whose cell already exists: the compare-and-swap loses no
    /// update and admits no unit twice (500 units, less than one refilled within the test).
    fn cells_under_contention(rule: Rule) {
        let store = MemoryStore::new();
        let key = StoreKey::from_parts([b"hot".as_slice()]);
        let rules = [rule];
        let check = |cost| RateCheck {
            key: &key,
            rules: &rules,
            cost,
            want_state: true,
        };
        assert!(store.decide(&check(1)).unwrap().allowed);
        let admitted = std::sync::atomic::AtomicU64::new(1);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200 {
                        if store.decide(&check(1)).unwrap().allowed {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 500);
        let last = store.decide(&check(0)).unwrap();
        assert_eq!(last.rules[0].remaining, 0);
        // A reset and a settlement still see the cell.
        store.reset_key(&key, &rules).unwrap();
        assert_eq!(store.decide(&check(0)).unwrap().rules[0].remaining, 500);
    }

    #[test]
    fn overrides_are_looked_for_only_while_a_shard_holds_one() {
        let store = MemoryStore::with_shards(1);
        let key = StoreKey::from_parts([b"o".as_slice()]);
        let rules = [Rule::gcra(5, Duration::from_secs(60), 5)];
        let check = RateCheck::new(&key, &rules, 1, true);
        let overrides = || {
            store
                .inner
                .rate_limit
                .iter()
                .map(|s| s.overrides)
                .sum::<usize>()
        };
        assert!(store.decide(&check).unwrap().allowed);
        assert_eq!(overrides(), 0);
        let block = Some(Override::Block(Duration::from_millis(1)));
        store.override_key(&key, block).unwrap();
        store.override_key(&key, block).unwrap();
        assert_eq!(overrides(), 1);
        assert!(!store.decide(&check).unwrap().allowed);
        store.override_key(&key, None).unwrap();
        store.override_key(&key, None).unwrap();
        assert_eq!(overrides(), 0);
        assert!(store.decide(&check).unwrap().allowed);
        // An expired override is counted until a sweep forgets it.
        store.override_key(&key, block).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(store.decide(&check).unwrap().allowed);
        store.sweep();
        assert_eq!(overrides(), 0);
    }

    #[test]
    fn an_offset_of_a_day_or_more_is_invalid() {
        use crate::store::{Calendar, UtcOffset};
        let day = |m| Rule::calendar(1, Calendar::Day).utc_offset(UtcOffset::minutes(m));
        assert!(day(1439).validate().is_ok() && day(-1439).validate().is_ok());
        assert!(day(1440).validate().is_err() && day(-1440).validate().is_err());
        assert!(Rule::calendar(0, Calendar::Week).validate().is_err());
        // The wire form: unit * 10000 + offset minutes + 1440.
        assert_eq!(day(-480).encode(), (1, 86_400_000, 10_960));
        assert_eq!(Rule::calendar(7, Calendar::Month).encode().2, 31_440);
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28),
            2
        );
        assert_eq!(
            days_from_civil(2100, 3, 1) - days_from_civil(2100, 2, 28),
            1
        );
        for z in -800_000..800_000 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    #[test]
    fn months_days_and_weeks_end_on_the_calendar() {
        let month = 30_000 + UTC;
        // Jan 31 -> Feb 1; Feb 2024 has 29 days, Feb 2023 and 2100 have 28, Feb 2000 has 29.
        assert_eq!(
            calendar_period(at(2024, 1, 31, 23, 59), month).1,
            at(2024, 2, 1, 0, 0)
        );
        assert_eq!(
            calendar_period(at(2024, 2, 28, 12, 0), month).1,
            at(2024, 3, 1, 0, 0)
        );
        assert_eq!(
            calendar_period(at(2024, 2, 29, 0, 0), month).1,
            at(2024, 3, 1, 0, 0)
        );
        assert_eq!(
            calendar_period(at(2023, 2, 28, 23, 0), month).1,
            at(2023, 3, 1, 0, 0)
        );
        assert_eq!(
            calendar_period(at(2100, 2, 28, 23, 0), month).1,
            at(2100, 3, 1, 0, 0)
        );
        assert_eq!(
            calendar_period(at(2000, 2, 29, 0, 0), month).1,
            at(2000, 3, 1, 0, 0)
        );
        assert_eq!(
            calendar_period(at(2023, 12, 31, 0, 0), month).1,
            at(2024, 1, 1, 0, 0)
        );
        // 2024-02-29 is its own day.
        let day = 10_000 + UTC;
        assert_eq!(
            calendar_period(at(2024, 2, 29, 5, 0), day).1,
            at(2024, 3, 1, 0, 0)
        );
        // 2026-01-01 is a Thursday: its ISO week started on Monday 2025-12-29.
        let week = 20_000 + UTC;
        let (first, end) = calendar_period(at(2026, 1, 1, 10, 0), week);
        assert_eq!(first, days_from_civil(2025, 12, 29));
        assert_eq!(end, at(2026, 1, 5, 0, 0));
        // +05:30: the day ends at 18:30 UTC; -08:00: at 08:00 UTC the next day.
        assert_eq!(
            calendar_period(at(2024, 2, 28, 18, 29), 10_000 + UTC + 330).1,
            at(2024, 2, 28, 18, 30)
        );
        assert_eq!(
            calendar_period(at(2024, 2, 28, 18, 30), 10_000 + UTC + 330).1,
            at(2024, 2, 29, 18, 30)
        );
        assert_eq!(
            calendar_period(at(2024, 3, 1, 7, 0), 30_000 + UTC - 480).1,
            at(2024, 3, 1, 8, 0)
        );
    }
}
