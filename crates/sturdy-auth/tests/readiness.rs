//! tower's readiness contract: the request goes to the service `poll_ready` made ready, also
//! when the call first waits for a token; nothing a ready service reserved is left behind.
//! Paused time, in-process token sources and APIs.

use crate::support;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy_auth::AuthLayer;
use sturdy_core::BoxError;
use support::{get, Api, GatedSource, TokenEndpoint};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tower::buffer::BufferLayer;
use tower::limit::ConcurrencyLimitLayer;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_test::mock;

type Req = Request<Full<Bytes>>;
type Svc = BoxCloneService<Req, Response<()>, BoxError>;

/// Where the sturdy layer sits relative to a limit of one.
#[derive(Debug, Clone, Copy)]
enum Stack {
    /// Auth -> ConcurrencyLimit(1) -> API
    OverConcurrencyLimit,
    /// Auth -> Buffer(1) -> API
    OverBuffer,
    /// Buffer(1) -> Auth -> ConcurrencyLimit(1) -> API
    BehindBuffer,
}

/// How the caller drives the service.
#[derive(Debug, Clone, Copy)]
enum Drive {
    /// A fresh clone per call.
    Oneshot,
    /// One service kept across calls: `svc.ready().await?.call(req)`.
    Kept,
}

const STACKS: [Stack; 3] = [
    Stack::OverConcurrencyLimit,
    Stack::OverBuffer,
    Stack::BehindBuffer,
];
const DRIVES: [Drive; 2] = [Drive::Oneshot, Drive::Kept];

fn stack(kind: Stack, auth: AuthLayer, api: &Api) -> Svc {
    match kind {
        Stack::OverConcurrencyLimit => BoxCloneService::new(
            ServiceBuilder::new()
                .layer(auth)
                .layer(ConcurrencyLimitLayer::new(1))
                .service(api.service()),
        ),
        Stack::OverBuffer => BoxCloneService::new(
            ServiceBuilder::new()
                .layer(auth)
                .layer(BufferLayer::new(1))
                .service(api.service()),
        ),
        Stack::BehindBuffer => BoxCloneService::new(
            ServiceBuilder::new()
                .layer(BufferLayer::new(1))
                .layer(auth)
                .layer(ConcurrencyLimitLayer::new(1))
                .service(api.service()),
        ),
    }
}

/// `calls` sequential calls through one caller.
async fn caller(mut svc: Svc, drive: Drive, calls: usize) -> Vec<StatusCode> {
    let mut out = Vec::new();
    for _ in 0..calls {
        let res = match drive {
            Drive::Oneshot => svc.clone().oneshot(get()).await,
            Drive::Kept => match svc.ready().await {
                Ok(ready) => ready.call(get()).await,
                Err(e) => Err(e),
            },
        };
        out.push(res.expect("the call succeeds").status());
    }
    out
}

/// `callers` concurrent callers, each with its own clone, each making `calls` calls.
async fn round(svc: &Svc, drive: Drive, callers: usize, calls: usize) -> Vec<StatusCode> {
    let tasks: Vec<_> = (0..callers)
        .map(|_| tokio::spawn(caller(svc.clone(), drive, calls)))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.expect("the caller task finishes"));
    }
    out
}

/// Bounded: a deadlock shows as a timeout (paused time jumps to it once everything is stuck).
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(600), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: stuck (the readiness contract is broken)"))
}

