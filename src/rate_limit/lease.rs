//! Leased quotas: a store wrapper that takes batches of units from the store in one call and
//! admits from them in process, so a hot key far from its limit costs a store call per batch
//! instead of per request. See [`Leased`] for the bounds.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use crate::{
    store::{
        Decision, LeaseGrant, Override, RateCheck, RateLease, RateLeaseStore, RateLimitStore,
        RateSettlement, Rule, RuleState, RuleStates, StoreError, StoreFuture, Strategy,
    },
    StoreKey,
};

/// How a [`Leased`] store leases: the largest batch, how long a token-bucket or GCRA unit
/// stays valid, when an idle key's batch is returned, and how many keys are held.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_layers::rate_limit::Lease;
///
/// // Batches of up to 64 units; a GCRA or bucket unit is used within 50 ms of its debit.
/// let lease = Lease::up_to(64).max_age(Duration::from_millis(50));
/// # let _ = lease;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    max: u64,
    max_age: Option<Duration>,
    idle: Duration,
    max_keys: usize,
    return_unused: bool,
}

impl Lease {
    /// Batches of at most `max` units (at least 1). A batch starts at 1 unit, doubles while
    /// the key is busy (a batch used up before it expired) and halves when units expire
    /// unused; the store gives less near the limit (see [`Leased`]).
    pub fn up_to(max: u64) -> Self {
        Self {
            max: max.max(1),
            max_age: None,
            idle: Duration::from_secs(1),
            max_keys: 10_000,
            return_unused: true,
        }
    }

    /// How long a leased unit of a token bucket or GCRA rule stays valid after its debit (the
    /// lease time τ; default: the rule's emission interval × the largest batch, and at least
    /// 100 ms). The burst bound grows with it: at most
    /// `burst + rate × Δ + min(rate × τ, replicas × max)` units in any interval Δ. Fixed
    /// window units live until their window ends, whatever this says.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    /// How long a key's batch may stay unused before its units are returned to the store and
    /// the key forgotten (default 1 s).
    pub fn idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// How many keys hold a batch at once (default 10,000). When they are all busy, a new key
    /// is checked request by request.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// Does not return unused units (on idle keys and when the store is dropped): they die
    /// with their window or lease time. By default they are returned, best effort, in one
    /// store call per key.
    pub fn no_return(mut self) -> Self {
        self.return_unused = false;
        self
    }

    /// The largest batch.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The lease time τ of a unit of `rule` (token bucket, GCRA): [`max_age`](Self::max_age),
    /// or the emission interval × the largest batch and at least 100 ms. `None` for other
    /// strategies.
    pub fn lease_time(&self, rule: &Rule) -> Option<Duration> {
        let interval = match *rule.strategy() {
            Strategy::Gcra { rate, period, .. } => period.div_f64(rate.max(1) as f64),
            Strategy::TokenBucket { refill, every, .. } => every.div_f64(refill.max(1) as f64),
            _ => return None,
        };
        Some(self.max_age.unwrap_or_else(|| {
            interval
                .mul_f64(self.max as f64)
                .max(Duration::from_millis(100))
        }))
    }
}

/// What a [`Leased`] store did so far: every store call it made, and the requests it
/// answered in process. For benchmarks and tests (Redis calls per request).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseStats {
    /// Lease calls (one store call each), those sent ahead of need included.
    pub leases: u64,
    /// Lease calls sent ahead of need: a busy key's batch had used half of its units, so the
    /// next batch was leased in the background while the rest were admitted.
    pub prefetches: u64,
    /// Lease calls that the store denied (nothing debited).
    pub denied_leases: u64,
    /// Units the leases debited.
    pub leased_units: u64,
    /// Checks sent to the store request by request (rules that cannot be leased, a lease
    /// in flight for the key, an override, a key table full).
    pub direct_checks: u64,
    /// Requests admitted from a batch without a store call.
    pub local_admissions: u64,
    /// Requests that waited for a lease in flight (their key's batch was empty).
    pub waits: u64,
    /// Return calls (one store call each) and the units they gave back.
    pub returns: u64,
    /// Units given back by returns.
    pub returned_units: u64,
    /// Units that died unused (their window ended or their lease time passed).
    pub expired_units: u64,
}

impl LeaseStats {
    /// Every store call: leases, direct checks and returns.
    pub fn store_calls(&self) -> u64 {
        self.leases + self.direct_checks + self.returns
    }
}

