//! Shared harness of the integration tests: building the Go fixtures in `fixtures/` with both
//! Go toolchains and in several link variants, running them, and finding map-probe.
//!
//! Use it with `mod common;` from a test file. `map_probe_bin()` reads
//! `env!("CARGO_BIN_EXE_map-probe")`, which works here because this file is compiled as part
//! of each integration test crate.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Which Go builds a fixture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GoToolchain {
    /// Debian's `golang-1.19-go`: `/usr/lib/go-1.19/bin/go`.
    Go119,
    /// The machine's `go` on PATH (Go 1.26).
    Go126,
    /// Go 1.27.4, the newest release, which the machine's `go` fetches from
    /// the Go module proxy (`cargo xtask setup` does it once).
    Go127,
    /// Another release the machine's `go` fetches (1.20-1.25), by minor.
    Release(u32),
}

/// The releases between Debian's 1.19 and the machine's 1.26, each minor's
/// latest patch: (minor, GOTOOLCHAIN, version prefix, tag).
const RELEASES: [(u32, &str, &str, &str); 6] = [
    (20, "go1.20.14", "go1.20", "go120"),
    (21, "go1.21.13", "go1.21", "go121"),
    (22, "go1.22.12", "go1.22", "go122"),
    (23, "go1.23.12", "go1.23", "go123"),
    (24, "go1.24.13", "go1.24", "go124"),
    (25, "go1.25.14", "go1.25", "go125"),
];

fn release(minor: u32) -> (u32, &'static str, &'static str, &'static str) {
    *RELEASES
        .iter()
        .find(|r| r.0 == minor)
        .unwrap_or_else(|| panic!("no Go 1.{minor} in the test releases"))
}

impl GoToolchain {
    pub const ALL: [GoToolchain; 2] = [GoToolchain::Go119, GoToolchain::Go126];

    /// Every release from 1.19 to the newest.
    pub fn every_release() -> Vec<GoToolchain> {
        let mut v = vec![GoToolchain::Go119];
        v.extend(RELEASES.iter().map(|r| GoToolchain::Release(r.0)));
        v.extend([GoToolchain::Go126, GoToolchain::Go127]);
        v
    }

    pub fn go_binary(self) -> PathBuf {
        match self {
            GoToolchain::Go119 => PathBuf::from("/usr/lib/go-1.19/bin/go"),
            GoToolchain::Go126 | GoToolchain::Go127 | GoToolchain::Release(_) => {
                which("go").unwrap_or_else(|| PathBuf::from("/usr/local/go/bin/go"))
            }
        }
    }

    /// What `GOTOOLCHAIN` must say for `go_binary()` to be this release.
    pub fn gotoolchain(self) -> &'static str {
        match self {
            GoToolchain::Go127 => "go1.27.4",
            GoToolchain::Release(m) => release(m).1,
            _ => "local",
        }
    }

    /// What `go version` reports for binaries it builds starts with this.
    pub fn version_prefix(self) -> &'static str {
        match self {
            GoToolchain::Go119 => "go1.19",
            GoToolchain::Go126 => "go1.26",
            GoToolchain::Go127 => "go1.27",
            GoToolchain::Release(m) => release(m).2,
        }
    }

    pub fn tag(self) -> &'static str {
        match self {
            GoToolchain::Go119 => "go119",
            GoToolchain::Go126 => "go126",
            GoToolchain::Go127 => "go127",
            GoToolchain::Release(m) => release(m).3,
        }
    }
}

/// How a fixture is linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Internal linker, static, with symbols (CGO_ENABLED=0).
    Plain,
    /// `-ldflags='-s -w'`: no `.symtab`, no DWARF.
    Stripped,
    /// `-buildmode=pie`.
    Pie,
    /// CGO_ENABLED=1 `-ldflags=-linkmode=external` (gcc links it).
    External,
    /// External linking and `-s -w`.
    ExternalStripped,
    /// `-race` (CGO_ENABLED=1): Go's race detector, a referee.
    Race,
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Variant::Plain,
        Variant::Stripped,
        Variant::Pie,
        Variant::External,
        Variant::ExternalStripped,
    ];

    pub fn tag(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Stripped => "stripped",
            Variant::Pie => "pie",
            Variant::External => "external",
            Variant::ExternalStripped => "external-stripped",
            Variant::Race => "race",
        }
    }
}

