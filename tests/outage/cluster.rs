//! A master of a 3+3 cluster killed under load (see the [parent](super) for the figures).

use super::*;

/// A master of a 3+3 cluster killed under load: its replica is promoted; the limits hold
/// meanwhile, and are exact again soon after.
async fn cluster_failover(client: Client) {
    let mut cluster = tokio::task::block_in_place(|| RedisCluster::start_with_replicas(1));
    let url = cluster.url();
    let (a, b) = (connect(client, &url).await, connect(client, &url).await);
    let (sa, sb) = (rate_limiter(a.clone()), rate_limiter(b.clone()));
    assert!(exact(&sa, &sb, "warm").await, "exact before the failover");
    let victim = cluster.masters()[0];
    let successor = cluster
        .replica_of(victim)
        .expect("the master has a replica");

    let start = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = [(&sa, &a), (&sa, &a), (&sb, &b), (&sb, &b)]
        .into_iter()
        .map(|(svc, store)| spawn_load(svc.clone(), store.clone(), start, stop.clone()))
        .collect();
    tokio::task::block_in_place(|| {
        let node = cluster.nodes.iter_mut().find(|n| n.port == victim).unwrap();
        node.stop();
    });
    let promoted = wait_for_promotion(&cluster, victim, successor, start);
    let recovered = until_exact(&sa, &sb, start, &format!("{client:?}-failover")).await;
    after_failover(client, stop, tasks, promoted, recovered).await;
}

/// The moment `successor` takes over from `victim` (its role), after waiting until the cluster
/// agrees.
fn wait_for_promotion(
    cluster: &RedisCluster,
    victim: u16,
    successor: u16,
    start: Instant,
) -> Duration {
    let promoted = tokio::task::block_in_place(|| loop {
        let node = cluster.nodes.iter().find(|n| n.port == successor).unwrap();
        if node.cli(&["ROLE"]).is_some_and(|r| r.starts_with("master")) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no replica was promoted"
        );
        std::thread::sleep(Duration::from_millis(5));
    });
    tokio::task::block_in_place(|| loop {
        let masters = cluster.masters();
        if masters.len() == 3 && !masters.contains(&victim) && cluster.is_ok() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no replica was promoted: {masters:?}, victim {victim}\n{}",
            cluster
                .nodes
                .iter()
                .find_map(|n| n.cli(&["CLUSTER", "NODES"]))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    });
    promoted
}

/// Load on 30 keys (about a third on the killed master's slots) until `stop`.
fn spawn_load(
    svc: Svc,
    store: AnyStore,
    start: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    let until = start + Duration::from_secs(30);
    tokio::spawn(async move {
        let key = |i: usize| keyed(&format!("load-{}", i % 30));
        let mut samples = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
            let round = Instant::now() + Duration::from_millis(50);
            samples.extend(load(svc.clone(), store.clone(), start, round, key).await);
        }
        samples
    })
}

/// Tail of [`cluster_failover`]: stops the load and checks what it saw.
async fn after_failover(
    client: Client,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
    promoted: Duration,
    recovered: Duration,
) {
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    // Per key, what was admitted before the promotion (from Redis or the local fallback).
    let mut admitted: HashMap<usize, u64> = HashMap::new();
    let mut during = Vec::new();
    let mut count = 0;
    for s in samples.iter().filter(|s| s.done <= promoted) {
        count += 1;
        during.push(s.latency);
        if s.status == StatusCode::OK {
            *admitted.entry(s.index % 30).or_default() += 1;
        }
    }
    let most = admitted.values().copied().max().unwrap_or(0);
    let total: u64 = admitted.values().sum();
    let (p50, p99) = (percentile(&mut during, 0.5), percentile(&mut during, 0.99));
    println!(
        "OUTAGE | rate limit | master killed (3+3 cluster) | {client:?} | {count} requests until promotion ({:.0}/s), {total} admitted on 30 keys, at most {most} on one (bound {} per key, {} in all) | p50 {} | p99 {} | promoted after {} | exact again after {}",
        count as f64 / promoted.as_secs_f64(),
        LIMIT,
        LIMIT * 30,
        ms(p50),
        ms(p99),
        ms(promoted),
        ms(recovered),
    );
    if before() {
        return;
    }
    assert!(
        most <= LIMIT,
        "{most} admitted on one key before the promotion"
    );
    assert!(
        recovered < promoted + Duration::from_secs(5),
        "exact again {recovered:?} after the kill, promoted after {promoted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_killed_redis() {
    cluster_failover(Client::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_killed_fred() {
    cluster_failover(Client::Fred).await;
}
