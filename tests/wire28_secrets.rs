//! Credentials in a request (bearer token, API key, basic credentials, URL user info, a query
//! key) kept out of every error text, `Debug` output, summary, event and `tracing` line, whatever
//! the hostile peer does.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::HeaderName;
use sturdy::auth::AuthLayer;
use sturdy::core::events::Event;
use sturdy::core::summary::tool_result;
use sturdy::ClientBuilder;
use tower::ServiceExt;

use crate::wire28_util::*;

const SECRETS: [&str; 6] = [
    "tok-SECRET-A",
    "SECRET-B",
    "pw-SECRET-C",
    "SECRET-D",
    "SECRET-E",
    "userinfo-name",
];

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
    type Writer = Self;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn auth(which: usize) -> AuthLayer {
    match which {
        0 => AuthLayer::bearer("tok-SECRET-A").unwrap(),
        1 => AuthLayer::api_key(HeaderName::from_static("x-api-key"), "SECRET-B").unwrap(),
        _ => AuthLayer::basic("someone", "pw-SECRET-C").unwrap(),
    }
}

/// Calls `p` with every credential kind, capturing errors, events and tracing output, and checks
/// that no secret shows anywhere. Returns how many calls failed.
async fn leak_check(p: &Peer, attempt: Duration) -> usize {
    let logs = Buf::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = crate::logs13_common::set_default(subscriber);
    let events = Arc::new(Mutex::new(String::new()));
    let mut failed = 0;
    for which in 0..3 {
        let ev = events.clone();
        let ev2 = events.clone();
        let ev3 = events.clone();
        let client = ClientBuilder::new()
            .with_retry(quick_retry().on_event(move |e: &Event<'_>| {
                ev.lock().unwrap().push_str(&format!("{e:?}\n"));
            }))
            .with_rate_limit(quick_limiter().on_event(move |e: &Event<'_>| {
                ev2.lock().unwrap().push_str(&format!("{e:?}\n"));
            }))
            .with_circuit_breaker(
                sturdy::circuit::CircuitBreakerLayer::new()
                    .with_consecutive_failures(3)
                    .on_event(move |e: &Event<'_>| {
                        ev3.lock().unwrap().push_str(&format!("{e:?}\n"));
                    }),
            )
            .with_auth(auth(which))
            .with_attempt_timeout(attempt)
            .build(hyper_client());
        let url = format!(
            "http://userinfo-name:SECRET-D@{}/v1/orders?api_key=SECRET-E",
            p.addr
        );
        for req in [get(&url), post(&url)] {
            let out = within(5, client.clone().oneshot(req)).await;
            if let Err(err) = out {
                failed += 1;
                let mut texts = every_text(&*err);
                texts += &tool_result::<serde_json::Value>(Err(err)).to_string();
                for s in SECRETS {
                    assert!(!texts.contains(s), "{s} in the error: {texts}");
                }
            }
        }
    }
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    // sturdy's own lines (hyper-util's TRACE lines print its pool key, URL user info included:
    // that is the HTTP client's logging, outside sturdy).
    let ours: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(2)
                .is_some_and(|t| t.starts_with("sturdy"))
        })
        .collect();
    assert!(!ours.is_empty(), "no sturdy line captured: {logs}");
    let logs = ours.join("\n");
    let events = events.lock().unwrap().clone();
    for s in SECRETS {
        assert!(!logs.contains(s), "{s} in tracing output: {logs}");
        assert!(!events.contains(s), "{s} in events: {events}");
    }
    // The server did get the credentials (the check is not vacuous).
    let heads = p.seen.heads().join("\n");
    assert!(heads.contains("tok-SECRET-A") || p.seen.requests() == 0);
    failed
}

#[tokio::test(flavor = "current_thread")]
async fn wire28_secrets_not_in_errors_after_resets() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.reset();
    })
    .await;
    assert_eq!(leak_check(&p, Duration::from_millis(300)).await, 6);
}

#[tokio::test(flavor = "current_thread")]
async fn wire28_secrets_not_in_errors_after_stalls() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.wait_close().await;
    })
    .await;
    assert_eq!(leak_check(&p, Duration::from_millis(40)).await, 6);
}

#[tokio::test(flavor = "current_thread")]
async fn wire28_secrets_not_in_errors_after_garbage() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 2x0 \x00\x01 SECRET?\r\nno colon\r\n\r\n")
                .await;
        }
    })
    .await;
    assert_eq!(leak_check(&p, Duration::from_millis(300)).await, 6);
}

#[tokio::test(flavor = "current_thread")]
async fn wire28_secrets_not_in_errors_after_a_huge_retry_after() {
    let p = answering(
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 99999999999\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(leak_check(&p, Duration::from_millis(300)).await, 6);
}

#[tokio::test(flavor = "current_thread")]
async fn wire28_secrets_not_in_errors_after_refused_connections() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = Peer {
        addr: port,
        seen: Seen::default(),
    };
    assert_eq!(leak_check(&p, Duration::from_millis(300)).await, 6);
}

#[tokio::test(flavor = "current_thread")]
async fn wire28_secrets_not_in_errors_after_an_open_breaker() {
    // Three hard failures open the breaker; the later calls fail with CircuitOpen.
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
        c.reset();
    })
    .await;
    let failed = leak_check(&p, Duration::from_millis(300)).await;
    assert!(failed >= 1);
}
