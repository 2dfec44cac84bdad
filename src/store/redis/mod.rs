//! The Redis stores: every operation is one Lua script call, written once here for any
//! [`ScriptRunner`], and the two clients that run them.
//!
//! - `script.rs`: the script text and SHA-1, the call buffer, the reply;
//! - `rate_limit.rs`, `cache.rs`, `lock.rs`, `idempotency.rs`: each concern's scripts, the
//!   keys and arguments of its calls, the decoding of its replies, and its store trait
//!   implemented for every [`ScriptRunner`];
//! - `redis_rs.rs` ([`RedisStore`]) and `fred.rs` ([`FredStore`]): thin runners that send a call
//!   with `EVALSHA` (then `EVAL` on `NOSCRIPT`) and read the reply.
//!
//! Every key of a call carries one hash tag, so each call runs on one Redis Cluster slot.

use std::{future::Future, sync::Arc, time::Duration};

mod cache;
mod idempotency;
mod lock;
mod rate_limit;
mod rate_limit_admin;
mod script;
mod watchdog;

#[cfg(feature = "fred")]
mod fred;
#[cfg(feature = "redis")]
mod redis_rs;

#[cfg(feature = "fred")]
pub use self::fred::FredStore;
pub use self::rate_limit::rate_limit_script;
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub use self::rate_limit::{calendar_period_script, calendar_spec};
#[cfg(feature = "redis")]
pub use self::redis_rs::RedisStore;

use self::script::{Answered, Lua, NotNow, Reply, ScriptCall};
use crate::store::{
    breaker::{Admission, Permit, ServerAnswer},
    Breaker, StoreError,
};

/// A Redis client that runs this crate's scripts: [`RedisStore`] and [`FredStore`].
///
/// Every store trait ([`RateLimitStore`](crate::store::RateLimitStore),
/// [`CacheStore`](crate::store::CacheStore), [`LockStore`](crate::store::LockStore),
/// [`IdempotencyStore`](crate::store::IdempotencyStore)) is implemented once for every runner:
/// the scripts, keys and reply decoding are shared, and a runner only sends a call and reads the
/// reply. The trait is sealed: it names the stores this crate ships, and cannot be implemented
/// outside it.
pub trait ScriptRunner: sealed::Runner {
    /// Whether the store's [circuit breaker](crate::store::CircuitBreaker) is open (or
    /// half-open): calls fail at once with [`StoreError::CircuitOpen`]. For health checks and
    /// dashboards; always `false` without a breaker.
    fn breaker_open(&self) -> bool {
        self.breaker_state().is_open()
    }
}

impl<T: sealed::Runner> ScriptRunner for T {}

pub(crate) mod sealed {
    use super::*;

    /// What a runner does; private, so [`ScriptRunner`] is sealed.
    pub trait Runner: Send + Sync + 'static {
        /// Runs `call.lua` with the call's keys (all in one hash slot) and arguments: one round
        /// trip (`EVALSHA`, then `EVAL` on `NOSCRIPT`). Operations call it through
        /// [`Runner::guarded`].
        fn call(
            &self,
            call: ScriptCall,
        ) -> impl Future<Output = Result<Reply, StoreError>> + Send + 'static;

        /// The store's circuit breaker, shared by its clones.
        fn breaker_state(&self) -> &Breaker;

