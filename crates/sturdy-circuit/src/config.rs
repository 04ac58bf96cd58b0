use std::time::Duration;

/// Breaker settings, shared by every breaker of a layer.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Opens after this many failures in a row; 0: this trigger is off.
    pub(crate) consecutive_failures: u32,
    pub(crate) failure_rate: f64,
    pub(crate) min_calls: u32,
    pub(crate) window: Duration,
    pub(crate) open_for: Duration,
    pub(crate) max_open: Duration,
    pub(crate) probes: u32,
    pub(crate) successes_to_close: u32,
    pub(crate) max_breakers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            // A flaky API must not trip the breaker; a dead one must. Both anchors (resilience4j
            // and Polly) trip on a failure ratio over a minimum volume of calls, not on a streak:
            // at a 30 % failure rate, 5 failures in a row happen every few hundred calls.
            consecutive_failures: 0,
            failure_rate: 0.5,
            min_calls: 100,
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(30),
            max_open: Duration::from_secs(300),
            probes: 1,
            successes_to_close: 1,
            max_breakers: 1_024,
        }
    }
}
