//! Loading the eBPF object and opening and closing probe windows. A
//! map-write window has two uprobe_multi links, one for its entry points and
//! one for its RETs, told apart in the kernel by their cookies; it opens
//! RETs first and closes entries first: every write whose entry a window
//! sees, it also sees return, unless the call outlives the window. A lock
//! window is one link, entries before ends in it, since the kernel plants
//! and removes a link's uprobes one after the other in the order given
//! (see `attach`).

use std::{
    num::NonZeroU32,
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    time::Duration,
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, StackTraceMap},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
        RawTracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use map_probe_common::{
    stat, CasAddrKey, CasAddrStats, CasKey, CasOperand, CasStats, Control, Counters, CrashStack,
    Fatal, LockKey, LockSeen, OverlapKey, OverlapVal, SiteKey, SiteStats, WaitHist, WriteKey,
    Writer, COOKIE_AT_CALL, COOKIE_CALLEE_RET, COOKIE_ENDS_AT_CALLEE, COOKIE_END_POINT_SHIFT,
    COOKIE_RET, COOKIE_TIER_SHIFT, LOCK_TIERS, MAX_CAS_POINTS,
};

use crate::{
    calibrate,
    catalog::{self, Plan, Purpose},
    links, text,
};

/// The clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/map-probe.bpf.o"));

/// One set of links: a purpose and, for lock waits, its tier (0: steady,
/// attached while it fits its budget, ideally always; 1: windowed, for the
/// hot points moved out of the steady tier).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub purpose: Purpose,
    pub tier: u8,
}

impl From<Purpose> for Slot {
    fn from(purpose: Purpose) -> Slot {
        Slot { purpose, tier: 0 }
    }
}

/// A lock-wait point's uprobes, whichever tier holds it.
#[derive(Clone)]
struct Member {
    /// None for a callee's RETs that end other points' waits.
    entry: Option<u64>,
    rets: Vec<u64>,
    cookie: u64,
}

/// The steady lock tier is planted in links of about this many points, so
/// that a point leaving it (it heated up) re-plants the rest of its group,
/// not the tier. Planting a uprobe has the kernel replace the probed page of
/// the target's text under its mmap lock: on Debian's caddy (887 points),
/// re-planting the whole steady tier whenever the tiers were re-sorted cost
/// the server's p99 28-41% under load.
const STEADY_CHUNK: usize = 32;

/// Steady lock points planted together in one link.
struct Chunk {
    /// Indexes into `Probes::lock_points`.
    members: Vec<usize>,
    points: usize,
    handle: Handle,
}

/// How many probe points were planted and removed so far: what the target
/// paid in page replacements, whatever their hits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Planting {
    pub planted: u64,
    pub removed: u64,
    /// The steady lock tier's share of the above.
    pub steady_planted: u64,
    pub steady_removed: u64,
}

/// The uprobes of one slot, (offset, cookie) each, and their links while attached.
struct Set {
    purpose: Purpose,
    tier: u8,
    entries: Vec<(u64, u64)>,
    rets: Vec<(u64, u64)>,
    entry_link: Option<Handle>,
    ret_link: Option<Handle>,
    /// The steady lock tier's links (its only ones).
    chunks: Vec<Chunk>,
    /// Points planted by `entry_link` and `ret_link`.
    planted: usize,
    /// The RET link's time in: since it was planted, and before.
    ends_since: Option<Instant>,
    ends_time: Duration,
}

impl Set {
    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.rets.is_empty()
    }

    fn is_linked(&self) -> bool {
        self.entry_link.is_some() || self.ret_link.is_some() || !self.chunks.is_empty()
    }
}

/// The steady lock tier: planted in chunks that stay while their points do.
fn chunked(slot: Slot) -> bool {
    slot.purpose == Purpose::LockWait && slot.tier == 0
}

/// An attached link: made by a child (uprobe_multi; see `links`), or one
/// aya holds (the perf-event fallback, one perf event per point).
enum Handle {
    Child(links::Link),
    Aya(UProbeLinkId),
}

/// How uprobes reach the kernel. uprobe_multi (Linux 6.6+) plants a whole
/// set in one link; older kernels take one perf-event uprobe per point, with
/// its BPF cookie on the link from Linux 5.15, and before that the point is
/// found by the address that trapped (`ADDR_COOKIES`). The eBPF object
/// carries a program of each kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UprobeMode {
    Multi,
    PerfEvent,
    PerfEventByAddr,
}

impl UprobeMode {
    /// What this host supports, unless `MAP_PROBE_UPROBE_MODE` (`multi`,
    /// `perf-event` or `perf-event-ip`) says otherwise: the tests force the
    /// fallbacks that way.
    pub fn for_host() -> UprobeMode {
        match std::env::var("MAP_PROBE_UPROBE_MODE").as_deref() {
            Ok("perf-event") => UprobeMode::PerfEvent,
            Ok("perf-event-ip") => UprobeMode::PerfEventByAddr,
            Ok("multi") => UprobeMode::Multi,
            _ if uprobe_multi_supported() => UprobeMode::Multi,
            _ if perf_event_cookies_supported() => UprobeMode::PerfEvent,
            _ => UprobeMode::PerfEventByAddr,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UprobeMode::Multi => "uprobe_multi links",
            UprobeMode::PerfEvent => "perf-event uprobes, one per point",
            UprobeMode::PerfEventByAddr => {
                "perf-event uprobes, one per point, told apart by address (no BPF cookies)"
            }
        }
    }

