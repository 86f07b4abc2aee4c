//! Types shared by the eBPF programs and the agent. Everything here is
//! `#[repr(C)]` plain data: the kernel side writes it into maps, the user side
//! reads the same bytes back.
#![no_std]

/// A uprobe's attach cookie carries the catalog index of the probe point in
/// its low 32 bits and these flags above, so one program serves every Go
/// version's symbols without a lookup table in the kernel.
pub const COOKIE_RET: u64 = 1 << 32;
/// `sync.(*Map).missLocked` (Go 1.19-1.23): counted only when this miss
/// promotes the dirty map to read-only.
pub const COOKIE_SYNCMAP_MISS: u64 = 1 << 33;
/// `sync.(*Map).dirtyLocked` (Go 1.19-1.23): counted and timed only when it
/// rebuilds the dirty map, an O(n) copy under the map's mutex.
pub const COOKIE_SYNCMAP_REBUILD: u64 = 1 << 34;
pub const COOKIE_SYNCMAP: u64 = COOKIE_SYNCMAP_MISS | COOKIE_SYNCMAP_REBUILD;
/// A per-site point on a CALL inside a function, where `*(rsp)` is not a
/// return address.
pub const COOKIE_AT_CALL: u64 = 1 << 35;
/// Bits 36-38: the lock tier the point is in (0 steady, 1.. windowed, each
/// with its own duty), so that each tier's governor sees its own hits.
pub const COOKIE_TIER_SHIFT: u32 = 36;
pub const LOCK_TIERS: usize = 8;
/// On a per-site entry: the instruction after its CALL is where the inlined
/// fast path continues too, so the wait ends at the callee's RETs instead.
pub const COOKIE_ENDS_AT_CALLEE: u64 = 1 << 39;
/// On an end: a callee's RET, shared by every site that calls it; it ends
/// only the waits whose entry had `COOKIE_ENDS_AT_CALLEE`, and other sites'
/// waits are left to their own end probes.
pub const COOKIE_CALLEE_RET: u64 = 1 << 40;
/// With `COOKIE_ENDS_AT_CALLEE`, bits 41-63 of the entry's cookie: the
/// catalog index of the point whose RETs end its wait.
pub const COOKIE_END_POINT_SHIFT: u32 = 41;
/// In `Inflight::tier`, above the tier: the wait ends at a callee's RET,
/// the one whose point index is in bits 32-63.
pub const INFLIGHT_ENDS_AT_CALLEE: u64 = 1 << 8;

/// The counter of a lock tier's entry (or end) hits.
pub const fn tier_stat(tier: usize, end: bool) -> u32 {
    match (tier, end) {
        (0, false) => stat::HITS,
        (0, true) => stat::RET_HITS,
        (t, e) => stat::TIER_HITS + 2 * (t as u32 - 1) + e as u32,
    }
}

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
    /// Entry and return hits of map-write probes.
    pub const MAP_HITS: u32 = 6;
    pub const MAP_RET_HITS: u32 = 7;
    /// An overlap seen but not recorded: the overlap map was full.
    pub const OVERLAP_FULL: u32 = 8;
    /// A map write not tracked: no room in the writers map.
    pub const WRITERS_FULL: u32 = 9;
    /// Hits of the fatal-error probes, and thread stacks caught during a crash.
    pub const FATAL_HITS: u32 = 10;
    pub const CRASH_STACKS: u32 = 11;
    /// A crash-time record (fatal or thread stack) lost: its map was full.
    pub const CRASH_FULL: u32 = 12;
    /// A map write's RET with no recorded entry (its entry fell outside a window).
    pub const MAP_RET_UNMATCHED: u32 = 13;
    /// A second goroutine entered a write to a map another one was inside.
    /// It becomes an overlap only when the first write's RET is seen; a
    /// first write whose end was never seen (a panic, a missed RET) is not one.
    pub const OVERLAP_CANDIDATES: u32 = 14;
    /// A timed wait left out of its site's histogram: the histogram map was full.
    pub const HIST_FULL: u32 = 15;
    /// Entry and end hits of lock-wait points in tiers 1-7, two each
    /// (`tier_stat`); tier 0's are `HITS` and `RET_HITS`.
    pub const TIER_HITS: u32 = 16;
    /// A hit of an `_ip` program at an address with no cookie recorded.
    pub const NO_POINT: u32 = 30;
    /// Hits of the CAS probes (one per compare-and-swap executed while a
    /// window is open), and those whose CAS failed (ZF clear).
    pub const CAS_HITS: u32 = 31;
    pub const CAS_FAILS: u32 = 32;
    /// A CAS hit counted only in the totals: its site or address table was full.
    pub const CAS_FULL: u32 = 33;
    /// Hits of the failure-block probes: CASes that failed, seen where only
    /// a failure leads (`CasFail`).
    pub const CAS_FAIL_HITS: u32 = 34;
    /// Hits of the probes after atomic writes that cannot fail (XADD, XCHG,
    /// LOCK ADD...): seen only for the words they write.
    pub const ATOMIC_HITS: u32 = 35;
    pub const COUNT: u32 = 36;
}

