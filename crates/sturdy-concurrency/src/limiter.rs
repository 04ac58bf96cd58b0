//! One host's limit: a semaphore whose permits follow the limit, and the control that moves it.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sturdy_core::events::{Event, EventHook};
use sturdy_core::keyed::{Idle, KeyedMap, Local, Slot};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::algorithm::{aimd_increase, decrease, vegas, Algorithm, Params, Signal, Vegas};

/// The most permits a limit may have (far below tokio's own bound).
pub(crate) const MAX_LIMIT: usize = 1_000_000;

/// The layer's settings, shared by every host.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) algorithm: Algorithm,
    pub(crate) initial: usize,
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) backoff: f64,
    pub(crate) max_wait: Duration,
    pub(crate) max_hosts: usize,
    pub(crate) events: EventHook,
    /// Whether keys are hosts (false once `with_key` chose other keys).
    pub(crate) keys_are_hosts: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Aimd,
            initial: 20,
            min: 1,
            max: 1_000,
            backoff: 0.9,
            max_wait: Duration::from_secs(30),
            max_hosts: 1_024,
            events: EventHook::none(),
            keys_are_hosts: true,
        }
    }
}

impl Config {
    fn params(&self) -> Params {
        Params {
            algorithm: self.algorithm,
            min: self.min as f64,
            max: self.max as f64,
            backoff: self.backoff,
        }
    }
}

/// The permits the semaphore should hold for `limit` (half of it while Vegas probes).
fn target(config: &Config, vegas: &Vegas, limit: f64) -> usize {
    let limit = match config.algorithm {
        Algorithm::Vegas => vegas.effective(&config.params(), limit),
        Algorithm::Aimd => limit,
    };
    (limit.floor() as usize).clamp(config.min, config.max)
}

/// What changes under the lock: the permits given to the semaphore and the latency mode's window.
#[derive(Debug)]
struct Control {
    applied: usize,
    vegas: Vegas,
}

