//! The whole tail of contended call sites, not only the hottest: six mutexes
//! from ~1.3 to ~800 waits/s, 8 s attached at the default budget, against
//! the target's own Go mutex profile over the same window (two snapshots
//! subtracted). Ten runs out of ten, Go 1.19 and the machine's Go.

mod common;

use common::{attach_json, go_fixture, require_root, GoToolchain, MutexSnapshots, Variant};

const RUNS: usize = 10;

#[test]
fn every_site_of_the_tail_is_counted_within_a_quarter() {
    require_root();
    let mut table = Vec::new();
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        let bin = go_fixture("longtail", go, Variant::Stripped);
        let (mut fx, mut snapshots) = MutexSnapshots::start(&bin, &format!("longtail-{go:?}"));
        let mut take = |fx: &mut common::Child| snapshots.take(fx);
        for run in 0..RUNS {
            let before = take(&mut fx);
            let (_, r) = attach_json(
                fx.pid(),
                &format!("longtail-{go:?}-{run}"),
                &["--duration", "8"],
            );
            let after = take(&mut fx);
            let secs = r["sampling"]["elapsed_secs"].as_f64().unwrap();
            let mut rates = Vec::new();
            for i in 0..6 {
                // Go charges the unlocker (unlockN), map-probe the waiter (waitN).
                let count = |p: &[common::GoContention]| {
                    p.iter()
                        .find(|e| e.function == format!("main.unlock{i}"))
                        .map_or(0, |e| e.count)
                };
                let go_rate = (count(&after) - count(&before)) as f64 / secs;
                let site = r["sites"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|s| s["function"] == format!("main.wait{i}"));
                let ours = site.map_or(0.0, |s| s["count"].as_f64().unwrap() / secs);
                let what = format!(
                    "{go:?} run {run} main.wait{i}: map-probe {ours:.1}/s, Go {go_rate:.1}/s"
                );
                if go_rate >= 1.0 {
                    assert!(site.is_some(), "{what}: not listed; sites {}", r["sites"]);
                }
                if go_rate >= 10.0 {
                    assert!(
                        (ours / go_rate - 1.0).abs() <= 0.25,
                        "{what}: more than 25% apart"
                    );
                }
                if let Some(s) = site {
                    assert_eq!(s["measured"], "call-site", "{what}: {s}");
                }
                rates.push((
                    ours,
                    go_rate,
                    site.map_or(0, |s| s["raw_count"].as_u64().unwrap()),
                ));
            }
            // Sites Go separates by 2x come in Go's order.
            for a in 0..6 {
                for b in 0..6 {
                    if rates[a].1 >= 2.0 * rates[b].1 && rates[b].1 >= 1.0 {
                        assert!(
                            rates[a].0 > rates[b].0,
                            "{go:?} run {run}: wait{a} vs wait{b}: {rates:?}"
                        );
                    }
                }
            }
            table.push((go, rates));
        }
    }
    for (go, rates) in &table {
        let row: Vec<String> = rates
            .iter()
            .map(|(o, g, raw)| format!("{o:.1}/{g:.1} ({raw})"))
            .collect();
        eprintln!("{go:?}: {}", row.join("  "));
    }
}
