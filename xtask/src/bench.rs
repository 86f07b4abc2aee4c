//! `cargo xtask bench`: what map-probe costs a loaded Go service.
//!
//! Runs a service-like Go fixture under wrk and alternates *detached* phases (no map-probe) with
//! *attached* phases (`map-probe attach --pid P` with the chosen budget), several pairs in one
//! run, in ABBA order (D A, A D, D A, ...) so slow drift of the machine cancels out. Per phase it
//! measures wrk's requests/s and p99 latency and the service's CPU time per request (utime+stime
//! from /proc, which includes the uprobe traps), and for attached phases map-probe's sampling
//! (attached share, windows, raw hits) and its own CPU time. It prints a table, the medians per
//! mode and the attached/detached ratios, and a verdict against the limits (throughput -3%, p99 +5%; aim: 2%), and writes
//! the same to `target/bench/bench-<mode>-<timestamp>.json`. It is a measurement, not a test: it
//! exits 0 whatever the verdict, and non-zero only when it could not measure.
//!
//! Modes (`--mode`) are rows of [`MODES`]: the fixture, how to load it and extra map-probe
//! arguments: `lock` loads the shared-cache endpoint (lock contention), `map` the map-heavy
//! session endpoint (map-write probes); both attach with map-probe's default probes.

mod agent;
mod caddy;
mod collector;
mod json;
mod procs;
mod stats;
mod wrk;

use crate::util::{self, cmd, step};
use json::J;
use procs::{Agent, Service};
use stats::{median, median_interval, pct, ratio_interval};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the default probes may cost the service, in percent: throughput and p99 (the
/// medians over the pairs)...
const RPS_LIMIT_PCT: f64 = 3.0;
const P99_LIMIT_PCT: f64 = 5.0;
/// ...and what we aim for on both.
const AIM_PCT: f64 = 2.0;

/// One kind of benchmark: a fixture, its load, and what map-probe attaches with.
struct Mode {
    name: &'static str,
    about: &'static str,
    /// Go package under `fixtures/`.
    fixture: &'static str,
    fixture_args: &'static [&'static str],
    /// The fixture prints `<ready_prefix><host:port>` on stdout once it serves.
    ready_prefix: &'static str,
    /// The URL path wrk is pointed at (the script may override it per request).
    url_path: &'static str,
    /// wrk Lua script under `xtask/bench/`, and its arguments (after `--`).
    script: &'static str,
    script_args: &'static [&'static str],
    /// Extra `map-probe attach` arguments for this mode.
    probe_args: &'static [&'static str],
    /// Debian's caddy instead of a fixture (see `caddy`).
    caddy: bool,
}

const MODES: &[Mode] = &[Mode {
    name: "lock",
    about: "default probes on fixtures/httpcache /item (HTTP service, one mutex-guarded shared cache)",
    fixture: "httpcache",
    fixture_args: &["-addr", "127.0.0.1:0", "-keys", "64"],
    ready_prefix: "listening ",
    url_path: "/item",
    script: "httpcache.lua",
    script_args: &["64"],
    probe_args: &[],
    caddy: false,
}, Mode {
    name: "map",
    about: "default probes on fixtures/httpcache /session (some twenty plain-map writes per request)",
    fixture: "httpcache",
    fixture_args: &["-addr", "127.0.0.1:0"],
    ready_prefix: "listening ",
    url_path: "/session",
    script: "session.lua",
    script_args: &[],
    probe_args: &[],
    caddy: false,
}, Mode {
    name: "cas",
    about: "default probes on fixtures/casservice /hit (HTTP service whose statistics are CAS loops: CAS probes in scope)",
    fixture: "casservice",
    fixture_args: &["-addr", "127.0.0.1:0"],
    ready_prefix: "listening ",
    url_path: "/hit",
    script: "cas.lua",
    script_args: &[],
    probe_args: &[],
    caddy: false,
}, Mode {
    name: "caddy",
    about: "default probes on Debian's caddy (/usr/bin/caddy: Go 1.19, stripped, externally linked, \
            887 lock call sites) as a reverse proxy to its own file server",
    fixture: "caddy",
    fixture_args: &[],
    ready_prefix: "",
    url_path: "/index.html",
    script: "",
    script_args: &[],
    probe_args: &[],
    caddy: true,
}];

const USAGE: &str = "usage: cargo xtask bench [options]

Alternates detached and attached (map-probe) phases of a wrk-loaded Go service, in ABBA order,
and compares throughput, p99 latency and the service's CPU time per request (medians).

