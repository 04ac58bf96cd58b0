//! The state machine of one breaker. Pure logic over `tokio::time::Instant`, so it is tested with
//! paused time; the lock is held only inside these methods, never across an `.await`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;
use sturdy_core::OpenReason;

/// The state of a breaker, as the handle reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls flow; failures are counted.
    Closed,
    /// Calls fail fast until the open period ends.
    Open {
        /// How long until a probe is admitted.
        retry_in: Duration,
    },
    /// A bounded number of probes are admitted; their outcome closes or reopens the breaker.
    HalfOpen,
    /// Held open by [`CircuitHandle::force_open`](crate::CircuitHandle::force_open) until
    /// [`force_close`](crate::CircuitHandle::force_close).
    ForcedOpen,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
    ForcedOpen,
}

/// Calls and failures in a sliding window of `BUCKETS` buckets, counted with atomics so a call in
/// the closed state takes no lock. The counters are striped: each thread counts in one of
/// `STRIPES` copies on cache lines of their own, and a reader sums them, so two threads completing
/// calls do not fight over one counter. A bucket is reset by whoever first sees it stale; an
/// increment racing with that reset can be lost, which only blurs the statistics by a call.
#[derive(Debug)]
struct Window {
    origin: Instant,
    /// Bucket length in nanoseconds (u64 division is several times cheaper than u128).
    bucket_nanos: u64,
    /// The bucket the last call was counted in: most calls fall in the same one, and checking
    /// that is cheaper than the division. Written once per bucket length, so the line stays
    /// shared; a stale value is only a missed shortcut (the range is checked before use).
    current: AtomicU64,
    /// One more than the bucket of the latest failure, or 0 for none: a success checks the
    /// failure rate only when the window may hold a failure, so a healthy breaker does not sum
    /// its buckets per call. Only ever raised (`fetch_max`), so two threads failing in
    /// neighbouring buckets cannot leave it on the older one.
    last_failure: AtomicU64,
    stripes: [Padded<[Bucket; BUCKETS]>; STRIPES],
}

#[derive(Debug)]
struct Bucket {
    /// Bucket index since `origin`, or `EMPTY`.
    epoch: AtomicU64,
    // 64 bits: a long window (a day, or `Duration::MAX`, one bucket for ever) can count past
    // 2^32 calls.
    calls: AtomicU64,
    failures: AtomicU64,
}

const BUCKETS: usize = 10;
const STRIPES: usize = 4;
const EMPTY: u64 = u64::MAX;

/// This thread's stripe.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

impl Window {
    fn new(now: Instant, len: Duration) -> Self {
        Self {
            origin: now,
            bucket_nanos: u64::try_from(
                (len / BUCKETS as u32)
                    .max(Duration::from_millis(1))
                    .as_nanos(),
            )
            .unwrap_or(u64::MAX),
            current: AtomicU64::new(EMPTY),
            last_failure: AtomicU64::new(0),
            stripes: std::array::from_fn(|_| {
                Padded(std::array::from_fn(|_| Bucket {
                    epoch: AtomicU64::new(EMPTY),
                    calls: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                }))
            }),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        let elapsed = now.duration_since(self.origin);
        // Nanoseconds fit a u64 for 584 years of uptime.
        elapsed
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(elapsed.subsec_nanos()))
    }

    fn index(&self, now: Instant) -> u64 {
        self.nanos(now) / self.bucket_nanos
    }

    /// Counts a call; returns its bucket.
    fn record(&self, now: Instant, failed: bool) -> u64 {
        let nanos = self.nanos(now);
        let current = self.current.load(Ordering::Relaxed);
        let start = current.saturating_mul(self.bucket_nanos);
        let idx = if nanos >= start && nanos - start < self.bucket_nanos {
            current
        } else {
            let idx = nanos / self.bucket_nanos;
            self.current.store(idx, Ordering::Relaxed);
            idx
        };
        let b = &self.stripes[stripe()][(idx % BUCKETS as u64) as usize];
        let e = b.epoch.load(Ordering::Acquire);
        if e != idx
            && b.epoch
                .compare_exchange(e, idx, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.calls.store(0, Ordering::Release);
            b.failures.store(0, Ordering::Release);
        }
        b.calls.fetch_add(1, Ordering::AcqRel);
        if failed {
            b.failures.fetch_add(1, Ordering::AcqRel);
            let mark = idx.saturating_add(1);
            if self.last_failure.load(Ordering::Relaxed) < mark {
                self.last_failure.fetch_max(mark, Ordering::AcqRel);
            }
        }
        idx
    }

