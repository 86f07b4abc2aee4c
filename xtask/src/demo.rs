//! `cargo xtask demo`: builds map-probe and the `contended` Go fixture, runs the fixture, attaches
//! map-probe to it for 10 s and leaves a flame graph and a JSON report in `target/demo/`.

use crate::util::{self, cmd, step};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The fixture stops by itself after this long, should xtask be killed before it can stop it.
const FIXTURE_SECONDS: u32 = 120;

pub fn run() -> Result<(), String> {
    util::require_root("cargo xtask demo")?;
    crate::setup::run()?;
    let probe = crate::build::build(&[])?;
    let root = util::repo_root();
    let out_dir = root.join("target/demo");
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;

    step("demo", "building fixtures/contended");
    let fixture = out_dir.join("contended");
    util::run(
        cmd(util::machine_go())
            .current_dir(root.join("fixtures"))
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=mod")
            .env("CGO_ENABLED", "0")
            .args(["build", "-o"])
            .arg(&fixture)
            .arg("./contended"),
    )?;

    let guard = Fixture::start(&fixture)?;
    let pid = guard.pid;
    step(
        "demo",
        &format!("fixture running, pid {pid}; attaching map-probe for 10 s"),
    );
    let result = util::run(
        cmd(&probe)
            .current_dir(&out_dir)
            .arg("attach")
            .arg("--pid")
            .arg(pid.to_string())
            .args(["--duration", "10"])
            .args(["--flamegraph", "contention.svg"])
            .args(["--json", "contention.json"]),
    );
    drop(guard);
    result?;
    let svg = out_dir.join("contention.svg");
    if svg.is_file() {
        step("demo", &format!("flame graph: {}", svg.display()));
        step(
            "demo",
            &format!("report:      {}", out_dir.join("contention.json").display()),
        );
        Ok(())
    } else {
        Err(format!("map-probe finished but wrote no {}", svg.display()))
    }
}

/// The running fixture; stopped (SIGTERM, then SIGKILL) when dropped, on every exit path.
struct Fixture {
    child: Child,
    pid: u32,
}

impl Fixture {
    fn start(bin: &Path) -> Result<Fixture, String> {
        let child = cmd(bin)
            .args(["-duration", &format!("{FIXTURE_SECONDS}s")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id();
        let mut fixture = Fixture { child, pid };
        let stdout = fixture.child.stdout.take().ok_or("no fixture stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("  [contended] {line}");
                if line.starts_with("ready pid=") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the fixture did not print `ready pid=` within 10 s".to_string())?;
        Ok(fixture)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = cmd("kill").args(["-TERM", &self.pid.to_string()]).status();
            for _ in 0..50 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        step("demo", "fixture stopped");
    }
}
