//! The report every output renders: ranked call sites with their stacks, how
//! the probes sampled, and what was lost.

pub mod flamegraph;
pub mod format;
pub mod json;
pub mod terminal;

use std::collections::HashMap;

use serde::Serialize;

use crate::{
    aggregate::{Drops, RawSite},
    catalog::{Kind, Point},
    gobin::Frame,
    symbolize::Symbolizer,
};

#[derive(Serialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct FrameOut {
    pub function: String,
    pub file: String,
    pub line: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
}

impl From<&Frame> for FrameOut {
    fn from(f: &Frame) -> Self {
        FrameOut {
            function: f.function.clone(),
            file: f.file.clone(),
            line: f.line,
            inlined: f.inlined,
        }
    }
}

#[derive(Serialize, Debug)]
pub struct TargetInfo {
    pub pid: u32,
    pub exe: String,
    pub go_version: String,
    pub stripped: bool,
    pub pie: bool,
}

#[derive(Serialize, Debug)]
pub struct Sampling {
    /// `--duration`, when one was given.
    pub requested_secs: Option<f64>,
    /// Wall time from the first attach to the end.
    pub elapsed_secs: f64,
    /// Time the probes were in place.
    pub attached_secs: f64,
    pub windows: u32,
    /// Entry hits the kernel counted (unscaled).
    pub raw_hits: u64,
    /// RET hits (wait ends), unscaled.
    pub raw_ret_hits: u64,
    /// Counts in `sites` are raw counts times this (elapsed / attached).
    pub scale: f64,
    pub method: String,
    /// `--budget`: what all probes together may cost, in % of one CPU
    /// (null for `unlimited`); the lock probes get `lock_budget_cpu_percent`
    /// of it and the map-write probes `map_writes.budget_cpu_percent`.
    pub budget_cpu_percent: Option<f64>,
    pub lock_budget_cpu_percent: Option<f64>,
    pub hit_cost_us: f64,
    pub window_ms: u64,
    /// The map-write probes' own windows (absent when they were off).
    pub map_writes: Option<MapSampling>,
}

#[derive(Serialize, Debug)]
pub struct MapSampling {
    pub attached_secs: f64,
    pub windows: u32,
    pub raw_hits: u64,
    pub raw_ret_hits: u64,
    /// The map-write probes' share of `--budget`.
    pub budget_cpu_percent: Option<f64>,
    pub window_ms: u64,
    /// Hits per second while attached, in the last window that closed.
    pub last_rate_per_sec: f64,
    /// RETs seen without their entry (the call began outside a window).
    pub unmatched_rets: u64,
    /// Entries into a map another goroutine's write was inside; only those
    /// whose first write was then seen to end are reported as overlaps.
    pub overlap_candidates: u64,
}

#[derive(Serialize, Debug)]
pub struct Wait {
    /// Waits whose end was seen too.
    pub timed: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
    pub max_ns: u64,
}

#[derive(Serialize, Debug)]
pub struct Site {
    pub function: String,
    pub file: String,
    pub line: u32,
    pub kind: Kind,
    /// Estimated waits over the whole run (raw × scale).
    pub count: u64,
    pub raw_count: u64,
    pub wait: Wait,
    /// Probe point(s) the waits were seen at.
    pub probe: String,
    /// Distinct stacks merged into this site; `stack` is the busiest one.
    pub stacks: usize,
    pub stack: Vec<FrameOut>,
}

/// One attached probe point and the raw entry hits the kernel counted there.
#[derive(Serialize, Debug)]
pub struct ProbeOut {
    pub symbol: String,
    pub kind: Kind,
    pub entry_offset: u64,
    pub ret_offsets: usize,
    pub raw_hits: u64,
}

/// A whole stack (innermost first) with its scaled count: one flamegraph tower.
#[derive(Debug, Clone)]
pub struct StackCount {
    pub kind: Kind,
    pub frames: Vec<FrameOut>,
    pub count: u64,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub target: TargetInfo,
    pub sampling: Sampling,
    pub probes: Vec<ProbeOut>,
    pub drops: Drops,
    /// Why the run ended: "duration", "interrupted", "target-exited".
    pub end: String,
    pub sites: Vec<Site>,
    /// Concurrent writes to plain maps: overlaps and fatal crashes.
    pub risks: Vec<Risk>,
    /// Every stack with its scaled count, for flamegraphs.
    #[serde(skip)]
    pub stacks: Vec<StackCount>,
}

