//! What every script call shares: the script text and its SHA-1 ([`Lua`]), the keys and
//! arguments packed in one buffer ([`ScriptCall`]), and the reply as either client reads it
//! ([`Reply`]).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use crate::store::StoreError;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A Lua script, sent with `EVALSHA` (and `EVAL` on `NOSCRIPT`).
#[derive(Debug)]
pub struct Lua {
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

/// A script reply, the same whichever client read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
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
#[derive(Debug)]
pub struct ScriptCall {
    pub(crate) lua: &'static Lua,
    buf: Vec<u8>,
    /// Where each key, then each argument, ends in `buf`.
    ends: Vec<usize>,
    keys: usize,
    /// Whether the call is given up when its caller stops waiting (see [`detached`]).
    abandon: bool,
    /// Set when a server answers the call "not now" (see [`ScriptCall::watch`]).
    answered: Option<Answered>,
}

/// Whether a server answered a call "not now" (`TRYAGAIN`, or a redirection the call follows)
/// while it was under way, and when any call of the store last was: the server is up, and a
/// caller that stops waiting for such a call has not seen Redis fail. Shared by the call and
/// its caller.
#[derive(Debug, Clone)]
pub(crate) struct Answered {
    call: Arc<AtomicBool>,
    store: Arc<NotNow>,
}

impl Answered {
    pub(crate) fn set(&self) {
        self.call.store(true, Ordering::Release);
        self.store.mark();
    }

    /// Whether this call, or (within `window`) any call of the store, was answered "not now".
    pub(crate) fn get(&self, window: Duration) -> bool {
        self.call.load(Ordering::Acquire) || self.store.within(window)
    }
}

/// When a server last answered a call of the store "not now" (a slot migrates).
#[derive(Debug)]
pub struct NotNow {
    epoch: std::time::Instant,
    /// Milliseconds since `epoch`, plus one (0: never).
    last: std::sync::atomic::AtomicU64,
}

impl Default for NotNow {
    fn default() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl NotNow {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }

    fn mark(&self) {
        self.last.store(self.now(), Ordering::Release);
    }

    fn within(&self, window: Duration) -> bool {
        let last = self.last.load(Ordering::Acquire);
        let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        last != 0 && self.now().saturating_sub(last) <= window
    }
}

impl ScriptCall {
    pub(crate) fn new(lua: &'static Lua, keys: usize, args: usize, bytes: usize) -> Self {
        Self {
            lua,
            buf: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(keys + args),
            keys: 0,
            abandon: false,
            answered: None,
        }
    }

    /// Starts recording whether a server answers this call "not now" (see [`Answered`]), and
    /// marks `store` when it does.
    pub(crate) fn watch(&mut self, store: &Arc<NotNow>) -> Answered {
        let answered = Answered {
            call: Arc::default(),
            store: store.clone(),
        };
        self.answered = Some(answered.clone());
        answered
    }

    /// What [`ScriptCall::watch`] records into, if anything.
    pub(crate) fn answered(&self) -> Option<Answered> {
        self.answered.clone()
    }

    /// Gives the call up when its caller stops waiting, rather than running it to its end (the
    /// default, see [`detached`]): for a call whose late landing would do harm, such as a
    /// rate-limit check answered by the layer's failure mode (it would charge a request the
    /// layer already rejected or let through uncounted).
    pub(crate) fn abandon_when_dropped(&mut self) {
        self.abandon = true;
    }

    /// Whether [`ScriptCall::abandon_when_dropped`] was called.
    pub(crate) fn abandons(&self) -> bool {
        self.abandon
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

    #[cfg(any(feature = "redis", test))]
    pub(crate) fn key_count(&self) -> usize {
        self.keys
    }

    #[cfg(any(feature = "redis", test))]
    pub(crate) fn arg_count(&self) -> usize {
        self.ends.len() - self.keys
    }

    pub(crate) fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// The buffer, where each key then each argument ends in it, and the number of keys.
    #[cfg(feature = "fred")]
    pub(crate) fn into_parts(self) -> (Vec<u8>, Vec<usize>, usize) {
        (self.buf, self.ends, self.keys)
    }
}

/// Runs a script call to its end even if the caller stops waiting (a layer's `store_timeout`):
/// an `EVALSHA` already sent runs on the server whether or not anyone waits, so its `NOSCRIPT`
/// fallback must too, or the call would land or not depending on the timing. Outside a Tokio
/// runtime, or when `abandon` (see [`ScriptCall::abandon_when_dropped`]), the call runs in place.
///
/// The call is spawned when the future is first polled, as an `async fn` would. Written as a
/// state machine rather than an `async fn`: that one would hold the call twice (as its argument
/// and as the future it awaits), and every future around it, boxed on each call, with it.
pub(crate) fn detached<T, F>(abandon: bool, call: F) -> Detached<F>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    if abandon {
        Detached::InPlace { call }
    } else {
        Detached::Start { call: Some(call) }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`detached`].
    #[project = DetachedProj]
    pub(crate) enum Detached<F: Future> {
        /// Not polled yet: spawned (or run in place outside a runtime) at the first poll.
        Start { call: Option<F> },
        Spawned { task: tokio::task::JoinHandle<F::Output> },
        InPlace { #[pin] call: F },
    }
}

impl<T, F> Future for Detached<F>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    type Output = Result<T, StoreError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                DetachedProj::Start { call } => {
                    // `call` is never pinned in this state: it may move into the task.
                    let Some(call) = call.take() else {
                        let error = std::io::Error::other("a detached call polled after its end");
                        return std::task::Poll::Ready(Err(StoreError::store(error)));
                    };
                    let next = match tokio::runtime::Handle::try_current() {
                        Ok(rt) => Detached::Spawned {
                            task: rt.spawn(call),
                        },
                        Err(_) => Detached::InPlace { call },
                    };
                    self.set(next);
                }
                DetachedProj::Spawned { task } => {
                    let joined = std::task::ready!(Pin::new(task).poll(cx));
                    return std::task::Poll::Ready(joined.map_err(StoreError::store)?);
                }
                DetachedProj::InPlace { call } => return call.poll(cx),
            }
        }
    }
}

