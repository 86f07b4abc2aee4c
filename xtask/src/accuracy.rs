//! `cargo xtask accuracy [--runs N]`: the load-changes accuracy check at full length. The suite
//! runs `tests/load_changes.rs` with two runs per Go release; this runs it with N (default 10),
//! prints every site-run against Go's own mutex profile, and the totals the bars are
//! about (within ±35%, beyond ±60%, rank inversions, coverage of the printed interval).

use crate::util::{self, step};

pub fn run(args: &[String]) -> Result<(), String> {
    let mut runs = 10u32;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--runs needs a positive number")?
            }
            other => return Err(format!("unknown option `{other}` (usage: --runs N)")),
        }
    }
    util::require_root("cargo xtask accuracy")?;
    crate::setup::run()?;
    step(
        "accuracy",
        &format!(
            "{runs} runs of 12 s per Go release (about {} s)",
            runs * 2 * 15
        ),
    );
    util::run(
        util::cargo()
            .env("MAP_PROBE_ACCURACY_RUNS", runs.to_string())
            .args([
                "test",
                "--release",
                "-p",
                "map-probe",
                "--test",
                "load_changes",
                "--",
                "--nocapture",
                "--test-threads=1",
            ]),
    )
}
