//! Kernel side of map-probe. Programs stay small: they count, remember the
//! start of a wait and hand everything else to the agent.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{ProbeContext, tracing::StackIdContext},
};
use map_probe_common::{
    COOKIE_RET, Inflight, MAX_INFLIGHT, MAX_SITES, MAX_STACKS, SiteKey, SiteStats, stat,
};

/// Host tgid of the target. uprobe_multi links are already PID-scoped; this
/// guards against a probe that outlives a PID reuse.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

#[map]
static SITES: PerCpuHashMap<SiteKey, SiteStats> = PerCpuHashMap::with_max_entries(MAX_SITES, 0);

#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(MAX_STACKS, 0);

#[map]
static INFLIGHT: LruHashMap<u64, Inflight> = LruHashMap::with_max_entries(MAX_INFLIGHT, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
fn bump(idx: u32) {
    if let Some(p) = STATS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn is_target() -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    tgid == unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

/// Runs at the first instruction after the stack-bound check of a runtime
/// semaphore acquire (so a morestack restart cannot count one wait twice) and
/// at each of its RET instructions (never a uretprobe: Go moves stacks).
#[uprobe(multi)]
pub fn lock_wait(ctx: ProbeContext) -> u32 {
    if !is_target() {
        return 0;
    }
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let regs = unsafe { &*ctx.regs };
    let g = regs.r14;
    let now = unsafe { bpf_ktime_get_ns() };
    if cookie & COOKIE_RET != 0 {
        bump(stat::RET_HITS);
        wait_ended(g, now);
    } else {
        bump(stat::HITS);
        wait_started(&ctx, cookie as u32, regs.rsp, g, now);
    }
    0
}

#[inline(always)]
fn wait_started(ctx: &ProbeContext, probe: u32, sp: u64, g: u64, now: u64) {
    let caller = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
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
                bump(stat::AGG_FULL);
                return;
            }
        }
    }
    let inf = Inflight { start_ns: now, key };
    if INFLIGHT.insert(&g, &inf, 0).is_err() {
        bump(stat::INFLIGHT_FULL);
    }
}

#[inline(always)]
fn wait_ended(g: u64, now: u64) {
    let Some(inf) = (unsafe { INFLIGHT.get(&g) }).copied() else {
        bump(stat::RET_UNMATCHED);
        return;
    };
    let _ = INFLIGHT.remove(&g);
    let dt = now.saturating_sub(inf.start_ns);
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
