//! Cancellation on the server side and in the token source: a client that goes away (a
//! tower-http timeout above the idempotency layer, a webhook delivery dropped after its body),
//! and an OAuth2 token request whose runtime shuts down mid-flight.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::webhook::{sign_github, GitHub, MemoryQueue, WebhookReceiver};
use sturdy_core::BoxError;
use tower::{service_fn, Layer, ServiceExt};
use tower_http::timeout::TimeoutLayer;

type Req = Request<Full<Bytes>>;

fn order(key: &str) -> Request<axum::body::Body> {
    Request::post("/orders")
        .header("authorization", "Bearer client-a")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(r#"{"item":"book"}"#))
        .unwrap()
}

async fn text(res: Response<axum::body::Body>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// docs/guides/idempotency.md: "client timeout mid-handler | the handler runs to its end in its
/// own task; its response is stored | ... a retry with the same key gets 409 in flight
/// (`Retry-After: 1`) while the handler runs, then the stored response with
/// `Idempotent-Replayed: true`; the handler ran once". The handler here outlives the lease
/// (45 s against 30 s), so the key must be renewed while nobody waits for it.
#[tokio::test(start_paused = true)]
async fn a_tower_http_timeout_above_the_layer_does_not_release_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = move || {
        let r = r.clone();
        async move {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_secs(45)).await;
            (StatusCode::CREATED, format!("order {n}"))
        }
    };
    let app = axum::Router::new()
        .route("/orders", axum::routing::post(handler))
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(100),
        ));

    let start = tokio::time::Instant::now();
    let first = app.clone().oneshot(order("k-1")).await.unwrap();
    assert_eq!(first.status(), StatusCode::REQUEST_TIMEOUT);
    for at in [1u64, 20, 40] {
        tokio::time::sleep_until(start + Duration::from_secs(at)).await;
        let res = app.clone().oneshot(order("k-1")).await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::CONFLICT,
            "a retry during the handler (about {at} s)"
        );
        assert_eq!(res.headers()["retry-after"], "1");
    }
    tokio::time::sleep_until(start + Duration::from_secs(50)).await;
    let res = app.clone().oneshot(order("k-1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(text(res).await, "order 1");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

fn delivery(body: &Bytes) -> Request<Full<Bytes>> {
    Request::post("/gh")
        .header("x-hub-signature-256", sign_github("s3cret", body))
        .header("x-github-event", "push")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap()
}

/// A webhook delivery whose sender disconnects after its body (the response future dropped
/// after 0 to 7 polls, the body large enough to be verified on the blocking pool), then
/// redelivered: the event is queued exactly once.
#[tokio::test]
async fn a_webhook_dropped_after_its_body_is_queued_once_after_redelivery() {
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(GitHub::new("s3cret").unwrap(), queue);
    for polls in 0..8 {
        let body = Bytes::from(format!(
            r#"{{"n":{polls},"pad":"{}"}}"#,
            "p".repeat(100 * 1024)
        ));
        let mut f = tokio_test::task::spawn(receiver.clone().oneshot(delivery(&body)));
        for _ in 0..polls {
            if f.poll().is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(f);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let res = receiver.clone().oneshot(delivery(&body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "polls {polls}");
        let mut queued = 0;
        while let Some(e) = events.try_recv() {
            assert_eq!(e.body, body);
            queued += 1;
        }
        assert_eq!(queued, 1, "dropped after {polls} polls, then redelivered");
    }
}

fn token_endpoint(calls: Arc<AtomicUsize>) -> ClientCredentials {
    let endpoint = service_fn(move |_req: Req| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                // The first token request never answers.
                std::future::pending::<()>().await;
            }
            let body =
                format!(r#"{{"access_token":"t{n}","token_type":"Bearer","expires_in":3600}}"#);
            Ok::<_, BoxError>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        }
    });
    ClientCredentials::new(endpoint, "http://auth.example.com/token", "id", "secret").unwrap()
}

fn api(
) -> impl tower::Service<Req, Response = Response<Full<Bytes>>, Error = BoxError, Future: Send>
       + Clone
       + Send
       + 'static {
    service_fn(|req: Req| async move {
        let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
        Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(auth))))
    })
}

fn get() -> Req {
    Request::get("http://api.example.com/me")
        .body(Full::default())
        .unwrap()
}

