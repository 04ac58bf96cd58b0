//! The limiter against the chaos server, in real time.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy_chaos::{http_client, ChaosServer, Knobs, RetryAfterForm, ServerRateLimit};
use sturdy_ratelimit::{Quota, RateLimitLayer};
use tower::{Layer, ServiceExt};

#[tokio::test]
async fn one_429_with_retry_after_5_holds_back_50_callers() {
    let server = ChaosServer::start(Knobs {
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(5),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = RateLimitLayer::new(Quota::per_second(20).unwrap()).layer(http_client());
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let c = client.clone();
            let req = Request::get(server.url("/orders"))
                .body(Full::<Bytes>::default())
                .unwrap();
            tokio::spawn(c.oneshot(req))
        })
        .collect();
    let mut limited = 0;
    for c in calls {
        if c.await.unwrap().unwrap().status() == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
        }
    }
    assert_eq!(limited, 1);
    let log = server.requests();
    assert_eq!(log.len(), 50);
    assert_eq!(log[0].status, 429);
    let gap = log[1].at - log[0].at;
    assert!(
        gap >= Duration::from_secs(5),
        "the next request came {gap:?} after the 429"
    );
    assert_eq!(server.stats().rate_limited, 1);
}

#[tokio::test]
async fn the_server_quota_headers_pace_the_client() {
    // The server allows 3 per 1 s window and says so with RateLimit headers on its 429.
    let server = ChaosServer::start(Knobs {
        server_rate_limit: Some(ServerRateLimit {
            limit: 3,
            window: Duration::from_secs(1),
        }),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = RateLimitLayer::adaptive_only().layer(http_client());
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let req = Request::get(server.url("/orders"))
            .body(Full::<Bytes>::default())
            .unwrap();
        statuses.push(client.clone().oneshot(req).await.unwrap().status().as_u16());
    }
    // One 429 teaches the client to wait for the window; the rest go through.
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(server.stats().rate_limited, 1);
}
