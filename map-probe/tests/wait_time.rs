//! Wait time as a distribution and the lock named: log2 histograms kept in
//! the kernel with their quantiles, delay per site in the order the target's
//! own Go mutex profile gives, and each site's lock by address and global.

mod common;

use std::time::Duration;

use common::{
    attach_json, go_fixture, go_mutex_profile, require_root, start_fixture, tmp, GoToolchain,
    Variant,
};
use serde_json::Value;

fn site<'a>(r: &'a Value, function: &str) -> &'a Value {
    r["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["function"] == function)
        .unwrap_or_else(|| panic!("no site in {function}: {}", r["sites"]))
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

/// Three locks differing only in hold time (100 µs of work, 2 ms and 10 ms
/// asleep): map-probe's delay per site orders them as the target's own
/// mutex profile does, their counts come in Go's order too (which is not the
/// delay's: the 10 ms lock is taken least), and the quantiles follow the
/// hold times. The figures go to stderr for the README's table.
#[test]
fn delay_orders_sites_as_the_go_mutex_profile_does() {
    require_root();
    let paths = ["main.slowPath", "main.steadyPath", "main.briefPath"];
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        let bin = go_fixture("holdtimes", go, Variant::Plain);
        let profile = tmp(&format!("holdtimes-{go:?}.prof"));
        let _ = std::fs::remove_file(&profile);
        let mut fx = start_fixture(
            &bin,
            &[
                "-duration",
                "10s",
                "-mutexprofile",
                profile.to_str().unwrap(),
            ],
        );
        // On Go 1.19 every mutex site here ends at the semaphore function's RETs, a point that
        // goes with the busiest site's tier: at the default budget a site in another windowed
        // tier is timed only while both are in, and 1 run in 4 timed none of slowPath's ~220
        // waits (delay 0; see README, Known limits). At 2% slowPath is steady and timed.
        let budget: &[&str] = match go {
            GoToolchain::Go119 => &["--budget", "2"],
            _ => &[],
        };
        let args: Vec<&str> = ["--duration", "8"].iter().chain(budget).copied().collect();
        let (_, r) = attach_json(fx.pid(), &format!("holdtimes-{go:?}"), &args);
        fx.wait_for_line("exit brief=", Duration::from_secs(20));
        let go_prof = go_mutex_profile(&std::fs::read_to_string(&profile).unwrap());
        let theirs: Vec<&str> = go_prof.iter().map(|e| e.function.as_str()).collect();
        let ours: Vec<&Value> = paths.iter().map(|p| site(&r, p)).collect();
        for (s, p) in ours.iter().zip(paths) {
            let g = go_prof.iter().find(|e| e.function == p).unwrap();
            eprintln!(
                "{go:?} {p}: map-probe {} waits, delay {:.2} s/s, p50 {} µs, p99 {} µs | Go {} waits, delay {:.2} s/s (10 s)",
                s["count"],
                n(&s["wait"]["delay_ns"]) as f64 / 8e9,
                n(&s["wait"]["p50_ns"]) / 1000,
                n(&s["wait"]["p99_ns"]) / 1000,
                g.count,
                g.delay_ns as f64 / 10e9,
            );
        }
        assert_eq!(&theirs[..3], &paths, "{go:?}: Go's delay order");
        let delays: Vec<u64> = ours.iter().map(|s| n(&s["wait"]["delay_ns"])).collect();
        assert!(
            delays[0] > delays[1] && delays[1] > delays[2],
            "{go:?}: map-probe's delay order {delays:?} is not Go's {theirs:?}"
        );
        // Counts: the steady lock is taken most, then the slow one, in both.
        let count = |f: &str| go_prof.iter().find(|e| e.function == f).unwrap().count;
        assert!(
            count("main.steadyPath") > count("main.slowPath"),
            "{go_prof:?}"
        );
        assert!(
            n(&ours[1]["count"]) > n(&ours[0]["count"]),
            "{go:?}: steady {} vs slow {}",
            ours[1]["count"],
            ours[0]["count"]
        );
        // Quantiles: ordered, inside the range the waits can take, and the
        // histogram holds every timed wait.
        for s in &ours {
            let w = &s["wait"];
            let (p50, p90, p99, max) = (
                n(&w["p50_ns"]),
                n(&w["p90_ns"]),
                n(&w["p99_ns"]),
                n(&w["max_ns"]),
            );
            assert!(p50 <= p90 && p90 <= p99 && p99 <= max, "{s}");
            let in_hist: u64 = w["hist"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| n(&b["count"]))
                .sum();
            assert_eq!(in_hist, n(&w["timed"]), "{s}");
            for b in w["hist"].as_array().unwrap() {
                assert_eq!(n(&b["lt_ns"]), 2 * n(&b["ge_ns"]).max(1), "{b}");
            }
        }
        let p50 = |i: usize| n(&ours[i]["wait"]["p50_ns"]);
        assert!(
            p50(0) > p50(1) && p50(1) > p50(2),
            "{go:?}: p50s {:?}",
            [p50(0), p50(1), p50(2)]
        );
        // A 10 ms hold: a waiter waits out the rest of it, or it and another.
        assert!(
            (3_000_000..=40_000_000).contains(&p50(0)),
            "{go:?}: {}",
            ours[0]
        );
    }
}

