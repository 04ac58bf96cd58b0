use std::fmt;
use std::time::Duration;

use http::StatusCode;

use crate::human_duration;

/// A type-erased error, the same type as tower's `BoxError`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong, in the terms every sturdy layer shares.
///
/// [`ErrorKind::is_retryable`] is the one answer to "may this be tried again?"; retry and the
/// circuit breaker both ask it (through [`crate::classify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Credentials are missing, wrong or expired, or the token endpoint refused them.
    Auth,
    /// The server or a local limiter asked us to wait.
    RateLimited {
        /// How long to wait, when known.
        retry_after: Option<Duration>,
    },
    /// A circuit breaker is open; the dependency was not called.
    CircuitOpen {
        /// When the breaker will admit a probe again.
        retry_in: Duration,
    },
    /// An attempt or the whole call ran out of time.
    Timeout,
    /// The connection could not be made; the request never left. For a store (Redis), also a
    /// command the server refused to run for now (failing over, loading its data) when no
    /// earlier try of it can have run: nothing ran.
    Connect,
    /// The server's TLS certificate was not trusted (unknown issuer, expired, another name): the
    /// request never left, and trying again will not help until the certificate or the trusted
    /// roots change.
    Tls,
    /// The connection broke after the request may have been sent (reset, closed early, or
    /// dropped with the runtime whose task ran it).
    Transport,
    /// The server answered with a 5xx status (or one past 599, which no standard defines).
    Server(StatusCode),
    /// The server answered with a 4xx status.
    Client(StatusCode),
    /// A body could not be read, was too large, or was not what was expected.
    Body,
    /// A pagination guard stopped a walk (loop, foreign origin, bound reached, bad page).
    Pagination,
    /// The configuration is invalid.
    Config,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Whether trying again may succeed: 408, 425, 429, 500, 502, 503, 504, connect and transport
    /// errors, and timeouts. Everything else is permanent. 401 is for the auth layer, never for a
    /// blind retry, so it is not retryable here.
    ///
    /// Whether a retry is *safe* (non-idempotent methods) is a separate question that the retry
    /// layer answers with the request in hand; whether a failed call may have been processed is
    /// answered for the whole call by [`delivery`](crate::classify::delivery).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout | Self::Connect | Self::Transport => true,
            Self::RateLimited { .. } => true,
            Self::Server(s) | Self::Client(s) => crate::classify::is_retryable_status(*s),
            Self::Auth
            | Self::Tls
            | Self::CircuitOpen { .. }
            | Self::Body
            | Self::Pagination
            | Self::Config
            | Self::Other => false,
        }
    }

    /// Whether this kind says the dependency itself is unhealthy, which is what a circuit
    /// breaker counts: timeouts (a 408 status among them), connect, TLS and transport errors, 5xx
    /// statuses, and errors nobody recognises. Rate limits, other 4xx statuses, auth, open
    /// circuits, bodies, configuration and pagination are not.
    pub fn is_dependency_failure(&self) -> bool {
        matches!(
            self,
            Self::Timeout
                | Self::Connect
                | Self::Tls
                | Self::Transport
                | Self::Server(_)
                | Self::Other
        )
    }

    /// The kind of an HTTP status, or `None` for an informational, success or redirect status
    /// (1xx, 2xx, 3xx). 401 is `Auth`, 408 `Timeout`, 429 `RateLimited`. A status past 599,
    /// which no standard defines (hyper reads 600 to 999 from a peer), is `Server`, as RFC 9110
    /// asks a client to treat it: never a success.
    pub fn from_status(status: StatusCode) -> Option<Self> {
        if status == StatusCode::UNAUTHORIZED {
            Some(Self::Auth)
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            Some(Self::RateLimited { retry_after: None })
        } else if status == StatusCode::REQUEST_TIMEOUT {
            Some(Self::Timeout)
        } else if status.as_u16() >= 500 {
            Some(Self::Server(status))
        } else if status.is_client_error() {
            Some(Self::Client(status))
        } else {
            None
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auth => f.write_str("authentication failed; check the credentials"),
            Self::RateLimited {
                retry_after: Some(d),
            } => write!(f, "rate limited; retry after {}", human_duration(*d)),
            Self::RateLimited { retry_after: None } => f.write_str("rate limited"),
            Self::CircuitOpen { retry_in } => write!(
                f,
                "circuit open; the dependency is failing, next try in {}",
                human_duration(*retry_in)
            ),
            Self::Timeout => f.write_str("timed out"),
            Self::Connect => f.write_str("could not connect"),
            Self::Tls => f.write_str("the server's TLS certificate is not trusted"),
            Self::Transport => {
                f.write_str("the connection broke; the request may or may not have been processed")
            }
            Self::Server(s) => write!(f, "server error {s}"),
            Self::Client(s) => write!(
                f,
                "request rejected with {s}; it must be changed before it can succeed"
            ),
            Self::Body => f.write_str("body error"),
            Self::Pagination => f.write_str("pagination stopped"),
            Self::Config => f.write_str("invalid configuration"),
            Self::Other => f.write_str("request failed"),
        }
    }
}

