//! Contention flamegraphs: one frame per Go function (inlined ones included)
//! named `function file:line`, width by the number of waits below it.

use std::{fs, io::BufWriter, path::Path};

use anyhow::{anyhow, Context, Result};
use inferno::flamegraph::{self, Options};

use super::{
    terminal::{secs, short_path},
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

pub fn write_folded(report: &Report, path: &Path) -> Result<()> {
    let mut text = folded(report).join("\n");
    text.push('\n');
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

pub fn write_svg(report: &Report, path: &Path) -> Result<()> {
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
    let file =
        fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    if lines.is_empty() {
        // inferno refuses an empty profile; an empty graph still says "nothing seen".
        let empty = ["no contention seen 1".to_string()];
        opts.title.push_str(" (no contention seen)");
        return flamegraph::from_lines(
            &mut opts,
            empty.iter().map(String::as_str),
            BufWriter::new(file),
        )
        .map_err(|e| anyhow!("flamegraph: {e}"));
    }
    flamegraph::from_lines(
        &mut opts,
        lines.iter().map(String::as_str),
        BufWriter::new(file),
    )
    .map_err(|e| anyhow!("flamegraph: {e}"))
}