/// Every stack, every way of driving it, through every waiting path: the cold token fetch, the
/// refresh at expiry, and the replay after a 401; sequential and concurrent calls.
#[tokio::test(start_paused = true)]
async fn every_stack_and_driver_goes_through_every_waiting_path() {
    for kind in STACKS {
        for drive in DRIVES {
            let what = format!("{kind:?}/{drive:?}");
            // 100 s tokens: refreshed 50 s before expiry.
            let ep = TokenEndpoint::new(100);
            let api = Api::accept_all_tokens();
            let svc = stack(kind, AuthLayer::oauth2(ep.source()), &api);

            // Cold cache: one caller's first call waits for the token, then more calls.
            let statuses = bounded(&what, caller(svc.clone(), drive, 20)).await;
            assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{what}");
            // Cold cache with concurrent callers (a new source, so the cache is cold again).
            let ep2 = TokenEndpoint::new(100);
            let svc2 = stack(kind, AuthLayer::oauth2(ep2.source()), &api);
            let statuses = bounded(&what, round(&svc2, drive, 8, 5)).await;
            assert_eq!(statuses.len(), 40, "{what}");
            assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{what}");
            assert_eq!(ep2.count(), 1, "{what}: one token request");

            // Due for refresh (60 s): calls go on with the valid token while it is refreshed.
            tokio::time::advance(Duration::from_secs(60)).await;
            let statuses = bounded(&what, round(&svc, drive, 8, 5)).await;
            assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{what}");
            assert_eq!(ep.count(), 2, "{what}: one refresh");

            // Expired (the next token is a 100 s one too): the first calls wait for a new one.
            tokio::time::advance(Duration::from_secs(101)).await;
            let statuses = bounded(&what, round(&svc, drive, 8, 5)).await;
            assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{what}");
            assert_eq!(ep.count(), 3, "{what}: one refresh");

            // 401: the API now accepts only the next token; every caller's first call gets a
            // 401, the token is fetched once more, and each call is replayed once.
            api.accept_only(&["tok-4"]);
            let statuses = bounded(&what, round(&svc, drive, 8, 5)).await;
            assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{what}");
            assert_eq!(ep.count(), 4, "{what}: one refresh after the 401s");
            api.accept_only(&[]);

            // And the limit of one is whole again: one more kept call goes through.
            let statuses = bounded(&what, caller(svc.clone(), Drive::Kept, 3)).await;
            assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{what}");
        }
    }
}

/// A kept service over `ConcurrencyLimit(1)`, step by step: the first call is sent to the
/// service `poll_ready` made ready (which keeps its permit during the token wait), without
/// polling readiness again.
#[tokio::test(start_paused = true)]
async fn the_first_call_goes_to_the_service_poll_ready_made_ready() {
    let source = GatedSource::new();
    let (mut svc, mut handle) = mock::spawn_layer::<Req, Response<()>, _>(
        ServiceBuilder::new()
            .layer(AuthLayer::token_source(Arc::new(source.clone())))
            .layer(ConcurrencyLimitLayer::new(1)),
    );
    handle.allow(100);
    let mut other = svc.clone();

    assert_ready_ok!(svc.poll_ready());
    let mut call = task::spawn(svc.call(get()));
    assert_pending!(call.poll(), "waiting for the token");
    // The permit stays with this call while it waits for its token.
    assert_pending!(other.poll_ready());
    assert!(handle.poll_request().is_pending());

    source.open(1);
    assert!(call.is_woken());
    assert_pending!(call.poll(), "waiting for the API");
    let (req, send) = assert_ready!(handle.poll_request()).expect("the request was sent");
    assert_eq!(req.headers()["authorization"], "Bearer tok-1");
    send.send_response(Response::new(()));
    assert_eq!(assert_ready_ok!(call.poll()).status(), StatusCode::OK);

    // The permit came back with the response.
    assert!(other.is_woken());
    assert_ready_ok!(other.poll_ready());
    drop(other);
    // The kept service is driven again for its next call.
    source.open(1);
    assert_ready_ok!(svc.poll_ready());
    let mut call = task::spawn(svc.call(get()));
    assert_pending!(call.poll());
    let (req, send) = assert_ready!(handle.poll_request()).expect("the second request was sent");
    assert_eq!(req.headers()["authorization"], "Bearer tok-2");
    send.send_response(Response::new(()));
    assert_ready_ok!(call.poll());
}

