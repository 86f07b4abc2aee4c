//! Every Go-version-dependent fact about where to probe lives in this one
//! table. Each row names a runtime symbol, the Go releases that have it and
//! what a hit there means; `plan` keeps the rows whose symbol the binary
//! really has, since version ranges alone are a guess about a build.

use crate::gobin::{GoBinary, GoVersion};

/// What the kernel program does with a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A goroutine parks on a lock's semaphore: count it and time it.
    LockWait,
}

/// The contention kind a probe point implies before the stack refines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Mutex,
    RwmutexWrite,
    RwmutexRead,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Mutex => "mutex",
            Kind::RwmutexWrite => "rwmutex-write",
            Kind::RwmutexRead => "rwmutex-read",
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

pub const TABLE: &[Row] = &[
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
];

/// A catalog row resolved against one binary: where the uprobes go.
#[derive(Clone, Debug)]
pub struct Point {
    pub row: usize,
    pub symbol: &'static str,
    pub kind: Kind,
    /// File offsets for attaching: the entry (after the stack check) and every RET.
    pub entry_offset: u64,
    pub ret_offsets: Vec<u64>,
}

pub struct Plan {
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
    for (i, row) in TABLE.iter().enumerate() {
        if row.purpose != purpose || !applies(row, v) {
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
        points.push(Point {
            row: i,
            symbol: row.symbol,
            kind: row.kind,
            entry_offset: off(pp.after_check)?,
            ret_offsets: pp.rets.iter().map(|&r| off(r)).collect::<Result<_, _>>()?,
        });
    }
    Ok(Plan { points, missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_minor_has_a_mutex_and_rwmutex_story() {
        for minor in MIN_GO_MINOR..=30 {
            let v = GoVersion {
                major: 1,
                minor,
                patch: 0,
                raw: format!("go1.{minor}"),
            };
            let rows: Vec<_> = TABLE.iter().filter(|r| applies(r, &v)).collect();
            assert!(
                rows.iter().any(|r| r.kind == Kind::Mutex),
                "1.{minor} has no mutex probe"
            );
            if minor >= 20 {
                assert_eq!(rows.len(), 3, "1.{minor}: mutex, rlock and lock waits");
            }
        }
    }
}
