//! Version pinning and deprecation notices against the chaos server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy_chaos::{http_client, ChaosServer, Knobs};
use sturdy_version::VersionLayer;
use tower::{Layer, ServiceExt};

#[tokio::test]
async fn pins_the_version_and_reports_sunset_once_per_endpoint() {
    let sunset = SystemTime::UNIX_EPOCH + Duration::from_secs(1_719_791_999);
    let s = ChaosServer::start(Knobs {
        api_version: Some("2024-06-01".into()),
        deprecation: Some(1_688_169_599),
        sunset: Some(sunset),
        orders: 3,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let get = |path: &str| {
        Request::get(s.url(path))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    // Without the layer the server refuses the call.
    assert_eq!(
        http_client()
            .request(get("/orders"))
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );

    let notices = Arc::new(Mutex::new(Vec::new()));
    let n = notices.clone();
    let client = VersionLayer::header("API-Version", "2024-06-01")
        .unwrap()
        .on_notice(move |x| n.lock().unwrap().push(x.clone()))
        .layer(http_client());
    for _ in 0..5 {
        let res = client.clone().oneshot(get("/orders")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()["sunset"],
            "Sun, 30 Jun 2024 23:59:59 GMT",
            "the response is untouched"
        );
    }
    client.clone().oneshot(get("/orders/o_1")).await.unwrap();
    let notices = notices.lock().unwrap();
    assert_eq!(notices.len(), 2);
    assert_eq!(notices[0].endpoint, "GET /orders");
    assert_eq!(notices[1].endpoint, "GET /orders/o_1");
    assert_eq!(notices[0].sunset, Some(sunset));
    assert_eq!(
        notices[0].deprecation,
        Some(Some(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_688_169_599)
        ))
    );
}
