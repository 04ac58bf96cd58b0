//! Where verified events wait for the handler: a queue that also remembers which event ids it
//! has already taken, so a duplicate delivery is acknowledged without being processed again.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use sturdy_core::BoxError;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A verified event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// The scheme that verified it.
    pub scheme: String,
    /// The event id (the scheme's, or a SHA-256 of the body when the scheme has none).
    pub id: String,
    /// The raw body, exactly as signed.
    pub body: Bytes,
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

/// A queue of verified events with id deduplication. `push` must be atomic: of concurrent
/// pushes of one id, exactly one is `Enqueued`, and an id is remembered only if its event was
/// queued.
pub trait EventQueue: Send + Sync + fmt::Debug + 'static {
    /// Queues `event` unless its id was seen within `dedup_ttl`.
    fn push(&self, event: WebhookEvent, dedup_ttl: Duration) -> BoxFuture<Result<Push, BoxError>>;
}

struct Seen {
    ids: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
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
}

impl MemoryQueue {
    /// A queue holding at most `capacity` events, remembering at most 100,000 ids.
    ///
    /// # Panics
    /// When `capacity` is 0.
    pub fn new(capacity: usize) -> (Self, MemoryReceiver) {
        let (tx, rx) = mpsc::channel(capacity);
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
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget expired ids, oldest first; and the oldest past the bound.
        while let Some((id, at)) = seen.order.front().cloned() {
            if now.duration_since(at) < dedup_ttl && seen.ids.len() < self.max_ids {
                break;
            }
            seen.order.pop_front();
            if seen.ids.get(&id) == Some(&at) {
                seen.ids.remove(&id);
            }
        }
        let result = if seen.ids.contains_key(&event.id) {
            Push::Duplicate
        } else {
            let id = event.id.clone();
            // try_send under the dedup lock: the id is remembered only if the event was queued,
            // and no second push of the id can slip in between.
            match self.tx.try_send(event) {
                Ok(()) => {
                    seen.ids.insert(id.clone(), now);
                    seen.order.push_back((id, now));
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
        Box::pin(std::future::ready(Ok(result)))
    }
}
