//! auth: "If that runtime stops driving it without shutting down (blocked, or no longer polled),
//! callers on other runtimes wait for it until 10 s past the timeout; then the callers still
//! waiting, and the next to arrive, start another request (one, shared)."
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{ClientCredentials, ExposeSecret};
use sturdy::core::BoxError;

fn source(hits: Arc<AtomicUsize>) -> ClientCredentials {
    let endpoint = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = hits.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(format!(
                r#"{{"access_token":"t{n}","token_type":"Bearer","expires_in":3600}}"#
            ))))
        }
    });
    ClientCredentials::new(endpoint, "http://auth.example.com/oauth/token", "c", "s")
        .unwrap()
        .with_request_timeout(Duration::from_secs(1))
}

#[tokio::test(start_paused = true)]
async fn every_caller_waiting_on_an_undriven_request_moves_to_one_new_request() {
    let hits = Arc::new(AtomicUsize::new(0));
    let tokens = source(hits.clone());
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let on_a = tokens.clone();
    let a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut f = tokio_test::task::spawn(async move { on_a.get().await });
            let _ = f.poll();
            for _ in 0..10 {
                tokio::task::yield_now().await;
                let _ = f.poll();
            }
            started_tx.send(()).unwrap();
            // This runtime stops driving anything, without shutting down.
            let _ = release_rx.recv();
        });
    });
    started_rx.recv().unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let waiting: Vec<_> = (0..6)
        .map(|_| {
            let t = tokens.clone();
            tokio::spawn(
                async move { tokio::time::timeout(Duration::from_secs(60), t.get()).await },
            )
        })
        .collect();
    let mut got = Vec::new();
    for w in waiting {
        let tok = w
            .await
            .unwrap()
            .expect("moved to a new request before 60 s")
            .expect("a token");
        got.push(tok.secret().expose_secret().to_owned());
    }
    release_tx.send(()).unwrap();
    a.join().unwrap();
    assert!(got.iter().all(|t| t == "t1"), "{got:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 2, "one new request, shared");
}
