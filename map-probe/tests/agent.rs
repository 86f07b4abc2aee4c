//! `map-probe agent` as a per-host daemon, against a real OpenTelemetry
//! Collector: started before its targets, it finds them by executable name,
//! exports each under its own resource, lets one go when it exits (its last
//! interval still arrives), and flushes the others on SIGTERM.

mod common;

use std::time::Duration;

use common::{go_fixture, map_probe_bin, require_root, Child, Collector, GoToolchain, Variant};
use serde_json::Value;

fn agent_two_targets(protocol: &str) {
    require_root();
    let col = Collector::start(&format!("agent-{}", protocol.replace('/', "-")));
    let contended = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let racy = go_fixture("mapracy", GoToolchain::Go126, Variant::Plain);
    // A long interval: nothing of the long-lived target is exported before
    // SIGTERM, so what arrives of it afterwards is the flush.
    let mut agent = Child::spawn(
        map_probe_bin(),
        &[
            "agent",
            "--exe",
            "contended-go126-plain",
            "--exe",
            "mapracy-go126-plain",
            "--rescan",
            "1",
            "--interval",
            "60",
            "--max-gap",
            "1",
            "--otlp-endpoint",
            &col.endpoint(protocol),
            "--otlp-protocol",
            protocol,
        ],
    );
    agent.wait_for_stderr_line("map-probe: agent started", Duration::from_secs(10));
    let mut long = Child::spawn(&contended, &["-duration", "90s"]);
    long.wait_for_line("ready pid=", Duration::from_secs(10));
    let mut short = Child::spawn(&racy, &["-mutex", "-duration", "6s"]);
    let (lp, sp) = (long.pid(), short.pid());
    for pid in [lp, sp] {
        agent.wait_for_stderr_line(
            &format!("map-probe: attached to PID {pid} "),
            Duration::from_secs(10),
        );
    }
    assert!(short.wait_timeout(Duration::from_secs(20)).is_some());
    agent.wait_for_stderr_line(&format!("map-probe: PID {sp} "), Duration::from_secs(10));
    assert!(
        agent
            .output_so_far()
            .iter()
            .any(|l| l.contains(&format!("PID {sp} (mapracy-go126-plain) exited; let go"))),
        "{:#?}",
        agent.output_so_far()
    );
    let pid_of = |r: &std::collections::HashMap<String, Value>| r["process.pid"].as_i64();
    let got = col.wait_for(Duration::from_secs(10), |o| {
        o.points
            .iter()
            .any(|p| pid_of(&p.resource) == Some(i64::from(sp)))
    });
    assert!(
        got.points
            .iter()
            .any(|p| pid_of(&p.resource) == Some(i64::from(sp))),
        "{protocol}: the exited target's last interval arrived"
    );
    assert!(
        !got.points
            .iter()
            .any(|p| pid_of(&p.resource) == Some(i64::from(lp))),
        "{protocol}: nothing of the long-lived target before the flush"
    );
    assert!(agent.running(), "the agent outlives its targets");
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_timeout(Duration::from_secs(15))
        .expect("the agent stops on SIGTERM");
    assert!(status.success(), "{status}: {:#?}", agent.output_so_far());
    let last = agent.wait_for_stderr_line(
        "map-probe: agent stopped on SIGTERM",
        Duration::from_secs(5),
    );
    assert!(last.contains("flushed and detached 1 target(s)"), "{last}");
    let got = col.wait_for(Duration::from_secs(5), |o| {
        o.spans
            .iter()
            .any(|s| pid_of(&s.resource) == Some(i64::from(lp)))
    });
    let long_spans: Vec<_> = got
        .spans_named("map_probe.lock.contention")
        .filter(|s| pid_of(&s.resource) == Some(i64::from(lp)))
        .collect();
    assert!(
        long_spans
            .iter()
            .any(|s| s.attrs["code.function.name"] == "main.hotPath"),
        "{protocol}: the flush on SIGTERM sent the long-lived target's sites"
    );
    assert!(got
        .points_named("map_probe.lock.waits")
        .any(|p| pid_of(&p.resource) == Some(i64::from(lp))));
    // Each under its own resource.
    for (pid, exe) in [(lp, "contended-go126-plain"), (sp, "mapracy-go126-plain")] {
        let res = got
            .points
            .iter()
            .map(|p| &p.resource)
            .find(|r| pid_of(r) == Some(i64::from(pid)))
            .unwrap_or_else(|| panic!("{protocol}: a resource for PID {pid}"));
        assert_eq!(res["process.executable.name"], exe);
        assert_eq!(res["service.name"], "mapprobe/fixtures");
        assert_eq!(res["process.runtime.name"], "go");
        assert!(res["process.runtime.version"]
            .as_str()
            .unwrap()
            .starts_with("go1.26"));
        assert!(res["process.executable.path"]
            .as_str()
            .unwrap()
            .ends_with(exe));
        assert!(!res["host.name"].as_str().unwrap().is_empty());
    }
    // The target exited cleanly, its fixture did not die: no error, no risk.
    assert!(!agent.output_so_far().iter().any(|l| l.contains("error")));
}

