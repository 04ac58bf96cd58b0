//! The per-host retry budget: the arithmetic of tower's `TpsBudget` (a reserve of
//! `min_per_sec × ttl` retries, plus `percent` of the calls made in the last `ttl`, counted in
//! ten windows of `ttl / 10`), kept with bounded work per call.
//!
//! Why not tower's `TpsBudget` itself, which this crate used before: it moves its windows on one
//! at a time, under a mutex, so the first call after a host was idle loops once for every window
//! that passed meanwhile, while every other caller of that host blocks on the mutex. A month idle
//! is 2.6 million turns at the default ttl (26 million at a ttl of 1 s); a paused test clock
//! advanced by five years made one call take half a second. Here a call that finds ten windows or
//! more have passed clears the ten slots at once, and a call in the same window as the one before
//! takes no lock at all (a clock read, an atomic load and an atomic add).

use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How many windows a ttl is counted in.
const WINDOWS: u64 = 10;

/// One host's retry budget (see the module's documentation).
pub(crate) struct WindowBudget {
    start: Instant,
    /// `ttl / WINDOWS`, in nanoseconds (at least 1).
    window_nanos: u64,
    /// The window the writer counts for, in windows since `start`.
    current: AtomicU64,
    /// This window's deposits, less its withdrawals.
    writer: AtomicIsize,
    /// The windows before it: window `w` in slot `w % WINDOWS`. The current window's slot is 0.
    slots: [AtomicIsize; WINDOWS as usize],
    /// Held only while the windows move on (at most ten stores), never across an await.
    turning: Mutex<()>,
    reserve: isize,
    deposit_amount: isize,
    withdraw_amount: isize,
}

impl WindowBudget {
    /// A budget with tower's `TpsBudget` parameters. The ranges (`ttl` 1 s to 60 s, `percent`
    /// 0.0 to 1000.0) are checked by `RetryLayer::with_budget`; out of them, the arithmetic still
    /// gives a budget, never a panic.
    pub(crate) fn new(ttl: Duration, min_per_sec: u32, percent: f32) -> Self {
        // The same amounts as tower's: a deposit is worth `1 / percent` withdrawals' share.
        let (deposit_amount, withdraw_amount) = if percent <= 0.0 || percent.is_nan() {
            // No share of calls: withdrawals spend the reserve only.
            (0, 1)
        } else if percent <= 1.0 {
            (1, ((1.0 / percent) as isize).max(1))
        } else {
            (1000, ((1000.0 / percent) as isize).max(1))
        };
        let secs = isize::try_from(ttl.as_secs()).unwrap_or(isize::MAX);
        let reserve = isize::try_from(min_per_sec)
            .unwrap_or(isize::MAX)
            .saturating_mul(secs)
            .saturating_mul(withdraw_amount);
        let window_nanos = u64::try_from(ttl.as_nanos() / u128::from(WINDOWS))
            .unwrap_or(u64::MAX)
            .max(1);
        Self {
            start: Instant::now(),
            window_nanos,
            current: AtomicU64::new(0),
            writer: AtomicIsize::new(0),
            slots: Default::default(),
            turning: Mutex::new(()),
            reserve,
            deposit_amount,
            withdraw_amount,
        }
    }

    /// One call made: its share of retries is added.
    #[cfg(test)]
    pub(crate) fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// [`deposit`](Self::deposit) at `now`, a clock read the caller also uses for something
    /// else (the attempt's timeout): one read of the clock instead of two.
    pub(crate) fn deposit_at(&self, now: Instant) {
        self.expire(now);
        self.writer
            .fetch_add(self.deposit_amount, Ordering::Relaxed);
    }

    /// One retry wanted: whether the budget allows it (and if so, it is spent).
    pub(crate) fn withdraw(&self) -> bool {
        self.expire(Instant::now());
        if self.sum() >= self.withdraw_amount {
            self.writer
                .fetch_add(-self.withdraw_amount, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// The window `now` falls in, in windows since `start`.
    fn window_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start);
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX) / self.window_nanos
    }

    /// Moves the windows on to the present: the writer's count goes to its window's slot, and
    /// the slots of the windows that passed since (all ten, when ten or more did) are cleared.
    fn expire(&self, now: Instant) {
        let now = self.window_at(now);
        if now <= self.current.load(Ordering::Acquire) {
            return;
        }
        let _turn = self.turning.lock().unwrap_or_else(PoisonError::into_inner);
        let cur = self.current.load(Ordering::Acquire);
        if now <= cur {
            // Another caller moved them on meanwhile.
            return;
        }
        let committed = self.writer.swap(0, Ordering::AcqRel);
        if now - cur >= WINDOWS {
            // Even the window that just ended is older than the history kept.
            for slot in &self.slots {
                slot.store(0, Ordering::Relaxed);
            }
        } else {
            self.slots[Self::slot(cur)].store(committed, Ordering::Relaxed);
            for w in cur + 1..=now {
                self.slots[Self::slot(w)].store(0, Ordering::Relaxed);
            }
        }
        self.current.store(now, Ordering::Release);
    }

    fn slot(window: u64) -> usize {
        // Below WINDOWS: fits any usize.
        (window % WINDOWS) as usize
    }

    /// What may be withdrawn now: the reserve, plus the windows' deposits less withdrawals.
    fn sum(&self) -> isize {
        self.slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .fold(self.writer.load(Ordering::Relaxed), isize::saturating_add)
            .saturating_add(self.reserve)
    }
}

impl std::fmt::Debug for WindowBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowBudget")
            .field("window", &Duration::from_nanos(self.window_nanos))
            .field("reserve", &self.reserve)
            .field("deposit_amount", &self.deposit_amount)
            .field("withdraw_amount", &self.withdraw_amount)
            .field("balance", &self.sum())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(b: &WindowBudget) -> usize {
        let mut n = 0;
        while b.withdraw() {
            n += 1;
            assert!(n < 1_000_000, "a budget that never runs out");
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_then_a_share_of_calls_that_lives_one_ttl() {
        // 10 s, 1 per second, 10 %: a reserve of 10 retries, and one more per 10 calls.
        let b = WindowBudget::new(Duration::from_secs(10), 1, 0.1);
        assert_eq!(drain(&b), 10);
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!(drain(&b), 10);
        // The reserve is back once the withdrawals are older than the ttl; the deposits, made
        // in the same window, are gone with them.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(drain(&b), 10);
        // Deposits made 5 s ago still count, ones made more than 10 s ago do not.
        for _ in 0..50 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..50 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(drain(&b), 10 + 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_century_idle_is_one_turn() {
        let b = WindowBudget::new(Duration::from_secs(1), 10, 0.2);
        for _ in 0..100 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(100 * 365 * 86_400)).await;
        // Everything before is forgotten at once: the reserve (10/s × 1 s) alone.
        assert_eq!(drain(&b), 10);
        b.deposit();
        assert_eq!(b.current.load(Ordering::Relaxed), 100 * 365 * 86_400 * 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_amounts_are_towers() {
        // Above 100 %: a deposit is worth 1000, a withdrawal costs 1000 / percent.
        let b = WindowBudget::new(Duration::from_secs(1), 0, 2.0);
        assert_eq!(drain(&b), 0);
        b.deposit();
        assert_eq!(drain(&b), 2);
        // No share: the reserve only.
        let b = WindowBudget::new(Duration::from_secs(2), 3, 0.0);
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!(drain(&b), 6);
    }
}
