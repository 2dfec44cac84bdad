//! Metered costs: where a response says what a request actually cost ([`Settlement`],
//! [`ActualCost`]), and the reservation that settles the difference with the estimate once the
//! response is known, or refunds it when there is none.

use std::sync::Arc;

use http::{HeaderName, Response};
use tokio::time::Instant;

use super::{
    decision::{Taken, TARGET},
    layer::Shared,
    policy::CompiledPolicy,
};
use crate::{
    key::StoreKey,
    store::{bounded, RateLimitStore, RateSettlement, StoreError},
};

/// Where a metered request's actual cost comes from, once the inner service answered; set with
/// [`RateLimitLayer::settlement`](super::RateLimitLayer::settlement).
///
/// The layer admits a request if its estimate (the [`cost`](super::RateLimitLayer::cost),
/// default 1) fits, and takes the estimate. When the response says the actual cost, the layer
/// charges or refunds the difference in one more store call, off the response path. A response
/// that does not say it keeps the estimate; an error of the inner service, or a response future
/// dropped before it finished (the client went away), refunds the estimate.
///
/// See the [module docs](super#metered-costs) for an example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    header: Option<HeaderName>,
}

impl Settlement {
    /// The actual cost is the [`ActualCost`] extension that the inner service puts on its
    /// response.
    pub fn extension() -> Self {
        Self { header: None }
    }

    /// The actual cost is the value of this response header (a decimal integer), unless the
    /// response has an [`ActualCost`] extension, which wins. The header is passed on to the
    /// client.
    pub fn header(name: HeaderName) -> Self {
        Self { header: Some(name) }
    }

    /// The actual cost that `response` reports, if it reports one.
    fn actual<B>(&self, response: &Response<B>) -> Option<u64> {
        if let Some(ActualCost(cost)) = response.extensions().get::<ActualCost>() {
            return Some(*cost);
        }
        let name = self.header.as_ref()?;
        let value = response.headers().get(name)?;
        let cost = value.to_str().ok().and_then(|v| v.trim().parse().ok());
        if cost.is_none() {
            tracing::warn!(target: TARGET, header = %name, ?value, "the actual cost is not a non-negative integer; the estimate stands");
        }
        cost
    }
}

/// The actual cost of a request, in units of the rules' limits, that a handler puts in its
/// response's extensions for a layer with a [`Settlement`] (for example the tokens an LLM call
/// generated).
///
/// ```
/// use http::Response;
/// use tower_redis_layers::rate_limit::ActualCost;
///
/// let mut response = Response::new(String::from(r#"{"tokens":120}"#));
/// response.extensions_mut().insert(ActualCost(120));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ActualCost(pub u64);

/// What the layer knows of a metered request until it is settled: whose estimate was taken,
/// and where. Dropped unsettled (the inner service failed, or the response future was dropped),
/// it refunds the estimate.
///
/// Boxed: only a metered layer has one, and the response future of every layer holds room
/// for it.
pub(crate) struct Reservation<B: RateLimitStore>(Box<Held<B>>);

/// A [`Reservation`]'s state.
struct Held<B: RateLimitStore> {
    shared: Arc<Shared<B>>,
    /// The policy the estimate was taken under, as it was then: a settlement goes to the same
    /// counters even if the layer's policies changed since.
    policy: Arc<CompiledPolicy>,
    key: StoreKey,
    estimate: u64,
    /// Where the estimate was taken, and when the layer learnt it; `None` until then, and
    /// after the settlement.
    taken: Option<(Taken, Instant)>,
}

impl<B: RateLimitStore> Reservation<B> {
    /// The reservation of a request of `estimate` units for `key` under policy `policy`, if the
    /// layer settles metered costs.
    pub(crate) fn new(
        shared: &Arc<Shared<B>>,
        policy: &Arc<CompiledPolicy>,
        key: StoreKey,
        estimate: u64,
    ) -> Option<Self> {
        shared.config.settlement.as_ref()?;
        Some(Self(Box::new(Held {
            shared: Arc::clone(shared),
            policy: Arc::clone(policy),
            key,
            estimate,
            taken: None,
        })))
    }

