//! Every Go-version-dependent fact about where to probe lives in this one
//! file: rows naming a runtime symbol, the Go releases that have it and what
//! a hit there means, and the few struct offsets the probes read. `plan`
//! keeps the rows whose symbol the binary really has, since version ranges
//! alone are a guess about a build.

use crate::gobin::{GoBinary, GoVersion};

/// What the kernel program does with a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A goroutine parks on a lock's semaphore: count it and time it.
    LockWait,
    /// A goroutine writes a plain map (header in RBX): watch for a second writer.
    MapWrite,
    /// The runtime gives up with a user-caused fatal error (message in RAX/RBX).
    Fatal,
    /// A compare-and-swap just ran (the probe sits on the next instruction):
    /// count it, and count it failed when ZF is clear. Found by disassembly
    /// (`cas`), not by symbol: no row of this table.
    Cas,
    /// A CAS failed: the probe sits on a block only a failure reaches, so
    /// it costs nothing when the CAS swaps (`cas`, by disassembly too).
    CasFail,
}

impl Purpose {
    /// The eBPF program that serves this purpose.
    pub fn program(self) -> &'static str {
        match self {
            Purpose::LockWait => "lock_wait",
            Purpose::MapWrite => "map_write",
            Purpose::Fatal => "go_fatal",
            Purpose::Cas => "cas_retry",
            Purpose::CasFail => "cas_fail",
        }
    }

    /// Whether the RET instructions are probed too (to see the call end).
    pub fn probes_returns(self) -> bool {
        !matches!(self, Purpose::Fatal | Purpose::Cas | Purpose::CasFail)
    }
}

/// The contention kind a probe point implies before the stack refines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Mutex,
    RwmutexWrite,
    RwmutexRead,
    /// A wait inside a `sync.Map` method (its mutex up to 1.23, the hash
    /// trie's node locks from 1.24), charged to the user's call.
    #[serde(rename = "sync.Map")]
    SyncMap,
    /// Probe points inside sync.Map (Go 1.19-1.23), not waits: a miss that
    /// promotes the dirty map, and the O(n) rebuild of a dirty map after one.
    SyncMapPromotion,
    SyncMapRebuild,
    MapWrite,
    Fatal,
    Cas,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Mutex => "mutex",
            Kind::RwmutexWrite => "rwmutex-write",
            Kind::RwmutexRead => "rwmutex-read",
            Kind::SyncMap => "sync.Map",
            Kind::SyncMapPromotion => "sync.Map-promotion",
            Kind::SyncMapRebuild => "sync.Map-rebuild",
            Kind::MapWrite => "map-write",
            Kind::Fatal => "fatal",
            Kind::Cas => "cas",
        }
    }
}

pub struct Row {
    pub purpose: Purpose,
    pub symbol: &'static str,
    /// First and last Go minor release (1.x) that has the symbol; None = still current.
    pub since: u32,
    pub until: Option<u32>,
    pub kind: Kind,
    pub why: &'static str,
}

/// Oldest Go release map-probe supports: 1.19 is the first with `runtime.fatal`
/// for user-caused throws and the oldest Debian still ships.
pub const MIN_GO_MINOR: u32 = 19;

