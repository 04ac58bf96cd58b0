//! Moving one slot of the shared Redis Cluster (`STURDY_REDIS_CLUSTER_URLS`) step by step, for
//! the s67 and s79 tests: `CLUSTER SETSLOT ... IMPORTING/MIGRATING`, `MIGRATE` of its keys,
//! `CLUSTER SETSLOT ... NODE`, and back. Driven with `redis-cli`, so that what moves the slot is
//! not the client under test.
#![cfg(feature = "full")]

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::cluster32_util::cluster_nodes;

/// One slot move at a time on the shared cluster. `CLUSTER SETSLOT <slot> NODE <me>` makes the
/// importing node take a new config epoch without a vote; two moves at once can leave two
/// masters with the same epoch, and then a node that still holds the old owner (a replica,
/// which cannot be told directly) ignores the new owner's claim, or tells it to give the slot
/// back: the nodes answer `MOVED` both ways until the collision is resolved.
pub(crate) static SLOT_MOVES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `redis-cli -p <port> <args>`: its standard output, trimmed.
pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A master of the cluster, as one node sees it.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub(crate) id: String,
    pub(crate) port: u16,
    pub(crate) slots: Vec<(u16, u16)>,
}

impl Node {
    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

/// The cluster's masters, as `seed` sees them. `fail?` is one node's suspicion, often for a
/// moment on a loaded machine; only a failure the cluster agreed on (`fail`) leaves one out.
pub(crate) fn masters(seed: u16) -> Vec<Node> {
    cluster_nodes(seed)
        .into_iter()
        .filter(|l| l.primary && !l.agreed_failed)
        .map(|l| Node {
            id: l.id,
            port: l.port,
            slots: l.slots,
        })
        .collect()
}

/// Who serves `slot` in `port`'s view (a node id), if anyone.
fn owner_in_view(port: u16, slot: u16) -> Option<String> {
    cluster_nodes(port)
        .into_iter()
        .find(|l| l.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
        .map(|l| l.id)
}

/// The slot of `key`.
pub(crate) fn keyslot(seed: u16, key: &str) -> u16 {
    cli(seed, &["CLUSTER", "KEYSLOT", key]).parse().unwrap()
}

/// The keys of `slot` on the node at `port`.
pub(crate) fn keys_in_slot(port: u16, slot: u16) -> Vec<String> {
    cli(
        port,
        &["CLUSTER", "GETKEYSINSLOT", &slot.to_string(), "1000"],
    )
    .lines()
    .map(str::trim)
    .filter(|s| !s.is_empty())
    .map(str::to_owned)
    .collect()
}

/// A hash tag whose slot holds no key at all now (so moving it touches nobody else's keys).
/// A cluster kept across many runs can hold a few keys in most slots (60,000 keys leave about
/// one slot in forty empty), so it tries many tags.
#[allow(clippy::disallowed_methods)]
pub(crate) fn free_tag(seed: u16) -> (String, u16) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let ms = masters(seed);
    for _ in 0..2_000 {
        let tag = format!(
            "slotmove{}x{nanos}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let slot = keyslot(seed, &tag);
        let owner = ms.iter().find(|n| n.serves(slot)).expect("slot owner");
        if keys_in_slot(owner.port, slot).is_empty() {
            return (tag, slot);
        }
    }
    panic!("no empty slot found");
}

/// One slot of ours moved from its owner (`home`) to another master (`away`), step by step;
/// `Drop` puts it back home with its keys, whatever stage the test reached. Hold
/// [`SLOT_MOVES`] while one lives.
pub(crate) struct SlotMove {
    pub(crate) slot: u16,
    pub(crate) home: Node,
    pub(crate) away: Node,
    all: Vec<Node>,
    /// Every node's port, replicas too: each must agree about the owner after a step.
    ports: Vec<u16>,
    pub(crate) restored: bool,
}

impl SlotMove {
    pub(crate) fn new(seed: u16, slot: u16) -> Self {
        let all = masters(seed);
        assert_eq!(all.len(), 3, "expected three masters: {all:?}");
        let home = all
            .iter()
            .find(|n| n.serves(slot))
            .expect("slot owner")
            .clone();
        let away = all.iter().find(|n| n.id != home.id).unwrap().clone();
        let ports = cluster_nodes(seed).iter().map(|l| l.port).collect();
        Self {
            slot,
            home,
            away,
            all,
            ports,
            restored: false,
        }
    }

    /// `IMPORTING` on `to`, `MIGRATING` on `from`: keys on `from` are served there, others ASK `to`.
    fn open(&self, from: &Node, to: &Node) -> (String, String) {
        let s = self.slot.to_string();
        let a = cli(to.port, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from.id]);
        let b = cli(from.port, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to.id]);
        (a, b)
    }

