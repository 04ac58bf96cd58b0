//! Typed events for the moments worth counting: retries, rate-limit waits, refusals and pauses,
//! breaker transitions and rejections, token fetches, idempotent replays and conflicts, webhook
//! deliveries, hedges, concurrency-limit changes and coalesced calls.
//!
//! Every sturdy layer that has such moments takes a callback with `on_event(f)`: `f` receives an
//! [`Event`] borrowed for the length of the call. With the `metrics` feature, the same events are
//! also counted through the [`metrics`](https://docs.rs/metrics) facade, under the names and
//! labels of one table (see `docs/guides/metrics.md` and `describe_metrics`, which that feature
//! adds).
//!
//! An event is emitted only where a layer departs from the plain path (a retry, a wait, a
//! refusal, a state change...): a call that goes straight through emits nothing, so a stack
//! with no callback and no metrics recorder pays nothing for them.
//!
//! What an event carries is safe to log and to label with: hosts (the authority, never the
//! `user:password@` part), methods, statuses, durations, kinds and layer keys. Never a secret, a
//! full URL, a query, an idempotency key or a webhook id.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use sturdy_core::events::{Event, EventHook};
//!
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = seen.clone();
//! // A layer's `on_event` stores one of these; layers call `emit` at each event.
//! let hook = EventHook::new(move |e: &Event<'_>| {
//!     if let Event::RateLimitWaited { key, wait, .. } = e {
//!         log.lock().unwrap().push(format!("{key} waited {wait:?}"));
//!     }
//! });
//! hook.emit(&Event::RateLimitWaited {
//!     key: "api.example.com",
//!     host: Some("api.example.com"),
//!     wait: Duration::from_millis(250),
//! });
//! assert_eq!(*seen.lock().unwrap(), ["api.example.com waited 250ms"]);
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

use crate::headers::PauseSource;
use crate::trace::DelaySource;
use crate::ErrorKind;

