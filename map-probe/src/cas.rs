//! Compare-and-swap retries, the cost lock-free code trades lock waits for.
//! `plan` finds every `LOCK CMPXCHG` / `CMPXCHG16B` in the code in scope by
//! disassembly and puts a probe on the instruction after each: the trap
//! saves the flags the CAS left (ZF clear: it failed, and the loop around it
//! retries) and the registers that address the word it swapped. `build`
//! turns what the kernel counted into the report's `cas` and
//! `false_sharing` entries.
//!
//! Not CAS sites: the Go runtime, and `sync`'s own fast paths (Mutex.Lock's
//! CAS inlined into user code is a lock, counted as one when it waits).

use std::collections::{HashMap, HashSet};

use map_probe_common::{
    CasAddrKey, CasAddrStats, CasKey, CasOperand, CasStats, CAS_FAIL_KEY, CAS_FRAMELESS,
    CAS_WRITE_ONLY, MAX_CAS_POINTS,
};

use crate::{
    catalog::{Kind, Plan, Point, Purpose},
    false_sharing::{HotWord, WordKind},
    gobin::{Frame, GoBinary},
    report::{CasSite, CasStack, FrameOut},
    sites,
    symbolize::Symbolizer,
};

/// Lock-free map and atomic libraries whose CASes are in scope by default,
/// beside the main module's own packages.
pub const LOCK_FREE_LIBRARIES: &[&str] = &[
    "github.com/puzpuzpuz/xsync",
    "github.com/cornelk/hashmap",
    "github.com/alphadose/haxmap",
    "github.com/orcaman/concurrent-map",
    "go.uber.org/atomic",
];

/// Packages whose CASes are never sites: the runtime's own, and `sync`'s
/// lock fast paths wherever they are inlined.
fn is_excluded(function: &str) -> bool {
    let pkg = package_of(function);
    pkg == "runtime"
        || pkg == "sync"
        || pkg == "internal/sync"
        || pkg.starts_with("runtime/")
        || pkg.starts_with("internal/runtime/")
}

/// The package path of a Go function name: `main` of `main.casAdd`,
/// `github.com/puzpuzpuz/xsync/v4` of `github.com/puzpuzpuz/xsync/v4.(*Map[...]).Load`.
pub fn package_of(function: &str) -> &str {
    let head = &function[..function.find(['[', '(']).unwrap_or(function.len())];
    let slash = head.rfind('/').map_or(0, |i| i + 1);
    match head[slash..].find('.') {
        Some(d) => &function[..slash + d],
        None => head,
    }
}

/// Which packages' CASes are probed: patterns that each match a package
/// path and everything below it (`github.com/acme/shop` covers
/// `github.com/acme/shop/cache`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub patterns: Vec<String>,
}

