//! One observation of one target: open and close probe windows under the
//! governors (one for lock waits, one for map writes), keep the crash watch
//! on throughout, and turn what the kernel aggregated into `Report`s.
//!
//! [`Observation`] is steppable so that one loop can drive several targets
//! (the agent) as well as one (`attach`, `run`): `tick` takes one governor
//! step, `snapshot` reports the whole run so far, `interval` reports what
//! changed since its last call (for OTLP export), and `close` detaches.
//! [`observe`] is the one-target loop of `attach` and `run`.

use std::{
    collections::HashMap,
    fs,
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use map_probe_common::{stat, tier_stat, SiteKey, LOCK_TIERS};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    aggregate::{self, KeyData, RawSite},
    cas,
    catalog::{self, Plan, Purpose},
    doctor::Host,
    export::Exporter,
    false_sharing,
    governor::{self, Decision, Governor},
    probes::{Probes, Slot, UprobeMode},
    report::{self, CasSampling, LockTier, MapSampling, Report, Risk, Sampling, TargetInfo},
    risks::{self, Clock},
    sites::{self, PointScale},
    symbolize::Symbolizer,
    target::Target,
    tiers::{self, Tiers},
};

#[derive(Clone, Debug, Default)]
pub struct Outputs {
    pub json: Option<PathBuf>,
    pub flamegraph: Option<PathBuf>,
    pub folded: Option<PathBuf>,
    /// A gzipped pprof profile (Go's mutex profile shape).
    pub pprof: Option<PathBuf>,
    /// What the flamegraph's and the folded stacks' widths count.
    pub weight: report::flamegraph::Weight,
    pub top: usize,
}

/// The hit cost budgeted with when it cannot be measured.
pub const FALLBACK_HIT_COST_US: f64 = 20.0;

pub struct Options {
    pub duration: Option<Duration>,
    /// `--budget` as a share of one CPU (lock and map probes split it);
    /// None for `unlimited`.
    pub budget_total: Option<f64>,
    /// Probe the RETs of the lock-wait functions too, to time each wait.
    pub wait_time: bool,
    /// Budget with the hit cost measured on this host at start, not the
    /// configs' figure (which `--hit-cost-us` set).
    pub measure_hit_cost: bool,
    pub locks: governor::Config,
    /// None: map writes are not watched.
    pub maps: Option<governor::Config>,
    /// CAS retries: the governor's config and the `--cas-scope` spec;
    /// None: not counted.
    pub cas: Option<(governor::Config, String)>,
    pub outputs: Outputs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Duration,
    /// By SIGINT or SIGTERM (the signal, for `run` to pass on).
    Interrupted(i32),
    TargetExited,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Duration => "duration",
            End::Interrupted(_) => "interrupted",
            End::TargetExited => "target-exited",
        }
    }
}

/// What a spawned target (`map-probe run`) needs from the loop.
pub trait Child {
    /// Some(exit code) once the child has exited.
    fn exited(&mut self) -> Option<i32>;
}

pub struct Plans {
    pub locks: Plan,
    pub maps: Option<Plan>,
    pub fatal: Plan,
    pub cas: Option<cas::CasPlan>,
}

impl Plans {
    pub fn all(&self) -> Vec<&Plan> {
        let mut v = vec![&self.locks, &self.fatal];
        v.extend(self.maps.as_ref());
        if let Some(c) = &self.cas {
            v.push(&c.plan);
            if !c.fail.points.is_empty() {
                v.push(&c.fail);
            }
        }
        v
    }
}

pub struct Outcome {
    pub end: End,
    pub report: Report,
    /// The target, handed back (the probes are gone by now).
    pub target: Target,
}

/// The share of `--budget` the CAS probes get when there is a CAS in scope
/// (taken evenly from the lock and map-write probes' halves).
pub const CAS_BUDGET_SHARE: f64 = 0.25;
/// The share when the code in scope has atomic writes but no CAS: their
/// probes only find the words for false sharing.
pub const ATOMIC_BUDGET_SHARE: f64 = 0.1;
/// Of the CAS share, what the failure-block probes get.
pub const CAS_FAIL_SHARE: f64 = 0.5;

/// How often the loop looks at the counters: as often as every 2 ms while a
/// window runs hot, since a hot path (a map write at ~100k calls/s) costs the
/// target a millisecond of traps every few milliseconds the window stays
/// open; every 20 ms when nothing is open or what is open is quiet (see
/// `Governor::next_look`).
const TICK_OPEN_MIN: Duration = Duration::from_millis(2);
const TICK_CLOSED: Duration = Duration::from_millis(20);
/// A windowed lock tier plants its end probes in one window of this many.
/// An end fires once the lock is taken, so its trap lengthens the critical
/// section of a lock others queue on and every waiter waits it out: on the
/// bench's cache lock (~2,600 waits/s unprobed, ~25 goroutines queued) its
/// point hit 19,000-23,000 times a second while entries and ends were in,
/// and kept always in, its waits reached ~15,000/s. Entries trap before the wait, on the
/// waiter alone. Counts come from every window; wait time from a sample.
const ENDS_EVERY: u32 = 8;
/// How often the loop checks that the target still lives, and passes on
/// what the eBPF programs logged.
const ALIVE_EVERY: Duration = Duration::from_millis(50);
/// A steady point is moved out when its hits beyond its measured rate are
/// at least this many, and this share of all such excess in the tier.
const EVICT_MIN_HITS: f64 = 8.0;
const EVICT_SHARE: f64 = 0.2;
/// The steady tier closes whole only when, with no point to blame, it costs
/// this share of the whole lock budget: its own share is what its points
/// cost when last measured, which any noise exceeds, and re-planting every
/// point is what costs the target.
const STEADY_CLOSE_OVER: f64 = 1.0;
/// ... judged over at least this long since the last re-sort.
const STEADY_JUDGED_OVER: Duration = Duration::from_millis(200);
/// Steady evictions are looked for at most this often.
const EVICT_EVERY: Duration = Duration::from_millis(50);

/// A governed probe set: its purpose, its governor and which counters feed it.
struct Governed {
    purpose: Purpose,
    /// Lock waits: 0 steady, 1 windowed (see `tiers`).
    tier: u8,
    gov: Governor,
    counters: Vec<u32>,
    /// The steady lock tier went over its budget: move its hot points out
    /// rather than unplant them all (see `Observation::evict_hot`).
    evict: bool,
}

impl Governed {
    fn hits(&self, stats: &[u64]) -> u64 {
        self.counters.iter().map(|&c| stats[c as usize]).sum()
    }

