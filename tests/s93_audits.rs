//! Findings of the read-only cancellation and composition audits (s88, s89), each shown through
//! the public API: a query-key refusal gives back what the inner service's `poll_ready`
//! reserved; the adaptive concurrency limit takes a call that must wait on a thread outside a
//! runtime without panicking; callers who joined a coalesced reqwest call whose first caller
//! went away get their answer; a query version pin that does not fit is warned about; and an
//! auth credential with a character a header cannot carry is named, with where, never shown.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::AuthLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::reqwest::SturdyMiddleware;
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use tower::{Layer, Service, ServiceExt};

/// s88/s89: a kept service over `ConcurrencyLimit(1)`, whose call the auth layer refuses (the
/// URI has no room for the query key), gives the permit back at once: another clone is served.
#[tokio::test(start_paused = true)]
async fn a_refused_query_key_call_gives_the_inner_permit_back() {
    let auth = AuthLayer::api_key_query("api_key", "k-123").unwrap();
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(String::new()))
    });
    let mut kept = auth.layer(tower::limit::ConcurrencyLimit::new(inner, 1));
    let other = kept.clone();
    let long = format!("http://h/{}", "a".repeat(65_520));
    let req = Request::get(long).body(Full::default()).unwrap();
    let err = kept.ready().await.unwrap().call(req).await.unwrap_err();
    assert!(err.to_string().contains("`api_key`"), "{err}");
    assert!(!err.to_string().contains("k-123"), "{err}");
    let small = Request::get("http://h/p").body(Full::default()).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(1), other.oneshot(small)).await;
    assert!(res.expect("the permit was given back").is_ok());
    drop(kept);
}

/// s88: a call that must wait for a place, made on a thread outside any runtime (a service
/// moved into a plain thread), does not panic in `call`; dropped, it leaves the count of
/// waiting calls as it was.
#[test]
fn a_waiting_call_made_outside_a_runtime_does_not_panic() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let inner = tower::service_fn(move |_req: Request<String>| {
        let g = g.clone();
        async move {
            let _p = g.acquire().await;
            Ok::<_, Infallible>(Response::new(String::new()))
        }
    });
    let layer = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::from_secs(5));
    let handle = layer.handle();
    let svc = layer.layer(inner);
    // One call takes the only place and holds it.
    let mut first = svc.clone();
    let mut held = None;
    rt.block_on(async {
        let f = first
            .ready()
            .await
            .unwrap()
            .call(Request::get("http://h/a").body(String::new()).unwrap());
        held = Some(tokio::spawn(f));
    });
    let held = held.unwrap();
    // The second call, made outside the runtime, has to wait.
    let mut second = svc;
    let waiting = std::thread::spawn(move || {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(second.poll_ready(&mut cx).is_ready());
        let fut = second.call(Request::get("http://h/b").body(String::new()).unwrap());
        drop(fut);
    })
    .join();
    assert!(waiting.is_ok(), "calling outside a runtime panicked");
    assert_eq!(handle.state("h").map(|s| s.waiting()), Some(0));
    gate.add_permits(1);
    rt.block_on(async { held.await.unwrap().unwrap() });
}

