//! Types shared by the eBPF programs and the agent. Everything here is
//! `#[repr(C)]` plain data: the kernel side writes it into maps, the user side
//! reads the same bytes back.
#![no_std]

/// A uprobe's attach cookie carries the catalog index of the probe point in
/// its low 32 bits and these flags above, so one program serves every Go
/// version's symbols without a lookup table in the kernel.
pub const COOKIE_RET: u64 = 1 << 32;

/// Indexes into the per-CPU `STATS` array. Every event the kernel side cannot
/// record is counted here, so the report can say what it lost.
pub mod stat {
    /// Entry hits of lock-wait probes.
    pub const HITS: u32 = 0;
    /// `bpf_get_stackid` failed (hash collision or a full stack map).
    pub const STACK_LOST: u32 = 1;
    /// The aggregation map was full: the event was counted nowhere else.
    pub const AGG_FULL: u32 = 2;
    /// No room to remember an in-flight wait: its duration is lost.
    pub const INFLIGHT_FULL: u32 = 3;
    /// A RET fired with no matching entry (window opened mid-wait).
    pub const RET_UNMATCHED: u32 = 4;
    /// Return hits of lock-wait probes.
    pub const RET_HITS: u32 = 5;
    pub const COUNT: u32 = 8;
}

/// One contention site as the kernel aggregates it: which probe point, which
/// user stack, and the return address the frame-pointer walk misses at a
/// function's first instructions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SiteKey {
    pub probe: u32,
    /// Id in the `STACKS` map, or negative when the stack was lost.
    pub stack_id: i32,
    /// `*(u64 *)rsp` at the probe: the return address into the direct caller.
    pub caller: u64,
}

/// Per-CPU counters for one `SiteKey`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SiteStats {
    /// Waits that started (entry hits).
    pub count: u64,
    /// Waits whose end was also seen, and their summed and largest duration.
    pub timed: u64,
    pub wait_ns: u64,
    pub max_wait_ns: u64,
}

/// A wait in progress, keyed by the goroutine (`g`, R14), since a goroutine
/// may wake on another thread than the one it parked on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Inflight {
    pub start_ns: u64,
    pub key: SiteKey,
}

pub const MAX_SITES: u32 = 16384;
pub const MAX_STACKS: u32 = 16384;
pub const MAX_INFLIGHT: u32 = 65536;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain `#[repr(C)]` data with no padding holes that matter to the kernel.
    unsafe impl aya::Pod for SiteKey {}
    unsafe impl aya::Pod for SiteStats {}
    unsafe impl aya::Pod for Inflight {}
}
