//! The composed client with coalescing, a circuit breaker and event callbacks in front of
//! hostile peers: shared failures, bodies that never end, breakers that stop the traffic, and
//! the events a retry that stops emits.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use http_body_util::BodyExt;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::classify::delivery;
use sturdy::core::events::{Event, RetryStop};
use sturdy::core::{CircuitOpen, Delivery, ErrorKind};
use sturdy::ClientBuilder;
use tower::ServiceExt;

use crate::wire28_util::*;

const MS: fn(u64) -> Duration = Duration::from_millis;

#[tokio::test]
async fn wire28_coalesced_callers_share_one_retried_failure() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        tokio::time::sleep(MS(20)).await;
        c.reset();
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_coalesce(CoalesceLayer::new())
        .with_attempt_timeout(MS(500))
        .build(hyper_client());
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let c = client.clone();
            let url = p.url("/same");
            tokio::spawn(async move { c.oneshot(get(&url)).await })
        })
        .collect();
    for call in calls {
        let err = within(5, call).await.unwrap().unwrap_err();
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
        assert_eq!(
            sturdy::core::classify::classify_error(&*err),
            ErrorKind::Transport
        );
        let msg = err.to_string();
        assert!(msg.contains("connection reset by peer"), "{msg}");
    }
    assert_eq!(p.seen.requests(), 4, "one shared call of 4 attempts");
}

#[tokio::test]
async fn wire28_coalesced_endless_body_is_not_buffered_past_the_bound() {
    // The peer sends an endless chunked body; the coalescing layer stops buffering at its bound
    // and hands the rest to the caller as a stream.
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            if !c
                .write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
            {
                return;
            }
            let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "z".repeat(64 * 1024));
            loop {
                if !c.write(chunk.as_bytes()).await {
                    return;
                }
            }
        }
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(CoalesceLayer::new().with_max_body(256 * 1024))
        .with_attempt_timeout(MS(2000))
        .build(hyper_client());
    let res = within(5, client.oneshot(get(&p.url("/endless"))))
        .await
        .unwrap();
    let mut body = res.into_body();
    let mut read = 0usize;
    while read < 4 * 1024 * 1024 {
        let frame = within(5, body.frame()).await.unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            read += data.len();
        }
    }
    drop(body);
    assert!(eventually(|| p.seen.closed() <= 1).await);
}

/// coalesce.md: the shared body's read is bounded ("past 30 s from the head
/// (`.with_body_timeout(d)` ...), each caller gets a `Timeout` error"); the retry layer's deadline
/// ends with the head, so it does not bound this read.
#[tokio::test]
async fn wire28_coalesced_stalled_body_is_bounded_by_the_body_timeout() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                .await;
            c.wait_close().await;
        }
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_deadline(MS(300)))
        .with_coalesce(CoalesceLayer::new().with_body_timeout(MS(300)))
        .with_attempt_timeout(MS(200))
        .build(hyper_client());
    let out = tokio::time::timeout(MS(2000), client.oneshot(get(&p.url("/a")))).await;
    let err = out
        .expect("the caller was held 2 s by a stalled body")
        .expect_err("a timeout, not a response");
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout, "{err}");
    assert!(
        err.to_string()
            .contains("the shared response's body did not arrive within 300ms of its head"),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_breaker_opens_on_resets_and_stops_the_traffic() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.reset();
    })
    .await;
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_circuit_breaker(breaker)
        .with_attempt_timeout(MS(500))
        .build(hyper_client());
    let err = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 3);
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Transport);
    assert_eq!(e.report().unwrap().attempts(), 3);
    let open = sturdy::core::find::<CircuitOpen>(&*err).expect("no CircuitOpen");
    assert!(open.retry_in() > Duration::from_secs(20));
    assert!(format!("{:?}", handle.state(&p.authority())).contains("Open"));
    for _ in 0..20 {
        let err = within(5, client.clone().oneshot(get(&p.url("/b"))))
            .await
            .unwrap_err();
        assert_eq!(delivery(&*err), Delivery::NotSent);
    }
    assert_eq!(p.seen.conns(), 3);
}

