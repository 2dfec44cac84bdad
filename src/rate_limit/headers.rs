//! The IETF `RateLimit` / `RateLimit-Policy` fields (draft-ietf-httpapi-ratelimit-headers),
//! `Retry-After`, and the legacy `X-RateLimit-*` fields.

use std::{fmt::Write, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue};

use super::Rule;
use crate::store::Decision;

pub(crate) static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub(crate) static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Which responses carry the `RateLimit` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Headers {
    /// Only rejections (`429`), the default. A rejection always has `Retry-After`.
    #[default]
    Rejections,
    /// Every response that went through a rate-limit decision.
    All,
}

/// Whole seconds, rounded up (a client waiting this long will not be early).
pub(crate) fn secs_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `"name";q=5;w=10, ...` for the rules of a policy; static for the life of the layer.
pub(crate) fn policy_value(rules: &[Rule]) -> Option<HeaderValue> {
    let mut s = String::new();
    for (i, rule) in rules.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(
            s,
            "\"{}\";q={};w={}",
            rule.policy_name(),
            rule.quota(),
            secs_up(rule.window()).max(1)
        );
    }
    HeaderValue::from_str(&s).ok()
}

/// Adds the fields that describe `decision` to `headers`.
pub(crate) fn insert_state(
    headers: &mut HeaderMap,
    rules: &[Rule],
    names: &[String],
    policy: Option<&HeaderValue>,
    decision: &Decision,
    legacy: bool,
) {
    let mut value = String::new();
    for (i, state) in decision.rules.iter().enumerate() {
        if i > 0 {
            value.push_str(", ");
        }
        let denying = decision.denied_by == Some(i);
        let (remaining, reset) = if denying {
            // The same point in time as `Retry-After`.
            (0, decision.retry_after)
        } else {
            (state.remaining, state.reset)
        };
        let name = names.get(i).map_or("", String::as_str);
        let _ = write!(value, "\"{name}\";r={remaining};t={}", secs_up(reset));
    }
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(RATELIMIT.clone(), v);
    }
    if let Some(p) = policy {
        headers.insert(RATELIMIT_POLICY.clone(), p.clone());
    }
    if legacy {
        // The rule closest to denying.
        let tightest = decision
            .denied_by
            .or_else(|| {
                decision
                    .rules
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.remaining)
                    .map(|(i, _)| i)
            })
            .and_then(|i| Some((rules.get(i)?, decision.rules.get(i)?, i)));
        if let Some((rule, state, i)) = tightest {
            let (remaining, reset) = if decision.denied_by == Some(i) {
                (0, decision.retry_after)
            } else {
                (state.remaining, state.reset)
            };
            headers.insert(X_LIMIT.clone(), HeaderValue::from(rule.quota()));
            headers.insert(X_REMAINING.clone(), HeaderValue::from(remaining));
            headers.insert(X_RESET.clone(), HeaderValue::from(secs_up(reset)));
        }
    }
}

/// `Retry-After` in whole seconds, at least 1.
pub(crate) fn insert_retry_after(headers: &mut HeaderMap, wait: Duration) {
    headers.insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(secs_up(wait).max(1)),
    );
}
