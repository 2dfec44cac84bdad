//! The circuit breaker of a Redis store: after a run of failed calls, calls fail at once (no
//! request waits on a server that is not answering) until a probe call succeeds.
//!
//! One breaker belongs to one store value and its clones (one client connection), so every
//! layer on that store shares it. States:
//!
//! - **closed**: calls go to Redis; a failure (an error reaching Redis, a timeout, or a call
//!   dropped unfinished because the layer's store timeout gave up on it) adds to a run, a
//!   success ends the run. [`CircuitBreaker::failures`] failures in a row open the breaker.
//! - **open**: every call fails at once with [`StoreError::CircuitOpen`]; the layers then answer
//!   from their fallback (the rate limiter's local limits, the cache's inner service,
//!   idempotency's `503`). After [`CircuitBreaker::probe_interval`] the breaker is half-open.
//! - **half-open**: the next call still fails at once, and starts one probe in the background:
//!   a read-only script on the call's first key (so on the node that owns its slot), bounded by
//!   the probe interval. Its success closes the breaker, its failure opens it for another
//!   interval. No request ever waits on a probe.
//!
//! Transitions are logged (`tracing`, target `tower_redis_layers::breaker`) and, with the
//! `metrics` feature, reported as the gauge `tower_redis_layers_breaker_open` (1 while open or
//! half-open) and the counters `tower_redis_layers_breaker_transitions_total{to}` and
//! `tower_redis_layers_breaker_rejected_total` (calls failed at once).
#![cfg_attr(not(any(feature = "redis", feature = "fred")), allow(dead_code))]

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::time::Instant;

use super::StoreError;

const TARGET: &str = "tower_redis_layers::breaker";

/// The settings of a Redis store's circuit breaker (on by default with
/// [`CircuitBreaker::default`]): set with `RedisStore::breaker` or `FredStore::breaker`, turned
/// off with `no_breaker()`.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_layers::store::CircuitBreaker;
///
/// let breaker = CircuitBreaker::default()
///     .failures(3)
///     .probe_interval(Duration::from_millis(250));
/// # let _ = breaker;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CircuitBreaker {
    failures: u32,
    probe_interval: Duration,
}

impl Default for CircuitBreaker {
    /// Opens after 5 failures in a row; probes every 250 ms while open.
    fn default() -> Self {
        Self {
            failures: 5,
            probe_interval: Duration::from_millis(250),
        }
    }
}

impl CircuitBreaker {
    /// How many failed calls in a row open the breaker (default 5; at least 1).
    pub fn failures(mut self, failures: u32) -> Self {
        self.failures = failures.max(1);
        self
    }

    /// How long the breaker stays open before it lets one probe call through (default 250 ms).
    /// A failover or an outage costs the time Redis is away plus at most this interval.
    /// At least 10 ms.
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval.max(MIN_PROBE_INTERVAL);
        self
    }
}

/// The shortest probe interval.
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// The shortest bound on a probe: a probe may have to reconnect (and load the scripts) before
/// it answers, so a short probe interval must not fail every probe of a healthy Redis.
const MIN_PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// How long a call must have been under way for its caller giving up on it to count as a
/// failure. A healthy Redis answers well within it, so a call dropped sooner was cancelled by
/// its caller (a client that hung up, a timeout above the layer), not left unanswered.
const DROPPED_AFTER: Duration = Duration::from_millis(50);

const CLOSED: u8 = 0;
const OPEN: u8 = 1;

/// A store's breaker state, shared by the store's clones; `None` when turned off. Public only
/// because the sealed runner trait names it.
#[derive(Clone, Debug, Default)]
#[cfg_attr(not(any(feature = "redis", feature = "fred")), allow(unreachable_pub))]
pub struct Breaker(Option<Arc<State>>);

#[derive(Debug)]
struct State {
    config: CircuitBreaker,
    /// When the times below count from.
    epoch: Instant,
    state: AtomicU8,
    /// Failures in a row while closed.
    run: AtomicU32,
    /// While open: when a probe may go (ns since `epoch`).
    probe_at: AtomicU64,
    /// Whether a probe call is under way.
    probing: AtomicBool,
}

impl Breaker {
    /// A breaker with `config`.
    pub(crate) fn new(config: CircuitBreaker) -> Self {
        Self(Some(Arc::new(State {
            config,
            epoch: Instant::now(),
            state: AtomicU8::new(CLOSED),
            run: AtomicU32::new(0),
            probe_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        })))
    }

