//! How a limit moves: AIMD on overload signals, or a latency-based limit after TCP Vegas.

use std::time::Duration;

/// How the limit adapts; see the [crate docs](crate) for the details of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Algorithm {
    /// Additive increase, multiplicative decrease: the limit grows by one per limit's worth of
    /// successful calls while at least half of it is in use, and is multiplied by the backoff
    /// ratio (0.9) on an overload signal (429, 503, 504, a timeout), at most once per round
    /// trip. It finds a server's capacity only by exceeding it: use it when the server sheds load
    /// (answers 429 or 503) rather than queueing it.
    #[default]
    Aimd,
    /// Latency-based, after TCP Vegas: the layer keeps the lowest recent latency as the no-load
    /// latency and, once per window of calls, estimates the calls queued at the server as
    /// `limit × (1 − no_load / latency)`; it grows the limit while fewer than about
    /// `3·log10(limit)` are queued and shrinks it while more than about `6·log10(limit)` are,
    /// so it settles a few calls above the server's capacity without a single error. Overload
    /// signals back off as in AIMD. Use it for servers that slow down before they fail.
    Vegas,
}

/// What one call says about the server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Signal {
    /// Answered; with the latency when it was measured.
    Success(Option<Duration>),
    /// 429, 503, 504 or a timeout.
    Overload,
    /// Says nothing about capacity (a 4xx, a 500, a connect error, a dropped call).
    Ignore,
}

/// The settings the control needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    pub(crate) algorithm: Algorithm,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) backoff: f64,
}

/// Normal windows between two probes of the no-load latency.
const PROBE_EVERY: u32 = 100;
/// Normal windows before the next probe, after a probe that lowered the no-load latency.
const PROBE_SOON: u32 = 10;

/// The latency-based mode's state.
///
/// The no-load latency cannot be seen while the server is queueing, so the mode probes for it:
/// its first window, and one window in every [`PROBE_EVERY`], runs at half the limit (after the
/// calls admitted under the full limit have come back); the lowest window average since the
/// previous probe is the no-load latency. A probe that finds a clearly lower latency than the
/// one in use is followed by another after [`PROBE_SOON`] windows, so a limit that starts far
/// above capacity comes down in a few probes. A probe costs about one round trip at half the
/// limit: about 1 % of throughput at the steady pace.
#[derive(Debug)]
pub(crate) struct Vegas {
    sum: Duration,
    n: u32,
    max_in_flight: usize,
    probing: bool,
    /// Samples to let pass before a probe window starts (calls admitted before it).
    skip: u32,
    windows: u32,
    /// Lowest window average since the last probe (the probe's own included), and before it.
    base: [Option<Duration>; 2],
}

impl Default for Vegas {
    fn default() -> Self {
        Self {
            sum: Duration::ZERO,
            n: 0,
            max_in_flight: 0,
            probing: true,
            skip: 0,
            windows: 0,
            base: [None, None],
        }
    }
}

impl Vegas {
    /// The limit the semaphore should admit now: half of it during a probe.
    pub(crate) fn effective(&self, p: &Params, limit: f64) -> f64 {
        if self.probing {
            (limit / 2.0).floor().max(p.min)
        } else {
            limit
        }
    }

    /// Adds a sample; at the end of a window, returns the new limit.
    fn sample(&mut self, p: &Params, limit: f64, rtt: Duration, in_flight: usize) -> Option<f64> {
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        self.sum += rtt;
        self.n += 1;
        self.max_in_flight = self.max_in_flight.max(in_flight);
        let size = if self.probing { limit / 2.0 } else { limit };
        let window = (size.ceil() as u32).clamp(8, 200);
        if self.n < window {
            return None;
        }
        let avg = self.sum / self.n;
        let used = self.max_in_flight;
        self.reset_window();
        if self.probing {
            // A probe that found a clearly lower latency may not have gone low enough: the next
            // one comes soon. A probe that confirmed the baseline waits the whole period.
            let unsettled = self
                .baseline()
                .is_none_or(|b| avg.as_secs_f64() < 0.9 * b.as_secs_f64());
            self.probing = false;
            self.windows = if unsettled {
                PROBE_EVERY - PROBE_SOON
            } else {
                0
            };
            self.base = [Some(avg), self.base[0]];
            return None;
        }
        self.base[0] = Some(self.base[0].map_or(avg, |b| b.min(avg)));
        self.windows += 1;
        if self.windows >= PROBE_EVERY {
            self.probing = true;
            self.skip = limit.ceil() as u32;
        }
        let base = self.baseline()?;
        if avg.is_zero() || (used as f64) * 2.0 < limit {
            // Nothing to learn from an idle window, or a limit that is not used.
            return None;
        }
        let queued = limit * (1.0 - base.as_secs_f64() / avg.as_secs_f64()).max(0.0);
        let step = limit.log10().max(1.0);
        let (alpha, beta) = (3.0 * step, 6.0 * step);
        let next = if queued < alpha {
            limit + step
        } else if queued > beta {
            // Far above: halfway towards the limit that would leave `beta` queued.
            limit - step.max((queued - beta) / 2.0)
        } else {
            limit
        };
        Some(next.clamp(p.min, p.max))
    }

