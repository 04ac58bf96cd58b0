//! The error of a call that found its host's limit full for too long.

use std::fmt;
use std::time::Duration;

use sturdy_core::{human_duration, Delivery, Error, ErrorKind};

/// The concurrency limit of a host stayed full for the longest wait allowed: the call was not
/// sent.
///
/// It is the source of the [`sturdy_core::Error`] the layer returns (kind
/// [`ErrorKind::RateLimited`] without a wait, delivery [`Delivery::NotSent`]); find it with
/// [`sturdy_core::find`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitReached {
    key: String,
    limit: usize,
    waited: Duration,
}

impl LimitReached {
    /// The host (or key) whose limit was full.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The limit at the time.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How long the call waited.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for LimitReached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the concurrency limit for {} ({} calls at once) stayed full for {}",
            self.key,
            self.limit,
            human_duration(self.waited)
        )
    }
}

impl std::error::Error for LimitReached {}

pub(crate) fn limit_reached(key: &str, limit: usize, waited: Duration) -> Error {
    let cause = LimitReached {
        key: key.to_owned(),
        limit,
        waited,
    };
    Error::new(
        ErrorKind::RateLimited { retry_after: None },
        format!("{cause}; the call was not sent: try again later or raise the maximum wait"),
    )
    .with_hidden_source(cause)
    .with_delivery(Delivery::NotSent)
}