        /// [`Runner::call`] through the circuit breaker: the way every operation calls Redis.
        /// While the breaker is open the call is not sent and fails at once
        /// ([`StoreError::CircuitOpen`]), and once per probe interval a probe on the call's
        /// first key goes in the background; otherwise the call's end is recorded (a failure, a
        /// success, or, when the caller drops it unfinished, a failure).
        ///
        /// A call that its caller gives up while a server keeps answering it "not now"
        /// (`TRYAGAIN` while its slot migrates), or within [`NOT_NOW_WINDOW`] of any call of
        /// the store answered so, counts as answered, not as a failure: one migrating slot must
        /// not open the breaker for every other slot. (redis-rs retries `TRYAGAIN` itself before
        /// the store sees it, often past a layer's store timeout: the store's window covers
        /// those calls once one of them was answered "not now".)
        fn guarded(
            &self,
            mut call: ScriptCall,
        ) -> impl Future<Output = Result<Reply, StoreError>> + Send + 'static {
            match self.breaker_state().admit() {
                Admission::Go(permit) => {
                    let answered = call.watch(self.not_now());
                    Guarded::Go {
                        recorder: Recorder(Some((permit, answered))),
                        call: self.call(call),
                    }
                }
                Admission::Open { error, probe } => {
                    if let Some(permit) = probe {
                        send_probe(self, permit, &call);
                    }
                    Guarded::Refused { error: Some(error) }
                }
            }
        }

        /// [`Runner::guarded`] with owned keys and arguments.
        fn run(
            &self,
            lua: &'static Lua,
            keys: Vec<String>,
            args: Vec<Vec<u8>>,
        ) -> impl Future<Output = Result<Reply, StoreError>> + Send + 'static {
            self.guarded(ScriptCall::from_vecs(lua, keys, args))
        }

        /// The prefix of every key.
        fn prefix(&self) -> &str;

        /// When a server last answered a call of this store "not now" (shared by its clones).
        fn not_now(&self) -> &Arc<NotNow>;
    }
}

pin_project_lite::pin_project! {
    /// The future of [`sealed::Runner::guarded`]: the call with its recorder, or the breaker's
    /// refusal. A state machine rather than an `async` block, which would hold the call twice
    /// (captured, then awaited): the futures around it are boxed on every call.
    #[project = GuardedProj]
    enum Guarded<F> {
        Go { recorder: Recorder, #[pin] call: F },
        Refused { error: Option<StoreError> },
    }
}

impl<F: Future<Output = Result<Reply, StoreError>>> Future for Guarded<F> {
    type Output = Result<Reply, StoreError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            GuardedProj::Go { recorder, call } => {
                let result = std::task::ready!(call.poll(cx));
                std::task::Poll::Ready(recorder.record(result))
            }
            GuardedProj::Refused { error } => {
                std::task::Poll::Ready(Err(error.take().unwrap_or_else(|| {
                    StoreError::store(std::io::Error::other("polled after its end"))
                })))
            }
        }
    }
}

/// Records how a call let through the breaker ended; dropped unfinished, a call the server
/// answered "not now" counts as answered (see [`sealed::Runner::guarded`]), any other as the
/// [`Permit`] says.
struct Recorder(Option<(Permit, Answered)>);

impl Recorder {
    /// Records `result` once (a later call passes it on unrecorded).
    fn record(&mut self, result: Result<Reply, StoreError>) -> Result<Reply, StoreError> {
        match self.0.take() {
            Some((permit, _)) => permit.record(result),
            None => result,
        }
    }
}

/// How long after a call of a store was answered "not now" its other calls given up unanswered
/// still count as answered: a slot's migration answers `TRYAGAIN` to each of its calls, again
/// and again, for as long as it lasts.
pub(crate) const NOT_NOW_WINDOW: Duration = Duration::from_secs(2);

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some((permit, answered)) = self.0.take() {
            if answered.get(NOT_NOW_WINDOW) {
                let answer = std::io::Error::other("the server asked to try again");
                let _ = permit.record::<()>(Err(ServerAnswer::error(answer)));
            }
        }
    }
}

/// Sends a probe ([`PROBE`] on the first key of `call`) in the background, and records how it
/// ended with `permit`.
fn send_probe<R: sealed::Runner + ?Sized>(runner: &R, permit: Permit, call: &ScriptCall) {
    let (mut keys, _) = call.key_and_arg_ranges();
    let key = keys
        .next()
        .and_then(|range| call.buffer().get(range))
        .map(|key| String::from_utf8_lossy(key).into_owned());
    let probe = runner.call(ScriptCall::from_vecs(
        &PROBE,
        key.into_iter().collect(),
        Vec::new(),
    ));
    let timeout = Some(runner.breaker_state().probe_timeout());
    // Without a runtime the permit is dropped: a failed probe.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move { permit.record(crate::store::bounded(timeout, probe).await) });
    }
}