/// One host's limit.
pub(crate) struct Limiter {
    pub(crate) sem: Arc<Semaphore>,
    /// Permits to forget as they come back, owed after a decrease found them in use.
    debt: AtomicUsize,
    /// The semaphore's permits as set by the limit (a copy of `Control::applied` for readers).
    applied: AtomicUsize,
    pub(crate) waiting: AtomicUsize,
    /// The limit as an `f64`'s bits (it grows by fractions).
    limit: AtomicU64,
    /// Bumped on each decrease: an overload signal from a call admitted before the last decrease
    /// is not acted on again (one decrease per round trip).
    generation: AtomicU64,
    control: Mutex<Control>,
    pub(crate) config: Arc<Config>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Limiter {
    pub(crate) fn new(config: Arc<Config>) -> Self {
        let initial = config.initial.clamp(config.min, config.max);
        let vegas = Vegas::default();
        let applied = target(&config, &vegas, initial as f64);
        Self {
            sem: Arc::new(Semaphore::new(applied)),
            debt: AtomicUsize::new(0),
            applied: AtomicUsize::new(applied),
            waiting: AtomicUsize::new(0),
            limit: AtomicU64::new((initial as f64).to_bits()),
            generation: AtomicU64::new(0),
            control: Mutex::new(Control { applied, vegas }),
            config,
        }
    }

    fn limit_f(&self) -> f64 {
        f64::from_bits(self.limit.load(Ordering::Relaxed))
    }

    /// The limit in force (whole calls).
    pub(crate) fn limit(&self) -> usize {
        self.limit_f().floor() as usize
    }

    /// Sets the limit and gives the semaphore the permits it implies. Called under no lock.
    fn set_limit(&self, next: f64) {
        let mut c = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        self.limit.store(next.to_bits(), Ordering::Relaxed);
        self.apply(&mut c, next);
    }

    fn apply(&self, c: &mut Control, limit: f64) {
        let target = target(&self.config, &c.vegas, limit);
        if target > c.applied {
            // Set before the permits come, so that `in_flight` (the permits set, less those
            // free) never reads fewer calls than hold one: a call in flight must never look
            // idle to a full map of hosts. While permits go (below), it reads more, which is
            // harmless.
            self.applied.store(target, Ordering::Release);
            let mut grow = target - c.applied;
            // Permits still owed are cancelled first.
            while grow > 0 {
                let owed = self.debt.load(Ordering::Acquire);
                if owed == 0 {
                    break;
                }
                let pay = owed.min(grow);
                if self
                    .debt
                    .compare_exchange(owed, owed - pay, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    grow -= pay;
                }
            }
            if grow > 0 {
                self.sem.add_permits(grow);
            }
        } else if target < c.applied {
            let shrink = c.applied - target;
            let forgotten = self.sem.forget_permits(shrink);
            if forgotten < shrink {
                self.debt.fetch_add(shrink - forgotten, Ordering::AcqRel);
            }
        }
        c.applied = target;
        self.applied.store(target, Ordering::Relaxed);
    }

    /// Calls holding a permit now: the permits set, plus those owed (held by calls admitted
    /// before a decrease, to be forgotten as they come back), less those free. Read from the
    /// semaphore, so that taking a permit touches one shared counter, not two.
    pub(crate) fn in_flight(&self) -> usize {
        self.applied
            .load(Ordering::Relaxed)
            .saturating_add(self.debt.load(Ordering::Relaxed))
            .saturating_sub(self.sem.available_permits())
    }

    /// Acts on what a call said.
    fn observe(&self, signal: Signal, generation: u64, in_flight: usize) {
        let p = self.config.params();
        match signal {
            Signal::Ignore => {}
            Signal::Overload => {
                let mut c = self.control.lock().unwrap_or_else(PoisonError::into_inner);
                if self.generation.load(Ordering::Relaxed) != generation {
                    // Admitted before the last decrease, which already answered this overload.
                    return;
                }
                self.generation.fetch_add(1, Ordering::Relaxed);
                let next = decrease(&p, self.limit_f());
                self.limit.store(next.to_bits(), Ordering::Relaxed);
                c.vegas.reset_window();
                self.apply(&mut c, next);
                tracing::debug!(limit = next, "overload signal: concurrency limit lowered");
            }
            Signal::Success(rtt) => match p.algorithm {
                Algorithm::Aimd => self.aimd_success(&p, in_flight),
                Algorithm::Vegas => {
                    let Some(rtt) = rtt else { return };
                    let mut c = self.control.lock().unwrap_or_else(PoisonError::into_inner);
                    let limit = self.limit_f();
                    let next = vegas(&mut c.vegas, &p, limit, rtt, in_flight);
                    if let Some(next) = next {
                        self.limit.store(next.to_bits(), Ordering::Relaxed);
                    }
                    // A probe may have started or ended too.
                    self.apply(&mut c, next.unwrap_or(limit));
                }
            },
        }
    }

    /// Lock-free unless the whole part of the limit changes.
    fn aimd_success(&self, p: &Params, in_flight: usize) {
        let mut cur = self.limit.load(Ordering::Relaxed);
        loop {
            let limit = f64::from_bits(cur);
            let next = aimd_increase(p, limit, in_flight);
            if next == limit {
                return;
            }
            match self.limit.compare_exchange_weak(
                cur,
                next.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if next.floor() != limit.floor() {
                        let mut c = self.control.lock().unwrap_or_else(PoisonError::into_inner);
                        let now = self.limit_f();
                        self.apply(&mut c, now);
                    }
                    return;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// The no-load latency the latency mode uses, if known.
    pub(crate) fn baseline(&self) -> Option<Duration> {
        self.control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .vegas
            .baseline()
    }

    /// Sets the limit by hand (clamped to the bounds).
    pub(crate) fn force(&self, limit: usize) {
        let l = limit.clamp(self.config.min, self.config.max) as f64;
        self.set_limit(l);
    }
}

impl Idle for Limiter {
    /// A host with nothing in flight and nobody waiting: forgetting it loses only the limit it
    /// learned, which it learns again from the initial one.
    fn is_idle(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) == 0 && self.in_flight() == 0
    }
}

/// Tells the event hook (and so the limit gauge) that `local`'s limit moved from `before`, if it
/// did.
fn changed(local: &Slot<Limiter>, before: usize) {
    let l = local.value();
    let after = l.limit();
    if after != before {
        let key = local.key();
        l.config.events.emit(&Event::ConcurrencyLimitChanged {
            key,
            host: l.config.keys_are_hosts.then_some(key),
            from: before,
            to: after,
        });
    }
}

/// Sets `local`'s limit by hand (clamped to the bounds), and reports the change like any other.
pub(crate) fn set_by_hand(local: &Slot<Limiter>, limit: usize) {
    let before = local.value().limit();
    local.value().force(limit);
    changed(local, before);
}

/// Tells the event hook that a call of `local` was refused; `own` is the call's own key (its
/// host by default), which past the bound on hosts is not the limit's (`*`): the event names the
/// limit's key and the call's host.
pub(crate) fn rejected(local: &Local<Limiter>, own: &str) {
    let l = local.value();
    l.config.events.emit(&Event::ConcurrencyRejected {
        key: local.key(),
        host: l.config.keys_are_hosts.then_some(own),
        limit: l.limit(),
    });
}

/// A permit of `local`'s limit now, if one is free.
pub(crate) fn try_acquire(local: &Arc<Local<Limiter>>) -> Option<Permit> {
    let p = local.value().sem.clone().try_acquire_owned().ok()?;
    Some(Permit::new(local.clone(), p))
}

/// A call's place under the limit, given back when dropped.
pub(crate) struct Permit {
    local: Arc<Local<Limiter>>,
    permit: Option<OwnedSemaphorePermit>,
    generation: u64,
    in_flight: usize,
    /// When the call was first found waiting (the latency mode's clock).
    pub(crate) start: Option<Instant>,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("key", &self.local.key())
            .finish_non_exhaustive()
    }
}

impl Permit {
    pub(crate) fn new(local: Arc<Local<Limiter>>, permit: OwnedSemaphorePermit) -> Self {
        let l = local.value();
        let in_flight = l.in_flight();
        let generation = l.generation.load(Ordering::Relaxed);
        Self {
            local,
            permit: Some(permit),
            generation,
            in_flight,
            start: None,
        }
    }

    /// Whether the latency of this call is worth measuring.
    pub(crate) fn wants_latency(&self) -> bool {
        self.local.value().config.algorithm == Algorithm::Vegas
    }

    /// Reports the call's outcome and gives the place back.
    pub(crate) fn finish(&mut self, signal: Signal) {
        if self.permit.is_none() {
            return;
        }
        let l = self.local.value();
        let before = l.limit();
        l.observe(signal, self.generation, self.in_flight);
        changed(&self.local, before);
        self.release();
    }

    fn release(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let l = self.local.value();
        let owed = l
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if owed {
            // The limit went down while this call ran: its permit is retired.
            permit.forget();
        } else {
            drop(permit);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // A call dropped before it finished says nothing about the server.
        self.release();
    }
}

/// Every host's limit, bounded in number.
pub(crate) struct Registry {
    pub(crate) config: Arc<Config>,
    pub(crate) map: KeyedMap<Limiter>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.config)
            .field("hosts", &self.map)
            .finish()
    }
}

impl Registry {
    pub(crate) fn new(config: Config) -> Self {
        let max = config.max_hosts;
        Self {
            config: Arc::new(config),
            map: KeyedMap::new(max),
        }
    }