/// A [`RateLimitStore`] that leases quotas: for a policy of one fixed-window, token-bucket or
/// GCRA rule, it takes a batch of units of a key from the store in one call (debited there
/// before any is used) and admits from it in process, so a hot key far from its limit costs one
/// store call per batch instead of one per request.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_layers::{
///     rate_limit::{Lease, Leased, Policy, RateLimitLayer, Rule},
///     store::MemoryStore,
/// };
///
/// # let redis = MemoryStore::new(); // a `RedisStore` or `FredStore` in production
/// let store = Leased::new(redis, Lease::up_to(64));
/// let policy = Policy::new("api", Rule::gcra(1_000, Duration::from_secs(1), 100));
/// let layer = RateLimitLayer::new(store.clone(), policy);
/// // Later: store calls per request.
/// let calls = store.stats().store_calls();
/// # let _ = (layer, calls);
/// ```
///
/// Opt-in by wrapping the store of a layer: every single-rule policy of a leasable strategy in
/// that layer is leased. Policies of several rules, sliding logs, sliding windows and calendar
/// rules are checked request by request, as without the wrapper, and so is every check when the
/// wrapped store is in process (leasing from memory would gain nothing).
///
/// # Bounds
///
/// - **Fixed window: never more than the limit per window**, across any number of replicas. A
///   unit is debited in its window's counter before it is used, and a batch dies no later than
///   its window's end (the time left that the script reads, counted from before the call was
///   sent, so earlier than the server's end).
/// - **Token bucket and GCRA: in any interval Δ, at most
///   `burst + rate × Δ + min(rate × τ, replicas × max)` units**, τ being the lease time
///   ([`Lease::max_age`]; default the emission interval × the largest batch, at least 100 ms).
///   The units used in `[s, s + Δ]` were debited in `[s − τ, s + Δ]`, where the store admits at
///   most `burst + rate × (Δ + τ)`; and those debited before `s` were held at `s`, at most `max`
///   per replica. The long-run rate is the rule's.
/// - **Unused units: at most `replicas × max` per window** (bucket, GCRA: per lease time) are
///   debited and never used, when leases are not returned (a replica killed, [`Lease::no_return`]):
///   with demand above the limit, at least `limit − replicas × max` are admitted per window.
///   Near the limit the batches shrink (below), so the loss is usually far smaller. Units
///   are returned (best effort, one call) when a key has been idle for [`Lease::idle`] and
///   when the last clone of this store is dropped.
///
/// # The batch
///
/// A key's batch starts at 1 unit; a lease asks for the next batch size or for what the requests
/// waiting for it need, whichever is larger, up to `max` units held in all (what the replica still
/// holds counts). The size doubles while the store gives all that was asked, and halves when units
/// expire unused. The store gives the units needed now and at most `(remaining after them) / (2 ×
/// replicas seen recently)` more, so a nearly exhausted key is leased one unit at a time: exactly
/// today's per-request mode. "Replicas seen recently" are counted in the same call, from a small
/// hash in the key's slot (replica id → time of its last lease; an id counts for a window, at least
/// 1 s, after its last lease, and stale ids are deleted).
///
/// A busy key leases ahead: once half of its batch is used and, at its pace, the rest would run out
/// within a few round trips of a lease, the next batch is leased in the background while the rest
/// are admitted, so its requests are answered in process without waiting. A key that is not that
/// busy leases when its batch is empty. Units of two leases are held apart, each dying at its own
/// time (so the bounds above hold unchanged: what a replica holds never passes `max`).
///
/// One lease is in flight per key and rule in a replica. When the batch is empty, the other
/// requests of the key wait for it (up to 16 leases in a row; then they check directly), and its
/// units are kept for them first for a few milliseconds. A denied lease denies the requests that
/// waited for it. The keys held are bounded ([`Lease::max_keys`]); idle keys are forgotten.
///
/// # Why not every strategy
///
/// An exact sliding log needs each unit's own timestamp at its use: a leased unit would be
/// logged at its debit, earlier than its use, so the log would count it early and forget it
/// early, and a later window could admit past the limit. The sliding window counter weighs the
/// previous window by the time elapsed at the check: a unit debited in one window and used in
/// the next is counted in the wrong window, and the estimate's bound no longer holds; it is
/// checked per request. A calendar rule is checked per request too (not leased yet).
///
/// # Failures and overrides
///
/// While the store is down, a key admits what its batch holds until it runs out or expires;
/// then the layer's failure behaviour (the local fallback by default) applies. A lease of a
/// key with an [`Override`] makes the replica check that key directly. Blocking a key through
/// this store (or the layer's [handle](super::RateLimitHandle)) drops the batches this replica
/// holds for it; another replica's batches admit what they hold (at most `max` units each)
/// until they expire or run out.
///
/// Clone it to keep a handle on its [`stats`](Self::stats): clones share the batches.
pub struct Leased<B> {
    inner: Arc<Inner<B>>,
}

