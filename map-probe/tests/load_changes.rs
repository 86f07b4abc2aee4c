//! Estimates when load comes and goes: the `bursts` fixture (a steady lock, a lock hammered
//! 0.5 s in every 3 s, a batch of ~70 waits in 80 ms every 2 s, a lock busy 4 s of every 8,
//! and a tail of steady locks), map-probe attached 12 s at its default budget, against Go's own
//! mutex profile over the same window (two snapshots, subtracted). Every site-run is printed
//! with the bars computed over all sites with at least 50 waits in the window: within
//! ±35% of Go's count, none beyond ±60%, no two sites Go separates by 1.5x in the wrong order,
//! Go's count inside the printed 95% interval.
//!
//! What it asserts is what holds today: the sites whose load is steady or changes slowly
//! (`steady`, `onoff`, the tail) within ±35% and in Go's order, every judged site listed, and
//! the JSON naming its estimator. The burst and batch sites do not hold yet (0.32-1.46x and
//! 0.67-3.98x of Go's count in four runs on 2026-12-08, with estimates scaled slot by slot;
//! 0.18-3.67x and 1.10-2.57x before): windows whose length and spacing follow the rate they
//! see, a few windows a second at most, cannot sample an 80 ms batch. Their numbers are
//! printed, not asserted: issue 20 stays open on them.
//!
//! The suite runs `MAP_PROBE_ACCURACY_RUNS` runs per Go release (default 2);
//! `cargo xtask accuracy` runs 10.

mod common;

use common::{attach_json, go_fixture, require_root, GoToolchain, MutexSnapshots, Variant};

const SITES: [&str; 7] = [
    "steady", "burst", "batch", "onoff", "tail40", "tail12", "tail4",
];

/// Sites whose load is steady or changes over seconds, not within a window's reach.
const SLOW: [&str; 5] = ["steady", "onoff", "tail40", "tail12", "tail4"];

struct SiteRun {
    go: GoToolchain,
    run: usize,
    site: &'static str,
    ours: f64,
    raw: u64,
    theirs: f64,
    error: f64,
}

impl SiteRun {
    fn ratio(&self) -> f64 {
        self.ours / self.theirs
    }

    fn covered(&self) -> bool {
        (self.ours - self.theirs).abs() <= self.ours * self.error
    }
}

#[test]
fn estimates_hold_when_load_comes_and_goes() {
    require_root();
    let runs: usize = std::env::var("MAP_PROBE_ACCURACY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut all: Vec<SiteRun> = Vec::new();
    let mut inversions = Vec::new();
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        let bin = go_fixture("bursts", go, Variant::Stripped);
        let (mut fx, mut snapshots) = MutexSnapshots::start(&bin, &format!("bursts-{go:?}"));
        let mut take = |fx: &mut common::Child| snapshots.take(fx);
        for run in 0..runs {
            let before = take(&mut fx);
            let (out, r) = attach_json(
                fx.pid(),
                &format!("bursts-{go:?}-{run}"),
                &["--duration", "12"],
            );
            let after = take(&mut fx);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                r["sampling"]["method"]
                    .as_str()
                    .unwrap()
                    .contains("slot by slot"),
                "the JSON names the estimator: {}",
                r["sampling"]["method"]
            );
            let mut this: Vec<SiteRun> = Vec::new();
            for (i, name) in SITES.iter().enumerate() {
                let count = |p: &[common::GoContention]| {
                    p.iter()
                        .find(|e| e.function == format!("main.unlock{i}"))
                        .map_or(0, |e| e.count)
                };
                let theirs = count(&after).saturating_sub(count(&before)) as f64;
                let site = r["sites"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|s| s["function"] == format!("main.wait{i}"));
                this.push(SiteRun {
                    go,
                    run,
                    site: name,
                    ours: site.map_or(0.0, |s| s["count"].as_f64().unwrap()),
                    raw: site.map_or(0, |s| s["raw_count"].as_u64().unwrap()),
                    theirs,
                    error: site.map_or(0.0, |s| s["count_error"].as_f64().unwrap()),
                });
            }
            for a in &this {
                for b in &this {
                    if a.theirs >= 50.0 && a.theirs >= 1.5 * b.theirs && a.ours <= b.ours {
                        inversions.push(format!(
                            "{go:?} run {run}: Go has {} {:.0} > {} {:.0}, map-probe {:.0} <= {:.0}",
                            a.site, a.theirs, b.site, b.theirs, a.ours, b.ours
                        ));
                    }
                }
            }
            all.extend(this);
        }
    }
    let judged: Vec<&SiteRun> = all.iter().filter(|s| s.theirs >= 50.0).collect();
    for s in &all {
        eprintln!(
            "{:?} run {} {:<7} Go {:>6.0}  map-probe {:>7.0} ±{:>3.0}% (raw {:>5})  x{:.2}{}{}",
            s.go,
            s.run,
            s.site,
            s.theirs,
            s.ours,
            s.error * 100.0,
            s.raw,
            s.ratio(),
            if s.theirs >= 50.0 {
                ""
            } else {
                "  (under 50: not judged)"
            },
            if s.theirs >= 50.0 && !s.covered() {
                "  NOT COVERED"
            } else {
                ""
            }
        );
    }
    let n = judged.len() as f64;
    let within35 = judged
        .iter()
        .filter(|s| (s.ratio() - 1.0).abs() <= 0.35)
        .count();
    let beyond60: Vec<String> = judged
        .iter()
        .filter(|s| (s.ratio() - 1.0).abs() > 0.60)
        .map(|s| format!("{:?} run {} {} x{:.2}", s.go, s.run, s.site, s.ratio()))
        .collect();
    let covered = judged.iter().filter(|s| s.covered()).count();
    eprintln!(
        "{} site-runs judged: {within35} within ±35% ({:.0}%), {} beyond ±60%, Go's count inside \
         the printed interval in {covered} ({:.0}%); {} rank inversions",
        judged.len(),
        within35 as f64 / n * 100.0,
        beyond60.len(),
        covered as f64 / n * 100.0,
        inversions.len()
    );
    assert!(judged.len() >= 8, "too few sites judged: {}", judged.len());
    for s in &judged {
        assert!(s.raw > 0, "{:?} run {} {}: not listed", s.go, s.run, s.site);
    }
    let slow: Vec<&&SiteRun> = judged.iter().filter(|s| SLOW.contains(&s.site)).collect();
    let off: Vec<String> = slow
        .iter()
        .filter(|s| (s.ratio() - 1.0).abs() > 0.35)
        .map(|s| format!("{:?} run {} {} x{:.2}", s.go, s.run, s.site, s.ratio()))
        .collect();
    assert!(off.is_empty(), "slow-changing sites beyond ±35%: {off:?}");
    let slow_inversions: Vec<&String> = inversions
        .iter()
        .filter(|i| {
            SLOW.iter()
                .filter(|n| i.contains(&format!(" {n} ")))
                .count()
                == 2
        })
        .collect();
    assert!(
        slow_inversions.is_empty(),
        "slow-changing sites ranked the wrong way round: {slow_inversions:?}"
    );
}
