#![cfg(feature = "full")]
//! Outside round s118: the words of every error a caller can meet, through the facade `sturdy`
//! (feature `full`): the waits, limits and counts that refusals and reports name (rate limit,
//! breaker, concurrency limit and its shared overflow limit, hedged attempts, token backoff),
//! what a failed call says about being sent (retries not made, hedge copies held at a deadline,
//! malformed answers from a raw TCP server), a lone call under coalescing, webhook rejection
//! reasons when a sender puts the secret itself in a header, tracing events of a stack with
//! every layer on a URI full of secrets, and the pagination guards' numbers and caps on peer
//! text. In-process services, tower's `Buffer`, paused time; one loopback TCP server.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::core::classify::delivery;
use sturdy::core::summary::ErrorSummary;
use sturdy::core::{BoxError, CallOptions};
use sturdy::ClientBuilder;
use tower::{service_fn, ServiceExt};

type Req = Request<Full<Bytes>>;

#[derive(Clone)]
enum Out {
    Status(u16, Vec<(&'static str, String)>),
    Io(io::ErrorKind),
    SleepStatus(u64, u16),
    SleepIo(u64, io::ErrorKind),
}

#[derive(Clone, Default)]
struct Script {
    outs: Arc<Mutex<VecDeque<Out>>>,
    seen: Arc<AtomicUsize>,
}

impl Script {
    fn new(outs: Vec<Out>) -> Self {
        Self {
            outs: Arc::new(Mutex::new(outs.into())),
            seen: Arc::default(),
        }
    }
    fn seen(&self) -> usize {
        self.seen.load(SeqCst)
    }
    fn svc(
        &self,
    ) -> impl tower::Service<
        Req,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        let s = self.clone();
        service_fn(move |_req: Req| {
            let s = s.clone();
            async move {
                s.seen.fetch_add(1, SeqCst);
                let out = s
                    .outs
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(Out::Status(200, vec![]));
                match out {
                    Out::Status(code, hs) => {
                        let mut b = Response::builder().status(code);
                        for (k, v) in hs {
                            b = b.header(k, v);
                        }
                        Ok(b.body(Full::new(Bytes::new())).unwrap())
                    }
                    Out::Io(kind) => Err(Box::new(io::Error::new(kind, "boom")) as BoxError),
                    Out::SleepIo(ms, kind) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Err(Box::new(io::Error::new(kind, "boom")) as BoxError)
                    }
                    Out::SleepStatus(ms, code) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(Response::builder()
                            .status(code)
                            .body(Full::new(Bytes::new()))
                            .unwrap())
                    }
                }
            }
        })
    }
}

fn post() -> Req {
    Request::post("http://api.example.com/orders")
        .body(Full::from("{}"))
        .unwrap()
}

/// The error's words and what it says of itself, for assertion messages.
fn words(err: &BoxError) -> String {
    let s = ErrorSummary::of(&**err);
    format!(
        "display: {err}\n  delivery: {:?}\n  summary: {}\n  advice: {}",
        delivery(&**err),
        serde_json::to_string(&s).unwrap(),
        s.advice()
    )
}

/// Reads a duration as `sturdy::core::human_duration` writes it (`250ms`, `1.5s`, `2m 5s`,
/// `1h 3m`): the text up to the first `;`, `,` or end.
fn parse_human(text: &str) -> Duration {
    let text = text.split([';', ',', '\n']).next().unwrap().trim();
    let mut total = Duration::ZERO;
    for tok in text.split_whitespace() {
        let (num, unit) = if let Some(n) = tok.strip_suffix("ms") {
            (n, 0.001)
        } else if let Some(n) = tok.strip_suffix('s') {
            (n, 1.0)
        } else if let Some(n) = tok.strip_suffix('m') {
            (n, 60.0)
        } else if let Some(n) = tok.strip_suffix('h') {
            (n, 3600.0)
        } else {
            panic!("not a duration: {tok:?} in {text:?}")
        };
        total += Duration::from_secs_f64(num.parse::<f64>().unwrap() * unit);
    }
    total
}

#[derive(Clone, Default)]
struct Cap(Arc<Mutex<Vec<u8>>>);
struct CapW(Arc<Mutex<Vec<u8>>>);
impl io::Write for CapW {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Cap {
    type Writer = CapW;
    fn make_writer(&'a self) -> CapW {
        CapW(self.0.clone())
    }
}
impl Cap {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(self.clone())
            .finish();
        tracing::subscriber::set_default(sub)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn json_api(
    f: impl Fn(&str) -> (u16, String) + Send + Sync + 'static,
) -> (
    impl tower::Service<Req, Response = Response<Full<Bytes>>, Error = BoxError, Future = impl Send>
        + Clone
        + Send
        + 'static,
    Arc<AtomicUsize>,
) {
    let f = Arc::new(f);
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    (
        service_fn(move |req: Req| {
            let f = f.clone();
            n2.fetch_add(1, SeqCst);
            async move {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                let (code, body) = f(&pq);
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Full::from(body))
                        .unwrap(),
                )
            }
        }),
        n,
    )
}

/// The wait named after `marker` in `text`.
fn named_wait(text: &str, marker: &str) -> Duration {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in {text:?}"));
    parse_human(&text[at + marker.len()..])
}