struct Inner<B> {
    store: B,
    /// The store's settle, to return units from `Drop` (which cannot ask for the bound).
    settle: SettleFn<B>,
    lease: Lease,
    replica: String,
    batches: Mutex<Batches>,
    calls: AtomicU64,
    /// Whether the task that returns idle keys' units runs.
    sweeping: std::sync::atomic::AtomicBool,
    leases: AtomicU64,
    prefetches: AtomicU64,
    denied_leases: AtomicU64,
    leased_units: AtomicU64,
    direct_checks: AtomicU64,
    local_admissions: AtomicU64,
    waits: AtomicU64,
    returns: AtomicU64,
    returned_units: AtomicU64,
    expired_units: AtomicU64,
}

type SettleFn<B> = for<'a, 'b> fn(&'a B, RateSettlement<'b>) -> StoreFuture<()>;

/// How many leases in flight a request waits for before it checks directly.
const MAX_WAITS: u32 = 16;

/// How long the units of a lease are kept for the requests that waited for it.
const RESERVED_FOR: Duration = Duration::from_millis(20);

/// A batch is leased ahead when what is left would run out within this many round trips of a
/// lease.
const AHEAD_TRIPS: u128 = 8;

/// How long a lease sent ahead of need may take (a layer's default store timeout).
const PREFETCH_TIMEOUT: Duration = Duration::from_millis(250);

/// The batches by key, hashed with rapidhash: the keys are SHA-256 digests already.
type Batches = HashMap<BatchKey, Batch, rapidhash::fast::RandomState>;

/// A key under one rule: the store key and the rule's wire form (kind, a, b, c).
type BatchKey = (StoreKey, [u64; 4]);

/// The units a replica holds for one key and rule: two generations at most (the older batch
/// and a lease's that landed before it ran out), each dying at its own time, the older used
/// first.
struct Batch {
    rule: Rule,
    /// Leased and not yet used, of the older generation (0 only when `next` is 0 too).
    units: u64,
    /// When the older units die: their window's end, or the lease time after their debit.
    expires: Instant,
    /// Leased and not yet used, of the newer generation.
    next: u64,
    /// When the newer units die.
    next_expires: Instant,
    /// When the lease that gave them was answered.
    answered: Instant,
    /// How long that lease took.
    rtt: Duration,
    /// Units held when it landed.
    landed: u64,
    /// The batch asked next.
    size: u64,
    /// The rule's remaining units in the store at the last lease (the batch excluded).
    remaining: u64,
    /// When the rule's quota is fully available again, as of the last lease.
    reset_at: Instant,
    last_used: Instant,
    /// A lease in flight for the key: the others wait for it (a few times at most, then
    /// they check directly) when the batch has nothing left for them.
    leasing: Option<Arc<Notify>>,
    /// Units that requests waiting for the lease in flight need.
    waiting: u64,
    /// Units of the batch kept for the requests that waited for it (the others, which did not
    /// wait, take only the rest).
    reserved: u64,
    /// The last lease's denial and until when it holds: the requests that waited for it are
    /// denied without another call (it can only deny what the store denied).
    denied: Option<(Instant, Decision)>,
    /// The cost the last denial was for.
    last_cost: u64,
}

impl Batch {
    fn new(rule: Rule, now: Instant) -> Self {
        Self {
            rule,
            units: 0,
            expires: now,
            next: 0,
            next_expires: now,
            answered: now,
            rtt: Duration::ZERO,
            landed: 0,
            size: 1,
            remaining: 0,
            reset_at: now,
            last_used: now,
            leasing: None,
            waiting: 0,
            reserved: 0,
            denied: None,
            last_cost: 0,
        }
    }