    fn program(self, purpose: Purpose) -> String {
        match self {
            UprobeMode::Multi => purpose.program().to_string(),
            UprobeMode::PerfEvent => format!("{}_pe", purpose.program()),
            UprobeMode::PerfEventByAddr => format!("{}_ip", purpose.program()),
        }
    }
}

/// Whether a perf-event uprobe can carry a BPF cookie (Linux 5.15+): asked
/// of the kernel, which must know the helper and take the cookie on a perf
/// link, rather than judged by its version (distributions backport).
pub fn perf_event_cookies_supported() -> bool {
    aya::sys::is_helper_supported(
        aya::programs::ProgramType::KProbe,
        aya::sys::BpfHelper::BPF_FUNC_get_attach_cookie,
    )
    .unwrap_or(false)
        && aya::sys::is_perf_link_supported().unwrap_or(false)
}

pub fn uprobe_multi_supported() -> bool {
    aya::sys::is_uprobe_multi_supported(aya::sys::UProbeMultiFeature::ProcessScopedPidFilter)
        .unwrap_or(false)
}

/// Raises RLIMIT_MEMLOCK, which kernels before 5.11 charge BPF maps to
/// (later ones account them to the memory cgroup and ignore it).
fn raise_memlock() -> Result<()> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0
        || crate::doctor::kernel_version() >= (5, 11)
    {
        return Ok(());
    }
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur);
        cur.rlim_cur = cur.rlim_max;
        libc::setrlimit(libc::RLIMIT_MEMLOCK, &cur);
    }
    if cur.rlim_cur != libc::RLIM_INFINITY && cur.rlim_cur < NEEDED_MEMLOCK {
        bail!(
            "RLIMIT_MEMLOCK is {} KiB and cannot be raised, and this kernel charges BPF maps to it: run map-probe with CAP_SYS_RESOURCE or after `ulimit -l unlimited`",
            cur.rlim_cur >> 10
        );
    }
    Ok(())
}

/// What the maps take at their stated sizes, with room to spare.
const NEEDED_MEMLOCK: u64 = 256 << 20;

pub struct Probes {
    ebpf: Ebpf,
    mode: UprobeMode,
    /// Messages the eBPF programs log (rare: a full map, a fatal error).
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    target: PathBuf,
    pid: NonZeroU32,
    sets: Vec<Set>,
    control: Control,
    calibration: Option<Handle>,
    /// Every lock-wait point and the tier it is in.
    lock_points: Vec<Member>,
    tiers: Vec<u8>,
    /// What one trap costs on this host, when measured (`calibrate`).
    pub trap_cost: Option<Duration>,
    pub planting: Planting,
}

