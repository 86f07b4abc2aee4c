//! Tests the test harness: every Go fixture builds with both toolchains, and the variants
//! build and run.

mod common;

use common::{go_fixture, go_version_of, Child, GoToolchain, Variant};
use std::time::Duration;

const FIXTURES: [&str; 4] = ["contended", "httpcache", "mapcrash", "mapracy"];

#[test]
fn every_fixture_builds_with_both_go_toolchains() {
    for go in GoToolchain::ALL {
        for name in FIXTURES {
            let bin = go_fixture(name, go, Variant::Plain);
            let version = go_version_of(go, &bin);
            assert!(
                version.starts_with(go.version_prefix()),
                "{name} built with {go:?} reports {version}, expected {}*",
                go.version_prefix()
            );
        }
    }
}

#[test]
fn contended_runs_in_every_variant() {
    for go in GoToolchain::ALL {
        for v in Variant::ALL {
            let bin = go_fixture("contended", go, v);
            let mut child = Child::spawn(&bin, &["-duration", "0"]);
            let line = child.wait_for_line("ready pid=", Duration::from_secs(10));
            assert_eq!(line, format!("ready pid={}", child.pid()), "{go:?} {v:?}");
            child.signal(libc::SIGTERM);
            let status = child
                .wait_timeout(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{go:?} {v:?}: no exit after SIGTERM"));
            assert!(status.success(), "{go:?} {v:?}: {status}");
        }
    }
}

#[test]
fn contended_burst_runs_exactly_n_iterations() {
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let mut child = Child::spawn(&bin, &["-burst", "2000", "-duration", "0"]);
    let plan = child.wait_for_line("burst plan", Duration::from_secs(10));
    assert!(plan.starts_with("burst plan total=2000 "), "{plan}");
    child.wait_for_line("ready pid=", Duration::from_secs(10));
    child.signal(libc::SIGUSR1);
    child.wait_for_line("burst done", Duration::from_secs(30));
    child.signal(libc::SIGTERM);
    let exit = child.wait_for_line("exit ", Duration::from_secs(10));
    let total: i64 = exit
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(_, n)| n.parse::<i64>().ok())
        .sum();
    assert_eq!(total, 2000, "{exit}");
}
