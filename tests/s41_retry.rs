//! s41: docs/guides/retry.md and the retry rows of docs/RELIABILITY.md, sentence by sentence,
//! through the public `sturdy::retry::RetryLayer` and `sturdy::ClientBuilder`, on paused time
//! against in-process services.

#![cfg(feature = "full")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use sturdy::core::{BoxError, CallOptions, CallReport, Delivery, Error, ErrorKind, RateLimited};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

const URL: &str = "http://api.example.com/orders";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// One scripted answer: a status and an optional `Retry-After`, or a connect error.
#[derive(Clone, Debug)]
enum Answer {
    Status(u16, Option<&'static str>),
    Refused,
}

/// What the server saw: method, every header named in `watch`, and when.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    keys: Vec<Vec<u8>>,
    at: Instant,
}

/// An in-process server answering from a script (the last answer repeats), recording each
/// request.
#[derive(Clone)]
struct Script {
    answers: Arc<Mutex<Vec<Answer>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    watch: &'static str,
}

impl Script {
    fn new(answers: &[Answer]) -> Self {
        Self::watching(answers, "idempotency-key")
    }
    fn watching(answers: &[Answer], watch: &'static str) -> Self {
        let mut a = answers.to_vec();
        a.reverse();
        Self {
            answers: Arc::new(Mutex::new(a)),
            seen: Arc::default(),
            watch,
        }
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    fn gaps(&self) -> Vec<Duration> {
        let s = self.seen();
        s.windows(2).map(|w| w[1].at - w[0].at).collect()
    }
    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        service_fn(move |r: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                me.seen.lock().unwrap().push(Seen {
                    method: r.method().clone(),
                    keys: r
                        .headers()
                        .get_all(me.watch)
                        .iter()
                        .map(|v| v.as_bytes().to_vec())
                        .collect(),
                    at: Instant::now(),
                });
                let answer = {
                    let mut a = me.answers.lock().unwrap();
                    if a.len() > 1 {
                        a.pop().unwrap()
                    } else {
                        a.last().cloned().unwrap()
                    }
                };
                match answer {
                    Answer::Refused => Err::<Response<Full<Bytes>>, BoxError>(Box::new(
                        Error::new(ErrorKind::Connect, "connection refused"),
                    )),
                    Answer::Status(s, ra) => {
                        let mut b = Response::builder().status(s);
                        if let Some(v) = ra {
                            b = b.header("retry-after", v);
                        }
                        Ok(b.body(Full::new(Bytes::from_static(b"x"))).unwrap())
                    }
                }
            }
        })
    }
}

