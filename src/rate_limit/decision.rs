//! From a store's answer to the layer's: admit (with the fields to add) or reject (with the
//! response), and the responses the layer sends itself.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};

use super::{
    deny_cache,
    headers::{has_state, insert_retry_after},
    layer::{Config, Shared},
    policy::CompiledPolicy,
    LocalFallback, Rejection,
};
use crate::{
    key::StoreKey,
    store::{Decision, FailureMode, StoreError},
};

pub(crate) const TARGET: &str = "tower_redis_layers::rate_limit";

/// What the layer does with a request.
pub(crate) enum Answer {
    /// Call the inner service, then add these fields to its response (boxed: rarely there, and
    /// the answer is moved on its way to the response future).
    Admit(Option<Box<HeaderMap>>),
    /// As [`Answer::Admit`], and the request's cost was taken from the store's counters (or,
    /// [`Taken::Local`], the local fallback's): where a metered cost is settled.
    Taken(Option<Box<HeaderMap>>, Taken),
    /// Answer with this response; the inner service is not called.
    Reject(Response<Bytes>),
}

/// Where an admitted request's cost was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// From the store.
    Store,
    /// From the store, and from the local fallback's counts that shadow it while it works.
    StoreAndLocal,
    /// From the local fallback, while the store failed.
    Local,
}

/// Whether the local fallback's counts took the cost of a request the store admitted.
enum Counted {
    Yes,
    No,
    /// No, and the request is denied (the local limits hold after a recent failure).
    Denied(Answer),
}

/// One request's check, as the answer needs it once the store has replied (with the policy it
/// was checked under).
pub(crate) struct Check {
    pub(crate) key: StoreKey,
    pub(crate) cost: u64,
    /// Whether the store is remote (then a denial goes into the deny cache).
    pub(crate) remote: bool,
    #[cfg(feature = "metrics")]
    /// When a remote store was called (its latency is recorded; an in-process store's is not).
    pub(crate) started: Option<std::time::Instant>,
}

/// What a future waiting for the store holds: the check, the policy it checks (as it was when
/// the request arrived, whatever the layer's policies are by the time the store answers) and
/// the state it is answered with.
pub(crate) struct Pending<B> {
    shared: Arc<Shared<B>>,
    policy: Arc<CompiledPolicy>,
    check: Check,
}

impl<B> Pending<B> {
    pub(crate) fn new(shared: &Arc<Shared<B>>, policy: &Arc<CompiledPolicy>, check: Check) -> Self {
        Self {
            shared: Arc::clone(shared),
            policy: Arc::clone(policy),
            check,
        }
    }

    pub(crate) fn finish(self, result: Result<Decision, StoreError>) -> Answer {
        self.check.answer(&self.shared, &self.policy, result)
    }
}

impl Check {
    /// The answer to the request under `policy`, given the store's reply.
    ///
    /// Inlined for the usual reply of an in-process store (an admission, nothing to count
    /// locally or to time); everything else is [`answer_any`](Self::answer_any).
    #[inline]
    pub(crate) fn answer<B>(
        self,
        shared: &Shared<B>,
        policy: &CompiledPolicy,
        result: Result<Decision, StoreError>,
    ) -> Answer {
        match result {
            Ok(decision) if decision.allowed && !self.remote => {
                admitted(&shared.config, policy, &self.key, &decision, Taken::Store)
            }
            result => self.answer_any(shared, policy, result),
        }
    }

