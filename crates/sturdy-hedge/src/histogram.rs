//! A bounded, lock-free latency histogram over a rotating window.
//!
//! Values are microseconds in log-linear buckets: 8 buckets per power of two, so a percentile is
//! known to within 12.5 %, from 1 µs to about 4.7 hours (larger values land in the last bucket).
//! Two generations rotate every `period`: a percentile reads the current one and the one before,
//! so it always covers between one and two periods of recent calls. Recording is two relaxed
//! atomic additions; a rotation clears one generation (a few records racing with it may be lost,
//! which only thins the sample).

use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-buckets per power of two (2^3): a relative resolution of 1/8.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Values are capped just below 2^34 µs.
const MAX_EXP: u32 = 34;
/// Buckets: values below 8 one each, then 8 per power of two up to 2^34.
pub(crate) const BUCKETS: usize = (SUB + (MAX_EXP - SUB_BITS) as u64 * SUB) as usize;

/// The bucket of `v` microseconds.
pub(crate) fn bucket(v: u64) -> usize {
    let v = v.min((1 << MAX_EXP) - 1);
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let mantissa = (v >> shift) & (SUB - 1);
    (SUB + u64::from(shift) * SUB + mantissa) as usize
}

/// The largest value (µs) that falls in bucket `i`.
pub(crate) fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let shift = (i - SUB) / SUB;
    let mantissa = (i - SUB) % SUB;
    let low = (SUB + mantissa) << shift;
    low + (1 << shift) - 1
}

struct Generation {
    /// The window number this generation holds; `u64::MAX` before first use.
    epoch: AtomicU64,
    count: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

impl Generation {
    fn new() -> Self {
        Self {
            epoch: AtomicU64::new(u64::MAX),
            count: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Makes this generation hold `epoch`, clearing it when it held an older one.
    fn claim(&self, epoch: u64) {
        let cur = self.epoch.load(Ordering::Acquire);
        if cur == epoch {
            return;
        }
        if (cur == u64::MAX || cur < epoch)
            && self
                .epoch
                .compare_exchange(cur, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for b in self.buckets.iter() {
                b.store(0, Ordering::Relaxed);
            }
            self.count.store(0, Ordering::Relaxed);
        }
    }
}

/// See the module docs.
pub(crate) struct Histogram {
    gens: [Generation; 2],
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").finish_non_exhaustive()
    }
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Self {
            gens: [Generation::new(), Generation::new()],
        }
    }

    /// Records `micros` in window `epoch`; returns how many values the window holds now.
    pub(crate) fn record(&self, epoch: u64, micros: u64) -> u64 {
        let g = &self.gens[(epoch % 2) as usize];
        g.claim(epoch);
        g.buckets[bucket(micros)].fetch_add(1, Ordering::Relaxed);
        g.count.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The latest window recorded in, if any.
    pub(crate) fn latest(&self) -> Option<u64> {
        self.gens
            .iter()
            .map(|g| g.epoch.load(Ordering::Relaxed))
            .filter(|e| *e != u64::MAX)
            .max()
    }

    fn live(&self, epoch: u64) -> impl Iterator<Item = &Generation> {
        self.gens.iter().filter(move |g| {
            let e = g.epoch.load(Ordering::Acquire);
            e == epoch || (epoch > 0 && e == epoch - 1)
        })
    }

    /// How many values the current and the previous window hold.
    pub(crate) fn len(&self, epoch: u64) -> u64 {
        self.live(epoch)
            .map(|g| g.count.load(Ordering::Relaxed))
            .sum()
    }

    /// The value (µs, the top of its bucket) below or at which a fraction `q` of the values of
    /// the current and the previous window lie, with how many values there are; `None` when
    /// there are none.
    pub(crate) fn quantile(&self, epoch: u64, q: f64) -> Option<(u64, u64)> {
        let mut counts = [0u64; BUCKETS];
        let mut total = 0u64;
        for g in self.live(epoch) {
            for (c, b) in counts.iter_mut().zip(g.buckets.iter()) {
                let n = b.load(Ordering::Relaxed);
                *c += n;
                total += n;
            }
        }
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some((upper(i), total));
            }
        }
        Some((upper(BUCKETS - 1), total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..100_000u64).chain([1 << 20, (1 << 34) - 1, u64::MAX]) {
            let b = bucket(v);
            assert!(b >= last, "{v}");
            assert!(b < BUCKETS);
            last = b;
            let top = upper(b);
            assert!(top >= v.min((1 << MAX_EXP) - 1), "{v} -> {b} -> {top}");
            // Within 12.5 % above the value.
            assert!(
                top as f64 <= (v.max(1) as f64) * 1.125 + 1.0,
                "{v} -> {top}"
            );
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_a_long_tail() {
        let h = Histogram::new();
        // 990 calls at 2 ms, 10 at 100 ms.
        for i in 0..1_000u64 {
            h.record(0, if i % 100 == 7 { 100_000 } else { 2_000 });
        }
        let (p50, n) = h.quantile(0, 0.5).unwrap();
        assert_eq!(n, 1_000);
        assert!((2_000..2_300).contains(&p50), "{p50}");
        let (p95, _) = h.quantile(0, 0.95).unwrap();
        assert_eq!(p95, p50);
        let (p999, _) = h.quantile(0, 0.999).unwrap();
        assert!((100_000..113_000).contains(&p999), "{p999}");
    }

    #[test]
    fn windows_rotate() {
        let h = Histogram::new();
        h.record(0, 10);
        h.record(1, 1_000);
        assert_eq!(h.len(1), 2, "the previous window still counts");
        assert_eq!(h.len(2), 1, "two windows back is forgotten");
        h.record(2, 5); // reuses and clears window 0's generation
        assert_eq!(h.len(2), 2);
        assert_eq!(h.quantile(2, 1.0).unwrap().0, upper(bucket(1_000)));
        assert_eq!(h.len(4), 0);
        assert!(h.quantile(4, 0.5).is_none());
    }
}
