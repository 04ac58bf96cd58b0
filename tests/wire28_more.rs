//! More hostile peers: a reset in the middle of a large upload, unsolicited and smuggled
//! responses on kept-alive connections, `Retry-After` where it means nothing, pauses against
//! deadlines, redirect loops through reqwest, and calls dropped while coalesced or hedged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::classify::delivery;
use sturdy::core::events::{Event, RetryStop};
use sturdy::core::{CallOptions, Delivery, RateLimited};
use sturdy::hedge::HedgeLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::wire28_util::*;

const MS: fn(u64) -> Duration = Duration::from_millis;

fn big_post(url: &str, len: usize) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(vec![b'x'; len])))
        .unwrap()
}

/// Reads the head of each request, then resets without reading the body.
async fn resets_mid_upload() -> Peer {
    peer(|mut c| async move {
        if c.read_head_only().await.is_some() {
            c.read_some().await;
            c.reset();
        }
    })
    .await
}

#[tokio::test]
async fn wire28_reset_mid_upload_post_without_key_is_maybe_processed() {
    let p = resets_mid_upload().await;
    let err = within(
        5,
        client_without_keys(MS(1000)).oneshot(big_post(&p.url("/upload"), 512 * 1024)),
    )
    .await
    .unwrap_err();
    assert_eq!(p.seen.requests(), 1, "{err}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(err.to_string().contains("may have been processed"), "{err}");
}

#[tokio::test]
async fn wire28_reset_mid_upload_get_with_body_is_retried() {
    let p = resets_mid_upload().await;
    let req = http::Request::put(p.url("/doc"))
        .body(Full::new(Bytes::from(vec![b'y'; 512 * 1024])))
        .unwrap();
    let err = within(5, client(MS(1000)).oneshot(req)).await.unwrap_err();
    assert_eq!(p.seen.requests(), 4, "{err}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn wire28_keyed_upload_over_the_replay_limit_is_sent_once() {
    let p = resets_mid_upload().await;
    let stops = Arc::new(Mutex::new(Vec::new()));
    let s = stops.clone();
    let client = ClientBuilder::new()
        .with_retry(quick_retry().on_event(move |e: &Event<'_>| {
            if let Event::RetryStopped { stop, .. } = e {
                s.lock().unwrap().push(*stop);
            }
        }))
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(MS(1000))
        .build(hyper_client());
    let err = within(
        5,
        client.oneshot(big_post(&p.url("/upload"), 2 * 1024 * 1024)),
    )
    .await
    .unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(*stops.lock().unwrap(), vec![RetryStop::NotReplayable]);
    let key = p.seen.header_values("idempotency-key").pop().unwrap();
    assert!(
        err.to_string()
            .ends_with(&format!("retry with the same idempotency key {key}")),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_unsolicited_408_on_an_idle_connection_is_not_taken_as_the_answer() {
    // Servers send "408 Request Timeout" on an idle kept-alive connection before closing it.
    // The next call must not read that 408 as its answer.
    let p = peer(|mut c| async move {
        if c.index == 0 {
            if c.read_request().await.is_some() {
                c.write(OK).await;
                tokio::time::sleep(MS(20)).await;
                c.write(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
            return;
        }
        while c.read_request().await.is_some() {
            if !c.write(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n").await {
                return;
            }
        }
    })
    .await;
    let client = client_without_keys(MS(500));
    let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    tokio::time::sleep(MS(100)).await;
    let res = within(5, client.clone().oneshot(post(&p.url("/pay"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(p.seen.requests(), 2);
}

#[tokio::test]
async fn wire28_a_smuggled_second_response_is_not_served_to_the_next_call() {
    // The peer answers the first request with two responses in one write; the second must not
    // become the answer to the next request.
    let p = peer(|mut c| async move {
        let mut n = 0;
        while c.read_request().await.is_some() {
            n += 1;
            let answer: &[u8] = if n == 1 && c.index == 0 {
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none\
                  HTTP/1.1 500 Internal Server Error\r\ncontent-length: 8\r\n\r\nsmuggled"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntwo"
            };
            if !c.write(answer).await {
                return;
            }
        }
    })
    .await;
    let client = client_without_keys(MS(500));
    let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(
        &res.into_body().collect().await.unwrap().to_bytes()[..],
        b"one"
    );
    tokio::time::sleep(MS(30)).await;
    let res = within(5, client.clone().oneshot(post(&p.url("/b"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        &res.into_body().collect().await.unwrap().to_bytes()[..],
        b"two"
    );
}

#[tokio::test]
async fn wire28_retry_after_on_a_200_or_a_301_pauses_nobody() {
    for status in ["200 OK", "301 Moved Permanently", "404 Not Found"] {
        let answer: &'static [u8] = Box::leak(
            format!("HTTP/1.1 {status}\r\nretry-after: 120\r\nlocation: /x\r\ncontent-length: 0\r\n\r\n")
                .into_bytes()
                .into_boxed_slice(),
        );
        let p = answering(answer).await;
        let (layer, handle) = quick_limiter().pair();
        let client = ClientBuilder::new()
            .with_retry(quick_retry())
            .with_rate_limit(layer)
            .with_attempt_timeout(MS(500))
            .build(hyper_client());
        within(5, client.clone().oneshot(get(&p.url("/a"))))
            .await
            .unwrap();
        assert_eq!(handle.pause(&p.authority()), None, "{status}");
        let start = Instant::now();
        within(5, client.clone().oneshot(get(&p.url("/b"))))
            .await
            .unwrap();
        assert!(start.elapsed() < MS(600), "{status}");
        assert_eq!(p.seen.requests(), 2, "{status}");
    }
}

#[tokio::test]
async fn wire28_retry_after_one_second_is_honoured_and_holds_other_callers() {
    let p = peer(|mut c| async move {
        while c.read_request().await.is_some() {
            let first = c.seen.requests() == 1;
            let answer: &[u8] = if first {
                b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n"
            } else {
                OK
            };
            if !c.write(answer).await {
                return;
            }
        }
    })
    .await;
    let client = client(MS(2000));
    let start = Instant::now();
    let first = {
        let c = client.clone();
        let url = p.url("/a");
        tokio::spawn(async move { c.oneshot(get(&url)).await })
    };
    tokio::time::sleep(MS(100)).await;
    let other = within(5, client.clone().oneshot(get(&p.url("/other"))))
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert!(start.elapsed() >= MS(990), "{:?}", start.elapsed());
    let res = within(5, first).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert!(start.elapsed() >= MS(1000) && start.elapsed() < MS(1800));
    assert_eq!(p.seen.requests(), 3);
}

#[tokio::test]
async fn wire28_a_pause_past_the_deadline_refuses_at_once_and_sends_nothing() {
    let p =
        answering(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 5\r\ncontent-length: 0\r\n\r\n")
            .await;
    let client = client(MS(500));
    let mut req = get(&p.url("/a"));
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(MS(300)));
    let start = Instant::now();
    let err = within(5, client.clone().oneshot(req)).await.unwrap_err();
    assert!(start.elapsed() < MS(1000));
    assert_eq!(
        sturdy::core::find::<RateLimited>(&*err)
            .unwrap()
            .retry_after()
            .as_secs(),
        5
    );
    let mut req = post(&p.url("/b"));
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(MS(300)));
    let start = Instant::now();
    let err = within(5, client.clone().oneshot(req)).await.unwrap_err();
    assert!(start.elapsed() < MS(300), "{:?}", start.elapsed());
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(sturdy::core::find::<RateLimited>(&*err).is_some(), "{err}");
}

#[tokio::test]
async fn wire28_503_with_retry_after_on_a_keyless_post_ends_as_rate_limited() {
    // retry.md: a 429 or a 503 that carries a Retry-After ends the call as a RateLimited error
    // when that wait is not slept.
    let p = answering(
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let out = within(
        5,
        client_without_keys(MS(500)).oneshot(post(&p.url("/pay"))),
    )
    .await;
    assert_eq!(p.seen.requests(), 1);
    let err = out.expect_err("the 503 came back as a response");
    assert_eq!(
        sturdy::core::find::<RateLimited>(&*err)
            .unwrap()
            .retry_after()
            .as_secs(),
        1
    );
}

#[tokio::test]
async fn wire28_drop_during_a_retry_after_sleep_sends_nothing_more() {
    let p = answering(
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let out = tokio::time::timeout(MS(200), client(MS(500)).oneshot(get(&p.url("/a")))).await;
    assert!(out.is_err());
    tokio::time::sleep(MS(1300)).await;
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_reqwest_redirect_loop_stops_at_ten_and_is_not_retried() {
    let p = answering(b"HTTP/1.1 302 Found\r\nlocation: /loop\r\ncontent-length: 0\r\n\r\n").await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(sturdy_reqwest::SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_rate_limit(quick_limiter())
                .build(next)
        }))
        .build();
    let err = within(5, client.get(p.url("/start")).send())
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 11, "{err}");
    assert!(
        err.to_string()
            .contains("could not follow a redirect: too many redirects"),
        "{err}"
    );
    assert_eq!(sturdy_reqwest::delivery(&err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn wire28_coalesced_callers_all_dropped_cancel_the_upstream_call() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.wait_close().await;
    })
    .await;
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(layer)
        .with_attempt_timeout(MS(5000))
        .build(hyper_client());
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let c = client.clone();
            let url = p.url("/same");
            tokio::spawn(async move { c.oneshot(get(&url)).await })
        })
        .collect();
    tokio::time::sleep(MS(100)).await;
    assert_eq!(p.seen.requests(), 1);
    for call in &calls {
        call.abort();
    }
    assert!(
        eventually(|| p.seen.closed() == 1).await,
        "the shared call kept its connection"
    );
    let stats = handle.stats();
    assert_eq!(stats.joined(), 7, "{stats:?}");
    assert_eq!(stats.upstream(), 1, "{stats:?}");
    // A new identical call starts afresh.
    let c = client.clone();
    let url = p.url("/same");
    let fresh = tokio::spawn(async move { c.oneshot(get(&url)).await });
    assert!(eventually(|| p.seen.requests() == 2).await);
    fresh.abort();
}

#[tokio::test]
async fn wire28_a_hedging_client_never_hedges_a_stalled_post() {
    let stall = Arc::new(AtomicBool::new(false));
    let s = stall.clone();
    let p = peer(move |mut c| {
        let s = s.clone();
        async move {
            while c.read_request().await.is_some() {
                if s.load(Ordering::SeqCst) {
                    c.wait_close().await;
                    return;
                }
                if !c.write(OK).await {
                    return;
                }
            }
        }
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_hedge(
            HedgeLayer::new()
                .with_min_samples(10)
                .with_delay_bounds(MS(5), MS(20)),
        )
        .with_attempt_timeout(MS(300))
        .build(hyper_client());
    for i in 0..30 {
        let res = within(5, client.clone().oneshot(get(&p.url(&format!("/w{i}")))))
            .await
            .unwrap();
        res.into_body().collect().await.unwrap();
    }
    stall.store(true, Ordering::SeqCst);
    let before = p.seen.requests();
    let mut req = post(&p.url("/pay"));
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let err = within(5, client.clone().oneshot(req)).await.unwrap_err();
    assert_eq!(p.seen.requests() - before, 1, "{err}");
}

#[tokio::test]
async fn wire28_ratelimit_policy_names_beyond_ascii_do_not_break_anything() {
    let mut answer = b"HTTP/1.1 200 OK\r\nratelimit: \"caf\xc3\xa9\";r=0;t=1\r\nratelimit-policy: \"\xff\xfe\";q=10;w=1\r\n".to_vec();
    answer.extend_from_slice(b"content-length: 0\r\n\r\n");
    let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
    let p = answering(answer).await;
    let (layer, handle) = quick_limiter().pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(layer)
        .build(hyper_client());
    let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(handle.pause(&p.authority()).unwrap_or_default() <= Duration::from_secs(1));
}
