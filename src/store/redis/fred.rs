//! The `fred` store: fred, standalone or cluster.

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;

use fred::{
    prelude::{
        Builder, Client, ClientLike, ClusterInterface, Config, Error, EventInterface, LuaInterface,
        Options, Pool, ReconnectPolicy, TransactionInterface,
    },
    types::{ClusterHash, CustomCommand, Key, Value},
    util::redis_keyslot,
};

use super::{
    check_tls, cluster_nodes, config_value, is_refusal, is_tls_failure, is_tls_url,
    script::{detached, Lua, NotNow, Reload, Reply, ScriptCall, TryAgain},
    scripts,
    sealed::Runner,
    watchdog::Watchdog,
    ConnectOptions, KeyPrefix, NodeConfigs, ACL_PROBE, ACL_PROBE_KEY, CHECKED_CONFIG,
    CLIENT_TIMEOUT,
};
use crate::store::{breaker::ServerAnswer, Breaker, CircuitBreaker, StoreError};

/// A store on Redis through [fred](https://docs.rs/fred): a [`Client`] or a [`Pool`] that the
/// application has already initialised, standalone or cluster as its configuration says.
///
/// Each operation is one `EVALSHA` of the same script text as the `redis` store (sent with `EVAL`
/// on `NOSCRIPT`, which also caches it on that node). Cloning is cheap.
#[derive(Clone)]
pub struct FredStore {
    client: Arc<Watchdog<FredClient>>,
    client_timeout: Duration,
    prefix: KeyPrefix,
    reload: Arc<Reload>,
    breaker: Breaker,
    not_now: Arc<NotNow>,
}

#[derive(Clone)]
enum FredClient {
    Client(Client),
    Pool(Pool),
}

impl FredStore {
    /// Uses an initialised client (`client.init().await` already called).
    pub fn from_client(client: Client) -> Self {
        Self::with(Watchdog::new(FredClient::Client(client), None, None))
    }

    /// Uses an initialised pool.
    pub fn from_pool(pool: Pool) -> Self {
        Self::with(Watchdog::new(FredClient::Pool(pool), None, None))
    }

    /// Connects a new client from a URL: `redis://host:port` for one server,
    /// `redis-cluster://host:port?node=host:port` for a cluster (fred's URL syntax), and
    /// `redis+cluster://host:port,host:port` as the `redis` store accepts it.
    ///
    /// Every client timeout is set, none is left to fred's defaults: connecting, fred's own
    /// commands and each reply are bounded by 2 s (longer than every layer's default
    /// `store_timeout`, which decides first), and a connection with a command unanswered for
    /// 2 s is dropped and made again; a command is tried at most 3 times; the client reconnects
    /// forever, 100 ms doubling to 2 s apart. The client follows no cluster redirection itself
    /// (`max_redirections = 0`): a redirected call is sent again in a transaction, which follows
    /// `ASK` and `MOVED` (at most 5) safely. A cluster client that stops answering (calls sent,
    /// nothing back for 300 ms) is replaced by a new one made from `url`, once a new one
    /// connects.
    /// Connecting loads every script of the crate (on every primary of a cluster), and fails if
    /// the server refuses it.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_timeout(url, CLIENT_TIMEOUT).await
    }

    /// [`FredStore::connect`] with `client_timeout` in place of 2 s: the bound on connecting,
    /// on fred's own commands, on each reply (and how long a connection may leave a command
    /// unanswered), and on the retries of a call answered `TRYAGAIN`.
    ///
    /// The rule: give the store a client timeout at least as long as the longest
    /// `store_timeout` of the layers that use it (2 s covers every layer's default). A shorter
    /// one cuts a call the layer would still wait for; the layer's own bound always decides when
    /// a call has failed.
    pub async fn connect_with_timeout(
        url: &str,
        client_timeout: Duration,
    ) -> Result<Self, StoreError> {
        Self::connect_with(url, ConnectOptions::new().client_timeout(client_timeout)).await
    }

    /// [`FredStore::connect`] with [`ConnectOptions`]: the client timeout and, with the `tls`
    /// feature, the CA that signs the servers' certificates.
    ///
    /// `rediss://host:port`, `rediss+cluster://host:port,host:port` and fred's
    /// `rediss-cluster://host:port?node=host:port` connect with TLS (rustls; the `tls`
    /// feature): every node of a cluster too, with the same trust. Without the feature a
    /// `rediss://` URL fails with [`StoreError::Invalid`]; a handshake that fails (an untrusted
    /// certificate) fails with [`StoreError::Tls`].
    ///
    /// ```no_run
    /// # #[cfg(feature = "tls")]
    /// # async fn run() -> Result<(), tower_redis_layers::StoreError> {
    /// use tower_redis_layers::store::{ConnectOptions, FredStore};
    /// let ca = std::fs::read("/etc/redis/tls/ca.crt").expect("the CA certificate");
    /// let options = ConnectOptions::new().ca_certificate(ca);
    /// let store = FredStore::connect_with("rediss://redis.internal:6380", options).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<Self, StoreError> {
        check_tls(url, &options)?;
        let client_timeout = options.client_timeout;
        let client = open(url, &options).await?;
        client.check_config().await;
        // Only a cluster client is rebuilt: a standalone one reconnects on its own, and the
        // clients stop for good only on cluster redirections.
        let cluster = cluster_nodes(url).is_some();
        let url: Arc<str> = Arc::from(url);
        let rebuild: super::watchdog::Rebuild<FredClient> = Box::new(move || {
            let url = url.clone();
            let options = options.clone();
            Box::pin(async move { open(&url, &options).await })
        });
        let mut store = Self::with(Watchdog::new(
            client,
            cluster.then_some(rebuild),
            Some(retire),
        ));
        store.client_timeout = client_timeout;
        Ok(store)
    }

    /// The prefix of every key this store writes (default `trl`), the same as
    /// [`RedisStore::prefix`](crate::store::RedisStore::prefix) so that both stores can share state.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = KeyPrefix::new(prefix);
        self
    }

    /// The circuit breaker of this store and its clones (default: [`CircuitBreaker::default`],
    /// 5 failures in a row open it, a probe every 250 ms while open). While it is open every
    /// call fails at once with [`StoreError::CircuitOpen`], and each layer answers from its
    /// fallback without waiting.
    pub fn breaker(mut self, config: CircuitBreaker) -> Self {
        self.breaker = Breaker::new(config);
        self
    }

    /// Turns the circuit breaker off: every call goes to Redis and waits up to the layer's
    /// store timeout, however many failed before.
    pub fn no_breaker(mut self) -> Self {
        self.breaker = Breaker::off();
        self
    }

    fn with(client: Arc<Watchdog<FredClient>>) -> Self {
        Self {
            client,
            client_timeout: CLIENT_TIMEOUT,
            prefix: KeyPrefix::default(),
            reload: Arc::default(),
            breaker: Breaker::new(CircuitBreaker::default()),
            not_now: Arc::default(),
        }
    }
}

