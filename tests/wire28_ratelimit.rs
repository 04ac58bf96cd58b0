//! The composed client against peers that answer 429 or 503 with hostile `Retry-After`,
//! `RateLimit` and `X-RateLimit-*` headers: huge, negative, dates in 1970 and 9999, many values,
//! bytes beyond ASCII. What the retry layer and the rate limiter make of them.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use http_body_util::BodyExt;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{Delivery, RateLimited};
use sturdy::ratelimit::{PauseCapped, RateLimitHandle};
use sturdy::ClientBuilder;
use tower::ServiceExt;

use crate::wire28_util::*;

const T: Duration = Duration::from_millis(500);
const FIVE_MIN: Duration = Duration::from_secs(300);

/// Answers the first `n` requests with `first`, the rest with `rest`.
async fn first_then(n: usize, first: Vec<u8>, rest: &'static [u8]) -> Peer {
    let first = Arc::new(first);
    peer(move |mut c| {
        let first = first.clone();
        async move {
            while c.read_request().await.is_some() {
                let answer: &[u8] = if c.seen.requests() <= n { &first } else { rest };
                if !c.write(answer).await {
                    return;
                }
            }
        }
    })
    .await
}

fn limited(headers: &str, status: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\n{headers}content-length: 0\r\n\r\n").into_bytes()
}

fn client_with_handle() -> (sturdy::Client<hyper::body::Incoming>, RateLimitHandle) {
    let (layer, handle) = quick_limiter().pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(layer)
        .with_attempt_timeout(T)
        .build(hyper_client());
    (client, handle)
}

