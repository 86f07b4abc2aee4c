//! Kernel side of map-probe. Programs stay small: they count, remember the
//! start of a wait and hand everything else to the agent.
#![no_std]
#![no_main]
// Atomic adds on shared maps: core's atomic types leave out read-modify-write
// on a target without compare-and-swap, but the intrinsic lowers to BPF's own
// atomic add. (The build already runs with RUSTC_BOOTSTRAP for build-std.)
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_current_task_btf,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
        generated::{bpf_get_smp_processor_id, bpf_probe_read_user as probe_read_user_raw},
    },
    macros::{map, raw_tracepoint, uprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{ProbeContext, RawTracePointContext, tracing::StackIdContext},
};
use aya_log_ebpf::{info, warn};
use map_probe_common::{
    COOKIE_AT_CALL, COOKIE_CALLEE_RET, COOKIE_ENDS_AT_CALLEE, COOKIE_END_POINT_SHIFT, COOKIE_RET, INFLIGHT_ENDS_AT_CALLEE, COOKIE_SYNCMAP, COOKIE_TIER_SHIFT, LOCK_TIERS, tier_stat, COOKIE_SYNCMAP_MISS, COOKIE_SYNCMAP_REBUILD, Control, Counters, CrashStack, FATAL_MSG, Fatal, HIST_BUCKETS, Inflight, LockKey, LockSeen,
    MAX_ADDRS, MAX_CRASH, MAX_INFLIGHT, MAX_LOCKS, MAX_POINTS, MAX_OVERLAPS, MAX_SITES, MAX_STACKS, MAX_WRITERS, MapOwner,
    OverlapKey, OverlapVal, SIGURG, SiteKey, SiteStats, WaitHist, WriteKey, Writer, stat,
    CasAddrKey, CasAddrStats, CasKey, CasOperand, CasStats, CAS_FAIL_KEY, CAS_FRAMELESS, CAS_WRITE_ONLY, MAX_CAS_ADDRS, MAX_CAS_POINTS, MAX_CAS_SITES,
};

/// Host tgid of the target. uprobe_multi links are already PID-scoped; this
/// guards against a probe that outlives a PID reuse.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// Offset of `goid` in the runtime's `g` for the target's Go version.
#[unsafe(no_mangle)]
static GOID_OFFSET: u64 = 152;

/// Offsets of `dirty` and `misses` in `sync.Map` (Go 1.19-1.23).
#[unsafe(no_mangle)]
static SYNCMAP_DIRTY_OFFSET: u64 = 16;
#[unsafe(no_mangle)]
static SYNCMAP_MISSES_OFFSET: u64 = 24;

#[map]
static SITES: PerCpuHashMap<SiteKey, SiteStats> = PerCpuHashMap::with_max_entries(MAX_SITES, 0);

#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(MAX_STACKS, 0);

/// Per site: log2 histogram of its timed waits.
#[map]
static HISTS: HashMap<SiteKey, WaitHist> = HashMap::with_max_entries(MAX_SITES, 0);

/// Per (site, semaphore): waits, so the agent can name the lock and count a
/// site's distinct locks (a sharded map shows as many). LRU: a service with
/// per-object locks forgets the coldest first instead of losing new ones.
#[map]
static SITE_LOCKS: LruHashMap<LockKey, LockSeen> = LruHashMap::with_max_entries(MAX_LOCKS, 0);

/// Hits per lock-wait point, entries and ends alike (an end probe after a
/// CALL may also be where the fast path continues): what sorting the points
/// into tiers by cost needs.
#[map]
static POINT_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * MAX_POINTS, 0);

#[map]
static INFLIGHT: LruHashMap<u64, Inflight> = LruHashMap::with_max_entries(MAX_INFLIGHT, 0);

/// Per probed address in the target: the cookie of its point, for the `_ip`
/// programs. Kernels before 5.15 take no BPF cookie on a perf-event uprobe,
/// so those look theirs up by the trapping address, as libbpf's USDT support
/// does there: the kernel rewinds the saved IP to the breakpoint before any
/// handler runs. Sized to one entry unless that mode is in use.
#[map]
static ADDR_COOKIES: HashMap<u64, u64> = HashMap::with_max_entries(MAX_ADDRS, 0);