    /// Notes that the estimate was taken, from the store or the local fallback, now.
    pub(crate) fn taken(mut self, taken: Taken) -> Self {
        self.0.taken = Some((taken, Instant::now()));
        self
    }

    /// Settles with what `response` says the request cost; keeps the estimate when it says
    /// nothing.
    pub(crate) fn settle<T>(mut self, response: &Response<T>) {
        self.0.settle(response);
    }
}

impl<B: RateLimitStore> Held<B> {
    fn settle<T>(&mut self, response: &Response<T>) {
        let actual = (self.shared.config.settlement.as_ref()).and_then(|s| s.actual(response));
        match actual {
            Some(actual) => {
                let actual = actual.min(MAX_UNITS);
                let delta = i64::try_from(actual).unwrap_or(i64::MAX)
                    - i64::try_from(self.estimate).unwrap_or(i64::MAX);
                self.apply(delta);
            }
            None => {
                tracing::debug!(target: TARGET, key = %self.key, estimate = self.estimate, "no actual cost in the response; the estimate stands");
                self.taken = None;
            }
        }
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) where the estimate was taken: in place
    /// for an in-process store (or the local fallback), else in a spawned task bounded by the
    /// store timeout, so the response does not wait for it.
    fn apply(&mut self, delta: i64) {
        let Some((taken, at)) = self.taken.take() else {
            return;
        };
        if delta == 0 {
            return;
        }
        let shared = &self.shared;
        let policy = &self.policy;
        let age = at.elapsed();
        let outcome = if delta > 0 { "charged" } else { "refunded" };
        if taken != Taken::Store {
            // The local fallback's counts: what decided (the store failed), or a shadow of the
            // store's (kept to bound the next outage).
            let local = (policy.local.as_ref()).map(|rules| {
                shared
                    .local
                    .settle(RateSettlement::new(&self.key, rules, delta, age))
            });
            if taken == Taken::Local {
                if let Some(result) = local {
                    done(&self.key, delta, outcome, result);
                }
                return;
            }
        }
        let settlement = RateSettlement::new(&self.key, &policy.rules, delta, age);
        let remote = shared.store.is_remote();
        if !remote {
            if let Some(result) = shared.store.settle_now(settlement) {
                return done(&self.key, delta, outcome, result);
            }
        }
        let timeout = remote.then_some(shared.config.store_timeout);
        let call = shared.store.settle(settlement);
        let key = self.key;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let result = bounded(timeout, call).await;
                    done(&key, delta, outcome, result);
                });
            }
            Err(_) => {
                let error = StoreError::Invalid("no Tokio runtime to settle in".into());
                done(&key, delta, outcome, Err(error));
            }
        }
    }
}

impl<B: RateLimitStore> Drop for Held<B> {
    /// Refunds the estimate of a request that has no response: the inner service failed, or
    /// the response future was dropped before it finished.
    fn drop(&mut self) {
        if self.taken.is_some() {
            let estimate = i64::try_from(self.estimate.min(MAX_UNITS)).unwrap_or(0);
            self.apply(-estimate);
        }
    }
}

/// The largest actual cost settled (larger ones are cut to it): Lua's numbers stay exact.
const MAX_UNITS: u64 = 1 << 50;

/// Logs (and counts, feature `metrics`) how a settlement ended. A failed one is never the
/// client's concern: the estimate stands.
fn done(key: &StoreKey, delta: i64, outcome: &'static str, result: Result<(), StoreError>) {
    let outcome = match result {
        Ok(()) => {
            tracing::debug!(target: TARGET, key = %key, delta, outcome, "metered cost settled");
            outcome
        }
        Err(error) => {
            log_store_failure!(error, target: TARGET, key = %key, delta, %error, "settling a metered cost failed; the estimate stands");
            "failed"
        }
    };
    #[cfg(feature = "metrics")]
    metrics::counter!("tower_redis_layers_rate_limit_settlements_total", "outcome" => outcome)
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}