options:
  --mode NAME        what to bench (default lock; see below)
  --pairs N          detached/attached phase pairs (default 20)
  --phase SECS       length of one phase, whole seconds (default 8)
  --budget PCT       map-probe --budget: % of one CPU the probes may cost (default 0.5, its
                     default; `unlimited` keeps the probes attached all the time)
  --go VERSION|PATH  Go to build the fixture with: the machine's (default), 1.19
                     (/usr/lib/go-1.19/bin/go) or a path to a go binary
  --warmup SECS      load before the first phase (default 3)
  --threads N        wrk threads (default 2)
  --connections N    wrk connections (default 256: enough to keep the cache lock contended;
                     128 for caddy)
  --settle SECS      pause before each phase's load; map-probe attaches in it (default 1: the
                     load starts one second after attach, so attaching is measured too)
  --export           attached phases export over OTLP/gRPC to the pinned collector (default in
                     caddy mode; --no-export to turn it off)
  --steady SECS      then one attached phase of SECS under load, for map-probe's own CPU in
                     steady state (default 60 in caddy mode, 0 otherwise)
  --no-build         skip setup and the map-probe build (use target/release/map-probe as is)
  -- ARGS...         more `map-probe attach` arguments, e.g. -- --window-ms 2000 --hit-cost-us 30

`--mode agent` is a run of its own (see `cargo xtask bench --mode agent --help`): the agent over
several loaded targets for ten minutes, its own CPU and RSS, and the targets' cost.

modes:";

struct Opts {
    mode: &'static Mode,
    pairs: u32,
    phase: u64,
    budget: String,
    go: Option<String>,
    warmup: u64,
    threads: u32,
    connections: u32,
    settle: f64,
    build: bool,
    /// Extra `map-probe attach` arguments from the command line (after `--`).
    probe_extra: Vec<String>,
    /// Attached phases export to the pinned collector (default: caddy mode only).
    export: Option<bool>,
    /// One more attached phase this long at the end, for map-probe's own CPU in steady state
    /// (default: 60 s in caddy mode, none otherwise).
    steady: Option<u64>,
}

impl Opts {
    fn export(&self) -> bool {
        self.export.unwrap_or(self.mode.caddy)
    }

    fn steady(&self) -> u64 {
        self.steady.unwrap_or(if self.mode.caddy { 60 } else { 0 })
    }
}

fn usage() -> String {
    let mut s = USAGE.to_string();
    for m in MODES {
        s.push_str(&format!("\n  {:<18} {}", m.name, m.about));
    }
    s
}

fn parse_opts(args: &[String]) -> Result<Option<Opts>, String> {
    let mut o = Opts {
        mode: &MODES[0],
        pairs: 20,
        phase: 8,
        budget: "0.5".into(),
        go: None,
        warmup: 3,
        threads: 2,
        connections: 0,
        settle: 1.0,
        build: true,
        probe_extra: Vec::new(),
        export: None,
        steady: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{flag}: `{v}` is not a valid number"))
        }
        match flag {
            "-h" | "--help" => return Ok(None),
            "--" => {
                o.probe_extra = it.by_ref().cloned().collect();
                break;
            }
            "--mode" => {
                let v = value()?;
                o.mode = MODES.iter().find(|m| m.name == v).ok_or_else(|| {
                    let names: Vec<_> = MODES.iter().map(|m| m.name).collect();
                    format!("unknown mode `{v}` (known: {})", names.join(", "))
                })?;
            }
            "--pairs" => o.pairs = num(flag, value()?)?,
            "--phase" => o.phase = num(flag, value()?)?,
            "--budget" => {
                let v = value()?;
                if v != "unlimited" {
                    let b: f64 = num(flag, v.clone())?;
                    if !(b > 0.0 && b <= 100.0) {
                        return Err("--budget is a percentage in (0, 100], or `unlimited`".into());
                    }
                }
                o.budget = v;
            }
            "--go" => o.go = Some(value()?),
            "--warmup" => o.warmup = num(flag, value()?)?,
            "--threads" => o.threads = num(flag, value()?)?,
            "--connections" => o.connections = num(flag, value()?)?,
            "--settle" => o.settle = num(flag, value()?)?,
            "--no-build" => o.build = false,
            "--export" => o.export = Some(true),
            "--no-export" => o.export = Some(false),
            "--steady" => o.steady = Some(num(flag, value()?)?),
            other => return Err(format!("unknown option `{other}`\n{}", usage())),
        }
    }
    if o.connections == 0 {
        // caddy as the issue measured it; the fixtures need more to keep their lock contended.
        o.connections = if o.mode.caddy { 128 } else { 256 };
    }
    if o.pairs == 0 || o.phase == 0 || o.threads == 0 || o.connections < o.threads {
        return Err(
            "--pairs, --phase and --threads must be > 0, --connections >= --threads".into(),
        );
    }
    if !(0.0..=10.0).contains(&o.settle) {
        return Err("--settle must be between 0 and 10 seconds".into());
    }
    Ok(Some(o))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Detached,
    Attached,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Detached => "detached",
            Kind::Attached => "attached",
        }
    }
}

