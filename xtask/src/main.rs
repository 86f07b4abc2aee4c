//! Project tasks: `cargo xtask <setup|build|test|demo|bench|accuracy>`.
//!
//! std only, and it must build with the machine's default stable Rust, because it is what
//! installs the pinned toolchain (`util::TOOLCHAIN`) that everything else is built with.

mod accuracy;
mod bench;
mod build;
mod demo;
mod fuzz;
mod otelcol;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <command> [args]

commands:
  setup            install the pinned Rust, bpf-linker, Go 1.19, bpftrace, wrk, caddy and build
                   the pinned OpenTelemetry Collector the tests use (idempotent)
  build [args]     setup, then cargo build --release -p map-probe [args]
  test [-- filter] setup, fmt --check, clippy -D warnings, cargo test (needs root)
  demo             build, run the contended Go fixture and attach map-probe to it (needs root)
  fuzz [args]      the hostile-binaries mutator for a while (--seconds N, --seed HEX)
  bench [args]     overhead: detached and attached phases of a loaded Go service, alternating
                   (`cargo xtask bench --help` for modes and options)
  accuracy [--runs N]
                   estimates against Go's own mutex profile while load comes and goes (10 runs
                   per Go release by default; the suite runs 2)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<String> = args.collect();
    let result = match cmd.as_str() {
        "setup" => no_args(&cmd, &rest).and_then(|()| setup::run()),
        "build" => build::run(&rest),
        "test" => test::run(&rest),
        "demo" => no_args(&cmd, &rest).and_then(|()| demo::run()),
        "bench" => bench::run(&rest),
        "accuracy" => accuracy::run(&rest),
        "fuzz" => fuzz::run(&rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("xtask: unknown command `{other}`\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {cmd}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn no_args(cmd: &str, rest: &[String]) -> Result<(), String> {
    match rest.first() {
        None => Ok(()),
        Some(a) => Err(format!("`{cmd}` takes no arguments (got `{a}`)")),
    }
}
