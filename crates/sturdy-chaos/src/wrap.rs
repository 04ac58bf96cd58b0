//! Fault injection around any axum app, for testing server-side layers end to end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::state::lock;
use crate::ResetConnection;

/// Faults injected around an app by [`serve`]. All off by default.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Seed of the random choices.
    pub seed: u64,
    /// Fraction of requests answered 503 before the app sees them.
    pub error_rate: f64,
    /// Fraction of requests whose connection is closed after the app answered (the side effect
    /// stands, the response is lost).
    pub reset_after_rate: f64,
    /// Fraction of requests answered 429 with `Retry-After: 1` before the app sees them.
    pub rate_limit_rate: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            seed: 0x5eed,
            error_rate: 0.0,
            reset_after_rate: 0.0,
            rate_limit_rate: 0.0,
        }
    }
}

#[derive(Debug)]
struct FaultState {
    faults: Faults,
    rng: Mutex<SmallRng>,
    requests: AtomicU64,
    errors: AtomicU64,
    rate_limited: AtomicU64,
    resets: AtomicU64,
    /// How many requests arrived with each `Idempotency-Key` (the first 100,000 keys).
    keys: Mutex<HashMap<String, u64>>,
}

impl FaultState {
    fn chance(&self, p: f64) -> bool {
        p > 0.0 && lock(&self.rng).random::<f64>() < p
    }
}

/// What the fault layer saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests received.
    pub requests: u64,
    /// 503s injected.
    pub errors: u64,
    /// 429s injected.
    pub rate_limited: u64,
    /// Connections closed after the app answered.
    pub resets: u64,
}

/// An app served on loopback with faults around it; it stops when dropped.
#[derive(Debug)]
pub struct Served {
    addr: SocketAddr,
    state: Arc<FaultState>,
    accept: JoinHandle<()>,
}

impl Served {
    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the fault layer saw.
    pub fn stats(&self) -> FaultStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultStats {
            requests: g(&self.state.requests),
            errors: g(&self.state.errors),
            rate_limited: g(&self.state.rate_limited),
            resets: g(&self.state.resets),
        }
    }

    /// How many requests arrived (before any fault) carrying `Idempotency-Key: key`: the
    /// server's word on whether a request was ever sent.
    pub fn requests_with_key(&self, key: &str) -> u64 {
        lock(&self.state.keys).get(key).copied().unwrap_or(0)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn inject(State(s): State<Arc<FaultState>>, req: Request, next: Next) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(k) = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
    {
        let mut keys = lock(&s.keys);
        if keys.len() < 100_000 || keys.contains_key(k) {
            *keys.entry(k.to_owned()).or_default() += 1;
        }
    }
    if s.chance(s.faults.rate_limit_rate) {
        s.rate_limited.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(http::header::RETRY_AFTER, "1")],
            "injected rate limit",
        )
            .into_response();
    }
    if s.chance(s.faults.error_rate) {
        s.errors.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "injected failure").into_response();
    }
    let mut res = next.run(req).await;
    if s.chance(s.faults.reset_after_rate) {
        s.resets.fetch_add(1, Ordering::Relaxed);
        res.extensions_mut().insert(ResetConnection);
    }
    res
}

/// Serves `app` on `127.0.0.1:0` with `faults` injected around it.
///
/// # Errors
/// When the port cannot be bound.
pub async fn serve(app: axum::Router, faults: Faults) -> std::io::Result<Served> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(FaultState {
        rng: Mutex::new(SmallRng::seed_from_u64(faults.seed)),
        faults,
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        rate_limited: AtomicU64::new(0),
        resets: AtomicU64::new(0),
        keys: Mutex::new(HashMap::new()),
    });
    let app = app.layer(middleware::from_fn_with_state(state.clone(), inject));
    let accept = tokio::spawn(crate::accept_loop(listener, app));
    Ok(Served {
        addr,
        state,
        accept,
    })
}
