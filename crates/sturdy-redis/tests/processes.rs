//! Several OS processes of `sturdy-redis-worker` (this crate's binary, one app instance each)
//! sharing one quota, one idempotency store and one webhook queue through Redis: a single server
//! and a Redis Cluster.
#![cfg(feature = "worker")]

use crate::support;
use support::{backends, unique, Backend};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How long any one process may take before the test gives up on it.
const PATIENCE: Duration = Duration::from_secs(30);

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

fn spawn(b: &Backend, args: &[&str]) -> Worker {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sturdy-redis-worker"));
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    match b {
        Backend::Single(url) => {
            cmd.env("STURDY_REDIS_URL", url)
                .env_remove("STURDY_WORKER_CLUSTER");
        }
        Backend::Cluster(urls) => {
            cmd.env("STURDY_REDIS_CLUSTER_URLS", urls.join(","))
                .env("STURDY_WORKER_CLUSTER", "1");
        }
    }
    let mut child = cmd.spawn().expect("the worker binary starts");
    let stdin = child.stdin.take();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    Worker {
        child,
        stdin,
        lines,
    }
}

impl Worker {
    async fn line(&mut self) -> Option<String> {
        tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("the worker answers in time")
            .unwrap()
    }

    async fn expect(&mut self, want: &str) {
        let got = self.line().await;
        assert_eq!(
            got.as_deref(),
            Some(want),
            "the worker failed (see its stderr)"
        );
    }

    async fn go(&mut self) {
        let mut stdin = self.stdin.take().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
    }

    /// Every line until the worker exits, which it must do successfully.
    async fn finish(mut self) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(l) = self.line().await {
            all.push(l);
        }
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "worker exited with {status}");
        all
    }
}

/// Starts the workers, waits until every one is connected, then lets them all go at once.
async fn start(b: &Backend, runs: &[Vec<String>]) -> Vec<Worker> {
    let mut workers: Vec<Worker> = runs
        .iter()
        .map(|args| spawn(b, &args.iter().map(String::as_str).collect::<Vec<_>>()))
        .collect();
    for w in &mut workers {
        w.expect("ready").await;
    }
    for w in &mut workers {
        w.go().await;
    }
    workers
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

// ===== one quota =====

async fn admitted(b: &Backend, processes: usize, args: &[&str]) -> Vec<u128> {
    let runs: Vec<_> = (0..processes).map(|_| strings(args)).collect();
    let mut times = Vec::new();
    for w in start(b, &runs).await {
        let lines = w.finish().await;
        assert_eq!(lines.last().map(String::as_str), Some("done"));
        times.extend(
            lines
                .iter()
                .filter_map(|l| l.strip_prefix("admitted "))
                .map(|t| t.parse::<u128>().unwrap()),
        );
    }
    times.sort_unstable();
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_shared_by_processes_is_never_exceeded() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        a_quota_shared_by_processes_is_never_exceeded_on(&b).await;
    }
}

async fn a_quota_shared_by_processes_is_never_exceeded_on(b: &Backend) {
    // A burst of 40 and one more call a minute: 4 processes of 8 tasks make 400 calls at once,
    // without waiting; exactly 40 go through, whoever makes them.
    let p = unique("procs-burst");
    let times = admitted(b, 4, &["quota", &p, "1", "60000", "40", "100", "8", "0"]).await;
    assert_eq!(times.len(), 40, "exactly the burst goes through");

    // 50 a second with a burst of 10, for callers that wait for their slot (up to 400 ms):
    // 4 processes of 8 tasks make 320 calls. In any second, at most 10 + 50 calls start (and
    // a few more for late timers: a call's timer may fire late, never early).
    let p = unique("procs-rate");
    let times = admitted(b, 4, &["quota", &p, "50", "1000", "10", "320", "8", "400"]).await;
    assert!(times.len() > 60, "the quota was used: {}", times.len());
    let late = 100_000; // µs a timer may fire late on a loaded 2-core machine
    let most = 10 + 50 + 50 * late / 1_000_000;
    for (i, t) in times.iter().enumerate() {
        let within = times[i..]
            .iter()
            .take_while(|u| **u < t + 1_000_000)
            .count();
        assert!(
            within <= most as usize,
            "{within} calls started within a second of {t} (at most {most} allowed)"
        );
    }
}

// ===== one idempotency store =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_posts_spread_over_processes_execute_exactly_once() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        keyed_posts_spread_over_processes_execute_exactly_once_on(&b).await;
    }
}