    /// Whether a failure may be in the window that ends with bucket `idx`.
    fn may_hold_a_failure(&self, idx: u64) -> bool {
        match self.last_failure.load(Ordering::Acquire) {
            0 => false,
            mark => idx.saturating_sub(mark - 1) < BUCKETS as u64,
        }
    }

    fn totals(&self, now: Instant) -> (u64, u64) {
        let idx = self.index(now);
        let oldest = idx.saturating_sub(BUCKETS as u64 - 1);
        self.stripes
            .iter()
            .flat_map(|s| s.0.iter())
            .filter(|b| {
                let e = b.epoch.load(Ordering::Acquire);
                e != EMPTY && e >= oldest && e <= idx
            })
            .fold((0, 0), |(c, f), b| {
                (
                    c.saturating_add(b.calls.load(Ordering::Acquire)),
                    f.saturating_add(b.failures.load(Ordering::Acquire)),
                )
            })
    }

    fn clear(&self) {
        for b in self.stripes.iter().flat_map(|s| s.0.iter()) {
            b.epoch.store(EMPTY, Ordering::Release);
        }
        self.last_failure.store(0, Ordering::Release);
    }
}

/// What only changes on transitions; guarded by the breaker's mutex.
#[derive(Debug)]
struct Inner {
    state: State,
    /// Times opened since the last close; grows the open period.
    reopenings: u32,
}

/// A state change, reported after the lock is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) from: CircuitState,
    pub(crate) to: CircuitState,
}

/// What admission granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) probe: bool,
    pub(crate) generation: u64,
}

