//! Coalescing against the chaos server, over loopback in real time.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy_chaos::{http_client, ChaosServer, Knobs};
use sturdy_coalesce::CoalesceLayer;
use tower::{Layer, ServiceExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_identical_gets_reach_the_server_once() {
    let server = ChaosServer::start(Knobs {
        orders: 3,
        // Long enough for all 1,000 callers to join on a loaded machine.
        latency: Duration::from_millis(1_000),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = layer.layer(http_client());
    let url = server.url("/orders?limit=3");
    let callers: Vec<_> = (0..1_000)
        .map(|_| {
            let req = Request::get(&url).body(Full::<Bytes>::default()).unwrap();
            tokio::spawn(client.clone().oneshot(req))
        })
        .collect();
    let mut bodies = Vec::new();
    for c in callers {
        let res = c.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        bodies.push(res.into_body().collect().await.unwrap().to_bytes());
    }
    assert_eq!(server.stats().api_requests, 1);
    let page: serde_json::Value = serde_json::from_slice(&bodies[0]).unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 3);
    assert!(bodies.iter().all(|b| *b == bodies[0]));
    let s = handle.stats();
    assert_eq!((s.upstream(), s.joined()), (1, 999));

    // A 503: the one response reaches every caller, from one request.
    server.update(|k| {
        k.fail_next = 1;
        k.error_status = 503;
    });
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let req = Request::get(&url).body(Full::<Bytes>::default()).unwrap();
            tokio::spawn(client.clone().oneshot(req))
        })
        .collect();
    for c in callers {
        assert_eq!(
            c.await.unwrap().unwrap().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(server.stats().api_requests, 2);
}