/// The per-CPU counters, in one map entry so the agent reads them all in one
/// system call, which it does every few milliseconds while a window is open.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Counters {
    pub n: [u64; stat::COUNT as usize],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            n: [0; stat::COUNT as usize],
        }
    }
}

/// Written by the agent before each map-write window: writes remembered
/// from an earlier window (whose return the probes never saw) are ignored.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Control {
    pub generation: u64,
    /// CLOCK_MONOTONIC when each lock tier's current window began to open: a
    /// wait remembered from before it ended unseen (its RET fell in a gap),
    /// so a later RET of the same goroutine is not its end.
    pub lock_since_ns: [u64; LOCK_TIERS],
}

/// One call of a map write: the goroutine (`g`, R14) and how deep in its
/// stack the call's frame sits (`g.stack.hi - rsp`). The depth is the same at
/// the entry probe and at the RET of the same call, even when Go moved the
/// stack in between, so a RET is matched to its own entry, not to a nested
/// or an earlier, unfinished write of the same goroutine.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WriteKey {
    pub g: u64,
    pub depth: u64,
}

/// A map write in progress, from its entry until its RET.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Writer {
    pub map: u64,
    pub goid: u64,
    /// `*(rsp)` at entry: the return address, checked again at the RET.
    pub caller: u64,
    pub start_ns: u64,
    pub generation: u64,
    pub stack_id: i32,
    pub probe: u32,
    /// Entries of other goroutines into the same map while this write was
    /// in progress, and the first of them; committed as an overlap at this
    /// write's RET.
    pub overlaps: u64,
    pub second_ns: u64,
    pub second_goid: u64,
    pub second_caller: u64,
    pub second_stack: i32,
    pub second_probe: u32,
}

/// Per map header: the write in progress that entered it first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapOwner {
    pub key: WriteKey,
    pub generation: u64,
}

/// Two goroutines inside writes to the same map at once: the one already
/// inside (`first`) and the one entering (`second`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OverlapKey {
    pub map: u64,
    pub first_caller: u64,
    pub second_caller: u64,
    pub first_stack: i32,
    pub second_stack: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OverlapVal {
    pub count: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub first_goid: u64,
    pub second_goid: u64,
    pub first_probe: u32,
    pub second_probe: u32,
}

pub const FATAL_MSG: usize = 128;

/// The throwing thread of a fatal error, one per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Fatal {
    pub ts_ns: u64,
    pub g: u64,
    pub goid: u64,
    pub caller: u64,
    /// The map this goroutine was writing, when a map-write window was open.
    pub map: u64,
    pub stack_id: i32,
    pub probe: u32,
    pub msg_len: u32,
    pub _pad: u32,
    pub msg: [u8; FATAL_MSG],
}

/// Another thread's user stack, caught as Go freezes the world for a fatal
/// error (it signals every running thread with SIGURG).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CrashStack {
    pub ts_ns: u64,
    pub g: u64,
    pub goid: u64,
    pub ip: u64,
    pub map: u64,
    pub stack_id: i32,
    pub _pad: u32,
}

/// SIGURG: Go's preemption signal, also what freezes the world on a fatal error.
pub const SIGURG: i32 = 23;
pub const MAX_WRITERS: u32 = 65536;
pub const MAX_OVERLAPS: u32 = 4096;
pub const MAX_CRASH: u32 = 1024;

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

/// Log2 buckets of wait time: bucket `i` holds waits of `[2^i, 2^(i+1))` ns
/// (bucket 0 also holds 0 and 1 ns; the last one everything from ~9 min up).
pub const HIST_BUCKETS: usize = 40;

/// One site's wait-time distribution, kept beside `SITES` (not per CPU: 160
/// bytes times every CPU times every site would be hundreds of MB on a big
/// host) and bumped with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WaitHist {
    pub b: [u32; HIST_BUCKETS],
}

impl Default for WaitHist {
    fn default() -> Self {
        WaitHist {
            b: [0; HIST_BUCKETS],
        }
    }
}

/// A lock a site waited on: the semaphore's address (the acquire's first
/// argument), which the agent turns into the lock's own address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LockKey {
    pub site: SiteKey,
    pub sema: u64,
}