pub const LOCK_WAITS: &[Row] = &[
    Row {
        purpose: Purpose::LockWait,
        symbol: "sync.runtime_SemacquireMutex",
        since: 19,
        until: Some(23),
        kind: Kind::Mutex,
        why: "Mutex.lockSlow parks here; before 1.20 RWMutex readers and writers do too",
    },
    Row {
        purpose: Purpose::LockWait,
        symbol: "internal/sync.runtime_SemacquireMutex",
        since: 24,
        until: None,
        kind: Kind::Mutex,
        why: "1.24 moved Mutex into internal/sync; sync.Mutex and RWMutex.w park here",
    },
    Row {
        purpose: Purpose::LockWait,
        symbol: "sync.runtime_SemacquireRWMutexR",
        since: 20,
        until: None,
        kind: Kind::RwmutexRead,
        why: "RWMutex.RLock waiting for a writer",
    },
    Row {
        purpose: Purpose::LockWait,
        symbol: "sync.runtime_SemacquireRWMutex",
        since: 20,
        until: None,
        kind: Kind::RwmutexWrite,
        why: "RWMutex.Lock waiting for readers to leave",
    },
    Row {
        purpose: Purpose::LockWait,
        symbol: "sync.(*Map).missLocked",
        since: 19,
        until: Some(23),
        kind: Kind::SyncMapPromotion,
        why: "a miss under the map's mutex; enough of them promote the dirty map",
    },
    Row {
        purpose: Purpose::LockWait,
        symbol: "sync.(*Map).dirtyLocked",
        since: 19,
        until: Some(23),
        kind: Kind::SyncMapRebuild,
        why: "the first new key after a promotion copies the read-only map, under the mutex",
    },
];

/// Cookie flags that tell the kernel program what a lock-wait point is.
pub fn cookie_flags(kind: Kind) -> u64 {
    match kind {
        Kind::SyncMapPromotion => map_probe_common::COOKIE_SYNCMAP_MISS,
        Kind::SyncMapRebuild => map_probe_common::COOKIE_SYNCMAP_REBUILD,
        _ => 0,
    }
}

/// Offsets of `dirty` and `misses` in `sync.Map` before the hash trie:
/// 1.19 keeps `read` in an atomic.Value (16 bytes), 1.20-1.23 in an
/// atomic.Pointer (8), after the 8-byte Mutex.
pub const SYNC_MAP_FIELDS: &[(u32, u32, u64, u64)] = &[(19, 19, 24, 32), (20, 23, 16, 24)];

pub fn sync_map_fields(v: &GoVersion) -> (u64, u64) {
    SYNC_MAP_FIELDS
        .iter()
        .find(|(a, b, _, _)| (*a..=*b).contains(&v.minor))
        .map_or((16, 24), |r| (r.2, r.3))
}

/// Plain-map writes. Since 1.24 the bodies live in internal/runtime/maps
/// (swiss tables) but are push-linknamed to these same runtime names, and
/// every one of them, hmap or swiss, takes the map header second (RBX).
const fn map_write(symbol: &'static str) -> Row {
    Row {
        purpose: Purpose::MapWrite,
        symbol,
        since: 19,
        until: None,
        kind: Kind::MapWrite,
        why: "a write to a plain map; the header is in RBX",
    }
}

pub const MAP_WRITES: &[Row] = &[
    map_write("runtime.mapassign"),
    map_write("runtime.mapassign_fast32"),
    map_write("runtime.mapassign_fast32ptr"),
    map_write("runtime.mapassign_fast64"),
    map_write("runtime.mapassign_fast64ptr"),
    map_write("runtime.mapassign_faststr"),
    map_write("runtime.mapdelete"),
    map_write("runtime.mapdelete_fast32"),
    map_write("runtime.mapdelete_fast64"),
    map_write("runtime.mapdelete_faststr"),
    map_write("runtime.mapclear"),
];

pub const FATALS: &[Row] = &[
    Row {
        purpose: Purpose::Fatal,
        symbol: "runtime.fatal",
        since: 19,
        until: None,
        kind: Kind::Fatal,
        why: "1.19 split user-caused throws (racing map writes) from runtime.throw",
    },
    Row {
        purpose: Purpose::Fatal,
        symbol: "internal/runtime/maps.fatal",
        since: 24,
        until: None,
        kind: Kind::Fatal,
        why: "swiss maps report their races here, then call runtime.fatal",
    },
];