fn req(method: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(URL)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

fn keyed(method: &str, key: &str) -> Request<Full<Bytes>> {
    let mut r = req(method);
    r.headers_mut()
        .insert("idempotency-key", key.parse().unwrap());
    r
}

fn s503(ra: Option<&'static str>) -> Answer {
    Answer::Status(503, ra)
}

fn ok() -> Answer {
    Answer::Status(200, None)
}

/// retry.md, "When": "plus up to 20 % so clients do not return in lock-step (20 % of the wait,
/// or of the backoff's base of 250 ms when the wait is shorter: a `Retry-After: 0` is followed
/// within 50 ms)". With a backoff whose base is 2 s, a `Retry-After: 1` (shorter than the base)
/// is followed between 1 s and 1.4 s, for every seed; with the default base, a `Retry-After: 0`
/// within 50 ms.
#[tokio::test(start_paused = true)]
async fn s41_retry_after_jitter_is_a_fifth_of_the_base_when_the_wait_is_shorter() {
    for seed in 0..24u64 {
        let server = Script::new(&[s503(Some("1")), ok()]);
        let svc = RetryLayer::new()
            .with_backoff(Backoff::decorrelated_jitter(secs(2), secs(20)).unwrap())
            .with_seed(seed)
            .layer(server.service());
        let res = svc.oneshot(req("GET")).await.unwrap();
        assert_eq!(res.status(), 200);
        let gap = server.gaps()[0];
        assert!(
            gap >= secs(1) && gap <= ms(1_400),
            "seed {seed}: Retry-After: 1 under a 2 s base followed after {gap:?}"
        );

        let server = Script::new(&[s503(Some("0")), ok()]);
        let svc = RetryLayer::new().with_seed(seed).layer(server.service());
        svc.oneshot(req("GET")).await.unwrap();
        let gap = server.gaps()[0];
        assert!(
            gap <= ms(50),
            "seed {seed}: Retry-After: 0 followed after {gap:?}"
        );
    }
}

/// retry.md, "When": "A date already past (a server whose clock runs behind ours) asks for no
/// wait at all, so the retry follows just as soon, not after the backoff." A 503 whose
/// `Retry-After` is a date in 2001 is followed within the 50 ms a `Retry-After: 0` gets, not
/// after the backoff's 250 ms or more.
#[tokio::test(start_paused = true)]
async fn s41_past_date_is_followed_as_soon_as_retry_after_zero() {
    for seed in 0..16u64 {
        let server = Script::new(&[s503(Some("Mon, 01 Jan 2001 00:00:00 GMT")), ok()]);
        let svc = RetryLayer::new().with_seed(seed).layer(server.service());
        let res = svc.oneshot(req("GET")).await.unwrap();
        assert_eq!(res.status(), 200);
        let gap = server.gaps()[0];
        assert!(
            gap <= ms(50),
            "seed {seed}: past date followed after {gap:?}"
        );
    }
}

/// retry.md, "When": "A `Retry-After` (seconds or HTTP date) on a 429, a 503 or an in-flight 409
/// overrides the backoff" and "What the caller gets": "A final *response* (say a 503 after the
/// last attempt) is returned as it is ... The one exception is ... a 429 or a 503 that carries a
/// `Retry-After`". A 500 carrying `Retry-After: 120` is neither: it is retried on the backoff
/// and, after the last attempt, returned as it is (not turned into `RateLimited`).
#[tokio::test(start_paused = true)]
async fn s41_a_500_with_retry_after_is_returned_as_it_is() {
    let server = Script::new(&[Answer::Status(500, Some("120"))]);
    let svc = RetryLayer::new().with_seed(7).layer(server.service());
    let t0 = Instant::now();
    let res = svc.oneshot(req("GET")).await;
    let res = match res {
        Ok(r) => r,
        Err(e) => panic!("a final 500 became an error: {e}"),
    };
    assert_eq!(res.status(), 500);
    assert_eq!(server.count(), 4, "4 attempts");
    assert!(t0.elapsed() < secs(60), "took {:?}", t0.elapsed());
}

/// retry.md, "How much": "Deadline: `.with_deadline(d)` bounds attempts and sleeps together; no
/// sleep is started that would end past it". Against a server that answers 500 at once, every
/// attempt starts before the deadline, and the final 500 comes back when the last attempt ends,
/// not after a sleep towards the deadline.
#[tokio::test(start_paused = true)]
async fn s41_deadline_starts_no_sleep_that_ends_past_it() {
    for seed in 0..16u64 {
        let server = Script::new(&[Answer::Status(500, None)]);
        let svc = RetryLayer::new()
            .with_deadline(ms(600))
            .with_seed(seed)
            .without_budget()
            .layer(server.service());
        let t0 = Instant::now();
        let res = svc.oneshot(req("GET")).await.unwrap();
        let end = Instant::now();
        assert_eq!(res.status(), 500);
        let seen = server.seen();
        let last = seen.last().unwrap().at;
        assert!(
            last - t0 < ms(600),
            "seed {seed}: an attempt at {:?}",
            last - t0
        );
        assert_eq!(
            end,
            last,
            "seed {seed}: returned {:?} after the last attempt ({} attempts)",
            end - last,
            seen.len()
        );
    }
}

/// retry.md, "When": "One ... past the deadline ... is not slept: on a 429 or a 503 the call
/// fails at once with a `RateLimited { retry_after }` in its error chain". A 503 asking 2 s under
/// a 1 s deadline fails at once, after one attempt, with the server's 2 s.
#[tokio::test(start_paused = true)]
async fn s41_retry_after_past_the_deadline_fails_at_once() {
    let server = Script::new(&[s503(Some("2")), ok()]);
    let svc = RetryLayer::new()
        .with_deadline(secs(1))
        .layer(server.service());
    let t0 = Instant::now();
    let err = svc.oneshot(req("GET")).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO, "{err}");
    assert_eq!(server.count(), 1);
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited in the chain");
    assert_eq!(rl.retry_after(), secs(2), "{err}");
}

