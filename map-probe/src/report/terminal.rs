//! The ranked table printed at the end of a run.

use std::io::{self, Write};

use super::{
    format::{duration, group, secs, short_path},
    Report, RiskKind, Site,
};

pub fn print(report: &Report, top: usize, out: &mut impl Write) -> io::Result<()> {
    let s = &report.sampling;
    let t = &report.target;
    let asked = s
        .requested_secs
        .filter(|r| (r - s.elapsed_secs).abs() >= 0.05)
        .map_or(String::new(), |r| format!(" ({} requested)", secs(r)));
    writeln!(
        out,
        "map-probe: pid {} {} ({}) for {}{asked}; probes attached {} in {} window(s), counts scaled x{:.2}",
        t.pid,
        t.exe,
        t.go_version,
        secs(s.elapsed_secs),
        secs(s.attached_secs),
        s.windows,
        s.scale
    )?;
    if report.sites.is_empty() {
        writeln!(out, "no lock contention seen ({} raw hits)", s.raw_hits)?;
    } else {
        writeln!(
            out,
            "\n{:>4} {:>17} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {:<14} CALL SITE",
            "RANK", "WAITS(est)", "RAW", "MEAN", "P50", "P90", "P99", "MAX", "KIND"
        )?;
        for (i, site) in report.sites.iter().take(top).enumerate() {
            let w = &site.wait;
            writeln!(
                out,
                "{:>4} {:>17} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {:<14} {} ({}:{}){}",
                i + 1,
                estimate(site),
                group(site.raw_count),
                duration(w.mean_ns, w.timed),
                duration(w.p50_ns, w.timed),
                duration(w.p90_ns, w.timed),
                duration(w.p99_ns, w.timed),
                duration(w.max_ns, w.timed),
                site.kind.as_str(),
                site.function,
                short_path(&site.file),
                site.line,
                lock_note(site),
            )?;
        }
        sync_map_notes(report, top, out)?;
        if report.sites.len() > top {
            writeln!(
                out,
                "     ... {} more site(s) in the JSON report",
                report.sites.len() - top
            )?;
        }
    }
    cas(report, top, out)?;
    risks(report, out)?;
    let d = &report.drops;
    if d.any() {
        writeln!(
            out,
            "drops: {} event(s) lost (site map full), {} stack(s) lost, {} stack(s) cut short in the lock machinery, {} wait(s) untimed",
            d.site_map_full, d.stack_lost, d.stack_incomplete, d.inflight_full
        )?;
        if d.otlp_exports > 0 {
            writeln!(out, "drops: {} OTLP export(s) undelivered", d.otlp_exports)?;
        }
        if d.unknown_address > 0 {
            writeln!(
                out,
                "drops: {} hit(s) at an address with no probe point recorded",
                d.unknown_address
            )?;
        }
    } else {
        writeln!(out, "drops: none")?;
    }
    Ok(())
}

/// CAS sites, most failures first, and the false-sharing suspects (which
/// lock words alone can make, with no CAS in scope).
fn cas(report: &Report, top: usize, out: &mut impl Write) -> io::Result<()> {
    match &report.sampling.cas {
        // Atomic writes alone are probed only for false sharing, below.
        Some(c) if c.points > 0 => cas_sites(report, c, top, out)?,
        _ => {}
    }
    false_sharing(report, out)
}