#[map]
static STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

#[map]
static CONTROL: Array<Control> = Array::with_max_entries(1, 0);

/// Per map header: the write in progress that entered it first.
#[map]
static WRITERS: LruHashMap<u64, MapOwner> = LruHashMap::with_max_entries(MAX_WRITERS, 0);

/// Every map write in progress, by call (goroutine and stack depth).
#[map]
static ACTIVE: LruHashMap<WriteKey, Writer> = LruHashMap::with_max_entries(MAX_WRITERS, 0);

/// Per goroutine: the map it is writing, for the crash probes, which fire
/// deeper in the stack than the write's own frame.
#[map]
static WRITING: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_WRITERS, 0);

#[map]
static OVERLAPS: PerCpuHashMap<OverlapKey, OverlapVal> =
    PerCpuHashMap::with_max_entries(MAX_OVERLAPS, 0);

/// Set (to the time) by the first fatal error: from then on SIGURG
/// deliveries are Go freezing the world, and worth a stack each.
#[map]
static FATAL_AT: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static FATALS: HashMap<u32, Fatal> = HashMap::with_max_entries(MAX_CRASH, 0);

#[map]
static CRASH_STACKS: HashMap<u32, CrashStack> = HashMap::with_max_entries(MAX_CRASH, 0);

/// Per (CAS point, user stack): attempts and failures.
#[map]
static CAS_SITES: PerCpuHashMap<CasKey, CasStats> = PerCpuHashMap::with_max_entries(MAX_CAS_SITES, 0);

/// Per (CAS point, word written): attempts, failures and who wrote it, per
/// CPU (which CPUs wrote a word is what false sharing needs).
#[map]
static CAS_ADDRS: PerCpuHashMap<CasAddrKey, CasAddrStats> =
    PerCpuHashMap::with_max_entries(MAX_CAS_ADDRS, 0);

/// Per CAS point: its memory operand, filled by the agent at load.
#[map]
static CAS_OPERANDS: Array<CasOperand> = Array::with_max_entries(MAX_CAS_POINTS, 0);

/// Per failure-block point: the CAS point whose failures lead there, filled
/// by the agent at load.
#[map]
static CAS_FAIL_OF: Array<u32> = Array::with_max_entries(MAX_CAS_POINTS, 0);

/// Scratch space for a `Fatal`, too big for the BPF stack with the rest.
#[map]
static FATAL_SCRATCH: PerCpuArray<Fatal> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn bump(idx: u32) {
    bump_was(idx);
}

/// Bumps a counter and says what it held before (per CPU).
#[inline(always)]
fn bump_was(idx: u32) -> u64 {
    if let Some(p) = STATS.get_ptr_mut(0) {
        if let Some(n) = unsafe { (*p).n.get_mut(idx as usize) } {
            let was = *n;
            *n += 1;
            return was;
        }
    }
    0
}

/// The point's cookie, from the link (uprobe_multi, or a perf-event uprobe
/// on Linux 5.15+).
#[inline(always)]
fn link_cookie(ctx: &ProbeContext) -> Option<u64> {
    Some(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) })
}

/// The point's cookie, by the address that trapped (`ADDR_COOKIES`).
#[inline(always)]
fn addr_cookie(ctx: &ProbeContext) -> Option<u64> {
    let ip = unsafe { (*ctx.regs).rip };
    match unsafe { ADDR_COOKIES.get(&ip) } {
        Some(c) => Some(*c),
        None => {
            bump(stat::NO_POINT);
            None
        }
    }
}

#[inline(always)]
fn is_target() -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    tgid == unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

/// Runs at the first instruction after the stack-bound check of a runtime
/// semaphore acquire (so a morestack restart cannot count one wait twice) and
/// at each of its RET instructions (never a kernel return probe: it rewrites
/// the return address on a stack Go may move).
#[uprobe(multi)]
pub fn lock_wait(ctx: ProbeContext) -> u32 {
    lock_wait_hit(ctx, link_cookie)
}

