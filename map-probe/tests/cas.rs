//! Compare-and-swap retries per call site, against the CAS loop's own
//! count of its attempts and failures (`fixtures/casloop`), on Go 1.19 and
//! the machine's Go.

mod common;

use std::time::Duration;

use common::{attach_json, go_fixture, require_root, start_fixture, GoToolchain, Variant};
use serde_json::Value;

/// The fixture's own totals, printed on SIGUSR1.
fn counts(fx: &mut common::Child) -> (u64, u64) {
    fx.signal(libc::SIGUSR1);
    let line = fx.wait_for_line("counts ", Duration::from_secs(10));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    (field("attempts="), field("failures="))
}

/// The program's totals around and inside one map-probe run of `secs`:
/// before it starts, `inner_from` into it, `inner_secs` later, and after it
/// ends; with the report and the terminal text.
struct Counted {
    outer: [(u64, u64); 2],
    inner: [(u64, u64); 2],
    inner_secs: f64,
    report: Value,
    text: String,
}

fn attach_counting(
    fx: &mut common::Child,
    name: &str,
    secs: u32,
    args: &[&str],
    inner_from: Duration,
    inner_secs: u64,
) -> Counted {
    let json = common::tmp(&format!("{name}.json"));
    let _ = std::fs::remove_file(&json);
    let outer0 = counts(fx);
    let probe = std::process::Command::new(common::map_probe_bin())
        .args([
            "attach",
            "--pid",
            &fx.pid().to_string(),
            "--duration",
            &secs.to_string(),
        ])
        .args(args)
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start map-probe");
    std::thread::sleep(inner_from);
    let t = std::time::Instant::now();
    let inner0 = counts(fx);
    std::thread::sleep(Duration::from_secs(inner_secs));
    let inner1 = counts(fx);
    let inner_secs = t.elapsed().as_secs_f64();
    let out = probe.wait_with_output().expect("wait for map-probe");
    assert!(
        out.status.success(),
        "{name}: map-probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outer1 = counts(fx);
    Counted {
        outer: [outer0, outer1],
        inner: [inner0, inner1],
        inner_secs,
        report: common::read_json(&json),
        text: String::from_utf8_lossy(&out.stdout).to_string(),
    }
}

fn the_site<'a>(r: &'a Value, what: &str) -> &'a Value {
    let cas = r["cas"].as_array().unwrap();
    assert_eq!(cas.len(), 1, "{what}: one CAS site in casloop: {cas:?}");
    let s = &cas[0];
    let line = common::marker_line("casloop", "// CAS site");
    assert_eq!(s["function"], "main.casAdd", "{what}: {s}");
    assert_eq!(s["line"], line, "{what}: {s}");
    assert!(
        s["file"].as_str().unwrap().ends_with("casloop/main.go"),
        "{what}: {s}"
    );
    // casAdd keeps no frame: its caller comes from the return address.
    assert_eq!(s["stack"][1]["function"], "main.writer", "{what}: {s}");
    s
}