    fn step(&mut self, probes: &mut Probes, now: Instant, stats: &[u64]) -> Result<()> {
        match self.gov.tick(now, self.hits(stats)) {
            Decision::Attach => {
                let a = Instant::now();
                probes.attach_with(self.slot(), self.ends_now())?;
                log::debug!(
                    "{:?} tier {} attached in {:?}",
                    self.purpose,
                    self.tier,
                    a.elapsed()
                );
                self.gov.attached_at(a, Instant::now(), self.hits(stats));
            }
            Decision::Detach if self.keeps_planted() => self.evict = true,
            Decision::Detach => self.close(probes)?,
            Decision::Stay => {}
        }
        Ok(())
    }

    /// The steady lock tier, governed: its points stay planted.
    fn keeps_planted(&self) -> bool {
        self.purpose == Purpose::LockWait && self.tier == 0 && self.gov.config().budget.is_some()
    }

    /// Whether the window about to open plants the end probes too.
    fn ends_now(&self) -> bool {
        self.purpose != Purpose::LockWait
            || self.tier == 0
            || self.gov.windows.is_multiple_of(ENDS_EVERY)
    }

    fn slot(&self) -> Slot {
        Slot {
            purpose: self.purpose,
            tier: self.tier,
        }
    }

    fn close(&mut self, probes: &mut Probes) -> Result<()> {
        let d = Instant::now();
        probes.detach(self.slot())?;
        let end = Instant::now();
        let hits = self.hits(&probes.stats()?);
        log::debug!(
            "{:?} tier {} detached in {:?}, hits {hits}",
            self.purpose,
            self.tier,
            end - d
        );
        self.gov.detached_at(d, end, hits);
        Ok(())
    }
}

/// What one governor step found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Call `tick` again after this long.
    Next(Duration),
    /// The target is gone (exited, or died while a probe went in).
    Gone,
}

/// Where the last interval ended: what `interval` subtracts.
struct Mark {
    at: Instant,
    unix_nanos: u64,
    /// Attached time per governed set, and windows opened, at `at`.
    attached: Vec<Duration>,
    windows: Vec<u32>,
    stats: [u64; stat::COUNT as usize],
    /// Kernel site entries as last read, by (probe, stack id, caller).
    sites: HashMap<(u32, i32, u64), KeyData>,
    /// Risks already reported, by identity, with the count then.
    risks: HashMap<String, u64>,
    /// Each lock point's estimated entry hits, their variance and the raw
    /// hits at `at`.
    points: Vec<(f64, f64, u64)>,
    /// The CAS counters as last read.
    cas: cas::Raw,
}

pub struct Observation {
    pub target: Target,
    plans: Plans,
    probes: Probes,
    sets: Vec<Governed>,
    tiers: Tiers,
    /// What all lock tiers together may cost (share of one CPU).
    lock_budget: f64,
    start: Instant,
    clock: Clock,
    mark: Mark,
    /// `--duration` and `--budget`, as the reports state them.
    requested: Option<Duration>,
    budget_total: Option<f64>,
    /// Delete kernel site entries that stayed idle for a whole interval
    /// (the agent: the fixed-size map must not fill over days).
    pub evict_idle: bool,
    logs_flushed: Instant,
    /// Every lock point's hits (entries, ends) when last read, and when.
    point_mark: (Vec<u64>, Vec<u64>, Instant),
    /// The steady tier's hits then.
    steady_mark: u64,
    evictions: u32,
    evict_tried: Instant,
    /// map-probe's CPU time when the observation began.
    cpu_at_start: Duration,
}

