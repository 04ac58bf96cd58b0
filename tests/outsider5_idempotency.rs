//! Outside tests of the server idempotency layer's "Guarantees, per failure" table
//! (docs/guides/idempotency.md), read row by row, with a store of our own that wraps
//! `MemoryStore` and can be slowed down or made to fail. Paused time, in process.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::core::BoxError;
use sturdy::idempotency::server::{
    problem, Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore,
    LockToken, MemoryStore, StoredResponse,
};
use tokio::time::Instant;
use tower::ServiceExt;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Knobs of the wrapping store.
#[derive(Debug, Default, Clone)]
struct Knobs {
    /// Wait this long before asking the memory store to lock.
    begin_before: Duration,
    /// Lock at once, then wait this long before answering.
    begin_after: Duration,
    /// Wait this long before releasing.
    release_before: Duration,
    fail_begin: bool,
    fail_complete: bool,
    fail_renew: bool,
}

#[derive(Debug, Default)]
struct Log {
    begins: Vec<(Instant, String)>,
    completes: Vec<Instant>,
    renews: Vec<Instant>,
    releases: Vec<Instant>,
}

#[derive(Debug, Clone)]
struct Wrapped {
    inner: MemoryStore,
    knobs: Arc<Mutex<Knobs>>,
    log: Arc<Mutex<Log>>,
}

impl Wrapped {
    fn new(knobs: Knobs) -> Self {
        Self {
            inner: MemoryStore::default(),
            knobs: Arc::new(Mutex::new(knobs)),
            log: Arc::new(Mutex::new(Log::default())),
        }
    }
    fn knobs(&self) -> Knobs {
        self.knobs.lock().unwrap().clone()
    }
    fn set(&self, f: impl FnOnce(&mut Knobs)) {
        f(&mut self.knobs.lock().unwrap());
    }
}

fn down() -> BoxError {
    "the store is down (on purpose)".into()
}

impl IdempotencyStore for Wrapped {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        let k = self.knobs();
        let this = self.clone();
        let key = key.to_owned();
        Box::pin(async move {
            tokio::time::sleep(k.begin_before).await;
            if k.fail_begin {
                return Err(down());
            }
            let r = this.inner.begin(&key, fingerprint, token, lease).await;
            this.log
                .lock()
                .unwrap()
                .begins
                .push((Instant::now(), format!("{r:?}").chars().take(20).collect()));
            tokio::time::sleep(k.begin_after).await;
            r
        })
    }

    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        self.log.lock().unwrap().renews.push(Instant::now());
        if self.knobs().fail_renew {
            return Box::pin(async { Err(down()) });
        }
        self.inner.renew(key, fingerprint, token, lease)
    }

    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        self.log.lock().unwrap().completes.push(Instant::now());
        if self.knobs().fail_complete {
            return Box::pin(async { Err(down()) });
        }
        self.inner.complete(key, fingerprint, token, response, ttl)
    }

    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        let k = self.knobs();
        let this = self.clone();
        let key = key.to_owned();
        Box::pin(async move {
            tokio::time::sleep(k.release_before).await;
            this.log.lock().unwrap().releases.push(Instant::now());
            this.inner.release(&key, token).await
        })
    }
}

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// `POST /orders`: counts, sleeps `x-sleep` ms, answers `x-code` (201 by default) with
/// `order <n>`. `POST /boom`: panics on its first run.
fn app(runs: &Runs, layer: IdempotencyLayer<Wrapped>) -> Router {
    let r = runs.clone();
    let orders = move |h: HeaderMap| {
        let r = r.clone();
        async move {
            let n = r.0.fetch_add(1, Ordering::SeqCst);
            let sleep = h
                .get("x-sleep")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            tokio::time::sleep(ms(sleep)).await;
            let code = h
                .get("x-code")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(201);
            (StatusCode::from_u16(code).unwrap(), format!("order {n}"))
        }
    };
    let r = runs.clone();
    let boom = move || {
        let r = r.clone();
        async move {
            if r.0.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("the handler panicked on purpose");
            }
            (StatusCode::CREATED, "fine")
        }
    };
    Router::new()
        .route("/orders", post(orders))
        .route("/boom", post(boom))
        .layer(layer)
}

fn layer(store: &Wrapped) -> IdempotencyLayer<Wrapped> {
    IdempotencyLayer::new(store.clone(), ByCredentials::default())
}