/// With every CAS trapped (`--budget unlimited`), map-probe's attempts and
/// failures are the program's own. The program's totals are read twice
/// while map-probe is surely attached (from 2.5 s into its 7 s run, 2 s
/// apart) and once before and after it: map-probe must have seen at least
/// the inner stretch and at most the outer one.
#[test]
fn cas_attempts_and_failures_match_the_programs_own_count() {
    require_root();
    for (go, variant) in [
        (GoToolchain::Go119, Variant::Plain),
        (GoToolchain::Go126, Variant::Stripped),
    ] {
        let what = format!("{go:?} {variant:?}");
        let bin = go_fixture("casloop", go, variant);
        let mut fx = start_fixture(&bin, &["-writers", "4", "-spin", "300", "-duration", "60s"]);
        let c = attach_counting(
            &mut fx,
            &format!("cas-all-{go:?}"),
            7,
            &["--budget", "unlimited", "--no-map-writes"],
            Duration::from_millis(2500),
            2,
        );
        let ([outer0, outer1], [inner0, inner1], r) = (c.outer, c.inner, &c.report);
        let s = the_site(r, &what);
        let seen = s["raw_attempts"].as_u64().unwrap();
        let seen_failed = s["raw_failures"].as_u64().unwrap();
        let (inner, outer) = (inner1.0 - inner0.0, outer1.0 - outer0.0);
        let (inner_f, outer_f) = (inner1.1 - inner0.1, outer1.1 - outer0.1);
        eprintln!(
            "{what}: map-probe {seen} attempts, {seen_failed} failed; program {inner}..{outer} attempts, {inner_f}..{outer_f} failed"
        );
        assert_eq!(s["scale"], 1.0, "{what}: {s}");
        // The rate while attached against the program's over the inner 2 s
        // (both slowed alike by the traps).
        let attached = r["sampling"]["cas"]["attached_secs"].as_f64().unwrap();
        let (ours, theirs) = (seen as f64 / attached, inner as f64 / c.inner_secs);
        assert!(
            (ours / theirs - 1.0).abs() < 0.25,
            "{what}: {ours:.0} CAS/s attached against the program's {theirs:.0}/s"
        );
        // A snapshot races the CASes in flight on the other writers.
        let slack = 4 * 256;
        assert!(
            seen + slack >= inner && seen <= outer + slack,
            "{what}: map-probe saw {seen} attempts; the program made {inner}..{outer}"
        );
        assert!(outer_f > 0, "{what}: four writers never collided");
        // Two probes, each seeing every failure: after the CAS (ZF clear)
        // and on the block only a failure reaches. They go in and out a
        // moment apart, no more.
        let cas = &r["sampling"]["cas"];
        assert_eq!(s["failures_from"], "failure-block", "{what}: {s}");
        let (after, block) = (
            cas["raw_failures"].as_u64().unwrap(),
            cas["raw_failure_block_hits"].as_u64().unwrap(),
        );
        assert!(
            after.abs_diff(block) <= 2 + after / 100,
            "{what}: {after} failures after the CAS, {block} on the failure block"
        );
        assert!(
            seen_failed + slack >= inner_f && seen_failed <= outer_f + slack,
            "{what}: map-probe saw {seen_failed} failures; the program had {inner_f}..{outer_f}"
        );
        if variant == Variant::Plain {
            assert_eq!(s["target_symbol"], "main.shared+64", "{what}: {s}");
        }
        assert_eq!(s["targets"], 1, "{what}: {s}");
        assert!(
            r["false_sharing"].as_array().unwrap().is_empty(),
            "{what}: one word written from four goroutines is true sharing: {}",
            r["false_sharing"]
        );
    }
}

/// One writer: no CAS can fail, and none is reported failed, whether every
/// CAS is seen or a sample.
#[test]
fn a_single_writer_never_fails() {
    require_root();
    let bin = go_fixture("casloop", GoToolchain::Go126, Variant::Plain);
    let fx = start_fixture(&bin, &["-writers", "1", "-spin", "300", "-duration", "60s"]);
    for budget in ["unlimited", "0.5"] {
        let (_, r) = attach_json(
            fx.pid(),
            &format!("cas-single-{budget}"),
            &["--duration", "3", "--budget", budget],
        );
        let s = the_site(&r, budget);
        assert!(s["raw_attempts"].as_u64().unwrap() > 0, "{budget}: {s}");
        assert_eq!(s["raw_failures"], 0, "{budget}: {s}");
        assert_eq!(s["failures"], 0, "{budget}: {s}");
    }
}

