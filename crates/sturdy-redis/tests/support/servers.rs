//! redis-server processes that a test starts, stops and kills on its own ports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use redis::Value;
use tokio::process::{Child, Command};

/// Whether `redis-server` and `redis-cli` can be run; in CI they must be.
pub(crate) fn available() -> bool {
    let found = ["redis-server", "redis-cli"].iter().all(|bin| {
        std::process::Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "redis-server and redis-cli must be installed in CI"
        );
        eprintln!("redis-server or redis-cli not found: skipping a failover test");
    }
    found
}

/// Ports `n` ports apart from each other's cluster bus ports (port + 10000), free now.
pub(crate) fn free_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut held = Vec::new();
    while ports.len() < n {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        held.push(l);
        if port > 55_000 {
            continue;
        }
        if let Ok(bus) = std::net::TcpListener::bind(("127.0.0.1", port + 10_000)) {
            held.push(bus);
            ports.push(port);
        }
    }
    ports
}

/// One redis-server on loopback, killed when dropped.
pub(crate) struct Server {
    pub(crate) port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Server {
    /// Starts redis-server on `port` with its files in `dir`, and waits until it answers.
    pub(crate) async fn start(dir: &Path, port: u16, extra: &[&str]) -> Self {
        let mut args: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--dir",
            dir.to_str().unwrap(),
            "--save",
            "",
            "--logfile",
            "",
            "--loglevel",
            "warning",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut s = Self {
            port,
            args,
            child: None,
        };
        s.restart().await;
        s
    }

    /// Starts it again (after [`kill`](Self::kill)) with the same settings and files.
    pub(crate) async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let url = self.url();
        for _ in 0..200 {
            if let Ok(c) = redis::Client::open(url.as_str()) {
                if let Ok(mut c) = c.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// SIGKILL: the process dies at once, as in a crash.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.unwrap();
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// A directory of its own, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(super::unique(name).replace(':', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Redis Cluster of three primaries with a replica each, on ports of its own.
pub(crate) struct Cluster {
    pub(crate) nodes: Vec<Server>,
    _dir: TempDir,
}

async fn cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(args).output().await.unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Cluster {
    pub(crate) async fn start(node_timeout_ms: u32) -> Self {
        let dir = TempDir::new("cluster");
        let mut nodes = Vec::new();
        for port in free_ports(6) {
            let conf = dir.0.join(format!("nodes-{port}.conf"));
            let timeout = node_timeout_ms.to_string();
            nodes.push(
                Server::start(
                    &dir.0,
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        conf.to_str().unwrap(),
                        "--cluster-node-timeout",
                        &timeout,
                        "--appendonly",
                        "no",
                    ],
                )
                .await,
            );
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        cli(&args).await;
        let c = Self { nodes, _dir: dir };
        c.wait_until_ok(Duration::from_secs(20)).await;
        // Every replica in sync with its primary, so that a failover can promote it.
        for n in &c.nodes {
            for i in 0.. {
                let info = cli(&["-p", &n.port.to_string(), "info", "replication"]).await;
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(i < 400, "a replica did not sync: {info}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        c
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Server::url).collect()
    }

    /// Waits until every live node sees the cluster as serving all its slots.
    pub(crate) async fn wait_until_ok(&self, within: Duration) {
        let start = tokio::time::Instant::now();
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            while !cli(&["-p", &n.port.to_string(), "cluster", "info"])
                .await
                .contains("cluster_state:ok")
            {
                assert!(start.elapsed() < within, "the cluster did not come up");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    /// The index of the node that serves `key` as primary now.
    pub(crate) async fn primary_of(&self, key: &str) -> usize {
        let n = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        let client = redis::Client::open(n.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap();
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut c)
            .await
            .unwrap();
        let Value::Array(ranges) = slots else {
            panic!("CLUSTER SLOTS: {slots:?}")
        };
        for r in ranges {
            let Value::Array(r) = r else { continue };
            let (Some(Value::Int(from)), Some(Value::Int(to)), Some(Value::Array(primary))) =
                (r.first(), r.get(1), r.get(2))
            else {
                continue;
            };
            if (*from..=*to).contains(&slot) {
                let Some(Value::Int(port)) = primary.get(1) else {
                    continue;
                };
                return self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port) == *port)
                    .unwrap();
            }
        }
        panic!("no primary serves slot {slot}");
    }
}
