//! Review of the lock tokens and of the release after a failed `begin`: a store whose `begin`
//! locks the key and then answers an error (the answer was lost or came too late), with the
//! request kept or gone, and a failed `begin` beside another request's lock.

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

/// How the next `begin`s behave.
const HONEST: u8 = 0;
/// Locks the key, waits 50 ms, then answers an error of `kind` (a lost answer).
const LOCK_THEN_FAIL: u8 = 1;
/// Answers an error of `kind` without touching the store.
const FAIL_ONLY: u8 = 2;

#[derive(Debug, Clone)]
struct Flaky {
    inner: MemoryStore,
    mode: Arc<AtomicU8>,
    kind: ErrorKind,
    releases: Arc<AtomicU32>,
    /// How many of the next releases fail (a store still down or paused).
    failing_releases: Arc<AtomicU32>,
}

impl Flaky {
    fn new(kind: ErrorKind) -> Self {
        Self {
            inner: MemoryStore::default(),
            mode: Arc::new(AtomicU8::new(HONEST)),
            kind,
            releases: Arc::new(AtomicU32::new(0)),
            failing_releases: Arc::new(AtomicU32::new(0)),
        }
    }
}

impl IdempotencyStore for Flaky {
    fn begin(
        &self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        let mode = self.mode.load(Ordering::SeqCst);
        let kind = self.kind.clone();
        let err = move || -> BoxError {
            Box::new(sturdy_core::Error::new(kind, "the store's answer was lost"))
        };
        match mode {
            LOCK_THEN_FAIL => {
                // Locked at once (a script runs once sent); the answer is lost later.
                let locked = self.inner.begin(key, fp, token, lease);
                Box::pin(async move {
                    let _ = locked.await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(err())
                })
            }
            FAIL_ONLY => Box::pin(async move { Err(err()) }),
            _ => self.inner.begin(key, fp, token, lease),
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
        let failing = self
            .failing_releases
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            let kind = self.kind.clone();
            return Box::pin(async move {
                Err(
                    Box::new(sturdy_core::Error::new(kind, "the store is still paused"))
                        as BoxError,
                )
            });
        }
        self.inner.release(key, token)
    }
}

fn app(store: Flaky, runs: Arc<AtomicU32>, work: Duration) -> Router {
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

/// Lets spawned tasks run and timers fire (paused time).
async fn settle(d: Duration) {
    tokio::time::sleep(d).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_begin_that_locked_then_timed_out_is_released_and_a_retry_runs() {
    let store = Flaky::new(ErrorKind::Timeout);
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(store.clone(), runs.clone(), Duration::ZERO);
    store.mode.store(LOCK_THEN_FAIL, Ordering::SeqCst);
    let res = app.clone().oneshot(order()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    settle(Duration::from_millis(10)).await;
    store.mode.store(HONEST, Ordering::SeqCst);
    let res = app.oneshot(order()).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Which failed `begin`s are followed by a release: all but those proving the command was not
/// sent.
#[tokio::test(start_paused = true)]
async fn a_failed_begin_is_released_unless_it_proves_not_sent() {
    for (kind, released) in [
        (ErrorKind::Connect, 0),
        (ErrorKind::Timeout, 1),
        (ErrorKind::Transport, 1),
        (ErrorKind::Other, 1),
    ] {
        let store = Flaky::new(kind.clone());
        let app = app(store.clone(), Arc::new(AtomicU32::new(0)), Duration::ZERO);
        store.mode.store(FAIL_ONLY, Ordering::SeqCst);
        let res = app.oneshot(order()).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        settle(Duration::from_millis(10)).await;
        assert_eq!(store.releases.load(Ordering::SeqCst), released, "{kind:?}");
    }
}

/// A failed `begin` while another request runs: its background release carries its own token,
/// so the running request keeps its key.
#[tokio::test(start_paused = true)]
async fn the_release_after_a_failed_begin_never_frees_another_requests_lock() {
    let store = Flaky::new(ErrorKind::Timeout);
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(store.clone(), runs.clone(), Duration::from_secs(5));
    let first = tokio::spawn(app.clone().oneshot(order()));
    settle(Duration::from_millis(10)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    store.mode.store(FAIL_ONLY, Ordering::SeqCst);
    let res = app.clone().oneshot(order()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    settle(Duration::from_millis(10)).await;
    assert_eq!(store.releases.load(Ordering::SeqCst), 1);
    store.mode.store(HONEST, Ordering::SeqCst);
    let res = app.clone().oneshot(order()).await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The same lost answer, but the client went away while `begin` was on its way (a hyper
/// connection closed, a timeout around the service): the `Beginning` guard's background task
/// releases the key only when the late answer is `Started`, so a lock whose answer was an error
/// stays for the whole lease (30 s) and every retry gets 409, although the handler never ran.
#[tokio::test(start_paused = true)]
async fn a_begin_that_locked_then_failed_after_its_client_left_is_released_too() {
    let store = Flaky::new(ErrorKind::Timeout);
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(store.clone(), runs.clone(), Duration::ZERO);
    store.mode.store(LOCK_THEN_FAIL, Ordering::SeqCst);
    let gone = tokio::time::timeout(Duration::from_millis(10), app.clone().oneshot(order())).await;
    assert!(gone.is_err(), "the client was to leave mid-begin");
    settle(Duration::from_millis(100)).await;
    store.mode.store(HONEST, Ordering::SeqCst);
    let res = app.oneshot(order()).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::CREATED,
        "the retry found the key locked by a begin whose handler never ran"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The store is still failing when the background release goes out (a Redis paused for longer
/// than its timeout fails the release too): the release is tried again until it lands, so a
/// retry runs as soon as the store answers, not when the 30 s lease ends.
#[tokio::test(start_paused = true)]
async fn a_release_that_fails_is_tried_again_until_the_store_answers() {
    let store = Flaky::new(ErrorKind::Timeout);
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(store.clone(), runs.clone(), Duration::ZERO);
    store.mode.store(LOCK_THEN_FAIL, Ordering::SeqCst);
    store.failing_releases.store(4, Ordering::SeqCst);
    let res = app.clone().oneshot(order()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    store.mode.store(HONEST, Ordering::SeqCst);
    settle(Duration::from_millis(10)).await;
    let res = app.clone().oneshot(order()).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::CONFLICT,
        "still locked: the release failed"
    );
    // Tried again 50, 100, 200 and 400 ms apart: the fifth lands.
    settle(Duration::from_secs(1)).await;
    assert_eq!(store.releases.load(Ordering::SeqCst), 5);
    let res = app.clone().oneshot(order()).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A store that never comes back: the tries stop once the lease would have freed the key, at
/// most a second apart.
#[tokio::test(start_paused = true)]
async fn the_background_release_gives_up_when_the_lease_ends() {
    let store = Flaky::new(ErrorKind::Timeout);
    let app = app(store.clone(), Arc::new(AtomicU32::new(0)), Duration::ZERO);
    store.mode.store(LOCK_THEN_FAIL, Ordering::SeqCst);
    store.failing_releases.store(u32::MAX, Ordering::SeqCst);
    let res = app.clone().oneshot(order()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    settle(Duration::from_secs(31)).await;
    let tries = store.releases.load(Ordering::SeqCst);
    assert!(
        (30..=40).contains(&tries),
        "{tries} tries in the 30 s lease"
    );
    settle(Duration::from_secs(60)).await;
    assert_eq!(
        store.releases.load(Ordering::SeqCst),
        tries,
        "no try after the lease"
    );
}
