//! Progress on stderr: one line rewritten in place on a terminal, one line per finished step
//! otherwise (and whenever the results on stdout are not on the same terminal).

use std::io::{IsTerminal as _, Write as _};

use tokio::time::Instant;

/// Reports progress on stderr.
#[derive(Debug)]
pub(crate) struct Progress {
    live: bool,
    summaries: bool,
    last: Option<Instant>,
}

impl Progress {
    /// `results_on_terminal`: the results go to the terminal that also shows stderr, so a
    /// finished step needs no summary line of its own.
    pub(crate) fn new(results_on_terminal: bool) -> Self {
        let live = std::io::stderr().is_terminal();
        Self {
            live,
            summaries: !(live && results_on_terminal),
            last: None,
        }
    }

    /// A step is under way: rewrites the live line (at most every 50 ms), on a terminal only.
    pub(crate) fn update(&mut self, line: &str) {
        if !self.live {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t).as_millis() < 50)
        {
            return;
        }
        self.last = Some(now);
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[K{line}");
        let _ = e.flush();
    }

    /// A step is done: clears the live line and prints `summary` on a line of its own unless the
    /// results on the same terminal say it already.
    pub(crate) fn finish(&mut self, summary: &str) {
        let mut e = std::io::stderr().lock();
        if self.live {
            let _ = write!(e, "\r\x1b[K");
        }
        if self.summaries {
            let _ = writeln!(e, "{summary}");
        }
        let _ = e.flush();
        self.last = None;
    }
}

impl Progress {
    /// Something worth a line of its own (a failed call): printed at once, above the live line.
    pub(crate) fn note(&mut self, line: &str) {
        let mut e = std::io::stderr().lock();
        if self.live {
            let _ = write!(e, "\r\x1b[K");
        }
        let _ = writeln!(e, "{line}");
        let _ = e.flush();
        self.last = None;
    }
}
