//! The state machine of one breaker. Pure logic over `tokio::time::Instant`, so it is tested with
//! paused time; the lock is held only inside these methods, never across an `.await`.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;

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

/// Calls and failures in a sliding window of `BUCKETS` buckets.
#[derive(Debug)]
struct Window {
    origin: Instant,
    bucket_len: Duration,
    /// (bucket index since origin, calls, failures)
    buckets: [(u64, u32, u32); BUCKETS],
}

const BUCKETS: usize = 10;

impl Window {
    fn new(now: Instant, len: Duration) -> Self {
        Self {
            origin: now,
            bucket_len: (len / BUCKETS as u32).max(Duration::from_millis(1)),
            buckets: [(u64::MAX, 0, 0); BUCKETS],
        }
    }

    fn index(&self, now: Instant) -> u64 {
        (now.duration_since(self.origin).as_nanos() / self.bucket_len.as_nanos()) as u64
    }

    fn record(&mut self, now: Instant, failed: bool) {
        let idx = self.index(now);
        let slot = &mut self.buckets[(idx % BUCKETS as u64) as usize];
        if slot.0 != idx {
            *slot = (idx, 0, 0);
        }
        slot.1 += 1;
        slot.2 += u32::from(failed);
    }

    fn totals(&self, now: Instant) -> (u32, u32) {
        let idx = self.index(now);
        let oldest = idx.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 >= oldest && b.0 <= idx)
            .fold((0, 0), |(c, f), b| (c + b.1, f + b.2))
    }

    fn clear(&mut self) {
        self.buckets = [(u64::MAX, 0, 0); BUCKETS];
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    generation: u64,
    consecutive: u32,
    window: Window,
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

#[derive(Debug)]
pub(crate) struct Breaker {
    inner: Mutex<Inner>,
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
            inner: Mutex::new(Inner {
                state: State::Closed,
                generation: 0,
                consecutive: 0,
                window: Window::new(now, config.window),
                reopenings: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn state(&self, now: Instant) -> CircuitState {
        public(self.lock().state, now)
    }

    pub(crate) fn is_idle_closed(&self) -> bool {
        let g = self.lock();
        matches!(g.state, State::Closed) && g.consecutive == 0
    }

    /// Admits a call, or says how long the breaker stays open.
    pub(crate) fn admit(
        &self,
        config: &Config,
        now: Instant,
    ) -> (Result<Ticket, Duration>, Option<Transition>) {
        let mut g = self.lock();
        match g.state {
            State::Closed => (
                Ok(Ticket {
                    probe: false,
                    generation: g.generation,
                }),
                None,
            ),
            State::ForcedOpen => (Err(config.max_open), None),
            State::Open { until } if now < until => (Err(until - now), None),
            State::Open { .. } => {
                let from = public(g.state, now);
                g.generation += 1;
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
                        generation: g.generation,
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
                            generation: g.generation,
                        }),
                        None,
                    )
                } else {
                    // Probes are out; everyone else fails fast rather than queueing.
                    (Err(Duration::ZERO), None)
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
        let mut g = self.lock();
        if ticket.generation != g.generation {
            // A call from an earlier period: its news is stale.
            return None;
        }
        let from = public(g.state, now);
        match (g.state, ticket.probe) {
            (
                State::HalfOpen {
                    in_flight,
                    successes,
                },
                true,
            ) => match failed {
                None => {
                    g.state = State::HalfOpen {
                        in_flight: in_flight.saturating_sub(1),
                        successes,
                    };
                    None
                }
                Some(true) => {
                    Self::open(&mut g, config, now);
                    Some(Transition {
                        from,
                        to: public(g.state, now),
                    })
                }
                Some(false) => {
                    let successes = successes + 1;
                    if successes >= config.successes_to_close {
                        g.state = State::Closed;
                        g.generation += 1;
                        g.consecutive = 0;
                        g.reopenings = 0;
                        g.window.clear();
                        Some(Transition {
                            from,
                            to: CircuitState::Closed,
                        })
                    } else {
                        g.state = State::HalfOpen {
                            in_flight: in_flight.saturating_sub(1),
                            successes,
                        };
                        None
                    }
                }
            },
            (State::Closed, false) => {
                let failed = failed?;
                g.window.record(now, failed);
                if !failed {
                    g.consecutive = 0;
                    return None;
                }
                g.consecutive += 1;
                let (calls, failures) = g.window.totals(now);
                let by_count = g.consecutive >= config.consecutive_failures;
                let by_rate = calls >= config.min_calls
                    && f64::from(failures) >= config.failure_rate * f64::from(calls);
                if by_count || by_rate {
                    tracing::debug!(consecutive = g.consecutive, calls, failures, "opening");
                    Self::open(&mut g, config, now);
                    Some(Transition {
                        from,
                        to: public(g.state, now),
                    })
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    fn open(g: &mut Inner, config: &Config, now: Instant) {
        let factor = 1u32 << g.reopenings.min(16);
        let period = config.open_for.saturating_mul(factor).min(config.max_open);
        g.reopenings = g.reopenings.saturating_add(1);
        g.generation += 1;
        g.state = State::Open {
            until: now + period,
        };
    }

    pub(crate) fn force_open(&self, now: Instant) -> Option<Transition> {
        let mut g = self.lock();
        let from = public(g.state, now);
        g.generation += 1;
        g.state = State::ForcedOpen;
        (from != CircuitState::ForcedOpen).then_some(Transition {
            from,
            to: CircuitState::ForcedOpen,
        })
    }

    pub(crate) fn force_close(&self, now: Instant) -> Option<Transition> {
        let mut g = self.lock();
        let from = public(g.state, now);
        g.generation += 1;
        g.state = State::Closed;
        g.consecutive = 0;
        g.reopenings = 0;
        g.window.clear();
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
        Config::default()
    }

    #[tokio::test(start_paused = true)]
    async fn window_forgets_old_buckets() {
        let now = Instant::now();
        let mut w = Window::new(now, Duration::from_secs(30));
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
            let (ticket, _) = b.admit(&c, t);
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
            let (ticket, tr) = b.admit(&c, t);
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
        let (ticket, _) = b.admit(&c, t);
        assert_eq!(
            b.record(&c, ticket.unwrap(), Some(false), t).unwrap().to,
            CircuitState::Closed
        );
        for _ in 0..5 {
            let (ticket, _) = b.admit(&c, t);
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
        let (old, _) = b.admit(&c, t);
        for _ in 0..5 {
            let (ticket, _) = b.admit(&c, t);
            b.record(&c, ticket.unwrap(), Some(true), t);
        }
        let t = t + Duration::from_secs(30);
        let (probe, _) = b.admit(&c, t);
        let probe = probe.unwrap();
        assert!(probe.probe);
        assert!(b.admit(&c, t).0.is_err(), "one probe at a time");
        // A success from before the breaker opened does not close it.
        assert!(b.record(&c, old.unwrap(), Some(false), t).is_none());
        assert_eq!(b.state(t), CircuitState::HalfOpen);
        b.record(&c, probe, None, t);
        assert!(b.admit(&c, t).0.unwrap().probe, "the slot is free again");
    }
}
