//! A behaviour suite for [`IdempotencyStore`] implementations: the in-memory store and the Redis
//! store both pass it, and so should yours.
//!
//! It runs in real time with millisecond-scale leases, against two handles `a` and `b` to the
//! same storage (as two app instances would hold), and panics on the first failure.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};

use super::{Begin, IdempotencyLayer, IdempotencyStore, StoredResponse};

fn key(name: &str) -> String {
    format!("conformance:{name}:{}", uuid::Uuid::new_v4())
}

fn response(body: &'static str) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: Bytes::from_static(body.as_bytes()),
    }
}

/// Runs the whole suite.
///
/// # Panics
/// On the first behaviour that differs from the contract.
pub async fn run<St: IdempotencyStore + Clone>(a: St, b: St) {
    store_contract(&a, &b).await;
    through_the_layer(a, b).await;
}

async fn store_contract<St: IdempotencyStore>(a: &St, b: &St) {
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(60);
    let fp = [1u8; 32];
    let other = [2u8; 32];

    // begin -> in flight -> complete -> replay, across instances.
    let k = key("basic");
    assert_eq!(a.begin(&k, fp, lease).await.unwrap(), Begin::Started);
    assert_eq!(b.begin(&k, fp, lease).await.unwrap(), Begin::InFlight);
    assert_eq!(b.begin(&k, other, lease).await.unwrap(), Begin::Mismatch);
    a.complete(&k, fp, response("{\"id\":1}"), ttl)
        .await
        .unwrap();
    assert_eq!(
        b.begin(&k, fp, lease).await.unwrap(),
        Begin::Completed(response("{\"id\":1}"))
    );
    assert_eq!(a.begin(&k, other, lease).await.unwrap(), Begin::Mismatch);

    // release frees the key; a stale release (other fingerprint) does not.
    let k = key("release");
    assert_eq!(a.begin(&k, fp, lease).await.unwrap(), Begin::Started);
    b.release(&k, other).await.unwrap();
    assert_eq!(b.begin(&k, fp, lease).await.unwrap(), Begin::InFlight);
    b.release(&k, fp).await.unwrap();
    assert_eq!(b.begin(&k, fp, lease).await.unwrap(), Begin::Started);

    // A lease expires: a crashed worker does not hold the key forever.
    let k = key("lease");
    assert_eq!(
        a.begin(&k, fp, Duration::from_millis(100)).await.unwrap(),
        Begin::Started
    );
    assert_eq!(b.begin(&k, fp, lease).await.unwrap(), Begin::InFlight);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(b.begin(&k, fp, lease).await.unwrap(), Begin::Started);

    // A completion with a lost lock (another worker took the key over) is ignored.
    let k = key("late");
    assert_eq!(
        a.begin(&k, fp, Duration::from_millis(50)).await.unwrap(),
        Begin::Started
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(b.begin(&k, other, lease).await.unwrap(), Begin::Started);
    a.complete(&k, fp, response("late"), ttl).await.unwrap();
    assert_eq!(b.begin(&k, other, lease).await.unwrap(), Begin::InFlight);

    // Many concurrent begins: exactly one starts.
    let k = key("race");
    let mut started = 0;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let f = if i % 2 == 0 {
            a.begin(&k, fp, lease)
        } else {
            b.begin(&k, fp, lease)
        };
        tasks.push(tokio::spawn(f));
    }
    for t in tasks {
        if t.await.unwrap().unwrap() == Begin::Started {
            started += 1;
        }
    }
    assert_eq!(started, 1);

    // Responses expire with their TTL.
    let k = key("ttl");
    assert_eq!(a.begin(&k, fp, lease).await.unwrap(), Begin::Started);
    a.complete(&k, fp, response("x"), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(b.begin(&k, other, lease).await.unwrap(), Begin::Started);
}

async fn through_the_layer<St: IdempotencyStore + Clone>(a: St, b: St) {
    let runs = Arc::new(AtomicU32::new(0));
    let handler = {
        let runs = runs.clone();
        service_fn(move |req: Request<Full<Bytes>>| {
            let runs = runs.clone();
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let body = req.into_body().collect().await.unwrap().to_bytes();
                tokio::time::sleep(Duration::from_millis(50)).await;
                let status = if body.as_ref() == b"fail" { 500 } else { 201 };
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(status)
                        .header("x-run", n.to_string())
                        .body(Full::new(body))
                        .unwrap(),
                )
            }
        })
    };
    // Two app instances sharing the storage.
    let app_a = IdempotencyLayer::new(a).layer(handler.clone());
    let app_b = IdempotencyLayer::new(b).layer(handler);
    let k = key("layer");
    let post = |body: &'static str, key: &str| {
        Request::post("/orders")
            .header("idempotency-key", key)
            .header("authorization", "Bearer client-1")
            .body(Full::from(body))
            .unwrap()
    };

    // 50 concurrent requests with one key: the handler runs once; the rest get 409 or the replay.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let app = if i % 2 == 0 {
            app_a.clone()
        } else {
            app_b.clone()
        };
        tasks.push(tokio::spawn(app.oneshot(post("{\"amount\":5}", &k))));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().unwrap().status());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::CREATED || *s == StatusCode::CONFLICT),
        "{statuses:?}"
    );
    assert!(statuses.contains(&StatusCode::CREATED));

    // Afterwards, a repeat on either instance is a replay with the same body and headers.
    let res = app_b
        .clone()
        .oneshot(post("{\"amount\":5}", &k))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.headers()["x-run"], "1");
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "{\"amount\":5}"
    );

    // The same key with another payload: 422, problem JSON.
    let res = app_a
        .clone()
        .oneshot(post("{\"amount\":6}", &k))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(res.headers()["content-type"], "application/problem+json");

    // The same key from another client is another key.
    let other_client = Request::post("/orders")
        .header("idempotency-key", &k)
        .header("authorization", "Bearer client-2")
        .body(Full::from("{\"amount\":5}"))
        .unwrap();
    let res = app_a.clone().oneshot(other_client).await.unwrap();
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // 5xx is not stored: the retry runs the handler again.
    let k = key("5xx");
    assert_eq!(
        app_a
            .clone()
            .oneshot(post("fail", &k))
            .await
            .unwrap()
            .status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        app_b
            .clone()
            .oneshot(post("fail", &k))
            .await
            .unwrap()
            .status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}
