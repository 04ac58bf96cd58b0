//! Token fetches, failed token requests and 401s to a cached token reach `on_event`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy_auth::{AuthLayer, ClientCredentials, TokenSource};
use sturdy_core::events::Event;
use sturdy_core::{BoxError, ErrorKind};
use tower::{service_fn, Layer, ServiceExt};

#[derive(Debug, PartialEq)]
enum Seen {
    Fetched(String, Duration),
    Failed(String, ErrorKind, bool),
    Rejected(String),
}

fn record(seen: &Arc<Mutex<Vec<Seen>>>) -> impl Fn(&Event<'_>) + Send + Sync + 'static {
    let seen = seen.clone();
    move |e| {
        let s = match *e {
            Event::TokenFetched { endpoint, lifetime } => Seen::Fetched(endpoint.into(), lifetime),
            Event::TokenFailed {
                endpoint,
                error,
                keeping_current,
                ..
            } => Seen::Failed(endpoint.into(), error.clone(), keeping_current),
            Event::TokenRejected { host } => Seen::Rejected(host.into()),
            _ => return,
        };
        seen.lock().unwrap().push(s);
    }
}

#[tokio::test(start_paused = true)]
async fn token_fetches_failures_and_rejections_are_events() {
    // The token endpoint refuses the first connection, then issues tokens for an hour.
    let asked = Arc::new(AtomicU32::new(0));
    let a = asked.clone();
    let endpoint = service_fn(move |_r: Request<Full<Bytes>>| {
        let n = a.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                return Err::<Response<Full<Bytes>>, BoxError>(Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "connection refused",
                )));
            }
            let body =
                format!(r#"{{"access_token":"t{n}","token_type":"Bearer","expires_in":3600}}"#);
            Ok(Response::new(Full::from(body)))
        }
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let source = ClientCredentials::new(
        endpoint,
        "https://user:pw@auth.example.com/oauth/token?x=1",
        "id",
        "s3cr3t",
    )
    .unwrap()
    .on_event(record(&seen));
    assert!(source.token().await.is_err());
    tokio::time::advance(Duration::from_secs(2)).await;
    source.token().await.unwrap();

    // The API refuses the first token once: the layer drops it and replays with a new one.
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let api = service_fn(move |_r: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::new(Full::<Bytes>::default());
            if n == 0 {
                *res.status_mut() = StatusCode::UNAUTHORIZED;
            }
            Ok::<_, BoxError>(res)
        }
    });
    let svc = AuthLayer::oauth2(source).on_event(record(&seen)).layer(api);
    let res = svc
        .oneshot(
            Request::get("https://api.example.com/orders?secret=1")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let hour = Duration::from_secs(3_600);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            Seen::Failed("auth.example.com".into(), ErrorKind::Connect, false),
            Seen::Fetched("auth.example.com".into(), hour),
            Seen::Rejected("api.example.com".into()),
            Seen::Fetched("auth.example.com".into(), hour),
        ]
    );
}
