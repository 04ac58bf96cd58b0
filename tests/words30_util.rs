//! Helpers of the words30 round: where the sturdy-chaos binary is, and running it.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `sturdy-chaos` binary next to this test binary (`target/debug/sturdy-chaos`), if built.
/// The suite binary lives in `target/<profile>/deps/`; `cargo build -p sturdy-chaos` puts the
/// demo in `target/<profile>/`.
pub(crate) fn chaos_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let bin = profile_dir.join(format!("sturdy-chaos{}", std::env::consts::EXE_SUFFIX));
    if bin.is_file() {
        Some(bin)
    } else {
        eprintln!(
            "skipped: {} is not built (run `cargo build -p sturdy-chaos` first)",
            bin.display()
        );
        None
    }
}

/// Runs the demo with `args` in a scratch directory (so no plot lands in the repository).
pub(crate) fn run_chaos(bin: &PathBuf, args: &[&str]) -> Output {
    let dir = std::env::temp_dir();
    Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the sturdy-chaos binary runs")
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An example binary built by `cargo build --example <name> --features full`, if built.
pub(crate) fn example_bin(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe
        .parent()?
        .parent()?
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if bin.is_file() {
        Some(bin)
    } else {
        eprintln!("skipped: {} is not built", bin.display());
        None
    }
}
