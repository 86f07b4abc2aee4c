use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use map_probe::{
    agent,
    catalog::Purpose,
    discover::Selector,
    doctor::{self, Host},
    export::{Exporter, OtlpArgs},
    governor, launch,
    report::{flamegraph::Weight, format::secs, Report, RiskKind},
    session::{self, End, Outputs},
    target::{self, Target},
};

#[derive(Parser)]
#[command(
    name = "map-probe",
    version,
    about = "Find what a running Go service waits on and what kills it: lock contention ranked by call site, and concurrent writes to plain maps (`fatal error: concurrent map writes`) flagged with both writers' stacks. Attaches by PID, with no restart and no code change.",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach to a running Go process, by PID or by executable name.
    #[command(group = clap::ArgGroup::new("which").required(true).args(["pid", "exe"]))]
    Attach {
        /// The Go process to observe.
        #[arg(long)]
        pid: Option<u32>,
        /// The Go process whose executable has this base name (refused when
        /// several match, unless --newest).
        #[arg(long, value_name = "NAME")]
        exe: Option<String>,
        /// With --exe: take the most recently started of several matches.
        #[arg(long, requires = "exe")]
        newest: bool,
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
    /// Watch many Go processes on this host and export what they do over
    /// OTLP, until SIGTERM or SIGINT (a per-host daemon; see the README).
    Agent {
        /// Watch processes whose executable has this base name (repeatable).
        #[arg(long = "exe", value_name = "NAME")]
        exe: Vec<String>,
        /// Watch this process (repeatable).
        #[arg(long = "pid", value_name = "PID")]
        pid: Vec<u32>,
        /// Watch every Go process (recognised by its build info).
        #[arg(long)]
        all_go: bool,
        /// Seconds between scans for new processes.
        #[arg(long, value_name = "SECS", default_value_t = 5.0)]
        rescan: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Show what this host supports (kernel, BTF, uprobes, capabilities).
    Doctor,
}

#[derive(Args)]
struct Common {
    /// Stop after this many seconds (default: until Ctrl-C, SIGTERM or the target exits).
    #[arg(long, allow_negative_numbers = true, value_name = "SECS")]
    duration: Option<f64>,
    /// Write a contention flamegraph (SVG).
    #[arg(long, value_name = "FILE.svg")]
    flamegraph: Option<PathBuf>,
    /// Write folded stacks (`frame;frame count`), for other flamegraph tools.
    #[arg(long, value_name = "FILE")]
    folded: Option<PathBuf>,
    /// Write the full report as JSON (`-`: to stdout, and the table to stderr).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a gzipped pprof profile shaped like Go's mutex profile
    /// (contentions and delay), for `go tool pprof`, Pyroscope or Parca.
    #[arg(long, value_name = "FILE")]
    pprof: Option<PathBuf>,
    /// What the widths in --flamegraph and --folded count: waits, or the
    /// time waited (delay).
    #[arg(long, value_enum, default_value_t = Weight::Waits)]
    weight: Weight,
    /// Rows in the terminal table.
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Most of one CPU the probes may cost the target, in percent (0 < PCT
    /// <= 100), split evenly between lock-wait and map-write probes. The
    /// governor opens probe windows only as often as this allows (hits x
    /// --hit-cost-us) and scales counts by elapsed/attached time.
    /// `unlimited` keeps every probe attached all the time: exact counts, at
    /// a cost to the target that only its call rates bound.
    #[arg(long, value_name = "PCT|unlimited", default_value = "0.5", value_parser = parse_budget, allow_negative_numbers = true)]
    budget: Budget,
    /// Longest lock-wait probe window in milliseconds (>= 50); a window also
    /// closes once it has cost the target 50 ms.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    window_ms: u64,
    /// Longest pause between two windows, in seconds (>= 0.1).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "SECS",
        default_value_t = 20.0
    )]
    max_gap: f64,
    /// Cost of one uprobe hit to the target, in microseconds (> 0), for the
    /// budget. By default map-probe measures it at start (a probe on a
    /// function of its own, called a few thousand times with and without
    /// it: about 10 µs on the VMs we developed on, under 1 µs on bare metal).
    #[arg(long, allow_negative_numbers = true, value_name = "US")]
    hit_cost_us: Option<f64>,
    /// Count lock waits without timing them: no probes on the RET
    /// instructions, so half the traps and none while a woken goroutine
    /// already holds the lock it waited for.
    #[arg(long)]
    no_wait_time: bool,
    /// Don't watch plain-map writes for concurrent writers (lock contention
    /// and the fatal-crash capture stay on).
    #[arg(long)]
    no_map_writes: bool,
    /// Longest map-write probe window in milliseconds (>= 20). Map writes
    /// are hot, so a map window also closes once it has cost the target 2 ms.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    map_window_ms: u64,
    /// Don't count compare-and-swap attempts and retries.
    #[arg(long)]
    no_cas: bool,
    /// Whose compare-and-swap instructions are probed: `default` (the main
    /// module's packages and the known lock-free map libraries), `none`, or
    /// comma-separated package paths, each covering the packages below it
    /// (`default,github.com/acme/lockfree`). The Go runtime and sync's own
    /// lock fast paths are never CAS sites.
    #[arg(long, value_name = "PATTERNS", default_value = "default")]
    cas_scope: String,
    /// Probe a process another map-probe is already probing (each spends
    /// its own budget).
    #[arg(long)]
    allow_second: bool,
    #[command(flatten)]
    otlp: OtlpArgs,
}

