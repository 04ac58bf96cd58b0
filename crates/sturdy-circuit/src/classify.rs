use http::Response;
use sturdy_core::classify::{classify_error, AsError};
use sturdy_core::ErrorKind;

/// Decides whether an outcome counts against the breaker.
pub trait FailureClassifier<Rb, E> {
    /// Whether `result` is a failure of the dependency.
    fn is_failure(&self, result: &Result<Response<Rb>, E>) -> bool;
}

/// The shared classification: 5xx responses, timeouts, connect and transport errors are failures;
/// 4xx (429 included) are the caller's business, not the dependency's health.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultFailure;

impl<Rb, E: AsError> FailureClassifier<Rb, E> for DefaultFailure {
    fn is_failure(&self, result: &Result<Response<Rb>, E>) -> bool {
        match result {
            Ok(res) => res.status().is_server_error(),
            Err(e) => e.as_error().is_some_and(|e| {
                matches!(
                    classify_error(e),
                    ErrorKind::Timeout
                        | ErrorKind::Connect
                        | ErrorKind::Transport
                        | ErrorKind::Server(_)
                )
            }),
        }
    }
}

impl<Rb, E, F> FailureClassifier<Rb, E> for F
where
    F: Fn(&Result<Response<Rb>, E>) -> bool,
{
    fn is_failure(&self, result: &Result<Response<Rb>, E>) -> bool {
        self(result)
    }
}
