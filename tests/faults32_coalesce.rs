//! Coalescing (`sturdy-coalesce`, docs/guides/coalesce.md) on the wire: never a response shared
//! across credentials or bodies, a cancelled leader does not fail or hang its followers, stalls
//! and resets shared as documented.
use crate::faults32_util::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::{CoalesceHandle, CoalesceLayer, SharedError};
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use sturdy::ClientBuilder;
use tower::{ServiceBuilder, ServiceExt};

/// Answers after `ms` with the request's credentials headers and body echoed.
async fn echo_server(ms: u64) -> Raw {
    raw(Opts::default(), move |s| {
        let echo = format!(
            "auth={:?} key={:?} cookie={:?} body={}",
            s.header("authorization"),
            s.headers
                .iter()
                .filter(|(n, _)| n == "x-api-key")
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>(),
            s.header("cookie"),
            String::from_utf8_lossy(&s.body)
        );
        ok_after(ms, &echo)
    })
    .await
}

fn with_headers(url: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(url);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Full::default()).unwrap()
}

async fn body_text<B>(res: http::Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

fn in_flight(h: &CoalesceHandle, raw: &Raw) -> usize {
    h.in_flight(&raw.addr.ip().to_string()) + h.in_flight(&raw.addr.to_string())
}

#[tokio::test]
async fn callers_with_different_credentials_never_share_a_response() {
    let raw = echo_server(200).await;
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let url = raw.url("/me");
    let variants: Vec<Vec<(&str, &str)>> = vec![
        vec![("authorization", "Bearer alice")],
        vec![("authorization", "Bearer alice")],
        vec![("authorization", "Bearer bob")],
        vec![("authorization", "bearer alice")],
        vec![("x-api-key", "k1")],
        vec![("x-api-key", "k2")],
        vec![("x-api-key", "k1"), ("x-api-key", "k2")],
        vec![("x-api-key", "k2"), ("x-api-key", "k1")],
        vec![("cookie", "sid=1")],
        vec![("cookie", "sid=2")],
        vec![],
    ];
    let calls: Vec<_> = variants
        .iter()
        .map(|h| svc.clone().oneshot(with_headers(&url, h)))
        .collect();
    let results = futures_util::future::join_all(calls).await;
    for (h, r) in variants.iter().zip(results) {
        let body = body_text(r.unwrap()).await;
        let auth = h
            .iter()
            .find(|(n, _)| *n == "authorization")
            .map(|(_, v)| *v);
        let keys: Vec<&str> = h
            .iter()
            .filter(|(n, _)| *n == "x-api-key")
            .map(|(_, v)| *v)
            .collect();
        let cookie = h.iter().find(|(n, _)| *n == "cookie").map(|(_, v)| *v);
        let want = format!("auth={auth:?} key={keys:?} cookie={cookie:?} body=");
        assert_eq!(body, want, "a caller got another caller's response");
    }
    // Only the two identical "Bearer alice" requests shared.
    assert_eq!(raw.count_path("/me"), variants.len() - 1);
    assert_eq!(handle.stats().joined(), 1);
}

#[tokio::test]
async fn gets_with_different_bodies_are_never_shared() {
    let raw = echo_server(150).await;
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let url = raw.url("/search");
    let mk = |b: &'static str| Request::get(&url).body(Full::from(b)).unwrap();
    let rs = futures_util::future::join_all([
        svc.clone().oneshot(mk("q=1")),
        svc.clone().oneshot(mk("q=2")),
        svc.clone().oneshot(mk("q=1")),
    ])
    .await;
    let mut bodies = Vec::new();
    for r in rs {
        bodies.push(body_text(r.unwrap()).await);
    }
    assert!(
        bodies[0].ends_with("body=q=1")
            && bodies[1].ends_with("body=q=2")
            && bodies[2].ends_with("body=q=1"),
        "{bodies:?}"
    );
    assert_eq!(
        raw.count_path("/search"),
        3,
        "a GET with a body passes through"
    );
    assert_eq!(handle.stats().joined(), 0);
}

#[tokio::test]
async fn a_cancelled_leader_does_not_fail_or_hang_its_followers() {
    let raw = echo_server(300).await;
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let url = raw.url("/shared");
    let s = svc.clone();
    let u = url.clone();
    let leader = tokio::spawn(async move { s.oneshot(get(&u)).await });
    until("leader on the wire", || raw.seen().len() == 1).await;
    let followers: Vec<_> = (0..5)
        .map(|_| {
            let s = svc.clone();
            let u = url.clone();
            tokio::spawn(async move { s.oneshot(get(&u)).await.map(|_| ()) })
        })
        .collect();
    until("followers joined", || handle.stats().joined() == 5).await;
    leader.abort();
    for f in followers {
        bounded(Duration::from_secs(5), "follower", f)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(raw.count_path("/shared"), 1, "the shared call went on");
    assert_eq!(raw.client_closed(), 0, "the shared call was not cancelled");
}

#[tokio::test]
async fn when_every_caller_leaves_the_call_is_cancelled_and_forgotten() {
    let raw = raw(Opts::default(), |s| match s.path.as_str() {
        "/stall-head" => Act::StallHeaders,
        _ => ok_after(0, "fresh"),
    })
    .await;
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let url = raw.url("/stall-head");
    let calls: Vec<_> = (0..4)
        .map(|i| {
            tokio::time::timeout(
                Duration::from_millis(100 + 30 * i),
                svc.clone().oneshot(get(&url)),
            )
        })
        .collect();
    for r in futures_util::future::join_all(calls).await {
        assert!(r.is_err(), "every caller timed out");
    }
    until("the upstream connection closed", || {
        raw.client_closed() == 1
    })
    .await;
    assert_eq!(in_flight(&handle, &raw), 0, "the call left the table");
    assert_eq!(raw.count_path("/stall-head"), 1);
}

#[tokio::test]
async fn a_stalled_shared_body_times_out_for_every_caller() {
    let raw = raw(Opts::default(), |_| Act::StallBody {
        declared: 100,
        sent: 10,
    })
    .await;
    let (layer, _handle) = CoalesceLayer::new()
        .with_body_timeout(Duration::from_millis(200))
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let url = raw.url("/half");
    let calls: Vec<_> = (0..5).map(|_| svc.clone().oneshot(get(&url))).collect();
    let rs = bounded(
        Duration::from_secs(5),
        "stalled body",
        futures_util::future::join_all(calls),
    )
    .await;
    for r in rs {
        let err = r.unwrap_err();
        let e = sturdy::core::find::<sturdy::core::Error>(&*err)
            .unwrap_or_else(|| panic!("{}", chain(&*err)));
        assert_eq!(*e.kind(), ErrorKind::Timeout, "{}", chain(&*err));
        assert!(
            err.to_string().contains("did not arrive within 200ms"),
            "names the cause: {}",
            chain(&*err)
        );
        assert_eq!(
            delivery(&*err),
            Delivery::MaybeProcessed,
            "the server answered a head"
        );
    }
    assert_eq!(raw.count_path("/half"), 1);
    until("the stalled connection closed", || raw.client_closed() == 1).await;
}

#[tokio::test]
async fn a_reset_after_read_is_shared_with_its_cause_and_delivery() {
    let raw = raw(Opts::default(), |_| {
        Act::ResetAfterRead(Duration::from_millis(150))
    })
    .await;
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let url = raw.url("/reset");
    let calls: Vec<_> = (0..4).map(|_| svc.clone().oneshot(get(&url))).collect();
    let rs = bounded(
        Duration::from_secs(5),
        "reset",
        futures_util::future::join_all(calls),
    )
    .await;
    assert_eq!(raw.count_path("/reset"), 1);
    assert_eq!(handle.stats().joined(), 3);
    let mut shared = 0;
    for r in rs {
        let err: BoxError = r.unwrap_err();
        assert_eq!(
            delivery(&*err),
            Delivery::MaybeProcessed,
            "{}",
            chain(&*err)
        );
        if sturdy::core::find::<SharedError>(&*err).is_some() {
            shared += 1;
            let msg = err.to_string();
            assert!(
                msg.starts_with("the call shared by identical requests in flight failed: "),
                "{msg}"
            );
            assert!(
                !msg.ends_with("client error (SendRequest)"),
                "the message names a cause: {msg}"
            );
            assert!(
                sturdy::core::find::<hyper::Error>(&*err).is_some(),
                "{}",
                chain(&*err)
            );
            assert_eq!(
                sturdy::core::classify::classify_error(&*err),
                ErrorKind::Transport
            );
        }
    }
    assert!(shared >= 3, "the joiners got a shared error");
}

#[tokio::test]
async fn a_body_above_the_bound_streams_to_the_leader_and_others_send_their_own() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let raw = raw(Opts::default(), move |_| {
        n2.fetch_add(1, Ordering::SeqCst);
        Act::Drip {
            body: b"0123456789abcdefghij".to_vec(),
            every: Duration::from_millis(10),
        }
    })
    .await;
    let (layer, handle) = CoalesceLayer::new().with_max_body(8).pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let url = raw.url("/big");
    let calls: Vec<_> = (0..4).map(|_| svc.clone().oneshot(get(&url))).collect();
    let rs = bounded(
        Duration::from_secs(10),
        "big",
        futures_util::future::join_all(calls),
    )
    .await;
    for r in rs {
        assert_eq!(body_text(r.unwrap()).await, "0123456789abcdefghij");
    }
    assert_eq!(
        n.load(Ordering::SeqCst),
        4,
        "the leader's and one per other caller"
    );
    assert!(handle.stats().too_large() >= 1);
}

#[tokio::test]
async fn zero_max_body_and_unbounded_body_timeout_still_answer() {
    let raw = raw(Opts::default(), |_| Act::Drip {
        body: b"abc".to_vec(),
        every: Duration::from_millis(20),
    })
    .await;
    for layer in [
        CoalesceLayer::new().with_max_body(0),
        CoalesceLayer::new().with_body_timeout(Duration::MAX),
        CoalesceLayer::new()
            .with_body_timeout(Duration::ZERO)
            .with_max_body(usize::MAX),
        CoalesceLayer::new().with_max_hosts(0),
    ] {
        let svc = ServiceBuilder::new().layer(layer).service(http());
        let url = raw.url("/d");
        let calls: Vec<_> = (0..3).map(|_| svc.clone().oneshot(get(&url))).collect();
        for r in bounded(
            Duration::from_secs(5),
            "hostile",
            futures_util::future::join_all(calls),
        )
        .await
        {
            match r {
                Ok(res) => assert_eq!(body_text(res).await, "abc"),
                // A zero body timeout may fail the shared read; it must say so.
                Err(e) => {
                    let k = sturdy::core::classify::classify_error(&*e);
                    assert_eq!(k, ErrorKind::Timeout, "{}", chain(&*e));
                }
            }
        }
    }
}

#[tokio::test]
async fn client_builder_shares_one_retried_outcome_after_a_reset() {
    // The first request is reset after it was read; the shared GET is retried once, for all.
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let raw = raw(Opts::default(), move |_| {
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            Act::ResetAfterRead(Duration::from_millis(100))
        } else {
            ok_after(50, "second")
        }
    })
    .await;
    let client = ClientBuilder::new()
        .with_coalesce(CoalesceLayer::new())
        .with_attempt_timeout(Duration::from_secs(5))
        .build(http());
    let url = raw.url("/r");
    let calls: Vec<_> = (0..20).map(|_| client.clone().oneshot(get(&url))).collect();
    let rs = bounded(
        Duration::from_secs(10),
        "retried",
        futures_util::future::join_all(calls),
    )
    .await;
    for r in rs {
        let res = r.unwrap_or_else(|e| panic!("{}", chain(&*e)));
        assert_eq!(body_text(res).await, "second");
    }
    assert_eq!(
        raw.count_path("/r"),
        2,
        "one failed request, one retry, for twenty callers"
    );
}

#[tokio::test]
async fn idle_keepalive_closed_by_server_between_shared_calls() {
    // The server closes keep-alive connections idle for 20 ms; bursts 50 ms apart each share
    // one call on a fresh or stale pooled connection: every caller gets the answer.
    let raw = raw(
        Opts {
            idle_close: Some(Duration::from_millis(20)),
            ..Opts::default()
        },
        |_| ok_after(30, "ok"),
    )
    .await;
    let client = ClientBuilder::new()
        .with_coalesce(CoalesceLayer::new())
        .with_attempt_timeout(Duration::from_secs(5))
        .build(http());
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let url = raw.url(&format!("/k{round}"));
        let calls: Vec<_> = (0..10).map(|_| client.clone().oneshot(get(&url))).collect();
        for r in futures_util::future::join_all(calls).await {
            let res = r.unwrap_or_else(|e| panic!("round {round}: {}", chain(&*e)));
            assert_eq!(body_text(res).await, "ok");
        }
    }
}
