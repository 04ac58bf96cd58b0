//! Per-key state for limiters and breakers: created lazily, bounded in number, shared by every
//! clone of a layer, with a per-service cache that skips the map when consecutive calls have the
//! same key.
//!
//! Reads take a read lock on the map only when the cache misses; nothing here is held across an
//! `.await`.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

/// A fast hash for short keys (hosts): the keys come from the application's own requests and the
/// map is bounded, so the protection of SipHash against chosen collisions buys nothing here,
/// while its cost is paid on every lookup.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for b in chunks.remainder() {
            h = (h.rotate_left(5) ^ u64::from(*b)).wrapping_mul(K);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Map<T> = HashMap<Box<str>, Arc<Slot<T>>, BuildHasherDefault<KeyHasher>>;

/// State that can say it holds nothing worth keeping, so a full map may forget it.
pub trait Idle {
    /// Whether forgetting this state loses nothing.
    fn is_idle(&self) -> bool;
}

/// One key's state.
pub struct Slot<T> {
    key: Box<str>,
    value: T,
    evicted: AtomicBool,
}

impl<T> Slot<T> {
    /// The key (`*` for the overflow slot shared by keys past the bound).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The state.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// Whether a full map has forgotten this slot (a later lookup of its key makes another).
    ///
    /// A map forgets only a slot whose state says it is idle, so a user that marks the state
    /// busy (a count raised, a permit taken) and then finds the slot not forgotten knows the map
    /// keeps it until that mark is undone; one that finds it forgotten undoes its mark and looks
    /// the key up again. The check is ordered after the mark (a full fence), and the map marks a
    /// slot forgotten before it reads whether the slot is idle, so one of the two sees the other.
    /// It may answer `true` for a slot the map then keeps after all (a look-up while the map was
    /// deciding): looking again finds the same slot.
    pub fn forgotten(&self) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.evicted.load(Ordering::Relaxed)
    }

    /// Whether a full map has forgotten this slot, without the fence of
    /// [`forgotten`](Self::forgotten): for a use that began long before and ends now (a call's
    /// outcome coming back), which looks the key up again when it is. It may answer `true` for a
    /// slot the map is deciding about and then keeps: the look-up finds the same slot.
    pub fn was_forgotten(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }
}

impl<T: fmt::Debug> fmt::Debug for Slot<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("key", &self.key)
            .field("value", &self.value)
            .finish()
    }
}

/// The key of the slot shared by keys beyond the bound. A key of a layer's own (`with_key`)
/// that is `*` names this slot too, so its calls share it with the keys beyond the bound: keep
/// `*` out of your keys.
pub const OVERFLOW_KEY: &str = "*";

/// A bounded map from key to shared state.
pub struct KeyedMap<T> {
    map: RwLock<Map<T>>,
    max: usize,
    /// The slot of the first key a service using this map asked for, shared by every service's
    /// [`SlotCache`]: kept here, next to the map, so that cloning a service takes no reference
    /// count of its own for it.
    first: OnceLock<Arc<Local<T>>>,
}

impl<T> fmt::Debug for KeyedMap<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedMap")
            .field("len", &self.map.read().map(|m| m.len()).unwrap_or(0))
            .field("max", &self.max)
            .finish()
    }
}

impl<T: Idle> KeyedMap<T> {
    /// A map that keeps at most `max` keys of their own (at least 1): past it, idle states are
    /// forgotten, then new keys share one overflow slot ([`OVERFLOW_KEY`]). The overflow slot is
    /// made when a new key finds `max` keys none of which is idle, so the map then holds `max + 1`
    /// slots; once made, it counts among the `max` for the keys that come after, so a key of its
    /// own is made again only while fewer than `max - 1` are kept besides it.
    pub fn new(max: usize) -> Self {
        Self {
            map: RwLock::new(Map::default()),
            max: max.max(1),
            first: OnceLock::new(),
        }
    }