/// docs/guides/ratelimit.md: a call whose turn would come later than `max_wait` "fails at once
/// with `RateLimited` carrying the wait"; README.md: "Errors say what happened and what to do:
/// `rate limited by api.example.com; retry after 2m`"; docs/guides/agents.md: the advice is
/// "Try again in 30s", and `retry_after_ms` is the wait. A caller (or a model) that waits what
/// the words say must not be refused again: the words may round a wait up, never down.
/// Real flows: a quota of one call a minute asked again 1 ms later (59.999 s to wait), and a
/// `Retry-After: 2` pause asked 1 ms later (1.999 s), and a breaker opened for 5 s asked 1 ms
/// later (`CircuitOpen`: "try again in ...", 4.999 s), and a quota of 4,000 calls a second asked
/// twice at once (250 µs).
#[tokio::test(start_paused = true)]
async fn s118_a_refusal_never_names_a_wait_shorter_than_the_one_it_carries() {
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    use tower::Layer;
    let get = || {
        Request::get("http://api.example.com/x")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let mut refusals = Vec::new();

    let sc = Script::new(vec![]);
    let rl = RateLimitLayer::new(Quota::per_minute(1).unwrap())
        .with_max_wait(Duration::ZERO)
        .layer(sc.svc());
    rl.clone().oneshot(get()).await.unwrap();
    tokio::time::advance(Duration::from_millis(1)).await;
    refusals.push(rl.clone().oneshot(get()).await.unwrap_err());
    assert_eq!(sc.seen(), 1, "the refused call was not sent");

    // A quota of 4,000 calls a second (one every 250 µs), asked twice at once.
    let sc = Script::new(vec![]);
    let rl = RateLimitLayer::new(Quota::per_second(4000).unwrap())
        .with_max_wait(Duration::ZERO)
        .layer(sc.svc());
    rl.clone().oneshot(get()).await.unwrap();
    refusals.push(rl.clone().oneshot(get()).await.unwrap_err());
    assert_eq!(sc.seen(), 1, "the refused call was not sent");

    let sc = Script::new(vec![Out::Status(429, vec![("retry-after", "2".into())])]);
    let rl = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::ZERO)
        .layer(sc.svc());
    assert_eq!(rl.clone().oneshot(get()).await.unwrap().status(), 429);
    tokio::time::advance(Duration::from_millis(1)).await;
    refusals.push(rl.clone().oneshot(get()).await.unwrap_err());
    assert_eq!(sc.seen(), 1, "the refused call was not sent");

    // A breaker opened for 5 s by one 503, asked again 1 ms later (4.999 s to wait).
    let sc = Script::new(vec![Out::Status(503, vec![])]);
    let cb = sturdy::circuit::CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(5), Duration::from_secs(60))
        .layer(sc.svc());
    assert_eq!(cb.clone().oneshot(get()).await.unwrap().status(), 503);
    tokio::time::advance(Duration::from_millis(1)).await;
    let open = cb.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(sc.seen(), 1, "the refused call was not sent");

    let mut wrong = Vec::new();
    {
        let carried = sturdy::core::find::<sturdy::core::CircuitOpen>(&*open)
            .expect("CircuitOpen in the chain")
            .retry_in();
        let s = ErrorSummary::of(&*open);
        assert!(!s.may_have_been_processed, "{}", words(&open));
        let said = named_wait(&open.to_string(), "try again in ");
        let advised = named_wait(&s.advice(), "Try again in ");
        if said < carried || advised < carried {
            wrong.push(format!(
                "carries {carried:?}, says {said:?}, advises {advised:?}: {}",
                words(&open)
            ));
        }
    }
    for err in &refusals {
        let carried = sturdy::core::find::<sturdy::core::RateLimited>(&**err)
            .expect("RateLimited in the chain")
            .retry_after();
        let s = ErrorSummary::of(&**err);
        assert_eq!(s.retry_after_ms, Some(carried.as_millis() as u64));
        assert!(!s.may_have_been_processed, "{}", words(err));
        let said = named_wait(&err.to_string(), "retry after ");
        let advised = named_wait(&s.advice(), "Try again in ");
        if said < carried || advised < carried {
            wrong.push(format!(
                "carries {carried:?}, says {said:?}, advises {advised:?}: {}",
                words(err)
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// README.md, layer order: "Hedge -> (optional) a second copy of a slow safe call; each copy is
/// an attempt"; docs/guides/hedge.md: "Each copy then is an attempt that the breaker admits and
/// counts"; `CallReport::attempts`: "How many attempts were made (sent on, past every layer that
/// holds or refuses calls), the first included". A GET retried once, each try hedged, both
/// copies of both tries reset after reaching the server: four attempts were sent.
#[tokio::test(start_paused = true)]
#[ignore = "DOCUMENTED since: CallReport::attempts, the hedge guide and the README say a hedged try counts as one retry attempt, its copies attempts below"]
async fn s118_a_hedged_calls_report_counts_every_copy_sent() {
    use sturdy::hedge::HedgeLayer;
    use sturdy::retry::RetryLayer;
    let mut outs = vec![Out::SleepStatus(10, 200); 40];
    outs.extend(vec![Out::SleepIo(100, io::ErrorKind::ConnectionReset); 4]);
    let sc = Script::new(outs);
    let c = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_max_attempts(2).with_seed(118))
        .with_hedge(
            HedgeLayer::new()
                .with_min_samples(5)
                .with_budget(1.0, 10)
                .unwrap(),
        )
        .build(sc.svc());
    let get = || {
        Request::get("http://api.example.com/x")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    for _ in 0..40 {
        assert_eq!(c.clone().oneshot(get()).await.unwrap().status(), 200);
    }
    let before = sc.seen();
    let err = c.clone().oneshot(get()).await.unwrap_err();
    let sent = sc.seen() - before;
    assert_eq!(sent, 4, "two tries, each hedged: {}", words(&err));
    assert_eq!(delivery(&*err), sturdy::core::Delivery::MaybeProcessed);
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.kind, "transport");
    assert_eq!(
        s.attempts,
        Some(sent as u32),
        "every copy sent is an attempt: {}",
        words(&err)
    );
    assert!(
        err.to_string()
            .starts_with(&format!("gave up after {sent} attempts")),
        "{}",
        words(&err)
    );
}

/// docs/guides/webhooks.md: "Every rejection answers a short generic text ...; the reason goes to
/// `tracing`. No `Debug` output or log line shows a secret."; `Rejection::reason`: "It never
/// contains a secret"; "400 for missing or malformed headers, 401 for a bad signature". A
/// misconfigured sender puts the shared secret itself where the signature goes (bare, after the
/// scheme's prefix, as a `v1` entry, as the timestamp): every scheme refuses it without quoting it.
#[test]
fn s118_webhook_reasons_never_quote_a_secret_the_sender_put_in_a_header() {
    use std::time::UNIX_EPOCH;
    use sturdy::webhook::{GenericHmac, GitHub, StandardWebhooks, Stripe, Verifier};
    let raw = "s118-TopSecretValue-4242";
    let sw_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let sw_bare = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let ts: i64 = 1_700_000_000;
    let now = UNIX_EPOCH + Duration::from_secs(ts as u64);
    let body = br#"{"id":"evt_1"}"#;
    let hm = |pairs: &[(&str, String)]| {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    };
    let mut rejections = Vec::new();
    let gh = GitHub::new(raw).unwrap();
    for v in [
        raw.to_owned(),
        format!("sha256={raw}"),
        format!("sha1={raw}"),
        format!("sha256={raw}{raw}{raw}"),
    ] {
        let h = hm(&[("x-hub-signature-256", v)]);
        rejections.push((
            "github",
            gh.check_headers(&h, now)
                .and_then(|()| gh.verify(&h, body, now))
                .map(|_| ()),
        ));
    }
    let st = Stripe::new(raw).unwrap();
    for v in [
        raw.to_owned(),
        format!("t={ts},v1={raw}"),
        format!("t={raw},v1={}", "0".repeat(64)),
        format!("{raw}=1,t={ts},v1={}", "0".repeat(64)),
    ] {
        let h = hm(&[("stripe-signature", v)]);
        rejections.push((
            "stripe",
            st.check_headers(&h, now)
                .and_then(|()| st.verify(&h, body, now))
                .map(|_| ()),
        ));
    }
    let sw = StandardWebhooks::new(sw_secret).unwrap();
    for (sig, t) in [
        (sw_secret.to_owned(), ts.to_string()),
        (format!("v1,{sw_secret}"), ts.to_string()),
        (format!("v1,{sw_bare}"), ts.to_string()),
        (format!("{sw_secret},x"), ts.to_string()),
        ("v1,AAAA".to_owned(), sw_secret.to_owned()),
    ] {
        let h = hm(&[
            ("webhook-id", "msg_1".to_owned()),
            ("webhook-timestamp", t),
            ("webhook-signature", sig),
        ]);
        rejections.push((
            "standard",
            sw.check_headers(&h, now)
                .and_then(|()| sw.verify(&h, body, now))
                .map(|_| ()),
        ));
    }
    let g = GenericHmac::new("acme", http::HeaderName::from_static("x-acme-sig"), raw)
        .unwrap()
        .with_prefix("sha256=")
        .with_timestamp_header(http::HeaderName::from_static("x-acme-ts"));
    for (sig, t) in [
        (raw.to_owned(), ts.to_string()),
        (format!("sha256={raw}"), ts.to_string()),
        (format!("sha256={}", "0".repeat(64)), raw.to_owned()),
    ] {
        let h = hm(&[("x-acme-sig", sig), ("x-acme-ts", t)]);
        rejections.push((
            "generic",
            g.check_headers(&h, now)
                .and_then(|()| g.verify(&h, body, now))
                .map(|_| ()),
        ));
    }
    for (scheme, r) in rejections {
        let rej = r.expect_err(scheme);
        assert!(rej.status == 400 || rej.status == 401, "{scheme}: {rej:?}");
        let shown = format!("{} {rej:?}", rej.reason);
        for secret in [raw, sw_secret, sw_bare] {
            assert!(!shown.contains(secret), "{scheme}: {shown}");
        }
        assert!(
            !rej.reason.is_empty() && rej.reason.len() < 200,
            "{scheme}: {shown}"
        );
    }
}

/// The same through a `WebhookReceiver` under a tracing subscriber: the caller gets the status
/// and a generic text, the log gets the reason, and neither holds the secret.
#[tokio::test]
async fn s118_a_receiver_refusing_a_secret_sent_as_signature_logs_and_answers_no_secret() {
    use http_body_util::BodyExt;
    use sturdy::webhook::{GitHub, MemoryQueue, WebhookReceiver};
    let raw = "s118-TopSecretValue-4242";
    let cap = Cap::default();
    let _g = cap.install();
    let (q, _events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(GitHub::new(raw).unwrap(), q);
    for sig in [format!("sha256={raw}"), raw.to_owned()] {
        let req = Request::post("http://hooks.example.com/github")
            .header("x-hub-signature-256", sig)
            .header("x-github-event", raw)
            .body(Full::<Bytes>::from(r#"{"zen":"s118"}"#))
            .unwrap();
        let res = rx.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 400, "{body}");
        assert!(!body.contains(raw), "{body}");
        assert!(body.len() < 64, "a short generic text: {body}");
    }
    let logs = cap.text();
    assert!(
        logs.contains("X-Hub-Signature-256"),
        "the reason is logged: {logs}"
    );
    assert!(!logs.contains(raw), "{logs}");
}

/// README.md ("keys and messages hold host and port only"), docs/guides/auth.md ("no `Debug` or
/// log line shows" a secret), docs/RELIABILITY.md (a request URI with `user:password@`: "keys
/// and messages hold host and port only"). A `ClientBuilder` stack with every layer (auth,
/// version pinned in the query, hedge, adaptive concurrency, coalesce) on a URI with user info
/// and secret query values, through a 503, a 429, a reset, a `Deprecation`/`Sunset`/`RateLimit`
/// answer, a 401 and a retried GET that gives up: no event at TRACE, no `Debug` of a response
/// or error, holds a secret.
#[tokio::test(start_paused = true)]
async fn s118_a_stack_of_every_layer_logs_no_secret_of_the_uri_or_the_credentials() {
    use sturdy::auth::AuthLayer;
    use sturdy::coalesce::CoalesceLayer;
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    use sturdy::hedge::HedgeLayer;
    use sturdy::version::VersionLayer;
    let cap = Cap::default();
    let _g = cap.install();
    let sc = Script::new(vec![
        Out::Status(503, vec![]),
        Out::Status(429, vec![("retry-after", "1".into())]),
        Out::Io(io::ErrorKind::ConnectionReset),
        Out::Status(
            200,
            vec![
                ("deprecation", "@1700000000".into()),
                ("sunset", "Sun, 01 Jan 2040 00:00:00 GMT".into()),
                ("ratelimit", "\"d\";r=0;t=2".into()),
            ],
        ),
        Out::Status(401, vec![]),
        Out::Io(io::ErrorKind::ConnectionReset),
        Out::Io(io::ErrorKind::ConnectionReset),
        Out::Io(io::ErrorKind::ConnectionReset),
        Out::Io(io::ErrorKind::ConnectionReset),
    ]);
    let c = ClientBuilder::new()
        .with_auth(AuthLayer::bearer("s118BearerSecretValue").unwrap())
        .with_version(VersionLayer::query("api-version", "2024-06-01"))
        .with_hedge(HedgeLayer::new())
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_coalesce(CoalesceLayer::new())
        .build(sc.svc());
    let uri = "http://alice:hunter2pwS118@api.example.com/v1/orders?api_key=s118ApiKeyValue&token=s118TokenValue";
    let mut shown = String::new();
    let mut errors = 0;
    for m in ["POST", "GET", "GET"] {
        let req = Request::builder()
            .method(m)
            .uri(uri)
            .body(Full::from("{}"))
            .unwrap();
        match c.clone().oneshot(req).await {
            Ok(res) => shown.push_str(&format!("{res:?}\n")),
            Err(e) => {
                errors += 1;
                shown.push_str(&format!("{}\n{e:?}\n", words(&e)));
            }
        }
    }
    assert_eq!(errors, 1, "the last GET gives up: {shown}");
    assert!(shown.contains("gave up after 4 attempts"), "{shown}");
    let logs = cap.text();
    assert!(logs.contains("deprecated"), "the notice is logged: {logs}");
    assert!(logs.contains("api.example.com"), "{logs}");
    for s in [
        "hunter2pwS118",
        "s118ApiKeyValue",
        "s118TokenValue",
        "s118BearerSecretValue",
    ] {
        assert!(!logs.contains(s), "{s} in the logs:\n{logs}");
        assert!(!shown.contains(s), "{s} in a message or Debug:\n{shown}");
    }
}

/// docs/guides/paginate.md, "Guards": "Each guard ends a walk ... with an error that says what
/// happened": more than `max_pages` pages or `max_items` items, a body past the page limit, a
/// loop. The numbers they name are the settings and the counts of the walk; a hostile next
/// cursor quoted in a loop error has its control characters escaped and is cut, and the cut
/// says how many bytes were left out.
#[tokio::test(start_paused = true)]
async fn s118_pagination_guards_name_their_numbers_and_cut_a_hostile_cursor() {
    use futures_util::TryStreamExt;
    use sturdy::paginate::{JsonCursor, Paginate};
    async fn walk(
        f: impl Fn(&str) -> (u16, String) + Send + Sync + 'static,
        max_pages: usize,
        max_items: usize,
        max_bytes: usize,
    ) -> (BoxError, usize) {
        let (svc, n) = json_api(f);
        let p = Paginate::builder(
            svc,
            "https://api.example.com/items",
            JsonCursor::new("/data", "/next"),
        )
        .with_max_pages(max_pages)
        .with_max_items(max_items)
        .with_max_page_bytes(max_bytes)
        .build()
        .unwrap();
        let r: Result<Vec<serde_json::Value>, _> = p.items().try_collect().await;
        (Box::new(r.unwrap_err()), n.load(SeqCst))
    }
    let endless = |pq: &str| {
        (
            200,
            serde_json::json!({"data": [1, 2], "next": format!("c{}", pq.len())}).to_string(),
        )
    };

    let (e, sent) = walk(endless, 3, 100_000, 1 << 20).await;
    assert_eq!(sent, 3, "{}", words(&e));
    assert_eq!(
        e.to_string(),
        "stopped after 3 pages (max_pages) and 6 items; raise with_max_pages or narrow the query"
    );
    assert_eq!(ErrorSummary::of(&*e).kind, "pagination");

    let (e, sent) = walk(endless, 1000, 5, 1 << 20).await;
    assert_eq!(sent, 3, "{}", words(&e));
    assert!(
        e.to_string()
            .starts_with("stopped at 5 items (max_items) on page 3"),
        "{}",
        words(&e)
    );

    let (e, sent) = walk(
        |_| {
            (
                200,
                serde_json::json!({"data": vec![0; 200], "next": null}).to_string(),
            )
        },
        1000,
        100_000,
        100,
    )
    .await;
    assert_eq!(sent, 1);
    assert!(
        e.to_string()
            .starts_with("page 1 (/items) is larger than the 100-byte page limit"),
        "{}",
        words(&e)
    );
    assert_eq!(ErrorSummary::of(&*e).kind, "body");

    let hostile = format!("\u{1b}[31mRED\r\nX{}", "A".repeat(3000));
    let h2 = hostile.clone();
    let (e, sent) = walk(
        move |_| {
            (
                200,
                serde_json::json!({"data": [1], "next": h2}).to_string(),
            )
        },
        1000,
        100_000,
        1 << 20,
    )
    .await;
    assert_eq!(sent, 2, "page 2 links to itself: {}", words(&e));
    let text = e.to_string();
    assert!(
        text.starts_with("pagination loop: the next cursor of page 2"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}') && !text.contains('\r') && !text.contains('\n'),
        "{text}"
    );
    assert!(text.contains(r"\u{1b}[31mRED\r\nX"), "escaped: {text}");
    assert!(text.len() < 1024, "cut: {} bytes", text.len());
    // The cut names the bytes left out: shown + left out = the cursor's length.
    let shown = 11 + text.matches('A').count();
    let more: usize = text
        .split("… (")
        .nth(1)
        .and_then(|t| t.split(" bytes more)").next())
        .expect("the cut says how much is left out")
        .parse()
        .unwrap();
    assert_eq!(shown + more, hostile.len(), "{text}");
}

/// docs/guides/concurrency.md: "Past the wait, the call fails without being sent: a
/// `sturdy_core::Error` of kind `RateLimited` (no wait given), delivery `NotSent`, whose source is
/// `LimitReached` (the key, the limit, how long it waited)". Through tower's `Buffer` with a
/// kept service, and through `ErrorSummary::of`: the words name the host (in lower case, with its
/// port), the limit and the wait; the summary says not processed and no wait.
#[tokio::test(start_paused = true)]
async fn s118_a_full_concurrency_limit_through_buffer_names_host_limit_and_wait() {
    use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
    use tower::buffer::Buffer;
    use tower::{Layer, Service};
    let sc = Script::new(vec![Out::SleepStatus(10_000, 200)]);
    let inner = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::from_millis(250))
        .layer(sc.svc());
    let mut svc = Buffer::new(inner, 8);
    let get = || {
        Request::get("http://API.Example.com:8443/x?api_key=s118Key")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let first = svc.ready().await.unwrap().call(get());
    let first = tokio::spawn(first);
    tokio::task::yield_now().await;
    let t0 = tokio::time::Instant::now();
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_millis(250));
    assert_eq!(sc.seen(), 1, "the refused call was not sent");
    let reached = sturdy::core::find::<LimitReached>(&*err).expect("LimitReached");
    assert_eq!(
        (reached.key(), reached.limit(), reached.waited()),
        ("api.example.com:8443", 1, Duration::from_millis(250))
    );
    assert_eq!(
        err.to_string(),
        "the concurrency limit for api.example.com:8443 (1 call at once) stayed full for 250ms; \
         the call was not sent: try again later or raise the maximum wait"
    );
    assert!(!format!("{err} {err:?}").contains("s118Key"));
    let s = ErrorSummary::of(&*err);
    assert_eq!(
        (
            s.kind,
            s.retryable,
            s.retry_after_ms,
            s.may_have_been_processed
        ),
        ("rate_limited", true, None, false),
        "{}",
        words(&err)
    );
    assert_eq!(delivery(&*err), sturdy::core::Delivery::NotSent);
    first.abort();
}

/// docs/guides/coalesce.md: "Errors are shared too: ... each caller gets a `sturdy_core::Error`
/// ... with the message "the call shared by identical requests in flight failed: <the error>"".
/// A GET that nobody else asked for shares its call with no one: its words should be the call's
/// own, as without coalescing, not a claim that identical requests were in flight.
#[tokio::test(start_paused = true)]
async fn s118_a_lone_call_under_coalescing_is_not_said_to_be_shared() {
    use sturdy::coalesce::CoalesceLayer;
    let get = || {
        Request::get("http://api.example.com/x")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let plain = Script::new(vec![Out::Io(io::ErrorKind::ConnectionRefused); 4]);
    let without = ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(1))
        .build(plain.svc());
    let alone = without.oneshot(get()).await.unwrap_err();
    let sc = Script::new(vec![Out::Io(io::ErrorKind::ConnectionRefused); 4]);
    let with = ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(1))
        .with_coalesce(CoalesceLayer::new())
        .build(sc.svc());
    let err = with.oneshot(get()).await.unwrap_err();
    assert_eq!(sc.seen(), 4);
    // What holds: the same kind, delivery and report.
    let (a, b) = (ErrorSummary::of(&*alone), ErrorSummary::of(&*err));
    assert_eq!(
        (a.kind, a.may_have_been_processed, a.attempts),
        (b.kind, b.may_have_been_processed, b.attempts)
    );
    assert_eq!(
        alone.to_string(),
        "gave up after 4 attempts: connection refused"
    );
    assert_eq!(err.to_string(), alone.to_string(), "{}", words(&err));
}

/// docs/guides/hedge.md: a call "waits in a layer that holds it" and "Each copy then is an attempt
/// that ... takes a place under the concurrency limit"; `RetryLayer::with_hold_marks`: "a
/// deadline ending during [a hold] says the attempt was never sent" and the hedge layer calls
/// `fan_out`. A hedged GET (and a keyed POST) whose first copy reached the server and whose
/// hedge copy waits for the concurrency limit (1) or the rate limit (1/s) when the deadline ends
/// must not be called "not sent".
#[tokio::test(start_paused = true)]
async fn s118_a_hedge_copy_held_when_the_deadline_ends_never_makes_the_call_not_sent() {
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    use sturdy::hedge::HedgeLayer;
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    for variant in ["concurrency", "ratelimit", "keyed-post"] {
        let mut outs = vec![Out::SleepStatus(10, 200); 20];
        outs.extend(vec![Out::SleepStatus(60_000, 200); 2]);
        let sc = Script::new(outs);
        let hedge = HedgeLayer::new()
            .with_min_samples(5)
            .with_budget(1.0, 10)
            .unwrap()
            .with_keyed_requests(true);
        let get = || {
            Request::get("http://api.example.com/x")
                .body(Full::<Bytes>::default())
                .unwrap()
        };
        let c = if variant == "ratelimit" {
            ClientBuilder::new()
                .with_hedge(hedge)
                .with_rate_limit(RateLimitLayer::new(Quota::per_second(1).unwrap()))
                .build(sc.svc())
        } else {
            ClientBuilder::new()
                .with_hedge(hedge)
                .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new().with_limits(1, 1))
                .build(sc.svc())
        };
        for _ in 0..20 {
            assert_eq!(c.clone().oneshot(get()).await.unwrap().status(), 200);
            tokio::time::advance(Duration::from_millis(1100)).await;
        }
        let before = sc.seen();
        let mut req = if variant == "keyed-post" {
            post()
        } else {
            get()
        };
        req.extensions_mut()
            .insert(CallOptions::new().with_deadline(Duration::from_millis(500)));
        let err = c.clone().oneshot(req).await.unwrap_err();
        assert_eq!(
            sc.seen() - before,
            1,
            "{variant}: the first copy reached the server"
        );
        assert_eq!(
            delivery(&*err),
            sturdy::core::Delivery::MaybeProcessed,
            "{variant}: {}",
            words(&err)
        );
        let s = ErrorSummary::of(&*err);
        assert_eq!((s.kind, s.attempts), ("timeout", Some(1)), "{variant}");
        assert!(
            err.to_string()
                .starts_with("the overall deadline of 500ms passed during attempt 1"),
            "{variant}: {}",
            words(&err)
        );
        assert!(
            !err.to_string().contains("not sent"),
            "{variant}: {}",
            words(&err)
        );
    }
}

/// docs/guides/retry.md: a `Retry-After` "on a call that is not retried (a POST without a key, a
/// body not kept for a replay, a spent retry budget) is not slept: on a 429 or a 503 the call
/// fails at once with a `RateLimited { retry_after }` in its error chain"; README.md: "for a
/// POST `...; it may have been processed: retry with the same idempotency key 7f0c...`". Each
/// refusal to retry says why, names the host and the wait the server asked for, and says what
/// the server may have done, matching what reached it.
#[tokio::test(start_paused = true)]
async fn s118_a_retry_not_made_says_why_and_what_the_server_may_have_done() {
    use sturdy::retry::RetryLayer;
    let spent = || {
        RetryLayer::new()
            .with_budget(Duration::from_secs(1), 0, 0.0)
            .unwrap()
    };
    // (case, answer, with a key, the words, may have been processed)
    let cases: Vec<(&str, Out, bool, &str, bool)> = vec![
        (
            "503 + Retry-After, budget spent",
            Out::Status(503, vec![("retry-after", "2".into())]),
            true,
            "rate limited by api.example.com; retry after 2s (not retried: the retry budget for api.example.com is exhausted); it may have been processed: retry with the same idempotency key ",
            true,
        ),
        (
            "reset, budget spent",
            Out::Io(io::ErrorKind::ConnectionReset),
            true,
            "connection reset by peer (not retried: the retry budget for api.example.com is exhausted); it may have been processed: retry with the same idempotency key ",
            true,
        ),
        (
            "refused, budget spent",
            Out::Io(io::ErrorKind::ConnectionRefused),
            true,
            "connection refused (not retried: the retry budget for api.example.com is exhausted); the request was not sent, so it is safe to send again",
            false,
        ),
        (
            "503 + Retry-After, no key",
            Out::Status(503, vec![("retry-after", "2".into())]),
            false,
            "rate limited by api.example.com; retry after 2s (not retried: a POST without an idempotency key is not retried once it may have reached the server); it may have been processed: check before sending it again, or it may happen twice",
            true,
        ),
    ];
    for (case, out, keyed, expected, processed) in cases {
        let sc = Script::new(vec![out; 4]);
        let err = if keyed {
            ClientBuilder::new()
                .with_retry(spent())
                .build(sc.svc())
                .oneshot(post())
                .await
        } else {
            ClientBuilder::new()
                .without_idempotency()
                .build(sc.svc())
                .oneshot(post())
                .await
        }
        .unwrap_err();
        assert_eq!(sc.seen(), 1, "{case}: one attempt");
        let text = err.to_string();
        assert!(text.starts_with(expected), "{case}: {}", words(&err));
        let s = ErrorSummary::of(&*err);
        assert_eq!(
            s.may_have_been_processed,
            processed,
            "{case}: {}",
            words(&err)
        );
        assert_eq!(s.attempts, Some(1), "{case}");
        if keyed {
            let key = s.idempotency_key.clone().expect("the key is reported");
            assert!(text.ends_with(&key) || !processed, "{case}: {text}");
        } else {
            assert_eq!(s.idempotency_key, None, "{case}");
        }
    }
}

/// docs/guides/concurrency.md: past `with_max_hosts`, "the call's host shares one limit with the
/// other hosts past it"; `LimitReached::key`: "the call's own, also past the layer's bound on
/// hosts"; `is_shared`. The refusal names the call's host and says the limit is the shared one.
#[tokio::test(start_paused = true)]
async fn s118_a_refusal_by_the_shared_overflow_limit_names_the_calls_host_and_says_shared() {
    use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
    use tower::Layer;
    let sc = Script::new(vec![Out::SleepStatus(10_000, 200); 3]);
    let cl = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_hosts(1)
        .with_max_wait(Duration::from_millis(20))
        .layer(sc.svc());
    let g = |h: &str| {
        Request::get(format!("http://{h}/x"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let a = tokio::spawn(cl.clone().oneshot(g("a.example.com")));
    tokio::task::yield_now().await;
    let b = tokio::spawn(cl.clone().oneshot(g("b.example.com")));
    tokio::task::yield_now().await;
    let err = cl.clone().oneshot(g("C.Example.com")).await.unwrap_err();
    assert_eq!(sc.seen(), 2, "the refused call was not sent");
    let lr = sturdy::core::find::<LimitReached>(&*err).expect("LimitReached");
    assert_eq!(
        (lr.is_shared(), lr.key(), lr.limit(), lr.waited()),
        (true, "c.example.com", 1, Duration::from_millis(20))
    );
    assert_eq!(
        err.to_string(),
        "the concurrency limit for c.example.com, which shares one limit with the other hosts \
         past the layer's bound on hosts (1 call at once) stayed full for 20ms; the call was not \
         sent: try again later or raise the maximum wait"
    );
    assert_eq!(delivery(&*err), sturdy::core::Delivery::NotSent);
    a.abort();
    b.abort();
}

/// docs/guides/auth.md: a failed token request "backs off (1 s doubling to 60 s) ..., and a caller
/// with no valid token during the backoff gets the last error at once"; its message says when:
/// "the token endpoint ... is not asked again for 999ms". docs/guides/agents.md: `retry_after_ms`
/// is "when the server, a limiter or a breaker said when", and the advice is what to do next.
/// Here sturdy itself said when (it will not ask before then, so a call before then fails the
/// same way, at once), yet the summary has no wait and the advice says to try again now.
#[tokio::test(start_paused = true)]
async fn s118_a_token_backoff_named_in_the_message_reaches_the_summary_and_advice() {
    use sturdy::auth::{AuthLayer, ClientCredentials};
    let asked = Arc::new(AtomicUsize::new(0));
    let a2 = asked.clone();
    let tok = service_fn(move |_req: Req| {
        a2.fetch_add(1, SeqCst);
        async {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(503)
                    .body(Full::<Bytes>::from("down"))
                    .unwrap(),
            )
        }
    });
    let cc = ClientCredentials::new(
        tok,
        "https://auth.example.com/oauth/token",
        "id",
        "s118secret",
    )
    .unwrap();
    let sc = Script::new(vec![]);
    let c = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(cc))
        .without_retry()
        .build(sc.svc());
    let first = c.clone().oneshot(post()).await.unwrap_err();
    assert_eq!(asked.load(SeqCst), 1, "{}", words(&first));
    tokio::time::advance(Duration::from_millis(1)).await;
    let err = c.clone().oneshot(post()).await.unwrap_err();
    assert_eq!(asked.load(SeqCst), 1, "the backoff holds: {}", words(&err));
    assert_eq!(sc.seen(), 0, "the API was never called");
    let text = err.to_string();
    assert!(
        text.ends_with(
            "the token endpoint https://auth.example.com/oauth/token is not asked again for 999ms"
        ),
        "{}",
        words(&err)
    );
    assert!(!text.contains("s118secret"));
    let s = ErrorSummary::of(&*err);
    assert!(!s.may_have_been_processed);
    assert_eq!(s.status, Some(503), "the token endpoint's status");
    assert_eq!(s.retry_after_ms, Some(999), "{}", words(&err));
    assert!(
        s.advice().starts_with("Try again in 999ms"),
        "{}",
        words(&err)
    );
}

async fn raw_server(
    reply: &'static [u8],
) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let h = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let n2 = n2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(k) = s.read(&mut chunk).await else {
                        return;
                    };
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let cl: usize = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + cl {
                            break;
                        }
                    }
                }
                n2.fetch_add(1, SeqCst);
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), n, h)
}

