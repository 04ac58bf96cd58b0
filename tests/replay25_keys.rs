//! The idempotency key a failed call reports (`CallReport`, the message) for every count of
//! header values, and what hedged copies inside `ClientBuilder`'s retries carry. Paused time.
#![cfg(feature = "full")]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::Full;
use sturdy::core::{BoxError, CallOptions};
use sturdy::hedge::HedgeLayer;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tower::{Layer, ServiceBuilder, ServiceExt};

type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>>;

#[derive(Clone, Debug, PartialEq)]
struct Tag(&'static str);

type Log = Arc<Mutex<Vec<(Method, String, HeaderMap, Option<Tag>)>>>;

fn failing(
    log: Log,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = BoxFut,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| -> BoxFut {
        log.lock().unwrap().push((
            req.method().clone(),
            req.uri().to_string(),
            req.headers().clone(),
            req.extensions().get::<Tag>().cloned(),
        ));
        Box::pin(async {
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into())
        })
    })
}

fn post(extra: usize) -> Request<Full<Bytes>> {
    let mut req = Request::post("http://api.example.com/pay")
        .body(Full::from("{}"))
        .unwrap();
    for i in 0..extra {
        req.headers_mut().append(
            if i % 2 == 0 { "accept" } else { "x-n" },
            HeaderValue::from_str(&format!("v{i}")).unwrap(),
        );
    }
    req
}

/// A keyed POST that fails after every attempt reports the key it was sent with, in its
/// `CallReport` and in its message, whatever the number of other header values and attempts.
#[tokio::test(start_paused = true)]
async fn a_failed_keyed_post_reports_the_key_it_sent() {
    for extra in [0usize, 1, 2, 3, 6] {
        for n in [1u32, 2, 3, 4] {
            for how in ["layer", "header", "options"] {
                let log: Log = Arc::default();
                let svc = ServiceBuilder::new()
                    .layer(IdempotencyKeyLayer::new())
                    .layer(
                        RetryLayer::new()
                            .with_seed(1)
                            .without_budget()
                            .with_max_attempts(n),
                    )
                    .service(failing(log.clone()));
                let mut req = post(extra);
                match how {
                    "header" => {
                        req.headers_mut()
                            .insert("idempotency-key", HeaderValue::from_static("k-header"));
                    }
                    "options" => {
                        req.extensions_mut()
                            .insert(CallOptions::new().with_idempotency_key("k-options"));
                    }
                    _ => {}
                }
                let err = svc.oneshot(req).await.unwrap_err();
                let case = format!("extra {extra}, n {n}, key by {how}");
                let log = log.lock().unwrap().clone();
                assert_eq!(log.len(), n as usize, "{case}");
                let sent: Vec<String> = log
                    .iter()
                    .map(|(_, _, h, _)| {
                        h.get("idempotency-key")
                            .unwrap()
                            .to_str()
                            .unwrap()
                            .to_owned()
                    })
                    .collect();
                assert!(sent.iter().all(|k| *k == sent[0]), "{case}: {sent:?}");
                let e = sturdy::core::find::<sturdy::core::Error>(&*err)
                    .unwrap_or_else(|| panic!("{case}: {err}"));
                assert_eq!(
                    e.report().and_then(|r| r.idempotency_key()),
                    Some(sent[0].as_str()),
                    "{case}: {err}"
                );
                assert!(err.to_string().contains(&sent[0]), "{case}: {err}");
            }
        }
    }
}

fn hedging_api(
    log: Log,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = BoxFut,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| -> BoxFut {
        let n = {
            let mut l = log.lock().unwrap();
            l.push((
                req.method().clone(),
                req.uri().to_string(),
                req.headers().clone(),
                req.extensions().get::<Tag>().cloned(),
            ));
            l.len()
        };
        Box::pin(async move {
            match n {
                // Warm-up calls answer at once.
                1..=4 => Ok(Response::new(Full::default())),
                // Then a slow first copy and a failing hedge, twice, then a success.
                5 | 7 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(Response::builder()
                        .status(503)
                        .body(Full::default())
                        .unwrap())
                }
                6 | 8 => Ok(Response::builder()
                    .status(503)
                    .body(Full::default())
                    .unwrap()),
                _ => Ok(Response::new(Full::default())),
            }
        })
    })
}