fn req(uri: &str, key: &str, extra: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::post(uri)
        .header("authorization", "Bearer a")
        .header("idempotency-key", key);
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Body::from(r#"{"item":"book"}"#)).unwrap()
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let res = tokio::time::timeout(Duration::from_secs(3600), app.clone().oneshot(r))
        .await
        .expect("the request never ended")
        .unwrap();
    let (p, b) = res.into_parts();
    let b = b.collect().await.unwrap().to_bytes();
    (
        p.status,
        p.headers,
        String::from_utf8_lossy(&b).into_owned(),
    )
}

fn problem_type(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

// ---------------------------------------------------------------- row 1

/// Row 1, "client gone while the store is locking the key (before the handler starts)": "the
/// handler does not run; the store's answer is awaited in the background and, if it locked the
/// key, the key is released"; the client: "a retry with the same key runs normally (or gets 409
/// for the moment the release is on its way)". The store answers slowly *before* locking.
#[tokio::test(start_paused = true)]
async fn row1_client_gone_while_the_store_is_slow_to_lock() {
    let store = Wrapped::new(Knobs {
        begin_before: ms(200),
        ..Knobs::default()
    });
    let runs = Runs::default();
    let app = app(&runs, layer(&store));
    let first = tokio::time::timeout(ms(50), app.clone().oneshot(req("/orders", "k1", &[]))).await;
    assert!(first.is_err(), "the attempt timed out");
    tokio::time::sleep(ms(1000)).await;
    assert_eq!(runs.get(), 0, "the handler does not run");
    assert_eq!(
        store.log.lock().unwrap().begins.len(),
        1,
        "the lock was awaited in the background"
    );
    assert_eq!(
        store.log.lock().unwrap().releases.len(),
        1,
        "and the key was released"
    );
    assert!(store.inner.is_empty(), "nothing is left locked");
    store.set(|k| k.begin_before = Duration::ZERO);
    let (s, h, b) = send(&app, req("/orders", "k1", &[])).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 0"), "{h:?}");
    assert_eq!(runs.get(), 1);
}

/// Row 1 with a store that locks at once but whose answer is slow to come back: the retry made
/// while the release is on its way gets 409 (`Retry-After: 1`), the next one runs normally.
#[tokio::test(start_paused = true)]
async fn row1_client_gone_while_the_lock_answer_is_on_its_way() {
    let store = Wrapped::new(Knobs {
        begin_after: ms(300),
        release_before: ms(500),
        ..Knobs::default()
    });
    let runs = Runs::default();
    let app = app(&runs, layer(&store));
    let first = tokio::time::timeout(ms(50), app.clone().oneshot(req("/orders", "k2", &[]))).await;
    assert!(first.is_err());
    store.set(|k| k.begin_after = Duration::ZERO);
    // Locked; the release is on its way (the lock's answer arrives at 300 ms, the release at 800).
    let (s, h, b) = send(&app, req("/orders", "k2", &[])).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(problem_type(&b), problem::IN_FLIGHT);
    tokio::time::sleep(ms(1000)).await;
    assert_eq!(
        runs.get(),
        0,
        "the handler does not run for the attempt that went away"
    );
    assert_eq!(store.log.lock().unwrap().releases.len(), 1);
    let (s, _, b) = send(&app, req("/orders", "k2", &[])).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 0"));
    assert_eq!(runs.get(), 1);
}

/// Row 1 with many clients gone at once, each on its own key, while the store is slow: every key
/// is released, none stays locked until its lease ends.
#[tokio::test(start_paused = true)]
async fn row1_many_clients_gone_leave_no_key_locked() {
    let store = Wrapped::new(Knobs {
        begin_after: ms(100),
        ..Knobs::default()
    });
    let runs = Runs::default();
    let app = app(&runs, layer(&store));
    let mut futs = Vec::new();
    for i in 0..20 {
        let mut f = Box::pin(app.clone().oneshot(req("/orders", &format!("m{i}"), &[])));
        assert!(futures_util::FutureExt::now_or_never(f.as_mut()).is_none());
        futs.push(f);
    }
    drop(futs);
    tokio::time::sleep(ms(500)).await;
    assert_eq!(runs.get(), 0);
    assert_eq!(store.log.lock().unwrap().releases.len(), 20);
    assert!(store.inner.is_empty(), "{} entries left", store.inner.len());
}

// ---------------------------------------------------------------- row 2

/// Row 2, "client timeout mid-handler": the retry gets 409 in flight (`Retry-After: 1`) while
/// the handler runs, then the stored response with `Idempotent-Replayed: true`; ran once.
#[tokio::test(start_paused = true)]
async fn row2_client_timeout_mid_handler() {
    let store = Wrapped::new(Knobs::default());
    let runs = Runs::default();
    let app = app(&runs, layer(&store));
    let slow = [("x-sleep", "2000")];
    let first =
        tokio::time::timeout(ms(500), app.clone().oneshot(req("/orders", "k", &slow))).await;
    assert!(first.is_err());
    let (s, h, b) = send(&app, req("/orders", "k", &slow)).await;
    assert_eq!(
        (s, problem_type(&b)),
        (StatusCode::CONFLICT, problem::IN_FLIGHT.to_owned())
    );
    assert_eq!(h.get("retry-after").unwrap(), "1");
    tokio::time::sleep(ms(2000)).await;
    let (s, h, b) = send(&app, req("/orders", "k", &slow)).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 0"));
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.get(), 1);
}

// ---------------------------------------------------------------- row 4

/// Row 4, "handler panics": "the key is released, and the release has completed before the panic
/// resumes in the request's future"; "a retry, even at once, runs the handler again". The
/// store's release takes 300 ms.
#[tokio::test(start_paused = true)]
async fn row4_a_panic_releases_the_key_before_it_resumes() {
    let store = Wrapped::new(Knobs {
        release_before: ms(300),
        ..Knobs::default()
    });
    let runs = Runs::default();
    let app = app(&runs, layer(&store));
    let r = tokio::spawn(app.clone().oneshot(req("/boom", "p", &[]))).await;
    assert!(
        r.unwrap_err().is_panic(),
        "the panic resumes in the request's future"
    );
    assert_eq!(
        store.log.lock().unwrap().releases.len(),
        1,
        "released before the panic resumed"
    );
    let (s, _, b) = send(&app, req("/boom", "p", &[])).await;
    assert_eq!(
        (s, b.as_str()),
        (StatusCode::CREATED, "fine"),
        "a retry at once runs again"
    );
    assert_eq!(runs.get(), 2);
}

// ---------------------------------------------------------------- row 5

/// Row 5, "handler returns 5xx (or 408, 425, 429)": "not stored ...; the key is released before
/// the response goes out"; "a retry, even at once, runs the handler again". Release takes 300 ms.
#[tokio::test(start_paused = true)]
async fn row5_unstored_statuses_release_before_the_response_goes_out() {
    for code in ["500", "503", "408", "425", "429"] {
        let store = Wrapped::new(Knobs {
            release_before: ms(300),
            ..Knobs::default()
        });
        let runs = Runs::default();
        let app = app(&runs, layer(&store));
        let (s, _, _) = send(&app, req("/orders", "f", &[("x-code", code)])).await;
        assert_eq!(s.as_str(), code);
        assert_eq!(
            store.log.lock().unwrap().releases.len(),
            1,
            "{code}: released before"
        );
        let (s, _, b) = send(&app, req("/orders", "f", &[])).await;
        assert_eq!(
            (s, b.as_str()),
            (StatusCode::CREATED, "order 1"),
            "{code}: retry at once"
        );
        assert_eq!(runs.get(), 2, "{code}");
    }
}

// ---------------------------------------------------------------- row 7

/// Row 7, "store down when the request arrives": "503 `…/idempotency-store-unavailable`,
/// `Retry-After: 1`; the handler does not run"; "a later retry with the same key runs normally".
#[tokio::test(start_paused = true)]
async fn row7_store_down_when_the_request_arrives() {
    let store = Wrapped::new(Knobs {
        fail_begin: true,
        ..Knobs::default()
    });
    let runs = Runs::default();
    let app = app(&runs, layer(&store));
    let (s, h, b) = send(&app, req("/orders", "d", &[])).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(problem_type(&b), problem::STORE_UNAVAILABLE);
    assert_eq!(runs.get(), 0);
    store.set(|k| k.fail_begin = false);
    let (s, _, b) = send(&app, req("/orders", "d", &[])).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 0"));
}

// ---------------------------------------------------------------- row 8

/// Row 8, "store down when the response is stored": "tried 3 times (50 ms, then 100 ms apart);
/// if it still fails, the key stays locked until its lease ends"; the client gets "the handler's
/// response; a retry within the lease gets 409; after the lease, the handler runs again".
#[tokio::test(start_paused = true)]
async fn row8_store_down_when_the_response_is_stored() {
    let store = Wrapped::new(Knobs {
        fail_complete: true,
        ..Knobs::default()
    });
    let runs = Runs::default();
    let app = app(
        &runs,
        layer(&store).with_lease(Duration::from_secs(6)).unwrap(),
    );
    let t0 = Instant::now();
    let (s, _, b) = send(&app, req("/orders", "c", &[])).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 0"));
    tokio::time::sleep(ms(500)).await;
    let at: Vec<Duration> = store
        .log
        .lock()
        .unwrap()
        .completes
        .iter()
        .map(|t| *t - t0)
        .collect();
    // Three tries of the response; a further one at the last moment is the 500 marker ("the
    // key keeps the 500 marker. Only when the store cannot keep even the marker ...").
    assert_eq!(
        at[..3],
        [ms(0), ms(50), ms(150)],
        "three tries, 50 ms then 100 ms apart: {at:?}"
    );
    assert!(
        at.len() <= 4 && at[3..].iter().all(|t| *t == ms(150)),
        "{at:?}"
    );
    store.set(|k| k.fail_complete = false);
    let (s, h, _) = send(&app, req("/orders", "c", &[])).await;
    assert_eq!(s, StatusCode::CONFLICT, "a retry within the lease");
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(
        store.log.lock().unwrap().releases.len(),
        0,
        "the key was not released"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (s, _, b) = send(&app, req("/orders", "c", &[])).await;
    assert_eq!(
        (s, b.as_str()),
        (StatusCode::CREATED, "order 1"),
        "after the lease"
    );
}

// ---------------------------------------------------------------- row 9

/// Row 9, "store down while the handler runs": "renewal fails and is tried again every third of
/// the lease; the handler keeps running"; the client sees "nothing".
#[tokio::test(start_paused = true)]
async fn row9_store_down_while_the_handler_runs() {
    let store = Wrapped::new(Knobs {
        fail_renew: true,
        ..Knobs::default()
    });
    let runs = Runs::default();
    let app = app(
        &runs,
        layer(&store).with_lease(Duration::from_secs(3)).unwrap(),
    );
    let t0 = Instant::now();
    let (s, _, b) = send(&app, req("/orders", "r", &[("x-sleep", "2500")])).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 0"));
    let at: Vec<Duration> = store
        .log
        .lock()
        .unwrap()
        .renews
        .iter()
        .map(|t| *t - t0)
        .collect();
    assert_eq!(
        at,
        vec![ms(1000), ms(2000)],
        "renewal tried every third of the lease"
    );
    let (s, h, b) = send(&app, req("/orders", "r", &[("x-sleep", "2500")])).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 0"));
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
}

// ---------------------------------------------------------------- rows 10 to 12

/// Rows 10 to 12: a duplicate concurrent request gets 409 with `Retry-After: 1`; another payload
/// with the key gets 422; another client with the key runs on its own.
#[tokio::test(start_paused = true)]
async fn rows10_to_12_duplicates_payloads_and_clients() {
    let store = Wrapped::new(Knobs::default());
    let runs = Runs::default();
    let app = app(&runs, layer(&store));
    let first = tokio::spawn(
        app.clone()
            .oneshot(req("/orders", "x", &[("x-sleep", "1000")])),
    );
    tokio::time::sleep(ms(10)).await;
    let (s, h, b) = send(&app, req("/orders", "x", &[("x-sleep", "1000")])).await;
    assert_eq!(
        (s, problem_type(&b)),
        (StatusCode::CONFLICT, problem::IN_FLIGHT.to_owned())
    );
    assert_eq!(h.get("retry-after").unwrap(), "1");
    let other = Request::post("/orders")
        .header("authorization", "Bearer a")
        .header("idempotency-key", "x")
        .body(Body::from(r#"{"item":"pen"}"#))
        .unwrap();
    let (s, _, b) = send(&app, other).await;
    assert_eq!(
        (s, problem_type(&b)),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            problem::KEY_REUSED.to_owned()
        )
    );
    let mut client_b = req("/orders", "x", &[]);
    client_b
        .headers_mut()
        .insert("authorization", "Bearer b".parse().unwrap());
    let (s, _, b) = send(&app, client_b).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 1"));
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
}
