//! README.md and docs/guides/demo.md, read literally: the `sturdy-chaos` binary run the way the
//! docs say (the table, `--json`, `--orders`, `--serve`, `jitter` and its options).
//!
//! The tests run the binary built next to the suite (`cargo build -p sturdy-chaos`); they skip
//! with a message when it is not built.
#![allow(clippy::disallowed_methods)] // waits on a child process in real time

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::words30_util::{chaos_bin, run_chaos, text};

/// README.md:47-50 and demo.md:39-44: the table's figures, row by row, and the summary line.
/// demo.md:55: "these figures repeat from run to run; only the times vary".
#[test]
fn the_default_demo_prints_the_documented_table_and_summary() {
    let Some(bin) = chaos_bin() else { return };
    let out = run_chaos(&bin, &[]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(
            "200 orders against an API that fails 15% of calls with 503, closes 10% of\n\
             connections after committing the order, and answers one 429 with Retry-After: 1.\n"
        ),
        "{stdout}"
    );
    for row in [
        "client                          ok  failed  requests  committed  duplicates",
        "plain hyper client             157      43       200        173           0",
        "naive retry loop               200       0       256        220          20",
        "sturdy ClientBuilder           200       0       254        200           0",
        "sturdy: 35 injected 5xx, 18 closed connections and 1 429 ridden out; 18 responses replayed by key.",
    ] {
        assert!(
            stdout.lines().any(|l| l.trim_end() == row),
            "missing {row:?} in\n{stdout}"
        );
    }
    // README.md:53: "43 orders it cannot tell apart from the 16 that were in fact committed".
    assert_eq!(173 - 157, 16);
    // demo.md:11: results go to stdout, progress to stderr; demo.md:61-67: not a terminal, so
    // one line per client when that client is done.
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    for (line, (name, ok, failed)) in lines.iter().zip([
        ("plain hyper client", 157, 43),
        ("naive retry loop", 200, 0),
        ("sturdy ClientBuilder", 200, 0),
    ]) {
        assert!(
            line.starts_with(&format!("{name}: 200/200 orders sent in ")),
            "{line}"
        );
        assert!(
            line.ends_with(&format!(" ms ({ok} succeeded, {failed} failed)")),
            "{line}"
        );
    }
    assert!(!stdout.contains("orders sent in"), "progress on stdout");
}

