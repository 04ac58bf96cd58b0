//! A behaviour suite for [`IdempotencyStore`] implementations: the in-memory store and the Redis
//! store both pass it, and so should yours.
//!
//! It runs in real time with millisecond-scale leases, against two handles `a` and `b` to the
//! same storage (as two app instances would hold), and panics on the first failure. It checks
//! the store's contract (atomic `begin`, leases, renewal, TTLs, fencing by lock token), then
//! the layer over the store: one execution per key under concurrency, replays, 422 on another
//! payload or query, client scopes, a client that goes away mid-handler, lease renewal while a
//! handler runs, and a key released before the answer to a panic goes out, even when the
//! store's release is slow.
//!
//! ```no_run
//! # async fn run() {
//! use sturdy_idempotency::server::{conformance, MemoryStore};
//!
//! let store = MemoryStore::default();
//! conformance::run(store.clone(), store).await;
//! # }
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};

use super::{
    problem, Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore,
    LockToken, StoredResponse,
};
use sturdy_core::BoxError;

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

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Runs the whole suite.
///
/// # Panics
/// On the first behaviour that differs from the contract.
pub async fn run<St: IdempotencyStore + Clone>(a: St, b: St) {
    store_contract(&a, &b).await;
    through_the_layer(a.clone(), b.clone()).await;
    a_client_that_goes_away(a.clone(), b.clone()).await;
    release_before_the_answer(a).await;
}

