//! Outside tests of the rate limiter's server-asked pauses, against docs/guides/ratelimit.md and
//! the rustdoc of `RateLimitLayer` and `RateLimitHandle`. Paused time, in-process services.
#![cfg(feature = "full")]

use crate::outsider4_common;
use std::time::Duration;

use outsider4_common::*;
use sturdy::core::{find, RateLimited};
use sturdy::ratelimit::{RateLimitHandle, RateLimitLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const KEY: &str = "api.example.com";

fn url(path: &str) -> String {
    format!("http://{KEY}{path}")
}

/// The limiter alone over `api`, with its handle.
fn limited(
    api: &Api,
    layer: RateLimitLayer,
) -> (
    impl Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = sturdy::core::BoxError,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    RateLimitHandle,
) {
    let (layer, handle) = layer.pair();
    (layer.layer(api.service()), handle)
}

/// Calls `svc` for `path` and returns the status and how long the call took.
async fn timed<S>(svc: &S, path: &str) -> (u16, Duration)
where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = sturdy::core::BoxError,
        > + Clone,
{
    let t = Instant::now();
    let res = bounded(svc.clone().oneshot(get(&url(path)))).await;
    let res = res.unwrap_or_else(|e| panic!("{path}: {}", chain(&*e)));
    (res.status().as_u16(), t.elapsed())
}

// ------------------------------------------------------------------ after a pause ends

/// "a 429 or 503 with `Retry-After` ... pause every caller of the host"; "The pause ends by
/// itself": once it has ended, calls go through at once, one after another and many at once,
/// and no pace was learned (a `Retry-After` "sets a pause, not a pace").
#[tokio::test(start_paused = true)]
async fn after_a_pause_ends_calls_go_at_once() {
    for first in [429, 503] {
        let api = Api::new(move |n, _| {
            if n == 0 {
                st_h(first, &[("retry-after", "2")])
            } else {
                st(200)
            }
        });
        let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
        assert_eq!(timed(&svc, "/p").await, (first, Duration::ZERO));
        assert_eq!(handle.pause(KEY), Some(secs(2)), "{first}");
        tokio::time::sleep(secs(2)).await;
        assert_eq!(handle.pause(KEY), None, "{first}");
        for i in 0..5 {
            assert_eq!(
                timed(&svc, "/x").await,
                (200, Duration::ZERO),
                "{first}: call {i}"
            );
        }
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let s = svc.clone();
            tasks.push(tokio::spawn(async move { timed(&s, "/y").await }));
        }
        for task in tasks {
            assert_eq!(bounded(task).await.unwrap().0, 200);
        }
        assert_eq!(t.elapsed(), Duration::ZERO, "{first}");
        assert_eq!(handle.learned_pace(KEY), None, "{first}");
        assert_eq!(api.calls(), 26);
    }
}