#[tokio::test]
async fn wire28_breaker_counts_malformed_answers() {
    let p = answering(b"HTTP/1.1 2oo OK\r\n\r\n").await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(2))
        .with_attempt_timeout(MS(500))
        .build(hyper_client());
    for _ in 0..3 {
        let _ = within(5, client.clone().oneshot(get(&p.url("/a")))).await;
    }
    let before = p.seen.requests();
    let err = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(p.seen.requests(), before);
}

#[tokio::test]
async fn wire28_retry_stopped_event_for_a_keyless_post_after_a_reset() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.reset();
    })
    .await;
    let stops = Arc::new(Mutex::new(Vec::new()));
    let s = stops.clone();
    let client = ClientBuilder::new()
        .without_idempotency()
        .with_retry(quick_retry().on_event(move |e: &Event<'_>| {
            if let Event::RetryStopped {
                host, reason, stop, ..
            } = e
            {
                s.lock()
                    .unwrap()
                    .push(((*host).to_owned(), (*reason).clone(), *stop));
            }
        }))
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(MS(500))
        .build(hyper_client());
    let url = format!("http://user:SECRET@{}/pay", p.addr);
    let _ = within(5, client.oneshot(post(&url))).await.unwrap_err();
    let stops = stops.lock().unwrap().clone();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(stops[0].0, p.authority());
    assert_eq!(stops[0].1, ErrorKind::Transport);
    assert_eq!(stops[0].2, RetryStop::NotIdempotent);
}

#[tokio::test]
async fn wire28_retry_events_count_every_retry_of_a_stall() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.wait_close().await;
    })
    .await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let client = ClientBuilder::new()
        .with_retry(quick_retry().on_event(move |e: &Event<'_>| match e {
            Event::RetryScheduled { reason, .. } => {
                s.lock().unwrap().push(format!("scheduled {reason:?}"));
            }
            Event::RetryStopped { stop, .. } => s.lock().unwrap().push(format!("stopped {stop:?}")),
            _ => {}
        }))
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(MS(40))
        .build(hyper_client());
    let _ = within(5, client.oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            "scheduled Timeout",
            "scheduled Timeout",
            "scheduled Timeout",
            "stopped AttemptsExhausted"
        ]
    );
}

/// 60 GETs at once against a peer that resets everything; returns the requests it saw.
async fn flood(breaker: bool) -> (usize, Peer, sturdy::Client<hyper::body::Incoming>) {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.reset();
    })
    .await;
    let b = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(MS(500));
    let client = if breaker {
        b.build(hyper_client())
    } else {
        b.without_circuit_breaker().build(hyper_client())
    };
    let start = Instant::now();
    let calls: Vec<_> = (0..60)
        .map(|i| {
            let c = client.clone();
            let url = p.url(&format!("/f{i}"));
            tokio::spawn(async move { c.oneshot(get(&url)).await })
        })
        .collect();
    for call in calls {
        assert!(within(5, call).await.unwrap().is_err());
    }
    assert!(start.elapsed() < Duration::from_secs(3));
    (p.seen.requests(), p, client)
}

#[tokio::test]
async fn wire28_a_flood_against_a_resetting_peer_is_stopped_by_the_breaker() {
    // The default breaker opens at 50 % failures once 100 calls were seen.
    let (sent, p, client) = flood(true).await;
    assert!((100..140).contains(&sent), "{sent} requests for 60 calls");
    let err = within(5, client.oneshot(get(&p.url("/after"))))
        .await
        .unwrap_err();
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(p.seen.requests(), sent);
}

/// retry.md: "a per-host retry budget of 20 % of the calls of the last 10 s plus a reserve of
/// 10 per second over those 10 s (100 retries, which a burst may spend at once)": 60 failing
/// calls in well under a second retry at most 100 + 12 times.
#[tokio::test]
async fn wire28_a_flood_against_a_resetting_peer_is_bounded_by_the_retry_budget() {
    let (sent, _, _) = flood(false).await;
    let retries = sent - 60;
    assert!(
        retries <= 100 + 12 + 1,
        "{retries} retries for 60 calls in under a second"
    );
}

#[tokio::test]
async fn wire28_final_503_response_comes_back_as_a_response() {
    let p = answering(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown").await;
    let res = within(5, client(MS(500)).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(p.seen.requests(), 4);
    assert_eq!(
        &res.into_body().collect().await.unwrap().to_bytes()[..],
        b"down"
    );
}
