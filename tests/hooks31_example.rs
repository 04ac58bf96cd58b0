//! `examples/webhook_receiver.rs` run as a binary (built by `cargo build --example
//! webhook_receiver --features full`): its header read literally, deliveries of the three
//! schemes over the wire, the JSON lines it prints, and what it says when it cannot start.
#![cfg(feature = "full")]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sturdy::webhook::{sign_github, sign_standard, sign_stripe};

use crate::hooks31_util::{exchange, head, now_s, status_of, STD_SECRET};

const STRIPE: &str = "whsec_hooks31_example_stripe_secret";
const GITHUB: &str = "hooks31-example-github-secret";

fn example_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe
        .parent()?
        .parent()?
        .join("examples")
        .join("webhook_receiver");
    if bin.is_file() {
        Some(bin)
    } else {
        eprintln!("skipped: {} is not built", bin.display());
        None
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The example, running, with its stdout and stderr lines on channels; killed (by its pid) on
/// drop.
struct Running {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    err_seen: Vec<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn start(bin: &PathBuf, env: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new(bin);
    for v in [
        "STANDARD_WEBHOOK_SECRET",
        "STRIPE_WEBHOOK_SECRET",
        "GITHUB_WEBHOOK_SECRET",
        "WEBHOOK_ALLOWED_SOURCES",
        "WEBHOOK_TRUSTED_PROXIES",
        "STURDY_ADDR",
    ] {
        cmd.env_remove(v);
    }
    let mut child = cmd
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    Running {
        child,
        out,
        err,
        err_seen: Vec::new(),
    }
}

impl Running {
    /// Waits for a stderr line containing `what`.
    fn wait_err(&mut self, what: &str) -> String {
        loop {
            match self.err.recv_timeout(Duration::from_secs(20)) {
                Ok(l) => {
                    self.err_seen.push(l.clone());
                    if l.contains(what) {
                        return l;
                    }
                }
                Err(e) => panic!("no {what:?} on stderr ({e}); saw {:?}", self.err_seen),
            }
        }
    }
    fn next_out(&self, wait: Duration) -> Option<String> {
        self.out.recv_timeout(wait).ok()
    }
}

fn post(path: &str, headers: &[(&str, &[u8])], body: &str) -> Vec<u8> {
    let mut b = head(path, headers, body.len());
    b.extend_from_slice(body.as_bytes());
    b
}

/// The header: "prints one JSON line per event on stdout: `{"route":"stripe","id":"evt_..."}`
/// (GitHub events also say their `X-GitHub-Event`)", "Routes: `POST /webhooks/standard`,
/// `/webhooks/stripe`, `/webhooks/github` (each mounted when its secret is set)". Each scheme's
/// delivery over the wire is answered 200 and printed once; its copy is answered 200 and not
/// printed again; a forged one is 401; a route whose secret is unset is 404; nothing it writes
/// shows a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks31_example_prints_one_line_per_event_of_each_scheme() {
    let Some(bin) = example_bin() else { return };
    let port = free_port();
    let addr_s = format!("127.0.0.1:{port}");
    let mut app = start(
        &bin,
        &[
            ("STURDY_ADDR", &addr_s),
            ("STANDARD_WEBHOOK_SECRET", STD_SECRET),
            ("STRIPE_WEBHOOK_SECRET", STRIPE),
        ],
    );
    let listening = app.wait_err("listening on");
    assert!(
        listening.contains(&addr_s)
            && listening.contains("/webhooks/standard")
            && listening.contains("/webhooks/stripe")
            && !listening.contains("github"),
        "{listening}"
    );
    let addr = addr_s.parse().unwrap();
    let ts = now_s();
    let body = "{\"type\":\"ping\"}";
    let sig = sign_standard(STD_SECRET, "msg_hooks31_ex", ts, body.as_bytes()).unwrap();
    let standard = post(
        "/webhooks/standard",
        &[
            ("webhook-id", b"msg_hooks31_ex"),
            ("webhook-timestamp", ts.to_string().as_bytes()),
            ("webhook-signature", sig.as_bytes()),
        ],
        body,
    );
    let sbody = "{\"id\":\"evt_hooks31_ex\",\"object\":\"event\"}";
    let stripe = post(
        "/webhooks/stripe",
        &[(
            "stripe-signature",
            sign_stripe(STRIPE, ts, sbody.as_bytes()).as_bytes(),
        )],
        sbody,
    );
    for (what, bytes, line) in [
        (
            "standard",
            &standard,
            "{\"route\":\"standard\",\"id\":\"msg_hooks31_ex\"}",
        ),
        (
            "stripe",
            &stripe,
            "{\"route\":\"stripe\",\"id\":\"evt_hooks31_ex\"}",
        ),
    ] {
        let a = exchange(addr, bytes).await;
        assert_eq!(status_of(&a), 200, "{what}: {a}");
        assert_eq!(app.next_out(Duration::from_secs(10)).as_deref(), Some(line));
        let a = exchange(addr, bytes).await;
        assert_eq!(status_of(&a), 200, "{what} copy: {a}");
    }
    let forged = post(
        "/webhooks/stripe",
        &[(
            "stripe-signature",
            format!("t={ts},v1={}", "0".repeat(64)).as_bytes(),
        )],
        sbody,
    );
    assert_eq!(status_of(&exchange(addr, &forged).await), 401);
    let gh = post(
        "/webhooks/github",
        &[("x-hub-signature-256", sign_github(GITHUB, b"{}").as_bytes())],
        "{}",
    );
    assert_eq!(status_of(&exchange(addr, &gh).await), 404);
    assert_eq!(
        app.next_out(Duration::from_millis(300)),
        None,
        "copies printed"
    );
    drop(app);

    // GitHub alone: its line says the event.
    let port = free_port();
    let addr_s = format!("127.0.0.1:{port}");
    let mut app = start(
        &bin,
        &[("STURDY_ADDR", &addr_s), ("GITHUB_WEBHOOK_SECRET", GITHUB)],
    );
    app.wait_err("listening on");
    let gbody = "{\"zen\":\"hooks31\"}";
    let gh = post(
        "/webhooks/github",
        &[
            (
                "x-hub-signature-256",
                sign_github(GITHUB, gbody.as_bytes()).as_bytes(),
            ),
            ("x-github-event", b"ping"),
            ("x-github-delivery", b"d-hooks31"),
        ],
        gbody,
    );
    let a = exchange(addr_s.parse().unwrap(), &gh).await;
    assert_eq!(status_of(&a), 200, "{a}");
    let line = app.next_out(Duration::from_secs(10)).expect("a line");
    assert!(
        line.starts_with("{\"route\":\"github\",\"id\":\"sha256:")
            && line.ends_with(",\"event\":\"ping\"}"),
        "{line}"
    );
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "ping");
    let seen = app.err_seen.join("\n");
    for secret in [
        STD_SECRET,
        STRIPE,
        GITHUB,
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ] {
        assert!(!seen.contains(secret), "{seen}");
    }
}