/// One thing a layer did; see the [module docs](self).
///
/// Fields borrow from the layer for the length of the callback; copy what you keep. Layers of
/// sturdy build these; a callback only reads them. New variants may be added (the enum is
/// `#[non_exhaustive]`) and new fields too: match with `{ field, .. }` and a catch-all arm.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Event<'a> {
    /// Retry layer: a try failed in a way worth trying again (an attempt, or a try a layer below
    /// refused before it was sent); the next try is made after `delay`.
    RetryScheduled {
        /// The host called (authority, without user info, in lower case).
        host: &'a str,
        /// The request's method.
        method: &'a Method,
        /// Which try failed, 1 for the first. A try that a layer below refused before it was
        /// sent (an open breaker, the local rate limit, a full concurrency limit, no token)
        /// counts here, as it counts against `max_attempts`, and has `refused` set: it is not an
        /// attempt (`CallReport::attempts` and the error's message leave it out).
        attempt: u32,
        /// Whether this try was refused by a layer below before it was sent.
        refused: bool,
        /// Why it failed.
        reason: &'a ErrorKind,
        /// How long the layer waits before the next attempt.
        delay: Duration,
        /// Where the delay comes from: the backoff, the server's `Retry-After`, a rate limiter's
        /// refusal (the wait it named), or an open circuit breaker (its time until a probe).
        source: DelaySource,
    },
    /// Retry layer: a try failed in a way worth trying again, but it was not retried.
    RetryStopped {
        /// The host called (authority, without user info, in lower case).
        host: &'a str,
        /// The request's method.
        method: &'a Method,
        /// Which try failed, 1 for the first; counted as in [`Event::RetryScheduled`], where a
        /// try refused before it was sent counts and has `refused` set.
        attempt: u32,
        /// Whether this try was refused by a layer below before it was sent.
        refused: bool,
        /// Why it failed.
        reason: &'a ErrorKind,
        /// Why it was not retried.
        stop: RetryStop,
    },
    /// Rate limit: a call waits in line for its turn (a slot of the quota, the end of a
    /// pause). A wait granted by a shared store (`with_remote`) is not reported.
    RateLimitWaited {
        /// The limiter's key.
        key: &'a str,
        /// The host, when the layer keys by host (the default); `None` with a custom key.
        host: Option<&'a str>,
        /// How long it is expected to wait.
        wait: Duration,
    },
    /// Rate limit: a call was refused without being sent, because it would have waited longer
    /// than allowed (or the shared store said no).
    RateLimitRefused {
        /// The limiter's key.
        key: &'a str,
        /// The host, when the layer keys by host (the default); `None` with a custom key.
        host: Option<&'a str>,
        /// How long it would have had to wait.
        wait: Duration,
    },
    /// Rate limit: a response asked every caller of a key to hold off, and the key is paused.
    RateLimitPaused {
        /// The limiter's key.
        key: &'a str,
        /// The host, when the layer keys by host (the default); `None` with a custom key.
        host: Option<&'a str>,
        /// The status of the response that asked.
        status: StatusCode,
        /// The header that asked; `None` for a 429 without any wait header, or a 503 without one when
        /// bare 503s pause (the default pause).
        source: Option<PauseSource>,
        /// The pause applied (the pause asked for, capped by the layer's `max_pause`).
        pause: Duration,
        /// Whether the pause asked for was longer than the cap.
        capped: bool,
    },
    /// Circuit breaker: a breaker changed state.
    CircuitChanged {
        /// The breaker's key.
        key: &'a str,
        /// The host, when the layer keys by host (the default); `None` with a custom key.
        host: Option<&'a str>,
        /// The state it left.
        from: BreakerState,
        /// The state it entered.
        to: BreakerState,
        /// For [`BreakerState::Open`]: how long it stays open.
        open_for: Option<Duration>,
    },
    /// Circuit breaker: a call was refused at once because the breaker is open (or half-open
    /// with every probe slot taken).
    CircuitRejected {
        /// The breaker's key.
        key: &'a str,
        /// The host, when the layer keys by host (the default); `None` with a custom key.
        host: Option<&'a str>,
        /// When the breaker admits a call again.
        retry_in: Duration,
    },
    /// Auth: an access token was fetched from the token endpoint.
    TokenFetched {
        /// The token endpoint's host (and port), in lower case.
        endpoint: &'a str,
        /// The token's lifetime as used (capped).
        lifetime: Duration,
    },
    /// Auth: a token request failed.
    TokenFailed {
        /// The token endpoint's host (and port), in lower case.
        endpoint: &'a str,
        /// What went wrong.
        error: &'a ErrorKind,
        /// How long the source waits before it asks the endpoint again.
        retry_in: Duration,
        /// Whether a token that is still valid stays in use meanwhile.
        keeping_current: bool,
    },
    /// Auth: the API answered 401 to a request that carried a cached token; the token is
    /// dropped and the request is sent once more with a fresh one.
    TokenRejected {
        /// The host that answered 401, in lower case.
        host: &'a str,
    },
    /// Server idempotency: a repeated request was answered with the stored response; the
    /// handler did not run.
    IdempotentReplayed {
        /// The request's method.
        method: &'a Method,
        /// The stored status, replayed.
        status: StatusCode,
    },
    /// Server idempotency: a request with a key was refused (409 in flight, 422 key reused) or
    /// a key was missing or invalid (400).
    IdempotencyRefused {
        /// The request's method.
        method: &'a Method,
        /// Why.
        refusal: IdempotencyRefusal,
        /// The status answered.
        status: StatusCode,
    },
    /// Webhooks: a delivery was answered.
    WebhookReceived {
        /// The receiver's route name.
        route: &'a str,
        /// The signature scheme (`standard`, `stripe`, `github`, ...).
        scheme: &'a str,
        /// What happened to it.
        outcome: WebhookOutcome,
        /// The status answered.
        status: StatusCode,
    },
    /// Hedging: a second copy of a slow call was sent.
    HedgeSent {
        /// The hedging layer's key.
        key: &'a str,
        /// The host, when the layer keys by host (the default); `None` with a custom key.
        host: Option<&'a str>,
    },
    /// Hedging: the second copy answered first; the first was cancelled.
    HedgeWon {
        /// The hedging layer's key.
        key: &'a str,
        /// The host, when the layer keys by host (the default); `None` with a custom key.
        host: Option<&'a str>,
    },
    /// Adaptive concurrency: the number of calls a key may have in flight changed.
    ConcurrencyLimitChanged {
        /// The limiter's key.
        key: &'a str,
        /// The host, when the layer keys by host (the default); `None` with a custom key.
        host: Option<&'a str>,
        /// The limit before.
        from: usize,
        /// The limit now.
        to: usize,
    },
    /// Adaptive concurrency: a call found no free place within its wait and was refused.
    ConcurrencyRejected {
        /// The limiter's key.
        key: &'a str,
        /// The host, when the layer keys by host (the default); `None` with a custom key.
        host: Option<&'a str>,
        /// The limit at the time.
        limit: usize,
    },
    /// Coalescing: a call joined an identical call in flight instead of sending its own.
    Coalesced {
        /// The coalescing layer's key (`*` for a host past the host bound).
        key: &'a str,
        /// The host called, in lower case, when the layer keys by host (the default); `None`
        /// with a custom key.
        host: Option<&'a str>,
        /// The request's method.
        method: &'a Method,
    },
}

