//! Every rate-limit field a response carries, built here and nowhere else: the IETF `RateLimit` /
//! `RateLimit-Policy` fields (draft-ietf-httpapi-ratelimit-headers), `Retry-After`, and the
//! legacy `X-RateLimit-*` fields.

use std::{
    fmt::Write,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response};

use super::Rule;
use crate::store::Decision;

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Which responses carry the `RateLimit` fields; see [`RateLimitLayer::headers`] and the
/// [module docs](super) for what the fields report.
///
/// [`RateLimitLayer::headers`]: super::RateLimitLayer::headers
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Headers {
    /// Only rejections (`429`), the default. A rejection always has `Retry-After`.
    #[default]
    Rejections,
    /// Every response that went through a rate-limit decision.
    All,
}

/// Which of the fields to write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fields {
    /// `RateLimit` and `RateLimit-Policy`.
    pub(crate) ietf: bool,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    pub(crate) legacy: bool,
}

/// What the fields of one policy need, computed once when the layer is built: the rules' names
/// and quotas, and the whole `RateLimit-Policy` value (`"name";q=5;w=10, ...`).
#[derive(Clone, Debug)]
pub(crate) struct PolicyFields {
    names: Vec<String>,
    quotas: Vec<u64>,
    policy: Option<HeaderValue>,
    /// Per rule, what a rejection by the local deny cache sends (the flood path), encoded once.
    denied: Arc<[Denied]>,
}

/// What the local deny cache answers for one rule, pre-encoded so that a flood of rejections
/// allocates nothing of its own: the default `429` body naming the rule, and the last
/// `Retry-After` and `RateLimit` values sent (they change once a second at most; a clone of a
/// [`HeaderValue`] is a reference count), both under one lock taken shared.
#[derive(Debug)]
struct Denied {
    body: Bytes,
    last: RwLock<Option<(u64, DeniedValues)>>,
}

/// The values of a deny-cache rejection for one number of seconds.
#[derive(Clone, Debug)]
struct DeniedValues {
    /// `Retry-After`: the seconds, at least 1.
    retry_after: HeaderValue,
    /// `RateLimit`: `"name";r=0;t=N` for the rule that denies.
    ratelimit: Option<HeaderValue>,
}

impl Denied {
    /// The values for `secs`: the last ones if they were for the same `secs`, else `make(secs)`
    /// (kept for the next call).
    fn values(&self, secs: u64, make: impl FnOnce(u64) -> DeniedValues) -> DeniedValues {
        if let Ok(last) = self.last.read() {
            if let Some((s, v)) = &*last {
                if *s == secs {
                    return v.clone();
                }
            }
        }
        let values = make(secs);
        if let Ok(mut last) = self.last.write() {
            *last = Some((secs, values.clone()));
        }
        values
    }
}

impl PolicyFields {
    pub(crate) fn new(rules: &[Rule]) -> Self {
        let names: Vec<String> = rules.iter().map(Rule::policy_name).collect();
        let mut policy = String::new();
        for (i, (rule, name)) in rules.iter().zip(&names).enumerate() {
            if i > 0 {
                policy.push_str(", ");
            }
            let window = secs_up(rule.window()).max(1);
            let _ = write!(policy, "\"{name}\";q={};w={window}", rule.quota());
        }
        let denied = names
            .iter()
            .map(|name| Denied {
                body: crate::problem::quota_exceeded_body(&[name.as_str()]),
                last: RwLock::new(None),
            })
            .collect();
        Self {
            quotas: rules.iter().map(Rule::quota).collect(),
            policy: HeaderValue::from_str(&policy).ok(),
            names,
            denied,
        }
    }

    /// The default `429` that the local deny cache sends for rule `rule`, `wait` before the
    /// store would admit the same request: the body naming the rule (encoded once),
    /// `Retry-After`, and the `which` fields of that rule alone (the only one known). `None`
    /// when the policy has no rule `rule`.
    pub(crate) fn denied_response(
        &self,
        rule: usize,
        wait: Duration,
        which: Fields,
    ) -> Option<Response<Bytes>> {
        let denied = self.denied.get(rule)?;
        let values = self.denied_values(denied, rule, wait);
        let mut response = crate::problem::quota_exceeded_response(denied.body.clone());
        let headers = response.headers_mut();
        headers.insert(http::header::RETRY_AFTER, values.retry_after);
        self.insert_state_of_denied(headers, values.ratelimit, rule, wait, which);
        Some(response)
    }

