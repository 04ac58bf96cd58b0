use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sturdy_core::BoxError;
use tokio::time::Instant;

use super::store::{Begin, BoxFuture, Fingerprint, IdempotencyStore, LockToken, StoredResponse};
use super::InvalidConfig;

/// When an entry expires, in nanoseconds since the store was made, with a sequence number that
/// makes every deadline unique (many entries may share an instant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: u64,
    seq: u64,
}

struct Entry {
    fp: Fingerprint,
    /// The execution that took the lock (or completed it).
    token: LockToken,
    deadline: Deadline,
    /// `None` while the request runs.
    response: Option<Arc<StoredResponse>>,
}

struct State {
    epoch: Instant,
    map: HashMap<Arc<str>, Entry>,
    /// Locks of running requests, by lease end.
    running: BTreeMap<Deadline, Arc<str>>,
    /// Completed entries, by expiry: the first one is the next to expire and the first evicted.
    done: BTreeMap<Deadline, Arc<str>>,
    /// Bytes accounted for keys and stored responses.
    bytes: usize,
    seq: u64,
    max_entries: usize,
    max_bytes: usize,
}

/// An in-memory store for one process, bounded in entries and in bytes.
///
/// Entries expire: a lock at the end of its lease, a stored response after its TTL. Expired
/// entries are purged as time passes (on the next operation, each in O(log n)), so they never
/// count in [`len`](Self::len) nor take a slot. When the store is full, the completed response
/// that expires first goes (the oldest, with one TTL); a running request's lock is never
/// evicted. If every entry is a live lock, a new key is refused with [`StoreFull`] (the layer
/// answers 503 with `Retry-After`).
///
/// Every operation is O(log n) in the number of entries: a hash map for the keys and two
/// ordered indices by deadline (running locks, completed responses). Deadlines grow with time,
/// so inserts go to the end of the indices and expiry takes from their start, the part that
/// stays in cache.
///
/// The state is behind one `std::sync::Mutex`, held for a map operation, never across an
/// `.await`. Clones share the state.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<State>>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("MemoryStore")
            .field("entries", &st.map.len())
            .field("max_entries", &st.max_entries)
            .field("max_bytes", &st.max_bytes)
            .finish()
    }
}

impl Default for MemoryStore {
    /// 100,000 entries and 64 MiB.
    fn default() -> Self {
        Self::with_limits(Self::DEFAULT_MAX_ENTRIES, Self::DEFAULT_MAX_BYTES)
    }
}

/// The store cannot take a new entry: every entry is a running request's lock, or a response
/// is larger than the store's byte bound.
#[derive(Debug)]
pub struct StoreFull {
    reason: &'static str,
}

impl fmt::Display for StoreFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason)
    }
}

impl std::error::Error for StoreFull {}

/// The bytes an entry accounts for beyond its key and response: an estimate of its share of
/// the hash map's table (a 72-byte bucket at a load of 7/8 or less), of an index's nodes (a
/// 32-byte slot in half-full nodes) and of the key's allocation header.
const ENTRY_OVERHEAD: usize = 160;

fn response_cost(r: &StoredResponse) -> usize {
    std::mem::size_of::<StoredResponse>() + r.heap_bytes()
}

fn key_cost(key: &str) -> usize {
    ENTRY_OVERHEAD + key.len()
}

impl MemoryStore {
    /// The default bound in entries: 100,000.
    pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
    /// The default bound in bytes of entries (see [`heap_bytes`](Self::heap_bytes)): 64 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

    /// A store of at most `max_entries` keys and the default byte bound (64 MiB).
    ///
    /// # Errors
    /// When `max_entries` is 0.
    pub fn new(max_entries: usize) -> Result<Self, InvalidConfig> {
        if max_entries == 0 {
            return Err(InvalidConfig::new(
                "a MemoryStore must hold at least one entry",
            ));
        }
        Ok(Self::with_limits(max_entries, Self::DEFAULT_MAX_BYTES))
    }