/// Runs the map-probe binary under test and collects its output.
pub fn map_probe(args: &[&str]) -> std::process::Output {
    Command::new(map_probe_bin())
        .args(args)
        .output()
        .expect("run map-probe")
}

/// Starts a fixture binary with `args` and waits for its `ready pid=` line.
pub fn start_fixture(bin: &Path, args: &[&str]) -> Child {
    let mut c = Child::spawn(bin, args);
    c.wait_for_line("ready pid=", Duration::from_secs(10));
    c
}

/// `map-probe attach --pid <pid> <args> --json <tmp/name.json>`: its output
/// and the JSON report it wrote (panics, showing stderr, if there is none).
pub fn attach_json(
    pid: u32,
    name: &str,
    args: &[&str],
) -> (std::process::Output, serde_json::Value) {
    let path = tmp(&format!("{name}.json"));
    let _ = std::fs::remove_file(&path);
    let pid = pid.to_string();
    let mut all = vec!["attach", "--pid", &pid];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", path.to_str().unwrap()]);
    let out = map_probe(&all);
    assert!(
        path.exists(),
        "{name}: no JSON report; map-probe said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = read_json(&path);
    (out, report)
}

/// A path under `target/test-out/` for a test's outputs (kept for a look afterwards).
pub fn tmp(name: &str) -> PathBuf {
    let dir = workspace_root().join("target/test-out");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The line of `fixtures/<fixture>/main.go` that ends with `marker` (a
/// comment the fixture puts on the line a test looks for).
pub fn marker_line(fixture: &str, marker: &str) -> u64 {
    u64::from(fixture_line(fixture, marker, |l| l.ends_with(marker)))
}

/// The number of the one line of `fixtures/<fixture>/main.go` that `pick` accepts.
pub fn fixture_line(fixture: &str, what: &str, pick: impl Fn(&str) -> bool) -> u32 {
    let src = std::fs::read_to_string(workspace_root().join(format!("fixtures/{fixture}/main.go")))
        .unwrap();
    let lines: Vec<usize> = src
        .lines()
        .enumerate()
        .filter(|(_, l)| pick(l.trim()))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{what} must be on exactly one line of {fixture}/main.go"
    );
    lines[0] as u32
}

/// The workspace root (the folder holding `fixtures/` and `target/`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The map-probe binary cargo built for this test run.
pub fn map_probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_map-probe"))
}

/// Panics with a clear message unless running as root (loading BPF needs it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test must run as root (it loads BPF programs); run `cargo xtask test` as root"
    );
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Builds `fixtures/<name>` with `go` in variant `v` (once per test process) into
/// `target/fixtures/<name>-<go>-<variant>` and returns the binary's path. Panics with the
/// compiler's output if the build fails.
pub fn go_fixture(name: &str, go: GoToolchain, v: Variant) -> PathBuf {
    type Built = HashMap<(String, GoToolchain, Variant), PathBuf>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    // Held while building: fixtures build one at a time, each at most once per process.
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&(name.to_string(), go, v)) {
        return p.clone();
    }
    let root = workspace_root();
    let out_dir = root.join("target/fixtures");
    std::fs::create_dir_all(&out_dir).expect("create target/fixtures");
    let out = out_dir.join(format!("{name}-{}-{}", go.tag(), v.tag()));
    // Build beside the final name, then rename: another test process may be using it.
    let tmp = out_dir.join(format!(
        ".{name}-{}-{}.{}",
        go.tag(),
        v.tag(),
        std::process::id()
    ));

    // A fixture too large to keep in the repository (manysites) has its
    // code written by its gen.go first.
    let dir = root.join("fixtures").join(name);
    if dir.join("gen.go").exists() && !dir.join("sites_gen.go").exists() {
        let mut gen = Command::new(GoToolchain::Go126.go_binary());
        gen.current_dir(&dir)
            .args(["run", "gen.go"])
            .stdin(Stdio::null());
        if std::env::var_os("HOME").is_none() && std::env::var_os("XDG_CACHE_HOME").is_none() {
            gen.env("GOCACHE", out_dir.join(".gocache"))
                .env("GOPATH", out_dir.join(".gopath"));
        }
        let res = gen.output().expect("run go run gen.go");
        assert!(
            res.status.success(),
            "generating fixture {name}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
    // A fixture with dependencies is a module of its own, built in its folder.
    let own_module = dir.join("go.mod").exists();
    let mut cmd = Command::new(go.go_binary());
    cmd.current_dir(if own_module {
        dir.clone()
    } else {
        root.join("fixtures")
    })
    .env("GOTOOLCHAIN", go.gotoolchain())
    .env("GOFLAGS", "-mod=mod")
    .stdin(Stdio::null());
    if std::env::var_os("HOME").is_none() && std::env::var_os("XDG_CACHE_HOME").is_none() {
        cmd.env("GOCACHE", out_dir.join(".gocache"))
            .env("GOPATH", out_dir.join(".gopath"));
    }
    cmd.args(["build", "-o"]).arg(&tmp);
    let external = matches!(
        v,
        Variant::External | Variant::ExternalStripped | Variant::Race
    );
    cmd.env("CGO_ENABLED", if external { "1" } else { "0" });
    match v {
        Variant::Plain => {}
        Variant::Stripped => {
            cmd.arg("-ldflags=-s -w");
        }
        Variant::Pie => {
            cmd.arg("-buildmode=pie");
        }
        Variant::External => {
            cmd.arg("-ldflags=-linkmode=external");
        }
        Variant::ExternalStripped => {
            cmd.arg("-ldflags=-linkmode=external -s -w");
        }
        Variant::Race => {
            cmd.arg("-race");
        }
    }
    cmd.arg(if own_module {
        ".".to_string()
    } else {
        format!("./{name}")
    });
    let t0 = Instant::now();
    let res = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", go.go_binary().display()));
    assert!(
        res.status.success(),
        "building fixture {name} ({go:?}, {v:?}) failed: {}\n{}",
        res.status,
        String::from_utf8_lossy(&res.stderr)
    );
    std::fs::rename(&tmp, &out).expect("move fixture binary into place");
    eprintln!(
        "built {} in {:.1}s",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    built.insert((name.to_string(), go, v), out.clone());
    out
}

/// `go version <bin>` as reported by `go`: e.g. "go1.19.8".
pub fn go_version_of(go: GoToolchain, bin: &Path) -> String {
    let out = Command::new(go.go_binary())
        .arg("version")
        .arg(bin)
        .env("GOTOOLCHAIN", go.gotoolchain())
        .output()
        .expect("run go version");
    assert!(out.status.success(), "go version {} failed", bin.display());
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find(|w| w.starts_with("go1"))
        .unwrap_or_else(|| panic!("no version in `{text}`"))
        .to_string()
}

/// A `Command` for `prog args...`, for `Child::spawn_cmd`.
pub fn command<S: AsRef<std::ffi::OsStr>>(
    prog: impl AsRef<std::ffi::OsStr>,
    args: &[S],
) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

/// A spawned program whose stdout and stderr are read line by line on threads. Dropping it
/// kills (SIGKILL) and reaps it.
pub struct Child {
    child: std::process::Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
    status: Option<ExitStatus>,
}

impl Child {
    /// Starts `path args...` with piped stdout and stderr.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(path: impl AsRef<Path>, args: &[S]) -> Child {
        let mut cmd = Command::new(path.as_ref());
        cmd.args(args);
        Child::spawn_cmd(cmd)
    }

    /// Starts a prepared command (for extra env or a working directory); stdio is replaced.
    pub fn spawn_cmd(mut cmd: Command) -> Child {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stdout = reader(child.stdout.take().expect("stdout"), "", seen.clone());
        let stderr = reader(
            child.stderr.take().expect("stderr"),
            "[stderr] ",
            seen.clone(),
        );
        Child {
            child,
            stdout,
            stderr,
            seen,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line starting with `prefix` and returns it (whole); earlier lines
    /// are skipped. Panics on timeout or end of output, showing what was printed.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        wait_line(&self.stdout, prefix, timeout, &self.seen, "stdout")
    }

    /// Like `wait_for_line`, for stderr.
    pub fn wait_for_stderr_line(&mut self, prefix: &str, timeout: Duration) -> String {
        wait_line(&self.stderr, prefix, timeout, &self.seen, "stderr")
    }

    /// Every line printed so far (stderr lines start with "[stderr] ").
    pub fn output_so_far(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends signal `sig` (e.g. `libc::SIGUSR1`).
    pub fn signal(&self, sig: i32) {
        if self.status.is_some() {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Still running (not exited, not reaped)?
    pub fn running(&mut self) -> bool {
        self.wait_timeout(Duration::ZERO).is_none()
    }

    /// Waits (up to a minute) for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        self.wait_timeout(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("pid {} did not exit within 60 s", self.pid()))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status {
                return Some(s);
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn reader(
    stream: impl Read + Send + 'static,
    tag: &'static str,
    seen: Arc<Mutex<Vec<String>>>,
) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{tag}{line}"));
            if tx.send(line).is_err() {
                // Nobody listens any more; keep draining so the child never blocks.
                continue;
            }
        }
    });
    rx
}

fn wait_line(
    rx: &Receiver<String>,
    prefix: &str,
    timeout: Duration,
    seen: &Mutex<Vec<String>>,
    which: &str,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with(prefix) => return line,
            Ok(_) => continue,
            Err(e) => {
                let why = match e {
                    RecvTimeoutError::Timeout => format!("not within {timeout:?}"),
                    RecvTimeoutError::Disconnected => "the output ended".to_string(),
                };
                let out = seen.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
                panic!("no {which} line starting with `{prefix}`: {why}; output so far:\n{out}");
            }
        }
    }
}

