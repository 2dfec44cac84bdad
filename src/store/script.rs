//! What the `redis` and `fred` stores share: the Lua scripts, the encoding of their arguments and
//! replies, and the store operations written once over a [`ScriptRunner`].

use std::{future::Future, pin::Pin, sync::OnceLock, time::Duration};

use super::{Decision, RateCheck, RuleState, StoreError};

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
    pub(crate) fn int(&self) -> Result<i64, StoreError> {
        match self {
            Reply::Int(i) => Ok(*i),
            Reply::Bytes(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Reply("expected an integer".into())),
            other => Err(StoreError::Reply(format!(
                "expected an integer, got {other:?}"
            ))),
        }
    }

    pub(crate) fn array(self) -> Result<Vec<Reply>, StoreError> {
        match self {
            Reply::Array(items) => Ok(items),
            other => Err(StoreError::Reply(format!(
                "expected an array, got {other:?}"
            ))),
        }
    }
}

/// The keys and arguments of one script call, packed in one buffer: building a call costs two
/// allocations whatever the number of arguments, and the `fred` store hands out slices of the
/// buffer without copying.
pub(crate) struct ScriptCall {
    pub(crate) lua: &'static Lua,
    buf: Vec<u8>,
    /// Where each key, then each argument, ends in `buf`.
    ends: Vec<usize>,
    keys: usize,
}

impl ScriptCall {
    pub(crate) fn new(lua: &'static Lua, keys: usize, args: usize, bytes: usize) -> Self {
        Self {
            lua,
            buf: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(keys + args),
            keys: 0,
        }
    }

    /// A call from owned keys and arguments (for the operations off the hot path).
    pub(crate) fn from_vecs(lua: &'static Lua, keys: Vec<String>, args: Vec<Vec<u8>>) -> Self {
        let bytes =
            keys.iter().map(String::len).sum::<usize>() + args.iter().map(Vec::len).sum::<usize>();
        let mut call = Self::new(lua, keys.len(), args.len(), bytes);
        for key in keys {
            call.key(|buf| buf.extend_from_slice(key.as_bytes()));
        }
        for arg in args {
            call.arg(|buf| buf.extend_from_slice(&arg));
        }
        call
    }

    /// Appends a key, written by `write`. Every key comes before the first argument.
    pub(crate) fn key(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        debug_assert_eq!(self.keys, self.ends.len(), "keys come first");
        let start = self.buf.len();
        write(&mut self.buf);
        debug_assert!(self.buf.len() >= start, "a key only appends");
        self.ends.push(self.buf.len());
        self.keys += 1;
    }

    /// Appends an argument, written by `write`.
    pub(crate) fn arg(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        write(&mut self.buf);
        debug_assert!(self.buf.len() >= start, "an argument only appends");
        self.ends.push(self.buf.len());
    }

    /// Appends a number argument.
    pub(crate) fn int(&mut self, n: u64) {
        self.arg(|buf| buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()));
    }

    fn ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(s, e)| s..e)
    }

    /// The byte ranges of the keys, then of the arguments, in the buffer.
    pub(crate) fn key_and_arg_ranges(
        &self,
    ) -> (
        impl Iterator<Item = std::ops::Range<usize>> + '_,
        impl Iterator<Item = std::ops::Range<usize>> + '_,
    ) {
        (self.ranges().take(self.keys), self.ranges().skip(self.keys))
    }

    pub(crate) fn key_count(&self) -> usize {
        self.keys
    }

    #[cfg(any(feature = "redis", test))]
    pub(crate) fn arg_count(&self) -> usize {
        self.ends.len() - self.keys
    }

    #[cfg(any(feature = "redis", test))]
    pub(crate) fn buffer(&self) -> &[u8] {
        &self.buf
    }

    #[cfg(feature = "fred")]
    pub(crate) fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

