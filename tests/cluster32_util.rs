//! Helpers of the cluster32 tests: the shared Redis Cluster's nodes, a 6-node Redis Cluster of a
//! test's own (3 primaries, 1 replica each) to fail over, pause, restart and move slots in, and
//! small error helpers.
#![cfg(feature = "full")]
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use sturdy::idempotency::server::LockToken;

/// The shared Redis Cluster's nodes, or `None` (the test is skipped).
pub(crate) fn shared_nodes() -> Option<Vec<String>> {
    let u = std::env::var("STURDY_REDIS_CLUSTER_URLS").ok();
    if u.is_none() {
        eprintln!("STURDY_REDIS_CLUSTER_URLS not set: skipped");
    }
    u.map(|s| s.split(',').map(str::to_owned).collect())
}

/// A name no other test (or run) uses.
pub(crate) fn unique(what: &str) -> String {
    format!("c32:{what}:{}", LockToken::random())
}

/// Whether this test may start Redis servers of its own.
pub(crate) fn own_possible() -> bool {
    let ok = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !(ok("redis-server") && ok("redis-cli")) {
        eprintln!("redis-server or redis-cli missing: skipped");
        return false;
    }
    if std::env::var("STURDY_REDIS_CLUSTER_URLS").is_err() {
        eprintln!("STURDY_REDIS_CLUSTER_URLS not set: skipped");
        return false;
    }
    true
}

/// A command through `redis-cli` against 127.0.0.1:`port`; its output (`--raw`).
pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--raw"])
        .args(args)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        }
        Err(e) => format!("redis-cli failed: {e}"),
    }
}

/// The port of `redis://127.0.0.1:port/`.
pub(crate) fn port_of(url: &str) -> u16 {
    url.trim_start_matches("redis://")
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The hash slot of `key`, as a node computes it.
pub(crate) fn keyslot(port: u16, key: &str) -> u16 {
    cli(port, &["CLUSTER", "KEYSLOT", key])
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("KEYSLOT {key}"))
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub(crate) struct NodeLine {
    pub(crate) id: String,
    pub(crate) port: u16,
    pub(crate) primary: bool,
    pub(crate) failed: bool,
    /// A failure the cluster agreed on (`fail`), not one node's suspicion (`fail?`).
    pub(crate) agreed_failed: bool,
    pub(crate) primary_id: String,
    pub(crate) slots: Vec<(u16, u16)>,
}

pub(crate) fn cluster_nodes(port: u16) -> Vec<NodeLine> {
    let out = cli(port, &["CLUSTER", "NODES"]);
    let mut v = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let addr = f[1].split('@').next().unwrap_or("");
        let Some(p) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let mut slots = Vec::new();
        for s in &f[8..] {
            if s.starts_with('[') {
                continue;
            }
            let mut it = s.split('-');
            let a: u16 = it.next().unwrap().parse().unwrap_or(0);
            let b: u16 = it.next().map_or(a, |b| b.parse().unwrap_or(a));
            slots.push((a, b));
        }
        v.push(NodeLine {
            id: f[0].to_owned(),
            port: p,
            primary: f[2].contains("master"),
            failed: f[2].contains("fail"),
            agreed_failed: f[2].split(',').any(|x| x == "fail"),
            primary_id: f[3].to_owned(),
            slots,
        });
    }
    v
}

/// A free port for a cluster node of a test's own, whose bus port (10,000 higher) is free too.
/// Both are below the kernel's ephemeral range (32768 and up on Linux), so that no outgoing
/// connection of another test can take either between this check and redis-server's bind (a
/// port from `bind(0)` is in that range, where one can). 18000 to 21999 leaves out the Redis
/// ports of scripts/test.sh (16379 up, 16500 up, 26500 up) and a developer's Redis at 17xxx.
pub(crate) fn free_cluster_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Two test processes at once start at different places.
    let offset = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..4_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = 18_000 + (offset.wrapping_add(n.wrapping_mul(7)) % 4_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()
        {
            return p;
        }
    }
    panic!("no free port pair for a cluster node between 18000 and 31999");
}

/// A Redis Cluster of this test's own: 6 nodes, 3 primaries with 1 replica each, no
/// persistence, node timeout 1 s. Every node is killed when dropped.
pub(crate) struct OwnCluster {
    pub(crate) ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: PathBuf,
}