/// At the default budget the CAS probes open in windows and counts are
/// scaled estimates, marked as such. Failures are counted on the block only
/// a failed CAS reaches (casAdd's `failed++`), which costs nothing while
/// CASes swap: the failure-block probes stay in most of the run, and their
/// estimate of the failure rate must be within 0.4-1.6x of the program's
/// own over the same stretch (0.66-1.09x in eight runs here, 0.83x on
/// average: a trap on a failure breaks the lockstep that makes the next
/// one, so a probed stretch fails a little less; with every failure
/// probed the count is the after-CAS probe's exactly). Attempts need a trap each:
/// inside a window the loop runs at trap speed, so they read low (0.15x
/// here at ~480k CAS/s on two CPUs) and the report says they are lower
/// bounds; the test holds them to that.
#[test]
fn cas_counts_at_the_default_budget_are_scaled_estimates() {
    require_root();
    for (go, variant) in [
        (GoToolchain::Go119, Variant::Plain),
        (GoToolchain::Go126, Variant::Stripped),
    ] {
        let what = format!("{go:?} {variant:?}");
        let bin = go_fixture("casloop", go, variant);
        let mut fx = start_fixture(
            &bin,
            &["-writers", "4", "-spin", "3000", "-duration", "60s"],
        );
        // The program's own rate from 2 s into map-probe's run to 5 s: its
        // failures come from threads preempted between load and CAS, more
        // of them while map-probe loads and calibrates (on two CPUs), which
        // the probes' windows, all after that, do not see.
        let c = attach_counting(
            &mut fx,
            &format!("cas-default-{go:?}"),
            7,
            &[],
            Duration::from_secs(2),
            3,
        );
        let (r, [before, after]) = (&c.report, c.inner);
        let took = c.inner_secs;
        let s = the_site(r, &what);
        let cas = &r["sampling"]["cas"];
        assert!(cas["scale"].as_f64().unwrap() > 1.0, "{what}: {cas}");
        // The traps slowed this loop: the report says its estimates are lower bounds.
        assert_eq!(cas["probe_bound"], true, "{what}: {cas}");
        assert_eq!(s["scale"], cas["scale"], "{what}: {s}");
        assert_eq!(cas["failure_blocks"], 1, "{what}: {cas}");
        assert_eq!(s["failures_from"], "failure-block", "{what}: {s}");
        assert_eq!(
            s["failures_scale"], cas["failure_block_scale"],
            "{what}: {s}"
        );
        let elapsed = r["sampling"]["elapsed_secs"].as_f64().unwrap();
        let rate = |n: u64, secs: f64| n as f64 / secs;
        let (prog_a, prog_f) = (
            rate(after.0 - before.0, took),
            rate(after.1 - before.1, took),
        );
        let (est_a, est_f) = (
            rate(s["attempts"].as_u64().unwrap(), elapsed),
            rate(s["failures"].as_u64().unwrap(), elapsed),
        );
        eprintln!(
            "{what}: program {prog_a:.0} CAS/s, {prog_f:.1} failures/s; map-probe {est_a:.0} CAS/s ({:.2}x), {est_f:.1} failures/s ({:.2}x) from {} raw ({cas})",
            est_a / prog_a,
            est_f / prog_f,
            s["raw_failures"]
        );
        assert!(
            prog_f > 5.0,
            "{what}: too few failures to judge: {prog_f}/s"
        );
        assert!(
            est_f >= 0.4 * prog_f && est_f <= 1.6 * prog_f,
            "{what}: failures {est_f:.1}/s against the program's {prog_f:.1}/s"
        );
        assert!(
            est_a > 0.0 && est_a <= prog_a * 1.1,
            "{what}: attempts {est_a:.0}/s against the program's {prog_a:.0}/s"
        );
        let text = &c.text;
        assert!(text.contains("CAS SITE"), "{what}: {text}");
        assert!(text.contains("lower bounds"), "{what}: {text}");
        assert!(text.contains("main.casAdd"), "{what}: {text}");
    }
}