    pub(crate) fn reset_window(&mut self) {
        self.sum = Duration::ZERO;
        self.n = 0;
        self.max_in_flight = 0;
    }

    /// The no-load latency in use, if known.
    pub(crate) fn baseline(&self) -> Option<Duration> {
        match self.base {
            [Some(a), Some(b)] => Some(a.min(b)),
            [Some(a), None] | [None, Some(a)] => Some(a),
            [None, None] => None,
        }
    }
}

/// The limit after a success under AIMD: one more per limit's worth of successes, while at least
/// half of the limit is in use.
pub(crate) fn aimd_increase(p: &Params, limit: f64, in_flight: usize) -> f64 {
    if (in_flight as f64) * 2.0 < limit.floor() {
        return limit;
    }
    (limit + 1.0 / limit.max(1.0)).min(p.max)
}

/// The limit after an overload signal.
pub(crate) fn decrease(p: &Params, limit: f64) -> f64 {
    (limit * p.backoff).max(p.min)
}

/// Applies a latency sample under Vegas; returns the new limit if it moved.
pub(crate) fn vegas(
    v: &mut Vegas,
    p: &Params,
    limit: f64,
    rtt: Duration,
    in_flight: usize,
) -> Option<f64> {
    v.sample(p, limit, rtt, in_flight)
        .filter(|l| (*l - limit).abs() > f64::EPSILON)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(algorithm: Algorithm) -> Params {
        Params {
            algorithm,
            min: 1.0,
            max: 1_000.0,
            backoff: 0.9,
        }
    }

    #[test]
    fn aimd_grows_one_per_limit_of_successes_only_while_used() {
        let p = params(Algorithm::Aimd);
        let mut l = 10.0;
        for _ in 0..10 {
            l = aimd_increase(&p, l, 10);
        }
        assert!((10.9..11.1).contains(&l), "{l}");
        assert_eq!(aimd_increase(&p, 10.0, 4), 10.0, "less than half used");
        assert_eq!(decrease(&p, 10.0), 9.0);
        assert_eq!(decrease(&p, 1.05), 1.0, "never below the minimum");
        assert_eq!(aimd_increase(&p, 1_000.0, 1_000), 1_000.0);
    }

    /// A server of capacity `n` and service time 10 ms: with `c` calls in flight, each takes
    /// `10 ms × max(1, c / n)`.
    fn latency(n: f64, c: f64) -> Duration {
        Duration::from_secs_f64(0.010 * (c / n).max(1.0))
    }

    #[test]
    fn vegas_settles_a_few_calls_above_capacity_and_follows_it() {
        let p = params(Algorithm::Vegas);
        let mut v = Vegas::default();
        let mut limit = 5.0;
        let mut run = |limit: &mut f64, cap: f64, windows: usize| {
            for _ in 0..windows {
                let c = v.effective(&p, *limit).floor();
                for _ in 0..(c as usize).max(8) {
                    if let Some(l) = vegas(&mut v, &p, *limit, latency(cap, c), c as usize) {
                        *limit = l;
                    }
                }
            }
        };
        run(&mut limit, 40.0, 200);
        assert!((40.0..52.0).contains(&limit), "{limit}");
        // Capacity halves: the queue grows, the limit follows it down.
        run(&mut limit, 20.0, 200);
        assert!((20.0..30.0).contains(&limit), "{limit}");
        // And back up when capacity returns.
        run(&mut limit, 40.0, 200);
        assert!((40.0..52.0).contains(&limit), "{limit}");
        assert_eq!(v.baseline(), Some(Duration::from_millis(10)));
    }

    #[test]
    fn vegas_starting_far_above_capacity_finds_it_through_its_probes() {
        let p = params(Algorithm::Vegas);
        let mut v = Vegas::default();
        let mut limit: f64 = 200.0;
        for _ in 0..2_000 {
            let c = v.effective(&p, limit).floor();
            for _ in 0..(c as usize).max(8) {
                if let Some(l) = vegas(&mut v, &p, limit, latency(40.0, c), c as usize) {
                    limit = l;
                }
            }
        }
        assert!((40.0..52.0).contains(&limit), "{limit}");
    }

    #[test]
    fn vegas_leaves_an_unused_limit_alone() {
        let p = params(Algorithm::Vegas);
        let mut v = Vegas::default();
        for _ in 0..1_000 {
            assert_eq!(vegas(&mut v, &p, 50.0, Duration::from_millis(10), 3), None);
        }
    }
}
