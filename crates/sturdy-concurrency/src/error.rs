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
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use std::time::Duration;
/// use http::{Request, Response};
/// use sturdy_concurrency::{AdaptiveConcurrencyLayer, LimitReached};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// let api = service_fn(|_req: Request<()>| async {
///     tokio::time::sleep(Duration::from_millis(10)).await;
///     Ok::<_, std::convert::Infallible>(Response::new(()))
/// });
/// // One call at a time, and no waiting: a second call at the same moment is refused.
/// let client = AdaptiveConcurrencyLayer::new()
///     .with_limits(1, 1)
///     .with_max_wait(Duration::ZERO)
///     .layer(api);
/// let get = || Request::get("http://api.example.com/").body(()).unwrap();
/// let first = tokio::spawn(client.clone().oneshot(get()));
/// tokio::task::yield_now().await;
/// let err = client.clone().oneshot(get()).await.unwrap_err();
/// let reached = sturdy_core::find::<LimitReached>(&*err).unwrap();
/// assert_eq!((reached.key(), reached.limit()), ("api.example.com", 1));
/// assert_eq!(sturdy_core::classify::delivery(&*err), sturdy_core::Delivery::NotSent);
/// first.await.unwrap().unwrap();
/// # }
/// ```
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
            "the concurrency limit for {} ({} {} at once) stayed full for {}",
            self.key,
            self.limit,
            if self.limit == 1 { "call" } else { "calls" },
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
    .with_cause_elsewhere()
}
