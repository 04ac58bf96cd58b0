//! The demo's scenarios, its progress reporting and its plots.

/// `println!` for results: a reader that stopped reading (`sturdy-chaos | head -1`) ends the
/// demo quietly, as a command-line tool does, instead of a panic on the broken pipe.
macro_rules! say {
    ($($t:tt)*) => {
        $crate::demo::say(format_args!($($t)*))
    };
}

/// Writes one line of results to stdout; see [`say!`].
pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("sturdy-chaos: cannot write the results: {e}");
        std::process::exit(1);
    }
}

pub(crate) mod args;
pub(crate) mod jitter;
pub(crate) mod orders;
mod plot;
mod progress;

use sturdy_chaos::ChaosServer;

/// Errors of the demo: reported on stderr with a non-zero exit.
pub(crate) type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// `--serve`: the chaos server with the orders demo's faults, until Ctrl-C.
pub(crate) async fn serve() -> Result<(), DemoError> {
    let server = ChaosServer::start(orders::knobs()).await?;
    say!("sturdy-chaos listening on {}", server.url(""));
    say!("knobs: {:#?}", server.knobs());
    say!("press Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
