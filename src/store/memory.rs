//! The in-process store: the default, needs no server.

use std::{
    collections::{HashMap, VecDeque},
    future::{ready, Ready},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use super::{Decision, RateCheck, RateLimitStore, RuleState, StoreError};
use crate::{key::StoreKey, rate_limit::Rule, time::Clock};

/// An in-process store with the same semantics as the Redis scripts.
///
/// It is sharded (a request locks one shard, never the whole map) and forgets expired state on
/// its own: each shard sweeps itself at most once a second and whenever it has doubled since its
/// last sweep, and a background task (started when the store is made inside a Tokio runtime)
/// sweeps idle shards, so memory stays bounded under a flood of distinct keys and falls back once
/// they expire.
///
/// State is per process: with several replicas, use a Redis store so that limits hold across all
/// of them. Cloning is cheap and shares the state.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    clock: Clock,
    records: super::memory_records::Records,
    /// The response cache's state (see `memory_cache.rs`).
    cache: cache::CacheState,
}

type SlotKey = (StoreKey, u8, u64, u64, u64);

#[derive(Default)]
struct Shard {
    map: HashMap<SlotKey, Slot>,
    next_sweep: u64,
    len_after_sweep: usize,
}

struct Slot {
    state: State,
    /// Microseconds (store clock) after which the slot is as good as absent.
    expires_at: u64,
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
    Bucket {
        tokens: f64,
        ts: u64,
    },
    Tat(u64),
}

const SWEEP_EVERY_US: u64 = 1_000_000;

impl MemoryStore {
    /// A new, empty store with one shard per 4 threads of parallelism (at least 16).
    pub fn new() -> Self {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self::with_shards((cpus * 4).max(16))
    }