impl Probes {
    pub fn load(
        pid: u32,
        target: PathBuf,
        go: &crate::gobin::GoVersion,
        plans: &[&Plan],
        mode: UprobeMode,
    ) -> Result<Probes> {
        raise_memlock()?;
        // aya reads the kernel's BTF only for CO-RE relocations, which these
        // programs do not use: they load without it.
        let mut loader = EbpfLoader::new();
        // Tests shrink the site and stack tables to prove what happens when
        // they fill, without generating 100,000 stacks through traps.
        let shrunk: Vec<(&str, u32)> = ["SITES", "STACKS"]
            .into_iter()
            .filter_map(|m| {
                let n = std::env::var(format!("MAP_PROBE_MAX_{m}")).ok()?;
                Some((m, n.parse().ok().filter(|&n: &u32| n > 0)?))
            })
            .collect();
        for &(m, n) in &shrunk {
            loader.map_max_entries(m, n);
        }
        if mode != UprobeMode::PerfEventByAddr {
            loader.map_max_entries("ADDR_COOKIES", 1);
        }
        let mut ebpf = loader
            .override_global("TARGET_TGID", &pid, true)
            .override_global("GOID_OFFSET", &catalog::goid_offset(go), true)
            .override_global(
                "SYNCMAP_DIRTY_OFFSET",
                &catalog::sync_map_fields(go).0,
                true,
            )
            .override_global(
                "SYNCMAP_MISSES_OFFSET",
                &catalog::sync_map_fields(go).1,
                true,
            )
            .load(OBJECT)
            .map_err(|e| {
                anyhow!("loading the eBPF programs failed: {e} (see `map-probe doctor`)")
            })?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|e| log::debug!("no eBPF log: {e}"))
            .ok();
        let mut sets = Vec::new();
        let mut lock_points = Vec::new();
        for plan in plans {
            let prog = uprobe(&mut ebpf, mode, plan.purpose)?;
            prog.load().map_err(|e| {
                anyhow!(
                    "the kernel rejected the eBPF program {}: {e} (see `map-probe doctor`)",
                    mode.program(plan.purpose)
                )
            })?;
            let members: Vec<Member> = plan
                .points
                .iter()
                .enumerate()
                .map(|(i, p)| Member {
                    entry: p.entry_offset,
                    rets: p.ret_offsets.clone(),
                    cookie: i as u64
                        | catalog::cookie_flags(p.kind)
                        | if p.call.is_some() { COOKIE_AT_CALL } else { 0 }
                        | p.ends_at.map_or(0, |e| {
                            COOKIE_ENDS_AT_CALLEE | (e as u64) << COOKIE_END_POINT_SHIFT
                        })
                        | if p.entry_offset.is_none() {
                            COOKIE_CALLEE_RET
                        } else {
                            0
                        },
                })
                .collect();
            let everything = vec![0u8; members.len()];
            let tiers = if plan.purpose == Purpose::LockWait {
                LOCK_TIERS as u8
            } else {
                1
            };
            for tier in 0..tiers {
                let (entries, rets) = tier_points(&members, &everything, tier);
                sets.push(Set {
                    purpose: plan.purpose,
                    tier,
                    entries,
                    rets,
                    entry_link: None,
                    ret_link: None,
                    chunks: Vec::new(),
                    planted: 0,
                    ends_since: None,
                    ends_time: Duration::ZERO,
                });
            }
            if plan.purpose == Purpose::LockWait {
                lock_points = members;
            }
        }
        Ok(Probes {
            ebpf,
            mode,
            logger,
            target,
            pid: NonZeroU32::new(pid).ok_or_else(|| anyhow!("PID 0 is not a process"))?,
            sets,
            control: Control::default(),
            calibration: None,
            tiers: vec![0; lock_points.len()],
            lock_points,
            trap_cost: None,
            planting: Planting::default(),
        })
    }

    /// Which tier each lock-wait point is in.
    pub fn tiers(&self) -> &[u8] {
        &self.tiers
    }

    /// Moves lock-wait points between tiers. A tier whose points changed is
    /// re-linked at once if it is attached (a few ms without its probes);
    /// returns which tiers changed.
    pub fn set_tiers(&mut self, tiers: &[u8]) -> Result<[bool; LOCK_TIERS]> {
        let mut changed = [false; LOCK_TIERS];
        for tier in 0..LOCK_TIERS as u8 {
            let (entries, rets) = tier_points(&self.lock_points, tiers, tier);
            let slot = Slot {
                purpose: Purpose::LockWait,
                tier,
            };
            let Some(set) = self
                .sets
                .iter_mut()
                .find(|s| s.purpose == Purpose::LockWait && s.tier == tier)
            else {
                continue;
            };
            if set.entries == entries && set.rets == rets {
                continue;
            }
            changed[tier as usize] = true;
            if chunked(slot) && set.is_linked() {
                set.entries = entries;
                set.rets = rets;
                self.move_steady(tiers)?;
                continue;
            }
            let was_attached = set.is_linked();
            let had_ends = set.ends_since.is_some();
            if was_attached {
                self.detach(slot)?;
            }
            let set = self
                .sets
                .iter_mut()
                .find(|s| s.purpose == Purpose::LockWait && s.tier == tier)
                .expect("found above");
            set.entries = entries;
            set.rets = rets;
            if was_attached {
                self.attach_with(slot, had_ends)?;
            }
        }
        self.tiers = tiers.to_vec();
        Ok(changed)
    }

    /// Re-plants only the steady chunks a point left, and plants the points
    /// that joined as chunks of their own; the rest stay planted.
    fn move_steady(&mut self, tiers: &[u8]) -> Result<()> {
        let steady = |m: &usize| tiers.get(*m) == Some(&0);
        let Some(set) = self.steady_set() else {
            return Ok(());
        };
        let mut held = std::collections::HashSet::new();
        let mut broken = Vec::new();
        let mut kept = Vec::new();
        for c in std::mem::take(&mut set.chunks) {
            held.extend(c.members.iter().copied());
            if c.members.iter().all(steady) {
                kept.push(c);
            } else {
                broken.push(c);
            }
        }
        set.chunks = kept;
        let mut replant = Vec::new();
        for c in broken {
            replant.extend(c.members.iter().copied().filter(steady));
            self.drop_chunk(c)?;
        }
        let joined: Vec<usize> = steady_members(tiers)
            .into_iter()
            .filter(|m| !held.contains(m))
            .collect();
        replant.sort_unstable();
        if replant.is_empty() && joined.is_empty() {
            return Ok(());
        }
        // Waits begun while a re-planted point's end was out may have ended
        // unseen: their starts are stale.
        self.control.lock_since_ns[0] = monotonic_ns();
        let control = self.control;
        Array::<&mut MapData, Control>::try_from(self.map_mut("CONTROL")?)?.set(0, &control, 0)?;
        self.plant_steady(&replant)?;
        self.plant_steady(&joined)
    }

    /// Plants `members` (steady lock points) in chunks of about `STEADY_CHUNK`.
    fn plant_steady(&mut self, members: &[usize]) -> Result<()> {
        let mut group = Vec::new();
        let mut n = 0;
        for &m in members {
            let Some(p) = self.lock_points.get(m) else {
                continue;
            };
            let k = usize::from(p.entry.is_some()) + p.rets.len();
            if n > 0 && n + k > STEADY_CHUNK {
                self.plant_chunk(std::mem::take(&mut group))?;
                n = 0;
            }
            group.push(m);
            n += k;
        }
        if !group.is_empty() {
            self.plant_chunk(group)?;
        }
        Ok(())
    }

    /// One steady link: its entries first, then its ends (see `attach_with`).
    fn plant_chunk(&mut self, members: Vec<usize>) -> Result<()> {
        let (mut points, rets) = member_points(members.iter().map(|&m| &self.lock_points[m]), 0);
        points.extend(rets);
        if points.is_empty() {
            return Ok(());
        }
        let (target, pid) = (self.target.clone(), self.pid);
        let handle = attach_points(
            &mut self.ebpf,
            self.mode,
            Purpose::LockWait,
            &points,
            &target,
            pid,
        )?;
        let n = points.len() as u64;
        self.planting.planted += n;
        self.planting.steady_planted += n;
        if let Some(set) = self.steady_set() {
            set.chunks.push(Chunk {
                members,
                points: points.len(),
                handle,
            });
        }
        Ok(())
    }

    fn drop_chunk(&mut self, c: Chunk) -> Result<()> {
        let n = c.points as u64;
        drop_link(&mut self.ebpf, self.mode, Purpose::LockWait, c.handle)?;
        self.planting.removed += n;
        self.planting.steady_removed += n;
        Ok(())
    }

    /// `n` points of `slot` just planted by its entry or RET link.
    fn count_planted(&mut self, slot: Slot, n: usize) {
        self.planting.planted += n as u64;
        if let Some(set) = self.set(slot) {
            set.planted += n;
        }
    }

    /// The steady lock set, even while it holds no point.
    fn steady_set(&mut self) -> Option<&mut Set> {
        self.sets
            .iter_mut()
            .find(|s| s.purpose == Purpose::LockWait && s.tier == 0)
    }

    fn set(&mut self, slot: Slot) -> Option<&mut Set> {
        self.sets
            .iter_mut()
            .find(|s| s.purpose == slot.purpose && s.tier == slot.tier && !s.is_empty())
    }

    pub fn has(&self, slot: impl Into<Slot>) -> bool {
        let slot = slot.into();
        self.sets
            .iter()
            .any(|s| s.purpose == slot.purpose && s.tier == slot.tier && !s.is_empty())
    }

    pub fn attached(&self, slot: impl Into<Slot>) -> bool {
        let slot = slot.into();
        self.sets
            .iter()
            .any(|s| s.purpose == slot.purpose && s.tier == slot.tier && s.is_linked())
    }

    pub fn attach(&mut self, slot: impl Into<Slot>) -> Result<Duration> {
        self.attach_with(slot, true)
    }

    /// Opens a window; a lock window without `ends` plants only its entries:
    /// it counts waits but times none (see `session::ENDS_EVERY`).
    pub fn attach_with(&mut self, slot: impl Into<Slot>, ends: bool) -> Result<Duration> {
        let slot = slot.into();
        let purpose = slot.purpose;
        let t = Instant::now();
        match purpose {
            // Writers remembered from an earlier window may have returned
            // unseen: a new generation makes them stale.
            Purpose::MapWrite => self.control.generation += 1,
            // So may waits.
            Purpose::LockWait => {
                self.control.lock_since_ns[usize::from(slot.tier) % LOCK_TIERS] = monotonic_ns()
            }
            Purpose::Fatal | Purpose::Cas | Purpose::CasFail => {}
        }
        let control = self.control;
        let mut ctl: Array<&mut MapData, Control> = Array::try_from(self.map_mut("CONTROL")?)?;
        ctl.set(0, &control, 0)?;
        let (target, pid) = (self.target.clone(), self.pid);
        let Some(set) = self.set(slot) else {
            return Ok(t.elapsed());
        };
        if chunked(slot) {
            if let Err(e) = self.plant_steady(&steady_members(&self.tiers)) {
                let _ = self.detach(slot);
                return Err(e);
            }
            if let Some(set) = self.set(slot) {
                set.ends_since = Some(Instant::now());
            }
            return Ok(t.elapsed());
        }
        let (entries, rets) = (set.entries.clone(), set.rets.clone());
        // Map writes plant their RETs first: an entry seen before its RET is
        // live would leave a write "inside" until the window closes, and two
        // of those read as an overlap. Lock waits plant their entries first:
        // an entry on a CALL planted after the end probe on the instruction
        // behind it was lost for the whole run (planted, read back as 0xCC,
        // yet never reaching the program) in 4 runs of 10 at 10,000 sites,
        // and in none of 29 the other way round; the kernel's reason was not
        // found. A wait entered before its end probe is live is counted,
        // only not timed.
        let rets_first = purpose != Purpose::LockWait;
        // uprobe_multi plants a link's points in the order given and takes
        // them out in the same order, so a lock window's entries-then-ends
        // fit one link, which pays the kernel's cost of a link once (5-10 ms
        // here under load, while what is planted already traps) and is
        // removed by its closer child without waiting here. Map writes need
        // the other order on the way in only: in one link, their entries
        // outlived the RETs on the way out, 2,700-3,700 hits a window at
        // ~130k writes/s against 1,000-2,100 with two links.
        if self.mode == UprobeMode::Multi && !rets_first {
            let ends = ends && !rets.is_empty();
            let mut all = Vec::with_capacity(entries.len() + rets.len());
            all.extend_from_slice(&entries);
            all.extend(rets.iter().copied().filter(|_| ends));
            if all.is_empty() {
                return Ok(t.elapsed());
            }
            let link = attach_points(&mut self.ebpf, self.mode, purpose, &all, &target, pid)?;
            self.count_planted(slot, all.len());
            if let Some(set) = self.set(slot) {
                set.entry_link = Some(link);
                set.ends_since = ends.then(Instant::now);
            }
            return Ok(t.elapsed());
        }
        if rets_first {
            self.attach_rets(slot, &rets)?;
        }
        // A tier may hold only a callee's RETs.
        if !entries.is_empty() {
            let entry_link =
                attach_points(&mut self.ebpf, self.mode, purpose, &entries, &target, pid);
            let entry_link = match entry_link {
                Ok(l) => {
                    self.count_planted(slot, entries.len());
                    l
                }
                Err(e) => {
                    let _ = self.detach(slot);
                    return Err(e);
                }
            };
            if let Some(set) = self.set(slot) {
                set.entry_link = Some(entry_link);
            }
        }
        if !rets_first && ends {
            if let Err(e) = self.attach_rets(slot, &rets) {
                let _ = self.detach(slot);
                return Err(e);
            }
        }
        Ok(t.elapsed())
    }

    /// Plants the RET link of `slot` (none when it has no RETs).
    fn attach_rets(&mut self, slot: Slot, rets: &[(u64, u64)]) -> Result<()> {
        if rets.is_empty() {
            return Ok(());
        }
        let (target, pid) = (self.target.clone(), self.pid);
        let l = attach_points(&mut self.ebpf, self.mode, slot.purpose, rets, &target, pid)?;
        self.count_planted(slot, rets.len());
        if let Some(set) = self.set(slot) {
            set.ret_link = Some(l);
            set.ends_since = Some(Instant::now());
        }
        Ok(())
    }

    /// Entries out first, then RETs (the reverse of `attach`), so calls that
    /// entered still get their end seen. The kernel takes a link's
    /// breakpoints out at once and then waits ~100 ms for in-flight hits; the
    /// RET link goes as soon as the entries' breakpoints are seen gone from
    /// the target's text, so the RETs do not trap through that wait (20 RET
    /// hits for every entry seen, measured on caddy at ~40k map writes/s).
    pub fn detach(&mut self, slot: impl Into<Slot>) -> Result<Duration> {
        let slot = slot.into();
        let purpose = slot.purpose;
        let t = Instant::now();
        let set = if chunked(slot) {
            self.steady_set()
        } else {
            self.set(slot)
        };
        let Some(set) = set else {
            return Ok(t.elapsed());
        };
        if let Some(since) = set.ends_since.take() {
            set.ends_time += t.saturating_duration_since(since);
        }
        if chunked(slot) {
            for c in std::mem::take(&mut set.chunks) {
                self.drop_chunk(c)?;
            }
            return Ok(t.elapsed());
        }
        let (entry, ret) = (set.entry_link.take(), set.ret_link.take());
        let removed = std::mem::take(&mut set.planted) as u64;
        let offsets: Vec<u64> = set.entries.iter().map(|&(o, _)| o).collect();
        let ret_offsets: Vec<u64> = set.rets.iter().map(|&(o, _)| o).collect();
        self.planting.removed += removed;
        let (mode, ebpf) = (self.mode, &mut self.ebpf);
        if let Some(h) = entry {
            drop_link(ebpf, mode, purpose, h)?;
        }
        let text = ret
            .is_some()
            .then(|| text::Text::of(self.pid.get(), &self.target))
            .flatten();
        // A child-made link's breakpoints leave while its child waits out
        // the grace period; the RETs may go once they are seen gone.
        let gone = |offsets: &[u64]| {
            if let Some(text) = &text {
                let deadline = Instant::now() + Duration::from_millis(200);
                while text.any_planted(offsets).unwrap_or(false) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        };
        gone(&offsets);
        if let Some(h) = ret {
            drop_link(ebpf, mode, purpose, h)?;
            // And wait for the RETs too before the next set's links are made
            // or dropped: returning at once left the closer child behind
            // those forks, and the RETs trapping unwatched for tens of ms
            // (unmatched RET hits a map window on casservice under wrk:
            // 416-11,351 in four runs, 193-2,055 waiting here).
            gone(&ret_offsets);
        }
        Ok(t.elapsed())
    }

    /// The crash watch: SIGURG deliveries to the target after a fatal
    /// error. Needs no tracefs: a raw tracepoint is attached by name.
    pub fn attach_crash_signals(&mut self) -> Result<()> {
        let prog: &mut RawTracePoint = self
            .ebpf
            .program_mut("crash_signal")
            .ok_or_else(|| anyhow!("eBPF object has no program crash_signal"))?
            .try_into()?;
        prog.load()
            .map_err(|e| anyhow!("the kernel rejected the crash-signal program: {e}"))?;
        prog.attach("signal_deliver")
            .map_err(|e| anyhow!("attaching to the signal_deliver tracepoint: {e}"))?;
        Ok(())
    }

    /// Passes on what the eBPF programs logged since the last call.
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }

    /// Sums of the per-CPU counters in `map_probe_common::stat`.
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize]> {
        let arr: PerCpuArray<&MapData, Counters> = PerCpuArray::try_from(self.map("STATS")?)?;
        let mut out = [0u64; stat::COUNT as usize];
        for cpu in arr.get(&0, 0)?.iter() {
            for (o, n) in out.iter_mut().zip(cpu.n.iter()) {
                *o += n;
            }
        }
        Ok(out)
    }

    /// Every aggregated lock-wait site, per-CPU values summed.
    pub fn sites(&self) -> Result<Vec<(SiteKey, SiteStats)>> {
        let map: PerCpuHashMap<&MapData, SiteKey, SiteStats> =
            PerCpuHashMap::try_from(self.map("SITES")?)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (k, vals) = entry?;
            let mut s = SiteStats::default();
            for v in vals.iter() {
                s.count += v.count;
                s.timed += v.timed;
                s.wait_ns += v.wait_ns;
                s.max_wait_ns = s.max_wait_ns.max(v.max_wait_ns);
            }
            out.push((k, s));
        }
        Ok(out)
    }

    /// Hits per lock-wait point (entries and ends), summed over CPUs.
    pub fn point_hits(&self) -> Result<(Vec<u64>, Vec<u64>)> {
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map("POINT_HITS")?)?;
        let max = map_probe_common::MAX_POINTS;
        let n = self.lock_points.len().min(max as usize) as u32;
        let read = |i: u32| arr.get(&i, 0).map_or(0, |v| v.iter().sum());
        Ok((
            (0..n).map(read).collect(),
            (0..n).map(|i| read(i + max)).collect(),
        ))
    }

    /// How long `slot`'s end probes were in so far.
    pub fn ends_attached(&self, slot: impl Into<Slot>, now: Instant) -> Duration {
        let slot = slot.into();
        self.sets
            .iter()
            .find(|s| s.purpose == slot.purpose && s.tier == slot.tier)
            .map_or(Duration::ZERO, |s| {
                s.ends_time
                    + s.ends_since
                        .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
            })
    }

    /// Every site's wait-time histogram.
    pub fn hists(&self) -> Result<std::collections::HashMap<SiteKey, WaitHist>> {
        let map: HashMap<&MapData, SiteKey, WaitHist> = HashMap::try_from(self.map("HISTS")?)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Waits per (site, semaphore).
    /// CAS attempts and failures per (point, stack), summed over CPUs.
    pub fn cas_sites(&self) -> Result<Vec<(CasKey, CasStats)>> {
        let map: PerCpuHashMap<&MapData, CasKey, CasStats> =
            PerCpuHashMap::try_from(self.map("CAS_SITES")?)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (k, vals) = entry?;
            let mut s = CasStats::default();
            for v in vals.iter() {
                s.attempts += v.attempts;
                s.failures += v.failures;
            }
            out.push((k, s));
        }
        Ok(out)
    }

    /// Per (point, word): each CPU's counts, in CPU order.
    pub fn cas_addrs(&self) -> Result<Vec<(CasAddrKey, Vec<CasAddrStats>)>> {
        let map: PerCpuHashMap<&MapData, CasAddrKey, CasAddrStats> =
            PerCpuHashMap::try_from(self.map("CAS_ADDRS")?)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (k, vals) = entry?;
            out.push((k, vals.iter().copied().collect()));
        }
        Ok(out)
    }

    /// Tells the CAS program how to find each point's memory operand.
    pub fn set_cas_operands(&mut self, ops: &[CasOperand]) -> Result<()> {
        self.fill_per_point("CAS_OPERANDS", ops)
    }

    /// Tells the failure-block program which CAS point each of its points
    /// belongs to.
    pub fn set_cas_fail_of(&mut self, of: &[u32]) -> Result<()> {
        self.fill_per_point("CAS_FAIL_OF", of)
    }

    /// Writes `values` into the per-CAS-point array `name`, index by index.
    fn fill_per_point<T: aya::Pod>(&mut self, name: &str, values: &[T]) -> Result<()> {
        let mut arr: Array<&mut MapData, T> = Array::try_from(self.map_mut(name)?)?;
        for (i, v) in values.iter().enumerate().take(MAX_CAS_POINTS as usize) {
            arr.set(i as u32, v, 0)?;
        }
        Ok(())
    }

    pub fn site_locks(&self) -> Result<Vec<(LockKey, LockSeen)>> {
        let map: HashMap<&MapData, LockKey, LockSeen> = HashMap::try_from(self.map("SITE_LOCKS")?)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Forgets aggregated sites (the agent drops those idle for an interval,
    /// so the fixed-size map never fills over a long run).
    pub fn remove_sites(&mut self, keys: &[SiteKey]) -> Result<()> {
        let mut map: PerCpuHashMap<&mut MapData, SiteKey, SiteStats> =
            PerCpuHashMap::try_from(self.map_mut("SITES")?)?;
        for k in keys {
            // Already gone is fine: nothing left to forget.
            let _ = map.remove(k);
        }
        let mut hists: HashMap<&mut MapData, SiteKey, WaitHist> =
            HashMap::try_from(self.map_mut("HISTS")?)?;
        for k in keys {
            let _ = hists.remove(k);
        }
        let gone: std::collections::HashSet<&SiteKey> = keys.iter().collect();
        let locks: Vec<LockKey> = self
            .site_locks()?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| gone.contains(&k.site))
            .collect();
        let mut map: HashMap<&mut MapData, LockKey, LockSeen> =
            HashMap::try_from(self.map_mut("SITE_LOCKS")?)?;
        for k in &locks {
            let _ = map.remove(k);
        }
        Ok(())
    }

    /// How many distinct sites the kernel holds so far (for the live status).
    pub fn site_count(&self) -> usize {
        self.map("SITES")
            .ok()
            .and_then(|m| PerCpuHashMap::<&MapData, SiteKey, SiteStats>::try_from(m).ok())
            .map_or(0, |m| m.keys().count())
    }

    /// Overlapping map writes, per-CPU values merged.
    pub fn overlaps(&self) -> Result<Vec<(OverlapKey, OverlapVal)>> {
        let map: PerCpuHashMap<&MapData, OverlapKey, OverlapVal> =
            PerCpuHashMap::try_from(self.map("OVERLAPS")?)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (k, vals) = entry?;
            let mut m = OverlapVal {
                first_ns: u64::MAX,
                ..OverlapVal::default()
            };
            for v in vals.iter() {
                m.count += v.count;
                m.last_ns = m.last_ns.max(v.last_ns);
                if v.first_ns != 0 && v.first_ns < m.first_ns {
                    m.first_ns = v.first_ns;
                    m.first_goid = v.first_goid;
                    m.second_goid = v.second_goid;
                    m.first_probe = v.first_probe;
                    m.second_probe = v.second_probe;
                }
            }
            if m.first_ns == u64::MAX {
                m.first_ns = m.last_ns;
            }
            out.push((k, m));
        }
        Ok(out)
    }

    /// Map writes whose end the probes have not seen (yet), of the current
    /// window: at a crash, the writers that were inside when Go died.
    pub fn unfinished_writes(&self) -> Result<Vec<Writer>> {
        let map: HashMap<&MapData, WriteKey, Writer> = HashMap::try_from(self.map("ACTIVE")?)?;
        Ok(map
            .iter()
            .filter_map(Result::ok)
            .map(|(_, w)| w)
            .filter(|w| w.generation == self.control.generation)
            .collect())
    }

    pub fn fatals(&self) -> Result<Vec<(u32, Fatal)>> {
        let map: HashMap<&MapData, u32, Fatal> = HashMap::try_from(self.map("FATALS")?)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    pub fn crash_stacks(&self) -> Result<Vec<(u32, CrashStack)>> {
        let map: HashMap<&MapData, u32, CrashStack> = HashMap::try_from(self.map("CRASH_STACKS")?)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// The stack of a hit on a function's first instructions, innermost
    /// first, and whether its first address is the probed instruction itself
    /// (false when the stack was lost). A frame-pointer walk from there skips
    /// the direct caller: the kernel adds it only when the probed instruction
    /// is `push %rbp`, which Go 1.19's prologue does not use, so `caller`
    /// (read from `*(rsp)`) goes in unless it is already there.
    pub fn stack_at_entry(&self, stack_id: i32, caller: u64) -> (Vec<u64>, bool) {
        let mut pcs = self.stack(stack_id).unwrap_or_default();
        let first_is_ip = !pcs.is_empty();
        if caller != 0 && pcs.get(1) != Some(&caller) {
            pcs.insert(pcs.len().min(1), caller);
        }
        (pcs, first_is_ip)
    }

    /// The user stack behind a stack id, innermost first (runtime addresses).
    pub fn stack(&self, id: i32) -> Option<Vec<u64>> {
        let map = StackTraceMap::try_from(self.map("STACKS").ok()?).ok()?;
        let st = map.get(&u32::try_from(id).ok()?, 0).ok()?;
        Some(st.frames().iter().map(|f| f.ip).collect())
    }

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| anyhow!("eBPF object has no map {name}"))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("eBPF object has no map {name}"))
    }
}

