//! `cargo xtask build`: setup, then the release build of map-probe (its build.rs builds the
//! eBPF crate), leaving `target/release/map-probe`.

use crate::util::{self, step};
use std::path::PathBuf;

pub fn run(extra: &[String]) -> Result<(), String> {
    crate::setup::run()?;
    build(extra)?;
    Ok(())
}

/// Builds map-probe (release) and returns the binary's path.
pub fn build(extra: &[String]) -> Result<PathBuf, String> {
    step("build", "cargo build --release -p map-probe");
    util::run(
        util::cargo()
            .args(["build", "--release", "-p", "map-probe"])
            .args(extra),
    )?;
    let bin = util::repo_root().join("target/release/map-probe");
    if !bin.is_file() {
        return Err(format!("build finished but {} is missing", bin.display()));
    }
    step("build", &format!("built {}", bin.display()));
    Ok(bin)
}