    /// The slot of `key`, if it exists.
    pub fn find(&self, key: &str) -> Option<Arc<Slot<T>>> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// The slot that serves `key` now: its own, or, when the map is full and keys past the
    /// bound share the overflow slot, that one. `None` when neither exists. For handles, which
    /// answer for a key what its calls live.
    pub fn find_serving(&self, key: &str) -> Option<Arc<Slot<T>>> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(key)
            .or_else(|| {
                // The overflow slot serves every key without one of its own while the map is
                // full, counted as `get_or_insert_with` counts it (the overflow slot included).
                (map.len() >= self.max)
                    .then(|| map.get(OVERFLOW_KEY))
                    .flatten()
            })
            .cloned()
    }

    /// The slot of `key` itself, made with `make` if it does not exist, even past the bound:
    /// for a key a caller names by hand (a breaker forced open), which must not act on the
    /// overflow slot that other keys share. The map grows past its bound only by such calls.
    pub fn get_or_insert_own(&self, key: &str, make: impl FnOnce() -> T) -> Arc<Slot<T>> {
        self.get_or_insert(key, make, false)
    }

    /// The slot of `key`, made with `make` if it does not exist.
    pub fn get_or_insert_with(&self, key: &str, make: impl FnOnce() -> T) -> Arc<Slot<T>> {
        self.get_or_insert(key, make, true)
    }

    /// The slot of `key`, made if needed; `bounded`: past the bound, forget idle keys, then
    /// give the overflow slot.
    fn get_or_insert(&self, key: &str, make: impl FnOnce() -> T, bounded: bool) -> Arc<Slot<T>> {
        if let Some(s) = self.find(key) {
            return s;
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = map.get(key) {
            return s.clone();
        }
        let mut key = key;
        if bounded && map.len() >= self.max {
            map.retain(|_, s| {
                // Marked first, then asked: a user that marks the state busy and then checks
                // `forgotten` (see there) either sees this mark or is seen busy here.
                s.evicted.store(true, Ordering::Relaxed);
                std::sync::atomic::fence(Ordering::SeqCst);
                let keep = !s.value.is_idle();
                if keep {
                    s.evicted.store(false, Ordering::Release);
                }
                keep
            });
            if map.len() >= self.max {
                key = OVERFLOW_KEY;
                if let Some(s) = map.get(key) {
                    return s.clone();
                }
            }
        }
        let slot = Arc::new(Slot {
            key: key.into(),
            value: make(),
            evicted: AtomicBool::new(false),
        });
        map.insert(key.into(), slot.clone());
        slot
    }

    /// Every slot.
    pub fn all(&self) -> Vec<Arc<Slot<T>>> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// How many keys are kept.
    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no key is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A service's own reference to a slot.
///
/// Futures clone this `Arc` rather than the shared slot's, so that services on different threads
/// count references on different cache lines.
#[derive(Debug)]
pub struct Local<T>(Arc<Slot<T>>);

impl<T> std::ops::Deref for Local<T> {
    type Target = Slot<T>;
    fn deref(&self) -> &Slot<T> {
        &self.0
    }
}

/// A service's cache of slots: the slot of the first key any service using the map asked for
/// (kept by the [`KeyedMap`]), and the last slot this service used.
///
/// Services are usually cloned for every call (`svc.clone().oneshot(req)`) from one that is never
/// called itself, so a cache of the clone's own would always be empty: the shared first slot is
/// what makes the common case (one host) skip the map, its lock and its hash.
#[derive(Debug)]
pub struct SlotCache<T> {
    last: Option<Arc<Local<T>>>,
    /// Whether this clone has used the shared first slot already: a clone that is called again
    /// is a kept one (a worker's own service), and gets a `Local` of its own.
    used_first: bool,
}

impl<T> Default for SlotCache<T> {
    fn default() -> Self {
        Self {
            last: None,
            used_first: false,
        }
    }
}

impl<T> Clone for SlotCache<T> {
    fn clone(&self) -> Self {
        Self {
            last: self.last.clone(),
            used_first: false,
        }
    }
}

impl<T: Idle> SlotCache<T> {
    /// The slot of `key`: a cached one when the key matches and the map still holds it, else
    /// from `map` (made with `make` if needed).
    pub fn get(&mut self, map: &KeyedMap<T>, key: &str, make: impl FnOnce() -> T) -> Arc<Local<T>> {
        let fresh = |l: &Arc<Local<T>>| *l.0.key == *key && !l.0.evicted.load(Ordering::Acquire);
        if let Some(l) = &self.last {
            if fresh(l) {
                return l.clone();
            }
        }
        if let Some(l) = map.first.get() {
            if fresh(l) {
                if !self.used_first {
                    // A clone made for one call: the shared slot, without an allocation.
                    self.used_first = true;
                    return l.clone();
                }
                // A clone called again is kept (on a thread of its own, often): its own `Local`,
                // so that its futures do not count references on the line other threads use.
                let own = Arc::new(Local(l.0.clone()));
                self.last = Some(own.clone());
                return own;
            }
        }
        let l = Arc::new(Local(map.get_or_insert_with(key, make)));
        if map.first.get().is_none() {
            let _ = map.first.set(l.clone());
        }
        self.last = Some(l.clone());
        l
    }
}

/// The state of a layer that its clones and the handles taken from it share, and that a setter
/// replaces for all of them at once: a setter called after a clone or a handle never forks it.
/// Services made before a setter keep the state they were made with. The lock is held to clone
/// the `Arc`, and, in [`replace`](Self::replace), while the new state is made from the old.
pub struct SharedCell<T>(std::sync::Mutex<Arc<T>>);

impl<T> SharedCell<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(Arc::new(value)))
    }

    /// The value in use now.
    pub fn get(&self) -> Arc<T> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the value with `f` of the current one.
    pub fn replace(&self, f: impl FnOnce(&T) -> T) {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let next = f(&g);
        *g = Arc::new(next);
    }
}