    /// The fields of a deny-cache rejection for rule `rule` on a response of the configured
    /// rejection builder: `Retry-After` and the `which` fields, each unless the response has
    /// its own.
    pub(crate) fn insert_denied(
        &self,
        headers: &mut HeaderMap,
        rule: usize,
        wait: Duration,
        which: Fields,
    ) {
        let values = match self.denied.get(rule) {
            Some(denied) => self.denied_values(denied, rule, wait),
            None => self.make_denied_values(rule, secs_up(wait)),
        };
        if !headers.contains_key(http::header::RETRY_AFTER) {
            headers.insert(http::header::RETRY_AFTER, values.retry_after);
        }
        if !has_state(headers) {
            self.insert_state_of_denied(headers, values.ratelimit, rule, wait, which);
        }
    }

    fn denied_values(&self, denied: &Denied, rule: usize, wait: Duration) -> DeniedValues {
        denied.values(secs_up(wait), |secs| self.make_denied_values(rule, secs))
    }

    /// `Retry-After` (at least 1) and `RateLimit` (`"name";r=0;t=N`) for rule `rule` denying
    /// for `secs` more.
    fn make_denied_values(&self, rule: usize, secs: u64) -> DeniedValues {
        let name = self.name(rule);
        let mut buf = itoa::Buffer::new();
        let digits = buf.format(secs).as_bytes();
        let mut value = Vec::with_capacity(name.len() + 9 + digits.len());
        value.push(b'"');
        value.extend_from_slice(name.as_bytes());
        value.extend_from_slice(b"\";r=0;t=");
        value.extend_from_slice(digits);
        DeniedValues {
            retry_after: HeaderValue::from(secs.max(1)),
            ratelimit: HeaderValue::from_maybe_shared(Bytes::from(value)).ok(),
        }
    }

    /// The `which` fields of rule `rule` denying for `wait` (`ratelimit` is its `RateLimit`).
    fn insert_state_of_denied(
        &self,
        headers: &mut HeaderMap,
        ratelimit: Option<HeaderValue>,
        rule: usize,
        wait: Duration,
        which: Fields,
    ) {
        if which.ietf {
            if let Some(v) = ratelimit {
                headers.insert(RATELIMIT.clone(), v);
            }
            self.insert_policy(headers);
        }
        if which.legacy {
            self.insert_legacy(headers, rule, 0, wait);
        }
    }

    /// The name of rule `i` ("" when there is none).
    pub(crate) fn name(&self, i: usize) -> &str {
        self.names.get(i).map_or("", String::as_str)
    }

    /// The fields that describe a store's `decision`. The rule that denied reports nothing left
    /// (for a request of the same cost) and its reset at `Retry-After`; every other rule reports
    /// what the store says it has left.
    pub(crate) fn insert_state(&self, headers: &mut HeaderMap, decision: &Decision, which: Fields) {
        // (remaining, reset) of rule i as the fields show it.
        let shown = |i: usize| {
            let state = decision.rules.get(i)?;
            Some(if decision.denied_by == Some(i) {
                (0, decision.retry_after)
            } else {
                (state.remaining, state.reset)
            })
        };
        if which.ietf {
            let mut value = String::new();
            for i in 0..decision.rules.len() {
                let Some((remaining, reset)) = shown(i) else {
                    continue;
                };
                if i > 0 {
                    value.push_str(", ");
                }
                let name = self.name(i);
                let _ = write!(value, "\"{name}\";r={remaining};t={}", secs_up(reset));
            }
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(RATELIMIT.clone(), v);
            }
            self.insert_policy(headers);
        }
        if which.legacy {
            // The rule closest to denying.
            let tightest = decision.denied_by.or_else(|| {
                let states = decision.rules.iter().enumerate();
                states.min_by_key(|(_, s)| s.remaining).map(|(i, _)| i)
            });
            if let Some((i, (remaining, reset))) = tightest.and_then(|i| Some((i, shown(i)?))) {
                self.insert_legacy(headers, i, remaining, reset);
            }
        }
    }

    fn insert_policy(&self, headers: &mut HeaderMap) {
        if let Some(p) = &self.policy {
            headers.insert(RATELIMIT_POLICY.clone(), p.clone());
        }
    }

    fn insert_legacy(&self, headers: &mut HeaderMap, rule: usize, remaining: u64, reset: Duration) {
        let Some(&quota) = self.quotas.get(rule) else {
            return;
        };
        headers.insert(X_LIMIT.clone(), HeaderValue::from(quota));
        headers.insert(X_REMAINING.clone(), HeaderValue::from(remaining));
        headers.insert(X_RESET.clone(), HeaderValue::from(secs_up(reset)));
    }
}

