//! Refused tries in the retry layer's events, metrics and final error (`refused`, `related()`),
//! and `CallOptions` idempotency keys with control characters sent as their SHA-256 digest,
//! checked on a real server against a digest computed here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::events::Event;
use sturdy::core::trace::DelaySource;
use sturdy::core::{find, BoxError, CallOptions, CircuitOpen, Error, ErrorKind};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

// ---------------------------------------------------------------------------------------------
// SHA-256, written out here so that the digest is checked independently of the crate under test
// ---------------------------------------------------------------------------------------------

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

fn sha256_hex(data: &[u8]) -> String {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let mut v = h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7]
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [
                t1.wrapping_add(t2),
                v[0],
                v[1],
                v[2],
                v[3].wrapping_add(t1),
                v[4],
                v[5],
                v[6],
            ];
        }
        for (a, b) in h.iter_mut().zip(v) {
            *a = a.wrapping_add(b);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

fn digest_form(key: &str) -> String {
    format!("sturdy-sha256-{}", sha256_hex(key.as_bytes()))
}

#[test]
fn words22_sha256_known_vectors() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
}

// ---------------------------------------------------------------------------------------------
// Refused tries: events, metrics, the final error
// ---------------------------------------------------------------------------------------------

/// Answers in turn: a 503 for `'5'`, 200 otherwise; counts calls.
fn scripted(
    script: &'static str,
    calls: Arc<AtomicU32>,
) -> BoxCloneSyncService<Req, Res, BoxError> {
    BoxCloneSyncService::new(service_fn(move |_req: Req| {
        let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
        let step = script.as_bytes().get(n).copied().unwrap_or(b'o');
        async move {
            let status = if step == b'5' {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Ok::<Res, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::default())
                    .unwrap(),
            )
        }
    }))
}

fn get() -> Req {
    Request::get("http://api.example.com/items")
        .body(Full::default())
        .unwrap()
}

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Scheduled {
        attempt: u32,
        refused: bool,
        source: DelaySource,
    },
    Stopped {
        attempt: u32,
        refused: bool,
    },
}

fn recorder(log: Arc<Mutex<Vec<Seen>>>) -> impl Fn(&Event<'_>) + Send + Sync + 'static {
    move |e: &Event<'_>| match e {
        Event::RetryScheduled {
            attempt,
            refused,
            source,
            ..
        } => log.lock().unwrap().push(Seen::Scheduled {
            attempt: *attempt,
            refused: *refused,
            source: *source,
        }),
        Event::RetryStopped {
            attempt, refused, ..
        } => log.lock().unwrap().push(Seen::Stopped {
            attempt: *attempt,
            refused: *refused,
        }),
        _ => {}
    }
}

/// sturdy-core events rustdoc: a refused try "counts here, as it counts against `max_attempts`,
/// and has `refused` set". A 503, then a try the open breaker refused (waited out under the
/// deadline, source `Breaker`), then a probe that succeeds: the events number the tries 1 and 2
/// and only the second is marked refused.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn words22_events_number_and_mark_refused_try_waited_out() {
    let calls = Arc::new(AtomicU32::new(0));
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_deadline(Duration::from_secs(120))
                .with_seed(22)
                .on_event(recorder(log.clone())),
        )
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(5), Duration::from_secs(60)),
        )
        .service(scripted("5", calls.clone()));
    let res = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let log = log.lock().unwrap().clone();
    assert!(
        matches!(
            log.first(),
            Some(Seen::Scheduled {
                attempt: 1,
                refused: false,
                ..
            })
        ),
        "{log:?}"
    );
    let refused: Vec<_> = log
        .iter()
        .filter(|s| matches!(s, Seen::Scheduled { refused: true, .. }))
        .collect();
    assert!(!refused.is_empty(), "no refused try marked: {log:?}");
    assert!(
        matches!(
            refused[0],
            Seen::Scheduled {
                attempt: 2,
                source: DelaySource::Breaker,
                ..
            }
        ),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|s| matches!(s, Seen::Stopped { .. })),
        "{log:?}"
    );
}