/// How long either client may take to connect, and to answer one command, when the store makes
/// the client itself (`RedisStore::connect`, `FredStore::connect`); `connect_with_timeout` sets
/// another bound, for layers with a `store_timeout` longer than this.
///
/// Both clients have hidden defaults (redis-rs gives up on a reply after 500 ms and on a
/// connection after 1 s; fred waits 10 s to connect and forever for a reply); this crate sets
/// every one of them. The bound is longer than every layer's default `store_timeout` (the longest
/// is 1 s, for idempotency and the lock), so the layer's own bound decides when a call has failed;
/// the client's bound only detects a connection that stopped answering, so that the client drops
/// it and connects again.
pub(crate) const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// How a Redis store connects ([`RedisStore::connect_with`](crate::store::RedisStore),
/// [`FredStore::connect_with`](crate::store::FredStore)): the client timeout and, with the
/// `tls` feature, the certificate authority that signs the servers' certificates.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_layers::store::ConnectOptions;
///
/// let options = ConnectOptions::new().client_timeout(Duration::from_secs(3));
/// # let _ = options;
/// ```
#[derive(Clone)]
pub struct ConnectOptions {
    pub(crate) client_timeout: Duration,
    #[cfg(feature = "tls")]
    pub(crate) ca_certificate: Option<Arc<[u8]>>,
}

impl ConnectOptions {
    /// The defaults: a client timeout of 2 s and, for `rediss://`, the system's root
    /// certificates.
    pub fn new() -> Self {
        Self {
            client_timeout: CLIENT_TIMEOUT,
            #[cfg(feature = "tls")]
            ca_certificate: None,
        }
    }

    /// The bound on connecting, on each reply, and on the retries of a call answered
    /// `TRYAGAIN` (default 2 s).
    ///
    /// The rule: give the store a client timeout at least as long as the longest
    /// `store_timeout` of the layers that use it (2 s covers every layer's default). A shorter
    /// one cuts a call the layer would still wait for; the layer's own bound always decides when
    /// a call has failed.
    pub fn client_timeout(mut self, timeout: Duration) -> Self {
        self.client_timeout = timeout;
        self
    }

    /// Trusts the certificate authority in `pem` (one or more PEM `CERTIFICATE` blocks, for
    /// example the `ca.crt` of a self-signed setup, as `redis-server --tls-ca-cert-file` takes
    /// it) for the servers of a `rediss://` URL, **in place of** the system's root certificates.
    ///
    /// Both clients then accept a server (every node of a cluster) only with a certificate that
    /// this CA signed and that names the host of the URL (or the address a cluster node
    /// announces: give the nodes' certificates their IP addresses, or host names they announce).
    /// Connecting fails with [`StoreError::Tls`] otherwise, and with
    /// [`StoreError::Invalid`] when `pem` holds no certificate or the URL is not `rediss://`.
    ///
    /// Without it, redis-rs and fred trust the system's roots (read by `rustls-native-certs`:
    /// `SSL_CERT_FILE`, `SSL_CERT_DIR`, else the distribution's bundle).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_certificate = Some(Arc::from(pem.into()));
        self
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ConnectOptions");
        d.field("client_timeout", &self.client_timeout);
        #[cfg(feature = "tls")]
        d.field(
            "ca_certificate",
            &self.ca_certificate.as_ref().map(|_| ".."),
        );
        d.finish()
    }
}

/// Whether `url` asks for TLS: `rediss://`, `rediss+cluster://`, fred's `rediss-cluster://`
/// (and `valkeys`, as fred reads it).
pub(crate) fn is_tls_url(url: &str) -> bool {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    let scheme = scheme.to_ascii_lowercase();
    scheme.starts_with("rediss") || scheme.starts_with("valkeys")
}

/// Checks, before connecting, that `url` and `options` go together: `rediss://` needs the
/// `tls` feature, and a CA certificate needs `rediss://` and at least one certificate. Installs
/// rustls's `ring` provider as the process default when there is none (both clients build their
/// TLS configuration from the process default).
pub(crate) fn check_tls(url: &str, options: &ConnectOptions) -> Result<(), StoreError> {
    let tls = is_tls_url(url);
    #[cfg(not(feature = "tls"))]
    {
        let _ = options;
        if tls {
            return Err(StoreError::Invalid(
                "a rediss:// URL needs TLS, and tower-redis-layers was built without its `tls` \
                 feature: enable it (features = [\"tls\"]) or use redis://"
                    .to_owned(),
            ));
        }
    }
    #[cfg(feature = "tls")]
    {
        if tls {
            // Ours only if the application installed none (then it keeps its own).
            let _ = ring_provider().install_default();
        }
        if let Some(pem) = &options.ca_certificate {
            if !tls {
                return Err(StoreError::Invalid(
                    "a CA certificate was given for a URL without TLS: use rediss://".to_owned(),
                ));
            }
            ca_roots(pem)?;
        }
    }
    Ok(())
}

