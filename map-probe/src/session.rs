//! One observation run: open and close probe windows under the governors
//! (one for lock waits, one for map writes) until the duration ends, a
//! signal arrives or the target exits, keep the crash watch on throughout,
//! then turn what the kernel aggregated into every requested output.

use std::{
    fs,
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use map_probe_common::stat;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    aggregate,
    catalog::{Plan, Purpose},
    governor::{self, Decision, Governor},
    probes::Probes,
    report::{self, MapSampling, Report, Sampling, TargetInfo},
    risks::{self, Clock},
    sites,
    symbolize::Symbolizer,
    target::Target,
};

#[derive(Clone, Debug, Default)]
pub struct Outputs {
    pub json: Option<PathBuf>,
    pub flamegraph: Option<PathBuf>,
    pub folded: Option<PathBuf>,
    pub top: usize,
}

pub struct Options {
    pub duration: Option<Duration>,
    /// `--budget` as a share of one CPU (lock and map probes split it);
    /// None for `unlimited`.
    pub budget_total: Option<f64>,
    /// Probe the RETs of the lock-wait functions too, to time each wait.
    pub wait_time: bool,
    pub locks: governor::Config,
    /// None: map writes are not watched.
    pub maps: Option<governor::Config>,
    pub outputs: Outputs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Duration,
    /// By SIGINT or SIGTERM (the signal, for `run` to pass on).
    Interrupted(i32),
    TargetExited,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Duration => "duration",
            End::Interrupted(_) => "interrupted",
            End::TargetExited => "target-exited",
        }
    }
}

/// What a spawned target (`map-probe run`) needs from the loop.
pub trait Child {
    /// Some(exit code) once the child has exited.
    fn exited(&mut self) -> Option<i32>;
}

pub struct Plans {
    pub locks: Plan,
    pub maps: Option<Plan>,
    pub fatal: Plan,
}

impl Plans {
    pub fn all(&self) -> Vec<&Plan> {
        let mut v = vec![&self.locks, &self.fatal];
        v.extend(self.maps.as_ref());
        v
    }
}

pub struct Outcome {
    pub end: End,
    pub report: Report,
}

/// How often the loop looks at the counters: often while a window is open,
/// since a hot path (a map write at ~100k calls/s) costs the target a
/// millisecond of traps every few milliseconds the window stays open.
const TICK_MAP_OPEN: Duration = Duration::from_millis(2);
const TICK_OPEN: Duration = Duration::from_millis(5);
const TICK_CLOSED: Duration = Duration::from_millis(20);

/// A governed probe set: its purpose, its governor and which counters feed it.
struct Governed {
    purpose: Purpose,
    gov: Governor,
    counters: [u32; 2],
}

impl Governed {
    fn hits(&self, stats: &[u64]) -> u64 {
        self.counters.iter().map(|&c| stats[c as usize]).sum()
    }

    fn step(&mut self, probes: &mut Probes, now: Instant, stats: &[u64]) -> Result<()> {
        match self.gov.tick(now, self.hits(stats)) {
            Decision::Attach => {
                let a = Instant::now();
                probes.attach(self.purpose)?;
                self.gov.attached_at(a, Instant::now(), self.hits(stats));
            }
            Decision::Detach => self.close(probes)?,
            Decision::Stay => {}
        }
        Ok(())
    }

    fn close(&mut self, probes: &mut Probes) -> Result<()> {
        let d = Instant::now();
        probes.detach(self.purpose)?;
        let end = Instant::now();
        let hits = self.hits(&probes.stats()?);
        self.gov.detached_at(d, end, hits);
        Ok(())
    }
}