/// CPU time of this process, of its reaped children and of the planter that
/// makes and removes its links (`links`).
pub fn self_cpu() -> Duration {
    let of = |who| {
        // SAFETY: getrusage fills the struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return Duration::ZERO;
        }
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    of(libc::RUSAGE_SELF) + of(libc::RUSAGE_CHILDREN) + crate::links::planter_cpu()
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Observation {
    /// Starts governing `probes` (loaded and, for `run`, maybe already
    /// attached) on `target`.
    pub fn new(target: Target, plans: Plans, probes: Probes, opts: &Options) -> Observation {
        let start = Instant::now();
        let clock = Clock::now();
        let measured = probes.trap_cost;
        // CAS probes, where the binary has CAS sites in scope, take their
        // share (`CAS_BUDGET_SHARE`) from the lock and map-write probes;
        // atomic writes alone (for false sharing) take less.
        let cas_share = match &plans.cas {
            Some(c) if opts.cas.is_some() && probes.has(Purpose::Cas) => {
                if c.cas_points() > 0 {
                    CAS_BUDGET_SHARE
                } else {
                    ATOMIC_BUDGET_SHARE
                }
            }
            _ => 0.0,
        };
        let costed = |mut c: governor::Config| {
            if let Some(m) = measured {
                c.hit_cost = m * crate::calibrate::HIT_COST_PER_TRAP;
            }
            c.budget = c.budget.map(|b| b * (1.0 - cas_share));
            c
        };
        // Every lock point starts steady, with the whole lock budget; the
        // first re-sort (`tiers`) hands the windowed tiers their shares.
        let lock_cfg = costed(opts.locks);
        let mut sets: Vec<Governed> = (0..LOCK_TIERS)
            .map(|t| {
                let mut gov = Governor::new(lock_cfg, start);
                // The steady tier's window costs at most a second of its
                // budget too: a point that heats up in it (a lock that
                // contends once load arrives) traps at its full rate, each
                // end trap inside the critical section of a lock others
                // queue on, until the tier closes and the re-sort moves it.
                if let Some(b) = lock_cfg.budget {
                    gov.set_budget(b);
                }
                Governed {
                    purpose: Purpose::LockWait,
                    tier: t as u8,
                    gov,
                    counters: vec![tier_stat(t, false), tier_stat(t, true)],
                    evict: false,
                }
            })
            .collect();
        if let (Some(cfg), true) = (opts.maps, probes.has(Purpose::MapWrite)) {
            sets.push(Governed {
                purpose: Purpose::MapWrite,
                tier: 0,
                gov: Governor::new(costed(cfg), start),
                counters: vec![stat::MAP_HITS, stat::MAP_RET_HITS],
                evict: false,
            });
        }
        if let (Some((cfg, _)), true) = (&opts.cas, probes.has(Purpose::Cas)) {
            let cfg = governor::Config {
                hit_cost: measured
                    .map_or(cfg.hit_cost, |m| m * crate::calibrate::HIT_COST_PER_TRAP),
                budget: cfg.budget.map(|b| b * cas_share / CAS_BUDGET_SHARE),
                ..*cfg
            };
            // The failure blocks, where there are any, take their share of
            // the CAS budget: they trap only on failures, so it mostly keeps
            // them in for the whole run.
            let fail = probes.has(Purpose::CasFail);
            let share = |s: f64| governor::Config {
                budget: cfg.budget.map(|b| b * s),
                ..cfg
            };
            sets.push(Governed {
                purpose: Purpose::Cas,
                tier: 0,
                gov: Governor::new(share(if fail { 1.0 - CAS_FAIL_SHARE } else { 1.0 }), start),
                counters: vec![stat::CAS_HITS, stat::ATOMIC_HITS],
                evict: false,
            });
            if fail {
                sets.push(Governed {
                    purpose: Purpose::CasFail,
                    tier: 0,
                    gov: Governor::new(share(CAS_FAIL_SHARE), start),
                    counters: vec![stat::CAS_FAIL_HITS],
                    evict: false,
                });
            }
        }
        for s in &mut sets {
            if probes.attached(s.slot()) {
                // `run` opened the first windows before the program's first instruction.
                s.gov.attached_at(start, start, 0);
            }
        }
        let mark = Mark {
            at: start,
            unix_nanos: unix_nanos(),
            attached: vec![Duration::ZERO; sets.len()],
            windows: vec![0; sets.len()],
            stats: [0; stat::COUNT as usize],
            sites: HashMap::new(),
            risks: HashMap::new(),
            points: Vec::new(),
            cas: cas::Raw::default(),
        };
        let tiers = Tiers::new(
            plans.locks.points.iter().map(|p| p.ends_at).collect(),
            start,
        );
        let lock_budget = lock_cfg.budget.unwrap_or(0.0);
        Observation {
            lock_budget,
            target,
            plans,
            probes,
            sets,
            tiers,
            start,
            clock,
            mark,
            requested: opts.duration,
            budget_total: opts.budget_total,
            evict_idle: false,
            logs_flushed: start,
            point_mark: (Vec::new(), Vec::new(), start),
            steady_mark: 0,
            evictions: 0,
            evict_tried: start,
            cpu_at_start: self_cpu(),
        }
    }

    pub fn alive(&self) -> bool {
        self.target.alive()
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// One governor step for every probe set.
    pub fn tick(&mut self, now: Instant) -> Result<Step> {
        if now.duration_since(self.logs_flushed) >= ALIVE_EVERY {
            self.logs_flushed = now;
            self.probes.flush_logs();
        }
        let stats = self.probes.stats()?;
        let steady_was_open = self.sets[0].gov.is_open();
        for s in &mut self.sets {
            if let Err(e) = s.step(&mut self.probes, now, &stats) {
                // The target may have exited between the check and the attach.
                if !self.target.alive() {
                    return Ok(Step::Gone);
                }
                return Err(e);
            }
        }
        if std::mem::take(&mut self.sets[0].evict) {
            // Reading every point's hits costs map-probe a syscall a point.
            let evicted = if now.saturating_duration_since(self.evict_tried) >= EVICT_EVERY {
                self.evict_tried = now;
                match self.evict_hot(now) {
                    Ok(e) => e,
                    Err(_) if !self.target.alive() => return Ok(Step::Gone),
                    Err(e) => return Err(e),
                }
            } else {
                false
            };
            let hits = self.sets[0].hits(&self.probes.stats()?);
            // No point stood out: the tier as a whole ran over. Noise is
            // kept (the next re-sort re-weighs every point); a tier far over
            // since the last re-sort is closed, as any governed set is.
            let over = self.steady_overspend(now, hits);
            if evicted || over < STEADY_CLOSE_OVER {
                self.sets[0].gov.keep(Instant::now(), hits);
            } else if let Err(e) = self.sets[0].close(&mut self.probes) {
                if !self.target.alive() {
                    return Ok(Step::Gone);
                }
                return Err(e);
            }
        }
        // Re-sort the lock points now and then, and at once when the steady
        // tier had to close: a hot point in it spent the tier's budget.
        let steady_closed = steady_was_open && !self.sets[0].gov.is_open();
        let soon = self.tiers.next_rebalance - tiers::REBALANCE_EVERY + tiers::REBALANCE_MIN;
        if self.sets[0].gov.config().budget.is_some()
            && (now >= self.tiers.next_rebalance || (steady_closed && now >= soon))
        {
            if let Err(e) = self.rebalance(now) {
                if !self.target.alive() {
                    return Ok(Step::Gone);
                }
                return Err(e);
            }
        }
        let now = Instant::now();
        let look = self
            .sets
            .iter()
            .filter_map(|s| s.gov.next_look(now, s.hits(&stats)))
            .min()
            .unwrap_or(TICK_CLOSED);
        Ok(Step::Next(look.clamp(TICK_OPEN_MIN, TICK_CLOSED)))
    }

    /// The steady tier spent its window's budget: finds the points whose
    /// hits since the last read far exceed what their measured rate
    /// predicts (a lock that began to contend) and re-sorts with them at
    /// the rate they just showed, so only their chunks are re-planted.
    /// False when no point stands out (the whole tier warmed): the caller
    /// closes the tier as before.
    fn evict_hot(&mut self, now: Instant) -> Result<bool> {
        let Some(since) = self.sets[0].gov.judged_since() else {
            return Ok(false);
        };
        let (entries, ends) = self.probes.point_hits()?;
        let (e0, n0, at) = &self.point_mark;
        let dt = now.saturating_duration_since(*at).as_secs_f64();
        let window = now
            .saturating_duration_since(since)
            .max(Duration::from_millis(5))
            .as_secs_f64();
        let tiers = self.probes.tiers().to_vec();
        // Each steady point's entry and end hits since the last re-sort.
        let since = |i: usize| {
            (
                entries[i].saturating_sub(e0.get(i).copied().unwrap_or(0)) as f64,
                ends[i].saturating_sub(n0.get(i).copied().unwrap_or(0)) as f64,
            )
        };
        let steady: Vec<usize> = (0..entries.len())
            .filter(|&i| tiers.get(i) == Some(&0))
            .collect();
        let mut excess: Vec<(usize, f64, f64)> = steady
            .iter()
            .map(|&i| {
                let (de, dn) = since(i);
                let expected = self.tiers.rate(i) * dt;
                let share = de / (de + dn).max(1.0);
                let x = (de + dn - expected).max(0.0);
                (i, x * share, x * (1.0 - share))
            })
            .filter(|&(_, e, n)| e + n >= EVICT_MIN_HITS)
            .collect();
        let total: f64 = excess.iter().map(|&(_, e, n)| e + n).sum();
        excess.retain(|&(_, e, n)| e + n >= total * EVICT_SHARE);
        if excess.is_empty() {
            if self.steady_overspend(now, self.sets[0].hits(&self.probes.stats()?))
                < STEADY_CLOSE_OVER
            {
                return Ok(false);
            }
            // Far over with no point standing out: weigh every steady point
            // by its hits since the last re-sort alone.
            excess = steady
                .iter()
                .map(|&i| {
                    let (de, dn) = since(i);
                    (i, de * window / dt.max(1e-3), dn * window / dt.max(1e-3))
                })
                .filter(|&(_, e, n)| e + n > 0.0)
                .collect();
        }
        let time = self.tier_time(now);
        for &(i, e, n) in &excess {
            self.tiers
                .heat(i, (e / window, n / window), (entries[i], ends[i]), &time);
        }
        log::debug!(
            "steady tier over budget: moving out {:?}",
            excess.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        let before = self.probes.tiers().to_vec();
        self.rebalance_with(now, entries, ends)?;
        let moved = self.probes.tiers() != before.as_slice();
        self.evictions += u32::from(moved);
        Ok(moved)
    }

    /// The steady tier's cost since the last re-sort over what every lock
    /// tier together may cost; 0 until that stretch is long enough to judge.
    fn steady_overspend(&self, now: Instant, hits: u64) -> f64 {
        let cfg = self.sets[0].gov.config();
        let dt = now.saturating_duration_since(self.point_mark.2);
        let Some(b) = cfg
            .budget
            .map(|_| self.lock_budget)
            .filter(|&b| b > 0.0 && dt >= STEADY_JUDGED_OVER)
        else {
            return 0.0;
        };
        let n = hits.saturating_sub(self.steady_mark) as f64;
        n * cfg.hit_cost.as_secs_f64() / dt.as_secs_f64() / b
    }

    /// Each lock tier's time in so far: its entries' and its ends'.
    fn tier_time(&self, now: Instant) -> tiers::TierTime {
        tiers::TierTime {
            entries: self.tier_attached(now),
            ends: self.sets[..LOCK_TIERS]
                .iter()
                .map(|s| self.probes.ends_attached(s.slot(), now))
                .collect(),
        }
    }

    /// Each lock tier's attached time so far.
    fn tier_attached(&self, now: Instant) -> Vec<Duration> {
        self.sets[..LOCK_TIERS]
            .iter()
            .map(|s| s.gov.attached_time(now))
            .collect()
    }

    fn rebalance(&mut self, now: Instant) -> Result<()> {
        let (entries, ends) = self.probes.point_hits()?;
        self.rebalance_with(now, entries, ends)
    }

    /// `rebalance` with every point's running entry and end hits read just
    /// now (an eviction has read them already: a syscall a point).
    fn rebalance_with(&mut self, now: Instant, entries: Vec<u64>, ends: Vec<u64>) -> Result<()> {
        self.tiers.next_rebalance = now + tiers::REBALANCE_EVERY;
        self.point_mark = (entries.clone(), ends.clone(), now);
        // The estimator's slots end where points may move.
        self.tiers.close_slot(
            &entries,
            &self.tier_attached(now),
            now.saturating_duration_since(self.start),
        );
        self.steady_mark = self.sets[0].hits(&self.probes.stats()?);
        let cfg = *self.sets[0].gov.config();
        if cfg.budget.is_none() {
            return Ok(());
        }
        let time = self.tier_time(now);
        let Some(a) =
            self.tiers
                .rebalance((&entries, &ends), &time, self.lock_budget, cfg.hit_cost)
        else {
            return Ok(());
        };
        log::debug!(
            "lock tiers re-sorted: {:?}, budgets {:?}",
            a.tiers,
            a.budgets
        );
        for (t, b) in a.budgets.iter().enumerate() {
            self.sets[t].gov.set_budget(*b);
        }
        let relink = Instant::now();
        let changed = self.probes.set_tiers(&a.tiers)?;
        for (tier, moved) in changed.iter().enumerate() {
            if !*moved {
                continue;
            }
            let slot = self.sets[tier].slot();
            // A tier that was empty while its governor was open gets its
            // probes now; one that was closed opens at the next tick.
            if self.sets[tier].gov.is_open() && !self.probes.attached(slot) {
                self.probes.attach_with(slot, self.sets[tier].ends_now())?;
            }

            let hits = self.sets[tier].hits(&self.probes.stats()?);
            if self.sets[tier].keeps_planted() && self.probes.attached(slot) {
                // Only the chunks that changed were re-planted: the tier
                // stays in, judged afresh from now.
                self.sets[tier].gov.keep(Instant::now(), hits);
            } else {
                self.sets[tier].gov.restart(relink, Instant::now(), hits);
            }
        }
        Ok(())
    }

    /// Each lock point's estimated entry hits (see `tiers::Strata`) and
    /// raw ones, now.
    fn point_estimates(&self, now: Instant) -> Result<Vec<(f64, f64, u64)>> {
        let (entries, _) = self.probes.point_hits()?;
        let wall = now.saturating_duration_since(self.start);
        Ok(self
            .tiers
            .estimates(&entries, &self.tier_attached(now), wall)
            .into_iter()
            .zip(&entries)
            .map(|((e, v), &h)| (e, v, h))
            .collect())
    }

    /// Each lock point's scale, estimated over raw hits since `since` (the
    /// run's start when None), and its error factor: the estimate's error
    /// over a Poisson count of its raw hits. 1 and 1 when unbudgeted or
    /// never hit.
    fn point_scales(
        &self,
        now: &[(f64, f64, u64)],
        since: Option<&[(f64, f64, u64)]>,
    ) -> Vec<PointScale> {
        let governed = self.sets[0].gov.config().budget.is_some();
        now.iter()
            .enumerate()
            .map(|(i, &(e, v, h))| {
                let (e0, v0, h0) = since
                    .and_then(|s| s.get(i).copied())
                    .unwrap_or((0.0, 0.0, 0));
                let raw = h.saturating_sub(h0);
                let (est, var) = (e - e0, (v - v0).max(0.0));
                if !governed || raw == 0 || est <= 0.0 {
                    return PointScale::default();
                }
                PointScale {
                    scale: (est / raw as f64).max(1.0),
                    // sqrt(var)/est against 1/sqrt(raw).
                    error: ((var * raw as f64).sqrt() / est).max(1.0),
                }
            })
            .collect()
    }

    /// Closes every open window (the crash watch stays until drop).
    pub fn close(&mut self) -> Result<()> {
        for s in &mut self.sets {
            s.close(&mut self.probes)?;
        }
        self.probes.flush_logs();
        Ok(())
    }

    /// The whole run so far.
    pub fn snapshot(&self, end: End) -> Result<Report> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.start);
        let stats = self.probes.stats()?;
        let raw = aggregate::collect(&self.probes)?;
        let locks = &self.sets[0].gov;
        let scale = locks.scale(elapsed, now);
        let scales = self.point_scales(&self.point_estimates(now)?, None);
        let mut sym = Symbolizer::new(&self.target.bin, self.target.bias);
        let risks = risks::collect(&self.probes, self.plans.maps.as_ref(), &mut sym, self.clock)?;
        let attached: Vec<Duration> = self
            .sets
            .iter()
            .map(|s| s.gov.attached_time(now).min(elapsed))
            .collect();
        let windows: Vec<u32> = self.sets.iter().map(|s| s.gov.windows).collect();
        let start_unix = self.clock_start_unix();
        Ok(self.build(Span {
            sym: &mut sym,
            raw: &raw,
            stats: &stats,
            start_unix,
            elapsed,
            attached: &attached,
            windows: &windows,
            scale,
            scales: &scales,
            end: end.as_str(),
            risks,
            cas: self.read_cas()?,
        }))
    }

    fn read_cas(&self) -> Result<cas::Raw> {
        match self.plans.cas {
            Some(_) => cas::Raw::read(&self.probes),
            None => Ok(cas::Raw::default()),
        }
    }

    /// What happened since the last call (or the start): sites with their
    /// waits in this interval, risks that are new or recurred, counters as
    /// deltas. `end` is None while the observation goes on.
    pub fn interval(&mut self, end: Option<End>) -> Result<Report> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.mark.at);
        let stats = self.probes.stats()?;
        let mut delta_stats = stats;
        for (d, p) in delta_stats.iter_mut().zip(self.mark.stats.iter()) {
            *d = d.saturating_sub(*p);
        }
        let (raw, idle) = self.site_deltas()?;
        if self.evict_idle && !idle.is_empty() {
            for k in &idle {
                self.mark.sites.remove(&(k.probe, k.stack_id, k.caller));
            }
            self.probes.remove_sites(&idle)?;
        }
        let attached_now: Vec<Duration> =
            self.sets.iter().map(|s| s.gov.attached_time(now)).collect();
        let windows_now: Vec<u32> = self.sets.iter().map(|s| s.gov.windows).collect();
        let attached: Vec<Duration> = attached_now
            .iter()
            .zip(&self.mark.attached)
            .map(|(n, p)| n.saturating_sub(*p).min(elapsed))
            .collect();
        let windows: Vec<u32> = windows_now
            .iter()
            .zip(&self.mark.windows)
            .map(|(n, p)| n.saturating_sub(*p))
            .collect();
        let governed = self.sets[0].gov.config().budget.is_some();
        let scale = if !governed || attached[0].is_zero() {
            1.0
        } else {
            (elapsed.as_secs_f64() / attached[0].as_secs_f64()).max(1.0)
        };
        let points_now = self.point_estimates(now)?;
        let scales = self.point_scales(&points_now, Some(&self.mark.points));
        let mut sym = Symbolizer::new(&self.target.bin, self.target.bias);
        let all = risks::collect(&self.probes, self.plans.maps.as_ref(), &mut sym, self.clock)?;
        let risks = new_risks(&mut self.mark.risks, all);
        let start_unix = self.mark.unix_nanos;
        let cas_now = self.read_cas()?;
        let report = self.build(Span {
            sym: &mut sym,
            raw: &raw,
            stats: &delta_stats,
            start_unix,
            elapsed,
            attached: &attached,
            windows: &windows,
            scale,
            scales: &scales,
            end: end.map_or("running", End::as_str),
            risks,
            cas: cas_now.since(&self.mark.cas),
        });
        self.mark.cas = cas_now;
        self.mark.points = points_now;
        self.mark.at = now;
        self.mark.unix_nanos = start_unix + elapsed.as_nanos() as u64;
        self.mark.attached = attached_now;
        self.mark.windows = windows_now;
        self.mark.stats = stats;
        Ok(report)
    }

    /// Kernel sites with their growth since the last interval, and the keys
    /// that did not grow.
    fn site_deltas(&mut self) -> Result<(Vec<RawSite>, Vec<SiteKey>)> {
        let mut raw = Vec::new();
        let mut idle = Vec::new();
        for (key, now) in aggregate::read(&self.probes)? {
            let id = (key.probe, key.stack_id, key.caller);
            let d = match self.mark.sites.get(&id) {
                Some(prev) => now.since(prev),
                None => now.clone(),
            };
            self.mark.sites.insert(id, now);
            if d.stats.count == 0 && d.stats.timed == 0 {
                idle.push(key);
                continue;
            }
            if d.stats.count == 0 {
                continue;
            }
            raw.push(aggregate::raw_site(&self.probes, &key, d));
        }
        Ok((raw, idle))
    }

    fn clock_start_unix(&self) -> u64 {
        // The mark started at `start` with the same clock reading.
        let since = self.mark.at.duration_since(self.start).as_nanos() as u64;
        self.mark.unix_nanos.saturating_sub(since)
    }

    fn build(&self, mut s: Span) -> Report {
        let target = &self.target;
        let sites::Built {
            sites,
            stacks,
            incomplete,
            lock_words,
        } = sites::build_sites(
            s.raw,
            &self.plans.locks.points,
            s.sym,
            s.scales,
            self.target.bin.main_module(),
            s.elapsed.as_secs_f64(),
        );
        let totals = aggregate::totals(s.stats);
        let cfg = self.sets[0].gov.config();
        let map_writes = self
            .sets
            .iter()
            .zip(s.attached.iter().zip(s.windows))
            .find(|(set, _)| set.purpose == Purpose::MapWrite)
            .map(|(set, (attached, windows))| MapSampling {
                attached_secs: attached.as_secs_f64(),
                windows: *windows,
                raw_hits: s.stats[stat::MAP_HITS as usize],
                raw_ret_hits: s.stats[stat::MAP_RET_HITS as usize],
                budget_cpu_percent: set.gov.config().budget.map(|b| b * 100.0),
                window_ms: set.gov.config().window.as_millis() as u64,
                last_rate_per_sec: set.gov.last_rate,
                unmatched_rets: s.stats[stat::MAP_RET_UNMATCHED as usize],
                overlap_candidates: s.stats[stat::OVERLAP_CANDIDATES as usize],
            });
        let (cas_sampling, built) = self.build_cas(&mut s);
        let false_sharing = {
            let sym = &*s.sym;
            false_sharing::find(built.words.into_iter().chain(lock_words).collect(), |a| {
                sym.data(a)
            })
        };
        let mut drops = totals.drops;
        drops.stack_incomplete = incomplete;
        let mut points = [0usize; LOCK_TIERS];
        for &t in self.probes.tiers() {
            points[usize::from(t) % LOCK_TIERS] += 1;
        }
        let lock_tiers: Vec<LockTier> = (0..LOCK_TIERS)
            .filter(|&t| points[t] > 0)
            .map(|t| LockTier {
                tier: t as u8,
                points: points[t],
                attached_secs: s.attached[t].as_secs_f64(),
                windows: s.windows[t],
                budget_cpu_percent: self.sets[t].gov.config().budget.map(|b| b * 100.0),
            })
            .collect();
        Report {
            target: TargetInfo {
                pid: target.pid,
                exe: target.exe.display().to_string(),
                go_version: target.go_version().to_string(),
                module: target.bin.main_module().map(str::to_string),
                stripped: !target.bin.has_symtab(),
                pie: target.bin.is_pie(),
                build_id: target.bin.build_id().map(str::to_string),
                text_mapping: {
                    let (vaddr, offset, memsz) = target.bin.exec_segment();
                    let start = vaddr.wrapping_add(target.bias);
                    (start, start.wrapping_add(memsz), offset)
                },
            },
            sampling: Sampling {
                requested_secs: self.requested.map(|d| d.as_secs_f64()),
                start_unix_nanos: s.start_unix,
                elapsed_secs: s.elapsed.as_secs_f64(),
                attached_secs: s.attached[0].as_secs_f64(),
                // Tiers holding no point open empty windows; not counted.
                windows: s.windows[0]
                    + lock_tiers
                        .iter()
                        .filter(|t| t.tier != 0)
                        .map(|t| t.windows)
                        .sum::<u32>(),
                lock_tiers,
                raw_hits: totals.hits,
                raw_ret_hits: totals.ret_hits,
                scale: s.scale,
                method: if cfg.budget.is_some() {
                    "windows: probes attached while their estimated cost fits the budget; each lock point's hits scaled slot by slot (the 2-s stretches between re-sorts) by wall/observed time, a slot never observed at the rate of those that were".into()
                } else {
                    "continuous: probes attached for the whole run (--budget unlimited); counts are raw"
                        .into()
                },
                budget_cpu_percent: self.budget_total.map(|b| b * 100.0),
                // The tiers split it; the steady tier's config holds only its part.
                lock_budget_cpu_percent: cfg.budget.map(|_| self.lock_budget * 100.0),
                hit_cost_us: cfg.hit_cost.as_secs_f64() * 1e6,
                trap_us: self.probes.trap_cost.map(|t| t.as_secs_f64() * 1e6),
                window_ms: cfg.window.as_millis() as u64,
                map_writes,
                cas: cas_sampling,
                planting: {
                    let p = self.probes.planting;
                    report::Planting {
                        points_planted: p.planted,
                        points_removed: p.removed,
                        steady_points_planted: p.steady_planted,
                        steady_points_removed: p.steady_removed,
                        steady_evictions: self.evictions,
                    }
                },
                self_cpu: {
                    let observing = self_cpu().saturating_sub(self.cpu_at_start);
                    let wall = self.start.elapsed().as_secs_f64().max(1e-9);
                    report::SelfCpu {
                        start_secs: self.cpu_at_start.as_secs_f64(),
                        observing_secs: observing.as_secs_f64(),
                        observing_percent: observing.as_secs_f64() / wall * 100.0,
                    }
                },
            },
            probes: sites::probe_hits(s.raw, &self.plans.locks.points),
            drops,
            end: s.end.into(),
            sites,
            risks: s.risks,
            cas: built.sites,
            false_sharing,
            cas_stacks: built.stacks,
            stacks,
        }
    }

    /// The CAS probes' sampling and sites (none without a CAS plan).
    fn build_cas(&self, s: &mut Span) -> (Option<CasSampling>, cas::Built) {
        let none = cas::Built {
            sites: Vec::new(),
            words: Vec::new(),
            stacks: Vec::new(),
        };
        let Some(plan) = &self.plans.cas else {
            return (None, none);
        };
        let of = |p: Purpose| {
            self.sets
                .iter()
                .zip(s.attached.iter().zip(s.windows))
                .find(|(set, _)| set.purpose == p)
                .map(|(set, (attached, windows))| {
                    let governed = set.gov.config().budget.is_some();
                    let scale = governor::scale(s.elapsed, *attached, governed);
                    (set, *attached, *windows, scale)
                })
        };
        let Some((set, attached, windows, scale)) = of(Purpose::Cas) else {
            return (None, none);
        };
        let fail = of(Purpose::CasFail);
        let governed = set.gov.config().budget.is_some();
        let built = cas::build(
            &s.cas,
            plan,
            &self.probes,
            &self.target,
            s.sym,
            &cas::Scales {
                attempts: scale,
                failures: fail.map(|f| f.3),
                elapsed_secs: s.elapsed.as_secs_f64(),
            },
        );
        let raw_hits = s.stats[stat::CAS_HITS as usize];
        let trap = self.probes.trap_cost.map_or(
            FALLBACK_HIT_COST_US / 1e6 / f64::from(crate::calibrate::HIT_COST_PER_TRAP),
            |t| t.as_secs_f64(),
        );
        let probe_bound = governed
            && !attached.is_zero()
            && raw_hits as f64 * trap / attached.as_secs_f64() >= cas::PROBE_BOUND_CPU;
        let sampling = CasSampling {
            points: plan.cas_points(),
            atomic_points: plan.points.len() - plan.cas_points(),
            raw_atomic_hits: s.stats[stat::ATOMIC_HITS as usize],
            failure_blocks: plan.fail.points.len(),
            raw_failure_block_hits: s.stats[stat::CAS_FAIL_HITS as usize],
            failure_block_attached_secs: fail.map_or(0.0, |f| f.1.as_secs_f64()),
            failure_block_windows: fail.map_or(0, |f| f.2),
            failure_block_scale: fail.map_or(1.0, |f| f.3),
            scope: plan.scope.clone(),
            attached_secs: attached.as_secs_f64(),
            windows,
            raw_hits,
            raw_failures: s.stats[stat::CAS_FAILS as usize],
            probe_bound,
            scale,
            budget_cpu_percent: set.gov.config().budget.map(|b| b * 100.0),
        };
        (Some(sampling), built)
    }

    fn status_line(&self, now: Instant, total: Option<Duration>, ui: &Ui) {
        let Ok(stats) = self.probes.stats() else {
            return;
        };
        let elapsed = now.duration_since(self.start);
        let sites = self.probes.site_count();
        let drops = stats[stat::STACK_LOST as usize] + stats[stat::AGG_FULL as usize];
        let events = stats[stat::HITS as usize];
        let of = total.map_or(String::new(), |d| format!("/{:.0}s", d.as_secs_f64()));
        let gov = &self.sets[0].gov;
        let attached = gov.attached_time(now).as_secs_f64() / elapsed.as_secs_f64().max(1e-9);
        let mut out = ui.lock();
        let _ = write!(
            out,
            "\r\x1b[Kmap-probe: {sites} sites, {events} events, {drops} drops, {:.1}s{of}, lock probes attached {:.0}%",
            elapsed.as_secs_f64(),
            attached * 100.0
        );
        let _ = out.flush();
    }
}

