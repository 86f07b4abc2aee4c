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

/// A kernel without uprobes is played by pointing map-probe at a sysfs tree
/// that lacks them (the real kernel has them; this checks the message).
/// Without BTF map-probe still works (see reliability.rs).
#[test]
fn kernel_without_uprobes() {
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

/// Settings that would switch the governor off, or make it meaningless, are
/// refused with one line before anything is attached.
#[test]
fn governor_cannot_be_switched_off_by_accident() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let mut fixture = common::start_fixture(&bin, &["-duration", "60s"]);
    let pid = fixture.pid().to_string();
    for (flag, value, needle) in [
        (
            "--hit-cost-us",
            "0",
            "--hit-cost-us must be a positive number",
        ),
        (
            "--hit-cost-us",
            "NaN",
            "--hit-cost-us must be a positive number",
        ),
        (
            "--hit-cost-us",
            "inf",
            "--hit-cost-us must be a positive number",
        ),
        (
            "--hit-cost-us",
            "-5",
            "--hit-cost-us must be a positive number",
        ),
        ("--window-ms", "0", "--window-ms must be at least"),
        ("--map-window-ms", "0", "--map-window-ms must be at least"),
        ("--max-gap", "0", "--max-gap must be at least"),
        ("--max-gap", "NaN", "--max-gap must be at least"),
        ("--budget", "0", "--budget unlimited"),
        ("--budget", "-1", "not a percentage"),
        ("--budget", "250", "not a percentage"),
        ("--budget", "lots", "neither a percentage"),
    ] {
        let t = std::time::Instant::now();
        let out = map_probe(&["attach", "--pid", &pid, "--duration", "30", flag, value]);
        assert_one_line_error(&out, needle);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{flag} {value}: refused late"
        );
    }
    // Unbounded probing is spelled out, and warned about.
    let out = map_probe(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "1",
        "--budget",
        "unlimited",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning: --budget unlimited"), "{err}");
    assert!(fixture.running());
}

/// An output that could not be written is refused before the observation,
/// not after it.
#[test]
fn outputs_are_checked_before_attaching() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let mut fixture = common::start_fixture(&bin, &["-duration", "60s"]);
    let pid = fixture.pid().to_string();
    let dir = tmp("an-existing-folder");
    std::fs::create_dir_all(&dir).unwrap();
    for (flag, path, needle) in [
        ("--json", "/no/such/folder/r.json", "does not exist"),
        ("--flamegraph", "/no/such/folder/f.svg", "does not exist"),
        ("--folded", dir.to_str().unwrap(), "is a folder"),
        ("--folded", "-", "only --json writes to stdout"),
    ] {
        let t = std::time::Instant::now();
        let out = map_probe(&["attach", "--pid", &pid, "--duration", "30", flag, path]);
        assert_one_line_error(&out, needle);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{flag} {path}: refused late"
        );
    }
    assert!(fixture.running());
}