#[tokio::test]
async fn wire28_huge_retry_after_fails_at_once_with_a_capped_wait_and_holds_later_calls() {
    let p = first_then(
        usize::MAX,
        limited(
            "retry-after: 99999999999999999999\r\n",
            "429 Too Many Requests",
        ),
        OK,
    )
    .await;
    let (client, handle) = client_with_handle();
    let start = Instant::now();
    let err = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(500));
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(
        err.to_string(),
        format!("rate limited by {}; retry after 5m", p.authority())
    );
    assert_eq!(
        sturdy::core::find::<RateLimited>(&*err)
            .unwrap()
            .retry_after(),
        FIVE_MIN
    );
    assert!(handle.pause(&p.authority()).unwrap() <= FIVE_MIN);
    // A later call is refused at once (5 min is past the 30 s line wait) and sends nothing.
    let err = within(5, client.clone().oneshot(post(&p.url("/b"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(sturdy::core::find::<RateLimited>(&*err).is_some());
    assert!(err.to_string().contains("safe to send again"), "{err}");
    // Cleared by hand, the host is called again.
    handle.clear_pause(&p.authority());
    let res = within(5, client.clone().oneshot(get(&p.url("/c")))).await;
    assert!(res.is_err() || res.is_ok());
    assert_eq!(p.seen.requests(), 2);
}

#[tokio::test]
async fn wire28_negative_retry_after_is_a_bare_429() {
    let p = first_then(
        2,
        limited("retry-after: -5\r\n", "429 Too Many Requests"),
        OK,
    )
    .await;
    let start = Instant::now();
    let res = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.seen.requests(), 3);
    assert!(
        start.elapsed() < Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn wire28_retry_after_date_in_1970_retries_almost_at_once() {
    let p = first_then(
        1,
        limited(
            "retry-after: Thu, 01 Jan 1970 00:00:00 GMT\r\n",
            "503 Service Unavailable",
        ),
        OK,
    )
    .await;
    let start = Instant::now();
    let res = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.seen.requests(), 2);
    assert!(
        start.elapsed() < Duration::from_millis(700),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn wire28_retry_after_date_in_9999_reports_five_minutes() {
    let p = first_then(
        usize::MAX,
        limited(
            "retry-after: Fri, 31 Dec 9999 23:59:59 GMT\r\n",
            "503 Service Unavailable",
        ),
        OK,
    )
    .await;
    let err = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(
        sturdy::core::find::<RateLimited>(&*err)
            .unwrap()
            .retry_after(),
        FIVE_MIN
    );
    assert!(err.to_string().ends_with("retry after 5m"), "{err}");
}

#[tokio::test]
async fn wire28_retry_after_beyond_ascii_is_ignored() {
    let mut bytes =
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: \xff\xfe3\xc3\xa9\r\n".to_vec();
    bytes.extend_from_slice(b"content-length: 0\r\n\r\n");
    let p = first_then(1, bytes, OK).await;
    let start = Instant::now();
    let res = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.seen.requests(), 2);
    assert!(start.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn wire28_many_retry_after_values_stay_bounded() {
    let mut headers = String::new();
    for i in 0..500 {
        headers += &format!("retry-after: {}\r\n", if i % 2 == 0 { 0 } else { 99999999 });
    }
    headers += "retry-after: 1, 2, 3\r\n";
    let p = first_then(1, limited(&headers, "429 Too Many Requests"), OK).await;
    let start = Instant::now();
    let out = within(5, client(T).oneshot(get(&p.url("/a")))).await;
    let took = start.elapsed();
    match out {
        Ok(res) => {
            assert_eq!(res.status(), 200);
            assert!(took < Duration::from_millis(1500), "{took:?}");
        }
        Err(err) => {
            assert!(took < Duration::from_millis(500), "{took:?}");
            assert!(
                sturdy::core::find::<RateLimited>(&*err)
                    .unwrap()
                    .retry_after()
                    <= FIVE_MIN,
                "{err}"
            );
        }
    }
}

#[tokio::test]
async fn wire28_ratelimit_header_with_a_huge_reset_on_a_200_is_capped() {
    let p = first_then(
        1,
        limited("ratelimit: \"default\";r=0;t=99999999999\r\n", "200 OK"),
        OK,
    )
    .await;
    let (client, handle) = client_with_handle();
    let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let capped = res
        .extensions()
        .get::<PauseCapped>()
        .expect("no PauseCapped");
    assert_eq!(capped.applied(), FIVE_MIN);
    assert!(capped.asked() > FIVE_MIN);
    let left = handle.pause(&p.authority()).unwrap();
    assert!(
        left <= FIVE_MIN && left > Duration::from_secs(290),
        "{left:?}"
    );
    let err = within(5, client.clone().oneshot(get(&p.url("/b"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(delivery(&*err), Delivery::NotSent);
}

#[tokio::test]
async fn wire28_x_ratelimit_reset_in_year_9999_is_capped() {
    let p = first_then(
        1,
        limited(
            "x-ratelimit-remaining: 0\r\nx-ratelimit-reset: 253402300799\r\n",
            "200 OK",
        ),
        OK,
    )
    .await;
    let (client, handle) = client_with_handle();
    let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let left = handle.pause(&p.authority()).expect("not paused");
    assert!(left <= FIVE_MIN, "{left:?}");
}

#[tokio::test]
async fn wire28_x_ratelimit_reset_negative_or_garbage_does_not_hold_calls() {
    for reset in [
        "-100",
        "1e99",
        "NaN",
        "\u{00e9}t\u{00e9}",
        "18446744073709551616",
    ] {
        let p = first_then(
            1,
            limited(
                &format!("x-ratelimit-remaining: 0\r\nx-ratelimit-reset: {reset}\r\n"),
                "200 OK",
            ),
            OK,
        )
        .await;
        let (client, handle) = client_with_handle();
        within(5, client.clone().oneshot(get(&p.url("/a"))))
            .await
            .unwrap();
        let left = handle.pause(&p.authority()).unwrap_or_default();
        assert!(left <= FIVE_MIN, "{reset}: {left:?}");
        if left < Duration::from_secs(1) {
            let res = within(5, client.clone().oneshot(get(&p.url("/b"))))
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{reset}");
        }
    }
}

#[tokio::test]
async fn wire28_200kb_of_ratelimit_garbage_is_read_quickly() {
    let mut value = String::from("ratelimit: ");
    let mut rng = Seeded::new(28);
    let alphabet = b";,=\"t r0123456789abcdef";
    for _ in 0..200_000 {
        value.push(alphabet[rng.below(alphabet.len() as u64) as usize] as char);
    }
    value += "\r\n";
    let p = first_then(1, limited(&value, "200 OK"), OK).await;
    let (client, handle) = client_with_handle();
    let start = Instant::now();
    let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        start.elapsed() < Duration::from_millis(1000),
        "{:?}",
        start.elapsed()
    );
    assert!(handle.pause(&p.authority()).unwrap_or_default() <= FIVE_MIN);
}

#[tokio::test]
async fn wire28_many_contradicting_x_ratelimit_headers_stay_capped() {
    let mut headers = String::new();
    for i in 0..2000u64 {
        headers += &format!(
            "x-ratelimit-remaining: {}\r\nx-ratelimit-reset: {}\r\n",
            i % 3,
            i * 7_919_000_000
        );
    }
    let p = first_then(1, limited(&headers, "429 Too Many Requests"), OK).await;
    let (client, handle) = client_with_handle();
    let start = Instant::now();
    let _ = within(5, client.clone().oneshot(get(&p.url("/a")))).await;
    assert!(start.elapsed() < Duration::from_millis(1500));
    assert!(handle.pause(&p.authority()).unwrap_or_default() <= FIVE_MIN);
}

#[tokio::test]
async fn wire28_small_retry_after_on_503_is_slept_and_the_call_succeeds() {
    let p = first_then(
        1,
        limited("retry-after: 0\r\n", "503 Service Unavailable"),
        OK,
    )
    .await;
    let res = within(5, client(T).oneshot(post(&p.url("/orders"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let keys = p.seen.header_values("idempotency-key");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1]);
}

#[tokio::test]
async fn wire28_429_with_retry_after_on_a_post_without_key() {
    // A 429 says the server refused the call before processing it; a POST without a key is
    // still not resent by the retry layer (only a refused connection, an open breaker or a
    // local limit prove that). The caller learns the wait.
    let p = first_then(
        usize::MAX,
        limited("retry-after: 1\r\n", "429 Too Many Requests"),
        OK,
    )
    .await;
    let start = Instant::now();
    let out = within(5, client_without_keys(T).oneshot(post(&p.url("/pay")))).await;
    assert!(start.elapsed() < Duration::from_millis(500));
    assert_eq!(p.seen.requests(), 1);
    match out {
        Ok(res) => assert_eq!(res.status(), 429),
        Err(err) => assert_eq!(
            sturdy::core::find::<RateLimited>(&*err).map(|r| r.retry_after().as_secs()),
            Some(1),
            "{err}"
        ),
    }
}

#[tokio::test]
async fn wire28_breaker_does_not_count_hostile_429s() {
    let p = first_then(
        usize::MAX,
        limited("retry-after: abc\r\n", "429 Too Many Requests"),
        OK,
    )
    .await;
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_circuit_breaker(breaker)
        .with_attempt_timeout(T)
        .build(hyper_client());
    for _ in 0..3 {
        let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
            .await
            .unwrap();
        assert_eq!(res.status(), 429);
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(p.seen.requests(), 12);
    let state = format!("{:?}", handle.state(&p.authority()));
    assert!(state.contains("Closed"), "{state}");
}
