//! Rate limiting in the in-process store, with the same semantics as the rate-limit scripts.

use std::{
    collections::{hash_map::Entry, HashMap, VecDeque},
    future::{ready, Ready},
    hash::{BuildHasher, Hash, Hasher},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use portable_atomic::AtomicU128;

use super::{MemoryStore, SWEEP_EVERY_US};
use crate::{
    store::{
        Decision, Override, RateCheck, RateLimitStore, RateSettlement, Rule, RuleState, RuleStates,
        StoreError, StoreFuture, Strategy,
    },
    StoreKey,
};

/// Where the state of one rule for one key lives: the key, and the rule's kind and numbers in
/// wire form (see `Rule::encode`), so that a changed rule starts from fresh state. Kind 0 is the
/// key's override (see [`override_slot`]).
#[derive(Clone, Copy, PartialEq, Eq)]
struct SlotKey {
    key: StoreKey,
    kind: u8,
    a: u64,
    b: u64,
    c: u64,
}

impl SlotKey {
    /// The slot of `rule` for `key`.
    #[inline]
    fn new(key: &StoreKey, rule: &Rule) -> Self {
        let (a, b, c) = rule.encode();
        Self {
            key: *key,
            kind: rule.kind(),
            a,
            b,
            c,
        }
    }

    /// The rule's period, in µs.
    fn period_us(&self) -> u64 {
        self.b * 1000
    }
}

/// A slot key gives its hasher one 128-bit word: the key's 128 bits, the high half mixed with a
/// fingerprint of the rule (see [`SlotHasher`]).
impl Hash for SlotKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        let [k0, k1] = key_words(&self.key);
        // Any mix that tells a key's few rules apart serves: the rules come from the
        // configuration, not from clients. Multiplying by odd constants keeps every bit.
        let rule = (self.a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.b)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9)
            ^ self.c.rotate_left(32)
            ^ u64::from(self.kind);
        state.write_u128(u128::from(k0) | (u128::from(k1 ^ rule) << 64));
    }
}

/// The two 64-bit halves of a key.
#[inline]
fn key_words(key: &StoreKey) -> [u64; 2] {
    let b = key.as_bytes();
    [
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    ]
}

/// The hash of the slot map: one folded multiply (the 128-bit product's halves XORed) of the
/// two words of a [`SlotKey`], each XORed with a seed drawn at random for each map.
///
/// The keys are already hashes, 128 bits of them, but they cannot be used as they are: a store
/// fed SHA-256 keys (the fallback of a layer whose main store is Redis) hashes with no secret,
/// so a client could grind, offline, keys that all fall in one bucket of the map and make every
/// lookup slow (HashDoS). The seeds make where a key falls unknowable outside the process, and
/// the fold costs a few instructions where a general-purpose hasher (several writes, a finish)
/// costs a few dozen on the hot path of every decision.
#[derive(Clone, Copy)]
struct SlotHash {
    seeds: [u64; 2],
}

impl Default for SlotHash {
    fn default() -> Self {
        Self {
            seeds: [rand::random(), rand::random()],
        }
    }
}

impl BuildHasher for SlotHash {
    type Hasher = SlotHasher;

    #[inline]
    fn build_hasher(&self) -> SlotHasher {
        SlotHasher {
            seeds: self.seeds,
            hash: 0,
        }
    }
}

/// The hasher of [`SlotHash`].
struct SlotHasher {
    seeds: [u64; 2],
    hash: u64,
}

impl Hasher for SlotHasher {
    #[inline]
    fn write_u128(&mut self, word: u128) {
        // Truncations intended: the low and the high 64 bits.
        let (lo, hi) = (word as u64, (word >> 64) as u64);
        self.hash = fold(self.hash ^ lo ^ self.seeds[0], hi ^ self.seeds[1]);
    }

