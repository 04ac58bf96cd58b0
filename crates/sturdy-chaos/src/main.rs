//! The sturdy demo.
fn main() {}