/// What map-probe reported for one attached phase.
struct Probe {
    elapsed_secs: f64,
    attached_secs: f64,
    windows: f64,
    raw_hits: f64,
    raw_ret_hits: f64,
    /// map-probe's own CPU time (user + system) over its whole run.
    agent_cpu_secs: f64,
    /// Spawn to exit, minus its observed time: loading, attaching, writing the report.
    overhead_secs: f64,
    /// map-probe's own CPU while observing (% of one CPU), and before (s), from its JSON.
    self_cpu_pct: f64,
    start_cpu_secs: f64,
    /// Points planted into the steady lock tier over the run.
    steady_planted: f64,
}

impl Probe {
    fn share(&self) -> f64 {
        if self.elapsed_secs > 0.0 {
            self.attached_secs / self.elapsed_secs
        } else {
            0.0
        }
    }
}

struct Phase {
    index: usize,
    pair: u32,
    kind: Kind,
    wrk: wrk::WrkResult,
    /// Service CPU time (utime+stime) over the load, in seconds.
    cpu_secs: f64,
    /// Wall time the CPU delta was taken over.
    wall_secs: f64,
    probe: Option<Probe>,
}

impl Phase {
    fn cpu_us_per_req(&self) -> f64 {
        self.cpu_secs * 1e6 / self.wrk.requests.max(1) as f64
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    if agent::wanted(args) {
        return agent::run(args);
    }
    let Some(o) = parse_opts(args)? else {
        println!("{}", usage());
        return Ok(());
    };
    util::require_root("cargo xtask bench")?;
    let root = util::repo_root();
    let probe_bin = if o.build {
        crate::setup::run()?;
        crate::build::build(&[])?
    } else {
        let p = root.join("target/release/map-probe");
        if !p.is_file() {
            return Err(format!("--no-build: {} is missing", p.display()));
        }
        p
    };
    if util::which("wrk").is_none() {
        return Err("wrk is not installed (cargo xtask setup installs it)".into());
    }
    let out_dir = root.join("target/bench");
    let stamp = timestamp();
    let run_name = format!("bench-{}-{stamp}", o.mode.name);
    let run_dir = out_dir.join(&run_name);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;

    let (mut svc, go_version, script, t_run) = if o.mode.caddy {
        let t_run = Instant::now();
        (
            Service::caddy(&run_dir)?,
            "go1.19.8 (Debian)".to_string(),
            None,
            t_run,
        )
    } else {
        let (go, go_version) = resolve_go(o.go.as_deref())?;
        let fixture = out_dir.join(format!("{}-{go_version}", o.mode.fixture));
        step(
            "bench",
            &format!("building fixtures/{} with {go_version}", o.mode.fixture),
        );
        util::run(
            cmd(&go)
                .current_dir(root.join("fixtures"))
                .env("GOTOOLCHAIN", "local")
                .env("GOFLAGS", "-mod=mod")
                .env("CGO_ENABLED", "0")
                .args(["build", "-o"])
                .arg(&fixture)
                .arg(format!("./{}", o.mode.fixture)),
        )?;
        let script = root.join("xtask/bench").join(o.mode.script);
        if !script.is_file() {
            return Err(format!("wrk script {} is missing", script.display()));
        }
        let t_run = Instant::now();
        let svc = Service::start(
            &fixture,
            o.mode.fixture_args,
            o.mode.ready_prefix,
            o.mode.fixture,
        )?;
        (svc, go_version, Some(script), t_run)
    };
    let load = wrk::Load {
        threads: o.threads,
        connections: o.connections,
        url: format!("http://{}{}", svc.addr, o.mode.url_path),
        script: script.as_deref(),
        script_args: o.mode.script_args,
    };
    let collector = if o.export() {
        Some(collector::start(&run_dir)?)
    } else {
        None
    };
    let otlp = collector
        .as_ref()
        .map(|(_, port)| format!("http://127.0.0.1:{port}"));
    let total_phases = 2 * o.pairs as usize;
    step(
        "bench",
        &format!(
            "{} pid {} at {}; mode {}, budget {}%, {} pairs x 2 phases of {} s, wrk -t{} -c{}; \
             about {:.0} s",
            o.mode.fixture,
            svc.pid,
            svc.addr,
            o.mode.name,
            o.budget,
            o.pairs,
            o.phase,
            o.threads,
            o.connections,
            o.warmup as f64 + total_phases as f64 * (o.phase as f64 + o.settle + 0.8)
        ),
    );
    step("bench", &format!("warm-up {} s", o.warmup));
    if o.warmup > 0 {
        load.run(o.warmup)?;
    }

    let tick = procs::clock_ticks();
    let mut phases: Vec<Phase> = Vec::new();
    println!();
    println!("{}", header());
    for pair in 0..o.pairs {
        // ABBA: even pairs run detached first, odd pairs attached first.
        let order = if pair % 2 == 0 {
            [Kind::Detached, Kind::Attached]
        } else {
            [Kind::Attached, Kind::Detached]
        };
        for kind in order {
            if !svc.alive() {
                return Err(format!("{} exited during the bench", o.mode.fixture));
            }
            let index = phases.len() + 1;
            let ph = run_phase(
                &o,
                &probe_bin,
                &svc,
                &load,
                &run_dir,
                otlp.as_deref(),
                (index, pair + 1, o.phase),
                kind,
                tick,
            )?;
            println!("{}", row(&ph));
            phases.push(ph);
        }
    }
    let steady = if o.steady() > 0 && svc.alive() {
        step(
            "bench",
            &format!(
                "one attached phase of {} s for map-probe's own CPU",
                o.steady()
            ),
        );
        let ph = run_phase(
            &o,
            &probe_bin,
            &svc,
            &load,
            &run_dir,
            otlp.as_deref(),
            (phases.len() + 1, 0, o.steady()),
            Kind::Attached,
            tick,
        )?;
        println!("{}", row(&ph));
        ph.probe
    } else {
        None
    };
    let run_secs = t_run.elapsed().as_secs_f64();
    drop(svc);
    drop(collector);

    let summary = Summary::of(&phases);
    println!();
    summary.print(&o);
    if let Some(p) = &steady {
        println!(
            "  map-probe over a steady {:.0} s attached under load{}: {:.2}% of one CPU while \
             observing; {:.2} s of CPU to start (read the binary, find the points, measure the \
             trap, attach); {:.0} steady points planted",
            p.elapsed_secs,
            if otlp.is_some() { ", exporting" } else { "" },
            p.self_cpu_pct,
            p.start_cpu_secs,
            p.steady_planted,
        );
    }
    let verdict = summary.verdict();
    println!("{verdict}");

    let json_path = out_dir.join(format!("{run_name}.json"));
    let mut doc = document(
        &o,
        &go_version,
        &phases,
        &summary,
        &verdict,
        run_secs,
        &stamp,
    );
    if let (J::Obj(fields), Some(p)) = (&mut doc, &steady) {
        fields.push((
            "steady".into(),
            J::obj([
                ("elapsed_secs", J::Num(p.elapsed_secs)),
                ("self_cpu_pct_of_one_cpu", J::Num(p.self_cpu_pct)),
                ("start_cpu_secs", J::Num(p.start_cpu_secs)),
                ("steady_points_planted", J::Num(p.steady_planted)),
                ("exporting", J::Bool(otlp.is_some())),
            ]),
        ));
    }
    std::fs::write(&json_path, doc.render())
        .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
    step(
        "bench",
        &format!(
            "{:.0} s for the phases; results: {} (map-probe reports and logs in {})",
            run_secs,
            json_path.display(),
            run_dir.display()
        ),
    );
    Ok(())
}

/// One phase; `(index, pair, secs)` place and size it. An attached phase exports to `otlp`.
#[allow(clippy::too_many_arguments)]
fn run_phase(
    o: &Opts,
    probe_bin: &Path,
    svc: &Service,
    load: &wrk::Load,
    run_dir: &Path,
    otlp: Option<&str>,
    (index, pair, secs): (usize, u32, u64),
    kind: Kind,
    tick: f64,
) -> Result<Phase, String> {
    let settle = Duration::from_secs_f64(o.settle);
    let mut agent = None;
    let (json_path, log_path) = (
        run_dir.join(format!("phase-{index:02}-attached.json")),
        run_dir.join(format!("phase-{index:02}-attached.log")),
    );
    let spawned = Instant::now();
    if kind == Kind::Attached {
        // It observes for the phase plus 1 s: it attaches during the settle pause and is still
        // observing when the load stops.
        let mut c = cmd(probe_bin);
        c.arg("attach")
            .arg("--pid")
            .arg(svc.pid.to_string())
            .arg("--duration")
            .arg((secs + 1).to_string())
            .arg("--budget")
            .arg(&o.budget)
            .args(o.mode.probe_args)
            .args(&o.probe_extra)
            .arg("--json")
            .arg(&json_path);
        if let Some(url) = otlp {
            c.args(["--otlp-endpoint", url, "--otlp-protocol", "grpc"]);
        }
        agent = Some(Agent::start(&mut c, &log_path)?);
    }
    std::thread::sleep(settle);
    if let Some(a) = agent.as_mut() {
        if let Some(st) = a.exited() {
            return Err(format!(
                "map-probe exited before the load started ({st}):\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ));
        }
    }
    let c0 = procs::cpu_ticks(svc.pid).ok_or("cannot read the service's /proc stat")?;
    let t0 = Instant::now();
    let (w, _text) = load.run(secs)?;
    let wall = t0.elapsed().as_secs_f64();
    let c1 = procs::cpu_ticks(svc.pid).ok_or("cannot read the service's /proc stat")?;
    let mut probe = None;
    if let Some(a) = agent {
        let ch0 = procs::waited_children_ticks();
        let left = Duration::from_secs(secs + 1).saturating_sub(spawned.elapsed());
        let st = a.finish(left + Duration::from_secs(15))?;
        let total = spawned.elapsed().as_secs_f64();
        let ch1 = procs::waited_children_ticks();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !st.success() {
            return Err(format!("map-probe failed ({st}):\n{log}"));
        }
        let text = std::fs::read_to_string(&json_path)
            .map_err(|e| format!("map-probe wrote no {}: {e}", json_path.display()))?;
        let n = |k: &str| json::number_in(&text, "sampling", k);
        let elapsed_secs =
            n("elapsed_secs").ok_or("no sampling.elapsed_secs in map-probe's JSON")?;
        probe = Some(Probe {
            elapsed_secs,
            attached_secs: n("attached_secs").unwrap_or(0.0),
            windows: n("windows").unwrap_or(0.0),
            raw_hits: n("raw_hits").unwrap_or(0.0),
            raw_ret_hits: n("raw_ret_hits").unwrap_or(0.0),
            agent_cpu_secs: ch1.saturating_sub(ch0) as f64 / tick,
            overhead_secs: total - elapsed_secs,
            self_cpu_pct: json::number_in(&text, "self_cpu", "observing_percent")
                .unwrap_or(f64::NAN),
            start_cpu_secs: json::number_in(&text, "self_cpu", "start_secs").unwrap_or(f64::NAN),
            steady_planted: json::number_in(&text, "planting", "steady_points_planted")
                .unwrap_or(f64::NAN),
        });
    }
    Ok(Phase {
        index,
        pair,
        kind,
        wrk: w,
        cpu_secs: c1.saturating_sub(c0) as f64 / tick,
        wall_secs: wall,
        probe,
    })
}

fn header() -> String {
    format!(
        "{:>3} {:>4} {:<8} {:>9} {:>9} {:>9} {:>8} {:>5} {:>5} {:>8} {:>4} {:>9} {:>6}",
        "#",
        "pair",
        "mode",
        "req/s",
        "p99",
        "p50",
        "cpu/req",
        "cpus",
        "errs",
        "attached",
        "win",
        "raw hits",
        "agent"
    )
}

fn row(p: &Phase) -> String {
    let (share, win, hits, agent) = match &p.probe {
        Some(pr) => (
            format!("{:.1}%", pr.share() * 100.0),
            format!("{:.0}", pr.windows),
            format!("{:.0}", pr.raw_hits),
            format!("{:.2}s", pr.agent_cpu_secs),
        ),
        None => ("-".into(), "-".into(), "-".into(), "-".into()),
    };
    format!(
        "{:>3} {:>4} {:<8} {:>9.0} {:>9} {:>9} {:>6.2}us {:>5.2} {:>5} {:>8} {:>4} {:>9} {:>6}",
        p.index,
        p.pair,
        p.kind.name(),
        p.wrk.rps,
        fmt_us(p.wrk.p99_us),
        fmt_us(p.wrk.p50_us),
        p.cpu_us_per_req(),
        p.cpu_secs / p.wall_secs.max(1e-9),
        p.wrk.errors,
        share,
        win,
        hits,
        agent
    )
}

fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2}s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{us:.0}us")
    }
}

