//! `cargo xtask bench --mode agent`: what `map-probe agent` costs over a long run.
//!
//! Starts the pinned OpenTelemetry Collector (file exporter) and several copies of the HTTP
//! cache fixture, each under its own wrk load (`/item`, the contended shared cache), then:
//! detached phases (no agent), one long stretch with `map-probe agent --exe ...` watching every
//! copy and exporting to the collector (load phases back to back), and detached phases again
//! (D D A...A D D). It measures the agent's own CPU time (utime+stime from /proc, as a share of
//! one core) and its RSS over the stretch (sampled after every phase, and the kernel's peak),
//! the targets' summed throughput and median p99 per phase, and how many OTLP batches arrived.
//! Results go to stdout and `target/bench/bench-agent-<timestamp>.json`.

use super::json::J;
use super::procs::{self, Agent, Service};
use super::wrk;
use crate::util::{self, cmd, step};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: cargo xtask bench --mode agent [options]

The agent over several wrk-loaded copies of fixtures/httpcache for a long stretch, exporting to
a real OpenTelemetry Collector; detached phases before and after. Reports the agent's own CPU (%
of one core; aim <= 1%) and RSS (aim <= 50 MB) and the targets' throughput and p99.

options:
  --minutes M      how long the agent runs (default 10)
  --targets N      copies of the fixture (default 3)
  --phase SECS     length of one load phase (default 20)
  --interval SECS  the agent's export interval (default 10, its default)
  --connections N  wrk connections per target (default 64)
  --no-build       skip setup and the map-probe build";

struct Opts {
    minutes: f64,
    targets: usize,
    phase: u64,
    interval: f64,
    connections: u32,
    build: bool,
}

/// `--mode agent` (or `--mode=agent`) among the arguments?
pub fn wanted(args: &[String]) -> bool {
    args.iter().any(|a| a == "--mode=agent")
        || args.windows(2).any(|w| w[0] == "--mode" && w[1] == "agent")
}

fn parse(args: &[String]) -> Result<Option<Opts>, String> {
    let mut o = Opts {
        minutes: 10.0,
        targets: 3,
        phase: 20,
        interval: 10.0,
        connections: 64,
        build: true,
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
            "--mode" => {
                value()?;
            }
            "--minutes" => o.minutes = num(flag, value()?)?,
            "--targets" => o.targets = num(flag, value()?)?,
            "--phase" => o.phase = num(flag, value()?)?,
            "--interval" => o.interval = num(flag, value()?)?,
            "--connections" => o.connections = num(flag, value()?)?,
            "--no-build" => o.build = false,
            other => return Err(format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    let positive = |x: f64, min: f64| x.is_finite() && x >= min;
    if !positive(o.minutes, 0.01) || o.targets == 0 || o.phase == 0 || !positive(o.interval, 0.1) {
        return Err("--minutes, --targets, --phase and --interval must be > 0".into());
    }
    Ok(Some(o))
}

/// One load phase over every target at once.
struct Phase {
    attached: bool,
    /// Summed over the targets.
    rps: f64,
    /// The median of the targets' p99s.
    p99_us: f64,
    errors: u64,
    /// The agent's RSS after the phase (attached phases).
    rss_kb: Option<u64>,
}

fn load_all(loads: &[wrk::Load], secs: u64, attached: bool) -> Result<Phase, String> {
    let results: Vec<Result<(wrk::WrkResult, String), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = loads.iter().map(|l| s.spawn(move || l.run(secs))).collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("wrk thread panicked".into()))
            })
            .collect()
    });
    let mut rps = 0.0;
    let mut p99s = Vec::new();
    let mut errors = 0;
    for r in results {
        let (w, _) = r?;
        rps += w.rps;
        p99s.push(w.p99_us);
        errors += w.errors;
    }
    Ok(Phase {
        attached,
        rps,
        p99_us: super::median(p99s).unwrap_or(f64::NAN),
        errors,
        rss_kb: None,
    })
}