/// Whether a failed call may have reached the server's handler.
///
/// This is the question to ask before sending a non-idempotent request again: after
/// [`Delivery::NotSent`] it may be sent again (even with a new idempotency key); after
/// [`Delivery::MaybeProcessed`] it may only be retried with the *same* idempotency key, or the
/// server may act twice. Ask it of any error with [`crate::classify::delivery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Delivery {
    /// No attempt of the call reached the server: each was refused before it left (connect
    /// error, untrusted certificate, open circuit, local rate limit, no token, an invalid
    /// request).
    NotSent,
    /// At least one attempt reached the server, or may have: it answered (any status, even a
    /// 4xx), or the call timed out, or a connection broke after the request was written, or an
    /// error nobody recognises. Said conservatively: the request may well not have been acted on.
    MaybeProcessed,
}

impl Delivery {
    /// Whether this is [`Delivery::NotSent`].
    pub fn proves_not_sent(self) -> bool {
        self == Self::NotSent
    }
}

/// What a whole call did, as the client knows it: attached by the retry layer to the error it
/// finally returns, so that the error speaks for every attempt and not only the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallReport {
    attempts: u32,
    delivery: Delivery,
    idempotency_key: Option<String>,
    /// The request carried a key, shown in `idempotency_key` or not (bytes that are not UTF-8).
    key_carried: bool,
}

impl CallReport {
    /// A report of `attempts` attempts (0 when none was sent: a call that ended while it waited,
    /// or whose every try was refused before it left).
    pub fn new(attempts: u32, delivery: Delivery, idempotency_key: Option<String>) -> Self {
        Self {
            attempts,
            delivery,
            key_carried: idempotency_key.is_some(),
            idempotency_key,
        }
    }

    /// Records whether the request carried an idempotency key, also when
    /// [`idempotency_key`](Self::idempotency_key) is `None` because its bytes are not UTF-8 text;
    /// advice built from the report (such as [`ErrorSummary::advice`](crate::ErrorSummary::advice))
    /// then says to send the call again with that key, not to check first. A report with a key
    /// stays one that carried it.
    #[must_use]
    pub fn with_key_carried(mut self, carried: bool) -> Self {
        self.key_carried = carried || self.idempotency_key.is_some();
        self
    }

    /// Whether the request carried an idempotency key, shown by
    /// [`idempotency_key`](Self::idempotency_key) or not.
    pub fn carried_idempotency_key(&self) -> bool {
        self.key_carried
    }

    /// How many attempts were made (sent on, past every layer that holds or refuses calls), the
    /// first included. These are the retry layer's attempts: a hedged attempt's copies (each an
    /// attempt to the breaker and the limits below the hedge layer) count as one here.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether any attempt may have been processed.
    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// The idempotency key every attempt carried, if the request had one. Retry with this key
    /// (never a new one) when [`delivery`](Self::delivery) is [`Delivery::MaybeProcessed`].
    ///
    /// `None` also for a key whose bytes are not UTF-8 text (a header value may hold any byte
    /// but a control character): the error's message then says to retry with the key the
    /// request carried, which the caller built.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }
}

/// An error with a [`kind`](Error::kind), a message and an optional source.
///
/// Layers use it for failures they explain themselves ("gave up after 4 attempts: connection
/// reset by peer"). Find it in a `BoxError` with `err.downcast_ref::<sturdy_core::Error>()`, or
/// anywhere in a chain of errors with [`find`](crate::find).
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
    /// Whether `Display` appends the source's text (off when the message already names the
    /// cause in better words).
    show_source: bool,
    delivery: Option<Delivery>,
    report: Option<Box<CallReport>>,
    /// The failure is not the destination's (see [`Error::with_cause_elsewhere`]).
    elsewhere: bool,
    /// An error that came with the cause without being its source (see [`Error::with_related`]).
    related: Option<BoxError>,
    /// When trying again may succeed, as this side knows it (see [`Error::with_retry_after`]).
    retry_after: Option<std::time::Duration>,
}

