//! Leased quotas under demand above their limit: what was admitted, per window, against the
//! documented bounds (over-admission must be 0; under-admission is what leasing costs).
//!
//! A [`Recorder`] counts, per millisecond of the wall clock (the clock Redis reads with `TIME`,
//! on the same machine), the requests that reached a route (demand, counted before the
//! rate-limit layer), the admissions ([`Stamped`], above `Leased`, stamps them when the decision
//! is made, not when the handler runs later) and the requests the handler ran. [`Observed`] wraps the Redis store
//! under `Leased` and records each granted lease of a fixed window: when it was sent, when it
//! was answered, and the milliseconds its window had left (`PTTL` in the lease script). Since
//! the script reads `PTTL` between the send and the answer, the window's last millisecond on
//! Redis' clock lies in `[sent + left, answered + left]`; intersecting that over the window's
//! grants locates it, usually to a millisecond or two. A fixed window of the Redis stores is not
//! aligned on the clock: it starts at the first debit after the previous one expired and lasts
//! the period (Redis milliseconds `[end − period, end]`).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tower_redis_layers::{
    store::{
        Decision, LeaseGrant, Override, RateCheck, RateLease, RateLeaseStore, RateLimitStore,
        RateSettlement, Rule, StoreError, StoreFuture,
    },
    StoreKey,
};

/// How many milliseconds a [`Recorder`] covers from its last [`Recorder::start`].
const SPAN_MS: usize = 180_000;

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// A granted lease of a fixed window, as seen from the process.
#[derive(Clone, Copy)]
pub struct Grant {
    sent_us: u64,
    answered_us: u64,
    left_ms: u64,
    units: u64,
}

/// Per-millisecond counts of demand and admissions, and the grants of fixed-window leases.
pub struct Recorder {
    base_ms: AtomicU64,
    demand: Box<[AtomicU64]>,
    admitted: Box<[AtomicU64]>,
    /// Admissions stamped when the store decided them (above `Leased`), not in the handler.
    decided: Box<[AtomicU64]>,
    grants: Mutex<Vec<Grant>>,
    /// Denied leases, and the longest `retry_after` they answered (ms).
    denials: AtomicU64,
    longest_retry_ms: AtomicU64,
    /// Denied leases that answered a retry of a whole second or more.
    retries_of_a_second: AtomicU64,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        let counts = || (0..SPAN_MS).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Self {
            base_ms: AtomicU64::new(unix_us() / 1000),
            demand: counts(),
            admitted: counts(),
            decided: counts(),
            grants: Mutex::new(Vec::new()),
            denials: AtomicU64::new(0),
            longest_retry_ms: AtomicU64::new(0),
            retries_of_a_second: AtomicU64::new(0),
        })
    }

    /// Forgets what was recorded and counts from now.
    pub fn start(&self) {
        for c in self
            .demand
            .iter()
            .chain(&*self.admitted)
            .chain(&*self.decided)
        {
            c.store(0, Ordering::Relaxed);
        }
        self.grants_mut().clear();
        self.denials.store(0, Ordering::Relaxed);
        self.longest_retry_ms.store(0, Ordering::Relaxed);
        self.retries_of_a_second.store(0, Ordering::Relaxed);
        self.base_ms.store(unix_us() / 1000, Ordering::Relaxed);
    }

    fn grants_mut(&self) -> std::sync::MutexGuard<'_, Vec<Grant>> {
        self.grants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn hit(&self, counts: &[AtomicU64]) {
        let now = unix_us() / 1000;
        let i = now.saturating_sub(self.base_ms.load(Ordering::Relaxed)) as usize;
        if let Some(c) = counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request reached the route (before the rate-limit layer).
    pub fn demand(&self) {
        self.hit(&self.demand);
    }

    /// The handler ran: the request was admitted.
    pub fn admitted(&self) {
        self.hit(&self.admitted);
    }

    /// What was recorded since [`start`](Self::start).
    pub fn trace(&self) -> Trace {
        let load =
            |c: &[AtomicU64]| -> Vec<u64> { c.iter().map(|v| v.load(Ordering::Relaxed)).collect() };
        let mut demand = load(&self.demand);
        let mut served = load(&self.admitted);
        let mut admitted = load(&self.decided);
        let len = demand
            .iter()
            .zip(&served)
            .zip(&admitted)
            .rposition(|((d, s), a)| *d > 0 || *s > 0 || *a > 0)
            .map_or(0, |i| i + 1);
        demand.truncate(len);
        served.truncate(len);
        admitted.truncate(len);
        Trace {
            base_ms: self.base_ms.load(Ordering::Relaxed),
            demand,
            served: served.iter().sum(),
            admitted,
            grants: self.grants_mut().clone(),
            denials: self.denials.load(Ordering::Relaxed),
            longest_retry_ms: self.longest_retry_ms.load(Ordering::Relaxed),
            retries_of_a_second: self.retries_of_a_second.load(Ordering::Relaxed),
        }
    }
}

