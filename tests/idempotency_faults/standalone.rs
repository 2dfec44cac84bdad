//! The fault cases on one redis-server: on the connection of the first replica (through the
//! fault proxy), or on the server itself (both replicas connected to it directly).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::{
    clients, exactly_once, replicas, send, trigger, Case, Client, Dropped, Handler, Reachable,
    Trigger, LEASE,
};
use tower_redis_layers::{
    store::{ClaimRequest, IdempotencyStore},
    StoreKey,
};

use crate::common::{fault_proxy::FaultProxy, RedisServer};

// ---- Standalone: a fault on the proxy in front of the first replica. ----

/// What the proxy does to the first replica's connection.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The connection is cut while the handler runs (300 ms of work): nothing is in flight, the
    /// completion goes to a client that has to reconnect.
    ResetInHandler,
    /// The connection is cut when the completion is sent; the completion is lost.
    ResetAtCompletion,
    /// From the handler's start, every command cuts the connection for 1.5 s (Redis
    /// unreachable): the client library's own re-sends fail too, and the layer stops waiting
    /// after its store timeout.
    DownAtCompletion,
    /// The server's replies are swallowed for 1.5 s (the completion runs, its reply is lost),
    /// then the connection is cut.
    SwallowCompletionReply,
    /// The claim runs on the server and the connection is cut before its reply arrives.
    ClaimReplyCut,
}

async fn proxy_case(client: Client, fault: Fault) {
    let server = RedisServer::start();
    let proxy = Arc::new(FaultProxy::start(server.port).await);
    let proxied = client.connect(&proxy.url()).await;
    let direct = client.connect(&server.url()).await;
    let reachable = Reachable::default();
    let work = match fault {
        Fault::ResetInHandler => Duration::from_millis(300),
        _ => Duration::from_millis(50),
    };
    let mut handler = Handler::new(work);
    let set_off = {
        let (proxy, reachable) = (proxy.clone(), reachable.clone());
        trigger(move || set_off(fault, &proxy, &reachable))
    };
    if let Fault::ClaimReplyCut = fault {
        proxy.cut_next_reply();
        reachable.now();
    } else {
        handler = handler.at_start(set_off);
    }
    exactly_once(Case {
        name: format!("{} {fault:?}", client.name()),
        first: handler.replica(proxied),
        second: handler.plain().replica(direct),
        handler,
        reachable,
        dropped: Dropped::No,
        // A claim whose reply was lost is released (or re-sent and held): the key must not stay
        // blocked for a whole lease.
        max_blocked: match fault {
            Fault::ClaimReplyCut => LEASE / 2,
            _ => LEASE,
        },
    })
    .await;
    assert!(proxy.resets() >= 1, "the fault did not fire");
}

fn set_off(fault: Fault, proxy: &Arc<FaultProxy>, reachable: &Reachable) {
    let down = Duration::from_millis(1500);
    match fault {
        Fault::ResetInHandler => {
            proxy.reset();
            reachable.now();
        }
        Fault::ResetAtCompletion => {
            proxy.reset_on_next_command();
            reachable.now();
        }
        Fault::DownAtCompletion => {
            proxy.down_for(down);
            reachable.at(Instant::now() + down);
        }
        Fault::SwallowCompletionReply => {
            proxy.swallow_replies(true);
            let (proxy, reachable) = (proxy.clone(), reachable.clone());
            tokio::spawn(async move {
                tokio::time::sleep(down).await;
                proxy.swallow_replies(false);
                proxy.reset();
                reachable.now();
            });
        }
        Fault::ClaimReplyCut => unreachable!("set off before the request"),
    }
}

async fn connection_reset_during_the_handler(client: Client) {
    proxy_case(client, Fault::ResetInHandler).await;
}

async fn connection_reset_during_the_completion(client: Client) {
    proxy_case(client, Fault::ResetAtCompletion).await;
}

async fn redis_unreachable_across_the_completion(client: Client) {
    proxy_case(client, Fault::DownAtCompletion).await;
}

async fn completion_reply_swallowed(client: Client) {
    proxy_case(client, Fault::SwallowCompletionReply).await;
}

async fn connection_reset_during_the_claims_reply(client: Client) {
    proxy_case(client, Fault::ClaimReplyCut).await;
}

// ---- Standalone: a fault on the server, both replicas connected to it directly. ----

/// Redis stopped (SIGSTOP) for 2 s from the moment the handler begins; the completion script
/// was never loaded on this fresh server, so the first completion call after SIGCONT may meet
/// `NOSCRIPT`.
async fn redis_stopped_across_the_completion(client: Client) {
    let server = Arc::new(RedisServer::start());
    let reachable = Reachable::default();
    let stop = {
        let (server, reachable) = (server.clone(), reachable.clone());
        trigger(move || {
            server.pause();
            let (server, reachable) = (server.clone(), reachable.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                server.resume();
                reachable.now();
            });
        })
    };
    let handler = Handler::new(Duration::from_millis(50)).at_start(stop);
    let (first, second) = replicas(client, &server.url(), &handler).await;
    exactly_once(Case {
        name: format!("{} SIGSTOP across the completion", client.name()),
        first,
        second,
        handler,
        reachable,
        dropped: Dropped::No,
        max_blocked: LEASE,
    })
    .await;
}

