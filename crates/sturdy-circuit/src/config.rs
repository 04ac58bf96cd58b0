use std::time::Duration;

/// Breaker settings, shared by every breaker of a layer.
#[derive(Debug, Clone)]
pub(crate) struct Config {
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
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_calls: 20,
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(30),
            max_open: Duration::from_secs(300),
            probes: 1,
            successes_to_close: 1,
            max_breakers: 1_024,
        }
    }
}
