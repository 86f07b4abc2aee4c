//! `--otlp-profiles` into the real collector (the pinned build, started with
//! `--feature-gates=service.profilesSupport` and a profiles pipeline into
//! its file exporter), over gRPC and HTTP: each interval's contention
//! profile arrives with the fixture's functions (strings resolved through
//! the dictionary's string table), both sample types and non-zero values,
//! and the executable's build ID. Without the flag nothing of the kind is
//! sent; a collector that is down costs nothing but one warning.

mod common;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use common::{
    free_port, go_fixture, map_probe, read_json, require_root, start_fixture, tmp, Collector,
    GoToolchain, Variant,
};
use serde_json::Value;

const PROTOCOLS: [&str; 2] = ["grpc", "http/protobuf"];

fn int(v: &Value) -> i64 {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// One received profile, its strings resolved.
#[derive(Debug)]
struct Got {
    sample_type: (String, String),
    period_type: (String, String),
    /// Per sample: its value and its frames' function names, leaf first.
    samples: Vec<(i64, Vec<String>)>,
    /// The executable mapping's attributes.
    mapping: HashMap<String, String>,
    resource: HashMap<String, Value>,
}

fn profiles(lines: &[Value]) -> Vec<Got> {
    let mut out = Vec::new();
    for l in lines.iter().filter(|l| l.get("resourceProfiles").is_some()) {
        let d = &l["dictionary"];
        let strings: Vec<String> = d["stringTable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect();
        let s = |v: &Value| strings[int(v) as usize].clone();
        let table = |name: &str| d[name].as_array().cloned().unwrap_or_default();
        let (functions, locations, stacks, attributes, mappings) = (
            table("functionTable"),
            table("locationTable"),
            table("stackTable"),
            table("attributeTable"),
            table("mappingTable"),
        );
        let attr = |i: &Value| {
            let a = &attributes[int(i) as usize];
            let v = &a["value"];
            let value = v
                .get("stringValue")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| v.get("stringValueStrindex").map(s))
                .unwrap_or_default();
            (s(&a["keyStrindex"]), value)
        };
        let mapping: HashMap<String, String> = mappings
            .get(1)
            .and_then(|m| m["attributeIndices"].as_array())
            .into_iter()
            .flatten()
            .map(attr)
            .collect();
        for rp in l["resourceProfiles"].as_array().unwrap() {
            // The collector keeps resource attributes by key or by string index.
            let resource: HashMap<String, Value> = rp["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|kv| {
                    let key = kv
                        .get("key")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| s(&kv["keyStrindex"]));
                    let v = &kv["value"];
                    let value = v
                        .get("stringValueStrindex")
                        .map(|i| Value::from(s(i)))
                        .or_else(|| v.get("stringValue").cloned())
                        .or_else(|| v.get("intValue").map(|i| Value::from(int(i))))
                        .unwrap_or(Value::Null);
                    (key, value)
                })
                .collect();
            for sp in rp["scopeProfiles"].as_array().unwrap() {
                for p in sp["profiles"].as_array().unwrap() {
                    let vt = |v: &Value| (s(&v["typeStrindex"]), s(&v["unitStrindex"]));
                    let samples = p["samples"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|smp| {
                            let stack = &stacks[int(&smp["stackIndex"]) as usize];
                            let names = stack["locationIndices"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .flat_map(|li| {
                                    locations[int(li) as usize]["lines"]
                                        .as_array()
                                        .cloned()
                                        .unwrap_or_default()
                                })
                                .map(|ln| {
                                    s(&functions[int(&ln["functionIndex"]) as usize]
                                        ["nameStrindex"])
                                })
                                .collect();
                            (int(&smp["values"][0]), names)
                        })
                        .collect();
                    out.push(Got {
                        sample_type: vt(&p["sampleType"]),
                        period_type: vt(&p["periodType"]),
                        samples,
                        mapping: mapping.clone(),
                        resource: resource.clone(),
                    });
                }
            }
        }
    }
    out
}

fn attach(pid: u32, name: &str, extra: &[&str]) -> (std::process::Output, Value) {
    let json = tmp(&format!("{name}.json"));
    let _ = std::fs::remove_file(&json);
    let pid = pid.to_string();
    let mut args = vec![
        "attach",
        "--pid",
        &pid,
        "--duration",
        "4",
        "--interval",
        "1",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--json", json.to_str().unwrap()]);
    let out = map_probe(&args);
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, read_json(&json))
}

