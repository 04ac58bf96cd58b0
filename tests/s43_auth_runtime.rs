//! Token requests and their runtimes, per docs/guides/auth.md ("The token request runs as a task
//! of its own on the caller's Tokio runtime ...; if that runtime shuts down mid-request, the next
//! caller starts a new request; if it stops driving the request without shutting down ..., the
//! request is given up 10 s after its request timeout") and `ClientCredentials::get`'s rustdoc
//! ("Needs a Tokio runtime"). Runtimes are built by hand so one can be dropped or left idle.

use std::time::Duration;

use futures_util::FutureExt;
use sturdy::auth::{ClientCredentials, ExposeSecret};
use sturdy::core::ErrorKind;

use crate::s43_util::{source, token_json, Answer, Endpoint};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Starts a token request on `rt` (polling `get` once and letting the task run), then returns.
fn start_on(rt: &tokio::runtime::Runtime, src: &ClientCredentials) {
    rt.block_on(async {
        let _ = src.get().now_or_never();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    });
}

#[test]
fn a_first_fetch_lost_with_its_runtime_is_started_again_by_the_next_caller() {
    let ep = Endpoint::new(token_json("t-1", Some("3600")));
    ep.then(Answer::Stall);
    let src = source(&ep);
    let rt1 = runtime();
    start_on(&rt1, &src);
    assert_eq!(ep.count(), 1);
    drop(rt1);
    let rt2 = runtime();
    let t = rt2
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), src.get()).await })
        .expect("the next caller waited for a request whose runtime was gone")
        .unwrap();
    assert_eq!(t.secret().expose_secret(), "t-1");
    assert_eq!(ep.count(), 2);
}

#[test]
fn a_background_refresh_lost_with_its_runtime_is_started_again() {
    let ep = Endpoint::new(token_json("t-2", Some("3600")));
    ep.then(token_json("t-1", Some("1"))).then(Answer::Stall);
    let src = source(&ep);
    // Paused clocks: each runtime's starts at the real time it was built, so tokens stay
    // comparable across the two.
    let paused = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    };
    let rt1 = paused();
    let t = rt1.block_on(src.get()).unwrap();
    assert_eq!(t.secret().expose_secret(), "t-1");
    // Past half of the one-second lifetime: the next get starts a background refresh.
    rt1.block_on(tokio::time::advance(Duration::from_millis(600)));
    start_on(&rt1, &src);
    assert_eq!(ep.count(), 2, "no background refresh started");
    drop(rt1);
    let rt2 = paused();
    let got = rt2.block_on(async {
        for _ in 0..50 {
            let t = src.get().await.unwrap();
            if t.secret().expose_secret() == "t-2" {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert!(
        got,
        "the refresh lost with its runtime was never started again"
    );
    assert_eq!(ep.count(), 3);
}

#[test]
fn a_request_on_a_runtime_that_stopped_driving_it_is_given_up_10s_after_its_timeout() {
    let ep = Endpoint::new(token_json("t-1", Some("3600")));
    ep.then(Answer::Stall);
    let src = source(&ep).with_request_timeout(Duration::from_millis(100));
    let rt1 = runtime();
    // rt1 is a current-thread runtime: outside block_on nothing drives its tasks.
    start_on(&rt1, &src);
    let before = ep.count();
    let rt2 = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt2.block_on(async {
        let start = tokio::time::Instant::now();
        let early = tokio::time::timeout(Duration::from_secs(9), src.get()).await;
        assert!(
            early.is_err(),
            "the request was replaced before its timeout + 10 s"
        );
        assert_eq!(ep.count(), before);
        let t = tokio::time::timeout(Duration::from_secs(30), src.get())
            .await
            .expect("still waiting for a request nobody drives")
            .unwrap();
        assert_eq!(t.secret().expose_secret(), "t-1");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(10_000) && waited <= Duration::from_millis(10_200),
            "moved on after {waited:?}"
        );
    });
    assert_eq!(ep.count(), before + 1);
    drop(rt1);
}

#[test]
fn outside_a_runtime_get_is_a_config_error_that_says_so() {
    let ep = Endpoint::new(token_json("t-1", Some("3600")));
    let src = source(&ep);
    let err = src
        .get()
        .now_or_never()
        .expect("waited outside a runtime")
        .map(|_| ())
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_two_threads_two_hundred_callers_half_aborted_share_one_request() {
    let ep = Endpoint::new(Answer::After(
        Duration::from_millis(50),
        200,
        r#"{"access_token":"t-1","token_type":"Bearer","expires_in":3600}"#.into(),
    ));
    let src = source(&ep);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let s = src.clone();
            tokio::spawn(
                async move { s.get().await.map(|t| t.secret().expose_secret().to_owned()) },
            )
        })
        .collect();
    tokio::task::yield_now().await;
    for t in tasks.iter().step_by(2) {
        t.abort();
    }
    let mut ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("wedged")
        {
            Ok(r) => {
                assert_eq!(r.unwrap(), "t-1");
                ok += 1;
            }
            Err(e) => assert!(e.is_cancelled() && i % 2 == 0, "{e}"),
        }
    }
    assert!(ok >= 100);
    assert_eq!(ep.count(), 1);
    assert_eq!(src.get().await.unwrap().secret().expose_secret(), "t-1");
}
