//! Per-key state for limiters and breakers: created lazily, bounded in number, shared by every
//! clone of a layer, with a per-service cache that skips the map when consecutive calls have the
//! same key.
//!
//! Reads take a read lock on the map only when the cache misses; nothing here is held across an
//! `.await`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

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
}

impl<T: fmt::Debug> fmt::Debug for Slot<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("key", &self.key)
            .field("value", &self.value)
            .finish()
    }
}

/// The key of the slot shared by keys beyond the bound.
pub const OVERFLOW_KEY: &str = "*";

/// A bounded map from key to shared state.
pub struct KeyedMap<T> {
    map: RwLock<HashMap<Box<str>, Arc<Slot<T>>>>,
    max: usize,
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
    /// A map that keeps at most `max` keys (at least 1): past it, idle states are forgotten, then
    /// new keys share one overflow slot ([`OVERFLOW_KEY`]).
    pub fn new(max: usize) -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            max: max.max(1),
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

    /// The slot of `key`, made with `make` if it does not exist.
    pub fn get_or_insert_with(&self, key: &str, make: impl FnOnce() -> T) -> Arc<Slot<T>> {
        if let Some(s) = self.find(key) {
            return s;
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = map.get(key) {
            return s.clone();
        }
        let mut key = key;
        if map.len() >= self.max {
            map.retain(|_, s| {
                let keep = !s.value.is_idle();
                if !keep {
                    s.evicted.store(true, Ordering::Release);
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

/// The last slot a service used.
#[derive(Debug)]
pub struct SlotCache<T>(Option<Arc<Local<T>>>);

impl<T> Default for SlotCache<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> Clone for SlotCache<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Idle> SlotCache<T> {
    /// The slot of `key`: the cached one when the key matches and the map still holds it, else
    /// from `map` (made with `make` if needed).
    pub fn get(&mut self, map: &KeyedMap<T>, key: &str, make: impl FnOnce() -> T) -> Arc<Local<T>> {
        if let Some(l) = &self.0 {
            if *l.0.key == *key && !l.0.evicted.load(Ordering::Acquire) {
                return l.clone();
            }
        }
        let l = Arc::new(Local(map.get_or_insert_with(key, make)));
        self.0 = Some(l.clone());
        l
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
}