/// The user frames a race report names for racing map writes: in each access
/// (`Write at ...` and the frames below it), a `runtime.mapassign*`,
/// `mapdelete*` or `mapclear` frame, then the first frame outside the
/// runtime with its `file:line` on the next line. Racing reads (`len(m)`)
/// are left out: map-probe watches writes.
pub fn race_write_sites(report: &str) -> std::collections::HashSet<(String, u64)> {
    let mut sites = std::collections::HashSet::new();
    let lines: Vec<&str> = report.lines().collect();
    let mut in_access = false;
    let mut via_map_write = false;
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim();
        if t.contains(" at 0x") && t.contains(" by ") {
            in_access = true;
            via_map_write = false;
            continue;
        }
        if !in_access || !t.ends_with("()") {
            continue;
        }
        let func = t.trim_end_matches("()");
        if ["runtime.mapassign", "runtime.mapdelete", "runtime.mapclear"]
            .iter()
            .any(|p| func.starts_with(p))
        {
            via_map_write = true;
        } else if !func.starts_with("runtime.") && !func.starts_with("internal/") {
            let loc = lines.get(i + 1).map(|s| s.trim()).unwrap_or("");
            let line = loc
                .split_whitespace()
                .next()
                .and_then(|fl| fl.rsplit(':').next())
                .and_then(|n| n.parse().ok());
            if let (true, Some(line)) = (via_map_write, line) {
                sites.insert((func.to_string(), line));
            }
            in_access = false;
        }
    }
    sites
}

