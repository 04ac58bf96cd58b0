//! Where verified events wait for the handler: a queue that also remembers which event ids it
//! has already taken, so a duplicate delivery is acknowledged without being processed again.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use sturdy_core::BoxError;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A verified event.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WebhookEvent {
    /// The scheme that verified it (`standard`, `stripe`, `github`, or a generic scheme's name).
    pub scheme: String,
    /// The name of the receiver that took it \[default: the scheme's name\]: tells a worker
    /// serving several routes where the event came from, and separates their id spaces.
    pub route: String,
    /// The id it was deduplicated on, covered by the signature: the scheme's signed event id,
    /// or `sha256:<hex>`, a digest of the signed content, for schemes that sign no id (see each
    /// scheme).
    pub id: String,
    /// The signed timestamp (Unix seconds), when the scheme has one.
    pub timestamp: Option<i64>,
    /// The headers the scheme defines, as the sender sent them (see each scheme for which are
    /// signed).
    pub headers: HeaderMap,
    /// The raw body, exactly as signed.
    pub body: Bytes,
}

impl fmt::Debug for WebhookEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookEvent")
            .field("scheme", &self.scheme)
            .field("route", &self.route)
            .field("id", &self.id)
            .field("timestamp", &self.timestamp)
            .field("headers", &self.headers)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

impl WebhookEvent {
    /// An event of `scheme` with deduplication id `id`, on the route named after the scheme,
    /// with no timestamp and no headers.
    pub fn new(scheme: impl Into<String>, id: impl Into<String>, body: Bytes) -> Self {
        let scheme = scheme.into();
        Self {
            route: scheme.clone(),
            scheme,
            id: id.into(),
            timestamp: None,
            headers: HeaderMap::new(),
            body,
        }
    }

    /// The route name.
    #[must_use]
    pub fn with_route(mut self, route: impl Into<String>) -> Self {
        self.route = route.into();
        self
    }

    /// The signed timestamp (Unix seconds).
    #[must_use]
    pub fn with_timestamp(mut self, timestamp: Option<i64>) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// The scheme's headers.
    #[must_use]
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// The key queues deduplicate on: scheme, route and id, so that two routes (or two schemes)
    /// sharing a queue never share an id space. `:` and `%` in the scheme and route names are
    /// percent-encoded, so distinct triples never give one key.
    pub fn dedup_key(&self) -> String {
        fn esc(s: &str) -> String {
            s.replace('%', "%25").replace(':', "%3A")
        }
        format!("{}:{}:{}", esc(&self.scheme), esc(&self.route), self.id)
    }
}

/// What [`EventQueue::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The event is safely queued.
    Enqueued,
    /// An event with this id was already taken: acknowledge, do not process again.
    Duplicate,
    /// The queue is full: the sender should redeliver later.
    Full,
}

/// A queue of verified events with deduplication on [`WebhookEvent::dedup_key`]. `push` must be
/// atomic: of concurrent pushes of one key, exactly one is `Enqueued`, and a key is remembered
/// only if its event was queued.
pub trait EventQueue: Send + Sync + fmt::Debug + 'static {
    /// Queues `event` unless its dedup key was taken within `dedup_ttl`.
    fn push(&self, event: WebhookEvent, dedup_ttl: Duration) -> BoxFuture<Result<Push, BoxError>>;
}

/// Remembered dedup keys with the instant each is forgotten, in the order they were taken.
struct Seen {
    ids: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

impl Seen {
    /// Forgets the oldest remembered key, unless it was taken again since (a later entry of
    /// `order` then holds it).
    fn forget_oldest(&mut self) {
        if let Some((k, at)) = self.order.pop_front() {
            if self.ids.get(&k) == Some(&at) {
                self.ids.remove(&k);
            }
        }
    }
}

/// The in-memory queue: bounded, with bounded dedup memory. Fast, not durable: events in it are
/// lost if the process dies. Use the Redis Streams queue (`sturdy-redis`) when that matters.
#[derive(Clone)]
pub struct MemoryQueue {
    tx: mpsc::Sender<WebhookEvent>,
    seen: Arc<Mutex<Seen>>,
    max_ids: usize,
}

impl fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryQueue")
            .field("capacity", &self.tx.max_capacity())
            .field("max_ids", &self.max_ids)
            .finish()
    }
}

/// The consuming end of a [`MemoryQueue`].
#[derive(Debug)]
pub struct MemoryReceiver {
    rx: mpsc::Receiver<WebhookEvent>,
}