/// Runs a script on one Redis client.
pub(crate) trait ScriptRunner: Send + Sync + 'static {
    /// Runs `call.lua` with the call's keys (all in one hash slot) and arguments: one round trip
    /// (`EVALSHA`, then `EVAL` on `NOSCRIPT`).
    fn call(
        &self,
        call: ScriptCall,
    ) -> impl Future<Output = Result<Reply, StoreError>> + Send + 'static;

    /// [`ScriptRunner::call`] with owned keys and arguments.
    fn run(
        &self,
        lua: &'static Lua,
        keys: Vec<String>,
        args: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Reply, StoreError>> + Send + 'static {
        self.call(ScriptCall::from_vecs(lua, keys, args))
    }

    /// The prefix of every key.
    fn prefix(&self) -> &str;
}

/// The call that checks `check`: keys `<prefix>:{<hashed key>}:<rule signature>` (one hash tag,
/// so one cluster slot), and the arguments of [`rate_limit_script`]: cost, want-state flag, then
/// for a single rule its a, b, c (no c for a fixed window, and a nonce for a sliding log); for
/// several rules a nonce, then kind, a, b, c per rule.
fn rate_limit_call(prefix: &str, check: &RateCheck<'_>) -> ScriptCall {
    let n = check.rules.len();
    let mut call = ScriptCall::new(
        rate_limit_script(check.rules),
        n,
        3 + 4 * n,
        n * (prefix.len() + 96) + 16 + 32 * n + 24,
    );
    let mut tag = [0u8; 32];
    // 16 bytes always fit in 32 hex digits.
    let _ = hex::encode_to_slice(check.key.as_bytes(), &mut tag);
    for rule in check.rules {
        call.key(|buf| {
            buf.extend_from_slice(prefix.as_bytes());
            buf.extend_from_slice(b":{");
            buf.extend_from_slice(&tag);
            buf.extend_from_slice(b"}:");
            rule.write_signature(buf);
        });
    }
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

/// One rate-limit check over any client: one script call.
pub(crate) fn check_rate<R: ScriptRunner>(
    runner: &R,
    check: RateCheck<'_>,
) -> BoxFuture<Result<Decision, StoreError>> {
    let rules = check.rules.len();
    let call = runner.call(rate_limit_call(runner.prefix(), &check));
    Box::pin(async move { decode_decision(call.await?, rules) })
}

/// Turns the script's reply into a [`Decision`].
fn decode_decision(reply: Reply, rules: usize) -> Result<Decision, StoreError> {
    if reply == Reply::Int(1) {
        // Allowed, and the state was not asked for.
        return Ok(Decision {
            allowed: true,
            denied_by: None,
            retry_after: Duration::ZERO,
            rules: vec![
                RuleState {
                    remaining: 0,
                    reset: Duration::ZERO,
                };
                rules
            ],
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
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Decision {
        allowed,
        denied_by: if allowed { None } else { denied_by },
        retry_after: if allowed { Duration::ZERO } else { retry_after },
        rules: states,
    })
}

/// Implements every store trait for a client type that is a [`ScriptRunner`]: each operation is
/// one script call, written once in this module, `records` and `cache_scripts`.
macro_rules! impl_script_stores {
    ($t:ty) => {
        impl $crate::store::RateLimitStore for $t {
            type Future = $crate::store::script::BoxFuture<
                Result<$crate::store::Decision, $crate::store::StoreError>,
            >;

            fn check(&self, check: $crate::store::RateCheck<'_>) -> Self::Future {
                $crate::store::script::check_rate(self, check)
            }
        }
        $crate::store::records::impl_record_stores!($t);
        $crate::store::cache_scripts::impl_cache_store!($t);
    };
}
pub(crate) use impl_script_stores;

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

    #[test]
    fn call_ranges_split_keys_from_arguments() {
        let mut call = ScriptCall::from_vecs(
            &MULTI_RULE,
            vec!["k1".into(), "key2".into()],
            vec![b"a".to_vec(), Vec::new(), b"ccc".to_vec()],
        );
        call.int(42);
        let buf = call.buffer().to_vec();
        let (keys, args) = call.key_and_arg_ranges();
        let keys: Vec<&[u8]> = keys.map(|r| &buf[r]).collect();
        let args: Vec<&[u8]> = args.map(|r| &buf[r]).collect();
        assert_eq!(keys, [b"k1".as_slice(), b"key2"]);
        assert_eq!(args, [b"a".as_slice(), b"", b"ccc", b"42"]);
        assert_eq!((call.key_count(), call.arg_count()), (2, 4));
    }
}
