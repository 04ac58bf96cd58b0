//! A token request lost with its runtime does not break the source: the next caller, on a
//! healthy runtime, starts a new one.

use crate::support;
use std::time::Duration;

use secrecy::ExposeSecret;
use sturdy_auth::AuthLayer;
use support::{get, Api, TokenEndpoint};
use tower::{Layer, ServiceExt};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runtime A starts a token request that never answers, then shuts down with the request's
/// task; on runtime B the next call gets a token.
#[test]
fn a_request_dropped_with_its_runtime_is_started_again_by_the_next_caller() {
    let ep = TokenEndpoint::new(3_600);
    ep.stall_next(1);
    let source = ep.source();

    let a = runtime();
    a.block_on({
        let source = source.clone();
        let ep = ep.clone();
        async move {
            let waiter = tokio::spawn(async move { source.get().await });
            while ep.count() == 0 {
                tokio::task::yield_now().await;
            }
            assert!(!waiter.is_finished());
        }
    });
    drop(a);
    assert_eq!(ep.count(), 1);

    let b = runtime();
    let token = b
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(10), source.get())
                .await
                .expect("bounded")
        })
        .expect("a token from a new request");
    assert_eq!(token.secret().expose_secret(), "tok-2");
    assert_eq!(ep.count(), 2);

    // The same through the layer, from a third runtime after another loss.
    let ep = TokenEndpoint::new(3_600);
    ep.stall_next(1);
    let api = Api::accept_all_tokens();
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    let c = runtime();
    c.block_on({
        let svc = svc.clone();
        let ep = ep.clone();
        async move {
            let _call = tokio::spawn(svc.oneshot(get()));
            while ep.count() == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    drop(c);
    let d = runtime();
    let res = d
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), svc.oneshot(get())).await })
        .expect("bounded")
        .expect("the call succeeds");
    assert_eq!(res.status(), http::StatusCode::OK);
    assert_eq!(api.calls.lock().unwrap()[0].0, "tok-2");
    assert_eq!(ep.count(), 2);
}

/// Callers waiting on a healthy runtime for a request whose runtime shuts down are woken and
/// start a new request there.
#[test]
fn waiters_on_another_runtime_start_over_when_the_request_is_lost() {
    let ep = TokenEndpoint::new(3_600);
    ep.stall_next(1);
    let source = ep.source();

    // Runtime A starts the request and keeps running it on its own thread.
    let a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let started = a.spawn({
        let source = source.clone();
        async move { source.get().await }
    });
    while ep.count() == 0 {
        std::thread::yield_now();
    }

    let b = runtime();
    let token = b.block_on(async {
        let waiter = tokio::spawn({
            let source = source.clone();
            async move { source.get().await }
        });
        // The waiter has joined the request A runs; now A goes away.
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tokio::task::spawn_blocking(move || drop(a)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("bounded")
            .unwrap()
    });
    assert_eq!(
        token
            .expect("a token from a new request")
            .secret()
            .expose_secret(),
        "tok-2"
    );
    assert_eq!(ep.count(), 2);
    drop(started);
}
