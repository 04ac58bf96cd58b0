//! One key's limiter: the GCRA's TAT, the pause a server asked for, and the calls waiting in line.
//!
//! A call that can go now takes its slot with one compare-and-swap and no lock. A call that must
//! wait joins a FIFO line (a short lock, never held across an `.await`) and reserves nothing:
//! only the call at the head of the line sleeps, until the pause ends and its GCRA slot comes,
//! takes the slot, and hands the head to the next. So after a pause the callers leave at the
//! quota's pace, and a call that is dropped while it waits simply leaves the line.
//!
//! Without a quota, the line can release by slow start instead: after a pause, one call leaves,
//! and each released call that succeeds lets one more out, so twice as many go each round trip
//! while the server answers well; a new pause sends the window back to one.
//!
//! Without a quota, a key also learns a pace from bare 429s (no header saying how long to wait:
//! what nginx's `limit_req` and many gateways send). Slow start counts calls in flight, which on
//! a fast network says nothing about a limit counted in calls per second: its ramp leaves within
//! a few milliseconds and meets the limit again. So the first bare 429 of a pause sets a pace
//! (one call per eighth of the pause: 125 ms after the default 1 s); a bare 429 to a call sent
//! at that pace halves the rate (down to one call per pause) and pauses the key for one interval
//! of the new pace only (the pace already holds the calls back); a bare 429 that arrives while
//! the key is paused changes nothing; every success raises the rate by a sixteenth, until the
//! interval is under a millisecond and the pace is forgotten. While a pace is learned, every
//! call of the key (not only those released after a pause) takes its slot at that pace, by the
//! same GCRA as a quota.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::time::Sleep;

use crate::gcra::{estimate, reserve, Origin, Quota, Reservation};

// The three atomics the fast path reads sit first, on one cache line of their own start, so a
// decision touches one line.
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct Gate {
    tat: AtomicU64,
    paused_until: AtomicU64,
    waiting: AtomicUsize,
    /// Without a quota: the interval learned from bare 429s (ns; 0: none).
    learned: AtomicU64,
    line: Mutex<Line>,
    /// Slow start: calls let out of the line and not finished yet, and how many may be.
    released: AtomicUsize,
    window: AtomicUsize,
}

/// The longest a key with a learned pace is kept after its last call (ns): a minute.
pub(crate) const LEARNED_KEPT: u64 = 60_000_000_000;

/// The largest slow-start window: past it, the line lets everyone out.
const MAX_WINDOW: usize = 1 << 16;

#[derive(Debug, Default)]
struct Line {
    next_ticket: u64,
    /// In ticket order, so a ticket is found by binary search.
    entries: VecDeque<Entry>,
}

#[derive(Debug)]
struct Entry {
    ticket: u64,
    waker: Option<Waker>,
}

/// A place in the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

impl Default for Gate {
    fn default() -> Self {
        Self {
            tat: AtomicU64::new(0),
            paused_until: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            learned: AtomicU64::new(0),
            line: Mutex::default(),
            released: AtomicUsize::new(0),
            window: AtomicUsize::new(1),
        }
    }
}

impl Gate {
    fn line(&self) -> MutexGuard<'_, Line> {
        // A poisoned lock only means a thread panicked while holding it; the line is still valid.
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn tat(&self) -> &AtomicU64 {
        &self.tat
    }

    /// When the pause ends (ns since the origin; 0 or a past time: no pause).
    pub(crate) fn paused_until(&self) -> u64 {
        self.paused_until.load(Ordering::Acquire)
    }

    /// The pace learned from bare 429s, when the key has no quota and one was learned.
    #[inline]
    pub(crate) fn learned(&self) -> Option<Quota> {
        match self.learned.load(Ordering::Acquire) {
            0 => None,
            n => Some(Quota::pace_nanos(n)),
        }
    }