/// The risks not reported before, or seen again since (`seen` holds each
/// risk's count when last reported).
fn new_risks(seen: &mut HashMap<String, u64>, all: Vec<Risk>) -> Vec<Risk> {
    let mut out = Vec::new();
    for r in all {
        let writers: Vec<String> = r
            .writers
            .iter()
            .map(|w| format!("{}:{}:{}", w.function, w.file, w.line))
            .collect();
        let id = format!("{:?}|{:?}|{}", r.kind, r.map, writers.join(","));
        let before = seen.insert(id, r.count);
        if before.is_none_or(|c| c < r.count) {
            out.push(r);
        }
    }
    out
}

/// The pieces of one report besides what the observation holds.
struct Span<'a, 'b, 'c> {
    sym: &'a mut Symbolizer<'c>,
    raw: &'b [RawSite],
    stats: &'b [u64],
    start_unix: u64,
    elapsed: Duration,
    attached: &'b [Duration],
    windows: &'b [u32],
    scale: f64,
    /// Per lock point: what its raw counts are multiplied by.
    scales: &'b [PointScale],
    end: &'static str,
    risks: Vec<Risk>,
    cas: cas::Raw,
}

/// Decides every probe point for the target's Go version and loads the
/// programs. The crash watch (fatal errors and the SIGURG stacks) goes in at
/// once and stays: it costs nothing until the target is dying.
pub fn prepare(target: &Target, opts: &Options, host: &Host) -> Result<(Plans, Probes)> {
    let mut locks = catalog::plan(&target.bin, Purpose::LockWait)?;
    if !opts.wait_time {
        locks.points.iter_mut().for_each(|p| p.ret_offsets.clear());
    }
    let maps = match opts.maps {
        Some(_) => Some(catalog::plan(&target.bin, Purpose::MapWrite)?),
        None => None,
    };
    let fatal = catalog::plan(&target.bin, Purpose::Fatal)?;
    for m in locks.missing.iter().chain(fatal.missing.iter()) {
        log::info!("{m} is not in this binary (nothing in it can get there)");
    }
    if locks.points.is_empty() && maps.as_ref().is_none_or(|m| m.points.is_empty()) {
        bail!(
            "{} ({}) has no sync lock wait path or map write to probe",
            target.exe.display(),
            target.go_version()
        );
    }
    let cas = opts.cas.as_ref().map(|(_, spec)| {
        let plan = cas::plan(&target.bin, &cas::Scope::parse(spec, &target.bin));
        log::info!(
            "{} CAS instruction(s) in scope {:?} ({} left unprobed, {} with a failure-only block), and {} other atomic write(s)",
            plan.cas_points(),
            plan.scope,
            plan.skipped,
            plan.fail.points.len(),
            plan.points.len() - plan.cas_points()
        );
        plan
    });
    let cas = cas.filter(|c| !c.points.is_empty());
    let plans = Plans {
        locks,
        maps,
        fatal,
        cas,
    };
    let mut probes = Probes::load(
        target.pid,
        target.open_path.clone(),
        target.bin.go_version(),
        &plans.all(),
        UprobeMode::for_host(),
    )?;
    if let Some(c) = &plans.cas {
        probes.set_cas_operands(&c.operands)?;
        probes.set_cas_fail_of(&c.fail_of)?;
    }
    // The PID must still name the process that was read (not a new one
    // that reused its number) as the probes go in.
    if !target.alive() {
        bail!("PID {} exited before map-probe attached", target.pid);
    }
    if opts.measure_hit_cost {
        match crate::calibrate::once(&mut probes) {
            Ok(c) => probes.trap_cost = Some(c),
            Err(e) => eprintln!(
                "map-probe: warning: {e:#}; budgeting with {FALLBACK_HIT_COST_US} µs per hit"
            ),
        }
    }
    if let Err(e) = probes.attach(Purpose::Fatal) {
        if !target.alive() {
            bail!("PID {} exited while map-probe was attaching", target.pid);
        }
        return Err(e);
    }
    if !host.crash_signals() {
        eprintln!(
            "map-probe: this kernel exposes no BTF: a crash will show the throwing goroutine, not the other threads' stacks"
        );
    } else if !host.task_regs() {
        eprintln!(
            "map-probe: this kernel has no bpf_task_pt_regs (Linux 5.15): a crash will show the throwing goroutine, not the other threads' stacks"
        );
    } else if let Err(e) = probes.attach_crash_signals() {
        log::warn!("{e}: a crash will show the throwing goroutine only");
    }
    Ok((plans, probes))
}

