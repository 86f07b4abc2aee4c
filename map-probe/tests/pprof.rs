//! `--pprof` read back by the real `go tool pprof` (the machine's Go), against
//! the target's own binary, plain and stripped, built with Go 1.19 and the
//! machine's Go: the top entries are the fixture's functions in the order it
//! guarantees, the Lock lines are the fixture's, a stripped binary needs no
//! re-symbolizing, `-sample_index=delay` works, and `-diff_base` subtracts
//! the profile from itself (all zero) and from the target's own Go mutex
//! profile. Also `--weight delay` for the folded stacks, and bad values.

mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{
    attach_json, go_fixture, map_probe, require_root, start_fixture, tmp, GoToolchain, Variant,
};
use serde_json::Value;

/// The machine's Go, whose pprof reads every profile version.
const GO: &str = "/usr/local/go/bin/go";

fn pprof(args: &[&str]) -> Output {
    let out = Command::new(GO)
        .arg("tool")
        .arg("pprof")
        .args(args)
        .output()
        .expect("run go tool pprof");
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `-top` rows: (flat, cum, name) by function name (the first word after the
/// five numeric columns; with `-lines` the rest is `file:line`).
fn top_rows(top: &str) -> Vec<(f64, f64, String)> {
    top.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() < 6 || !cols[1].ends_with('%') || !cols[4].ends_with('%') {
                return None;
            }
            let num = |s: &str| s.trim_end_matches(|c: char| c.is_alphabetic()).parse().ok();
            Some((num(cols[0])?, num(cols[3])?, cols[5..].join(" ")))
        })
        .collect()
}

fn cum_by_function(rows: &[(f64, f64, String)]) -> HashMap<String, f64> {
    rows.iter()
        .map(|(_, cum, name)| (name.split(' ').next().unwrap().to_string(), *cum))
        .collect()
}

fn lock_line(stmt: &str) -> u32 {
    common::fixture_line("contended", stmt, |l| l == stmt)
}

/// The GNU build ID `readelf -n` shows, else `go tool buildid`'s Go build ID:
/// what map-probe must have put on the mapping.
fn expected_build_id(bin: &Path) -> String {
    let notes = Command::new("readelf").arg("-n").arg(bin).output().unwrap();
    let notes = String::from_utf8_lossy(&notes.stdout);
    if let Some(l) = notes.lines().find(|l| l.trim().starts_with("Build ID:")) {
        return l.trim()["Build ID:".len()..].trim().to_string();
    }
    let out = Command::new(GO)
        .args(["tool", "buildid"])
        .arg(bin)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Run {
    bin: PathBuf,
    ours: PathBuf,
    theirs: PathBuf,
    report: Value,
}

/// The contended fixture with Go's own mutex profile on, map-probe attached
/// for 4 s with --pprof (probes kept in); then the fixture stops and writes
/// its profile.
fn run(go: GoToolchain, variant: Variant) -> Run {
    let bin = go_fixture("contended", go, variant);
    let name = format!("pprof-{}-{}", go.tag(), variant.tag());
    let ours = tmp(&format!("{name}.pb.gz"));
    let theirs = tmp(&format!("{name}-go.pb.gz"));
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
    let mut fixture = start_fixture(
        &bin,
        &["-duration", "60s", "-mutexproto", theirs.to_str().unwrap()],
    );
    let (out, report) = attach_json(
        fixture.pid(),
        &name,
        // Every wait counted, so a short run's ranking is the fixture's.
        &[
            "--duration",
            "4",
            "--budget",
            "unlimited",
            "--pprof",
            ours.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&ours.display().to_string()),
        "{name}: the 'wrote' line names the profile: {stdout}"
    );
    fixture.signal(libc::SIGTERM);
    fixture.wait();
    assert!(
        theirs.is_file(),
        "{name}: the fixture wrote no mutex profile"
    );
    Run {
        bin,
        ours,
        theirs,
        report,
    }
}

fn json_count(report: &Value, function: &str) -> f64 {
    report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["function"] == function)
        .map(|s| s["count"].as_f64().unwrap())
        .sum()
}