fn cas_sites(
    report: &Report,
    c: &super::CasSampling,
    top: usize,
    out: &mut impl Write,
) -> io::Result<()> {
    if report.cas.is_empty() {
        return writeln!(
            out,
            "\nCAS: none ran while probed ({} CAS site(s) in scope, {} window(s), {})",
            c.points,
            c.windows,
            secs(c.attached_secs)
        );
    }
    writeln!(
        out,
        "\n{:>17} {:>17} {:>7} {:>9}  CAS SITE (attempts scaled x{:.2}, {} window(s){})",
        "ATTEMPTS(est)",
        "FAILURES(est)",
        "FAIL%",
        "RAW",
        c.scale,
        c.windows,
        if c.failure_blocks > 0 {
            format!(
                "; failures of {} site(s) counted where only a failure leads, scaled x{:.2}",
                c.failure_blocks, c.failure_block_scale
            )
        } else {
            String::new()
        }
    )?;
    for site in report.cas.iter().take(top) {
        let failures = if site.failures_error > 0.1 {
            format!(
                "{} ±{:.0}%",
                group(site.failures),
                site.failures_error * 100.0
            )
        } else {
            group(site.failures)
        };
        let on = site
            .target_symbol
            .as_deref()
            .map_or(String::new(), |t| format!(" on {t}"));
        let caller = site
            .caller
            .as_ref()
            .map_or(String::new(), |f| format!(" from {}", frame(f)));
        writeln!(
            out,
            "{:>17} {:>17} {:>6.2}% {:>9}  {} ({}:{}){on}{caller}",
            group(site.attempts),
            failures,
            site.failure_ratio * 100.0,
            group(site.raw_attempts),
            site.function,
            short_path(&site.file),
            site.line,
        )?;
    }
    if c.probe_bound {
        writeln!(
            out,
            "     (the CAS probes' own traps slowed these loops inside their windows: ATTEMPTS and FAIL% are lower bounds; failures counted where only a failure leads are not slowed)"
        )?;
    }
    Ok(())
}

fn false_sharing(report: &Report, out: &mut impl Write) -> io::Result<()> {
    for fs in &report.false_sharing {
        let words: Vec<String> = fs
            .words
            .iter()
            .map(|w| {
                let rate = match w.waits_per_sec {
                    Some(waits) => format!("{} waits/s", group(waits.round() as u64)),
                    None => format!("{} writes/s", group(w.writes_per_sec.round() as u64)),
                };
                format!(
                    "{} ({} at {}:{}, {rate})",
                    w.symbol.as_deref().unwrap_or(&w.addr),
                    w.kind.as_str(),
                    short_path(&w.file),
                    w.line,
                )
            })
            .collect();
        writeln!(
            out,
            "false sharing? cache line {}: {}; {}",
            fs.cache_line,
            words.join(" and "),
            fs.suggestion
        )?;
    }
    Ok(())
}

fn sync_map_notes(report: &Report, top: usize, out: &mut impl Write) -> io::Result<()> {
    for site in report.sites.iter().take(top) {
        let Some(m) = site
            .sync_map
            .as_ref()
            .filter(|m| m.promotions + m.rebuilds > 0)
        else {
            continue;
        };
        writeln!(
            out,
            "     sync.Map.{} at {} ({}:{}): {} promotion(s), {} dirty-map rebuild(s) taking {}{}",
            m.method,
            site.function,
            short_path(&site.file),
            site.line,
            group(m.promotions),
            group(m.rebuilds),
            duration(m.rebuild_ns, m.rebuilds),
            if m.promotions_are_the_cost {
                "; promotions are the cost: each copies the map under its mutex (a Mutex-guarded map fits write-heavy use)"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

/// The estimated count, with its 95% error where that is above 10%.
fn estimate(site: &Site) -> String {
    if site.count_error > 0.1 {
        format!("{} ±{:.0}%", group(site.count), site.count_error * 100.0)
    } else {
        group(site.count)
    }
}

/// What the row says about the lock: the global's name, the method of a
/// sync.Map, how many locks share the site.
fn lock_note(site: &Site) -> String {
    let mut note = String::new();
    if let Some(m) = &site.sync_map {
        note += &format!(" sync.Map.{}", m.method);
    }
    if let Some(sym) = &site.lock_symbol {
        note += &format!(" on {sym}");
    }
    if site.locks > 1 {
        let hot = site.shards.as_ref().and_then(|s| s.hot.as_ref());
        note += &match hot {
            Some(h) => format!(
                " [{} locks; hot: {} takes {:.0}%]",
                group(site.locks as u64),
                h.symbol.as_deref().unwrap_or(&h.lock),
                h.share * 100.0
            ),
            None => format!(" [{} locks]", group(site.locks as u64)),
        };
    }
    if let Some(c) = &site.caller {
        note += &format!(" from {}", frame(c));
    }
    note
}

/// `function (file:line)`, as the tables name a frame.
fn frame(f: &super::FrameOut) -> String {
    format!("{} ({}:{})", f.function, short_path(&f.file), f.line)
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
