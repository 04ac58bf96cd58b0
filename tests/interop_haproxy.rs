//! Interop: sturdy's retries, timeouts and error classification against HAProxy fault proxies
//! (started by `scripts/interop.sh` on loopback, in front of a node origin that counts what it
//! processed).
//!
//! Frontends (interop/conf/haproxy.cfg.in):
//! - `normal`: forwards; the origin's `/truncate-odd` cuts every odd body short, `/crash-odd`
//!   drops the connection of every odd request after counting it (HAProxy answers 502);
//! - `reset`: reads each request, closes the connection without an answer;
//! - `flaky_reset`: the same for every odd request, forwards every even one;
//! - `commit_drop`: forwards every request; drops every odd response silently (the client waits);
//! - `stall`: forwards to a black hole (no answer for 30 s);
//! - `flaky_stall`: every odd request to the black hole, every even one forwarded;
//! - `gateway_timeout`: the black hole behind a 300 ms server timeout: 504;
//! - `tcp_reject`: resets each TCP connection as soon as it is accepted.
//!
//! The alternating frontends count requests, so the tests that use them run one at a time and
//! leave their frontend with the next request odd.
use crate::interop_common;
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use interop_common::*;
use sturdy::core::classify::{classify_error, delivery};
use sturdy::core::{CallOptions, Delivery, ErrorKind, ErrorSummary};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::ServiceExt;

const NORMAL: &str = "STURDY_INTEROP_HAPROXY_NORMAL_URL";
const RESET: &str = "STURDY_INTEROP_HAPROXY_RESET_URL";
const FLAKY_RESET: &str = "STURDY_INTEROP_HAPROXY_FLAKY_RESET_URL";
const COMMIT_DROP: &str = "STURDY_INTEROP_HAPROXY_COMMIT_DROP_URL";
const STALL: &str = "STURDY_INTEROP_HAPROXY_STALL_URL";
const FLAKY_STALL: &str = "STURDY_INTEROP_HAPROXY_FLAKY_STALL_URL";
const GATEWAY_TIMEOUT: &str = "STURDY_INTEROP_HAPROXY_GATEWAY_TIMEOUT_URL";
const TCP_REJECT: &str = "STURDY_INTEROP_HAPROXY_TCP_REJECT_URL";
const BACKEND: &str = "STURDY_INTEROP_BACKEND_URL";

/// The alternating frontends keep a request counter: one test at a time uses them.
pub(crate) static ALTERNATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sends plain GETs (no sturdy) until one succeeds: the alternating frontend's next request is
/// then odd (faulty).
pub(crate) async fn align(base: &str, stall: bool) {
    for _ in 0..3 {
        let fut = http().request(get(&format!("{base}/align")));
        let res = if stall {
            match tokio::time::timeout(Duration::from_millis(300), fut).await {
                Ok(r) => r,
                Err(_) => continue,
            }
        } else {
            fut.await
        };
        if let Ok(res) = res {
            if res.status() == StatusCode::OK {
                return;
            }
        }
    }
    panic!("could not align the alternating frontend at {base}");
}

/// What the origin behind HAProxy processed at `path`: hits and hits per idempotency key.
async fn processed(backend: &str, path: &str) -> serde_json::Value {
    get_json(&format!("{backend}/count?path={path}")).await
}

fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    format!(
        "/{name}-{pid}-{}-{}",
        N.fetch_add(1, Ordering::Relaxed),
        Instant::now().elapsed().as_nanos()
    )
}

// ---- what a plain hyper-util client sees, classified by sturdy-core ----

/// The raw errors of each fault, as the HTTP client reports them, classify as the docs say:
/// a closed or reset connection is `Transport` and may have been processed; a refused
/// connection is `Connect` and proves the request was not sent.
#[tokio::test]
async fn raw_faults_classify_correctly() {
    let reset = peer_or_skip!(RESET);
    let tcp_reject = peer_or_skip!(TCP_REJECT);

    let err = bounded(
        Duration::from_secs(5),
        "GET through the resetting frontend",
        http().request(get(&format!("{reset}/raw"))),
    )
    .await
    .unwrap_err();
    assert_eq!(
        classify_error(&err),
        ErrorKind::Transport,
        "{}",
        chain(&err)
    );
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert!(!delivery(&err).proves_not_sent());
    let s = ErrorSummary::of(&err);
    assert!(s.retryable && s.may_have_been_processed, "{s:?}");

    let err = bounded(
        Duration::from_secs(5),
        "GET through the TCP-rejecting frontend",
        http().request(get(&format!("{tcp_reject}/raw"))),
    )
    .await
    .unwrap_err();
    // The reset races with the client: it lands during the connect (hyper-util's connect error:
    // nothing was sent) or after the request was written (a broken transfer). Either way the
    // kind and the delivery agree.
    match classify_error(&err) {
        ErrorKind::Connect => assert_eq!(delivery(&err), Delivery::NotSent),
        ErrorKind::Transport => assert_eq!(delivery(&err), Delivery::MaybeProcessed),
        other => panic!("{other:?}: {}", chain(&err)),
    }

    // A port nobody listens on: refused, so never sent.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = bounded(
        Duration::from_secs(5),
        "GET to a closed port",
        http().request(get(&format!("http://127.0.0.1:{closed}/raw"))),
    )
    .await
    .unwrap_err();
    assert_eq!(classify_error(&err), ErrorKind::Connect, "{}", chain(&err));
    assert!(delivery(&err).proves_not_sent());
    assert!(!ErrorSummary::of(&err).may_have_been_processed);
}

