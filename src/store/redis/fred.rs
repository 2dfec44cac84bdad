//! The `fred` store: fred, standalone or cluster.

use std::{fmt, time::Duration};

use bytes::Bytes;

use fred::{
    prelude::{Builder, Client, ClientLike, Config, Error, LuaInterface, Pool, ReconnectPolicy},
    types::{Key, Value},
};

use super::{
    cluster_nodes,
    script::{Lua, Reply, ScriptCall},
    sealed::Runner,
    KeyPrefix,
};
use crate::store::StoreError;

/// A store on Redis through [fred](https://docs.rs/fred): a [`Client`] or a [`Pool`] that the
/// application has already initialised, standalone or cluster as its configuration says.
///
/// Each operation is one `EVALSHA` of the same script text as the `redis` store (sent with `EVAL`
/// on `NOSCRIPT`, which also caches it on that node). Cloning is cheap.
#[derive(Clone)]
pub struct FredStore {
    client: FredClient,
    prefix: KeyPrefix,
}

#[derive(Clone)]
enum FredClient {
    Client(Client),
    Pool(Pool),
}

impl FredStore {
    /// Uses an initialised client (`client.init().await` already called).
    pub fn from_client(client: Client) -> Self {
        Self::with(FredClient::Client(client))
    }

    /// Uses an initialised pool.
    pub fn from_pool(pool: Pool) -> Self {
        Self::with(FredClient::Pool(pool))
    }

    /// Connects a new client from a URL: `redis://host:port` for one server,
    /// `redis-cluster://host:port?node=host:port` for a cluster (fred's URL syntax), and
    /// `redis+cluster://host:port,host:port` as the `redis` store accepts it.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let url = normalise_cluster_url(url);
        let config = Config::from_url(&url).map_err(StoreError::store)?;
        // Reconnect forever (100 ms doubling to 2 s) so that the store comes back by itself
        // after a Redis restart. Connecting is bounded here; each call is bounded by the
        // layers' own timeouts (no per-command client timeout: it costs throughput).
        let client = Builder::from_config(config)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
            })
            .build()
            .map_err(StoreError::store)?;
        client.init().await.map_err(StoreError::store)?;
        Ok(Self::from_client(client))
    }

    /// The prefix of every key this store writes (default `trl`), the same as
    /// [`RedisStore::prefix`](crate::store::RedisStore::prefix) so that both stores can share state.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = KeyPrefix::new(prefix);
        self
    }

    fn with(client: FredClient) -> Self {
        Self {
            client,
            prefix: KeyPrefix::default(),
        }
    }
}

/// `redis+cluster://a:1,b:2` becomes `redis-cluster://a:1?node=b:2`.
fn normalise_cluster_url(url: &str) -> String {
    let Some((base, mut nodes)) = cluster_nodes(url) else {
        return url.to_owned();
    };
    let first = nodes.next().unwrap_or_default();
    let extra: Vec<String> = nodes.map(|n| format!("node={n}")).collect();
    if extra.is_empty() {
        format!("{base}-cluster://{first}")
    } else {
        format!("{base}-cluster://{first}?{}", extra.join("&"))
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
    ranges: Vec<std::ops::Range<usize>>,
    keys: usize,
}

impl Packed {
    fn new(call: ScriptCall) -> Self {
        let keys = call.key_count();
        let (key_ranges, arg_ranges) = call.key_and_arg_ranges();
        let ranges = key_ranges.chain(arg_ranges).collect();
        Self {
            buf: Bytes::from(call.into_buffer()),
            ranges,
            keys,
        }
    }

    fn parts(&self) -> (Vec<Key>, Vec<Value>) {
        let (keys, args) = self.ranges.split_at(self.keys.min(self.ranges.len()));
        let slice = |r: &std::ops::Range<usize>| self.buf.slice(r.clone());
        (
            keys.iter().map(|r| Key::from(slice(r))).collect(),
            args.iter().map(|r| Value::Bytes(slice(r))).collect(),
        )
    }
}

impl FredClient {
    async fn eval(&self, lua: &'static Lua, call: Packed) -> Result<Value, Error> {
        let (keys, args) = call.parts();
        let first = match self {
            FredClient::Client(c) => c.evalsha(lua.sha(), keys, args).await,
            FredClient::Pool(p) => p.evalsha(lua.sha(), keys, args).await,
        };
        match first {
            Err(err) if err.details().starts_with("NOSCRIPT") => {
                let (keys, args) = call.parts();
                match self {
                    FredClient::Client(c) => c.eval(lua.text, keys, args).await,
                    FredClient::Pool(p) => p.eval(lua.text, keys, args).await,
                }
            }
            other => other,
        }
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
        let client = self.client.clone();
        let lua = call.lua;
        // Keys and arguments are slices of one shared buffer: no copies.
        let packed = Packed::new(call);
        async move {
            let value = client.eval(lua, packed).await.map_err(StoreError::store)?;
            reply(value)
        }
    }

    fn prefix(&self) -> &str {
        self.prefix.as_str()
    }
}