    /// Units held (both generations).
    fn held(&self) -> u64 {
        self.units + self.next
    }

    /// Units held that have not expired at `now`.
    fn valid(&self, now: Instant) -> u64 {
        let older = if self.expires > now { self.units } else { 0 };
        let newer = if self.next_expires > now {
            self.next
        } else {
            0
        };
        older + newer
    }

    /// Drops units past their expiry; the next batch is smaller (the key was not that busy).
    fn expire(&mut self, now: Instant, expired: &AtomicU64) {
        let mut lost = 0;
        if self.next > 0 && self.next_expires <= now {
            lost += std::mem::take(&mut self.next);
        }
        if self.units > 0 && self.expires <= now {
            lost += std::mem::take(&mut self.units);
        }
        if self.units == 0 && self.next > 0 {
            self.units = std::mem::take(&mut self.next);
            self.expires = self.next_expires;
        }
        if lost > 0 {
            expired.fetch_add(lost, Ordering::Relaxed);
            self.reserved = self.reserved.min(self.held());
            self.size = (self.size / 2).max(1);
        }
    }

    /// Adds `units` that die at `expires`: a generation of their own when one is free, else
    /// with the newer one, under the earlier of the two expiries (a unit never outlives its
    /// own).
    fn add(&mut self, units: u64, expires: Instant) {
        if units == 0 {
            return;
        }
        if self.units == 0 {
            (self.units, self.expires) = (units, expires);
        } else if self.next == 0 {
            (self.next, self.next_expires) = (units, expires);
            if self.next_expires < self.expires {
                std::mem::swap(&mut self.units, &mut self.next);
                std::mem::swap(&mut self.expires, &mut self.next_expires);
            }
        } else {
            self.next += units;
            self.next_expires = self.next_expires.min(expires);
        }
    }

    /// The last denial, while it holds, for a cost at least the denied one.
    fn denied(&mut self, cost: u64, now: Instant) -> Option<Decision> {
        match &self.denied {
            Some((until, decision)) if *until > now && cost >= self.last_cost => {
                let mut decision = decision.clone();
                decision.retry_after = until.saturating_duration_since(now);
                Some(decision)
            }
            Some(_) => {
                self.denied = None;
                None
            }
            None => None,
        }
    }

    /// Takes `cost` units if the batch holds them (call [`expire`](Self::expire) first): from
    /// the reserved ones for a request that `waited` for the lease, else from the rest.
    fn take(&mut self, cost: u64, now: Instant, waited: bool) -> Option<Decision> {
        let held = self.held();
        // The reservation is for the waiters woken by the lease; it lapses soon after, so a
        // waiter that gave up never holds units back for long.
        let available = if waited || self.reserved == 0 {
            held
        } else if now.saturating_duration_since(self.answered) < RESERVED_FOR {
            held.saturating_sub(self.reserved)
        } else {
            self.reserved = 0;
            held
        };
        if cost == 0 || available < cost {
            return None;
        }
        if waited {
            self.reserved = self.reserved.saturating_sub(cost);
        }
        let older = cost.min(self.units);
        self.units -= older;
        self.next -= cost - older;
        if self.units == 0 && self.next > 0 {
            self.units = std::mem::take(&mut self.next);
            self.expires = self.next_expires;
        }
        self.last_used = now;
        Some(admitted(
            self.remaining + self.units + self.next,
            self.reset_at.saturating_duration_since(now),
        ))
    }

    /// Whether to lease ahead at `now`: no lease is in flight, the key's batch grew past one
    /// unit and half of it is used, and at the pace since the last lease landed what is left
    /// runs out within a few of that lease's round trips (a key that is not that busy leases
    /// when its batch is empty, as before). The next batch then usually lands before this one
    /// runs out, and the key's requests are answered without waiting.
    fn runs_low(&self, now: Instant) -> bool {
        let held = self.held();
        if self.leasing.is_some() || self.size <= 1 || held * 2 > self.size {
            return false;
        }
        let used = u128::from(self.landed.saturating_sub(held));
        let elapsed = now.saturating_duration_since(self.answered).as_nanos();
        let trips = AHEAD_TRIPS * self.rtt.as_nanos().max(1);
        u128::from(held) * elapsed < trips * used
    }
}

