//! The `redis` store: redis-rs, standalone or cluster.

use std::{fmt, time::Duration};

use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    Cmd, RedisResult, Value,
};

use super::{
    cluster_nodes,
    script::{Reply, ScriptCall},
    sealed::Runner,
    KeyPrefix,
};
use crate::store::StoreError;

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
    conn: Connection,
    prefix: KeyPrefix,
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// How long connecting and each command may take inside redis-rs; the layers put their own,
/// usually shorter, timeout around every call.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisStore {
    /// Uses a connection manager that the application already has.
    pub fn from_manager(manager: ConnectionManager) -> Self {
        Self::with(Connection::Single(manager))
    }

    /// Uses a cluster connection that the application already has.
    pub fn from_cluster(cluster: ClusterConnection) -> Self {
        Self::with(Connection::Cluster(cluster))
    }

    /// Connects from a URL.
    ///
    /// `redis://host:port/db` (or `rediss://`) connects to one server;
    /// `redis+cluster://host:port,host:port` (or `rediss+cluster://`) to a cluster through any of
    /// the listed nodes.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if let Some((scheme, nodes)) = cluster_nodes(url) {
            let nodes: Vec<String> = nodes.map(|n| format!("{scheme}://{n}")).collect();
            let client = ClusterClient::builder(nodes)
                .connection_timeout(CLIENT_TIMEOUT)
                .response_timeout(CLIENT_TIMEOUT)
                .build()
                .map_err(StoreError::store)?;
            let conn = client
                .get_async_connection()
                .await
                .map_err(StoreError::store)?;
            Ok(Self::from_cluster(conn))
        } else {
            let client = redis::Client::open(url).map_err(StoreError::store)?;
            // No response timeout here: the layers bound every call themselves, and a
            // client-side response timeout costs throughput (measured in BENCHMARKS.md).
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CLIENT_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let mut manager = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(StoreError::store)?;
            warn_on_eviction(&mut manager).await;
            Ok(Self::from_manager(manager))
        }
    }

    /// The prefix of every key this store writes (default `trl`). Keys look like
    /// `trl:{<hashed key>}:<rule>`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = KeyPrefix::new(prefix);
        self
    }

    fn with(conn: Connection) -> Self {
        Self {
            conn,
            prefix: KeyPrefix::default(),
        }
    }
}

/// Warns when the server may evict this crate's keys (limits and idempotency records).
async fn warn_on_eviction(conn: &mut ConnectionManager) {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg("maxmemory-policy");
    // CONFIG may be disabled (managed services): then nothing is said.
    let Ok(value) = conn.req_packed_command(&cmd).await else {
        return;
    };
    let items: Vec<Value> = match value {
        Value::Array(items) | Value::Set(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return,
    };
    {
        let policy = items.iter().rev().find_map(|v| match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        });
        if let Some(policy) = policy.filter(|p| p.starts_with("allkeys-")) {
            tracing::warn!(
                %policy,
                "Redis may evict rate-limit state and idempotency records under memory pressure; \
                 use maxmemory-policy noeviction or a volatile-* policy"
            );
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.conn {
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

impl Runner for RedisStore {
    fn call(
        &self,
        call: ScriptCall,
    ) -> impl std::future::Future<Output = Result<Reply, StoreError>> + Send + 'static {
        let mut conn = self.conn.clone();
        async move {
            let lua = call.lua;
            let evalsha = script_cmd("EVALSHA", lua.sha(), &call);
            let value = match conn.query(&evalsha).await {
                Err(err) if err.code() == Some("NOSCRIPT") => {
                    conn.query(&script_cmd("EVAL", lua.text, &call)).await
                }
                other => other,
            }
            .map_err(StoreError::store)?;
            reply(value)
        }
    }

    fn prefix(&self) -> &str {
        self.prefix.as_str()
    }
}
