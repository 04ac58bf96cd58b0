//! The jitter experiment of the demo binary at a reduced size: real sockets on 127.0.0.1, real
//! time, the debug build, beside the crate's other tests. It checks only what holds there too: at
//! 100 clients no backoff makes the most calls. The jittered strategies' lead over exponential
//! backoff is a result of the release build on a machine that is not busy (demo guide, "How far
//! to trust the figures"): in this debug build with both cores kept busy by two other loops, one
//! run (AMD EPYC, 2026-12-05) gave no backoff 4,677 calls, exponential 1,696 and the jittered
//! strategies 1,776 to 2,218, and a CI run once put full jitter above exponential.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn calls(points: &[Value], strategy: &str, clients: u64) -> u64 {
    points
        .iter()
        .find(|p| p["strategy"] == strategy && p["clients"] == clients)
        .and_then(|p| p["calls"].as_u64())
        .unwrap_or_else(|| panic!("no point for {strategy} at {clients}"))
}

#[test]
fn jitter_shows_the_blogs_result_and_draws_it() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("jitter-plots");
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_sturdy-chaos"))
        .args([
            "jitter",
            "--json",
            "--clients",
            "10,100",
            "--runs",
            "3",
            "--out",
            dir.to_str().unwrap(),
        ])
        .output()
        .expect("the demo binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 10);
    assert_eq!(v["runs"].as_array().unwrap().len(), 30);
    for p in points {
        for f in ["strategy", "clients", "calls", "time_ms", "calls_range"] {
            assert!(!p[f].is_null(), "{f} missing in {p}");
        }
        // Each client wrote once: at least a read and a write each.
        assert!(p["calls"].as_u64().unwrap() >= 2 * p["clients"].as_u64().unwrap());
    }

    // At 100 clients no backoff makes the most calls, by a wide margin (about 4,700 against at
    // most 2,300 in every run, busy or not).
    let n = 100;
    let none = calls(points, "no_backoff", n);
    for other in [
        "exponential",
        "full_jitter",
        "equal_jitter",
        "decorrelated_jitter",
    ] {
        let c = calls(points, other, n);
        assert!(c < none, "{other} made {c} calls, no backoff {none}");
    }

    for (file, title) in [
        ("jitter-calls.svg", "Calls until every client has written"),
        ("jitter-time.svg", "Time until every client has written"),
    ] {
        let svg = std::fs::read_to_string(dir.join(file)).expect("the plot was written");
        assert!(svg.starts_with("<svg"), "{file}");
        assert!(svg.contains(title), "{file}");
        for legend in [
            "no backoff",
            "exponential",
            "full jitter",
            "equal jitter",
            "decorrelated jitter",
        ] {
            assert!(svg.contains(legend), "{file} has no {legend}");
        }
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("100 clients: 15 runs"), "{err}");
    assert!(err.contains("wrote "), "{err}");
}
