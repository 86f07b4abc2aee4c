//! From the kernel's aggregates to the report's call sites: each stack
//! symbolized, its user frame found past the lock machinery, the lock kind
//! read from the frames in between, and stacks merged per site.

use std::collections::HashMap;

use map_probe_common::HIST_BUCKETS;

use crate::{
    aggregate::RawSite,
    catalog::{self, Kind, Point},
    false_sharing::{HotWord, WordKind},
    report::{Bucket, FrameOut, ProbeOut, ShardShare, Shards, Site, StackCount, SyncMapOut, Wait},
    symbolize::Symbolizer,
};

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
            start_line: 0,
        })
}

/// What the machinery frames between the probe and the user's frame say.
#[derive(Debug, PartialEq, Eq)]
struct Class {
    /// Index of the user's frame.
    at: usize,
    kind: Kind,
    /// The `sync.Map` method the user called, for kind `SyncMap`.
    method: Option<String>,
}

/// The site is the innermost frame outside the lock machinery (the user's
/// function that called Lock, inlined or not); the machinery frames in
/// between tell which kind of wait it was. None for a stack that never
/// leaves the machinery: the frame-pointer walk stopped early.
fn classify(frames: &[FrameOut], probe_kind: Kind) -> Option<Class> {
    let at = frames.iter().position(|f| !is_machinery(&f.function))?;
    let inner = &frames[..at];
    // The outermost sync.Map frame is the method the user called (Store
    // calls Swap; 1.24+ wraps the hash trie's methods).
    if let Some(m) = inner
        .iter()
        .rev()
        .find_map(|f| f.function.strip_prefix("sync.(*Map)."))
    {
        return Some(Class {
            at,
            kind: Kind::SyncMap,
            method: Some(m.to_string()),
        });
    }
    let mut kind = probe_kind;
    if kind == Kind::Mutex {
        for f in inner {
            match f.function.as_str() {
                "sync.(*RWMutex).RLock" => kind = Kind::RwmutexRead,
                "sync.(*RWMutex).Lock" => kind = Kind::RwmutexWrite,
                _ => continue,
            }
            break;
        }
    }
    Some(Class {
        at,
        kind,
        method: None,
    })
}

/// Promotions are the cost of a program's sync.Map use when rebuilding dirty
/// maps after them takes at least a tenth of the time spent waiting in and
/// rebuilding sync.Maps: each rebuild copies the whole map with its mutex
/// held, and every other call needing the mutex waits it out.
const PROMOTION_COST_SHARE: f64 = 0.1;

fn promotion_cost(sites: &mut [Site]) {
    let rebuild: u64 = sites
        .iter()
        .filter_map(|s| s.sync_map.as_ref())
        .map(|m| m.rebuild_ns)
        .sum();
    let waits: u64 = sites
        .iter()
        .filter(|s| s.kind == Kind::SyncMap)
        .map(|s| s.wait.delay_ns)
        .sum();
    if rebuild == 0 || (rebuild as f64) < PROMOTION_COST_SHARE * (rebuild + waits) as f64 {
        return;
    }
    for m in sites.iter_mut().filter_map(|s| s.sync_map.as_mut()) {
        m.promotions_are_the_cost = m.promotions + m.rebuilds > 0;
    }
}

/// A lock is named a hot shard when it takes at least `HOT_SHARD_SHARE` of
/// its site's waits, at least `HOT_SHARD_FACTOR` times the next lock's, and
/// at least `HOT_SHARD_MIN_WAITS` raw waits (fewer say little about skew).
/// Uniform load over the shards meets none of the first two.
pub const HOT_SHARD_SHARE: f64 = 0.5;
pub const HOT_SHARD_FACTOR: f64 = 4.0;
pub const HOT_SHARD_MIN_WAITS: u64 = 20;

