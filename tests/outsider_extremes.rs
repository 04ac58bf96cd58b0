//! Outside tests: the largest durations a caller can set (`Duration::MAX`, 100 years) in every
//! setter and in `CallOptions`. ARCHITECTURE.md: "A setter never panics. A value that cannot work
//! is reported when it is set ... or taken as [the nearest valid] value ... Nothing is reported
//! on the first request." Each case runs the calls in a task of its own so a panic is caught
//! and named.
//!
//! Found here once: `CallOptions::with_deadline(Duration::MAX)`,
//! `RetryLayer::with_deadline(Duration::MAX)`, `RetryLayer::with_max_retry_after(Duration::MAX)`
//! (with a hostile `Retry-After`) and `CircuitBreakerLayer::with_open_duration(Duration::MAX, _)`
//! panicked on a request ("overflow when adding duration to instant").
use crate::outsider_common;
use std::time::Duration;

use outsider_common::*;
use sturdy::core::CallOptions;
use tower::{Layer, ServiceExt};

const U: &str = "http://api.example.com/x";

async fn survives<F, Fut>(name: &str, f: F) -> Option<String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let r = tokio::time::timeout(
        Duration::from_secs(3600),
        tokio::spawn(async move { f().await }),
    )
    .await;
    match r {
        Err(_) => Some(format!("{name}: still running after an hour")),
        Ok(Err(e)) if e.is_panic() => Some(format!("{name}: panicked")),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn huge_durations_do_not_panic() {
    let big = [Duration::MAX, Duration::from_secs(100 * 365 * 86_400)];
    let mut failures = Vec::new();
    for (i, d) in big.into_iter().enumerate() {
        let tag = if i == 0 { "MAX" } else { "100y" };
        let api = Api::new(
            vec![status(503), status_h(429, &[("retry-after", "1")])],
            ok(),
        );

        let a = api.clone();
        failures.extend(
            survives(
                &format!("CallOptions::with_deadline({tag})"),
                move || async move {
                    let svc = sturdy::ClientBuilder::new().build(a.service());
                    let mut r = get(U);
                    r.extensions_mut()
                        .insert(CallOptions::new().with_deadline(d));
                    let _ = svc.oneshot(r).await;
                },
            )
            .await,
        );

        let a = api.clone();
        failures.extend(
            survives(
                &format!("CallOptions::with_attempt_timeout({tag})"),
                move || async move {
                    let svc = sturdy::ClientBuilder::new().build(a.service());
                    let mut r = get(U);
                    r.extensions_mut()
                        .insert(CallOptions::new().with_attempt_timeout(d));
                    let _ = svc.oneshot(r).await;
                },
            )
            .await,
        );

        for which in [
            "with_deadline",
            "with_attempt_timeout",
            "with_max_retry_after",
        ] {
            let a = api.clone();
            let found = survives(&format!("RetryLayer::{which}({tag})"), move || async move {
                let l = sturdy::retry::RetryLayer::new();
                let l = match which {
                    "with_deadline" => l.with_deadline(d),
                    "with_attempt_timeout" => l.with_attempt_timeout(d),
                    _ => l.with_max_retry_after(d),
                };
                let svc = l.layer(a.service());
                a.push(status_h(503, &[("retry-after", "99999999999999999999")]));
                let _ = svc.clone().oneshot(get(U)).await;
                let _ = svc.clone().oneshot(get(U)).await;
            })
            .await;
            // `with_max_retry_after(huge)` asks the layer to sleep whatever the server says, so a
            // call still asleep after an hour is what was asked for; a panic is not.
            let asked_to_sleep = which == "with_max_retry_after"
                && found
                    .as_deref()
                    .is_some_and(|f| f.ends_with("still running after an hour"));
            if !asked_to_sleep {
                failures.extend(found);
            }
        }

        let a = api.clone();
        failures.extend(
            survives(
                &format!("ClientBuilder::with_attempt_timeout({tag})"),
                move || async move {
                    let svc = sturdy::ClientBuilder::new()
                        .with_attempt_timeout(d)
                        .build(a.service());
                    let _ = svc.oneshot(get(U)).await;
                },
            )
            .await,
        );

        let a = api.clone();
        failures.extend(
            survives(
                &format!("RateLimitLayer max_wait/max_pause/default_pause/release_pace({tag})"),
                move || async move {
                    let svc = sturdy::ratelimit::RateLimitLayer::adaptive_only()
                        .with_max_wait(d)
                        .with_max_pause(d)
                        .with_default_pause(d)
                        .with_release_pace(d)
                        .layer(a.service());
                    a.push(status(429));
                    for _ in 0..3 {
                        let s = svc.clone();
                        let _ =
                            tokio::time::timeout(Duration::from_secs(10), s.oneshot(get(U))).await;
                    }
                },
            )
            .await,
        );

        let a = api.clone();
        failures.extend(
            survives(&format!("Quota::new(1, {tag})"), move || async move {
                if let Ok(q) = sturdy::ratelimit::Quota::new(1, d) {
                    let svc = sturdy::ratelimit::RateLimitLayer::new(q)
                        .with_max_wait(Duration::ZERO)
                        .layer(a.service());
                    for _ in 0..3 {
                        let _ = svc.clone().oneshot(get(U)).await;
                    }
                }
            })
            .await,
        );

        let a = api.clone();
        failures.extend(survives(&format!("AuthLayer::with_token_timeout({tag}) + ClientCredentials timeouts and lifetimes"), move || async move {
            let tokens = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
                Ok::<_, sturdy::core::BoxError>(http::Response::new(http_body_util::Full::<bytes::Bytes>::from(
                    r#"{"access_token":"t","expires_in":1e300}"#,
                )))
            });
            let src = sturdy::auth::ClientCredentials::new(tokens, "https://auth.example.com/t", "c", "s")
                .unwrap()
                .with_request_timeout(d)
                .with_max_lifetime(d)
                .with_default_lifetime(d)
                .with_skew(d);
            let svc = sturdy::auth::AuthLayer::oauth2(src).with_token_timeout(d).layer(a.service());
            let _ = svc.clone().oneshot(get(U)).await;
            let _ = svc.oneshot(get(U)).await;
        })
        .await);

        let a = api.clone();
        failures.extend(
            survives(
                &format!("AdaptiveConcurrencyLayer::with_max_wait({tag})"),
                move || async move {
                    let svc = sturdy::concurrency::AdaptiveConcurrencyLayer::new()
                        .with_limits(1, 1)
                        .with_max_wait(d)
                        .layer(a.service());
                    let _ = svc.clone().oneshot(get(U)).await;
                },
            )
            .await,
        );

        let a = api.clone();
        failures.extend(
            survives(
                &format!("IdempotencyLayer ttl/lease({tag})"),
                move || async move {
                    let _ = a;
                    let l = sturdy::idempotency::server::IdempotencyLayer::new(
                        sturdy::idempotency::server::MemoryStore::default(),
                        sturdy::idempotency::server::ByCredentials::default(),
                    )
                    .with_ttl(d)
                    .unwrap()
                    .with_lease(d)
                    .unwrap();
                    let app = axum::Router::new()
                        .route("/o", axum::routing::post(|| async { "ok" }))
                        .layer(l);
                    for _ in 0..2 {
                        let r = http::Request::post("/o")
                            .header("idempotency-key", "k")
                            .body(axum::body::Body::empty())
                            .unwrap();
                        let _ = app.clone().oneshot(r).await;
                    }
                },
            )
            .await,
        );

        failures.extend(
            survives(
                &format!("webhook dedup_ttl/tolerance({tag})"),
                move || async move {
                    let (q, _rx) = sturdy::webhook::MemoryQueue::new(10);
                    let rx = sturdy::webhook::WebhookReceiver::new(
                        sturdy::webhook::Stripe::new("sk")
                            .unwrap()
                            .with_tolerance(d),
                        q,
                    )
                    .with_dedup_ttl(d);
                    let body = r#"{"id":"evt"}"#;
                    let now = sturdy::core::SystemClock.now_secs();
                    for ts in [now, 0, i64::MAX, i64::MIN] {
                        let sig = sturdy::webhook::sign_stripe("sk", ts, body.as_bytes());
                        let r = http::Request::post("/")
                            .header("stripe-signature", sig)
                            .body(axum::body::Body::from(body))
                            .unwrap();
                        let _ = rx.clone().oneshot(r).await;
                    }
                },
            )
            .await,
        );

        let a = api.clone();
        failures.extend(
            survives(
                &format!("Paginate::with_page_timeout({tag})"),
                move || async move {
                    let p = sturdy::paginate::Paginate::builder(
                        a.service(),
                        U,
                        sturdy::paginate::JsonCursor::new("/d", "/n"),
                    )
                    .with_page_timeout(d)
                    .build()
                    .unwrap();
                    let _ = p.page(None, 5).await;
                },
            )
            .await,
        );

        let a = api.clone();
        failures.extend(
            survives(
                &format!("CircuitBreakerLayer::with_failure_rate window({tag})"),
                move || async move {
                    if let Ok(l) =
                        sturdy::circuit::CircuitBreakerLayer::new().with_failure_rate(0.5, d, 1)
                    {
                        let svc = l.layer(a.service());
                        a.set_fallback(status(500));
                        for _ in 0..3 {
                            let _ = svc.clone().oneshot(get(U)).await;
                        }
                        a.set_fallback(ok());
                    }
                },
            )
            .await,
        );

        let a = api.clone();
        failures.extend(
            survives(
                &format!("CircuitBreakerLayer::with_open_duration({tag})"),
                move || async move {
                    let svc = sturdy::circuit::CircuitBreakerLayer::new()
                        .with_open_duration(d, d)
                        .with_consecutive_failures(1)
                        .layer(a.service());
                    a.set_fallback(status(500));
                    for _ in 0..3 {
                        let _ = svc.clone().oneshot(get(U)).await;
                    }
                    a.set_fallback(ok());
                },
            )
            .await,
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

trait NowSecs {
    fn now_secs(&self) -> i64;
}
impl NowSecs for sturdy::core::SystemClock {
    fn now_secs(&self) -> i64 {
        use sturdy::core::WallClock;
        self.now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }
}
