//! The demo binary, run as a user runs it (reduced sizes): real sockets on 127.0.0.1, real time.

use std::process::{Command, Output};

use serde_json::Value;

fn demo(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_sturdy-chaos"))
        .args(args)
        .output()
        .expect("the demo binary runs");
    assert!(
        out.status.success(),
        "sturdy-chaos {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const CLIENT_FIELDS: [&str; 7] = [
    "succeeded",
    "failed",
    "duplicates",
    "requests",
    "rate_limited",
    "token_requests",
    "wall_ms",
];

#[test]
fn orders_json_is_one_object_and_sturdy_books_each_order_once() {
    let out = demo(&["--json", "--orders", "40"]);
    // Nothing but the JSON object on stdout.
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(v["orders"], 40);
    for id in ["plain", "naive", "sturdy"] {
        let c = &v["clients"][id];
        for f in CLIENT_FIELDS {
            assert!(c[f].is_u64(), "clients.{id}.{f} missing in {c}");
        }
        let (ok, failed) = (c["succeeded"].as_u64(), c["failed"].as_u64());
        assert_eq!(ok.unwrap() + failed.unwrap(), 40, "{id}");
        // Each client meets the one injected 429.
        assert_eq!(c["rate_limited"], 1, "{id}");
    }
    let sturdy = &v["clients"]["sturdy"];
    assert_eq!(sturdy["failed"], 0);
    assert_eq!(sturdy["duplicates"], 0);
    assert_eq!(sturdy["succeeded"], 40);
    assert_eq!(sturdy["committed"], 40);
    // It waited for Retry-After: 1 instead of hammering.
    assert!(sturdy["wall_ms"].as_u64().unwrap() >= 1_000);
    // What the other two show (the faults are seeded and the orders sequential).
    assert!(v["clients"]["plain"]["failed"].as_u64().unwrap() > 0);
    assert!(v["clients"]["naive"]["duplicates"].as_u64().unwrap() > 0);

    // Progress went to stderr: one line per client, with its count.
    let err = String::from_utf8_lossy(&out.stderr);
    for name in [
        "plain hyper client",
        "naive retry loop",
        "sturdy ClientBuilder",
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(name) && l.contains("40/40 orders")),
            "no progress line for {name} in {err}"
        );
    }
}

#[test]
fn orders_table_keeps_its_columns() {
    let out = demo(&["--orders", "20"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("client "))
        .expect("a header");
    let cols: Vec<&str> = lines[header].split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "client",
            "ok",
            "failed",
            "requests",
            "committed",
            "duplicates"
        ]
    );
    for (i, name) in [
        "plain hyper client",
        "naive retry loop",
        "sturdy ClientBuilder",
    ]
    .into_iter()
    .enumerate()
    {
        let row = lines[header + 1 + i];
        assert!(row.starts_with(name), "{row}");
        let nums: Vec<u64> = row[name.len()..]
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(nums.len(), 5, "{row}");
        assert_eq!(nums[0] + nums[1], 20, "{row}");
    }
    let sturdy: Vec<&str> = lines[header + 3].split_whitespace().collect();
    // ok 20, failed 0, committed 20, duplicates 0.
    assert_eq!(
        (sturdy[2], sturdy[3], sturdy[5], sturdy[6]),
        ("20", "0", "20", "0")
    );
}

#[test]
fn bad_arguments_are_refused_with_the_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_sturdy-chaos"))
        .args(["--orders", "zero"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--orders takes a whole number"), "{err}");
    assert!(err.contains("usage:"), "{err}");
    assert!(out.stdout.is_empty());
}
