//! The report every output renders: ranked call sites with their stacks, how
//! the probes sampled, and what was lost. `sites` and `risks` build it; the
//! modules here only render it.

pub mod flamegraph;
pub mod format;
pub mod json;
pub mod pprof;
pub mod profile;
pub mod terminal;

use serde::Serialize;

use crate::{aggregate::Drops, catalog::Kind, gobin::Frame};

#[derive(Serialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct FrameOut {
    pub function: String,
    pub file: String,
    pub line: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    /// The function's `func` line (Go 1.20+; 0, and left out, before).
    #[serde(skip_serializing_if = "is_zero")]
    pub start_line: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl From<&Frame> for FrameOut {
    fn from(f: &Frame) -> Self {
        FrameOut {
            function: f.function.clone(),
            file: f.file.clone(),
            line: f.line,
            inlined: f.inlined,
            start_line: f.start_line,
        }
    }
}

#[derive(Serialize, Debug)]
pub struct TargetInfo {
    pub pid: u32,
    pub exe: String,
    pub go_version: String,
    /// The main module's path from the build info, when there is one.
    pub module: Option<String>,
    pub stripped: bool,
    pub pie: bool,
    /// The executable's build ID: GNU (hex) when it has one, else Go's.
    pub build_id: Option<String>,
    /// Where its code is mapped in the process: start, limit and file
    /// offset of the executable segment (for profile mappings).
    #[serde(skip)]
    pub text_mapping: (u64, u64, u64),
}

#[derive(Serialize, Debug)]
pub struct Sampling {
    /// `--duration`, when one was given.
    pub requested_secs: Option<f64>,
    /// When the time this report covers began (Unix time, ns).
    pub start_unix_nanos: u64,
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
    /// What the budget counts one hit as: twice the trap measured on this
    /// host at start, or `--hit-cost-us`.
    pub hit_cost_us: f64,
    /// The trap measured at start (null when `--hit-cost-us` was given).
    pub trap_us: Option<f64>,
    pub window_ms: u64,
    /// The map-write probes' own windows (absent when they were off).
    pub map_writes: Option<MapSampling>,
    /// The lock points' tiers (see `tiers`): tier 0 steady, 1-7 windowed
    /// with ever lower duty; only tiers holding points.
    pub lock_tiers: Vec<LockTier>,
    /// The CAS probes' own windows (absent when no CAS is in scope).
    pub cas: Option<CasSampling>,
    /// Probe points planted into and removed from the target (every
    /// purpose, entries and RETs); each is a page of its text replaced.
    pub planting: Planting,
    /// map-probe's own CPU time (its threads and the children that plant
    /// and remove links): before the observation began (reading the
    /// binary, finding the points, measuring the trap, the first attach)
    /// and since.
    pub self_cpu: SelfCpu,
}

#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct SelfCpu {
    pub start_secs: f64,
    pub observing_secs: f64,
    /// `observing_secs` over the observation's wall time, in % of one CPU.
    pub observing_percent: f64,
}

/// What planting cost the target: a count of points, whatever their hits.
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Planting {
    pub points_planted: u64,
    pub points_removed: u64,
    /// The steady lock tier's, which should be planted about once a run.
    pub steady_points_planted: u64,
    pub steady_points_removed: u64,
    /// Steady points moved out because they heated up, each re-planting
    /// only its group of points (`probes::STEADY_CHUNK`).
    pub steady_evictions: u32,
}

#[derive(Serialize, Debug)]
pub struct CasSampling {
    /// CAS instructions probed, and the package patterns that chose them.
    pub points: usize,
    pub scope: Vec<String>,
    pub attached_secs: f64,
    pub windows: u32,
    pub raw_hits: u64,
    pub raw_failures: u64,
    /// Counts in `cas` are raw counts times this (elapsed / attached).
    pub scale: f64,
    pub budget_cpu_percent: Option<f64>,
    /// The CAS traps took at least `cas::PROBE_BOUND_CPU` of a CPU while
    /// attached (raw hits × the trap measured at start, over the attached
    /// time): the loops ran slower inside the windows than between them,
    /// so the scaled estimates are lower bounds (failure ratios still hold).
    pub probe_bound: bool,
    /// Atomic writes probed beside the CASes (their words only, for false
    /// sharing), and their raw hits.
    pub atomic_points: usize,
    pub raw_atomic_hits: u64,
    /// CAS points whose failures are counted on a failure-only block, that
    /// set's raw hits, attached time, windows and scale.
    pub failure_blocks: usize,
    pub raw_failure_block_hits: u64,
    pub failure_block_attached_secs: f64,
    pub failure_block_windows: u32,
    pub failure_block_scale: f64,
}

