//! The budget of extra requests: each hedgeable call deposits a fraction of a token, each hedge
//! spends a whole one, and the balance is capped. So over any stretch of calls, hedges stay below
//! `ratio × calls + burst`, with no clock and no lock: one atomic load per call while the budget
//! is full, one compare-and-swap otherwise.
//!
//! tower's `TpsBudget` (in `tower::retry::budget`) could serve: deposit per call, withdraw per
//! hedge. It is not used because it answers a wider question than this one (a share of calls over
//! a sliding time window of 1 to 60 s, plus an optional floor per second), reads the clock on
//! every deposit and withdrawal, and asserts (panics) on values outside its ranges. A share of
//! calls with a capped burst needs no clock, so it is a few lines here.

use std::sync::atomic::{AtomicU64, Ordering};

/// A whole token, in billionths: fine enough that a ratio such as 0.0005 is kept as it is
/// (thousandths rounded it up to 0.001, twice the hedges asked for). `u32::MAX` tokens still fit
/// in a `u64`.
pub(crate) const TOKEN: u64 = 1_000_000_000;

#[derive(Debug)]
pub(crate) struct Budget {
    /// Billionths of a token.
    balance: AtomicU64,
}

impl Budget {
    /// A budget that starts full (`cap` billionths).
    pub(crate) fn new(cap: u64) -> Self {
        Self {
            balance: AtomicU64::new(cap),
        }
    }

    /// Adds `deposit` billionths, up to `cap`.
    pub(crate) fn deposit(&self, deposit: u64, cap: u64) {
        let mut cur = self.balance.load(Ordering::Relaxed);
        while cur < cap {
            let next = cur.saturating_add(deposit).min(cap);
            match self.balance.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Whether a whole token is there now (without taking it).
    pub(crate) fn has_token(&self) -> bool {
        self.balance.load(Ordering::Relaxed) >= TOKEN
    }

    /// Takes a whole token, if there is one.
    pub(crate) fn withdraw(&self) -> bool {
        let mut cur = self.balance.load(Ordering::Relaxed);
        while cur >= TOKEN {
            match self.balance.compare_exchange_weak(
                cur,
                cur - TOKEN,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }
}

/// The deposit per call and the cap, in billionths of a token, for `ratio` extra requests per
/// call and `burst` hedges in a row. The deposit is rounded down, never up: the budget may give
/// a hedge fewer than `ratio` allows, never more.
pub(crate) fn units(ratio: f64, burst: u32) -> (u64, u64) {
    (
        (ratio * TOKEN as f64).floor() as u64,
        u64::from(burst) * TOKEN,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hedges_stay_within_ratio_plus_burst() {
        let (dep, cap) = units(0.05, 10);
        let b = Budget::new(cap);
        let mut hedges = 0;
        for _ in 0..10_000 {
            b.deposit(dep, cap);
            if b.withdraw() {
                hedges += 1;
            }
        }
        // 10 at once from the full start, then one per 20 calls.
        assert!((500..=511).contains(&hedges), "{hedges}");
    }

    #[test]
    fn an_empty_budget_refuses_and_refills() {
        let (dep, cap) = units(0.5, 1);
        let b = Budget::new(cap);
        assert!(b.withdraw());
        assert!(!b.has_token());
        assert!(!b.withdraw());
        b.deposit(dep, cap);
        assert!(!b.withdraw());
        b.deposit(dep, cap);
        assert!(b.has_token());
        // Capped: many deposits still give one token.
        for _ in 0..100 {
            b.deposit(dep, cap);
        }
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }

    #[test]
    fn small_ratios_are_not_rounded_up() {
        for (ratio, calls) in [
            (0.0005, 10_050u64),
            (0.0015, 10_050),
            (0.000_001, 3_000_000),
        ] {
            let (dep, cap) = units(ratio, 1);
            let b = Budget::new(cap);
            let mut hedges = 0u64;
            for _ in 0..calls {
                b.deposit(dep, cap);
                if b.withdraw() {
                    hedges += 1;
                }
            }
            let bound = (ratio * calls as f64).floor() as u64 + 1;
            assert!(hedges <= bound, "{ratio}: {hedges} > {bound}");
            assert!(hedges + 1 >= bound, "{ratio}: {hedges} far below {bound}");
        }
    }

    #[test]
    fn the_largest_burst_fits() {
        let (dep, cap) = units(1.0, u32::MAX);
        let b = Budget::new(cap);
        b.deposit(dep, cap);
        assert!(b.withdraw());
    }

    #[test]
    fn zero_ratio_means_only_the_burst() {
        let (dep, cap) = units(0.0, 2);
        let b = Budget::new(cap);
        for _ in 0..1_000 {
            b.deposit(dep, cap);
        }
        assert!(b.withdraw() && b.withdraw() && !b.withdraw());
    }
}