pub fn observe(
    target: &Target,
    plans: &Plans,
    mut probes: Probes,
    opts: &Options,
    mut child: Option<&mut dyn Child>,
) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let start = Instant::now();
    let clock = Clock::now();
    let mut sets = vec![Governed {
        purpose: Purpose::LockWait,
        gov: Governor::new(opts.locks, start),
        counters: [stat::HITS, stat::RET_HITS],
    }];
    if let (Some(cfg), true) = (opts.maps, probes.has(Purpose::MapWrite)) {
        sets.push(Governed {
            purpose: Purpose::MapWrite,
            gov: Governor::new(cfg, start),
            counters: [stat::MAP_HITS, stat::MAP_RET_HITS],
        });
    }
    for s in &mut sets {
        if probes.attached(s.purpose) {
            // `run` opened the first windows before the program's first instruction.
            s.gov.attached_at(start, start, 0);
        }
    }
    let ui = opts.outputs.ui();
    let tty = ui.is_terminal();
    // Windows must close on time even when the target saturates every CPU:
    // a late tick is paid for by the target, in traps.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) };
    let end = rt.block_on(async {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut next_tick = TICK_CLOSED;
        let mut last_status = start;
        let end = loop {
            tokio::select! {
                _ = int.recv() => break End::Interrupted(libc::SIGINT),
                _ = term.recv() => break End::Interrupted(libc::SIGTERM),
                _ = tokio::time::sleep(next_tick) => {}
            }
            let now = Instant::now();
            let exited = match child.as_deref_mut() {
                Some(c) => c.exited().is_some(),
                None => !target.alive(),
            };
            if exited {
                break End::TargetExited;
            }
            if opts
                .duration
                .is_some_and(|d| now.duration_since(start) >= d)
            {
                break End::Duration;
            }
            probes.flush_logs();
            let stats = probes.stats()?;
            for s in &mut sets {
                if let Err(e) = s.step(&mut probes, now, &stats) {
                    // The target may have exited between the check and the attach.
                    if !target.alive() {
                        return Ok(End::TargetExited);
                    }
                    return Err(e);
                }
            }
            next_tick = if sets
                .iter()
                .any(|s| s.purpose == Purpose::MapWrite && s.gov.is_open())
            {
                TICK_MAP_OPEN
            } else if sets.iter().any(|s| s.gov.is_open()) {
                TICK_OPEN
            } else {
                TICK_CLOSED
            };
            if tty && now.duration_since(last_status) >= Duration::from_millis(250) {
                last_status = now;
                status_line(
                    &probes,
                    &sets[0].gov,
                    start,
                    now,
                    opts.duration,
                    &stats,
                    &ui,
                );
            }
        };
        anyhow::Ok(end)
    })?;
    for s in &mut sets {
        s.close(&mut probes)?;
    }
    probes.flush_logs();
    if tty {
        let _ = write!(ui.lock(), "\r\x1b[K");
    }
    let elapsed = start.elapsed();
    let report = build_report(target, plans, &probes, &sets, opts, elapsed, end, clock)?;
    Ok(Outcome { end, report })
}

fn status_line(
    probes: &Probes,
    gov: &Governor,
    start: Instant,
    now: Instant,
    total: Option<Duration>,
    stats: &[u64],
    ui: &Ui,
) {
    let elapsed = now.duration_since(start);
    let sites = probes.site_count();
    let drops = stats[stat::STACK_LOST as usize] + stats[stat::AGG_FULL as usize];
    let events = stats[stat::HITS as usize];
    let of = total.map_or(String::new(), |d| format!("/{:.0}s", d.as_secs_f64()));
    let attached = gov.attached_time(now).as_secs_f64() / elapsed.as_secs_f64().max(1e-9);
    let mut out = ui.lock();
    let _ = write!(
        out,
        "\r\x1b[Kmap-probe: {sites} sites, {events} events, {drops} drops, {:.1}s{of}, lock probes attached {:.0}%",
        elapsed.as_secs_f64(),
        attached * 100.0
    );
    let _ = out.flush();
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    target: &Target,
    plans: &Plans,
    probes: &Probes,
    sets: &[Governed],
    opts: &Options,
    elapsed: Duration,
    end: End,
    clock: Clock,
) -> Result<Report> {
    let now = Instant::now();
    let stats = probes.stats()?;
    let totals = aggregate::totals(&stats);
    let raw = aggregate::collect(probes)?;
    let locks = &sets[0].gov;
    let scale = locks.scale(elapsed, now);
    let mut sym = Symbolizer::new(&target.bin, target.bias);
    let (sites, stacks, incomplete) =
        sites::build_sites(&raw, &plans.locks.points, &mut sym, scale);
    let risks = risks::collect(probes, plans.maps.as_ref(), &mut sym, clock)?;
    let cfg = locks.config();
    let map_writes = sets
        .iter()
        .find(|s| s.purpose == Purpose::MapWrite)
        .map(|s| MapSampling {
            attached_secs: s.gov.attached_time(now).as_secs_f64(),
            windows: s.gov.windows,
            raw_hits: stats[stat::MAP_HITS as usize],
            raw_ret_hits: stats[stat::MAP_RET_HITS as usize],
            budget_cpu_percent: s.gov.config().budget.map(|b| b * 100.0),
            window_ms: s.gov.config().window.as_millis() as u64,
            last_rate_per_sec: s.gov.last_rate,
            unmatched_rets: stats[stat::MAP_RET_UNMATCHED as usize],
            overlap_candidates: stats[stat::OVERLAP_CANDIDATES as usize],
        });
    let mut drops = totals.drops;
    drops.stack_incomplete = incomplete;
    Ok(Report {
        target: TargetInfo {
            pid: target.pid,
            exe: target.exe.display().to_string(),
            go_version: target.go_version().to_string(),
            stripped: !target.bin.has_symtab(),
            pie: target.bin.is_pie(),
        },
        sampling: Sampling {
            requested_secs: opts.duration.map(|d| d.as_secs_f64()),
            elapsed_secs: elapsed.as_secs_f64(),
            attached_secs: locks.attached_time(now).min(elapsed).as_secs_f64(),
            windows: locks.windows,
            raw_hits: totals.hits,
            raw_ret_hits: totals.ret_hits,
            scale,
            method: if cfg.budget.is_some() {
                "windows: probes attached while their estimated cost fits the budget; counts scaled by elapsed/attached".into()
            } else {
                "continuous: probes attached for the whole run (--budget unlimited); counts are raw"
                    .into()
            },
            budget_cpu_percent: opts.budget_total.map(|b| b * 100.0),
            lock_budget_cpu_percent: cfg.budget.map(|b| b * 100.0),
            hit_cost_us: cfg.hit_cost.as_secs_f64() * 1e6,
            window_ms: cfg.window.as_millis() as u64,
            map_writes,
        },
        probes: sites::probe_hits(&raw, &plans.locks.points),
        drops,
        end: end.as_str().into(),
        sites,
        risks,
        stacks,
    })
}

