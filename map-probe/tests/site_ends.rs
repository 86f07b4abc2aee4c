//! Where a site's wait ends. A per-site point times a wait from the CALL of
//! the slow path to the instruction after it, unless the inlined fast path
//! jumps to that instruction too (an inlined RLock always, an inlined Lock
//! often): a probe there would trap on every Lock, inside the critical
//! section just entered, so such a site's waits end at its callee's RETs.
//! Which sites those are is checked against `go tool objdump`.

mod common;

use std::collections::HashMap;

use common::{attach_json, command, go_fixture, require_root, start_fixture, GoToolchain, Variant};

/// The functions a lock's slow path calls from inlined user code.
const SLOW_PATHS: &[&str] = &[
    "(*Mutex).lockSlow(SB)",
    "runtime_SemacquireRWMutexR(SB)",
    "runtime_SemacquireMutex(SB)",
];

/// Per CALL of a slow path in `function`, by `go tool objdump`: whether a
/// jump in the function lands on the instruction after it.
fn joined_calls(go: GoToolchain, bin: &std::path::Path, function: &str) -> Vec<bool> {
    let pattern = format!("^{}$", function.replace('.', "\\."));
    let out = command(go.go_binary(), &["tool", "objdump", "-s", &pattern])
        .arg(bin)
        .env("GOTOOLCHAIN", go.gotoolchain())
        .output()
        .expect("go tool objdump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // "  file:line<TAB>0xADDR<TAB>HEX<TAB>INSTRUCTION", tabs doubled on Go 1.19.
    let rows: Vec<(u64, usize, String)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').filter(|f| !f.is_empty()).collect();
            let addr = u64::from_str_radix(f.get(1)?.trim().strip_prefix("0x")?, 16).ok()?;
            Some((
                addr,
                f.get(2)?.trim().len() / 2,
                f.get(3)?.trim().to_string(),
            ))
        })
        .collect();
    let targets: Vec<u64> = rows
        .iter()
        .filter(|(_, _, ins)| ins.starts_with('J'))
        .filter_map(|(_, _, ins)| {
            let t = ins.split_whitespace().nth(1)?.strip_prefix("0x")?;
            u64::from_str_radix(t, 16).ok()
        })
        .collect();
    rows.iter()
        .filter(|(_, _, ins)| {
            ins.starts_with("CALL ") && SLOW_PATHS.iter().any(|s| ins.ends_with(s))
        })
        .map(|(addr, len, _)| targets.contains(&(addr + *len as u64)))
        .collect()
}

#[test]
fn sites_whose_fast_path_continues_after_the_call_end_at_the_callee() {
    require_root();
    let functions = [
        "main.hotPath",
        "main.warmPath",
        "main.coolPath",
        "main.readConfig",
    ];
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        let bin = go_fixture("contended", go, Variant::Plain);
        let referee: HashMap<&str, Vec<bool>> = functions
            .iter()
            .map(|f| (*f, joined_calls(go, &bin, f)))
            .collect();
        // The referee's parse is sound: every function has its one Lock or
        // RLock, and an inlined RLock always continues after its CALL.
        for (f, calls) in &referee {
            assert_eq!(calls.len(), 1, "{go:?} {f}: {calls:?}");
        }
        assert!(referee["main.readConfig"][0], "{go:?}: {referee:?}");
        let fx = start_fixture(&bin, &["-duration", "10s"]);
        let (_, r) = attach_json(fx.pid(), &format!("site-ends-{go:?}"), &["--duration", "6"]);
        for f in functions {
            let s = r["sites"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["function"] == f)
                .unwrap_or_else(|| panic!("{go:?}: no site in {f}: {}", r["sites"]));
            let want = if referee[f][0] {
                "callee-return"
            } else {
                "after-call"
            };
            eprintln!(
                "{go:?} {f}: objdump says {want}; {} waits, {} timed",
                s["raw_count"], s["wait"]["timed"]
            );
            assert_eq!(s["timed_at"], want, "{go:?} {f}: {s}");
            assert_eq!(s["measured"], "call-site", "{go:?} {f}");
            // Timed either way: a sample of the waits, not none.
            assert!(s["wait"]["timed"].as_u64().unwrap() > 0, "{go:?} {f}: {s}");
        }
    }
}