/// Per lock a site waited on: the waits, and the CPUs they were seen on
/// (bit `cpu % 64`), for false sharing between contended locks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LockSeen {
    pub waits: u64,
    pub cpus: u64,
}

pub const MAX_LOCKS: u32 = 65536;

/// A wait in progress, keyed by the goroutine (`g`, R14), since a goroutine
/// may wake on another thread than the one it parked on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Inflight {
    pub start_ns: u64,
    pub key: SiteKey,
    /// The tier of the point the wait began at, and
    /// `INFLIGHT_ENDS_AT_CALLEE`.
    pub tier: u64,
}

pub const MAX_SITES: u32 = 16384;
/// Lock-wait probe points with their own hit counter; a binary with more
/// call sites than this is probed through the shared semaphore functions.
pub const MAX_POINTS: u32 = 16384;
/// Probed addresses the `_ip` programs can look up (entries and RETs).
pub const MAX_ADDRS: u32 = 65536;
pub const MAX_STACKS: u32 = 16384;
pub const MAX_INFLIGHT: u32 = 65536;

/// A compare-and-swap site as the kernel aggregates it: the probe point
/// (the instruction after one `LOCK CMPXCHG`) and the user stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CasKey {
    pub point: u32,
    pub stack_id: i32,
    /// `*(rsp)` when the CAS is in a function without a frame of its own:
    /// the frame-pointer walk skips its caller, this is its return address.
    pub caller: u64,
}

/// Per CPU: attempts and failed attempts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CasStats {
    pub attempts: u64,
    pub failures: u64,
}

/// A word a CAS site wrote (its memory operand, computed from the saved
/// registers), for false-sharing and hot-word analysis.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CasAddrKey {
    pub point: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// Per CPU, per written word: attempts, failures, the goroutine that wrote
/// it last on this CPU and whether another goroutine did too (so the agent
/// can tell one writer from many without a set in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CasAddrStats {
    pub attempts: u64,
    pub failures: u64,
    pub last_g: u64,
    pub other_g: u64,
}

/// How to compute a CAS point's memory operand from the saved registers:
/// `base + index * scale + disp`. Registers are numbered `CAS_REG_*`; 0 is
/// none. A RIP-relative operand is resolved by the agent (`base` 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CasOperand {
    pub base: u8,
    pub index: u8,
    pub scale: u8,
    /// `CAS_FRAMELESS`.
    pub flags: u8,
    pub disp: i32,
}

/// In `CasOperand::flags`: the function keeps no frame pointer, so its
/// return address is at `*(rsp)`.
pub const CAS_FRAMELESS: u8 = 1;
/// In `CasOperand::flags`: an atomic write that cannot fail (XADD, XCHG,
/// LOCK ADD...), probed only for the word it writes.
pub const CAS_WRITE_ONLY: u8 = 2;
/// In `CasKey::point`: the key counts a failure-block probe's hits (every
/// one a failed CAS of that point), not attempts after the CAS.
pub const CAS_FAIL_KEY: u32 = 1 << 31;

/// Register numbers for `CasOperand`: 1 RAX, 2 RBX, 3 RCX, 4 RDX, 5 RSI,
/// 6 RDI, 7 RBP, 8 RSP, 9-16 R8-R15.
pub const CAS_REG_RAX: u8 = 1;
pub const CAS_REG_R15: u8 = 16;
pub const MAX_CAS_POINTS: u32 = 4096;
pub const MAX_CAS_SITES: u32 = 8192;
pub const MAX_CAS_ADDRS: u32 = 16384;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain `#[repr(C)]` data with no padding holes that matter to the kernel.
    unsafe impl aya::Pod for SiteKey {}
    unsafe impl aya::Pod for SiteStats {}
    unsafe impl aya::Pod for WaitHist {}
    unsafe impl aya::Pod for LockKey {}
    unsafe impl aya::Pod for Inflight {}
    unsafe impl aya::Pod for Control {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Writer {}
    unsafe impl aya::Pod for WriteKey {}
    unsafe impl aya::Pod for MapOwner {}
    unsafe impl aya::Pod for OverlapKey {}
    unsafe impl aya::Pod for OverlapVal {}
    unsafe impl aya::Pod for Fatal {}
    unsafe impl aya::Pod for CrashStack {}
    unsafe impl aya::Pod for CasKey {}
    unsafe impl aya::Pod for CasStats {}
    unsafe impl aya::Pod for CasAddrKey {}
    unsafe impl aya::Pod for CasAddrStats {}
    unsafe impl aya::Pod for LockSeen {}
    unsafe impl aya::Pod for CasOperand {}
}