fn admitted(remaining: u64, reset: Duration) -> Decision {
    Decision {
        allowed: true,
        denied_by: None,
        retry_after: Duration::ZERO,
        rules: RuleStates::one(RuleState { remaining, reset }),
    }
}

impl<B: RateLimitStore> Leased<B> {
    /// Leases from `store` as `lease` says.
    pub fn new(store: B, lease: Lease) -> Self {
        let mut id = [0u8; 16];
        let _ = hex::encode_to_slice(rand::random::<u64>().to_be_bytes(), &mut id);
        Self {
            inner: Arc::new(Inner {
                store,
                settle: B::settle,
                lease,
                replica: String::from_utf8_lossy(&id).into_owned(),
                batches: Mutex::new(Batches::default()),
                calls: AtomicU64::new(0),
                sweeping: std::sync::atomic::AtomicBool::new(false),
                leases: AtomicU64::new(0),
                prefetches: AtomicU64::new(0),
                denied_leases: AtomicU64::new(0),
                leased_units: AtomicU64::new(0),
                direct_checks: AtomicU64::new(0),
                local_admissions: AtomicU64::new(0),
                waits: AtomicU64::new(0),
                returns: AtomicU64::new(0),
                returned_units: AtomicU64::new(0),
                expired_units: AtomicU64::new(0),
            }),
        }
    }
}

impl<B> Leased<B> {
    /// The wrapped store.
    pub fn store(&self) -> &B {
        &self.inner.store
    }

    /// The lease settings.
    pub fn lease(&self) -> &Lease {
        &self.inner.lease
    }

    /// What this store (and its clones) did so far.
    pub fn stats(&self) -> LeaseStats {
        let i = &self.inner;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LeaseStats {
            leases: get(&i.leases),
            prefetches: get(&i.prefetches),
            denied_leases: get(&i.denied_leases),
            leased_units: get(&i.leased_units),
            direct_checks: get(&i.direct_checks),
            local_admissions: get(&i.local_admissions),
            waits: get(&i.waits),
            returns: get(&i.returns),
            returned_units: get(&i.returned_units),
            expired_units: get(&i.expired_units),
        }
    }

    /// Units held now (not expired), over every key. For tests.
    #[doc(hidden)]
    pub fn held(&self) -> u64 {
        let now = Instant::now();
        let batches = self.inner.batches();
        batches.values().map(|b| b.valid(now)).sum()
    }

    /// Forgets every batch without returning it, as a replica that crashed would. For tests.
    #[doc(hidden)]
    pub fn abandon(&self) {
        self.inner.batches().clear();
    }
}

impl<B> Inner<B> {
    /// Returns the unused units of `batch` (best effort, in the background).
    fn give_back(&self, key: &StoreKey, batch: &Batch, now: Instant) {
        let units = batch.valid(now);
        if !self.lease.return_unused || units == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let settlement = RateSettlement::new(
            key,
            std::slice::from_ref(&batch.rule),
            -i64::try_from(units).unwrap_or(i64::MAX),
            now.saturating_duration_since(batch.answered),
        );
        self.returns.fetch_add(1, Ordering::Relaxed);
        self.returned_units.fetch_add(units, Ordering::Relaxed);
        let call = (self.settle)(&self.store, settlement);
        runtime.spawn(async move {
            if let Err(error) = call.await {
                tracing::debug!(target: super::decision::TARGET, %error, units, "could not return leased units");
            }
        });
    }

    fn batches(&self) -> MutexGuard<'_, Batches> {
        // A panic while the lock was held leaves counts that are still valid numbers.
        self.batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn batch_key(key: &StoreKey, rule: &Rule) -> BatchKey {
    let (a, b, c) = rule.encode();
    (*key, [u64::from(rule.kind()), a, b, c])
}

/// The rule of a check that can be leased: a single fixed-window, token-bucket or GCRA rule.
fn leasable<'a>(check: &RateCheck<'a>) -> Option<&'a Rule> {
    match check.rules {
        [rule] if rule.strategy().leases() && check.cost > 0 => Some(rule),
        _ => None,
    }
}

impl<B: RateLeaseStore> Inner<B> {
    fn direct(&self, check: RateCheck<'_>) -> B::Future {
        self.direct_checks.fetch_add(1, Ordering::Relaxed);
        self.store.check(check)
    }

