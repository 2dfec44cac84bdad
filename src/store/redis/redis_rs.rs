//! The `redis` store: redis-rs, standalone or cluster.

use std::{fmt, sync::Arc, time::Duration};

use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo},
    Cmd, RedisResult, Value,
};

use super::{
    check_tls, cluster_nodes, config_value, is_refusal, is_tls_failure, is_tls_url,
    script::{detached, NotNow, Reload, Reply, ScriptCall, TryAgain},
    scripts,
    sealed::Runner,
    watchdog::Watchdog,
    ConnectOptions, KeyPrefix, NodeConfigs, ACL_PROBE, ACL_PROBE_KEY, CHECKED_CONFIG,
    CLIENT_TIMEOUT,
};
use crate::store::{breaker::ServerAnswer, Breaker, CircuitBreaker, StoreError};

/// A store on Redis through [redis-rs](https://docs.rs/redis): a standalone server through a
/// [`ConnectionManager`] (which reconnects on its own) or a cluster through a
/// [`ClusterConnection`].
///
/// Each operation is one `EVALSHA` of a script shared with the `fred` store (loaded again on
/// `NOSCRIPT`). Cloning is cheap: clones share the multiplexed connection.
///
/// ```no_run
/// # async fn run() -> Result<(), tower_redis_layers::StoreError> {
/// use tower_redis_layers::store::RedisStore;
/// let standalone = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let cluster = RedisStore::connect("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: Arc<Watchdog<Connection>>,
    client_timeout: Duration,
    prefix: KeyPrefix,
    reload: Arc<Reload>,
    breaker: Breaker,
    not_now: Arc<NotNow>,
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// How often the cluster client tries a command again (after `TRYAGAIN`, `CLUSTERDOWN`, a broken
/// connection), and the waits between tries: 10 ms doubling up to 200 ms, so that the tries fit
/// well inside [`CLIENT_TIMEOUT`] (redis-rs waits 1.28 s before its first retry by default, longer
/// than every layer's store timeout).
const CLUSTER_RETRIES: u32 = 6;
const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 10;
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 200;

impl RedisStore {
    /// Uses a connection manager that the application already has.
    pub fn from_manager(manager: ConnectionManager) -> Self {
        Self::with(Watchdog::new(Connection::Single(manager), None, None))
    }

    /// Uses a cluster connection that the application already has.
    pub fn from_cluster(cluster: ClusterConnection) -> Self {
        Self::with(Watchdog::new(Connection::Cluster(cluster), None, None))
    }

    /// Connects from a URL.
    ///
    /// `redis://host:port/db` (or `rediss://`) connects to one server;
    /// `redis+cluster://host:port,host:port` (or `rediss+cluster://`) to a cluster through any of
    /// the listed nodes.
    ///
    /// Every client timeout is set, none is left to redis-rs's defaults: connecting and each
    /// reply are bounded by 2 s (longer than every layer's default `store_timeout`, which
    /// decides first); a standalone connection is retried twice (100 ms, then up to 500 ms
    /// apart) when it breaks; the cluster client tries a command again up to 6 times, 10 ms
    /// doubling to 200 ms apart. Connecting loads every script of the crate (on every primary of
    /// a cluster), and fails if the server refuses it.
    ///
    /// A cluster client that stops answering (calls sent, nothing back for 300 ms) is replaced by
    /// a new one made from `url`, once a new one connects: redis-rs's cluster connection can
    /// deadlock its slot refresh while a slot migrates under concurrent calls, and then sends
    /// nothing.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_timeout(url, CLIENT_TIMEOUT).await
    }

    /// [`RedisStore::connect`] with `client_timeout` in place of 2 s: the bound on connecting,
    /// on each reply, and on the retries of a call answered `TRYAGAIN`.
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

    /// [`RedisStore::connect`] with [`ConnectOptions`]: the client timeout and, with the `tls`
    /// feature, the CA that signs the servers' certificates.
    ///
    /// `rediss://host:port` and `rediss+cluster://host:port,host:port` connect with TLS
    /// (rustls; the `tls` feature): every node of a cluster too, with the same trust. Without
    /// the feature a `rediss://` URL fails with [`StoreError::Invalid`]; a handshake that fails
    /// (an untrusted certificate) fails with [`StoreError::Tls`].
    ///
    /// ```no_run
    /// # #[cfg(feature = "tls")]
    /// # async fn run() -> Result<(), tower_redis_layers::StoreError> {
    /// use tower_redis_layers::store::{ConnectOptions, RedisStore};
    /// let ca = std::fs::read("/etc/redis/tls/ca.crt").expect("the CA certificate");
    /// let options = ConnectOptions::new().ca_certificate(ca);
    /// let store = RedisStore::connect_with("rediss://redis.internal:6380", options).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<Self, StoreError> {
        check_tls(url, &options)?;
        let (mut conn, server) = open(url, &options).await?;
        check_config(&mut conn, &server).await;
        // Only a cluster client is rebuilt: a standalone one reconnects on its own, and the
        // clients stop for good only on cluster redirections.
        let cluster = cluster_nodes(url).is_some();
        let client_timeout = options.client_timeout;
        let url: Arc<str> = Arc::from(url);
        let rebuild: super::watchdog::Rebuild<Connection> = Box::new(move || {
            let url = url.clone();
            let options = options.clone();
            Box::pin(async move { open(&url, &options).await.map(|(conn, _)| conn) })
        });
        let mut store = Self::with(Watchdog::new(conn, cluster.then_some(rebuild), None));
        store.client_timeout = client_timeout;
        Ok(store)
    }

    /// The prefix of every key this store writes (default `trl`). Keys look like
    /// `trl:{<hashed key>}:<rule>`.
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

    fn with(conn: Arc<Watchdog<Connection>>) -> Self {
        Self {
            conn,
            client_timeout: CLIENT_TIMEOUT,
            prefix: KeyPrefix::default(),
            reload: Arc::default(),
            breaker: Breaker::new(CircuitBreaker::default()),
            not_now: Arc::default(),
        }
    }
}