    /// No breaker: every call goes to the store.
    pub(crate) fn off() -> Self {
        Self(None)
    }

    /// Whether the breaker is open or half-open.
    pub(crate) fn is_open(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|s| s.state.load(Ordering::Acquire) == OPEN)
    }

    /// Lets a call through (with a permit that records how it ended), or fails it at once while
    /// the breaker is open; once a probe interval has passed, the refusal carries the permit of
    /// the probe the caller sends in the background.
    pub(crate) fn admit(&self) -> Admission {
        let Some(state) = &self.0 else {
            return Admission::Go(Permit(None));
        };
        if state.state.load(Ordering::Acquire) == CLOSED {
            return Admission::Go(Permit(Some((state.clone(), false, Instant::now()))));
        }
        let now = state.nanos();
        let probe_at = state.probe_at.load(Ordering::Acquire);
        let probe = (now >= probe_at
            && state
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok())
        .then(|| {
            tracing::debug!(target: TARGET, "circuit breaker half-open: probing Redis");
            Permit(Some((state.clone(), true, Instant::now())))
        });
        #[cfg(feature = "metrics")]
        metrics::counter!("tower_redis_layers_breaker_rejected_total").increment(1);
        let wait = Duration::from_nanos(probe_at.saturating_sub(now));
        Admission::Open {
            error: StoreError::CircuitOpen(wait),
            probe,
        }
    }

    /// How long a probe may take before it counts as failed: the probe interval, at least
    /// 250 ms.
    pub(crate) fn probe_timeout(&self) -> Duration {
        self.0.as_ref().map_or(Duration::ZERO, |s| {
            s.config.probe_interval.max(MIN_PROBE_TIMEOUT)
        })
    }
}

/// What the breaker says to a call.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Send the call, then record how it ended with the permit.
    Go(Permit),
    /// Fail the call at once with `error`; when `probe` is given, send a probe in the
    /// background and record how it ended with that permit.
    Open {
        error: StoreError,
        probe: Option<Permit>,
    },
}