/// `lock_wait` on kernels without uprobe_multi: one perf-event uprobe per point.
#[uprobe]
pub fn lock_wait_pe(ctx: ProbeContext) -> u32 {
    lock_wait_hit(ctx, link_cookie)
}

/// `lock_wait` on kernels without BPF cookies (before 5.15).
#[uprobe]
pub fn lock_wait_ip(ctx: ProbeContext) -> u32 {
    lock_wait_hit(ctx, addr_cookie)
}

#[inline(always)]
fn lock_wait_hit(ctx: ProbeContext, cookie_of: impl Fn(&ProbeContext) -> Option<u64>) -> u32 {
    if !is_target() {
        return 0;
    }
    let Some(cookie) = cookie_of(&ctx) else {
        return 0;
    };
    let regs = unsafe { &*ctx.regs };
    let g = regs.r14;
    let now = unsafe { bpf_ktime_get_ns() };
    let tier = ((cookie >> COOKIE_TIER_SHIFT) as usize) & (LOCK_TIERS - 1);
    // Entries at the point's index, ends MAX_POINTS above: a windowed
    // tier plants its ends in fewer windows than its entries.
    let end_slot = if cookie & COOKIE_RET != 0 { MAX_POINTS } else { 0 };
    if let Some(n) = POINT_HITS.get_ptr_mut((cookie as u32).wrapping_add(end_slot)) {
        unsafe { *n += 1 };
    }
    if cookie & COOKIE_RET != 0 {
        bump(tier_stat(tier, true));
        // Most sync.Map calls end without the event their entry looked for,
        // and a callee's RET also returns from waits other sites time.
        wait_ended(
            g,
            now,
            tier,
            (cookie & COOKIE_CALLEE_RET != 0).then_some(cookie as u32),
            cookie & (COOKIE_SYNCMAP | COOKIE_AT_CALL | COOKIE_CALLEE_RET) == 0,
        );
        return 0;
    }
    bump(tier_stat(tier, false));
    // At a CALL mid-function, *(rsp) is a spill slot, not a return address.
    let sp = if cookie & COOKIE_AT_CALL != 0 { 0 } else { regs.rsp };
    if cookie & COOKIE_SYNCMAP != 0 {
        // The receiver, a *sync.Map, is in RAX.
        let wanted = if cookie & COOKIE_SYNCMAP_MISS != 0 {
            syncmap_promotes(regs.rax)
        } else {
            cookie & COOKIE_SYNCMAP_REBUILD != 0 && syncmap_rebuilds(regs.rax)
        };
        if wanted {
            wait_started(&ctx, cookie, sp, g, 0, now);
        }
        return 0;
    }
    // Every semaphore acquire takes the semaphore's address first (RAX),
    // and lockSlow its Mutex.
    wait_started(&ctx, cookie, sp, g, regs.rax, now);
    0
}

#[inline(always)]
fn read_u64(addr: u64) -> u64 {
    unsafe { bpf_probe_read_user(addr as *const u64) }.unwrap_or(0)
}

/// missLocked counts this miss and promotes once misses reach len(dirty).
#[inline(always)]
fn syncmap_promotes(m: u64) -> bool {
    let dirty_off = unsafe { core::ptr::read_volatile(&SYNCMAP_DIRTY_OFFSET) };
    let misses_off = unsafe { core::ptr::read_volatile(&SYNCMAP_MISSES_OFFSET) };
    let misses = read_u64(m + misses_off);
    let dirty = read_u64(m + dirty_off);
    // A classic hmap starts with its count.
    let len = if dirty == 0 { 0 } else { read_u64(dirty) };
    misses + 1 >= len
}

/// dirtyLocked copies the read-only map only when there is no dirty map.
#[inline(always)]
fn syncmap_rebuilds(m: u64) -> bool {
    let dirty_off = unsafe { core::ptr::read_volatile(&SYNCMAP_DIRTY_OFFSET) };
    read_u64(m + dirty_off) == 0
}

