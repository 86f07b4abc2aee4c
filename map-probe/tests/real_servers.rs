//! A real Go server no one here wrote, as the yardstick for map-probe's
//! concurrent-write alarms: Debian's caddy (Go 1.19.8, stripped, externally
//! linked) as a reverse proxy in front of its own file server, under wrk.
//! Go's race detector, on a `-race` build of the same caddy release from the
//! Go module proxy, is the referee: every overlap map-probe reports must be
//! on a map write the race detector also reports, by function.

mod common;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{free_port, require_root, tmp, workspace_root, Child};

const CADDY_VERSION: &str = "v2.6.2";
const DEBIAN_CADDY: &str = "/usr/bin/caddy";
const GO119: &str = "/usr/lib/go-1.19/bin/go";
/// Long enough for the race detector, which sees a race only when both
/// accesses fall within its history window, and for many map windows.
const LOAD_SECS: u64 = 60;

/// caddy at CADDY_VERSION built with Go 1.19 and -race, once (kept in target/).
fn race_caddy() -> PathBuf {
    let dir = workspace_root().join(format!("target/fixtures/caddy-{CADDY_VERSION}-race"));
    let bin = dir.join("caddy");
    if bin.is_file() {
        return bin;
    }
    let t = std::time::Instant::now();
    let out = Command::new(GO119)
        .args(["install", "-race"])
        .arg(format!(
            "github.com/caddyserver/caddy/v2/cmd/caddy@{CADDY_VERSION}"
        ))
        .env("GOBIN", &dir)
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "1")
        .env("GOFLAGS", "-mod=mod")
        .stdin(Stdio::null())
        .output()
        .expect("run go install");
    assert!(
        out.status.success(),
        "building caddy {CADDY_VERSION} -race failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "built {} in {:.0} s",
        bin.display(),
        t.elapsed().as_secs_f64()
    );
    bin
}

/// A Caddyfile: a reverse proxy on `front` to a file server on `back`.
fn caddyfile(name: &str, front: u16, back: u16) -> PathBuf {
    let www = tmp(&format!("{name}-www"));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "x".repeat(2048)).unwrap();
    let conf = tmp(&format!("{name}.Caddyfile"));
    std::fs::write(
        &conf,
        format!(
            "{{\n\tadmin off\n\tauto_https off\n}}\n:{front} {{\n\treverse_proxy 127.0.0.1:{back}\n}}\n:{back} {{\n\troot * {}\n\tfile_server\n}}\n",
            www.display()
        ),
    )
    .unwrap();
    conf
}

fn start_caddy(bin: &Path, conf: &Path, front: u16, env: &[(&str, &str)]) -> Child {
    let mut cmd = common::command(bin, &["run", "--adapter", "caddyfile", "--config"]);
    cmd.arg(conf);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let caddy = Child::spawn_cmd(cmd);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", front)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "caddy did not listen: {:?}",
            caddy.output_so_far()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    caddy
}

/// wrk -t2 -c128 against `port` for `secs`; returns requests/s.
fn load(port: u16, secs: u64) -> std::thread::JoinHandle<f64> {
    std::thread::spawn(move || {
        let out = Command::new("wrk")
            .args(["-t2", "-c128", &format!("-d{secs}s")])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .expect("run wrk");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no rate in wrk's output: {text}"))
    })
}

