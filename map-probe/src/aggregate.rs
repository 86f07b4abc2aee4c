//! Reading what the kernel aggregated: per (probe point, stack, caller)
//! counts and wait times, the stacks themselves, and the loss counters.

use std::collections::HashMap;

use anyhow::Result;
use map_probe_common::{stat, tier_stat, SiteKey, SiteStats, HIST_BUCKETS, LOCK_TIERS};
use serde::Serialize;

use crate::probes::Probes;

/// One kernel aggregation key with its stack resolved to addresses.
pub struct RawSite {
    /// Index into the attached points (the catalog row's place in the plan).
    pub point: usize,
    /// Runtime addresses, innermost first. When `first_is_ip` the first one is
    /// the probed instruction itself; every other one is a return address.
    pub pcs: Vec<u64>,
    pub first_is_ip: bool,
    pub stats: SiteStats,
    /// Timed waits per log2 bucket of their length in ns.
    pub hist: [u64; HIST_BUCKETS],
    /// Waits per semaphore address.
    pub semas: Vec<(u64, u64)>,
    /// Per semaphore address: the CPUs its waits were seen on (bit
    /// `cpu % 64`), so far.
    pub sema_cpus: HashMap<u64, u64>,
}

/// What the kernel holds for one site key: counters, histogram, semaphores.
#[derive(Clone)]
pub struct KeyData {
    pub stats: SiteStats,
    pub hist: [u64; HIST_BUCKETS],
    pub semas: HashMap<u64, u64>,
    pub sema_cpus: HashMap<u64, u64>,
}

impl KeyData {
    /// Growth since `prev` (an earlier read of the same key); the max is the
    /// running one, as the kernel keeps no per-interval max.
    pub fn since(&self, prev: &KeyData) -> KeyData {
        let mut hist = self.hist;
        for (h, p) in hist.iter_mut().zip(prev.hist.iter()) {
            *h = h.saturating_sub(*p);
        }
        let semas = self
            .semas
            .iter()
            .map(|(a, n)| {
                (
                    *a,
                    n.saturating_sub(prev.semas.get(a).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        KeyData {
            stats: SiteStats {
                count: self.stats.count.saturating_sub(prev.stats.count),
                timed: self.stats.timed.saturating_sub(prev.stats.timed),
                wait_ns: self.stats.wait_ns.saturating_sub(prev.stats.wait_ns),
                max_wait_ns: self.stats.max_wait_ns,
            },
            hist,
            semas,
            sema_cpus: self.sema_cpus.clone(),
        }
    }
}

/// Every site key with its counters, histogram and semaphores.
pub fn read(probes: &Probes) -> Result<Vec<(SiteKey, KeyData)>> {
    let mut hists = probes.hists()?;
    let mut semas: HashMap<SiteKey, HashMap<u64, u64>> = HashMap::new();
    let mut cpus: HashMap<SiteKey, HashMap<u64, u64>> = HashMap::new();
    for (k, v) in probes.site_locks()? {
        *semas.entry(k.site).or_default().entry(k.sema).or_default() += v.waits;
        *cpus.entry(k.site).or_default().entry(k.sema).or_default() |= v.cpus;
    }
    Ok(probes
        .sites()?
        .into_iter()
        .map(|(key, stats)| {
            let mut hist = [0u64; HIST_BUCKETS];
            if let Some(h) = hists.remove(&key) {
                for (o, n) in hist.iter_mut().zip(h.b.iter()) {
                    *o = u64::from(*n);
                }
            }
            let semas = semas.remove(&key).unwrap_or_default();
            let sema_cpus = cpus.remove(&key).unwrap_or_default();
            (
                key,
                KeyData {
                    stats,
                    hist,
                    semas,
                    sema_cpus,
                },
            )
        })
        .collect())
}

/// The raw site of one key, its stack resolved.
pub fn raw_site(probes: &Probes, key: &SiteKey, d: KeyData) -> RawSite {
    let (pcs, first_is_ip) = probes.stack_at_entry(key.stack_id, key.caller);
    RawSite {
        point: key.probe as usize,
        pcs,
        first_is_ip,
        stats: d.stats,
        hist: d.hist,
        semas: d.semas.into_iter().collect(),
        sema_cpus: d.sema_cpus,
    }
}

/// Everything the kernel side could not record, never silently dropped.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Drops {
    /// Waits counted but whose stack could not be stored (hash collision or full stack map).
    pub stack_lost: u64,
    /// Waits not counted at all: the site map was full.
    pub site_map_full: u64,
    /// Waits counted but not timed: no room to remember the start.
    pub inflight_full: u64,
    /// Wait ends seen without a start (a window opened mid-wait); harmless.
    pub ret_unmatched: u64,
    /// Waits whose stack never left the lock machinery (the frame-pointer
    /// walk stopped early), so no call site could be named.
    pub stack_incomplete: u64,
    /// OTLP exports (one target's interval) not delivered: the collector
    /// failed, was backed off from, or the capped queue was full.
    pub otlp_exports: u64,
    /// Hits of a probe found by address (kernels without BPF cookies) at an
    /// address no point was recorded for: lost. Never seen; counted so it
    /// would show.
    pub unknown_address: u64,
}

impl Drops {
    pub fn any(&self) -> bool {
        self.stack_lost
            + self.site_map_full
            + self.inflight_full
            + self.stack_incomplete
            + self.otlp_exports
            + self.unknown_address
            > 0
    }
}

pub struct Totals {
    pub hits: u64,
    pub ret_hits: u64,
    pub drops: Drops,
}

/// The loss counters and hit totals out of `Probes::stats()`.
pub fn totals(s: &[u64]) -> Totals {
    Totals {
        hits: (0..LOCK_TIERS)
            .map(|t| s[tier_stat(t, false) as usize])
            .sum(),
        ret_hits: (0..LOCK_TIERS)
            .map(|t| s[tier_stat(t, true) as usize])
            .sum(),
        drops: Drops {
            stack_lost: s[stat::STACK_LOST as usize],
            site_map_full: s[stat::AGG_FULL as usize],
            inflight_full: s[stat::INFLIGHT_FULL as usize],
            ret_unmatched: s[stat::RET_UNMATCHED as usize],
            stack_incomplete: 0,
            otlp_exports: 0,
            unknown_address: s[stat::NO_POINT as usize],
        },
    }
}

pub fn collect(probes: &Probes) -> Result<Vec<RawSite>> {
    Ok(read(probes)?
        .into_iter()
        // Only a wait's end was seen at a key with no count; its start fell
        // outside a window.
        .filter(|(_, d)| d.stats.count > 0)
        .map(|(k, d)| raw_site(probes, &k, d))
        .collect())
}
