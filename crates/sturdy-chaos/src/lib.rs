//! A fault-injecting "orders API" on loopback, for testing sturdy against a real server.
//!
//! [`ChaosServer::start`] binds `127.0.0.1:0` and serves, in real time:
//!
//! | route | what it does |
//! |---|---|
//! | `POST /orders` | commits an order (a JSON object); honours `Idempotency-Key` when [`Knobs::idempotency`] is on |
//! | `GET /orders?cursor=&limit=` | cursor pagination: `{"data": \[...\], "next_cursor": "c40" \| null}` |
//! | `GET /orders/link?page=&per_page=` | a JSON array with a relative RFC 8288 `Link: <...>; rel="next"` |
//! | `GET /orders/pages?page=&per_page=` | page numbers: `{"items", "page", "per_page", "total"}` |
//! | `GET /orders/offset?offset=&limit=` | offset/limit: `{"items", "offset", "limit", "total"}` |
//! | `GET /orders/{id}` | one order |
//! | `POST /oauth/token` | OAuth2 client credentials; tokens expire after [`Knobs::token_lifetime`] |
//! | `GET /health` | `ok`, never faulted |
//! | `GET /counter` | a counter under optimistic concurrency: `{"value", "version"}` with `ETag: "<version>"` |
//! | `PUT /counter` | `{"value": v}` with `If-Match: "<version>"`: 200 when the version is current, 412 when stale, 428 without `If-Match`; never faulted, delayed by [`Knobs::counter_latency`] |
//!
//! [`serve`] wraps any axum app with the same faults (5xx before it, a closed connection after
//! it), for testing server-side layers end to end.
//!
//! Every fault is a [`Knobs`] field, off by default, changeable while the server runs
//! ([`ChaosServer::update`]). The server counts what it saw ([`ChaosServer::stats`]) and logs
//! every request with its time ([`ChaosServer::requests`]), so tests assert on the server's truth:
//! how many orders were really committed, how many requests arrived during a pause.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use sturdy_chaos::{ChaosServer, Knobs};
//!
//! // The connection of the first order is closed after the order was committed.
//! let server = ChaosServer::start(Knobs { reset_after_commit_next: 1, ..Knobs::default() }).await.unwrap();
//! let client = sturdy_chaos::http_client();
//! let req = http::Request::post(server.url("/orders"))
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(br#"{"item":"book","amount":1}"#)))
//!     .unwrap();
//! assert!(client.request(req).await.is_err()); // the client saw an error...
//! assert_eq!(server.stats().orders_committed, 1); // ...but the order exists
//! # }
//! ```
#![forbid(unsafe_code)]

mod api;
mod counter;
mod oauth;
mod state;
mod wrap;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt as _;

pub use counter::CounterStats;
pub use state::{Capacity, Knobs, RequestRecord, RetryAfterForm, ServerRateLimit, Stats};
pub use wrap::{serve, FaultStats, Faults, Served};

use state::{lock, Shared};

/// Marks a response whose connection must be closed instead of answered.
#[derive(Debug, Clone, Copy)]
struct ResetConnection;

impl fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection closed by the chaos server after commit")
    }
}

impl std::error::Error for ResetConnection {}

/// A running chaos server; it stops when dropped. Its `Debug` shows its address only (its state
/// holds the OAuth2 client secret, the tokens it issued and the requests it saw).
pub struct ChaosServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for ChaosServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ChaosServer {
    /// Starts a server on `127.0.0.1` and a free port.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start(knobs: Knobs) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(knobs));
        let router = api::router(shared.clone());
        let accept = tokio::spawn(accept_loop(listener, router));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Changes the knobs while the server runs.
    pub fn update(&self, f: impl FnOnce(&mut Knobs)) {
        f(&mut lock(&self.shared.knobs));
    }

    /// A copy of the current knobs.
    pub fn knobs(&self) -> Knobs {
        lock(&self.shared.knobs).clone()
    }

    /// What the server has seen so far.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Every request so far, in order of completion, with its time since the server started.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).clone()
    }

    /// The orders committed so far (seeded ones first).
    pub fn orders(&self) -> Vec<serde_json::Value> {
        lock(&self.shared.book).orders.clone()
    }

    /// The state of `/counter` and the requests it answered.
    pub fn counter(&self) -> CounterStats {
        *lock(&self.shared.counter)
    }

    /// Revokes every token issued so far: the next API call with one gets 401.
    pub fn revoke_tokens(&self) {
        lock(&self.shared.tokens).clear();
    }
}

impl Drop for ChaosServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, router: axum::Router) {
    // Connections live in the JoinSet, so aborting this task closes them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let router = router.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let router = router.clone();
                        async move {
                            let res = router.oneshot(req.map(Body::new)).await.unwrap_or_else(|e| match e {});
                            // hyper closes the connection without a response when the service fails.
                            if res.extensions().get::<ResetConnection>().is_some() {
                                return Err(ResetConnection);
                            }
                            Ok(res)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A plain hyper-util HTTP/1 client, as users build one.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}