/// Why a retryable failure was not retried ([`Event::RetryStopped`]).
///
/// One reason is reported when several hold: [`NotIdempotent`](Self::NotIdempotent) first;
/// then, after a wait the server (or a client-side limiter) asked for,
/// [`WaitTooLong`](Self::WaitTooLong), [`PastDeadline`](Self::PastDeadline),
/// [`AttemptsExhausted`](Self::AttemptsExhausted), and after a plain failure,
/// [`AttemptsExhausted`](Self::AttemptsExhausted) before [`PastDeadline`](Self::PastDeadline);
/// [`NotReplayable`](Self::NotReplayable) and [`BudgetExhausted`](Self::BudgetExhausted) last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryStop {
    /// Every attempt allowed was used.
    AttemptsExhausted,
    /// The host's retry budget is spent.
    BudgetExhausted,
    /// A non-idempotent request without an idempotency key may already have taken effect.
    NotIdempotent,
    /// The server (or a client-side rate limiter) asked for a wait longer than the layer waits.
    WaitTooLong,
    /// The next attempt would start past the call's deadline.
    PastDeadline,
    /// The body was not kept for a replay (too large, or of unknown size).
    NotReplayable,
}

impl RetryStop {
    /// The label value: `attempts_exhausted`, `budget_exhausted`, `not_idempotent`,
    /// `wait_too_long`, `past_deadline`, `not_replayable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::BudgetExhausted => "budget_exhausted",
            Self::NotIdempotent => "not_idempotent",
            Self::WaitTooLong => "wait_too_long",
            Self::PastDeadline => "past_deadline",
            Self::NotReplayable => "not_replayable",
        }
    }
}

/// A circuit breaker's state, as events report it ([`Event::CircuitChanged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls fail fast.
    Open,
    /// A bounded number of probes are admitted.
    HalfOpen,
    /// Held open by hand.
    ForcedOpen,
}

impl BreakerState {
    /// The label value: `closed`, `open`, `half_open`, `forced_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::ForcedOpen => "forced_open",
        }
    }

    /// Whether calls are refused in this state (open or forced open).
    pub fn refuses_calls(self) -> bool {
        matches!(self, Self::Open | Self::ForcedOpen)
    }
}

/// Why the server idempotency layer refused a request ([`Event::IdempotencyRefused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdempotencyRefusal {
    /// 409: the first request with this key is still running.
    InFlight,
    /// 422: the key was used with another request (method, path, query or body).
    KeyReused,
    /// 400: the route requires a key and none was sent.
    MissingKey,
    /// 400: the key is not 1 to 255 visible ASCII characters, or the request carries several
    /// different keys.
    InvalidKey,
}

impl IdempotencyRefusal {
    /// The label value: `in_flight`, `key_reused`, `missing_key`, `invalid_key`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InFlight => "in_flight",
            Self::KeyReused => "key_reused",
            Self::MissingKey => "missing_key",
            Self::InvalidKey => "invalid_key",
        }
    }
}

/// What happened to a webhook delivery ([`Event::WebhookReceived`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WebhookOutcome {
    /// Verified and queued; acknowledged with 200.
    Accepted,
    /// Verified, but already queued before; acknowledged with 200 and not queued again.
    Duplicate,
    /// Refused: source not allowed (403), signature, timestamp or headers wrong (400, 401),
    /// body too large (413) or unreadable (400); or 500 when the verifier failed to run.
    Rejected,
    /// Verified, but the queue is full: answered 503 so the sender delivers it again.
    QueueFull,
    /// Verified, but the queue failed: answered 503 so the sender delivers it again.
    QueueFailed,
}