impl MemoryReceiver {
    /// The next event; `None` when every queue handle is gone.
    pub async fn recv(&mut self) -> Option<WebhookEvent> {
        self.rx.recv().await
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<WebhookEvent> {
        self.rx.try_recv().ok()
    }
}

impl MemoryQueue {
    /// A queue holding at most `capacity` events (0 is taken as 1, and a capacity past what
    /// tokio's channel can count, `usize::MAX >> 3`, as that: `usize::MAX` is as good as
    /// unbounded), remembering at most 100,000 dedup keys (past that, the oldest is forgotten
    /// first). Nothing is allocated for the capacity up front.
    pub fn new(capacity: usize) -> (Self, MemoryReceiver) {
        // tokio's channel panics past its semaphore's largest count.
        let (tx, rx) = mpsc::channel(capacity.clamp(1, tokio::sync::Semaphore::MAX_PERMITS));
        let q = Self {
            tx,
            seen: Arc::new(Mutex::new(Seen {
                ids: HashMap::new(),
                order: VecDeque::new(),
            })),
            max_ids: 100_000,
        };
        (q, MemoryReceiver { rx })
    }
}

impl EventQueue for MemoryQueue {
    fn push(&self, event: WebhookEvent, dedup_ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        let now = Instant::now();
        // A TTL too long for the clock is as good as forever.
        let expires = now
            .checked_add(dedup_ttl)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        let key = event.dedup_key();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget expired keys, oldest first.
        while seen.order.front().is_some_and(|(_, at)| *at <= now) {
            seen.forget_oldest();
        }
        let result = if let Some(at) = seen.ids.get(&key).copied().filter(|at| *at > now) {
            // A copy signed with a later timestamp (a sender's retry) stays replayable for
            // longer: it keeps the key as long as it does. (Without a signed timestamp, the key
            // lives its TTL from the delivery that took it.)
            if event.timestamp.is_some() && expires > at {
                seen.ids.insert(key.clone(), expires);
                seen.order.push_back((key, expires));
            }
            Push::Duplicate
        } else {
            // try_send under the dedup lock: the key is remembered only if the event was queued,
            // and no second push of the key can slip in between.
            match self.tx.try_send(event) {
                Ok(()) => {
                    // Room for a new key: the oldest is forgotten only now, when `max_ids` keys
                    // are held and this one is not among them (a duplicate forgets nothing).
                    if !seen.ids.contains_key(&key) {
                        while seen.ids.len() >= self.max_ids && !seen.order.is_empty() {
                            seen.forget_oldest();
                        }
                    }
                    seen.ids.insert(key.clone(), expires);
                    seen.order.push_back((key, expires));
                    Push::Enqueued
                }
                Err(mpsc::error::TrySendError::Full(_)) => Push::Full,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Box::pin(std::future::ready(Err(
                        "the webhook worker has stopped".into()
                    )));
                }
            }
        };
        // A key taken again after its TTL, or kept longer by a copy, leaves its old entry in
        // `order`, which only the front's expiry pops: behind a longer-lived entry (receivers
        // with other TTLs share the queue) stale entries would pile up. Past twice the bound,
        // those that no longer hold their key are dropped (amortised: at most once per
        // `max_ids` pushes).
        if seen.order.len() > self.max_ids.saturating_mul(2).max(2) {
            let Seen { ids, order } = &mut *seen;
            order.retain(|(k, at)| ids.get(k) == Some(at));
        }
        Box::pin(std::future::ready(Ok(result)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_bound_is_of_keys_held_and_a_duplicate_forgets_nothing() {
        let ev = |id: &str| WebhookEvent::new("s", id, Bytes::new());
        let ttl = Duration::from_secs(60);
        let (mut q, mut rx) = MemoryQueue::new(16);
        q.max_ids = 3;
        for id in ["a", "b", "c"] {
            assert_eq!(q.push(ev(id), ttl).await.unwrap(), Push::Enqueued);
        }
        // Three keys held, the bound: every one of them is still a duplicate, many times over.
        for _ in 0..5 {
            for id in ["a", "b", "c"] {
                assert_eq!(q.push(ev(id), ttl).await.unwrap(), Push::Duplicate, "{id}");
            }
        }
        // A fourth key forgets the oldest, and only it.
        assert_eq!(q.push(ev("d"), ttl).await.unwrap(), Push::Enqueued);
        assert_eq!(q.push(ev("b"), ttl).await.unwrap(), Push::Duplicate);
        assert_eq!(q.push(ev("a"), ttl).await.unwrap(), Push::Enqueued);
        // Now c, d, a: b was the oldest.
        assert_eq!(q.push(ev("c"), ttl).await.unwrap(), Push::Duplicate);
        assert_eq!(q.push(ev("b"), ttl).await.unwrap(), Push::Enqueued);
        while rx.try_recv().is_some() {}
        // A full queue remembers nothing and forgets nothing.
        let (mut q, _rx) = MemoryQueue::new(1);
        q.max_ids = 1;
        assert_eq!(q.push(ev("x"), ttl).await.unwrap(), Push::Enqueued);
        assert_eq!(q.push(ev("y"), ttl).await.unwrap(), Push::Full);
        assert_eq!(q.push(ev("x"), ttl).await.unwrap(), Push::Duplicate);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_taken_again_behind_a_longer_lived_one_does_not_grow_the_order() {
        let ev = |id: &str| WebhookEvent::new("s", id, Bytes::new());
        let (mut q, mut rx) = MemoryQueue::new(16);
        q.max_ids = 4;
        // A long-lived key at the front; then one short-lived key taken again after each TTL.
        assert_eq!(
            q.push(ev("long"), Duration::from_secs(86_400))
                .await
                .unwrap(),
            Push::Enqueued
        );
        for _ in 0..1_000 {
            assert_eq!(
                q.push(ev("short"), Duration::from_millis(10))
                    .await
                    .unwrap(),
                Push::Enqueued
            );
            while rx.try_recv().is_some() {}
            tokio::time::advance(Duration::from_millis(11)).await;
        }
        let (order, ids) = {
            let seen = q.seen.lock().unwrap();
            (seen.order.len(), seen.ids.len())
        };
        assert!(order <= 8, "{order} entries");
        assert_eq!(ids, 2);
        // The long-lived key is still remembered.
        assert_eq!(
            q.push(ev("long"), Duration::from_secs(86_400))
                .await
                .unwrap(),
            Push::Duplicate
        );
    }

    #[test]
    fn dedup_keys_of_distinct_triples_differ() {
        let e = |s: &str, r: &str, id: &str| {
            WebhookEvent::new(s, id, Bytes::new())
                .with_route(r)
                .dedup_key()
        };
        assert_ne!(e("a:b", "c", "d"), e("a", "b:c", "d"));
        assert_ne!(e("a%3Ab", "c", "d"), e("a:b", "c", "d"));
        assert_ne!(e("github", "org-a", "x"), e("github", "org-b", "x"));
        assert_ne!(e("stripe", "r", "x"), e("github", "r", "x"));
    }
}