    /// Any other input (a [`SlotKey`] writes one `u128`), eight bytes at a time.
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u128(u128::from(u64::from_le_bytes(word)));
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// The 128-bit product of `a` and `b`, its halves XORed.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    // Truncations intended: the low and the high 64 bits.
    (product as u64) ^ ((product >> 64) as u64)
}

/// The slots of a shard, by [`SlotKey`].
type Slots = HashMap<SlotKey, Slot, SlotHash>;

#[derive(Default)]
pub(super) struct Shard {
    map: Slots,
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
                State::Tat { tat, .. } => tat.load(Ordering::Acquire) > now,
                State::Bucket { full_at, .. } => full_at.load(Ordering::Acquire) > now,
                _ => false,
            }
    }
}

/// A byte of tag of its own (`repr(u8)`), rather than one hidden in a niche of the log's
/// fields: telling a GCRA cell from the others is then one compare on the hot path.
#[repr(u8)]
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
    /// GCRA's theoretical arrival time: a lock-free cell (see [`MemoryStore::decide_cell`]),
    /// with the pace of the slot's rule, worked out once when the cell is made rather than on
    /// every decision.
    Tat {
        tat: AtomicU64,
        pace: Pace,
    },
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
                return self.decide_cell(check, rule);
            }
        }
        self.decide_locked(check)
    }

    /// A check under the shard's exclusive lock: any but [`MemoryStore::decide_cell`]'s.
    #[inline(never)]
    fn decide_locked(&self, check: &RateCheck<'_>) -> Result<Decision, StoreError> {
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
        if let [rule] = check.rules {
            return Ok(decide_one(
                &mut shard.map,
                check.key,
                rule,
                (now, wall),
                cost,
            ));
        }
        let mut states = RuleStates::new();
        let mut allowed = true;
        let mut denied_by = None;
        let mut wait = 0.0_f64;
        for (i, rule) in check.rules.iter().enumerate() {
            let slot_key = SlotKey::new(check.key, rule);
            let slot = shard.map.get(&slot_key).filter(|s| s.live(now));
            let eval = evaluate(rule, &slot_key, slot, now, wall, cost);
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
                remaining: if eval.ok {
                    eval.remaining + cost
                } else {
                    eval.remaining
                },
                reset: us_to_duration(eval.reset),
            });
        }
        if allowed && cost > 0 {
            // Every rule allowed, so evaluate each again (the state did not change under the
            // lock) and write it. No list of plans is kept.
            for (rule, state) in check.rules.iter().zip(states.iter_mut()) {
                let slot_key = SlotKey::new(check.key, rule);
                let slot = shard.map.get(&slot_key).filter(|s| s.live(now));
                let eval = evaluate(rule, &slot_key, slot, now, wall, cost);
                state.remaining = eval.remaining;
                apply(&mut shard.map, slot_key, eval.plan, now, cost);
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
    /// hot key never wait for each other. When the key has no cell yet, it is decided under the
    /// exclusive lock ([`MemoryStore::decide_locked`]), which creates the cell.
    ///
    /// It answers in place (no `Option` of an answer for the caller to unwrap): the decision is
    /// written once, into the caller's return slot.
    #[inline]
    fn decide_cell(&self, check: &RateCheck<'_>, rule: &Rule) -> Result<Decision, StoreError> {
        let shard = self.inner.rate_limit.read(check.key)?;
        let now = self.now_us();
        let cost = match overridden(&shard, check.key, now) {
            Some(Err(left)) => return Ok(blocked(1, left)),
            Some(Ok(())) => 0,
            None => check.cost,
        };
        let slot_key = SlotKey::new(check.key, rule);
        let Some(slot) = shard.map.get(&slot_key) else {
            drop(shard);
            return self.decide_locked(check);
        };
        let input = Input {
            slot: None,
            a: slot_key.a,
            c: slot_key.c,
            period: slot_key.period_us(),
            now,
            wall: 0,
            cost,
        };
        let (cell, pace) = match &slot.state {
            State::Tat { tat, pace } => (tat, *pace),
            State::Bucket { cell, full_at } => return Ok(bucket_cell(cell, full_at, input)),
            _ => {
                drop(shard);
                return self.decide_locked(check);
            }
        };
        let mut tat = cell.load(Ordering::Acquire);
        loop {
            let g = gcra_answer(&input, pace, Some(tat));
            if !g.ok || cost == 0 {
                return Ok(decided(g.ok, g.remaining, g.reset, g.retry));
            }
            match cell.compare_exchange_weak(tat, g.tat, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if check.want_state => return Ok(decided(true, g.remaining, g.reset, 0.0)),
                Ok(_) => return Ok(admitted_without_state()),
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
        let b = bucket_answer(&input, Some((tokens, ts)));
        if !b.ok || input.cost == 0 {
            return decided(b.ok, b.remaining, b.reset, b.retry);
        }
        let new = pack(b.left, input.now);
        match cell.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                full_at.fetch_max(b.expires_at, Ordering::AcqRel);
                return decided(true, b.remaining, b.reset, 0.0);
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

/// A single rule's admission when the check does not want the rule's state (`RateCheck`'s
/// `want_state`): its fields are zero, as the trait allows.
fn admitted_without_state() -> Decision {
    Decision {
        allowed: true,
        denied_by: None,
        retry_after: Duration::ZERO,
        rules: RuleStates::one(RuleState {
            remaining: 0,
            reset: Duration::ZERO,
        }),
    }
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

/// A single rule under the exclusive lock: its slot looked up once (an entry of the map),
/// decided, and written in place. The same answer as the loop over several rules gives for
/// one.
fn decide_one(
    map: &mut Slots,
    key: &StoreKey,
    rule: &Rule,
    (now, wall): (u64, u64),
    cost: u64,
) -> Decision {
    let slot_key = SlotKey::new(key, rule);
    let entry = map.entry(slot_key);
    let slot = match &entry {
        Entry::Occupied(occupied) => Some(occupied.get()).filter(|s| s.live(now)),
        Entry::Vacant(_) => None,
    };
    let eval = evaluate(rule, &slot_key, slot, now, wall, cost);
    let decision = decided(eval.ok, eval.remaining, eval.reset, eval.retry);
    if eval.ok && cost > 0 {
        match (eval.plan, entry) {
            (Some(Plan::Replace(slot)), Entry::Occupied(mut occupied)) => {
                occupied.insert(slot);
            }
            (Some(Plan::Replace(slot)), Entry::Vacant(vacant)) => {
                vacant.insert(slot);
            }
            (Some(Plan::LogPush { period }), entry) => {
                push_log_to(entry.or_insert_with(empty_log), now, cost, period);
            }
            (None, _) => {}
        }
    }
    decision
}

fn apply(map: &mut Slots, key: SlotKey, plan: Option<Plan>, now: u64, cost: u64) {
    match plan {
        Some(Plan::Replace(slot)) => {
            map.insert(key, slot);
        }
        Some(Plan::LogPush { period }) => push_log(map, key, now, cost, period),
        None => {}
    }
}

fn push_log(map: &mut Slots, key: SlotKey, now: u64, cost: u64, period: u64) {
    push_log_to(map.entry(key).or_insert_with(empty_log), now, cost, period);
}

/// A sliding log with no entries, as good as absent.
fn empty_log() -> Slot {
    Slot {
        state: State::Log {
            entries: VecDeque::new(),
            total: 0,
        },
        expires_at: 0,
    }
}

/// Logs `cost` units at `now` in `slot` (made a log afresh unless it is a live one).
fn push_log_to(slot: &mut Slot, now: u64, cost: u64, period: u64) {
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

/// Evaluates `rule`, whose slot key is `key`, on its `slot`.
fn evaluate(
    rule: &Rule,
    key: &SlotKey,
    slot: Option<&Slot>,
    now: u64,
    wall: u64,
    cost: u64,
) -> Eval {
    let input = Input {
        slot,
        a: key.a,
        c: key.c,
        period: key.period_us(),
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
    let b = bucket_answer(i, state);
    if b.ok {
        let plan = replace(bucket(b.left, i.now, b.expires_at), b.expires_at);
        return Eval::allow(b.remaining, b.reset, plan);
    }
    Eval::deny(b.remaining, b.reset, b.retry)
}

/// A token bucket's answer, before anything is written: what [`token_bucket_at`] plans, and
/// what the lock-free cell ([`bucket_cell`]) swaps in (see [`Gcra`]).
struct Bucket {
    ok: bool,
    /// The tokens left (admitted: after this call), counted at the input's time.
    left: f64,
    /// Admitted: when the bucket is full again, its expiry.
    expires_at: u64,
    remaining: u64,
    reset: f64,
    retry: f64,
}

/// `floor_u64(x)` stands for `x.floor() as u64`, and `ceil_u64(x)` for `x.ceil() as u64`: the
/// same values, without a call to `floor` or `ceil` (see [`ceil_u64`]).
// Always inlined: the hot path of the lock-free cell (see `gcra_answer`).
#[inline(always)]
fn bucket_answer(i: &Input<'_>, state: Option<(f64, u64)>) -> Bucket {
    let (capacity, costf) = (to_f64(i.a), to_f64(i.cost));
    let per_us = to_f64(i.c) / to_f64(i.period);
    let tokens = match state {
        Some((tokens, ts)) => capacity.min(tokens + to_f64(i.now.saturating_sub(ts)) * per_us),
        None => capacity,
    };
    if tokens >= costf {
        let left = tokens - costf;
        let full = (capacity - left) / per_us;
        return Bucket {
            ok: true,
            left,
            expires_at: i.now + ceil_u64(full).max(1000),
            remaining: floor_u64(left),
            reset: full,
            retry: 0.0,
        };
    }
    let retry = if i.over_limit(i.a) {
        i.pf()
    } else {
        (costf - tokens) / per_us
    };
    Bucket {
        ok: false,
        left: tokens,
        expires_at: 0,
        remaining: floor_u64(tokens),
        reset: (capacity - tokens) / per_us,
        retry,
    }
}

/// GCRA: the theoretical arrival time.
fn gcra(i: &Input<'_>) -> Eval {
    let tat = match i.state() {
        Some(State::Tat { tat, .. }) => Some(tat.load(Ordering::Acquire)),
        _ => None,
    };
    let pace = Pace::of(i.period, i.a, i.c);
    let g = gcra_answer(i, pace, tat);
    if g.ok {
        let plan = replace(gcra_cell(g.tat, pace), g.tat.max(i.now + 1000));
        return Eval::allow(g.remaining, g.reset, plan);
    }
    Eval::deny(g.remaining, g.reset, g.retry)
}

/// A GCRA rule's pace: its emission interval (the period over the rate) and its burst
/// tolerance (the burst times the interval), in µs.
#[derive(Clone, Copy)]
struct Pace {
    interval: f64,
    burst: f64,
}

impl Pace {
    /// The pace of a rule of `rate` per `period` µs, with `burst`.
    #[inline]
    fn of(period: u64, rate: u64, burst: u64) -> Self {
        let interval = to_f64(period) / to_f64(rate);
        Self {
            interval,
            burst: to_f64(burst) * interval,
        }
    }
}

/// A GCRA cell at `tat`, for a rule of `pace`.
fn gcra_cell(tat: u64, pace: Pace) -> State {
    State::Tat {
        tat: AtomicU64::new(tat),
        pace,
    }
}

/// GCRA's answer for a TAT (`None`: no state), before anything is written: what [`gcra`]
/// plans, and what the lock-free cell ([`MemoryStore::decide_cell`]) swaps in.
struct Gcra {
    ok: bool,
    /// The TAT to store when admitted.
    tat: u64,
    remaining: u64,
    reset: f64,
    retry: f64,
}

// Always inlined: the hot path of the lock-free cell (the compiler outlines it otherwise).
#[inline(always)]
fn gcra_answer(i: &Input<'_>, Pace { interval, burst }: Pace, tat: Option<u64>) -> Gcra {
    let now = to_f64(i.now);
    // `max` without its NaN handling: neither is NaN.
    let tat = tat.map_or(now, |t| {
        let t = to_f64(t);
        if t > now {
            t
        } else {
            now
        }
    });
    let new_tat = tat + to_f64(i.cost) * interval;
    let allow_at = new_tat - burst;
    if allow_at <= now {
        return Gcra {
            ok: true,
            tat: ceil_u64(new_tat),
            // A cast to `u64` truncates (saturating, 0 below 0): the floor of what is not
            // negative.
            remaining: trunc_u64((now - allow_at) / interval),
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
        remaining: trunc_u64((now - (tat - burst)) / interval),
        reset: tat - now,
        retry,
    }
}

/// `x.ceil() as u64` without a call to `ceil` (the baseline x86-64 target has no instruction
/// for it): the same for every `x`, NaN and negative values (0) and the saturation included.
#[inline]
fn ceil_u64(x: f64) -> u64 {
    if x > -1.0 && x < I64_END {
        // The usual case, in signed conversions (one instruction each way; the unsigned ones
        // take several): `t` is `x` rounded toward zero, and `t + 1` does not overflow.
        let t = x as i64;
        let t = if (t as f64) < x { t + 1 } else { t };
        // Not negative: the same value.
        return t as u64;
    }
    ceil_u64_out_of_i64(x)
}

/// [`ceil_u64`] out of the `i64` range, out of line (else the compiler computes both ways
/// and picks one, on every call).
#[cold]
#[inline(never)]
fn ceil_u64_out_of_i64(x: f64) -> u64 {
    let t = x as u64;
    if (t as f64) < x {
        t.saturating_add(1)
    } else {
        t
    }
}

/// `x as u64` (rounded toward zero; NaN and negative values 0, saturated above), in a signed
/// conversion when `x` is in range (see [`ceil_u64`]).
#[inline]
fn trunc_u64(x: f64) -> u64 {
    if (0.0..I64_END).contains(&x) {
        // Not negative: the same value.
        x as i64 as u64
    } else {
        trunc_u64_out_of_i64(x)
    }
}

/// [`trunc_u64`] out of the `i64` range (see [`ceil_u64_out_of_i64`]).
#[cold]
#[inline(never)]
fn trunc_u64_out_of_i64(x: f64) -> u64 {
    x as u64
}

/// `x as f64`, in a signed conversion (one instruction; the unsigned one takes several) when
/// `x` is below 2^63: the same value.
#[inline]
fn to_f64(x: u64) -> f64 {
    match i64::try_from(x) {
        Ok(x) => x as f64,
        // Out of line, or the compiler merges both branches back into the unsigned conversion.
        Err(_) => to_f64_above_i64(x),
    }
}

/// [`to_f64`] from 2^63 on.
#[cold]
#[inline(never)]
fn to_f64_above_i64(x: u64) -> f64 {
    x as f64
}

/// `x.floor() as u64`: the same as [`trunc_u64`] (they differ only below zero, where both
/// casts give 0), without a call to `floor`.
#[inline]
fn floor_u64(x: f64) -> u64 {
    trunc_u64(x)
}

/// 2^63, the first `f64` above the `i64` range.
const I64_END: f64 = 9_223_372_036_854_775_808.0;

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
            let key = SlotKey::new(settlement.key, rule);
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
            let pace = Pace::of(period, a, c);
            let interval = pace.interval;
            let tat = match slot.map(|s| &s.state) {
                Some(State::Tat { tat, .. }) => tat.load(Ordering::Acquire).max(now),
                _ => now,
            };
            let moved = (tat as f64 + deltaf * interval).ceil();
            if moved <= now as f64 {
                return Settled::Remove;
            }
            let stored = moved as u64;
            Settled::Set(Slot {
                state: gcra_cell(stored, pace),
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
    SlotKey {
        key: *key,
        kind: 0,
        a: 0,
        b: 0,
        c: 0,
    }
}

/// Whether `slot` is where an override lives (see [`override_slot`]).
fn is_override(slot: &SlotKey) -> bool {
    slot.kind == 0
}

/// The override of `key` now: admitted without consuming (`Ok`), or blocked for so many more
/// microseconds (`Err`).
#[inline]
fn overridden(shard: &Shard, key: &StoreKey, now: u64) -> Option<Result<(), u64>> {
    if shard.overrides == 0 {
        return None;
    }
    override_of(shard, key, now)
}

/// [`overridden`], once the shard is known to hold overrides.
#[inline(never)]
fn override_of(shard: &Shard, key: &StoreKey, now: u64) -> Option<Result<(), u64>> {
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
            shard.map.remove(&SlotKey::new(key, rule));
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

    /// The fast conversions give what the plain casts give, at every edge.
    #[test]
    fn conversions_match_the_casts() {
        let floats = [
            f64::NAN,
            f64::NEG_INFINITY,
            -1e300,
            -1.0,
            -0.999,
            -0.5,
            -0.0,
            0.0,
            0.25,
            1.0,
            1.5,
            4_503_599_627_370_495.5,
            9_007_199_254_740_993.0,
            I64_END - 1024.0,
            I64_END,
            I64_END + 4096.0,
            18_446_744_073_709_549_568.0,
            18_446_744_073_709_551_616.0,
            1e300,
            f64::INFINITY,
        ];
        for x in floats {
            let ceil = x.ceil() as u64;
            assert_eq!(ceil_u64(x), ceil, "ceil of {x}");
            assert_eq!(trunc_u64(x), x as u64, "truncation of {x}");
            let floor = x.floor() as u64;
            assert_eq!(floor_u64(x), floor, "floor of {x}");
        }
        for x in [
            0,
            1,
            (1 << 53) + 1,
            i64::MAX as u64,
            1 << 63,
            (1 << 63) + 1025,
            u64::MAX,
        ] {
            assert_eq!(to_f64(x).to_bits(), (x as f64).to_bits(), "{x} as f64");
        }
    }

    /// A key's slots for different rules, and one rule's slots for different keys, are apart;
    /// the hash of a slot key is the same for every hasher of one map, and differs by map.
    #[test]
    fn slot_keys_hash_with_the_seeds_of_their_map() {
        let key = StoreKey::from_parts([b"k".as_slice()]);
        let other = StoreKey::from_parts([b"l".as_slice()]);
        let second = Duration::from_secs(1);
        let rules = [
            Rule::gcra(10, second, 10),
            Rule::gcra(10, second, 11),
            Rule::token_bucket(10, 10, second),
            Rule::fixed_window(10, second),
        ];
        let mut map = HashMap::with_hasher(SlotHash::default());
        for (i, rule) in rules.iter().enumerate() {
            map.insert(SlotKey::new(&key, rule), i);
            map.insert(SlotKey::new(&other, rule), i + 10);
        }
        map.insert(override_slot(&key), 99);
        assert_eq!(map.len(), 9);
        for (i, rule) in rules.iter().enumerate() {
            assert_eq!(map.get(&SlotKey::new(&key, rule)), Some(&i));
            assert_eq!(map.get(&SlotKey::new(&other, rule)), Some(&(i + 10)));
        }
        let slot = SlotKey::new(&key, &rules[0]);
        let (one, two) = (SlotHash::default(), SlotHash::default());
        assert_eq!(one.hash_one(slot), one.hash_one(slot));
        assert_ne!(one.hash_one(slot), two.hash_one(slot));
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
