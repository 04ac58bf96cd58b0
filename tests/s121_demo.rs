#![cfg(feature = "full")]
//! Outside round s121: the demo (`cargo run --release -p sturdy-chaos`) and its fault-injecting
//! server as a user meets them. Runs the release binary (README.md, docs/guides/demo.md, the
//! binary's `--help`) and checks the figures it prints and that they add up, its JSON, its
//! progress lines, its exit statuses, that it needs only loopback, odd and unknown arguments,
//! two demos at once, SIGINT mid-run, and `--serve` seen from a plain hyper client.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The demo binary of this test's profile (`target/<profile>/sturdy-chaos`, which `cargo test
/// --workspace` builds), or a release build next to it when that exists.
fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe.parent().and_then(|p| p.parent()).expect("target/<profile>");
        let name = format!("sturdy-chaos{}", std::env::consts::EXE_SUFFIX);
        let own = profile_dir.join(&name);
        let release = profile_dir.with_file_name("release").join(&name);
        [own, release]
            .into_iter()
            .find(|p| p.is_file())
            .expect("sturdy-chaos is built (cargo test --workspace builds it; or cargo build -p sturdy-chaos)")
    })
    .clone()
}

/// Runs the binary with `args`, killed after `limit`; returns its output and wall time.
// A child process in real time: its wall clock is what the docs speak of.
#[allow(clippy::disallowed_methods)]
fn run_in(cmd: &mut Command, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    let stdout = t_out.join().unwrap();
    let stderr = t_err.join().unwrap();
    (
        Output {
            status,
            stdout,
            stderr,
        },
        took,
    )
}

fn run(args: &[&str], limit: Duration) -> (Output, Duration) {
    run_in(Command::new(bin()).args(args), limit)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One table row: the five numbers after the client's name.
fn row(stdout: &str, name: &str) -> [u64; 5] {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no row {name:?} in\n{stdout}"));
    let nums: Vec<u64> = line[name.len()..]
        .split_whitespace()
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("not a number in {line:?}"))
        })
        .collect();
    nums.try_into()
        .unwrap_or_else(|_| panic!("not five numbers in {line:?}"))
}

const PLAIN: &str = "plain hyper client";
const NAIVE: &str = "naive retry loop";
const STURDY: &str = "sturdy ClientBuilder";

/// Kills and reaps a child on drop, so a failing test leaves nothing running.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigint(child: &Child) {
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -INT failed");
}