impl Error {
    /// A new error of `kind` with a message for people.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
            show_source: true,
            delivery: None,
            report: None,
            elsewhere: false,
            related: None,
            retry_after: None,
        }
    }

    /// Attaches the underlying cause; `Display` shows `message: cause`.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Attaches the underlying cause, reachable through `source()`, without repeating its text
    /// in `Display` (for a message that already says what the cause means).
    #[must_use]
    pub fn with_hidden_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self.show_source = false;
        self
    }

    /// Attaches an error that came with the cause without being its source: the retry layer's
    /// error for a call whose attempt failed (its source) and whose retry was then refused below
    /// (related), say. [`find`] looks through it after the source chain, so both are found;
    /// `source()` does not return it, and `Display` does not show it.
    ///
    /// ```
    /// use std::io;
    /// use std::time::Duration;
    /// use sturdy_core::{find, BoxError, CircuitOpen, Error, ErrorKind};
    ///
    /// let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
    /// let err: BoxError = Box::new(
    ///     Error::new(ErrorKind::Transport, "reset; the retry was refused")
    ///         .with_hidden_source(reset)
    ///         .with_related(CircuitOpen::new("api.example.com", Duration::from_secs(30))),
    /// );
    /// assert!(find::<io::Error>(&*err).is_some());
    /// assert_eq!(find::<CircuitOpen>(&*err).unwrap().retry_in(), Duration::from_secs(30));
    /// assert!(std::error::Error::source(&*err).unwrap().is::<io::Error>());
    /// ```
    #[must_use]
    pub fn with_related(mut self, related: impl Into<BoxError>) -> Self {
        self.related = Some(related.into());
        self
    }

    /// The error attached with [`with_related`](Self::with_related), if any.
    pub fn related(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.related.as_deref()
    }

    /// States whether the failed request may have reached the server; see [`Delivery`]. Layers
    /// that refuse a call before sending it mark their errors [`Delivery::NotSent`].
    #[must_use]
    pub fn with_delivery(mut self, delivery: Delivery) -> Self {
        self.delivery = Some(delivery);
        self
    }

    /// States that the failure is not the destination's: the request was stopped on this side
    /// (a full concurrency limit) or by another dependency (the token endpoint that should have
    /// given it a token). A circuit breaker does not count such an error for or against the
    /// destination; see [`crate::classify::concerns_destination`].
    #[must_use]
    pub fn with_cause_elsewhere(mut self) -> Self {
        self.elsewhere = true;
        self
    }

    /// Whether [`with_cause_elsewhere`](Self::with_cause_elsewhere) was said of this error.
    pub fn cause_is_elsewhere(&self) -> bool {
        self.elsewhere
    }

    /// States how long trying again is pointless, for a wait this side knows that no server,
    /// limiter or breaker named: a token source backing off after its endpoint failed, say.
    /// [`ErrorSummary`](crate::ErrorSummary) gives it as `retry_after_ms` when nothing in the
    /// chain said otherwise.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sturdy_core::{BoxError, Error, ErrorKind, ErrorSummary};
    ///
    /// let err: BoxError = Box::new(
    ///     Error::new(ErrorKind::Connect, "the token endpoint is not asked again for 1s")
    ///         .with_retry_after(Duration::from_secs(1)),
    /// );
    /// assert_eq!(ErrorSummary::of(&*err).retry_after_ms, Some(1_000));
    /// ```
    #[must_use]
    pub fn with_retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// The wait stated with [`with_retry_after`](Self::with_retry_after), if any.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    /// Attaches the report of the whole call (which also states its delivery).
    #[must_use]
    pub fn with_report(mut self, report: CallReport) -> Self {
        self.delivery = Some(report.delivery);
        self.report = Some(Box::new(report));
        self
    }

    /// What went wrong (for a call that was retried: on its last attempt).
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The message, without the source's text.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Shorthand for `self.kind().is_retryable()`.
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// What this error states about delivery, if it states anything; see
    /// [`crate::classify::delivery`] for the answer about any error.
    pub fn delivery(&self) -> Option<Delivery> {
        self.delivery
    }

    /// The report of the whole call, on the error a retry layer finally returns.
    pub fn report(&self) -> Option<&CallReport> {
        self.report.as_deref()
    }

    /// The idempotency key of the call, when the report has one.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.report.as_ref().and_then(|r| r.idempotency_key())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .field("delivery", &self.delivery)
            .field("report", &self.report)
            .field("elsewhere", &self.elsewhere)
            .field("related", &self.related)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let (Some(src), true) = (&self.source, self.show_source) {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// The most links of an error's `source()` chain that sturdy reads ([`chain`]).
pub const MAX_CHAIN: usize = 1_024;

/// `err` itself, then its `source()`s, at most [`MAX_CHAIN`] links: an error type whose
/// `source()` returns itself (or loops back further down) ends there instead of holding the
/// caller for ever. Every walk of an error chain in sturdy (classification, [`find`], the words
/// of messages, [`ErrorSummary`](crate::summary::ErrorSummary)) goes through this.
///
/// ```
/// use std::fmt;
/// use sturdy_core::chain;
///
/// #[derive(Debug)]
/// struct Loop;
/// impl fmt::Display for Loop {
///     fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
///         f.write_str("its own cause")
///     }
/// }
/// impl std::error::Error for Loop {
///     fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
///         Some(self)
///     }
/// }
/// assert_eq!(chain(&Loop).count(), sturdy_core::MAX_CHAIN);
/// ```
pub fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source()).take(MAX_CHAIN)
}