#[inline(always)]
fn wait_started(ctx: &ProbeContext, cookie: u64, sp: u64, g: u64, sema: u64, now: u64) {
    let probe = cookie as u32;
    let caller = if sp == 0 {
        0
    } else {
        unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0)
    };
    let stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id as i32,
        Err(_) => {
            bump(stat::STACK_LOST);
            -1
        }
    };
    let key = SiteKey { probe, stack_id, caller };
    match SITES.get_ptr_mut(&key) {
        Some(s) => unsafe { (*s).count += 1 },
        None => {
            let s = SiteStats { count: 1, ..SiteStats::default() };
            if SITES.insert(&key, &s, 0).is_err() {
                // Once per CPU: every further loss is in the counter, and a
                // log line per lost wait would flood whoever reads the log.
                if bump_was(stat::AGG_FULL) == 0 {
                    warn!(ctx, "site map full: lock waits are not being recorded");
                }
                return;
            }
        }
    }
    if sema != 0 {
        lock_seen(LockKey { site: key, sema });
    }
    let inf = Inflight {
        start_ns: now,
        key,
        tier: (cookie >> COOKIE_TIER_SHIFT) & (LOCK_TIERS as u64 - 1)
            | if cookie & COOKIE_ENDS_AT_CALLEE != 0 {
                INFLIGHT_ENDS_AT_CALLEE | (cookie >> COOKIE_END_POINT_SHIFT) << 32
            } else {
                0
            },
    };
    if INFLIGHT.insert(&g, &inf, 0).is_err() {
        bump(stat::INFLIGHT_FULL);
    }
}

#[inline(always)]
fn lock_seen(k: LockKey) {
    let cpu = 1u64 << (unsafe { bpf_get_smp_processor_id() } & 63);
    match SITE_LOCKS.get_ptr_mut(&k) {
        Some(v) => unsafe {
            atomic_add64(&raw mut (*v).waits, 1);
            // Racy, but a lost bit is set again by the CPU's next wait.
            if (*v).cpus & cpu == 0 {
                (*v).cpus |= cpu;
            }
        },
        None => {
            // Two CPUs may both insert 1 for a new key: one wait is lost, once.
            let _ = SITE_LOCKS.insert(&k, &LockSeen { waits: 1, cpus: cpu }, 0);
        }
    }
}

#[inline(always)]
unsafe fn atomic_add64(p: *mut u64, n: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
}

#[inline(always)]
unsafe fn atomic_add32(p: *mut u32, n: u32) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(p, n) };
}

/// floor(log2(v)), 0 for 0: the histogram bucket of a wait of `v` ns.
#[inline(always)]
fn log2(mut v: u64) -> usize {
    let mut r = 0;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    r
}