/// The replay after a 401: the first response gives its permit back before the new token is
/// awaited, and the same service is driven to readiness again before the replay.
#[tokio::test(start_paused = true)]
async fn the_replay_after_a_401_drives_the_same_service_to_readiness_again() {
    let source = GatedSource::new();
    let (mut svc, mut handle) = mock::spawn_layer::<Req, Response<()>, _>(
        ServiceBuilder::new()
            .layer(AuthLayer::token_source(Arc::new(source.clone())))
            .layer(ConcurrencyLimitLayer::new(1)),
    );
    handle.allow(100);
    let mut other = svc.clone();
    source.open(1);

    assert_ready_ok!(svc.poll_ready());
    let mut call = task::spawn(svc.call(get()));
    assert_pending!(call.poll());
    let (_, send) = assert_ready!(handle.poll_request()).unwrap();
    send.send_response(Response::builder().status(401).body(()).unwrap());

    // The 401 came back: waiting for the new token, holding no permit.
    assert_pending!(call.poll());
    assert_eq!(*source.invalidated.lock().unwrap(), ["tok-1"]);
    assert_ready_ok!(other.poll_ready(), "the first response released its permit");

    // While `other` holds the permit, the replay waits for it after the token arrives (one
    // token for the replay, one for `other`'s call).
    source.open(2);
    assert_pending!(call.poll());
    assert!(handle.poll_request().is_pending());
    let mut other_call = task::spawn(other.call(get()));
    assert_pending!(other_call.poll());
    let (_, send) = assert_ready!(handle.poll_request()).unwrap();
    send.send_response(Response::new(()));
    assert_ready_ok!(other_call.poll());
    drop(other_call);

    // Now the replay gets the permit and is sent with the new token.
    assert!(call.is_woken());
    assert_pending!(call.poll());
    let (req, send) = assert_ready!(handle.poll_request()).expect("the replay was sent");
    assert_eq!(req.headers()["authorization"], "Bearer tok-2");
    send.send_response(Response::new(()));
    assert_eq!(assert_ready_ok!(call.poll()).status(), StatusCode::OK);
    assert_ready_ok!(other.poll_ready(), "no permit left behind");
}

/// A response future dropped while it waits (for a token, or for readiness before a replay)
/// gives back what the ready service reserved.
#[tokio::test(start_paused = true)]
async fn a_dropped_call_gives_its_permit_back() {
    let source = GatedSource::new();
    let (mut svc, mut handle) = mock::spawn_layer::<Req, Response<()>, _>(
        ServiceBuilder::new()
            .layer(AuthLayer::token_source(Arc::new(source.clone())))
            .layer(ConcurrencyLimitLayer::new(1)),
    );
    handle.allow(100);
    let mut other = svc.clone();

    // Dropped during the token wait.
    assert_ready_ok!(svc.poll_ready());
    let mut call = task::spawn(svc.call(get()));
    assert_pending!(call.poll());
    assert_pending!(other.poll_ready());
    drop(call);
    assert!(other.is_woken());
    assert_ready_ok!(other.poll_ready());
    drop(other);

    // Dropped while it waits for readiness before the replay.
    let mut other = svc.clone();
    source.open(1);
    assert_ready_ok!(svc.poll_ready());
    let mut call = task::spawn(svc.call(get()));
    assert_pending!(call.poll());
    let (_, send) = assert_ready!(handle.poll_request()).unwrap();
    send.send_response(Response::builder().status(401).body(()).unwrap());
    assert_pending!(call.poll(), "waiting for the new token");
    assert_ready_ok!(other.poll_ready());
    source.open(1);
    assert_pending!(call.poll(), "the replay waits for the permit `other` holds");
    drop(call);
    drop(other);
    // Both gone: the permit is free for the kept service.
    assert_ready_ok!(svc.poll_ready());
}

/// The same over `Buffer(1)` with a kept service: the slot `poll_ready` reserved carries the
/// first call (the hang this guards against is a clone waiting for that slot forever).
#[tokio::test(start_paused = true)]
async fn a_kept_service_over_buffer_sends_the_first_call_with_its_reserved_slot() {
    let ep = TokenEndpoint::new(3_600);
    let api = Api::accept_all_tokens();
    let mut svc = AuthLayer::oauth2(ep.source()).layer(BufferLayer::new(1).layer(api.service()));
    for _ in 0..10 {
        let res = bounded("kept over Buffer(1)", async {
            svc.ready().await.unwrap().call(get()).await
        })
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(api.calls.lock().unwrap().len(), 10);
    assert_eq!(ep.count(), 1);
}
