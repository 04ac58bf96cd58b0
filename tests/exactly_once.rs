//! Exactly once, even when the client gives up: sturdy's `ClientBuilder` (stock defaults but a
//! short attempt timeout) against an axum app behind sturdy's server `IdempotencyLayer`, with
//! faults around it: 15 % 503s, 10 % connections closed after the commit, 429s with
//! `Retry-After: 1`, and handlers that stall past the client's attempt timeout. Real sockets,
//! real time.
//!
//! The 429s are 1 % of requests, not more: each one pauses every caller of the host for at least
//! the second it asks (that is the rate limiter's job), so at 5 % the run would measure about
//! 150 one-second pauses rather than correctness.
//!
//! Every logical order ends committed exactly once; every error that says "not sent" is checked
//! against the server's own record of the keys it received; an error that says "may have been
//! processed" is followed, as it advises, by a retry with the same key, and a 409 that asks for a
//! pause in `Retry-After` (the key's first request is still running) gets it.
#![cfg(feature = "full")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy::core::classify::delivery;
use sturdy::core::{CallReport, Delivery, Error};
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::ClientBuilder;
use sturdy_chaos::{http_client, serve, Faults};
use tower::ServiceExt;

/// The app's book: how many times each key's order was committed.
#[derive(Default)]
struct Book {
    commits: Mutex<HashMap<String, u32>>,
}

async fn create_order(
    State(book): State<Arc<Book>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let stall = {
        let mut commits = book.commits.lock().unwrap();
        let n = commits.entry(key.clone()).or_default();
        *n += 1;
        // About one order in ten stalls after its commit, past the client's attempt timeout.
        key.bytes().map(u32::from).sum::<u32>() % 10 == 0
    };
    if stall {
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    (
        StatusCode::CREATED,
        format!("{{\"key\":\"{key}\",\"bytes\":{}}}", body.len()),
    )
}

const ORDERS: usize = 2_000;
const TASKS: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_orders_through_every_fault_commit_exactly_once() {
    let book = Arc::new(Book::default());
    let app = Router::new()
        .route("/orders", post(create_order))
        .with_state(book.clone())
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let server = serve(
        app,
        Faults {
            seed: 13,
            error_rate: 0.15,
            reset_after_rate: 0.10,
            rate_limit_rate: 0.01,
        },
    )
    .await
    .unwrap();
    let server = Arc::new(server);
    let url = server.url("/orders");
    let client = ClientBuilder::new()
        .with_attempt_timeout(Duration::from_millis(200))
        .build(http_client());

    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (client, url, next, failures, server) = (
                client.clone(),
                url.clone(),
                next.clone(),
                failures.clone(),
                server.clone(),
            );
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= ORDERS {
                        return outcomes;
                    }
                    let mut key: Option<String> = None;
                    let mut tries = 0;
                    let done = loop {
                        tries += 1;
                        let seen_before = key.as_deref().map_or(0, |k| server.requests_with_key(k));
                        let mut b =
                            Request::post(url.as_str()).header("content-type", "application/json");
                        if let Some(k) = &key {
                            b = b.header("idempotency-key", k.as_str());
                        }
                        let req = b.body(Full::from(format!("{{\"n\":{n}}}"))).unwrap();
                        match client.clone().oneshot(req).await {
                            Ok(res) if res.status() == StatusCode::CREATED => break true,
                            Ok(res) => {
                                // A failed call answered by a response: its report says under
                                // which key an earlier attempt may have been processed.
                                let report = res
                                    .extensions()
                                    .get::<CallReport>()
                                    .expect("a failed response carries its call report");
                                // An answer means the request reached the server.
                                assert_eq!(report.delivery(), Delivery::MaybeProcessed);
                                key = report.idempotency_key().map(str::to_owned);
                                // A 409 says the first request with this key is still running
                                // and asks, in `Retry-After`, for a pause before the next one.
                                // Sending again at once would only meet the same 409.
                                if let Some(secs) = res
                                    .headers()
                                    .get(http::header::RETRY_AFTER)
                                    .and_then(|v| v.to_str().ok())
                                    .and_then(|v| v.parse::<u64>().ok())
                                {
                                    tokio::time::sleep(Duration::from_secs(secs.min(5))).await;
                                }
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("order {n}: {}", res.status()));
                            }
                            Err(e) => {
                                let report = e
                                    .downcast_ref::<Error>()
                                    .expect("the retry layer's error")
                                    .report()
                                    .expect("a report of the whole call");
                                let k = report
                                    .idempotency_key()
                                    .expect("a POST carries its key")
                                    .to_owned();
                                if delivery(&*e) == Delivery::NotSent {
                                    // The server's word: no request of this call arrived.
                                    assert_eq!(
                                        server.requests_with_key(&k),
                                        seen_before,
                                        "{k} was reported not sent, but the server received it: {e}"
                                    );
                                    outcomes.push(k.clone());
                                } else {
                                    assert!(
                                        e.to_string().ends_with(&format!(
                                            "retry with the same idempotency key {k}"
                                        )),
                                        "{e}"
                                    );
                                }
                                failures.lock().unwrap().push(format!("order {n}: {e}"));
                                key = Some(k);
                            }
                        }
                        if tries >= 20 {
                            break false;
                        }
                    };
                    assert!(done, "order {n} never succeeded");
                }
            })
        })
        .collect();
    let mut not_sent_claims = Vec::new();
    for t in tasks {
        not_sent_claims.extend(t.await.unwrap());
    }

    // Every order committed exactly once.
    let commits = book.commits.lock().unwrap();
    assert_eq!(commits.len(), ORDERS, "orders committed");
    let twice: Vec<_> = commits.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "committed more than once: {twice:?}");
    let stats = server.stats();
    eprintln!(
        "{} requests: {} 503s, {} 429s, {} closed after commit; {} calls failed and were sent again; {} said not sent",
        stats.requests,
        stats.errors,
        stats.rate_limited,
        stats.resets,
        failures.lock().unwrap().len(),
        not_sent_claims.len()
    );
    assert!(stats.errors > 0 && stats.resets > 0 && stats.rate_limited > 0);
}