// ---- retries through HAProxy ----

/// Every odd request is closed without an answer: each GET succeeds on its second attempt.
#[tokio::test]
async fn get_is_retried_through_intermittent_resets() {
    let base = peer_or_skip!(FLAKY_RESET);
    let _serial = ALTERNATING.lock().await;
    align(&base, false).await;
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(7))
        .with_attempt_timeout(Duration::from_secs(2))
        .build(wire_svc);
    for i in 0..4 {
        let res = bounded(
            Duration::from_secs(10),
            "GET through intermittent resets",
            client.clone().oneshot(get(&format!("{base}/flaky-get"))),
        )
        .await
        .unwrap_or_else(|e| panic!("call {i}: {}", chain(&*e)));
        assert_eq!(res.status(), 200);
        text(res).await;
    }
    let all = wire.all();
    assert_eq!(all.len(), 8, "two attempts per call: {all:?}");
    assert_eq!(all.iter().filter(|e| e.outcome.is_err()).count(), 4);
}

/// A keyed POST is retried after a reset, with the same key; the origin processed it once (the
/// reset one never reached it).
#[tokio::test]
async fn keyed_post_is_retried_through_intermittent_resets() {
    let base = peer_or_skip!(FLAKY_RESET);
    let backend = peer_or_skip!(BACKEND);
    let _serial = ALTERNATING.lock().await;
    align(&base, false).await;
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(7))
        .with_attempt_timeout(Duration::from_secs(2))
        .build(wire_svc);
    let path = unique("keyed-post");
    let res = bounded(
        Duration::from_secs(10),
        "keyed POST through intermittent resets",
        client.oneshot(post(&format!("{base}{path}"), r#"{"order":1}"#)),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    let all = wire.all();
    assert_eq!(all.len(), 2, "{all:?}");
    let keys: Vec<_> = all
        .iter()
        .map(|e| e.headers.get("idempotency-key").cloned())
        .collect();
    assert!(
        keys[0].is_some() && keys[0] == keys[1],
        "one key for both: {keys:?}"
    );
    let seen = processed(&backend, &path).await;
    assert_eq!(seen["hits"], 1, "{seen}");
}

/// A POST without an idempotency key is not retried after a reset that may have followed the
/// send; the error says it may have been processed.
#[tokio::test]
async fn unkeyed_post_is_not_retried_after_a_reset() {
    let base = peer_or_skip!(RESET);
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new()
        .without_idempotency()
        .with_attempt_timeout(Duration::from_secs(2))
        .build(wire_svc);
    let err = bounded(
        Duration::from_secs(10),
        "unkeyed POST through resets",
        client.oneshot(post(&format!("{base}/unkeyed"), r#"{"order":2}"#)),
    )
    .await
    .unwrap_err();
    eprintln!("unkeyed POST, reset: {err}");
    assert_eq!(wire.len(), 1, "sent once: {:?}", wire.all());
    assert_eq!(
        classify_error(&*err),
        ErrorKind::Transport,
        "{}",
        chain(&*err)
    );
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let s = ErrorSummary::of(&*err);
    assert!(s.may_have_been_processed, "{s:?}");
    assert_eq!(s.idempotency_key, None);
    assert!(
        err.to_string().contains("may have been processed"),
        "the message says so: {err}"
    );
}

/// Resets on every request: a GET gives up after the default 4 attempts with a message that
/// names the cause, well within its bound.
#[tokio::test]
async fn get_gives_up_after_four_attempts_of_resets() {
    let base = peer_or_skip!(RESET);
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(3))
        .build(wire_svc);
    let err = bounded(
        Duration::from_secs(30),
        "GET through constant resets",
        client.oneshot(get(&format!("{base}/always"))),
    )
    .await
    .unwrap_err();
    assert_eq!(wire.len(), 4, "{:?}", wire.all());
    let msg = err.to_string();
    eprintln!("resets: {msg}");
    assert!(msg.starts_with("gave up after 4 attempts"), "{msg}");
    let s = ErrorSummary::of(&*err);
    assert_eq!((s.kind, s.attempts), ("transport", Some(4)), "{s:?}");
    assert!(s.retryable && s.may_have_been_processed, "{s:?}");
}

/// A proxy that resets at accept: each GET attempt fails; the call gives up after 4 attempts and
/// nothing hangs.
#[tokio::test]
async fn tcp_reject_fails_fast_and_classifies() {
    let base = peer_or_skip!(TCP_REJECT);
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(5))
        .build(wire_svc);
    let err = bounded(
        Duration::from_secs(30),
        "GET through TCP rejects",
        client.oneshot(get(&format!("{base}/tcp"))),
    )
    .await
    .unwrap_err();
    assert_eq!(wire.len(), 4, "{:?}", wire.all());
    let s = ErrorSummary::of(&*err);
    eprintln!("tcp reject: {err}");
    // Reset during the connect (not sent) or after the write (maybe processed): see
    // `raw_faults_classify_correctly`. The summary agrees with the last attempt's kind... but
    // the call's delivery covers every attempt.
    assert!(matches!(s.kind, "transport" | "connect"), "{s:?}");
    assert!(s.retryable, "{s:?}");
    let maybe_sent = wire
        .all()
        .iter()
        .any(|e| e.kind.as_ref() != Some(&ErrorKind::Connect));
    assert_eq!(
        s.may_have_been_processed,
        maybe_sent,
        "the call's delivery covers every attempt: {:?}",
        wire.all()
    );
}

/// An unkeyed POST through the same: retried while each attempt was refused during the connect
/// (proved not sent), stopped at the first attempt that may have been written.
#[tokio::test]
async fn tcp_reject_unkeyed_post_retried_only_while_proved_not_sent() {
    let base = peer_or_skip!(TCP_REJECT);
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new()
        .without_idempotency()
        .with_retry(RetryLayer::new().with_seed(29))
        .build(wire_svc);
    let err = bounded(
        Duration::from_secs(30),
        "unkeyed POST through TCP rejects",
        client.oneshot(post(&format!("{base}/tcp-post"), "{}")),
    )
    .await
    .unwrap_err();
    let kinds: Vec<_> = wire.all().iter().map(|e| e.kind.clone()).collect();
    eprintln!("tcp reject POST: {err}; attempts {kinds:?}");
    let first_maybe = kinds
        .iter()
        .position(|k| k.as_ref() != Some(&ErrorKind::Connect));
    match first_maybe {
        Some(i) => {
            assert_eq!(
                kinds.len(),
                i + 1,
                "no attempt after one that may have been sent"
            );
            assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
        }
        None => {
            assert_eq!(
                kinds.len(),
                4,
                "refused connects prove nothing was sent: retried"
            );
            assert_eq!(delivery(&*err), Delivery::NotSent);
            assert!(err.to_string().contains("not sent"), "{err}");
        }
    }
}

// ---- stalls and timeouts ----

/// A stalled attempt is cut at the attempt timeout and the GET retried; the next attempt goes
/// through.
#[tokio::test]
async fn stalled_get_is_cut_by_the_attempt_timeout_and_retried() {
    let base = peer_or_skip!(FLAKY_STALL);
    let _serial = ALTERNATING.lock().await;
    align(&base, true).await;
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(11))
        .with_attempt_timeout(Duration::from_millis(300))
        .build(wire_svc);
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(10),
        "GET through an intermittent stall",
        client.oneshot(get(&format!("{base}/flaky-stall"))),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The stalled attempt was abandoned by the timeout (the recorder never saw it finish).
    assert_eq!(wire.len(), 1, "{:?}", wire.all());
}

/// Constant stalls: every attempt times out; the call ends within its deadline with kind
/// `Timeout`, maybe processed.
#[tokio::test]
async fn constant_stall_ends_within_the_deadline() {
    let base = peer_or_skip!(STALL);
    let (wire_svc, _wire) = recorded(http());
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_seed(13)
                .with_deadline(Duration::from_millis(1_500)),
        )
        .with_attempt_timeout(Duration::from_millis(250))
        .build(wire_svc);
    let start = Instant::now();
    let err = bounded(
        Duration::from_secs(10),
        "GET through a constant stall",
        client.oneshot(get(&format!("{base}/stall"))),
    )
    .await
    .unwrap_err();
    let took = start.elapsed();
    eprintln!(
        "constant stall: {err} ({took:?}); {:?}",
        ErrorSummary::of(&*err)
    );
    assert!(took <= Duration::from_millis(1_800), "{took:?}");
    assert_eq!(
        classify_error(&*err),
        ErrorKind::Timeout,
        "{}",
        chain(&*err)
    );
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let s = ErrorSummary::of(&*err);
    assert!(s.retryable && s.may_have_been_processed, "{s:?}");
}