/// One output that fails at the end (its folder vanished mid-run) does not
/// stop the others: they are written and named, the failure is one line,
/// and the exit status says it.
#[test]
fn a_failing_output_leaves_the_others_written() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let fixture = common::start_fixture(&bin, &["-duration", "60s"]);
    let doomed = tmp("doomed-folder");
    let _ = std::fs::remove_dir_all(&doomed);
    std::fs::create_dir_all(&doomed).unwrap();
    let json = doomed.join("r.json");
    let folded = tmp("survivor.folded");
    let svg = tmp("survivor.svg");
    let _ = std::fs::remove_file(&folded);
    let _ = std::fs::remove_file(&svg);
    let probe = Command::new(env!("CARGO_BIN_EXE_map-probe"))
        .args([
            "attach",
            "--pid",
            &fixture.pid().to_string(),
            "--duration",
            "3",
        ])
        .args(["--json", json.to_str().unwrap()])
        .args(["--folded", folded.to_str().unwrap()])
        .args(["--flamegraph", svg.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    std::fs::remove_dir_all(&doomed).unwrap();
    let out = probe.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot write") && err.contains("r.json"),
        "{err}"
    );
    assert!(
        folded.exists() && svg.exists(),
        "the other outputs: {text} {err}"
    );
    assert!(
        text.contains("wrote") && text.contains("survivor.svg"),
        "{text}"
    );
    // Written whole, through a temporary file: none is left beside them.
    let leftovers: Vec<_> = std::fs::read_dir(folded.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".map-probe-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `--json -`: the report alone on stdout, the table on stderr.
#[test]
fn json_to_stdout() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let fixture = common::start_fixture(&bin, &["-duration", "60s"]);
    let out = map_probe(&[
        "attach",
        "--pid",
        &fixture.pid().to_string(),
        "--duration",
        "2",
        "--json",
        "-",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(r["target"]["pid"], fixture.pid());
    assert_eq!(r["sampling"]["requested_secs"], 2.0);
    assert!(
        err.contains("RANK") || err.contains("no lock contention"),
        "{err}"
    );
}

/// Messages that say what is true: a thread is not a process, a zombie has
/// exited, a kernel thread is one, and root refused by the kernel is not
/// told to become root.
#[test]
fn messages_say_what_is_true() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let mut fixture = common::start_fixture(&bin, &["-duration", "60s"]);
    let pid = fixture.pid();
    let tid = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&t| t != pid)
        .expect("a Go program has several threads");
    let out = map_probe(&["attach", "--pid", &tid.to_string(), "--duration", "1"]);
    assert_one_line_error(&out, &format!("is a thread of process {pid}"));

    // A child that exited and was not reaped: a zombie.
    let mut zombie = std::process::Command::new("true").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = map_probe(&[
        "attach",
        "--pid",
        &zombie.id().to_string(),
        "--duration",
        "1",
    ]);
    assert_one_line_error(&out, "has exited");
    zombie.wait().unwrap();

    let out = map_probe(&["attach", "--pid", "2", "--duration", "1"]);
    assert_one_line_error(&out, "is a kernel thread");

    // PID 1: whatever it is here, root is never told to run as root.
    let out = map_probe(&["attach", "--pid", "1", "--duration", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains("as root"), "{err}");
    assert!(fixture.running());
}

/// A second map-probe on a probed PID refuses, naming the first, unless told.
#[test]
fn one_map_probe_per_target() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let mut fixture = common::start_fixture(&bin, &["-duration", "60s"]);
    let pid = fixture.pid().to_string();
    let mut first = Child::spawn(
        env!("CARGO_BIN_EXE_map-probe"),
        &["attach", "--pid", &pid, "--duration", "6"],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let out = map_probe(&["attach", "--pid", &pid, "--duration", "1"]);
    assert_one_line_error(
        &out,
        &format!("already being probed by map-probe (PID {})", first.pid()),
    );
    let out = map_probe(&["attach", "--pid", &pid, "--duration", "1", "--allow-second"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(first.wait().success());
    // Once the first has gone, the slot is free again.
    let out = map_probe(&["attach", "--pid", &pid, "--duration", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fixture.running());
}

/// `--exe NAME`: one match is taken, several are refused with their PIDs
/// unless `--newest` picks one.
#[test]
fn target_by_executable_name() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Stripped);
    let name = bin.file_name().unwrap().to_str().unwrap().to_string();
    let one = common::start_fixture(&bin, &["-duration", "60s"]);
    let (out, r) = {
        let path = tmp("by-name.json");
        let out = map_probe(&[
            "attach",
            "--exe",
            &name,
            "--duration",
            "1",
            "--json",
            path.to_str().unwrap(),
        ]);
        (out, common::read_json(&path))
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["target"]["pid"], one.pid());
    let two = common::start_fixture(&bin, &["-duration", "60s"]);
    let out = map_probe(&["attach", "--exe", &name, "--duration", "1"]);
    assert_one_line_error(
        &out,
        &format!("matches 2 processes (PIDs {}, {})", one.pid(), two.pid()),
    );
    let path = tmp("by-name-newest.json");
    let out = map_probe(&[
        "attach",
        "--exe",
        &name,
        "--newest",
        "--duration",
        "1",
        "--json",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(common::read_json(&path)["target"]["pid"], two.pid());
    let out = map_probe(&["attach", "--exe", "no-such-program-here", "--duration", "1"]);
    assert_one_line_error(
        &out,
        "no running process has an executable named no-such-program-here",
    );
}

#[test]
fn help_says_what_map_probe_is_for() {
    let out = map_probe(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("lock contention") && text.contains("concurrent writes to plain maps"),
        "{text}"
    );
}