/// Medians of one mode's phases.
struct Medians {
    n: usize,
    rps: f64,
    p99_us: f64,
    p50_us: f64,
    cpu_us_per_req: f64,
    /// (max / min - 1) of req/s: how much the same phase varies on this machine.
    rps_spread_pct: f64,
    p99_spread_pct: f64,
}

impl Medians {
    fn of(ps: &[&Phase]) -> Medians {
        let m = |f: &dyn Fn(&Phase) -> f64| median(ps.iter().map(|p| f(p)).collect());
        let spread = |f: &dyn Fn(&Phase) -> f64| {
            let v: Vec<f64> = ps.iter().map(|p| f(p)).collect();
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(0.0, f64::max);
            pct(hi, lo)
        };
        Medians {
            n: ps.len(),
            rps: m(&|p| p.wrk.rps).unwrap_or(f64::NAN),
            p99_us: m(&|p| p.wrk.p99_us).unwrap_or(f64::NAN),
            p50_us: m(&|p| p.wrk.p50_us).unwrap_or(f64::NAN),
            cpu_us_per_req: m(&|p| p.cpu_us_per_req()).unwrap_or(f64::NAN),
            rps_spread_pct: spread(&|p| p.wrk.rps),
            p99_spread_pct: spread(&|p| p.wrk.p99_us),
        }
    }

