//! Loading the eBPF object and opening and closing the uprobe windows. One
//! uprobe_multi link carries every point (entries and RETs, told apart by
//! their cookie), so a window costs one attach and one detach.

use std::{num::NonZeroU32, path::PathBuf, time::Duration, time::Instant};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, StackTraceMap},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
        UProbe,
    },
    Ebpf, EbpfLoader,
};
use map_probe_common::{stat, SiteKey, SiteStats, COOKIE_RET};

use crate::catalog::Point;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/map-probe.bpf.o"));

pub struct Probes {
    ebpf: Ebpf,
    target: PathBuf,
    pid: NonZeroU32,
    points: Vec<(u64, u64)>,
    link: Option<UProbeLinkId>,
}

impl Probes {
    pub fn load(pid: u32, target: PathBuf, points: &[Point]) -> Result<Probes> {
        let mut ebpf = EbpfLoader::new()
            .override_global("TARGET_TGID", &pid, true)
            .load(OBJECT)
            .map_err(|e| {
                anyhow!("loading the eBPF programs failed: {e} (see `map-probe doctor`)")
            })?;
        let prog: &mut UProbe = program(&mut ebpf)?;
        prog.load().map_err(|e| {
            anyhow!("the kernel rejected the eBPF program: {e} (see `map-probe doctor`)")
        })?;
        let mut offsets = Vec::new();
        for (i, p) in points.iter().enumerate() {
            offsets.push((p.entry_offset, i as u64));
            offsets.extend(p.ret_offsets.iter().map(|&r| (r, i as u64 | COOKIE_RET)));
        }
        Ok(Probes {
            ebpf,
            target,
            pid: NonZeroU32::new(pid).ok_or_else(|| anyhow!("PID 0 is not a process"))?,
            points: offsets,
            link: None,
        })
    }

    pub fn attached(&self) -> bool {
        self.link.is_some()
    }

    pub fn attach(&mut self) -> Result<Duration> {
        let t = Instant::now();
        let points: Vec<UProbeAttachPoint> = self
            .points
            .iter()
            .map(|&(off, cookie)| UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(off),
                cookie: Some(cookie),
            })
            .collect();
        let (target, pid) = (self.target.clone(), self.pid);
        let prog = program(&mut self.ebpf)?;
        let link = prog
            .attach(points, &target, UProbeScope::OneProcess(pid))
            .with_context(|| format!("attaching uprobes to {}", target.display()))?;
        self.link = Some(link);
        Ok(t.elapsed())
    }

    pub fn detach(&mut self) -> Result<Duration> {
        let t = Instant::now();
        if let Some(link) = self.link.take() {
            program(&mut self.ebpf)?.detach(link)?;
        }
        Ok(t.elapsed())
    }

    /// Sums of the per-CPU counters in `map_probe_common::stat`.
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize]> {
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map("STATS")?)?;
        let mut out = [0u64; stat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = arr.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// Every aggregated site, per-CPU values summed.
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

    /// How many distinct sites the kernel holds so far (for the live status).
    pub fn site_count(&self) -> usize {
        self.map("SITES")
            .ok()
            .and_then(|m| PerCpuHashMap::<&MapData, SiteKey, SiteStats>::try_from(m).ok())
            .map_or(0, |m| m.keys().count())
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
}

fn program(ebpf: &mut Ebpf) -> Result<&mut UProbe> {
    Ok(ebpf
        .program_mut("lock_wait")
        .ok_or_else(|| anyhow!("eBPF object has no program lock_wait"))?
        .try_into()?)
}
