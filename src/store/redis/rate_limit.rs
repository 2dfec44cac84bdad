//! Rate limiting on Redis: the scripts (assembled from the per-strategy fragments in
//! `src/scripts/rate_limit/`), the call that checks a [`RateCheck`], the decoding of its reply,
//! and [`RateLimitStore`] for every [`ScriptRunner`].

use std::time::Duration;

use super::{
    script::{BoxFuture, Lua, Reply, ScriptCall},
    ScriptRunner,
};
use crate::{
    store::{
        Decision, LeaseGrant, Override, RateCheck, RateLease, RateLeaseStore, RateLimitStore,
        RateSettlement, Rule, RuleState, RuleStates, StoreError, StoreFuture,
    },
    StoreKey,
};

/// The fragments of the rate-limit scripts (see `src/scripts/rate_limit/README.md`).
macro_rules! rl {
    ($($file:expr),+) => {
        include_str!(concat!("../../scripts/rate_limit/", $($file,)+ ".lua"))
    };
}

/// A single rule of one strategy: the strategy's check and commit fragments between the common
/// head, middle and tail.
macro_rules! single_rule {
    ($strategy:literal) => {
        Lua::new(concat!(
            rl!("single_head"),
            rl!($strategy, "_check"),
            rl!("single_mid"),
            rl!($strategy, "_commit"),
            rl!("single_tail"),
        ))
    };
}

/// A single fixed-window rule: no clock, and no write unless the request is admitted.
static FIXED_WINDOW: Lua = Lua::new(rl!("fixed_window"));
static SLIDING_LOG: Lua = single_rule!("sliding_log");
static SLIDING_WINDOW: Lua = single_rule!("sliding_window");
static TOKEN_BUCKET: Lua = single_rule!("token_bucket");
static GCRA: Lua = single_rule!("gcra");
/// A calendar rule: the single-rule script with the calendar functions after its head.
static CALENDAR: Lua = Lua::new(concat!(
    rl!("single_head"),
    rl!("calendar"),
    rl!("calendar_check"),
    rl!("single_mid"),
    rl!("calendar_commit"),
    rl!("single_tail"),
));

/// Every rate-limit script, loaded on each (re)connect.
pub(super) static SCRIPTS: [&Lua; 9] = [
    &FIXED_WINDOW,
    &SLIDING_LOG,
    &SLIDING_WINDOW,
    &TOKEN_BUCKET,
    &GCRA,
    &CALENDAR,
    &MULTI_RULE,
    &SETTLE,
    &LEASE,
];

/// The settlement of a metered request, for one rule or several.
static SETTLE: Lua = Lua::new(concat!(rl!("calendar"), rl!("settle")));

/// Several rules, all or nothing.
pub(crate) static MULTI_RULE: Lua = Lua::new(concat!(
    rl!("calendar"),
    rl!("multi_head"),
    "  if kind == '1' then\n",
    rl!("fixed_window_check"),
    "  elseif kind == '2' then\n",
    rl!("sliding_log_check"),
    "  elseif kind == '3' then\n",
    rl!("sliding_window_check"),
    "  elseif kind == '4' then\n",
    rl!("token_bucket_check"),
    "  elseif kind == '6' then\n",
    rl!("calendar_check"),
    "  else\n",
    rl!("gcra_check"),
    "  end\n",
    rl!("multi_mid"),
    "    if kind == '1' then\n",
    rl!("fixed_window_commit"),
    "    elseif kind == '2' then\n",
    rl!("sliding_log_commit"),
    "    elseif kind == '3' then\n",
    rl!("sliding_window_commit"),
    "    elseif kind == '4' then\n",
    rl!("token_bucket_commit"),
    "    elseif kind == '6' then\n",
    rl!("calendar_commit"),
    "    else\n",
    rl!("gcra_commit"),
    "    end\n",
    rl!("multi_tail"),
));

/// The script that checks `rules`: one per strategy for a single rule (the fewest commands and
/// the least Lua), [`MULTI_RULE`] for several.
fn script_for(rules: &[Rule]) -> &'static Lua {
    match rules {
        [rule] => match rule.kind() {
            1 => &FIXED_WINDOW,
            2 => &SLIDING_LOG,
            3 => &SLIDING_WINDOW,
            4 => &TOKEN_BUCKET,
            6 => &CALENDAR,
            _ => &GCRA,
        },
        _ => &MULTI_RULE,
    }
}