/// The pinned OpenTelemetry Collector that `cargo xtask setup` builds (see
/// `xtask/src/otelcol.rs`): `$CARGO_HOME/map-probe-otelcol/0.161.0/otelcol-map-probe`.
pub fn otelcol_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    let bin = home.join("map-probe-otelcol/0.161.0/otelcol-map-probe");
    assert!(
        bin.is_file(),
        "no collector at {}: run `cargo xtask setup`",
        bin.display()
    );
    bin
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A real OpenTelemetry Collector with an OTLP receiver (gRPC and HTTP on
/// free ports) and a file exporter, in its own folder under
/// `target/test-out/`. What it received is read back as OTLP/JSON lines.
/// Dropping it stops it.
pub struct Collector {
    pub grpc_port: u16,
    pub http_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Started with `--feature-gates=service.profilesSupport` and a
    /// profiles pipeline into the same file.
    profiles: bool,
}

impl Collector {
    pub fn start(name: &str) -> Collector {
        Collector::start_with(name, false)
    }

    /// With the (development) profiles signal accepted and written too.
    pub fn start_with_profiles(name: &str) -> Collector {
        Collector::start_with(name, true)
    }

    fn start_with(name: &str, profiles: bool) -> Collector {
        let dir = tmp(&format!("otelcol-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Collector {
            grpc_port: free_port(),
            http_port: free_port(),
            dir,
            child: None,
            profiles,
        };
        let profiles_pipeline = if profiles {
            "    profiles:\n      receivers: [otlp]\n      exporters: [file]\n"
        } else {
            ""
        };
        let config = format!(
            "receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc}
      http:
        endpoint: 127.0.0.1:{http}
exporters:
  file:
    path: {out}
    flush_interval: 100ms
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [file]
    metrics:
      receivers: [otlp]
      exporters: [file]
{profiles_pipeline}",
            grpc = c.grpc_port,
            http = c.http_port,
            out = c.out_path().display()
        );
        std::fs::write(c.dir.join("config.yaml"), config).unwrap();
        c.restart();
        c
    }

    fn out_path(&self) -> PathBuf {
        self.dir.join("received.jsonl")
    }

    /// Starts it (again, on the same ports and file) and waits until both
    /// receivers accept connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "collector already running");
        let mut args = vec![format!(
            "--config={}",
            self.dir.join("config.yaml").display()
        )];
        if self.profiles {
            args.push("--feature-gates=service.profilesSupport".into());
        }
        let child = Child::spawn(otelcol_bin(), &args);
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in [self.grpc_port, self.http_port] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                let c = self.child.as_mut().unwrap();
                assert!(
                    c.running() && Instant::now() < deadline,
                    "collector did not start listening on {port}:\n{}",
                    c.output_so_far().join("\n")
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Stops it (SIGTERM, then waits): the file exporter flushes first.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.signal(libc::SIGTERM);
            c.wait();
        }
    }

    /// The endpoint URL for `--otlp-endpoint`: gRPC or HTTP by `protocol`.
    pub fn endpoint(&self, protocol: &str) -> String {
        let port = if protocol == "grpc" {
            self.grpc_port
        } else {
            self.http_port
        };
        format!("http://127.0.0.1:{port}")
    }

    /// Every OTLP/JSON line the file exporter wrote so far.
    pub fn received(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.out_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls `received()` until `done` accepts it, up to `timeout`; returns
    /// the last view either way.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&Otlp) -> bool) -> Otlp {
        let deadline = Instant::now() + timeout;
        loop {
            let got = Otlp::from_lines(&self.received());
            if done(&got) || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a collector received, flattened: spans and metric data points, each
/// with its resource's attributes (OTLP/JSON values made plain JSON).
#[derive(Debug, Default, Clone)]
pub struct Otlp {
    pub spans: Vec<OtlpItem>,
    /// One per data point: `item["name"]`, `["unit"]`, `["kind"]` (sum,
    /// histogram, gauge), `["monotonic"]`, `["point"]`.
    pub points: Vec<OtlpItem>,
}

#[derive(Debug, Clone)]
pub struct OtlpItem {
    pub resource: HashMap<String, serde_json::Value>,
    /// For spans the OTLP/JSON span with `attrs` added (plain attributes).
    pub item: serde_json::Value,
    pub attrs: HashMap<String, serde_json::Value>,
}

/// An OTLP/JSON attribute list as a plain map (`intValue` strings become numbers).
pub fn otlp_attrs(list: &serde_json::Value) -> HashMap<String, serde_json::Value> {
    let mut out = HashMap::new();
    for kv in list.as_array().into_iter().flatten() {
        let key = kv["key"].as_str().unwrap_or_default().to_string();
        let v = &kv["value"];
        let plain = if let Some(s) = v.get("stringValue") {
            s.clone()
        } else if let Some(i) = v.get("intValue") {
            let n: i64 = i
                .as_str()
                .map(|s| s.parse().unwrap())
                .unwrap_or_else(|| i.as_i64().unwrap());
            serde_json::Value::from(n)
        } else if let Some(b) = v.get("boolValue") {
            b.clone()
        } else if let Some(d) = v.get("doubleValue") {
            d.clone()
        } else {
            v.clone()
        };
        out.insert(key, plain);
    }
    out
}

impl Otlp {
    pub fn from_lines(lines: &[serde_json::Value]) -> Otlp {
        let mut o = Otlp::default();
        for l in lines {
            for rs in l["resourceSpans"].as_array().into_iter().flatten() {
                let res = otlp_attrs(&rs["resource"]["attributes"]);
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for s in ss["spans"].as_array().into_iter().flatten() {
                        o.spans.push(OtlpItem {
                            resource: res.clone(),
                            attrs: otlp_attrs(&s["attributes"]),
                            item: s.clone(),
                        });
                    }
                }
            }
            for rm in l["resourceMetrics"].as_array().into_iter().flatten() {
                let res = otlp_attrs(&rm["resource"]["attributes"]);
                for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                    for m in sm["metrics"].as_array().into_iter().flatten() {
                        for kind in ["sum", "histogram", "gauge"] {
                            let Some(data) = m.get(kind) else { continue };
                            for p in data["dataPoints"].as_array().into_iter().flatten() {
                                o.points.push(OtlpItem {
                                    resource: res.clone(),
                                    attrs: otlp_attrs(&p["attributes"]),
                                    item: serde_json::json!({
                                        "name": m["name"],
                                        "unit": m["unit"],
                                        "kind": kind,
                                        "monotonic": data["isMonotonic"],
                                        "temporality": data["aggregationTemporality"],
                                        "point": p,
                                    }),
                                });
                            }
                        }
                    }
                }
            }
        }
        o
    }

    pub fn spans_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a OtlpItem> + 'a {
        self.spans.iter().filter(move |s| s.item["name"] == name)
    }

    pub fn points_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a OtlpItem> + 'a {
        self.points.iter().filter(move |p| p.item["name"] == name)
    }
}

