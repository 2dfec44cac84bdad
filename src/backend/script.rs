//! What the `redis` and `fred` stores share: the Lua scripts, the encoding of their arguments and
//! replies, and the store operations written once over a [`ScriptRunner`].

use std::{future::Future, pin::Pin, sync::OnceLock, time::Duration};

use super::{BackendError, Decision, RateCheck, RuleState};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A Lua script, sent with `EVALSHA` (and `EVAL` on `NOSCRIPT`).
pub(crate) struct Lua {
    pub(crate) text: &'static str,
    sha: OnceLock<String>,
}

impl Lua {
    pub(crate) const fn new(text: &'static str) -> Self {
        Self {
            text,
            sha: OnceLock::new(),
        }
    }

    /// The SHA-1 of the text, as `EVALSHA` wants it.
    pub(crate) fn sha(&self) -> &str {
        self.sha
            .get_or_init(|| sha1_smol::Sha1::from(self.text).digest().to_string())
    }
}

/// The fragments of the rate-limit scripts (see `src/scripts/rate_limit/README.md`).
macro_rules! rl {
    ($($file:expr),+) => {
        include_str!(concat!("../scripts/rate_limit/", $($file,)+ ".lua"))
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

/// A single fixed-window rule: increments first, no clock.
static FIXED_WINDOW: Lua = Lua::new(rl!("fixed_window"));
static SLIDING_LOG: Lua = single_rule!("sliding_log");
static SLIDING_WINDOW: Lua = single_rule!("sliding_window");
static TOKEN_BUCKET: Lua = single_rule!("token_bucket");
static GCRA: Lua = single_rule!("gcra");

/// Several rules, all or nothing.
pub(crate) static MULTI_RULE: Lua = Lua::new(concat!(
    rl!("multi_head"),
    "  if kind == '1' then\n",
    rl!("fixed_window_check"),
    "  elseif kind == '2' then\n",
    rl!("sliding_log_check"),
    "  elseif kind == '3' then\n",
    rl!("sliding_window_check"),
    "  elseif kind == '4' then\n",
    rl!("token_bucket_check"),
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
    "    else\n",
    rl!("gcra_commit"),
    "    end\n",
    rl!("multi_tail"),
));

/// The script that checks `rules`: one per strategy for a single rule (the fewest commands and
/// the least Lua), [`MULTI_RULE`] for several.
pub(crate) fn rate_limit_script(rules: &[crate::rate_limit::Rule]) -> &'static Lua {
    match rules {
        [rule] => match rule.kind() {
            1 => &FIXED_WINDOW,
            2 => &SLIDING_LOG,
            3 => &SLIDING_WINDOW,
            4 => &TOKEN_BUCKET,
            _ => &GCRA,
        },
        _ => &MULTI_RULE,
    }
}

/// A script reply, the same whichever client read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Nil,
    Int(i64),
    Bytes(Vec<u8>),
    Array(Vec<Reply>),
}

impl Reply {
    pub(crate) fn int(&self) -> Result<i64, BackendError> {
        match self {
            Reply::Int(i) => Ok(*i),
            Reply::Bytes(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| BackendError::Reply("expected an integer".into())),
            other => Err(BackendError::Reply(format!(
                "expected an integer, got {other:?}"
            ))),
        }
    }

    pub(crate) fn array(self) -> Result<Vec<Reply>, BackendError> {
        match self {
            Reply::Array(items) => Ok(items),
            other => Err(BackendError::Reply(format!(
                "expected an array, got {other:?}"
            ))),
        }
    }
}

/// Runs a script on one Redis client.
pub(crate) trait ScriptRunner: Send + Sync + 'static {
    /// Runs `lua` with `keys` (all in one hash slot) and `args`: one round trip.
    fn run(
        &self,
        lua: &'static Lua,
        keys: Vec<String>,
        args: Vec<Vec<u8>>,
    ) -> BoxFuture<Result<Reply, BackendError>>;

    /// The prefix of every key.
    fn prefix(&self) -> &str;
}

/// Builds the Redis key of each rule: `<prefix>:{<hashed key>}:<rule signature>`.
///
/// Every key of one call carries the same `{...}` hash tag, so the call lands on one cluster
/// slot.
fn rule_keys(prefix: &str, check: &RateCheck<'_>) -> Vec<String> {
    let tag = check.key.to_hex();
    check
        .rules
        .iter()
        .map(|rule| format!("{prefix}:{{{tag}}}:{}", rule.signature()))
        .collect()
}

/// `ARGV` of the rate-limit scripts: cost, want-state flag, then for a single rule its a, b, c
/// (and a nonce for a sliding log); for several rules a nonce, then kind, a, b, c per rule.
fn rate_limit_args(check: &RateCheck<'_>) -> Vec<Vec<u8>> {
    let nonce = || format!("{:016x}", rand::random::<u64>()).into_bytes();
    let mut args = Vec::with_capacity(3 + 4 * check.rules.len());
    args.push(check.cost.to_string().into_bytes());
    args.push(if check.want_state {
        b"1".to_vec()
    } else {
        b"0".to_vec()
    });
    match check.rules {
        [rule] => {
            let (a, b, c) = rule.encode();
            args.push(a.to_string().into_bytes());
            args.push(b.to_string().into_bytes());
            if rule.kind() != 1 {
                args.push(c.to_string().into_bytes());
            }
            if rule.kind() == 2 {
                args.push(nonce());
            }
        }
        rules => {
            args.push(nonce());
            for rule in rules {
                let (a, b, c) = rule.encode();
                args.push(rule.kind().to_string().into_bytes());
                args.push(a.to_string().into_bytes());
                args.push(b.to_string().into_bytes());
                args.push(c.to_string().into_bytes());
            }
        }
    }
    args
}

/// One rate-limit check over any client: one script call.
pub(crate) fn check_rate<R: ScriptRunner>(
    runner: &R,
    check: RateCheck<'_>,
) -> BoxFuture<Result<Decision, BackendError>> {
    let keys = rule_keys(runner.prefix(), &check);
    let args = rate_limit_args(&check);
    let rules = check.rules.len();
    let call = runner.run(rate_limit_script(check.rules), keys, args);
    Box::pin(async move { decode_decision(call.await?, rules) })
}

/// Turns the script's reply into a [`Decision`].
fn decode_decision(reply: Reply, rules: usize) -> Result<Decision, BackendError> {
    let reply = reply
        .array()?
        .iter()
        .map(Reply::int)
        .collect::<Result<Vec<i64>, _>>()?;
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

/// Implements every store trait for a client type that is a [`ScriptRunner`]: each operation is
/// one script call, written once in this module, `records` and `cache_scripts`.
macro_rules! impl_script_stores {
    ($t:ty) => {
        impl $crate::backend::RateLimitStore for $t {
            type Future = $crate::backend::script::BoxFuture<
                Result<$crate::backend::Decision, $crate::backend::BackendError>,
            >;

            fn check(&self, check: $crate::backend::RateCheck<'_>) -> Self::Future {
                $crate::backend::script::check_rate(self, check)
            }
        }
        $crate::backend::records::impl_record_stores!($t);
        $crate::backend::cache_scripts::impl_cache_store!($t);
    };
}
pub(crate) use impl_script_stores;