/// The Lua source that the `redis` and `fred` stores run to check `rules`: one script per
/// strategy for a single rule, one for several rules. For auditing, or for loading it with
/// `SCRIPT LOAD` ahead of time (the stores load it themselves on `NOSCRIPT`). Its keys are the
/// rules' state keys, then the key's override (see
/// [`RateLimitStore::set_override`](crate::store::RateLimitStore::set_override)), all with one
/// hash tag.
pub fn rate_limit_script(rules: &[Rule]) -> &'static str {
    script_for(rules).text
}

/// The calendar functions of the rate-limit scripts (`calendar.lua`, the very text they run)
/// with an entry point that returns the period holding a given time: `EVAL` it with no keys and
/// `ARGV[1]` = µs since the epoch, `ARGV[2]` = the rule's calendar spec (see
/// [`calendar_spec`]); the reply is `{ first day of the period (days since the epoch, on the
/// offset's clock), end of the period (µs since the epoch) }`. For tests only.
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub fn calendar_period_script() -> &'static str {
    concat!(rl!("calendar"), rl!("calendar_period"))
}

/// The calendar spec the scripts read for `rule` (its `c`), or `None` for a rule that is not a
/// calendar rule. For tests only (see [`calendar_period_script`]).
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub fn calendar_spec(rule: &Rule) -> Option<u64> {
    (rule.kind() == 6).then(|| rule.encode().2)
}

/// The start of every key of one rate-limit key, `<prefix>:{<hashed key>}:`: one hash tag, so
/// one cluster slot for all of its rules, its override and its lease bookkeeping.
struct KeyHead<'a> {
    prefix: &'a str,
    tag: [u8; 32],
}

impl<'a> KeyHead<'a> {
    fn new(prefix: &'a str, key: &StoreKey) -> Self {
        let mut tag = [0u8; 32];
        // 16 bytes always fit in 32 hex digits.
        let _ = hex::encode_to_slice(key.as_bytes(), &mut tag);
        Self { prefix, tag }
    }

    fn write(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(b":{");
        buf.extend_from_slice(&self.tag);
        buf.extend_from_slice(b"}:");
    }
}

/// Adds the state key of each rule (`<head><rule signature>`), then the key's override
/// (`<head>o`, see `rate_limit_admin.rs`), in the order the scripts read them.
fn rule_keys(call: &mut ScriptCall, head: &KeyHead<'_>, rules: &[Rule]) {
    for rule in rules {
        call.key(|buf| {
            head.write(buf);
            rule.write_signature(buf);
        });
    }
    call.key(|buf| {
        head.write(buf);
        buf.push(b'o');
    });
}

/// The call that checks `check`: keys `<prefix>:{<hashed key>}:<rule signature>`, then the
/// override `<prefix>:{<hashed key>}:o` (one hash tag, so one cluster slot), and the arguments of [`rate_limit_script`]: cost, want-state flag, then
/// for a single rule its a, b, c (no c for a fixed window, and a nonce for a sliding log); for
/// several rules a nonce, then kind, a, b, c per rule.
fn rate_limit_call(prefix: &str, check: &RateCheck<'_>) -> ScriptCall {
    let n = check.rules.len();
    let mut call = ScriptCall::new(
        script_for(check.rules),
        n + 1,
        3 + 4 * n,
        (n + 1) * (prefix.len() + 96) + 16 + 32 * n + 24,
    );
    // A check the layer stopped waiting for was answered by its failure mode: landing later
    // would charge a request already rejected (or let through uncounted).
    call.abandon_when_dropped();
    rule_keys(&mut call, &KeyHead::new(prefix, check.key), check.rules);
    call.int(check.cost);
    call.arg(|buf| buf.push(if check.want_state { b'1' } else { b'0' }));
    let nonce = |call: &mut ScriptCall| {
        let mut hex = [0u8; 16];
        let _ = hex::encode_to_slice(rand::random::<u64>().to_be_bytes(), &mut hex);
        call.arg(|buf| buf.extend_from_slice(&hex));
    };
    match check.rules {
        [rule] => {
            let (a, b, c) = rule.encode();
            call.int(a);
            call.int(b);
            if rule.kind() != 1 {
                call.int(c);
            }
            if rule.kind() == 2 {
                nonce(&mut call);
            }
        }
        rules => {
            nonce(&mut call);
            for rule in rules {
                let (a, b, c) = rule.encode();
                call.int(u64::from(rule.kind()));
                call.int(a);
                call.int(b);
                call.int(c);
            }
        }
    }
    call
}