/// s89: with coalescing inside `SturdyMiddleware`, the caller whose request was sending the
/// shared call goes away (its task aborted): the caller who joined it gets its answer, by
/// sending its own request (coalesce.md: a caller that goes away leaves the call to the
/// others).
#[tokio::test]
async fn a_joined_reqwest_caller_is_answered_when_the_sending_caller_goes_away() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let coalesce = CoalesceLayer::new();
    let stats = coalesce.handle();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new().with_coalesce(coalesce).build(next)
        }))
        .build();
    let url = format!("http://{addr}/slow");
    let a = {
        let (c, u) = (client.clone(), url.clone());
        tokio::spawn(async move { c.get(u).send().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = {
        let (c, u) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let res = c.get(u).send().await?;
            let status = res.status();
            Ok::<_, reqwest_middleware::Error>((status, res.text().await?))
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.abort();
    let (status, text) = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .expect("no hang")
        .unwrap()
        .expect("the joined caller is answered");
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(text, "done");
    let s = stats.stats();
    assert_eq!(s.joined(), 1, "{s:?}");
    assert_eq!(s.fallbacks(), 1, "{s:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    server.abort();
}

/// s89: a query version pin that would make the URI longer than a URI can be is sent without
/// the pin, and a warning names the parameter (version.md).
#[tokio::test]
async fn a_query_version_that_does_not_fit_is_warned_about() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let inner = tower::service_fn(move |req: Request<String>| {
        s.lock().unwrap().push(req.uri().to_string());
        async { Ok::<_, Infallible>(Response::new(String::new())) }
    });
    let svc = VersionLayer::query("api-version", "2024-06-01").layer(inner);
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let l = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || Writer(l.clone()))
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let long = format!("http://h/{}", "a".repeat(65_520));
    let req = Request::get(long.as_str()).body(String::new()).unwrap();
    svc.clone().oneshot(req).await.unwrap();
    let short = Request::get("http://h/x").body(String::new()).unwrap();
    svc.oneshot(short).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0], long);
    assert_eq!(seen[1], "http://h/x?api-version=2024-06-01");
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(text.contains("WARN"), "{text}");
    assert!(text.contains("api-version"), "{text}");
    assert!(text.contains("sent without it"), "{text}");
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// s85: the error of a credential a header cannot carry says which credential and where the
/// character is, and never shows the secret or the character.
#[test]
fn a_credential_with_a_forbidden_character_is_named_not_shown() {
    let e = AuthLayer::api_key(
        http::header::HeaderName::from_static("x-api-key"),
        "sk-live-abc\ndef",
    )
    .unwrap_err();
    let m = e.to_string();
    assert!(m.contains("the API key"), "{m}");
    assert!(m.contains("byte 12 of 15"), "{m}");
    assert!(m.contains("control character"), "{m}");
    assert!(!m.contains("sk-live"), "{m}");
    let e = AuthLayer::bearer("sec\u{7f}r").unwrap_err();
    let m = e.to_string();
    assert!(m.contains("the bearer token"), "{m}");
    assert!(m.contains("at byte 4 of 5"), "{m}");
    assert!(!m.contains("sec\u{7f}"), "{m}");
}

/// A store that fails once as a refused connection would, then grants.
#[derive(Debug, Default)]
struct FlakyStore {
    asked: AtomicUsize,
    plain: bool,
}

impl sturdy::ratelimit::RemoteQuota for FlakyStore {
    fn reserve(
        &self,
        _key: &str,
        _max_wait: Duration,
    ) -> sturdy::ratelimit::BoxFuture<Result<sturdy::ratelimit::Reserve, sturdy::core::BoxError>>
    {
        let n = self.asked.fetch_add(1, Ordering::SeqCst);
        let plain = self.plain;
        Box::pin(async move {
            if n == 0 {
                if plain {
                    return Err("a custom store's own failure".into());
                }
                return Err(sturdy::core::Error::new(
                    sturdy::core::ErrorKind::Connect,
                    "could not connect to the store",
                )
                .into());
            }
            Ok(sturdy::ratelimit::Reserve::Granted {
                wait: Duration::ZERO,
            })
        })
    }
}

/// s85: a fail-closed rate-limit store failure is retryable when the store's own error is (it
/// could not be reached): kind `Connect`, not sent, an ErrorSummary that says trying again may
/// help; a retry layer above tries again and the store is asked again. A store error that is
/// not a retryable one stays `Other`.
#[tokio::test(start_paused = true)]
async fn a_fail_closed_store_failure_is_retried_when_the_store_may_answer_later() {
    use sturdy::ratelimit::{OnStoreError, Quota, RateLimitLayer};
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) }
    });
    let quota = Quota::per_second(10).unwrap();
    let limit = |store: Arc<FlakyStore>| {
        RateLimitLayer::new(quota)
            .with_remote(store)
            .with_on_store_error(OnStoreError::Fail)
    };

    // Alone: the refusal is Connect, not sent, and reads as worth another try.
    let store = Arc::new(FlakyStore::default());
    let svc = limit(store.clone()).layer(api.clone());
    let req = Request::get("http://api.test/x")
        .body(Full::default())
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &sturdy::core::ErrorKind::Connect, "{err}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent
    );
    let summary = sturdy::core::ErrorSummary::of(&*err);
    assert!(summary.retryable, "{summary:?}");
    assert!(
        summary.advice().starts_with("Trying again may help"),
        "{}",
        summary.advice()
    );

    // Under a retry layer: tried again, the store asked again, the call sent once.
    let store = Arc::new(FlakyStore::default());
    let svc = tower::ServiceBuilder::new()
        .layer(sturdy::retry::RetryLayer::new())
        .layer(limit(store.clone()))
        .service(api.clone());
    let req = Request::post("http://api.test/pay")
        .body(Full::from("{}"))
        .unwrap();
    svc.oneshot(req).await.expect("retried");
    assert_eq!(store.asked.load(Ordering::SeqCst), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A store error that says nothing of being transient stays Other.
    let store = Arc::new(FlakyStore {
        plain: true,
        ..FlakyStore::default()
    });
    let svc = limit(store).layer(api);
    let req = Request::get("http://api.test/x")
        .body(Full::default())
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &sturdy::core::ErrorKind::Other, "{err}");
}

