//! The composed client goes where applications keep their clients: axum `State`, an `Arc<App>`
//! shared by spawned tasks, `Paginate::new`, and the token client of `ClientCredentials`. Each
//! is compiled here and run once against the chaos server on loopback.
#![cfg(feature = "full")]

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::paginate::{JsonCursor, Paginate};
use sturdy::{Client, ClientBuilder};
use sturdy_chaos::{http_client, ChaosServer, Knobs};
use tower::ServiceExt;

fn assert_shareable<T: Clone + Send + Sync + 'static>() {}

#[test]
fn the_client_is_clone_send_sync_static() {
    assert_shareable::<Client<Incoming>>();
    assert_shareable::<Client<Full<Bytes>>>();
}

async fn chaos() -> ChaosServer {
    ChaosServer::start(Knobs {
        orders: 30,
        ..Knobs::default()
    })
    .await
    .unwrap()
}

fn client() -> Client<Incoming> {
    ClientBuilder::new().build(http_client())
}

#[tokio::test]
async fn in_axum_state() {
    #[derive(Clone)]
    struct AppState {
        api: Client<Incoming>,
        orders_url: String,
    }
    async fn handler(State(s): State<AppState>) -> StatusCode {
        let req = Request::get(s.orders_url.as_str())
            .body(Full::default())
            .unwrap();
        match s.api.oneshot(req).await {
            Ok(res) => res.status(),
            Err(_) => StatusCode::BAD_GATEWAY,
        }
    }
    let server = chaos().await;
    let app = Router::new().route("/", get(handler)).with_state(AppState {
        api: client(),
        orders_url: server.url("/orders"),
    });
    let res = app
        .oneshot(Request::get("/").body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(server.stats().api_requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_an_arc_shared_by_spawned_tasks() {
    struct App {
        api: Client<Incoming>,
        url: String,
    }
    let server = chaos().await;
    let app = Arc::new(App {
        api: client(),
        url: server.url("/orders"),
    });
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let req = Request::get(app.url.as_str())
                    .body(Full::default())
                    .unwrap();
                app.api.clone().oneshot(req).await.unwrap().status()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(server.stats().api_requests, 8);
}

#[tokio::test]
async fn as_the_service_of_paginate() {
    let server = chaos().await;
    let pages = Paginate::new(
        client(),
        &server.url("/orders?limit=10"),
        JsonCursor::new("/data", "/next_cursor"),
    )
    .unwrap();
    let page = pages.page(None, 25).await.unwrap();
    assert_eq!(page.items.len(), 25);
    assert!(page.has_more);
}

#[tokio::test]
async fn as_the_token_client_of_client_credentials() {
    let server = chaos().await;
    // The token requests themselves go through a composed client: retries, breaker, timeout.
    let tokens =
        ClientCredentials::new(client(), &server.url("/oauth/token"), "client", "secret").unwrap();
    let api = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http_client());
    let res = api
        .oneshot(
            Request::get(server.url("/orders"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(!body.is_empty());
    assert_eq!(server.stats().token_requests, 1);
}