/// How a site's waits spread over its locks; None for a single lock.
fn shards(locks: &HashMap<u64, u64>, sym: &Symbolizer) -> Option<Shards> {
    if locks.len() < 2 {
        return None;
    }
    let total: u64 = locks.values().sum();
    let mut by: Vec<(u64, u64)> = locks.iter().map(|(l, n)| (*l, *n)).collect();
    by.sort_unstable_by_key(|&(l, n)| (std::cmp::Reverse(n), l));
    let share = |&(lock, waits): &(u64, u64)| ShardShare {
        lock: format!("{lock:#x}"),
        symbol: sym.data(lock),
        waits,
        share: waits as f64 / total.max(1) as f64,
    };
    let (top, next) = (by[0].1, by[1].1);
    let hot = (top >= HOT_SHARD_MIN_WAITS
        && top as f64 >= HOT_SHARD_SHARE * total as f64
        && top as f64 >= HOT_SHARD_FACTOR * next as f64)
        .then(|| share(&by[0]));
    Some(Shards {
        locks: locks.len(),
        shares: by.iter().take(64).map(share).collect(),
        hot,
    })
}

/// Whether `function` is in the main module (`main`, or the module path
/// from the build info and the packages below it).
pub fn in_main_module(function: &str, main_module: Option<&str>) -> bool {
    let pkg = crate::cas::package_of(function);
    pkg == "main"
        || main_module.is_some_and(|m| {
            pkg == m
                || pkg
                    .strip_prefix(m)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
}

/// For a site in a dependency (a library's own `Lock`, a CAS inside a
/// lock-free map): the first frame of the main module above it, the
/// user's line that pays. None when the site is the user's own.
pub fn caller_of(
    site: &FrameOut,
    stack: &[FrameOut],
    main_module: Option<&str>,
) -> Option<FrameOut> {
    if in_main_module(&site.function, main_module) {
        return None;
    }
    stack
        .iter()
        .find(|f| in_main_module(&f.function, main_module))
        .cloned()
}

/// What a lock point's raw counts are multiplied by, and how much wider its
/// estimate's error is than a Poisson count of its raw hits (1 when every
/// slot was observed alike; more when a few slots seen briefly stand for
/// much of the run).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PointScale {
    pub scale: f64,
    pub error: f64,
}

impl Default for PointScale {
    fn default() -> PointScale {
        PointScale {
            scale: 1.0,
            error: 1.0,
        }
    }
}

/// The 95% relative error of `raw × scale` as an estimate of the whole run's
/// count: none when nothing was scaled, else that of a Poisson count.
pub fn count_error(raw: u64, scale: f64) -> f64 {
    if scale <= 1.0 + 1e-9 {
        0.0
    } else {
        1.96 / (raw.max(1) as f64).sqrt()
    }
}

/// Quantile `q` of a log2 histogram, interpolated geometrically inside its
/// bucket and kept at or under the largest wait seen.
fn quantile(hist: &[u64; HIST_BUCKETS], q: f64, max_ns: u64) -> u64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let want = q * total as f64;
    let last = hist.iter().rposition(|&n| n > 0).unwrap_or(0);
    let mut below = 0u64;
    for (i, &n) in hist.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (below + n) as f64 >= want {
            let f = ((want - below as f64) / n as f64).clamp(0.0, 1.0);
            let lo = if i == 0 { 1.0 } else { (1u64 << i) as f64 };
            // The largest wait bounds the last bucket.
            let hi = if i == last {
                (max_ns as f64).clamp(lo, 2.0 * lo)
            } else {
                2.0 * lo
            };
            return ((lo * (hi / lo).powf(f)).round() as u64).min(max_ns.max(1));
        }
        below += n;
    }
    max_ns
}

fn buckets(hist: &[u64; HIST_BUCKETS]) -> Vec<Bucket> {
    hist.iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, &count)| Bucket {
            ge_ns: if i == 0 { 0 } else { 1 << i },
            lt_ns: 1 << (i + 1),
            count,
        })
        .collect()
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

