//! sync.Map's contention charged to the user's call of the sync.Map method,
//! with kind `sync.Map`, in both of its eras: the map's mutex plus dirty-map
//! promotions and rebuilds up to Go 1.23, the hash trie's node locks from 1.24.

mod common;

use common::{attach_json, go_fixture, require_root, start_fixture, GoToolchain, Variant};
use serde_json::Value;

fn line(prefix: &str) -> u64 {
    common::fixture_line("syncmap", prefix, |l| l.starts_with(prefix)) as u64
}

/// The sync.Map sites at `function`.
fn sites_at<'a>(r: &'a Value, function: &str) -> Vec<&'a Value> {
    r["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["function"] == function)
        .collect()
}

fn check_site(r: &Value, function: &str, line: u64, method: &str, what: &str) -> Value {
    let at = sites_at(r, function);
    assert_eq!(
        at.len(),
        1,
        "{what}: one site in {function}: {}",
        r["sites"]
    );
    let s = at[0];
    assert_eq!(s["kind"], "sync.Map", "{what}: {s}");
    assert_eq!(s["line"], line, "{what}: {s}");
    assert_eq!(s["sync_map"]["method"], method, "{what}: {s}");
    assert!(
        s["file"].as_str().unwrap().ends_with("syncmap/main.go"),
        "{s}"
    );
    s.clone()
}

/// Up to 1.23: Store of a fresh key and Load of a key still only in the
/// dirty map both take the map's mutex; with every probe in, each miss that
/// promotes the dirty map and each O(n) rebuild after one is counted (the
/// fixture promotes about every 1,000 misses) and the rebuilds are timed.
#[test]
fn sync_map_mutex_era_charges_the_users_calls_and_counts_promotions() {
    require_root();
    let builds = [
        (GoToolchain::Go119, Variant::Plain),
        (GoToolchain::Release(23), Variant::Stripped),
    ];
    for (go, variant) in builds {
        let bin = go_fixture("syncmap", go, variant);
        let fx = start_fixture(&bin, &["-duration", "40s", "-keys", "300"]);
        let what = format!("{go:?} {variant:?}");
        let (_, r) = attach_json(fx.pid(), &format!("syncmap-{go:?}"), &["--duration", "8"]);
        let store = check_site(&r, "main.storer", line("m.Store(k, k)"), "Store", &what);
        let load = check_site(&r, "main.loader", line("m.Load(k)"), "Load", &what);
        for s in [&store, &load] {
            assert!(s["count"].as_u64().unwrap() > 0, "{what}: {s}");
            assert!(s["wait"]["p50_ns"].as_u64().unwrap() > 0, "{what}: {s}");
            // The map's mutex is its first field: the lock is the map.
            if variant == Variant::Plain {
                assert_eq!(s["lock_symbol"], "main.m", "{what}: {s}");
            }
        }
        // Every probe in (and no map-write probes, whose traps would slow
        // the rebuilds they sit inside): every promotion and rebuild seen.
        let (out, r) = attach_json(
            fx.pid(),
            &format!("syncmap-all-{go:?}"),
            &[
                "--duration",
                "4",
                "--budget",
                "unlimited",
                "--no-map-writes",
            ],
        );
        let store = check_site(&r, "main.storer", line("m.Store(k, k)"), "Store", &what);
        check_site(&r, "main.loader", line("m.Load(k)"), "Load", &what);
        let sum = |field: &str| -> i64 {
            r["sites"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|s| s["sync_map"][field].as_i64())
                .sum()
        };
        let (p, b) = (sum("promotions"), sum("rebuilds"));
        // Loads (and the odd Delete) miss and promote; the fresh-key Store
        // that follows each promotion rebuilds.
        assert!(p >= 3 && b >= 3, "{what}: {p} promotions, {b} rebuilds");
        assert!((p - b).abs() <= 2, "{what}: {p} promotions, {b} rebuilds");
        assert_eq!(
            store["sync_map"]["rebuilds"].as_i64(),
            Some(b),
            "{what}: {store}"
        );
        assert!(
            store["sync_map"]["rebuild_ns"].as_u64().unwrap() > 0,
            "{what}: {store}"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("dirty-map rebuild(s)"), "{what}: {text}");
    }
}

/// From 1.24 a Store to a hot key waits on the lock of the trie node that
/// holds it: kind sync.Map at the user's line, and no promotions (there are
/// none in a hash trie).
#[test]
fn sync_map_hash_trie_era_charges_the_users_calls() {
    require_root();
    let go = GoToolchain::Go126;
    let bin = go_fixture("syncmap", go, Variant::Stripped);
    let fx = start_fixture(&bin, &["-duration", "20s", "-hot", "4"]);
    let (_, r) = attach_json(fx.pid(), "syncmap-trie", &["--duration", "8"]);
    let s = check_site(
        &r,
        "main.hotStorer",
        line("m.Store(-(i%hot)-1, i)"),
        "Store",
        "Go126",
    );
    assert!(s["count"].as_u64().unwrap() > 0, "{s}");
    let locks = s["locks"].as_u64().unwrap();
    assert!((1..=4).contains(&locks), "node locks of 4 keys: {s}");
    assert_eq!(s["sync_map"]["rebuilds"], 0, "{s}");
    assert_eq!(s["sync_map"]["promotions"], 0, "{s}");
}