/// Each site names its lock: the address, the global holding it (a plain
/// build has the symbol table), one lock per site; an RWMutex's readers and
/// writers are two sites, each with its own histogram, on the same lock. A
/// stripped build still gives the address.
#[test]
fn sites_name_their_lock() {
    require_root();
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        for variant in [Variant::Plain, Variant::Pie, Variant::Stripped] {
            let bin = go_fixture("contended", go, variant);
            let fx = start_fixture(&bin, &["-duration", "20s"]);
            let (_, r) = attach_json(
                fx.pid(),
                &format!("locks-{go:?}-{variant:?}"),
                &["--duration", "6"],
            );
            let what = format!("{go:?} {variant:?}");
            let mut addrs = Vec::new();
            for (f, global) in [
                ("main.hotPath", "main.hotMu"),
                ("main.warmPath", "main.warmMu"),
                ("main.readConfig", "main.configMu"),
                ("main.writeConfig", "main.configMu"),
            ] {
                let s = site(&r, f);
                assert_eq!(s["locks"], 1, "{what}: {s}");
                let lock = s["lock"].as_str().unwrap();
                assert!(lock.starts_with("0x"), "{what}: {s}");
                addrs.push(lock.to_string());
                match variant {
                    Variant::Stripped => assert!(s["lock_symbol"].is_null(), "{what}: {s}"),
                    _ => assert_eq!(s["lock_symbol"], global, "{what}: {s}"),
                }
                // Go 1.19's RLock parks through the semaphore function every
                // Mutex wait uses, so the reader site ends at RETs that sit
                // in the hottest site's tier: at the default budget it is
                // timed only while both tiers are in, and a 6 s run can time
                // none of its waits (0 of 46 and 0 of 52 in two full runs on
                // 2026-12-04, at 0.5% and 2%). Its timing is checked below
                // with every probe in.
                if !(go == GoToolchain::Go119 && f == "main.readConfig") {
                    assert!(
                        !s["wait"]["hist"].as_array().unwrap().is_empty(),
                        "{what}: {s}"
                    );
                }
            }
            if go == GoToolchain::Go119 {
                let (_, all) = attach_json(
                    fx.pid(),
                    &format!("locks-all-{go:?}-{variant:?}"),
                    &[
                        "--duration",
                        "3",
                        "--budget",
                        "unlimited",
                        "--no-map-writes",
                    ],
                );
                let s = site(&all, "main.readConfig");
                assert!(
                    !s["wait"]["hist"].as_array().unwrap().is_empty(),
                    "{what}, every probe in: {s}"
                );
            }
            assert_eq!(site(&r, "main.readConfig")["kind"], "rwmutex-read");
            // An inlined RLock continues after its CALL of the semaphore
            // whether it waited or not: its waits are timed at the callee's
            // RETs, and the histogram above shows they were.
            assert_eq!(
                site(&r, "main.readConfig")["timed_at"],
                "callee-return",
                "{what}"
            );
            assert_eq!(site(&r, "main.writeConfig")["kind"], "rwmutex-write");
            // Reader and writer wait on one RWMutex; the others are distinct.
            assert_eq!(addrs[2], addrs[3], "{what}: {addrs:?}");
            assert!(
                addrs[0] != addrs[1] && addrs[1] != addrs[2],
                "{what}: {addrs:?}"
            );
        }
    }
}