/// Connects a new client from a URL and loads every script (see [`FredStore::connect`]).
async fn open(url: &str, options: &ConnectOptions) -> Result<FredClient, StoreError> {
    let timeout = options.client_timeout;
    let tls = is_tls_url(url);
    let failed = |err| connect_error(tls, err);
    let url = normalise_cluster_url(url);
    #[allow(unused_mut)]
    let mut config = Config::from_url(&url).map_err(failed)?;
    #[cfg(feature = "tls")]
    if let Some(pem) = &options.ca_certificate {
        config.tls = Some(tls_config(pem)?);
    }
    let client = Builder::from_config(config)
        // Reconnect attempts at most 200 ms apart: fred holds every command while it reconnects
        // (healthy nodes' too), so a longer cap is time lost after a failover's promotion.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 200, 2))
        .with_connection_config(|c| {
            c.connection_timeout = timeout;
            c.internal_command_timeout = timeout;
            c.max_command_attempts = 3;
            // Redirections are followed by the store (see `FredClient::eval`): 0 is "none".
            c.max_redirections = 0;
            c.unresponsive.max_timeout = Some(timeout);
            c.unresponsive.interval = Duration::from_millis(500);
        })
        .with_performance_config(|p| p.default_command_timeout = timeout)
        .build()
        .map_err(StoreError::store)?;
    client.init().await.map_err(failed)?;
    let client = FredClient::Client(client);
    client.load_scripts().await.map_err(failed)?;
    reload_on_reconnect(&client);
    let probe = client
        .one()
        .evalsha::<Value, _, _, _>(ACL_PROBE.sha(), ACL_PROBE_KEY, ())
        .await;
    probe.map_err(failed)?;
    Ok(client)
}

/// Loads every script again each time the client connects again to a server (a restarted
/// server has none), so the first calls after it find them; `NOSCRIPT` still falls back to
/// `EVAL` for a server that lost them otherwise (`SCRIPT FLUSH`).
fn reload_on_reconnect(client: &FredClient) {
    let FredClient::Client(fred) = client else {
        return;
    };
    let loader = client.clone();
    let _listener = fred.on_reconnect(move |server| {
        let loader = loader.clone();
        async move {
            if let Err(err) = loader.load_scripts().await {
                tracing::debug!(%err, %server, "loading the scripts after a reconnect failed");
            }
            Ok(())
        }
    });
}

