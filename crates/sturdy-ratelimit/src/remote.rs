use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sturdy_core::BoxError;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a shared quota store granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// A slot was reserved; go after `wait`.
    Granted {
        /// How long to wait first (zero: go now).
        wait: Duration,
    },
    /// No slot within the allowed wait.
    Denied {
        /// When one would be free.
        retry_after: Duration,
    },
}

/// A quota kept outside this process (e.g. `sturdy-redis`), so several processes share it.
///
/// One call to [`reserve`](Self::reserve) decides one call to the API: it must be atomic in the
/// store and cost one round trip.
///
/// Each method bounds its own round trip (`sturdy_redis::RedisQuota`: 1 s per operation) and
/// fails when it passes: the layer does not time the store. A `reserve` that never answers holds
/// its call for as long as it does not (a deadline of the retry layer's still ends the call); an
/// error is handled as [`OnStoreError`](crate::OnStoreError) says.
///
/// The `key` of each method is the layer's key as it keeps it: with the default key, the host in
/// lower case (see [`ByHost`](sturdy_core::key::ByHost)), so processes that write one host
/// differently share one quota. A caller of [`clear_pause`](Self::clear_pause) passes it the same
/// way ([`sturdy_core::key::host_key`] of a host).
pub trait RemoteQuota: Send + Sync + fmt::Debug + 'static {
    /// Reserves a slot for `key` no more than `max_wait` from now. A grant further away than
    /// that (a store that breaks this contract) is released and the call refused with
    /// `RateLimited`; a wait a store reports is capped at the layer's `max_pause` before it
    /// reaches the caller.
    fn reserve(&self, key: &str, max_wait: Duration) -> BoxFuture<Result<Reserve, BoxError>>;

    /// Tells every process to hold off `key` for `duration` (a server said so; the layer has
    /// already capped it at its `max_pause`). The default does nothing: pauses then stay in this
    /// process.
    fn pause(&self, key: &str, duration: Duration) -> BoxFuture<Result<(), BoxError>> {
        let _ = (key, duration);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Gives back one slot of `key` that [`reserve`](Self::reserve) granted and that will not be
    /// used (its call was dropped while it waited, or a pause came first). The layer calls it
    /// once per unused grant, in the background. The default does nothing: the slot is then lost
    /// to the quota.
    fn release(&self, key: &str) -> BoxFuture<Result<(), BoxError>> {
        let _ = key;
        Box::pin(std::future::ready(Ok(())))
    }

    /// Ends the pause of `key` for every process. The default does nothing.
    fn clear_pause(&self, key: &str) -> BoxFuture<Result<(), BoxError>> {
        let _ = key;
        Box::pin(std::future::ready(Ok(())))
    }
}

/// What the layer does when the remote store fails (unreachable, timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreError {
    /// Let the call through (logged as a warning). The server's own limits, and the adaptive
    /// pause on its 429s, still protect it. The default.
    #[default]
    Allow,
    /// Fail the call, not sent, with the store's error as its source: of kind `Connect` when
    /// the store's error is retryable (a Redis that could not be reached, did not answer in
    /// time or is failing over), so a retry layer above tries again after its backoff; `Other`
    /// otherwise (a refused password, a script error). No circuit breaker counts it.
    Fail,
}