    /// [`answer`](Self::answer), for any reply.
    fn answer_any<B>(
        self,
        shared: &Shared<B>,
        policy: &CompiledPolicy,
        result: Result<Decision, StoreError>,
    ) -> Answer {
        #[cfg(feature = "metrics")]
        if let Some(started) = self.started {
            metrics::histogram!("tower_redis_layers_rate_limit_store_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        let config = &shared.config;
        match result {
            Err(error) => {
                count("store_error");
                if let Some(fallback) = config.local_fallback.filter(|_| self.remote) {
                    return self.fallback(shared, policy, fallback, &error);
                }
                let open = matches!(config.failure_mode, FailureMode::Open);
                log_store_failure!(error, target: TARGET, key = %self.key, %error, fail_open = open, "rate-limit store failed");
                failed(config)
            }
            Ok(decision) if decision.allowed => {
                let mut taken = Taken::Store;
                if self.remote && config.local_fallback.is_some() {
                    match self.count_locally(shared, policy) {
                        Counted::Denied(answer) => return answer,
                        Counted::Yes => taken = Taken::StoreAndLocal,
                        Counted::No => {}
                    }
                }
                admitted(config, policy, &self.key, &decision, taken)
            }
            Ok(decision) if config.shadow => {
                count("denied_shadow");
                let rule = decision.denied_by.map(|i| policy.fields.name(i));
                let retry_after_ms = decision.retry_after.as_millis() as u64;
                tracing::info!(target: TARGET, key = %self.key, rule, outcome = "denied_shadow", retry_after_ms);
                let mut h = HeaderMap::new();
                let which = config.denial_fields();
                policy.fields.insert_state(&mut h, &decision, which);
                Answer::Admit(Some(Box::new(h)))
            }
            Ok(decision) => self.denied(shared, policy, &decision),
        }
    }

    /// The answer of the local fallback, when the store failed with `error`.
    fn fallback<B>(
        mut self,
        shared: &Shared<B>,
        policy: &CompiledPolicy,
        fallback: LocalFallback,
        error: &StoreError,
    ) -> Answer {
        let config = &shared.config;
        // Refused calls hold too: a breaker that closes between failures (a cluster failover,
        // a lossy network) must not hand the budget back to the store each time it closes.
        shared.local.failed(fallback.hold);
        log_store_failure!(error, target: TARGET, key = %self.key, %error, "rate-limit store failed; local limits apply");
        // A local denial is not the store's: it does not go into the deny cache.
        self.remote = false;
        let Some(rules) = &policy.local else {
            count("denied_fallback");
            let response = denied_locally(config, policy, &self.key, 0, Duration::from_secs(1));
            return Answer::Reject(response);
        };
        match shared
            .local
            .check(&self.key, rules, self.cost, config.wants_state())
        {
            Ok(decision) if decision.allowed => {
                count("allowed_fallback");
                admitted(config, policy, &self.key, &decision, Taken::Local)
            }
            Ok(decision) if !config.shadow => self.denied(shared, policy, &decision),
            Ok(_) => Answer::Admit(None),
            Err(error) => {
                tracing::error!(target: TARGET, %error, "the local rate-limit fallback failed");
                failed(config)
            }
        }
    }

    /// Counts a request the store admitted against the local rules too. While the local limits
    /// hold after a recent failure, a local denial denies the request.
    fn count_locally<B>(&self, shared: &Shared<B>, policy: &CompiledPolicy) -> Counted {
        let config = &shared.config;
        let holding = shared.local.holding();
        // A rule whose share rounds down to 0 admits nothing locally, so there is no local
        // budget to keep from doubling: the store's answer stands.
        let Some(rules) = policy.local.as_ref() else {
            return Counted::No;
        };
        let Ok(decision) = shared.local.check(&self.key, rules, self.cost, holding) else {
            return Counted::No;
        };
        if decision.allowed {
            return Counted::Yes;
        }
        if !holding || config.shadow {
            return Counted::No;
        }
        let check = Check {
            key: self.key,
            cost: self.cost,
            remote: false,
            #[cfg(feature = "metrics")]
            started: None,
        };
        Counted::Denied(check.denied(shared, policy, &decision))
    }

    fn denied<B>(self, shared: &Shared<B>, policy: &CompiledPolicy, decision: &Decision) -> Answer {
        let config = &shared.config;
        let name = decision.denied_by.map_or("", |i| policy.fields.name(i));
        count("denied");
        let retry_after_ms = decision.retry_after.as_millis() as u64;
        tracing::info!(target: TARGET, key = %self.key, rule = name, outcome = "denied", retry_after_ms);
        let violated = violated(policy, decision, self.cost);
        let mut response = limited(config, name, &violated, decision.retry_after);
        let headers = response.headers_mut();
        insert_retry_after(headers, decision.retry_after);
        if !has_state(headers) {
            let which = config.denial_fields();
            policy.fields.insert_state(headers, decision, which);
        }
        if config.deny_cache && self.remote && !decision.retry_after.is_zero() {
            let until = tokio::time::Instant::now() + decision.retry_after;
            let cost = self.cost;
            let rule = decision.denied_by.unwrap_or(0);
            let entry = deny_cache::Entry { until, cost, rule };
            shared.deny_cache.insert(policy.id, self.key, entry);
        }
        Answer::Reject(response)
    }
}

#[inline]
fn admitted(
    config: &Config,
    policy: &CompiledPolicy,
    key: &StoreKey,
    decision: &Decision,
    taken: Taken,
) -> Answer {
    count("allowed");
    if !config.wants_state() {
        // The store was not asked for the state: `remaining` means nothing here.
        tracing::debug!(target: TARGET, key = %key, outcome = "allowed");
        return Answer::Taken(None, taken);
    }
    let remaining = decision.rules.iter().map(|s| s.remaining).min();
    tracing::debug!(target: TARGET, key = %key, outcome = "allowed", remaining = remaining.unwrap_or(0));
    let mut h = HeaderMap::new();
    let which = config.admission_fields();
    policy.fields.insert_state(&mut h, decision, which);
    Answer::Taken(Some(Box::new(h)), taken)
}

/// The `429` that the local deny cache answers for rule `rule` of `policy`, `wait` before the
/// store would admit a request of the same cost again.
pub(crate) fn denied_locally(
    config: &Config,
    policy: &CompiledPolicy,
    key: &StoreKey,
    rule: usize,
    wait: Duration,
) -> Response<Bytes> {
    count("denied_local");
    let name = policy.fields.name(rule);
    tracing::debug!(target: TARGET, key = %key, rule = name, outcome = "denied_local", retry_after_ms = wait.as_millis() as u64);
    let which = config.denial_fields();
    if config.rejection.is_none() {
        // The default body, encoded once for this rule, and the fields written at once.
        if let Some(response) = policy.fields.denied_response(rule, wait, which) {
            return response;
        }
    }
    let mut response = limited(config, name, &[name], wait);
    policy
        .fields
        .insert_denied(response.headers_mut(), rule, wait, which);
    response
}

/// What the layer does when the store failed (or the policy cannot be checked), by its
/// [`FailureMode`].
pub(crate) fn failed(config: &Config) -> Answer {
    match config.failure_mode {
        FailureMode::Open => Answer::Admit(None),
        FailureMode::Closed => {
            let mut response = rejection(config, &Rejection::Unavailable);
            insert_retry_after(response.headers_mut(), Duration::from_secs(1));
            Answer::Reject(response)
        }
    }
}

/// The `400` for a request without a key, when [`MissingKey::Reject`](super::MissingKey) is set.
pub(crate) fn missing_key(config: &Config) -> Response<Bytes> {
    count("missing_key");
    rejection(config, &Rejection::MissingKey)
}

/// The names of the rules `decision` says a request of `cost` exceeds, in the policy's order (the
/// order of the `RateLimit` field): the rule that denied it (the longest wait) and every other
/// rule that the field shows with less than `cost` remaining.
fn violated<'a>(policy: &'a CompiledPolicy, decision: &Decision, cost: u64) -> Vec<&'a str> {
    let Some(denied_by) = decision.denied_by else {
        return Vec::new();
    };
    let exceeded =
        |(i, state): &(usize, &crate::store::RuleState)| *i == denied_by || state.remaining < cost;
    let mut names: Vec<&str> = (decision.rules.iter().enumerate())
        .filter(exceeded)
        .map(|(i, _)| policy.fields.name(i))
        .collect();
    if decision.rules.get(denied_by).is_none() {
        names.insert(0, policy.fields.name(denied_by));
    }
    names
}