/// Closes a client the watchdog replaced, once the calls still on it had their time.
fn retire(client: FredClient) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        tokio::time::sleep(CLIENT_TIMEOUT).await;
        if let FredClient::Client(client) = client {
            let _ = client.quit().await;
        }
    });
}

/// `redis+cluster://[user:password@]a:1,b:2` becomes
/// `redis-cluster://[user:password@]a:1?node=b:2`.
fn normalise_cluster_url(url: &str) -> String {
    let Some(cluster) = cluster_nodes(url) else {
        return url.to_owned();
    };
    let auth = cluster.auth_prefix();
    let mut nodes = cluster.nodes.iter();
    let first = nodes.next().copied().unwrap_or_default();
    let extra: Vec<String> = nodes.map(|n| format!("node={n}")).collect();
    let base = cluster.scheme;
    if extra.is_empty() {
        format!("{base}-cluster://{auth}{first}")
    } else {
        format!("{base}-cluster://{auth}{first}?{}", extra.join("&"))
    }
}

impl fmt::Debug for FredStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FredStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A script call's keys and arguments as slices of one shared buffer: made into fred's vectors
/// for `EVALSHA`, and again only on `NOSCRIPT`.
struct Packed {
    buf: Bytes,
    /// Where each key, then each argument, ends in `buf`.
    ends: Vec<usize>,
    keys: usize,
    /// Whether the call fails at once, rather than waits in fred's queue, while the connection
    /// is down: a call given up by its caller (see `ScriptCall::abandon_when_dropped`) must not
    /// be sent later, when fred reconnects. (A call already written when its connection breaks
    /// is still sent again by fred after it reconnects, whatever its options: see the README's
    /// "When a reply is lost".)
    fail_fast: bool,
}

impl Packed {
    fn new(call: ScriptCall) -> Self {
        let fail_fast = call.abandons();
        let (buf, ends, keys) = call.into_parts();
        Self {
            buf: Bytes::from(buf),
            ends,
            keys,
            fail_fast,
        }
    }

    fn parts(&self) -> (Vec<Key>, Vec<Value>) {
        let keys = self.keys.min(self.ends.len());
        let mut start = 0;
        let mut next = |end: usize| {
            let part = self.buf.slice(start.min(end)..end);
            start = end;
            part
        };
        let mut key_parts = Vec::with_capacity(keys);
        let mut arg_parts = Vec::with_capacity(self.ends.len() - keys);
        for (i, &end) in self.ends.iter().enumerate() {
            if i < keys {
                key_parts.push(Key::from(next(end)));
            } else {
                arg_parts.push(Value::Bytes(next(end)));
            }
        }
        (key_parts, arg_parts)
    }
}

impl FredClient {
    /// A client of the pool (the client itself for a client).
    fn one(&self) -> Client {
        match self {
            FredClient::Client(c) => c.clone(),
            FredClient::Pool(p) => p.next().clone(),
        }
    }

    /// Loads every script of the crate, on each primary of a cluster (each client of a pool
    /// shares the servers' script caches, so one client is enough).
    async fn load_scripts(&self) -> Result<(), Error> {
        let client = self.one();
        let servers = client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default();
        // `SCRIPT LOAD` as a custom command: fred's `script_load` ignores `with_cluster_node`.
        let load = || CustomCommand::new_static("SCRIPT", ClusterHash::Random, false);
        for lua in scripts() {
            let args = || vec![Value::from("LOAD"), Value::from(lua.text)];
            if servers.is_empty() {
                client.custom::<Value, _>(load(), args()).await?;
            }
            for server in &servers {
                let node = client.with_cluster_node(server.clone());
                node.custom::<Value, _>(load(), args()).await?;
            }
        }
        Ok(())
    }

    /// Reads, on every node, the settings [`warn_on_config`](super::warn_on_config) checks, and
    /// warns about them. `CONFIG` may be disabled (managed services): then nothing is said.
    async fn check_config(&self) {
        let client = self.one();
        let mut servers = client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default();
        if servers.is_empty() {
            servers = client.active_connections();
        }
        let mut configs = NodeConfigs::default();
        for (setting, name) in CHECKED_CONFIG.into_iter().enumerate() {
            for server in &servers {
                let get = CustomCommand::new_static("CONFIG", ClusterHash::Random, false);
                let node = client.with_cluster_node(server.clone());
                let args = vec![Value::from("GET"), Value::from(name)];
                let Ok(reply) = node.custom::<Value, _>(get, args).await else {
                    continue;
                };
                if let Some(value) = config_value(&strings(reply), name) {
                    configs.add(server.to_string(), setting, value.to_owned());
                }
            }
        }
        configs.warn();
    }

