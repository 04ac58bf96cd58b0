//! A client of a JSON API over HTTPS, shared by the handlers of an axum service.
//!
//! The service (`POST /checkout`) places an order with an upstream orders API over HTTPS. Its
//! one sturdy client (`ClientBuilder` over `sturdy::tls::https_client_with_roots`, with OAuth2
//! client credentials) lives in axum `State`; every request clones it, and the clones share the
//! token cache, the circuit breakers, the rate limiter and the retry budget.
//!
//! ```sh
//! cargo run --example https_json_client --features full
//! ```
//!
//! The upstream API is started by the example on 127.0.0.1: a sturdy-chaos server (with 5xx,
//! resets after commit and OAuth2 on) behind a TLS front whose self-signed certificate is made at
//! start and trusted by the client. With a real API, use `sturdy::tls::https_client()` instead,
//! which trusts the Mozilla root certificates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::{https_client_with_roots, rustls, CertificateDer};
use sturdy::ClientBuilder;
use sturdy_chaos::{ChaosServer, Knobs};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

// ===== the service =====

/// What every handler shares: one sturdy client and where the API is.
#[derive(Clone)]
struct App {
    api: sturdy::Client<Incoming>,
    base: Arc<str>,
}

#[derive(Deserialize)]
struct Checkout {
    item: String,
    quantity: u32,
}

#[derive(Serialize)]
struct NewOrder<'a> {
    item: &'a str,
    quantity: u32,
}

async fn checkout(State(app): State<App>, Json(c): Json<Checkout>) -> (StatusCode, Json<Value>) {
    match place_order(&app, &c).await {
        Ok(order) => (StatusCode::CREATED, Json(order)),
        // sturdy's message says what happened, for the caller's logs or an agent to act on.
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({ "error": e.to_string() })),
        ),
    }
}

async fn place_order(app: &App, c: &Checkout) -> Result<Value, Error> {
    let body = serde_json::to_vec(&NewOrder {
        item: &c.item,
        quantity: c.quantity,
    })?;
    let req = http::Request::post(format!("{}/orders", app.base))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    // A clone per call: cheap, and it shares every layer's state.
    let res = app.api.clone().oneshot(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(format!("the orders API answered {status}").into());
    }
    Ok(serde_json::from_slice(&body)?)
}

/// The client for the API at `base`, trusting `ca` as well as the Mozilla roots.
fn api_client(base: &str, ca: CertificateDer<'static>) -> Result<sturdy::Client<Incoming>, Error> {
    let http = https_client_with_roots([ca])?;
    let tokens = ClientCredentials::new(
        http.clone(),
        &format!("{base}/oauth/token"),
        "client",
        "secret",
    )?;
    Ok(ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_backoff(Backoff::decorrelated_jitter(
                    Duration::from_millis(10),
                    Duration::from_millis(200),
                )?)
                .with_max_attempts(8)
                .with_deadline(Duration::from_secs(20)),
        )
        .with_auth(AuthLayer::oauth2(tokens))
        .with_attempt_timeout(Duration::from_secs(5))
        .build(http))
}

fn service(app: App) -> Router {
    Router::new()
        .route("/checkout", post(checkout))
        .with_state(app)
}

// ===== the upstream API, for this example only =====

/// The orders API over HTTPS on loopback: a chaos server behind a TLS front.
struct Upstream {
    chaos: ChaosServer,
    base: String,
    ca: CertificateDer<'static>,
    front: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.front.abort();
    }
}

async fn upstream() -> Result<Upstream, Error> {
    let chaos = ChaosServer::start(Knobs {
        seed: 3,
        require_auth: true,
        idempotency: true,
        // About one attempt in five fails; eight attempts leave an order about one chance in
        // half a million of failing every one.
        error_rate: 0.1,
        reset_after_commit_rate: 0.1,
        ..Knobs::default()
    })
    .await?;
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])?;
    let ca = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![ca.clone()], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("https://{}", listener.local_addr()?);
    let backend = chaos.addr();
    let front = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let (Ok(mut tls), Ok(mut plain)) = (
                    acceptor.accept(tcp).await,
                    TcpStream::connect(backend).await,
                ) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    Ok(Upstream {
        chaos,
        base,
        ca,
        front,
    })
}

// ===== running it =====

/// Serves the service on loopback and places `orders` orders through it, `orders` at once.
async fn run(upstream: &Upstream, orders: u32) -> Result<Vec<(StatusCode, Value)>, Error> {
    let app = App {
        api: api_client(&upstream.base, upstream.ca.clone())?,
        base: upstream.base.as_str().into(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, service(app)).await });

    let caller = sturdy_chaos::http_client();
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..orders {
        let caller = caller.clone();
        calls.spawn(async move {
            let req = http::Request::post(format!("http://{addr}/checkout"))
                .header("content-type", "application/json")
                .body(Full::from(format!(
                    r#"{{"item":"book","quantity":{}}}"#,
                    n + 1
                )))?;
            let res = caller.request(req).await?;
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, Error>((status, serde_json::from_slice::<Value>(&body)?))
        });
    }
    let mut results = Vec::new();
    while let Some(r) = calls.join_next().await {
        results.push(r??);
    }
    server.abort();
    Ok(results)
}

#[cfg_attr(test, allow(dead_code))]
#[tokio::main]
async fn main() -> Result<(), Error> {
    let upstream = upstream().await?;
    println!("orders API on {}", upstream.base);
    let results = run(&upstream, 20).await?;
    for (status, body) in &results {
        println!("{status} {body}");
    }
    let st = upstream.chaos.stats();
    println!(
        "the API committed {} orders ({} duplicates), answered {} injected 5xx, closed {} \
         connections after committing, and issued {} token(s)",
        st.orders_committed,
        st.duplicates_by_payload,
        st.server_errors,
        st.resets,
        st.tokens_issued
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn twenty_concurrent_checkouts_are_twenty_orders() {
        let upstream = upstream().await.unwrap();
        let results = run(&upstream, 20).await.unwrap();
        assert_eq!(results.len(), 20);
        for (status, body) in &results {
            assert_eq!(*status, StatusCode::CREATED, "{body}");
            assert_eq!(body["item"], "book");
        }
        let st = upstream.chaos.stats();
        assert_eq!(st.orders_committed, 20);
        assert_eq!(st.duplicates_by_payload, 0);
        assert!(st.server_errors > 0 && st.resets > 0, "{st:?}");
        // Twenty concurrent first calls, one token request.
        assert_eq!(st.token_requests, 1);
    }

    #[tokio::test]
    async fn an_untrusted_api_is_reported_as_a_tls_failure() {
        let upstream = upstream().await.unwrap();
        let stranger = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let app = App {
            api: api_client(&upstream.base, stranger.cert.der().clone()).unwrap(),
            base: upstream.base.as_str().into(),
        };
        let err = place_order(
            &app,
            &Checkout {
                item: "book".into(),
                quantity: 1,
            },
        )
        .await
        .unwrap_err();
        // The token could not be fetched: the certificate was refused before anything was sent.
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            sturdy::core::Delivery::NotSent
        );
        let mut chain = Vec::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
        while let Some(e) = cur {
            chain.push(e.to_string());
            cur = e.source();
        }
        assert!(
            chain.iter().any(|e| e.contains("invalid peer certificate")),
            "{chain:?}"
        );
        assert_eq!(upstream.chaos.stats().requests, 0);
    }
}