impl<T: fmt::Debug> fmt::Debug for SharedCell<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedCell").field(&self.get()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    struct Count(AtomicU32);
    impl Idle for Count {
        fn is_idle(&self) -> bool {
            self.0.load(Ordering::Relaxed) == 0
        }
    }

    #[test]
    fn bounded_with_eviction_then_overflow() {
        let m: KeyedMap<Count> = KeyedMap::new(2);
        let a = m.get_or_insert_with("a", || Count(AtomicU32::new(1)));
        m.get_or_insert_with("b", || Count(AtomicU32::new(0)));
        // "b" is idle: forgotten to make room for "c".
        let c = m.get_or_insert_with("c", || Count(AtomicU32::new(1)));
        assert_eq!(c.key(), "c");
        assert!(m.find("b").is_none());
        // Now full of busy keys: "d" shares the overflow slot.
        let d = m.get_or_insert_with("d", || Count(AtomicU32::new(1)));
        assert_eq!(d.key(), OVERFLOW_KEY);
        assert!(Arc::ptr_eq(
            &a,
            &m.get_or_insert_with("a", || unreachable!())
        ));
        // A handle asking about "d" (or any key without a slot) reads the overflow slot that
        // serves it; about "a", its own.
        assert!(Arc::ptr_eq(&d, &m.find_serving("d").unwrap()));
        assert!(Arc::ptr_eq(&d, &m.find_serving("e").unwrap()));
        assert!(Arc::ptr_eq(&a, &m.find_serving("a").unwrap()));
        assert!(m.find("d").is_none());
        // A key named by hand gets its own slot past the bound; the others still share.
        let own = m.get_or_insert_own("d", || Count(AtomicU32::new(1)));
        assert_eq!(own.key(), "d");
        assert!(Arc::ptr_eq(
            &own,
            &m.get_or_insert_with("d", || unreachable!())
        ));
        assert_eq!(
            m.get_or_insert_with("e", || unreachable!()).key(),
            OVERFLOW_KEY
        );
    }

    #[test]
    fn the_overflow_serves_as_soon_as_a_new_key_would_get_it() {
        let m: KeyedMap<Count> = KeyedMap::new(2);
        m.get_or_insert_with("a", || Count(AtomicU32::new(1)));
        let b = m.get_or_insert_with("b", || Count(AtomicU32::new(1)));
        m.get_or_insert_with("c", || Count(AtomicU32::new(1)));
        // "b" goes idle and is forgotten for "d", which still gets the overflow slot: the map
        // holds "a" and "*", as full as get_or_insert_with counts it.
        b.value().0.store(0, Ordering::Relaxed);
        assert_eq!(
            m.get_or_insert_with("d", || unreachable!()).key(),
            OVERFLOW_KEY
        );
        assert!(m.find("b").is_none());
        assert_eq!(m.find_serving("e").unwrap().key(), OVERFLOW_KEY);
        assert_eq!(
            m.get_or_insert_with("e", || unreachable!()).key(),
            OVERFLOW_KEY
        );
    }

    #[test]
    fn nothing_serves_a_key_while_the_map_has_room() {
        let m: KeyedMap<Count> = KeyedMap::new(2);
        assert!(m.find_serving("a").is_none());
        m.get_or_insert_with("a", || Count(AtomicU32::new(1)));
        assert!(m.find_serving("b").is_none());
        assert_eq!(m.find_serving("a").unwrap().key(), "a");
    }

    #[test]
    fn cache_follows_the_key_and_eviction() {
        let m: KeyedMap<Count> = KeyedMap::new(1);
        let mut cache = SlotCache::default();
        let x = cache.get(&m, "x", || Count(AtomicU32::new(0)));
        let again = cache.get(&m, "x", || unreachable!());
        assert!(Arc::ptr_eq(&x, &again));
        // "y" evicts idle "x"; the cache must not hand out the forgotten slot.
        let mut other = SlotCache::default();
        other.get(&m, "y", || Count(AtomicU32::new(0)));
        let fresh = cache.get(&m, "x", || Count(AtomicU32::new(7)));
        assert_eq!(fresh.value().0.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn a_slot_marked_busy_after_its_look_up_is_kept_or_seen_forgotten() {
        let m: KeyedMap<Count> = KeyedMap::new(1);
        // Looked up idle, then forgotten for another key before its user marked it busy: the
        // user's check after its mark sees it, and looking again makes a slot the map keeps.
        let a = m.get_or_insert_with("a", || Count(AtomicU32::new(0)));
        m.get_or_insert_with("b", || Count(AtomicU32::new(0)));
        a.value().0.fetch_add(1, Ordering::SeqCst);
        assert!(a.forgotten());
        a.value().0.fetch_sub(1, Ordering::SeqCst);
        let again = m.get_or_insert_with("a", || Count(AtomicU32::new(0)));
        again.value().0.fetch_add(1, Ordering::SeqCst);
        assert!(!again.forgotten());
        // Marked busy first: the map keeps it (and clears the mark it set while deciding), so
        // a new key gets the overflow slot.
        assert_eq!(
            m.get_or_insert_with("c", || Count(AtomicU32::new(0))).key(),
            OVERFLOW_KEY
        );
        assert!(!again.forgotten());
        assert!(Arc::ptr_eq(&again, &m.find("a").unwrap()));
    }

    #[test]
    fn fresh_clones_share_the_first_slot() {
        let m: KeyedMap<Count> = KeyedMap::new(8);
        let template: SlotCache<Count> = SlotCache::default();
        let first = template.clone().get(&m, "x", || Count(AtomicU32::new(1)));
        // A clone made for another call finds it without the map.
        let again = template.clone().get(&m, "x", || unreachable!());
        assert!(Arc::ptr_eq(&first, &again));
        // Another key goes to the map, and is cached by the clone that used it.
        let mut c = template;
        let y = c.get(&m, "y", || Count(AtomicU32::new(1)));
        assert!(Arc::ptr_eq(&y, &c.get(&m, "y", || unreachable!())));
    }
}