/// Where a lock's semaphore sits inside the lock, by the function that parks
/// on it (the first frame above the semaphore acquire). The layouts are the
/// same in every release from 1.19 to 1.27; `internal/sync.Mutex` (1.24+)
/// is laid out as `sync.Mutex` was.
pub const SEMA_FIELDS: &[(&str, u64, &str)] = &[
    ("(*Mutex).lockSlow", 4, "Mutex{state int32; sema uint32}"),
    // At a per-site point, the CALL of lockSlow: its argument is the Mutex.
    (
        "(*Mutex).Lock",
        0,
        "lockSlow's receiver, at its CALL from the inlined Lock",
    ),
    (
        "(*RWMutex).RLock",
        12,
        "RWMutex{w Mutex; writerSem, readerSem uint32; ...}: readers park on readerSem",
    ),
    (
        "(*RWMutex).Lock",
        8,
        "a writer waiting for the readers to leave parks on writerSem",
    ),
];

/// The lock's own address from its semaphore's, given the stack's function
/// names innermost first (the semaphore acquire itself first). None when the
/// parking function is not one whose layout is known.
pub fn lock_of<'a>(functions: impl IntoIterator<Item = &'a str>, sema: u64) -> Option<u64> {
    let parker = functions
        .into_iter()
        .find(|f| !f.contains("runtime_Semacquire"))?;
    SEMA_FIELDS
        .iter()
        .find(|(suffix, _, _)| parker.ends_with(suffix))
        .map(|(_, off, _)| sema.wrapping_sub(*off))
}

/// Offset of `goid` in `runtime.g`: 152, except 160 in 1.23 and 1.24
/// (checked against DWARF for 1.19 and 1.26; the offset databases of the
/// OpenTelemetry Go instrumentation give the rest).
pub const GOID_OFFSETS: &[(u32, u32, u64)] = &[(19, 22, 152), (23, 24, 160), (25, u32::MAX, 152)];

pub fn goid_offset(v: &GoVersion) -> u64 {
    GOID_OFFSETS
        .iter()
        .find(|(a, b, _)| (*a..=*b).contains(&v.minor))
        .map_or(152, |r| r.2)
}

/// Functions whose frame at the top of a stack means "inside a map write".
pub fn is_map_write_frame(function: &str) -> bool {
    MAP_WRITES.iter().any(|r| r.symbol == function)
        || function.starts_with("internal/runtime/maps.")
}

fn rows(purpose: Purpose) -> impl Iterator<Item = &'static Row> {
    LOCK_WAITS
        .iter()
        .chain(MAP_WRITES)
        .chain(FATALS)
        .filter(move |r| r.purpose == purpose)
}

/// What a lock wait's slow path calls, wherever the fast path failed. Each
/// CALL to one of these is a per-site probe point: the CALL instruction
/// (reached only once the inlined fast path failed) starts the wait, the
/// instruction after it ends it. A cold call site then costs only its own
/// hits, and a hot one can be windowed without starving the rest.
pub struct SiteTarget {
    pub symbol: &'static str,
    pub since: u32,
    pub until: Option<u32>,
    pub kind: Kind,
}

pub const SITE_TARGETS: &[SiteTarget] = &[
    // Mutex.Lock is inlined and calls lockSlow once its CAS failed; the
    // slow path spins, then parks on the semaphore, maybe more than once.
    SiteTarget {
        symbol: "sync.(*Mutex).lockSlow",
        since: 19,
        until: Some(23),
        kind: Kind::Mutex,
    },
    SiteTarget {
        symbol: "internal/sync.(*Mutex).lockSlow",
        since: 24,
        until: None,
        kind: Kind::Mutex,
    },
    // An inlined RLock parks on the reader semaphore itself; RWMutex.Lock
    // (not inlined) on the writer semaphore, while readers remain.
    SiteTarget {
        symbol: "sync.runtime_SemacquireRWMutexR",
        since: 20,
        until: None,
        kind: Kind::RwmutexRead,
    },
    SiteTarget {
        symbol: "sync.runtime_SemacquireRWMutex",
        since: 20,
        until: None,
        kind: Kind::RwmutexWrite,
    },
    // Before 1.20 both RWMutex waits park on this one, as lockSlow does
    // (its own call is left out: lockSlow's callers are the points).
    // Later only lockSlow calls it, unless PGO inlined lockSlow into its
    // caller: then that caller's CALL of the semaphore is the site's point.
    SiteTarget {
        symbol: "sync.runtime_SemacquireMutex",
        since: 19,
        until: Some(23),
        kind: Kind::Mutex,
    },
    SiteTarget {
        symbol: "internal/sync.runtime_SemacquireMutex",
        since: 24,
        until: None,
        kind: Kind::Mutex,
    },
];

