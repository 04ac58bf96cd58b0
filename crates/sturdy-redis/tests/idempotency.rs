//! The idempotency store against the real Redis at STURDY_REDIS_URL: the conformance suite with
//! two connections as two app instances would hold, a client that gives up mid-handler over
//! real sockets, and a key released before the answer to a panic goes out.

use crate::support;
use support::{backends, unique, Backend};

#[path = "../../sturdy-idempotency/tests/support/wire.rs"]
mod wire;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Request, StatusCode};
use sturdy_core::BoxError;
use sturdy_idempotency::server::{
    conformance, Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore,
    LockToken, StoredResponse,
};
use sturdy_redis::RedisIdempotencyStore;
use tower::ServiceExt;

async fn store(b: &Backend, prefix: &str) -> RedisIdempotencyStore {
    RedisIdempotencyStore::new(b.conn().await).with_prefix(prefix)
}

#[tokio::test]
async fn redis_store_passes_the_conformance_suite_across_two_instances() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        redis_store_passes_the_conformance_suite_across_two_instances_on(&b).await;
    }
}

async fn redis_store_passes_the_conformance_suite_across_two_instances_on(b: &Backend) {
    let prefix = unique("idem-conformance");
    conformance::run(store(b, &prefix).await, store(b, &prefix).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_mid_handler_gets_the_stored_response() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        a_client_that_gives_up_mid_handler_gets_the_stored_response_on(&b).await;
    }
}

async fn a_client_that_gives_up_mid_handler_gets_the_stored_response_on(b: &Backend) {
    let prefix = unique("idem-wire");
    wire::a_client_that_gives_up_mid_handler_gets_the_stored_response(
        store(b, &prefix).await,
        "wire-redis-1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_right_after_a_panic_runs_instead_of_getting_409() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        a_retry_right_after_a_panic_runs_instead_of_getting_409_on(&b).await;
    }
}

async fn a_retry_right_after_a_panic_runs_instead_of_getting_409_on(b: &Backend) {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                r.fetch_add(1, Ordering::SeqCst);
                async move {
                    if true {
                        panic!("a handler bug");
                    }
                    StatusCode::CREATED
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            SlowRelease(store(b, &unique("idem-panic")).await),
            ByCredentials::default(),
        ));
    let order = || {
        Request::post("/orders")
            .header("idempotency-key", "k-panic")
            .body(Body::from("{}"))
            .unwrap()
    };
    for run in 1..=20 {
        // Each retry follows the panic at once; the release (a slow Redis round trip) has
        // completed before the panic reached the caller, so the retry runs.
        let crashed = tokio::spawn(app.clone().oneshot(order())).await;
        assert!(crashed.unwrap_err().is_panic());
        assert_eq!(
            runs.load(Ordering::SeqCst),
            run,
            "run {run} was not refused"
        );
    }
}

/// The Redis store with a release that takes 50 ms, as over a congested network.
#[derive(Debug, Clone)]
struct SlowRelease(RedisIdempotencyStore);

impl IdempotencyStore for SlowRelease {
    fn begin(
        &self,
        k: &str,
        fp: Fingerprint,
        t: LockToken,
        l: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        self.0.begin(k, fp, t, l)
    }
    fn renew(
        &self,
        k: &str,
        fp: Fingerprint,
        t: LockToken,
        l: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        self.0.renew(k, fp, t, l)
    }
    fn complete(
        &self,
        k: &str,
        fp: Fingerprint,
        t: LockToken,
        r: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        self.0.complete(k, fp, t, r, ttl)
    }
    fn release(&self, k: &str, t: LockToken) -> BoxFuture<Result<(), BoxError>> {
        let release = self.0.release(k, t);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            release.await
        })
    }
}
