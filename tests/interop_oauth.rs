//! Interop: `ClientCredentials` + `AuthLayer` against oauth2-mock-server (npm) and a resource
//! server that verifies its JWTs (interop/peers.js), started by `scripts/interop.sh`.
//!
//! The authorization server accepts the secret `interop-secret` for any client id (HTTP Basic or
//! form body) and answers `401 invalid_client` to any other; a client id `ttl<N>-...` gets tokens
//! with `expires_in: N`. The stats endpoint counts tokens issued and API calls per client id, so
//! each test uses client ids of its own.
use crate::interop_common;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use interop_common::*;
use sturdy::auth::{AuthLayer, ClientAuth, ClientCredentials, ExposeSecret};
use sturdy::core::classify::{classify_error, delivery};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, Delivery, ErrorKind, ErrorSummary};
use sturdy::ClientBuilder;
use tower::{Layer, Service, ServiceExt};

const OAUTH: &str = "STURDY_INTEROP_OAUTH_URL";
const API: &str = "STURDY_INTEROP_API_URL";
const STATS: &str = "STURDY_INTEROP_STATS_URL";
const SECRET: &str = "interop-secret";

fn client_id(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

async fn stats(stats_url: &str, client: &str) -> serde_json::Value {
    get_json(&format!("{stats_url}/stats?client={client}")).await
}

/// The claims of a JWT, read without verifying it (the API verified it).
fn claims(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).expect("a JWT has three parts");
    serde_json::from_slice(&base64url(payload)).expect("JSON claims")
}

fn base64url(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64url") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// 40 concurrent calls share one token, sent as a Bearer JWT that the API verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_for_many_concurrent_calls() {
    let oauth = peer_or_skip!(OAUTH);
    let api = peer_or_skip!(API);
    let stats_url = peer_or_skip!(STATS);
    let id = client_id("cache");
    let (token_client, token_wire) = recorded(http());
    let tokens =
        ClientCredentials::new(token_client, &format!("{oauth}/token"), id.clone(), SECRET)
            .unwrap()
            .with_scopes(["orders:read", "orders:write"]);
    let (api_client, api_wire) = recorded(http());
    let svc = AuthLayer::oauth2(tokens).layer(api_client);
    let calls = (0..40).map(|_| {
        let svc = svc.clone();
        let url = format!("{api}/whoami");
        tokio::spawn(async move { svc.oneshot(get(&url)).await })
    });
    let results = bounded(Duration::from_secs(20), "40 calls", join_all(calls)).await;
    let mut jtis = std::collections::HashSet::new();
    for r in results {
        let res = r.unwrap().unwrap_or_else(|e| panic!("{}", chain(&*e)));
        assert_eq!(res.status(), 200);
        let me = json(res).await;
        assert_eq!(me["client_id"], id.as_str());
        assert_eq!(me["scope"], "orders:read orders:write");
        jtis.insert(me["jti"].as_str().unwrap().to_string());
    }
    assert_eq!(jtis.len(), 1, "one token for all: {jtis:?}");
    assert_eq!(token_wire.len(), 1, "one token request");
    let s = stats(&stats_url, &id).await;
    assert_eq!(
        (s["tokens"].as_u64(), s["api_calls"].as_u64()),
        (Some(1), Some(40)),
        "{s}"
    );
    // Sent as `Authorization: Bearer <JWT>` from the server.
    let sent = api_wire.all();
    let auth = sent[0].headers["authorization"].to_str().unwrap();
    let jwt = auth.strip_prefix("Bearer ").expect("a Bearer token");
    assert_eq!(claims(jwt)["client_id"], id.as_str());
    assert!(sent[0].headers["authorization"].is_sensitive());
}

/// `client_secret_post` works with the same server.
#[tokio::test]
async fn secret_post_client_auth() {
    let oauth = peer_or_skip!(OAUTH);
    let api = peer_or_skip!(API);
    let id = client_id("post");
    let tokens = ClientCredentials::new(http(), &format!("{oauth}/token"), id.clone(), SECRET)
        .unwrap()
        .with_client_auth(ClientAuth::SecretPost);
    let svc = AuthLayer::oauth2(tokens).layer(http());
    let res = bounded(
        Duration::from_secs(10),
        "a call",
        svc.oneshot(get(&format!("{api}/whoami"))),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await["client_id"], id.as_str());
}