/// rustls's `ring` provider: it builds with a C compiler alone (no cmake, no OpenSSL), and is
/// what fred's `enable-rustls-ring` uses. rustls 0.23.48 deprecates it for want of post-quantum
/// key exchange; Redis's own TLS (OpenSSL) negotiates classic groups with it.
#[cfg(feature = "tls")]
#[allow(deprecated)]
pub(crate) fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The certificates of a PEM CA bundle, as trust anchors.
#[cfg(feature = "tls")]
pub(crate) fn ca_roots(pem: &[u8]) -> Result<rustls::RootCertStore, StoreError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let invalid = |detail: String| {
        StoreError::Invalid(format!(
            "the CA certificate is not a PEM certificate: {detail}"
        ))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|err| invalid(err.to_string()))?;
        roots.add(cert).map_err(|err| invalid(err.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("no CERTIFICATE block".to_owned()));
    }
    Ok(roots)
}

/// Whether an error at connect is a failed TLS handshake (an untrusted or misnamed
/// certificate, a server that does not speak TLS), from the client's message.
pub(crate) fn is_tls_failure(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "certificate",
        "unknownissuer",
        "handshake",
        "tls",
        "corrupt message",
        "invalidcontenttype",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

/// The lock and idempotency scripts, for loading on (re)connect (the same text, so the same
/// SHA-1, as the statics their modules call).
static LOCK_AND_IDEMPOTENCY: [Lua; 6] = [
    Lua::new(include_str!("../../scripts/lock_acquire.lua")),
    Lua::new(include_str!("../../scripts/lock_extend.lua")),
    Lua::new(include_str!("../../scripts/lock_release.lua")),
    Lua::new(include_str!("../../scripts/idempotency_claim.lua")),
    Lua::new(include_str!("../../scripts/idempotency_complete.lua")),
    Lua::new(include_str!("../../scripts/idempotency_lease.lua")),
];

/// The circuit breaker's probe: reads whether the key exists, on the node that owns its slot.
static PROBE: Lua = Lua::new("return redis.call('EXISTS', KEYS[1])");

/// Every script this crate runs, loaded with `SCRIPT LOAD` on every node each time a client
/// connects or reconnects, so that the first `EVALSHA` finds it. A call still falls back to
/// `EVAL` on `NOSCRIPT` (a `SCRIPT FLUSH`, a failover to a node that never saw the load).
pub(crate) fn scripts() -> impl Iterator<Item = &'static Lua> {
    rate_limit::SCRIPTS
        .iter()
        .copied()
        .chain(rate_limit_admin::SCRIPTS.iter().copied())
        .chain(cache::SCRIPTS.iter().copied())
        .chain(LOCK_AND_IDEMPOTENCY.iter())
        .chain([&PROBE, &ACL_PROBE])
}

/// The script a store runs at connect to learn whether the server lets it use keys under its
/// prefix: it reads and writes [`ACL_PROBE_KEY`] (`GET`, then `PEXPIRE` of a key that does not
/// exist, which changes nothing; sent with `EVALSHA`, loaded with the other scripts), so an ACL
/// user without rights to the crate's keys, or without `EVALSHA`, is refused at connect rather
/// than on every call.
pub(crate) static ACL_PROBE: Lua =
    Lua::new("redis.call('GET', KEYS[1]) return redis.call('PEXPIRE', KEYS[1], 1)");

/// The key [`ACL_PROBE`] touches: under the default prefix, as every key the store writes.
pub(crate) const ACL_PROBE_KEY: &str = "trl:{acl-probe}:probe";

/// Whether a server error at connect means the server refuses this crate's commands (a missing
/// or wrong password, an ACL user without the rights), rather than a failure to reach it.
pub(crate) fn is_refusal(message: &str) -> bool {
    let message = message.to_ascii_uppercase();
    ["NOAUTH", "WRONGPASS", "NOPERM", "AUTHENTICATION"]
        .iter()
        .any(|code| message.contains(code))
}

