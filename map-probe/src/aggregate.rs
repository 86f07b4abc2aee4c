//! Reading what the kernel aggregated: per (probe point, stack, caller)
//! counts and wait times, the stacks themselves, and the loss counters.

use anyhow::Result;
use map_probe_common::{stat, SiteStats};
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
}

impl Drops {
    pub fn any(&self) -> bool {
        self.stack_lost
            + self.site_map_full
            + self.inflight_full
            + self.stack_incomplete
            + self.otlp_exports
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
        hits: s[stat::HITS as usize],
        ret_hits: s[stat::RET_HITS as usize],
        drops: Drops {
            stack_lost: s[stat::STACK_LOST as usize],
            site_map_full: s[stat::AGG_FULL as usize],
            inflight_full: s[stat::INFLIGHT_FULL as usize],
            ret_unmatched: s[stat::RET_UNMATCHED as usize],
            stack_incomplete: 0,
            otlp_exports: 0,
        },
    }
}

pub fn collect(probes: &Probes) -> Result<Vec<RawSite>> {
    let mut out = Vec::new();
    for (key, stats) in probes.sites()? {
        if stats.count == 0 {
            // Only a wait's end was seen here; its start fell outside a window.
            continue;
        }
        let (pcs, first_is_ip) = probes.stack_at_entry(key.stack_id, key.caller);
        out.push(RawSite {
            point: key.probe as usize,
            pcs,
            first_is_ip,
            stats,
        });
    }
    Ok(out)
}