/// Two words in one cache line, each written by goroutines of its own, are a
/// false-sharing suspect (names, sites, rates, kind) whether a CAS, an
/// atomic add or a contended mutex writes them; padded apart they are not,
/// and one word CASed from two goroutines is true sharing, never flagged.
/// The fixture's own benchmark says what the padding buys on this machine
/// (printed: a timing is no test).
#[test]
fn false_sharing_is_flagged_and_padding_or_true_sharing_is_not() {
    require_root();
    let line = |m: &str| common::marker_line("falseshare", m);
    // (op, what the two words are called, their writers, the writers' markers)
    let ops = [
        (
            "cas",
            "cas",
            ["main.counters", "main.counters+8"],
            ["main.writeA", "main.writeB"],
            ["// CAS a", "// CAS b"],
        ),
        (
            "add",
            "atomic",
            ["main.counters", "main.counters+8"],
            ["main.addA", "main.addB"],
            ["// ADD a", "// ADD b"],
        ),
        (
            "lock",
            "lock",
            ["main.locks", "main.locks+8"],
            ["main.lockA", "main.lockB"],
            ["// LOCK a", "// LOCK b"],
        ),
    ];
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        let bin = go_fixture("falseshare", go, Variant::Plain);
        let bench = std::process::Command::new(&bin)
            .args(["-bench", "2"])
            .output()
            .expect("run the falseshare benchmark");
        let bench = String::from_utf8_lossy(&bench.stdout).to_string();
        eprintln!("{go:?}: {}", bench.trim());
        assert!(bench.contains("bench unpadded="), "{bench}");
        for (op, kind, symbols, functions, markers) in ops {
            let modes: &[(&str, bool)] = match op {
                "cas" => &[("", true), ("-pad", false), ("-shared", false)],
                _ => &[("", true), ("-pad", false)],
            };
            for &(mode, flagged) in modes {
                let what = format!("{go:?} -op {op} {mode}");
                let mut args = vec!["-duration", "60s", "-op", op];
                if !mode.is_empty() {
                    args.push(mode);
                }
                let fx = start_fixture(&bin, &args);
                let (out, r) = attach_json(
                    fx.pid(),
                    &format!("falseshare-{op}{mode}-{go:?}"),
                    &[
                        "--duration",
                        "3",
                        "--budget",
                        "unlimited",
                        "--no-map-writes",
                    ],
                );
                let fs = r["false_sharing"].as_array().unwrap();
                if op == "cas" {
                    let cas = r["cas"].as_array().unwrap();
                    assert_eq!(cas.len(), 2, "{what}: both writers' CAS sites: {cas:?}");
                    if mode == "-shared" {
                        assert!(
                            cas.iter().all(|c| c["target_symbol"] == "main.counters"),
                            "{what}: {cas:?}"
                        );
                    }
                }
                if !flagged {
                    assert!(fs.is_empty(), "{what}: nothing to pad: {fs:?}");
                    continue;
                }
                assert_eq!(fs.len(), 1, "{what}: one line shared: {fs:?}");
                let words = fs[0]["words"].as_array().unwrap();
                let mut got: Vec<(String, String, u64)> = words
                    .iter()
                    .map(|w| {
                        assert_eq!(w["kind"], kind, "{what}: {w}");
                        let floor = if kind == "lock" { 100.0 } else { 1000.0 };
                        assert!(
                            w["writes_per_sec"].as_f64().unwrap() >= floor,
                            "{what}: {w}"
                        );
                        (
                            w["symbol"].as_str().unwrap_or("?").to_string(),
                            w["function"].as_str().unwrap().to_string(),
                            w["line"].as_u64().unwrap(),
                        )
                    })
                    .collect();
                got.sort();
                let want: Vec<(String, String, u64)> = (0..2)
                    .map(|i| (symbols[i].into(), functions[i].into(), line(markers[i])))
                    .collect();
                assert_eq!(got, want, "{what}: {fs:?}");
                assert!(
                    fs[0]["suggestion"].as_str().unwrap().contains("pad"),
                    "{what}: {fs:?}"
                );
                // The terminal names the pair too, with or without a CAS in scope.
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    text.contains("false sharing? cache line") && text.contains(symbols[1]),
                    "{what}: {text}"
                );
            }
        }
    }
}