/// retry.md, "How much": "`.with_budget(ttl, min_per_sec, percent)` ... (validated when you call
/// it: `ttl` 1 s to 60 s, `percent` 0.0 to 1000.0)". Both ends are accepted; just past them, NaN
/// and infinity are refused, and the error names what is wrong.
#[test]
fn s41_budget_bounds_are_checked_at_both_ends() {
    for (ttl, pct) in [(secs(1), 0.0f32), (secs(60), 1000.0), (secs(10), 0.2)] {
        assert!(
            RetryLayer::new().with_budget(ttl, 10, pct).is_ok(),
            "({ttl:?}, {pct}) refused"
        );
    }
    for ttl in [ms(999), secs(60) + ms(1), Duration::ZERO, Duration::MAX] {
        let err = RetryLayer::new().with_budget(ttl, 10, 0.2).err();
        let err = err.unwrap_or_else(|| panic!("ttl {ttl:?} accepted"));
        assert!(
            err.to_string().contains("ttl"),
            "ttl {ttl:?}: the error does not name the ttl: {err}"
        );
    }
    for pct in [
        -0.01f32,
        1000.01,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ] {
        let err = RetryLayer::new().with_budget(secs(10), 10, pct).err();
        let err = err.unwrap_or_else(|| panic!("percent {pct} accepted"));
        assert!(
            err.to_string().contains("percent"),
            "percent {pct}: the error does not name the percent: {err}"
        );
    }
}

/// retry.md, "When it is safe": "GET, HEAD, PUT, DELETE, OPTIONS and TRACE are retried freely.
/// POST, PATCH and any other method (CONNECT, or an extension method such as PURGE) are retried
/// only when they carry an `Idempotency-Key` header".
#[tokio::test(start_paused = true)]
async fn s41_which_methods_are_retried_without_a_key() {
    for (m, retried) in [
        ("OPTIONS", true),
        ("TRACE", true),
        ("HEAD", true),
        ("CONNECT", false),
        ("PURGE", false),
        ("PATCH", false),
        ("POST", false),
    ] {
        let server = Script::new(&[s503(None), ok()]);
        let res = RetryLayer::new()
            .layer(server.service())
            .oneshot(req(m))
            .await
            .unwrap();
        let want = if retried { 2 } else { 1 };
        assert_eq!(server.count(), want, "{m} without a key");
        assert_eq!(res.status(), if retried { 200 } else { 503 }, "{m}");
        if !retried {
            let server = Script::new(&[s503(None), ok()]);
            let res = RetryLayer::new()
                .layer(server.service())
                .oneshot(keyed(m, "k-1"))
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{m} with a key");
            let seen = server.seen();
            assert_eq!(seen.len(), 2, "{m} with a key is retried");
            assert!(seen.iter().all(|s| s.method.as_str() == m));
        }
    }
}

/// idempotency.md, "Client": "a blank one, empty or only spaces and tabs, names no operation ...;
/// the retry layer does not count a blank key as a key either, so a POST carrying one is not
/// retried". `Idempotency-Key: " \t "` on a POST through the retry layer alone: sent once.
#[tokio::test(start_paused = true)]
async fn s41_blank_key_of_spaces_and_tabs_is_not_a_key_for_the_retry_layer() {
    for blank in [" ", "\t", " \t ", ""] {
        let server = Script::new(&[s503(None), ok()]);
        let mut r = req("POST");
        r.headers_mut().insert(
            "idempotency-key",
            http::HeaderValue::from_str(blank).unwrap(),
        );
        let res = RetryLayer::new()
            .layer(server.service())
            .oneshot(r)
            .await
            .unwrap();
        assert_eq!(res.status(), 503, "{blank:?}");
        assert_eq!(server.count(), 1, "a POST keyed {blank:?} was sent again");
    }
}

/// idempotency.md, "Client": "(a blank one ... is replaced by a fresh key ...)" and
/// "`client::IdempotencyKeyLayer::new()` ... sets one random UUID v4 per logical POST/PATCH;
/// every retry carries the same key". Through `ClientBuilder`, a POST carrying a blank key of
/// spaces and tabs is sent under a UUID v4, the same on its retry.
#[tokio::test(start_paused = true)]
async fn s41_client_replaces_a_blank_key_with_one_uuid_for_every_attempt() {
    let server = Script::new(&[s503(None), ok()]);
    let client = ClientBuilder::new().build(server.service());
    let mut r = req("POST");
    r.headers_mut()
        .insert("idempotency-key", http::HeaderValue::from_static(" \t \t"));
    let res = client.oneshot(r).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let k0 = String::from_utf8(seen[0].keys[0].clone()).unwrap();
    assert_eq!(
        seen[1].keys,
        vec![k0.clone().into_bytes()],
        "one key for both"
    );
    assert_eq!(seen[0].keys.len(), 1, "one key header");
    let u = k0.as_bytes();
    assert_eq!(u.len(), 36, "{k0:?}");
    assert_eq!(u[14], b'4', "UUID v4: {k0:?}");
    assert!(
        k0.chars()
            .enumerate()
            .all(|(i, c)| if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }),
        "{k0:?}"
    );
}

