//! Administration of rate-limit state on Redis: resetting a key (`rate_limit_reset.lua`) and
//! setting its override (`rate_limit_override.lua`), which the check scripts read.
//!
//! Keys (one hash tag per caller key, so one cluster slot with its rule keys):
//!
//! | key | type | content |
//! |---|---|---|
//! | `<prefix>:{<key>}:<rule signature>` | per strategy | a rule's state (see `rate_limit.rs`) |
//! | `<prefix>:{<key>}:o` | string | the override: `b` (blocked) or `a` (allowed), `PX` its duration |

use super::{script::Lua, sealed::Runner};
use crate::{
    store::{Override, Rule, StoreError, StoreFuture},
    StoreKey,
};

static RESET: Lua = Lua::new(include_str!("../../scripts/rate_limit_reset.lua"));
static OVERRIDE: Lua = Lua::new(include_str!("../../scripts/rate_limit_override.lua"));

/// The administration scripts, loaded on each (re)connect.
pub(super) static SCRIPTS: [&Lua; 2] = [&RESET, &OVERRIDE];

/// The state key of `rule` for `key`: the same name the check call gives it.
fn rule_key(prefix: &str, key: &StoreKey, rule: &Rule) -> String {
    let mut buf = format!("{prefix}:{{{key}}}:").into_bytes();
    rule.write_signature(&mut buf);
    // The prefix is a `String` and the rest ASCII.
    String::from_utf8_lossy(&buf).into_owned()
}

/// The override key of `key`, under the hash tag of its rule keys.
fn override_key(prefix: &str, key: &StoreKey) -> String {
    format!("{prefix}:{{{key}}}:o")
}

/// Deletes the state of `rules` for `key`: one call.
pub(super) fn reset<R: Runner>(runner: &R, key: &StoreKey, rules: &[Rule]) -> StoreFuture<()> {
    if rules.is_empty() {
        return Box::pin(std::future::ready(Ok(())));
    }
    let keys = rules
        .iter()
        .map(|rule| rule_key(runner.prefix(), key, rule))
        .collect();
    let call = runner.run(&RESET, keys, Vec::new());
    Box::pin(async move { call.await.map(|_| ()) })
}

/// Sets or clears the override of `key`: one call.
pub(super) fn set_override<R: Runner>(
    runner: &R,
    key: &StoreKey,
    state: Option<Override>,
) -> StoreFuture<()> {
    let (flag, ttl): (&[u8], _) = match state {
        Some(Override::Block(d)) => (b"b", d),
        Some(Override::Allow(d)) => (b"a", d),
        None => (b"", std::time::Duration::ZERO),
    };
    let args = vec![flag.to_vec(), super::script::ms(ttl)];
    let call = runner.run(&OVERRIDE, vec![override_key(runner.prefix(), key)], args);
    Box::pin(async move {
        match call.await?.int()? {
            1 => Ok(()),
            other => Err(StoreError::Reply(format!(
                "the override script answered {other}"
            ))),
        }
    })
}