    pub(crate) fn make(&self) -> impl FnOnce() -> Limiter + '_ {
        || Limiter::new(self.config.clone())
    }

    /// The limiter serving `key` (a host in any case, when keys are hosts): its own, or the
    /// overflow one past the bound. For the handle: calls look their limiter up by their key.
    pub(crate) fn find(&self, key: &str) -> Option<Arc<Slot<Limiter>>> {
        let key = sturdy_core::key::stored_key(key, self.config.keys_are_hosts);
        self.map.find_serving(&key)
    }

    /// The limiter of `key` (a host in any case, when keys are hosts), made if needed.
    pub(crate) fn get(&self, key: &str) -> Arc<Slot<Limiter>> {
        let key = sturdy_core::key::stored_key(key, self.config.keys_are_hosts);
        self.map.get_or_insert_with(&key, self.make())
    }
}

/// The registry of a layer, its clones and its handles: one cell, so that a setter called after a
/// clone or a handle still applies to all of them.
pub(crate) type Cell = sturdy_core::keyed::SharedCell<Registry>;

/// Setters replace the registry with one of edited settings (hosts start afresh).
pub(crate) fn edit(cell: &Cell, f: impl FnOnce(&mut Config)) {
    cell.replace(|r| {
        let mut config = (*r.config).clone();
        f(&mut config);
        Registry::new(config)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use sturdy_core::keyed::SlotCache;

    fn limiter(config: Config) -> (KeyedMap<Limiter>, Arc<Local<Limiter>>) {
        let map = KeyedMap::new(4);
        let config = Arc::new(config);
        let local = SlotCache::default().get(&map, "h", || Limiter::new(config));
        (map, local)
    }

    #[test]
    fn permits_follow_the_limit_down_and_up_without_leaks() {
        let (_map, l) = limiter(Config {
            initial: 4,
            ..Config::default()
        });
        let held: Vec<_> = (0..4).map(|_| try_acquire(&l).unwrap()).collect();
        assert!(try_acquire(&l).is_none());
        // Down to 2 while 4 are in use: two permits are owed and retired as they come back.
        l.value().force(2);
        assert_eq!(
            l.value().in_flight(),
            4,
            "the four admitted are still in flight"
        );
        let mut held = held.into_iter();
        drop(held.next());
        assert_eq!(l.value().in_flight(), 3);
        assert_eq!(
            l.value().sem.available_permits(),
            0,
            "a permit owed is retired"
        );
        drop(held.next());
        drop(held.next());
        assert_eq!(l.value().in_flight(), 1);
        assert_eq!(l.value().sem.available_permits(), 1);
        drop(held);
        assert_eq!(l.value().sem.available_permits(), 2);
        assert_eq!(l.value().in_flight(), 0);
        // Up to 5.
        l.value().force(5);
        assert_eq!(l.value().sem.available_permits(), 5);
        assert_eq!(l.value().limit(), 5);
        // Down and up before anything comes back: the debt is cancelled, not paid twice.
        let held: Vec<_> = (0..5).map(|_| try_acquire(&l).unwrap()).collect();
        l.value().force(1);
        l.value().force(3);
        drop(held);
        assert_eq!(l.value().sem.available_permits(), 3);
    }

    #[test]
    fn one_decrease_per_round_trip() {
        let (_map, l) = limiter(Config {
            initial: 10,
            ..Config::default()
        });
        let mut calls: Vec<_> = (0..5).map(|_| try_acquire(&l).unwrap()).collect();
        for p in &mut calls {
            p.finish(Signal::Overload);
        }
        assert_eq!(
            l.value().limit(),
            9,
            "five 503s of one round trip: one decrease"
        );
        let mut next = try_acquire(&l).unwrap();
        next.finish(Signal::Overload);
        assert_eq!(l.value().limit_f(), 8.1);
    }

    #[test]
    fn aimd_grows_while_the_limit_is_used() {
        let (_map, l) = limiter(Config {
            initial: 2,
            ..Config::default()
        });
        for _ in 0..20 {
            let a = try_acquire(&l).unwrap();
            let mut b = try_acquire(&l).unwrap();
            b.finish(Signal::Success(None));
            drop(a);
        }
        assert!(l.value().limit() >= 5, "{}", l.value().limit());
        assert_eq!(l.value().sem.available_permits(), l.value().limit());
    }
}