/// The per-request attempt timeout (`CallOptions`) bounds an attempt through a stalling proxy
/// too, with retries off.
#[tokio::test]
async fn per_request_attempt_timeout_bounds_a_stall() {
    let base = peer_or_skip!(STALL);
    let client = ClientBuilder::new().build(http());
    let mut req = get(&format!("{base}/stall-options"));
    req.extensions_mut().insert(
        CallOptions::new()
            .without_retries()
            .with_attempt_timeout(Duration::from_millis(200)),
    );
    let start = Instant::now();
    let err = bounded(Duration::from_secs(5), "one attempt", client.oneshot(req))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(1_000),
        "{took:?}"
    );
    assert_eq!(classify_error(&*err), ErrorKind::Timeout);
}

/// HAProxy drops the answer after the origin processed a keyed POST; the attempt timeout fires,
/// the POST is retried with the same key, and the origin saw that one key twice.
#[tokio::test]
async fn keyed_post_is_retried_after_a_dropped_answer() {
    let base = peer_or_skip!(COMMIT_DROP);
    let backend = peer_or_skip!(BACKEND);
    let _serial = ALTERNATING.lock().await;
    align(&base, true).await;
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(17))
        .with_attempt_timeout(Duration::from_millis(400))
        .build(http());
    let path = unique("commit-keyed");
    let res = bounded(
        Duration::from_secs(10),
        "keyed POST, first answer dropped",
        client.oneshot(post(&format!("{base}{path}"), r#"{"order":3}"#)),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    let seen = processed(&backend, &path).await;
    assert_eq!(seen["hits"], 2, "processed twice under one key: {seen}");
    let keys = seen["keys"].as_object().unwrap();
    assert_eq!(keys.len(), 1, "{seen}");
}

/// The same without a key: one attempt, cut by the attempt timeout, not retried; the error says
/// it may have been processed (it was).
#[tokio::test]
async fn unkeyed_post_is_not_retried_after_a_dropped_answer() {
    let base = peer_or_skip!(COMMIT_DROP);
    let backend = peer_or_skip!(BACKEND);
    let _serial = ALTERNATING.lock().await;
    align(&base, true).await;
    let client = ClientBuilder::new()
        .without_idempotency()
        .with_attempt_timeout(Duration::from_millis(400))
        .build(http());
    let path = unique("commit-unkeyed");
    let err = bounded(
        Duration::from_secs(10),
        "unkeyed POST, answer dropped",
        client.oneshot(post(&format!("{base}{path}"), r#"{"order":4}"#)),
    )
    .await
    .unwrap_err();
    eprintln!("unkeyed POST, dropped answer: {err}");
    let seen = processed(&backend, &path).await;
    assert_eq!(seen["hits"], 1, "not retried: {seen}");
    assert_eq!(
        classify_error(&*err),
        ErrorKind::Timeout,
        "{}",
        chain(&*err)
    );
    let s = ErrorSummary::of(&*err);
    assert!(s.may_have_been_processed, "{s:?}");
    assert!(err.to_string().contains("may have been processed"), "{err}");
    // Leave the frontend with its next request odd.
    align(&base, true).await;
}

/// HAProxy answers 504 after its server timeout: the GET is retried (504 is retryable) and the
/// last 504 comes back as the response; a POST without a key gets the 504 after one attempt.
#[tokio::test]
async fn gateway_timeouts_are_retried_for_get_and_returned() {
    let base = peer_or_skip!(GATEWAY_TIMEOUT);
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .build(wire_svc);
    let res = bounded(
        Duration::from_secs(30),
        "GET through 504s",
        client.clone().oneshot(get(&format!("{base}/gw"))),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(wire.len(), 4, "{:?}", wire.all());

    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new().without_idempotency().build(wire_svc);
    let res = bounded(
        Duration::from_secs(10),
        "unkeyed POST through 504",
        client.oneshot(post(&format!("{base}/gw-post"), "{}")),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(wire.len(), 1);
}

/// The origin drops every odd connection after counting the request; HAProxy answers 502. A GET
/// is retried and succeeds; an unkeyed POST gets the 502 as is.
#[tokio::test]
async fn bad_gateway_after_an_origin_crash() {
    let base = peer_or_skip!(NORMAL);
    let backend = peer_or_skip!(BACKEND);
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(23))
        .build(wire_svc);
    // The origin's counter for /crash-odd is shared: align it on an even count first.
    let before = processed(&backend, "/crash-odd").await["hits"]
        .as_u64()
        .unwrap();
    if before % 2 == 1 {
        let _ = http().request(get(&format!("{base}/crash-odd"))).await;
    }
    let res = bounded(
        Duration::from_secs(10),
        "GET through a crashing origin",
        client.oneshot(get(&format!("{base}/crash-odd"))),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    let statuses: Vec<_> = wire.all().iter().map(|e| e.outcome.clone()).collect();
    assert_eq!(
        statuses,
        vec![Ok(StatusCode::BAD_GATEWAY), Ok(StatusCode::OK)],
        "502 then 200"
    );
}

/// A body cut short mid-way (Content-Length 64, 7 bytes, then the connection closes): the head
/// was a 200, so the response is returned and reading its body fails with an error that
/// classifies as a broken transfer.
#[tokio::test]
async fn body_cut_mid_way_is_a_transport_error() {
    let base = peer_or_skip!(NORMAL);
    let backend = peer_or_skip!(BACKEND);
    let before = processed(&backend, "/truncate-odd").await["hits"]
        .as_u64()
        .unwrap();
    if before % 2 == 1 {
        if let Ok(r) = http().request(get(&format!("{base}/truncate-odd"))).await {
            let _ = r.into_body().collect().await;
        }
    }
    let client = ClientBuilder::new().build(http());
    let res = bounded(
        Duration::from_secs(10),
        "GET of a truncated body",
        client.oneshot(get(&format!("{base}/truncate-odd"))),
    )
    .await
    .unwrap();
    let err = bounded(
        Duration::from_secs(10),
        "read a truncated body",
        res.into_body().collect(),
    )
    .await
    .unwrap_err();
    let kind = classify_error(&err);
    eprintln!("truncated body: {}", chain(&err));
    assert_eq!(kind, ErrorKind::Transport, "{}", chain(&err));
    assert!(ErrorSummary::of(&err).may_have_been_processed);
}

/// Through the normal frontend everything works, with keys on POSTs.
#[tokio::test]
async fn normal_frontend_works() {
    let base = peer_or_skip!(NORMAL);
    let backend = peer_or_skip!(BACKEND);
    let client = ClientBuilder::new().build(http());
    let path = unique("normal");
    let res = bounded(
        Duration::from_secs(10),
        "POST through the normal frontend",
        client.oneshot(post(&format!("{base}{path}"), r#"{"order":5}"#)),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let seen = processed(&backend, &path).await;
    assert_eq!(seen["hits"], 1);
    assert_eq!(seen["keys"].as_object().unwrap().len(), 1, "a key was sent");
}

/// A breaker that opens after 3 failures in a row, behind a proxy that resets every request:
/// once open, calls fail at once with `CircuitOpen`, nothing reaches the wire, and the error
/// proves the request was not sent.
#[tokio::test]
async fn breaker_opens_on_constant_resets_and_fails_fast() {
    let base = peer_or_skip!(RESET);
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(
            sturdy::circuit::CircuitBreakerLayer::new().with_consecutive_failures(3),
        )
        .build(wire_svc);
    for _ in 0..3 {
        let err = bounded(
            Duration::from_secs(5),
            "a failing call",
            client.clone().oneshot(get(&format!("{base}/breaker"))),
        )
        .await
        .unwrap_err();
        assert_eq!(
            classify_error(&*err),
            ErrorKind::Transport,
            "{}",
            chain(&*err)
        );
    }
    assert_eq!(wire.len(), 3);
    let start = Instant::now();
    let err = bounded(
        Duration::from_secs(5),
        "a call meeting the open breaker",
        client
            .clone()
            .oneshot(post(&format!("{base}/breaker"), "{}")),
    )
    .await
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(100), "fails fast");
    assert_eq!(wire.len(), 3, "nothing sent");
    assert!(
        sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_some(),
        "{}",
        chain(&*err)
    );
    assert!(delivery(&*err).proves_not_sent(), "{}", chain(&*err));
    assert!(!ErrorSummary::of(&*err).may_have_been_processed);
}