#[test]
fn go_tool_pprof_reads_the_profile() {
    require_root();
    for go in GoToolchain::ALL {
        for variant in [Variant::Plain, Variant::Stripped] {
            let what = format!("{go:?}/{variant:?}");
            let r = run(go, variant);
            let (bin, ours, theirs) = (
                r.bin.to_str().unwrap(),
                r.ours.to_str().unwrap(),
                r.theirs.to_str().unwrap(),
            );
            eprintln!(
                "{what}: profile {} bytes",
                std::fs::metadata(&r.ours).unwrap().len()
            );

            // The top entries by waits, against the binary (stripped or not).
            let out = pprof(&[
                "-top",
                "-cum",
                "-nodefraction=0",
                "-sample_index=contentions",
                bin,
                ours,
            ]);
            let top = text(&out);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !err.to_lowercase().contains("symboliz"),
                "{what}: pprof tried to symbolize: {err}"
            );
            eprintln!("{what}:\n{top}");
            let cum = cum_by_function(&top_rows(&top));
            let get = |f: &str| {
                *cum.get(f)
                    .unwrap_or_else(|| panic!("{what}: {f} not in pprof -top:\n{top}"))
            };
            let (hot, warm, cool) = (
                get("main.hotPath"),
                get("main.warmPath"),
                get("main.coolPath"),
            );
            assert!(
                hot > warm && warm > cool && cool > 0.0,
                "{what}: hotPath > warmPath > coolPath: {hot} {warm} {cool}"
            );
            // The same estimated counts as the JSON (stacks are rounded one by one).
            for (f, v) in [("main.hotPath", hot), ("main.warmPath", warm)] {
                let want = json_count(&r.report, f);
                assert!(
                    (v - want).abs() <= want * 0.01 + 5.0,
                    "{what}: {f}: pprof {v}, JSON {want}"
                );
            }
            // Functions with their inlined frames: the inlined Lock shows as such.
            assert!(
                top.contains("sync.(*Mutex).Lock (inline)"),
                "{what}:\n{top}"
            );

            // The Lock lines, by -lines and by -list (source read from the file).
            let lines = text(&pprof(&[
                "-top",
                "-lines",
                "-nodefraction=0",
                "-sample_index=contentions",
                bin,
                ours,
            ]));
            for (f, stmt) in [
                ("main.hotPath", "hotMu.Lock()"),
                ("main.warmPath", "warmMu.Lock()"),
                ("main.coolPath", "coolMu.Lock()"),
            ] {
                let want = format!("contended/main.go:{}", lock_line(stmt));
                assert!(
                    lines
                        .lines()
                        .any(|l| l.contains(&format!(" {f} ")) && l.trim_end().ends_with(&want)),
                    "{what}: no {f} at {want} in -lines:\n{lines}"
                );
            }
            let list = text(&pprof(&[
                "-list",
                "^main.hotPath$",
                "-sample_index=contentions",
                bin,
                ours,
            ]));
            let line = lock_line("hotMu.Lock()");
            let row = list
                .lines()
                .find(|l| l.contains(&format!(" {line}:")) && l.contains("hotMu.Lock()"))
                .unwrap_or_else(|| panic!("{what}: no line {line} in -list:\n{list}"));
            assert!(
                !row.split_whitespace()
                    .nth(1)
                    .unwrap_or(".")
                    .starts_with('.'),
                "{what}: line {line} has no waits in -list: {row}"
            );

            // Delay, the default sample type (the last, as in Go's profile).
            let delay = text(&pprof(&["-top", "-sample_index=delay", bin, ours]));
            assert!(delay.contains("Type: delay"), "{what}:\n{delay}");
            let delay_cum = cum_by_function(&top_rows(&text(&pprof(&[
                "-top",
                "-cum",
                "-sample_index=delay",
                ours,
            ]))));
            assert!(
                delay_cum.get("main.hotPath").is_some_and(|&d| d > 0.0),
                "{what}: {delay}"
            );

            // The mapping: the binary, its build ID, and every "symbolized" flag.
            let raw = text(&pprof(&["-raw", ours]));
            let mapping = raw
                .lines()
                .skip_while(|l| !l.starts_with("Mappings"))
                .nth(1)
                .unwrap_or_default()
                .to_string();
            let id = expected_build_id(&r.bin);
            assert!(
                mapping.contains(bin) && mapping.contains(&id),
                "{what}: mapping {mapping:?} should name {bin} and build ID {id}"
            );
            assert!(mapping.ends_with("[FN][FL][LN][IN]"), "{what}: {mapping}");
            // hotPath's location: the inlined Lock first, then hotPath at the
            // Lock line, with its start line (the `func` line; Go 1.20+ only).
            let lock = lock_line("hotMu.Lock()");
            let start = common::fixture_line("contended", "func hotPath", |l| {
                l.starts_with("func hotPath(")
            });
            let locs: Vec<&str> = raw.lines().collect();
            let at = locs
                .iter()
                .position(|l| {
                    l.contains("main.hotPath ") && l.contains(&format!("main.go:{lock}:"))
                })
                .unwrap_or_else(|| panic!("{what}: no hotPath location in -raw:\n{raw}"));
            assert!(
                locs[at - 1].contains("sync.(*Mutex).Lock ") && !locs[at].contains(" M=1 "),
                "{what}: the inlined Lock and hotPath share one location: {:?}",
                &locs[at - 1..=at]
            );
            if go != GoToolchain::Go119 {
                assert!(
                    locs[at].trim_end().ends_with(&format!(" s={start}")),
                    "{what}: hotPath starts at line {start}: {}",
                    locs[at]
                );
            }
            assert!(
                raw.contains("PeriodType: contentions count"),
                "{what}:\n{raw}"
            );
            assert!(raw.contains("Period: 1"), "{what}");
            assert!(
                raw.contains("contentions/count delay/nanoseconds"),
                "{what}"
            );
            let duration: f64 = raw
                .lines()
                .find_map(|l| l.strip_prefix("Duration: "))
                .and_then(|d| d.trim().parse().ok())
                .unwrap_or(0.0);
            assert!(
                (3.5..6.0).contains(&duration),
                "{what}: duration {duration}"
            );

            // -diff_base: itself (all zero), and Go's own mutex profile (same types).
            let selfdiff = text(&pprof(&[
                "-top",
                "-sample_index=contentions",
                &format!("-diff_base={ours}"),
                ours,
            ]));
            assert!(
                selfdiff.contains("accounting for 0, 0% of")
                    && top_rows(&selfdiff)
                        .iter()
                        .all(|(f, c, _)| *f == 0.0 && *c == 0.0),
                "{what}: self-diff not zero:\n{selfdiff}"
            );
            for index in ["contentions", "delay"] {
                let out = pprof(&[
                    "-top",
                    &format!("-sample_index={index}"),
                    &format!("-diff_base={theirs}"),
                    ours,
                ]);
                let diff = text(&out);
                assert!(diff.contains(&format!("Type: {index}")), "{what}: {diff}");
                assert!(
                    !String::from_utf8_lossy(&out.stderr).contains("incompatible"),
                    "{what}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// `--weight delay`: the folded stacks' weights are the time waited, and they
/// add up to each site's estimated delay in the JSON; `--weight waits` (the
/// default) to its count.
#[test]
fn weight_delay_folds_by_time_waited() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let fixture = start_fixture(&bin, &["-duration", "60s"]);
    for weight in ["delay", "waits"] {
        let folded = tmp(&format!("weight-{weight}.folded"));
        let svg = tmp(&format!("weight-{weight}.svg"));
        let (out, report) = attach_json(
            fixture.pid(),
            &format!("weight-{weight}"),
            &[
                "--duration",
                "3",
                "--weight",
                weight,
                "--folded",
                folded.to_str().unwrap(),
                "--flamegraph",
                svg.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let svg = std::fs::read_to_string(&svg).unwrap();
        let unit = if weight == "delay" {
            "ns waited"
        } else {
            "waits"
        };
        assert!(svg.contains(unit), "the SVG counts {unit}");
        let mut by_site: HashMap<String, f64> = HashMap::new();
        for l in std::fs::read_to_string(&folded).unwrap().lines() {
            let (stack, n) = l.rsplit_once(' ').unwrap();
            let site = stack
                .split(';')
                .rfind(|f| f.starts_with("main.") && !f.starts_with("main.main"))
                .map(|f| f.split(' ').next().unwrap().to_string());
            if let Some(site) = site {
                *by_site.entry(site).or_default() += n.parse::<f64>().unwrap();
            }
        }
        for s in report["sites"].as_array().unwrap() {
            let f = s["function"].as_str().unwrap();
            let want = if weight == "delay" {
                s["wait"]["delay_ns"].as_f64().unwrap()
            } else {
                s["count"].as_f64().unwrap()
            };
            let got = by_site.get(f).copied().unwrap_or(0.0);
            assert!(
                (got - want).abs() <= want * 0.01 + 5.0,
                "--weight {weight}: {f}: folded {got}, JSON {want}"
            );
        }
        assert!(by_site.get("main.hotPath").is_some_and(|&n| n > 0.0));
    }
}

/// Bad values are one line each, before anything is attached.
#[test]
fn bad_weight_and_pprof_to_stdout_are_refused() {
    let out = map_probe(&["attach", "--pid", "1", "--weight", "bogus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("invalid value 'bogus' for '--weight <WEIGHT>'") && err.contains("waits"),
        "{err}"
    );
    assert!(!out.status.success());
    let out = map_probe(&["attach", "--pid", "1", "--pprof", "-"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--pprof - is not supported"), "{err}");
    let missing = tmp("no-such-folder/x.pb.gz");
    let out = map_probe(&["attach", "--pid", "1", "--pprof", missing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pprof") && err.contains("does not exist"),
        "{err}"
    );
    let out = map_probe(&["agent", "--pid", "1", "--pprof", "x.pb.gz"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--pprof"), "{err}");
}