impl Drop for Probes {
    /// Every link goes through its closer child; map-probe waits for them,
    /// so when it exits nothing of it is left in the kernel.
    fn drop(&mut self) {
        for set in &mut self.sets {
            let chunks = std::mem::take(&mut set.chunks)
                .into_iter()
                .map(|c| c.handle);
            for h in [set.entry_link.take(), set.ret_link.take()]
                .into_iter()
                .flatten()
                .chain(chunks)
            {
                if let Handle::Child(l) = h {
                    let _ = l.detach();
                }
            }
        }
        links::sync();
    }
}

impl calibrate::Probe for Probes {
    /// The lock-wait program itself, on map-probe's own calibration function:
    /// a hit there costs the trap and the program's check that the process
    /// is not the target, which is most of what a target's hit costs.
    fn attach_calibration(&mut self) -> Result<()> {
        let (exe, off) = calibrate::point()?;
        let me = NonZeroU32::new(std::process::id()).expect("a process id is never 0");
        let h = attach_points(
            &mut self.ebpf,
            self.mode,
            Purpose::LockWait,
            &[(off, 0)],
            &exe,
            me,
        )
        .context("measuring the cost of one uprobe hit (--hit-cost-us skips this)")?;
        self.calibration = Some(h);
        Ok(())
    }