async fn store_contract<St: IdempotencyStore>(a: &St, b: &St) {
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(60);
    let fp = [1u8; 32];
    let other = [2u8; 32];
    // One token per execution; `t1` and `t2` are two executions of the same request.
    let (t1, t2, t3) = (
        LockToken::random(),
        LockToken::random(),
        LockToken::random(),
    );

    // begin -> in flight -> complete -> replay, across instances.
    let k = key("basic");
    assert_eq!(a.begin(&k, fp, t1, lease).await.unwrap(), Begin::Started);
    assert_eq!(b.begin(&k, fp, t2, lease).await.unwrap(), Begin::InFlight);
    assert_eq!(
        b.begin(&k, other, t2, lease).await.unwrap(),
        Begin::Mismatch
    );
    a.complete(&k, fp, t1, response("{\"id\":1}"), ttl)
        .await
        .unwrap();
    assert_eq!(
        b.begin(&k, fp, t2, lease).await.unwrap(),
        Begin::Completed(response("{\"id\":1}"))
    );
    assert_eq!(
        a.begin(&k, other, t2, lease).await.unwrap(),
        Begin::Mismatch
    );
    // A second completion does not replace the first; a renewal of a completed key fails.
    a.complete(&k, fp, t1, response("second"), ttl)
        .await
        .unwrap();
    assert_eq!(
        b.begin(&k, fp, t2, lease).await.unwrap(),
        Begin::Completed(response("{\"id\":1}"))
    );
    assert!(!a.renew(&k, fp, t1, lease).await.unwrap());

    // release frees the key; a release from another execution does not, even one of the same
    // request.
    let k = key("release");
    assert_eq!(a.begin(&k, fp, t1, lease).await.unwrap(), Begin::Started);
    b.release(&k, t2).await.unwrap();
    assert_eq!(b.begin(&k, fp, t2, lease).await.unwrap(), Begin::InFlight);
    b.release(&k, t1).await.unwrap();
    assert_eq!(b.begin(&k, fp, t2, lease).await.unwrap(), Begin::Started);

    // A lease expires: a crashed worker does not hold the key forever.
    let k = key("lease");
    assert_eq!(a.begin(&k, fp, t1, ms(100)).await.unwrap(), Begin::Started);
    assert_eq!(b.begin(&k, fp, t2, lease).await.unwrap(), Begin::InFlight);
    tokio::time::sleep(ms(250)).await;
    assert_eq!(b.begin(&k, fp, t2, lease).await.unwrap(), Begin::Started);

    // Renewal keeps a lock past its first lease; another execution cannot renew it.
    let k = key("renew");
    assert_eq!(a.begin(&k, fp, t1, ms(200)).await.unwrap(), Begin::Started);
    for _ in 0..3 {
        tokio::time::sleep(ms(100)).await;
        assert!(b.renew(&k, fp, t1, ms(200)).await.unwrap());
    }
    assert!(!b.renew(&k, other, t2, ms(200)).await.unwrap());
    assert!(!b.renew(&k, fp, t2, ms(200)).await.unwrap());
    assert_eq!(b.begin(&k, fp, t2, lease).await.unwrap(), Begin::InFlight);
    tokio::time::sleep(ms(350)).await;
    assert_eq!(b.begin(&k, other, t2, lease).await.unwrap(), Begin::Started);

    // A completion or renewal with a lost lock (another worker took the key over) is ignored.
    let k = key("late");
    assert_eq!(a.begin(&k, fp, t1, ms(50)).await.unwrap(), Begin::Started);
    tokio::time::sleep(ms(150)).await;
    assert_eq!(b.begin(&k, other, t2, lease).await.unwrap(), Begin::Started);
    assert!(!a.renew(&k, fp, t1, lease).await.unwrap());
    a.complete(&k, fp, t1, response("late"), ttl).await.unwrap();
    assert_eq!(
        b.begin(&k, other, t3, lease).await.unwrap(),
        Begin::InFlight
    );

    // The same with the same request: a retry took the key over after the first execution's
    // lease ran out. The first one's late renewal, completion and release change nothing.
    let k = key("late-same-request");
    assert_eq!(a.begin(&k, fp, t1, ms(50)).await.unwrap(), Begin::Started);
    tokio::time::sleep(ms(150)).await;
    assert_eq!(b.begin(&k, fp, t2, lease).await.unwrap(), Begin::Started);
    assert!(!a.renew(&k, fp, t1, lease).await.unwrap());
    a.release(&k, t1).await.unwrap();
    assert_eq!(
        a.begin(&k, fp, t3, lease).await.unwrap(),
        Begin::InFlight,
        "a late release from the execution that lost its lock freed the retry's lock"
    );
    a.complete(&k, fp, t1, response("late"), ttl).await.unwrap();
    assert_eq!(a.begin(&k, fp, t3, lease).await.unwrap(), Begin::InFlight);
    b.complete(&k, fp, t2, response("retry"), ttl)
        .await
        .unwrap();
    assert_eq!(
        a.begin(&k, fp, t3, lease).await.unwrap(),
        Begin::Completed(response("retry"))
    );

    // A lease that ran out with nobody taking the key over: the execution's outcome is still
    // kept, and its renewal locks the key again.
    let k = key("late-but-alone");
    assert_eq!(a.begin(&k, fp, t1, ms(50)).await.unwrap(), Begin::Started);
    tokio::time::sleep(ms(150)).await;
    a.complete(&k, fp, t1, response("alone"), ttl)
        .await
        .unwrap();
    assert_eq!(
        b.begin(&k, fp, t2, lease).await.unwrap(),
        Begin::Completed(response("alone"))
    );
    let k = key("renew-after-lease");
    assert_eq!(a.begin(&k, fp, t1, ms(50)).await.unwrap(), Begin::Started);
    tokio::time::sleep(ms(150)).await;
    assert!(a.renew(&k, fp, t1, lease).await.unwrap());
    assert_eq!(b.begin(&k, fp, t2, lease).await.unwrap(), Begin::InFlight);
    a.release(&k, t1).await.unwrap();
    assert_eq!(b.begin(&k, fp, t2, lease).await.unwrap(), Begin::Started);

    // Many concurrent begins: exactly one starts.
    let k = key("race");
    let mut started = 0;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let f = if i % 2 == 0 {
            a.begin(&k, fp, LockToken::random(), lease)
        } else {
            b.begin(&k, fp, LockToken::random(), lease)
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
    assert_eq!(a.begin(&k, fp, t1, lease).await.unwrap(), Begin::Started);
    a.complete(&k, fp, t1, response("x"), ms(100))
        .await
        .unwrap();
    tokio::time::sleep(ms(250)).await;
    assert_eq!(b.begin(&k, other, t2, lease).await.unwrap(), Begin::Started);
}

/// A handler whose behaviour the request body chooses: `fail` answers 500, `busy` 429,
/// `panic` panics, `slow` takes 300 ms; anything else takes 50 ms and answers 201 with the
/// body. Every run is counted.
#[derive(Clone, Default)]
struct Handler {
    runs: Arc<AtomicU32>,
    finished: Arc<tokio::sync::Notify>,
}

impl Handler {
    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }

    async fn handle(self, req: Request<Full<Bytes>>) -> Response<Full<Bytes>> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let status = match body.as_ref() {
            b"fail" => 500,
            b"busy" => 429,
            b"panic" => panic!("a handler bug"),
            b"slow" => {
                tokio::time::sleep(ms(300)).await;
                201
            }
            _ => {
                tokio::time::sleep(ms(50)).await;
                201
            }
        };
        self.finished.notify_one();
        Response::builder()
            .status(status)
            .header("x-run", n.to_string())
            .body(Full::new(body))
            .unwrap()
    }
}