/// The call that settles `settlement`: the keys of the check it settles (see
/// [`rate_limit_call`]), the settlement's own key `<head>s:<random id>` (a client that sends
/// the call again after a lost reply does not apply it twice), then delta, age in ms, and kind,
/// a, b, c per rule.
fn settle_call(prefix: &str, settlement: &RateSettlement<'_>) -> ScriptCall {
    let n = settlement.rules.len();
    let bytes = (n + 2) * (prefix.len() + 96) + 48 + 32 * n;
    let mut call = ScriptCall::new(&SETTLE, n + 2, 2 + 4 * n, bytes);
    let head = KeyHead::new(prefix, settlement.key);
    // The keys of the check, the override last.
    rule_keys(&mut call, &head, settlement.rules);
    let mut id = [0u8; 16];
    let _ = hex::encode_to_slice(rand::random::<u64>().to_be_bytes(), &mut id);
    call.key(|buf| {
        head.write(buf);
        buf.extend_from_slice(b"s:");
        buf.extend_from_slice(&id);
    });
    let delta = settlement.delta;
    call.arg(|buf| buf.extend_from_slice(itoa::Buffer::new().format(delta).as_bytes()));
    call.int(u64::try_from(settlement.age.as_millis()).unwrap_or(u64::MAX));
    for rule in settlement.rules {
        let (a, b, c) = rule.encode();
        call.int(u64::from(rule.kind()));
        call.int(a);
        call.int(b);
        call.int(c);
    }
    call
}

/// Turns the script's reply into a [`Decision`].
fn decode_decision(reply: Reply, rules: usize) -> Result<Decision, StoreError> {
    if reply == Reply::Int(1) {
        // Allowed, and the state was not asked for.
        return Ok(Decision {
            allowed: true,
            denied_by: None,
            retry_after: Duration::ZERO,
            rules: RuleStates::repeat(
                RuleState {
                    remaining: 0,
                    reset: Duration::ZERO,
                },
                rules,
            ),
        });
    }
    let reply = reply.array()?;
    if reply.len() != 3 + 2 * rules {
        return Err(StoreError::Reply(format!(
            "rate-limit script returned {} values for {rules} rules",
            reply.len()
        )));
    }
    let int = |i: usize| reply.get(i).map_or(Ok(0), Reply::int);
    let non_negative = |v: i64| u64::try_from(v).unwrap_or(0);
    let allowed = int(0)? == 1;
    let denied_by = usize::try_from(int(1)?)
        .ok()
        .filter(|i| *i >= 1 && *i <= rules)
        .map(|i| i - 1);
    let retry_after = Duration::from_millis(non_negative(int(2)?));
    let states = (0..rules)
        .map(|r| {
            Ok(RuleState {
                remaining: non_negative(int(3 + 2 * r)?),
                reset: Duration::from_millis(non_negative(int(4 + 2 * r)?)),
            })
        })
        .collect::<Result<RuleStates, StoreError>>()?;
    Ok(Decision {
        allowed,
        denied_by: if allowed { None } else { denied_by },
        retry_after: if allowed { Duration::ZERO } else { retry_after },
        rules: states,
    })
}

impl<R: ScriptRunner> RateLimitStore for R {
    type Future = BoxFuture<Result<Decision, StoreError>>;

    fn check(&self, check: RateCheck<'_>) -> Self::Future {
        let rules = check.rules.len();
        let call = self.guarded(rate_limit_call(self.prefix(), &check));
        // Not an `async` block, which would hold the call twice (captured, then awaited).
        Box::pin(futures_util::FutureExt::map(call, move |reply| {
            decode_decision(reply?, rules)
        }))
    }

    fn settle(&self, settlement: RateSettlement<'_>) -> StoreFuture<()> {
        if settlement.delta == 0 {
            return Box::pin(std::future::ready(Ok(())));
        }
        // Run to its end once sent (the default of a call): a settlement lands or not by what
        // the server did, not by when the caller stopped waiting.
        let call = self.guarded(settle_call(self.prefix(), &settlement));
        Box::pin(async move {
            call.await?.int()?;
            Ok(())
        })
    }

    fn reset(&self, key: &StoreKey, rules: &[Rule]) -> StoreFuture<()> {
        super::rate_limit_admin::reset(self, key, rules)
    }