/// docs/RELIABILITY.md and `Delivery::MaybeProcessed`: "At least one attempt reached the server,
/// or may have: it answered ..., or a connection broke after the request was written"; README.md:
/// "`gave up after 4 attempts: connection reset by peer`, or for a POST `...; it may have been
/// processed: retry with the same idempotency key 7f0c...`". A raw TCP server on 127.0.0.1 that
/// reads each whole request and answers what is not HTTP (garbage, a bad `Content-Length`, 200
/// header lines, nothing at all, a four-digit status): the keyed POST is retried with its key,
/// every attempt reached the server, and the words say so, naming what was wrong.
#[tokio::test]
async fn s118_malformed_answers_to_a_post_that_reached_the_server_say_it_may_have_been_processed() {
    use hyper_util::client::legacy::Client as HyperClient;
    use hyper_util::rt::TokioExecutor;
    use sturdy::retry::{Backoff, RetryLayer};
    let many: &'static [u8] = Box::leak({
        let mut v = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..200 {
            v.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        v.extend_from_slice(b"content-length: 0\r\n\r\n");
        v.into_boxed_slice()
    });
    for (reply, cause) in [
        (
            &b"NOT HTTP AT ALL\r\n\r\n"[..],
            "the server sent an invalid HTTP response (invalid HTTP version parsed)",
        ),
        (
            &b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n"[..],
            "the server sent an invalid HTTP response (invalid content-length parsed)",
        ),
        (
            many,
            "the server sent an invalid HTTP response (message head is too large)",
        ),
        (
            &b""[..],
            "the connection closed before the response was complete",
        ),
        (
            &b"HTTP/1.1 1000 Odd\r\ncontent-length: 0\r\n\r\n"[..],
            "the server sent an invalid HTTP response (invalid HTTP status-code parsed)",
        ),
    ] {
        let (base, got, server) = raw_server(reply).await;
        let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let c = ClientBuilder::new()
            .with_retry(
                RetryLayer::new().with_seed(118).with_backoff(
                    Backoff::decorrelated_jitter(
                        Duration::from_millis(5),
                        Duration::from_millis(20),
                    )
                    .unwrap(),
                ),
            )
            .build(http);
        let req = Request::post(format!("{base}/orders"))
            .body(Full::from("{}"))
            .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), c.oneshot(req))
            .await
            .expect("bounded")
            .unwrap_err();
        server.abort();
        assert_eq!(
            got.load(SeqCst),
            4,
            "{cause}: every attempt reached the server"
        );
        let s = ErrorSummary::of(&*err);
        let key = s.idempotency_key.clone().expect("a key");
        assert_eq!(
            err.to_string(),
            format!(
                "gave up after 4 attempts: {cause}; it may have been processed: retry with the \
                 same idempotency key {key}"
            )
        );
        assert_eq!(delivery(&*err), sturdy::core::Delivery::MaybeProcessed);
        assert_eq!(
            (s.kind, s.retryable, s.may_have_been_processed, s.attempts),
            ("transport", true, true, Some(4)),
            "{}",
            words(&err)
        );
        assert!(sturdy::core::find::<hyper_util::client::legacy::Error>(&*err).is_some());
    }
}
