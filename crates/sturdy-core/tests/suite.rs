//! Every integration test of this crate in one binary: one link instead of one per file, which
//! keeps a clean build's disk use and link time small. A new `tests/*.rs` file is a module here
//! (`mod name;`); the workspace's `every_test_file_is_compiled` test checks that none is forgotten.

// The cost tests' timing helper, shared with the workspace's root tests.
#[path = "../../../tests/cost_common/mod.rs"]
mod cost_common;

mod dispatch_gone;
mod link_bounds;
mod never_panic;
mod review10_link;
mod review10_sf;
mod review12_sf;
mod review8_core;
mod vectors;