/// Waits for the child's exit for at most `limit`.
// A child process in real time: its wall clock is what the docs speak of.
#[allow(clippy::disallowed_methods)]
fn wait_for(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Threads' processes whose parent is `pid` (none should be left after it exits).
fn children_of(pid: u32) -> Vec<String> {
    let out = Command::new("ps")
        .args(["-o", "pid=", "--ppid", &pid.to_string()])
        .output()
        .unwrap();
    text(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out")
}

/// The summary line's four figures: injected 5xx, closed connections, 429s, replays.
fn summary(stdout: &str) -> [u64; 4] {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("sturdy: "))
        .unwrap_or_else(|| panic!("no summary line in\n{stdout}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    // "35 injected 5xx, 18 closed connections and 1 429 ridden out; 18 responses replayed"
    // gives 35, 5 (of 5xx), 18, 1, 429, 18.
    assert_eq!(nums.len(), 6, "{line}");
    assert_eq!((nums[1], nums[4]), (5, 429), "{line}");
    [nums[0], nums[2], nums[3], nums[5]]
}

/// The progress line of one client on stderr: (sent, total, ms, succeeded, failed).
fn progress(stderr: &str, name: &str) -> (u64, u64, u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no progress line for {name} in\n{stderr}"));
    let rest = &line[name.len() + 2..];
    // "200/200 orders sent in 54 ms (157 succeeded, 43 failed)"
    let words: Vec<&str> = rest.split_whitespace().collect();
    assert_eq!(words.len(), 10, "{line}");
    assert_eq!(
        (words[1], words[2], words[3], words[5], words[7], words[9]),
        ("orders", "sent", "in", "ms", "succeeded,", "failed)"),
        "{line}"
    );
    let (sent, total) = words[0].split_once('/').expect(line);
    (
        sent.parse().unwrap(),
        total.parse().unwrap(),
        words[4].parse().unwrap(),
        words[6].trim_start_matches('(').parse().unwrap(),
        words[8].parse().unwrap(),
    )
}

// ---------------------------------------------------------------------------------------------
// The orders demo, as the README runs it
// ---------------------------------------------------------------------------------------------

/// README.md and docs/guides/demo.md: the table, exactly; exit 0; finishes in seconds.
#[test]
fn s121_readme_demo_prints_the_documented_table_and_exits_zero() {
    let (out, took) = run(&[], Duration::from_secs(60));
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(row(&stdout, PLAIN), [157, 43, 200, 173, 0], "\n{stdout}");
    assert_eq!(row(&stdout, NAIVE), [200, 0, 256, 220, 20], "\n{stdout}");
    assert_eq!(row(&stdout, STURDY), [200, 0, 254, 200, 0], "\n{stdout}");
    assert_eq!(summary(&stdout), [35, 18, 1, 18], "\n{stdout}");
    // The guide's opening lines and the header, word for word.
    assert!(
        stdout.starts_with(
            "200 orders against an API that fails 15% of calls with 503, closes 10% of\n\
             connections after committing the order, and answers one 429 with Retry-After: 1.\n"
        ),
        "{stdout}"
    );
    assert!(stdout
        .contains("client                          ok  failed  requests  committed  duplicates\n"));
    assert!(stdout.contains(
        "sturdy: 35 injected 5xx, 18 closed connections and 1 429 ridden out; 18 responses replayed by key.\n"
    ));
    // "about a second for the 429's Retry-After: 1, and the rest in backoff sleeps": seconds.
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// The figures add up as the guide explains them.
#[test]
fn s121_readme_demo_figures_add_up() {
    let (out, _) = run(&[], Duration::from_secs(60));
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    let [p_ok, p_failed, p_req, p_comm, p_dup] = row(&stdout, PLAIN);
    let [n_ok, n_failed, n_req, n_comm, n_dup] = row(&stdout, NAIVE);
    let [s_ok, s_failed, s_req, s_comm, s_dup] = row(&stdout, STURDY);
    let [fivexx, closed, r429, replayed] = summary(&stdout);
    // "The plain client loses 43 orders it cannot tell apart from the 16 that were in fact
    // committed"; it sends each order once.
    assert_eq!(p_ok + p_failed, 200);
    assert_eq!(p_req, 200);
    assert_eq!(p_comm - p_ok, 16);
    assert_eq!(p_dup, 0);
    // "the naive loop books 20 orders twice": committed = orders + duplicates; at most 4 sends.
    assert_eq!(n_ok + n_failed, 200);
    assert_eq!(n_comm, 200 + n_dup);
    assert_eq!(n_dup, 20);
    assert!(n_req <= 4 * 200);
    // sturdy: every order once; each request beyond the 200 is one fault it rode out.
    assert_eq!((s_ok, s_failed, s_comm, s_dup), (200, 0, 200, 0));
    assert_eq!(s_req, 200 + fivexx + closed + r429, "\n{stdout}");
    // Each closed connection's retry got the stored response back by key.
    assert_eq!(replayed, closed);
}

/// "when stderr or stdout is not a terminal ... it prints one line per client when that
/// client is done", in the guide's format, with the table's figures.
#[test]
fn s121_demo_progress_lines_match_the_table() {
    let (out, _) = run(&["--orders", "40"], Duration::from_secs(60));
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    let mut lines = 0;
    for name in [PLAIN, NAIVE, STURDY] {
        let (sent, total, _ms, ok, failed) = progress(&stderr, name);
        let r = row(&stdout, name);
        assert_eq!((sent, total), (40, 40), "{stderr}");
        assert_eq!((ok, failed), (r[0], r[1]), "{name}: {stderr} vs {stdout}");
        lines += 1;
    }
    assert_eq!(
        stderr.lines().count(),
        lines,
        "one line per client only:\n{stderr}"
    );
    // Results on stdout only: no progress line there.
    assert!(!stdout.contains("orders sent in"), "{stdout}");
}

/// `--json`: one object, nothing else on stdout; the fields of the guide; the same figures as
/// the table; no token requests; sturdy waits, the other two never do.
#[test]
fn s121_demo_json_has_the_documented_fields_and_the_tables_figures() {
    let (out, _) = run(&["--json"], Duration::from_secs(60));
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(v["orders"], 200);
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 2, "{v}");
    let clients = v["clients"].as_object().unwrap();
    assert_eq!(
        clients.keys().map(String::as_str).collect::<Vec<_>>().len(),
        3
    );
    let expect = [
        ("plain", PLAIN, [157, 43, 0, 200, 173]),
        ("naive", NAIVE, [200, 0, 20, 256, 220]),
        ("sturdy", STURDY, [200, 0, 0, 254, 200]),
    ];
    for (id, name, [ok, failed, dup, req, comm]) in expect {
        let c = &v["clients"][id];
        let fields: Vec<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
        for f in [
            "name",
            "succeeded",
            "failed",
            "duplicates",
            "requests",
            "committed",
            "rate_limited",
            "token_requests",
            "wall_ms",
        ] {
            assert!(fields.contains(&f), "{id}.{f} missing: {c}");
        }
        assert_eq!(c["name"], name);
        assert_eq!(c["succeeded"], ok, "{id}");
        assert_eq!(c["failed"], failed, "{id}");
        assert_eq!(c["duplicates"], dup, "{id}");
        assert_eq!(c["requests"], req, "{id}");
        assert_eq!(c["committed"], comm, "{id}");
        assert_eq!(c["rate_limited"], 1, "{id}");
        assert_eq!(c["token_requests"], 0, "{id}");
    }
    let wall = |id: &str| v["clients"][id]["wall_ms"].as_u64().unwrap();
    assert!(wall("sturdy") >= 1_000, "{v}");
    // The plain and naive clients never wait for a Retry-After (a debug build on a loaded
    // machine is slower than the guide's release figures).
    assert!(wall("plain") < 10_000 && wall("naive") < 10_000, "{v}");
    // Progress still goes to stderr, one line per client.
    let stderr = text(&out.stderr);
    for name in [PLAIN, NAIVE, STURDY] {
        assert_eq!(progress(&stderr, name).1, 200);
    }
}

/// `--orders N` for small and odd N: the figures still add up and sturdy books each order once.
#[test]
fn s121_demo_orders_n_adds_up_for_small_n() {
    for n in [1u64, 2, 7, 33] {
        let arg = n.to_string();
        let (out, _) = run(&["--orders", &arg], Duration::from_secs(60));
        assert!(out.status.success(), "--orders {n}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(
            stdout.starts_with(&format!("{n} orders against")),
            "{stdout}"
        );
        let p = row(&stdout, PLAIN);
        let nv = row(&stdout, NAIVE);
        let s = row(&stdout, STURDY);
        let [fivexx, closed, r429, replayed] = summary(&stdout);
        assert_eq!(p[0] + p[1], n, "{stdout}");
        assert_eq!(p[2], n, "{stdout}");
        assert!(p[3] >= p[0], "{stdout}");
        assert_eq!(nv[0] + nv[1], n, "{stdout}");
        assert_eq!(nv[3], n + nv[4], "{stdout}");
        assert_eq!((s[0], s[1], s[3], s[4]), (n, 0, n, 0), "{stdout}");
        assert_eq!(s[2], n + fivexx + closed + r429, "{stdout}");
        assert_eq!(r429, 1, "{stdout}");
        assert_eq!(replayed, closed, "{stdout}");
    }
}

/// "The faults are seeded and the orders sequential, so these figures repeat from run to run":
/// two demos at the same time (two servers, two ports) print the same documented figures.
#[test]
fn s121_two_demos_at_once_both_print_the_documented_figures() {
    let spawn = || {
        let b = bin();
        std::thread::spawn(move || run_in(Command::new(b).arg("--json"), Duration::from_secs(60)))
    };
    let (a, b) = (spawn(), spawn());
    for (out, _) in [a.join().unwrap(), b.join().unwrap()] {
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        for (id, comm, dup) in [("plain", 173, 0), ("naive", 220, 20), ("sturdy", 200, 0)] {
            assert_eq!(v["clients"][id]["committed"], comm, "{v}");
            assert_eq!(v["clients"][id]["duplicates"], dup, "{v}");
        }
    }
}

/// "it needs no network but loopback": in a network namespace with only `lo` up, the same
/// figures. (Skipped where unprivileged user namespaces are not allowed.)
#[test]
fn s121_demo_runs_with_only_loopback() {
    let probe = Command::new("unshare")
        .args(["-rn", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!("unshare -rn not available: skipped");
        return;
    }
    let script = format!(
        "ip link set lo up && exec '{}' --json --orders 40",
        bin().display()
    );
    let (out, _) = run_in(
        Command::new("unshare").args(["-rn", "sh", "-c", &script]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (plain, _) = run(&["--json", "--orders", "40"], Duration::from_secs(60));
    let w: Value = serde_json::from_slice(&plain.stdout).unwrap();
    for id in ["plain", "naive", "sturdy"] {
        for f in ["succeeded", "failed", "duplicates", "requests", "committed"] {
            assert_eq!(v["clients"][id][f], w["clients"][id][f], "{id}.{f}");
        }
    }
    assert_eq!(v["clients"]["sturdy"]["committed"], 40);
}

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------

/// `--help` lists every option the guide names, on stdout, exit 0.
#[test]
fn s121_help_lists_every_documented_option() {
    for flag in ["--help", "-h"] {
        let (out, _) = run(&[flag], Duration::from_secs(10));
        assert!(out.status.success(), "{flag}");
        let help = text(&out.stdout);
        for opt in [
            "--json",
            "--orders N",
            "jitter",
            "--serve",
            "--clients",
            "--runs N",
            "--out DIR",
            "--no-plots",
            "--seed N",
            "--base-ms N",
            "--cap-ms N",
            "--latency-ms N",
            "--latency-jitter-ms N",
        ] {
            assert!(help.contains(opt), "{flag} does not list {opt}:\n{help}");
        }
        assert!(help.contains("[200]"), "the default of --orders: {help}");
    }
}

/// Odd values and unknown flags: a message naming the option, the usage, exit 2, nothing on
/// stdout, never a panic, never a hang.
#[test]
fn s121_odd_arguments_are_refused_clearly() {
    let cases: &[(&[&str], &str)] = &[
        (&["--orders", "0"], "--orders"),
        (&["--orders", "-1"], "--orders"),
        (&["--orders", "99999999999999999999"], "--orders"),
        (&["--orders", "100001"], "--orders"),
        (&["--orders", "1e3"], "--orders"),
        (&["--orders", " 5"], "--orders"),
        (&["--orders", ""], "--orders"),
        (&["--orders"], "--orders"),
        (&["--bogus"], "--bogus"),
        (&["--clients", "3"], "--clients"),
        (&["--serve", "--json"], "--serve"),
        (&["--serve", "--orders", "3"], "--serve"),
        (&["jitter", "--clients", "0"], "--clients"),
        (&["jitter", "--clients", "401"], "--clients"),
        (&["jitter", "--clients", ""], "--clients"),
        (&["jitter", "--clients", "3,x"], "--clients"),
        (&["jitter", "--clients", "-3"], "--clients"),
        (&["jitter", "--runs", "0"], "--runs"),
        (&["jitter", "--runs", "huge"], "--runs"),
        (&["jitter", "--base-ms", "-1"], "--base-ms"),
        (&["jitter", "--base-ms", "0"], "--base-ms"),
        (&["jitter", "--cap-ms", "abc"], "--cap-ms"),
        (&["jitter", "--base-ms", "10", "--cap-ms", "1"], "--cap-ms"),
        (
            &["jitter", "--latency-ms", "99999999999999"],
            "--latency-ms",
        ),
        (
            &["jitter", "--latency-jitter-ms", "x"],
            "--latency-jitter-ms",
        ),
        (&["jitter", "--seed", "-5"], "--seed"),
        (&["jitter", "--seed", "18446744073709551616"], "--seed"),
        (&["jitter", "--out"], "--out"),
        (&["jitter", "--orders", "3"], "--orders"),
        (&["jitter", "--bogus"], "--bogus"),
    ];
    for (args, names) in cases {
        let (out, _) = run(args, Duration::from_secs(10));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with("sturdy-chaos: "), "{args:?}: {err}");
        assert!(first.contains(names), "{args:?}: {first}");
        assert!(err.contains("usage:"), "{args:?}: {err}");
    }
}

/// A plot directory that cannot be created: a non-zero exit and a message that says which
/// directory. (The guide: "`--out DIR` writes them elsewhere".)
#[test]
fn s121_jitter_out_that_is_a_file_names_the_path() {
    let dir = std::env::temp_dir().join(format!("s121-out-file-{}", std::process::id()));
    std::fs::write(&dir, b"not a directory").unwrap();
    let p = dir.to_str().unwrap().to_owned();
    let (out, _) = run(
        &["jitter", "--clients", "1", "--runs", "1", "--out", &p],
        Duration::from_secs(20),
    );
    let _ = std::fs::remove_file(&dir);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains(&p) || last.contains("--out"), "{last}");
}

// ---------------------------------------------------------------------------------------------
// SIGINT
// ---------------------------------------------------------------------------------------------

/// Whether this process ignores SIGINT (then its children would too, and the test says so).
fn sigint_ignored_here() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (2 - 1)) != 0)
}

/// SIGINT while sturdy waits out the 429 and its backoffs: the demo stops at once, unsuccessful,
/// and leaves no process behind.
// A child process in real time: its wall clock is what the docs speak of.
#[allow(clippy::disallowed_methods)]
#[test]
fn s121_sigint_mid_run_stops_the_demo_promptly() {
    if sigint_ignored_here() {
        eprintln!("SIGINT is ignored by this test process: skipped");
        return;
    }
    let mut child = Reap(
        Command::new(bin())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let mut err = BufReader::new(child.0.stderr.take().unwrap());
    // Wait for the naive loop to finish: sturdy is then running (it takes seconds).
    let start = Instant::now();
    let mut line = String::new();
    loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "stderr closed early");
        if line.starts_with(NAIVE) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "sturdy's row was already done"
    );
    sigint(&child.0);
    let sent = Instant::now();
    let status = wait_for(&mut child.0, Duration::from_secs(5))
        .expect("the demo still runs 5 s after SIGINT");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "{:?}",
        sent.elapsed()
    );
    assert!(!status.success(), "{status:?}");
    assert!(children_of(pid).is_empty());
    // sturdy's row was never printed.
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(!out.contains(STURDY), "{out}");
}