/// s94: the chaos server's knobs at their largest answer, not panic: a `Retry-After` date
/// `Duration::MAX` ahead is a date about 30 years out.
#[tokio::test]
async fn chaos_knobs_at_their_largest_answer() {
    use sturdy_chaos::{ChaosServer, Knobs, RetryAfterForm};
    let server = ChaosServer::start(Knobs {
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Date(Duration::MAX),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let res = reqwest::get(server.url("/orders")).await.unwrap();
    assert_eq!(res.status(), reqwest::StatusCode::TOO_MANY_REQUESTS);
    let date = res.headers()["retry-after"].to_str().unwrap().to_owned();
    // An IMF-fixdate: "Sun, 06 Nov 2056 08:49:37 GMT".
    let year: u32 = date.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!((2055..=9999).contains(&year), "{date}");
}

/// s94/s95: with `with_replication(1, Duration::MAX)` on the Redis Cluster (a replica per
/// primary), pushes and locks work: the `WAIT` timeout is sent as about 30 years, which Redis
/// takes, not as 2^64 - 1 ms, which it refused after the write had run.
#[tokio::test]
async fn replication_with_the_largest_wait_is_accepted_by_redis() {
    use sturdy::idempotency::server::{Begin, IdempotencyStore, LockToken};
    use sturdy::redis::{RedisIdempotencyStore, RedisStreamQueue};
    use sturdy::webhook::{EventQueue, Push, WebhookEvent};
    let Ok(v) = std::env::var("STURDY_REDIS_CLUSTER_URLS") else {
        eprintln!("STURDY_REDIS_CLUSTER_URLS unset: skipping a Redis Cluster test");
        return;
    };
    let urls: Vec<String> = v.split(',').map(|s| s.trim().to_owned()).collect();
    let tag = format!("s93-{}", std::process::id());
    let queue = RedisStreamQueue::connect_cluster(urls.iter(), format!("{{{tag}}}:events"))
        .await
        .unwrap()
        .with_replication(1, Duration::MAX);
    let event = WebhookEvent::new("test", "evt_s93", Bytes::from_static(b"{}"));
    let pushed = tokio::time::timeout(
        Duration::from_secs(10),
        queue.push(event, Duration::from_secs(60)),
    )
    .await
    .expect("bounded");
    assert!(matches!(pushed, Ok(Push::Enqueued)), "{pushed:?}");
    let store = RedisIdempotencyStore::connect_cluster(urls.iter())
        .await
        .unwrap()
        .with_prefix(tag)
        .with_replication(1, Duration::MAX);
    let begun = tokio::time::timeout(
        Duration::from_secs(10),
        store.begin("k", [7; 32], LockToken::random(), Duration::from_secs(30)),
    )
    .await
    .expect("bounded");
    assert!(matches!(begun, Ok(Begin::Started)), "{begun:?}");
}

/// s91: after a graceful shutdown, `wait_idle` lets the handler of a client that went away end
/// and store its outcome before the runtime goes: the retry replays it, the handler ran once.
#[tokio::test]
async fn wait_idle_lets_a_detached_handler_finish_after_a_graceful_shutdown() {
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let idem = IdempotencyLayer::new(MemoryStore::new(1_000).unwrap(), ByCredentials::default());
    let app = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move || {
                let r = r.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                    (http::StatusCode::CREATED, format!("order {n}"))
                }
            }),
        )
        .layer(idem.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn({
        let app = app.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    // The client leaves after 50 ms, mid-handler.
    let client = reqwest::Client::new();
    let gone = client
        .post(format!("http://{addr}/orders"))
        .header("idempotency-key", "order-s93")
        .timeout(Duration::from_millis(50))
        .send()
        .await;
    assert!(gone.is_err());
    assert_eq!(idem.running(), 1);
    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
    // The shutdown did not wait for it; wait_idle does.
    tokio::time::timeout(Duration::from_secs(5), idem.wait_idle())
        .await
        .expect("the handler ended");
    assert_eq!(idem.running(), 0);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Its outcome was stored: the client's retry replays it.
    let retry = Request::post("/orders")
        .header("idempotency-key", "order-s93")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = app.oneshot(retry).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// s100/s101: a failure whose cause is not the server (a token that could not be had) does not
/// lower the host's adaptive concurrency limit (concurrency.md: failures that say nothing about
/// capacity are ignored).
#[tokio::test(start_paused = true)]
async fn a_failure_caused_elsewhere_leaves_the_concurrency_limit() {
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(tower::service_fn(|_req: Request<String>| async {
        Err::<Response<String>, _>(sturdy::core::BoxError::from(
            sturdy::core::Error::new(sturdy::core::ErrorKind::Timeout, "no access token in time")
                .with_cause_elsewhere(),
        ))
    }));
    for _ in 0..10 {
        let req = Request::get("http://api.test/x")
            .body(String::new())
            .unwrap();
        assert!(svc.clone().oneshot(req).await.is_err());
    }
    assert_eq!(handle.limit("api.test"), Some(20));
}

/// s101: in a `ClientBuilder` stack, a request's own attempt timeout (`CallOptions`) is kept
/// under the breaker, so attempts that hang are counted: the breaker opens.
#[tokio::test(start_paused = true)]
async fn a_request_attempt_timeout_is_counted_by_the_breaker() {
    use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
    use sturdy::core::CallOptions;
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let client = ClientBuilder::new()
        .with_circuit_breaker(breaker)
        .build(tower::service_fn(|_req: Request<Full<Bytes>>| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }));
    for _ in 0..2 {
        let req = Request::get("http://api.test/x")
            .extension(
                CallOptions::new()
                    .with_attempt_timeout(Duration::from_millis(100))
                    .without_retries(),
            )
            .body(Full::default())
            .unwrap();
        let err = client.clone().oneshot(req).await.unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }
    assert!(
        matches!(handle.state("api.test"), Some(CircuitState::Open { .. })),
        "{:?}",
        handle.state("api.test")
    );
}
