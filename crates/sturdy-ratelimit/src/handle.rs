use std::sync::Arc;
use std::time::Duration;

use crate::state::State;

/// Reads and clears the pauses of a limiter, from [`RateLimitLayer::pair`](crate::RateLimitLayer::pair) or
/// [`RateLimitLayer::handle`](crate::RateLimitLayer::handle).
///
/// It sees the state shared by the layer, its clones, the layers its setters return and every
/// service they make. Keys are what the layer's key extractor returns (the host, with its port if
/// the URI has one, by default). Pauses here are this process's; with a remote store, clear the
/// store's too ([`RemoteQuota::clear_pause`](crate::RemoteQuota::clear_pause)). A key past
/// [`with_max_keys`](crate::RateLimitLayer::with_max_keys) shares the overflow limiter with the
/// other keys past the bound: what the handle says of it is that limiter's (its pause, its
/// line), and clearing its pause clears theirs.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use std::time::Duration;
/// use http::{Request, Response};
/// use sturdy_ratelimit::RateLimitLayer;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// // An API that answers a hostile Retry-After (about 3 billion years).
/// let api = service_fn(|_req: Request<()>| async {
///     let res = Response::builder().status(429).header("retry-after", "99999999999999999").body(());
///     Ok::<_, std::convert::Infallible>(res.unwrap())
/// });
/// let (layer, handle) = RateLimitLayer::adaptive_only().pair();
/// let client = layer.layer(api);
/// client.oneshot(Request::get("http://api.example.com/").body(()).unwrap()).await.unwrap();
///
/// // Stored as the 5 minute cap, not as asked; and it can be lifted.
/// assert_eq!(handle.pause("api.example.com"), Some(Duration::from_secs(300)));
/// assert_eq!(handle.clear_pause("api.example.com"), Some(Duration::from_secs(300)));
/// assert_eq!(handle.pause("api.example.com"), None);
/// # }
/// ```
///
/// Keys are hosts by default, kept in lower case: a host given to a method here is found in
/// any case (`"API.example.com"` finds the state of `https://api.example.com/`). Once a layer
/// sharing the state chose its own keys with `with_key(..)` (before or after the handle was
/// taken), keys are looked up as given.
#[derive(Debug, Clone)]
pub struct RateLimitHandle {
    state: Arc<State>,
}

impl RateLimitHandle {
    pub(crate) fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    /// `key` as the state is kept under it.
    fn stored<'k>(&self, key: &'k str) -> std::borrow::Cow<'k, str> {
        self.state.stored_key(key)
    }

    /// How long calls to `key` stay paused from now; `None` when they are not paused.
    pub fn pause(&self, key: &str) -> Option<Duration> {
        let slot = self.state.map_if_used()?.find_serving(&self.stored(key))?;
        let now = self.state.origin.elapsed();
        let until = slot.value().gate.paused_until();
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Every paused key with the time left, in no particular order.
    pub fn paused(&self) -> Vec<(String, Duration)> {
        let Some(map) = self.state.map_if_used() else {
            return Vec::new();
        };
        let now = self.state.origin.elapsed();
        map.all()
            .into_iter()
            .filter_map(|s| {
                let until = s.value().gate.paused_until();
                (until > now).then(|| (s.key().to_owned(), Duration::from_nanos(until - now)))
            })
            .collect()
    }

    /// Ends the pause of `key` now and returns the time it had left (`None`: it was not paused).
    /// Calls waiting for it then leave in order, at the quota's pace (or the release pace).
    /// A pace the key learned from bare 429s is forgotten too.
    pub fn clear_pause(&self, key: &str) -> Option<Duration> {
        let slot = self.state.map_if_used()?.find_serving(&self.stored(key))?;
        let now = self.state.origin.elapsed();
        slot.value().gate.forget_pace();
        let until = slot.value().gate.clear_pause();
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// The pace `key` learned from bare 429s: one call per the returned interval (`None`: no
    /// pace, the key has a quota, or it was never limited). See the crate docs.
    pub fn learned_pace(&self, key: &str) -> Option<Duration> {
        let slot = self.state.map_if_used()?.find_serving(&self.stored(key))?;
        slot.value().gate.learned().map(|q| q.interval())
    }

    /// How many calls to `key` wait in line now: for a slot of the local quota, or for a pause
    /// to end. (A call waiting for a slot a remote store granted it is not in line.)
    pub fn waiting(&self, key: &str) -> usize {
        self.state
            .map_if_used()
            .and_then(|m| m.find_serving(&self.stored(key)))
            .map_or(0, |s| s.value().gate.waiting())
    }
}
