//! `map-probe run`: the program is never lost, whatever its life, its exit
//! status is map-probe's, and signals sent to map-probe reach it.

mod common;

use std::time::Duration;

use common::{go_fixture, map_probe, read_json, require_root, tmp, Child, GoToolchain, Variant};

/// A Go program that exits at once, 50 times: every time its status comes
/// back and the report is written.
#[test]
fn a_program_that_exits_at_once_is_never_lost() {
    require_root();
    let bin = go_fixture("quickexit", GoToolchain::Go126, Variant::Plain);
    let json = tmp("quickexit.json");
    for i in 0..50 {
        let _ = std::fs::remove_file(&json);
        let out = map_probe(&[
            "run",
            "--json",
            json.to_str().unwrap(),
            "--",
            bin.to_str().unwrap(),
            "-code",
            "7",
        ]);
        assert_eq!(
            out.status.code(),
            Some(7),
            "try {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = read_json(&json);
        assert_eq!(r["end"], "target-exited", "try {i}");
    }
}

#[test]
fn an_exec_that_fails_is_one_line() {
    require_root();
    let bin = go_fixture("quickexit", GoToolchain::Go126, Variant::Plain);
    let copy = tmp("quickexit-not-executable");
    std::fs::copy(&bin, &copy).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = map_probe(&["run", "--", copy.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot execute") && err.contains("Permission denied"),
        "{err}"
    );
}

/// `run --duration`: the probes leave after N seconds, map-probe says it
/// now waits for the program, and exits with the program's status.
#[test]
fn run_duration_detaches_and_waits() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let t = std::time::Instant::now();
    let out = map_probe(&[
        "run",
        "--duration",
        "2",
        "--",
        bin.to_str().unwrap(),
        "-duration",
        "5s",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("observation over after 2.0 s") && err.contains("waiting for PID"),
        "{err}"
    );
    assert!(
        t.elapsed() >= Duration::from_secs(5),
        "map-probe must wait for the program"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("(2.0 s requested)") || text.contains("for 2.0 s"),
        "{text}"
    );
}

/// SIGTERM and SIGINT sent to map-probe reach the program, during the
/// observation and after it, and map-probe exits with its status.
#[test]
fn signals_reach_the_program() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    for (sig, name, extra) in [
        (libc::SIGTERM, "terminated", vec![]),
        (libc::SIGINT, "interrupt", vec![]),
        (libc::SIGTERM, "terminated", vec!["--duration", "1"]),
        (libc::SIGINT, "interrupt", vec!["--duration", "1"]),
    ] {
        let mut args = vec!["run"];
        args.extend(extra.iter().copied());
        args.extend(["--", bin.to_str().unwrap(), "-duration", "60s"]);
        let mut probe = Child::spawn_cmd(common::command(common::map_probe_bin(), &args));
        probe.wait_for_line("ready pid=", Duration::from_secs(10));
        // Past the observation when --duration is given.
        std::thread::sleep(Duration::from_secs(2));
        probe.signal(sig);
        let line = probe.wait_for_line("exit reason=", Duration::from_secs(10));
        assert!(line.contains(name), "{line}");
        let status = probe.wait();
        assert_eq!(
            status.code(),
            Some(0),
            "{extra:?}: {:?}",
            probe.output_so_far()
        );
    }
}