    /// Bounds the bytes held by entries, as [`heap_bytes`](Self::heap_bytes) counts them
    /// \[64 MiB\]. When a new response would pass the bound, the completed responses that expire
    /// first make room; a response larger than the whole bound is not stored. Running requests'
    /// locks are counted (160 bytes and the key each) but bounded by the entry count, not by
    /// this: a new lock is never refused for bytes and makes no stored response leave, so locks
    /// alone can pass a small bound. Clones are one
    /// store: the bound applies to all of them, and the entries already held are kept.
    ///
    /// # Errors
    /// When `max_bytes` is 0.
    pub fn with_max_bytes(self, max_bytes: usize) -> Result<Self, InvalidConfig> {
        if max_bytes == 0 {
            return Err(InvalidConfig::new(
                "a MemoryStore's byte bound must be larger than zero",
            ));
        }
        self.lock().max_bytes = max_bytes;
        Ok(self)
    }

    fn with_limits(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                epoch: Instant::now(),
                map: HashMap::new(),
                running: BTreeMap::new(),
                done: BTreeMap::new(),
                bytes: 0,
                seq: 0,
                max_entries,
                max_bytes,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many live keys are held (running or completed); expired ones are not counted.
    pub fn len(&self) -> usize {
        let mut st = self.lock();
        let now = st.now();
        st.purge(now);
        st.map.len()
    }

    /// Whether no live key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes accounted for live entries, the figure [`with_max_bytes`](Self::with_max_bytes)
    /// bounds: each key, each stored response (struct, headers, body), and an estimate of each
    /// entry's share of the map's and the indices' own memory (160 bytes). The allocator's
    /// rounding comes on top.
    pub fn heap_bytes(&self) -> usize {
        let mut st = self.lock();
        let now = st.now();
        st.purge(now);
        st.bytes
    }

    fn begin_now(
        &self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> Result<Begin, BoxError> {
        let mut st = self.lock();
        let now = st.now();
        st.purge(now);
        if let Some(e) = st.map.get(key) {
            return Ok(match (&e.response, e.fp == fp) {
                (_, false) => Begin::Mismatch,
                (None, true) => Begin::InFlight,
                (Some(r), true) => Begin::Completed((**r).clone()),
            });
        }
        st.lock_key(key, fp, token, now, lease)?;
        Ok(Begin::Started)
    }

    fn renew_now(
        &self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> Result<bool, BoxError> {
        let mut st = self.lock();
        let now = st.now();
        st.purge(now);
        let old = match st.map.get(key) {
            Some(e) if e.token != token || e.response.is_some() => return Ok(false),
            Some(e) => e.deadline,
            // The lease ran out and nobody took the key: lock it again.
            None => {
                st.lock_key(key, fp, token, now, lease)?;
                return Ok(true);
            }
        };
        let new = st.deadline(now, lease);
        st.running.remove(&old);
        if let Some(e) = st.map.get_mut(key) {
            e.deadline = new;
        }
        let k = st.shared_key(key);
        st.running.insert(new, k);
        Ok(true)
    }

    fn complete_now(
        &self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), BoxError> {
        let cost = response_cost(&response);
        let mut st = self.lock();
        let now = st.now();
        st.purge(now);
        let held = match st.map.get(key) {
            Some(e) if e.token != token || e.response.is_some() => return Ok(()),
            Some(e) => Some(e.deadline),
            None => None,
        };
        if cost + key_cost(key) > st.max_bytes {
            return Err(Box::new(StoreFull {
                reason: "the response is larger than the idempotency store's byte bound",
            }));
        }
        // Room: the new response's bytes, and a slot and the key's bytes if the key is not
        // held any more.
        let key_bytes = if held.is_some() { 0 } else { key_cost(key) };
        while st.bytes + cost + key_bytes > st.max_bytes
            || (held.is_none() && st.map.len() >= st.max_entries)
        {
            if !st.evict_one() {
                return Err(Box::new(StoreFull {
                    reason: "the idempotency store is full of running requests",
                }));
            }
        }
        let deadline = st.deadline(now, ttl);
        let response = Some(Arc::new(response));
        match held {
            Some(old) => {
                st.running.remove(&old);
                if let Some(e) = st.map.get_mut(key) {
                    e.deadline = deadline;
                    e.response = response;
                }
            }
            None => {
                st.bytes += key_bytes;
                st.map.insert(
                    key.into(),
                    Entry {
                        fp,
                        token,
                        deadline,
                        response,
                    },
                );
            }
        }
        st.bytes += cost;
        let k = st.shared_key(key);
        st.done.insert(deadline, k);
        Ok(())
    }

    fn release_now(&self, key: &str, token: LockToken) {
        let mut st = self.lock();
        if matches!(st.map.get(key), Some(e) if e.token == token && e.response.is_none()) {
            if let Some((k, e)) = st.map.remove_entry(key) {
                st.running.remove(&e.deadline);
                st.bytes -= key_cost(&k);
            }
        }
    }
}

impl State {
    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    fn deadline(&mut self, now: u64, d: Duration) -> Deadline {
        self.seq += 1;
        Deadline {
            at: now.saturating_add(nanos(d)),
            seq: self.seq,
        }
    }

    /// The map's own `Arc` for `key`, so the indices share its allocation.
    fn shared_key(&self, key: &str) -> Arc<str> {
        match self.map.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => key.into(),
        }
    }

    /// Inserts a running lock, evicting the completed entry that expires first when full.
    fn lock_key(
        &mut self,
        key: &str,
        fp: Fingerprint,
        token: LockToken,
        now: u64,
        lease: Duration,
    ) -> Result<(), BoxError> {
        if self.map.len() >= self.max_entries && !self.evict_one() {
            return Err(Box::new(StoreFull {
                reason: "the idempotency store is full of running requests",
            }));
        }
        let deadline = self.deadline(now, lease);
        let k: Arc<str> = key.into();
        self.bytes += key_cost(key);
        self.map.insert(
            k.clone(),
            Entry {
                fp,
                token,
                deadline,
                response: None,
            },
        );
        self.running.insert(deadline, k);
        Ok(())
    }

    /// Removes every entry whose deadline has passed.
    fn purge(&mut self, now: u64) {
        while let Some(entry) = self.running.first_entry() {
            if entry.key().at > now {
                break;
            }
            let k = entry.remove();
            self.forget(&k);
        }
        while let Some(entry) = self.done.first_entry() {
            if entry.key().at > now {
                break;
            }
            let k = entry.remove();
            self.forget(&k);
        }
    }

    /// Evicts the completed entry that expires first; `false` if there is none.
    fn evict_one(&mut self) -> bool {
        match self.done.pop_first() {
            Some((_, k)) => {
                self.forget(&k);
                true
            }
            None => false,
        }
    }

    /// Removes a key from the map (its index entry is already gone).
    fn forget(&mut self, k: &str) {
        if let Some((k, e)) = self.map.remove_entry(k) {
            self.bytes -= key_cost(&k) + e.response.as_deref().map_or(0, response_cost);
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl IdempotencyStore for MemoryStore {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        Box::pin(std::future::ready(self.begin_now(
            key,
            fingerprint,
            token,
            lease,
        )))
    }

    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        Box::pin(std::future::ready(self.renew_now(
            key,
            fingerprint,
            token,
            lease,
        )))
    }

    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        Box::pin(std::future::ready(self.complete_now(
            key,
            fingerprint,
            token,
            response,
            ttl,
        )))
    }

    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        self.release_now(key, token);
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const T: LockToken = LockToken::from_u128(7);

    fn resp(body: &'static str) -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![],
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    /// The indices and the byte count always agree with the map.
    fn check(s: &MemoryStore) {
        let st = s.lock();
        assert_eq!(st.running.len() + st.done.len(), st.map.len());
        for (d, k) in &st.running {
            let e = &st.map[k];
            assert_eq!(e.deadline, *d);
            assert!(e.response.is_none());
        }
        for (d, k) in &st.done {
            let e = &st.map[k];
            assert_eq!(e.deadline, *d);
            assert!(e.response.is_some());
        }
        let bytes: usize = st
            .map
            .iter()
            .map(|(k, e)| key_cost(k) + e.response.as_deref().map_or(0, response_cost))
            .sum();
        assert_eq!(st.bytes, bytes);
    }

    #[tokio::test(start_paused = true)]
    async fn indices_stay_consistent_through_every_operation() {
        let s = MemoryStore::new(8).unwrap();
        let lease = Duration::from_secs(10);
        let ttl = Duration::from_secs(100);
        for round in 0..50u32 {
            let k = format!("k{}", round % 12);
            let fp = [(round % 3) as u8; 32];
            let t = LockToken::from_u128(u128::from(round % 2));
            let _ = s.begin_now(&k, fp, t, lease);
            check(&s);
            match round % 5 {
                0 => s.release_now(&k, t),
                1 => {
                    let _ = s.renew_now(&k, fp, t, lease);
                }
                _ => {
                    let _ = s.complete_now(&k, fp, t, resp("x"), ttl);
                }
            }
            check(&s);
            tokio::time::advance(Duration::from_secs(3)).await;
            assert!(s.len() <= 8);
            check(&s);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_purged_and_not_counted() {
        let s = MemoryStore::new(10).unwrap();
        s.begin_now("a", [1; 32], T, Duration::from_secs(5))
            .unwrap();
        s.begin_now("b", [1; 32], T, Duration::from_secs(5))
            .unwrap();
        s.complete_now("b", [1; 32], T, resp("body"), Duration::from_secs(20))
            .unwrap();
        assert_eq!(s.len(), 2);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(s.len(), 1, "the lock of a ran out");
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(s.len(), 0, "b's response expired");
        assert_eq!(s.heap_bytes(), 0);
        check(&s);
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_bound_evicts_the_oldest_responses() {
        let one = key_cost("k0") + response_cost(&resp("0123456789"));
        let s = MemoryStore::new(100)
            .unwrap()
            .with_max_bytes(3 * one)
            .unwrap();
        for i in 0..5 {
            let k = format!("k{i}");
            s.begin_now(&k, [1; 32], T, Duration::from_secs(5)).unwrap();
            s.complete_now(&k, [1; 32], T, resp("0123456789"), Duration::from_secs(60))
                .unwrap();
            check(&s);
        }
        assert_eq!(s.len(), 3);
        assert!(s.heap_bytes() <= 3 * one);
        assert_eq!(
            s.begin_now("k0", [1; 32], T, Duration::from_secs(5))
                .unwrap(),
            Begin::Started
        );
        assert!(matches!(
            s.begin_now("k4", [1; 32], T, Duration::from_secs(5))
                .unwrap(),
            Begin::Completed(_)
        ));
        // A response larger than the whole bound is refused; the lock stays.
        s.begin_now("big", [1; 32], T, Duration::from_secs(5))
            .unwrap();
        let big = StoredResponse {
            status: 201,
            headers: vec![],
            body: Bytes::from(vec![0; 4 * one]),
        };
        assert!(s
            .complete_now("big", [1; 32], T, big, Duration::from_secs(60))
            .is_err());
        assert_eq!(
            s.begin_now("big", [1; 32], T, Duration::from_secs(5))
                .unwrap(),
            Begin::InFlight
        );
        check(&s);
    }

    #[test]
    fn zero_bounds_are_refused() {
        assert!(MemoryStore::new(0).is_err());
        assert!(MemoryStore::new(1).unwrap().with_max_bytes(0).is_err());
    }
}
