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
    /// The connection could not be made; the request never left.
    Connect,
    /// The connection broke after the request may have been sent (reset, closed early).
    Transport,
    /// The server answered with a 5xx status.
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
    /// layer answers with the request in hand; see [`ErrorKind::proves_not_sent`].
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout | Self::Connect | Self::Transport => true,
            Self::RateLimited { .. } => true,
            Self::Server(s) | Self::Client(s) => crate::classify::is_retryable_status(*s),
            Self::Auth
            | Self::CircuitOpen { .. }
            | Self::Body
            | Self::Pagination
            | Self::Config
            | Self::Other => false,
        }
    }

    /// Whether the failure proves that the request never reached the server, so that even a
    /// non-idempotent request may be sent again.
    pub fn proves_not_sent(&self) -> bool {
        matches!(self, Self::Connect | Self::CircuitOpen { .. })
    }

    /// The kind of an HTTP status, or `None` for a success or informational status.
    pub fn from_status(status: StatusCode) -> Option<Self> {
        if status == StatusCode::UNAUTHORIZED {
            Some(Self::Auth)
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            Some(Self::RateLimited { retry_after: None })
        } else if status == StatusCode::REQUEST_TIMEOUT {
            Some(Self::Timeout)
        } else if status.is_server_error() {
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
            Self::Connect => f.write_str("could not connect; the request was not sent"),
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

/// An error with a [`kind`](Error::kind), a message and an optional source.
///
/// Layers use it for failures they explain themselves ("gave up after 4 attempts: server error
/// 503"). Find it in a `BoxError` with `err.downcast_ref::<sturdy_core::Error>()`.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind` with a message for people.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// Shorthand for `self.kind().is_retryable()`.
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(src) = &self.source {
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

/// The circuit breaker for a dependency is open: the call was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitOpen {
    retry_in: Duration,
    key: String,
}

impl CircuitOpen {
    /// The breaker for `key` is open and admits a probe again in `retry_in`.
    pub fn new(key: impl Into<String>, retry_in: Duration) -> Self {
        Self {
            retry_in,
            key: key.into(),
        }
    }

    /// When the breaker admits a probe again.
    pub fn retry_in(&self) -> Duration {
        self.retry_in
    }

    /// Which breaker (usually the host).
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit open for {}: it has been failing, so it was not called; try again in {}",
            self.key,
            human_duration(self.retry_in)
        )
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
        assert!(ErrorKind::Connect.proves_not_sent());
        assert!(!ErrorKind::Transport.proves_not_sent());
    }
}