fn profiles_arrive(protocol: &str) {
    require_root();
    let tag = protocol.replace('/', "-");
    let col = Collector::start_with_profiles(&format!("profiles-{tag}"));
    // Stripped: the names can only come from map-probe's own symbols.
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Stripped);
    let fixture = start_fixture(&bin, &["-duration", "60s"]);
    let endpoint = col.endpoint(protocol);
    let (_, report) = attach(
        fixture.pid(),
        &format!("otlp-profiles-{tag}"),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            protocol,
            "--otlp-profiles",
            // Every interval sees every site (windows would skip some).
            "--budget",
            "unlimited",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let got = profiles(&col.received());
        if !got.is_empty() || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!got.is_empty(), "{protocol}: no profile arrived");
    let types: HashSet<(String, String)> = got.iter().map(|g| g.sample_type.clone()).collect();
    let want: HashSet<(String, String)> = [("contentions", "count"), ("delay", "nanoseconds")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(types, want, "{protocol}: sample types");
    let mut by_site: HashMap<(String, String), i64> = HashMap::new();
    for g in &got {
        assert_eq!(g.period_type, ("contentions".into(), "count".into()));
        assert_eq!(
            g.resource.get("process.pid").and_then(Value::as_i64),
            Some(i64::from(fixture.pid())),
            "{protocol}: resource {:?}",
            g.resource
        );
        assert_eq!(
            g.mapping.get("process.executable.build_id.gnu"),
            report["target"]["build_id"]
                .as_str()
                .map(str::to_string)
                .as_ref(),
            "{protocol}: the mapping's build ID"
        );
        for (v, names) in &g.samples {
            assert!(*v > 0, "{protocol}: a zero value was sent");
            // Innermost first: the lock whose slow path was called (a
            // per-site point), or the semaphore (a shared probe).
            let leaf = names.first().map_or("", String::as_str);
            assert!(
                leaf.starts_with("sync.") || leaf.starts_with("internal/sync."),
                "{protocol}: leaf frames are the wait: {names:?}"
            );
            if let Some(site) = names
                .iter()
                .find(|n| n.starts_with("main.") && !n.starts_with("main.main"))
            {
                *by_site
                    .entry((g.sample_type.0.clone(), site.clone()))
                    .or_default() += v;
            }
        }
    }
    eprintln!("{protocol}: {} profiles, {by_site:?}", got.len());
    for f in ["main.hotPath", "main.warmPath", "main.coolPath"] {
        for t in ["contentions", "delay"] {
            assert!(
                by_site
                    .get(&(t.to_string(), f.to_string()))
                    .is_some_and(|&v| v > 0),
                "{protocol}: no {t} for {f}: {by_site:?}"
            );
        }
    }
    let c = |f: &str| by_site[&("contentions".to_string(), f.to_string())];
    assert!(
        c("main.hotPath") > c("main.coolPath"),
        "{protocol}: hotPath waits more often than coolPath: {by_site:?}"
    );
}

#[test]
fn profiles_arrive_over_grpc() {
    profiles_arrive("grpc");
}

#[test]
fn profiles_arrive_over_http() {
    profiles_arrive("http/protobuf");
}

/// Without --otlp-profiles the same export sends spans, and no profile.
#[test]
fn no_profiles_without_the_flag() {
    require_root();
    let col = Collector::start_with_profiles("profiles-off");
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let fixture = start_fixture(&bin, &["-duration", "60s"]);
    let endpoint = col.endpoint("grpc");
    attach(
        fixture.pid(),
        "otlp-profiles-off",
        &["--otlp-endpoint", &endpoint, "--otlp-protocol", "grpc"],
    );
    let got = col.wait_for(Duration::from_secs(10), |o| !o.spans.is_empty());
    assert!(!got.spans.is_empty(), "spans arrive as before");
    std::thread::sleep(Duration::from_millis(500));
    let lines = col.received();
    assert!(
        lines.iter().all(|l| l.get("resourceProfiles").is_none()),
        "a profile was sent without --otlp-profiles"
    );
}

/// A collector that is not there: the run ends on time with its outputs and
/// one warning, as without profiles.
#[test]
fn profiles_to_a_collector_that_is_down() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let fixture = start_fixture(&bin, &["-duration", "60s"]);
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    for protocol in PROTOCOLS {
        let tag = protocol.replace('/', "-");
        let t0 = Instant::now();
        let (out, report) = attach(
            fixture.pid(),
            &format!("otlp-profiles-down-{tag}"),
            &[
                "--otlp-endpoint",
                &nowhere,
                "--otlp-protocol",
                protocol,
                "--otlp-profiles",
            ],
        );
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(4 + 8),
            "{protocol}: bounded, took {took:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.lines().filter(|l| l.contains("warning")).count(),
            1,
            "{protocol}: one warning line: {err}"
        );
        assert_eq!(report["end"], "duration");
        assert!(
            report["drops"]["otlp_exports"].as_u64().unwrap_or(0) > 0,
            "{protocol}: undelivered intervals are counted"
        );
    }
}

/// --otlp-profiles alone, with nowhere to send, is a one-line error.
#[test]
fn profiles_flag_needs_an_endpoint() {
    let out = std::process::Command::new(common::map_probe_bin())
        .args(["attach", "--pid", "1", "--otlp-profiles"])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--otlp-profiles needs a collector"), "{err}");
}
