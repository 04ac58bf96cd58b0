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
    shared: bool,
    limit: usize,
    waited: Duration,
}

impl LimitReached {
    /// The host (or key) whose limit was full: the call's own, also past the layer's bound on
    /// hosts, where the call's host shares one limit with the other hosts past it.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the limit was the one the hosts past the layer's bound share
    /// ([`with_max_hosts`](crate::AdaptiveConcurrencyLayer::with_max_hosts)), not the host's own.
    pub fn is_shared(&self) -> bool {
        self.shared
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
            "the concurrency limit for {}{} ({} {} at once) stayed full for {}",
            self.key,
            if self.shared {
                ", which shares one limit with the other hosts past the layer's bound on hosts"
            } else {
                ""
            },
            self.limit,
            if self.limit == 1 { "call" } else { "calls" },
            human_duration(self.waited)
        )
    }
}

impl std::error::Error for LimitReached {}

/// The error of a call refused after `waited`: `key` is the call's own (its host by default),
/// `limit_key` the key of the limit it waited for (the overflow key past the bound on hosts).
pub(crate) fn limit_reached(key: &str, limit_key: &str, limit: usize, waited: Duration) -> Error {
    let cause = LimitReached {
        key: key.to_owned(),
        // The overflow limit, whatever the call's own key (a custom key `*` lands in it too).
        shared: limit_key == sturdy_core::keyed::OVERFLOW_KEY,
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
