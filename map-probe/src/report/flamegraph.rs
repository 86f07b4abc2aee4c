//! Contention flamegraphs: one frame per Go function (inlined ones included)
//! named `function file:line`, width by the number of waits below it, or by
//! the time waited there (`--weight delay`).

use anyhow::{anyhow, Result};
use inferno::flamegraph::{self, Options};

use super::{
    format::{secs, short_path},
    FrameOut, Report,
};

/// What a tower's width counts (`--weight`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Weight {
    /// Estimated waits.
    #[default]
    Waits,
    /// Estimated time waited, in nanoseconds.
    Delay,
    /// Estimated failed compare-and-swaps (CAS retries), by the CAS's stack.
    CasFailures,
}

/// Folded stacks (`root;...;leaf weight`), the format flamegraph tools share.
pub fn folded(report: &Report, weight: Weight) -> Vec<String> {
    let towers: Vec<(&[FrameOut], &str, u64)> = match weight {
        Weight::Waits | Weight::Delay => report
            .stacks
            .iter()
            .map(|s| {
                let w = if weight == Weight::Waits {
                    s.count
                } else {
                    s.delay_ns
                };
                (&s.frames[..], s.kind.as_str(), w)
            })
            .collect(),
        Weight::CasFailures => report
            .cas_stacks
            .iter()
            .map(|s| (&s.frames[..], "cas", s.failures))
            .collect(),
    };
    towers
        .into_iter()
        .filter(|&(_, _, w)| w > 0)
        .map(|(frames, kind, w)| {
            let mut parts: Vec<String> = frames
                .iter()
                .rev()
                .map(|f| {
                    format!("{} {}:{}", f.function, short_path(&f.file), f.line).replace(';', ":")
                })
                .collect();
            parts.push(format!("[{kind}]"));
            format!("{} {w}", parts.join(";"))
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
    let what = if weight == Weight::CasFailures {
        "CAS retries"
    } else {
        "Lock contention"
    };
    opts.title = format!(
        "{what}: pid {} {} ({}), {:.1} s",
        report.target.pid,
        report.target.exe,
        report.target.go_version,
        report.sampling.elapsed_secs
    );
    let (what, unit) = match weight {
        Weight::Waits => ("waits", "waits"),
        Weight::Delay => ("time waited", "ns waited"),
        Weight::CasFailures => ("failed CAS", "failed CAS"),
    };
    let s = &report.sampling;
    let (attached, windows, scale) = match (&s.cas, weight) {
        (Some(c), Weight::CasFailures) => (c.attached_secs, c.windows, c.scale),
        _ => (s.attached_secs, s.windows, s.scale),
    };
    opts.subtitle = Some(format!(
        "{what} seen by map-probe, probes attached {} in {} window(s), counts x{scale:.2}",
        secs(attached),
        windows,
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