impl WebhookOutcome {
    /// The label value: `accepted`, `duplicate`, `rejected`, `queue_full`, `queue_failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::Rejected => "rejected",
            Self::QueueFull => "queue_full",
            Self::QueueFailed => "queue_failed",
        }
    }
}

/// The `error.type` value of an [`ErrorKind`], after OpenTelemetry's convention: the status
/// code for an HTTP status (`"503"`), else a short name (`"timeout"`, `"connect"`, `"tls"`,
/// `"transport"`, `"rate_limited"`, `"auth"`, `"circuit_open"`, `"body"`, `"pagination"`,
/// `"config"`, or `"_OTHER"`).
pub fn error_type(kind: &ErrorKind) -> std::borrow::Cow<'static, str> {
    use std::borrow::Cow;
    Cow::Borrowed(match kind {
        ErrorKind::Server(s) | ErrorKind::Client(s) => return Cow::Owned(s.as_u16().to_string()),
        ErrorKind::Timeout => "timeout",
        ErrorKind::Connect => "connect",
        ErrorKind::Tls => "tls",
        ErrorKind::Transport => "transport",
        ErrorKind::RateLimited { .. } => "rate_limited",
        ErrorKind::Auth => "auth",
        ErrorKind::CircuitOpen { .. } => "circuit_open",
        ErrorKind::Body => "body",
        ErrorKind::Pagination => "pagination",
        ErrorKind::Config => "config",
        ErrorKind::Other => "_OTHER",
        #[allow(unreachable_patterns)]
        _ => "_OTHER",
    })
}

/// Splits an authority into host and port: `api.example.com:8443` gives
/// `("api.example.com", Some("8443"))`, `[::1]:80` gives `("::1", Some("80"))`.
pub fn split_authority(authority: &str) -> (&str, Option<&str>) {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(rest) = authority.strip_prefix('[') {
        // An IPv6 literal.
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':').filter(|p| !p.is_empty())),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host, Some(port))
        }
        _ => (authority, None),
    }
}

type HookFn = dyn Fn(&Event<'_>) + Send + Sync;

/// Where a layer sends its events: an optional callback (set with the layer's `on_event`), and,
/// with the `metrics` feature, the `metrics` recorder.
///
/// Cheap to clone (one `Arc`). The callback runs inline, on the task that caused the event,
/// with no lock of the layer held; keep it short (count, log, send to a channel).
#[derive(Clone, Default)]
pub struct EventHook(Option<Arc<HookFn>>);

impl EventHook {
    /// A hook that calls `f` with every event.
    pub fn new(f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// No callback (events still reach the `metrics` recorder when the feature is on).
    pub fn none() -> Self {
        Self(None)
    }

    /// Whether a callback is set.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Sends `event` to the `metrics` recorder (with the `metrics` feature) and to the callback.
    #[inline]
    pub fn emit(&self, event: &Event<'_>) {
        #[cfg(feature = "metrics")]
        record::record(event);
        if let Some(f) = &self.0 {
            f(event);
        }
    }
}

impl fmt::Debug for EventHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "EventHook(set)"
        } else {
            "EventHook(none)"
        })
    }
}