/// `--budget`: a share of one CPU, or no bound at all.
#[derive(Clone, Copy, Debug)]
enum Budget {
    Percent(f64),
    Unlimited,
}

fn parse_budget(s: &str) -> Result<Budget, String> {
    if s == "unlimited" {
        return Ok(Budget::Unlimited);
    }
    let pct: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is neither a percentage of one CPU nor `unlimited`"))?;
    if pct == 0.0 {
        return Err(
            "0 would never let a probe in; `--budget unlimited` keeps them attached all the time"
                .into(),
        );
    }
    if !(pct > 0.0 && pct <= 100.0) {
        return Err(format!(
            "{s} is not a percentage of one CPU between 0 (exclusive) and 100"
        ));
    }
    Ok(Budget::Percent(pct))
}

impl Common {
    fn options(&self) -> Result<session::Options> {
        if let Some(d) = self.duration {
            if d <= 0.0 || !d.is_finite() {
                bail!("--duration must be a positive number of seconds");
            }
        }
        if let Some(c) = self.hit_cost_us.filter(|c| !(c.is_finite() && *c > 0.0)) {
            bail!(
                "--hit-cost-us must be a positive number of microseconds (got {c}): it is what the governor budgets with"
            );
        }
        if self.window_ms < MIN_LOCK_WINDOW_MS {
            bail!("--window-ms must be at least {MIN_LOCK_WINDOW_MS} (shorter windows are mostly attach and detach time)");
        }
        if self.map_window_ms < MIN_MAP_WINDOW_MS {
            bail!("--map-window-ms must be at least {MIN_MAP_WINDOW_MS} (shorter windows are mostly attach and detach time)");
        }
        if !(self.max_gap.is_finite() && self.max_gap >= 0.1) {
            bail!(
                "--max-gap must be at least 0.1 seconds (got {})",
                self.max_gap
            );
        }
        let (total, unlimited) = match self.budget {
            Budget::Percent(p) => (p / 100.0, false),
            Budget::Unlimited => {
                eprintln!(
                    "map-probe: warning: --budget unlimited keeps every probe attached; a hot lock or map path can slow the target many times over (see the README's Overhead)"
                );
                (0.0, true)
            }
        };
        // Lock waits and map writes share the budget half and half.
        let share = if self.no_map_writes { 1.0 } else { 0.5 };
        let locks = governor::Config {
            budget: (!unlimited).then_some(total * share),
            hit_cost: Duration::from_secs_f64(
                self.hit_cost_us.unwrap_or(session::FALLBACK_HIT_COST_US) / 1e6,
            ),
            window: Duration::from_millis(self.window_ms),
            max_gap: Duration::from_secs_f64(self.max_gap),
            max_window_cost: LOCK_WINDOW_COST,
        };
        let maps = governor::Config {
            window: Duration::from_millis(self.map_window_ms),
            max_window_cost: MAP_WINDOW_COST,
            ..locks
        };
        // A CAS loop runs at millions a second: windows like map writes'.
        let cas = governor::Config {
            budget: (!unlimited).then_some(total * session::CAS_BUDGET_SHARE),
            ..maps
        };
        let outputs = Outputs {
            json: self.json.clone(),
            flamegraph: self.flamegraph.clone(),
            folded: self.folded.clone(),
            pprof: self.pprof.clone(),
            weight: self.weight,
            top: self.top,
        };
        outputs.check()?;
        Ok(session::Options {
            duration: self.duration.map(Duration::from_secs_f64),
            budget_total: (!unlimited).then_some(total),
            wait_time: !self.no_wait_time,
            measure_hit_cost: self.hit_cost_us.is_none(),
            locks,
            maps: (!self.no_map_writes).then_some(maps),
            cas: (!self.no_cas && self.cas_scope != "none").then(|| (cas, self.cas_scope.clone())),
            outputs,
        })
    }
}