/// Connects a client from a URL and loads every script (see [`RedisStore::connect`]); also
/// returns the server's address for the warnings of a standalone server.
async fn open(url: &str, options: &ConnectOptions) -> Result<(Connection, String), StoreError> {
    let timeout = options.client_timeout;
    let tls = is_tls_url(url);
    let failed = |err| connect_error(tls, err);
    let mut server = String::new();
    let mut conn = if let Some(cluster) = cluster_nodes(url) {
        let auth = cluster.auth_prefix();
        let scheme = cluster.scheme;
        let nodes: Vec<String> = (cluster.nodes.iter())
            .map(|n| format!("{scheme}://{auth}{n}"))
            .collect();
        let builder = ClusterClient::builder(nodes);
        #[cfg(feature = "tls")]
        let builder = match certificates(options) {
            Some(certs) => builder.certs(certs),
            None => builder,
        };
        let client = builder
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .overall_response_timeout(Some(timeout))
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(CLUSTER_MIN_RETRY_WAIT_MS)
            .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
            .build()
            .map_err(StoreError::store)?;
        let conn = client.get_async_connection().await.map_err(failed)?;
        Connection::Cluster(conn)
    } else {
        #[cfg(feature = "tls")]
        let client = match certificates(options) {
            Some(certs) => redis::Client::build_with_tls(url, certs),
            None => redis::Client::open(url),
        };
        #[cfg(not(feature = "tls"))]
        let client = redis::Client::open(url);
        let client = client.map_err(StoreError::store)?;
        server = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(failed)?;
        Connection::Single(manager)
    };
    load_scripts(&mut conn).await.map_err(failed)?;
    let probe = ScriptCall::from_vecs(&ACL_PROBE, vec![ACL_PROBE_KEY.to_owned()], Vec::new());
    (conn
        .query(&script_cmd("EVALSHA", ACL_PROBE.sha(), &probe))
        .await)
        .map_err(failed)?;
    Ok((conn, server))
}

/// Reads, on every node, the settings [`warn_on_config`](super::warn_on_config) checks, and
/// warns about them. `CONFIG` may be disabled (managed services): then nothing is said.
/// `server` names a standalone server in the warnings.
async fn check_config(conn: &mut Connection, server: &str) {
    let mut configs = NodeConfigs::default();
    for (setting, name) in CHECKED_CONFIG.into_iter().enumerate() {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        let replies = match conn {
            Connection::Single(c) => match c.req_packed_command(&cmd).await {
                Ok(value) => vec![(server.to_owned(), value)],
                Err(_) => Vec::new(),
            },
            Connection::Cluster(c) => {
                let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None));
                match c.route_command(cmd, all).await {
                    Ok(Value::Map(nodes)) => nodes
                        .into_iter()
                        .map(|(node, value)| (strings(node).concat(), value))
                        .collect(),
                    _ => Vec::new(),
                }
            }
        };
        for (node, value) in replies {
            if let Some(value) = config_value(&strings(value), name) {
                configs.add(node, setting, value.to_owned());
            }
        }
    }
    configs.warn();
}

/// The strings of a reply (a bulk or simple string, an array or map of them), in order.
fn strings(value: Value) -> Vec<String> {
    match value {
        Value::BulkString(b) => vec![String::from_utf8_lossy(&b).into_owned()],
        Value::SimpleString(s) => vec![s],
        Value::Array(items) | Value::Set(items) => items.into_iter().flat_map(strings).collect(),
        Value::Map(pairs) => pairs
            .into_iter()
            .flat_map(|(k, v)| strings(k).into_iter().chain(strings(v)))
            .collect(),
        _ => Vec::new(),
    }
}