type Handled = tower::util::BoxCloneService<
    Request<Full<Bytes>>,
    Response<Full<Bytes>>,
    std::convert::Infallible,
>;

fn app<St: IdempotencyStore>(
    layer: &IdempotencyLayer<St>,
    handler: &Handler,
) -> super::Idempotency<Handled, St> {
    let handler = handler.clone();
    layer.layer(Handled::new(service_fn(move |req| {
        let h = handler.clone();
        async move { Ok::<_, std::convert::Infallible>(h.handle(req).await) }
    })))
}

fn post(
    path: &str,
    credential: (&str, &str),
    key: &str,
    body: &'static str,
) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("idempotency-key", key)
        .header(credential.0, credential.1)
        .body(Full::from(body))
        .unwrap()
}

const CLIENT_1: (&str, &str) = ("authorization", "Bearer client-1");

async fn body_of(res: Response<super::ResponseBody<Full<Bytes>>>) -> Bytes {
    res.into_body().collect().await.unwrap().to_bytes()
}

async fn problem_type(res: Response<super::ResponseBody<Full<Bytes>>>) -> String {
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let v: serde_json::Value = serde_json::from_slice(&body_of(res).await).unwrap();
    v["type"].as_str().unwrap_or_default().to_owned()
}

async fn through_the_layer<St: IdempotencyStore>(a: St, b: St) {
    let handler = Handler::default();
    // Two app instances sharing the storage.
    let app_a = app(
        &IdempotencyLayer::new(a, ByCredentials::default()),
        &handler,
    );
    let app_b = app(
        &IdempotencyLayer::new(b, ByCredentials::default()),
        &handler,
    );
    let k = key("layer");

    // 50 concurrent requests with one key: the handler runs once; the rest get 409 or the replay.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let app = if i % 2 == 0 {
            app_a.clone()
        } else {
            app_b.clone()
        };
        tasks.push(tokio::spawn(app.oneshot(post(
            "/orders",
            CLIENT_1,
            &k,
            "{\"amount\":5}",
        ))));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().unwrap().status());
    }
    assert_eq!(handler.runs(), 1);
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
        .oneshot(post("/orders", CLIENT_1, &k, "{\"amount\":5}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.headers()["x-run"], "1");
    assert_eq!(body_of(res).await, "{\"amount\":5}");

    // The same key with another payload, or another query: 422, problem JSON.
    for (path, body) in [
        ("/orders", "{\"amount\":6}"),
        ("/orders?currency=EUR", "{\"amount\":5}"),
    ] {
        let res = app_a
            .clone()
            .oneshot(post(path, CLIENT_1, &k, body))
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path} {body}"
        );
        assert_eq!(problem_type(res).await, problem::KEY_REUSED);
    }

    // The same key from other clients, whatever their credential header, is another key: each
    // gets its own execution, never another client's response.
    let runs = handler.runs();
    for (i, credential) in [
        ("authorization", "Bearer client-2"),
        ("x-api-key", "key-of-client-3"),
        ("x-api-key", "key-of-client-4"),
        ("cookie", "session=client-5"),
    ]
    .into_iter()
    .enumerate()
    {
        let res = app_a
            .clone()
            .oneshot(post("/orders", credential, &k, "{\"amount\":5}"))
            .await
            .unwrap();
        assert!(
            res.headers().get("idempotent-replayed").is_none(),
            "{credential:?}"
        );
        assert_eq!(res.headers()["x-run"], (runs + 1 + i as u32).to_string());
        // And its repeat is its own response.
        let res = app_b
            .clone()
            .oneshot(post("/orders", credential, &k, "{\"amount\":5}"))
            .await
            .unwrap();
        assert_eq!(res.headers()["idempotent-replayed"], "true");
        assert_eq!(res.headers()["x-run"], (runs + 1 + i as u32).to_string());
    }

    // 5xx and 429 are not stored: the retry runs the handler again.
    for body in ["fail", "busy"] {
        let k = key("not-stored");
        let runs = handler.runs();
        let first = app_a
            .clone()
            .oneshot(post("/orders", CLIENT_1, &k, body))
            .await
            .unwrap();
        let second = app_b
            .clone()
            .oneshot(post("/orders", CLIENT_1, &k, body))
            .await
            .unwrap();
        assert_eq!(first.status(), second.status());
        assert!(second.headers().get("idempotent-replayed").is_none());
        assert_eq!(handler.runs(), runs + 2, "{body}");
    }
}