async fn keyed_posts_spread_over_processes_execute_exactly_once_on(b: &Backend) {
    const KEYS: usize = 1_000;
    const PROCESSES: usize = 4;
    let p = unique("procs-idem");
    let runs: Vec<_> = (0..PROCESSES)
        .map(|i| {
            strings(&[
                "idem",
                &p,
                &KEYS.to_string(),
                &PROCESSES.to_string(),
                &i.to_string(),
            ])
        })
        .collect();
    // key -> every answer it got, in any process: (status, replayed, body)
    let mut answers: HashMap<String, Vec<(String, bool, String)>> = HashMap::new();
    for w in start(b, &runs).await {
        for l in w.finish().await {
            let Some(rest) = l.strip_prefix("key ") else {
                continue;
            };
            let mut parts = rest.splitn(4, ' ');
            let key = parts.next().unwrap().to_owned();
            let status = parts.next().unwrap().to_owned();
            let replayed = parts.next().unwrap() == "true";
            let body = parts.next().unwrap_or_default().to_owned();
            answers
                .entry(key)
                .or_default()
                .push((status, replayed, body));
        }
    }
    assert_eq!(answers.len(), KEYS, "every key was answered");
    let deliveries: usize = answers.values().map(Vec::len).sum();
    assert_eq!(
        deliveries,
        KEYS * 2 + KEYS / 10,
        "every duplicate delivery was answered"
    );
    for (key, got) in &answers {
        assert!(got.iter().all(|a| a.0 == "201"), "{key}: {got:?}");
        let bodies: HashSet<_> = got.iter().map(|a| &a.2).collect();
        assert_eq!(
            bodies.len(),
            1,
            "{key}: one outcome for all deliveries: {got:?}"
        );
        let fresh = got.iter().filter(|a| !a.1).count();
        assert_eq!(
            fresh, 1,
            "{key}: one execution, the others replayed: {got:?}"
        );
    }
    // The handler's own count, kept in Redis: one run per key, in whichever process.
    let runs: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{p}:runs"))
        .query_async(&mut b.conn().await)
        .await
        .unwrap();
    assert_eq!(runs.len(), KEYS);
    assert!(runs.values().all(|n| *n == 1), "a key ran twice: {runs:?}");
}

// ===== one webhook queue =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_events_from_any_process_are_handled_once_and_a_killed_consumer_is_taken_over() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        webhook_events_on(&b).await;
    }
}

async fn webhook_events_on(b: &Backend) {
    const EVENTS: u64 = 300;
    let stream = unique("procs-webhooks");
    let p = unique("procs-handled");
    let claim = "500";
    // The consumer that will crash joins first, then the producers and the other consumers.
    let mut hang = spawn(b, &["hang", &stream, "g", "crashing", claim, "5"]);
    hang.expect("ready").await;
    // Three producers; every event is sent by two of them (a sender's redelivery reaching
    // another instance), so half the sends are duplicates.
    let third = EVENTS / 3;
    let mut runs = Vec::new();
    for i in 0..3 {
        let from = i * third;
        let to = ((i + 2) * third).min(EVENTS);
        runs.push(strings(&[
            "produce",
            &stream,
            &from.to_string(),
            &to.to_string(),
        ]));
    }
    runs.push(strings(&["produce", &stream, "0", &third.to_string()]));
    let expected = EVENTS.to_string();
    for name in ["c1", "c2"] {
        runs.push(strings(&[
            "consume", &stream, "g", name, claim, &p, &expected,
        ]));
    }
    let mut workers = start(b, &runs).await;
    hang.go().await;
    let mut taken = HashSet::new();
    for _ in 0..5 {
        let l = hang.line().await.unwrap();
        taken.insert(l.strip_prefix("took ").unwrap().to_owned());
    }
    hang.expect("hanging").await;
    // The crash: SIGKILL, mid-event, nothing acknowledged.
    hang.child.kill().await.unwrap();

    let consumers = workers.split_off(4);
    let (mut enqueued, mut duplicates) = (0, 0);
    for w in workers {
        let lines = w.finish().await;
        let counts: Vec<u64> = lines[0].split(' ').filter_map(|s| s.parse().ok()).collect();
        enqueued += counts[0];
        duplicates += counts[1];
    }
    assert_eq!(
        enqueued, EVENTS,
        "each event is enqueued once, by whichever process"
    );
    assert_eq!(duplicates, EVENTS, "every second send is a duplicate");

    let mut handled: HashMap<String, u64> = HashMap::new();
    for w in consumers {
        for l in w.finish().await {
            let Some(rest) = l.strip_prefix("handled ") else {
                continue;
            };
            let (id, deliveries) = rest.split_once(' ').unwrap();
            let before = handled.insert(id.to_owned(), deliveries.parse().unwrap());
            assert!(before.is_none(), "{id} was handled twice");
        }
    }
    assert_eq!(handled.len() as u64, EVENTS, "every event was handled");
    for id in &taken {
        assert!(
            handled[id] >= 2,
            "{id}, taken by the killed consumer, was taken over and delivered again"
        );
    }
    // Redis's own count: each event handled once.
    let counts: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{p}:handled"))
        .query_async(&mut b.conn().await)
        .await
        .unwrap();
    assert_eq!(counts.len() as u64, EVENTS);
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
}