/// One run's record.
pub struct Trace {
    base_ms: u64,
    demand: Vec<u64>,
    /// Requests the handler ran.
    pub served: u64,
    /// Admissions per millisecond, stamped at the decision.
    admitted: Vec<u64>,
    grants: Vec<Grant>,
    pub denials: u64,
    pub longest_retry_ms: u64,
    pub retries_of_a_second: u64,
}

impl Trace {
    /// Requests admitted in the run.
    pub fn admitted(&self) -> u64 {
        self.admitted.iter().sum()
    }

    /// The first and last millisecond with demand.
    fn demand_span(&self) -> Option<(usize, usize)> {
        let first = self.demand.iter().position(|d| *d > 0)?;
        let last = self.demand.iter().rposition(|d| *d > 0)?;
        Some((first, last))
    }
}

/// The `RateLimitStore` methods both wrappers pass to the store they wrap unchanged.
macro_rules! delegate_to_store {
    () => {
        fn is_remote(&self) -> bool {
            self.store.is_remote()
        }

        fn settle(&self, settlement: RateSettlement<'_>) -> StoreFuture<()> {
            self.store.settle(settlement)
        }

        fn settle_now(&self, settlement: RateSettlement<'_>) -> Option<Result<(), StoreError>> {
            self.store.settle_now(settlement)
        }

        fn reset(&self, key: &StoreKey, rules: &[Rule]) -> StoreFuture<()> {
            self.store.reset(key, rules)
        }

        fn set_override(&self, key: &StoreKey, state: Option<Override>) -> StoreFuture<()> {
            self.store.set_override(key, state)
        }
    };
}

/// A rate-limit store that records the fixed-window leases it grants (see the module docs).
pub struct Observed<S> {
    store: S,
    recorder: Arc<Recorder>,
}

impl<S> Observed<S> {
    pub fn new(store: S, recorder: Arc<Recorder>) -> Self {
        Self { store, recorder }
    }
}

impl<S: RateLimitStore> RateLimitStore for Observed<S> {
    type Future = S::Future;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        self.store.check(check)
    }

    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        self.store.check_now(check)
    }

    delegate_to_store!();
}