/// idempotency.md, "Client": "`.with_header(name)` ... change the header ...; in
/// `sturdy::ClientBuilder` the retry layer is told the header, so a POST keyed in it is retried".
/// Keys in `X-Request-Id`: a POST answered 503 is sent again, both times with the same
/// `X-Request-Id` and no `Idempotency-Key`.
#[tokio::test(start_paused = true)]
async fn s41_client_custom_key_header_is_retried_with_one_key() {
    let server = Script::watching(&[s503(None), ok()], "x-request-id");
    let idem = Arc::new(Mutex::new(Vec::new()));
    let idem2 = idem.clone();
    let inner = server.service();
    let spy = service_fn(move |r: Request<Full<Bytes>>| {
        idem2
            .lock()
            .unwrap()
            .push(r.headers().contains_key("idempotency-key"));
        inner.clone().oneshot(r)
    });
    let client = ClientBuilder::new()
        .with_idempotency(
            IdempotencyKeyLayer::new().with_header(http::HeaderName::from_static("x-request-id")),
        )
        .build(spy);
    let res = client.oneshot(req("POST")).await.unwrap();
    assert_eq!(res.status(), 200, "the keyed POST was not retried");
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].keys.len(), 1);
    assert_eq!(seen[0].keys, seen[1].keys);
    assert!(
        idem.lock().unwrap().iter().all(|k| !k),
        "an Idempotency-Key went too"
    );
}

/// retry.md, "When it is safe": POST ... retried ... "when the failure proves the request never
/// left (a refused connection ...)"; "What the caller gets": "`...; the request was not sent, so
/// it is safe to send again` only when no attempt could have reached the server". A POST without
/// a key whose connections are all refused is retried, and its error says it was not sent.
#[tokio::test(start_paused = true)]
async fn s41_refused_post_without_key_is_retried_and_reported_not_sent() {
    let server = Script::new(&[Answer::Refused]);
    let err = RetryLayer::new()
        .with_seed(3)
        .layer(server.service())
        .oneshot(req("POST"))
        .await
        .unwrap_err();
    assert_eq!(server.count(), 4, "{err}");
    let msg = err.to_string();
    assert!(
        msg.ends_with("the request was not sent, so it is safe to send again"),
        "{msg}"
    );
    assert!(msg.contains("connection refused"), "{msg}");
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    assert!(msg.starts_with("gave up after 4 attempts"), "{msg}");
}

/// retry.md, "When": a 409 "not slept ... is returned as it is (the server's answer, with a
/// `CallReport` in its extensions)". A keyed POST answered 409 with `Retry-After: 120` (longer
/// than 60 s) comes back at once as the 409, whose `CallReport` counts 1 attempt, may have been
/// processed, and carries the key; on the last attempt too.
#[tokio::test(start_paused = true)]
async fn s41_unslept_in_flight_409_carries_a_call_report() {
    let server = Script::new(&[Answer::Status(409, Some("120"))]);
    let t0 = Instant::now();
    let res = RetryLayer::new()
        .layer(server.service())
        .oneshot(keyed("POST", "order-77"))
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(server.count(), 1);
    let rep = res
        .extensions()
        .get::<CallReport>()
        .expect("a CallReport in the 409's extensions");
    assert_eq!(rep.attempts(), 1);
    assert_eq!(rep.delivery(), Delivery::MaybeProcessed);
    assert_eq!(rep.idempotency_key(), Some("order-77"));

    let server = Script::new(&[Answer::Status(409, Some("1"))]);
    let res = RetryLayer::new()
        .with_max_attempts(2)
        .layer(server.service())
        .oneshot(keyed("POST", "order-78"))
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(server.count(), 2);
    let rep = res
        .extensions()
        .get::<CallReport>()
        .expect("a CallReport on the last 409");
    assert_eq!(rep.attempts(), 2);
    assert_eq!(rep.idempotency_key(), Some("order-78"));
}