    /// One call: `EVALSHA` (then `EVAL` on `NOSCRIPT`), which a client made by `connect` does not
    /// redirect; on a redirection, the call again in a transaction, which fred redirects safely.
    ///
    /// fred 10.1 follows an `ASK` redirection by writing `ASKING` on a connection shared with
    /// other calls and reading the next reply on it as the answer to `ASKING`: with other calls
    /// in flight that reply is theirs, and every later reply on the connection goes to the call
    /// after its own. Its transactions wait for every connection to be idle first, so a call sent
    /// in one follows `ASK` (and `MOVED`) correctly; this costs a wait, paid only by calls to a
    /// slot that moves.
    async fn eval(
        &self,
        lua: &'static Lua,
        call: &Packed,
        reload: &Arc<Reload>,
    ) -> Result<Value, Error> {
        let client = self.one();
        match self
            .eval_on(&client, Route::Direct, lua, call, reload)
            .await
        {
            Err(err) if redirected(&err) => {
                self.eval_on(&client, Route::Transaction, lua, call, reload)
                    .await
            }
            other => other,
        }
    }

    async fn eval_on(
        &self,
        client: &Client,
        route: Route,
        lua: &'static Lua,
        call: &Packed,
        reload: &Arc<Reload>,
    ) -> Result<Value, Error> {
        match send(client, route, lua.sha(), true, call).await {
            Err(err) if err.details().starts_with("NOSCRIPT") => {
                // The server lost its scripts (restart, failover, SCRIPT FLUSH): this call
                // sends its text, and the others are loaded again in the background.
                let loader = self.clone();
                reload.start(move || {
                    let loader = loader.clone();
                    async move {
                        if let Err(err) = loader.load_scripts().await {
                            tracing::debug!(%err, "reloading the scripts failed");
                        }
                    }
                });
                send(client, route, lua.text, false, call).await
            }
            other => other,
        }
    }
}

/// How many redirections a call sent in a transaction follows (a slot that moves: `ASK` to the
/// importing node, `MOVED` once it is handed over).
const TRANSACTION_REDIRECTIONS: u32 = 5;

/// How a script call is sent: on its own, or in a `MULTI`/`EXEC` transaction.
#[derive(Clone, Copy, Debug)]
enum Route {
    Direct,
    Transaction,
}

/// Whether a call was answered with a cluster redirection (which [`Route::Direct`] does not
/// follow).
fn redirected(err: &Error) -> bool {
    err.is_moved() || err.is_ask() || err.details().contains("Too many redirections")
}

/// Sends `EVALSHA script` (`by_sha`) or `EVAL script` with the call's keys and arguments.
///
/// The future is boxed here, with fred's command future inside: fred's are several kilobytes,
/// and every future around them (the store's call, the breaker's, the layer's) would otherwise
/// hold one inline, some twice, and be copied whole as each is made and moved (tens of kilobytes
/// copied per call, a third of the store's CPU time before they were boxed). One box per send,
/// and the futures around it stay a few hundred bytes.
fn send<'a>(
    client: &'a Client,
    route: Route,
    script: &'a str,
    by_sha: bool,
    call: &Packed,
) -> Pin<Box<dyn Future<Output = Result<Value, Error>> + Send + 'a>> {
    let (keys, args) = call.parts();
    match route {
        Route::Direct if call.fail_fast => {
            let options = Options {
                fail_fast: true,
                ..Options::default()
            };
            let client = client.with_options(&options);
            Box::pin(async move {
                if by_sha {
                    client.evalsha(script, keys, args).await
                } else {
                    client.eval(script, keys, args).await
                }
            })
        }
        Route::Direct => Box::pin(async move {
            if by_sha {
                client.evalsha(script, keys, args).await
            } else {
                client.eval(script, keys, args).await
            }
        }),
        Route::Transaction => {
            let fail_fast = call.fail_fast;
            Box::pin(async move {
                // A transaction has no `EVALSHA` of its own: the command as sent, hashed by its
                // first key (every key of a call has the same hash tag).
                let slot = keys.first().map_or(0, |k| redis_keyslot(k.as_bytes()));
                let name = if by_sha { "EVALSHA" } else { "EVAL" };
                let command = CustomCommand::new_static(name, ClusterHash::Custom(slot), false);
                let mut values = Vec::with_capacity(2 + keys.len() + args.len());
                values.push(Value::from(script));
                values.push(Value::from(keys.len() as i64));
                values.extend(keys.into_iter().map(|k| Value::Bytes(k.into_bytes())));
                values.extend(args);
                let trx = client.multi();
                let options = Options {
                    max_redirections: Some(TRANSACTION_REDIRECTIONS),
                    fail_fast,
                    ..Options::default()
                };
                Box::pin(
                    trx.with_options(&options)
                        .custom::<Value, _>(command, values),
                )
                .await?;
                match Box::pin(trx.exec::<Value>(true)).await? {
                    Value::Array(mut replies) if replies.len() == 1 => Ok(replies.remove(0)),
                    other => Ok(other),
                }
            })
        }
    }
}