    /// A bare 429 began a pause: slow down. The first time, a pace of one call per `first` ns;
    /// after that, half the rate, the interval at most `max` ns. Returns the new interval when
    /// a pace was already learned (the 429 answered a call sent at that pace), else `None`.
    pub(crate) fn learn_slower(&self, first: u64, max: u64) -> Option<u64> {
        // A pace under a millisecond is none (as one that speeds up under it is forgotten): a
        // first pace that short (a default pause under 8 ms) is not learned.
        let next = |n: u64| {
            let next = if n == 0 {
                first
            } else {
                n.saturating_mul(2).min(max.max(n))
            };
            if next < 1_000_000 {
                0
            } else {
                next
            }
        };
        let before = self
            .learned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(next(n)))
            .unwrap_or_else(|n| n);
        (before != 0).then(|| next(before))
    }

    /// A call succeeded while a pace is learned: a sixteenth faster; under a millisecond the
    /// pace is forgotten (the server takes what the client sends).
    #[inline]
    pub(crate) fn learn_faster(&self) {
        if self.learned.load(Ordering::Relaxed) == 0 {
            return;
        }
        let _ = self
            .learned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != 0).then(|| {
                    let next = n - n / 16;
                    if next < 1_000_000 {
                        0
                    } else {
                        next
                    }
                })
            });
    }

    /// Forgets the learned pace.
    pub(crate) fn forget_pace(&self) {
        self.learned.store(0, Ordering::Release);
    }

    /// How many calls wait in line.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Whether forgetting this key loses nothing: nobody waits, no slot is booked ahead, no
    /// pause is set, and no pace was learned, or the key has had no call for 16 of the pace's
    /// intervals (at most [`LEARNED_KEPT`]): a pace learned from bare 429s, forgotten with a
    /// key that has just been quiet, would let the next calls leave at once into the 429s it
    /// was learned from; kept much longer, keys that each met one 429 would fill the map and
    /// send every new host to the shared overflow limiter.
    pub(crate) fn is_idle(&self, now: u64) -> bool {
        let tat = self.tat.load(Ordering::Acquire);
        let learned = self.learned.load(Ordering::Acquire);
        self.waiting() == 0
            && tat <= now
            && self.paused_until() <= now
            && (learned == 0
                || now.saturating_sub(tat) >= learned.saturating_mul(16).min(LEARNED_KEPT))
    }

    /// Whether a call without a quota may go, decided without reading the clock: nobody waits
    /// and no pause is set (an ended pause is set back to 0 by the next [`try_now`]). `false`
    /// means "ask [`try_now`]", not "no".
    ///
    /// [`try_now`]: Self::try_now
    #[inline]
    pub(crate) fn open(&self) -> bool {
        self.waiting.load(Ordering::Acquire) == 0 && self.paused_until() == 0
    }

    /// The fast path: whether a call may go at `now`, taking its slot if so. Lock-free. Never
    /// jumps the line: with calls waiting, or during a pause, the answer is no.
    #[inline]
    pub(crate) fn try_now(&self, quota: Option<&Quota>, now: u64) -> bool {
        if self.waiting.load(Ordering::Acquire) != 0 {
            return false;
        }
        let paused = self.paused_until();
        if paused > now {
            return false;
        }
        if paused != 0 {
            // The pause is over: 0 lets `open` see that without a clock. A pause set meanwhile
            // wins (the exchange fails).
            let _ =
                self.paused_until
                    .compare_exchange(paused, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
        match quota {
            None => true,
            Some(q) => matches!(reserve(&self.tat, q, now, 0), Reservation::Granted { .. }),
        }
    }

    /// Joins the line at `now`, with `pace` spacing the calls that wait, unless the call could
    /// not go by `deadline` even if nobody left the line: then `Err` with the wait it would have.
    /// `Ok` carries the ticket and the time the call should go.
    pub(crate) fn join(
        &self,
        pace: Option<&Quota>,
        now: u64,
        deadline: u64,
    ) -> Result<(Ticket, u64), u64> {
        let mut line = self.line();
        let at = self.paused_until().max(now);
        let go = match pace {
            None => at,
            Some(q) => estimate(
                self.tat.load(Ordering::Acquire),
                q,
                at,
                line.entries.len() as u64,
            ),
        };
        if go > deadline {
            return Err(go - now);
        }
        let ticket = line.next_ticket;
        line.next_ticket += 1;
        line.entries.push_back(Entry {
            ticket,
            waker: None,
        });
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Ok((Ticket(ticket), go))
    }

    /// Records who to wake for `ticket`; whether it is at the head of the line. A ticket that is
    /// not in the line (never the case) counts as the head, so nothing waits for it forever.
    fn register(&self, ticket: Ticket, waker: &Waker) -> bool {
        let mut line = self.line();
        let head = line.entries.front().is_none_or(|e| e.ticket == ticket.0);
        if let Ok(i) = line.entries.binary_search_by_key(&ticket.0, |e| e.ticket) {
            let slot = &mut line.entries[i].waker;
            if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
                *slot = Some(waker.clone());
            }
        }
        head
    }

    /// Leaves the line (the call went, failed or was dropped); wakes the next head.
    pub(crate) fn leave(&self, ticket: Ticket) {
        let next = {
            let mut line = self.line();
            let Ok(i) = line.entries.binary_search_by_key(&ticket.0, |e| e.ticket) else {
                return;
            };
            line.entries.remove(i);
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            if i == 0 {
                line.entries.front_mut().and_then(|e| e.waker.take())
            } else {
                None
            }
        };
        if let Some(w) = next {
            w.wake();
        }
    }

    /// Drives `ticket` until the call may go (`Ok`, the ticket has left the line) or cannot go by
    /// `deadline` (`Err` with how long it would still wait, or `Err(0)` when that is unknown: the
    /// release window stayed full until the deadline; the ticket is still in the line).
    /// Only the head of the line sleeps, on `sleep`. With `slow_start`, `Ok(true)` means the call
    /// holds a place in the release window, to give back with [`Gate::finish_release`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn poll_turn(
        &self,
        ticket: Ticket,
        pace: Option<&Quota>,
        slow_start: bool,
        origin: Origin,
        deadline: u64,
        sleep: &mut Option<Pin<Box<Sleep>>>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<bool, u64>> {
        loop {
            let now = origin.elapsed();
            let paused = self.paused_until();
            if paused > now && paused > deadline {
                return Poll::Ready(Err(paused - now));
            }
            if !self.register(ticket, cx.waker()) {
                return Poll::Pending;
            }
            let at = if paused > now {
                paused
            } else {
                match pace {
                    None => now,
                    Some(q) => match reserve(&self.tat, q, now, 0) {
                        Reservation::Granted { .. } => now,
                        Reservation::Denied { wait } => now.saturating_add(wait.max(1)),
                    },
                }
            };
            if at <= now {
                if slow_start {
                    // Registered above: a release that finishes after this check wakes us.
                    if !self.take_release() {
                        // The window is full until a released call answers, which may be never
                        // (an upstream that hangs): the deadline still holds.
                        if now >= deadline {
                            return Poll::Ready(Err(0));
                        }
                        if poll_until(sleep, origin.instant(deadline), cx).is_pending() {
                            return Poll::Pending;
                        }
                        continue;
                    }
                    self.leave(ticket);
                    return Poll::Ready(Ok(true));
                }
                self.leave(ticket);
                return Poll::Ready(Ok(false));
            }
            if at > deadline {
                return Poll::Ready(Err(at - now));
            }
            if poll_until(sleep, origin.instant(at), cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// A place in the slow-start window, if one is free.
    fn take_release(&self) -> bool {
        let window = self.window.load(Ordering::Acquire);
        self.released
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r < window).then_some(r + 1)
            })
            .is_ok()
    }

    /// A released call finished: its place in the window is free, and a success widens the
    /// window by one (so it doubles every round trip). Wakes the head of the line.
    pub(crate) fn finish_release(&self, success: bool) {
        self.released.fetch_sub(1, Ordering::AcqRel);
        if success {
            let _ = self
                .window
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    (w < MAX_WINDOW).then_some(w + 1)
                });
        }
        let head = self.line().entries.front_mut().and_then(|e| e.waker.take());
        if let Some(w) = head {
            w.wake();
        }
    }

    /// Extends the pause to `until` (never shortens it); wakes every waiting call so each checks
    /// its deadline against the new pause. Whether the pause was extended. A pause starts slow
    /// start again from a window of one.
    pub(crate) fn pause_until(&self, until: u64) -> bool {
        let before = self.paused_until.fetch_max(until, Ordering::AcqRel);
        if until <= before {
            return false;
        }
        self.window.store(1, Ordering::Release);
        let wakers: Vec<Waker> = self
            .line()
            .entries
            .iter_mut()
            .filter_map(|e| e.waker.take())
            .collect();
        for w in wakers {
            w.wake();
        }
        true
    }

    /// Ends the pause now; returns when it would have ended. The head of the line is woken.
    pub(crate) fn clear_pause(&self) -> u64 {
        let before = self.paused_until.swap(0, Ordering::AcqRel);
        let head = self.line().entries.front_mut().and_then(|e| e.waker.take());
        if let Some(w) = head {
            w.wake();
        }
        before
    }
}

