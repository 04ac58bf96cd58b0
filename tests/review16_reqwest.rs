//! `SturdyMiddleware::new` takes a stack answering with any body: a `ClientBuilder` with
//! coalescing fits as it is (reqwest CHANGELOG), and identical GETs through reqwest share one
//! call, each reading the whole body.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sturdy::coalesce::CoalesceLayer;
use sturdy::reqwest::SturdyMiddleware;
use sturdy::ClientBuilder;

#[tokio::test]
async fn a_coalescing_client_builder_fits_the_reqwest_middleware() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/report",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                "x".repeat(100_000)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_coalesce(CoalesceLayer::new())
                .build(next)
        }))
        .build();
    let url = format!("http://{addr}/report");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = client.clone();
            let u = url.clone();
            tokio::spawn(async move {
                let res = c.get(u).send().await?;
                let status = res.status();
                let text = res.text().await?;
                Ok::<_, reqwest_middleware::Error>((status, text.len()))
            })
        })
        .collect();
    for t in tasks {
        let (status, len) = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("no hang")
            .unwrap()
            .unwrap();
        assert_eq!(status, reqwest::StatusCode::OK);
        assert_eq!(len, 100_000);
    }
    assert!(
        hits.load(Ordering::SeqCst) < 8,
        "{} calls",
        hits.load(Ordering::SeqCst)
    );
    server.abort();
}
