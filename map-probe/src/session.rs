//! One observation run: open and close probe windows under the governor until
//! the duration ends, a signal arrives or the target exits, then turn what the
//! kernel aggregated into every requested output.

use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    aggregate,
    catalog::Plan,
    governor::{self, Decision, Governor},
    probes::Probes,
    report::{self, Report, Sampling, TargetInfo},
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
    pub governor: governor::Config,
    pub outputs: Outputs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Duration,
    Interrupted,
    TargetExited,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Duration => "duration",
            End::Interrupted => "interrupted",
            End::TargetExited => "target-exited",
        }
    }
}

/// What a spawned target (`map-probe run`) needs from the loop.
pub trait Child {
    /// Some(exit code) once the child has exited.
    fn exited(&mut self) -> Option<i32>;
}

pub struct Outcome {
    pub end: End,
    pub report: Report,
}

const TICK: Duration = Duration::from_millis(50);

pub fn observe(
    target: &Target,
    plan: &Plan,
    mut probes: Probes,
    opts: &Options,
    mut child: Option<&mut dyn Child>,
) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let start = Instant::now();
    let mut gov = Governor::new(opts.governor, start);
    if probes.attached() {
        // `run` opened the first window before the program's first instruction.
        gov.attached_at(start, start, 0);
    }
    let tty = std::io::stdout().is_terminal();
    let end = rt.block_on(async {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut tick = tokio::time::interval(TICK);
        let mut last_status = start;
        let end = loop {
            tokio::select! {
                _ = int.recv() => break End::Interrupted,
                _ = term.recv() => break End::Interrupted,
                _ = tick.tick() => {}
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
            let t = aggregate::totals(&probes)?;
            match gov.tick(now, t.hits + t.ret_hits) {
                Decision::Attach => {
                    let a = Instant::now();
                    if let Err(e) = probes.attach() {
                        // The target may have exited between the check and the attach.
                        if !target.alive() {
                            break End::TargetExited;
                        }
                        return Err(e);
                    }
                    gov.attached_at(a, Instant::now(), t.hits + t.ret_hits);
                }
                Decision::Detach => {
                    let d = Instant::now();
                    probes.detach()?;
                    gov.detached_at(d, Instant::now());
                }
                Decision::Stay => {}
            }
            if tty && now.duration_since(last_status) >= Duration::from_millis(250) {
                last_status = now;
                status_line(&probes, &gov, start, now, opts.duration, t.hits);
            }
        };
        anyhow::Ok(end)
    })?;
    let d = Instant::now();
    probes.detach()?;
    gov.detached_at(d, Instant::now());
    if tty {
        print!("\r\x1b[K");
    }
    let report = build_report(target, plan, &probes, &gov, start.elapsed(), end)?;
    Ok(Outcome { end, report })
}

fn status_line(
    probes: &Probes,
    gov: &Governor,
    start: Instant,
    now: Instant,
    total: Option<Duration>,
    hits: u64,
) {
    let elapsed = now.duration_since(start);
    let sites = probes.site_count();
    let drops = aggregate::totals(probes)
        .map(|t| t.drops.stack_lost + t.drops.site_map_full)
        .unwrap_or(0);
    let of = total.map_or(String::new(), |d| format!("/{:.0}s", d.as_secs_f64()));
    let attached = gov.attached_time(now).as_secs_f64() / elapsed.as_secs_f64().max(1e-9);
    print!(
        "\r\x1b[Kmap-probe: {sites} sites, {hits} events, {drops} drops, {:.1}s{of}, probes attached {:.0}%",
        elapsed.as_secs_f64(),
        attached * 100.0
    );
    let _ = std::io::stdout().flush();
}

fn build_report(
    target: &Target,
    plan: &Plan,
    probes: &Probes,
    gov: &Governor,
    elapsed: Duration,
    end: End,
) -> Result<Report> {
    let totals = aggregate::totals(probes)?;
    let raw = aggregate::collect(probes)?;
    let attached = gov.attached_time(Instant::now()).min(elapsed);
    let scale = if gov.config().budget <= 0.0 || attached.is_zero() {
        1.0
    } else {
        (elapsed.as_secs_f64() / attached.as_secs_f64()).max(1.0)
    };
    let mut sym = Symbolizer::new(&target.bin, target.bias);
    let (sites, stacks) = report::build_sites(&raw, &plan.points, &mut sym, scale);
    let cfg = gov.config();
    Ok(Report {
        target: TargetInfo {
            pid: target.pid,
            exe: target.exe.display().to_string(),
            go_version: target.go_version().to_string(),
            stripped: !target.bin.has_symtab(),
            pie: target.bin.is_pie(),
        },
        sampling: Sampling {
            elapsed_secs: elapsed.as_secs_f64(),
            attached_secs: attached.as_secs_f64(),
            windows: gov.windows,
            raw_hits: totals.hits,
            raw_ret_hits: totals.ret_hits,
            scale,
            method: if cfg.budget > 0.0 {
                "windows: probes attached while their estimated cost fits the budget; counts scaled by elapsed/attached".into()
            } else {
                "continuous: probes attached for the whole run; counts are raw".into()
            },
            budget_cpu_percent: cfg.budget * 100.0,
            hit_cost_us: cfg.hit_cost.as_secs_f64() * 1e6,
            window_ms: cfg.window.as_millis() as u64,
        },
        probes: report::probe_hits(&raw, &plan.points),
        drops: totals.drops,
        end: end.as_str().into(),
        sites,
        stacks,
    })
}

/// Writes every requested output; the terminal table always.
pub fn write_outputs(report: &Report, outputs: &Outputs) -> Result<()> {
    report::terminal::print(report, outputs.top, &mut std::io::stdout().lock())?;
    let mut wrote = Vec::new();
    if let Some(p) = &outputs.json {
        report::json::write(report, p)?;
        wrote.push(p.display().to_string());
    }
    if let Some(p) = &outputs.folded {
        report::flamegraph::write_folded(report, p)?;
        wrote.push(p.display().to_string());
    }
    if let Some(p) = &outputs.flamegraph {
        report::flamegraph::write_svg(report, p)?;
        wrote.push(p.display().to_string());
    }
    if !wrote.is_empty() {
        println!("wrote {}", wrote.join(", "));
    }
    Ok(())
}