/// The waits between tries of a call that a cluster node answered with `TRYAGAIN` (a multi-key
/// call whose slot is migrating, with its keys split between the two nodes): 5 ms doubling to
/// 100 ms, for at most the store's client timeout from the first `TRYAGAIN` (one round trip
/// after the call was sent: the clock is read only by a call that is answered so). The layer's
/// `store_timeout` usually ends the call first (it stops waiting); a call that runs to its end
/// on its own (see [`detached`]) stops here.
#[derive(Debug)]
pub(crate) struct TryAgain {
    limit: Duration,
    /// Set at the first `TRYAGAIN`.
    deadline: Option<tokio::time::Instant>,
    wait: Duration,
    answered: Option<Answered>,
}

impl TryAgain {
    /// Tries for at most `limit` (the store's client timeout); records in `answered` that the
    /// server asked to try again.
    pub(crate) fn new(limit: Duration, answered: Option<Answered>) -> Self {
        Self {
            limit,
            deadline: None,
            wait: Duration::from_millis(5),
            answered,
        }
    }

    /// Whether `message` (a server error) asks to try again.
    #[cfg_attr(not(feature = "fred"), allow(dead_code))]
    pub(crate) fn asked(message: &str) -> bool {
        message.to_ascii_uppercase().contains("TRYAGAIN")
    }

    /// Waits before the next try (the server answered "try again"); `false` when there is no
    /// time left for one.
    pub(crate) async fn wait(&mut self) -> bool {
        if let Some(answered) = &self.answered {
            answered.set();
        }
        let now = tokio::time::Instant::now();
        let deadline = *self.deadline.get_or_insert(now + self.limit);
        if now + self.wait >= deadline {
            return false;
        }
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(Duration::from_millis(100));
        true
    }
}

/// Whether a reload of every script (after a `NOSCRIPT`) is under way, so that a burst of
/// `NOSCRIPT` replies starts one reload, not one per call; a `NOSCRIPT` seen while a reload runs
/// makes it run once more when it ends (the server may have lost the scripts again after the
/// running reload loaded them).
#[derive(Debug, Default)]
pub(crate) struct Reload {
    running: std::sync::atomic::AtomicBool,
    again: std::sync::atomic::AtomicBool,
}

impl Reload {
    /// Runs `load()` in the background unless a reload is already running, in which case that
    /// one runs `load()` again when it ends.
    pub(crate) fn start<F, Fut>(self: &std::sync::Arc<Self>, load: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        use std::sync::atomic::Ordering::SeqCst;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.again.store(true, SeqCst);
        if self.running.swap(true, SeqCst) {
            return;
        }
        let this = self.clone();
        rt.spawn(async move {
            loop {
                this.again.store(false, SeqCst);
                load().await;
                if this.again.load(SeqCst) {
                    continue;
                }
                this.running.store(false, SeqCst);
                // A `start` between the check and the store found a reload running and left
                // it the work: take it back unless another task already did.
                if !this.again.load(SeqCst) || this.running.swap(true, SeqCst) {
                    break;
                }
            }
        });
    }
}

/// A duration as whole milliseconds, at least 1 (the smallest expiry Redis takes).
pub(crate) fn ms(d: Duration) -> Vec<u8> {
    d.as_millis().max(1).to_string().into_bytes()
}

/// A reply of `1` (done) or `0` (not done, for example the token no longer holds).
pub(crate) fn flag(
    reply: impl Future<Output = Result<Reply, StoreError>> + Send + 'static,
) -> BoxFuture<Result<bool, StoreError>> {
    Box::pin(async move { Ok(reply.await?.int()? == 1) })
}

/// A non-negative integer reply (negative ones read as 0).
pub(crate) fn positive(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    static TEST: Lua = Lua::new("return 1");

    #[test]
    fn call_ranges_split_keys_from_arguments() {
        let mut call = ScriptCall::from_vecs(
            &TEST,
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
