//! Shared helpers of the cost tests: how a parser's time grows with its input.
//!
//! Each size is timed several times and the fastest run is kept: other tests of the same binary
//! run on the other threads, and a run they slow down only ever takes longer, so the fastest is
//! the one that measures the work itself.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;
use tokio::time::Instant;

/// The fastest of at least `runs` runs of `f`, and of more (up to 50, within about 300 ms): on a
/// loaded machine (more runnable threads than cores) a run of a few milliseconds is preempted
/// most of the time, and of 5 runs none may have run whole (the largest size then read up to 53
/// times the smallest, three busy loops beside the suite on 2 cores); of more runs, one that
/// began with a fresh time slice measures the work.
pub fn fastest(runs: usize, mut f: impl FnMut()) -> Duration {
    let began = Instant::now();
    let mut best = Duration::MAX;
    let mut done = 0;
    while done < runs || (done < 50 && began.elapsed() < Duration::from_millis(300)) {
        let start = Instant::now();
        f();
        best = best.min(start.elapsed());
        done += 1;
    }
    if done == 0 {
        Duration::ZERO
    } else {
        best
    }
}

/// Times `f(size)` at `n`, `4n` and `16n` (after one warm-up run at `n`: first allocations, page
/// faults).
pub fn scaling(n: usize, mut f: impl FnMut(usize) -> Duration) -> [Duration; 3] {
    let _ = f(n);
    [f(n), f(4 * n), f(16 * n)]
}

/// How much longer the largest size took than the smallest: about 16 when linear, 256 when
/// quadratic.
pub fn ratio(t: &[Duration; 3]) -> f64 {
    t[2].as_secs_f64() / t[0].as_secs_f64().max(1e-7)
}