/// RELIABILITY.md, "Bounds": "a `Retry-After` the retry layer would sleep: at most
/// `max_retry_after` \[60 s\] and the deadline" and "an HTTP date before 1970 ... not a date: an
/// error, so the header is ignored"; "Hostile cases": "the next call waits at most 5 min". Hostile
/// `Retry-After` values on a 503 to a GET: no panic, the call ends within the 4 attempts'
/// backoff (well under 2 min of paused time), and any wait it reports is at most 5 min.
#[tokio::test(start_paused = true)]
async fn s41_hostile_retry_after_values_end_in_bounded_time() {
    let hostile: &[&'static str] = &[
        "-5",
        "-0",
        "1e3",
        "5.5",
        "+5",
        "0x10",
        "5, 6",
        " ",
        "18446744073709551616",
        "99999999999999999999",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Mon, 01 Jan 0001 00:00:00 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
        "Sun, 99 Foo 2024 99:99:99 GMT",
        "\u{7f}garbage",
    ];
    for v in hostile {
        let Ok(hv) = http::HeaderValue::from_str(v) else {
            continue;
        };
        let server = Script::new(&[s503(None)]);
        let seen_v = hv.clone();
        let inner = server.service();
        let svc = service_fn(move |r: Request<Full<Bytes>>| {
            let hv = seen_v.clone();
            let fut = inner.clone().oneshot(r);
            async move {
                let mut res = fut.await?;
                res.headers_mut().insert("retry-after", hv);
                Ok::<_, BoxError>(res)
            }
        });
        let t0 = Instant::now();
        let out = RetryLayer::new()
            .with_seed(1)
            .layer(svc)
            .oneshot(req("GET"))
            .await;
        let took = t0.elapsed();
        assert!(took < secs(120), "Retry-After {v:?}: took {took:?}");
        if let Err(e) = out {
            if let Some(rl) = sturdy::core::find::<RateLimited>(&*e) {
                assert!(
                    rl.retry_after() <= secs(300),
                    "Retry-After {v:?}: reported {:?}: {e}",
                    rl.retry_after()
                );
            }
            assert!(!e.to_string().contains("5124095"), "Retry-After {v:?}: {e}");
        }
    }
}

/// RELIABILITY.md, "Bounds": "durations set to `Duration::MAX` (deadlines, timeouts ...): read
/// as about 30 years from now; never a panic". A retry layer with every duration at
/// `Duration::MAX` (deadline, attempt timeout, max `Retry-After`), and the same through
/// `CallOptions`, retries a 503 `Retry-After: 3` and succeeds.
#[tokio::test(start_paused = true)]
async fn s41_duration_max_everywhere_in_the_retry_layer() {
    let server = Script::new(&[s503(Some("3")), ok()]);
    let svc = RetryLayer::new()
        .with_deadline(Duration::MAX)
        .with_attempt_timeout(Duration::MAX)
        .with_max_retry_after(Duration::MAX)
        .layer(server.service());
    let res = svc.oneshot(req("GET")).await.unwrap();
    assert_eq!(res.status(), 200);
    let gap = server.gaps()[0];
    assert!(gap >= secs(3) && gap <= ms(3_600), "{gap:?}");

    let server = Script::new(&[s503(Some("3")), ok()]);
    let client = ClientBuilder::new().build(server.service());
    let mut r = req("GET");
    r.extensions_mut().insert(
        CallOptions::new()
            .with_deadline(Duration::MAX)
            .with_attempt_timeout(Duration::MAX),
    );
    let res = client.oneshot(r).await.unwrap();
    assert_eq!(res.status(), 200);
}

/// A service that never answers (each call pends until dropped).
fn hanging() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_r: Request<Full<Bytes>>| async {
        std::future::pending::<()>().await;
        Ok::<Response<Full<Bytes>>, BoxError>(Response::new(Full::new(Bytes::new())))
    })
}