/// Sleeps on `sleep` (made on first use, moved when `until` changes) until `until`.
pub(crate) fn poll_until(
    sleep: &mut Option<Pin<Box<Sleep>>>,
    until: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let timer = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
    if timer.deadline() != until {
        timer.as_mut().reset(until);
    }
    timer.as_mut().poll(cx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn the_line_is_first_in_first_out_and_leaving_frees_the_place() {
        let g = Gate::default();
        let q = Quota::per_second(10).unwrap();
        assert!(g.try_now(Some(&q), 0));
        let (a, at_a) = g.join(Some(&q), 0, u64::MAX).unwrap();
        let (b, at_b) = g.join(Some(&q), 0, u64::MAX).unwrap();
        let (_c, at_c) = g.join(Some(&q), 0, u64::MAX).unwrap();
        assert_eq!((at_a, at_b, at_c), (100 * MS, 200 * MS, 300 * MS));
        assert_eq!(g.waiting(), 3);
        // A newcomer never jumps the line, even when a slot is free.
        assert!(!g.try_now(Some(&q), 10_000 * MS));
        g.leave(b);
        g.leave(a);
        // Two fewer ahead: the next joiner's estimate moves up by two intervals.
        let (_d, at_d) = g.join(Some(&q), 0, u64::MAX).unwrap();
        assert_eq!(at_d, 200 * MS);
        // Past the deadline: refused with the wait, and not in line.
        assert_eq!(g.join(Some(&q), 0, 250 * MS), Err(300 * MS));
        assert_eq!(g.waiting(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_polled_after_a_pause_past_its_deadline_ended_just_goes() {
        let g = Gate::default();
        let origin = Origin::now();
        let (t, _) = g.join(None, 0, 10 * MS).unwrap();
        g.pause_until(20 * MS);
        tokio::time::advance(std::time::Duration::from_millis(30)).await;
        let mut cx = Context::from_waker(Waker::noop());
        let mut sleep = None;
        assert_eq!(
            g.poll_turn(t, None, false, origin, 10 * MS, &mut sleep, &mut cx),
            Poll::Ready(Ok(false))
        );
        assert_eq!(g.waiting(), 0);
    }

    #[test]
    fn pauses_only_grow_until_cleared() {
        let g = Gate::default();
        assert!(g.pause_until(5 * MS));
        assert!(!g.pause_until(2 * MS));
        assert_eq!(g.paused_until(), 5 * MS);
        assert!(!g.try_now(None, 4 * MS));
        assert_eq!(g.clear_pause(), 5 * MS);
        assert!(g.try_now(None, 0));
    }

    #[test]
    fn a_learned_pace_halves_on_bare_429s_grows_on_successes_and_is_forgotten() {
        let g = Gate::default();
        assert_eq!(g.learned(), None);
        g.learn_faster();
        assert_eq!(g.learned(), None, "nothing to speed up");
        assert_eq!(
            g.learn_slower(125 * MS, 1_000 * MS),
            None,
            "first: nothing was learned"
        );
        assert_eq!(g.learned().unwrap().interval().as_millis(), 125);
        assert_eq!(g.learn_slower(125 * MS, 1_000 * MS), Some(250 * MS));
        assert_eq!(g.learned().unwrap().interval().as_millis(), 250);
        for _ in 0..10 {
            g.learn_slower(125 * MS, 1_000 * MS);
        }
        assert_eq!(g.learned().unwrap().interval().as_millis(), 1_000, "capped");
        g.learn_faster();
        assert_eq!(g.learned().unwrap().interval().as_micros(), 937_500);
        // The fast path takes slots at the pace.
        assert!(g.try_now(g.learned().as_ref(), 0));
        assert!(!g.try_now(g.learned().as_ref(), 100 * MS));
        assert!(g.try_now(g.learned().as_ref(), 940 * MS));
        for _ in 0..200 {
            g.learn_faster();
        }
        assert_eq!(g.learned(), None, "forgotten under a millisecond");
        g.learn_slower(125 * MS, 1_000 * MS);
        g.forget_pace();
        assert_eq!(g.learned(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_lets_one_out_then_one_more_per_success() {
        let g = Gate::default();
        let origin = Origin::now();
        let tickets: Vec<_> = (0..4)
            .map(|_| g.join(None, 0, u64::MAX).unwrap().0)
            .collect();
        let mut cx = Context::from_waker(Waker::noop());
        let mut sleep = None;
        let mut turn = |t| g.poll_turn(t, None, true, origin, u64::MAX, &mut sleep, &mut cx);
        assert_eq!(turn(tickets[0]), Poll::Ready(Ok(true)));
        // The window is one: the next waits for the first to finish.
        assert_eq!(turn(tickets[1]), Poll::Pending);
        g.finish_release(true);
        // Window two: two may go.
        assert_eq!(turn(tickets[1]), Poll::Ready(Ok(true)));
        assert_eq!(turn(tickets[2]), Poll::Ready(Ok(true)));
        assert_eq!(turn(tickets[3]), Poll::Pending);
        // A new pause shrinks the window back to one.
        g.pause_until(MS);
        g.finish_release(false);
        tokio::time::advance(std::time::Duration::from_millis(2)).await;
        // One still out: the window of one is full.
        assert_eq!(turn(tickets[3]), Poll::Pending);
        g.finish_release(false);
        assert_eq!(turn(tickets[3]), Poll::Ready(Ok(true)));
    }
}