    /// Opens the move from `home` to `away`.
    pub(crate) fn start(&self) {
        let (a, b) = self.open(&self.home, &self.away);
        assert_eq!((a.as_str(), b.as_str()), ("OK", "OK"), "SETSLOT failed");
    }

    /// Every key of the slot still on `from` to `to`.
    pub(crate) fn migrate_keys(&self, from: &Node, to: &Node) {
        for _ in 0..20 {
            let keys = keys_in_slot(from.port, self.slot);
            if keys.is_empty() {
                return;
            }
            let port = to.port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let _ = cli(from.port, &args);
        }
    }

    /// `SETSLOT ... NODE to` on the new owner first, then the old one, then the rest; then waits
    /// (5 s at most) until every node, replicas too, names `to` as the owner.
    fn assign(&self, to: &Node) {
        let s = self.slot.to_string();
        let mut order = vec![to.clone()];
        order.extend(self.all.iter().filter(|n| n.id != to.id).cloned());
        for n in &order {
            let _ = cli(n.port, &["CLUSTER", "SETSLOT", &s, "NODE", &to.id]);
        }
        self.settle(to, &order);
    }

    /// Waits until every node says `to` serves the slot. A node that still names another owner
    /// after a second is the epoch collision of [`SLOT_MOVES`]'s note (another test process,
    /// or a bump not yet heard of): the masters are told again and `to` takes a config epoch of
    /// its own (`CLUSTER BUMPEPOCH`), whose claim every node then takes.
    #[allow(clippy::disallowed_methods)]
    fn settle(&self, to: &Node, order: &[Node]) {
        let s = self.slot.to_string();
        let t0 = Instant::now();
        let mut last_nudge = Instant::now();
        loop {
            let stale: Vec<u16> = self
                .ports
                .iter()
                .copied()
                .filter(|&p| owner_in_view(p, self.slot).as_deref() != Some(to.id.as_str()))
                .collect();
            if stale.is_empty() {
                return;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "slot {} did not settle on {}: nodes {stale:?} name another owner",
                    self.slot, to.port
                );
                return;
            }
            if last_nudge.elapsed() > Duration::from_secs(1) {
                last_nudge = Instant::now();
                let _ = cli(to.port, &["CLUSTER", "BUMPEPOCH"]);
                for n in order {
                    let _ = cli(n.port, &["CLUSTER", "SETSLOT", &s, "NODE", &to.id]);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn move_all(&self, from: &Node, to: &Node) {
        let _ = self.open(from, to);
        self.migrate_keys(from, to);
        self.assign(to);
    }

    /// Ends the move: every key of the slot on `away`, which owns the slot.
    pub(crate) fn finish(&self) {
        self.migrate_keys(&self.home, &self.away);
        self.assign(&self.away);
    }

    /// Completes the move (from whatever stage), then moves everything back home. Called from
    /// `Drop` too, which cannot await: it blocks while the nodes agree (a second or so).
    pub(crate) fn restore(&mut self) {
        if self.restored {
            return;
        }
        self.restored = true;
        self.move_all(&self.home.clone(), &self.away.clone());
        self.move_all(&self.away.clone(), &self.home.clone());
    }
}

impl Drop for SlotMove {
    fn drop(&mut self) {
        self.restore();
    }
}
