//! The Lua scripts shared by the `redis` and `fred` stores, and the encoding of their arguments
//! and replies.

use std::time::Duration;

use super::{BackendError, Decision, RateCheck, RuleState};

/// Checks and consumes every rule of one request; see the header of the file for its contract.
pub(crate) const RATE_LIMIT: &str = include_str!("../scripts/rate_limit.lua");

/// `ARGV` of [`RATE_LIMIT`]: cost, nonce, want-state flag, then kind, a, b, c per rule.
pub(crate) fn rate_limit_args(check: &RateCheck<'_>) -> Vec<String> {
    let mut args = Vec::with_capacity(3 + 4 * check.rules.len());
    args.push(check.cost.to_string());
    args.push(format!("{:016x}", rand::random::<u64>()));
    args.push(if check.want_state { "1" } else { "0" }.to_owned());
    for rule in check.rules {
        let (a, b, c) = rule.encode();
        args.push(rule.kind().to_string());
        args.push(a.to_string());
        args.push(b.to_string());
        args.push(c.to_string());
    }
    args
}

/// Turns the script's reply into a [`Decision`].
pub(crate) fn decode_decision(reply: &[i64], rules: usize) -> Result<Decision, BackendError> {
    if reply.len() != 3 + 2 * rules {
        return Err(BackendError::Reply(format!(
            "rate-limit script returned {} values for {rules} rules",
            reply.len()
        )));
    }
    let non_negative = |v: i64| u64::try_from(v).unwrap_or(0);
    let allowed = reply[0] == 1;
    let denied_by = usize::try_from(reply[1])
        .ok()
        .filter(|i| *i >= 1 && *i <= rules)
        .map(|i| i - 1);
    let states = reply[3..]
        .chunks_exact(2)
        .map(|pair| RuleState {
            remaining: non_negative(pair[0]),
            reset: Duration::from_millis(non_negative(pair[1])),
        })
        .collect();
    Ok(Decision {
        allowed,
        denied_by: if allowed { None } else { denied_by },
        retry_after: if allowed {
            Duration::ZERO
        } else {
            Duration::from_millis(non_negative(reply[2]))
        },
        rules: states,
    })
}