/// One compare-and-swap instruction in the code in scope, with how often it
/// ran and failed (a failed CAS is a retry of the loop around it).
#[derive(Serialize, Debug)]
pub struct CasSite {
    pub function: String,
    pub file: String,
    pub line: u32,
    /// Estimated over the whole run (raw × scale), and the raw counts.
    pub attempts: u64,
    pub failures: u64,
    pub raw_attempts: u64,
    pub raw_failures: u64,
    /// failures / attempts among the CASes the windows saw (scaling cancels
    /// out; the failure-block count is not mixed in).
    pub failure_ratio: f64,
    /// 95% relative error of `failures` as an estimate (Poisson, from the
    /// raw count; 0 when nothing was scaled).
    pub failures_error: f64,
    /// What `raw_attempts` is multiplied by.
    pub scale: f64,
    /// Where `failures` were counted: "failure-block" (a probe on the block
    /// only a failed CAS reaches, free when the CAS swaps; scaled by
    /// `failures_scale`) or "after-cas" (the flags after every CAS, in the
    /// attempts' windows).
    pub failures_from: &'static str,
    pub failures_scale: f64,
    /// The word it swapped most often: address, and the global holding it
    /// (`main.counters+8`) where the binary has a symbol table; how many
    /// distinct words it swapped.
    pub target: Option<String>,
    pub target_symbol: Option<String>,
    pub targets: usize,
    /// When the CAS is in a dependency: the first frame of the main module
    /// above it, the user's line that pays.
    pub caller: Option<FrameOut>,
    pub stacks: usize,
    pub stack: Vec<FrameOut>,
}

/// Two distinct hot words in one 64-byte cache line, written by different
/// goroutines on different CPUs in the same windows: each write takes the
/// line from the other's cache. Padding them apart is the fix.
#[derive(Serialize, Debug)]
pub struct FalseSharing {
    /// The cache line's address.
    pub cache_line: String,
    pub words: Vec<SharedWord>,
    pub suggestion: String,
}

#[derive(Serialize, Debug)]
pub struct SharedWord {
    pub addr: String,
    pub symbol: Option<String>,
    /// What writes it: a CAS, another atomic write, or a contended lock.
    pub kind: crate::false_sharing::WordKind,
    pub function: String,
    pub file: String,
    pub line: u32,
    /// Estimated writes per second while the probes ran (a lock's: twice
    /// its waits, a lower bound).
    pub writes_per_sec: f64,
    /// A lock's estimated waits per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waits_per_sec: Option<f64>,
    /// Distinct goroutines and CPUs seen writing it (goroutines: at least).
    pub goroutines: usize,
    pub cpus: usize,
}

#[derive(Serialize, Debug)]
pub struct LockTier {
    pub tier: u8,
    pub points: usize,
    pub attached_secs: f64,
    pub windows: u32,
    pub budget_cpu_percent: Option<f64>,
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
    /// Estimated total wait over the run: every counted wait at the mean
    /// of the timed ones, scaled like `count`.
    pub delay_ns: u64,
    /// Quantiles of the timed waits, estimated within their log2 bucket
    /// (so within a factor of 2 at worst, far closer with many waits).
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    /// The timed waits per log2 bucket, empty buckets left out (raw counts).
    pub hist: Vec<Bucket>,
}

/// Waits of at least `ge_ns` and less than `lt_ns` nanoseconds.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Bucket {
    pub ge_ns: u64,
    pub lt_ns: u64,
    pub count: u64,
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
    /// What `raw_count` was multiplied by: the inverse of the share of the
    /// run this site's probes were in (1: every wait was seen).
    pub scale: f64,
    /// The share of the run its probes were in (1 / scale).
    pub observed_share: f64,
    /// The estimate's relative error at 95% confidence, from the raw count
    /// (a Poisson count of n has a standard error of sqrt(n)): 0 when every
    /// wait was seen, 0.2 for 96 raw waits, 0.62 for 10.
    pub count_error: f64,
    /// How its waits were seen: `call-site` (probes on the call of the
    /// slow path at this site), `shared` (a semaphore function's probe,
    /// shared by every site), or `both`.
    pub measured: String,
    /// Where its waits' ends were seen: `after-call` (the instruction after
    /// this site's CALL), `callee-return` (the called function's RETs, for
    /// a site whose fast path continues after the CALL too, where a probe
    /// would trap on every Lock), or `return` (a shared function's RETs).
    pub timed_at: String,
    pub wait: Wait,
    /// Probe point(s) the waits were seen at.
    pub probe: String,
    /// The lock waited on most at this site (its address), the global that
    /// holds it where the binary has a symbol table, and how many distinct
    /// locks this site waited on (many: a lock per shard or per object).
    pub lock: Option<String>,
    pub lock_symbol: Option<String>,
    pub locks: usize,
    /// When the site is in a dependency (a library's own `Lock`): the
    /// first frame of the main module above it, the user's line that pays.
    pub caller: Option<FrameOut>,
    /// For a site that waited on more than one lock (a lock per shard of a
    /// sharded map, or per object): how its waits spread over them.
    pub shards: Option<Shards>,
    /// For kind `sync.Map`: the method the user called.
    pub sync_map: Option<SyncMapOut>,
    /// Distinct stacks merged into this site; `stack` is the busiest one.
    pub stacks: usize,
    pub stack: Vec<FrameOut>,
}

