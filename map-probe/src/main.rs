use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use map_probe::{
    catalog::{self, Purpose},
    doctor::{self, Host},
    governor, launch,
    probes::Probes,
    report::RiskKind,
    session::{self, End, Outputs, Plans},
    target::{self, Target},
};

#[derive(Parser)]
#[command(
    name = "map-probe",
    version,
    about = "Rank a running Go service's lock contention by call site, with no restart and no code change."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach to a running Go process by PID.
    Attach {
        /// The Go process to observe.
        #[arg(long)]
        pid: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Start a Go program with the probes in place from its first instruction.
    Run {
        #[command(flatten)]
        common: Common,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Show what this host supports (kernel, BTF, uprobes, capabilities).
    Doctor,
}

#[derive(Args)]
struct Common {
    /// Stop after this many seconds (default: until Ctrl-C, SIGTERM or the target exits).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Write a contention flamegraph (SVG).
    #[arg(long, value_name = "FILE.svg")]
    flamegraph: Option<PathBuf>,
    /// Write folded stacks (`frame;frame count`), for other flamegraph tools.
    #[arg(long, value_name = "FILE")]
    folded: Option<PathBuf>,
    /// Write the full report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Rows in the terminal table.
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Most of one CPU the probes may cost the target, in percent, split
    /// evenly between lock-wait and map-write probes. The governor opens
    /// probe windows only as often as this allows (hits x --hit-cost-us) and
    /// scales counts by elapsed/attached time. 0 keeps the probes attached
    /// all the time.
    #[arg(long, value_name = "PCT", default_value_t = 0.5)]
    budget: f64,
    /// Longest lock-wait probe window in milliseconds; a window also closes
    /// once it has cost the target 50 ms.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    window_ms: u64,
    /// Longest pause between two windows, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 20.0)]
    max_gap: f64,
    /// Estimated cost of one uprobe hit to the target, in microseconds. A trap
    /// took about 10 on the VMs we measured (under 1 on bare metal); the
    /// default doubles it because a trap on a lock or map path also delays
    /// the goroutines queued behind it.
    #[arg(long, value_name = "US", default_value_t = 20.0)]
    hit_cost_us: f64,
    /// Count lock waits without timing them: no probes on the RET
    /// instructions, so half the traps and none while a woken goroutine
    /// already holds the lock it waited for.
    #[arg(long)]
    no_wait_time: bool,
    /// Don't watch plain-map writes for concurrent writers (lock contention
    /// and the fatal-crash capture stay on).
    #[arg(long)]
    no_map_writes: bool,
    /// Longest map-write probe window in milliseconds. Map writes are hot,
    /// so a map window also closes once it has cost the target 2 ms.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    map_window_ms: u64,
}

impl Common {
    fn options(&self) -> Result<session::Options> {
        if self.budget < 0.0 || self.budget > 100.0 {
            bail!("--budget is a percentage of one CPU between 0 and 100");
        }
        if let Some(d) = self.duration {
            if d <= 0.0 || !d.is_finite() {
                bail!("--duration must be a positive number of seconds");
            }
        }
        // Lock waits and map writes share the budget half and half.
        let share = if self.no_map_writes { 1.0 } else { 0.5 };
        let locks = governor::Config {
            budget: self.budget / 100.0 * share,
            hit_cost: Duration::from_secs_f64(self.hit_cost_us.max(0.0) / 1e6),
            window: Duration::from_millis(self.window_ms.max(50)),
            max_gap: Duration::from_secs_f64(self.max_gap.max(0.1)),
            max_window_cost: LOCK_WINDOW_COST,
        };
        let maps = governor::Config {
            window: Duration::from_millis(self.map_window_ms.max(20)),
            max_window_cost: MAP_WINDOW_COST,
            ..locks
        };
        Ok(session::Options {
            duration: self.duration.map(Duration::from_secs_f64),
            wait_time: !self.no_wait_time,
            locks,
            maps: (!self.no_map_writes).then_some(maps),
            outputs: Outputs {
                json: self.json.clone(),
                flamegraph: self.flamegraph.clone(),
                folded: self.folded.clone(),
                top: self.top,
            },
        })
    }
}

/// The most one probe window may cost the target before the governor closes
/// it early. A lock-wait trap delays a goroutine that is about to park
/// anyway, so lock windows may run longer (and sample more); a map-write trap
/// sits on the request path, so a map window stops after a few milliseconds
/// of stall, whatever the call rate.
const LOCK_WINDOW_COST: Duration = Duration::from_millis(50);
const MAP_WINDOW_COST: Duration = Duration::from_millis(2);

/// Exit status when the target exited before the run was over: the outputs
/// are written, but the caller should know the window was cut short.
const EXIT_TARGET_GONE: u8 = 3;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("map-probe: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Doctor => Ok(if doctor::run()? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Cmd::Attach { pid, common } => attach(pid, &common),
        Cmd::Run { common, cmd } => run(&cmd, &common),
    }
}