/// Whether a response (a custom rejection) already carries the `RateLimit` field.
pub(crate) fn has_state(headers: &HeaderMap) -> bool {
    headers.contains_key(&RATELIMIT)
}

/// `Retry-After` in whole seconds, at least 1, unless the response already has one.
pub(crate) fn insert_retry_after(headers: &mut HeaderMap, wait: Duration) {
    if !headers.contains_key(http::header::RETRY_AFTER) {
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(secs_up(wait).max(1)),
        );
    }
}

/// Whole seconds, rounded up (a client waiting this long will not be early).
fn secs_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RuleState, RuleStates};

    fn fields(headers: &HeaderMap) -> Vec<(String, String)> {
        let mut v: Vec<_> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_deny_cache_answers_with_the_fields_of_the_store() {
        let rules = [Rule::fixed_window(5, Duration::from_secs(10)).name("five")];
        let policy = PolicyFields::new(&rules);
        let wait = Duration::from_millis(7_300);
        let decision = Decision {
            allowed: false,
            denied_by: Some(0),
            retry_after: wait,
            rules: RuleStates::one(RuleState {
                remaining: 0,
                reset: wait,
            }),
        };
        for legacy in [false, true] {
            let which = Fields { ietf: true, legacy };
            let (mut store, mut local) = (HeaderMap::new(), HeaderMap::new());
            policy.insert_state(&mut store, &decision, which);
            insert_retry_after(&mut store, wait);
            policy.insert_denied(&mut local, 0, wait, which);
            assert_eq!(fields(&store), fields(&local));
            // The whole default response: the same fields, and its content type.
            let response = policy.denied_response(0, wait, which).unwrap();
            assert_eq!(response.status(), http::StatusCode::TOO_MANY_REQUESTS);
            let mut sent = response.headers().clone();
            assert_eq!(sent["content-type"], "application/problem+json");
            sent.remove("content-type");
            assert_eq!(fields(&sent), fields(&local));
            assert_eq!(store["ratelimit"], "\"five\";r=0;t=8");
            assert_eq!(store["ratelimit-policy"], "\"five\";q=5;w=10");
            assert_eq!(store.contains_key("x-ratelimit-remaining"), legacy);
        }
    }

    #[test]
    fn a_denial_reports_the_other_rules_as_they_stand() {
        let rules = [
            Rule::fixed_window(2, Duration::from_secs(1)).name("a"),
            Rule::fixed_window(9, Duration::from_secs(60)).name("b"),
        ];
        let decision = Decision {
            allowed: false,
            denied_by: Some(0),
            retry_after: Duration::from_millis(400),
            rules: [
                RuleState {
                    remaining: 0,
                    reset: Duration::from_millis(400),
                },
                RuleState {
                    remaining: 7,
                    reset: Duration::from_secs(59),
                },
            ]
            .into_iter()
            .collect(),
        };
        let mut h = HeaderMap::new();
        let which = Fields {
            ietf: true,
            legacy: true,
        };
        PolicyFields::new(&rules).insert_state(&mut h, &decision, which);
        assert_eq!(h["ratelimit"], "\"a\";r=0;t=1, \"b\";r=7;t=59");
        assert_eq!(h["x-ratelimit-limit"], "2");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "1");
    }
}