/// A 503, then a refused try that ends the call (no deadline: an open breaker fails at once):
/// whatever events are emitted mark the second try refused and never the first; with the
/// `metrics` feature `sturdy.retry.retries` counts the retried 503 (labelled `error.type`).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn words22_events_and_metric_for_503_then_refused_last_try() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let calls = Arc::new(AtomicU32::new(0));
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_max_attempts(3)
                .with_seed(22)
                .on_event(recorder(log.clone())),
        )
        .layer(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .service(scripted("555", calls.clone()));
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{err}");
    let log = log.lock().unwrap().clone();
    for s in &log {
        match s {
            Seen::Scheduled {
                attempt, refused, ..
            }
            | Seen::Stopped { attempt, refused } => {
                assert_eq!(*refused, *attempt >= 2, "{log:?}");
                assert!(*attempt <= 3, "{log:?}");
            }
        }
    }
    assert!(
        log.contains(&Seen::Scheduled {
            attempt: 1,
            refused: false,
            source: DelaySource::Backoff
        }),
        "{log:?}"
    );
    let scheduled = log
        .iter()
        .filter(|s| matches!(s, Seen::Scheduled { .. }))
        .count() as u64;
    let mut retries = 0u64;
    let mut types = Vec::new();
    for (key, _, _, value) in snap.snapshot().into_vec() {
        if key.key().name() == "sturdy.retry.retries" {
            if let DebugValue::Counter(n) = value {
                retries += n;
            }
            for l in key.key().labels() {
                if l.key() == "error.type" {
                    types.push(l.value().to_string());
                }
            }
        }
    }
    assert_eq!(retries, scheduled, "{log:?} {types:?}");
    assert!(!types.is_empty(), "{types:?}");
    // The final error: the 503's, no source, the refusal related.
    let e = find::<Error>(&*err).expect("a sturdy error");
    assert_eq!(
        e.kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert!(std::error::Error::source(e).is_none(), "{e:?}");
    assert!(e
        .related()
        .is_some_and(|r| find::<CircuitOpen>(r).is_some()));
    assert_eq!(e.report().map(|r| r.attempts()), Some(1));
}

/// Retry guide, "What the caller gets": through the whole `ClientBuilder` stack, a GET answered
/// 503 whose retry the (tightened) breaker refuses ends in an error of the 503's kind with no
/// `source()` at all, the refusal `related()`, found by `find::<CircuitOpen>`, and a message
/// that counts the refused try apart and does not name the breaker as the cause.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn words22_client_503_then_refused_no_source_related() {
    let calls = Arc::new(AtomicU32::new(0));
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_max_attempts(2).with_seed(22))
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .build(scripted("55", calls.clone()));
    let err = client.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("gave up after 1 attempt and 1 refused try: 503 Service Unavailable"),
        "{msg}"
    );
    let e = find::<Error>(&*err).expect("a sturdy error");
    assert_eq!(
        e.kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert!(std::error::Error::source(e).is_none(), "{e:?}");
    let mut cur = std::error::Error::source(&*err);
    while let Some(c) = cur {
        assert!(
            !c.is::<CircuitOpen>(),
            "the breaker is in the source chain: {err:?}"
        );
        cur = c.source();
    }
    let related = e.related().expect("the refusal is related");
    assert!(find::<CircuitOpen>(related).is_some(), "{related:?}");
    assert!(find::<CircuitOpen>(&*err).is_some());
    assert_eq!(e.report().map(|r| r.attempts()), Some(1));
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys with control characters, on the wire
// ---------------------------------------------------------------------------------------------

/// A server that records every `Idempotency-Key` it receives (as bytes), answering 201 on
/// `/orders` and never answering on `/stall`.
async fn key_server() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
    let s1 = seen.clone();
    let s2 = seen.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move |h: HeaderMap| {
                let s = s1.clone();
                async move {
                    let keys: Vec<Vec<u8>> = h
                        .get_all("idempotency-key")
                        .iter()
                        .map(|v| v.as_bytes().to_vec())
                        .collect();
                    assert!(keys.len() <= 1, "several keys: {keys:?}");
                    s.lock()
                        .unwrap()
                        .push(keys.into_iter().next().unwrap_or_default());
                    StatusCode::CREATED
                }
            }),
        )
        .route(
            "/stall",
            post(move |h: HeaderMap| {
                let s = s2.clone();
                async move {
                    s.lock().unwrap().push(
                        h.get("idempotency-key")
                            .map(|v| v.as_bytes().to_vec())
                            .unwrap_or_default(),
                    );
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    StatusCode::CREATED
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, seen)
}

fn client() -> sturdy::Client<hyper::body::Incoming> {
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    ClientBuilder::new()
        .with_retry(RetryLayer::new().with_max_attempts(1))
        .with_attempt_timeout(Duration::from_millis(200))
        .build(http)
}

fn post_with_key(addr: SocketAddr, path: &str, key: &str) -> Req {
    let mut req = Request::post(format!("http://{addr}{path}"))
        .body(Full::from("{\"item\":1}"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key(key));
    req
}

async fn send(c: &sturdy::Client<hyper::body::Incoming>, req: Req) -> StatusCode {
    let res = c.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let _ = res.into_body().collect().await;
    status
}

/// CallOptions rustdoc and the idempotency guide: a key holding control characters is sent as
/// `sturdy-sha256-` and the hex SHA-256 of the key, the same on every call. Checked for CR/LF,
/// NUL, DEL, ESC, a lone LF, and a long key, against a digest
/// computed independently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words22_control_keys_sent_as_independent_digest() {
    let (addr, seen) = key_server().await;
    let c = client();
    let long_ctl = format!("{}\n{}", "x".repeat(3000), "y".repeat(3000));
    let keys: Vec<String> = vec![
        "a\r\nb".into(),
        "order\u{0}7".into(),
        "del\u{7f}".into(),
        "\u{1b}[31mred".into(),
        "\n".into(),
        long_ctl,
    ];
    for key in &keys {
        for _ in 0..2 {
            assert_eq!(
                send(&c, post_with_key(addr, "/orders", key)).await,
                StatusCode::CREATED
            );
        }
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), keys.len() * 2);
    for (i, key) in keys.iter().enumerate() {
        let want = digest_form(key);
        for got in &seen[2 * i..2 * i + 2] {
            assert_eq!(
                String::from_utf8_lossy(got),
                want,
                "key {key:?} was not sent as its SHA-256 digest"
            );
        }
    }
}

/// Keys without control characters a header value may not carry are sent verbatim: ones with
/// `%` (the old escaped form), non-ASCII, very long, and with inner spaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words22_plain_keys_sent_verbatim() {
    let (addr, seen) = key_server().await;
    let c = client();
    let keys: Vec<String> = vec![
        "a%0D%0Ab".into(),
        "100%".into(),
        "%00".into(),
        "clé-ключ-鍵-😀".into(),
        "k".repeat(8000),
        "order 7421 payment".into(),
        "sturdy-sha256-".into(),
        // U+0085 is a Unicode control, but its UTF-8 bytes are allowed in a header value.
        "café\u{85}ключ".into(),
    ];
    for key in &keys {
        assert_eq!(
            send(&c, post_with_key(addr, "/orders", key)).await,
            StatusCode::CREATED
        );
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), keys.len());
    for (key, got) in keys.iter().zip(&seen) {
        assert_eq!(got.as_slice(), key.as_bytes(), "key {key:?} was changed");
    }
}

