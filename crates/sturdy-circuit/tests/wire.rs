//! The breaker against the chaos server: 100 % 5xx, then healthy. Real time, millisecond scale.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy_chaos::{http_client, ChaosServer, Knobs};
use sturdy_circuit::{CircuitBreakerLayer, CircuitState};
use sturdy_core::CircuitOpen;
use tower::{Layer, ServiceExt};

#[tokio::test]
async fn a_dead_server_is_left_alone_then_probed_back_to_health() {
    let server = ChaosServer::start(Knobs {
        error_rate: 1.0,
        error_status: 502,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(5)
        .with_open_duration(Duration::from_millis(80), Duration::from_millis(500))
        .pair();
    let client = layer.layer(http_client());
    let get = || {
        Request::get(server.url("/orders"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };

    for _ in 0..5 {
        assert_eq!(
            client.clone().oneshot(get()).await.unwrap().status(),
            StatusCode::BAD_GATEWAY
        );
    }
    for _ in 0..200 {
        assert!(client
            .clone()
            .oneshot(get())
            .await
            .unwrap_err()
            .is::<CircuitOpen>());
    }
    assert_eq!(
        server.stats().api_requests,
        5,
        "no call reached the server while open"
    );
    let key = server.addr().to_string();
    assert!(matches!(
        handle.state(&key),
        Some(CircuitState::Open { .. })
    ));

    server.update(|k| k.error_rate = 0.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        client.clone().oneshot(get()).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(handle.state(&key), Some(CircuitState::Closed));
    assert_eq!(server.stats().api_requests, 6);
}

#[tokio::test]
async fn connection_refused_counts_as_failure() {
    // Bind a port, then close it, so connecting is refused.
    let addr = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    // Stock defaults: 100 calls that all fail open the breaker.
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let client = layer.layer(http_client());
    for _ in 0..100 {
        let err = client
            .clone()
            .oneshot(
                Request::get(format!("http://{addr}/"))
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            sturdy_core::classify::classify_error(&*err),
            sturdy_core::ErrorKind::Connect
        );
    }
    assert!(matches!(
        handle.state(&addr.to_string()),
        Some(CircuitState::Open { .. })
    ));
}