    fn json(&self) -> J {
        J::obj([
            ("phases", J::Num(self.n as f64)),
            ("rps", J::Num(self.rps)),
            ("p99_us", J::Num(self.p99_us)),
            ("p50_us", J::Num(self.p50_us)),
            ("cpu_us_per_req", J::Num(self.cpu_us_per_req)),
            ("rps_spread_pct", J::Num(self.rps_spread_pct)),
            ("p99_spread_pct", J::Num(self.p99_spread_pct)),
        ])
    }
}

/// Attached against detached, in percent, with the bootstrap 95% intervals of the two that
/// have limits.
struct Ratios {
    rps: f64,
    p99: f64,
    p50: f64,
    cpu_per_req: f64,
    rps_ci: Option<(f64, f64)>,
    p99_ci: Option<(f64, f64)>,
}

fn ci_json(ci: Option<(f64, f64)>) -> J {
    ci.map_or(J::Null, |(lo, hi)| J::Arr(vec![J::Num(lo), J::Num(hi)]))
}

fn ci_text(ci: Option<(f64, f64)>) -> String {
    ci.map_or(String::new(), |(lo, hi)| format!(" [{lo:+.1}, {hi:+.1}]"))
}

impl Ratios {
    fn json(&self) -> J {
        J::obj([
            ("throughput_pct", J::Num(self.rps)),
            ("throughput_pct_ci95", ci_json(self.rps_ci)),
            ("p99_pct", J::Num(self.p99)),
            ("p99_pct_ci95", ci_json(self.p99_ci)),
            ("p50_pct", J::Num(self.p50)),
            ("cpu_per_req_pct", J::Num(self.cpu_per_req)),
        ])
    }

