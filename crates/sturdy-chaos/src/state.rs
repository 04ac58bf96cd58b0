use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// How a 429 says when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfterForm {
    /// `Retry-After: <seconds>`.
    Seconds(u64),
    /// `Retry-After: <HTTP date>`, this far in the future (HTTP dates have whole seconds, so the
    /// wait a client computes may be up to a second shorter).
    Date(Duration),
    /// No `Retry-After` header.
    Absent,
}

/// A server-side quota: at most `limit` requests per fixed `window`; the rest get 429 with
/// `Retry-After` and `RateLimit` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRateLimit {
    /// Requests admitted per window.
    pub limit: u32,
    /// The window.
    pub window: Duration,
}

/// A server of limited capacity (for [`Knobs::capacity`]): it serves `limit` API requests at once
/// at full speed; past that it shares itself out, and past `shed_above` it sheds load.
///
/// A request that arrives with `k` API requests in flight (itself included) is answered 503 at
/// once when `k > shed_above`; otherwise it takes its latency (`latency` or the tail's) times
/// `max(1, k / limit)`. So past `limit` the throughput stays at about `limit / latency` and only
/// the latency grows, as on a server whose workers are all busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Requests served at full speed at once.
    pub limit: u32,
    /// More requests in flight than this are answered 503 at once (use `limit` to shed as soon
    /// as the server is full).
    pub shed_above: u32,
}

/// The server's fault and feature switches, all off by default. Change them while the server runs
/// with [`ChaosServer::update`](crate::ChaosServer::update).
///
/// Faults apply to the API routes (`/orders...`), not to `/oauth/token` (which has its own),
/// `/health` or `/counter` (which has only [`Knobs::counter_latency`]). They are checked in this order: capacity, latency (and its tail), API version, auth, server quota, the next-N
/// and random 429s, the next-N and random 5xx; a request that survives them reaches the handler,
/// where reset-after-commit applies to `POST /orders`.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Seed of the server's random choices (fractions below).
    pub seed: u64,
    /// Fraction (0.0 to 1.0) of API requests answered with `error_status`.
    pub error_rate: f64,
    /// The next N API requests are answered with `error_status`.
    pub fail_next: u32,
    /// The status of injected server errors \[503\].
    pub error_status: u16,
    /// Fraction of API requests answered 429.
    pub rate_limit_rate: f64,
    /// The next N API requests are answered 429.
    pub rate_limit_next: u32,
    /// How injected 429s say when to come back \[`Seconds(1)`\].
    pub retry_after: RetryAfterForm,
    /// Fraction of order creations whose connection is closed after the order was committed: the
    /// client sees an error, the side effect stands.
    pub reset_after_commit_rate: f64,
    /// The next N order creations are committed and then their connection is closed.
    pub reset_after_commit_next: u32,
    /// Added to every API request before anything else.
    pub latency: Duration,
    /// A long tail: this fraction (0.0 to 1.0) of API requests takes this long instead of
    /// `latency`; e.g. `Some((0.01, 100 ms))` with a `latency` of 2 ms makes 1 % of requests 50×
    /// slower.
    pub tail_latency: Option<(f64, Duration)>,
    /// A server that slows down and then sheds load past a number of requests in flight; see
    /// [`Capacity`].
    pub capacity: Option<Capacity>,
    /// API routes require `Authorization: Bearer <token>` with a token from `/oauth/token`.
    pub require_auth: bool,
    /// The OAuth2 client id (default `client`).
    pub client_id: String,
    /// The OAuth2 client secret (default `secret`).
    pub client_secret: String,
    /// Lifetime of issued tokens \[1 h\]; expired tokens get 401.
    pub token_lifetime: Duration,
    /// Replaces the `expires_in` member of token responses (`Some(Value::Null)` omits it).
    pub token_expires_in: Option<serde_json::Value>,
    /// The next N token requests get 503.
    pub token_fail_next: u32,
    /// Answer every token request with this status and raw body instead.
    pub token_response: Option<(u16, String)>,
    /// When set, API requests must send `API-Version` with this value, else 400.
    pub api_version: Option<String>,
    /// Send `Deprecation: @<this>` (RFC 9745) on API responses.
    pub deprecation: Option<i64>,
    /// Send `Sunset: <HTTP date>` (RFC 8594) on API responses.
    pub sunset: Option<SystemTime>,
    /// A server-side quota.
    pub server_rate_limit: Option<ServerRateLimit>,
    /// Honour `Idempotency-Key` on `POST /orders`: a repeat replays the first response with
    /// `Idempotent-Replayed: true`; the same key with another payload gets 422.
    pub idempotency: bool,
    /// Orders present at start, for pagination (`o_1` .. `o_N`).
    pub orders: usize,
    /// Added to every `/counter` request before it is served (the read's snapshot and the write's
    /// compare-and-set come after it), so that contending clients overlap as they would against a
    /// real datastore.
    pub counter_latency: Duration,
    /// A random extra delay of `/counter` requests, uniform between zero and this (drawn from the
    /// seeded generator), as a network's variance would add.
    pub counter_latency_jitter: Duration,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            seed: 0x5eed,
            error_rate: 0.0,
            fail_next: 0,
            error_status: 503,
            rate_limit_rate: 0.0,
            rate_limit_next: 0,
            retry_after: RetryAfterForm::Seconds(1),
            reset_after_commit_rate: 0.0,
            reset_after_commit_next: 0,
            latency: Duration::ZERO,
            tail_latency: None,
            capacity: None,
            require_auth: false,
            client_id: "client".into(),
            client_secret: "secret".into(),
            token_lifetime: Duration::from_secs(3_600),
            token_expires_in: None,
            token_fail_next: 0,
            token_response: None,
            api_version: None,
            deprecation: None,
            sunset: None,
            server_rate_limit: None,
            idempotency: false,
            orders: 0,
            counter_latency: Duration::ZERO,
            counter_latency_jitter: Duration::ZERO,
        }
    }
}