    fn set_override(&self, key: &StoreKey, state: Option<Override>) -> StoreFuture<()> {
        super::rate_limit_admin::set_override(self, key, state)
    }
}

// Leases (see `crate::rate_limit::Leased`).

/// A lease of one fixed-window, token-bucket or GCRA rule: the strategies' check and commit
/// fragments as functions, called with the need and then with the grant.
static LEASE: Lua = Lua::new(concat!(
    rl!("lease_head"),
    "  if kind == '1' then\n",
    rl!("fixed_window_check"),
    "  elseif kind == '4' then\n",
    rl!("token_bucket_check"),
    "  else\n",
    rl!("gcra_check"),
    "  end\n  return ok, remaining, reset, retry, plan\nend\n\nlocal function commit(cost, plan)\n",
    "  if kind == '1' then\n",
    rl!("fixed_window_commit"),
    "  elseif kind == '4' then\n",
    rl!("token_bucket_commit"),
    "  else\n",
    rl!("gcra_commit"),
    "  end\nend\n\n",
    rl!("lease_tail"),
));

/// The call that leases: keys `<prefix>:{<hashed key>}:<rule signature>`, the override
/// `...:o` and the replicas seen `...:<rule signature>:r` (one hash tag), then need, want,
/// replica id, kind, a, b, c.
fn lease_call(prefix: &str, lease: &RateLease<'_>) -> ScriptCall {
    let mut call = ScriptCall::new(
        &LEASE,
        3,
        7,
        3 * (prefix.len() + 96) + 64 + lease.replica.len(),
    );
    // A lease the layer stopped waiting for is not used: landing later would debit units that
    // nobody admits (lost, never over-admitted), so drop it when it has not been sent.
    call.abandon_when_dropped();
    let head = KeyHead::new(prefix, lease.key);
    rule_keys(&mut call, &head, std::slice::from_ref(lease.rule));
    call.key(|buf| {
        head.write(buf);
        lease.rule.write_signature(buf);
        buf.extend_from_slice(b":r");
    });
    call.int(lease.need);
    call.int(lease.want.max(lease.need));
    call.arg(|buf| buf.extend_from_slice(lease.replica.as_bytes()));
    let (a, b, c) = lease.rule.encode();
    call.int(u64::from(lease.rule.kind()));
    call.int(a);
    call.int(b);
    call.int(c);
    call
}

/// Turns the lease script's reply into a [`LeaseGrant`].
fn decode_lease(reply: Reply) -> Result<LeaseGrant, StoreError> {
    let reply = reply.array()?;
    if reply.len() != 6 {
        return Err(StoreError::Reply(format!(
            "lease script returned {} values, not 6",
            reply.len()
        )));
    }
    let int = |i: usize| reply.get(i).map_or(Ok(0), Reply::int);
    let non_negative = |v: i64| u64::try_from(v).unwrap_or(0);
    let granted = int(0)?;
    let remaining = non_negative(int(2)?);
    let reset = Duration::from_millis(non_negative(int(3)?));
    Ok(match granted {
        g if g < 0 => LeaseGrant::Overridden,
        0 => LeaseGrant::Denied {
            retry_after: Duration::from_millis(non_negative(int(1)?)),
            remaining,
            reset,
        },
        g => LeaseGrant::Granted {
            units: non_negative(g),
            remaining,
            reset,
            window_left: Duration::from_millis(non_negative(int(4)?)),
            replicas: non_negative(int(5)?).max(1),
        },
    })
}

impl<R: ScriptRunner> RateLeaseStore for R {
    fn lease(&self, lease: RateLease<'_>) -> StoreFuture<LeaseGrant> {
        if !lease.rule.strategy().leases() {
            let error = StoreError::Invalid(format!(
                "rule {} cannot be leased: only fixed window, token bucket and GCRA rules can",
                lease.rule.policy_name()
            ));
            return Box::pin(std::future::ready(Err(error)));
        }
        let call = self.guarded(lease_call(self.prefix(), &lease));
        Box::pin(async move { decode_lease(call.await?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_one_is_an_admission_without_state() {
        let decision = decode_decision(Reply::Int(1), 2).expect("decodes");
        assert!(decision.allowed);
        assert_eq!(decision.denied_by, None);
        assert_eq!(decision.rules.len(), 2);
        // Anything else that is not the full array is an error, never an admission.
        assert!(decode_decision(Reply::Int(0), 1).is_err());
        assert!(decode_decision(Reply::Array(vec![Reply::Int(1)]), 1).is_err());
    }
}
