//! The ranked table printed at the end of a run.

use std::io::{self, Write};

use super::{Report, RiskKind};

pub fn print(report: &Report, top: usize, out: &mut impl Write) -> io::Result<()> {
    let s = &report.sampling;
    let t = &report.target;
    writeln!(
        out,
        "map-probe: pid {} {} ({}) for {:.1} s; probes attached {} in {} window(s), counts scaled x{:.2}",
        t.pid,
        t.exe,
        t.go_version,
        s.elapsed_secs,
        secs(s.attached_secs),
        s.windows,
        s.scale
    )?;
    if report.sites.is_empty() {
        writeln!(out, "no lock contention seen ({} raw hits)", s.raw_hits)?;
    } else {
        writeln!(
            out,
            "\n{:>4} {:>12} {:>9} {:>10}  {:<14} CALL SITE",
            "RANK", "WAITS(est)", "RAW", "MEAN WAIT", "KIND"
        )?;
        for (i, site) in report.sites.iter().take(top).enumerate() {
            writeln!(
                out,
                "{:>4} {:>12} {:>9} {:>10}  {:<14} {} ({}:{})",
                i + 1,
                group(site.count),
                group(site.raw_count),
                duration(site.wait.mean_ns, site.wait.timed),
                site.kind.as_str(),
                site.function,
                short_path(&site.file),
                site.line
            )?;
        }
        if report.sites.len() > top {
            writeln!(
                out,
                "     ... {} more site(s) in the JSON report",
                report.sites.len() - top
            )?;
        }
    }
    risks(report, out)?;
    let d = &report.drops;
    if d.any() {
        writeln!(
            out,
            "drops: {} event(s) lost (site map full), {} stack(s) lost, {} wait(s) untimed",
            d.site_map_full, d.stack_lost, d.inflight_full
        )?;
    } else {
        writeln!(out, "drops: none")?;
    }
    Ok(())
}

fn risks(report: &Report, out: &mut impl Write) -> io::Result<()> {
    let watched = report.sampling.map_writes.as_ref();
    if report.risks.is_empty() {
        if let Some(m) = watched {
            writeln!(
                out,
                "\nconcurrent-write risks: none seen ({} map writes watched in {} window(s), {})",
                m.raw_hits,
                m.windows,
                secs(m.attached_secs)
            )?;
        }
        return Ok(());
    }
    writeln!(out, "\nconcurrent-write risks:")?;
    for r in &report.risks {
        let map = r.map.as_deref().unwrap_or("unknown map");
        let kind = match r.kind {
            RiskKind::Overlap => "overlap",
            RiskKind::Fatal => "FATAL",
        };
        writeln!(
            out,
            "  {kind:<8} map {map}: {} (x{}, first at {:.2} s)",
            r.message, r.count, r.first_seen_secs
        )?;
        for w in &r.writers {
            writeln!(
                out,
                "           goroutine {:<6} {:<18} {} ({}:{})",
                w.goroutine,
                w.state,
                w.function,
                short_path(&w.file),
                w.line
            )?;
        }
    }
    Ok(())
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn duration(ns: u64, timed: u64) -> String {
    match ns {
        _ if timed == 0 => "-".into(),
        n if n >= 1_000_000 => format!("{:.1} ms", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.0} µs", n as f64 / 1e3),
        n => format!("{n} ns"),
    }
}

/// The last two path components: enough to find the file, short enough to read.
/// Seconds for people: milliseconds below one second.
pub fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

pub fn short_path(p: &str) -> &str {
    let mut cut = p.len();
    for _ in 0..2 {
        match p[..cut].rfind('/') {
            Some(i) => cut = i,
            None => return p,
        }
    }
    &p[cut + 1..]
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats() {
        assert_eq!(super::group(1234567), "1,234,567");
        assert_eq!(super::group(12), "12");
        assert_eq!(super::short_path("/a/b/c/main.go"), "c/main.go");
        assert_eq!(super::short_path("main.go"), "main.go");
        assert_eq!(super::duration(1_500, 1), "2 µs");
    }
}
