//! `cargo xtask`: the one entry point for Updraft's developer tasks.
fn main() {}
