//! Round s50a: delivery truth over a real loopback socket. A raw peer of this file reads the
//! request and resets, reads and stalls, closes (or resets) before reading, answers half a head
//! or garbage; a port with no listener refuses. Through `sturdy::ClientBuilder`'s default stack
//! (with and without its idempotency keys) and the retry layer alone over a plain hyper-util
//! client, the final error must never say "not sent" when the request may have reached the
//! server, must say it when the connection was refused, and must name the cause; an unkeyed POST
//! is not retried after a possible commit, a keyed one is, with one key. Real time, ms settings.
#![cfg(feature = "full")]
#![allow(deprecated)] // `set_linger(0)` is how a peer sends a reset.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::core::classify::{classify_error, delivery};
use sturdy::core::{find, BoxError, Delivery, Error as SturdyError, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, ServiceExt};

/// What the peer does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Reads the whole request, then resets the connection (RST).
    ReadThenReset,
    /// Reads the whole request, then closes it cleanly (FIN) without answering.
    ReadThenClose,
    /// Reads the whole request and never answers (holds the socket).
    ReadThenStall,
    /// Closes at once, before reading anything.
    CloseBeforeRead,
    /// Resets at once, before reading anything.
    ResetBeforeRead,
    /// Reads the request, answers half a head, closes.
    HalfHead,
    /// Reads the request, answers a line that is not HTTP, closes.
    Garbage,
    /// Reads the head only, then resets while the body is on its way.
    ResetMidBody,
}

struct Peer {
    addr: std::net::SocketAddr,
    /// Requests read in full (the server "has" them).
    requests: Arc<Mutex<Vec<String>>>,
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Peer {
    async fn start(fault: Fault) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let conns = Arc::new(AtomicUsize::new(0));
        let (r2, c2) = (requests.clone(), conns.clone());
        let task = tokio::spawn(async move {
            let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                c2.fetch_add(1, Ordering::SeqCst);
                let (r3, held) = (r2.clone(), held.clone());
                tokio::spawn(async move { serve(s, fault, r3, held).await });
            }
        });
        Self {
            addr,
            requests,
            conns,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/orders", self.addr)
    }

