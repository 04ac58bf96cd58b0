//! OAuth2 through `ClientBuilder` against the chaos server on 127.0.0.1 in real time: README.md
//! ("the token is fetched once and refreshed on 401"), auth.md ("one request for N callers";
//! "401 from the API: the token is invalidated, a new one fetched, the request replayed once";
//! the token client "a boxed stack ... with its own retries"). Tokens the server expires sooner
//! than it says, revoked tokens, a token endpoint that fails twice.
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::BoxError;
use sturdy::ClientBuilder;
use sturdy_chaos::{ChaosServer, Knobs};
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

fn get(server: &ChaosServer) -> Request<Full<Bytes>> {
    Request::get(server.url("/orders?limit=1"))
        .body(Full::default())
        .unwrap()
}

async fn burst<S>(client: &S, server: &ChaosServer, n: usize) -> Vec<u16>
where
    S: tower::Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Response: Into<http::Response<hyper::body::Incoming>>,
    S::Error: std::fmt::Display,
    S::Future: Send,
{
    let calls: Vec<_> = (0..n)
        .map(|_| client.clone().oneshot(get(server)))
        .collect();
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| match r {
            Ok(res) => res.into().status().as_u16(),
            Err(e) => panic!("a call failed: {e}"),
        })
        .collect()
}

/// 20 callers at once get one token; after the server revokes it, 20 callers at once get 401s
/// that cost one more token request, and every call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client26_one_token_for_a_burst_and_one_more_after_revocation() {
    let server = ChaosServer::start(Knobs {
        require_auth: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let http = sturdy_chaos::http_client();
    let tokens = ClientCredentials::new(
        http.clone(),
        &server.url("/oauth/token"),
        "client",
        "secret",
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http);
    let statuses = burst(&client, &server, 20).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(server.stats().token_requests, 1);
    server.revoke_tokens();
    let statuses = burst(&client, &server, 20).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let st = server.stats();
    assert_eq!(st.token_requests, 2, "{st:?}");
    assert!(st.unauthorized <= 20, "{st:?}");
}

/// The server expires its tokens after 300 ms but says `expires_in: 3600`: each wave of
/// callers after an expiry costs one token request, not one per caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client26_tokens_expiring_sooner_than_said_cost_one_request_per_wave() {
    let server = ChaosServer::start(Knobs {
        require_auth: true,
        token_lifetime: Duration::from_millis(300),
        token_expires_in: Some(serde_json::json!(3600)),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let http = sturdy_chaos::http_client();
    let tokens = ClientCredentials::new(
        http.clone(),
        &server.url("/oauth/token"),
        "client",
        "secret",
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http);
    for wave in 1..=3u64 {
        let statuses = burst(&client, &server, 10).await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "wave {wave}: {statuses:?}"
        );
        let st = server.stats();
        assert_eq!(st.token_requests, wave, "wave {wave}: {st:?}");
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
}

/// The token client is a `ClientBuilder` stack of its own (retries), boxed as the guide shows:
/// the token endpoint's first two 503s are retried there, and the API call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client26_token_client_with_its_own_retries() {
    let server = ChaosServer::start(Knobs {
        require_auth: true,
        token_fail_next: 2,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let http = sturdy_chaos::http_client();
    let token_client: BoxCloneSyncService<
        Request<Full<Bytes>>,
        http::Response<hyper::body::Incoming>,
        BoxError,
    > = BoxCloneSyncService::new(
        ClientBuilder::new()
            .with_retry(sturdy::retry::RetryLayer::new().with_deadline(Duration::from_secs(10)))
            .build(http.clone()),
    );
    let tokens = ClientCredentials::new(
        token_client,
        &server.url("/oauth/token"),
        "client",
        "secret",
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http);
    let statuses = burst(&client, &server, 5).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let st = server.stats();
    assert_eq!(st.token_requests, 3, "{st:?}");
    assert_eq!(st.tokens_issued, 1, "{st:?}");
}