    /// A new, empty store with `shards` shards (rounded up to a power of two).
    pub fn with_shards(shards: usize) -> Self {
        let shards = shards.max(1).next_power_of_two();
        let inner = Arc::new(Inner {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            clock: Clock::new(),
            records: super::memory_records::Records::new(shards),
            cache: cache::CacheState::default(),
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(sweeper(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    /// Forgets every expired entry now (the store also does this on its own).
    pub fn sweep(&self) {
        self.inner.sweep_all();
    }

    /// How many entries (key and rule pairs) the store holds, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.map.len()))
            .sum()
    }

    /// Whether the store holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn now_us(&self) -> u64 {
        self.inner.clock.now_us()
    }

    pub(crate) fn records(&self) -> &super::memory_records::Records {
        &self.inner.records
    }

    fn decide(&self, check: &RateCheck<'_>) -> Result<Decision, StoreError> {
        let shard_idx = shard_of(check.key, self.inner.shards.len());
        let mut shard = self
            .inner
            .shards
            .get(shard_idx)
            .ok_or_else(|| StoreError::Invalid("no shard".into()))?
            .lock()
            .map_err(|_| StoreError::Invalid("a memory store shard was poisoned".into()))?;
        let now = self.inner.clock.now_us();
        shard.maybe_sweep(now);

        let cost = check.cost;
        let mut states = Vec::with_capacity(check.rules.len());
        let mut allowed = true;
        let mut denied_by = None;
        let mut wait = 0.0_f64;
        // One rule (the common case): decide and write in one pass.
        let mut single_plan = None;
        for (i, rule) in check.rules.iter().enumerate() {
            let slot_key = slot_key(check.key, rule);
            let slot = shard.map.get(&slot_key).filter(|s| s.expires_at > now);
            let eval = evaluate(rule, slot, now, cost);
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
                    let slot = shard.map.get(&slot_key).filter(|s| s.expires_at > now);
                    let eval = evaluate(rule, slot, now, cost);
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

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
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
}

impl Inner {
    fn sweep_all(&self) {
        let now = self.clock.now_us();
        for shard in self.shards.iter() {
            if let Ok(mut shard) = shard.lock() {
                shard.sweep(now);
            }
        }
        self.records.sweep(now);
    }
}

impl Shard {
    fn maybe_sweep(&mut self, now: u64) {
        if now >= self.next_sweep || self.map.len() > 2 * self.len_after_sweep + 1024 {
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: u64) {
        self.map.retain(|_, slot| slot.expires_at > now);
        if self.map.capacity() > 4 * self.map.len() + 64 {
            self.map.shrink_to_fit();
        }
        self.len_after_sweep = self.map.len();
        self.next_sweep = now + SWEEP_EVERY_US;
    }
}

async fn sweeper(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_micros(SWEEP_EVERY_US));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match inner.upgrade() {
            Some(inner) => inner.sweep_all(),
            None => return,
        }
    }
}

fn shard_of(key: &StoreKey, shards: usize) -> usize {
    let b = key.as_bytes();
    let v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    // `shards` is a power of two.
    (v as usize) & (shards - 1)
}

fn slot_key(key: &StoreKey, rule: &Rule) -> SlotKey {
    let (a, b, c) = rule.encode();
    (*key, rule.kind(), a, b, c)
}

fn apply(map: &mut HashMap<SlotKey, Slot>, key: SlotKey, plan: Option<Plan>, now: u64, cost: u64) {
    match plan {
        Some(Plan::Replace(slot)) => {
            map.insert(key, slot);
        }
        Some(Plan::LogPush { period }) => push_log(map, key, now, cost, period),
        None => {}
    }
}

fn push_log(map: &mut HashMap<SlotKey, Slot>, key: SlotKey, now: u64, cost: u64, period: u64) {
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
    let ms = (us.max(0.0) / 1000.0).ceil();
    Duration::from_millis(ms as u64)
}

struct Eval {
    ok: bool,
    remaining: u64,
    reset: f64,
    retry: f64,
    plan: Option<Plan>,
}

enum Plan {
    Replace(Slot),
    LogPush { period: u64 },
}

fn evaluate(rule: &Rule, slot: Option<&Slot>, now: u64, cost: u64) -> Eval {
    let state = slot.map(|s| &s.state);
    let (a, period_ms, c) = rule.encode();
    let period = period_ms * 1000;
    let (af, pf, cf, costf, nowf) = (a as f64, period as f64, c as f64, cost as f64, now as f64);
    match rule.kind() {
        1 => {
            let (used, end) = match slot {
                Some(Slot {
                    state: State::Counter(n),
                    expires_at,
                }) => (*n, Some(*expires_at)),
                _ => (0, None),
            };
            let ttl = end.map_or(pf, |e| e.saturating_sub(now) as f64);
            if used + cost <= a {
                Eval {
                    ok: true,
                    remaining: a - used - cost,
                    reset: ttl,
                    retry: 0.0,
                    plan: Some(Plan::Replace(Slot {
                        state: State::Counter(used + cost),
                        expires_at: end.unwrap_or(now + period),
                    })),
                }
            } else {
                Eval {
                    ok: false,
                    remaining: a.saturating_sub(used),
                    reset: ttl,
                    retry: if cost > a { pf } else { ttl },
                    plan: None,
                }
            }
        }
        2 => {
            let empty = VecDeque::new();
            let (entries, total) = match state {
                Some(State::Log { entries, total }) => (entries, *total),
                _ => (&empty, 0),
            };
            // Entries older than the window no longer count; they sit at the front.
            let expired = entries.iter().take_while(|(t, _)| t + period <= now);
            let (gone, gone_units) = expired.fold((0usize, 0u64), |(k, u), (_, n)| (k + 1, u + n));
            let count = total - gone_units;
            let live = entries.iter().skip(gone);
            let ok = count + cost <= a;
            let oldest = entries.get(gone).map(|(t, _)| *t);
            let reset = match oldest {
                Some(t) => (t + period - now) as f64,
                None if ok && cost > 0 => pf,
                None => 0.0,
            };
            if ok {
                Eval {
                    ok,
                    remaining: a - count - cost,
                    reset,
                    retry: 0.0,
                    plan: Some(Plan::LogPush { period }),
                }
            } else {
                let retry = if cost > a {
                    pf
                } else {
                    // The (count + cost - a)-th oldest unit must leave the window.
                    let mut need = count + cost - a;
                    let mut at = now;
                    for (t, n) in live {
                        at = *t;
                        if *n >= need {
                            break;
                        }
                        need -= n;
                    }
                    (at + period - now) as f64
                };
                Eval {
                    ok,
                    remaining: a.saturating_sub(count),
                    reset,
                    retry,
                    plan: None,
                }
            }
        }
        3 => {
            let idx = now / period;
            let elapsed = (now - idx * period) as f64;
            let (cur, prev) = match state {
                Some(State::Window { idx: w, cur, prev }) if *w == idx => (*cur, *prev),
                Some(State::Window { idx: w, cur, .. }) if *w + 1 == idx => (0, *cur),
                _ => (0, 0),
            };
            let est = prev as f64 * (1.0 - elapsed / pf) + cur as f64;
            let ok = est + costf <= af;
            let reset = pf - elapsed;
            if ok {
                Eval {
                    ok,
                    remaining: (af - est - costf).floor().max(0.0) as u64,
                    reset,
                    retry: 0.0,
                    plan: Some(Plan::Replace(Slot {
                        state: State::Window {
                            idx,
                            cur: cur + cost,
                            prev,
                        },
                        expires_at: (idx + 2) * period,
                    })),
                }
            } else {
                let retry = if cost > a {
                    pf
                } else if cur + cost <= a {
                    pf * (1.0 - (af - cur as f64 - costf) / prev as f64) - elapsed
                } else {
                    let into_next = if cur > 0 {
                        pf * (1.0 - (af - costf) / cur as f64)
                    } else {
                        0.0
                    };
                    (pf - elapsed) + into_next.max(0.0)
                };
                Eval {
                    ok,
                    remaining: (af - est).floor().max(0.0) as u64,
                    reset,
                    retry,
                    plan: None,
                }
            }
        }
        4 => {
            let per_us = cf / pf;
            let tokens = match state {
                Some(State::Bucket { tokens, ts }) => {
                    af.min(tokens + now.saturating_sub(*ts) as f64 * per_us)
                }
                _ => af,
            };
            let ok = tokens >= costf;
            if ok {
                let left = tokens - costf;
                let full = (af - left) / per_us;
                Eval {
                    ok,
                    remaining: left.floor() as u64,
                    reset: full,
                    retry: 0.0,
                    plan: Some(Plan::Replace(Slot {
                        state: State::Bucket {
                            tokens: left,
                            ts: now,
                        },
                        expires_at: now + (full.ceil() as u64).max(1000),
                    })),
                }
            } else {
                Eval {
                    ok,
                    remaining: tokens.floor() as u64,
                    reset: (af - tokens) / per_us,
                    retry: if cost > a {
                        pf
                    } else {
                        (costf - tokens) / per_us
                    },
                    plan: None,
                }
            }
        }
        _ => {
            let interval = pf / af;
            let burst = cf * interval;
            let tat = match state {
                Some(State::Tat(t)) => (*t as f64).max(nowf),
                _ => nowf,
            };
            let new_tat = tat + costf * interval;
            let allow_at = new_tat - burst;
            let ok = allow_at <= nowf;
            if ok {
                let stored = new_tat.ceil() as u64;
                Eval {
                    ok,
                    remaining: ((nowf - allow_at) / interval).floor() as u64,
                    reset: new_tat - nowf,
                    retry: 0.0,
                    plan: Some(Plan::Replace(Slot {
                        state: State::Tat(stored),
                        expires_at: stored.max(now + 1000),
                    })),
                }
            } else {
                Eval {
                    ok,
                    remaining: ((nowf - (tat - burst)) / interval).floor().max(0.0) as u64,
                    reset: tat - nowf,
                    retry: if cost > c { pf } else { allow_at - nowf },
                    plan: None,
                }
            }
        }
    }
}

#[path = "memory_cache.rs"]
mod cache;