    /// Forgets the keys idle for longer than the idle time (returning their units).
    fn sweep(&self, batches: &mut Batches, now: Instant) {
        let idle = self.lease.idle;
        batches.retain(|(key, _), b| {
            let keep = b.leasing.is_some() || now.saturating_duration_since(b.last_used) < idle;
            if !keep {
                self.give_back(key, b, now);
            }
            keep
        });
    }

    /// Starts (once) the task that returns the units of idle keys every idle time; it ends
    /// when the store is dropped.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::Relaxed);
            return;
        };
        let weak = Arc::downgrade(self);
        let every = self.lease.idle.max(Duration::from_millis(10));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { break };
                {
                    let mut batches = inner.batches();
                    inner.sweep(&mut batches, Instant::now());
                }
                // The lock is released before `inner` may be the last clone (its drop locks).
                drop(inner);
            }
        });
    }

    async fn leased_check(
        self: Arc<Self>,
        key: StoreKey,
        rule: Rule,
        cost: u64,
        want_state: bool,
    ) -> Result<Decision, StoreError> {
        let bk = batch_key(&key, &rule);
        self.start_sweeping();
        let mut waits = 0;
        let (notify, target, want) = loop {
            let wait = {
                let now = Instant::now();
                let mut batches = self.batches();
                if self.calls.fetch_add(1, Ordering::Relaxed) % 256 == 255
                    || batches.len() >= self.lease.max_keys
                {
                    self.sweep(&mut batches, now);
                }
                if batches.len() >= self.lease.max_keys && !batches.contains_key(&bk) {
                    None
                } else {
                    let batch = batches
                        .entry(bk)
                        .or_insert_with(|| Batch::new(rule.clone(), now));
                    batch.expire(now, &self.expired_units);
                    if let Some(decision) = batch.take(cost, now, waits > 0) {
                        self.local_admissions.fetch_add(1, Ordering::Relaxed);
                        let ahead = self.ahead(batch, now);
                        drop(batches);
                        if let Some(ahead) = ahead {
                            self.prefetch(key, bk, rule, ahead);
                        }
                        return Ok(decision);
                    }
                    if let Some(denial) = batch.denied(cost, now) {
                        return Ok(denial);
                    }
                    match &batch.leasing {
                        Some(notify) if waits < MAX_WAITS => {
                            batch.waiting += cost;
                            // Made under the lock: the lease cannot end (and wake its waiters)
                            // before this waiter is one of them.
                            Some(Ok(Arc::clone(notify).notified_owned()))
                        }
                        Some(_) => None,
                        None => {
                            let notify = Arc::new(Notify::new());
                            batch.leasing = Some(Arc::clone(&notify));
                            // Ask for what the waiting requests need too: the batch matches
                            // the concurrency at once instead of growing to it.
                            // Units still held (kept for waiters) count: a replica holds at
                            // most `max` units after the grant.
                            let target = batch
                                .size
                                .max(batch.waiting.saturating_add(cost))
                                .min(self.lease.max.max(cost));
                            let want = target.saturating_sub(batch.held()).max(cost);
                            batch.waiting = 0;
                            batch.reserved = 0;
                            Some(Err((notify, target, want)))
                        }
                    }
                }
            };
            match wait {
                // Another request leases for the key: wait for it once, then take from its
                // batch or check directly.
                Some(Ok(notified)) => {
                    if waits == 0 {
                        self.waits.fetch_add(1, Ordering::Relaxed);
                    }
                    waits += 1;
                    notified.await;
                }
                Some(Err(lease)) => break lease,
                None => {
                    let rules = std::slice::from_ref(&rule);
                    return self
                        .direct(RateCheck::new(&key, rules, cost, want_state))
                        .await;
                }
            }
        };
        // Whatever happens to the lease, the waiters are woken and the key is free to lease.
        let done = Done {
            inner: &self,
            key: bk,
            notify,
        };
        self.leases.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let grant = self
            .store
            .lease(RateLease::new(&key, &rule, cost, want, &self.replica))
            .await;
        let landed = self.land(&bk, &rule, grant, sent, cost, want, target);
        drop(done);
        match landed {
            Landed::Answer(decision) => Ok(decision),
            Landed::Direct => {
                let rules = std::slice::from_ref(&rule);
                self.direct(RateCheck::new(&key, rules, cost, want_state))
                    .await
            }
            Landed::Failed(error) => Err(error),
        }
    }

    /// The lease to send ahead of need when `batch` runs low (see [`Batch::runs_low`]),
    /// marked in flight: its target and the units it asks for.
    fn ahead(&self, batch: &mut Batch, now: Instant) -> Option<Ahead> {
        if !batch.runs_low(now) {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        // As a request's lease: a replica holds at most `max` units after the grant.
        let target = batch.size.max(batch.waiting).min(self.lease.max);
        let want = target.saturating_sub(batch.held());
        if want == 0 {
            return None;
        }
        let notify = Arc::new(Notify::new());
        batch.leasing = Some(Arc::clone(&notify));
        batch.waiting = 0;
        Some(Ahead {
            runtime,
            notify,
            target,
            want,
        })
    }

    /// Sends the lease `ahead` in the background: its units join the key's batch, nobody
    /// waits for it while the batch holds units.
    fn prefetch(self: &Arc<Self>, key: StoreKey, bk: BatchKey, rule: Rule, ahead: Ahead) {
        let Ahead {
            runtime,
            notify,
            target,
            want,
        } = ahead;
        self.leases.fetch_add(1, Ordering::Relaxed);
        self.prefetches.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        // A lease of one unit needed (granted or denied as any), up to `want`.
        let call = self
            .store
            .lease(RateLease::new(&key, &rule, 1, want, &self.replica));
        let inner = Arc::clone(self);
        runtime.spawn(async move {
            let done = Done {
                inner: &inner,
                key: bk,
                notify,
            };
            // A stalled store does not hold the key's lease for longer than a layer's default
            // store timeout: then a request leases again (or the breaker answers).
            let grant = match tokio::time::timeout(PREFETCH_TIMEOUT, call).await {
                Ok(grant) => grant,
                Err(_) => Err(StoreError::Timeout(PREFETCH_TIMEOUT)),
            };
            if let Landed::Failed(error) = inner.land(&bk, &rule, grant, sent, 0, want, target) {
                tracing::debug!(target: super::decision::TARGET, %error, "could not lease ahead");
            }
            drop(done);
        });
    }

    /// Puts the answer to a lease sent at `sent` into the key's batch, `taken` units of a grant
    /// going to the request that leased (none for a lease ahead): the answer for it.
    #[allow(clippy::too_many_arguments)]
    fn land(
        &self,
        bk: &BatchKey,
        rule: &Rule,
        grant: Result<LeaseGrant, StoreError>,
        sent: Instant,
        taken: u64,
        want: u64,
        target: u64,
    ) -> Landed {
        let now = Instant::now();
        match grant {
            Ok(LeaseGrant::Granted {
                units,
                remaining,
                reset,
                window_left,
                replicas: _,
            }) => {
                self.leased_units.fetch_add(units, Ordering::Relaxed);
                // A unit dies no later than its window's end (fixed window) or its lease time
                // after its debit, both counted from before the call was sent: the store
                // debited it later than that.
                let life = match self.lease.lease_time(rule) {
                    Some(tau) => tau,
                    None => window_left,
                };
                let mut batches = self.batches();
                let batch = batches
                    .entry(*bk)
                    .or_insert_with(|| Batch::new(rule.clone(), now));
                batch.expire(now, &self.expired_units);
                // Units of an older lease still valid stay, with their own expiry.
                batch.add(units.saturating_sub(taken), sent + life);
                // The requests that waited for this lease come first.
                batch.reserved = batch.held().min(batch.waiting);
                batch.waiting = 0;
                batch.answered = now;
                batch.rtt = now.saturating_duration_since(sent);
                batch.landed = batch.held();
                batch.remaining = remaining;
                batch.reset_at = now + reset;
                batch.last_used = now;
                batch.denied = None;
                // Grow while the store gives all that was asked; follow it when it gives less.
                batch.size = if units < want {
                    units.max(1)
                } else {
                    target.saturating_mul(2).min(self.lease.max)
                };
                Landed::Answer(admitted(remaining + batch.held(), reset))
            }
            Ok(LeaseGrant::Denied {
                retry_after,
                remaining,
                reset,
            }) => {
                self.denied_leases.fetch_add(1, Ordering::Relaxed);
                let decision = Decision {
                    allowed: false,
                    denied_by: Some(0),
                    retry_after,
                    rules: RuleStates::one(RuleState { remaining, reset }),
                };
                if let Some(batch) = self.batches().get_mut(bk) {
                    batch.denied = Some((now + retry_after, decision.clone()));
                    batch.last_cost = taken.max(1);
                }
                Landed::Answer(decision)
            }
            Ok(LeaseGrant::Overridden) | Err(StoreError::Invalid(_)) => Landed::Direct,
            Err(error) => Landed::Failed(error),
        }
    }
}

