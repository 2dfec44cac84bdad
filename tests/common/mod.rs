//! Test harness: real `redis-server` processes on free loopback ports, started and stopped by
//! the tests themselves.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod stores;

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// One `redis-server` on a free port, without persistence. Killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

fn free_port(need_bus: bool) -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        if !need_bus {
            return port;
        }
        // A cluster node also listens on port + 10000.
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "trl-{tag}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn rand_suffix() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    RandomState::new().build_hasher().finish()
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(false, &[])
    }

    /// A server with an append-only file (`appendonly yes`, `appendfsync <fsync>`): unlike the
    /// others, a [`restart`](Self::restart) brings it back with its data.
    pub fn start_with_aof(fsync: &str) -> Self {
        Self::start_with(false, &["--appendonly", "yes", "--appendfsync", fsync])
    }

    fn start_with(cluster: bool, extra: &[&str]) -> Self {
        let port = free_port(cluster);
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if cluster {
            extra.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ]
                .map(String::from),
            );
        }
        let mut server = Self {
            port,
            child: None,
            dir: temp_dir("redis"),
            extra,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (run .ci/run or apt-get install redis-server)");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .cli(&["PING"])
                .map(|s| s.trim() == "PONG")
                .unwrap_or(false)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// Runs `redis-cli` against this server.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server process (SIGSTOP): it keeps its connections and answers nothing until
    /// [`resume`](Self::resume), like a server stalled by the OS or a long fork.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Continues a [paused](Self::pause) server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success(), "kill {signal} failed");
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The value of `cmdstat_<cmd>` calls from `INFO commandstats`.
    pub fn command_calls(&self, cmd: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]).unwrap_or_default();
        let prefix = format!("cmdstat_{cmd}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A 3-master Redis Cluster on free ports. Killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        Self::start_with_replicas(0)
    }

    /// 3 masters with `replicas` replicas each (`--cluster-replicas`): `nodes[..3]` are the
    /// masters as created (a failover may change that; see [`RedisCluster::masters`]).
    pub fn start_with_replicas(replicas: usize) -> Self {
        let count = 3 * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| RedisServer::start_with(true, &[]))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"])
                    .map(|s| s.contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        // A replica that has not synced with its master cannot take over from it.
        loop {
            let synced = nodes
                .iter()
                .filter_map(|n| n.cli(&["INFO", "replication"]))
                .filter(|info| info.contains("role:slave"))
                .filter(|info| info.contains("master_link_status:up"))
                .count();
            if synced == 3 * replicas {
                break;
            }
            assert!(Instant::now() < deadline, "the replicas did not sync");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { nodes }
    }

    /// The ports of the nodes that are masters now (as the live nodes see it).
    pub fn masters(&self) -> Vec<u16> {
        let view = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .find_map(|n| n.cli(&["CLUSTER", "NODES"]))
            .unwrap_or_default();
        view.lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|addr| addr.split(['@', ':']).nth(1)?.parse().ok())
            .collect()
    }

    /// The port of a replica of the master on `port`.
    pub fn replica_of(&self, port: u16) -> Option<u16> {
        let view = self
            .nodes
            .iter()
            .find_map(|n| n.cli(&["CLUSTER", "NODES"]))?;
        let addr = format!("127.0.0.1:{port}@");
        let id = view
            .lines()
            .find(|l| l.contains(&addr))?
            .split_whitespace()
            .next()?
            .to_owned();
        view.lines()
            .find(|l| l.contains("slave") && l.split_whitespace().nth(3) == Some(id.as_str()))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|addr| addr.split(['@', ':']).nth(1)?.parse().ok())
    }

    /// Whether every live node reports `cluster_state:ok`.
    pub fn is_ok(&self) -> bool {
        self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
            n.cli(&["CLUSTER", "INFO"])
                .map(|s| s.contains("cluster_state:ok"))
                .unwrap_or(false)
        })
    }

    /// A cluster whose nodes keep an append-only file (`appendonly yes`, `appendfsync <fsync>`),
    /// turned on once the cluster is up: a node [restarted](RedisServer::restart) keeps its data
    /// and its slots.
    pub fn start_with_aof(fsync: &str) -> Self {
        let mut cluster = Self::start();
        for node in &mut cluster.nodes {
            node.cli(&["CONFIG", "SET", "appendfsync", fsync]);
            node.cli(&["CONFIG", "SET", "appendonly", "yes"]);
            node.extra
                .extend(["--appendonly", "yes", "--appendfsync", fsync].map(String::from));
        }
        // Turning AOF on writes the file in the background: wait until it is written.
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in &cluster.nodes {
            loop {
                let info = node.cli(&["INFO", "persistence"]).unwrap_or_default();
                if info.contains("aof_enabled:1")
                    && info.contains("aof_rewrite_in_progress:0")
                    && !info.contains("aof_rewrite_scheduled:1")
                {
                    break;
                }
                assert!(Instant::now() < deadline, "AOF was not turned on");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cluster
    }

    /// Waits until every node reports `cluster_state:ok` (after a node's restart).
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"])
                    .map(|s| s.contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "cluster did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis+cluster://a,b,c`
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    pub fn command_calls(&self, cmd: &str) -> u64 {
        self.nodes.iter().map(|n| n.command_calls(cmd)).sum()
    }
}

/// A CA and a server certificate it signs (for `127.0.0.1` and `localhost`, usable by every
/// node of a local cluster), made at test time with rcgen and written as PEM files.
pub struct TlsCerts {
    dir: PathBuf,
    /// The CA certificate, PEM: what a client must trust.
    pub ca_pem: String,
}

impl TlsCerts {
    pub fn generate() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = temp_dir("tls");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "tower-redis-layers test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let key = KeyPair::generate().expect("server key");
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "redis-server");
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = server.signed_by(&key, &ca).expect("server certificate");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect(name);
        write("ca.crt", &ca.pem());
        write("redis.crt", &cert.pem());
        write("redis.key", &key.serialize_pem());
        Self {
            dir,
            ca_pem: ca.pem(),
        }
    }

    /// The PEM of another CA, that signed none of the servers' certificates.
    pub fn unrelated_ca_pem() -> String {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("CA key");
        ca.self_signed(&key).expect("CA certificate").pem()
    }

    fn file(&self, name: &str) -> String {
        self.dir
            .join(name)
            .to_str()
            .expect("a UTF-8 path")
            .to_owned()
    }

    /// The `redis-server` arguments of a TLS-only server (`--port 0`) on `port`.
    fn server_args(&self, port: u16) -> Vec<String> {
        [
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            self.file("redis.crt"),
            "--tls-key-file".to_owned(),
            self.file("redis.key"),
            "--tls-ca-cert-file".to_owned(),
            self.file("ca.crt"),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ]
        .into()
    }

    /// The `redis-cli` arguments to reach a TLS server.
    fn cli_args(&self) -> Vec<String> {
        vec![
            "--tls".to_owned(),
            "--cacert".to_owned(),
            self.file("ca.crt"),
        ]
    }
}