    fn line(&self) -> String {
        format!(
            "throughput {:+.1}%{}, p99 {:+.1}%{}, cpu/req {:+.1}% (p50 {:+.1}%)",
            self.rps,
            ci_text(self.rps_ci),
            self.p99,
            ci_text(self.p99_ci),
            self.cpu_per_req,
            self.p50
        )
    }
}

struct Summary {
    detached: Medians,
    attached: Medians,
    /// Ratio of the medians: the headline numbers.
    ratios: Ratios,
    /// Median over pairs of the within-pair ratio: less sensitive to drift between pairs.
    paired: Ratios,
    /// Medians over the attached phases of map-probe's sampling.
    share: Option<f64>,
    windows: Option<f64>,
    raw_hits_per_sec: Option<f64>,
    agent_cpu_pct: Option<f64>,
    overhead_secs: Option<f64>,
    self_cpu_pct: Option<f64>,
    start_cpu_secs: Option<f64>,
}

impl Summary {
    fn of(phases: &[Phase]) -> Summary {
        let of_kind = |k: Kind| phases.iter().filter(|p| p.kind == k).collect::<Vec<_>>();
        let (d, a) = (
            Medians::of(&of_kind(Kind::Detached)),
            Medians::of(&of_kind(Kind::Attached)),
        );
        let mut pairs: Vec<(&Phase, &Phase)> = Vec::new();
        for dp in phases.iter().filter(|p| p.kind == Kind::Detached) {
            if let Some(ap) = phases
                .iter()
                .find(|p| p.kind == Kind::Attached && p.pair == dp.pair)
            {
                pairs.push((dp, ap));
            }
        }
        let per_pair =
            |f: &dyn Fn(&Phase) -> f64| pairs.iter().map(|(d, a)| pct(f(a), f(d))).collect();
        let paired = |f: &dyn Fn(&Phase) -> f64| median(per_pair(f)).unwrap_or(f64::NAN);
        let values = |k: Kind, f: &dyn Fn(&Phase) -> f64| -> Vec<f64> {
            phases.iter().filter(|p| p.kind == k).map(f).collect()
        };
        let ratio_ci = |f: &dyn Fn(&Phase) -> f64| {
            ratio_interval(&values(Kind::Detached, f), &values(Kind::Attached, f))
        };
        let probes: Vec<&Probe> = phases.iter().filter_map(|p| p.probe.as_ref()).collect();
        let pm = |f: &dyn Fn(&Probe) -> f64| median(probes.iter().map(|p| f(p)).collect());
        Summary {
            ratios: Ratios {
                rps: pct(a.rps, d.rps),
                p99: pct(a.p99_us, d.p99_us),
                p50: pct(a.p50_us, d.p50_us),
                cpu_per_req: pct(a.cpu_us_per_req, d.cpu_us_per_req),
                rps_ci: ratio_ci(&|p| p.wrk.rps),
                p99_ci: ratio_ci(&|p| p.wrk.p99_us),
            },
            paired: Ratios {
                rps: paired(&|p| p.wrk.rps),
                p99: paired(&|p| p.wrk.p99_us),
                p50: paired(&|p| p.wrk.p50_us),
                cpu_per_req: paired(&|p| p.cpu_us_per_req()),
                rps_ci: median_interval(&per_pair(&|p| p.wrk.rps)),
                p99_ci: median_interval(&per_pair(&|p| p.wrk.p99_us)),
            },
            detached: d,
            attached: a,
            share: pm(&|p| p.share()),
            windows: pm(&|p| p.windows),
            raw_hits_per_sec: pm(&|p| p.raw_hits / p.attached_secs.max(1e-9)),
            agent_cpu_pct: pm(&|p| p.agent_cpu_secs / p.elapsed_secs.max(1e-9) * 100.0),
            overhead_secs: pm(&|p| p.overhead_secs),
            self_cpu_pct: pm(&|p| p.self_cpu_pct),
            start_cpu_secs: pm(&|p| p.start_cpu_secs),
        }
    }