/// Windows must close on time even when the target saturates every CPU: a
/// late tick is paid for by the target, in traps.
pub fn raise_priority() {
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) };
}

/// The one-target loop of `attach` and `run`: until the duration ends, a
/// signal arrives or the target exits. With an exporter, every `interval`
/// (and the last stretch at the end) goes out over OTLP too.
pub fn observe(
    target: Target,
    plans: Plans,
    probes: Probes,
    opts: &Options,
    mut child: Option<&mut dyn Child>,
    export: Option<(&Exporter, Duration)>,
) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut obs = Observation::new(target, plans, probes, opts);
    let ui = opts.outputs.ui();
    let tty = ui.is_terminal();
    raise_priority();
    let start = Instant::now();
    let end = rt.block_on(async {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut next_tick = TICK_CLOSED;
        let mut last_status = start;
        let mut last_alive = start;
        let mut last_export = start;
        let end = loop {
            tokio::select! {
                _ = int.recv() => break End::Interrupted(libc::SIGINT),
                _ = term.recv() => break End::Interrupted(libc::SIGTERM),
                _ = tokio::time::sleep(next_tick) => {}
            }
            let now = Instant::now();
            // Reading /proc on every 2-5 ms tick cost map-probe a sixth of
            // its own CPU (idle target, 8 s: 0.71 s of CPU, 0.59 s without,
            // taken from the target at nice -10); an exit found 50 ms late
            // costs nothing, the probes die with the target.
            let exited = match child.as_deref_mut() {
                Some(c) => c.exited().is_some(),
                None if now.duration_since(last_alive) >= ALIVE_EVERY => {
                    last_alive = now;
                    !obs.alive()
                }
                None => false,
            };
            if exited {
                break End::TargetExited;
            }
            if opts
                .duration
                .is_some_and(|d| now.duration_since(start) >= d)
            {
                break End::Duration;
            }
            match obs.tick(now)? {
                Step::Next(d) => next_tick = d,
                Step::Gone => break End::TargetExited,
            }
            if let Some((ex, every)) = export {
                if now.duration_since(last_export) >= every {
                    last_export = now;
                    ex.send(obs.interval(None)?);
                }
            }
            if tty && now.duration_since(last_status) >= Duration::from_millis(250) {
                last_status = now;
                obs.status_line(now, opts.duration, &ui);
            }
        };
        anyhow::Ok(end)
    })?;
    obs.close()?;
    if tty {
        let _ = write!(ui.lock(), "\r\x1b[K");
    }
    if let Some((ex, _)) = export {
        ex.send(obs.interval(Some(end))?);
    }
    let report = obs.snapshot(end)?;
    let Observation { target, .. } = obs;
    Ok(Outcome {
        end,
        report,
        target,
    })
}