/// A lock-free map library (`github.com/puzpuzpuz/xsync/v4`, Go 1.24+):
/// its bucket-lock waits and its resize CASes are the library's lines, each
/// led back to the user's call that paid (`caller`).
#[test]
fn xsync_waits_and_cas_lead_back_to_the_users_calls() {
    require_root();
    let line = |m: &str| common::marker_line("xsyncmap", m);
    let bin = go_fixture("xsyncmap", GoToolchain::Go126, Variant::Stripped);
    let fx = start_fixture(&bin, &["-duration", "60s"]);
    // Every wait and CAS seen: the point is whose line pays, and at the
    // default budget a 6 s run once caught no Compute wait (the Store site
    // was observed 0.35% of the time).
    let (out, r) = attach_json(
        fx.pid(),
        "xsyncmap",
        &[
            "--duration",
            "4",
            "--budget",
            "unlimited",
            "--no-map-writes",
        ],
    );
    let from = |list: &str, user: &str| -> Vec<Value> {
        r[list]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["caller"]["function"] == user)
            .cloned()
            .collect()
    };
    for (user, mark) in [
        ("main.storeLoop", "// xsync Store"),
        ("main.computeLoop", "// xsync Compute"),
    ] {
        let sites = from("sites", user);
        assert!(
            !sites.is_empty(),
            "no lock site called from {user}: {}",
            r["sites"]
        );
        for s in &sites {
            assert!(
                s["function"]
                    .as_str()
                    .unwrap()
                    .starts_with("github.com/puzpuzpuz/xsync/v4."),
                "{s}"
            );
            assert_eq!(s["caller"]["line"], line(mark), "{s}");
        }
    }
    let cas = r["cas"].as_array().unwrap();
    assert!(!cas.is_empty(), "xsync's resize CASes: {r}");
    for c in cas {
        assert!(
            c["function"]
                .as_str()
                .unwrap()
                .starts_with("github.com/puzpuzpuz/xsync/v4."),
            "{c}"
        );
        assert_eq!(
            c["caller"]["function"]
                .as_str()
                .map(|f| f.starts_with("main.")),
            Some(true),
            "{c}"
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("from main.storeLoop"), "{text}");
}

/// CAS failures as a flamegraph weight (`--weight cas-failures`: the folded
/// towers add up to the failures in the JSON) and as a third pprof sample
/// type, which the real `go tool pprof` ranks under the CAS's function.
#[test]
fn cas_failures_weigh_flamegraphs_and_pprof() {
    require_root();
    let bin = go_fixture("casloop", GoToolchain::Go126, Variant::Stripped);
    let fx = start_fixture(&bin, &["-writers", "4", "-duration", "60s"]);
    let folded = common::tmp("cas.folded");
    let pprof = common::tmp("cas.pb.gz");
    let (_, r) = attach_json(
        fx.pid(),
        "cas-weights",
        &[
            "--duration",
            "3",
            "--budget",
            "unlimited",
            "--no-map-writes",
            "--weight",
            "cas-failures",
            "--folded",
            folded.to_str().unwrap(),
            "--pprof",
            pprof.to_str().unwrap(),
        ],
    );
    let failures = r["cas"][0]["failures"].as_u64().unwrap();
    assert!(failures > 0, "{}", r["cas"]);
    let text = std::fs::read_to_string(&folded).unwrap();
    let mut sum = 0;
    for l in text.lines() {
        assert!(l.contains("main.casAdd") && l.contains("[cas]"), "{l}");
        sum += l.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
    }
    assert_eq!(sum, failures, "{text}");
    let out = std::process::Command::new("/usr/local/go/bin/go")
        .args(["tool", "pprof", "-top", "-sample_index=cas_failures"])
        .arg(&pprof)
        .output()
        .expect("run go tool pprof");
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(top.contains("Type: cas_failures"), "{top}");
    let row = top
        .lines()
        .find(|l| l.ends_with("main.casAdd"))
        .unwrap_or_else(|| panic!("main.casAdd in {top}"));
    assert_eq!(
        row.split_whitespace().next(),
        Some(failures.to_string().as_str()),
        "flat failures of casAdd: {top}"
    );
}