/// Where the table and the live status go: stdout, or stderr when the JSON
/// report is written to stdout.
pub enum Ui {
    Stdout,
    Stderr,
}

impl Ui {
    pub fn is_terminal(&self) -> bool {
        match self {
            Ui::Stdout => std::io::stdout().is_terminal(),
            Ui::Stderr => std::io::stderr().is_terminal(),
        }
    }

    pub fn lock(&self) -> Box<dyn Write + '_> {
        match self {
            Ui::Stdout => Box::new(std::io::stdout().lock()),
            Ui::Stderr => Box::new(std::io::stderr().lock()),
        }
    }
}

fn is_stdout(p: &Path) -> bool {
    p == Path::new("-")
}

impl Outputs {
    pub fn ui(&self) -> Ui {
        if self.json.as_deref().is_some_and(is_stdout) {
            Ui::Stderr
        } else {
            Ui::Stdout
        }
    }

    fn files(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        [
            ("--json", self.json.as_deref()),
            ("--folded", self.folded.as_deref()),
            ("--flamegraph", self.flamegraph.as_deref()),
        ]
        .into_iter()
        .filter_map(|(flag, p)| Some((flag, p?)))
        .filter(|(_, p)| !is_stdout(p))
    }

    /// Fails at once, before anything is attached, on an output that could
    /// not be written at the end.
    pub fn check(&self) -> Result<()> {
        for (flag, p) in [
            ("--folded", &self.folded),
            ("--flamegraph", &self.flamegraph),
        ] {
            if p.as_deref().is_some_and(is_stdout) {
                bail!("{flag} - is not supported: only --json writes to stdout");
            }
        }
        for (flag, p) in self.files() {
            if p.is_dir() {
                bail!("{flag} {}: is a folder; give a file name", p.display());
            }
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                bail!(
                    "{flag} {}: the folder {} does not exist",
                    p.display(),
                    dir.display()
                );
            }
            let probe = dir.join(format!(".map-probe-check-{}", std::process::id()));
            match fs::File::create(&probe) {
                Ok(_) => {
                    let _ = fs::remove_file(&probe);
                }
                Err(e) => bail!(
                    "{flag} {}: cannot write in {}: {e}",
                    p.display(),
                    dir.display()
                ),
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file
/// beside it, then renamed over it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.map-probe-{}", std::process::id()));
    let res = fs::write(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.with_context(|| format!("cannot write {}", path.display()))
}

/// Writes every requested output, and the terminal table always. One that
/// fails does not stop the others; each failure is one line on stderr.
pub fn write_outputs(report: &Report, outputs: &Outputs) -> Result<()> {
    let ui = outputs.ui();
    report::terminal::print(report, outputs.top, &mut ui.lock())?;
    let mut wrote = Vec::new();
    let mut failed = Vec::new();
    let mut emit = |p: &Path, bytes: Result<Vec<u8>>| {
        let res = bytes.and_then(|b| {
            if is_stdout(p) {
                let mut out = std::io::stdout().lock();
                out.write_all(&b).and_then(|()| out.flush())?;
                Ok(())
            } else {
                write_atomic(p, &b)
            }
        });
        match res {
            Ok(()) if !is_stdout(p) => wrote.push(p.display().to_string()),
            Ok(()) => {}
            Err(e) => {
                eprintln!("map-probe: error: {e:#}");
                failed.push(p.display().to_string());
            }
        }
    };
    if let Some(p) = &outputs.json {
        emit(p, report::json::render(report));
    }
    if let Some(p) = &outputs.folded {
        emit(p, Ok(report::flamegraph::render_folded(report)));
    }
    if let Some(p) = &outputs.flamegraph {
        emit(p, report::flamegraph::render_svg(report));
    }
    if !wrote.is_empty() {
        let _ = writeln!(ui.lock(), "wrote {}", wrote.join(", "));
    }
    if !failed.is_empty() {
        bail!("could not write {}", failed.join(", "));
    }
    Ok(())
}