/// CallOptions rustdoc: the digest form is "not the same as another key unless that key spells
/// out this digest". A caller whose own key is literally `sturdy-sha256-<hex>` sends exactly what
/// the control-character key with that digest is sent as: the one documented exception (no
/// mapping onto header values can keep every valid key as it is and keep all keys apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words22_digest_form_equals_only_the_key_that_spells_it_out() {
    let (addr, seen) = key_server().await;
    let c = client();
    let control = "a\r\nb";
    let literal = digest_form(control);
    send(&c, post_with_key(addr, "/orders", control)).await;
    send(&c, post_with_key(addr, "/orders", &literal)).await;
    send(&c, post_with_key(addr, "/orders", "a%0D%0Ab")).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0], seen[1]);
    assert_ne!(seen[0], seen[2]);
}

/// Leading and trailing spaces: a key given as " k " must reach the server as another key than
/// "k" (HTTP strips whitespace around a field value, so sending it verbatim makes the two one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words22_padded_key_not_the_same_as_trimmed_key() {
    let (addr, seen) = key_server().await;
    let c = client();
    send(&c, post_with_key(addr, "/orders", " order-9 ")).await;
    send(&c, post_with_key(addr, "/orders", "order-9")).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_ne!(
        seen[0],
        seen[1],
        "' order-9 ' arrived as {:?}, the same as 'order-9'",
        String::from_utf8_lossy(&seen[0])
    );
}

