//! Sharded maps (`github.com/orcaman/concurrent-map/v2`, a RWMutex per
//! shard): a site's waits spread over its locks, a hot shard named when one
//! takes an outsized share and none under uniform load, and the library's
//! own `Lock` line led back to the user's call (`caller`).

mod common;

use common::{attach_json, go_fixture, require_root, start_fixture, GoToolchain, Variant};
use serde_json::Value;

fn marker(what: &str) -> u64 {
    common::marker_line("shardmap", what)
}

/// The concurrent-map site whose caller is `user` (setLoop or upsertLoop).
fn site_called_from<'a>(r: &'a Value, user: &str, what: &str) -> &'a Value {
    let sites = r["sites"].as_array().unwrap();
    let s = sites
        .iter()
        .find(|s| s["caller"]["function"] == user)
        .unwrap_or_else(|| panic!("{what}: no site called from {user}: {sites:?}"));
    assert!(
        s["function"]
            .as_str()
            .unwrap()
            .starts_with("github.com/orcaman/concurrent-map/v2."),
        "{what}: the site is the library's Lock: {s}"
    );
    s
}

#[test]
fn a_hot_shard_is_named_and_uniform_load_names_none() {
    require_root();
    for (go, variant) in [
        (GoToolchain::Go119, Variant::Plain),
        (GoToolchain::Go126, Variant::Stripped),
    ] {
        let bin = go_fixture("shardmap", go, variant);
        let what = format!("{go:?} {variant:?} skewed");
        let mut fx = start_fixture(&bin, &["-keys", "skewed", "-duration", "60s"]);
        let hot_line = fx
            .output_so_far()
            .into_iter()
            .find(|l| l.starts_with("hot shard="))
            .expect("the fixture names its hot shard");
        let hot = hot_line.rsplit("lock=").next().unwrap().to_string();
        // Every wait seen, to see the spread.
        let (_, r) = attach_json(
            fx.pid(),
            &format!("shards-skewed-{go:?}"),
            &[
                "--duration",
                "4",
                "--budget",
                "unlimited",
                "--no-map-writes",
            ],
        );
        for (user, mark) in [
            ("main.upsertLoop", "// cmap Upsert"),
            ("main.setLoop", "// cmap Set"),
        ] {
            let s = site_called_from(&r, user, &what);
            assert_eq!(s["caller"]["line"], marker(mark), "{what}: {s}");
            // Every wait of a site may fall on the hot shard (one lock seen,
            // no spread to report: Go 1.19's Upsert in one run); else the
            // spread names it.
            if s["locks"] != 1 {
                let shards = &s["shards"];
                assert_eq!(
                    shards["hot"]["lock"],
                    hot.as_str(),
                    "{what}: {user}: {shards}"
                );
                assert!(
                    shards["hot"]["share"].as_f64().unwrap() >= 0.5,
                    "{what}: {shards}"
                );
            }
            assert_eq!(s["lock"], hot.as_str(), "{what}: {s}");
        }
        // At the default budget: the lock waited on most is the hot one.
        let (out, r) = attach_json(
            fx.pid(),
            &format!("shards-default-{go:?}"),
            &["--duration", "6"],
        );
        let s = site_called_from(&r, "main.upsertLoop", &what);
        assert_eq!(s["lock"], hot.as_str(), "{what}: {s}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("from main.upsertLoop"), "{what}: {text}");
        fx.signal(libc::SIGTERM);
        fx.wait();

        let what = format!("{go:?} {variant:?} uniform");
        let fx = start_fixture(&bin, &["-keys", "uniform", "-duration", "60s"]);
        let (_, r) = attach_json(
            fx.pid(),
            &format!("shards-uniform-{go:?}"),
            &[
                "--duration",
                "4",
                "--budget",
                "unlimited",
                "--no-map-writes",
            ],
        );
        for user in ["main.upsertLoop", "main.setLoop"] {
            let s = site_called_from(&r, user, &what);
            let shards = &s["shards"];
            assert!(
                shards["locks"].as_u64().unwrap() >= 8,
                "{what}: {user}: {shards}"
            );
            assert!(shards["hot"].is_null(), "{what}: {user}: {shards}");
        }
    }
}
