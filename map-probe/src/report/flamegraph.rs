//! Contention flamegraphs: one frame per Go function (inlined ones included)
//! named `function file:line`, width by the number of waits below it, or by
//! the time waited there (`--weight delay`).

use anyhow::{anyhow, Result};
use inferno::flamegraph::{self, Options};

use super::{
    format::{secs, short_path},
    Report,
};

/// What a tower's width counts (`--weight`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Weight {
    /// Estimated waits.
    #[default]
    Waits,
    /// Estimated time waited, in nanoseconds.
    Delay,
}

impl Weight {
    fn of(self, s: &super::StackCount) -> u64 {
        match self {
            Weight::Waits => s.count,
            Weight::Delay => s.delay_ns,
        }
    }
}

/// Folded stacks (`root;...;leaf weight`), the format flamegraph tools share.
pub fn folded(report: &Report, weight: Weight) -> Vec<String> {
    report
        .stacks
        .iter()
        .filter(|s| weight.of(s) > 0)
        .map(|s| {
            let mut parts: Vec<String> = s
                .frames
                .iter()
                .rev()
                .map(|f| {
                    format!("{} {}:{}", f.function, short_path(&f.file), f.line).replace(';', ":")
                })
                .collect();
            parts.push(format!("[{}]", s.kind.as_str()));
            format!("{} {}", parts.join(";"), weight.of(s))
        })
        .collect()
}

pub fn render_folded(report: &Report, weight: Weight) -> Vec<u8> {
    let mut text = folded(report, weight).join("\n");
    text.push('\n');
    text.into_bytes()
}

pub fn render_svg(report: &Report, weight: Weight) -> Result<Vec<u8>> {
    let lines = folded(report, weight);
    let mut opts = Options::default();
    opts.title = format!(
        "Lock contention: pid {} {} ({}), {:.1} s",
        report.target.pid,
        report.target.exe,
        report.target.go_version,
        report.sampling.elapsed_secs
    );
    let (what, unit) = match weight {
        Weight::Waits => ("waits", "waits"),
        Weight::Delay => ("time waited", "ns waited"),
    };
    opts.subtitle = Some(format!(
        "{what} seen by map-probe, probes attached {} in {} window(s), counts x{:.2}",
        secs(report.sampling.attached_secs),
        report.sampling.windows,
        report.sampling.scale
    ));
    opts.count_name = unit.into();
    opts.name_type = "Frame:".into();
    let mut svg = Vec::new();
    let empty = ["no contention seen 1".to_string()];
    let lines = if lines.is_empty() {
        // inferno refuses an empty profile; an empty graph still says "nothing seen".
        opts.title.push_str(" (no contention seen)");
        &empty[..]
    } else {
        &lines[..]
    };
    flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut svg)
        .map_err(|e| anyhow!("flamegraph: {e}"))?;
    Ok(svg)
}