/// Where the table and the live status go: stdout, or stderr when the JSON
/// report is written to stdout.
pub enum Ui {
    Stdout,
    Stderr,
}

impl Ui {
    pub fn is_terminal(&self) -> bool {
        match self {
            Ui::Stdout => std::io::stdout().is_terminal(),
            Ui::Stderr => std::io::stderr().is_terminal(),
        }
    }

    pub fn lock(&self) -> Box<dyn Write + '_> {
        match self {
            Ui::Stdout => Box::new(std::io::stdout().lock()),
            Ui::Stderr => Box::new(std::io::stderr().lock()),
        }
    }
}

fn is_stdout(p: &Path) -> bool {
    p == Path::new("-")
}

impl Outputs {
    pub fn ui(&self) -> Ui {
        if self.json.as_deref().is_some_and(is_stdout) {
            Ui::Stderr
        } else {
            Ui::Stdout
        }
    }

    fn files(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        [
            ("--json", self.json.as_deref()),
            ("--folded", self.folded.as_deref()),
            ("--flamegraph", self.flamegraph.as_deref()),
            ("--pprof", self.pprof.as_deref()),
        ]
        .into_iter()
        .filter_map(|(flag, p)| Some((flag, p?)))
        .filter(|(_, p)| !is_stdout(p))
    }

