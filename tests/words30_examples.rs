//! examples/*.rs, their `//!` docs read literally, run as the docs say (the binaries built by
//! `cargo build --example <name> --features full`; skipped when not built).
#![allow(clippy::disallowed_methods)] // waits on a child process in real time

use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use crate::words30_util::{example_bin, text};

/// Runs `bin` with `env` for at most `limit`; `None` when it was still running (then killed).
fn run_for(
    bin: &std::path::Path,
    env: &[(&str, &str)],
    limit: Duration,
) -> Option<std::process::Output> {
    let mut cmd = Command::new(bin);
    cmd.current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "STANDARD_WEBHOOK_SECRET",
        "STRIPE_WEBHOOK_SECRET",
        "GITHUB_WEBHOOK_SECRET",
        "WEBHOOK_ALLOWED_SOURCES",
        "WEBHOOK_TRUSTED_PROXIES",
        "STURDY_API_URL",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// examples/agent_tool.rs:8-16: 45 orders walked 20 at a time (20, 20, 5), then the failure
/// "rate limited by ...; retry after 2m", with `isError: true` and the facts under
/// `structuredContent.error`.
#[test]
fn agent_tool_walks_45_orders_20_at_a_time_then_shows_the_rate_limit() {
    let Some(bin) = example_bin("agent_tool") else {
        return;
    };
    let out = run_for(&bin, &[], Duration::from_secs(120)).expect("agent_tool ends");
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    let pages: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("isError=false"))
        .collect();
    assert_eq!(
        pages,
        [
            "isError=false items=20 has_more=true",
            "isError=false items=20 has_more=true",
            "isError=false items=5 has_more=false"
        ],
        "{stdout}"
    );
    assert!(stdout.contains("; retry after 2m"), "{stdout}");
    assert!(stdout.contains("\"isError\": true"), "{stdout}");
    assert!(stdout.contains("\"retry_after_ms\": 120000"), "{stdout}");
}

/// examples/webhook_receiver.rs:15-18: "A bad network stops the app at start, with the reason"
/// (WEBHOOK_ALLOWED_SOURCES).
#[test]
fn webhook_receiver_stops_on_a_bad_allowed_source() {
    let Some(bin) = example_bin("webhook_receiver") else {
        return;
    };
    let out = run_for(
        &bin,
        &[
            ("STURDY_ADDR", "127.0.0.1:0"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_dGVzdA=="),
            ("WEBHOOK_ALLOWED_SOURCES", "10.0.0.0/8,bogus"),
        ],
        Duration::from_secs(30),
    )
    .expect("a bad network stops the app at start");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("bogus"), "{out:?}");
}

/// examples/webhook_receiver.rs:16-18: "`WEBHOOK_TRUSTED_PROXIES` (comma-separated networks)
/// names the proxies whose `X-Forwarded-For` is read. A bad network stops the app at start".
/// Set without WEBHOOK_ALLOWED_SOURCES, a bad value was ignored and the app served; now proxies
/// alone stop the app with a sentence that names the value.
#[test]
fn webhook_receiver_stops_on_a_bad_trusted_proxy() {
    let Some(bin) = example_bin("webhook_receiver") else {
        return;
    };
    let out = run_for(
        &bin,
        &[
            ("STURDY_ADDR", "127.0.0.1:0"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_dGVzdA=="),
            ("WEBHOOK_TRUSTED_PROXIES", "bogus"),
        ],
        Duration::from_secs(10),
    );
    let Some(out) = out else {
        panic!("the app started and served with WEBHOOK_TRUSTED_PROXIES=bogus");
    };
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("bogus"), "{out:?}");
}