/// The strings of a reply (a string, an array or map of them), in order.
fn strings(value: Value) -> Vec<String> {
    match value {
        Value::Bytes(b) => vec![String::from_utf8_lossy(&b).into_owned()],
        Value::String(s) => vec![s.to_string()],
        Value::Array(items) => items.into_iter().flat_map(strings).collect(),
        Value::Map(map) => map
            .inner()
            .into_iter()
            .flat_map(|(k, v)| strings(Value::from(k)).into_iter().chain(strings(v)))
            .collect(),
        _ => Vec::new(),
    }
}

/// The store error of a failed call: an error the server answered does not count towards
/// opening the circuit breaker.
fn store_error(err: Error) -> StoreError {
    if answered(&err) {
        ServerAnswer::error(err)
    } else {
        StoreError::store(err)
    }
}

/// Whether an error is the server's own answer (so the client still makes progress), rather
/// than a connection that failed or a reply that did not come.
fn answered(err: &Error) -> bool {
    use fred::error::ErrorKind;
    !matches!(
        err.kind(),
        ErrorKind::Timeout | ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Routing
    )
}

/// fred's TLS configuration trusting only the CA certificates in `pem` (rustls, `ring`).
#[cfg(feature = "tls")]
fn tls_config(pem: &[u8]) -> Result<fred::types::config::TlsConfig, StoreError> {
    let provider = Arc::new(super::ring_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(StoreError::store)?
        .with_root_certificates(super::ca_roots(pem)?)
        .with_no_client_auth();
    Ok(fred::types::config::TlsConnector::from(config).into())
}

/// A failure to connect, the server refusing the crate's commands at connect, or (`tls`: a
/// `rediss://` URL) a failed TLS handshake.
fn connect_error(tls: bool, err: Error) -> StoreError {
    let message = err.to_string();
    if is_refusal(&message) {
        StoreError::Refused(message)
    } else if tls && is_tls_failure(&message) {
        StoreError::Tls(message)
    } else {
        StoreError::store(err)
    }
}

fn reply(value: Value) -> Result<Reply, StoreError> {
    Ok(match value {
        Value::Null => Reply::Nil,
        Value::Integer(i) => Reply::Int(i),
        Value::Bytes(b) => Reply::Bytes(b.to_vec()),
        Value::String(s) => Reply::Bytes(s.as_bytes().to_vec()),
        Value::Array(items) => {
            Reply::Array(items.into_iter().map(reply).collect::<Result<_, _>>()?)
        }
        other => return Err(StoreError::Reply(format!("unexpected value {other:?}"))),
    })
}

impl Runner for FredStore {
    fn call(
        &self,
        call: ScriptCall,
    ) -> impl std::future::Future<Output = Result<Reply, StoreError>> + Send + 'static {
        let (client, progress) = self.client.client();
        let limit = self.client_timeout;
        let lua = call.lua;
        let abandon = call.abandons();
        let not_now = call.answered();
        // Keys and arguments are slices of one shared buffer: no copies.
        let packed = Packed::new(call);
        let reload = self.reload.clone();
        detached(abandon, async move {
            let mut again = TryAgain::new(limit, not_now);
            loop {
                // A few hundred bytes: fred's own future is boxed in `send`.
                let result = client.eval(lua, &packed, &reload).await;
                if result.as_ref().map_or_else(answered, |_| true) {
                    progress.answered();
                }
                match result {
                    Err(err) if TryAgain::asked(err.details()) && again.wait().await => {}
                    other => return reply(other.map_err(store_error)?),
                }
            }
        })
    }

    fn prefix(&self) -> &str {
        self.prefix.as_str()
    }

    fn breaker_state(&self) -> &Breaker {
        &self.breaker
    }

    fn not_now(&self) -> &Arc<NotNow> {
        &self.not_now
    }
}