    /// Fails at once, before anything is attached, on an output that could
    /// not be written at the end.
    pub fn check(&self) -> Result<()> {
        for (flag, p) in [
            ("--folded", &self.folded),
            ("--flamegraph", &self.flamegraph),
            ("--pprof", &self.pprof),
        ] {
            if p.as_deref().is_some_and(is_stdout) {
                bail!("{flag} - is not supported: only --json writes to stdout");
            }
        }
        for (flag, p) in self.files() {
            if p.is_dir() {
                bail!("{flag} {}: is a folder; give a file name", p.display());
            }
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                bail!(
                    "{flag} {}: the folder {} does not exist",
                    p.display(),
                    dir.display()
                );
            }
            let probe = dir.join(format!(".map-probe-check-{}", std::process::id()));
            match fs::File::create(&probe) {
                Ok(_) => {
                    let _ = fs::remove_file(&probe);
                }
                Err(e) => bail!(
                    "{flag} {}: cannot write in {}: {e}",
                    p.display(),
                    dir.display()
                ),
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file
/// beside it, then renamed over it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.map-probe-{}", std::process::id()));
    let res = fs::write(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.with_context(|| format!("cannot write {}", path.display()))
}

/// Writes every requested output, and the terminal table always. One that
/// fails does not stop the others; each failure is one line on stderr.
pub fn write_outputs(report: &Report, outputs: &Outputs) -> Result<()> {
    let ui = outputs.ui();
    report::terminal::print(report, outputs.top, &mut ui.lock())?;
    let mut wrote = Vec::new();
    let mut failed = Vec::new();
    let mut emit = |p: &Path, bytes: Result<Vec<u8>>| {
        let res = bytes.and_then(|b| {
            if is_stdout(p) {
                let mut out = std::io::stdout().lock();
                out.write_all(&b).and_then(|()| out.flush())?;
                Ok(())
            } else {
                write_atomic(p, &b)
            }
        });
        match res {
            Ok(()) if !is_stdout(p) => wrote.push(p.display().to_string()),
            Ok(()) => {}
            Err(e) => {
                eprintln!("map-probe: error: {e:#}");
                failed.push(p.display().to_string());
            }
        }
    };
    if let Some(p) = &outputs.json {
        emit(p, report::json::render(report));
    }
    if let Some(p) = &outputs.folded {
        emit(
            p,
            Ok(report::flamegraph::render_folded(report, outputs.weight)),
        );
    }
    if let Some(p) = &outputs.flamegraph {
        emit(p, report::flamegraph::render_svg(report, outputs.weight));
    }
    if let Some(p) = &outputs.pprof {
        emit(p, report::pprof::render(report));
    }
    if !wrote.is_empty() {
        let _ = writeln!(ui.lock(), "wrote {}", wrote.join(", "));
    }
    if !failed.is_empty() {
        bail!("could not write {}", failed.join(", "));
    }
    Ok(())
}