    fn seen(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Reads a head, and the body its Content-Length announces (unless `head_only`).
async fn read_request(s: &mut TcpStream, head_only: bool) -> Option<String> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    if head_only {
        return Some(head);
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Some(head)
}

async fn serve(
    mut s: TcpStream,
    fault: Fault,
    requests: Arc<Mutex<Vec<String>>>,
    held: Arc<Mutex<Vec<TcpStream>>>,
) {
    match fault {
        Fault::CloseBeforeRead => drop(s),
        Fault::ResetBeforeRead => {
            let _ = s.set_linger(Some(Duration::ZERO));
            drop(s);
        }
        Fault::ResetMidBody => {
            if let Some(h) = read_request(&mut s, true).await {
                requests.lock().unwrap().push(h);
            }
            let _ = s.set_linger(Some(Duration::ZERO));
            drop(s);
        }
        _ => {
            let Some(h) = read_request(&mut s, false).await else {
                return;
            };
            requests.lock().unwrap().push(h);
            match fault {
                Fault::ReadThenReset => {
                    let _ = s.set_linger(Some(Duration::ZERO));
                }
                Fault::ReadThenClose => {
                    let _ = s.shutdown().await;
                }
                Fault::ReadThenStall => held.lock().unwrap().push(s),
                Fault::HalfHead => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").await;
                    let _ = s.shutdown().await;
                }
                Fault::Garbage => {
                    let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
                    let _ = s.shutdown().await;
                }
                _ => unreachable!(),
            }
        }
    }
}

fn fast_retry() -> RetryLayer {
    RetryLayer::new()
        .with_seed(50)
        .with_backoff(Backoff::decorrelated_jitter(ms(5), ms(20)).unwrap())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn post(url: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap()
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the call hung past the test's bound")
}

/// A port nobody listens on.
async fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/orders")
}

fn sturdy_err(err: &BoxError) -> &SturdyError {
    find::<SturdyError>(&**err).unwrap_or_else(|| panic!("no sturdy Error: {err:?}"))
}

const MAYBE: [Fault; 6] = [
    Fault::ReadThenReset,
    Fault::ReadThenClose,
    Fault::ReadThenStall,
    Fault::HalfHead,
    Fault::Garbage,
    Fault::ResetMidBody,
];

/// An unkeyed POST (the default stack without idempotency keys) after the server read it: one
/// request on the wire, "may have been processed", never "not sent".
#[tokio::test]
async fn an_unkeyed_post_the_server_read_is_not_retried_and_not_called_unsent() {
    for fault in MAYBE {
        let peer = Peer::start(fault).await;
        let client = ClientBuilder::new()
            .without_idempotency()
            .with_retry(fast_retry())
            .with_attempt_timeout(ms(200))
            .build(sturdy_chaos::http_client());
        let body = if fault == Fault::ResetMidBody {
            Bytes::from(vec![b'x'; 512 * 1024])
        } else {
            Bytes::from_static(b"{\"item\":\"book\"}")
        };
        let err = bounded(client.oneshot(post(&peer.url(), body)))
            .await
            .expect_err("the peer never answers properly");
        tokio::time::sleep(ms(50)).await;
        let msg = err.to_string();
        assert_eq!(
            peer.seen().len(),
            1,
            "{fault:?}: an unkeyed POST was sent again: {msg}"
        );
        assert_eq!(
            peer.conns.load(Ordering::SeqCst),
            1,
            "{fault:?}: reconnected: {msg}"
        );
        assert_eq!(
            delivery(&*err),
            Delivery::MaybeProcessed,
            "{fault:?}: {msg}"
        );
        let e = sturdy_err(&err);
        let rep = e
            .report()
            .unwrap_or_else(|| panic!("{fault:?}: no report: {msg}"));
        assert_eq!(rep.delivery(), Delivery::MaybeProcessed, "{fault:?}: {msg}");
        assert_eq!(rep.attempts(), 1, "{fault:?}: {msg}");
        assert_eq!(rep.idempotency_key(), None, "{fault:?}: {msg}");
        assert!(!msg.contains("not sent"), "{fault:?}: {msg}");
        assert!(msg.contains("may have been processed"), "{fault:?}: {msg}");
        assert_ne!(
            classify_error(&*err),
            ErrorKind::Connect,
            "{fault:?}: {msg}"
        );
        if fault == Fault::ReadThenStall {
            assert_eq!(*e.kind(), ErrorKind::Timeout, "{msg}");
            assert!(msg.contains("timed out after 200ms"), "{msg}");
        }
        if fault == Fault::ReadThenReset {
            assert!(msg.contains("reset"), "{fault:?}: cause not named: {msg}");
        }
    }
}

/// The same faults before the server read anything (closed or reset at once): the client cannot
/// tell that from a close after reading, so it must not say "not sent" either, and an unkeyed
/// POST is not sent again.
#[tokio::test]
async fn a_connection_closed_before_reading_is_not_called_unsent() {
    for fault in [Fault::CloseBeforeRead, Fault::ResetBeforeRead] {
        let peer = Peer::start(fault).await;
        let client = ClientBuilder::new()
            .without_idempotency()
            .with_retry(fast_retry())
            .with_attempt_timeout(ms(200))
            .build(sturdy_chaos::http_client());
        let err = bounded(client.oneshot(post(&peer.url(), Bytes::from_static(b"{}"))))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert_eq!(
            delivery(&*err),
            Delivery::MaybeProcessed,
            "{fault:?}: {msg}"
        );
        assert!(!msg.contains("not sent"), "{fault:?}: {msg}");
        assert_eq!(
            peer.conns.load(Ordering::SeqCst),
            1,
            "{fault:?}: an unkeyed POST was tried again: {msg}"
        );
    }
}

/// With the default stack's keys, the same faults are retried: 4 attempts, one key on every
/// attempt, the key in the report and the message.
#[tokio::test]
async fn a_keyed_post_is_retried_after_a_possible_commit_with_one_key() {
    for fault in [
        Fault::ReadThenReset,
        Fault::ReadThenStall,
        Fault::HalfHead,
        Fault::ReadThenClose,
    ] {
        let peer = Peer::start(fault).await;
        let client = ClientBuilder::new()
            .with_retry(fast_retry())
            .with_attempt_timeout(ms(150))
            .without_circuit_breaker()
            .build(sturdy_chaos::http_client());
        let err = bounded(client.oneshot(post(&peer.url(), Bytes::from_static(b"{}"))))
            .await
            .unwrap_err();
        let msg = err.to_string();
        let seen = peer.seen();
        assert_eq!(seen.len(), 4, "{fault:?}: {msg}");
        let keys: Vec<String> = seen
            .iter()
            .map(|h| {
                h.lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("idempotency-key")
                            .then(|| v.trim().to_owned())
                    })
                    .expect("no key sent")
            })
            .collect();
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        let e = sturdy_err(&err);
        let rep = e.report().unwrap();
        assert_eq!(rep.attempts(), 4, "{fault:?}: {msg}");
        assert_eq!(rep.delivery(), Delivery::MaybeProcessed, "{msg}");
        assert_eq!(rep.idempotency_key(), Some(keys[0].as_str()), "{msg}");
        assert!(msg.contains("gave up after 4 attempts"), "{fault:?}: {msg}");
        assert!(
            msg.contains(&format!("retry with the same idempotency key {}", keys[0])),
            "{fault:?}: {msg}"
        );
    }
}

