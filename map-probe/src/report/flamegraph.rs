//! Contention flamegraphs: one frame per Go function (inlined ones included)
//! named `function file:line`, width by the number of waits below it.

use anyhow::{anyhow, Result};
use inferno::flamegraph::{self, Options};

use super::{
    format::{secs, short_path},
    Report,
};

/// Folded stacks (`root;...;leaf count`), the format flamegraph tools share.
pub fn folded(report: &Report) -> Vec<String> {
    report
        .stacks
        .iter()
        .filter(|s| s.count > 0)
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
            format!("{} {}", parts.join(";"), s.count)
        })
        .collect()
}

pub fn render_folded(report: &Report) -> Vec<u8> {
    let mut text = folded(report).join("\n");
    text.push('\n');
    text.into_bytes()
}

pub fn render_svg(report: &Report) -> Result<Vec<u8>> {
    let lines = folded(report);
    let mut opts = Options::default();
    opts.title = format!(
        "Lock contention: pid {} {} ({}), {:.1} s",
        report.target.pid,
        report.target.exe,
        report.target.go_version,
        report.sampling.elapsed_secs
    );
    opts.subtitle = Some(format!(
        "waits seen by map-probe, probes attached {} in {} window(s), counts x{:.2}",
        secs(report.sampling.attached_secs),
        report.sampling.windows,
        report.sampling.scale
    ));
    opts.count_name = "waits".into();
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