/// Frames that belong to the lock and map machinery rather than the user's code.
pub fn is_machinery(function: &str) -> bool {
    // Runtime assembly (aeshashbody, memeqbody, ...) has no package prefix.
    !function.contains('.')
        || [
            "sync.",
            "internal/sync.",
            "runtime.",
            "sync/atomic.",
            "internal/runtime/",
        ]
        .iter()
        .any(|p| function.starts_with(p))
}

/// The user's frame in a stack: the innermost one outside the machinery.
pub fn site_of(frames: &[FrameOut]) -> FrameOut {
    frames
        .iter()
        .find(|f| !is_machinery(&f.function))
        .or(frames.last())
        .cloned()
        .unwrap_or(FrameOut {
            function: "?".into(),
            file: "?".into(),
            line: 0,
            inlined: false,
        })
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RiskKind {
    /// Two goroutines were inside writes to one map at the same time.
    Overlap,
    /// The runtime died of it ("concurrent map writes" and kin).
    Fatal,
}

/// One goroutine involved in a concurrent-write risk.
#[derive(Serialize, Debug, Clone)]
pub struct WriterOut {
    /// Goroutine id (0 when the thread was not running Go code).
    pub goroutine: u64,
    /// "in-map-write", "throwing", "running" (a thread stopped at the crash
    /// outside any map write) or "overlapping-writer" (seen earlier on the map).
    pub state: String,
    /// The user's frame: innermost outside the runtime.
    pub function: String,
    pub file: String,
    pub line: u32,
    pub stack: Vec<FrameOut>,
}

/// A concurrent write to a plain map (`risk.concurrent_write`).
#[derive(Serialize, Debug, Clone)]
pub struct Risk {
    /// Address of the map header, when known.
    pub map: Option<String>,
    pub kind: RiskKind,
    pub message: String,
    /// How often it recurred (raw, within probe windows).
    pub count: u64,
    pub first_seen_secs: f64,
    pub last_seen_secs: f64,
    pub first_seen_unix_nanos: u64,
    pub writers: Vec<WriterOut>,
}

/// The site is the innermost frame outside the lock machinery (the user's
/// function that called Lock, inlined or not); the machinery frames in
/// between tell which kind of wait it was.
fn classify(frames: &[FrameOut], probe_kind: Kind) -> (usize, Kind) {
    let site = frames
        .iter()
        .position(|f| !is_machinery(&f.function))
        .unwrap_or(frames.len().saturating_sub(1));
    let mut kind = probe_kind;
    if kind == Kind::Mutex {
        for f in &frames[..site] {
            match f.function.as_str() {
                "sync.(*RWMutex).RLock" => kind = Kind::RwmutexRead,
                "sync.(*RWMutex).Lock" => kind = Kind::RwmutexWrite,
                _ => continue,
            }
            break;
        }
    }
    (site, kind)
}

pub fn probe_hits(raw: &[RawSite], points: &[Point]) -> Vec<ProbeOut> {
    points
        .iter()
        .enumerate()
        .map(|(i, p)| ProbeOut {
            symbol: p.symbol.to_string(),
            kind: p.kind,
            entry_offset: p.entry_offset,
            ret_offsets: p.ret_offsets.len(),
            raw_hits: raw
                .iter()
                .filter(|r| r.point == i)
                .map(|r| r.stats.count)
                .sum(),
        })
        .collect()
}

/// The ranked sites, every stack for the flamegraph, and how many raw waits
/// had a stack that never left the lock machinery (the frame-pointer walk
/// stopped early), counted as drops rather than shown as a site named after
/// `sync` internals.
pub fn build_sites(
    raw: &[RawSite],
    points: &[Point],
    sym: &mut Symbolizer,
    scale: f64,
) -> (Vec<Site>, Vec<StackCount>, u64) {
    struct Acc {
        site: FrameOut,
        kind: Kind,
        raw: u64,
        timed: u64,
        wait_ns: u64,
        max_ns: u64,
        probes: Vec<&'static str>,
        stacks: HashMap<Vec<FrameOut>, u64>,
    }
    let mut by_site: HashMap<(Kind, String, String, u32), Acc> = HashMap::new();
    let mut flame: HashMap<(Kind, Vec<FrameOut>), u64> = HashMap::new();
    let mut incomplete = 0;
    for r in raw {
        let Some(point) = points.get(r.point) else {
            continue;
        };
        let frames: Vec<FrameOut> = sym
            .stack(&r.pcs, r.first_is_ip)
            .iter()
            .map(FrameOut::from)
            .collect();
        if frames.is_empty() {
            continue;
        }
        let (at, kind) = classify(&frames, point.kind);
        let site = frames[at].clone();
        if is_machinery(&site.function) {
            incomplete += r.stats.count;
            continue;
        }
        let key = (kind, site.function.clone(), site.file.clone(), site.line);
        let acc = by_site.entry(key).or_insert_with(|| Acc {
            site,
            kind,
            raw: 0,
            timed: 0,
            wait_ns: 0,
            max_ns: 0,
            probes: Vec::new(),
            stacks: HashMap::new(),
        });
        acc.raw += r.stats.count;
        acc.timed += r.stats.timed;
        acc.wait_ns += r.stats.wait_ns;
        acc.max_ns = acc.max_ns.max(r.stats.max_wait_ns);
        if !acc.probes.contains(&point.symbol) {
            acc.probes.push(point.symbol);
        }
        *acc.stacks.entry(frames.clone()).or_default() += r.stats.count;
        *flame.entry((kind, frames)).or_default() += r.stats.count;
    }
    let scaled = |n: u64| (n as f64 * scale).round() as u64;
    let mut sites: Vec<Site> = by_site
        .into_values()
        .map(|a| {
            let stacks = a.stacks.len();
            let stack = a
                .stacks
                .into_iter()
                .max_by(|x, y| x.1.cmp(&y.1).then_with(|| y.0.len().cmp(&x.0.len())))
                .map(|(s, _)| s)
                .unwrap_or_default();
            Site {
                function: a.site.function,
                file: a.site.file,
                line: a.site.line,
                kind: a.kind,
                count: scaled(a.raw),
                raw_count: a.raw,
                wait: Wait {
                    timed: a.timed,
                    total_ns: a.wait_ns,
                    mean_ns: a.wait_ns.checked_div(a.timed).unwrap_or(0),
                    max_ns: a.max_ns,
                },
                probe: a.probes.join(","),
                stacks,
                stack,
            }
        })
        .collect();
    sites.sort_by(|a, b| {
        b.raw_count
            .cmp(&a.raw_count)
            .then(b.wait.total_ns.cmp(&a.wait.total_ns))
            .then_with(|| a.function.cmp(&b.function))
    });
    let mut stacks: Vec<StackCount> = flame
        .into_iter()
        .map(|((kind, frames), n)| StackCount {
            kind,
            frames,
            count: scaled(n),
        })
        .collect();
    stacks.sort_by_key(|s| std::cmp::Reverse(s.count));
    (sites, stacks, incomplete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str) -> FrameOut {
        FrameOut {
            function: name.into(),
            file: "x.go".into(),
            line: 1,
            inlined: false,
        }
    }

    #[test]
    fn site_skips_lock_machinery_and_reads_the_kind() {
        let frames = vec![
            f("sync.runtime_SemacquireMutex"),
            f("sync.(*Mutex).lockSlow"),
            f("sync.(*Mutex).Lock"),
            f("sync.(*RWMutex).Lock"),
            f("main.writeConfig"),
            f("runtime.goexit"),
        ];
        assert_eq!(classify(&frames, Kind::Mutex), (4, Kind::RwmutexWrite));
        let frames = vec![
            f("sync.runtime_SemacquireMutex"),
            f("sync.(*RWMutex).RLock"),
            f("main.read"),
        ];
        assert_eq!(classify(&frames, Kind::Mutex), (2, Kind::RwmutexRead));
        let frames = vec![f("internal/sync.runtime_SemacquireMutex"), f("main.hot")];
        assert_eq!(classify(&frames, Kind::Mutex), (1, Kind::Mutex));
        // A dedicated RWMutex probe keeps its kind.
        let frames = vec![f("sync.runtime_SemacquireRWMutexR"), f("main.read")];
        assert_eq!(classify(&frames, Kind::RwmutexRead), (1, Kind::RwmutexRead));
    }
}
