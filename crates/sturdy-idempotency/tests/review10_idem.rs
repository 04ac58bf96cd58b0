//! Review of the `Beginning` guard: a request dropped while `begin` is pending releases the lock
//! when the late answer is `Started`, or an error that may have been processed (whatever its
//! type), and never releases another request's lock.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Request, StatusCode};
use sturdy_core::{BoxError, ErrorKind};
use sturdy_idempotency::server::{
    Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore, LockToken,
    MemoryStore, StoredResponse,
};
use tower::ServiceExt;

const HONEST: u8 = 0;
/// Begins honestly but answers 50 ms late.
const SLOW: u8 = 1;
/// Locks, then answers the error made by `err` 50 ms later.
const LOCK_THEN_FAIL: u8 = 2;
/// Answers the error made by `err` 50 ms later, without locking.
const FAIL_ONLY: u8 = 3;

type MakeErr = fn() -> BoxError;

#[derive(Clone, Debug)]
struct Slow {
    inner: MemoryStore,
    mode: Arc<AtomicU8>,
    err: MakeErr,
    releases: Arc<AtomicU32>,
}

impl Slow {
    fn new(err: MakeErr) -> Self {
        Self {
            inner: MemoryStore::default(),
            mode: Arc::new(AtomicU8::new(HONEST)),
            err,
            releases: Arc::new(AtomicU32::new(0)),
        }
    }
}

impl IdempotencyStore for Slow {
    fn begin(
        &self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        let err = self.err;
        let mode = self.mode.load(Ordering::SeqCst);
        if mode == FAIL_ONLY {
            // The store is not touched: `MemoryStore::begin` locks when called.
            return Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(err())
            });
        }
        let fut = self.inner.begin(key, fp, token, lease);
        match mode {
            SLOW => Box::pin(async move {
                let r = fut.await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                r
            }),
            LOCK_THEN_FAIL => Box::pin(async move {
                let _ = fut.await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(err())
            }),
            _ => fut,
        }
    }

    fn renew(
        &self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        self.inner.renew(key, fp, token, lease)
    }

    fn complete(
        &self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        self.inner.complete(key, fp, token, response, ttl)
    }

    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        self.inner.release(key, token)
    }
}

fn app(store: Slow, runs: Arc<AtomicU32>, work: Duration) -> Router {
    Router::new()
        .route(
            "/orders",
            post(move || {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(work).await;
                    StatusCode::CREATED
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()))
}

fn order() -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", "k1")
        .body(Body::from("{}"))
        .unwrap()
}

async fn settle(d: Duration) {
    tokio::time::sleep(d).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn plain_string() -> BoxError {
    "redis: broken pipe".into()
}

fn io_reset() -> BoxError {
    Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
}

fn sturdy_transport() -> BoxError {
    Box::new(sturdy_core::Error::new(ErrorKind::Transport, "lost"))
}

fn sturdy_connect() -> BoxError {
    Box::new(sturdy_core::Error::new(ErrorKind::Connect, "refused"))
}

/// The client leaves while `begin` is on its way; its late answer is `Started`: the lock is
/// given back and a retry runs at once.
#[tokio::test(start_paused = true)]
async fn a_late_started_is_released() {
    let store = Slow::new(plain_string);
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(store.clone(), runs.clone(), Duration::ZERO);
    store.mode.store(SLOW, Ordering::SeqCst);
    let gone = tokio::time::timeout(Duration::from_millis(10), app.clone().oneshot(order())).await;
    assert!(gone.is_err());
    settle(Duration::from_millis(100)).await;
    assert_eq!(store.releases.load(Ordering::SeqCst), 1);
    store.mode.store(HONEST, Ordering::SeqCst);
    let res = app.oneshot(order()).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A lost answer of any error type that does not prove the command unsent (a plain string, an
/// io reset, a sturdy transport error) releases the lock it may have taken.
#[tokio::test(start_paused = true)]
async fn a_late_error_of_any_type_releases_the_lock() {
    for err in [plain_string as MakeErr, io_reset, sturdy_transport] {
        let store = Slow::new(err);
        let runs = Arc::new(AtomicU32::new(0));
        let app = app(store.clone(), runs.clone(), Duration::ZERO);
        store.mode.store(LOCK_THEN_FAIL, Ordering::SeqCst);
        let gone =
            tokio::time::timeout(Duration::from_millis(10), app.clone().oneshot(order())).await;
        assert!(gone.is_err());
        settle(Duration::from_millis(100)).await;
        assert_eq!(store.releases.load(Ordering::SeqCst), 1, "{}", err());
        store.mode.store(HONEST, Ordering::SeqCst);
        let res = app.oneshot(order()).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "{}", err());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

/// An error that proves the command was never sent took no lock: nothing to release.
#[tokio::test(start_paused = true)]
async fn a_late_error_proving_not_sent_is_not_released() {
    let store = Slow::new(sturdy_connect);
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(store.clone(), runs.clone(), Duration::ZERO);
    store.mode.store(FAIL_ONLY, Ordering::SeqCst);
    let gone = tokio::time::timeout(Duration::from_millis(10), app.clone().oneshot(order())).await;
    assert!(gone.is_err());
    settle(Duration::from_millis(100)).await;
    assert_eq!(store.releases.load(Ordering::SeqCst), 0);
    store.mode.store(HONEST, Ordering::SeqCst);
    assert_eq!(
        app.oneshot(order()).await.unwrap().status(),
        StatusCode::CREATED
    );
}

/// A dropped `begin` whose late answer is `InFlight` (another request holds the key) or an error
/// never frees that other request's lock: a third request still gets 409 while the first runs.
#[tokio::test(start_paused = true)]
async fn a_dropped_begin_never_frees_another_requests_lock() {
    for mode in [SLOW, LOCK_THEN_FAIL] {
        let store = Slow::new(plain_string);
        let runs = Arc::new(AtomicU32::new(0));
        let app = app(store.clone(), runs.clone(), Duration::from_secs(5));
        let first = tokio::spawn(app.clone().oneshot(order()));
        settle(Duration::from_millis(10)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        store.mode.store(mode, Ordering::SeqCst);
        let gone =
            tokio::time::timeout(Duration::from_millis(10), app.clone().oneshot(order())).await;
        assert!(gone.is_err());
        settle(Duration::from_millis(100)).await;
        store.mode.store(HONEST, Ordering::SeqCst);
        let third = app.clone().oneshot(order()).await.unwrap();
        assert_eq!(third.status(), StatusCode::CONFLICT, "mode {mode}");
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