/// Warns, at connect, about the settings of one server (`node`) that lose this crate's keys: an
/// eviction policy other than `noeviction` (every key the crate writes has a TTL, so a
/// `volatile-*` policy evicts them exactly as an `allkeys-*` one does), and no append-only file
/// (nothing survives a restart). `None` when the server would not say (`CONFIG` disabled).
pub(crate) fn warn_on_config(node: &str, policy: Option<&str>, appendonly: Option<&str>) {
    if let Some(policy) = policy.filter(|p| *p != "noeviction") {
        tracing::warn!(
            node,
            policy,
            "Redis may evict this crate's keys under memory pressure (each has a TTL, so \
             volatile-* policies evict them as allkeys-* do): rate-limit state and idempotency \
             records need maxmemory-policy noeviction, or a Redis of their own"
        );
    }
    if appendonly == Some("no") {
        tracing::warn!(
            node,
            "Redis keeps no append-only file: idempotency records, locks and limits do not \
             survive a restart; set appendonly yes (appendfsync everysec)"
        );
    }
}

/// The value of `name` in a `CONFIG GET name` reply read as `[name, value]` pairs.
pub(crate) fn config_value<'a>(pairs: &'a [String], name: &str) -> Option<&'a str> {
    pairs
        .chunks(2)
        .find(|pair| pair.first().is_some_and(|n| n == name))
        .and_then(|pair| pair.get(1))
        .map(String::as_str)
}

/// The settings [`warn_on_config`] reads: the eviction policy, then whether there is an
/// append-only file.
pub(crate) const CHECKED_CONFIG: [&str; 2] = ["maxmemory-policy", "appendonly"];

/// The [`CHECKED_CONFIG`] values of every node, as the client read them, then warned about.
#[derive(Debug, Default)]
pub(crate) struct NodeConfigs(Vec<(String, [Option<String>; 2])>);

impl NodeConfigs {
    /// Records that `node` has `value` for `CHECKED_CONFIG[setting]`.
    pub(crate) fn add(&mut self, node: String, setting: usize, value: String) {
        let index = match self.0.iter().position(|(n, _)| *n == node) {
            Some(index) => index,
            None => {
                self.0.push((node, [None, None]));
                self.0.len() - 1
            }
        };
        if let Some(slot) = self.0.get_mut(index).and_then(|(_, v)| v.get_mut(setting)) {
            *slot = Some(value);
        }
    }

    /// Warns about every node's settings.
    pub(crate) fn warn(&self) {
        for (node, [policy, appendonly]) in &self.0 {
            warn_on_config(node, policy.as_deref(), appendonly.as_deref());
        }
    }
}

/// The prefix of every key a Redis store writes (default `trl`), without `{` or `}` so that it
/// can never become a hash tag.
#[derive(Clone, Debug)]
pub(crate) struct KeyPrefix(Arc<str>);

impl KeyPrefix {
    pub(crate) fn new(prefix: impl Into<String>) -> Self {
        Self(prefix.into().replace(['{', '}'], "").into())
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self(Arc::from("trl"))
    }
}

/// The two keys of a lock or an idempotency record, under one hash tag: the value and its fence
/// counter (`<prefix>:<kind>:{<key>}` and `<prefix>:<kind>-fence:{<key>}`).
pub(crate) fn fenced_keys(prefix: &str, kind: &str, key: &crate::StoreKey) -> [String; 2] {
    let tag = key.to_hex();
    [
        format!("{prefix}:{kind}:{{{tag}}}"),
        format!("{prefix}:{kind}-fence:{{{tag}}}"),
    ]
}

/// A cluster URL, `redis+cluster://[user:password@]a:1,b:2` (or `rediss+cluster://`): the scheme
/// without `+cluster`, the credentials (written on any one node, they apply to every node), and
/// the nodes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ClusterUrl<'a> {
    pub(crate) scheme: &'a str,
    pub(crate) auth: Option<&'a str>,
    pub(crate) nodes: Vec<&'a str>,
}