    fn detach_calibration(&mut self) -> Result<()> {
        if let Some(h) = self.calibration.take() {
            drop_link(&mut self.ebpf, self.mode, Purpose::LockWait, h)?;
        }
        Ok(())
    }
}

/// The lock points in the steady tier, in index order.
fn steady_members(tiers: &[u8]) -> Vec<usize> {
    (0..tiers.len()).filter(|&i| tiers[i] == 0).collect()
}

/// The (offset, cookie) lists of one lock tier's entries and ends.
/// (file offset, cookie) of each uprobe in a set.
type Points = Vec<(u64, u64)>;

fn tier_points(members: &[Member], tiers: &[u8], tier: u8) -> (Points, Points) {
    member_points(
        members
            .iter()
            .zip(tiers)
            .filter(|(_, t)| **t == tier)
            .map(|(m, _)| m),
        tier,
    )
}

fn member_points<'a>(members: impl Iterator<Item = &'a Member>, tier: u8) -> (Points, Points) {
    let mut entries = Vec::new();
    let mut rets = Vec::new();
    for m in members {
        let cookie = m.cookie | u64::from(tier) << COOKIE_TIER_SHIFT;
        entries.extend(m.entry.map(|e| (e, cookie)));
        rets.extend(m.rets.iter().map(|&r| (r, cookie | COOKIE_RET)));
    }
    (entries, rets)
}