#[test]
fn caddy_overlaps_are_races_the_race_detector_sees() {
    require_root();
    assert!(
        Path::new(DEBIAN_CADDY).is_file(),
        "Debian's caddy is missing: run `cargo xtask setup`"
    );

    // The referee: the race build under the same config and load.
    let race_bin = race_caddy();
    let (front, back) = (free_port(), free_port());
    let logs = tmp("caddy-race-logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).unwrap();
    let gorace = format!("halt_on_error=0 log_path={}/race", logs.display());
    let mut caddy = start_caddy(
        &race_bin,
        &caddyfile("caddy-race", front, back),
        front,
        &[("GORACE", &gorace)],
    );
    let race_rate = load(front, LOAD_SECS).join().unwrap();
    caddy.signal(libc::SIGTERM);
    caddy.wait();
    let mut report = String::new();
    for e in std::fs::read_dir(&logs).unwrap().flatten() {
        report.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    let theirs: HashSet<String> = common::race_write_sites(&report)
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    let races = report.matches("WARNING: DATA RACE").count();

    // map-probe on Debian's own build, same config and load, --budget 5.
    let (front, back) = (free_port(), free_port());
    let caddy = start_caddy(
        Path::new(DEBIAN_CADDY),
        &caddyfile("caddy-probed", front, back),
        front,
        &[],
    );
    let wrk = load(front, LOAD_SECS + 3);
    std::thread::sleep(Duration::from_secs(1));
    let (out, r) = common::attach_json(
        caddy.pid(),
        "caddy-probed",
        &[
            "--duration",
            &LOAD_SECS.to_string(),
            "--budget",
            "5",
            "--no-wait-time",
        ],
    );
    let probed_rate = wrk.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = &r["sampling"]["map_writes"];
    let mut ours = HashSet::new();
    for risk in r["risks"].as_array().unwrap() {
        for w in risk["writers"].as_array().unwrap() {
            ours.insert(w["function"].as_str().unwrap().to_string());
        }
    }
    eprintln!(
        "race build: {race_rate:.0} req/s, {races} race report(s), map writes named {theirs:?}; \
         Debian caddy under map-probe: {probed_rate:.0} req/s, {} writes watched in {} windows, \
         {} overlap candidates, overlaps named {ours:?}",
        m["raw_hits"], m["windows"], m["overlap_candidates"]
    );
    assert!(
        m["raw_hits"].as_u64().unwrap() > 5_000,
        "map-probe must have watched many writes: {m}"
    );
    assert!(
        ours.is_subset(&theirs),
        "map-probe reports overlaps the race detector does not see: {ours:?} vs {theirs:?}: {}",
        r["risks"]
    );
}

/// What planting costs must not grow with the binary: on Debian's caddy (887 lock call sites)
/// under load at the default budget, the steady tier's points are planted about once a run, and
/// a point that heats up re-plants only its group. Before, the steady tier was unplanted and
/// re-planted whole up to 9 times in 14 s (12,100 steady points planted in one run) and caddy's
/// p99 rose 28-41%.
#[test]
fn caddy_steady_points_are_planted_once() {
    require_root();
    assert!(
        Path::new(DEBIAN_CADDY).is_file(),
        "Debian's caddy is missing: run `cargo xtask setup`"
    );
    let (front, back) = (free_port(), free_port());
    let caddy = start_caddy(
        Path::new(DEBIAN_CADDY),
        &caddyfile("caddy-planting", front, back),
        front,
        &[],
    );
    let secs = 10;
    let wrk = load(front, secs + 3);
    std::thread::sleep(Duration::from_secs(1));
    let (out, r) = common::attach_json(
        caddy.pid(),
        "caddy-planting",
        &["--duration", &secs.to_string()],
    );
    wrk.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = &r["sampling"];
    let p = &s["planting"];
    // One full planting of every lock point's entry and ends.
    let once: u64 = r["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| u64::from(q["entry_offset"].is_u64()) + q["ret_offsets"].as_u64().unwrap_or(0))
        .sum();
    let steady = s["lock_tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == 0)
        .expect("a steady tier");
    eprintln!(
        "caddy: {} lock points ({once} uprobes once); planting {p}; steady tier {steady}",
        r["probes"].as_array().unwrap().len()
    );
    assert!(
        r["probes"].as_array().unwrap().len() >= 800,
        "caddy has ~887 lock sites: {}",
        r["probes"].as_array().unwrap().len()
    );
    let planted = p["steady_points_planted"].as_u64().unwrap();
    assert!(
        planted <= once + once / 2,
        "the steady tier was re-planted: {planted} points planted, {once} once: {p}"
    );
    assert_eq!(
        p["steady_points_removed"], p["steady_points_planted"],
        "every steady point planted is removed by the end: {p}"
    );
    assert!(
        steady["windows"].as_u64().unwrap() <= 2,
        "the steady tier closed and re-opened: {steady}"
    );
    assert!(
        steady["attached_secs"].as_f64().unwrap() >= 0.8 * s["elapsed_secs"].as_f64().unwrap(),
        "the steady tier was out for long: {steady}"
    );
}
