//! One classification of outcomes, shared by retry and circuit breaking.
//!
//! | outcome | statuses and errors |
//! |---|---|
//! | [`Outcome::Success`] | 1xx, 2xx, 3xx |
//! | [`Outcome::Retryable`] | 408, 425, 429, 500, 502, 503, 504; connect and transport errors; timeouts |
//! | [`Outcome::Unauthorized`] | 401: for the auth layer, never for a blind retry |
//! | [`Outcome::Permanent`] | every other 4xx, 501, 505 and other 5xx, configuration and unknown errors |
//!
//! Errors are classified by walking their `source()` chain, so a hyper-util connect error
//! wrapped in a timeout wrapped in a `BoxError` still reads as [`ErrorKind::Connect`].

use std::error::Error as StdError;
use std::io;

use http::{Response, StatusCode};

use crate::error::{BoxError, CircuitOpen, ErrorKind, RateLimited};

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
/// hyper-util's connect errors, hyper's errors, then `std::io::Error` kinds. An error nobody
/// recognises is [`ErrorKind::Other`], which is not retried.
pub fn classify_error(err: &(dyn StdError + 'static)) -> ErrorKind {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(kind) = kind_of(e) {
            return kind;
        }
        cur = e.source();
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
    if let Some(e) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
        if e.is_connect() {
            return Some(ErrorKind::Connect);
        }
        // Otherwise the cause (a hyper or io error) says more.
        return None;
    }
    if let Some(e) = e.downcast_ref::<hyper::Error>() {
        if e.is_timeout() {
            return Some(ErrorKind::Timeout);
        }
        if e.is_incomplete_message() || e.is_canceled() || e.is_closed() || e.is_parse() {
            return Some(ErrorKind::Transport);
        }
        if e.is_body_write_aborted() || e.is_user() {
            return Some(ErrorKind::Other);
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
}
