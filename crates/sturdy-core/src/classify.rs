//! One classification of outcomes, shared by retry and circuit breaking.
//!
//! | outcome | statuses and errors |
//! |---|---|
//! | [`Outcome::Success`] | 1xx, 2xx, 3xx |
//! | [`Outcome::Retryable`] | 408, 425, 429, 500, 502, 503, 504; connect and transport errors; timeouts |
//! | [`Outcome::Unauthorized`] | 401: for the auth layer, never for a blind retry |
//! | [`Outcome::Permanent`] | every other 4xx, 501, 505 and other 5xx, an untrusted TLS certificate, configuration and unknown errors |
//!
//! Errors are classified by walking their `source()` chain, so a hyper-util connect error
//! wrapped in a timeout wrapped in a `BoxError` still reads as [`ErrorKind::Connect`].
//!
//! [`Classify`] is the one hook for "what counts as a failure": the retry layer retries what it
//! calls [`Outcome::Retryable`], and the circuit breaker counts what [`Outcome::is_failure`]
//! says. Both take any `Fn(&Result<Response<B>, E>) -> Outcome`, usually a closure that decides
//! a few cases and leaves the rest to [`classify_result`]:
//!
//! ```
//! use http::{Response, StatusCode};
//! use sturdy_core::classify::{classify_result, Classify, Outcome};
//! use sturdy_core::{BoxError, ErrorKind};
//!
//! // This API answers 409 when a resource is briefly locked: worth trying again. And it reports
//! // some failures as a 200 with an `x-error` header.
//! let classify = |r: &Result<Response<()>, BoxError>| match r {
//!     Ok(res) if res.status() == StatusCode::CONFLICT => Outcome::Retryable(ErrorKind::Client(StatusCode::CONFLICT)),
//!     Ok(res) if res.headers().contains_key("x-error") => Outcome::Retryable(ErrorKind::Server(StatusCode::INTERNAL_SERVER_ERROR)),
//!     other => classify_result(other),
//! };
//! let conflict = Response::builder().status(409).body(()).unwrap();
//! assert!(classify.classify(&Ok(conflict)).is_retryable());
//! let hidden = Response::builder().header("x-error", "db down").body(()).unwrap();
//! assert!(classify.classify(&Ok(hidden)).is_failure());
//! ```
//!
//! | outcome | retried by the retry layer | counted by the circuit breaker |
//! |---|---|---|
//! | `Success` | no | as a success |
//! | `Retryable(kind)` | yes (when the method or an idempotency key makes it safe) | as a failure when [`ErrorKind::is_dependency_failure`] |
//! | `Unauthorized` | no (the auth layer refreshes and replays once) | no |
//! | `Permanent(kind)` | no | as a failure when [`ErrorKind::is_dependency_failure`] |

use std::error::Error as StdError;
use std::io;

use http::{Response, StatusCode};
use tower::load_shed::error::Overloaded;

use crate::error::{BoxError, CircuitOpen, Delivery, ErrorKind, RateLimited};

/// What an outcome means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It worked.
    Success,
    /// It failed in a way that trying again may fix.
    Retryable(ErrorKind),
    /// The credentials were refused (401).
    Unauthorized,
    /// It failed in a way that trying again will not fix.
    Permanent(ErrorKind),
}

impl Outcome {
    /// Whether this is [`Outcome::Success`].
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Success)
    }

    /// Whether this is [`Outcome::Retryable`].
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }

    /// Whether the outcome says the dependency is unhealthy, which is what a circuit breaker
    /// counts: a retryable or permanent outcome whose kind
    /// [is a dependency failure](ErrorKind::is_dependency_failure) (5xx, timeouts, connect, TLS and
    /// transport errors, unrecognised errors, and a 408, which reads as a timeout). Other 4xx, 429
    /// and 401 are the caller's business.
    pub fn is_failure(&self) -> bool {
        match self {
            Self::Retryable(k) | Self::Permanent(k) => k.is_dependency_failure(),
            Self::Success | Self::Unauthorized => false,
        }
    }

    /// The error kind, for anything but a success.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Success => None,
            Self::Unauthorized => Some(ErrorKind::Auth),
            Self::Retryable(k) | Self::Permanent(k) => Some(k.clone()),
        }
    }

    fn from_kind(kind: ErrorKind) -> Self {
        if kind == ErrorKind::Auth {
            Self::Unauthorized
        } else if kind.is_retryable() {
            Self::Retryable(kind)
        } else {
            Self::Permanent(kind)
        }
    }
}