#[derive(Serialize, Debug)]
pub struct Shards {
    /// Distinct locks seen at the site.
    pub locks: usize,
    /// Each lock's share of the site's waits, largest first (at most 64).
    pub shares: Vec<ShardShare>,
    /// The lock named hot (`sites::HOT_SHARD_SHARE`), when one is.
    pub hot: Option<ShardShare>,
}

#[derive(Serialize, Debug, Clone)]
pub struct ShardShare {
    pub lock: String,
    pub symbol: Option<String>,
    pub waits: u64,
    pub share: f64,
}

#[derive(Serialize, Debug)]
pub struct SyncMapOut {
    /// `Load`, `Store`, `LoadOrStore`, ...: the outermost `sync.(*Map)` frame.
    pub method: String,
    /// Go 1.19-1.23 only (the hash trie of 1.24+ has neither): misses that
    /// promoted the dirty map to read-only, the dirty-map rebuilds (an O(n)
    /// copy under the map's mutex) that follow, and the rebuilds' time;
    /// estimated like `count`, with the raw counts beside.
    pub promotions: u64,
    pub rebuilds: u64,
    pub rebuild_ns: u64,
    pub raw_promotions: u64,
    pub raw_rebuilds: u64,
    /// Rebuilds took at least a tenth of all the time spent waiting in and
    /// rebuilding sync.Maps: the map is written too often for sync.Map.
    pub promotions_are_the_cost: bool,
}

/// One attached probe point and the raw entry hits the kernel counted there.
#[derive(Serialize, Debug)]
pub struct ProbeOut {
    pub symbol: String,
    pub kind: Kind,
    /// None for a callee's RETs, which end the waits of sites whose own
    /// end would trap on every Lock.
    pub entry_offset: Option<u64>,
    pub ret_offsets: usize,
    pub raw_hits: u64,
}

/// One CAS stack (innermost first, the CAS's own frames leading) with its
/// estimated attempts and failures: a tower of `--weight cas-failures`.
#[derive(Debug, Clone)]
pub struct CasStack {
    pub frames: Vec<FrameOut>,
    pub attempts: u64,
    pub failures: u64,
}

/// A whole stack (innermost first) with its scaled count: one flamegraph tower.
#[derive(Debug, Clone)]
pub struct StackCount {
    pub kind: Kind,
    pub frames: Vec<FrameOut>,
    pub count: u64,
    /// Estimated total wait through this stack, scaled like `count`.
    pub delay_ns: u64,
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
    /// Compare-and-swap sites, most failures first.
    pub cas: Vec<CasSite>,
    pub false_sharing: Vec<FalseSharing>,
    /// Every CAS stack, for flamegraphs and pprof.
    #[serde(skip)]
    pub cas_stacks: Vec<CasStack>,
    /// Every stack with its scaled count, for flamegraphs.
    #[serde(skip)]
    pub stacks: Vec<StackCount>,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report holding only `stacks`, for the renderers' own tests.
    pub(crate) fn report_with(stacks: Vec<StackCount>) -> Report {
        Report {
            target: TargetInfo {
                pid: 1,
                exe: "/bin/prog".into(),
                go_version: "go1.26.8".into(),
                module: None,
                stripped: false,
                pie: false,
                build_id: Some("abc".into()),
                text_mapping: (0x401000, 0x500000, 0x1000),
            },
            sampling: Sampling {
                requested_secs: Some(1.0),
                start_unix_nanos: 1_000_000_000,
                elapsed_secs: 1.0,
                attached_secs: 1.0,
                windows: 1,
                raw_hits: 0,
                raw_ret_hits: 0,
                scale: 1.0,
                method: String::new(),
                budget_cpu_percent: None,
                lock_budget_cpu_percent: None,
                hit_cost_us: 20.0,
                trap_us: None,
                window_ms: 500,
                map_writes: None,
                lock_tiers: Vec::new(),
                cas: None,
                planting: Planting::default(),
                self_cpu: SelfCpu::default(),
            },
            probes: Vec::new(),
            drops: Drops::default(),
            end: "duration".into(),
            sites: Vec::new(),
            risks: Vec::new(),
            cas: Vec::new(),
            false_sharing: Vec::new(),
            cas_stacks: Vec::new(),
            stacks,
        }
    }
}