const MIN_LOCK_WINDOW_MS: u64 = 50;
const MIN_MAP_WINDOW_MS: u64 = 20;

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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line, like every other error: clap's first, without its
            // usage block.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            // A value out of a fixed set (--weight) names the set on the same line.
            let valid = match e.get(clap::error::ContextKind::ValidValue) {
                Some(clap::error::ContextValue::Strings(v)) if !v.is_empty() => {
                    format!("; possible values: {}", v.join(", "))
                }
                _ => String::new(),
            };
            eprintln!("map-probe: error: {first}{valid} (see --help)");
            return ExitCode::from(2);
        }
    };
    // Before anything large is mapped: the planter is a fork of what
    // map-probe is now (see `links`).
    if !matches!(cli.cmd, Cmd::Doctor) {
        if let Err(e) = map_probe::links::start() {
            log::debug!("planter not started yet: {e}");
        }
    }
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
        Cmd::Attach {
            pid,
            exe,
            newest,
            common,
        } => {
            let pid = match (pid, exe) {
                (Some(pid), _) => pid,
                (None, Some(name)) => target::pid_by_name(&name, newest)?,
                (None, None) => bail!("say which process: --pid PID or --exe NAME"),
            };
            attach(pid, &common)
        }
        Cmd::Run { common, cmd } => run(&cmd, &common),
        Cmd::Agent {
            exe,
            pid,
            all_go,
            rescan,
            common,
        } => run_agent(
            Selector {
                pids: pid,
                exes: exe,
                all_go,
            },
            rescan,
            &common,
        ),
    }
}

/// Starts the OTLP export thread when an endpoint is configured.
fn start_export(otlp: &OtlpArgs) -> Result<Option<Exporter>> {
    otlp.config()?.map(Exporter::start).transpose()
}

/// The longest `attach` and `run` wait for their last export at the end.
const EXPORT_FLUSH_BOUND: Duration = Duration::from_secs(5);

/// Sends what is left (bounded) and counts what never arrived in the report.
fn finish_export(export: Option<Exporter>, report: &mut Report) {
    if let Some(ex) = export {
        report.drops.otlp_exports = ex.shutdown(EXPORT_FLUSH_BOUND);
    }
}