pub fn run(args: &[String]) -> Result<(), String> {
    let Some(o) = parse(args)? else {
        println!("{USAGE}");
        return Ok(());
    };
    util::require_root("cargo xtask bench")?;
    let root = util::repo_root();
    let probe_bin = if o.build {
        crate::setup::run()?;
        crate::build::build(&[])?
    } else {
        root.join("target/release/map-probe")
    };
    let stamp = super::timestamp();
    let out_dir = root.join("target/bench");
    let run_dir = out_dir.join(format!("bench-agent-{stamp}"));
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    let (go, go_version) = super::resolve_go(None)?;
    // A name of its own, for `--exe`.
    let exe_name = "httpcache-agentbench";
    let fixture = run_dir.join(exe_name);
    step(
        "bench",
        &format!("building fixtures/httpcache with {go_version}"),
    );
    util::run(
        cmd(&go)
            .current_dir(root.join("fixtures"))
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=mod")
            .env("CGO_ENABLED", "0")
            .args(["build", "-o"])
            .arg(&fixture)
            .arg("./httpcache"),
    )?;

    let (_collector, grpc) = super::collector::start(&run_dir)?;

    let mut services = Vec::new();
    for i in 0..o.targets {
        services.push(Service::start(
            &fixture,
            &["-addr", "127.0.0.1:0", "-keys", "64"],
            "listening ",
            &format!("httpcache-{i}"),
        )?);
    }
    let script = root.join("xtask/bench/httpcache.lua");
    let loads: Vec<wrk::Load> = services
        .iter()
        .map(|s| wrk::Load {
            threads: 1,
            connections: o.connections,
            url: format!("http://{}/item", s.addr),
            script: Some(&script),
            script_args: &["64"],
        })
        .collect();
    step(
        "bench",
        &format!(
            "{} targets, wrk -t1 -c{} each; detached 2 x {} s, agent {} min, detached 2 x {} s",
            o.targets, o.connections, o.phase, o.minutes, o.phase
        ),
    );
    load_all(&loads, 3, false)?; // warm-up
    let mut phases = Vec::new();
    for _ in 0..2 {
        let p = load_all(&loads, o.phase, false)?;
        println!(
            "  detached: {:>8.0} req/s  p99 {}",
            p.rps,
            super::fmt_us(p.p99_us)
        );
        phases.push(p);
    }

    let log = run_dir.join("agent.log");
    let stretch = Duration::from_secs_f64(o.minutes * 60.0);
    let mut agent = Agent::start(
        cmd(&probe_bin)
            .args(["agent", "--exe", exe_name, "--rescan", "5"])
            .arg("--interval")
            .arg(o.interval.to_string())
            .arg("--otlp-endpoint")
            .arg(format!("http://127.0.0.1:{grpc}"))
            .args(["--otlp-protocol", "grpc"])
            .arg("--duration")
            .arg((stretch.as_secs_f64() + 5.0).to_string()),
        &log,
    )?;
    let apid = agent.pid();
    // Wait until it watches every target.
    let t_attach = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches("attached to PID").count() >= o.targets {
            break;
        }
        if agent.exited().is_some() || t_attach.elapsed() > Duration::from_secs(30) {
            return Err(format!("the agent did not attach to every target:\n{text}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let tick = procs::clock_ticks();
    let c0 = procs::cpu_ticks(apid).ok_or("cannot read the agent's /proc stat")?;
    let t0 = Instant::now();
    let rss_start = procs::status_kb(apid, "VmRSS");
    let mut c_last = (c0, t0);
    while t0.elapsed() + Duration::from_secs(o.phase) <= stretch {
        let mut p = load_all(&loads, o.phase, true)?;
        p.rss_kb = procs::status_kb(apid, "VmRSS");
        if let Some(c) = procs::cpu_ticks(apid) {
            c_last = (c, Instant::now());
        }
        println!(
            "  attached: {:>8.0} req/s  p99 {}  agent RSS {:.1} MB, CPU {:.2}% of one core so far",
            p.rps,
            super::fmt_us(p.p99_us),
            p.rss_kb.unwrap_or(0) as f64 / 1024.0,
            (c_last.0 - c0) as f64 / tick / c_last.1.duration_since(t0).as_secs_f64() * 100.0
        );
        phases.push(p);
    }
    let hwm = procs::status_kb(apid, "VmHWM");
    let agent_cpu_pct =
        (c_last.0 - c0) as f64 / tick / c_last.1.duration_since(t0).as_secs_f64() * 100.0;
    let agent_secs = c_last.1.duration_since(t0).as_secs_f64();
    let st = agent.finish(Duration::from_secs(60))?;
    if !st.success() {
        return Err(format!(
            "the agent failed ({st}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ));
    }
    for _ in 0..2 {
        let p = load_all(&loads, o.phase, false)?;
        println!(
            "  detached: {:>8.0} req/s  p99 {}",
            p.rps,
            super::fmt_us(p.p99_us)
        );
        phases.push(p);
    }
    drop(services);
    let received = std::fs::read_to_string(run_dir.join("received.jsonl")).unwrap_or_default();
    let batches = received.lines().count();
    let span_batches = received
        .lines()
        .filter(|l| l.contains("resourceSpans"))
        .count();

    let med = |attached: bool, f: &dyn Fn(&Phase) -> f64| {
        super::median(
            phases
                .iter()
                .filter(|p| p.attached == attached)
                .map(f)
                .collect(),
        )
        .unwrap_or(f64::NAN)
    };
    let (d_rps, a_rps) = (med(false, &|p| p.rps), med(true, &|p| p.rps));
    let (d_p99, a_p99) = (med(false, &|p| p.p99_us), med(true, &|p| p.p99_us));
    let rss: Vec<u64> = phases.iter().filter_map(|p| p.rss_kb).collect();
    let mb = |kb: Option<u64>| kb.map(|k| k as f64 / 1024.0);
    let rss_first = rss.first().copied();
    let rss_last = rss.last().copied();
    let rss_max = rss.iter().copied().max();
    println!();
    println!(
        "agent over {:.1} min, {} targets: CPU {agent_cpu_pct:.2}% of one core (aim <= 1%); RSS {:.1} MB at start, \
         {:.1} MB after the first phase, {:.1} MB at the end, {:.1} MB at most (peak {:.1} MB; aim <= 50 MB)",
        agent_secs / 60.0,
        o.targets,
        mb(rss_start).unwrap_or(f64::NAN),
        mb(rss_first).unwrap_or(f64::NAN),
        mb(rss_last).unwrap_or(f64::NAN),
        mb(rss_max).unwrap_or(f64::NAN),
        mb(hwm).unwrap_or(f64::NAN),
    );
    println!(
        "targets (sum of req/s, median p99): detached {d_rps:.0} req/s p99 {}, attached {a_rps:.0} req/s p99 {}: \
         throughput {:+.1}%, p99 {:+.1}%",
        super::fmt_us(d_p99),
        super::fmt_us(a_p99),
        super::pct(a_rps, d_rps),
        super::pct(a_p99, d_p99)
    );
    println!("collector received {batches} OTLP batches ({span_batches} with spans)");
    let doc = J::obj([
        ("mode", J::str("agent")),
        ("go", J::str(go_version)),
        ("targets", J::Num(o.targets as f64)),
        ("agent_minutes", J::Num(agent_secs / 60.0)),
        ("phase_secs", J::Num(o.phase as f64)),
        ("interval_secs", J::Num(o.interval)),
        ("agent_cpu_pct_of_one_core", J::Num(agent_cpu_pct)),
        ("agent_rss_mb_start", J::opt(mb(rss_start))),
        ("agent_rss_mb_first_phase", J::opt(mb(rss_first))),
        ("agent_rss_mb_end", J::opt(mb(rss_last))),
        ("agent_rss_mb_max_sampled", J::opt(mb(rss_max))),
        ("agent_rss_mb_peak", J::opt(mb(hwm))),
        ("detached_rps", J::Num(d_rps)),
        ("attached_rps", J::Num(a_rps)),
        ("detached_p99_us", J::Num(d_p99)),
        ("attached_p99_us", J::Num(a_p99)),
        ("throughput_pct", J::Num(super::pct(a_rps, d_rps))),
        ("p99_pct", J::Num(super::pct(a_p99, d_p99))),
        (
            "errors",
            J::Num(phases.iter().map(|p| p.errors).sum::<u64>() as f64),
        ),
        ("otlp_batches_received", J::Num(batches as f64)),
        ("otlp_span_batches_received", J::Num(span_batches as f64)),
    ]);
    let path = out_dir.join(format!("bench-agent-{stamp}.json"));
    std::fs::write(&path, doc.render())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    step("bench", &format!("results: {}", path.display()));
    Ok(())
}