impl Scope {
    /// `default` (the main module and `LOCK_FREE_LIBRARIES`), `none`, or a
    /// comma-separated list of package patterns, where `default` may stand
    /// among them.
    pub fn parse(spec: &str, bin: &GoBinary) -> Scope {
        let mut patterns = Vec::new();
        for p in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p {
                "none" => {}
                "default" => {
                    patterns.push("main".to_string());
                    if let Some(m) = bin.main_module().filter(|m| *m != "command-line-arguments") {
                        patterns.push(m.to_string());
                    }
                    patterns.extend(LOCK_FREE_LIBRARIES.iter().map(|s| s.to_string()));
                }
                p => patterns.push(p.trim_end_matches("/...").to_string()),
            }
        }
        patterns.dedup();
        Scope { patterns }
    }

    pub fn covers(&self, pkg: &str) -> bool {
        self.patterns.iter().any(|p| {
            pkg == p
                || pkg
                    .strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

/// One probed CAS instruction.
#[derive(Clone, Debug)]
pub struct CasPoint {
    /// The CMPXCHG itself (link-time address).
    pub ip: u64,
    /// A RIP-relative operand's address (link-time); the kernel records 0.
    pub absolute: Option<u64>,
    /// Its frames, innermost first (inlined calls expanded).
    pub frames: Vec<Frame>,
    /// An atomic write that cannot fail (XADD, XCHG, LOCK ADD...): probed
    /// for the word it writes, never a CAS site.
    pub write_only: bool,
    /// Its failures are counted at a block only they reach (`fail`).
    pub fail_block: bool,
}

pub struct CasPlan {
    pub plan: Plan,
    pub points: Vec<CasPoint>,
    pub operands: Vec<CasOperand>,
    pub scope: Vec<String>,
    /// CAS instructions in scope left unprobed: the instruction after them
    /// is a branch target too, or too many points.
    pub skipped: usize,
    /// The failure-only blocks (`Purpose::CasFail`), and for each the index
    /// of its CAS point in `points`.
    pub fail: Plan,
    pub fail_of: Vec<u32>,
}

impl CasPlan {
    /// Points that are compare-and-swaps (the rest are atomic writes).
    pub fn cas_points(&self) -> usize {
        self.points.iter().filter(|p| !p.write_only).count()
    }
}

/// Every CAS in the functions `scope` covers.
pub fn plan(bin: &GoBinary, scope: &Scope) -> CasPlan {
    let mut out = CasPlan {
        plan: Plan {
            purpose: Purpose::Cas,
            points: Vec::new(),
            missing: Vec::new(),
        },
        points: Vec::new(),
        operands: Vec::new(),
        scope: scope.patterns.clone(),
        skipped: 0,
        fail: Plan {
            purpose: Purpose::CasFail,
            points: Vec::new(),
            missing: Vec::new(),
        },
        fail_of: Vec::new(),
    };
    if scope.patterns.is_empty() {
        return out;
    }
    for f in bin.funcs() {
        if !scope.covers(package_of(&f.name)) {
            continue;
        }
        for c in bin.cas_instructions(&f) {
            let frames = bin.frames_at(c.ip);
            if frames.iter().any(|fr| is_excluded(&fr.function)) {
                continue;
            }
            let Some(next) = bin.file_offset(c.next) else {
                continue;
            };
            if c.unsafe_next || out.points.len() >= MAX_CAS_POINTS as usize {
                out.skipped += usize::from(!c.write_only);
                continue;
            }
            let fail_block = c.fail_block.and_then(|a| bin.file_offset(a));
            if let Some(off) = fail_block {
                out.fail_of.push(out.points.len() as u32);
                out.fail.points.push(Point {
                    symbol: "CAS failed",
                    kind: Kind::Cas,
                    entry_offset: Some(off),
                    ret_offsets: Vec::new(),
                    call: None,
                    ends_at: None,
                });
            }
            out.plan.points.push(Point {
                symbol: if c.write_only {
                    "atomic write"
                } else {
                    "LOCK CMPXCHG"
                },
                kind: Kind::Cas,
                entry_offset: Some(next),
                ret_offsets: Vec::new(),
                call: None,
                ends_at: None,
            });
            out.operands.push(CasOperand {
                base: c.base,
                index: c.index,
                scale: c.scale,
                flags: if c.frameless { CAS_FRAMELESS } else { 0 }
                    | if c.write_only { CAS_WRITE_ONLY } else { 0 },
                disp: c.disp,
            });
            out.points.push(CasPoint {
                ip: c.ip,
                absolute: c.absolute,
                frames,
                write_only: c.write_only,
                fail_block: fail_block.is_some(),
            });
        }
    }
    out
}

/// What the kernel counted, as read at one moment.
#[derive(Clone, Default)]
pub struct Raw {
    pub sites: HashMap<CasKey, CasStats>,
    pub addrs: HashMap<CasAddrKey, Vec<CasAddrStats>>,
}

impl Raw {
    pub fn read(probes: &crate::probes::Probes) -> anyhow::Result<Raw> {
        Ok(Raw {
            sites: probes.cas_sites()?.into_iter().collect(),
            addrs: probes.cas_addrs()?.into_iter().collect(),
        })
    }

    /// What grew since `prev` (an interval's share).
    pub fn since(&self, prev: &Raw) -> Raw {
        let sites = self
            .sites
            .iter()
            .map(|(k, v)| {
                let p = prev.sites.get(k).copied().unwrap_or_default();
                let d = CasStats {
                    attempts: v.attempts.saturating_sub(p.attempts),
                    failures: v.failures.saturating_sub(p.failures),
                };
                (*k, d)
            })
            .filter(|(_, d)| d.attempts > 0)
            .collect();
        let addrs = self
            .addrs
            .iter()
            .map(|(k, v)| {
                let p = prev.addrs.get(k);
                let d: Vec<CasAddrStats> = v
                    .iter()
                    .enumerate()
                    .map(|(cpu, s)| {
                        let was = p.and_then(|p| p.get(cpu)).copied().unwrap_or_default();
                        CasAddrStats {
                            attempts: s.attempts.saturating_sub(was.attempts),
                            failures: s.failures.saturating_sub(was.failures),
                            ..*s
                        }
                    })
                    .collect();
                (*k, d)
            })
            .filter(|(_, d)| d.iter().any(|s| s.attempts > 0))
            .collect();
        Raw { sites, addrs }
    }
}

/// Traps taking this share of a CPU while the CAS probes are in slow the
/// loops they count, and the scaled estimates read low (`probe_bound`).
pub const PROBE_BOUND_CPU: f64 = 0.05;

pub struct Built {
    pub sites: Vec<CasSite>,
    /// Every word a CAS or atomic write in scope wrote, for `false_sharing`.
    pub words: Vec<HotWord>,
    pub stacks: Vec<CasStack>,
}

/// How raw counts become estimates: the attempt probes' scale (elapsed /
/// attached), the failure blocks' (None without any), and the span.
pub struct Scales {
    pub attempts: f64,
    pub failures: Option<f64>,
    pub elapsed_secs: f64,
}

/// The report's CAS sites and written words from `raw`.
pub fn build(
    raw: &Raw,
    plan: &CasPlan,
    probes: &crate::probes::Probes,
    target: &crate::target::Target,
    sym: &mut Symbolizer,
    scales: &Scales,
) -> Built {
    let (bias, main_module) = (target.bias, target.bin.main_module());
    let scale = scales.attempts;
    let addr_of = |k: &CasAddrKey| -> u64 {
        match plan.points.get(k.point as usize).and_then(|p| p.absolute) {
            Some(a) if k.addr == 0 => a.wrapping_add(bias),
            _ => k.addr,
        }
    };
    // Per point: attempts and failures after the CAS, failure-block hits,
    // and per stack (below the CAS's own frame) the same three.
    #[derive(Default)]
    struct Acc {
        attempts: u64,
        failures: u64,
        fail_hits: u64,
        stacks: HashMap<Vec<u64>, [u64; 3]>,
        words: HashMap<u64, u64>,
    }
    let mut acc: HashMap<u32, Acc> = HashMap::new();
    for (k, v) in &raw.sites {
        let fail_key = k.point & CAS_FAIL_KEY != 0;
        let a = acc.entry(k.point & !CAS_FAIL_KEY).or_default();
        // The trap's own frame (the instruction after the CAS, or the failure
        // block) is replaced by the CAS's frames below.
        let (pcs, _) = probes.stack_at_entry(k.stack_id, k.caller);
        let s = a
            .stacks
            .entry(pcs.get(1..).unwrap_or(&[]).to_vec())
            .or_default();
        if fail_key {
            a.fail_hits += v.failures;
            s[2] += v.failures;
        } else {
            a.attempts += v.attempts;
            a.failures += v.failures;
            s[0] += v.attempts;
            s[1] += v.failures;
        }
    }
    let mut words: HashMap<(u32, u64), HotWord> = HashMap::new();
    for (k, per_cpu) in &raw.addrs {
        let addr = addr_of(k);
        let n: u64 = per_cpu.iter().map(|s| s.attempts).sum();
        if n == 0 {
            continue;
        }
        let Some(p) = plan.points.get(k.point as usize) else {
            continue;
        };
        if !p.write_only {
            *acc.entry(k.point)
                .or_default()
                .words
                .entry(addr)
                .or_default() += n;
        }
        let w = words.entry((k.point, addr)).or_insert_with(|| HotWord {
            addr,
            kind: if p.write_only {
                WordKind::Atomic
            } else {
                WordKind::Cas
            },
            raw: 0,
            per_sec: 0.0,
            goroutines: HashSet::new(),
            cpus: 0,
            at: p
                .frames
                .iter()
                .find(|f| !f.function.starts_with("sync/atomic."))
                .or(p.frames.first())
                .map(FrameOut::from),
        });
        w.raw += n;
        w.per_sec += n as f64 * scale / scales.elapsed_secs.max(1e-9);
        for (cpu, s) in per_cpu.iter().enumerate().filter(|(_, s)| s.attempts > 0) {
            w.cpus |= 1 << (cpu % 64);
            w.goroutines
                .extend([s.last_g, s.other_g].into_iter().filter(|&g| g != 0));
        }
    }
    let mut out = Vec::new();
    let mut cas_stacks = Vec::new();
    let est = |n: u64, scale: f64| (n as f64 * scale).round() as u64;
    for (point, a) in acc {
        let Some(p) = plan.points.get(point as usize).filter(|p| !p.write_only) else {
            continue;
        };
        // Failures from the failure block when it was probed, else from the
        // flags after the CAS.
        let (fail_block, f_scale, raw_failures) = match scales.failures {
            Some(f) if p.fail_block => (true, f, a.fail_hits),
            _ => (false, scale, a.failures),
        };
        let mut stacks: Vec<(Vec<u64>, [u64; 3])> = a.stacks.into_iter().collect();
        stacks.sort_unstable_by_key(|(pcs, n)| (std::cmp::Reverse(n[0] + n[2]), pcs.clone()));
        let first = cas_stacks.len();
        for (pcs, n) in &stacks {
            let mut frames: Vec<FrameOut> = p.frames.iter().map(FrameOut::from).collect();
            frames.extend(sym.stack(pcs, false).iter().map(FrameOut::from));
            cas_stacks.push(CasStack {
                frames,
                attempts: est(n[0], scale),
                failures: if fail_block {
                    est(n[2], f_scale)
                } else {
                    est(n[1], scale)
                },
            });
        }
        let stack = cas_stacks
            .get(first)
            .map(|s| s.frames.clone())
            .unwrap_or_default();
        let at = stack
            .iter()
            .find(|f| !f.function.starts_with("sync/atomic."))
            .cloned()
            .unwrap_or_else(|| sites::site_of(&stack));
        let caller = sites::caller_of(&at, &stack, main_module);
        let (target, _) = a
            .words
            .iter()
            .max_by_key(|(addr, n)| (**n, **addr))
            .map_or((None, 0), |(addr, n)| (Some(*addr), *n));
        out.push(CasSite {
            function: at.function.clone(),
            file: at.file.clone(),
            line: at.line,
            attempts: est(a.attempts, scale),
            failures: est(raw_failures, f_scale),
            raw_attempts: a.attempts,
            raw_failures,
            failure_ratio: if a.attempts == 0 {
                0.0
            } else {
                a.failures as f64 / a.attempts as f64
            },
            failures_error: if raw_failures == 0 {
                0.0
            } else {
                sites::count_error(raw_failures, f_scale)
            },
            scale,
            failures_from: if fail_block {
                "failure-block"
            } else {
                "after-cas"
            },
            failures_scale: f_scale,
            target: target.filter(|&t| t != 0).map(|t| format!("{t:#x}")),
            target_symbol: target.filter(|&t| t != 0).and_then(|t| sym.data(t)),
            targets: a.words.keys().filter(|&&w| w != 0).count(),
            caller,
            stacks: stacks.len(),
            stack,
        });
    }
    out.sort_by(|x, y| {
        (y.failures, y.attempts, &x.function, x.line).cmp(&(
            x.failures,
            x.attempts,
            &y.function,
            y.line,
        ))
    });
    Built {
        sites: out,
        words: words.into_values().collect(),
        stacks: cas_stacks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_of_go_names() {
        assert_eq!(package_of("main.casAdd"), "main");
        assert_eq!(package_of("main.main.func1"), "main");
        assert_eq!(
            package_of("github.com/puzpuzpuz/xsync/v4.(*Map[go.shape.string,go.shape.int64]).Load"),
            "github.com/puzpuzpuz/xsync/v4"
        );
        assert_eq!(
            package_of("sync/atomic.(*Int64).CompareAndSwap"),
            "sync/atomic"
        );
        assert_eq!(package_of("internal/sync.(*Mutex).Lock"), "internal/sync");
        assert_eq!(package_of("runtime.casgstatus"), "runtime");
    }

    #[test]
    fn scope_matches_packages_and_below() {
        let s = Scope {
            patterns: vec!["main".into(), "github.com/acme/shop".into()],
        };
        assert!(s.covers("main"));
        assert!(s.covers("github.com/acme/shop"));
        assert!(s.covers("github.com/acme/shop/cache"));
        assert!(!s.covers("github.com/acme/shopping"));
        assert!(!s.covers("mainly"));
    }

    #[test]
    fn sync_fast_paths_and_runtime_are_not_sites() {
        assert!(is_excluded("sync.(*Mutex).Lock"));
        assert!(is_excluded("internal/sync.(*Mutex).Lock"));
        assert!(is_excluded("runtime.casgstatus"));
        assert!(is_excluded("internal/runtime/atomic.Cas64"));
        assert!(!is_excluded("sync/atomic.(*Int64).CompareAndSwap"));
        assert!(!is_excluded("main.casAdd"));
    }
}