impl<S: RateLeaseStore> RateLeaseStore for Observed<S> {
    fn lease(&self, lease: RateLease<'_>) -> StoreFuture<LeaseGrant> {
        // Taken before the call is made (and so before it is sent).
        let sent_us = unix_us();
        let call = self.store.lease(lease);
        let recorder = Arc::clone(&self.recorder);
        Box::pin(async move {
            let grant = call.await;
            let answered_us = unix_us();
            if let Ok(LeaseGrant::Denied { retry_after, .. }) = &grant {
                let ms = retry_after.as_millis() as u64;
                recorder.denials.fetch_add(1, Ordering::Relaxed);
                recorder.longest_retry_ms.fetch_max(ms, Ordering::Relaxed);
                if ms >= 1000 {
                    recorder.retries_of_a_second.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Ok(LeaseGrant::Granted {
                units, window_left, ..
            }) = &grant
            {
                if !window_left.is_zero() {
                    recorder.grants_mut().push(Grant {
                        sent_us,
                        answered_us,
                        left_ms: window_left.as_millis() as u64,
                        units: *units,
                    });
                }
            }
            grant
        })
    }
}

/// A rate-limit store that stamps each admission when it is decided (put above `Leased`).
pub struct Stamped<S> {
    store: S,
    recorder: Arc<Recorder>,
}

impl<S> Stamped<S> {
    pub fn new(store: S, recorder: Arc<Recorder>) -> Self {
        Self { store, recorder }
    }
}

impl<S: RateLimitStore> RateLimitStore for Stamped<S> {
    type Future = StoreFuture<Decision>;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        let call = self.store.check(check);
        let recorder = Arc::clone(&self.recorder);
        Box::pin(async move {
            let decision = call.await;
            if matches!(&decision, Ok(d) if d.allowed) {
                recorder.hit(&recorder.decided);
            }
            decision
        })
    }

    fn check_now(&self, check: RateCheck<'_>) -> Option<Result<Decision, StoreError>> {
        let decision = self.store.check_now(check);
        if matches!(&decision, Some(Ok(d)) if d.allowed) {
            self.recorder.hit(&self.recorder.decided);
        }
        decision
    }

    delegate_to_store!();
}

/// What the runs of one limited configuration gave, pooled over its runs.
#[derive(Default)]
pub struct Outcome {
    /// Windows seen (fixed: every window located; GCRA: every 1 s window in the demand).
    pub windows: usize,
    /// Admitted in each full window while demand exceeded the limit.
    pub full: Vec<u64>,
    /// Sum over windows of the admissions above the limit (fixed) or above the 1 s bound (GCRA).
    pub over: u64,
    /// Fixed window: admissions counted in two windows (their ranges overlap by the
    /// uncertainty of the boundary), and admissions in no located window.
    pub shared: u64,
    pub unattributed: u64,
    /// Fixed window: widest uncertainty of a window's end, ms; windows whose grants disagreed.
    pub widest_ms: u64,
    pub inconsistent: usize,
    /// Fixed window: most units debited by the grants of one window (at most the limit).
    pub most_debited: u64,
    /// Fixed window: the time from a window's end to the next one's start, ms (while demand
    /// lasted): no window, no admission.
    pub gaps: Vec<u64>,
    /// GCRA: the most admitted in any 1 s interval (1 ms steps).
    pub sliding_max: u64,
    /// Admitted and demand time over the runs, ms; GCRA: runs above the whole-run bound.
    pub run_admitted: u64,
    pub run_ms: u64,
    pub run_over: u64,
    /// Denied leases; the longest retry they answered (ms); those of a second or more.
    pub denials: u64,
    pub longest_retry_ms: u64,
    pub retries_of_a_second: u64,
}

impl Outcome {
    /// Adds what every strategy records: the denied leases.
    pub fn denials(&mut self, trace: &Trace) {
        self.denials += trace.denials;
        self.longest_retry_ms = self.longest_retry_ms.max(trace.longest_retry_ms);
        self.retries_of_a_second += trace.retries_of_a_second;
    }
}

impl Outcome {
    /// Min, mean and max admitted per full window.
    pub fn per_window(&self) -> Option<(u64, f64, u64)> {
        let min = *self.full.iter().min()?;
        let max = *self.full.iter().max()?;
        let mean = self.full.iter().sum::<u64>() as f64 / self.full.len() as f64;
        Some((min, mean, max))
    }

    /// Mean and max of `limit − admitted` per full window.
    pub fn under(&self, limit: u64) -> Option<(f64, i64)> {
        let (_, mean, _) = self.per_window()?;
        let max = self.full.iter().map(|a| limit as i64 - *a as i64).max()?;
        Some((limit as f64 - mean, max))
    }