/// A fixture started with `-mutexprofile FILE` writes Go's mutex profile to FILE.1, FILE.2, ...
/// on each SIGUSR1 and prints `profile FILE.N`. Snapshots taken just before and after an attach
/// and subtracted are Go's count over the same window.
pub struct MutexSnapshots {
    file: PathBuf,
    taken: usize,
}

impl MutexSnapshots {
    /// Starts `bin` with `-duration 0 -mutexprofile <tmp/name.prof>`.
    pub fn start(bin: &Path, name: &str) -> (Child, MutexSnapshots) {
        let file = tmp(&format!("{name}.prof"));
        let fx = start_fixture(
            bin,
            &["-duration", "0", "-mutexprofile", file.to_str().unwrap()],
        );
        (fx, MutexSnapshots { file, taken: 0 })
    }

    pub fn take(&mut self, fx: &mut Child) -> Vec<GoContention> {
        self.taken += 1;
        fx.signal(libc::SIGUSR1);
        let path = format!("{}.{}", self.file.display(), self.taken);
        fx.wait_for_line(&format!("profile {path}"), Duration::from_secs(10));
        go_mutex_profile(&std::fs::read_to_string(&path).unwrap())
    }
}

/// One function's contention in a Go mutex profile.
#[derive(Debug, Clone)]
pub struct GoContention {
    pub function: String,
    pub count: u64,
    pub delay_ns: u64,
}