/// A pause, its end, and a new pause: the new one applies in full. Five rounds, and both
/// statuses, so a limiter that remembers an ended pause badly shows it.
#[tokio::test(start_paused = true)]
async fn a_new_pause_after_an_old_one_ended_applies_in_full() {
    // Calls alternate: a pause asked, then a success.
    let api = Api::new(|n, _| {
        if n % 2 == 0 {
            let status = if n % 4 == 0 { 429 } else { 503 };
            st_h(status, &[("retry-after", "3")])
        } else {
            st(200)
        }
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    for round in 0..5 {
        let (status, took) = timed(&svc, "/p").await;
        assert!(status == 429 || status == 503);
        assert_eq!(took, Duration::ZERO, "round {round}: the pause had ended");
        assert_eq!(handle.pause(KEY), Some(secs(3)), "round {round}");
        let (status, took) = timed(&svc, "/x").await;
        assert_eq!(status, 200);
        assert_eq!(took, secs(3), "round {round}: waited the whole new pause");
        // Some time passes with no call at all.
        tokio::time::sleep(secs(1)).await;
    }
}

/// The new pause comes from a call sent before the old pause began, and arrives after the old
/// pause ended with no call in between: it still applies in full.
#[tokio::test(start_paused = true)]
async fn a_new_pause_arriving_after_the_old_one_ended_with_no_call_between() {
    let api = Api::new(|_, req| match req.uri().path() {
        "/p" => st_h(429, &[("retry-after", "2")]),
        "/slow" => late(secs(3), 503, &[("retry-after", "5")]),
        _ => st(200),
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    let t0 = Instant::now();
    let s = svc.clone();
    let slow = tokio::spawn(async move { timed(&s, "/slow").await });
    tokio::task::yield_now().await;
    assert_eq!(timed(&svc, "/p").await.0, 429);
    assert_eq!(handle.pause(KEY), Some(secs(2)));
    let (status, took) = bounded(slow).await.unwrap();
    assert_eq!((status, took), (503, secs(3)));
    assert_eq!(t0.elapsed(), secs(3));
    assert_eq!(handle.pause(KEY), Some(secs(5)), "the 503's pause, in full");
    assert_eq!(timed(&svc, "/x").await, (200, secs(5)));
}

/// "A later, shorter reset never cuts a pause short."
#[tokio::test(start_paused = true)]
async fn a_shorter_reset_never_cuts_a_pause_short() {
    let api = Api::new(|_, req| match req.uri().path() {
        "/p" => st_h(429, &[("retry-after", "10")]),
        "/slow" => late(secs(1), 429, &[("retry-after", "2")]),
        _ => st(200),
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    let s = svc.clone();
    let slow = tokio::spawn(async move { timed(&s, "/slow").await });
    tokio::task::yield_now().await;
    assert_eq!(timed(&svc, "/p").await.0, 429);
    assert_eq!(bounded(slow).await.unwrap().0, 429);
    assert_eq!(handle.pause(KEY), Some(secs(9)));
    assert_eq!(timed(&svc, "/x").await, (200, secs(9)));
}

// ------------------------------------------------------------------ a pause asked while calls wait

/// Calls wait for a 2 s pause; 1 s in, an answer to a call sent earlier asks for 10 s: the
/// waiting calls wait for the new pause (they are not released at 2 s).
#[tokio::test(start_paused = true)]
async fn a_pause_asked_while_calls_wait_holds_them() {
    let api = Api::new(|_, req| match req.uri().path() {
        "/p" => st_h(429, &[("retry-after", "2")]),
        "/slow" => late(secs(1), 429, &[("retry-after", "10")]),
        _ => st(200),
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    let t0 = Instant::now();
    let s = svc.clone();
    let slow = tokio::spawn(async move { timed(&s, "/slow").await });
    tokio::task::yield_now().await;
    assert_eq!(timed(&svc, "/p").await.0, 429);
    tokio::time::sleep(ms(500)).await;
    let mut waiters = Vec::new();
    for i in 0..3 {
        let s = svc.clone();
        waiters.push(tokio::spawn(
            async move { timed(&s, &format!("/w{i}")).await },
        ));
    }
    tokio::task::yield_now().await;
    assert_eq!(handle.waiting(KEY), 3);
    assert_eq!(bounded(slow).await.unwrap().0, 429);
    assert_eq!(t0.elapsed(), secs(1));
    assert_eq!(handle.pause(KEY), Some(secs(10)));
    for w in waiters {
        let (status, _) = bounded(w).await.unwrap();
        assert_eq!(status, 200);
    }
    for s in api.seen().iter().filter(|s| s.uri.contains("/w")) {
        assert!(
            s.sent - t0 >= secs(11),
            "{} sent at {:?}, inside the new pause",
            s.uri,
            s.sent - t0
        );
    }
}

/// "calls already waiting in line are told as soon as such a pause arrives" (one whose wait
/// would exceed their `max_wait`).
#[tokio::test(start_paused = true)]
async fn waiting_calls_are_told_at_once_when_a_pause_exceeds_their_max_wait() {
    let api = Api::new(|_, req| match req.uri().path() {
        "/p" => st_h(429, &[("retry-after", "2")]),
        "/slow" => late(secs(1), 429, &[("retry-after", "10")]),
        _ => st(200),
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only().with_max_wait(secs(5)));
    let t0 = Instant::now();
    let s = svc.clone();
    let slow = tokio::spawn(async move { timed(&s, "/slow").await });
    tokio::task::yield_now().await;
    assert_eq!(timed(&svc, "/p").await.0, 429);
    tokio::time::sleep(ms(500)).await;
    let mut waiters = Vec::new();
    for i in 0..3 {
        let s = svc.clone();
        waiters.push(tokio::spawn(async move {
            let r = s.oneshot(get(&url(&format!("/w{i}")))).await;
            (r.map(|res| res.status()), Instant::now())
        }));
    }
    tokio::task::yield_now().await;
    assert_eq!(handle.waiting(KEY), 3);
    assert_eq!(bounded(slow).await.unwrap().0, 429);
    for w in waiters {
        let (r, at) = bounded(w).await.unwrap();
        let err = r.expect_err("a 10 s pause exceeds the 5 s max_wait");
        assert_eq!(at - t0, secs(1), "told when the pause arrived: {err}");
        let rl = find::<RateLimited>(&*err).expect("RateLimited in the chain");
        assert_eq!(rl.retry_after(), secs(10), "{err}");
    }
    assert_eq!(api.calls(), 2);
}

// ------------------------------------------------------------------ clear_pause

/// `clear_pause`: "Ends the pause of `key` now and returns the time it had left"; waiting calls
/// then leave.
#[tokio::test(start_paused = true)]
async fn clear_pause_releases_the_waiting_calls() {
    let api = Api::new(|n, _| {
        if n == 0 {
            st_h(429, &[("retry-after", "20")])
        } else {
            st(200)
        }
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    assert_eq!(handle.clear_pause(KEY), None, "not paused yet");
    let t0 = Instant::now();
    assert_eq!(timed(&svc, "/p").await.0, 429);
    let mut waiters = Vec::new();
    for i in 0..4 {
        let s = svc.clone();
        waiters.push(tokio::spawn(
            async move { timed(&s, &format!("/w{i}")).await },
        ));
    }
    tokio::time::sleep(secs(5)).await;
    assert_eq!(handle.waiting(KEY), 4);
    assert_eq!(handle.paused(), vec![(KEY.to_owned(), secs(15))]);
    assert_eq!(handle.clear_pause(KEY), Some(secs(15)));
    assert_eq!(handle.pause(KEY), None);
    for w in waiters {
        assert_eq!(bounded(w).await.unwrap().0, 200);
    }
    assert_eq!(t0.elapsed(), secs(5));
    assert_eq!(timed(&svc, "/x").await, (200, Duration::ZERO));
}

/// A new pause after `clear_pause` applies in full.
#[tokio::test(start_paused = true)]
async fn a_pause_after_clear_pause_applies_in_full() {
    let api = Api::new(|_, req| match req.uri().path() {
        "/p" => st_h(429, &[("retry-after", "4")]),
        _ => st(200),
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    for round in 0..3 {
        assert_eq!(timed(&svc, "/p").await.0, 429);
        assert_eq!(handle.clear_pause(KEY), Some(secs(4)), "round {round}");
        assert_eq!(
            timed(&svc, "/x").await,
            (200, Duration::ZERO),
            "round {round}"
        );
        assert_eq!(timed(&svc, "/p").await.0, 429);
        assert_eq!(timed(&svc, "/x").await, (200, secs(4)), "round {round}");
    }
}

// ------------------------------------------------------------------ a pace from bare 429s

/// "the first bare 429 of a pause sets a pace of one call per eighth of the pause (125 ms after
/// the default 1 s pause)"; "every other answer (not 429 or 503) makes the pace a sixteenth
/// faster"; "under one call per millisecond it is forgotten, and the key runs free again";
/// `clear_pause` "forgets it".
#[tokio::test(start_paused = true)]
async fn a_bare_429_teaches_a_pace_that_successes_wear_off() {
    let api = Api::new(|n, _| if n == 0 { st(429) } else { st(200) });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    assert_eq!(timed(&svc, "/p").await.0, 429);
    assert_eq!(handle.pause(KEY), Some(secs(1)));
    assert_eq!(handle.learned_pace(KEY), Some(ms(125)));

    // The first call waits out the pause, the next one takes its slot at the pace.
    assert_eq!(timed(&svc, "/a").await, (200, secs(1)));
    let after_one = handle.learned_pace(KEY).expect("still a pace");
    assert!(
        after_one < ms(125) && after_one > ms(110),
        "a sixteenth faster: {after_one:?}"
    );
    let (status, took) = timed(&svc, "/b").await;
    assert_eq!(status, 200);
    assert!(
        took > ms(100) && took <= ms(125),
        "the second call waited its slot: {took:?}"
    );

    // Enough successes and the pace is forgotten.
    for _ in 0..200 {
        timed(&svc, "/c").await;
        if handle.learned_pace(KEY).is_none() {
            break;
        }
    }
    assert_eq!(handle.learned_pace(KEY), None, "forgotten under 1 ms");
    assert_eq!(timed(&svc, "/d").await, (200, Duration::ZERO));
}

/// "a bare 429 to a call sent at that pace halves the rate ... and pauses the key for one
/// interval of the new pace only".
#[tokio::test(start_paused = true)]
async fn a_bare_429_at_the_pace_halves_it() {
    let api = Api::new(|n, _| if n <= 1 { st(429) } else { st(200) });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    assert_eq!(timed(&svc, "/p").await.0, 429);
    assert_eq!(handle.learned_pace(KEY), Some(ms(125)));
    // Released at the end of the pause, answered with a bare 429 again.
    assert_eq!(timed(&svc, "/a").await, (429, secs(1)));
    assert_eq!(handle.learned_pace(KEY), Some(ms(250)));
    let left = handle.pause(KEY).unwrap_or_default();
    assert!(left <= ms(250), "one interval of the new pace: {left:?}");
    let (status, took) = timed(&svc, "/b").await;
    assert_eq!(status, 200);
    assert!(took <= ms(250), "{took:?}");
    handle.clear_pause(KEY);
    assert_eq!(
        handle.learned_pace(KEY),
        None,
        "clear_pause forgets the pace"
    );
}

/// "bare 429s that answer calls in flight when a pause began change nothing (neither the pace
/// nor the pause's end)".
#[tokio::test(start_paused = true)]
async fn bare_429s_to_calls_in_flight_change_nothing() {
    let api = Api::new(|_, req| match req.uri().path() {
        "/a" => late(ms(10), 429, &[]),
        "/b" => late(ms(200), 429, &[]),
        _ => st(200),
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    let t0 = Instant::now();
    let (s1, s2) = (svc.clone(), svc.clone());
    let a = tokio::spawn(async move { timed(&s1, "/a").await });
    let b = tokio::spawn(async move { timed(&s2, "/b").await });
    assert_eq!(bounded(a).await.unwrap().0, 429);
    assert_eq!(handle.learned_pace(KEY), Some(ms(125)));
    assert_eq!(bounded(b).await.unwrap().0, 429);
    assert_eq!(t0.elapsed(), ms(200));
    assert_eq!(handle.learned_pace(KEY), Some(ms(125)));
    assert_eq!(
        handle.pause(KEY),
        Some(ms(810)),
        "still ends 1 s after the first"
    );
}

// ------------------------------------------------------------------ in the client, kept clones

/// In `ClientBuilder` (the default adaptive limiter, as a pair): one kept clone meets a 429 with
/// `Retry-After: 2`; another kept clone's call made meanwhile waits for the pause; after it,
/// calls from every clone go at once.
#[tokio::test(start_paused = true)]
async fn client_clones_share_the_pause() {
    let api = Api::new(|n, _| {
        if n == 0 {
            st_h(429, &[("retry-after", "2")])
        } else {
            st(200)
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_rate_limit(layer)
        .build(api.service());
    let mut one = client.clone();
    let mut two = client.clone();
    let res = bounded(one.ready().await.unwrap().call(get(&url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(handle.pause(KEY), Some(secs(2)));
    let t = Instant::now();
    let res = bounded(two.ready().await.unwrap().call(get(&url("/b"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(t.elapsed(), secs(2));
    for kept in [&mut one, &mut two] {
        for _ in 0..3 {
            let t = Instant::now();
            let res = bounded(kept.ready().await.unwrap().call(get(&url("/c"))))
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(t.elapsed(), Duration::ZERO);
        }
    }
}

// ------------------------------------------------------------------ the line after a pause

/// `with_release_pace`: "The first leaves when the pause ends, the next one `pace` later, and
/// so on, in the order they came ... Calls made while others wait line up behind them."
#[tokio::test(start_paused = true)]
async fn release_pace_a_call_made_while_others_wait_lines_up_behind_them() {
    let api = Api::new(|n, _| {
        if n == 0 {
            st_h(429, &[("retry-after", "2")])
        } else {
            st(200)
        }
    });
    let (svc, handle) = limited(
        &api,
        RateLimitLayer::adaptive_only().with_release_pace(ms(100)),
    );
    let t0 = Instant::now();
    assert_eq!(timed(&svc, "/p").await.0, 429);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let s = svc.clone();
        tasks.push(tokio::spawn(
            async move { timed(&s, &format!("/w{i}")).await },
        ));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(ms(2_050)).await;
    assert_eq!(handle.waiting(KEY), 3, "one left at 2 s");
    let s = svc.clone();
    let late = tokio::spawn(async move { timed(&s, "/late").await });
    for t in tasks {
        assert_eq!(bounded(t).await.unwrap().0, 200);
    }
    assert_eq!(bounded(late).await.unwrap().0, 200);
    let sent: Vec<(String, Duration)> = api
        .seen()
        .iter()
        .map(|s| (s.uri.clone(), s.sent - t0))
        .collect();
    let at = |p: &str| sent.iter().find(|(u, _)| u.ends_with(p)).unwrap().1;
    assert_eq!(at("/w0"), secs(2), "{sent:?}");
    assert_eq!(at("/w3"), ms(2_300), "{sent:?}");
    assert!(
        at("/late") >= ms(2_400),
        "the late call jumped the line: {sent:?}"
    );
}

/// By slow start (the default): one waiting call leaves when the pause ends and each success
/// lets one more out. A call made after the pause ended, while calls that waited for it are
/// still in line, does not go before them ("A call without a slot joins the host's line (first
/// come, first served)"; the release "holds back those still waiting ..., and calls made
/// meanwhile line up behind them").
#[tokio::test(start_paused = true)]
async fn slow_start_a_call_made_while_others_wait_does_not_jump_the_line() {
    let api = Api::new(|n, req| {
        if n == 0 {
            st_h(429, &[("retry-after", "2")])
        } else if req.uri().path().starts_with("/w") {
            Act::After(ms(500), 200)
        } else {
            st(200)
        }
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    let t0 = Instant::now();
    assert_eq!(timed(&svc, "/p").await.0, 429);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let s = svc.clone();
        tasks.push(tokio::spawn(
            async move { timed(&s, &format!("/w{i}")).await },
        ));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(ms(2_100)).await;
    // w0 left at 2 s and is in flight until 2.5 s; w1..w3 wait.
    assert_eq!(handle.waiting(KEY), 3);
    let s = svc.clone();
    let late = tokio::spawn(async move { timed(&s, "/late").await });
    for t in tasks {
        assert_eq!(bounded(t).await.unwrap().0, 200);
    }
    assert_eq!(bounded(late).await.unwrap().0, 200);
    let sent: Vec<(String, Duration)> = api
        .seen()
        .iter()
        .map(|s| (s.uri.clone(), s.sent - t0))
        .collect();
    let at = |p: &str| sent.iter().find(|(u, _)| u.ends_with(p)).unwrap().1;
    assert_eq!(at("/w0"), secs(2), "{sent:?}");
    assert!(
        at("/late") >= at("/w1"),
        "the call made at 2.1 s went before the ones waiting since 0 s: {sent:?}"
    );
}

// ------------------------------------------------------------------ forgotten keys

/// `with_max_keys`: "past it, idle keys are forgotten, then new keys share one". A kept clone
/// that called host A before A's limiter was forgotten must still share A's pause with the
/// handle and the other clones ("these pause every caller of the host").
#[tokio::test(start_paused = true)]
async fn a_kept_clone_after_its_hosts_limiter_was_forgotten() {
    let api = Api::new(|_, req| {
        if req.uri().path() == "/p" {
            st_h(429, &[("retry-after", "10")])
        } else {
            st(200)
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().with_max_keys(2).pair();
    let svc = layer.layer(api.service());
    let mut keeper = svc.clone();
    let mut other = svc.clone();
    let a = |p: &str| get(&format!("http://{KEY}{p}"));
    assert_eq!(
        keeper
            .ready()
            .await
            .unwrap()
            .call(a("/x"))
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(secs(5)).await;
    for host in [
        "b.example.com",
        "c.example.com",
        "d.example.com",
        "e.example.com",
    ] {
        let res = other
            .ready()
            .await
            .unwrap()
            .call(get(&format!("http://{host}/x")))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        tokio::time::sleep(secs(5)).await;
    }
    // The keeper meets a 10 s pause on A.
    let res = keeper.ready().await.unwrap().call(a("/p")).await.unwrap();
    assert_eq!(res.status(), 429);
    let seen_by_handle = handle.pause(KEY);
    let t = Instant::now();
    let res = bounded(other.ready().await.unwrap().call(a("/y"))).await;
    let other_waited = t.elapsed();
    assert_eq!(res.unwrap().status(), 200);
    let t = Instant::now();
    bounded(svc.clone().oneshot(a("/z"))).await.unwrap();
    let fresh_waited = t.elapsed();
    assert!(
        seen_by_handle == Some(secs(10)) && other_waited == secs(10),
        "the keeper's pause on A: handle {seen_by_handle:?}, another kept clone waited \
         {other_waited:?}, a fresh clone {fresh_waited:?}"
    );
}

// ------------------------------------------------------------------ quota arithmetic

/// A quota whose interval is not a whole number of milliseconds: 3 per second, burst 1, paces
/// calls 333.33 ms apart (10 calls in 3 s; tokio's timer wakes on whole milliseconds, so up to
/// a millisecond late per call, never early).
#[tokio::test(start_paused = true)]
async fn a_quota_of_three_per_second_paces_exactly() {
    use sturdy::ratelimit::Quota;
    let api = Api::always(st(200));
    let quota = Quota::new(3, secs(1)).unwrap().with_burst(1).unwrap();
    let (svc, _handle) = limited(&api, RateLimitLayer::new(quota));
    let t0 = Instant::now();
    for _ in 0..10 {
        timed(&svc, "/x").await;
    }
    let took = t0.elapsed();
    assert!(
        took >= ms(2_999) && took <= ms(3_010),
        "9 intervals of 333.33 ms: {took:?}"
    );
}

/// A long quota (1 per day): the second call would wait a day, past `max_wait`, and is refused
/// at once with the wait.
#[tokio::test(start_paused = true)]
async fn a_quota_of_one_per_day_refuses_with_the_wait() {
    use sturdy::ratelimit::Quota;
    let api = Api::always(st(200));
    let quota = Quota::new(1, secs(86_400)).unwrap().with_burst(1).unwrap();
    let (svc, _handle) = limited(&api, RateLimitLayer::new(quota));
    timed(&svc, "/x").await;
    let t0 = Instant::now();
    let err = bounded(svc.clone().oneshot(get(&url("/y"))))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    let rl = find::<RateLimited>(&*err).expect("RateLimited");
    let wait = rl.retry_after();
    assert!(
        wait >= secs(86_399) && wait <= secs(86_400),
        "a day: {wait:?} ({err})"
    );
}

// ------------------------------------------------------------------ the same with a quota

/// With a quota of our own (100/s, burst 10) and with a release pace: after a pause ends a call
/// goes at once, a new pause after it applies in full, and `clear_pause` ends one at once.
#[tokio::test(start_paused = true)]
async fn pauses_with_a_quota_or_a_release_pace() {
    use sturdy::ratelimit::Quota;
    let layers = [
        (
            "quota",
            RateLimitLayer::new(Quota::per_second(100).unwrap().with_burst(10).unwrap()),
        ),
        (
            "release pace",
            RateLimitLayer::adaptive_only().with_release_pace(ms(50)),
        ),
    ];
    for (name, layer) in layers {
        let api = Api::new(|_, req| match req.uri().path() {
            "/p" => st_h(503, &[("retry-after", "2")]),
            _ => st(200),
        });
        let (svc, handle) = limited(&api, layer);
        for round in 0..3 {
            assert_eq!(
                timed(&svc, "/p").await,
                (503, Duration::ZERO),
                "{name} {round}"
            );
            assert_eq!(handle.pause(KEY), Some(secs(2)), "{name} {round}");
            assert_eq!(timed(&svc, "/x").await, (200, secs(2)), "{name} {round}");
            assert_eq!(timed(&svc, "/x").await.1, Duration::ZERO, "{name} {round}");
            tokio::time::sleep(secs(1)).await;
            assert_eq!(timed(&svc, "/p").await.0, 503);
            assert_eq!(handle.clear_pause(KEY), Some(secs(2)), "{name} {round}");
            assert_eq!(
                timed(&svc, "/x").await,
                (200, Duration::ZERO),
                "{name} {round}"
            );
            tokio::time::sleep(secs(1)).await;
        }
    }
}

/// "Every clone, every layer a setter returns, `with_key(..)`, every service they make and every
/// handle share it": a handle taken before `with_key` and `with_max_wait` sees the pause that a
/// service of the returned layer met, and a service of the first layer waits for it.
#[tokio::test(start_paused = true)]
async fn a_handle_taken_before_setters_sees_their_pauses() {
    let api = Api::new(|_, req| match req.uri().path() {
        "/p" => st_h(429, &[("retry-after", "4")]),
        _ => st(200),
    });
    let (first, handle) = RateLimitLayer::adaptive_only().pair();
    let keyed = first
        .clone()
        .with_max_wait(secs(10))
        .with_key(|req: &http::Request<Body>| req.uri().host().unwrap_or_default().to_owned());
    let a = keyed.layer(api.service());
    let b = first.layer(api.service());
    assert_eq!(timed(&a, "/p").await.0, 429);
    assert_eq!(handle.pause(KEY), Some(secs(4)));
    assert_eq!(timed(&b, "/x").await, (200, secs(4)));
}