/// What the server saw: the truth tests assert on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every request, on every route.
    pub requests: u64,
    /// API requests (`/orders...`).
    pub api_requests: u64,
    /// Orders created (side effects), seeded orders not included.
    pub orders_committed: u64,
    /// Orders committed with an `Idempotency-Key` seen before (only when idempotency is off).
    pub duplicates_by_key: u64,
    /// Orders committed with a payload identical to an earlier committed one.
    pub duplicates_by_payload: u64,
    /// Responses replayed for a repeated `Idempotency-Key`.
    pub replayed: u64,
    /// Requests to `/oauth/token`.
    pub token_requests: u64,
    /// Tokens issued.
    pub tokens_issued: u64,
    /// 429 responses sent.
    pub rate_limited: u64,
    /// Injected 5xx responses sent.
    pub server_errors: u64,
    /// Connections closed after a commit.
    pub resets: u64,
    /// 401 responses sent by API routes.
    pub unauthorized: u64,
    /// GET requests for lists of orders (any pagination style).
    pub page_requests: u64,
    /// 503 responses sent because more requests were in flight than [`Capacity::shed_above`].
    pub shed: u64,
    /// The most API requests in flight at once so far.
    pub peak_in_flight: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) api_requests: AtomicU64,
    pub(crate) orders_committed: AtomicU64,
    pub(crate) duplicates_by_key: AtomicU64,
    pub(crate) duplicates_by_payload: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) token_requests: AtomicU64,
    pub(crate) tokens_issued: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) server_errors: AtomicU64,
    pub(crate) resets: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) page_requests: AtomicU64,
    pub(crate) shed: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) peak_in_flight: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            requests: g(&self.requests),
            api_requests: g(&self.api_requests),
            orders_committed: g(&self.orders_committed),
            duplicates_by_key: g(&self.duplicates_by_key),
            duplicates_by_payload: g(&self.duplicates_by_payload),
            replayed: g(&self.replayed),
            token_requests: g(&self.token_requests),
            tokens_issued: g(&self.tokens_issued),
            rate_limited: g(&self.rate_limited),
            server_errors: g(&self.server_errors),
            resets: g(&self.resets),
            unauthorized: g(&self.unauthorized),
            page_requests: g(&self.page_requests),
            shed: g(&self.shed),
            peak_in_flight: g(&self.peak_in_flight),
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Time since the server started.
    pub at: Duration,
    /// The method.
    pub method: http::Method,
    /// The path and query.
    pub path: String,
    /// The status sent (0 when the connection was closed instead).
    pub status: u16,
}

#[derive(Debug, Default)]
pub(crate) struct OrderBook {
    pub(crate) orders: Vec<serde_json::Value>,
    pub(crate) payloads: HashSet<Bytes>,
    /// Idempotency key => (payload, status, response body).
    pub(crate) keys: HashMap<String, (Bytes, u16, Bytes)>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) knobs: Mutex<Knobs>,
    pub(crate) rng: Mutex<SmallRng>,
    pub(crate) counters: Counters,
    pub(crate) book: Mutex<OrderBook>,
    pub(crate) tokens: Mutex<HashMap<String, Instant>>,
    pub(crate) window: Mutex<(Instant, u32)>,
    pub(crate) log: Mutex<Vec<RequestRecord>>,
    pub(crate) started: Instant,
    pub(crate) counter: Mutex<crate::counter::CounterStats>,
}

/// Locks a mutex, shrugging off poison: the server's state stays usable after a panicking test.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const LOG_CAP: usize = 200_000;

impl Shared {
    pub(crate) fn new(knobs: Knobs) -> Self {
        let mut book = OrderBook::default();
        for i in 1..=knobs.orders {
            book.orders.push(serde_json::json!({ "id": format!("o_{i}"), "item": format!("seeded-{i}"), "amount": i }));
        }
        let now = Instant::now();
        Self {
            rng: Mutex::new(SmallRng::seed_from_u64(knobs.seed)),
            knobs: Mutex::new(knobs),
            counters: Counters::default(),
            book: Mutex::new(book),
            tokens: Mutex::new(HashMap::new()),
            window: Mutex::new((now, 0)),
            log: Mutex::new(Vec::new()),
            started: now,
            counter: Mutex::default(),
        }
    }

    /// A draw in [0, 1) from the seeded generator.
    pub(crate) fn chance(&self, p: f64) -> bool {
        p > 0.0 && lock(&self.rng).random::<f64>() < p
    }

    pub(crate) fn record(&self, method: http::Method, path: String, status: u16) {
        let mut log = lock(&self.log);
        if log.len() < LOG_CAP {
            log.push(RequestRecord {
                at: self.started.elapsed(),
                method,
                path,
                status,
            });
        }
    }
}