/// The first error of type `T` in `err`'s chain (`err` itself, then its `source()`s), then in
/// the chains of the errors attached to it with [`Error::with_related`].
///
/// Layers wrap what they cannot fix (the retry layer's final error is a [`Error`] whose source is
/// the last attempt's error), so look for a type with this rather than with a single
/// `downcast_ref`:
///
/// ```
/// use std::time::Duration;
/// use sturdy_core::{find, BoxError, Error, ErrorKind, RateLimited};
///
/// let err: BoxError = Box::new(
///     Error::new(ErrorKind::RateLimited { retry_after: None }, "gave up after 4 attempts")
///         .with_source(RateLimited::new(Duration::from_secs(30))),
/// );
/// assert_eq!(find::<RateLimited>(&*err).unwrap().retry_after(), Duration::from_secs(30));
/// assert!(find::<Error>(&*err).is_some());
/// ```
pub fn find<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    if let Some(t) = chain(err).find_map(|e| e.downcast_ref::<T>()) {
        return Some(t);
    }
    // Then what came with the cause, looked through only when the chain itself has no `T`.
    chain(err)
        .filter_map(|e| e.downcast_ref::<Error>().and_then(Error::related))
        .find_map(|related| find::<T>(related))
}

/// In an error's `source()` chain: the attempt failed only because the caller that was sending
/// it went away (a reqwest-middleware call whose future was dropped takes the rest of its chain
/// with it), not because of the request or the server. The coalescing layer reads it: callers
/// that joined a shared call whose sending caller left send their own request instead of
/// failing. Find it with [`find`].
///
/// ```
/// use sturdy_core::{find, DriverGone, Error, ErrorKind};
///
/// let err = Error::new(ErrorKind::Other, "the call that sent this attempt ended")
///     .with_hidden_source(DriverGone);
/// assert!(find::<DriverGone>(&err).is_some());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverGone;

impl fmt::Display for DriverGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the caller that was sending this attempt went away")
    }
}

impl std::error::Error for DriverGone {}

/// The call was not made (or not retried) because of a rate limit: a server's 429 or
/// `Retry-After`, a quota header, or a local limiter that could not grant a permit in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    retry_after: Duration,
    scope: Option<String>,
}

impl RateLimited {
    /// A rate limit that lifts after `retry_after`.
    pub fn new(retry_after: Duration) -> Self {
        Self {
            retry_after,
            scope: None,
        }
    }

    /// Names what is limited (usually the host), for the message.
    #[must_use]
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// How long to wait before trying again.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// What is limited, if known.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Some(s) => write!(f, "rate limited by {s}")?,
            None => f.write_str("rate limited")?,
        }
        write!(f, "; retry after {}", human_duration(self.retry_after))
    }
}