/// Tokens that live 3 s: the cache refreshes before expiry (half the lifetime before, for so
/// short a token), so calls made over 4 s all succeed and none presents an expired token. (The
/// server writes `exp` in whole seconds from a truncated `iat`, so a token announced as living
/// N s may live only N - 1 s and a little: with 2 s tokens the refresh margin of 1 s could be
/// used up entirely by that rounding.)
#[tokio::test]
async fn short_lived_tokens_are_refreshed_before_they_expire() {
    let oauth = peer_or_skip!(OAUTH);
    let api = peer_or_skip!(API);
    let stats_url = peer_or_skip!(STATS);
    let id = client_id("ttl3-refresh");
    let tokens =
        ClientCredentials::new(http(), &format!("{oauth}/token"), id.clone(), SECRET).unwrap();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http());
    let mut jtis = Vec::new();
    bounded(Duration::from_secs(20), "calls over 4 s", async {
        for _ in 0..20 {
            let res = client
                .clone()
                .oneshot(get(&format!("{api}/whoami")))
                .await
                .unwrap_or_else(|e| panic!("{}", chain(&*e)));
            assert_eq!(res.status(), 200);
            let jti = json(res).await["jti"].as_str().unwrap().to_string();
            if jtis.last() != Some(&jti) {
                jtis.push(jti);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let s = stats(&stats_url, &id).await;
    assert!(jtis.len() >= 2, "refreshed: {jtis:?}");
    assert_eq!(s["invalid_401"], 0, "no expired token was presented: {s}");
    assert_eq!(s["api_calls"], 20, "{s}");
}

/// A 401 from the API: the token is dropped, a new one fetched, the request (with its body)
/// replayed once; later calls keep the new token.
#[tokio::test]
async fn api_401_refreshes_once_and_replays() {
    let oauth = peer_or_skip!(OAUTH);
    let api = peer_or_skip!(API);
    let stats_url = peer_or_skip!(STATS);
    let id = client_id("revoked");
    let tokens =
        ClientCredentials::new(http(), &format!("{oauth}/token"), id.clone(), SECRET).unwrap();
    let (api_client, api_wire) = recorded(http());
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(api_client);
    let res = bounded(
        Duration::from_secs(10),
        "POST with a revoked token",
        client
            .clone()
            .oneshot(post(&format!("{api}/revoke-first-token"), r#"{"n":12345}"#)),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    let me = json(res).await;
    assert_eq!(
        (me["method"].as_str(), me["bytes"].as_u64()),
        (Some("POST"), Some(11))
    );
    let sent = api_wire.all();
    assert_eq!(sent.len(), 2, "the first attempt and one replay");
    assert_ne!(
        sent[0].headers["authorization"],
        sent[1].headers["authorization"]
    );
    assert_eq!(
        sent[0].headers.get("idempotency-key"),
        sent[1].headers.get("idempotency-key"),
        "the replay keeps the key"
    );
    for _ in 0..3 {
        let res = client
            .clone()
            .oneshot(get(&format!("{api}/revoke-first-token")))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let s = stats(&stats_url, &id).await;
    assert_eq!(
        (s["tokens"].as_u64(), s["api_401"].as_u64()),
        (Some(2), Some(1)),
        "{s}"
    );
}

/// An API that always answers 401: one refresh and one replay, then the 401 is returned; no
/// refresh loop.
#[tokio::test]
async fn api_that_always_401s_is_not_hammered() {
    let oauth = peer_or_skip!(OAUTH);
    let api = peer_or_skip!(API);
    let stats_url = peer_or_skip!(STATS);
    let id = client_id("always401");
    let tokens =
        ClientCredentials::new(http(), &format!("{oauth}/token"), id.clone(), SECRET).unwrap();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http());
    let res = bounded(
        Duration::from_secs(10),
        "a call to an API that refuses every token",
        client.oneshot(get(&format!("{api}/always-401"))),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 401);
    let s = stats(&stats_url, &id).await;
    assert_eq!(
        (s["tokens"].as_u64(), s["api_401"].as_u64()),
        (Some(2), Some(2)),
        "{s}"
    );
}

/// A wrong client secret: the server answers 401 invalid_client; the error names the cause and
/// the token endpoint, is not retryable, says the request was not sent, and shows the secret
/// nowhere (Display, Debug, the source chain, the summary).
#[tokio::test]
async fn wrong_secret_is_a_clear_error_without_the_secret() {
    let oauth = peer_or_skip!(OAUTH);
    let api = peer_or_skip!(API);
    let stats_url = peer_or_skip!(STATS);
    let id = client_id("wrong");
    let secret = "wrong-secret-7f3a9c";
    let token_url = format!("{oauth}/token");
    let tokens = ClientCredentials::new(http(), &token_url, id.clone(), secret).unwrap();
    assert!(!format!("{tokens:?}").contains(secret));
    let (api_client, api_wire) = recorded(http());
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(api_client);
    let err = bounded(
        Duration::from_secs(20),
        "a call with a wrong secret",
        client.oneshot(post(&format!("{api}/whoami"), "{}")),
    )
    .await
    .unwrap_err();
    let shown = err.to_string();
    let debug = format!("{err:?}");
    let full = chain(&*err);
    let summary = ErrorSummary::of(&*err);
    eprintln!("wrong secret: {shown}\n  summary: {summary:?}");
    for text in [&shown, &debug, &full, &summary.message] {
        assert!(!text.contains(secret), "the secret leaks: {text}");
    }
    assert!(shown.contains("invalid_client"), "names the cause: {shown}");
    assert!(shown.contains(&token_url), "names the endpoint: {shown}");
    assert_eq!(classify_error(&*err), ErrorKind::Auth, "{full}");
    assert!(!summary.retryable, "{summary:?}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(!summary.may_have_been_processed);
    assert_eq!(api_wire.len(), 0, "the API was never called");
    let s = stats(&stats_url, &id).await;
    assert_eq!(s["rejected_secrets"], 1, "asked once, not retried: {s}");
}

// ---- the token endpoint behind HAProxy's faults ----

const HA_STALL: &str = "STURDY_INTEROP_HAPROXY_STALL_URL";
const HA_GATEWAY_TIMEOUT: &str = "STURDY_INTEROP_HAPROXY_GATEWAY_TIMEOUT_URL";
const HA_RESET: &str = "STURDY_INTEROP_HAPROXY_RESET_URL";

/// A token endpoint that never answers: the token request is cut at its timeout, the call fails
/// `NotSent` with kind `Timeout`, names the token endpoint, and the API is never called.
#[tokio::test]
async fn stalled_token_endpoint_is_bounded() {
    let stall = peer_or_skip!(HA_STALL);
    let api = peer_or_skip!(API);
    let token_url = format!("{stall}/oauth/token");
    let tokens = ClientCredentials::new(http(), &token_url, client_id("stalled"), SECRET)
        .unwrap()
        .with_request_timeout(Duration::from_millis(300));
    let (api_client, api_wire) = recorded(http());
    let svc = AuthLayer::oauth2(tokens).layer(api_client);
    let start = tokio::time::Instant::now();
    let err = bounded(
        Duration::from_secs(5),
        "a call behind a stalled token endpoint",
        svc.oneshot(post(&format!("{api}/whoami"), "{}")),
    )
    .await
    .unwrap_err();
    let took = start.elapsed();
    eprintln!("stalled token endpoint: {err} ({took:?})");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(
        classify_error(&*err),
        ErrorKind::Timeout,
        "{}",
        chain(&*err)
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(err.to_string().contains(&token_url), "{err}");
    assert_eq!(api_wire.len(), 0);
}

/// The same inside `ClientBuilder` with the default 30 s token request timeout: the builder's
/// attempt timeout bounds the wait for the token.
#[tokio::test]
async fn builder_attempt_timeout_bounds_a_stalled_token_endpoint() {
    let stall = peer_or_skip!(HA_STALL);
    let api = peer_or_skip!(API);
    let tokens = ClientCredentials::new(
        http(),
        &format!("{stall}/oauth/token"),
        client_id("stalled-builder"),
        SECRET,
    )
    .unwrap();
    let client = ClientBuilder::new()
        .without_retry()
        .with_auth(AuthLayer::oauth2(tokens))
        .with_attempt_timeout(Duration::from_millis(400))
        .build(http());
    let start = tokio::time::Instant::now();
    let err = bounded(
        Duration::from_secs(5),
        "a call behind a stalled token endpoint",
        client.oneshot(post(&format!("{api}/whoami"), "{}")),
    )
    .await
    .unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{}", chain(&*err));
    assert!(!ErrorSummary::of(&*err).may_have_been_processed);
}

/// A token endpoint behind a proxy that answers 504: retryable, the token endpoint's status,
/// not sent.
#[tokio::test]
async fn token_endpoint_gateway_timeout() {
    let gw = peer_or_skip!(HA_GATEWAY_TIMEOUT);
    let api = peer_or_skip!(API);
    let token_url = format!("{gw}/oauth/token");
    let tokens = ClientCredentials::new(http(), &token_url, client_id("gw"), SECRET).unwrap();
    let svc = AuthLayer::oauth2(tokens).layer(http());
    let err = bounded(
        Duration::from_secs(5),
        "a call behind a 504 token endpoint",
        svc.oneshot(get(&format!("{api}/whoami"))),
    )
    .await
    .unwrap_err();
    eprintln!("504 token endpoint: {err}");
    let s = ErrorSummary::of(&*err);
    assert_eq!((s.kind, s.status), ("server_error", Some(504)), "{s:?}");
    assert!(s.retryable && !s.may_have_been_processed, "{s:?}");
    assert!(err.to_string().contains(&token_url), "{err}");
}

/// A token endpoint whose proxy closes the connection: retryable, not sent, names the endpoint.
#[tokio::test]
async fn token_endpoint_reset() {
    let reset = peer_or_skip!(HA_RESET);
    let api = peer_or_skip!(API);
    let token_url = format!("{reset}/oauth/token");
    let tokens = ClientCredentials::new(http(), &token_url, client_id("reset"), SECRET).unwrap();
    let svc = AuthLayer::oauth2(tokens).layer(http());
    let err = bounded(
        Duration::from_secs(5),
        "a call behind a resetting token endpoint",
        svc.oneshot(post(&format!("{api}/whoami"), "{}")),
    )
    .await
    .unwrap_err();
    eprintln!("reset token endpoint: {err}");
    let s = ErrorSummary::of(&*err);
    assert!(s.retryable && !s.may_have_been_processed, "{s:?}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(err.to_string().contains(&token_url), "{err}");
}

/// Many callers while 3 s tokens keep expiring (see above for why not 2 s): one token request per
/// refresh, not one per caller, and no caller presents an expired token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_is_single_flight_under_concurrency() {
    let oauth = peer_or_skip!(OAUTH);
    let api = peer_or_skip!(API);
    let stats_url = peer_or_skip!(STATS);
    let id = client_id("ttl3-concurrent");
    let tokens =
        ClientCredentials::new(http(), &format!("{oauth}/token"), id.clone(), SECRET).unwrap();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http());
    let tasks = (0..10).map(|_| {
        let client = client.clone();
        let url = format!("{api}/whoami");
        tokio::spawn(async move {
            for _ in 0..15 {
                let res = client.clone().oneshot(get(&url)).await.unwrap();
                assert_eq!(res.status(), 200);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    bounded(
        Duration::from_secs(30),
        "10 callers for 3 s",
        join_all(tasks),
    )
    .await
    .into_iter()
    .for_each(|r| r.unwrap());
    let s = stats(&stats_url, &id).await;
    eprintln!("concurrent refresh: {s}");
    assert_eq!(s["api_calls"], 150, "{s}");
    assert_eq!(s["invalid_401"], 0, "no expired token presented: {s}");
    let issued = s["tokens"].as_u64().unwrap();
    assert!((2..=6).contains(&issued), "one request per refresh: {s}");
}

/// The lifetime of each token `c` fetches, from its `TokenFetched` events.
fn lifetimes(c: ClientCredentials) -> (ClientCredentials, Arc<Mutex<Vec<Duration>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let c = c.on_event(move |e| {
        if let Event::TokenFetched { lifetime, .. } = e {
            g.lock().unwrap().push(*lifetime);
        }
    });
    (c, got)
}

/// Basic and form-body client authentication with scopes: 20 concurrent callers share one JWT,
/// whose `expires_in` (120 for a `ttl120-` id) is the lifetime the source reports; a wrong secret
/// is the non-retryable `invalid_client` refusal, in the words of the docs, without the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_and_post_with_scopes_one_token_and_a_clear_refusal() {
    let oauth = peer_or_skip!(OAUTH);
    let url = format!("{oauth}/token");
    for auth in [ClientAuth::SecretBasic, ClientAuth::SecretPost] {
        let (c, got) = lifetimes(
            ClientCredentials::new(http(), &url, client_id("ttl120-scopes"), SECRET)
                .unwrap()
                .with_client_auth(auth)
                .with_scopes(["read", "write"])
                .with_request_timeout(Duration::from_secs(3)),
        );
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.get().await })
            })
            .collect();
        let mut values = Vec::new();
        for t in bounded(Duration::from_secs(10), "20 callers", join_all(tasks)).await {
            let token = t.unwrap().unwrap_or_else(|e| panic!("{}", chain(&e)));
            values.push(token.secret().expose_secret().to_owned());
        }
        values.dedup();
        assert_eq!(values.len(), 1, "{auth:?}: more than one token");
        assert_eq!(values[0].split('.').count(), 3, "not a JWT");
        assert_eq!(
            *got.lock().unwrap(),
            vec![Duration::from_secs(120)],
            "{auth:?}"
        );

        let wrong =
            ClientCredentials::new(http(), &url, client_id("wrong-scopes"), "WRONG-SECRET-S66")
                .unwrap()
                .with_client_auth(auth);
        let e = bounded(Duration::from_secs(10), "wrong secret", wrong.get())
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(!e.is_retryable(), "{msg}");
        assert!(
            msg.contains("refused the token request with invalid_client (401 Unauthorized)"),
            "{msg}"
        );
        assert!(!chain(&e).contains("WRONG-SECRET-S66"), "{msg}");
    }
}

/// Tokens of 1 s (`ttl1-`) through `AuthLayer` over `ConcurrencyLimit(1)`, driven by a kept
/// service for 1.6 s: every call carries the bearer JWT, and the source refreshes a few times,
/// not once per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_second_tokens_through_a_kept_service_are_refreshed_not_fetched_per_call() {
    let oauth = peer_or_skip!(OAUTH);
    let (c, got) = lifetimes(
        ClientCredentials::new(
            http(),
            &format!("{oauth}/token"),
            client_id("ttl1-kept"),
            SECRET,
        )
        .unwrap()
        .with_request_timeout(Duration::from_secs(3)),
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let api = tower::service_fn(
        move |req: http::Request<http_body_util::Full<bytes::Bytes>>| {
            let s = s.clone();
            async move {
                let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
                s.lock().unwrap().push(auth);
                Ok::<_, BoxError>(http::Response::new(
                    http_body_util::Full::<bytes::Bytes>::default(),
                ))
            }
        },
    );
    let mut svc = tower::ServiceBuilder::new()
        .layer(AuthLayer::oauth2(c).with_token_timeout(Duration::from_secs(3)))
        .concurrency_limit(1)
        .service(api);
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_millis(1600) {
        let res = bounded(Duration::from_secs(5), "a call", async {
            svc.ready()
                .await
                .unwrap()
                .call(get("http://api.invalid/"))
                .await
        })
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&*e)));
        assert_eq!(res.status(), 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap().clone();
    let fetched = got.lock().unwrap().len();
    assert!(seen.len() > 30, "{}", seen.len());
    assert!(
        (2..=6).contains(&fetched),
        "{fetched} tokens for {} calls in 1.6 s",
        seen.len()
    );
    assert!(seen.iter().all(|a| a.starts_with("Bearer ey")), "{seen:?}");
}
