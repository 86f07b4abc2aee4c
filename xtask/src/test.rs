//! `cargo xtask test [-- filter...]`: setup, rustfmt check, clippy with warnings denied, then
//! every test of the workspace one at a time (the integration tests attach BPF to live
//! processes, so they need root).

use crate::util::{self, step};

pub fn run(args: &[String]) -> Result<(), String> {
    util::require_root("cargo xtask test")?;
    // `cargo xtask test -- foo` and `cargo xtask test foo` both pass `foo` to the test binaries.
    let filter = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    };
    crate::setup::run()?;
    step("test", "rustfmt");
    util::run(util::cargo().args(["fmt", "--all", "--check"]))?;
    step("test", "clippy");
    util::run(util::cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("test", "cargo test");
    util::run(
        util::cargo()
            .args([
                "test",
                "--release",
                "--workspace",
                "--no-fail-fast",
                "--",
                "--test-threads=1",
            ])
            .args(filter),
    )?;
    step("test", "all passed");
    Ok(())
}