/// SIGINT during `jitter` stops it promptly too.
// A child process in real time: its wall clock is what the docs speak of.
#[allow(clippy::disallowed_methods)]
#[test]
fn s121_sigint_mid_jitter_stops_promptly() {
    if sigint_ignored_here() {
        eprintln!("SIGINT is ignored by this test process: skipped");
        return;
    }
    let dir = tempdir("sigint-jitter");
    let mut child = Reap(
        Command::new(bin())
            .args(["jitter", "--clients", "100", "--runs", "20", "--out"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.0.try_wait().unwrap().is_none());
    sigint(&child.0);
    let status =
        wait_for(&mut child.0, Duration::from_secs(5)).expect("jitter still runs 5 s after SIGINT");
    assert!(!status.success());
    // Interrupted before the end: no plot was written.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("s121-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// --serve, seen from a plain hyper client
// ---------------------------------------------------------------------------------------------

struct Served {
    child: Reap,
    base: String,
    banner: String,
}

/// Starts `--serve` and reads its banner up to "press Ctrl-C to stop".
fn serve() -> Served {
    let mut child = Reap(
        Command::new(bin())
            .arg("--serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut banner = String::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            banner.push_str(&line);
            banner.push('\n');
            if line.contains("Ctrl-C") {
                let _ = tx.send(banner.clone());
            }
        }
    });
    let banner = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("--serve prints its banner");
    let base = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("an address")
        .trim_end_matches('/')
        .to_owned();
    Served {
        child,
        base,
        banner,
    }
}

fn post_order(url: &str, body: String, key: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::post(url).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

/// `--serve` "prints its address and knobs": a loopback address and the demo's faults.
#[test]
fn s121_serve_prints_a_loopback_address_and_the_demos_knobs() {
    let mut s = serve();
    assert!(s.base.starts_with("http://127.0.0.1:"), "{}", s.banner);
    let port: u16 = s.base.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, 0);
    for knob in [
        "seed: 2026",
        "error_rate: 0.15",
        "error_status: 503",
        "rate_limit_next: 1",
        "reset_after_commit_rate: 0.1",
        "idempotency: true",
    ] {
        assert!(s.banner.contains(knob), "{knob} not in\n{}", s.banner);
    }
    // A second server at the same time gets its own port.
    let mut t = serve();
    assert_ne!(s.base, t.base);
    for x in [&mut s, &mut t] {
        sigint(&x.child.0);
        let st = wait_for(&mut x.child.0, Duration::from_secs(2)).expect("stops on Ctrl-C");
        assert!(st.success(), "{st:?}");
    }
}

/// The `--serve` faults, seen from a plain hyper client with no sturdy layer: the first order
/// gets 429 with `Retry-After: 1`; about 15 % of requests get 503; about 10 % of committed
/// orders lose their connection after the commit (the order stands); `/health` is never
/// faulted; `Idempotency-Key` replays and refuses another payload. Then Ctrl-C stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s121_serve_faults_as_documented_from_a_plain_hyper_client() {
    let mut s = tokio::task::spawn_blocking(serve).await.unwrap();
    let base = s.base.clone();
    let client = sturdy_chaos::http_client();
    within(async {
        // /health: never faulted.
        for _ in 0..20 {
            let res = client
                .request(
                    http::Request::get(format!("{base}/health"))
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        let url = format!("{base}/orders");
        let (mut created, mut e503, mut e429, mut closed, mut other) = (0u32, 0u32, 0, 0, 0);
        let n = 200;
        for i in 0..n {
            let body = format!(r#"{{"item":"s121-{i}","amount":{i}}}"#);
            match client.request(post_order(&url, body, None)).await {
                Ok(res) => match res.status().as_u16() {
                    201 => created += 1,
                    503 => e503 += 1,
                    429 => {
                        assert_eq!(i, 0, "only the first request is answered 429");
                        assert_eq!(res.headers()["retry-after"], "1");
                        e429 += 1;
                    }
                    s => other += s as u32,
                },
                Err(_) => closed += 1,
            }
        }
        assert_eq!((e429, other), (1, 0));
        assert_eq!(created + e503 + e429 + closed, n);
        // 15 % of 200 is 30: seeded, so a wide band.
        assert!((15..=50).contains(&e503), "503s: {e503}");
        // 10 % of about 170 commits.
        assert!((5..=35).contains(&closed), "closed: {closed}");

        // The server's truth: the orders listed are the 201s and the closed ones.
        let mut listed = 0u32;
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages < 200, "pagination does not end");
            let q = if cursor.is_empty() {
                "limit=50".to_owned()
            } else {
                format!("limit=50&cursor={cursor}")
            };
            let res = client
                .request(
                    http::Request::get(format!("{base}/orders?{q}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            if res.status() == 503 {
                continue; // GETs are faulted too; try the same page again.
            }
            assert_eq!(res.status(), 200);
            let v: Value =
                serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            listed += v["data"].as_array().unwrap().len() as u32;
            match v["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => break,
            }
        }
        assert_eq!(listed, created + closed);

        // Idempotency-Key: send until the server answers (503s and closes are faults), then the
        // same key replays; another payload under it is refused with 422.
        let body = r#"{"item":"s121-keyed","amount":1}"#.to_owned();
        let first = loop {
            match client
                .request(post_order(&url, body.clone(), Some("s121-key-1")))
                .await
            {
                Ok(res) if res.status() == 503 => continue,
                Ok(res) => break res,
                Err(_) => continue,
            }
        };
        let first_replayed = first.headers().contains_key("idempotent-replayed");
        assert_eq!(first.status(), 201);
        let first_body = first.into_body().collect().await.unwrap().to_bytes();
        let again = loop {
            match client
                .request(post_order(&url, body.clone(), Some("s121-key-1")))
                .await
            {
                Ok(res) if res.status() == 503 => continue,
                Ok(res) => break res,
                Err(_) => continue,
            }
        };
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        let _ = first_replayed;
        assert_eq!(
            again.into_body().collect().await.unwrap().to_bytes(),
            first_body
        );
        let other = loop {
            match client
                .request(post_order(
                    &url,
                    r#"{"item":"s121-other"}"#.to_owned(),
                    Some("s121-key-1"),
                ))
                .await
            {
                Ok(res) if res.status() == 503 => continue,
                Ok(res) => break res,
                Err(_) => continue,
            }
        };
        assert_eq!(other.status(), 422);
    })
    .await;
    sigint(&s.child.0);
    let st = wait_for(&mut s.child.0, Duration::from_secs(2)).expect("stops on Ctrl-C");
    assert!(st.success(), "{st:?}");
}

// ---------------------------------------------------------------------------------------------
// jitter, small
// ---------------------------------------------------------------------------------------------

const STRATEGIES: [&str; 5] = [
    "no_backoff",
    "exponential",
    "full_jitter",
    "equal_jitter",
    "decorrelated_jitter",
];

/// `jitter --json`: the settings, a `points` array (`strategy`, `clients`, mean `calls`, mean
/// `time_ms`, `calls_range`) and a `runs` array (`seed`, `calls`, `reads`, `conflicts`,
/// `time_ms`, `max_conflicts`), consistent with each other; the plots go to `--out`.
#[test]
fn s121_jitter_json_points_and_runs_agree() {
    let dir = tempdir("jitter-json");
    let (out, took) = run_in(
        Command::new(bin())
            .args(["jitter", "--json", "--clients", "1,4", "--runs", "2"])
            .args(["--seed", "7", "--latency-jitter-ms", "1", "--out"])
            .arg(&dir),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(took < Duration::from_secs(20), "{took:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(v["seed"], 7, "{v}");
    assert_eq!(v["base_ms"], 4);
    assert_eq!(v["cap_ms"], 100);
    assert_eq!(v["latency_ms"], 1);
    assert_eq!(v["latency_jitter_ms"], 1);
    let points = v["points"].as_array().unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(points.len(), 5 * 2);
    assert_eq!(runs.len(), 5 * 2 * 2);
    for r in runs {
        for f in [
            "seed",
            "calls",
            "reads",
            "conflicts",
            "time_ms",
            "max_conflicts",
        ] {
            assert!(r[f].is_u64(), "{f} in {r}");
        }
        let clients = r["clients"].as_u64().unwrap();
        let (calls, reads, conflicts) = (
            r["calls"].as_u64().unwrap(),
            r["reads"].as_u64().unwrap(),
            r["conflicts"].as_u64().unwrap(),
        );
        // Every attempt is a read and a write; every write is a success or a 412.
        assert_eq!(calls, 2 * reads, "{r}");
        assert_eq!(reads, clients + conflicts, "{r}");
        assert!(r["max_conflicts"].as_u64().unwrap() <= conflicts, "{r}");
        if clients == 1 {
            assert_eq!(
                (calls, conflicts),
                (2, 0),
                "a lone client never collides: {r}"
            );
        }
    }
    for s in STRATEGIES {
        for n in [1u64, 4] {
            let p = points
                .iter()
                .find(|p| p["strategy"] == s && p["clients"] == n)
                .unwrap_or_else(|| panic!("no point {s} {n}"));
            let calls: Vec<u64> = runs
                .iter()
                .filter(|r| r["strategy"] == s && r["clients"] == n)
                .map(|r| r["calls"].as_u64().unwrap())
                .collect();
            assert_eq!(calls.len(), 2, "{s} {n}");
            let (lo, hi) = (*calls.iter().min().unwrap(), *calls.iter().max().unwrap());
            assert_eq!(p["calls_range"], serde_json::json!([lo, hi]), "{p}");
            let mean = p["calls"].as_f64().unwrap();
            assert!(mean >= lo as f64 - 0.5 && mean <= hi as f64 + 0.5, "{p}");
        }
    }
    // The plots, and one progress line per N on stderr.
    for f in ["jitter-calls.svg", "jitter-time.svg"] {
        let svg = std::fs::read_to_string(dir.join(f)).expect(f);
        assert!(svg.contains("<svg"), "{f}");
    }
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.contains(" clients: ")).count(),
        2,
        "{stderr}"
    );
    // "one line per N on stderr, with the mean calls of each strategy": the points' figures.
    let line = stderr
        .lines()
        .find(|l| l.starts_with("4 clients: "))
        .unwrap_or_else(|| panic!("no line for N = 4 in {stderr}"));
    let calls_part = line.split("calls: ").nth(1).expect(line);
    for (s, label) in STRATEGIES.iter().zip([
        "no backoff",
        "exponential",
        "full jitter",
        "equal jitter",
        "decorrelated jitter",
    ]) {
        let p = points
            .iter()
            .find(|p| p["strategy"] == *s && p["clients"] == 4)
            .unwrap();
        let shown = calls_part
            .split(", ")
            .find_map(|x| x.strip_prefix(label).map(str::trim))
            .unwrap_or_else(|| panic!("{label} not in {line}"));
        let shown: f64 = shown.parse().unwrap();
        let mean = p["calls"].as_f64().unwrap();
        assert!((shown - mean).abs() <= 0.5, "{label}: {line} vs {p}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--no-plots` writes no plot, even with `--out`; the tables go to stdout.
#[test]
fn s121_jitter_no_plots_writes_nothing() {
    let dir = tempdir("jitter-noplots");
    let (out, _) = run_in(
        Command::new(bin())
            .args([
                "jitter",
                "--clients",
                "2",
                "--runs",
                "1",
                "--no-plots",
                "--out",
            ])
            .arg(&dir),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("calls (reads and writes) until every client has written"));
    assert!(stdout.contains("completion time (ms) until every client has written"));
    assert!(!text(&out.stderr).contains("wrote "));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// The chaos server's public API, from a plain hyper client
// ---------------------------------------------------------------------------------------------

fn demo_knobs() -> sturdy_chaos::Knobs {
    // docs/guides/demo.md: seed 2026, 15 % 503, 10 % of commits closed, one 429 with
    // Retry-After: 1, Idempotency-Key honoured.
    sturdy_chaos::Knobs {
        seed: 2026,
        error_rate: 0.15,
        reset_after_commit_rate: 0.1,
        rate_limit_next: 1,
        idempotency: true,
        ..sturdy_chaos::Knobs::default()
    }
}

fn get_req(url: String) -> http::Request<Full<Bytes>> {
    http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// `ChaosServer::stats` and `ChaosServer::requests` tell the same story as the client saw it:
/// every 503, 429 and closed connection (status 0) is in the log and in the counters, and the
/// committed orders are the 201s plus the closed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s121_stats_and_request_log_agree_with_what_a_plain_client_saw() {
    let server = sturdy_chaos::ChaosServer::start(demo_knobs())
        .await
        .unwrap();
    let client = sturdy_chaos::http_client();
    let url = server.url("/orders");
    let (mut created, mut e503, mut e429, mut closed) = (0u64, 0u64, 0u64, 0u64);
    within(async {
        for i in 0..200 {
            let body = format!(r#"{{"item":"s121-{i}","amount":{i}}}"#);
            match client.request(post_order(&url, body, None)).await {
                Ok(r) if r.status() == 201 => created += 1,
                Ok(r) if r.status() == 503 => e503 += 1,
                Ok(r) if r.status() == 429 => e429 += 1,
                Ok(r) => panic!("unexpected {}", r.status()),
                Err(_) => closed += 1,
            }
        }
    })
    .await;
    let st = server.stats();
    let log = server.requests();
    assert_eq!(st.requests, 200);
    assert_eq!(st.api_requests, 200);
    assert_eq!(log.len(), 200);
    let count = |s: u16| log.iter().filter(|r| r.status == s).count() as u64;
    assert_eq!(count(201), created);
    assert_eq!(count(503), e503);
    assert_eq!(count(429), e429);
    assert_eq!(count(0), closed);
    assert_eq!(st.server_errors, e503);
    assert_eq!(st.rate_limited, e429);
    assert_eq!(e429, 1);
    assert_eq!(st.resets, closed);
    assert_eq!(st.orders_committed, created + closed);
    assert_eq!(server.orders().len() as u64, created + closed);
    assert_eq!((st.duplicates_by_payload, st.replayed), (0, 0));
    assert!(log
        .iter()
        .all(|r| r.method == http::Method::POST && r.path == "/orders"));
    assert!(
        log.windows(2).all(|w| w[0].at <= w[1].at),
        "in order of completion"
    );
}

/// Knobs doc: faults "are checked in this order: ... API version, auth, server quota, the
/// next-N and random 429s, the next-N and random 5xx".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s121_knobs_faults_apply_in_the_documented_order() {
    let server = sturdy_chaos::ChaosServer::start(sturdy_chaos::Knobs {
        rate_limit_next: 1,
        fail_next: 1,
        api_version: Some("2026-01-01".into()),
        require_auth: true,
        ..sturdy_chaos::Knobs::default()
    })
    .await
    .unwrap();
    let client = sturdy_chaos::http_client();
    within(async {
        // No version, no token: the version is checked first.
        let r = client
            .request(get_req(server.url("/orders")))
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        // The version, no token: 401.
        let req = http::Request::get(server.url("/orders"))
            .header("api-version", "2026-01-01")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(client.request(req).await.unwrap().status(), 401);
        // A token.
        let tok = http::Request::post(server.url("/oauth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from_static(
                b"grant_type=client_credentials&client_id=client&client_secret=secret",
            )))
            .unwrap();
        let r = client.request(tok).await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value =
            serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let token = v["access_token"].as_str().unwrap().to_owned();
        let authed = || {
            http::Request::get(server.url("/orders"))
                .header("api-version", "2026-01-01")
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        // The next-N 429 before the next-N 5xx, then through.
        let statuses = [
            client.request(authed()).await.unwrap().status(),
            client.request(authed()).await.unwrap().status(),
            client.request(authed()).await.unwrap().status(),
        ];
        assert_eq!(statuses.map(|s| s.as_u16()), [429, 503, 200]);
        // The 400 and 401 did not use up the next-N faults.
        let st = server.stats();
        assert_eq!(
            (st.rate_limited, st.server_errors, st.unauthorized),
            (1, 1, 1)
        );
    })
    .await;
}

/// `update` while the server runs: every API request then fails, `/health` and `/counter`
/// never; `knobs()` shows the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s121_update_error_rate_one_faults_the_api_only() {
    let server = sturdy_chaos::ChaosServer::start(sturdy_chaos::Knobs::default())
        .await
        .unwrap();
    let client = sturdy_chaos::http_client();
    within(async {
        let r = client
            .request(get_req(server.url("/orders")))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        server.update(|k| {
            k.error_rate = 1.0;
            k.error_status = 500;
        });
        assert_eq!(server.knobs().error_rate, 1.0);
        for _ in 0..10 {
            let r = client
                .request(get_req(server.url("/orders")))
                .await
                .unwrap();
            assert_eq!(r.status(), 500);
            let r = client
                .request(get_req(server.url("/health")))
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let r = client
                .request(get_req(server.url("/counter")))
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["etag"], "\"0\"");
        }
        assert_eq!(server.stats().server_errors, 10);
        assert_eq!(server.counter().reads, 10);
    })
    .await;
}

/// A closed connection after the commit, then the same key again: the order stands once and
/// the retry gets the stored response with `Idempotent-Replayed: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s121_reset_after_commit_then_same_key_replays_once() {
    let server = sturdy_chaos::ChaosServer::start(sturdy_chaos::Knobs {
        reset_after_commit_next: 1,
        idempotency: true,
        ..sturdy_chaos::Knobs::default()
    })
    .await
    .unwrap();
    let client = sturdy_chaos::http_client();
    let url = server.url("/orders");
    let body = r#"{"item":"s121","amount":3}"#.to_owned();
    within(async {
        assert!(client
            .request(post_order(&url, body.clone(), Some("s121-k")))
            .await
            .is_err());
        let r = client
            .request(post_order(&url, body.clone(), Some("s121-k")))
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["idempotent-replayed"], "true");
    })
    .await;
    let st = server.stats();
    assert_eq!(
        (st.orders_committed, st.resets, st.replayed, st.api_requests),
        (1, 1, 1, 2)
    );
    assert_eq!(server.orders().len(), 1);
}

/// `serve` wraps any axum app: 503s and 429s (with `Retry-After: 1`) before the app sees the
/// request, a closed connection after it answered (the side effect stands), and
/// `requests_with_key` counts requests before any fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s121_serve_wraps_an_app_with_the_documented_faults() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/x",
        axum::routing::post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                "done"
            }
        }),
    );
    let post = |url: String| {
        http::Request::post(url)
            .header("idempotency-key", "s121-wrap")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let client = sturdy_chaos::http_client();
    // Every request 503 before the app.
    let s = sturdy_chaos::serve(
        app.clone(),
        sturdy_chaos::Faults {
            error_rate: 1.0,
            ..sturdy_chaos::Faults::default()
        },
    )
    .await
    .unwrap();
    within(async {
        for _ in 0..3 {
            let r = client.request(post(s.url("/x"))).await.unwrap();
            assert_eq!(r.status(), 503);
        }
    })
    .await;
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_eq!((s.stats().requests, s.stats().errors), (3, 3));
    assert_eq!(s.requests_with_key("s121-wrap"), 3);
    drop(s);
    // Every request 429 with Retry-After: 1 before the app.
    let s = sturdy_chaos::serve(
        app.clone(),
        sturdy_chaos::Faults {
            rate_limit_rate: 1.0,
            ..sturdy_chaos::Faults::default()
        },
    )
    .await
    .unwrap();
    within(async {
        let r = client.request(post(s.url("/x"))).await.unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
    })
    .await;
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_eq!(s.stats().rate_limited, 1);
    drop(s);
    // Every connection closed after the app answered.
    let s = sturdy_chaos::serve(
        app,
        sturdy_chaos::Faults {
            reset_after_rate: 1.0,
            ..sturdy_chaos::Faults::default()
        },
    )
    .await
    .unwrap();
    within(async {
        for _ in 0..2 {
            assert!(client.request(post(s.url("/x"))).await.is_err());
        }
    })
    .await;
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert_eq!((s.stats().requests, s.stats().resets), (2, 2));
    assert_eq!(s.requests_with_key("s121-wrap"), 2);
    assert_eq!(s.requests_with_key("s121-other"), 0);
}

/// A reader that stops early (`sturdy-chaos | head -1`): the demo should end quietly (or with
/// a message), never with a panic and its backtrace. ("Results go to stdout", guide.)
#[test]
#[allow(clippy::disallowed_methods)] // a child process in real time
fn s121_demo_stdout_closed_early_does_not_panic() {
    let mut child = Reap(
        Command::new(bin())
            .args(["--orders", "20"])
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    {
        let mut out = BufReader::new(child.0.stdout.take().unwrap());
        out.read_line(&mut first).unwrap();
        // The reader goes away, as `head -1` does.
    }
    assert!(first.starts_with("20 orders against"), "{first}");
    let status = wait_for(&mut child.0, Duration::from_secs(30)).expect("the demo ends");
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{status:?}: {err}");
    assert_ne!(status.code(), Some(101), "{err}");
}