/// `kill -9` of redis-server while the handler runs (300 ms), and a restart on the same port
/// with its append-only file (`appendfsync everysec`): the claim, acknowledged before the kill,
/// is in the file (Redis writes it before replying; `everysec` only delays the fsync, which a
/// process crash does not need), so the restarted server still holds it, the completion lands
/// once the client is back, and a retry gets the replay. Scripts are not loaded on the new
/// server (`NOSCRIPT` falls back to the full script).
async fn redis_restarted_with_aof_mid_request(client: Client) {
    let server = Arc::new(Mutex::new(RedisServer::start_with_aof("everysec")));
    let url = server.lock().unwrap().url();
    let reachable = Reachable::default();
    let handler = Handler::new(Duration::from_millis(300)).at_start(restart(&server, &reachable));
    let (first, second) = replicas(client, &url, &handler).await;
    exactly_once(Case {
        name: format!("{} kill -9 and AOF restart mid-request", client.name()),
        first,
        second,
        handler,
        reachable,
        dropped: Dropped::No,
        max_blocked: LEASE,
    })
    .await;
}

/// `kill -9` and a restart on the same port, then marks Redis reachable.
fn restart(server: &Arc<Mutex<RedisServer>>, reachable: &Reachable) -> Trigger {
    let (server, reachable) = (server.clone(), reachable.clone());
    trigger(move || {
        let (server, reachable) = (server.clone(), reachable.clone());
        tokio::task::spawn_blocking(move || {
            server.lock().unwrap().restart();
            reachable.now();
        });
    })
}

/// What the README says of a server without an append-only file, checked: a restart loses the
/// records. A request completed before the restart, and one in flight across it (its completion
/// finds the claim gone), both run again when retried.
async fn redis_restarted_without_aof_loses_the_records(client: Client) {
    let server = Arc::new(Mutex::new(RedisServer::start()));
    let url = server.lock().unwrap().url();
    let reachable = Reachable::default();
    let handler = Handler::new(Duration::from_millis(300));
    let (first, second) = replicas(client, &url, &handler).await;
    let done = format!("done-{:x}", super::rand_id());
    assert_eq!(send(&first, &done).await.body, "run=1");
    assert!(send(&second, &done).await.replayed());
    let in_flight = format!("in-flight-{:x}", super::rand_id());
    let handler = handler.plain().at_start(restart(&server, &reachable));
    let first = handler.replica(client.connect(&url).await);
    assert_eq!(send(&first, &in_flight).await.body, "run=2");
    for (key, run) in [(&in_flight, "run=3"), (&done, "run=4")] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let answer = loop {
            let answer = send(&second, key).await;
            if answer.status == 201 || Instant::now() > deadline {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!((answer.replayed(), answer.body.as_str()), (false, run));
    }
    println!(
        "fault table | {} kill -9 and restart WITHOUT AOF | handler runs {} for 2 requests",
        client.name(),
        handler.runs()
    );
}

/// The client drops the request once its side-effecting handler (300 ms) has begun: the
/// handler runs to its end, its response is recorded, and the retry gets the replay.
async fn client_drops_the_request_mid_handler(client: Client) {
    let server = RedisServer::start();
    let handler = Handler::new(Duration::from_millis(300));
    let (first, second) = replicas(client, &server.url(), &handler).await;
    let reachable = Reachable::default();
    reachable.now();
    exactly_once(Case {
        name: format!("{} request dropped mid-handler", client.name()),
        first,
        second,
        handler,
        reachable,
        dropped: Dropped::InHandler,
        max_blocked: LEASE,
    })
    .await;
}

/// The client drops the request while its claim is held up on the way (a stalled connection):
/// the claim lands after the drop, and is released at once, so the key is not blocked for a
/// lease and the retry runs the handler (once).
async fn client_drops_the_request_during_its_claim(client: Client) {
    let server = RedisServer::start();
    let proxy = Arc::new(FaultProxy::start(server.port).await);
    let handler = Handler::new(Duration::from_millis(50));
    let proxied = client.connect(&proxy.url()).await;
    // The claim script is loaded first, so that the claim held up is one `EVALSHA` that runs
    // when the proxy lets it go (a `NOSCRIPT` would need the dropped caller to send `EVAL`).
    let (warm, lease) = (StoreKey::from_parts([b"warm".as_slice()]), LEASE);
    let claim = ClaimRequest::new("warm", b"", lease, lease);
    proxied.claim(&warm, claim).await.unwrap();
    let first = handler.replica(proxied);
    let second = handler.plain().replica(client.connect(&server.url()).await);
    exactly_once(Case {
        name: format!("{} request dropped during its claim", client.name()),
        first,
        second,
        handler,
        reachable: Reachable::default(),
        dropped: Dropped::InClaim(proxy),
        max_blocked: LEASE / 2,
    })
    .await;
}

clients!(
    connection_reset_during_the_handler,
    connection_reset_during_the_completion,
    redis_unreachable_across_the_completion,
    completion_reply_swallowed,
    connection_reset_during_the_claims_reply,
    redis_stopped_across_the_completion,
    redis_restarted_with_aof_mid_request,
    client_drops_the_request_mid_handler,
    client_drops_the_request_during_its_claim,
    redis_restarted_without_aof_loses_the_records,
);
