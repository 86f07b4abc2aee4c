//! Bad input gets one clear line and a non-zero exit, and never harms the
//! target.

mod common;

use std::{
    process::{Command, Output},
    time::Duration,
};

use common::{go_fixture, map_probe, require_root, tmp, Child, GoToolchain, Variant};

/// One line on stderr, starting with our prefix, saying `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line, got: {err}");
    assert!(err.starts_with("map-probe: error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn no_such_pid() {
    require_root();
    let out = map_probe(&["attach", "--pid", "999999", "--duration", "1"]);
    assert_one_line_error(&out, "no process with PID 999999");
}

#[test]
fn not_a_go_binary() {
    require_root();
    let mut sleeper = Child::spawn_cmd(common::command("sleep", &["30"]));
    let out = map_probe(&[
        "attach",
        "--pid",
        &sleeper.pid().to_string(),
        "--duration",
        "1",
    ]);
    assert_one_line_error(&out, "is not a Go binary");
    assert!(sleeper.running(), "the target must survive");
}

#[test]
fn go_older_than_supported() {
    require_root();
    // A real Go 1.19 program whose build info claims go1.17.8: the version
    // check is what stops map-probe, before any probe goes in.
    let bin = go_fixture("contended", GoToolchain::Go119, Variant::Plain);
    let mut data = std::fs::read(&bin).unwrap();
    // Both copies: .go.buildinfo's and runtime.buildVersion's.
    let mut patched = 0;
    while let Some(at) = data.windows(8).position(|w| w == b"go1.19.8") {
        data[at..at + 8].copy_from_slice(b"go1.17.8");
        patched += 1;
    }
    assert!(patched >= 1, "version string in .go.buildinfo");
    let old = tmp("contended-claims-go1.17");
    std::fs::write(&old, &data).unwrap();
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut fixture = Child::spawn(&old, &["-duration", "30s"]);
    fixture.wait_for_line("ready pid=", Duration::from_secs(10));
    let out = map_probe(&[
        "attach",
        "--pid",
        &fixture.pid().to_string(),
        "--duration",
        "1",
    ]);
    assert_one_line_error(&out, "go1.17.8");
    assert_one_line_error(&out, "supports Go 1.19 and newer");
    assert!(fixture.running());
}

#[test]
fn target_exits_mid_run() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let mut fixture = Child::spawn(&bin, &["-duration", "2s"]);
    fixture.wait_for_line("ready pid=", Duration::from_secs(10));
    let out_json = tmp("exits-mid-run.json");
    let out_svg = tmp("exits-mid-run.svg");
    let _ = std::fs::remove_file(&out_json);
    let t = std::time::Instant::now();
    let out = map_probe(&[
        "attach",
        "--pid",
        &fixture.pid().to_string(),
        "--duration",
        "30",
        "--budget",
        "unlimited",
        "--json",
        out_json.to_str().unwrap(),
        "--flamegraph",
        out_svg.to_str().unwrap(),
    ]);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "map-probe noticed the exit late"
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exited"), "{err}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).unwrap();
    assert_eq!(r["end"], "target-exited");
    assert!(
        !r["sites"].as_array().unwrap().is_empty(),
        "what was seen before the exit is kept"
    );
    assert!(out_svg.exists());
}

#[test]
fn without_privileges() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let mut fixture = Child::spawn(&bin, &["-duration", "30s"]);
    fixture.wait_for_line("ready pid=", Duration::from_secs(10));
    // Same binary, as an unprivileged user, then as root without the capabilities.
    for setpriv in [
        vec!["--reuid=65534", "--regid=65534", "--clear-groups"],
        vec![
            "--bounding-set=-bpf,-perfmon,-sys_admin",
            "--inh-caps=-bpf,-perfmon,-sys_admin",
        ],
    ] {
        let out = Command::new("setpriv")
            .args(&setpriv)
            .arg(env!("CARGO_BIN_EXE_map-probe"))
            .args([
                "attach",
                "--pid",
                &fixture.pid().to_string(),
                "--duration",
                "1",
            ])
            .output()
            .unwrap();
        assert_one_line_error(&out, "needs CAP_BPF and CAP_PERFMON");
    }
    assert!(fixture.running());
}

/// A kernel without uprobes or BTF is played by pointing map-probe at a sysfs
/// tree that lacks them (the real kernel has both; this checks the message).
#[test]
fn kernel_without_uprobes_or_btf() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let mut fixture = Child::spawn(&bin, &["-duration", "30s"]);
    fixture.wait_for_line("ready pid=", Duration::from_secs(10));
    let fake = tmp("fake-sysfs");
    let _ = std::fs::remove_dir_all(&fake);
    std::fs::create_dir_all(&fake).unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_map-probe"))
            .env("MAP_PROBE_SYSFS", &fake)
            .args([
                "attach",
                "--pid",
                &fixture.pid().to_string(),
                "--duration",
                "1",
            ])
            .output()
            .unwrap()
    };
    assert_one_line_error(&run(), "no uprobe support");
    let pmu = fake.join("bus/event_source/devices/uprobe");
    std::fs::create_dir_all(&pmu).unwrap();
    std::fs::write(pmu.join("type"), "7\n").unwrap();
    assert_one_line_error(&run(), "exposes no BTF");
    assert!(fixture.running());
}

#[test]
fn doctor_reports_this_host() {
    require_root();
    let out = map_probe(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for what in [
        "kernel",
        "uprobes",
        "uprobe_multi",
        "BTF",
        "CAP_BPF",
        "CAP_PERFMON",
        "ready:",
    ] {
        assert!(text.contains(what), "doctor should report {what}: {text}");
    }
}

/// Attach and detach repeatedly: the target keeps running and exits cleanly.
#[test]
fn target_survives_attach_and_detach() {
    require_root();
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        let bin = go_fixture("contended", go, Variant::Pie);
        let mut fixture = Child::spawn(&bin, &["-duration", "0"]);
        fixture.wait_for_line("ready pid=", Duration::from_secs(10));
        let pid = fixture.pid().to_string();
        for _ in 0..3 {
            let out = map_probe(&[
                "attach",
                "--pid",
                &pid,
                "--duration",
                "2",
                "--window-ms",
                "100",
                "--budget",
                "0.1",
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        fixture.signal(libc::SIGTERM);
        let line = fixture.wait_for_line("exit reason=", Duration::from_secs(10));
        assert!(line.contains("terminated"), "{line}");
        assert!(
            fixture.wait().success(),
            "{go:?}: the fixture must exit cleanly after being probed"
        );
    }
}