#[test]
fn agent_sees_two_targets_lets_one_go_and_flushes_on_sigterm_grpc() {
    agent_two_targets("grpc");
}

#[test]
fn agent_sees_two_targets_lets_one_go_and_flushes_on_sigterm_http() {
    agent_two_targets("http/protobuf");
}

/// `--all-go` recognises Go programs by their build info, whatever the
/// build, and nothing else.
#[test]
fn all_go_recognises_go_programs_by_build_info() {
    for go in GoToolchain::ALL {
        for v in [Variant::Plain, Variant::ExternalStripped] {
            let bin = go_fixture("contended", go, v);
            assert!(map_probe::gobin::has_go_buildinfo(&bin), "{go:?} {v:?}");
        }
    }
    assert!(!map_probe::gobin::has_go_buildinfo(&map_probe_bin()));
    assert!(!map_probe::gobin::has_go_buildinfo(std::path::Path::new(
        "/bin/sh"
    )));
}

/// The capabilities in the shipped unit file's `CapabilityBoundingSet=`.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(
        common::workspace_root().join("contrib/systemd/map-probe-agent.service"),
    )
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds the capabilities");
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect();
    let ambient = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit grants them");
    assert_eq!(line, ambient, "bounding and ambient sets agree");
    caps
}

/// The agent under exactly the unit's capability bound (as root's uid, as
/// the unit runs it) attaches to a Go process and exports it.
#[test]
fn agent_runs_with_only_the_units_capabilities() {
    require_root();
    let caps = unit_capabilities();
    assert!(!caps.iter().any(|c| c == "sys_admin" || c == "dac_override"));
    let col = Collector::start("agent-caps");
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Stripped);
    let mut target = Child::spawn(&bin, &["-duration", "60s"]);
    target.wait_for_line("ready pid=", Duration::from_secs(10));
    let bound = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut cmd = std::process::Command::new("setpriv");
    cmd.arg(format!("--bounding-set={bound}"))
        .arg("--no-new-privs")
        .arg("--")
        .arg(map_probe_bin())
        .args(["agent", "--pid", &target.pid().to_string()])
        .args(["--interval", "1", "--max-gap", "1", "--duration", "4"])
        .args([
            "--otlp-endpoint",
            &col.endpoint("grpc"),
            "--otlp-protocol",
            "grpc",
        ]);
    let mut agent = Child::spawn_cmd(cmd);
    agent.wait_for_stderr_line(
        &format!("map-probe: attached to PID {}", target.pid()),
        Duration::from_secs(10),
    );
    let status = agent.wait();
    agent.wait_for_stderr_line("map-probe: agent stopped", Duration::from_secs(5));
    let out = agent.output_so_far();
    assert!(status.success(), "{status}: {out:#?}");
    assert!(!out.iter().any(|l| l.contains("not watching")), "{out:#?}");
    let got = col.wait_for(Duration::from_secs(5), |o| {
        o.spans_named("map_probe.lock.contention")
            .any(|s| s.attrs["code.function.name"] == "main.hotPath")
    });
    assert!(
        got.spans_named("map_probe.lock.contention")
            .any(|s| s.attrs["code.function.name"] == "main.hotPath"),
        "sites exported under the unit's capabilities"
    );
}

/// `systemd-analyze verify` accepts the shipped unit (with ExecStart=
/// pointing at the binary under test).
#[test]
fn systemd_unit_is_valid() {
    let unit = std::fs::read_to_string(
        common::workspace_root().join("contrib/systemd/map-probe-agent.service"),
    )
    .unwrap();
    let unit = unit.replace(
        "/usr/local/bin/map-probe",
        map_probe_bin().to_str().unwrap(),
    );
    let path = common::tmp("map-probe-agent.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (systemd) is installed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("map-probe-agent.service:"),
        "{}: {err}",
        out.status
    );
}