/// The CA certificate of `options` as redis-rs takes it (it replaces the system's roots).
#[cfg(feature = "tls")]
fn certificates(options: &ConnectOptions) -> Option<redis::TlsCertificates> {
    let pem = options.ca_certificate.as_ref()?;
    Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    })
}

/// A failure to connect, the server refusing the crate's commands at connect, or (`tls`: a
/// `rediss://` URL) a failed TLS handshake.
fn connect_error(tls: bool, err: redis::RedisError) -> StoreError {
    let message = err.to_string();
    if is_refusal(&message) {
        StoreError::Refused(message)
    } else if tls && is_tls_failure(&message) {
        StoreError::Tls(message)
    } else {
        StoreError::store(err)
    }
}

/// Loads every script of the crate (`SCRIPT LOAD`, which redis-rs sends to every primary of a
/// cluster).
async fn load_scripts(conn: &mut Connection) -> RedisResult<()> {
    for lua in scripts() {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(lua.text);
        conn.query(&cmd).await?;
    }
    Ok(())
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.conn.client().0 {
            Connection::Single(_) => "standalone",
            Connection::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("connection", &kind)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Connection {
    async fn query(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        let value = match self {
            Connection::Single(c) => c.req_packed_command(cmd).await?,
            Connection::Cluster(c) => c.req_packed_command(cmd).await?,
        };
        // A server error can arrive as a value; make it an error.
        value.extract_error()
    }
}

fn script_cmd(name: &str, body: &str, call: &ScriptCall) -> Cmd {
    let buf = call.buffer();
    let mut cmd = Cmd::with_capacity(
        3 + call.key_count() + call.arg_count(),
        name.len() + body.len() + buf.len() + 4,
    );
    cmd.arg(name).arg(body).arg(call.key_count());
    let (keys, args) = call.key_and_arg_ranges();
    for range in keys.chain(args) {
        cmd.arg(buf.get(range).unwrap_or_default());
    }
    cmd
}

fn reply(value: Value) -> Result<Reply, StoreError> {
    Ok(match value {
        Value::Nil => Reply::Nil,
        Value::Int(i) => Reply::Int(i),
        Value::BulkString(b) => Reply::Bytes(b),
        Value::SimpleString(s) => Reply::Bytes(s.into_bytes()),
        Value::Okay => Reply::Bytes(b"OK".to_vec()),
        Value::Array(items) | Value::Set(items) => {
            Reply::Array(items.into_iter().map(reply).collect::<Result<_, _>>()?)
        }
        other => return Err(StoreError::Reply(format!("unexpected value {other:?}"))),
    })
}

/// Whether a call failed without running and may be sent again: `TRYAGAIN`, or an `ASK` or
/// `MOVED` redirection that redis-rs handed back after using up its own tries.
fn retryable(err: &redis::RedisError) -> bool {
    matches!(err.code(), Some("TRYAGAIN" | "ASK" | "MOVED"))
}

/// The store error of a failed call: an error the server answered does not count towards
/// opening the circuit breaker.
fn store_error(err: redis::RedisError) -> StoreError {
    if answered(&err) {
        ServerAnswer::error(err)
    } else {
        StoreError::store(err)
    }
}

/// Whether an error is the server's own answer (so the client still makes progress), rather
/// than a connection that failed or a reply that did not come.
fn answered(err: &redis::RedisError) -> bool {
    !(err.is_timeout()
        || err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error())
}

/// One try of a call: `EVALSHA`, then `EVAL` on `NOSCRIPT`.
async fn eval(
    conn: &mut Connection,
    call: &ScriptCall,
    reload: &Arc<Reload>,
) -> RedisResult<Value> {
    let lua = call.lua;
    match conn.query(&script_cmd("EVALSHA", lua.sha(), call)).await {
        Err(err) if err.code() == Some("NOSCRIPT") => {
            // The server lost its scripts (restart, failover, SCRIPT FLUSH): this call sends
            // its text, and the others are loaded again in the background.
            let loader = conn.clone();
            reload.start(move || {
                let mut loader = loader.clone();
                async move {
                    if let Err(err) = load_scripts(&mut loader).await {
                        tracing::debug!(%err, "reloading the scripts failed");
                    }
                }
            });
            conn.query(&script_cmd("EVAL", lua.text, call)).await
        }
        other => other,
    }
}

impl Runner for RedisStore {
    fn call(
        &self,
        call: ScriptCall,
    ) -> impl std::future::Future<Output = Result<Reply, StoreError>> + Send + 'static {
        let (mut conn, progress) = self.conn.client();
        let reload = self.reload.clone();
        let limit = self.client_timeout;
        let not_now = call.answered();
        detached(call.abandons(), async move {
            let mut again = TryAgain::new(limit, not_now);
            loop {
                let result = eval(&mut conn, &call, &reload).await;
                if result.as_ref().map_or_else(answered, |_| true) {
                    progress.answered();
                }
                match result {
                    Err(err) if retryable(&err) && again.wait().await => {}
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