/// Whether a status is one that trying again may fix: 408, 425, 429, 500, 502, 503, 504.
pub fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 425 | 429 | 500 | 502 | 503 | 504)
}

/// Classifies a response status.
pub fn classify_status(status: StatusCode) -> Outcome {
    ErrorKind::from_status(status).map_or(Outcome::Success, Outcome::from_kind)
}

/// Classifies an error by walking its `source()` chain.
///
/// The first link that says something decides: sturdy's own errors, tower and tokio timeouts,
/// a body read past its limit ([`ErrorKind::Body`]), hyper-util's connect errors, hyper's
/// errors, then `std::io::Error` kinds. An error nobody recognises is [`ErrorKind::Other`],
/// which is not retried.
pub fn classify_error(err: &(dyn StdError + 'static)) -> ErrorKind {
    // Whether an error above said the connection was made (a hyper-util error that is not a
    // connect error, or hyper's own): an io error below it that could also mean "never
    // connected" (host unreachable, say: what Linux reports when an established connection's
    // retransmissions meet an ICMP unreachable) then broke a connection that may have carried
    // the request.
    let mut connected = false;
    for e in crate::error::chain(err) {
        if let Some(kind) = kind_of(e) {
            return match kind {
                ErrorKind::Connect if connected && e.is::<io::Error>() => ErrorKind::Transport,
                kind => kind,
            };
        }
        connected |= e
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(|h| !h.is_connect())
            || e.is::<hyper::Error>();
    }
    ErrorKind::Other
}

fn kind_of(e: &(dyn StdError + 'static)) -> Option<ErrorKind> {
    if let Some(e) = e.downcast_ref::<crate::Error>() {
        return Some(e.kind().clone());
    }
    if let Some(e) = e.downcast_ref::<RateLimited>() {
        return Some(ErrorKind::RateLimited {
            retry_after: Some(e.retry_after()),
        });
    }
    if let Some(e) = e.downcast_ref::<CircuitOpen>() {
        return Some(ErrorKind::CircuitOpen {
            retry_in: e.retry_in(),
        });
    }
    if e.is::<tower::timeout::error::Elapsed>() || e.is::<tokio::time::error::Elapsed>() {
        return Some(ErrorKind::Timeout);
    }
    // A body read past its limit (`body::buffer`'s `TooLarge`) is a body error, not an unknown
    // one; a body stream that failed says more through its cause.
    if let Some(b) = e.downcast_ref::<crate::body::BodyError>() {
        return b.is_too_large().then_some(ErrorKind::Body);
    }
    if let Some(h) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
        if h.is_connect() {
            if untrusted_certificate(e) {
                return Some(ErrorKind::Tls);
            }
            return Some(ErrorKind::Connect);
        }
        // Otherwise the cause (a hyper or io error) says more.
        return None;
    }
    if let Some(e) = e.downcast_ref::<hyper::Error>() {
        if e.is_timeout() {
            return Some(ErrorKind::Timeout);
        }
        if e.is_incomplete_message()
            || e.is_canceled()
            || e.is_closed()
            || e.is_parse()
            || dispatch_gone(e)
        {
            return Some(ErrorKind::Transport);
        }
        if e.is_body_write_aborted() || e.is_user() {
            return Some(ErrorKind::Other);
        }
        // The connection's own reads failed on data they could not take (a corrupt TLS record,
        // a fatal alert): the connection broke, as by a reset. (An `InvalidData` elsewhere, such
        // as a body's, stays `Other`.)
        if let Some(io) = e
            .source()
            .and_then(|s| s.downcast_ref::<io::Error>())
            .filter(|io| io.kind() == io::ErrorKind::InvalidData)
        {
            // Except a server's refusal of the handshake: with TLS 1.3 the client's side of the
            // handshake ends first, so the request is written before the server has checked
            // the client (its certificate, for one), and the refusal arrives as the answer.
            // The server never read the request: it was not sent.
            if handshake_refused(&io.to_string()) {
                return Some(ErrorKind::Connect);
            }
            return Some(ErrorKind::Transport);
        }
        return None;
    }
    if let Some(e) = e.downcast_ref::<io::Error>() {
        return Some(match e.kind() {
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NotConnected => ErrorKind::Connect,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => ErrorKind::Transport,
            io::ErrorKind::TimedOut => ErrorKind::Timeout,
            _ => ErrorKind::Other,
        });
    }
    None
}

/// Whether hyper says the task that ran the connection was dropped with the request in its
/// hands: the runtime that task was spawned on shut down (a client kept across runtimes, as a
/// `static` one used by several `#[tokio::test]`s is, can take a pooled connection from one
/// that is shutting down), or the task panicked. The connection is gone as by a reset, and the
/// request may have been written before it went. hyper files it under its user errors with no
/// method of its own to ask; its text ("dispatch task is gone", from hyper 1.0 on) is the one
/// way to tell it, so it is matched here only.
fn dispatch_gone(e: &hyper::Error) -> bool {
    e.is_user() && e.to_string() == "dispatch task is gone"
}

/// Whether a TLS error's text is a fatal alert by which a server refuses the handshake (rustls
/// writes `received fatal alert: <name>`): one about the client's certificate, access denied,
/// a failed handshake, or a client `Finished` that did not verify. Alerts that can end an
/// established connection (a close, a record that did not decrypt) are not among them.
fn handshake_refused(text: &str) -> bool {
    const REFUSALS: [&str; 10] = [
        "CertificateRequired",
        "BadCertificate",
        "UnsupportedCertificate",
        "CertificateRevoked",
        "CertificateExpired",
        "CertificateUnknown",
        "UnknownCA",
        "AccessDenied",
        "HandshakeFailure",
        "DecryptError",
    ];
    text.split_once("received fatal alert: ")
        .is_some_and(|(_, alert)| REFUSALS.iter().any(|r| alert.trim_end() == *r))
}

/// Whether `err`'s chain says the server's certificate was not trusted ([`ErrorKind::Tls`]).
/// Recognised by text: the
/// TLS libraries' error types are not dependencies of this crate. Other handshake failures (an
/// alert, a connection closed mid-handshake) may pass and stay [`ErrorKind::Connect`].
pub fn untrusted_certificate(err: &(dyn StdError + 'static)) -> bool {
    for e in crate::error::chain(err) {
        let text = e.to_string().to_ascii_lowercase();
        if text.contains("invalid peer certificate")
            || text.contains("certificate verify failed")
            || text.contains("certificate not valid")
        {
            return true;
        }
    }
    false
}

/// Whether an error says anything about the health of the request's destination. It does not
/// when the request was stopped before it left by something else: a local rate limit
/// ([`RateLimited`]), an open breaker ([`CircuitOpen`]), tower's `LoadShed` refusing a call
/// because the service below it was not ready ([`Overloaded`]),
/// or a sturdy [`Error`](crate::Error) marked
/// [`with_cause_elsewhere`](crate::Error::with_cause_elsewhere) (a full concurrency limit, a token
/// endpoint that failed). A circuit breaker leaves such errors out of its counts, whatever
/// its classifier says.
///
/// ```
/// use std::io;
/// use sturdy_core::classify::concerns_destination;
/// use sturdy_core::{Error, ErrorKind};
///
/// let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
/// assert!(concerns_destination(&refused));
/// let no_token = Error::new(ErrorKind::Timeout, "no access token within 5s").with_cause_elsewhere();
/// assert!(!concerns_destination(&no_token));
/// ```
pub fn concerns_destination(err: &(dyn StdError + 'static)) -> bool {
    for e in crate::error::chain(err) {
        if let Some(e) = e.downcast_ref::<crate::Error>() {
            if e.cause_is_elsewhere() {
                return false;
            }
        } else if e.is::<CircuitOpen>() || e.is::<RateLimited>() || e.is::<Overloaded>() {
            return false;
        }
    }
    true
}

/// Whether a failed call may have reached the server's handler; see [`Delivery`].
///
/// The first statement in the chain decides: a sturdy [`Error`](crate::Error) that carries a
/// delivery (the retry layer's final error states it for the whole call; layers that refuse a
/// call before sending it state [`Delivery::NotSent`]), then [`CircuitOpen`] and [`RateLimited`]
/// (refused locally or by the server before processing) and tower's
/// [`Overloaded`] (refused by a `LoadShed` before the call
/// went down), then what the error is: a connect error proves the request never left. Everything else — timeouts, broken connections, unknown
/// errors — may have been processed.
///
/// ```
/// use std::io;
/// use sturdy_core::classify::delivery;
/// use sturdy_core::{CallReport, Delivery, Error, ErrorKind};
///
/// let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
/// assert_eq!(delivery(&refused), Delivery::NotSent);
/// let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
/// assert_eq!(delivery(&reset), Delivery::MaybeProcessed);
///
/// // The last attempt could not connect, but an earlier one may have been processed.
/// let call = Error::new(ErrorKind::Connect, "gave up after 2 attempts")
///     .with_source(refused)
///     .with_report(CallReport::new(2, Delivery::MaybeProcessed, Some("k-1".into())));
/// assert_eq!(delivery(&call), Delivery::MaybeProcessed);
/// ```
pub fn delivery(err: &(dyn StdError + 'static)) -> Delivery {
    for e in crate::error::chain(err) {
        if let Some(e) = e.downcast_ref::<crate::Error>() {
            if let Some(d) = e.delivery() {
                return d;
            }
        } else if e.is::<CircuitOpen>() || e.is::<RateLimited>() || e.is::<Overloaded>() {
            return Delivery::NotSent;
        }
    }
    if matches!(classify_error(err), ErrorKind::Connect | ErrorKind::Tls) {
        Delivery::NotSent
    } else {
        Delivery::MaybeProcessed
    }
}

/// The root cause of an error in a few words, for messages: `connection refused`, `connection
/// reset by peer`, `timed out`, `DNS lookup failed`, `TLS handshake failed (...)`, `the
/// connection closed before the response was complete`. sturdy's own errors and errors nobody recognises
/// are described by their own text.
///
/// ```
/// use std::io;
/// use sturdy_core::classify::describe;
///
/// let reset = io::Error::new(io::ErrorKind::ConnectionReset, "Connection reset by peer (os error 104)");
/// assert_eq!(describe(&reset), "connection reset by peer");
/// ```
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut chain: Vec<&(dyn StdError + 'static)> = Vec::new();
    for e in crate::error::chain(err) {
        // Errors explained by sturdy or by a timer speak for everything under them.
        if let Some(words) = own_words(e) {
            return words;
        }
        chain.push(e);
    }
    // Otherwise the deepest cause says what really happened.
    for e in chain.iter().rev() {
        if let Some(words) = transport_words(*e) {
            return words;
        }
    }
    let text = chain
        .iter()
        .find(|e| !is_generic_wrapper(**e))
        .map_or_else(|| err.to_string(), |e| e.to_string());
    bounded(text)
}

/// The most bytes of another library's error text that a description quotes.
const MAX_QUOTED: usize = 1024;

/// `text` cut to [`MAX_QUOTED`] bytes (at a character boundary), saying how much was left out:
/// a peer chooses some of what an error quotes (the names in a TLS certificate, say: 600 of
/// them made a 40 KB message), and a message goes whole into logs and to an AI agent.
fn bounded(mut text: String) -> String {
    if text.len() <= MAX_QUOTED {
        return text;
    }
    let mut end = MAX_QUOTED;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let more = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("… ({more} bytes more)"));
    text
}

/// An error's own text, as `to_string` gives it, unless that text names no cause (hyper-util's
/// `client error (SendRequest)`, `client error (Connect)`): then the words of [`describe`], which
/// name the cause under it. For messages that quote another error, such as a shared call's.
///
/// ```
/// use std::io;
/// use sturdy_core::classify::own_text;
///
/// let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused by 10.0.0.7");
/// assert_eq!(own_text(&refused), "refused by 10.0.0.7");
/// ```
pub fn own_text(err: &(dyn StdError + 'static)) -> String {
    if is_generic_wrapper(err) {
        describe(err)
    } else {
        err.to_string()
    }
}

/// Errors whose own text says nothing a person can act on ("client error (Connect)",
/// "error trying to connect"): their cause speaks instead.
fn is_generic_wrapper(e: &(dyn StdError + 'static)) -> bool {
    e.is::<hyper_util::client::legacy::Error>()
        // hyper's own text, when it has a cause, is a category ("connection error", "error
        // reading a body from connection"): the cause names what happened.
        || (e.is::<hyper::Error>() && e.source().is_some())
        || (e.source().is_some() && {
            let t = e.to_string();
            t.starts_with("client error") || t.starts_with("error trying to connect")
        })
}

fn own_words(e: &(dyn StdError + 'static)) -> Option<String> {
    if e.is::<crate::Error>() || e.is::<RateLimited>() || e.is::<CircuitOpen>() {
        return Some(e.to_string());
    }
    if e.is::<tower::timeout::error::Elapsed>() || e.is::<tokio::time::error::Elapsed>() {
        return Some("the attempt timed out".to_owned());
    }
    if e.is::<Overloaded>() {
        return Some(
            "refused locally by a load shedder: the service below it was at capacity (not sent)"
                .to_owned(),
        );
    }
    None
}

fn transport_words(e: &(dyn StdError + 'static)) -> Option<String> {
    if let Some(h) = e.downcast_ref::<hyper::Error>() {
        if h.is_incomplete_message() {
            return Some("the connection closed before the response was complete".to_owned());
        }
        if h.is_closed() || h.is_canceled() {
            return Some("the connection closed before a response arrived".to_owned());
        }
        if dispatch_gone(h) {
            let runtime = h
                .source()
                .is_some_and(|s| s.to_string() == "runtime dropped the dispatch task");
            return Some(
                if runtime {
                    "the connection was dropped with the runtime that ran it, before a response arrived"
                } else {
                    "the task that ran the connection ended before a response arrived"
                }
                .to_owned(),
            );
        }
        if h.is_timeout() {
            return Some("timed out".to_owned());
        }
        if h.is_parse() {
            return Some(format!("the server sent an invalid HTTP response ({h})"));
        }
        return None;
    }
    if let Some(io) = e.downcast_ref::<io::Error>() {
        let words = match io.kind() {
            io::ErrorKind::ConnectionRefused => "connection refused",
            io::ErrorKind::ConnectionReset => "connection reset by peer",
            io::ErrorKind::ConnectionAborted => "connection aborted",
            io::ErrorKind::BrokenPipe => "the connection closed while the request was being sent",
            io::ErrorKind::UnexpectedEof => "the connection closed unexpectedly",
            io::ErrorKind::TimedOut => "timed out",
            io::ErrorKind::HostUnreachable => "host unreachable",
            io::ErrorKind::NetworkUnreachable => "network unreachable",
            io::ErrorKind::AddrNotAvailable => "address not available",
            io::ErrorKind::NotConnected => "not connected",
            // An io error may carry a more precise one (a TLS alert, a DNS failure).
            _ => return tls_or_dns(&io.to_string()),
        };
        return Some(words.to_owned());
    }
    if e.source().is_none() {
        return tls_or_dns(&e.to_string());
    }
    None
}

/// DNS and TLS failures are recognised by their text: the resolver's and rustls' error types
/// are not dependencies of this crate.
fn tls_or_dns(text: &str) -> Option<String> {
    let text = &*bounded(text.to_owned());
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("dns error") || lower.contains("failed to lookup address") {
        let detail = text.split_once(": ").map_or(text, |(_, d)| d);
        return Some(format!("DNS lookup failed ({detail})"));
    }
    if lower.contains("certificate")
        || lower.contains("handshake")
        || lower.contains("tls")
        || lower.contains("received fatal alert")
        // rustls' words for a peer that does not speak TLS (a plain-HTTP server behind
        // `https://`) or speaks it wrongly.
        || lower.contains("received corrupt message")
        || lower.contains("received unexpected message")
        || lower.contains("peer is incompatible")
        || lower.contains("peer misbehaved")
    {
        return Some(format!("TLS handshake failed ({text})"));
    }
    None
}

/// Errors that can be seen as `&dyn Error`, so that classification works both for concrete client
/// errors and for the `BoxError` that tower layers return.
///
/// Implemented for [`BoxError`], `hyper_util`'s client error, `hyper::Error`, `std::io::Error`,
/// sturdy's own errors and `Infallible`. Implement it for your own client's error type to use
/// [`DefaultClassify`] with it.
pub trait AsError {
    /// The error as a trait object, or `None` if it cannot exist (`Infallible`).
    fn as_error(&self) -> Option<&(dyn StdError + 'static)>;
}

impl AsError for BoxError {
    fn as_error(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&**self)
    }
}

macro_rules! as_error_impl {
    ($($t:ty),* $(,)?) => {$(
        impl AsError for $t {
            fn as_error(&self) -> Option<&(dyn StdError + 'static)> {
                Some(self)
            }
        }
    )*};
}

as_error_impl!(
    hyper_util::client::legacy::Error,
    hyper::Error,
    io::Error,
    crate::Error,
    RateLimited,
    CircuitOpen,
    tower::timeout::error::Elapsed,
);

impl AsError for std::convert::Infallible {
    fn as_error(&self) -> Option<&(dyn StdError + 'static)> {
        match *self {}
    }
}

/// Decides what a call's result means. Retry and the circuit breaker take one, so users can
/// override what counts as a failure.
pub trait Classify<B, E> {
    /// Classifies a result.
    fn classify(&self, result: &Result<Response<B>, E>) -> Outcome;
}

impl<B, E, F> Classify<B, E> for F
where
    F: Fn(&Result<Response<B>, E>) -> Outcome,
{
    fn classify(&self, result: &Result<Response<B>, E>) -> Outcome {
        self(result)
    }
}

/// The classification in the table at the top of this module.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassify;

impl<B, E: AsError> Classify<B, E> for DefaultClassify {
    fn classify(&self, result: &Result<Response<B>, E>) -> Outcome {
        classify_result(result)
    }
}

/// Classifies a result with the default rules.
pub fn classify_result<B, E: AsError>(result: &Result<Response<B>, E>) -> Outcome {
    match result {
        Ok(res) => classify_status(res.status()),
        Err(e) => match e.as_error() {
            Some(e) => Outcome::from_kind(classify_error(e)),
            None => Outcome::Permanent(ErrorKind::Other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_peers_long_words_are_quoted_bounded() {
        let names: Vec<String> = (0..600)
            .map(|i| format!("DnsName(\"h{i:04}.example.com\")"))
            .collect();
        let text = format!(
            "invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only valid for [{}]",
            names.join(", ")
        );
        let tls = io::Error::other(text);
        let words = describe(&tls);
        assert!(words.starts_with("TLS handshake failed (invalid peer certificate: certificate not valid for name \"127.0.0.1\""), "{words}");
        assert!(words.len() < MAX_QUOTED + 100, "{}", words.len());
        assert!(words.contains(" bytes more)"), "{words}");
        // Another library's text, not recognised: bounded too, cut at a character boundary.
        let other = io::Error::other("é".repeat(2_000));
        let words = describe(&other);
        assert!(
            words.len() < MAX_QUOTED + 100 && words.ends_with("(2976 bytes more)"),
            "{words}"
        );
        // Short texts are whole.
        assert_eq!(describe(&io::Error::other("odd")), "odd");
    }

    #[test]
    fn a_refused_handshake_is_told_from_other_alerts() {
        for alert in [
            "CertificateRequired",
            "BadCertificate",
            "UnknownCA",
            "AccessDenied",
        ] {
            assert!(
                handshake_refused(&format!("received fatal alert: {alert}")),
                "{alert}"
            );
        }
        for text in [
            "received fatal alert: BadRecordMac",
            "received fatal alert: CloseNotify",
            "received fatal alert: CertificateRequiredX",
            "received corrupt message of type InvalidContentType",
            "CertificateRequired",
            "",
        ] {
            assert!(!handshake_refused(text), "{text}");
        }
    }

    #[test]
    fn a_call_shed_by_tower_load_shed_was_never_sent() {
        let shed: BoxError = Box::new(Overloaded::new());
        assert_eq!(delivery(&*shed), Delivery::NotSent);
        assert!(!concerns_destination(&*shed));
        assert!(
            describe(&*shed).contains("not sent"),
            "{}",
            describe(&*shed)
        );
        // Wrapped by a layer above, the same.
        let wrapped = crate::Error::new(ErrorKind::Other, "call failed").with_source(shed);
        assert_eq!(delivery(&wrapped), Delivery::NotSent);
        assert!(!concerns_destination(&wrapped));
    }

    #[test]
    fn statuses() {
        assert_eq!(classify_status(StatusCode::OK), Outcome::Success);
        assert_eq!(classify_status(StatusCode::NOT_MODIFIED), Outcome::Success);
        assert_eq!(
            classify_status(StatusCode::UNAUTHORIZED),
            Outcome::Unauthorized
        );
        assert!(classify_status(StatusCode::TOO_MANY_REQUESTS).is_retryable());
        assert!(classify_status(StatusCode::TOO_EARLY).is_retryable());
        assert!(classify_status(StatusCode::GATEWAY_TIMEOUT).is_retryable());
        assert_eq!(
            classify_status(StatusCode::NOT_IMPLEMENTED),
            Outcome::Permanent(ErrorKind::Server(StatusCode::NOT_IMPLEMENTED))
        );
        assert_eq!(
            classify_status(StatusCode::FORBIDDEN),
            Outcome::Permanent(ErrorKind::Client(StatusCode::FORBIDDEN))
        );
        // Past 599 (hyper reads up to 999 from a peer): a server error, a breaker's failure,
        // not retried, never a success.
        for code in [600, 700, 999] {
            let s = StatusCode::from_u16(code).unwrap();
            assert_eq!(classify_status(s), Outcome::Permanent(ErrorKind::Server(s)));
            assert!(classify_status(s).is_failure());
        }
        assert_eq!(
            classify_status(StatusCode::from_u16(599).unwrap()),
            Outcome::Permanent(ErrorKind::Server(StatusCode::from_u16(599).unwrap()))
        );
    }

    #[test]
    fn errors_through_their_chain() {
        let io = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        let boxed: BoxError =
            Box::new(crate::Error::new(ErrorKind::Other, "wrapped").with_source(io));
        // The sturdy Error decides first: it says Other.
        assert_eq!(classify_error(&*boxed), ErrorKind::Other);

        #[derive(Debug)]
        struct Wrap(io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrap")
            }
        }
        impl StdError for Wrap {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let reset = Wrap(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
        assert_eq!(classify_error(&reset), ErrorKind::Transport);
        let refused = Wrap(io::Error::new(io::ErrorKind::ConnectionRefused, "no"));
        assert_eq!(classify_error(&refused), ErrorKind::Connect);

        // A body past its limit is a body error; a failed body stream is what its cause is.
        let big: BoxError = Box::new(crate::body::BodyError::TooLarge { limit: 4 });
        assert_eq!(classify_error(&*big), ErrorKind::Body);
        let broken = crate::body::BodyError::Read(Box::new(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert_eq!(classify_error(&broken), ErrorKind::Transport);

        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(
            classify_result::<(), _>(&Err(elapsed)),
            Outcome::Retryable(ErrorKind::Timeout)
        );
        let rl: BoxError = Box::new(RateLimited::new(Duration::from_secs(3)));
        assert!(classify_result::<(), _>(&Err(rl)).is_retryable());
        let co: BoxError = Box::new(CircuitOpen::new("h", Duration::from_secs(3)));
        assert!(matches!(
            classify_result::<(), _>(&Err(co)),
            Outcome::Permanent(ErrorKind::CircuitOpen { .. })
        ));
    }

    #[test]
    fn closures_classify() {
        let only_500 = |r: &Result<Response<()>, BoxError>| match r {
            Ok(res) if res.status() == StatusCode::INTERNAL_SERVER_ERROR => {
                Outcome::Retryable(ErrorKind::Server(res.status()))
            }
            _ => Outcome::Success,
        };
        let res = Response::builder().status(503).body(()).unwrap();
        assert_eq!(only_500.classify(&Ok(res)), Outcome::Success);
    }

    #[derive(Debug)]
    struct Generic(&'static str, Option<io::Error>);
    impl std::fmt::Display for Generic {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl StdError for Generic {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_ref().map(|e| e as _)
        }
    }

    #[test]
    fn causes_in_plain_words() {
        let reset = Generic(
            "client error (SendRequest)",
            Some(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "os error 104",
            )),
        );
        assert_eq!(describe(&reset), "connection reset by peer");
        let dns = Generic(
            "client error (Connect)",
            Some(io::Error::other(
                "failed to lookup address information: Name or service not known",
            )),
        );
        assert_eq!(
            describe(&dns),
            "DNS lookup failed (Name or service not known)"
        );
        let tls = Generic(
            "client error (Connect)",
            Some(io::Error::new(
                io::ErrorKind::InvalidData,
                "invalid peer certificate: UnknownIssuer",
            )),
        );
        assert_eq!(
            describe(&tls),
            "TLS handshake failed (invalid peer certificate: UnknownIssuer)"
        );
        // A plain-HTTP server behind `https://`.
        let plain = Generic(
            "client error (Connect)",
            Some(io::Error::new(
                io::ErrorKind::InvalidData,
                "received corrupt message of type InvalidContentType",
            )),
        );
        assert_eq!(
            describe(&plain),
            "TLS handshake failed (received corrupt message of type InvalidContentType)"
        );
        let own = crate::Error::new(ErrorKind::Auth, "the token endpoint refused the client")
            .with_source(io::Error::other("x"));
        assert_eq!(describe(&own), "the token endpoint refused the client: x");
        assert_eq!(
            describe(&tower::timeout::error::Elapsed::new()),
            "the attempt timed out"
        );
        assert_eq!(describe(&Generic("odd", None)), "odd");
    }

    #[test]
    fn delivery_of_a_chain() {
        use crate::{CallReport, Delivery};
        let refused = Generic(
            "client error (Connect)",
            Some(io::Error::new(io::ErrorKind::ConnectionRefused, "no")),
        );
        assert_eq!(delivery(&refused), Delivery::NotSent);
        assert_eq!(
            delivery(&CircuitOpen::new("h", Duration::from_secs(1))),
            Delivery::NotSent
        );
        assert_eq!(
            delivery(&tower::timeout::error::Elapsed::new()),
            Delivery::MaybeProcessed
        );
        let before = crate::Error::new(ErrorKind::Timeout, "no token in time")
            .with_delivery(Delivery::NotSent);
        assert_eq!(delivery(&before), Delivery::NotSent);
        let call = crate::Error::new(
            ErrorKind::CircuitOpen {
                retry_in: Duration::ZERO,
            },
            "gave up",
        )
        .with_source(CircuitOpen::new("h", Duration::ZERO))
        .with_report(CallReport::new(2, Delivery::MaybeProcessed, None));
        assert_eq!(delivery(&call), Delivery::MaybeProcessed);
    }
}