    fn print(&self, o: &Opts) {
        println!(
            "medians ({} pairs, {} s phases, budget {}%):",
            o.pairs, o.phase, o.budget
        );
        for (name, m) in [("detached", &self.detached), ("attached", &self.attached)] {
            println!(
                "  {name}: {:>9.0} req/s  p99 {:>8}  p50 {:>8}  cpu/req {:.2}us   \
                 (req/s spread {:.0}%, p99 spread {:.0}%)",
                m.rps,
                fmt_us(m.p99_us),
                fmt_us(m.p50_us),
                m.cpu_us_per_req,
                m.rps_spread_pct,
                m.p99_spread_pct
            );
        }
        println!(
            "  attached vs detached (medians):       {}",
            self.ratios.line()
        );
        println!(
            "  attached vs detached (paired median): {}",
            self.paired.line()
        );
        if let (Some(s), Some(w), Some(h)) = (self.share, self.windows, self.raw_hits_per_sec) {
            println!(
                "  map-probe: probes attached {:.1}% of its run, {w:.0} window(s), {h:.0} raw hits/s \
                 while attached, own CPU {:.1}% of one CPU, {:.2} s to start and finish",
                s * 100.0,
                self.agent_cpu_pct.unwrap_or(f64::NAN),
                self.overhead_secs.unwrap_or(f64::NAN),
            );
            println!(
                "  map-probe's own CPU, from its JSON: {:.2}% of one CPU while observing, {:.2} s \
                 of CPU to start",
                self.self_cpu_pct.unwrap_or(f64::NAN),
                self.start_cpu_secs.unwrap_or(f64::NAN),
            );
        }
    }

    fn verdict(&self) -> String {
        let loss = -self.ratios.rps;
        let rise = self.ratios.p99;
        let noise = self.detached.rps_spread_pct;
        let worst = loss.max(rise);
        let head = if !worst.is_finite() {
            "verdict: NO RESULT (missing measurements)".to_string()
        } else if loss > RPS_LIMIT_PCT || rise > P99_LIMIT_PCT {
            "verdict: OVER the limits".to_string()
        } else if worst > AIM_PCT {
            format!("verdict: within the limits, above the {AIM_PCT}% aim")
        } else {
            format!("verdict: within the limits and the {AIM_PCT}% aim")
        };
        format!(
            "{head}: throughput {:+.1}%, p99 {:+.1}% (limits -{RPS_LIMIT_PCT}% / \
             +{P99_LIMIT_PCT}%; \
             paired: {:+.1}% / {:+.1}%); detached phases alone varied {noise:.0}% in req/s, \
             so smaller differences are noise",
            self.ratios.rps, self.ratios.p99, self.paired.rps, self.paired.p99
        )
    }
}

