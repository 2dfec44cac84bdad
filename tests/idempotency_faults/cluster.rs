//! The fault cases on a 3-master cluster (tests/common `RedisCluster`), both replicas connected
//! to it. The fault proxy does not fit a cluster (the nodes announce their own addresses, and
//! redirections bypass a proxy), so the connection is cut with `CLIENT KILL TYPE normal` on
//! every node, and the master that holds the record is killed (`kill -9`) and restarted with its
//! append-only file. (The claim's reply cannot be cut without a proxy; that case, and a stalled
//! server, are covered standalone: the cluster client's code path for a broken connection is the
//! one `CLIENT KILL` exercises.)

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{
    clients, exactly_once, replicas, trigger, Case, Client, Dropped, Handler, Reachable, Trigger,
    LEASE,
};
use crate::common::RedisCluster;

/// Cuts every client connection of every node, then marks Redis reachable.
fn client_kill(cluster: &Arc<Mutex<RedisCluster>>, reachable: &Reachable) -> Trigger {
    let (cluster, reachable) = (cluster.clone(), reachable.clone());
    Arc::new(move || {
        let (cluster, reachable) = (cluster.clone(), reachable.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                for node in &cluster.lock().unwrap().nodes {
                    node.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
                }
                reachable.now();
            })
            .await
            .unwrap();
        })
    })
}

async fn run(
    client: Client,
    what: &str,
    cluster: Arc<Mutex<RedisCluster>>,
    handler: Handler,
    reachable: Reachable,
) {
    let url = cluster.lock().unwrap().url();
    let (first, second) = replicas(client, &url, &handler).await;
    exactly_once(Case {
        name: format!("{} cluster {what}", client.name()),
        first,
        second,
        handler,
        reachable,
        dropped: Dropped::No,
        max_blocked: LEASE,
    })
    .await;
}

/// `CLIENT KILL` on every node while the handler runs (300 ms).
async fn cluster_client_kill_during_the_handler(client: Client) {
    let cluster = Arc::new(Mutex::new(RedisCluster::start()));
    let reachable = Reachable::default();
    let handler =
        Handler::new(Duration::from_millis(300)).at_start(client_kill(&cluster, &reachable));
    run(
        client,
        "CLIENT KILL during the handler",
        cluster,
        handler,
        reachable,
    )
    .await;
}

/// `CLIENT KILL` on every node when the handler ends, just before the completion is sent.
async fn cluster_client_kill_at_the_completion(client: Client) {
    let cluster = Arc::new(Mutex::new(RedisCluster::start()));
    let reachable = Reachable::default();
    let handler = Handler::new(Duration::from_millis(50)).at_end(client_kill(&cluster, &reachable));
    run(
        client,
        "CLIENT KILL at the completion",
        cluster,
        handler,
        reachable,
    )
    .await;
}

/// The master that holds the record is killed (`kill -9`) while the handler runs (300 ms) and
/// restarted on its port with its append-only file (`appendfsync everysec`) and its
/// `nodes.conf`: it comes back with the claim and its slots.
async fn cluster_master_restarted_with_aof_mid_request(client: Client) {
    let cluster = Arc::new(Mutex::new(RedisCluster::start_with_aof("everysec")));
    let reachable = Reachable::default();
    let restart = {
        let (cluster, reachable) = (cluster.clone(), reachable.clone());
        trigger(move || {
            let (cluster, reachable) = (cluster.clone(), reachable.clone());
            tokio::task::spawn_blocking(move || {
                let mut cluster = cluster.lock().unwrap();
                let holder = cluster
                    .nodes
                    .iter()
                    .position(|n| n.cli(&["DBSIZE"]).is_some_and(|s| s.trim() != "0"))
                    .expect("a node holds the record");
                cluster.nodes[holder].restart();
                reachable.now();
                cluster.wait_ok(Duration::from_secs(10));
            });
        })
    };
    let handler = Handler::new(Duration::from_millis(300)).at_start(restart);
    run(
        client,
        "master kill -9 and AOF restart mid-request",
        cluster,
        handler,
        reachable,
    )
    .await;
}

clients!(
    cluster_client_kill_during_the_handler,
    cluster_client_kill_at_the_completion,
    cluster_master_restarted_with_aof_mid_request,
);
