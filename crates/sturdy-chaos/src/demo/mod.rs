//! The demo's scenarios, its progress reporting and its plots.

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
    println!("sturdy-chaos listening on {}", server.url(""));
    println!("knobs: {:#?}", server.knobs());
    println!("press Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