fn run_to_end(bin: &PathBuf, env: &[(&str, &str)]) -> (bool, String) {
    let mut app = start(bin, env);
    let status = {
        let mut waited = 0;
        loop {
            if let Some(s) = app.child.try_wait().unwrap() {
                break s;
            }
            waited += 1;
            assert!(waited < 2_000, "the example is still running: {env:?}");
            std::thread::park_timeout(Duration::from_millis(10));
        }
    };
    let mut err = Vec::new();
    while let Ok(l) = app.err.recv_timeout(Duration::from_secs(2)) {
        err.push(l);
    }
    (status.success(), err.join("\n"))
}

/// The example stops at start with a sentence naming the cause: no secret at all (the three
/// variables named), a Standard Webhooks secret that is not base64 (without repeating it), and
/// an address already taken.
#[test]
fn hooks31_example_stops_at_start_with_the_reason() {
    let Some(bin) = example_bin() else { return };
    let (ok, err) = run_to_end(&bin, &[("STURDY_ADDR", "127.0.0.1:0")]);
    assert!(!ok);
    for v in [
        "STANDARD_WEBHOOK_SECRET",
        "STRIPE_WEBHOOK_SECRET",
        "GITHUB_WEBHOOK_SECRET",
    ] {
        assert!(err.contains(v), "{err}");
    }
    let bad = "whsec_hooks31*not*base64*secret";
    let (ok, err) = run_to_end(
        &bin,
        &[
            ("STURDY_ADDR", "127.0.0.1:0"),
            ("STANDARD_WEBHOOK_SECRET", bad),
        ],
    );
    eprintln!("bad secret: {err}");
    assert!(!ok);
    assert!(!err.contains("hooks31*not"), "{err}");
    assert!(err.to_lowercase().contains("base64"), "{err}");
    assert!(
        err.starts_with("webhook_receiver: "),
        "a sentence, not a Debug: {err}"
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (ok, err) = run_to_end(
        &bin,
        &[("STURDY_ADDR", &addr), ("GITHUB_WEBHOOK_SECRET", GITHUB)],
    );
    eprintln!("address taken: {err}");
    assert!(!ok);
    assert!(err.to_lowercase().contains("in use"), "{err}");
    let (ok, err) = run_to_end(
        &bin,
        &[
            ("STURDY_ADDR", "not-an-address"),
            ("GITHUB_WEBHOOK_SECRET", GITHUB),
        ],
    );
    eprintln!("bad address: {err}");
    assert!(!ok);
    assert!(!err.contains(GITHUB), "{err}");
}

/// "error messages name the cause": a start refused for a setting says which setting, and the
/// value when it is no secret: an unparsable `STURDY_ADDR` names the variable and the address, a
/// secret that is not base64 names its variable. (Found as a doubt: each said only "invalid
/// socket address" or "the webhook secret is not base64".)
#[test]
fn hooks31_example_start_errors_name_the_variable() {
    let Some(bin) = example_bin() else { return };
    let (ok, err) = run_to_end(
        &bin,
        &[
            ("STURDY_ADDR", "not-an-address"),
            ("GITHUB_WEBHOOK_SECRET", GITHUB),
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("STURDY_ADDR") && err.contains("not-an-address"),
        "{err}"
    );
    let (ok, err) = run_to_end(
        &bin,
        &[
            ("STURDY_ADDR", "127.0.0.1:0"),
            ("STANDARD_WEBHOOK_SECRET", "whsec_hooks31*not*base64"),
            ("STRIPE_WEBHOOK_SECRET", STRIPE),
        ],
    );
    assert!(!ok);
    assert!(err.contains("STANDARD_WEBHOOK_SECRET"), "{err}");
}

/// The header: "`WEBHOOK_ALLOWED_SOURCES` ... accepts deliveries only from those networks":
/// run as a binary, a delivery from loopback is refused (403 `forbidden`) when loopback is not
/// listed, and taken when it is; an `X-Forwarded-For` from loopback, not a trusted proxy, is
/// ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks31_example_source_allowlist_over_the_wire() {
    let Some(bin) = example_bin() else { return };
    let gbody = "{\"zen\":\"allow\"}";
    let sig = sign_github(GITHUB, gbody.as_bytes());
    for (allowed, status) in [("10.0.0.0/8, 192.0.2.0/24", 403), ("127.0.0.0/8", 200)] {
        let addr_s = format!("127.0.0.1:{}", free_port());
        let mut app = start(
            &bin,
            &[
                ("STURDY_ADDR", &addr_s),
                ("GITHUB_WEBHOOK_SECRET", GITHUB),
                ("WEBHOOK_ALLOWED_SOURCES", allowed),
            ],
        );
        app.wait_err("listening on");
        let gh = post(
            "/webhooks/github",
            &[
                ("x-hub-signature-256", sig.as_bytes()),
                ("x-github-event", b"ping"),
                ("x-forwarded-for", b"10.1.2.3"),
            ],
            gbody,
        );
        let a = exchange(addr_s.parse().unwrap(), &gh).await;
        assert_eq!(status_of(&a), status, "{allowed}: {a}");
        if status == 403 {
            assert_eq!(crate::hooks31_util::body_of(&a).trim(), "forbidden");
            assert_eq!(app.next_out(Duration::from_millis(300)), None);
        } else {
            assert!(app.next_out(Duration::from_secs(10)).is_some());
        }
    }
}
