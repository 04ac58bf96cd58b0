use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::flight::Cell;

/// Reads a [`CoalesceLayer`](crate::CoalesceLayer)'s counters (from
/// [`pair`](crate::CoalesceLayer::pair) or [`handle`](crate::CoalesceLayer::handle)).
///
/// Keys are hosts by default, kept in lower case: a host given to a method here is found in
/// any case (`"API.example.com"` finds the state of `https://api.example.com/`). Keys chosen
/// with `with_key(..)` are looked up as given.
#[derive(Debug, Clone)]
pub struct CoalesceHandle {
    pub(crate) cell: Arc<Cell>,
}

/// What a layer has done since it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceStats {
    calls: u64,
    upstream: u64,
    joined: u64,
    too_large: u64,
    fallbacks: u64,
}

impl CoalesceStats {
    /// Requests that could be coalesced (GET and HEAD with an empty body and no `CallOptions`).
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Shared calls started: the requests the inner service received for them.
    pub fn upstream(&self) -> u64 {
        self.upstream
    }

    /// Requests that joined a call already in flight instead of making their own.
    pub fn joined(&self) -> u64 {
        self.joined
    }

    /// Shared calls whose body was larger than the bound, so not shared.
    pub fn too_large(&self) -> u64 {
        self.too_large
    }

    /// Requests that joined a call and sent their own: its body turned out too large, or the
    /// caller that was sending it went away and took its sending with it (a reqwest-middleware
    /// chain, see [`DriverGone`](sturdy_core::DriverGone); a tokio runtime that shut down with
    /// the call's timers or a hyper client's connection task on it).
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }
}

impl CoalesceHandle {
    /// The counters so far.
    pub fn stats(&self) -> CoalesceStats {
        let c = &self.cell.get().counters;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        CoalesceStats {
            calls: g(&c.calls),
            upstream: g(&c.upstream),
            joined: g(&c.joined),
            too_large: g(&c.too_large),
            fallbacks: g(&c.fallbacks),
        }
    }

    /// Shared calls in flight to `key` (the host) now. For a host past `with_max_hosts`, the
    /// calls in the overflow table it shares with the other hosts past the bound.
    pub fn in_flight(&self, key: &str) -> usize {
        let registry = self.cell.get();
        registry
            .map
            .find_serving(&sturdy_core::key::stored_key(
                key,
                registry.config.keys_are_hosts,
            ))
            .map_or(0, |s| s.value().len())
    }
}