/// Idempotency guide: "the value sent is the key a failed call reports". A POST with a control
/// key whose attempt times out reports the digest (in its message and `CallReport`), and sending
/// again with the reported key, or with the original one, sends the same header value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words22_reported_key_resends_same_request() {
    let (addr, seen) = key_server().await;
    let c = client();
    let key = "pay\r\n№42\u{0}";
    let want = digest_form(key);
    let err = c
        .clone()
        .oneshot(post_with_key(addr, "/stall", key))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("retry with the same idempotency key {want}")),
        "{msg}"
    );
    let e = find::<Error>(&*err).expect("a sturdy error");
    let reported = e
        .report()
        .and_then(|r| r.idempotency_key())
        .expect("the key is reported")
        .to_string();
    assert_eq!(reported, want);
    send(&c, post_with_key(addr, "/orders", &reported)).await;
    send(&c, post_with_key(addr, "/orders", key)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for got in &seen {
        assert_eq!(String::from_utf8_lossy(got), want);
    }
}

/// A plain ASCII key reported by a failed call is the key itself, and resending with it sends it
/// verbatim (`%` included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words22_reported_plain_ascii_key_is_verbatim() {
    let (addr, seen) = key_server().await;
    let c = client();
    let key = "order-%41-7";
    let err = c
        .clone()
        .oneshot(post_with_key(addr, "/stall", key))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("retry with the same idempotency key {key}")),
        "{msg}"
    );
    let e = find::<Error>(&*err).expect("a sturdy error");
    assert_eq!(e.report().and_then(|r| r.idempotency_key()), Some(key));
    send(&c, post_with_key(addr, "/orders", key)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|k| k.as_slice() == key.as_bytes()),
        "{seen:?}"
    );
}

/// Idempotency guide: a failed call's error "carries the key: `...; it may have been processed:
/// retry with the same idempotency key <key>`", and "the value sent is the key a failed call
/// reports". A non-ASCII key (no control characters) is sent verbatim, so the failed call must
/// report it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words22_reported_non_ascii_key() {
    let (addr, seen) = key_server().await;
    let c = client();
    let key = "заказ-%41-7";
    let err = c
        .clone()
        .oneshot(post_with_key(addr, "/stall", key))
        .await
        .unwrap_err();
    let msg = err.to_string();
    let e = find::<Error>(&*err).expect("a sturdy error");
    assert_eq!(
        e.report().and_then(|r| r.idempotency_key()),
        Some(key),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("retry with the same idempotency key {key}")),
        "{msg}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].as_slice(), key.as_bytes());
}