    /// Adds one run of a fixed window of `limit` per `period` (see the module docs).
    pub fn fixed(&mut self, trace: &Trace, limit: u64, period: Duration) {
        let period = period.as_millis() as i64;
        let len = trace.admitted.len() as i64;
        let Some((first, last)) = trace.demand_span() else {
            return;
        };
        let base = trace.base_ms as i64;
        // Each grant: the window's last millisecond lies in [lo, hi] (run-relative).
        let mut bounds: Vec<(i64, i64, u64)> = trace
            .grants
            .iter()
            .map(|g| {
                let left = g.left_ms as i64;
                (
                    (g.sent_us / 1000) as i64 + left - base,
                    (g.answered_us / 1000) as i64 + left - base,
                    g.units,
                )
            })
            .collect();
        bounds.sort_unstable();
        // Group the grants of one window (windows are a period apart), then intersect.
        let mut windows: Vec<(i64, i64)> = Vec::new();
        let mut group: Vec<(i64, i64, u64)> = Vec::new();
        let mut close = |group: &mut Vec<(i64, i64, u64)>, out: &mut Self| {
            if group.is_empty() {
                return;
            }
            let lo = group.iter().map(|g| g.0).max().unwrap_or(0);
            let hi = group.iter().map(|g| g.1).min().unwrap_or(0);
            let (lo, hi) = if lo <= hi {
                (lo, hi)
            } else {
                out.inconsistent += 1;
                (
                    group.iter().map(|g| g.0).min().unwrap_or(0),
                    group.iter().map(|g| g.1).max().unwrap_or(0),
                )
            };
            out.most_debited = out.most_debited.max(group.iter().map(|g| g.2).sum());
            out.widest_ms = out.widest_ms.max((hi - lo) as u64);
            windows.push((lo, hi));
            group.clear();
        };
        for b in bounds {
            let start_new = group
                .iter()
                .map(|g| g.1)
                .max()
                .is_some_and(|hi| b.0 > hi + period / 2);
            if start_new {
                close(&mut group, self);
            }
            group.push(b);
        }
        close(&mut group, self);

        let mut prefix = vec![0u64; trace.admitted.len() + 1];
        for (i, a) in trace.admitted.iter().enumerate() {
            prefix[i + 1] = prefix[i] + a;
        }
        let sum = |from: i64, to: i64, counts: &[u64]| -> u64 {
            // Inclusive range, clamped to the run.
            let (from, to) = (from.max(0), to.min(len - 1));
            if from > to {
                return 0;
            }
            counts[from as usize..=to as usize].iter().sum()
        };
        // Between windows nothing is admitted; the next window starts at the first lease
        // after the previous one ended.
        for pair in windows.windows(2) {
            let (end, next_start) = (pair[0].0, pair[1].1 - period);
            if end >= first as i64 && next_start <= last as i64 {
                self.gaps.push((next_start - end - 1).max(0) as u64);
            }
        }
        self.run_admitted += trace.admitted();
        self.run_ms += (last - first + 1) as u64;
        let mut covered = vec![0u8; trace.admitted.len()];
        for &(lo, hi) in &windows {
            // Every millisecond that may belong to the window: [earliest start, latest end].
            let (from, to) = (lo - period, hi);
            let admitted = sum(from, to, &trace.admitted);
            self.windows += 1;
            self.over += admitted.saturating_sub(limit);
            for i in from.max(0)..=to.min(len - 1) {
                covered[i as usize] = covered[i as usize].saturating_add(1);
            }
            // Full: the window lies inside the demand, and the demand in the part of it that is
            // surely the window's exceeded the limit.
            let full = from >= first as i64
                && to <= last as i64
                && sum(hi - period, lo, &trace.demand) > limit;
            if full {
                self.full.push(admitted);
            }
        }
        for (i, c) in covered.iter().enumerate() {
            match c {
                0 => self.unattributed += trace.admitted[i],
                1 => {}
                _ => self.shared += trace.admitted[i],
            }
        }
    }

    /// Adds one run of a GCRA rule of `rate` per second, where any 1 s interval may admit at
    /// most `bound_1s`, and the whole run `burst + rate × T + slack`.
    pub fn gcra(&mut self, trace: &Trace, rate: u64, bound_1s: u64, burst: u64, slack: u64) {
        let Some((first, last)) = trace.demand_span() else {
            return;
        };
        let a = &trace.admitted;
        // Any 1,000 consecutive milliseconds hold admissions less than 1 s apart.
        let mut window: u64 = 0;
        for i in 0..a.len() {
            window += a[i];
            if i >= 1000 {
                window -= a[i - 1000];
            }
            self.sliding_max = self.sliding_max.max(window);
        }
        let mut start = first;
        while start + 1000 <= last + 1 {
            let admitted: u64 = a[start..start + 1000].iter().sum();
            let demand: u64 = trace.demand[start..start + 1000].iter().sum();
            self.windows += 1;
            self.over += admitted.saturating_sub(bound_1s);
            if demand > rate {
                self.full.push(admitted);
            }
            start += 1000;
        }
        let total = trace.admitted();
        let ms = (last - first + 1) as u64;
        self.run_admitted += total;
        self.run_ms += ms;
        let bound = burst + rate * ms / 1000 + slack;
        self.run_over += total.saturating_sub(bound);
    }
}