/// docs/guides/auth.md: "The token request runs as a task of its own on the caller's Tokio
/// runtime, so a caller that gives up does not cancel it for the others; if that runtime shuts
/// down mid-request, the next caller starts a new request".
#[test]
fn a_token_request_dropped_with_its_runtime_does_not_break_the_source() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = AuthLayer::oauth2(token_endpoint(calls.clone()))
        .with_token_timeout(Duration::from_millis(100))
        .layer(api());

    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = first
        .block_on(svc.clone().oneshot(get()))
        .expect_err("the first token request never answers");
    assert!(err.to_string().contains("within"), "{err}");
    drop(first);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let second = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let res = second.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get())).await
    });
    let res = res
        .expect("a caller on another runtime hung after the first runtime went")
        .unwrap_or_else(|e| panic!("a caller on another runtime failed after the first went: {e}"));
    let body = second.block_on(async { res.into_body().collect().await.unwrap().to_bytes() });
    assert_eq!(&body[..], b"Bearer t1");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Callers that give up while the token request is in flight (their futures dropped after 1,
/// 2 or 3 polls) do not cancel it: a later caller gets the token of that same request.
#[tokio::test(start_paused = true)]
async fn callers_dropped_during_a_token_request_do_not_cancel_it() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let endpoint = service_fn(move |_req: Req| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let body =
                format!(r#"{{"access_token":"t{n}","token_type":"Bearer","expires_in":3600}}"#);
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(body))))
        }
    });
    let tokens =
        ClientCredentials::new(endpoint, "http://auth.example.com/token", "id", "secret").unwrap();
    let svc = AuthLayer::oauth2(tokens).layer(api());
    for polls in 1..4 {
        let mut f = tokio_test::task::spawn(svc.clone().oneshot(get()));
        for _ in 0..polls {
            assert!(f.poll().is_pending());
            tokio::time::advance(Duration::from_millis(50)).await;
        }
        drop(f);
    }
    let res = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get()))
        .await
        .unwrap()
        .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"Bearer t0");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// docs/guides/auth.md: "if it stops driving the request without shutting down (blocked, no
/// longer polled), the request is given up 10 s after its request timeout and the next caller
/// starts a new one". Runtime A starts the token request and then blocks its only thread; a
/// caller on runtime B (paused time) must get a token from a new request after about 11 s.
#[tokio::test(start_paused = true)]
async fn a_token_request_on_a_blocked_runtime_is_given_up() {
    let calls = Arc::new(AtomicUsize::new(0));
    let tokens = token_endpoint(calls.clone()).with_request_timeout(Duration::from_secs(1));
    let svc = AuthLayer::oauth2(tokens)
        .with_token_timeout(Duration::from_secs(60))
        .layer(api());

    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let on_a = svc.clone();
    let a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut f = tokio_test::task::spawn(on_a.oneshot(get()));
            let _ = f.poll();
            for _ in 0..10 {
                tokio::task::yield_now().await;
                let _ = f.poll();
            }
            started_tx.send(()).unwrap();
            // Runtime A stops driving anything, without shutting down.
            let _ = release_rx.recv();
        });
    });
    started_rx.recv().unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "runtime A sent the first token request"
    );

    // A caller that comes after the give-up (11 s later) starts a new request.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let start = tokio::time::Instant::now();
    let res = timeout_60(svc.clone().oneshot(get())).await;
    let waited = start.elapsed();
    let later = timeout_60(svc.clone().oneshot(get())).await;
    release_tx.send(()).unwrap();
    a.join().unwrap();
    let res = res
        .unwrap_or_else(|_| panic!("the caller on runtime B hung ({waited:?})"))
        .unwrap_or_else(|e| {
            let later = later.map(|r| r.map(|_| ()).map_err(|e| e.to_string()));
            panic!(
                "a caller on runtime B 12 s after the give-up failed after {waited:?}: {e}; \
                 token requests sent: {}; one more call: {later:?}",
                calls.load(Ordering::SeqCst)
            )
        });
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"Bearer t1");
    assert!(waited <= Duration::from_secs(1), "waited {waited:?}");
}

/// The same, for a caller that is already waiting: docs/guides/auth.md: "if it stops driving the request without shutting down (blocked, no
/// longer polled), the request is given up 10 s after its request timeout and the next caller
/// starts a new one". Runtime A starts the token request and then blocks its only thread; a
/// caller on runtime B (paused time) must get a token from a new request after about 11 s.
#[tokio::test(start_paused = true)]

async fn a_caller_waiting_when_a_blocked_token_request_is_given_up_gets_a_new_one() {
    let calls = Arc::new(AtomicUsize::new(0));
    let tokens = token_endpoint(calls.clone()).with_request_timeout(Duration::from_secs(1));
    let svc = AuthLayer::oauth2(tokens)
        .with_token_timeout(Duration::from_secs(60))
        .layer(api());

    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let on_a = svc.clone();
    let a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut f = tokio_test::task::spawn(on_a.oneshot(get()));
            let _ = f.poll();
            for _ in 0..10 {
                tokio::task::yield_now().await;
                let _ = f.poll();
            }
            started_tx.send(()).unwrap();
            // Runtime A stops driving anything, without shutting down.
            let _ = release_rx.recv();
        });
    });
    started_rx.recv().unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "runtime A sent the first token request"
    );

    // This caller is waiting when the request is given up (about 11 s from now).
    let start = tokio::time::Instant::now();
    let res = timeout_60(svc.clone().oneshot(get())).await;
    let waited = start.elapsed();
    let later = timeout_60(svc.clone().oneshot(get())).await;
    release_tx.send(()).unwrap();
    a.join().unwrap();
    let res = res
        .unwrap_or_else(|_| panic!("the caller on runtime B hung ({waited:?})"))
        .unwrap_or_else(|e| {
            let later = later.map(|r| r.map(|_| ()).map_err(|e| e.to_string()));
            panic!(
                "a caller on runtime B waiting through the give-up failed after {waited:?}: {e}; \
                 token requests sent: {}; one more call: {later:?}",
                calls.load(Ordering::SeqCst)
            )
        });
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"Bearer t1");
    assert!(waited <= Duration::from_secs(12), "waited {waited:?}");
}

async fn timeout_60<F: std::future::Future>(
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(90), f).await
}