impl std::error::Error for RateLimited {}

/// Why a circuit breaker refused a call; see [`CircuitOpen::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OpenReason {
    /// The dependency has been failing: the breaker opened and waits before it probes again.
    Failing,
    /// The breaker is half-open and its probe calls are out, testing whether the dependency has
    /// recovered; other calls are refused until they answer.
    Probing,
    /// The breaker was forced open through its handle, and stays open until it is released.
    Forced,
    /// The key shares the overflow breaker (past the most breakers kept), and that breaker has
    /// been failing: hosts that failed and hosts that did not are refused together.
    Overflow,
}

/// The circuit breaker for a dependency is open: the call was not made.
///
/// ```
/// use std::time::Duration;
/// use sturdy_core::{CircuitOpen, OpenReason};
///
/// let e = CircuitOpen::new("api.example.com", Duration::from_secs(12));
/// assert_eq!(e.reason(), OpenReason::Failing);
/// let probing = CircuitOpen::new("api.example.com", Duration::ZERO).with_reason(OpenReason::Probing);
/// assert!(probing.to_string().contains("probe"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitOpen {
    retry_in: Duration,
    key: String,
    reason: OpenReason,
}

impl CircuitOpen {
    /// The breaker for `key` is open because the dependency has been failing
    /// ([`OpenReason::Failing`]), and admits a probe again in `retry_in`.
    pub fn new(key: impl Into<String>, retry_in: Duration) -> Self {
        Self {
            retry_in,
            key: key.into(),
            reason: OpenReason::Failing,
        }
    }

    /// The same refusal, for another reason.
    #[must_use]
    pub fn with_reason(mut self, reason: OpenReason) -> Self {
        self.reason = reason;
        self
    }

    /// When the breaker admits a probe again: zero while probes are out (try again once they
    /// have answered), the longest open period for a forced breaker.
    pub fn retry_in(&self) -> Duration {
        self.retry_in
    }

    /// Which breaker (usually the host); for [`OpenReason::Overflow`], the key of the refused
    /// call.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Why the call was refused.
    pub fn reason(&self) -> OpenReason {
        self.reason
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (key, wait) = (&self.key, human_duration(self.retry_in));
        match self.reason {
            OpenReason::Failing => write!(
                f,
                "circuit open for {key}: it has been failing, so it was not called; try again in {wait}"
            ),
            OpenReason::Probing => write!(
                f,
                "circuit half-open for {key}: probe calls are testing whether it has recovered, so \
                 this call was not made; try again once they have answered"
            ),
            OpenReason::Forced => write!(
                f,
                "circuit for {key} is forced open through its handle, so it was not called; it \
                 stays open until the handle releases it"
            ),
            OpenReason::Overflow => write!(
                f,
                "circuit open for {key}: it shares the overflow breaker of the hosts past the \
                 most breakers kept, and that breaker has been failing, so it was not called; \
                 try again in {wait}"
            ),
        }
    }
}

impl std::error::Error for CircuitOpen {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let e = RateLimited::new(Duration::from_secs(30)).with_scope("api.example.com");
        assert_eq!(
            e.to_string(),
            "rate limited by api.example.com; retry after 30s"
        );
        let e = CircuitOpen::new("api.example.com", Duration::from_secs(12));
        assert_eq!(
            e.to_string(),
            "circuit open for api.example.com: it has been failing, so it was not called; try again in 12s"
        );
        let e = Error::new(
            ErrorKind::Server(StatusCode::BAD_GATEWAY),
            "gave up after 4 attempts",
        )
        .with_source(RateLimited::new(Duration::from_secs(1)));
        assert_eq!(
            e.to_string(),
            "gave up after 4 attempts: rate limited; retry after 1s"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn retryable_kinds() {
        for s in [408u16, 425, 429, 500, 502, 503, 504] {
            let k = ErrorKind::from_status(StatusCode::from_u16(s).unwrap()).unwrap();
            assert!(k.is_retryable(), "{s}");
        }
        for s in [400u16, 401, 403, 404, 409, 422, 501, 505] {
            let k = ErrorKind::from_status(StatusCode::from_u16(s).unwrap()).unwrap();
            assert!(!k.is_retryable(), "{s}");
        }
        assert!(ErrorKind::from_status(StatusCode::OK).is_none());
    }
}