/// A lease to send ahead of need.
struct Ahead {
    runtime: tokio::runtime::Handle,
    notify: Arc<Notify>,
    target: u64,
    want: u64,
}

/// What a lease's answer means for the request that sent it.
enum Landed {
    /// Its answer (admitted from the grant, or denied).
    Answer(Decision),
    /// Check it directly (an override, or a rule the store does not lease).
    Direct,
    /// The store failed.
    Failed(StoreError),
}

/// Ends a lease in flight: frees the key for the next lease and wakes the requests waiting.
struct Done<'a, B> {
    inner: &'a Inner<B>,
    key: BatchKey,
    notify: Arc<Notify>,
}

impl<B> Drop for Done<'_, B> {
    fn drop(&mut self) {
        if let Some(batch) = self.inner.batches().get_mut(&self.key) {
            // Only this lease's mark: the key may have been dropped and leased anew since.
            if batch
                .leasing
                .as_ref()
                .is_some_and(|n| Arc::ptr_eq(n, &self.notify))
            {
                batch.leasing = None;
            }
        }
        self.notify.notify_waiters();
    }
}

impl<B> Drop for Inner<B> {
    fn drop(&mut self) {
        // The last clone of the `Leased` store is gone: return what it held.
        let now = Instant::now();
        let batches = std::mem::take(&mut *self.batches());
        for ((key, _), batch) in &batches {
            self.give_back(key, batch, now);
        }
    }
}