impl ClusterUrl<'_> {
    /// `auth@`, or nothing.
    pub(crate) fn auth_prefix(&self) -> String {
        self.auth.map(|a| format!("{a}@")).unwrap_or_default()
    }
}

/// Splits a cluster URL (see [`ClusterUrl`]); `None` for a URL of one server.
pub(crate) fn cluster_nodes(url: &str) -> Option<ClusterUrl<'_>> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.strip_suffix("+cluster")?;
    let mut auth = None;
    let nodes = rest
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|node| match node.rsplit_once('@') {
            Some((credentials, node)) => {
                auth.get_or_insert(credentials);
                node
            }
            None => node,
        })
        .collect();
    Some(ClusterUrl {
        scheme,
        auth,
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_url_credentials_apply_to_every_node() {
        let url = cluster_nodes("redis+cluster://app:pw@a:1, b:2,c:3").expect("a cluster URL");
        assert_eq!(url.scheme, "redis");
        assert_eq!(url.auth, Some("app:pw"));
        assert_eq!(url.nodes, ["a:1", "b:2", "c:3"]);
        assert_eq!(url.auth_prefix(), "app:pw@");
        let url = cluster_nodes("rediss+cluster://a:1,:pw@b:2").expect("a cluster URL");
        assert_eq!((url.scheme, url.auth), ("rediss", Some(":pw")));
        assert_eq!(url.nodes, ["a:1", "b:2"]);
        assert!(cluster_nodes("redis://a:1").is_none());
    }

    /// A call given up unfinished opens the breaker (one failure is enough here), unless it
    /// or another call of the store was answered "not now" lately.
    #[tokio::test(start_paused = true)]
    async fn a_call_answered_not_now_is_no_failure() {
        let store = Arc::new(NotNow::default());
        let give_up = |breaker: &Breaker, not_now: bool, store: &Arc<NotNow>| {
            let Admission::Go(permit) = breaker.admit() else {
                panic!("the breaker is closed");
            };
            let mut call = ScriptCall::from_vecs(&PROBE, vec!["k".to_owned()], Vec::new());
            let answered = call.watch(store);
            if not_now {
                answered.set();
            }
            Recorder(Some((permit, answered)))
        };
        let breaker = Breaker::new(crate::store::CircuitBreaker::default().failures(1));
        let recorder = give_up(&breaker, true, &store);
        tokio::time::advance(Duration::from_millis(300)).await;
        drop(recorder);
        assert!(!breaker.is_open(), "answered TRYAGAIN");
        // Another call of the same store, within the window.
        let recorder = give_up(&breaker, false, &store);
        tokio::time::advance(Duration::from_millis(300)).await;
        drop(recorder);
        assert!(!breaker.is_open(), "within the window");
        // Past the window, or on another store: a failure.
        let fresh = Arc::new(NotNow::default());
        let recorder = give_up(&breaker, false, &fresh);
        tokio::time::advance(Duration::from_millis(300)).await;
        drop(recorder);
        assert!(breaker.is_open(), "a call given up unanswered is a failure");
    }

    #[test]
    fn rediss_needs_the_tls_feature() {
        assert!(is_tls_url("rediss://a:1"));
        assert!(is_tls_url("rediss+cluster://a:1,b:2"));
        assert!(is_tls_url("REDISS-cluster://a:1"));
        assert!(!is_tls_url("redis://a:1"));
        assert!(!is_tls_url("redis+cluster://a:1"));
        let result = check_tls("rediss://127.0.0.1:6380", &ConnectOptions::new());
        #[cfg(not(feature = "tls"))]
        assert!(
            matches!(&result, Err(StoreError::Invalid(m)) if m.contains("`tls` feature")),
            "{result:?}"
        );
        #[cfg(feature = "tls")]
        assert!(result.is_ok(), "{result:?}");
        assert!(check_tls("redis://127.0.0.1:6379", &ConnectOptions::new()).is_ok());
    }

    #[cfg(feature = "tls")]
    #[test]
    fn a_ca_needs_rediss_and_a_certificate() {
        let options = ConnectOptions::new().ca_certificate(b"no PEM here".to_vec());
        let result = check_tls("rediss://127.0.0.1:6380", &options);
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
        let result = check_tls("redis://127.0.0.1:6379", &options);
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    }
}
