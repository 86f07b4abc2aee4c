//! `cargo xtask fuzz [--seconds N] [--seed HEX]`: the hostile-binaries mutator for a
//! while, from a fresh seed (or the one given, to replay a failure). The suite runs the
//! same mutator on a fixed seed for a few thousand variants; this digs further. It runs
//! on the stable toolchain, with no fuzzing engine to install.

use crate::util::{self, step};

pub fn run(args: &[String]) -> Result<(), String> {
    let mut secs = "300".to_string();
    let mut seed = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => secs = it.next().ok_or("--seconds needs a value")?.clone(),
            "--seed" => seed = Some(it.next().ok_or("--seed needs a value")?.clone()),
            "-h" | "--help" => {
                println!("usage: cargo xtask fuzz [--seconds N (default 300)] [--seed HEX]");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}` (see --help)")),
        }
    }
    secs.parse::<u64>()
        .map_err(|_| format!("--seconds must be a whole number, got `{secs}`"))?;
    crate::setup::run()?;
    step("fuzz", &format!("mutating Go binaries for {secs} s"));
    let mut c = util::cargo();
    c.args([
        "test",
        "--release",
        "-p",
        "map-probe",
        "--test",
        "hostile_binaries",
    ])
    .args(["--", "--ignored", "--nocapture", "fuzz_for_a_while"])
    .env("MAP_PROBE_FUZZ_SECS", &secs);
    if let Some(s) = seed {
        c.env("MAP_PROBE_FUZZ_SEED", s);
    }
    util::run(&mut c)
}
