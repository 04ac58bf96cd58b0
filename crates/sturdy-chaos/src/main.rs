//! The sturdy demo.
//!
//! - `cargo run --release -p sturdy-chaos` sends the same orders to the same faulty API, first
//!   with a plain hyper client, then with a naive retry loop, then through sturdy's
//!   `ClientBuilder`, and prints what the server saw. `--json` prints one JSON object instead;
//!   `--orders N` changes the number of orders \[200\].
//! - `-- jitter` reproduces the "Exponential Backoff And Jitter" experiment: N clients contend for
//!   one resource under optimistic concurrency, with five backoff strategies; it prints the calls
//!   and completion times and writes two SVG plots into `docs/`.
//! - `-- --serve` starts the chaos server with the demo's faults and keeps it running, printing
//!   its address and knobs.
//!
//! Progress goes to stderr, results to stdout. `--help` lists every option.

mod demo;

use std::process::ExitCode;

use demo::args::{Command, USAGE};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match demo::args::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sturdy-chaos: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if matches!(command, Command::Help) {
        demo::say(format_args!("{USAGE}"));
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sturdy-chaos: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Help => Ok(()),
            Command::Serve => demo::serve().await,
            Command::Orders(o) => demo::orders::main(&o).await,
            Command::Jitter(j) => demo::jitter::main(&j).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sturdy-chaos: {e}");
            ExitCode::FAILURE
        }
    }
}