/// A refused connection proves the request never left: retried even unkeyed, "not sent", the
/// message names "connection refused" and says it is safe to send again.
#[tokio::test]
async fn a_refused_connection_is_not_sent_and_says_so() {
    let url = refused_url().await;
    for keyed in [false, true] {
        let b = ClientBuilder::new()
            .with_retry(fast_retry())
            .without_circuit_breaker();
        let client = if keyed {
            b.build(sturdy_chaos::http_client()).boxed_clone()
        } else {
            b.without_idempotency()
                .build(sturdy_chaos::http_client())
                .boxed_clone()
        };
        let err = bounded(client.oneshot(post(&url, Bytes::from_static(b"{}"))))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert_eq!(delivery(&*err), Delivery::NotSent, "{msg}");
        assert_eq!(classify_error(&*err), ErrorKind::Connect, "{msg}");
        let e = sturdy_err(&err);
        assert_eq!(*e.kind(), ErrorKind::Connect, "{msg}");
        assert_eq!(e.report().unwrap().delivery(), Delivery::NotSent, "{msg}");
        assert!(msg.contains("connection refused"), "{msg}");
        assert!(
            msg.contains("the request was not sent, so it is safe to send again"),
            "{msg}"
        );
        assert!(!msg.contains("may have been processed"), "{msg}");
    }
}

/// The retry layer alone over a plain hyper-util client (no `AttemptTimeoutLayer`, no breaker):
/// the same truths.
#[tokio::test]
async fn the_retry_layer_alone_over_hyper_tells_the_truth() {
    for fault in [Fault::ReadThenReset, Fault::HalfHead, Fault::ReadThenClose] {
        let peer = Peer::start(fault).await;
        let svc = fast_retry().layer(sturdy_chaos::http_client());
        let err: BoxError = bounded(svc.oneshot(post(&peer.url(), Bytes::from_static(b"{}"))))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert_eq!(peer.seen().len(), 1, "{fault:?}: {msg}");
        assert_eq!(
            delivery(&*err),
            Delivery::MaybeProcessed,
            "{fault:?}: {msg}"
        );
        assert!(!msg.contains("not sent"), "{fault:?}: {msg}");

        // GET: retried freely, 4 times.
        let svc = fast_retry().layer(sturdy_chaos::http_client());
        let err: BoxError =
            bounded(svc.oneshot(Request::get(peer.url()).body(Full::default()).unwrap()))
                .await
                .unwrap_err();
        let msg = err.to_string();
        assert_eq!(peer.seen().len(), 5, "{fault:?}: {msg}");
        assert!(msg.contains("gave up after 4 attempts"), "{msg}");
        assert_eq!(
            delivery(&*err),
            Delivery::MaybeProcessed,
            "{fault:?}: {msg}"
        );
    }
    let url = refused_url().await;
    let svc = fast_retry().layer(sturdy_chaos::http_client());
    let err: BoxError = bounded(svc.oneshot(post(&url, Bytes::from_static(b"{}"))))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert_eq!(delivery(&*err), Delivery::NotSent, "{msg}");
    assert!(msg.contains("connection refused"), "{msg}");
    assert!(msg.contains("gave up after 4 attempts"), "{msg}");
}