/// The functions of a text (debug=1) mutex profile, by contention delay,
/// largest first. Each record is `cycles count @ pcs` followed by
/// `#\tpc\tfunc+off\tfile:line` lines; the record's function is its first
/// frame outside sync and runtime. Cycles become ns by the header's
/// `cycles/second`.
pub fn go_mutex_profile(text: &str) -> Vec<GoContention> {
    let per_sec: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("cycles/second="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1e9);
    let mut by_fn: Vec<(String, u64, u64)> = Vec::new();
    let (mut cycles, mut count) = (0u64, 0u64);
    let mut open = false;
    for line in text.lines() {
        if line.contains(" @ ") && !line.starts_with('#') {
            let mut w = line.split_whitespace();
            cycles = w.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            count = w.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            open = true;
        } else if open && line.starts_with("#\t") {
            let func = line
                .split('\t')
                .nth(2)
                .unwrap_or("")
                .split('+')
                .next()
                .unwrap_or("");
            if !(func.starts_with("sync.")
                || func.starts_with("internal/sync.")
                || func.starts_with("runtime."))
            {
                match by_fn.iter_mut().find(|(f, _, _)| f == func) {
                    Some(e) => {
                        e.1 += cycles;
                        e.2 += count;
                    }
                    None => by_fn.push((func.to_string(), cycles, count)),
                }
                open = false;
            }
        }
    }
    by_fn.sort_by_key(|e| std::cmp::Reverse(e.1));
    by_fn
        .into_iter()
        .map(|(function, cycles, count)| GoContention {
            function,
            count,
            delay_ns: (cycles as f64 / per_sec * 1e9) as u64,
        })
        .collect()
}