fn run_agent(select: Selector, rescan: f64, common: &Common) -> Result<ExitCode> {
    if select.is_empty() {
        bail!("say which processes to watch: --exe NAME, --pid PID or --all-go");
    }
    if common.json.is_some()
        || common.flamegraph.is_some()
        || common.folded.is_some()
        || common.pprof.is_some()
    {
        bail!("the agent exports over OTLP only; --json, --flamegraph, --folded and --pprof are for attach and run");
    }
    if !(rescan.is_finite() && rescan >= 0.1) {
        bail!("--rescan must be a number of seconds, at least 0.1");
    }
    let opts = common.options()?;
    let Some(cfg) = common.otlp.config()? else {
        bail!("the agent exports over OTLP: give --otlp-endpoint URL or set OTEL_EXPORTER_OTLP_ENDPOINT");
    };
    let host = Host::probe();
    host.require()?;
    let interval = cfg.interval;
    let export = Exporter::start(cfg)?;
    let cfg = agent::Config {
        select,
        rescan: Duration::from_secs_f64(rescan),
        interval,
        duration: opts.duration,
        allow_second: common.allow_second,
    };
    agent::run(&cfg, &opts, &host, export)?;
    Ok(ExitCode::SUCCESS)
}

fn attach(pid: u32, common: &Common) -> Result<ExitCode> {
    let opts = common.options()?;
    let host = Host::probe();
    host.require()?;
    let export = start_export(&common.otlp)?;
    let target = Target::from_pid(pid)?;
    let _claim = target.claim(common.allow_second)?;
    let (plans, probes) = session::prepare(&target, &opts, &host)?;
    let every = export.as_ref().map(|e| (e, e.config.interval));
    let mut out = session::observe(target, plans, probes, &opts, None, every)?;
    finish_export(export, &mut out.report);
    session::write_outputs(&out.report, &opts.outputs)?;
    if out.end == End::TargetExited {
        let why = out
            .report
            .risks
            .iter()
            .find(|r| r.kind == RiskKind::Fatal)
            .map(|r| format!("died (fatal error: {})", r.message))
            .or_else(|| {
                out.target
                    .replaced_by()
                    .map(|p| format!("exec'd another program ({})", p.display()))
            })
            .unwrap_or_else(|| "exited".to_string());
        eprintln!(
            "map-probe: PID {pid} {why} after {:.1} s, before the run was over; outputs cover that time",
            out.report.sampling.elapsed_secs
        );
        return Ok(ExitCode::from(EXIT_TARGET_GONE));
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cmd: &[String], common: &Common) -> Result<ExitCode> {
    let opts = common.options()?;
    let export = start_export(&common.otlp)?;
    let host = Host::probe();
    host.require()?;
    let exe = resolve_command(&cmd[0])?;
    let bin = target::open_go(&exe, &exe)?;
    // The child stops itself between fork and exec: the probes go in while
    // nothing of the program has run, and the kernel plants them as the
    // binary is mapped.
    let mut child = launch::spawn_stopped(&exe, &cmd[1..])?;
    let pid = child.pid;
    let mut target = Target::from_spawned(pid, exe.canonicalize().unwrap_or(exe.clone()), bin);
    let prepared = (|| {
        let (plans, mut probes) = session::prepare(&target, &opts, &host)?;
        // The first windows open before the program runs.
        probes.attach(Purpose::LockWait)?;
        if opts.maps.is_some() {
            probes.attach(Purpose::MapWrite)?;
        }
        child.run_to_exec(&exe)?;
        target.settle_after_exec()?;
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
    child.release();
    let every = export.as_ref().map(|e| (e, e.config.interval));
    let mut out = session::observe(target, plans, probes, &opts, Some(&mut child), every)?;
    finish_export(export, &mut out.report);
    let written = session::write_outputs(&out.report, &opts.outputs);
    let code = match out.end {
        End::TargetExited => child.try_wait().unwrap_or(0),
        End::Interrupted(sig) => {
            child.kill(sig);
            child.wait_forwarding()
        }
        End::Duration => {
            eprintln!(
                "map-probe: observation over after {}; probes detached, waiting for PID {pid} to exit (SIGINT or SIGTERM to map-probe is passed on)",
                secs(out.report.sampling.elapsed_secs)
            );
            child.wait_forwarding()
        }
    };
    written?;
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