/// demo.md:76-114 and README.md:57-58: `--json` prints one JSON object and nothing else, with
/// the documented fields per client, and figures equal to the table's.
#[test]
fn json_prints_one_object_with_the_documented_fields_and_figures() {
    let Some(bin) = chaos_bin() else { return };
    let out = run_chaos(&bin, &["--json"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    let v: Value =
        serde_json::from_str(&stdout).expect("stdout is one JSON object and nothing else");
    assert_eq!(v["orders"], 200);
    let clients = v["clients"].as_object().unwrap();
    let mut keys: Vec<&String> = clients.keys().collect();
    keys.sort();
    assert_eq!(keys, ["naive", "plain", "sturdy"]);
    let expect = [
        ("plain", "plain hyper client", 157, 43, 0, 200, 173),
        ("naive", "naive retry loop", 200, 0, 20, 256, 220),
        ("sturdy", "sturdy ClientBuilder", 200, 0, 0, 254, 200),
    ];
    for (key, name, ok, failed, dup, requests, committed) in expect {
        let c = &clients[key];
        let mut fields: Vec<&String> = c.as_object().unwrap().keys().collect();
        fields.sort();
        assert_eq!(
            fields,
            [
                "committed",
                "duplicates",
                "failed",
                "name",
                "rate_limited",
                "requests",
                "succeeded",
                "token_requests",
                "wall_ms"
            ],
            "{key}"
        );
        assert_eq!(c["name"], name);
        assert_eq!(c["succeeded"], ok, "{key}");
        assert_eq!(c["failed"], failed, "{key}");
        assert_eq!(c["duplicates"], dup, "{key}");
        assert_eq!(c["requests"], requests, "{key}");
        assert_eq!(c["committed"], committed, "{key}");
        // "answers one request with 429": the server sent one 429 per run.
        assert_eq!(c["rate_limited"], 1, "{key}");
        // "this scenario requires no credentials, so it is 0 for every client".
        assert_eq!(c["token_requests"], 0, "{key}");
        assert!(c["wall_ms"].is_u64(), "{key}");
    }
    // demo.md:70: "about a second for the 429's Retry-After: 1": sturdy waits at least that.
    assert!(clients["sturdy"]["wall_ms"].as_u64().unwrap() >= 1000);
    // Progress still goes to stderr.
    assert!(text(&out.stderr).contains("sturdy ClientBuilder: 200/200 orders sent in"));
}

/// demo.md:116: "`--orders N` changes the number of orders per client (the tests run 40 and 20)".
#[test]
fn orders_n_changes_the_number_of_orders_per_client() {
    let Some(bin) = chaos_bin() else { return };
    let out = run_chaos(&bin, &["--orders", "20", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["orders"], 20);
    for key in ["plain", "naive", "sturdy"] {
        let c = &v["clients"][key];
        let ok = c["succeeded"].as_u64().unwrap();
        let failed = c["failed"].as_u64().unwrap();
        assert_eq!(ok + failed, 20, "{key}: {c}");
        assert!(c["requests"].as_u64().unwrap() >= 20, "{key}");
    }
    // sturdy books each order exactly once.
    assert_eq!(v["clients"]["sturdy"]["committed"], 20);
    assert_eq!(v["clients"]["sturdy"]["duplicates"], 0);
    assert_eq!(v["clients"]["sturdy"]["succeeded"], 20);
}

/// demo.md:11-12: "`--help` lists every option": each option the guide names is in it.
#[test]
fn help_lists_every_option_the_guide_names() {
    let Some(bin) = chaos_bin() else { return };
    let out = run_chaos(&bin, &["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout) + &text(&out.stderr);
    for option in [
        "--json",
        "--orders",
        "--serve",
        "jitter",
        "--clients",
        "--runs",
        "--out",
        "--no-plots",
        "--seed",
        "--base-ms",
        "--cap-ms",
        "--latency-ms",
        "--latency-jitter-ms",
    ] {
        assert!(
            help.contains(option),
            "--help does not list {option}:\n{help}"
        );
    }
    // The defaults the guide states are the ones --help states.
    for default in [
        "[200]",
        "[10,25,50,75,100]",
        "[2]",
        "[2015]",
        "[4]",
        "[100]",
        "[1]",
    ] {
        assert!(help.contains(default), "{default} not in\n{help}");
    }
}

/// A user who mistypes an option is told which one, and the run fails (no silent default).
#[test]
fn a_bad_option_is_named_and_fails() {
    let Some(bin) = chaos_bin() else { return };
    let out = run_chaos(&bin, &["--orders", "0"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--orders"), "{out:?}");
    let out = run_chaos(&bin, &["--bogus"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--bogus"), "{out:?}");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout for an error: {out:?}"
    );
}

/// README.md:55-56 and demo.md:120-125: `--serve` keeps the chaos server running, prints its
/// address and knobs (the demo's faults: seed 2026, 15 % 503, 10 % closed after commit, one 429
/// with Retry-After: 1, idempotency on), and runs until Ctrl-C.
#[test]
fn serve_prints_address_and_the_demo_knobs_and_stops_on_ctrl_c() {
    let Some(bin) = chaos_bin() else { return };
    let mut child = Command::new(&bin)
        .arg("--serve")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !printed.contains("Ctrl-C") && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            printed.push_str(&line);
            printed.push('\n');
        }
    }
    let addr = printed
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .map(|a| a.trim_end_matches('/').to_owned());
    let Some(addr) = addr else {
        let _ = child.kill();
        panic!("no address printed:\n{printed}");
    };
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    for knob in [
        "seed: 2026",
        "error_rate: 0.15",
        "error_status: 503",
        "rate_limit_next: 1",
        "reset_after_commit_rate: 0.1",
        "idempotency: true",
    ] {
        assert!(printed.contains(knob), "{knob} not printed:\n{printed}");
    }
    // The server answers while it runs.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /health HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    // Still running; Ctrl-C (SIGINT) stops it cleanly.
    assert!(
        child.try_wait().unwrap().is_none(),
        "--serve exited by itself"
    );
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("--serve did not stop on Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// demo.md:224-228: `jitter --json` prints the settings, a `points` array (`strategy`,
/// `clients`, mean `calls`, mean `time_ms`, `calls_range`) and a `runs` array (`seed`, `calls`,
/// `reads`, `conflicts`, `time_ms`, `max_conflicts`); demo.md:145 and 155-160: base 4 ms, cap
/// 100 ms, seed 2015, five strategies; demo.md:156: calls are reads and writes.
#[test]
fn jitter_json_has_the_documented_shape_and_settings() {
    let Some(bin) = chaos_bin() else { return };
    let out = run_chaos(
        &bin,
        &[
            "jitter",
            "--clients",
            "3,4",
            "--runs",
            "2",
            "--no-plots",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(v["seed"], 2015, "{v}");
    assert_eq!(v["base_ms"], 4);
    assert_eq!(v["cap_ms"], 100);
    assert_eq!(
        v["latency_ms"], 1,
        "every request waits at least 1 ms by default"
    );
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 10, "five strategies x two N");
    let mut strategies: Vec<&str> = points
        .iter()
        .map(|p| p["strategy"].as_str().unwrap())
        .collect();
    strategies.sort();
    strategies.dedup();
    assert_eq!(
        strategies,
        [
            "decorrelated_jitter",
            "equal_jitter",
            "exponential",
            "full_jitter",
            "no_backoff"
        ]
    );
    for p in points {
        let n = p["clients"].as_u64().unwrap();
        assert!(n == 3 || n == 4, "{p}");
        let calls = p["calls"].as_f64().unwrap();
        let range = p["calls_range"].as_array().unwrap();
        let (lo, hi) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
        assert!(lo <= calls && calls <= hi, "mean outside its range: {p}");
        // Every client reads and writes at least once.
        assert!(lo >= 2.0 * n as f64, "{p}");
        assert!(p["time_ms"].is_number(), "{p}");
    }
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 20, "two runs per point");
    for r in runs {
        for field in [
            "seed",
            "calls",
            "reads",
            "conflicts",
            "time_ms",
            "max_conflicts",
        ] {
            assert!(r.get(field).is_some(), "{field} missing in {r}");
        }
        let n = r["clients"].as_u64().unwrap_or(0);
        let calls = r["calls"].as_u64().unwrap();
        let reads = r["reads"].as_u64().unwrap();
        let conflicts = r["conflicts"].as_u64().unwrap();
        // calls = reads and writes; writes = one success per client plus the conflicts.
        if n > 0 {
            assert_eq!(calls, reads + n + conflicts, "{r}");
        }
        assert!(r["max_conflicts"].as_u64().unwrap() <= conflicts, "{r}");
    }
    // demo.md:187-188: one line per N on stderr with the mean calls of each strategy.
    let stderr = text(&out.stderr);
    let per_n: Vec<&str> = stderr.lines().filter(|l| l.contains("clients:")).collect();
    assert_eq!(per_n.len(), 2, "{stderr}");
    for name in [
        "no backoff",
        "exponential",
        "full jitter",
        "equal jitter",
        "decorrelated jitter",
    ] {
        assert!(per_n.iter().all(|l| l.contains(name)), "{stderr}");
    }
}

/// demo.md:161-180: the command prints the two tables with the documented headings and columns.
/// demo.md:186-187: `--out DIR` writes the two plots there, `--no-plots` not at all.
#[test]
fn jitter_prints_both_tables_and_writes_plots_where_told() {
    let Some(bin) = chaos_bin() else { return };
    let dir = std::env::temp_dir().join(format!("words30-jitter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = run_chaos(
        &bin,
        &[
            "jitter",
            "--clients",
            "3",
            "--runs",
            "1",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("calls (reads and writes) until every client has written"),
        "{stdout}"
    );
    assert!(
        stdout.contains("completion time (ms) until every client has written"),
        "{stdout}"
    );
    let header = "clients          no backoff         exponential         full jitter        equal jitter decorrelated jitter";
    assert_eq!(
        stdout.lines().filter(|l| l.trim_end() == header).count(),
        2,
        "{stdout}"
    );
    for plot in ["jitter-calls.svg", "jitter-time.svg"] {
        let svg = std::fs::read_to_string(dir.join(plot)).unwrap();
        assert!(svg.contains("<svg"), "{plot}");
    }
    let none = dir.join("none");
    std::fs::create_dir_all(&none).unwrap();
    let out = run_chaos(
        &bin,
        &[
            "jitter",
            "--clients",
            "2",
            "--runs",
            "1",
            "--out",
            none.to_str().unwrap(),
            "--no-plots",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_dir(&none).unwrap().count(),
        0,
        "--no-plots wrote a plot"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// demo.md:187: "`--no-plots` not at all": given before `--out DIR`, the plots are written
/// anyway (the later `--out` silently turns them back on), where a user who asked for no plots
/// expects none, or an error for the contradiction.
#[test]
fn no_plots_wins_over_a_later_out() {
    let Some(bin) = chaos_bin() else { return };
    let dir = std::env::temp_dir().join(format!("words30-noplots-{}", std::process::id()));
    let none = dir.join("none");
    std::fs::create_dir_all(&none).unwrap();
    let out = run_chaos(
        &bin,
        &[
            "jitter",
            "--clients",
            "2",
            "--runs",
            "1",
            "--no-plots",
            "--out",
            none.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_dir(&none).unwrap().count(),
        0,
        "--no-plots wrote a plot"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
