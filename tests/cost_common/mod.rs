//! Shared helpers of the cost tests: how a parser's time grows with its input.
//!
//! Each size is timed several times and the fastest run is kept: other tests of the same binary
//! run on the other threads, and a run they slow down only ever takes longer, so the fastest is
//! the one that measures the work itself.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;
use tokio::time::Instant;

/// The fastest of `runs` runs of `f`.
pub fn fastest(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
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
