use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sturdy_core::BoxError;
use tokio::time::Instant;

use super::store::{Begin, BoxFuture, Fingerprint, IdempotencyStore, StoredResponse};

enum Entry {
    InFlight {
        fp: Fingerprint,
        lease_until: Instant,
    },
    Done {
        fp: Fingerprint,
        response: Arc<StoredResponse>,
        expires: Instant,
    },
}

#[derive(Default)]
struct State {
    map: HashMap<Box<str>, Entry>,
    /// Keys in the order they were first locked, for eviction.
    order: VecDeque<Box<str>>,
}

/// An in-memory store for one process: bounded in entries, entries expire (a lock after its
/// lease, a response after its TTL). When full, expired entries go first, then the oldest
/// completed ones; a running request's lock is never evicted. If every entry is a live lock, a
/// new key is refused (the layer answers 503 with `Retry-After`).
///
/// The lock is a `std::sync::Mutex` held for a map operation, never across an `.await`.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<State>>,
    max_entries: usize,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("entries", &self.map.len())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(100_000)
    }
}

/// The store is full of running requests.
#[derive(Debug)]
pub struct StoreFull;

impl std::fmt::Display for StoreFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the idempotency store is full of running requests")
    }
}

impl std::error::Error for StoreFull {}

impl MemoryStore {
    /// A store of at most `max_entries` keys (at least 1).
    pub fn new(max_entries: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State::default())),
            max_entries: max_entries.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held on the heap by keys and stored responses (not counting the map's own table).
    pub fn heap_bytes(&self) -> usize {
        let st = self.lock();
        st.map
            .iter()
            .map(|(k, e)| {
                2 * k.len()
                    + match e {
                        Entry::InFlight { .. } => 0,
                        Entry::Done { response, .. } => {
                            std::mem::size_of::<StoredResponse>() + response.heap_bytes()
                        }
                    }
            })
            .sum()
    }

    fn begin_now(&self, key: &str, fp: Fingerprint, lease: Duration) -> Result<Begin, BoxError> {
        let now = Instant::now();
        let mut st = self.lock();
        match st.map.get(key) {
            Some(Entry::InFlight { fp: f, lease_until }) if now < *lease_until => {
                return Ok(if *f == fp {
                    Begin::InFlight
                } else {
                    Begin::Mismatch
                });
            }
            Some(Entry::Done {
                fp: f,
                response,
                expires,
            }) if now < *expires => {
                return Ok(if *f == fp {
                    Begin::Completed((**response).clone())
                } else {
                    Begin::Mismatch
                });
            }
            Some(_) => {
                // Expired: the key is free again. It keeps its place in the order.
                st.map.insert(
                    key.into(),
                    Entry::InFlight {
                        fp,
                        lease_until: now + lease,
                    },
                );
                return Ok(Begin::Started);
            }
            None => {}
        }
        if st.map.len() >= self.max_entries && !Self::evict(&mut st, now) {
            return Err(Box::new(StoreFull));
        }
        st.map.insert(
            key.into(),
            Entry::InFlight {
                fp,
                lease_until: now + lease,
            },
        );
        st.order.push_back(key.into());
        Ok(Begin::Started)
    }

    /// Frees one slot: the oldest expired entry, else the oldest completed one.
    fn evict(st: &mut State, now: Instant) -> bool {
        // Drop order entries whose key is gone.
        let State { map, order } = st;
        order.retain(|k| map.contains_key(k));
        let live = |e: &Entry| match e {
            Entry::InFlight { lease_until, .. } => now < *lease_until,
            Entry::Done { expires, .. } => now < *expires,
        };
        let pick = order
            .iter()
            .position(|k| map.get(k).is_some_and(|e| !live(e)))
            .or_else(|| {
                order
                    .iter()
                    .position(|k| matches!(map.get(k), Some(Entry::Done { .. })))
            });
        match pick {
            Some(i) => {
                if let Some(k) = order.remove(i) {
                    map.remove(&k);
                }
                true
            }
            None => false,
        }
    }
}

impl IdempotencyStore for MemoryStore {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        Box::pin(std::future::ready(self.begin_now(key, fingerprint, lease)))
    }

    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        let mut st = self.lock();
        if let Some(Entry::InFlight { fp, .. }) = st.map.get(key) {
            if *fp == fingerprint {
                st.map.insert(
                    key.into(),
                    Entry::Done {
                        fp: fingerprint,
                        response: Arc::new(response),
                        expires: Instant::now() + ttl,
                    },
                );
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn release(&self, key: &str, fingerprint: Fingerprint) -> BoxFuture<Result<(), BoxError>> {
        let mut st = self.lock();
        if matches!(st.map.get(key), Some(Entry::InFlight { fp, .. }) if *fp == fingerprint) {
            st.map.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}