/// The waits of one aggregation key, timed or not, times their mean wait:
/// a wait whose end fell outside a window is as long as the ones timed.
fn delay(s: &map_probe_common::SiteStats) -> u64 {
    match s.timed {
        0 => 0,
        t => (s.wait_ns as f64 * s.count.max(t) as f64 / t as f64).round() as u64,
    }
}

/// What `build_sites` makes of the raw sites.
pub struct Built {
    pub sites: Vec<Site>,
    pub stacks: Vec<StackCount>,
    /// Waits whose stack never left the lock machinery.
    pub incomplete: u64,
    /// Every lock waited on, per site, for `false_sharing`.
    pub lock_words: Vec<HotWord>,
}

/// The ranked sites, every stack for the flamegraph, and how many raw waits
/// had a stack that never left the lock machinery (the frame-pointer walk
/// stopped early), counted as drops rather than shown as a site named after
/// `sync` internals; and the locks waited on, at rates over `elapsed_secs`.
pub fn build_sites(
    raw: &[RawSite],
    points: &[Point],
    sym: &mut Symbolizer,
    scales: &[PointScale],
    main_module: Option<&str>,
    elapsed_secs: f64,
) -> Built {
    struct Acc {
        site: FrameOut,
        kind: Kind,
        raw: u64,
        timed: u64,
        wait_ns: u64,
        max_ns: u64,
        /// Raw waits times their mean wait: the delay of every counted wait,
        /// timed or not.
        delay_ns: u64,
        hist: [u64; HIST_BUCKETS],
        /// Waits per lock address (or per semaphore, when the layout around
        /// it is not known).
        locks: HashMap<u64, u64>,
        /// Per lock: estimated waits and the CPUs they were seen on.
        lock_est: HashMap<u64, (f64, u64)>,
        method: Option<String>,
        /// sync.Map (Go 1.19-1.23): promoting misses, dirty-map rebuilds and
        /// the rebuilds' time, raw.
        promotions: u64,
        rebuilds: u64,
        rebuild_ns: u64,
        /// The estimates: each key's raw numbers times its point's scale.
        est: f64,
        /// The widest error factor of its points (`PointScale::error`).
        error: f64,
        est_delay: f64,
        est_promotions: f64,
        est_rebuilds: f64,
        est_rebuild_ns: f64,
        /// Whether any of its waits came through a per-call-site point, or a
        /// shared semaphore function's.
        at_call: bool,
        shared: bool,
        /// Whether any of its waits ended at a callee's RETs.
        ends_at_callee: bool,
        probes: Vec<&'static str>,
        /// Index into `uniq` -> waits through that stack.
        stacks: HashMap<usize, u64>,
    }
    let mut by_site: HashMap<(Kind, String, String, u32), Acc> = HashMap::new();
    // Every distinct stack once (a full table holds 16,384 of them, tens of
    // frames each), found again by its hash; sites refer to it by index.
    let mut uniq: Vec<StackCount> = Vec::new();
    // Per stack: estimated waits and delay.
    let mut uniq_est: Vec<(f64, f64)> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut incomplete = 0;
    for r in raw {
        let Some(point) = points.get(r.point) else {
            continue;
        };
        let ps = scales.get(r.point).copied().unwrap_or_default();
        let k = ps.scale;
        let mut frames: Vec<FrameOut> = sym
            .stack(&r.pcs, r.first_is_ip)
            .iter()
            .map(FrameOut::from)
            .collect();
        // A stack lost to the stack map (full, or its hash bucket taken:
        // 10,000 distinct stacks in its 16,384 buckets lose a quarter) still
        // names a per-site point's site: it is the CALL the probe sits on.
        // Only the callers above it are unknown.
        if frames.is_empty() {
            if let Some(call) = point.call {
                frames = sym
                    .frames_at_link(call)
                    .iter()
                    .map(FrameOut::from)
                    .collect();
            }
        }
        if frames.is_empty() {
            continue;
        }
        let Some(Class { at, kind, method }) = classify(&frames, point.kind) else {
            // A lost stack (only the caller is known) is in `stack_lost` already.
            if r.first_is_ip {
                incomplete += r.stats.count;
            }
            continue;
        };
        let site = frames[at].clone();
        let key = (kind, site.function.clone(), site.file.clone(), site.line);
        let acc = by_site.entry(key).or_insert_with(|| Acc {
            site,
            kind,
            raw: 0,
            timed: 0,
            wait_ns: 0,
            max_ns: 0,
            delay_ns: 0,
            hist: [0; HIST_BUCKETS],
            locks: HashMap::new(),
            lock_est: HashMap::new(),
            method,
            promotions: 0,
            rebuilds: 0,
            rebuild_ns: 0,
            est: 0.0,
            error: 1.0,
            est_delay: 0.0,
            est_promotions: 0.0,
            est_rebuilds: 0.0,
            est_rebuild_ns: 0.0,
            at_call: false,
            shared: false,
            ends_at_callee: false,
            probes: Vec::new(),
            stacks: HashMap::new(),
        });
        acc.error = acc.error.max(ps.error);
        match point.kind {
            Kind::SyncMapPromotion => {
                acc.promotions += r.stats.count;
                acc.est_promotions += r.stats.count as f64 * k;
                continue;
            }
            Kind::SyncMapRebuild => {
                acc.rebuilds += r.stats.count;
                acc.rebuild_ns += delay(&r.stats);
                acc.est_rebuilds += r.stats.count as f64 * k;
                acc.est_rebuild_ns += delay(&r.stats) as f64 * k;
                continue;
            }
            _ => {}
        }
        for (h, n) in acc.hist.iter_mut().zip(r.hist.iter()) {
            *h += n;
        }
        for &(sema, n) in &r.semas {
            let functions = frames.iter().map(|f| f.function.as_str());
            let lock = catalog::lock_of(functions, sema).unwrap_or(sema);
            *acc.locks.entry(lock).or_default() += n;
            let e = acc.lock_est.entry(lock).or_default();
            e.0 += n as f64 * k;
            e.1 |= r.sema_cpus.get(&sema).copied().unwrap_or(0);
        }
        acc.raw += r.stats.count;
        acc.timed += r.stats.timed;
        acc.wait_ns += r.stats.wait_ns;
        acc.max_ns = acc.max_ns.max(r.stats.max_wait_ns);
        acc.delay_ns += delay(&r.stats);
        acc.est += r.stats.count as f64 * k;
        acc.est_delay += delay(&r.stats) as f64 * k;
        if point.call.is_some() {
            acc.at_call = true;
        } else {
            acc.shared = true;
        }
        acc.ends_at_callee |= point.ends_at.is_some();
        if !acc.probes.contains(&point.symbol) {
            acc.probes.push(point.symbol);
        }
        let h = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (kind, &frames).hash(&mut h);
            h.finish()
        };
        let i = *index.entry(h).or_insert_with(|| {
            uniq.push(StackCount {
                kind,
                frames,
                count: 0,
                delay_ns: 0,
            });
            uniq_est.push((0.0, 0.0));
            uniq.len() - 1
        });
        uniq_est[i].0 += r.stats.count as f64 * k;
        uniq_est[i].1 += delay(&r.stats) as f64 * k;
        *acc.stacks.entry(i).or_default() += r.stats.count;
    }
    drop(index);
    let round = |x: f64| x.round() as u64;
    let mut lock_words = Vec::new();
    let mut sites: Vec<Site> = by_site
        .into_values()
        .map(|a| {
            for (&lock, &(est, cpus)) in &a.lock_est {
                lock_words.push(HotWord {
                    addr: lock,
                    kind: WordKind::Lock,
                    raw: a.locks.get(&lock).copied().unwrap_or(0),
                    per_sec: est / elapsed_secs.max(1e-9),
                    goroutines: Default::default(),
                    cpus,
                    at: Some(a.site.clone()),
                });
            }
            let stacks = a.stacks.len();
            let stack = a
                .stacks
                .into_iter()
                .max_by(|x, y| {
                    x.1.cmp(&y.1)
                        .then_with(|| uniq[y.0].frames.len().cmp(&uniq[x.0].frames.len()))
                })
                .map(|(i, _)| uniq[i].frames.clone())
                .unwrap_or_default();
            let site_scale = if a.raw == 0 {
                1.0
            } else {
                (a.est / a.raw as f64).max(1.0)
            };
            let lock = a
                .locks
                .iter()
                .max_by_key(|(addr, n)| (**n, std::cmp::Reverse(**addr)))
                .map(|(addr, _)| *addr);
            let caller = caller_of(&a.site, &stack, main_module);
            let shards = shards(&a.locks, sym);
            Site {
                caller,
                shards,
                lock: lock.map(|l| format!("{l:#x}")),
                lock_symbol: lock.and_then(|l| sym.data(l)),
                locks: a.locks.len(),
                sync_map: a.method.map(|method| SyncMapOut {
                    method,
                    promotions: round(a.est_promotions),
                    rebuilds: round(a.est_rebuilds),
                    rebuild_ns: round(a.est_rebuild_ns),
                    raw_promotions: a.promotions,
                    raw_rebuilds: a.rebuilds,
                    promotions_are_the_cost: false,
                }),
                function: a.site.function,
                file: a.site.file,
                line: a.site.line,
                kind: a.kind,
                count: round(a.est),
                raw_count: a.raw,
                scale: site_scale,
                observed_share: 1.0 / site_scale,
                count_error: count_error(a.raw, site_scale) * a.error,
                measured: match (a.at_call, a.shared) {
                    (true, false) => "call-site",
                    (false, true) => "shared",
                    _ => "both",
                }
                .into(),
                timed_at: if !a.at_call {
                    "return"
                } else if a.ends_at_callee {
                    "callee-return"
                } else {
                    "after-call"
                }
                .into(),
                wait: Wait {
                    timed: a.timed,
                    total_ns: a.wait_ns,
                    mean_ns: a.wait_ns.checked_div(a.timed).unwrap_or(0),
                    max_ns: a.max_ns,
                    delay_ns: round(a.est_delay),
                    p50_ns: quantile(&a.hist, 0.5, a.max_ns),
                    p90_ns: quantile(&a.hist, 0.9, a.max_ns),
                    p99_ns: quantile(&a.hist, 0.99, a.max_ns),
                    hist: buckets(&a.hist),
                },
                probe: a.probes.join(","),
                stacks,
                stack,
            }
        })
        .collect();
    sites.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.raw_count.cmp(&a.raw_count))
            .then(b.wait.total_ns.cmp(&a.wait.total_ns))
            .then_with(|| a.function.cmp(&b.function))
    });
    promotion_cost(&mut sites);
    let mut stacks = uniq;
    for (s, (n, d)) in stacks.iter_mut().zip(uniq_est) {
        s.count = round(n);
        s.delay_ns = round(d);
    }
    stacks.sort_by_key(|s| std::cmp::Reverse(s.count));
    Built {
        sites,
        stacks,
        incomplete,
        lock_words,
    }
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
            start_line: 0,
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
        assert_eq!(at(&frames, Kind::Mutex), Some((4, Kind::RwmutexWrite)));
        let frames = vec![
            f("sync.runtime_SemacquireMutex"),
            f("sync.(*RWMutex).RLock"),
            f("main.read"),
        ];
        assert_eq!(at(&frames, Kind::Mutex), Some((2, Kind::RwmutexRead)));
        let frames = vec![f("internal/sync.runtime_SemacquireMutex"), f("main.hot")];
        assert_eq!(at(&frames, Kind::Mutex), Some((1, Kind::Mutex)));
        // A dedicated RWMutex probe keeps its kind.
        let frames = vec![f("sync.runtime_SemacquireRWMutexR"), f("main.read")];
        assert_eq!(at(&frames, Kind::RwmutexRead), Some((1, Kind::RwmutexRead)));
        // A lost stack is no site, not one named after sync's internals.
        let frames = vec![f("sync.(*Mutex).lockSlow")];
        assert_eq!(classify(&frames, Kind::Mutex), None);
        let frames = vec![f("sync.runtime_SemacquireMutex"), f("runtime.goexit")];
        assert_eq!(classify(&frames, Kind::Mutex), None);
    }

    fn at(frames: &[FrameOut], kind: Kind) -> Option<(usize, Kind)> {
        classify(frames, kind).map(|c| (c.at, c.kind))
    }

    #[test]
    fn sync_map_waits_are_charged_to_the_users_call() {
        // Go 1.20-1.23: Store calls Swap, which takes the map's mutex.
        let frames = vec![
            f("sync.runtime_SemacquireMutex"),
            f("sync.(*Mutex).lockSlow"),
            f("sync.(*Mutex).Lock"),
            f("sync.(*Map).Swap"),
            f("sync.(*Map).Store"),
            f("main.put"),
        ];
        let c = classify(&frames, Kind::Mutex).unwrap();
        assert_eq!((c.at, c.kind), (5, Kind::SyncMap));
        assert_eq!(c.method.as_deref(), Some("Store"));
        // Go 1.24+: the hash trie's node lock.
        let frames = vec![
            f("internal/sync.runtime_SemacquireMutex"),
            f("internal/sync.(*Mutex).lockSlow"),
            f("internal/sync.(*HashTrieMap[go.shape.interface {},go.shape.interface {}]).LoadOrStore"),
            f("sync.(*Map).LoadOrStore"),
            f("main.get"),
        ];
        let c = classify(&frames, Kind::Mutex).unwrap();
        assert_eq!(
            (c.at, c.kind, c.method.as_deref()),
            (4, Kind::SyncMap, Some("LoadOrStore"))
        );
    }

    #[test]
    fn quantiles_stay_inside_their_bucket() {
        let mut h = [0u64; HIST_BUCKETS];
        h[10] = 90; // [1024, 2048) ns
        h[20] = 10; // [~1 ms, ~2 ms)
        let p50 = quantile(&h, 0.5, 2_000_000);
        assert!((1024..2048).contains(&p50), "{p50}");
        let p99 = quantile(&h, 0.99, 2_000_000);
        assert!((1 << 20..1 << 21).contains(&p99), "{p99}");
        assert_eq!(
            quantile(&h, 0.99, 1_100_000).min(1_100_000),
            quantile(&h, 0.99, 1_100_000)
        );
        assert_eq!(quantile(&[0; HIST_BUCKETS], 0.5, 0), 0);
    }

    #[test]
    fn the_lock_is_found_from_its_semaphore() {
        let mutex = [
            "sync.runtime_SemacquireMutex",
            "sync.(*Mutex).lockSlow",
            "main.f",
        ];
        assert_eq!(catalog::lock_of(mutex, 0x1004), Some(0x1000));
        let rlock = [
            "sync.runtime_SemacquireRWMutexR",
            "sync.(*RWMutex).RLock",
            "main.f",
        ];
        assert_eq!(catalog::lock_of(rlock, 0x100c), Some(0x1000));
        let wlock = [
            "sync.runtime_SemacquireRWMutex",
            "sync.(*RWMutex).Lock",
            "main.f",
        ];
        assert_eq!(catalog::lock_of(wlock, 0x1008), Some(0x1000));
        assert_eq!(
            catalog::lock_of(["sync.runtime_SemacquireMutex", "main.f"], 8),
            None
        );
    }
}