impl<F> From<F> for EventHook
where
    F: Fn(&Event<'_>) + Send + Sync + 'static,
{
    fn from(f: F) -> Self {
        Self::new(f)
    }
}

/// Registers the description and unit of every sturdy metric with the installed recorder. Call
/// it once, after installing the recorder (e.g. an exporter's `install`).
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn describe_metrics() {
    record::describe();
}

/// The one table of metric names, units and labels.
#[cfg(feature = "metrics")]
mod record {
    use metrics::{Label, Unit};

    use super::{error_type, split_authority, Event};
    use crate::headers::PauseSource;
    use crate::trace::DelaySource;

    pub(super) const RETRY_RETRIES: &str = "sturdy.retry.retries";
    pub(super) const RETRY_DELAY: &str = "sturdy.retry.delay";
    pub(super) const RETRY_STOPPED: &str = "sturdy.retry.stopped";
    pub(super) const RATELIMIT_WAITS: &str = "sturdy.ratelimit.waits";
    pub(super) const RATELIMIT_WAIT: &str = "sturdy.ratelimit.wait.duration";
    pub(super) const RATELIMIT_REFUSALS: &str = "sturdy.ratelimit.refusals";
    pub(super) const RATELIMIT_PAUSES: &str = "sturdy.ratelimit.pauses";
    pub(super) const RATELIMIT_PAUSE: &str = "sturdy.ratelimit.pause.duration";
    pub(super) const CIRCUIT_TRANSITIONS: &str = "sturdy.circuit.transitions";
    pub(super) const CIRCUIT_OPEN: &str = "sturdy.circuit.open";
    pub(super) const CIRCUIT_REJECTIONS: &str = "sturdy.circuit.rejections";
    pub(super) const TOKEN_FETCHES: &str = "sturdy.auth.token.fetches";
    pub(super) const TOKEN_FAILURES: &str = "sturdy.auth.token.failures";
    pub(super) const TOKEN_REJECTIONS: &str = "sturdy.auth.token.rejections";
    pub(super) const IDEMPOTENCY_REPLAYS: &str = "sturdy.idempotency.replays";
    pub(super) const IDEMPOTENCY_REFUSALS: &str = "sturdy.idempotency.refusals";
    pub(super) const WEBHOOK_DELIVERIES: &str = "sturdy.webhook.deliveries";
    pub(super) const HEDGE_SENT: &str = "sturdy.hedge.sent";
    pub(super) const HEDGE_WON: &str = "sturdy.hedge.won";
    pub(super) const CONCURRENCY_LIMIT: &str = "sturdy.concurrency.limit";
    pub(super) const CONCURRENCY_REJECTIONS: &str = "sturdy.concurrency.rejections";
    pub(super) const COALESCED: &str = "sturdy.coalesce.coalesced";

    const SERVER_ADDRESS: &str = "server.address";
    const SERVER_PORT: &str = "server.port";
    const METHOD: &str = "http.request.method";
    const STATUS: &str = "http.response.status_code";
    const ERROR_TYPE: &str = "error.type";

    /// `server.address` (in lower case: a host name is case-insensitive, and one host must be
    /// one label value) and `server.port` of a host, when there is one.
    fn server(labels: &mut Vec<Label>, host: Option<&str>) {
        if let Some(h) = host {
            let (address, port) = split_authority(h);
            labels.push(Label::new(SERVER_ADDRESS, address.to_ascii_lowercase()));
            if let Some(p) = port {
                labels.push(Label::new(SERVER_PORT, p.to_owned()));
            }
        }
    }

    /// OpenTelemetry's `http.request.method`: the known methods as they are, `_OTHER` for the
    /// rest (which would make the label unbounded).
    fn method(labels: &mut Vec<Label>, m: &http::Method) {
        let known = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        let value = known
            .iter()
            .find(|k| **k == m.as_str())
            .copied()
            .unwrap_or("_OTHER");
        labels.push(Label::from_static_parts(METHOD, value));
    }

    fn status(labels: &mut Vec<Label>, s: http::StatusCode) {
        labels.push(Label::new(STATUS, s.as_u16().to_string()));
    }

    fn secs(d: std::time::Duration) -> f64 {
        d.as_secs_f64()
    }

    pub(super) fn record(event: &Event<'_>) {
        let mut l = Vec::with_capacity(4);
        match *event {
            Event::RetryScheduled {
                host,
                method: m,
                reason,
                delay,
                source,
                ..
            } => {
                server(&mut l, Some(host));
                method(&mut l, m);
                let mut d = l.clone();
                l.push(Label::new(ERROR_TYPE, error_type(reason)));
                metrics::counter!(RETRY_RETRIES, l).increment(1);
                let source = match source {
                    DelaySource::RetryAfter => "retry_after",
                    DelaySource::RateLimit => "rate_limit",
                    DelaySource::Breaker => "breaker",
                    _ => "backoff",
                };
                d.push(Label::from_static_parts("sturdy.delay.source", source));
                metrics::histogram!(RETRY_DELAY, d).record(secs(delay));
            }
            Event::RetryStopped {
                host,
                method: m,
                reason,
                stop,
                ..
            } => {
                server(&mut l, Some(host));
                method(&mut l, m);
                l.push(Label::new(ERROR_TYPE, error_type(reason)));
                l.push(Label::from_static_parts(
                    "sturdy.retry.stop_reason",
                    stop.as_str(),
                ));
                metrics::counter!(RETRY_STOPPED, l).increment(1);
            }
            Event::RateLimitWaited { host, wait, .. } => {
                server(&mut l, host);
                metrics::counter!(RATELIMIT_WAITS, l.clone()).increment(1);
                metrics::histogram!(RATELIMIT_WAIT, l).record(secs(wait));
            }
            Event::RateLimitRefused { host, .. } => {
                server(&mut l, host);
                metrics::counter!(RATELIMIT_REFUSALS, l).increment(1);
            }
            Event::RateLimitPaused {
                host,
                status: s,
                source,
                pause,
                ..
            } => {
                server(&mut l, host);
                let source = match source {
                    Some(PauseSource::RetryAfter) => "retry_after",
                    Some(PauseSource::RateLimit) => "ratelimit",
                    Some(PauseSource::XRateLimit) => "x_ratelimit",
                    None => "default",
                };
                let d = l.clone();
                l.push(Label::from_static_parts("sturdy.pause.source", source));
                status(&mut l, s);
                metrics::counter!(RATELIMIT_PAUSES, l).increment(1);
                metrics::histogram!(RATELIMIT_PAUSE, d).record(secs(pause));
            }
            Event::CircuitChanged { host, to, .. } => {
                server(&mut l, host);
                let g = l.clone();
                l.push(Label::from_static_parts(
                    "sturdy.circuit.state",
                    to.as_str(),
                ));
                metrics::counter!(CIRCUIT_TRANSITIONS, l).increment(1);
                let open = if to.refuses_calls() { 1.0 } else { 0.0 };
                metrics::gauge!(CIRCUIT_OPEN, g).set(open);
            }
            Event::CircuitRejected { host, .. } => {
                server(&mut l, host);
                metrics::counter!(CIRCUIT_REJECTIONS, l).increment(1);
            }
            Event::TokenFetched { endpoint, .. } => {
                server(&mut l, Some(endpoint));
                metrics::counter!(TOKEN_FETCHES, l).increment(1);
            }
            Event::TokenFailed {
                endpoint, error, ..
            } => {
                server(&mut l, Some(endpoint));
                l.push(Label::new(ERROR_TYPE, error_type(error)));
                metrics::counter!(TOKEN_FAILURES, l).increment(1);
            }
            Event::TokenRejected { host } => {
                server(&mut l, Some(host));
                metrics::counter!(TOKEN_REJECTIONS, l).increment(1);
            }
            Event::IdempotentReplayed { method: m, .. } => {
                method(&mut l, m);
                metrics::counter!(IDEMPOTENCY_REPLAYS, l).increment(1);
            }
            Event::IdempotencyRefused {
                method: m,
                refusal,
                status: s,
            } => {
                method(&mut l, m);
                status(&mut l, s);
                l.push(Label::from_static_parts(ERROR_TYPE, refusal.as_str()));
                metrics::counter!(IDEMPOTENCY_REFUSALS, l).increment(1);
            }
            Event::WebhookReceived {
                route,
                scheme,
                outcome,
                status: s,
            } => {
                l.push(Label::new("sturdy.webhook.route", route.to_owned()));
                l.push(Label::new("sturdy.webhook.scheme", scheme.to_owned()));
                l.push(Label::from_static_parts(
                    "sturdy.webhook.outcome",
                    outcome.as_str(),
                ));
                status(&mut l, s);
                metrics::counter!(WEBHOOK_DELIVERIES, l).increment(1);
            }
            Event::HedgeSent { host, .. } => {
                server(&mut l, host);
                metrics::counter!(HEDGE_SENT, l).increment(1);
            }
            Event::HedgeWon { host, .. } => {
                server(&mut l, host);
                metrics::counter!(HEDGE_WON, l).increment(1);
            }
            Event::ConcurrencyLimitChanged { host, to, .. } => {
                server(&mut l, host);
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!(CONCURRENCY_LIMIT, l).set(to as f64);
            }
            Event::ConcurrencyRejected { host, .. } => {
                server(&mut l, host);
                metrics::counter!(CONCURRENCY_REJECTIONS, l).increment(1);
            }
            Event::Coalesced {
                host, method: m, ..
            } => {
                server(&mut l, host);
                method(&mut l, m);
                metrics::counter!(COALESCED, l).increment(1);
            }
        }
    }

    pub(super) fn describe() {
        use metrics::{describe_counter, describe_gauge, describe_histogram};
        describe_counter!(
            RETRY_RETRIES,
            Unit::Count,
            "Attempts that failed and were retried, by error.type"
        );
        describe_histogram!(
            RETRY_DELAY,
            Unit::Seconds,
            "Time waited before a retry (backoff or the server's Retry-After)"
        );
        describe_counter!(
            RETRY_STOPPED,
            Unit::Count,
            "Retryable failures that were not retried, by sturdy.retry.stop_reason"
        );
        describe_counter!(
            RATELIMIT_WAITS,
            Unit::Count,
            "Calls that waited for a rate-limit slot or the end of a pause"
        );
        describe_histogram!(
            RATELIMIT_WAIT,
            Unit::Seconds,
            "Expected wait of a call that waited for the rate limit"
        );
        describe_counter!(
            RATELIMIT_REFUSALS,
            Unit::Count,
            "Calls refused by the rate limiter without being sent"
        );
        describe_counter!(
            RATELIMIT_PAUSES,
            Unit::Count,
            "Pauses a server asked for (429, Retry-After, RateLimit headers)"
        );
        describe_histogram!(
            RATELIMIT_PAUSE,
            Unit::Seconds,
            "Length of the pauses applied"
        );
        describe_counter!(
            CIRCUIT_TRANSITIONS,
            Unit::Count,
            "Circuit breaker state changes, by the state entered"
        );
        describe_gauge!(
            CIRCUIT_OPEN,
            Unit::Count,
            "1 while a breaker refuses calls (open or forced open), else 0"
        );
        describe_counter!(
            CIRCUIT_REJECTIONS,
            Unit::Count,
            "Calls refused at once by an open circuit breaker"
        );
        describe_counter!(
            TOKEN_FETCHES,
            Unit::Count,
            "Access tokens fetched from a token endpoint"
        );
        describe_counter!(
            TOKEN_FAILURES,
            Unit::Count,
            "Failed token requests, by error.type"
        );
        describe_counter!(
            TOKEN_REJECTIONS,
            Unit::Count,
            "401 answers to a cached token, each followed by a refresh and one replay"
        );
        describe_counter!(
            IDEMPOTENCY_REPLAYS,
            Unit::Count,
            "Repeated requests answered with the stored response"
        );
        describe_counter!(
            IDEMPOTENCY_REFUSALS,
            Unit::Count,
            "Requests refused by the server idempotency layer (409, 422, 400), by error.type"
        );
        describe_counter!(
            WEBHOOK_DELIVERIES,
            Unit::Count,
            "Webhook deliveries answered, by sturdy.webhook.outcome"
        );
        describe_counter!(HEDGE_SENT, Unit::Count, "Second copies of slow calls sent");
        describe_counter!(HEDGE_WON, Unit::Count, "Second copies that answered first");
        describe_gauge!(
            CONCURRENCY_LIMIT,
            Unit::Count,
            "Calls a key may have in flight, as the adaptive limit set it last"
        );
        describe_counter!(
            CONCURRENCY_REJECTIONS,
            Unit::Count,
            "Calls refused by the adaptive concurrency limit"
        );
        describe_counter!(
            COALESCED,
            Unit::Count,
            "Calls that shared the outcome of an identical call in flight"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(
            split_authority("api.example.com"),
            ("api.example.com", None)
        );
        assert_eq!(
            split_authority("api.example.com:8443"),
            ("api.example.com", Some("8443"))
        );
        assert_eq!(split_authority("[::1]:80"), ("::1", Some("80")));
        assert_eq!(split_authority("[::1]"), ("::1", None));
        assert_eq!(split_authority("u:p@h.example:1"), ("h.example", Some("1")));
        assert_eq!(split_authority(""), ("", None));
        assert_eq!(split_authority("weird:"), ("weird:", None));
    }

    #[test]
    fn error_types_follow_the_convention() {
        assert_eq!(
            error_type(&ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)),
            "503"
        );
        assert_eq!(error_type(&ErrorKind::Timeout), "timeout");
        assert_eq!(
            error_type(&ErrorKind::RateLimited { retry_after: None }),
            "rate_limited"
        );
        assert_eq!(error_type(&ErrorKind::Other), "_OTHER");
    }

    #[test]
    fn a_hook_without_callback_does_nothing_and_debug_hides_it() {
        let h = EventHook::none();
        assert!(!h.is_set());
        h.emit(&Event::TokenRejected { host: "h" });
        assert_eq!(format!("{h:?}"), "EventHook(none)");
        let h = EventHook::new(|_| {});
        assert!(h.is_set());
        assert_eq!(format!("{h:?}"), "EventHook(set)");
    }
}
