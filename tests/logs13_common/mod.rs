//! Captures every `tracing` event (all levels, every field) and span of the current thread, and
//! reads errors whole (Display and Debug of the error and of every `source()`).
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};

/// `tracing::subscriber::set_default`, for tests that read what a thread's subscriber wrote
/// while other tests run on other threads of the same binary.
///
/// tracing-core decides once per call site whether anyone listens, and while only one subscriber
/// is registered it asks the default of whichever thread reaches the call site first: a test
/// thread without a subscriber then marks the call site "never" for every thread, and the
/// capturing test misses its event (a flake seen in `auth29_circuit`). A second subscriber that
/// lives as long as the process keeps tracing-core on its general path, where every registered
/// subscriber is asked.
pub fn set_default<S>(subscriber: S) -> tracing::subscriber::DefaultGuard
where
    S: tracing::Subscriber + Send + Sync + 'static,
{
    static KEPT: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    KEPT.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    tracing::subscriber::set_default(subscriber)
}

/// What the subscriber wrote.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// A TRACE-level subscriber for this thread, span events included, writing here.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let w = self.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
            .with_writer(move || w.clone())
            .finish();
        set_default(sub)
    }

    /// Everything written, every crate's events included.
    pub fn all(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The events of sturdy's crates (`sturdy*` targets), with their continuation lines. Other
    /// crates' events (hyper-util's connection pool logs the authority, userinfo included, at
    /// DEBUG and TRACE) are left out: they are not sturdy's to keep clean.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut keep = false;
        for line in self.all().lines() {
            let mut words = line.split_whitespace();
            let starts_event = line.starts_with(|c: char| c.is_ascii_digit());
            if starts_event {
                keep = words.nth(2).is_some_and(|t| t.starts_with("sturdy"));
            }
            if keep {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Display and Debug of `e` and of every error in its `source()` chain.
pub fn whole(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{e} | {e:?}");
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(&format!(" | source: {s} | {s:?}"));
        cur = s.source();
    }
    out
}

/// Fails, naming where, if `shown` holds any of `secrets`.
pub fn clean(what: &str, shown: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(
            !shown.contains(s),
            "{what}: the secret {s:?} shows:\n{shown}"
        );
    }
}

/// A port nothing listens on.
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Standard base64 with padding.
pub fn b64(input: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
