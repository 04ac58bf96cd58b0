//! The long-tail and capacity knobs, over a real loopback connection, in real time.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy_chaos::{http_client, Capacity, ChaosServer, Knobs};
use tokio::time::Instant;

fn get(server: &ChaosServer) -> Request<Full<Bytes>> {
    Request::get(server.url("/orders/o_1"))
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn a_seeded_fraction_of_requests_takes_the_tail_latency() {
    let server = ChaosServer::start(Knobs {
        orders: 1,
        latency: Duration::from_millis(1),
        tail_latency: Some((0.25, Duration::from_millis(60))),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = http_client();
    let mut slow = 0;
    for _ in 0..40 {
        let start = Instant::now();
        let res = client.request(get(&server)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        if start.elapsed() >= Duration::from_millis(60) {
            slow += 1;
        }
    }
    // A quarter on average; the seed fixes the draw, the bounds leave room for another seed.
    assert!((3..=20).contains(&slow), "{slow} slow of 40");
    // /health is never slowed.
    let start = Instant::now();
    for _ in 0..10 {
        let r = Request::get(server.url("/health"))
            .body(Full::default())
            .unwrap();
        client.request(r).await.unwrap();
    }
    assert!(start.elapsed() < Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_capacity_the_server_slows_then_sheds() {
    let server = ChaosServer::start(Knobs {
        orders: 1,
        latency: Duration::from_millis(40),
        capacity: Some(Capacity {
            limit: 4,
            shed_above: 8,
        }),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = http_client();

    // Four at once: all at full speed.
    let start = Instant::now();
    let calls: Vec<_> = (0..4).map(|_| client.request(get(&server))).collect();
    for r in futures_join(calls).await {
        assert_eq!(r.unwrap().status(), StatusCode::OK);
    }
    assert!(
        start.elapsed() < Duration::from_millis(75),
        "{:?}",
        start.elapsed()
    );

    // Twelve at once: at most 8 are served, some of them slowed; the rest get 503 at once.
    let calls: Vec<_> = (0..12).map(|_| client.request(get(&server))).collect();
    let statuses: Vec<_> = futures_join(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().status())
        .collect();
    let shed = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert!(shed >= 4, "{statuses:?}");
    let st = server.stats();
    assert_eq!(st.shed, shed as u64);
    assert!(st.peak_in_flight >= 8, "{st:?}");
}

async fn futures_join<F>(fs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