fn attach(pid: u32, common: &Common) -> Result<ExitCode> {
    let opts = common.options()?;
    Host::probe().require()?;
    let target = Target::from_pid(pid)?;
    let (plans, probes) = prepare(&target, &opts)?;
    let out = session::observe(&target, &plans, probes, &opts, None)?;
    session::write_outputs(&out.report, &opts.outputs)?;
    if out.end == End::TargetExited {
        let why = out
            .report
            .risks
            .iter()
            .find(|r| r.kind == RiskKind::Fatal)
            .map_or("exited".to_string(), |r| {
                format!("died (fatal error: {})", r.message)
            });
        eprintln!(
            "map-probe: PID {pid} {why} after {:.1} s, before the run was over; outputs cover that time",
            out.report.sampling.elapsed_secs
        );
        return Ok(ExitCode::from(EXIT_TARGET_GONE));
    }
    Ok(ExitCode::SUCCESS)
}

/// Decides every probe point for the target's Go version and loads the
/// programs. The crash watch (fatal errors and the SIGURG stacks) goes in at
/// once and stays: it costs nothing until the target is dying.
fn prepare(target: &Target, opts: &session::Options) -> Result<(Plans, Probes)> {
    let mut locks = catalog::plan(&target.bin, Purpose::LockWait)?;
    if !opts.wait_time {
        locks.points.iter_mut().for_each(|p| p.ret_offsets.clear());
    }
    let maps = match opts.maps {
        Some(_) => Some(catalog::plan(&target.bin, Purpose::MapWrite)?),
        None => None,
    };
    let fatal = catalog::plan(&target.bin, Purpose::Fatal)?;
    for m in locks.missing.iter().chain(fatal.missing.iter()) {
        log::info!("{m} is not in this binary (nothing in it can get there)");
    }
    if locks.points.is_empty() && maps.as_ref().is_none_or(|m| m.points.is_empty()) {
        bail!(
            "{} ({}) has no sync lock wait path or map write to probe",
            target.exe.display(),
            target.go_version()
        );
    }
    let plans = Plans { locks, maps, fatal };
    let goid = catalog::goid_offset(target.bin.go_version());
    let mut probes = Probes::load(target.pid, target.open_path.clone(), goid, &plans.all())?;
    if let Err(e) = probes.attach(Purpose::Fatal) {
        if !target.alive() {
            bail!("PID {} exited while map-probe was attaching", target.pid);
        }
        return Err(e);
    }
    if let Err(e) = probes.attach_crash_signals() {
        log::warn!("{e}: a crash will show the throwing goroutine only");
    }
    Ok((plans, probes))
}

fn run(cmd: &[String], common: &Common) -> Result<ExitCode> {
    let opts = common.options()?;
    Host::probe().require()?;
    let exe = resolve_command(&cmd[0])?;
    let bin = target::open_go(&exe, &exe)?;
    // The child stops itself between fork and exec: the probes go in while
    // nothing of the program has run, and the kernel plants them as the
    // binary is mapped.
    let mut child = launch::spawn_stopped(&exe, &cmd[1..])?;
    let pid = child.pid;
    let mut target = Target::from_spawned(pid, exe.canonicalize().unwrap_or(exe.clone()), bin);
    let prepared = (|| {
        let (plans, mut probes) = prepare(&target, &opts)?;
        // The first windows open before the program runs.
        probes.attach(Purpose::LockWait)?;
        if opts.maps.is_some() {
            probes.attach(Purpose::MapWrite)?;
        }
        anyhow::Ok((plans, probes))
    })();
    let (plans, probes) = match prepared {
        Ok(p) => p,
        Err(e) => {
            child.kill(libc::SIGKILL);
            child.wait();
            return Err(e);
        }
    };
    child.resume();
    target.settle_after_exec()?;
    let out = session::observe(&target, &plans, probes, &opts, Some(&mut child))?;
    session::write_outputs(&out.report, &opts.outputs)?;
    let code = match out.end {
        End::TargetExited => child.try_wait().unwrap_or(0),
        End::Interrupted => {
            child.kill(libc::SIGTERM);
            child.wait()
        }
        End::Duration => {
            eprintln!("map-probe: observation over; waiting for PID {pid} to exit");
            child.wait()
        }
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn resolve_command(name: &str) -> Result<PathBuf> {
    if name.contains('/') {
        let p = Path::new(name);
        if !p.exists() {
            bail!("no such program: {name}");
        }
        return Ok(p.to_path_buf());
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{name}: not found on PATH"))
}