#[inline(always)]
fn hist_add(key: &SiteKey, dt: u64) {
    let b = log2(dt).min(HIST_BUCKETS - 1);
    if let Some(h) = HISTS.get_ptr_mut(key) {
        if let Some(n) = unsafe { (*h).b.get_mut(b) } {
            unsafe { atomic_add32(n, 1) };
        }
        return;
    }
    let mut h = WaitHist::default();
    if let Some(n) = h.b.get_mut(b) {
        *n = 1;
    }
    if HISTS.insert(key, &h, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU created it meanwhile, or the map is full.
    match HISTS.get_ptr_mut(key) {
        Some(h) => {
            if let Some(n) = unsafe { (*h).b.get_mut(b) } {
                unsafe { atomic_add32(n, 1) };
            }
        }
        None => bump(stat::HIST_FULL),
    }
}

#[inline(always)]
/// `end_tier` is the tier of the end probe that fired: the wait is timed
/// only if that probe was in since the wait began (for a site's own end,
/// the entry's tier; for a callee's RET, its own). `callee_ret` is the
/// point index of a callee's RET: it ends only the waits that named it.
fn wait_ended(g: u64, now: u64, end_tier: usize, callee_ret: Option<u32>, count_unmatched: bool) {
    let Some(inf) = (unsafe { INFLIGHT.get(&g) }).copied() else {
        if count_unmatched {
            bump(stat::RET_UNMATCHED);
        }
        return;
    };
    let named = (inf.tier & INFLIGHT_ENDS_AT_CALLEE != 0).then_some((inf.tier >> 32) as u32);
    if named != callee_ret {
        return;
    }
    let _ = INFLIGHT.remove(&g);
    let since = CONTROL.get(0).map_or(0, |c| {
        c.lock_since_ns
            .get(end_tier & (LOCK_TIERS - 1))
            .copied()
            .unwrap_or(0)
    });
    if inf.start_ns < since {
        bump(stat::RET_UNMATCHED);
        return;
    }
    let dt = now.saturating_sub(inf.start_ns);
    hist_add(&inf.key, dt);
    match SITES.get_ptr_mut(&inf.key) {
        Some(s) => unsafe {
            (*s).timed += 1;
            (*s).wait_ns += dt;
            if dt > (*s).max_wait_ns {
                (*s).max_wait_ns = dt;
            }
        },
        None => {
            let s = SiteStats { count: 0, timed: 1, wait_ns: dt, max_wait_ns: dt };
            if SITES.insert(&inf.key, &s, 0).is_err() {
                bump(stat::AGG_FULL);
            }
        }
    }
}

#[inline(always)]
fn goid_of(g: u64) -> u64 {
    let off = unsafe { core::ptr::read_volatile(&GOID_OFFSET) };
    unsafe { bpf_probe_read_user((g + off) as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn user_stack<C: StackIdContext>(ctx: &C) -> i32 {
    match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id as i32,
        Err(_) => {
            bump(stat::STACK_LOST);
            -1
        }
    }
}

/// Runs after the stack check of `runtime.mapassign*`, `mapdelete*` and
/// `mapclear` (map header in RBX in every Go version we support) and at
/// their RETs. Two goroutines inside writes to one map at once is the race
/// Go's own check catches only sometimes, and only by crashing.
///
/// An overlap is recorded only once the first write's own RET is seen after
/// the second write entered: a write whose end the probes missed (its RET
/// not yet live as a window opened, a panic out of the hash function) would
/// otherwise stay "inside" the map, and every later, properly locked write
/// would seem to overlap it.
#[uprobe(multi)]
pub fn map_write(ctx: ProbeContext) -> u32 {
    map_write_hit(ctx, link_cookie)
}

/// `map_write` on kernels without uprobe_multi.
#[uprobe]
pub fn map_write_pe(ctx: ProbeContext) -> u32 {
    map_write_hit(ctx, link_cookie)
}

/// `map_write` on kernels without BPF cookies (before 5.15).
#[uprobe]
pub fn map_write_ip(ctx: ProbeContext) -> u32 {
    map_write_hit(ctx, addr_cookie)
}

#[inline(always)]
fn map_write_hit(ctx: ProbeContext, cookie_of: impl Fn(&ProbeContext) -> Option<u64>) -> u32 {
    if !is_target() {
        return 0;
    }
    let Some(cookie) = cookie_of(&ctx) else {
        return 0;
    };
    let regs = unsafe { &*ctx.regs };
    let g = regs.r14;
    if cookie & COOKIE_RET != 0 {
        bump(stat::MAP_RET_HITS);
        map_write_ended(g, regs.rsp);
    } else {
        bump(stat::MAP_HITS);
        map_write_started(&ctx, cookie as u32, regs.rbx, regs.rsp, g);
    }
    0
}

/// `g.stack.hi` (the second word of `g`) minus the stack pointer: where a
/// frame sits, unchanged when Go copies the stack to grow it.
#[inline(always)]
fn depth(g: u64, sp: u64) -> u64 {
    match unsafe { bpf_probe_read_user((g + 8) as *const u64) } {
        Ok(hi) if hi > sp => hi - sp,
        _ => sp,
    }
}

#[inline(always)]
fn generation() -> u64 {
    CONTROL.get(0).map_or(0, |c| c.generation)
}

#[inline(always)]
fn map_write_started(ctx: &ProbeContext, probe: u32, map: u64, sp: u64, g: u64) {
    let generation = generation();
    let now = unsafe { bpf_ktime_get_ns() };
    let key = WriteKey { g, depth: depth(g, sp) };
    let caller = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
    let stack_id = user_stack(ctx);
    let goid = goid_of(g);
    // Another goroutine's write to this map still in progress?
    let mut taken = false;
    if let Some(owner) = unsafe { WRITERS.get(&map) }.copied() {
        if owner.generation == generation && owner.key.g != g {
            if let Some(first) = ACTIVE.get_ptr_mut(&owner.key) {
                let first = unsafe { &mut *first };
                if first.map == map && first.generation == generation {
                    taken = true;
                    bump(stat::OVERLAP_CANDIDATES);
                    if first.overlaps == 0 {
                        first.second_ns = now;
                        first.second_goid = goid;
                        first.second_caller = caller;
                        first.second_stack = stack_id;
                        first.second_probe = probe;
                    }
                    first.overlaps += 1;
                }
            }
        }
    }
    let me = Writer {
        map,
        goid,
        caller,
        start_ns: now,
        generation,
        stack_id,
        probe,
        ..Writer::default()
    };
    let owner = MapOwner { key, generation };
    let owned = taken || WRITERS.insert(&map, &owner, 0).is_ok();
    if !owned || ACTIVE.insert(&key, &me, 0).is_err() || WRITING.insert(&g, &map, 0).is_err() {
        bump(stat::WRITERS_FULL);
    }
}

#[inline(always)]
fn map_write_ended(g: u64, sp: u64) {
    let key = WriteKey { g, depth: depth(g, sp) };
    let Some(w) = (unsafe { ACTIVE.get(&key) }).copied() else {
        bump(stat::MAP_RET_UNMATCHED);
        return;
    };
    let _ = ACTIVE.remove(&key);
    if unsafe { WRITING.get(&g) }.is_some_and(|m| *m == w.map) {
        let _ = WRITING.remove(&g);
    }
    if unsafe { WRITERS.get(&w.map) }.is_some_and(|o| o.key == key) {
        let _ = WRITERS.remove(&w.map);
    }
    // The same call returning: same return address, same window.
    let ret = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
    if w.overlaps > 0 && ret == w.caller && w.generation == generation() {
        overlap(&w, unsafe { bpf_ktime_get_ns() });
    }
}

#[inline(always)]
fn overlap(first: &Writer, now: u64) {
    let key = OverlapKey {
        map: first.map,
        first_caller: first.caller,
        second_caller: first.second_caller,
        first_stack: first.stack_id,
        second_stack: first.second_stack,
    };
    if let Some(v) = OVERLAPS.get_ptr_mut(&key) {
        unsafe {
            (*v).count += first.overlaps;
            (*v).last_ns = now;
        }
        return;
    }
    let v = OverlapVal {
        count: first.overlaps,
        first_ns: first.second_ns,
        last_ns: now,
        first_goid: first.goid,
        second_goid: first.second_goid,
        first_probe: first.probe,
        second_probe: first.second_probe,
    };
    if OVERLAPS.insert(&key, &v, 0).is_err() {
        bump(stat::OVERLAP_FULL);
    }
}

/// Runs on the instruction right after a `LOCK CMPXCHG` (or `CMPXCHG16B`)
/// in the code in scope: the trap saves the flags the CAS left, so ZF says
/// whether it swapped, and the registers still hold its memory operand.
#[uprobe(multi)]
pub fn cas_retry(ctx: ProbeContext) -> u32 {
    cas_hit(ctx, link_cookie)
}

/// `cas_retry` on kernels without uprobe_multi.
#[uprobe]
pub fn cas_retry_pe(ctx: ProbeContext) -> u32 {
    cas_hit(ctx, link_cookie)
}

/// `cas_retry` on kernels without BPF cookies (before 5.15).
#[uprobe]
pub fn cas_retry_ip(ctx: ProbeContext) -> u32 {
    cas_hit(ctx, addr_cookie)
}

/// Runs on the first instruction of a block only a failed CAS reaches:
/// counts the failure, and costs nothing when the CAS swaps.
#[uprobe(multi)]
pub fn cas_fail(ctx: ProbeContext) -> u32 {
    cas_fail_hit(ctx, link_cookie)
}

/// `cas_fail` on kernels without uprobe_multi.
#[uprobe]
pub fn cas_fail_pe(ctx: ProbeContext) -> u32 {
    cas_fail_hit(ctx, link_cookie)
}

/// `cas_fail` on kernels without BPF cookies (before 5.15).
#[uprobe]
pub fn cas_fail_ip(ctx: ProbeContext) -> u32 {
    cas_fail_hit(ctx, addr_cookie)
}

#[inline(always)]
fn cas_fail_hit(ctx: ProbeContext, cookie_of: impl Fn(&ProbeContext) -> Option<u64>) -> u32 {
    if !is_target() {
        return 0;
    }
    let Some(cookie) = cookie_of(&ctx) else {
        return 0;
    };
    let Some(&point) = CAS_FAIL_OF.get(cookie as u32) else {
        return 0;
    };
    bump(stat::CAS_FAIL_HITS);
    let op = CAS_OPERANDS.get(point).copied().unwrap_or_default();
    if !cas_site_add(&ctx, point | CAS_FAIL_KEY, &op, true) {
        bump(stat::CAS_FULL);
    }
    0
}

/// Counts one CAS (failed or not) under `point` and the caller's stack in
/// `CAS_SITES`; false when the table is full.
#[inline(always)]
fn cas_site_add(ctx: &ProbeContext, point: u32, op: &CasOperand, failed: bool) -> bool {
    let regs = unsafe { &*ctx.regs };
    let caller = if op.flags & CAS_FRAMELESS != 0 {
        unsafe { bpf_probe_read_user(regs.rsp as *const u64) }.unwrap_or(0)
    } else {
        0
    };
    let key = CasKey { point, stack_id: user_stack(ctx), caller };
    match CAS_SITES.get_ptr_mut(&key) {
        Some(v) => unsafe {
            (*v).attempts += 1;
            (*v).failures += failed as u64;
            true
        },
        None => {
            let v = CasStats { attempts: 1, failures: failed as u64 };
            CAS_SITES.insert(&key, &v, 0).is_ok()
        }
    }
}

const EFLAGS_ZF: u64 = 1 << 6;

#[inline(always)]
fn reg(regs: &pt_regs, n: u8) -> u64 {
    match n {
        1 => regs.rax,
        2 => regs.rbx,
        3 => regs.rcx,
        4 => regs.rdx,
        5 => regs.rsi,
        6 => regs.rdi,
        7 => regs.rbp,
        8 => regs.rsp,
        9 => regs.r8,
        10 => regs.r9,
        11 => regs.r10,
        12 => regs.r11,
        13 => regs.r12,
        14 => regs.r13,
        15 => regs.r14,
        16 => regs.r15,
        _ => 0,
    }
}

#[inline(always)]
fn cas_hit(ctx: ProbeContext, cookie_of: impl Fn(&ProbeContext) -> Option<u64>) -> u32 {
    if !is_target() {
        return 0;
    }
    let Some(cookie) = cookie_of(&ctx) else {
        return 0;
    };
    let point = cookie as u32;
    let regs = unsafe { &*ctx.regs };
    let op = CAS_OPERANDS.get(point).copied().unwrap_or_default();
    let write_only = op.flags & CAS_WRITE_ONLY != 0;
    let failed = !write_only && regs.eflags & EFLAGS_ZF == 0;
    let mut full = false;
    if write_only {
        // Only the word it wrote matters (false sharing): no site, no stack.
        bump(stat::ATOMIC_HITS);
    } else {
        bump(stat::CAS_HITS);
        if failed {
            bump(stat::CAS_FAILS);
        }
        full |= !cas_site_add(&ctx, point, &op, failed);
    }
    let addr = match op {
        op if op.base != 0 => reg(regs, op.base)
            .wrapping_add(reg(regs, op.index).wrapping_mul(op.scale as u64))
            .wrapping_add(op.disp as i64 as u64),
        _ => 0,
    };
    let g = regs.r14;
    let akey = CasAddrKey { point, _pad: 0, addr };
    match CAS_ADDRS.get_ptr_mut(&akey) {
        Some(v) => unsafe {
            (*v).attempts += 1;
            (*v).failures += failed as u64;
            if (*v).last_g != g {
                (*v).other_g = (*v).last_g;
                (*v).last_g = g;
            }
        },
        None => {
            let v = CasAddrStats { attempts: 1, failures: failed as u64, last_g: g, other_g: 0 };
            full |= CAS_ADDRS.insert(&akey, &v, 0).is_err();
        }
    }
    if full {
        bump(stat::CAS_FULL);
    }
    0
}

/// `runtime.fatal` and `internal/runtime/maps.fatal` (message in RAX/RBX):
/// the throwing goroutine's stack and message, kept per thread, before the
/// process dies. Always attached: it runs once per process lifetime.
#[uprobe(multi)]
pub fn go_fatal(ctx: ProbeContext) -> u32 {
    go_fatal_hit(ctx, link_cookie)
}

/// `go_fatal` on kernels without uprobe_multi.
#[uprobe]
pub fn go_fatal_pe(ctx: ProbeContext) -> u32 {
    go_fatal_hit(ctx, link_cookie)
}

/// `go_fatal` on kernels without BPF cookies (before 5.15).
#[uprobe]
pub fn go_fatal_ip(ctx: ProbeContext) -> u32 {
    go_fatal_hit(ctx, addr_cookie)
}

#[inline(always)]
fn go_fatal_hit(ctx: ProbeContext, cookie_of: impl Fn(&ProbeContext) -> Option<u64>) -> u32 {
    if !is_target() {
        return 0;
    }
    let Some(cookie) = cookie_of(&ctx) else {
        return 0;
    };
    bump(stat::FATAL_HITS);
    let regs = unsafe { &*ctx.regs };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(at) = FATAL_AT.get_ptr_mut(0) {
        unsafe {
            if *at == 0 {
                *at = now;
            }
        }
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(f) = FATAL_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let f = unsafe { &mut *f };
    let g = regs.r14;
    f.ts_ns = now;
    f.g = g;
    f.goid = goid_of(g);
    f.caller = unsafe { bpf_probe_read_user(regs.rsp as *const u64) }.unwrap_or(0);
    f.map = unsafe { WRITING.get(&g) }.copied().unwrap_or(0);
    f.stack_id = user_stack(&ctx);
    f.probe = cookie as u32;
    let len = (regs.rbx as usize).min(FATAL_MSG - 1);
    f.msg_len = len as u32;
    f.msg = [0; FATAL_MSG];
    unsafe {
        probe_read_user_raw(f.msg.as_mut_ptr().cast(), len as u32, regs.rax as *const _);
    }
    // The first fatal on a thread wins: maps.fatal calls runtime.fatal.
    match FATALS.insert(&tid, f, BPF_NOEXIST as u64) {
        Ok(()) => info!(&ctx, "fatal error on thread {}, goroutine {}", tid, f.goid),
        Err(_) if unsafe { FATALS.get(&tid) }.is_none() => bump(stat::CRASH_FULL),
        Err(_) => {}
    }
    0
}

/// SIGURG deliveries to the target after a fatal error: Go is stopping every
/// running goroutine, so each delivery shows what another thread was doing
/// (often the other writer, still inside the map write).
#[raw_tracepoint(tracepoint = "signal_deliver")]
pub fn crash_signal(ctx: RawTracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    // trace_signal_deliver(int sig, struct kernel_siginfo *info, struct k_sigaction *ka)
    if ctx.arg::<u64>(0) as i32 != SIGURG {
        return 0;
    }
    if FATAL_AT.get(0).is_none_or(|t| *t == 0) {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    let (g, ip) = unsafe {
        (
            bpf_probe_read_kernel(&raw const (*regs).r14).unwrap_or(0),
            bpf_probe_read_kernel(&raw const (*regs).rip).unwrap_or(0),
        )
    };
    let st = CrashStack {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        g,
        goid: goid_of(g),
        ip,
        map: unsafe { WRITING.get(&g) }.copied().unwrap_or(0),
        stack_id: user_stack(&ctx),
        _pad: 0,
    };
    bump(stat::CRASH_STACKS);
    if CRASH_STACKS.insert(&tid, &st, BPF_NOEXIST as u64).is_err() && unsafe { CRASH_STACKS.get(&tid) }.is_none() {
        bump(stat::CRASH_FULL);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