impl Drop for TlsCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS-only `redis-server` (`--port 0 --tls-port P`) serving the certificate of a
/// [`TlsCerts`]; cluster nodes also run their bus over TLS (`--tls-cluster yes`). Killed on drop.
pub struct RedisTlsServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    cli_args: Vec<String>,
}

impl RedisTlsServer {
    pub fn start(certs: &TlsCerts) -> Self {
        Self::start_node(certs, false)
    }

    fn start_node(certs: &TlsCerts, cluster: bool) -> Self {
        // A cluster node's bus listens on the TLS port + 10000.
        let port = free_port(cluster);
        let dir = temp_dir("redis-tls");
        let mut command = Command::new("redis-server");
        command
            .args(certs.server_args(port))
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .args(["--dir", dir.to_str().unwrap()]);
        if cluster {
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
            ]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (run .ci/run or apt-get install redis-server)");
        let server = Self {
            port,
            child: Some(child),
            dir,
            cli_args: certs.cli_args(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.cli(&["PING"]).map(|s| s.trim() == "PONG") != Some(true) {
            assert!(
                Instant::now() < deadline,
                "redis-server with TLS on port {port} did not start (is it built with TLS?)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Runs `redis-cli` against this server, over TLS.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(&self.cli_args)
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `rediss://127.0.0.1:P`
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisTlsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A 3-master Redis Cluster of [`RedisTlsServer`]s: clients and the cluster bus over TLS.
pub struct RedisTlsCluster {
    pub nodes: Vec<RedisTlsServer>,
}

impl RedisTlsCluster {
    pub fn start(certs: &TlsCerts) -> Self {
        let nodes: Vec<RedisTlsServer> = (0..3)
            .map(|_| RedisTlsServer::start_node(certs, true))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(certs.cli_args())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "redis-cli --tls --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !nodes.iter().all(|n| {
            n.cli(&["CLUSTER", "INFO"])
                .is_some_and(|s| s.contains("cluster_state:ok"))
        }) {
            assert!(
                Instant::now() < deadline,
                "the TLS cluster did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { nodes }
    }

    /// `rediss+cluster://a,b,c`
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("rediss+cluster://{}", nodes.join(","))
    }
}
