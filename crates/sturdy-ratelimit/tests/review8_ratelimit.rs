//! Review of quotas too long to represent: spacing capped at 30 years, a burst's allowance at
//! 2^62 ns, and what callers then see (refusals, waits, reservations that pile up).

use std::time::Duration;

use sturdy_ratelimit::{DirectLimiter, Quota};

const YEAR: Duration = Duration::from_secs(86_400 * 365);

#[tokio::test(start_paused = true)]
async fn one_call_per_duration_max_with_the_largest_burst_admits_a_few_then_refuses() {
    let q = Quota::new(1, Duration::MAX)
        .unwrap()
        .with_burst(u32::MAX)
        .unwrap();
    let l = DirectLimiter::new(q);
    let granted = (0..1_000).filter(|_| l.check().is_ok()).count();
    // 146 years of allowance at one call per 30 years: about five calls.
    assert!((2..=10).contains(&granted), "{granted}");
    let e = l.check().unwrap_err();
    assert!(
        e.retry_after() > Duration::ZERO && e.retry_after() <= 31 * YEAR,
        "{:?}",
        e.retry_after()
    );
}

#[tokio::test(start_paused = true)]
async fn a_spacing_past_thirty_years_is_enforced_as_thirty_years() {
    let l = DirectLimiter::new(Quota::new(1, 100 * YEAR).unwrap());
    assert!(l.check().is_ok());
    let e = l.check().unwrap_err();
    assert!(
        e.retry_after() > 29 * YEAR && e.retry_after() <= 30 * YEAR,
        "{:?}",
        e.retry_after()
    );
}

/// Reservations with no bound on the wait pile up: each is further away than the last, and
/// past the 584 years a u64 of nanoseconds holds, none is ever granted at once.
#[tokio::test(start_paused = true)]
async fn reservations_without_a_bound_never_wrap_to_now() {
    let l = DirectLimiter::new(Quota::new(1, Duration::MAX).unwrap());
    let mut last = Duration::ZERO;
    for i in 0..100 {
        let w = l.reserve(Duration::MAX).unwrap();
        if i > 0 {
            assert!(w >= last && w > Duration::ZERO, "{i}: {w:?} after {last:?}");
        }
        last = w;
    }
    assert!(l.check().is_err());
}

#[tokio::test(start_paused = true)]
async fn until_ready_on_one_call_per_duration_max_waits_thirty_years() {
    let l = DirectLimiter::new(Quota::new(1, Duration::MAX).unwrap());
    l.until_ready(Duration::ZERO).await.unwrap();
    assert!(l.until_ready(29 * YEAR).await.is_err());
    let t = tokio::time::Instant::now();
    l.until_ready(Duration::MAX).await.unwrap();
    let waited = t.elapsed();
    assert!(
        waited > 29 * YEAR && waited <= 30 * YEAR + Duration::from_secs(1),
        "{waited:?}"
    );
}