impl<B> Clone for Leased<B> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for Leased<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leased")
            .field("store", &self.inner.store)
            .field("lease", &self.inner.lease)
            .field("replica", &self.inner.replica)
            .finish_non_exhaustive()
    }
}

impl<B: RateLeaseStore> RateLimitStore for Leased<B> {
    type Future = StoreFuture<Decision>;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        match leasable(&check).filter(|_| self.inner.store.is_remote()) {
            Some(rule) => Box::pin(Arc::clone(&self.inner).leased_check(
                *check.key,
                rule.clone(),
                check.cost,
                check.want_state,
            )),
            None => Box::pin(self.inner.direct(check)),
        }
    }

    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        if !self.inner.store.is_remote() {
            return self.inner.store.check_now(check);
        }
        let rule = leasable(&check)?;
        let bk = batch_key(check.key, rule);
        let now = Instant::now();
        let mut batches = self.inner.batches();
        let batch = batches.get_mut(&bk)?;
        batch.expire(now, &self.inner.expired_units);
        let decision = batch.take(check.cost, now, false)?;
        let ahead = self.inner.ahead(batch, now);
        drop(batches);
        self.inner.local_admissions.fetch_add(1, Ordering::Relaxed);
        if let Some(ahead) = ahead {
            self.inner.prefetch(*check.key, bk, rule.clone(), ahead);
        }
        Some(Ok(decision))
    }

    fn is_remote(&self) -> bool {
        self.inner.store.is_remote()
    }

    fn settle(&self, settlement: RateSettlement<'_>) -> StoreFuture<()> {
        self.inner.store.settle(settlement)
    }

    fn settle_now(&self, settlement: RateSettlement<'_>) -> Option<Result<(), StoreError>> {
        self.inner.store.settle_now(settlement)
    }

    fn reset(&self, key: &StoreKey, rules: &[Rule]) -> StoreFuture<()> {
        // Units held here for the key would outlive the reset: drop them.
        {
            let mut batches = self.inner.batches();
            for rule in rules {
                batches.remove(&batch_key(key, rule));
            }
        }
        self.inner.store.reset(key, rules)
    }

    fn set_override(&self, key: &StoreKey, state: Option<Override>) -> StoreFuture<()> {
        if matches!(state, Some(Override::Block(_))) {
            // A blocked key admits nothing more from this replica's batches.
            self.inner.batches().retain(|(k, _), _| k != key);
        }
        self.inner.store.set_override(key, state)
    }
}