/// The `429` for `rule` (the rule with the longest wait) and the `violated` rules: the names are
/// copied only for a configured rejection builder.
fn limited(
    config: &Config,
    rule: &str,
    violated: &[&str],
    retry_after: Duration,
) -> Response<Bytes> {
    match &config.rejection {
        Some(f) => f(&Rejection::Limited {
            rule: rule.to_owned(),
            violated_policies: violated.iter().map(|&name| name.to_owned()).collect(),
            retry_after,
        }),
        None => crate::problem::quota_exceeded(violated),
    }
}

/// The response for `why`, from the configured rejection builder or the default problem
/// details (RFC 9457).
fn rejection(config: &Config, why: &Rejection) -> Response<Bytes> {
    if let Some(f) = &config.rejection {
        return f(why);
    }
    let [unavailable, missing] = DEFAULT_BODIES;
    let (status, _, body) = match why {
        Rejection::Limited {
            violated_policies, ..
        } => {
            let names: Vec<&str> = violated_policies.iter().map(String::as_str).collect();
            return crate::problem::quota_exceeded(&names);
        }
        Rejection::Unavailable => unavailable,
        Rejection::MissingKey => missing,
    };
    crate::problem::problem_static(status, body)
}

/// The default rejections other than a `429` (see [`crate::problem::quota_exceeded`]): status,
/// detail, and the problem details body (written out, so that a flood of rejections formats
/// nothing). They are not about a client's quota, so their type is `about:blank`: the draft's
/// `temporary-reduced-capacity` type names violated policies, and none is.
pub(crate) const DEFAULT_BODIES: [(StatusCode, &str, &str); 2] = [
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the rate limiter is unavailable; retry shortly",
        r#"{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"the rate limiter is unavailable; retry shortly"}"#,
    ),
    (
        StatusCode::BAD_REQUEST,
        "the request carries no rate-limit key",
        r#"{"type":"about:blank","title":"Bad Request","status":400,"detail":"the request carries no rate-limit key"}"#,
    ),
];

/// Counts a decision by outcome (feature `metrics`). Each outcome's metric key is a `static`
/// (the label is a literal): counting allocates nothing. Always inlined: each caller passes a
/// literal, so the match on it is decided when compiling, not on every request.
#[inline(always)]
fn count(outcome: &'static str) {
    #[cfg(feature = "metrics")]
    {
        macro_rules! counted {
            ($($known:literal),*) => {
                match outcome {
                    $($known => metrics::counter!(
                        "tower_redis_layers_rate_limit_decisions_total",
                        "outcome" => $known
                    ),)*
                    other => metrics::counter!(
                        "tower_redis_layers_rate_limit_decisions_total",
                        "outcome" => other
                    ),
                }
            };
        }
        counted!(
            "allowed",
            "denied",
            "denied_local",
            "denied_shadow",
            "allowed_fallback",
            "denied_fallback",
            "store_error",
            "missing_key"
        )
        .increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}
