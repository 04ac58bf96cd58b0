//! Criterion benchmarks of sturdy, next to the peer crates (governor, failsafe, tower, reqwest).
//! The benches are in `benches/*.rs`; see docs/PERFORMANCE.md for the commands and the figures.
