//! map-probe attached to live Go fixtures, as root, with real BPF: the sites it
//! ranks, checked against the fixture's source, Go's own mutex profile and
//! bpftrace counting the same uprobe.

mod common;

use std::{collections::HashSet, path::Path, process::Command, time::Duration};

use common::{
    go_fixture, map_probe, read_json as json, require_root, tmp, Child, GoToolchain, Variant,
};
use serde_json::Value;

/// The line of the one statement in contended/main.go that is `stmt`.
fn source_line(stmt: &str) -> u32 {
    common::fixture_line("contended", stmt, |l| l == stmt)
}

fn start_contended(bin: &Path, extra: &[&str]) -> Child {
    let mut args = vec!["-duration", "60s"];
    args.extend_from_slice(extra);
    let mut c = Child::spawn(bin, &args);
    c.wait_for_line("ready pid=", Duration::from_secs(10));
    c
}

fn site<'a>(report: &'a Value, function: &str, kind: &str) -> Option<&'a Value> {
    report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["function"] == function && s["kind"] == kind)
}

/// Every build a Go service ships as: both toolchains; plain, stripped, PIE,
/// externally linked, and stripped + external like Debian's own servers.
#[test]
fn ranks_call_sites_on_every_kind_of_build() {
    require_root();
    let expect = [
        ("main.hotPath", "mutex", "hotMu.Lock()"),
        ("main.warmPath", "mutex", "warmMu.Lock()"),
        ("main.coolPath", "mutex", "coolMu.Lock()"),
        ("main.readConfig", "rwmutex-read", "configMu.RLock()"),
        ("main.writeConfig", "rwmutex-write", "configMu.Lock()"),
    ];
    // Go 1.27 too: it moved moduledata.gofunc, and with it every inlined
    // frame (sites named internal/sync/mutex.go:70 until this was fixed).
    for go in [GoToolchain::Go119, GoToolchain::Go126, GoToolchain::Go127] {
        for variant in [
            Variant::Plain,
            Variant::Stripped,
            Variant::Pie,
            Variant::External,
            Variant::ExternalStripped,
        ] {
            let what = format!("{go:?}/{variant:?}");
            let bin = go_fixture("contended", go, variant);
            let fixture = start_contended(&bin, &[]);
            let out_json = tmp(&format!("attach-{go:?}-{variant:?}.json"));
            let out_svg = tmp(&format!("attach-{go:?}-{variant:?}.svg"));
            let pid = fixture.pid().to_string();
            let out = map_probe(&[
                "attach",
                "--pid",
                &pid,
                "--duration",
                "4",
                "--budget",
                "unlimited",
                "--json",
                out_json.to_str().unwrap(),
                "--flamegraph",
                out_svg.to_str().unwrap(),
            ]);
            assert!(
                out.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let r = json(&out_json);
            let want_go = go.version_prefix();
            assert!(
                r["target"]["go_version"]
                    .as_str()
                    .unwrap()
                    .starts_with(want_go),
                "{what}"
            );
            assert_eq!(r["target"]["pid"], fixture.pid(), "{what}");
            assert_eq!(r["drops"]["site_map_full"], 0, "{what}");
            assert!(
                r["sampling"]["raw_hits"].as_u64().unwrap() > 100,
                "{what}: {r}"
            );
            for (function, kind, stmt) in expect {
                let s = site(&r, function, kind).unwrap_or_else(|| {
                    panic!("{what}: no {kind} site in {function}: {}", r["sites"])
                });
                assert!(
                    s["file"]
                        .as_str()
                        .unwrap()
                        .ends_with("fixtures/contended/main.go"),
                    "{what}: {s}"
                );
                assert_eq!(
                    s["line"],
                    source_line(stmt),
                    "{what}: {function} should point at `{stmt}`"
                );
                assert!(s["count"].as_u64().unwrap() > 0, "{what}: {s}");
                let stack = s["stack"].as_array().unwrap();
                assert!(stack.len() >= 3, "{what}: {s}");
                // Innermost first: the lock (the call of its slow path, or the
                // semaphore when the stack is a shared probe's), then the user's function.
                let top = stack[0]["function"].as_str().unwrap();
                assert!(
                    top.starts_with("sync.") || top.starts_with("internal/sync."),
                    "{what}: {s}"
                );
                assert_eq!(s["measured"], "call-site", "{what}: {s}");
                assert!(
                    stack.iter().any(|f| f["function"] == function),
                    "{what}: {s}"
                );
                assert!(stack
                    .iter()
                    .all(|f| f["line"].as_u64().is_some() && f["file"].is_string()));
            }
            // The three mutexes are contended in a clear order.
            let count = |f| site(&r, f, "mutex").unwrap()["count"].as_u64().unwrap();
            assert!(
                count("main.hotPath") > count("main.warmPath"),
                "{what}: {}",
                r["sites"]
            );
            assert!(
                count("main.warmPath") > count("main.coolPath"),
                "{what}: {}",
                r["sites"]
            );
            let svg = std::fs::read_to_string(&out_svg).unwrap();
            let frame = format!(
                "main.hotPath contended/main.go:{}",
                source_line("hotMu.Lock()")
            );
            assert!(
                svg.contains(&frame),
                "{what}: flamegraph frames are `function file:line`, e.g. {frame}"
            );
            assert!(
                svg.contains(&format!("pid {}", fixture.pid())),
                "{what}: title names the target"
            );
            drop(fixture);
        }
    }
}

/// Every Go release from 1.19 to the newest: the lock sites name the
/// user's function, file and line, with the right kinds, on a stripped PIE
/// build, and the fatal map crash is caught with the throwing writer.
#[test]
fn every_go_release_names_sites_and_catches_the_crash() {
    require_root();
    let crash_line = common::fixture_line("mapcrash", "shared[", |l| l.starts_with("shared["));
    for go in GoToolchain::every_release() {
        let what = format!("{go:?}");
        let bin = go_fixture("contended", go, Variant::Stripped);
        let fixture = start_contended(&bin, &[]);
        let (out, r) = common::attach_json(
            fixture.pid(),
            &format!("release-{}", go.tag()),
            &[
                "--duration",
                "2",
                "--budget",
                "unlimited",
                "--no-map-writes",
            ],
        );
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            r["target"]["go_version"]
                .as_str()
                .unwrap()
                .starts_with(go.version_prefix()),
            "{what}: {}",
            r["target"]
        );
        for (function, kind, stmt) in [
            ("main.hotPath", "mutex", "hotMu.Lock()"),
            ("main.warmPath", "mutex", "warmMu.Lock()"),
            ("main.readConfig", "rwmutex-read", "configMu.RLock()"),
            ("main.writeConfig", "rwmutex-write", "configMu.Lock()"),
        ] {
            let s = site(&r, function, kind)
                .unwrap_or_else(|| panic!("{what}: no {kind} site in {function}: {}", r["sites"]));
            assert!(
                s["file"]
                    .as_str()
                    .unwrap()
                    .ends_with("fixtures/contended/main.go"),
                "{what}: {s}"
            );
            assert_eq!(
                s["line"],
                source_line(stmt),
                "{what}: {function} should point at `{stmt}`"
            );
        }
        drop(fixture);

        let crash = go_fixture("mapcrash", go, Variant::Plain);
        let fixture = Child::spawn(&crash, &["-delay", "1s"]);
        let (out, r) = common::attach_json(
            fixture.pid(),
            &format!("release-crash-{}", go.tag()),
            &["--duration", "30"],
        );
        assert_eq!(
            out.status.code(),
            Some(3),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let fatal = r["risks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["kind"] == "fatal")
            .unwrap_or_else(|| panic!("{what}: no fatal risk: {}", r["risks"]));
        assert_eq!(fatal["message"], "concurrent map writes", "{what}");
        assert!(
            fatal["writers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["state"] == "throwing"
                    && w["function"] == "main.writer"
                    && w["line"] == crash_line),
            "{what}: the throwing writer at mapcrash/main.go:{crash_line}: {fatal}"
        );
    }
}

/// Go's own mutex profile ranks the same top three functions. It charges
/// contention at Unlock and weighs by delay, map-probe counts waits at the
/// waiter; each fixture function locks and unlocks its own mutex, so the
/// functions are comparable.
#[test]
fn top_sites_match_the_go_mutex_profile() {
    require_root();
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        let bin = go_fixture("contended", go, Variant::Plain);
        let profile = tmp(&format!("mutexprofile-{go:?}.txt"));
        let _ = std::fs::remove_file(&profile);
        let mut fixture = start_contended(
            &bin,
            &[
                "-rw=false",
                "-duration",
                "8s",
                "-mutexprofile",
                profile.to_str().unwrap(),
            ],
        );
        let out_json = tmp(&format!("accuracy-{go:?}.json"));
        let pid = fixture.pid().to_string();
        // Default governor: the ranking must survive windowed sampling.
        let out = map_probe(&[
            "attach",
            "--pid",
            &pid,
            "--duration",
            "6",
            "--json",
            out_json.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        fixture.wait_for_line("exit reason=", Duration::from_secs(20));
        let ours: Vec<String> = distinct_functions(
            json(&out_json)["sites"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["function"].as_str().unwrap().to_string()),
        );
        let theirs: Vec<String> =
            common::go_mutex_profile(&std::fs::read_to_string(&profile).unwrap())
                .into_iter()
                .map(|e| e.function)
                .collect();
        eprintln!(
            "{go:?}: map-probe top {:?}, Go mutex profile top {:?}",
            &ours[..3.min(ours.len())],
            &theirs[..3.min(theirs.len())]
        );
        let a: HashSet<_> = ours.iter().take(3).collect();
        let b: HashSet<_> = theirs.iter().take(3).collect();
        assert_eq!(
            a, b,
            "{go:?}: top-3 functions differ: map-probe {ours:?} vs Go {theirs:?}"
        );
    }
}

fn distinct_functions(it: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen = Vec::new();
    for f in it {
        if !seen.contains(&f) {
            seen.push(f);
        }
    }
    seen
}

/// bpftrace, attached to the same probe point, counts the same hits over a
/// burst of exactly N lock iterations that starts after both are attached and
/// ends before both detach.
#[test]
fn raw_hits_agree_with_bpftrace() {
    require_root();
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        let bin = go_fixture("contended", go, Variant::Plain);
        let mut fixture = Child::spawn(&bin, &["-duration", "0", "-rw=false", "-burst", "60000"]);
        fixture.wait_for_line("ready pid=", Duration::from_secs(10));
        let pid = fixture.pid();
        // map-probe probes every CALL of lockSlow (one point per call site);
        // bpftrace probes lockSlow's first instruction: the same calls.
        let sym = match go {
            GoToolchain::Go119 => "sync.(*Mutex).lockSlow",
            _ => "internal/sync.(*Mutex).lockSlow",
        };
        let script = format!(
            "uprobe:{}:\"{sym}\" /pid == {pid}/ {{ @hits = count(); }} END {{ print(@hits); clear(@hits); }}",
            bin.display()
        );
        let mut bt = Child::spawn_cmd(common::command("bpftrace", &["-e", &script]));
        bt.wait_for_line("Attaching", Duration::from_secs(30));
        let out_json = tmp(&format!("bpftrace-{go:?}.json"));
        let mut mp = Child::spawn_cmd(common::command(
            env!("CARGO_BIN_EXE_map-probe"),
            &[
                "attach",
                "--pid",
                &pid.to_string(),
                "--budget",
                "unlimited",
                "--json",
                out_json.to_str().unwrap(),
            ],
        ));
        std::thread::sleep(Duration::from_secs(2));
        fixture.signal(libc::SIGUSR1);
        fixture.wait_for_line("burst done", Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(500));
        mp.signal(libc::SIGINT);
        assert!(mp.wait().success());
        bt.signal(libc::SIGINT);
        let line = bt.wait_for_line("@hits: ", Duration::from_secs(10));
        let theirs: f64 = line.trim_start_matches("@hits: ").trim().parse().unwrap();
        let r = json(&out_json);
        let ours: f64 = r["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["symbol"] == sym)
            .map(|p| p["raw_hits"].as_u64().unwrap() as f64)
            .sum();
        eprintln!("{go:?}: {sym}: map-probe {ours} hits, bpftrace {theirs}");
        assert!(
            theirs > 1000.0,
            "{go:?}: the burst should contend: bpftrace saw {theirs}"
        );
        assert!(
            (ours - theirs).abs() <= theirs * 0.01,
            "{go:?}: map-probe {ours} vs bpftrace {theirs}: more than 1% apart"
        );
    }
}

/// `run` starts the program with the probes already in place.
#[test]
fn run_probes_from_the_first_instruction() {
    require_root();
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        let bin = go_fixture("contended", go, Variant::Stripped);
        let out_json = tmp(&format!("run-{go:?}.json"));
        let out = map_probe(&[
            "run",
            "--budget",
            "unlimited",
            "--json",
            out_json.to_str().unwrap(),
            "--",
            bin.to_str().unwrap(),
            "-duration",
            "3s",
        ]);
        assert!(
            out.status.success(),
            "{go:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = json(&out_json);
        assert_eq!(r["end"], "target-exited");
        assert_eq!(
            r["sampling"]["windows"], 1,
            "{go:?}: one window, opened before the program ran"
        );
        assert!(
            site(&r, "main.hotPath", "mutex").is_some(),
            "{go:?}: {}",
            r["sites"]
        );
    }
}

/// A target in its own mount namespace, running a binary that exists only
/// there (a tmpfs mounted inside it): map-probe reaches it through /proc.
#[test]
fn attaches_across_mount_namespaces() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Stripped);
    let script = format!(
        "mkdir -p /tmp/mp-ns && mount -t tmpfs none /tmp/mp-ns && cp {} /tmp/mp-ns/contended && exec /tmp/mp-ns/contended -duration 30s",
        bin.display()
    );
    let mut fixture = Child::spawn_cmd(common::command(
        "unshare",
        &["--mount", "--propagation", "private", "sh", "-c", &script],
    ));
    let line = fixture.wait_for_line("ready pid=", Duration::from_secs(10));
    let pid = line.trim_start_matches("ready pid=").trim().to_string();
    assert!(
        !Path::new("/tmp/mp-ns/contended").exists(),
        "the binary must not be visible from the host's mount namespace"
    );
    let out_json = tmp("mountns.json");
    let out = map_probe(&[
        "attach",
        "--pid",
        &pid,
        "--duration",
        "3",
        "--budget",
        "unlimited",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out_json);
    assert_eq!(r["target"]["exe"], "/tmp/mp-ns/contended");
    assert!(
        site(&r, "main.hotPath", "mutex").is_some(),
        "{}",
        r["sites"]
    );
}

/// The live status line: refreshed on a terminal, absent when stdout is not one.
#[test]
fn status_line_only_on_a_terminal() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let fixture = start_contended(&bin, &[]);
    let cmd = format!(
        "{} attach --pid {} --duration 2",
        env!("CARGO_BIN_EXE_map-probe"),
        fixture.pid()
    );
    // `script` runs the command on a pseudo-terminal.
    let tty = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    assert!(
        shown.contains("\r\x1b[Kmap-probe: ")
            && shown.contains(" sites, ")
            && shown.contains(" events, ")
            && shown.contains(" drops, "),
        "status line on a terminal: {shown:?}"
    );
    let piped = map_probe(&[
        "attach",
        "--pid",
        &fixture.pid().to_string(),
        "--duration",
        "2",
    ]);
    let text = String::from_utf8_lossy(&piped.stdout);
    assert!(
        !text.contains('\r') && !text.contains("\x1b["),
        "no status line into a pipe: {text:?}"
    );
    assert!(text.contains("RANK"), "{text}");
}

/// The budget's hit cost is measured on this host at start (a probe on a
/// function of map-probe's own, timed with and without it) unless
/// `--hit-cost-us` gives it; each site's estimate carries its error.
#[test]
fn hit_cost_is_measured_unless_given() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let fixture = common::start_fixture(&bin, &["-duration", "20s"]);
    let (_, r) = common::attach_json(fixture.pid(), "hitcost-measured", &["--duration", "2"]);
    let s = &r["sampling"];
    let us = s["trap_us"].as_f64().unwrap();
    // A trap: well under a microsecond on bare metal, ~10-30 µs on VMs.
    assert!((0.3..500.0).contains(&us), "{s}");
    // The budget charges twice the trap: the goroutines queued behind a
    // trapped lock path wait it out too.
    assert!(
        (s["hit_cost_us"].as_f64().unwrap() - 2.0 * us).abs() < 0.01,
        "{s}"
    );
    eprintln!("measured trap: {us:.2} µs");
    for site in r["sites"].as_array().unwrap() {
        let (raw, scale, err) = (
            site["raw_count"].as_f64().unwrap(),
            site["scale"].as_f64().unwrap(),
            site["count_error"].as_f64().unwrap(),
        );
        assert!(scale >= 1.0, "{site}");
        if scale > 1.0 {
            // A Poisson count's error at least; wider when a few briefly observed
            // stretches stand for much of the run (each slot scaled on its own).
            let poisson = 1.96 / raw.sqrt();
            assert!(err >= poisson - 1e-9 && err <= 10.0 * poisson, "{site}");
        } else {
            assert_eq!(err, 0.0, "{site}");
        }
    }
    let (_, r) = common::attach_json(
        fixture.pid(),
        "hitcost-given",
        &["--duration", "1", "--hit-cost-us", "7"],
    );
    assert!(r["sampling"]["trap_us"].is_null());
    assert_eq!(r["sampling"]["hit_cost_us"].as_f64(), Some(7.0));
}