/// One link over `points` (offset, cookie), scoped to `pid`.
fn attach_points(
    ebpf: &mut Ebpf,
    mode: UprobeMode,
    purpose: Purpose,
    points: &[(u64, u64)],
    target: &std::path::Path,
    pid: NonZeroU32,
) -> Result<Handle> {
    if mode == UprobeMode::Multi {
        let prog = uprobe(ebpf, mode, purpose)?.fd()?.as_fd().as_raw_fd();
        return links::Link::attach(prog, target, points, pid.get())
            .map(Handle::Child)
            .with_context(|| format!("attaching uprobes to {}", target.display()));
    }
    // Without cookies the program finds its point by the trapping address.
    // The calibration point is in map-probe itself, where the program
    // returns before it looks: its address must not overwrite a target's.
    let by_addr = mode == UprobeMode::PerfEventByAddr;
    if by_addr && pid.get() != std::process::id() {
        let layout = text::Layout::of(pid.get(), target)
            .ok_or_else(|| anyhow!("PID {pid} maps no part of {}", target.display()))?;
        let mut map: HashMap<&mut MapData, u64, u64> = HashMap::try_from(
            ebpf.map_mut("ADDR_COOKIES")
                .ok_or_else(|| anyhow!("eBPF object has no map ADDR_COOKIES"))?,
        )?;
        for &(off, cookie) in points {
            let addr = layout.addr(off).ok_or_else(|| {
                anyhow!(
                    "file offset {off:#x} of {} is not mapped in PID {pid}",
                    target.display()
                )
            })?;
            map.insert(&addr, &cookie, 0).with_context(|| {
                format!(
                    "recording probe addresses (at most {})",
                    map_probe_common::MAX_ADDRS
                )
            })?;
        }
    }
    let points: Vec<UProbeAttachPoint> = points
        .iter()
        .map(|&(off, cookie)| UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(off),
            cookie: (!by_addr).then_some(cookie),
        })
        .collect();
    uprobe(ebpf, mode, purpose)?
        .attach(points, target, UProbeScope::OneProcess(pid))
        .map(Handle::Aya)
        .with_context(|| format!("attaching uprobes to {}", target.display()))
}

/// Removes one link; returns when its breakpoints are out of the target
/// (a child link finishes the kernel's grace period on its own).
fn drop_link(ebpf: &mut Ebpf, mode: UprobeMode, purpose: Purpose, h: Handle) -> Result<()> {
    match h {
        Handle::Child(l) => l.detach()?,
        Handle::Aya(id) => uprobe(ebpf, mode, purpose)?.detach(id)?,
    }
    Ok(())
}

fn uprobe(ebpf: &mut Ebpf, mode: UprobeMode, purpose: Purpose) -> Result<&mut UProbe> {
    let name = mode.program(purpose);
    let name = name.as_str();
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?
        .try_into()?)
}