/// A catalog row resolved against one binary: where the uprobes go.
#[derive(Clone, Debug)]
pub struct Point {
    pub symbol: &'static str,
    pub kind: Kind,
    /// File offsets for attaching: the entry (after the stack check) and every RET.
    /// A callee's RETs that end other points' waits have no entry.
    pub entry_offset: Option<u64>,
    pub ret_offsets: Vec<u64>,
    /// For a per-site point, the CALL's address (link-time): the probe sits
    /// mid-function, where `*(rsp)` is no return address.
    pub call: Option<u64>,
    /// For a per-site point whose CALL returns where the fast path
    /// continues too: the index of the point whose RETs end its waits.
    pub ends_at: Option<usize>,
}

/// Per-site points for every CALL to a `SITE_TARGETS` function in the
/// binary (none when it has none, or more than `MAX_POINTS`: then the
/// semaphore functions themselves are probed, shared by every site).
pub fn site_points(bin: &GoBinary) -> Vec<Point> {
    let v = bin.go_version();
    let targets: Vec<(u64, &SiteTarget)> = SITE_TARGETS
        .iter()
        .filter(|t| v.minor >= t.since && t.until.is_none_or(|u| v.minor <= u))
        .filter_map(|t| Some((bin.func_by_name(t.symbol)?.entry, t)))
        .collect();
    // Calls from inside lockSlow are its callers' waits, already counted.
    let skip: Vec<u64> = ["sync.(*Mutex).lockSlow", "internal/sync.(*Mutex).lockSlow"]
        .iter()
        .filter_map(|n| Some(bin.func_by_name(n)?.entry))
        .collect();
    let addrs: Vec<u64> = targets.iter().map(|t| t.0).collect();
    let mut points = Vec::new();
    let mut joined: Vec<(u64, usize)> = Vec::new();
    for (_, c) in bin.calls_to(&addrs, &skip) {
        let Some(t) = targets.iter().find(|t| t.0 == c.target).map(|t| t.1) else {
            continue;
        };
        let (Some(entry), Some(next)) = (bin.file_offset(c.call), bin.file_offset(c.next)) else {
            continue;
        };
        if points.len() >= map_probe_common::MAX_POINTS as usize - 16 {
            return Vec::new();
        }
        // Where the fast path continues at the instruction after the CALL
        // (an inlined RLock always, an inlined Lock often), a probe there
        // would trap on every Lock, inside the critical section of the
        // lock just taken: such a site's waits end at its callee's RETs.
        if c.joined {
            joined.push((c.target, points.len()));
        }
        points.push(Point {
            symbol: t.symbol,
            kind: t.kind,
            entry_offset: Some(entry),
            ret_offsets: if c.joined { Vec::new() } else { vec![next] },
            call: Some(c.call),
            ends_at: None,
        });
    }
    let mut callees: Vec<u64> = joined.iter().map(|j| j.0).collect();
    callees.sort_unstable();
    callees.dedup();
    for callee in callees {
        let Some((t, func)) = targets
            .iter()
            .find(|t| t.0 == callee)
            .and_then(|t| Some((t.1, bin.func_by_name(t.1.symbol)?)))
        else {
            continue;
        };
        // Without its RETs the joined sites are counted, only not timed.
        let Ok(pp) = bin.probe_points(&func) else {
            continue;
        };
        let Some(rets) = pp
            .rets
            .iter()
            .map(|&r| bin.file_offset(r))
            .collect::<Option<Vec<u64>>>()
        else {
            continue;
        };
        let at = points.len();
        for &(_, i) in joined.iter().filter(|j| j.0 == callee) {
            points[i].ends_at = Some(at);
        }
        points.push(Point {
            symbol: t.symbol,
            kind: t.kind,
            entry_offset: None,
            ret_offsets: rets,
            call: None,
            ends_at: None,
        });
    }
    points
}