fn document(
    o: &Opts,
    go_version: &str,
    phases: &[Phase],
    s: &Summary,
    verdict: &str,
    run_secs: f64,
    stamp: &str,
) -> J {
    let commit = util::output(cmd("git").current_dir(util::repo_root()).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]))
    .unwrap_or_default();
    let phase_json = |p: &Phase| {
        J::obj([
            ("index", J::Num(p.index as f64)),
            ("pair", J::Num(p.pair as f64)),
            ("mode", J::str(p.kind.name())),
            ("requests", J::Num(p.wrk.requests as f64)),
            ("wrk_secs", J::Num(p.wrk.secs)),
            ("rps", J::Num(p.wrk.rps)),
            ("p99_us", J::Num(p.wrk.p99_us)),
            ("p50_us", J::Num(p.wrk.p50_us)),
            ("errors", J::Num(p.wrk.errors as f64)),
            ("cpu_secs", J::Num(p.cpu_secs)),
            ("cpu_us_per_req", J::Num(p.cpu_us_per_req())),
            ("cpus_used", J::Num(p.cpu_secs / p.wall_secs.max(1e-9))),
            (
                "map_probe",
                p.probe.as_ref().map_or(J::Null, |pr| {
                    J::obj([
                        ("elapsed_secs", J::Num(pr.elapsed_secs)),
                        ("attached_secs", J::Num(pr.attached_secs)),
                        ("attached_share", J::Num(pr.share())),
                        ("windows", J::Num(pr.windows)),
                        ("raw_hits", J::Num(pr.raw_hits)),
                        ("raw_ret_hits", J::Num(pr.raw_ret_hits)),
                        ("agent_cpu_secs", J::Num(pr.agent_cpu_secs)),
                        ("start_and_finish_secs", J::Num(pr.overhead_secs)),
                    ])
                }),
            ),
        ])
    };
    J::obj([
        ("timestamp", J::str(stamp)),
        ("commit", J::str(commit)),
        (
            "config",
            J::obj([
                ("mode", J::str(o.mode.name)),
                ("fixture", J::str(o.mode.fixture)),
                ("go", J::str(go_version)),
                ("pairs", J::Num(o.pairs as f64)),
                ("phase_secs", J::Num(o.phase as f64)),
                ("budget_pct", J::Num(o.budget.parse().unwrap_or(f64::NAN))),
                ("warmup_secs", J::Num(o.warmup as f64)),
                ("settle_secs", J::Num(o.settle)),
                ("wrk_threads", J::Num(o.threads as f64)),
                ("wrk_connections", J::Num(o.connections as f64)),
                (
                    "wrk_script",
                    J::str(format!("xtask/bench/{}", o.mode.script)),
                ),
                (
                    "map_probe_args",
                    J::Arr(
                        o.mode
                            .probe_args
                            .iter()
                            .map(|a| J::str(*a))
                            .chain(o.probe_extra.iter().map(|a| J::str(a.as_str())))
                            .collect(),
                    ),
                ),
                (
                    "cpus",
                    J::Num(std::thread::available_parallelism().map_or(0, |n| n.get()) as f64),
                ),
                (
                    "order",
                    J::str("ABBA: odd pairs detached first, even pairs attached first"),
                ),
            ]),
        ),
        ("phases", J::Arr(phases.iter().map(phase_json).collect())),
        (
            "medians",
            J::obj([
                ("detached", s.detached.json()),
                ("attached", s.attached.json()),
            ]),
        ),
        ("attached_vs_detached", s.ratios.json()),
        ("attached_vs_detached_paired", s.paired.json()),
        (
            "map_probe_medians",
            J::obj([
                ("attached_share", J::opt(s.share)),
                ("windows", J::opt(s.windows)),
                ("raw_hits_per_attached_sec", J::opt(s.raw_hits_per_sec)),
                ("agent_cpu_pct_of_one_cpu", J::opt(s.agent_cpu_pct)),
                ("self_cpu_pct_while_observing", J::opt(s.self_cpu_pct)),
                ("start_cpu_secs", J::opt(s.start_cpu_secs)),
            ]),
        ),
        ("throughput_limit_pct", J::Num(RPS_LIMIT_PCT)),
        ("p99_limit_pct", J::Num(P99_LIMIT_PCT)),
        ("aim_pct", J::Num(AIM_PCT)),
        (
            "within_limit",
            J::Bool(-s.ratios.rps <= RPS_LIMIT_PCT && s.ratios.p99 <= P99_LIMIT_PCT),
        ),
        ("verdict", J::str(verdict)),
        ("run_secs", J::Num(run_secs)),
    ])
}

/// The Go to build the fixture with, and its version (`go1.26.8`).
fn resolve_go(want: Option<&str>) -> Result<(PathBuf, String), String> {
    let go = match want {
        None | Some("machine") | Some("default") => util::machine_go(),
        Some("1.19") => PathBuf::from(crate::setup::GO119),
        Some(p) if p.contains('/') => PathBuf::from(p),
        Some(v) => {
            return Err(format!(
                "--go {v}: use 1.19, machine, or a path to a go binary"
            ))
        }
    };
    let version = util::output(
        cmd(&go)
            .env("GOTOOLCHAIN", "local")
            .args(["env", "GOVERSION"]),
    )
    .filter(|v| v.starts_with("go"))
    .ok_or_else(|| format!("{} does not run (`go env GOVERSION` failed)", go.display()))?;
    Ok((go, version))
}

/// UTC `YYYYmmdd-HHMMSS`, from the system clock (std has no calendar).
fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let a: Vec<String> = [
            "--pairs",
            "3",
            "--phase=5",
            "--budget",
            "unlimited",
            "--go",
            "1.19",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = parse_opts(&a).unwrap().unwrap();
        assert_eq!((o.pairs, o.phase, o.budget.as_str()), (3, 5, "unlimited"));
        assert_eq!(o.go.as_deref(), Some("1.19"));
        let a: Vec<String> = ["--pairs", "2", "--", "--window-ms", "2000"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = parse_opts(&a).unwrap().unwrap();
        assert_eq!(o.probe_extra, ["--window-ms", "2000"]);
        assert!(parse_opts(&["--mode".into(), "nope".into()]).is_err());
        assert!(parse_opts(&["--budget".into(), "101".into()]).is_err());
    }

    #[test]
    fn timestamp_shape() {
        let t = timestamp();
        assert_eq!(t.len(), 15);
        assert!(t.starts_with("20"));
    }
}
