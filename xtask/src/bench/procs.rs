//! The bench's child processes (the service under load and map-probe) and their CPU time.
//!
//! Every child is owned by a guard that stops it when dropped, so an error anywhere stops them;
//! each child also gets SIGTERM from the kernel should xtask itself die (PR_SET_PDEATHSIG), and a
//! Ctrl-C reaches them directly (same process group; both exit cleanly on SIGINT).

use crate::util::cmd;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SIGTERM: i32 = 15;
const PR_SET_PDEATHSIG: i32 = 1;

extern "C" {
    fn prctl(option: i32, ...) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
}

/// Makes the kernel send SIGTERM to the child when xtask exits, however it exits.
pub fn die_with_parent(c: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        c.pre_exec(|| {
            prctl(PR_SET_PDEATHSIG, SIGTERM as std::ffi::c_ulong);
            Ok(())
        })
    }
}

fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: plain syscall on our own, not yet reaped, child.
        unsafe { kill(child.id() as i32, SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// The service under test; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Service {
    child: Child,
    pub pid: u32,
    pub addr: String,
    name: String,
}

impl Service {
    /// Starts `bin args` and waits for the stdout line `<ready_prefix><addr>`.
    pub fn start(
        bin: &Path,
        args: &[&str],
        ready_prefix: &'static str,
        name: &str,
    ) -> Result<Service, String> {
        let child = die_with_parent(cmd(bin).args(args))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id();
        let mut svc = Service {
            child,
            pid,
            addr: String::new(),
            name: name.to_string(),
        };
        let stdout = svc.child.stdout.take().ok_or("no service stdout")?;
        let (tx, rx) = mpsc::channel();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("  [{tag}] {line}");
                if let Some(addr) = line.strip_prefix(ready_prefix) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        svc.addr = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| format!("{name} did not print `{ready_prefix}<addr>` within 10 s"))?;
        Ok(svc)
    }

    /// Debian's caddy as the service (see `caddy`).
    pub fn caddy(dir: &Path) -> Result<Service, String> {
        let (child, addr) = super::caddy::start(dir)?;
        Ok(Service {
            pid: child.id(),
            child,
            addr,
            name: "caddy".into(),
        })
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
        crate::util::step("bench", &format!("{} stopped", self.name));
    }
}

/// A running map-probe; stopped (SIGTERM so it detaches, then SIGKILL) when dropped.
pub struct Agent {
    child: Child,
}

impl Agent {
    /// Starts `c` with stdout and stderr going to `log`.
    pub fn start(c: &mut Command, log: &Path) -> Result<Agent, String> {
        let f = std::fs::File::create(log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        let child = die_with_parent(c)
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|e| format!("cannot start map-probe: {e}"))?;
        Ok(Agent { child })
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for it to exit by itself, then stops it.
    pub fn finish(mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.exited() {
                return Ok(st);
            }
            if t0.elapsed() >= timeout {
                terminate(&mut self.child, Duration::from_secs(5));
                return Err(format!(
                    "map-probe did not exit within {:.0} s of its --duration; stopped it",
                    timeout.as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// Fields of /proc/<pid>/stat after the command name; index 0 is field 3 (state).
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// utime + stime of a process, in clock ticks (uprobe traps count as its stime).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(&pid.to_string())?;
    Some(f.get(11)? + f.get(12)?)
}

/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// cutime + cstime of xtask: CPU time of the children it has waited for, in clock ticks.
pub fn waited_children_ticks() -> u64 {
    stat_fields("self")
        .and_then(|f| Some(f.get(13)? + f.get(14)?))
        .unwrap_or(0)
}

/// Clock ticks per second (USER_HZ), 100 on Linux unless `getconf` says otherwise.
pub fn clock_ticks() -> f64 {
    crate::util::output(cmd("getconf").arg("CLK_TCK"))
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}