/// Own clusters are heavy on a 2-core machine: one at a time.
pub(crate) static OWN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl OwnCluster {
    pub(crate) async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("cluster32-{}", LockToken::random()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 6 {
            let p = free_cluster_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut me = Self {
            children: ports.iter().map(|_| None).collect(),
            ports,
            dir,
        };
        for i in 0..6 {
            me.launch(i);
        }
        for i in 0..6 {
            me.wait_ping(i).await;
        }
        let nodes: Vec<String> = me.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(nodes.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster create failed");
        me.wait_ok(Duration::from_secs(30)).await;
        me
    }

    fn launch(&mut self, i: usize) {
        let p = self.ports[i];
        let conf = self.dir.join(format!("nodes-{p}.conf"));
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &p.to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                conf.to_str().unwrap(),
                "--cluster-node-timeout",
                "1000",
                "--dir",
                self.dir.to_str().unwrap(),
                // One snapshot file per node in the shared directory: a replica's full sync
                // renames the snapshot it received to this name and loads it, so with one
                // `dump.rdb` for all, replicas syncing at once can load each other's.
                "--dbfilename",
                &format!("dump-{p}.rdb"),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                "",
                "--loglevel",
                "warning",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.children[i] = Some(child);
    }

    async fn wait_ping(&self, i: usize) {
        for _ in 0..250 {
            if cli(self.ports[i], &["PING"]).trim() == "PONG" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server {} did not start", self.ports[i]);
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    fn live(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.children)
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// Waits until every live node says `cluster_state:ok`, knows 3 primaries that serve every
    /// slot, and every replica's link to its primary is up.
    pub(crate) async fn wait_ok(&self, within: Duration) {
        let start = Instant::now();
        loop {
            let mut ok = true;
            for p in self.live() {
                if !cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                    ok = false;
                    break;
                }
                let info = cli(p, &["INFO", "replication"]);
                if info.contains("role:slave") && !info.contains("master_link_status:up") {
                    ok = false;
                    break;
                }
            }
            if ok {
                return;
            }
            assert!(
                start.elapsed() < within,
                "the own cluster did not become ok"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn any_live(&self) -> u16 {
        self.live()[0]
    }

    /// The node that serves `slot` as primary, as a live node sees it.
    pub(crate) fn primary_of_slot(&self, slot: u16) -> NodeLine {
        cluster_nodes(self.any_live())
            .into_iter()
            .find(|n| {
                n.primary && !n.failed && n.slots.iter().any(|(a, b)| *a <= slot && slot <= *b)
            })
            .expect("no primary for the slot")
    }

    pub(crate) fn primary_of_key(&self, key: &str) -> NodeLine {
        let slot = keyslot(self.any_live(), key);
        self.primary_of_slot(slot)
    }

    /// A replica of the primary `id`.
    pub(crate) fn replica_of(&self, id: &str) -> NodeLine {
        cluster_nodes(self.any_live())
            .into_iter()
            .find(|n| !n.primary && n.primary_id == id && !n.failed)
            .expect("no replica")
    }

    /// Another primary than `id`.
    pub(crate) fn other_primary(&self, id: &str) -> NodeLine {
        cluster_nodes(self.any_live())
            .into_iter()
            .find(|n| n.primary && !n.failed && n.id != id && !n.slots.is_empty())
            .expect("no other primary")
    }

    fn index(&self, port: u16) -> usize {
        self.ports.iter().position(|p| *p == port).unwrap()
    }

    /// SIGKILL the node on `port`.
    pub(crate) fn kill(&mut self, port: u16) {
        let i = self.index(port);
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the node on `port` again: same cluster config file, no data.
    pub(crate) async fn restart(&mut self, port: u16) {
        let i = self.index(port);
        self.kill(port);
        self.launch(i);
        self.wait_ping(i).await;
    }

    /// `CLUSTER FAILOVER` on `replica`; waits until it is a primary for every live node.
    pub(crate) async fn failover(&self, replica: &NodeLine, within: Duration) {
        let out = cli(replica.port, &["CLUSTER", "FAILOVER"]);
        assert!(out.trim() == "OK", "CLUSTER FAILOVER: {out}");
        self.wait_primary(replica.port, within).await;
    }

    /// Waits until every live node sees `port` as a primary.
    pub(crate) async fn wait_primary(&self, port: u16, within: Duration) {
        let start = Instant::now();
        loop {
            let all = self.live().into_iter().all(|p| {
                cluster_nodes(p)
                    .iter()
                    .any(|n| n.port == port && n.primary && !n.failed)
            });
            if all {
                return;
            }
            assert!(
                start.elapsed() < within,
                "node {port} did not become primary"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts moving `slot` from `from` to `to` (IMPORTING on `to`, MIGRATING on `from`).
    pub(crate) fn begin_move(&self, slot: u16, from: &NodeLine, to: &NodeLine) {
        let s = slot.to_string();
        let a = cli(to.port, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from.id]);
        assert_eq!(a.trim(), "OK", "IMPORTING: {a}");
        let b = cli(from.port, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to.id]);
        assert_eq!(b.trim(), "OK", "MIGRATING: {b}");
    }

    /// Moves the keys of `slot` still on `from` to `to`; how many.
    pub(crate) fn migrate_keys(&self, slot: u16, from: &NodeLine, to: &NodeLine) -> usize {
        let s = slot.to_string();
        let mut moved = 0;
        loop {
            let keys = cli(from.port, &["CLUSTER", "GETKEYSINSLOT", &s, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
            if keys.is_empty() {
                return moved;
            }
            let port = to.port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            let out = cli(from.port, &args);
            assert!(
                out.trim() == "OK" || out.contains("NOKEY"),
                "MIGRATE: {out}"
            );
            moved += keys.len();
        }
    }

    /// Ends the move: `slot` belongs to `to` for every primary.
    pub(crate) fn end_move(&self, slot: u16, to: &NodeLine) {
        let s = slot.to_string();
        for n in cluster_nodes(self.any_live()) {
            if n.primary && !n.failed {
                let _ = cli(n.port, &["CLUSTER", "SETSLOT", &s, "NODE", &to.id]);
            }
        }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every message of an error and its sources, joined by " | ".
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" | ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// The `sturdy_core::Error` kind of `e`, if it is one (or wraps one).
pub(crate) fn kind(e: &(dyn std::error::Error + 'static)) -> Option<sturdy::core::ErrorKind> {
    sturdy::core::find::<sturdy::core::Error>(e).map(|e| e.kind().clone())
}

/// Whether an error message names a cause a user can act on (one of the documented texts).
pub(crate) fn names_cause(text: &str) -> bool {
    let t = text.to_lowercase();
    [
        "cannot be reached",
        "broke before its answer",
        "cannot serve this key now",
        "read-only replica",
        "replicas asked",
        "did not answer",
        "timed out",
        "timeout",
        "nogroup",
        "consumer group",
    ]
    .iter()
    .any(|w| t.contains(w))
}

/// A deterministic xorshift generator.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
