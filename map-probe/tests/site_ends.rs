//! Where a lock call site's wait ends. After an inlined RLock's CALL the
//! fast path joins at the next instruction, so an end probe there would trap
//! on every RLock: such a site ends at its callee's RETs instead (the RWMutex
//! semaphore's; before Go 1.20 the semaphore every Mutex shares).
//! `go tool objdump` is the referee for which CALLs have a jump landing
//! right after them. Needs no root.

mod common;

use std::process::Command;

use common::{go_fixture, GoToolchain, Variant};
use map_probe::catalog::{self, Kind};
use map_probe::gobin::GoBinary;

/// The CALL instructions to `callee` in `func`, each with whether some jump
/// in `func` lands on the instruction after it (objdump's own text).
fn objdump_calls(
    go: GoToolchain,
    bin: &std::path::Path,
    func: &str,
    callee: &str,
) -> Vec<(u64, bool)> {
    let out = Command::new(go.go_binary())
        .args(["tool", "objdump", "-s", &format!("^{}$", regex_quote(func))])
        .arg(bin)
        .output()
        .expect("go tool objdump");
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<(u64, &str)> = text
        .lines()
        .filter_map(|l| {
            // Go 1.19 pads its columns with two tabs, 1.26 with one.
            let f: Vec<&str> = l.split('\t').filter(|c| !c.is_empty()).collect();
            let addr = u64::from_str_radix(f.get(1)?.trim().trim_start_matches("0x"), 16).ok()?;
            Some((addr, f.get(3)?.trim()))
        })
        .collect();
    let targets: Vec<u64> = rows
        .iter()
        .filter(|(_, ins)| ins.starts_with('J'))
        .filter_map(|(_, ins)| {
            let a = ins.split_whitespace().nth(1)?;
            u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()
        })
        .collect();
    rows.iter()
        .enumerate()
        .filter(|(_, (_, ins))| ins.starts_with("CALL ") && ins.contains(&format!("{callee}(SB)")))
        .map(|(i, (addr, _))| {
            let next = rows.get(i + 1).map_or(0, |r| r.0);
            (*addr, targets.contains(&next))
        })
        .collect()
}

fn regex_quote(s: &str) -> String {
    s.chars()
        .map(|c| {
            if "()*.[]".contains(c) {
                format!("\\{c}")
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[test]
fn rlock_sites_end_at_the_semaphore_and_mutex_sites_after_their_call() {
    for go in [GoToolchain::Go119, GoToolchain::Go126] {
        let path = go_fixture("contended", go, Variant::Plain);
        let bin = GoBinary::open(&path).unwrap();
        let points = catalog::site_points(&bin);
        let at = |func: &str| {
            let f = bin.func_by_name(func).unwrap();
            points
                .iter()
                .filter(|p| p.call.is_some_and(|c| c >= f.entry && c < f.end))
                .collect::<Vec<_>>()
        };
        // hotPath's inlined Lock: the CALL of lockSlow is reached only from
        // a failed CAS, and returns to an instruction nothing jumps to.
        let lock_slow = if go == GoToolchain::Go119 {
            "sync.(*Mutex).lockSlow"
        } else {
            "internal/sync.(*Mutex).lockSlow"
        };
        let hot = at("main.hotPath");
        let calls = objdump_calls(go, &path, "main.hotPath", lock_slow);
        assert!(
            !hot.is_empty() && calls.iter().all(|c| !c.1),
            "{go:?}: {calls:?}"
        );
        for p in &hot {
            assert!(!p.shared_end, "{go:?}: {p:?}");
            assert_eq!(p.ret_offsets.len(), 1, "{go:?}: {p:?}");
        }
        // readConfig's inlined RLock: the fast path's JGE lands right after
        // the CALL (objdump agrees), so the end is the semaphore's RETs.
        let read = at("main.readConfig");
        assert!(!read.is_empty(), "{go:?}");
        for p in &read {
            if go != GoToolchain::Go119 {
                assert_eq!(p.kind, Kind::RwmutexRead, "{go:?}: {p:?}");
            }
            let callee = p.symbol;
            let calls = objdump_calls(go, &path, "main.readConfig", callee);
            let joined = calls
                .iter()
                .find(|c| Some(c.0) == p.call)
                .unwrap_or_else(|| panic!("{go:?}: objdump has no CALL at {:?}: {calls:?}", p.call))
                .1;
            {
                assert!(
                    joined,
                    "{go:?}: objdump shows no jump after the CALL: {calls:?}"
                );
                assert!(p.shared_end, "{go:?}: {p:?}");
                let f = bin.func_by_name(callee).unwrap();
                let rets: Vec<u64> = bin
                    .probe_points(&f)
                    .unwrap()
                    .rets
                    .iter()
                    .map(|&r| bin.file_offset(r).unwrap())
                    .collect();
                assert_eq!(p.ret_offsets, rets, "{go:?}: {p:?}");
            }
        }
    }
}