/// Refused first (not sent), then a server that read the request and reset: the call as a whole
/// may have been processed, whatever the last attempt was.
#[tokio::test]
async fn a_refusal_after_a_possible_commit_does_not_make_the_call_unsent() {
    // A GET on a peer that reads and resets, then the peer goes away (refused).
    let peer = Peer::start(Fault::ReadThenReset).await;
    let url = peer.url();
    let seen = peer.requests.clone();
    let svc = RetryLayer::new()
        .with_seed(50)
        .with_backoff(Backoff::decorrelated_jitter(ms(100), ms(100)).unwrap())
        .layer(sturdy_chaos::http_client());
    let call = tokio::spawn(svc.oneshot(Request::get(url).body(Full::default()).unwrap()));
    // Wait until the first attempt was read, then close the listener.
    let t0 = tokio::time::Instant::now();
    while seen.lock().unwrap().is_empty() && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(ms(2)).await;
    }
    drop(peer);
    tokio::time::sleep(ms(20)).await;
    let err: BoxError = bounded(call).await.unwrap().unwrap_err();
    let msg = err.to_string();
    assert_eq!(seen.lock().unwrap().len(), 1, "{msg}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{msg}");
    let e = sturdy_err(&err);
    assert_eq!(
        e.report().unwrap().delivery(),
        Delivery::MaybeProcessed,
        "{msg}"
    );
    assert!(msg.contains("connection refused"), "{msg}");
}

/// The `sturdy-chaos` server: an order committed, then its connection closed; the default
/// stack retries with the same key and the order exists once only when the server honours keys.
#[tokio::test]
async fn chaos_reset_after_commit_with_and_without_keys() {
    use sturdy_chaos::{ChaosServer, Knobs};
    // Without a key: one order, an error that says it may have been processed.
    let server = ChaosServer::start(Knobs {
        reset_after_commit_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = ClientBuilder::new()
        .without_idempotency()
        .with_retry(fast_retry())
        .build(sturdy_chaos::http_client());
    let err = bounded(client.oneshot(post(
        &server.url("/orders"),
        Bytes::from_static(br#"{"item":"book","amount":1}"#),
    )))
    .await
    .unwrap_err();
    assert_eq!(server.stats().orders_committed, 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(err.to_string().contains("may have been processed"), "{err}");

    // With keys and a server that honours them: retried, one order, success.
    let server = ChaosServer::start(Knobs {
        reset_after_commit_next: 2,
        idempotency: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .build(sturdy_chaos::http_client());
    let res: Response<_> = bounded(client.oneshot(post(
        &server.url("/orders"),
        Bytes::from_static(br#"{"item":"book","amount":1}"#),
    )))
    .await
    .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(server.stats().orders_committed, 1);
}

/// A keyed POST whose body is over the replay limit (2 MiB > 1 MiB) "is sent once and never
/// retried"; the server read its head and reset: may have been processed, with the key.
#[tokio::test]
async fn a_keyed_post_over_the_replay_limit_is_sent_once_and_reported_truthfully() {
    let peer = Peer::start(Fault::ResetMidBody).await;
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .without_circuit_breaker()
        .with_attempt_timeout(ms(500))
        .build(sturdy_chaos::http_client());
    let err = bounded(client.oneshot(post(&peer.url(), Bytes::from(vec![b'x'; 2 << 20]))))
        .await
        .unwrap_err();
    let msg = err.to_string();
    tokio::time::sleep(ms(50)).await;
    assert_eq!(peer.conns.load(Ordering::SeqCst), 1, "{msg}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{msg}");
    let e = sturdy_err(&err);
    let key = e
        .report()
        .and_then(|r| r.idempotency_key())
        .map(str::to_owned);
    assert!(key.is_some(), "no key in the report: {msg}");
    assert!(!msg.contains("not sent"), "{msg}");
    assert!(msg.contains(key.as_deref().unwrap()), "{msg}");
}
