//! In-process token endpoints, token sources and APIs shared by the behaviour tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy_auth::{BoxFuture, ClientCredentials, Token, TokenSource};
use sturdy_core::BoxError;
use tower::{service_fn, Service};

pub const TOKEN_URL: &str = "https://auth.example.com/oauth/token?tenant=t1";
pub const SECRET: &str = "s3cr3t:+%";

/// A token endpoint: counts requests, issues `tok-N` with `expires_in`, or answers from a script;
/// the next `stall` requests are never answered.
#[derive(Clone)]
pub struct TokenEndpoint {
    pub requests: Arc<AtomicU32>,
    pub expires_in: Arc<Mutex<serde_json::Value>>,
    pub script: Arc<Mutex<Vec<(u16, String)>>>,
    pub seen: Arc<Mutex<Vec<Request<Bytes>>>>,
    pub stall: Arc<AtomicU32>,
    pub delay: Duration,
}

impl TokenEndpoint {
    pub fn new(expires_in: u64) -> Self {
        Self {
            requests: Arc::default(),
            expires_in: Arc::new(Mutex::new(expires_in.into())),
            script: Arc::default(),
            seen: Arc::default(),
            stall: Arc::default(),
            delay: Duration::from_millis(20),
        }
    }

    pub fn count(&self) -> u32 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn fail_next(&self, status: u16, body: &str) {
        self.script.lock().unwrap().push((status, body.to_owned()));
    }

    /// The next `n` requests are never answered.
    pub fn stall_next(&self, n: u32) {
        self.stall.store(n, Ordering::SeqCst);
    }

    pub fn service(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let this = self.clone();
        service_fn(move |req: Request<Full<Bytes>>| {
            let this = this.clone();
            async move {
                let n = this.requests.fetch_add(1, Ordering::SeqCst) + 1;
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                this.seen
                    .lock()
                    .unwrap()
                    .push(Request::from_parts(parts, body));
                let stalled = this
                    .stall
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| s.checked_sub(1))
                    .is_ok();
                if stalled {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(this.delay).await;
                let (status, body) = match this.script.lock().unwrap().pop() {
                    Some(s) => s,
                    None => (200, serde_json::json!({ "access_token": format!("tok-{n}"), "token_type": "Bearer", "expires_in": *this.expires_in.lock().unwrap() }).to_string()),
                };
                Ok(Response::builder()
                    .status(status)
                    .body(Full::from(body))
                    .unwrap())
            }
        })
    }

    pub fn source(&self) -> ClientCredentials {
        ClientCredentials::new(self.service(), TOKEN_URL, "my client", SECRET).unwrap()
    }
}

/// An API that accepts only the tokens in `valid` (all when empty), and records which token
/// each call carried.
#[derive(Clone, Default)]
pub struct Api {
    pub valid: Arc<Mutex<Vec<String>>>,
    pub calls: Arc<Mutex<Vec<(String, Bytes)>>>,
}

impl Api {
    pub fn accept_all_tokens() -> Self {
        Self::default()
    }

    pub fn accept_only(&self, tokens: &[&str]) {
        *self.valid.lock().unwrap() = tokens.iter().map(|t| (*t).to_owned()).collect();
    }

    pub fn service(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<()>,
        Error = BoxError,
        Future = impl std::future::Future<Output = Result<Response<()>, BoxError>> + Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let this = self.clone();
        service_fn(move |req: Request<Full<Bytes>>| {
            let this = this.clone();
            async move {
                let auth = req.headers().get("authorization").map(|v| {
                    assert!(v.is_sensitive());
                    v.to_str().unwrap().trim_start_matches("Bearer ").to_owned()
                });
                let auth = auth.unwrap_or_default();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                // The API takes a little time, so concurrent calls overlap.
                tokio::time::sleep(Duration::from_millis(5)).await;
                this.calls.lock().unwrap().push((auth.clone(), body));
                let valid = this.valid.lock().unwrap();
                let ok = valid.is_empty() || valid.contains(&auth);
                Ok(Response::builder()
                    .status(if ok { 200 } else { 401 })
                    .body(())
                    .unwrap())
            }
        })
    }
}

/// A token source that hands out `tok-N` only when the test opens the gate, one token per
/// `open(1)`; it records the tokens the API refused.
#[derive(Debug, Clone)]
pub struct GatedSource {
    gate: Arc<tokio::sync::Semaphore>,
    issued: Arc<AtomicU32>,
    pub invalidated: Arc<Mutex<Vec<String>>>,
}

impl GatedSource {
    pub fn new() -> Self {
        Self {
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            issued: Arc::default(),
            invalidated: Arc::default(),
        }
    }

    pub fn open(&self, tokens: usize) {
        self.gate.add_permits(tokens);
    }
}

impl TokenSource for GatedSource {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        let this = self.clone();
        Box::pin(async move {
            this.gate.acquire().await?.forget();
            let n = this.issued.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Token::new(format!("tok-{n}"), None))
        })
    }

    fn invalidate(&self, token: &Token) {
        use secrecy::ExposeSecret;
        self.invalidated
            .lock()
            .unwrap()
            .push(token.secret().expose_secret().to_owned());
    }
}

pub fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.example.com/orders")
        .body(Full::default())
        .unwrap()
}
