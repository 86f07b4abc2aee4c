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
    CasAddrKey, CasAddrStats, CasKey, CasOperand, CasStats, CAS_FRAMELESS, MAX_CAS_POINTS,
};

use crate::{
    catalog::{Kind, Plan, Point, Purpose},
    gobin::{Frame, GoBinary},
    report::{CasSite, CasStack, FalseSharing, FrameOut, SharedWord},
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
}

pub struct CasPlan {
    pub plan: Plan,
    pub points: Vec<CasPoint>,
    pub operands: Vec<CasOperand>,
    pub scope: Vec<String>,
    /// CAS instructions in scope left unprobed: the instruction after them
    /// is a branch target too, or too many points.
    pub skipped: usize,
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
                out.skipped += 1;
                continue;
            }
            out.plan.points.push(Point {
                symbol: "LOCK CMPXCHG",
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
                flags: if c.frameless { CAS_FRAMELESS } else { 0 },
                disp: c.disp,
            });
            out.points.push(CasPoint {
                ip: c.ip,
                absolute: c.absolute,
                frames,
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

/// Below this many estimated writes a second, a word is not hot enough to
/// be worth padding, and its few raw samples say little about who wrote it.
const HOT_WRITES_PER_SEC: f64 = 1000.0;
const HOT_MIN_RAW: u64 = 20;
pub const CACHE_LINE: u64 = 64;

/// One written word, merged over the points that wrote it.
#[derive(Default)]
struct Word {
    attempts: u64,
    goroutines: HashSet<u64>,
    cpus: usize,
    /// The point that wrote it most, and how often.
    point: u32,
    point_attempts: u64,
}

pub struct Built {
    pub sites: Vec<CasSite>,
    pub false_sharing: Vec<FalseSharing>,
    pub stacks: Vec<CasStack>,
}

/// The report's CAS sites and false-sharing suspects from `raw`, counts
/// scaled by `scale` (elapsed / attached) over `elapsed_secs`.
pub fn build(
    raw: &Raw,
    plan: &CasPlan,
    probes: &crate::probes::Probes,
    target: &crate::target::Target,
    sym: &mut Symbolizer,
    scale: f64,
    elapsed_secs: f64,
) -> Built {
    let (bias, main_module) = (target.bias, target.bin.main_module());
    let addr_of = |k: &CasAddrKey| -> u64 {
        match plan.points.get(k.point as usize).and_then(|p| p.absolute) {
            Some(a) if k.addr == 0 => a.wrapping_add(bias),
            _ => k.addr,
        }
    };
    // Per point: attempts, failures, stacks (busiest first).
    struct Acc {
        attempts: u64,
        failures: u64,
        /// (attempts, failures, stack id, caller), busiest first.
        stacks: Vec<(u64, u64, i32, u64)>,
        words: HashMap<u64, u64>,
    }
    let mut acc: HashMap<u32, Acc> = HashMap::new();
    for (k, v) in &raw.sites {
        let a = acc.entry(k.point).or_insert(Acc {
            attempts: 0,
            failures: 0,
            stacks: Vec::new(),
            words: HashMap::new(),
        });
        a.attempts += v.attempts;
        a.failures += v.failures;
        a.stacks
            .push((v.attempts, v.failures, k.stack_id, k.caller));
    }
    let mut words: HashMap<u64, Word> = HashMap::new();
    for (k, per_cpu) in &raw.addrs {
        let addr = addr_of(k);
        let n: u64 = per_cpu.iter().map(|s| s.attempts).sum();
        if n == 0 {
            continue;
        }
        if let Some(a) = acc.get_mut(&k.point) {
            *a.words.entry(addr).or_default() += n;
        }
        if addr == 0 {
            continue;
        }
        let w = words.entry(addr).or_default();
        w.attempts += n;
        w.cpus += per_cpu.iter().filter(|s| s.attempts > 0).count();
        for s in per_cpu.iter().filter(|s| s.attempts > 0) {
            w.goroutines
                .extend([s.last_g, s.other_g].into_iter().filter(|&g| g != 0));
        }
        if n > w.point_attempts {
            w.point = k.point;
            w.point_attempts = n;
        }
    }
    let mut out = Vec::new();
    let mut cas_stacks = Vec::new();
    let est = |n: u64| (n as f64 * scale).round() as u64;
    for (point, a) in &mut acc {
        let Some(p) = plan.points.get(*point as usize) else {
            continue;
        };
        a.stacks.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
        // Each stack with its innermost frames replaced by the CAS's own
        // (the trap is on the instruction after it, maybe another line).
        for &(attempts, failures, id, caller) in &a.stacks {
            let (pcs, _) = probes.stack_at_entry(id, caller);
            let mut frames: Vec<FrameOut> = p.frames.iter().map(FrameOut::from).collect();
            frames.extend(
                sym.stack(pcs.get(1..).unwrap_or(&[]), false)
                    .iter()
                    .map(FrameOut::from),
            );
            cas_stacks.push(CasStack {
                frames,
                attempts: est(attempts),
                failures: est(failures),
            });
        }
        let stack = cas_stacks
            .get(cas_stacks.len() - a.stacks.len())
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
            attempts: est(a.attempts),
            failures: est(a.failures),
            raw_attempts: a.attempts,
            raw_failures: a.failures,
            failure_ratio: if a.attempts == 0 {
                0.0
            } else {
                a.failures as f64 / a.attempts as f64
            },
            failures_error: if a.failures == 0 {
                0.0
            } else {
                sites::count_error(a.failures, scale)
            },
            scale,
            target: target.filter(|&t| t != 0).map(|t| format!("{t:#x}")),
            target_symbol: target.filter(|&t| t != 0).and_then(|t| sym.data(t)),
            targets: a.words.keys().filter(|&&w| w != 0).count(),
            caller,
            stacks: a.stacks.len(),
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
    let false_sharing = false_sharing(&words, plan, sym, scale, elapsed_secs);
    Built {
        sites: out,
        false_sharing,
        stacks: cas_stacks,
    }
}

/// Hot words sharing a cache line with another hot word that other
/// goroutines write, on other CPUs. One word written from many places is
/// true sharing (the CAS sites show its failures), never flagged here.
fn false_sharing(
    words: &HashMap<u64, Word>,
    plan: &CasPlan,
    sym: &mut Symbolizer,
    scale: f64,
    elapsed_secs: f64,
) -> Vec<FalseSharing> {
    let rate = |w: &Word| w.attempts as f64 * scale / elapsed_secs.max(1e-9);
    let mut lines: HashMap<u64, Vec<u64>> = HashMap::new();
    for (&addr, w) in words {
        if w.attempts >= HOT_MIN_RAW && rate(w) >= HOT_WRITES_PER_SEC {
            lines
                .entry(addr & !(CACHE_LINE - 1))
                .or_default()
                .push(addr);
        }
    }
    let mut out = Vec::new();
    let mut keys: Vec<u64> = lines.keys().copied().collect();
    keys.sort_unstable();
    for line in keys {
        let mut addrs = lines.remove(&line).unwrap_or_default();
        if addrs.len() < 2 {
            continue;
        }
        addrs.sort_unstable();
        // Some pair of its words must be written by different goroutines,
        // and the line by more than one CPU: else nothing bounces it.
        let split = addrs.iter().enumerate().any(|(i, a)| {
            addrs[i + 1..].iter().any(|b| {
                let (wa, wb) = (&words[a], &words[b]);
                wa.goroutines
                    .iter()
                    .any(|g| wb.goroutines.iter().any(|h| g != h))
                    && wa.cpus + wb.cpus >= 2
            })
        });
        if !split {
            continue;
        }
        let shared = addrs
            .iter()
            .map(|addr| {
                let w = &words[addr];
                let at = plan
                    .points
                    .get(w.point as usize)
                    .and_then(|p| {
                        p.frames
                            .iter()
                            .find(|f| !f.function.starts_with("sync/atomic."))
                    })
                    .map(FrameOut::from);
                SharedWord {
                    addr: format!("{addr:#x}"),
                    symbol: sym.data(*addr),
                    function: at.as_ref().map_or("?".into(), |f| f.function.clone()),
                    file: at.as_ref().map_or("?".into(), |f| f.file.clone()),
                    line: at.as_ref().map_or(0, |f| f.line),
                    writes_per_sec: rate(w),
                    goroutines: w.goroutines.len(),
                    cpus: w.cpus,
                }
            })
            .collect();
        out.push(FalseSharing {
            cache_line: format!("{line:#x}"),
            words: shared,
            suggestion: format!(
                "these words share one {CACHE_LINE}-byte cache line and are written by different goroutines: pad them apart (e.g. `_ [{}]byte` after an 8-byte word, or cpu.CacheLinePad)",
                CACHE_LINE - 8
            ),
        });
    }
    out
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