async fn a_client_that_goes_away<St: IdempotencyStore>(a: St, b: St) {
    let handler = Handler::default();
    let lease = ms(60);
    let layer = |st| {
        IdempotencyLayer::new(st, ByCredentials::default())
            .with_lease(lease)
            .unwrap()
    };
    let app_a = app(&layer(a), &handler);
    let app_b = app(&layer(b), &handler);
    let k = key("gone");

    // The client gives up after 50 ms; the handler takes 300 ms (five leases).
    let gone = tokio::time::timeout(
        ms(50),
        app_a.clone().oneshot(post("/orders", CLIENT_1, &k, "slow")),
    )
    .await;
    assert!(gone.is_err(), "the client gave up");
    assert_eq!(handler.runs(), 1);

    // Its retries while the handler runs, also after several leases: 409, in flight.
    for _ in 0..3 {
        let res = app_b
            .clone()
            .oneshot(post("/orders", CLIENT_1, &k, "slow"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CONFLICT);
        assert_eq!(res.headers()["retry-after"], "1");
        assert_eq!(problem_type(res).await, problem::IN_FLIGHT);
        tokio::time::sleep(ms(70)).await;
    }

    // Once the handler finished: its stored response, and still one run.
    tokio::time::timeout(Duration::from_secs(5), handler.finished.notified())
        .await
        .expect("the abandoned execution ran to its end");
    let mut res = app_b
        .clone()
        .oneshot(post("/orders", CLIENT_1, &k, "slow"))
        .await
        .unwrap();
    for _ in 0..20 {
        if res.status() != StatusCode::CONFLICT {
            break;
        }
        // Stored a moment after the handler returned.
        tokio::time::sleep(ms(10)).await;
        res = app_b
            .clone()
            .oneshot(post("/orders", CLIENT_1, &k, "slow"))
            .await
            .unwrap();
    }
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(body_of(res).await, "slow");
    assert_eq!(handler.runs(), 1);
}

/// A store whose `release` takes 100 ms, as a remote store under load may.
#[derive(Debug, Clone)]
struct SlowRelease<St>(St);

impl<St: IdempotencyStore> IdempotencyStore for SlowRelease<St> {
    fn begin(
        &self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        self.0.begin(key, fp, token, lease)
    }

    fn renew(
        &self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        self.0.renew(key, fp, token, lease)
    }

    fn complete(
        &self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        self.0.complete(key, fp, token, response, ttl)
    }

    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        let release = self.0.release(key, token);
        Box::pin(async move {
            tokio::time::sleep(ms(100)).await;
            release.await
        })
    }
}

async fn release_before_the_answer<St: IdempotencyStore>(a: St) {
    let handler = Handler::default();
    let app = app(
        &IdempotencyLayer::new(SlowRelease(a), ByCredentials::default()),
        &handler,
    );
    // A panic, then a retry at once: the key was released before the panic reached the
    // caller, so the retry runs (and panics again) instead of getting 409.
    let k = key("panic");
    for run in 1..=2 {
        let crashed =
            tokio::spawn(app.clone().oneshot(post("/orders", CLIENT_1, &k, "panic"))).await;
        assert!(
            crashed.unwrap_err().is_panic(),
            "the panic reached the caller"
        );
        assert_eq!(handler.runs(), run);
    }
    // A 5xx, then a retry at once: it runs.
    let k = key("5xx");
    for run in 1..=2 {
        let res = app
            .clone()
            .oneshot(post("/orders", CLIENT_1, &k, "fail"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(handler.runs(), 2 + run);
    }
}