impl State {
    fn nanos(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn success(&self, probe: bool) {
        // Read first: most calls succeed after a success, and a store on every call would make
        // every thread's calls contend for the line.
        if self.run.load(Ordering::Acquire) != 0 {
            self.run.store(0, Ordering::Release);
        }
        if probe {
            self.state.store(CLOSED, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            tracing::info!(target: TARGET, "circuit breaker closed: Redis answered the probe");
            transition("closed");
        } else if self.state.load(Ordering::Acquire) == OPEN {
            // A call let through before the breaker opened answered: Redis is back.
            self.state.store(CLOSED, Ordering::Release);
            tracing::info!(target: TARGET, "circuit breaker closed: Redis answered");
            transition("closed");
        }
    }

    fn failure(&self, probe: bool, error: &str) {
        if probe {
            self.open_until_next_probe();
            self.probing.store(false, Ordering::Release);
            tracing::debug!(target: TARGET, error, "circuit breaker probe failed; open again");
            return;
        }
        let run = self.run.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        if run < self.config.failures {
            return;
        }
        if self.state.load(Ordering::Acquire) == CLOSED {
            // The time of the first probe is set before the breaker opens, so that no call
            // admitted in between reads a stale one.
            self.open_until_next_probe();
        }
        if self
            .state
            .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!(
                target: TARGET,
                failures = run,
                error,
                probe_in_ms = self.config.probe_interval.as_millis() as u64,
                "circuit breaker open: Redis calls fail at once until a probe succeeds"
            );
            transition("open");
        }
    }

    fn open_until_next_probe(&self) {
        let at = self
            .nanos()
            .saturating_add(u64::try_from(self.config.probe_interval.as_nanos()).unwrap_or(0));
        self.probe_at.store(at, Ordering::Release);
    }
}

/// Reports a transition (feature `metrics`).
fn transition(to: &'static str) {
    #[cfg(feature = "metrics")]
    {
        metrics::gauge!("tower_redis_layers_breaker_open").set(if to == "open" {
            1.0
        } else {
            0.0
        });
        metrics::counter!("tower_redis_layers_breaker_transitions_total", "to" => to).increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = to;
}

/// A call let through the breaker (the state, whether it is a probe, when it was sent). Dropped
/// before [`Permit::record`] after [`DROPPED_AFTER`] under way (the layer's store timeout gave
/// up on it) it counts as a failure; dropped sooner, its caller cancelled it and it counts for
/// nothing.
#[derive(Debug)]
pub(crate) struct Permit(Option<(Arc<State>, bool, Instant)>);

impl Permit {
    /// Records how the call ended, and passes its result on.
    pub(crate) fn record<T>(mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Some((state, probe, _)) = self.0.take() {
            match &result {
                Err(err) if counts_as_failure(err) => state.failure(probe, &err.to_string()),
                _ => state.success(probe),
            }
        }
        result
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((state, probe, sent)) = self.0.take() {
            if probe || sent.elapsed() >= DROPPED_AFTER {
                state.failure(probe, "the call was given up unfinished (store timeout)");
            }
        }
    }
}

/// Whether an error says Redis is not answering (rather than that it answered something this
/// crate did not expect).
fn counts_as_failure(err: &StoreError) -> bool {
    match err {
        StoreError::Timeout(_) => true,
        StoreError::Store(err) => !err.is::<ServerAnswer>(),
        _ => false,
    }
}

/// An error that the server itself answered (a script error, `TRYAGAIN` once its retries are
/// used up, `OOM` on a full server): the server is up and answering, so it does not count
/// towards opening the breaker. A slot that migrates answers `TRYAGAIN` to calls on several of
/// its keys for as long as the migration lasts; counting those would open the breaker for every
/// key of the store.
#[derive(Debug)]
#[cfg_attr(not(any(feature = "redis", feature = "fred")), allow(dead_code))]
pub(crate) struct ServerAnswer(pub(crate) Box<dyn std::error::Error + Send + Sync>);

impl ServerAnswer {
    /// The store error of an error the server answered.
    #[cfg_attr(not(any(feature = "redis", feature = "fred")), allow(dead_code))]
    pub(crate) fn error(err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        StoreError::Store(Box::new(Self(Box::new(err))))
    }
}

impl std::fmt::Display for ServerAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ServerAnswer {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(1)))
    }

    impl Admission {
        fn go(self) -> Permit {
            match self {
                Admission::Go(permit) => permit,
                Admission::Open { .. } => panic!("refused"),
            }
        }

        fn probe(self) -> Option<Permit> {
            match self {
                Admission::Go(_) => panic!("admitted"),
                Admission::Open { probe, error } => {
                    assert!(matches!(error, StoreError::CircuitOpen(_)));
                    probe
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_a_run_of_failures_and_closes_on_a_probe() {
        let config = CircuitBreaker::default()
            .failures(3)
            .probe_interval(Duration::from_millis(100));
        let breaker = Breaker::new(config);
        for _ in 0..2 {
            let _ = breaker.admit().go().record(failed());
        }
        // A success ends the run.
        let _ = breaker.admit().go().record(Ok(()));
        for _ in 0..2 {
            let _ = breaker.admit().go().record(failed());
        }
        assert!(!breaker.is_open());
        // A call cancelled by its caller at once is nothing.
        drop(breaker.admit().go());
        assert!(!breaker.is_open());
        // A call given up unfinished (after the store timeout) is a failure.
        let given_up = breaker.admit().go();
        tokio::time::advance(DROPPED_AFTER).await;
        drop(given_up);
        assert!(breaker.is_open());
        assert!(breaker.admit().probe().is_none());

        tokio::time::advance(Duration::from_millis(100)).await;
        let probe = breaker.admit().probe().expect("a probe after the interval");
        // One probe at a time.
        assert!(breaker.admit().probe().is_none());
        let _ = probe.record(failed());
        assert!(breaker.admit().probe().is_none());

        tokio::time::advance(Duration::from_millis(100)).await;
        let probe = breaker.admit().probe().expect("a probe after the interval");
        let _ = probe.record(Ok(()));
        assert!(!breaker.is_open());
        let _ = breaker.admit().go();
    }

    #[test]
    fn a_reply_error_is_not_a_failure() {
        let breaker = Breaker::new(CircuitBreaker::default().failures(1));
        let _ = breaker
            .admit()
            .go()
            .record::<()>(Err(StoreError::Reply("odd".into())));
        // An error the server answered is an answer: it does not count either.
        for _ in 0..10 {
            let _ = breaker
                .admit()
                .go()
                .record::<()>(Err(ServerAnswer::error(std::fmt::Error)));
        }
        assert!(!breaker.is_open());
        let _ = Breaker::off().admit().go();
    }
}