/// retry.md, "How much": "the retry layer's own [attempt timeout] cuts an attempt above every
/// layer under it, so a circuit breaker below sees that attempt dropped, not failed, and does not
/// count it; `AttemptTimeoutLayer` under the breaker makes the timeout an error the breaker
/// counts." Five calls to a host that never answers, with a breaker that opens after 3
/// consecutive failures: cut by the retry layer's timer, the breaker stays closed; cut by an
/// `AttemptTimeoutLayer` under it, it opens.
#[tokio::test(start_paused = true)]
async fn s41_which_attempt_timeout_a_breaker_below_counts() {
    use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
    use sturdy::retry::AttemptTimeoutLayer;

    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let svc = RetryLayer::new()
        .with_max_attempts(1)
        .with_attempt_timeout(secs(1))
        .layer(breaker.layer(hanging()));
    for _ in 0..5 {
        let err = svc.clone().oneshot(req("GET")).await.unwrap_err();
        assert!(
            sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_none(),
            "{err}"
        );
    }
    let states = handle.states();
    assert!(
        states.iter().all(|(_, s)| *s == CircuitState::Closed),
        "the retry layer's own timeouts were counted: {states:?}"
    );

    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let svc = RetryLayer::new()
        .with_max_attempts(1)
        .layer(breaker.layer(AttemptTimeoutLayer::new(Some(secs(1))).layer(hanging())));
    for _ in 0..5 {
        let _ = svc.clone().oneshot(req("GET")).await.unwrap_err();
    }
    let states = handle.states();
    assert!(
        states
            .iter()
            .any(|(_, s)| matches!(s, CircuitState::Open { .. })),
        "AttemptTimeoutLayer's timeouts were not counted: {states:?}"
    );
}

/// retry.md, "Per request": "Put a `sturdy_core::CallOptions` in the request's extensions to
/// override the layer for one request: `.without_retries()`, `.with_max_attempts(n)`,
/// `.with_deadline(d)`". Both ways: 6 attempts over a layer of 2, 1 over a layer of 4; a 10 s
/// deadline over a layer's 1 s lets a `Retry-After: 5` be slept, a 1 s one over a layer's 10 s
/// does not.
#[tokio::test(start_paused = true)]
async fn s41_call_options_override_the_layer_both_ways() {
    for (layer_n, opts, want) in [
        (2, CallOptions::new().with_max_attempts(6), 6),
        (4, CallOptions::new().with_max_attempts(1), 1),
        (4, CallOptions::new().without_retries(), 1),
    ] {
        let server = Script::new(&[s503(None)]);
        let mut r = req("GET");
        r.extensions_mut().insert(opts);
        let res = RetryLayer::new()
            .with_max_attempts(layer_n)
            .without_budget()
            .layer(server.service())
            .oneshot(r)
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(server.count(), want, "layer {layer_n}");
    }
    for (layer_d, call_d, slept) in [(secs(1), secs(10), true), (secs(10), secs(1), false)] {
        let server = Script::new(&[s503(Some("5")), ok()]);
        let mut r = req("GET");
        r.extensions_mut()
            .insert(CallOptions::new().with_deadline(call_d));
        let out = RetryLayer::new()
            .with_deadline(layer_d)
            .layer(server.service())
            .oneshot(r)
            .await;
        if slept {
            assert_eq!(
                out.unwrap().status(),
                200,
                "call {call_d:?} over layer {layer_d:?}"
            );
        } else {
            let err = out.unwrap_err();
            assert!(sturdy::core::find::<RateLimited>(&*err).is_some(), "{err}");
            assert_eq!(server.count(), 1);
        }
    }
}

/// retry.md, "What is retried": "A 409 that answers a request with an `Idempotency-Key` *and*
/// carries `Retry-After` ... is retried ... Any other 409 is a real conflict and is returned as
/// it is." A 409 with `Retry-After: 1` to a GET or a POST without a key: one attempt, the 409.
#[tokio::test(start_paused = true)]
async fn s41_409_without_a_key_is_returned_as_it_is() {
    for m in ["GET", "POST", "PUT"] {
        let server = Script::new(&[Answer::Status(409, Some("1")), ok()]);
        let res = RetryLayer::new()
            .layer(server.service())
            .oneshot(req(m))
            .await
            .unwrap();
        assert_eq!(res.status(), 409, "{m}");
        assert_eq!(server.count(), 1, "{m}: a 409 without a key was retried");
    }
}

