//! The adaptive limit against the chaos server's capacity knob, over loopback in real time.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use sturdy_chaos::{http_client, Capacity, ChaosServer, Knobs};
use sturdy_concurrency::{AdaptiveConcurrencyLayer, Algorithm, ConcurrencyHandle};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

async fn load<S>(client: &S, url: &str, callers: usize, for_: Duration) -> u64
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<hyper::body::Incoming>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
{
    let until = Instant::now() + for_;
    let mut joins = Vec::new();
    for _ in 0..callers {
        let client = client.clone();
        let url = url.to_owned();
        joins.push(tokio::spawn(async move {
            let mut ok = 0;
            while Instant::now() < until {
                let req = Request::get(&url).body(Full::default()).unwrap();
                if let Ok(r) = client.clone().oneshot(req).await {
                    ok += u64::from(r.status().is_success());
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for j in joins {
        ok += j.await.unwrap();
    }
    ok
}

fn limit(h: &ConcurrencyHandle, server: &ChaosServer) -> usize {
    h.limit(&server.addr().to_string()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aimd_finds_the_chaos_servers_capacity_and_recovers_when_it_returns() {
    let server = ChaosServer::start(Knobs {
        orders: 1,
        latency: Duration::from_millis(10),
        capacity: Some(Capacity {
            limit: 12,
            shed_above: 12,
        }),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let url = server.url("/orders/o_1");
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(40)
        .pair();
    let client = layer.layer(http_client());

    load(&client, &url, 48, Duration::from_millis(1_500)).await;
    let l = limit(&handle, &server);
    assert!((6..=16).contains(&l), "near 12: {l}");

    server.update(|k| {
        k.capacity = Some(Capacity {
            limit: 4,
            shed_above: 4,
        });
    });
    load(&client, &url, 48, Duration::from_millis(1_000)).await;
    let low = limit(&handle, &server);
    assert!(low <= 6, "followed capacity down to 4: {low}");

    server.update(|k| {
        k.capacity = Some(Capacity {
            limit: 12,
            shed_above: 12,
        });
    });
    load(&client, &url, 48, Duration::from_millis(1_500)).await;
    let back = limit(&handle, &server);
    eprintln!("AIMD limits: {l} at capacity 12, {low} at 4, {back} back at 12");
    assert!(back >= 8 && back > low, "recovered towards 12: {back}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vegas_holds_the_limit_near_capacity_before_the_server_sheds() {
    let server = ChaosServer::start(Knobs {
        orders: 1,
        latency: Duration::from_millis(10),
        capacity: Some(Capacity {
            limit: 12,
            shed_above: 48,
        }),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let url = server.url("/orders/o_1");
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .pair();
    let client = layer.layer(http_client());
    load(&client, &url, 64, Duration::from_millis(2_000)).await;
    let l = limit(&handle, &server);
    eprintln!("Vegas limit: {l}, server: {:?}", server.stats());
    assert!(
        (8..=30).contains(&l),
        "near 12, well below the 48 where it sheds: {l}"
    );
    assert!(server.stats().peak_in_flight < 48);
}