/// One breaker. The closed state, the common case, is read and counted with atomics only; the
/// mutex is taken for transitions and while open or half-open, and never across an `.await`.
///
/// The fields every admission reads sit on a cache line of their own, away from the counters that
/// every completion writes (and from the `Arc` counts in front of the breaker), so two threads do
/// not invalidate each other's reads.
#[derive(Debug)]
pub(crate) struct Breaker {
    hot: Padded<Hot>,
    window: Padded<Window>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Hot {
    /// True exactly when `inner.state` is `Closed` (written under the lock).
    closed: AtomicBool,
    /// Bumped (under the lock) on every transition; tickets from an older period are ignored.
    generation: AtomicU64,
    consecutive: AtomicU32,
}

/// Keeps its contents on cache lines of their own (128 bytes covers adjacent-line prefetching).
#[derive(Debug)]
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

fn public(s: State, now: Instant) -> CircuitState {
    match s {
        State::Closed => CircuitState::Closed,
        State::Open { until } => CircuitState::Open {
            retry_in: until.saturating_duration_since(now),
        },
        State::HalfOpen { .. } => CircuitState::HalfOpen,
        State::ForcedOpen => CircuitState::ForcedOpen,
    }
}

impl Breaker {
    pub(crate) fn new(config: &Config, now: Instant) -> Self {
        Self {
            hot: Padded(Hot {
                closed: AtomicBool::new(true),
                generation: AtomicU64::new(0),
                consecutive: AtomicU32::new(0),
            }),
            window: Padded(Window::new(now, config.window)),
            inner: Mutex::new(Inner {
                state: State::Closed,
                reopenings: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) -> u64 {
        self.hot.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub(crate) fn state(&self, now: Instant) -> CircuitState {
        public(self.lock().state, now)
    }

    /// Whether forgetting this breaker loses nothing: closed, with no failure streak and no
    /// failure in its window (a host failing at a high rate whose last call succeeded has a
    /// rate to keep, which the default trigger opens on).
    pub(crate) fn is_idle_closed(&self) -> bool {
        self.hot.closed.load(Ordering::Acquire)
            && self.hot.consecutive.load(Ordering::Acquire) == 0
            && !self
                .window
                .may_hold_a_failure(self.window.index(Instant::now()))
    }

    /// A ticket for an outcome of a call admitted by another breaker of the same key (one a full
    /// map forgot while the call ran), when this one is closed: its outcome counts here.
    pub(crate) fn closed_ticket(&self) -> Option<Ticket> {
        self.hot.closed.load(Ordering::Acquire).then(|| Ticket {
            probe: false,
            generation: self.hot.generation.load(Ordering::Acquire),
        })
    }

    /// Admits a call, or says how long the breaker stays open and why.
    pub(crate) fn admit(
        &self,
        config: &Config,
        now: impl FnOnce() -> Instant,
    ) -> (Result<Ticket, (Duration, OpenReason)>, Option<Transition>) {
        if self.hot.closed.load(Ordering::Acquire) {
            let generation = self.hot.generation.load(Ordering::Acquire);
            return (
                Ok(Ticket {
                    probe: false,
                    generation,
                }),
                None,
            );
        }
        let now = now();
        let mut g = self.lock();
        match g.state {
            State::Closed => (
                Ok(Ticket {
                    probe: false,
                    generation: self.hot.generation.load(Ordering::Acquire),
                }),
                None,
            ),
            State::ForcedOpen => (Err((config.max_open, OpenReason::Forced)), None),
            State::Open { until } if now < until => (Err((until - now, OpenReason::Failing)), None),
            State::Open { .. } => {
                let from = public(g.state, now);
                let generation = self.bump();
                g.state = State::HalfOpen {
                    in_flight: 1,
                    successes: 0,
                };
                let t = Transition {
                    from,
                    to: CircuitState::HalfOpen,
                };
                (
                    Ok(Ticket {
                        probe: true,
                        generation,
                    }),
                    Some(t),
                )
            }
            State::HalfOpen {
                in_flight,
                successes,
            } => {
                if in_flight < config.probes {
                    g.state = State::HalfOpen {
                        in_flight: in_flight + 1,
                        successes,
                    };
                    (
                        Ok(Ticket {
                            probe: true,
                            generation: self.hot.generation.load(Ordering::Acquire),
                        }),
                        None,
                    )
                } else {
                    // Probes are out; everyone else fails fast rather than queueing.
                    (Err((Duration::ZERO, OpenReason::Probing)), None)
                }
            }
        }
    }

    /// Records the outcome of an admitted call (`failed: None` means "dropped before it finished").
    pub(crate) fn record(
        &self,
        config: &Config,
        ticket: Ticket,
        failed: Option<bool>,
        now: Instant,
    ) -> Option<Transition> {
        if ticket.generation != self.hot.generation.load(Ordering::Acquire) {
            // A call from an earlier period: its news is stale.
            return None;
        }
        if !ticket.probe {
            return self.record_closed(config, ticket, failed?, now);
        }
        let mut g = self.lock();
        if ticket.generation != self.hot.generation.load(Ordering::Acquire) {
            return None;
        }
        let State::HalfOpen {
            in_flight,
            successes,
        } = g.state
        else {
            return None;
        };
        let from = public(g.state, now);
        match failed {
            None => {
                g.state = State::HalfOpen {
                    in_flight: in_flight.saturating_sub(1),
                    successes,
                };
                None
            }
            Some(true) => {
                self.open(&mut g, config, now);
                Some(Transition {
                    from,
                    to: public(g.state, now),
                })
            }
            Some(false) if successes + 1 >= config.successes_to_close => {
                self.close(&mut g);
                Some(Transition {
                    from,
                    to: CircuitState::Closed,
                })
            }
            Some(false) => {
                g.state = State::HalfOpen {
                    in_flight: in_flight.saturating_sub(1),
                    successes: successes + 1,
                };
                None
            }
        }
    }

    fn record_closed(
        &self,
        config: &Config,
        ticket: Ticket,
        failed: bool,
        now: Instant,
    ) -> Option<Transition> {
        let idx = self.window.record(now, failed);
        let consecutive = if failed {
            self.hot.consecutive.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            // Read before writing, so a healthy breaker's cache line is not written per call.
            if self.hot.consecutive.load(Ordering::Acquire) != 0 {
                self.hot.consecutive.store(0, Ordering::Release);
            }
            // A success can complete the volume a failure rate needs (51 failures, then 49
            // successes: 51 % of 100); with no failure in the window there is no rate to check.
            if !self.window.may_hold_a_failure(idx) {
                return None;
            }
            0
        };
        let (calls, failures) = self.window.totals(now);
        let by_count = failed
            && config.consecutive_failures != 0
            && consecutive >= config.consecutive_failures;
        // The share is divided, not the rate multiplied: `0.07 * 100.0` is 7.000000000000001, so
        // 7 failures in 100 would not reach a 7 % rate; `7.0 / 100.0` rounds to the same double
        // as the literal `0.07`, so a share exactly at the rate opens, as documented.
        let by_rate = calls >= u64::from(config.min_calls)
            && (calls == 0 || failures as f64 / calls as f64 >= config.failure_rate);
        if !(by_count || by_rate) {
            return None;
        }
        let mut g = self.lock();
        // Someone else may have opened it already.
        if !matches!(g.state, State::Closed)
            || ticket.generation != self.hot.generation.load(Ordering::Acquire)
        {
            return None;
        }
        tracing::debug!(consecutive, calls, failures, "opening");
        self.open(&mut g, config, now);
        Some(Transition {
            from: CircuitState::Closed,
            to: public(g.state, now),
        })
    }

    fn open(&self, g: &mut Inner, config: &Config, now: Instant) {
        let period = sturdy_core::clock::doubled(config.open_for, g.reopenings, config.max_open);
        g.reopenings = g.reopenings.saturating_add(1);
        self.hot.closed.store(false, Ordering::Release);
        self.bump();
        g.state = State::Open {
            until: sturdy_core::clock::after(now, period),
        };
    }

    fn close(&self, g: &mut Inner) {
        g.state = State::Closed;
        g.reopenings = 0;
        self.hot.consecutive.store(0, Ordering::Release);
        self.window.clear();
        self.bump();
        self.hot.closed.store(true, Ordering::Release);
    }

    pub(crate) fn force_open(&self, now: Instant) -> Option<Transition> {
        let mut g = self.lock();
        let from = public(g.state, now);
        self.hot.closed.store(false, Ordering::Release);
        self.bump();
        g.state = State::ForcedOpen;
        (from != CircuitState::ForcedOpen).then_some(Transition {
            from,
            to: CircuitState::ForcedOpen,
        })
    }

    pub(crate) fn force_close(&self, now: Instant) -> Option<Transition> {
        let mut g = self.lock();
        let from = public(g.state, now);
        self.close(&mut g);
        (from != CircuitState::Closed).then_some(Transition {
            from,
            to: CircuitState::Closed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            consecutive_failures: 5,
            ..Config::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn window_forgets_old_buckets() {
        let now = Instant::now();
        let w = Window::new(now, Duration::from_secs(30));
        for _ in 0..10 {
            w.record(now, true);
        }
        assert_eq!(w.totals(now), (10, 10));
        assert_eq!(w.totals(now + Duration::from_secs(29)), (10, 10));
        assert_eq!(w.totals(now + Duration::from_secs(31)), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn open_period_grows_and_resets() {
        let c = cfg();
        let b = Breaker::new(&c, Instant::now());
        let mut t = Instant::now();
        for _ in 0..5 {
            let (ticket, _) = b.admit(&c, || t);
            b.record(&c, ticket.unwrap(), Some(true), t);
        }
        assert_eq!(
            b.state(t),
            CircuitState::Open {
                retry_in: Duration::from_secs(30)
            }
        );
        let mut expect = 30;
        for _ in 0..6 {
            t += Duration::from_secs(expect);
            let (ticket, tr) = b.admit(&c, || t);
            assert_eq!(tr.unwrap().to, CircuitState::HalfOpen);
            b.record(&c, ticket.unwrap(), Some(true), t);
            expect = (expect * 2).min(300);
            assert_eq!(
                b.state(t),
                CircuitState::Open {
                    retry_in: Duration::from_secs(expect)
                }
            );
        }
        t += Duration::from_secs(expect);
        let (ticket, _) = b.admit(&c, || t);
        assert_eq!(
            b.record(&c, ticket.unwrap(), Some(false), t).unwrap().to,
            CircuitState::Closed
        );
        for _ in 0..5 {
            let (ticket, _) = b.admit(&c, || t);
            b.record(&c, ticket.unwrap(), Some(true), t);
        }
        assert_eq!(
            b.state(t),
            CircuitState::Open {
                retry_in: Duration::from_secs(30)
            },
            "growth resets after a close"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_probe_gives_its_slot_back_and_stale_tickets_are_ignored() {
        let c = cfg();
        let t = Instant::now();
        let b = Breaker::new(&c, t);
        let (old, _) = b.admit(&c, || t);
        for _ in 0..5 {
            let (ticket, _) = b.admit(&c, || t);
            b.record(&c, ticket.unwrap(), Some(true), t);
        }
        let t = t + Duration::from_secs(30);
        let (probe, _) = b.admit(&c, || t);
        let probe = probe.unwrap();
        assert!(probe.probe);
        assert!(b.admit(&c, || t).0.is_err(), "one probe at a time");
        // A success from before the breaker opened does not close it.
        assert!(b.record(&c, old.unwrap(), Some(false), t).is_none());
        assert_eq!(b.state(t), CircuitState::HalfOpen);
        b.record(&c, probe, None, t);
        assert!(b.admit(&c, || t).0.unwrap().probe, "the slot is free again");
    }
}