/// retry.md, "What the caller gets": "its message names the root cause in plain words: `gave up
/// after 4 attempts: connection reset by peer`" and "for a POST or PATCH ... otherwise `...; it
/// may have been processed: retry with the same idempotency key <key>`". A keyed PATCH whose
/// connection is reset on every attempt says exactly that, with its key; an unkeyed POST reset
/// once (not retried) never ends on an empty key.
#[tokio::test(start_paused = true)]
async fn s41_reset_messages_name_the_cause_and_the_key() {
    let reset = || {
        service_fn(|_r: Request<Full<Bytes>>| async {
            Err::<Response<Full<Bytes>>, BoxError>(Box::new(Error::new(
                ErrorKind::Transport,
                "connection reset by peer",
            )))
        })
    };
    let err = RetryLayer::new()
        .layer(reset())
        .oneshot(keyed("PATCH", "pay-42"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("gave up after 4 attempts: connection reset by peer"),
        "{msg}"
    );
    assert!(
        msg.ends_with("; it may have been processed: retry with the same idempotency key pay-42"),
        "{msg}"
    );
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed
    );

    let err = RetryLayer::new()
        .layer(reset())
        .oneshot(req("POST"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("connection reset by peer"), "{msg}");
    assert!(
        !msg.trim_end().ends_with("idempotency key"),
        "the message ends on an empty key: {msg}"
    );
    assert!(!msg.contains("not sent"), "{msg}");
}

/// retry.md, "How much": the budget "validated when you call it"; idempotency.md: "`with_ttl` and
/// `with_lease` return an error for a zero TTL or a lease under 1 ms, and `MemoryStore::new(0)`
/// for a store of no entries". Each error says which setting is wrong.
#[test]
fn s41_invalid_settings_name_the_setting() {
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    let l = || IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    let lease = l().with_lease(Duration::from_micros(999)).err().unwrap();
    assert!(lease.to_string().contains("lease"), "{lease}");
    let ttl = l().with_ttl(Duration::ZERO).err().unwrap();
    assert!(ttl.to_string().to_lowercase().contains("ttl"), "{ttl}");
    let entries = MemoryStore::new(0).err().unwrap();
    assert!(entries.to_string().contains("entr"), "{entries}");
}

/// RELIABILITY.md, "Bounds": a pause asked by `Retry-After` "at most `max_pause` \[5 min\]" and
/// "a `Retry-After` longer than the client sleeps | the call fails at once with `RateLimited`,
/// whose wait is the server's capped at 5 min". Through `ClientBuilder` (rate limit and retry
/// layers both read it), 429s whose `Retry-After` is 100,000 digits, 100,000 spaces around a
/// number, or a 100 KiB `RateLimit` header of junk: no panic, the call ends at once (paused
/// time) with a wait of at most 5 min, within a loose bound of real time.
#[tokio::test(start_paused = true)]
async fn s41_huge_hostile_headers_through_the_client() {
    let digits = "9".repeat(100_000);
    let spaced = format!("{}120{}", " ".repeat(50_000), " ".repeat(50_000));
    let junk = "a=1;".repeat(25_000);
    for (name, value) in [
        ("retry-after", digits),
        ("retry-after", spaced),
        ("ratelimit", junk),
    ] {
        let v = http::HeaderValue::from_str(&value).unwrap();
        let svc = service_fn(move |_r: Request<Full<Bytes>>| {
            let v = v.clone();
            async move {
                let mut b = Response::builder().status(429).header(name, v);
                if name != "retry-after" {
                    b = b.header("retry-after", "600");
                }
                Ok::<_, BoxError>(b.body(Full::new(Bytes::new())).unwrap())
            }
        });
        let client = ClientBuilder::new().build(svc);
        // Real time on purpose: the parse's CPU cost, which paused time does not see.
        #[allow(clippy::disallowed_methods)]
        let real = std::time::Instant::now();
        let t0 = Instant::now();
        let out = client.oneshot(req("GET")).await;
        assert!(
            real.elapsed() < Duration::from_secs(5),
            "{name} of {} bytes: {:?} of real time",
            value.len(),
            real.elapsed()
        );
        let took = t0.elapsed();
        match out {
            Ok(res) => panic!("{name}: a 429 came back as a response after {took:?}: {res:?}"),
            Err(e) => {
                let rl = sturdy::core::find::<RateLimited>(&*e).expect("RateLimited");
                assert!(rl.retry_after() <= secs(300), "{name}: {e}");
                assert!(took <= secs(60), "{name}: {took:?}");
                assert!(
                    e.to_string().len() < 1_000,
                    "{name}: {} bytes",
                    e.to_string().len()
                );
            }
        }
    }
}