/// Inside `ClientBuilder`, hedged copies of retried attempts carry the caller's whole head.
#[tokio::test(start_paused = true)]
async fn hedged_copies_of_replays_carry_the_whole_head() {
    for extra in [0usize, 1, 2, 3, 5] {
        let log: Log = Arc::default();
        let hedge = HedgeLayer::new()
            .with_min_samples(1)
            .with_delay_bounds(Duration::from_millis(50), Duration::from_millis(50));
        let client = ClientBuilder::new()
            .with_retry(RetryLayer::new().with_seed(2).without_budget())
            .with_hedge(hedge)
            .build(hedging_api(log.clone()));
        for _ in 0..4 {
            client
                .clone()
                .oneshot(
                    Request::get("http://api.example.com/x")
                        .body(Full::default())
                        .unwrap(),
                )
                .await
                .unwrap();
        }
        let mut req = post(extra);
        *req.method_mut() = Method::GET;
        *req.uri_mut() = "http://api.example.com/items?a=1&a=2".parse().unwrap();
        req.extensions_mut().insert(Tag("mine"));
        let want = req.headers().clone();
        let _ = client.clone().oneshot(req).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let log = log.lock().unwrap().clone();
        assert!(log.len() > 5, "extra {extra}: {} requests", log.len());
        for (i, (m, u, h, t)) in log.iter().enumerate().skip(4) {
            let case = format!("extra {extra}, request {}", i + 1);
            assert_eq!(*m, Method::GET, "{case}");
            assert_eq!(u, "http://api.example.com/items?a=1&a=2", "{case}");
            assert_eq!(*h, want, "{case}");
            assert_eq!(*t, Some(Tag("mine")), "{case}");
        }
    }
}

/// `RetryLayer` used alone over a service that is made by a layer stack of its own
/// (`Layer::layer`), with `max_attempts` given per request above the layer's.
#[tokio::test(start_paused = true)]
async fn per_request_attempts_above_the_layers_replay_the_whole_head() {
    for extra in [0usize, 1, 2, 3] {
        let log: Log = Arc::default();
        let svc = RetryLayer::new()
            .with_seed(9)
            .without_budget()
            .with_max_attempts(2)
            .layer(failing(log.clone()));
        let mut req = post(extra);
        *req.method_mut() = Method::PUT;
        req.extensions_mut()
            .insert(CallOptions::new().with_max_attempts(6));
        req.extensions_mut().insert(Tag("put"));
        let want = req.headers().clone();
        let _ = svc.oneshot(req).await;
        let log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 6, "extra {extra}");
        for (i, (m, _, h, t)) in log.iter().enumerate() {
            assert_eq!(*m, Method::PUT, "extra {extra}, attempt {}", i + 1);
            assert_eq!(*h, want, "extra {extra}, attempt {}", i + 1);
            assert_eq!(*t, Some(Tag("put")), "extra {extra}, attempt {}", i + 1);
        }
    }
}

/// A key in `CallOptions` that no header carries as it is goes as `sturdy-sha256-<hex>`, the
/// same on every attempt, and that value is the key the failed call reports.
#[tokio::test(start_paused = true)]
async fn a_hashed_key_is_sent_alike_on_every_attempt_and_reported() {
    for key in [" lead", "trail\t", "a\r\nb", "\u{1}", "x\u{7f}y"] {
        for extra in [0usize, 1, 2, 3] {
            let log: Log = Arc::default();
            let svc = ServiceBuilder::new()
                .layer(IdempotencyKeyLayer::new())
                .layer(RetryLayer::new().with_seed(1).without_budget())
                .service(failing(log.clone()));
            let mut req = post(extra);
            req.extensions_mut()
                .insert(CallOptions::new().with_idempotency_key(key));
            let err = svc.oneshot(req).await.unwrap_err();
            let log = log.lock().unwrap().clone();
            let case = format!("{key:?}, extra {extra}");
            assert_eq!(log.len(), 4, "{case}");
            let sent: Vec<&HeaderValue> = log
                .iter()
                .map(|(_, _, h, _)| h.get("idempotency-key").unwrap())
                .collect();
            assert!(sent.iter().all(|k| *k == sent[0]), "{case}: {sent:?}");
            let s = sent[0].to_str().unwrap();
            assert!(s.starts_with("sturdy-sha256-"), "{case}: {s}");
            assert_eq!(s.len(), "sturdy-sha256-".len() + 64, "{case}: {s}");
            let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
            assert_eq!(
                e.report().and_then(|r| r.idempotency_key()),
                Some(s),
                "{case}"
            );
        }
    }
}

/// `ClientBuilder` with keys in a header of the caller's choosing: a POST with 0 to 3 other
/// values is retried after a reset, and every attempt carries the one key and the other values.
#[tokio::test(start_paused = true)]
async fn a_key_in_a_custom_header_is_replayed_with_the_whole_head() {
    for extra in [0usize, 1, 2, 3] {
        let log: Log = Arc::default();
        let client = ClientBuilder::new()
            .with_idempotency(
                IdempotencyKeyLayer::new()
                    .with_header(http::HeaderName::from_static("x-request-key")),
            )
            .with_retry(
                RetryLayer::new()
                    .with_seed(4)
                    .without_budget()
                    .with_max_attempts(3),
            )
            .build(failing(log.clone()));
        let req = post(extra);
        let want = req.headers().clone();
        let err = client.oneshot(req).await.unwrap_err();
        let log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 3, "extra {extra}: {err}");
        let key = log[0].2.get("x-request-key").unwrap().clone();
        for (i, (_, _, h, _)) in log.iter().enumerate() {
            let mut h = h.clone();
            let keys: Vec<_> = h.get_all("x-request-key").iter().cloned().collect();
            assert_eq!(keys, vec![key.clone()], "extra {extra}, attempt {}", i + 1);
            h.remove("x-request-key");
            assert_eq!(h, want, "extra {extra}, attempt {}", i + 1);
        }
    }
}