pub struct Plan {
    pub purpose: Purpose,
    pub points: Vec<Point>,
    /// Rows expected for this Go version whose symbol the binary lacks
    /// (the linker drops functions nothing calls).
    pub missing: Vec<&'static str>,
}

pub fn applies(row: &Row, v: &GoVersion) -> bool {
    v.minor >= row.since && row.until.is_none_or(|u| v.minor <= u)
}

pub fn plan(bin: &GoBinary, purpose: Purpose) -> anyhow::Result<Plan> {
    let v = bin.go_version();
    let mut points = Vec::new();
    let mut missing = Vec::new();
    // Lock waits are probed per call site where the binary allows it.
    let per_site = match purpose {
        Purpose::LockWait if std::env::var_os("MAP_PROBE_SHARED_LOCK_PROBES").is_none() => {
            site_points(bin)
        }
        _ => Vec::new(),
    };
    let shared = per_site.is_empty();
    points.extend(per_site);
    for row in rows(purpose).filter(|r| applies(r, v)) {
        if !shared && cookie_flags(row.kind) == 0 {
            // A semaphore function every per-site point already covers.
            continue;
        }
        let Some(func) = bin.func_by_name(row.symbol) else {
            missing.push(row.symbol);
            continue;
        };
        let pp = bin
            .probe_points(&func)
            .map_err(|e| anyhow::anyhow!("cannot place probes in {}: {e}", row.symbol))?;
        let off = |va: u64| {
            bin.file_offset(va)
                .ok_or_else(|| anyhow::anyhow!("{} at {va:#x} is outside the file", row.symbol))
        };
        let rets: &[u64] = if purpose.probes_returns() {
            &pp.rets
        } else {
            &[]
        };
        points.push(Point {
            symbol: row.symbol,
            kind: row.kind,
            entry_offset: Some(off(pp.after_check)?),
            ret_offsets: rets.iter().map(|&r| off(r)).collect::<Result<_, _>>()?,
            call: None,
            ends_at: None,
        });
    }
    Ok(Plan {
        purpose,
        points,
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_minor_has_its_probes() {
        for minor in MIN_GO_MINOR..=30 {
            let v = GoVersion {
                major: 1,
                minor,
                patch: 0,
                raw: format!("go1.{minor}"),
            };
            let locks: Vec<_> = LOCK_WAITS.iter().filter(|r| applies(r, &v)).collect();
            assert!(
                locks.iter().any(|r| r.kind == Kind::Mutex),
                "1.{minor} has no mutex probe"
            );
            let waits = locks.iter().filter(|r| cookie_flags(r.kind) == 0).count();
            if minor >= 20 {
                assert_eq!(waits, 3, "1.{minor}: mutex, rlock and lock waits");
            }
            assert!(
                rows(Purpose::Fatal).any(|r| applies(r, &v)),
                "1.{minor}: no fatal probe"
            );
            assert!(rows(Purpose::MapWrite).filter(|r| applies(r, &v)).count() >= 10);
        }
        assert_eq!(
            goid_offset(&GoVersion {
                major: 1,
                minor: 23,
                patch: 0,
                raw: String::new()
            }),
            160
        );
        assert_eq!(
            goid_offset(&GoVersion {
                major: 1,
                minor: 26,
                patch: 0,
                raw: String::new()
            }),
            152
        );
    }
}
