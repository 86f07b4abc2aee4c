//! Which lock-wait points stay attached all the time and how often the
//! others are. One shared probe windowed by its hottest user starves every
//! cold call site of samples (a site with 10 waits/s got four raw hits in
//! 8 s). With a point per call site, the budget can be split evenly between
//! the sites that wait: a site whose share pays for all its hits stays in
//! (the *steady* tier, counted exactly), and a hotter one is windowed with
//! the duty its share buys. Sites of similar rate share a tier (duty classes
//! 1/2, 1/4, ... 1/128), each tier with its own links and governor, so every
//! site ends with about the same number of raw samples, and so about the
//! same relative error, whatever its rate. Each point's own observed time
//! scales its counts.

use std::time::{Duration, Instant};

use map_probe_common::LOCK_TIERS;

/// How often points are re-sorted by their measured rate.
pub const REBALANCE_EVERY: Duration = Duration::from_secs(2);
/// ... and no sooner than this after the last, even when the steady tier
/// had to close (a hot point in it spent its budget).
pub const REBALANCE_MIN: Duration = Duration::from_millis(100);
/// A point's rate is re-measured once it was observed this long, or saw
/// this many hits.
const MIN_OBSERVED: Duration = Duration::from_millis(100);
const MIN_HITS: u64 = 50;

/// A point's probes' time in, across tier moves: its entries' (every
/// window of its tier) or its ends' (one window in `ENDS_EVERY` of a
/// windowed tier).
#[derive(Clone, Debug, Default)]
struct Observed {
    /// Time banked from tiers the point has left.
    banked: Duration,
    /// Its tier's time when it joined.
    joined: Duration,
    /// Hits and time at the last rate measurement, and the rate then.
    hits0: u64,
    at0: Duration,
    rate: f64,
}

impl Observed {
    fn now(&self, tier_time: Duration) -> Duration {
        self.banked + tier_time.saturating_sub(self.joined)
    }

    /// Re-measures the rate from `hits` (running) once enough was seen.
    fn measure(&mut self, hits: u64, tier_time: Duration) {
        let observed = self.now(tier_time);
        let dt = observed.saturating_sub(self.at0);
        let n = hits.saturating_sub(self.hits0);
        // A rate from a few ms or a handful of hits is noise that would
        // move points back and forth: keep the last one until more is seen.
        if dt >= MIN_OBSERVED || (n >= MIN_HITS && dt >= Duration::from_millis(10)) {
            self.rate = n as f64 / dt.as_secs_f64();
            self.hits0 = hits;
            self.at0 = observed;
        }
    }

    /// A rate seen over a short stretch just now (a burst): it stands
    /// until more is seen.
    fn heat(&mut self, rate: f64, hits: u64, tier_time: Duration) {
        self.rate = self.rate.max(rate);
        self.hits0 = hits;
        self.at0 = self.now(tier_time);
    }

    fn moved(&mut self, from: Duration, to: Duration) {
        self.banked += from.saturating_sub(self.joined);
        self.joined = to;
    }
}

/// One point's estimate, slot by slot. A point's rate changes (a burst, a
/// batch, load that comes and goes), and it is observed more in some
/// stretches than others (steady while quiet, windowed once hot): one
/// elapsed/observed ratio over the run weighs the quiet stretches as if they
/// were the busy ones (a lock hammered 0.4 s in every 3 s read 0.36-0.40 of
/// Go's count). So each slot between re-sorts is scaled by its own
/// wall/observed, and a slot never observed takes the rate of those that were.
#[derive(Clone, Debug, Default)]
struct Strata {
    /// Estimated hits of the closed slots, and their Poisson variance.
    est: f64,
    var: f64,
    /// Wall time of the closed slots observed and not observed at all.
    observed_wall: Duration,
    unobserved_wall: Duration,
    /// The open slot's start: hits, observed time and wall time then.
    hits0: u64,
    obs0: Duration,
    wall0: Duration,
}

/// A slot's estimate: (hits × wall/observed, its variance), or None when
/// its probes were never in.
fn slot(hits: u64, observed: Duration, wall: Duration) -> Option<(f64, f64)> {
    if observed.is_zero() {
        return None;
    }
    let w = (wall.as_secs_f64() / observed.as_secs_f64()).max(1.0);
    Some((hits as f64 * w, hits as f64 * w * w))
}

impl Strata {
    fn close(&mut self, hits: u64, observed: Duration, wall: Duration) {
        let (h, o, w) = (
            hits.saturating_sub(self.hits0),
            observed.saturating_sub(self.obs0),
            wall.saturating_sub(self.wall0),
        );
        match slot(h, o, w) {
            Some((e, v)) => {
                self.est += e;
                self.var += v;
                self.observed_wall += w;
            }
            None => self.unobserved_wall += w,
        }
        (self.hits0, self.obs0, self.wall0) = (hits, observed, wall);
    }

    /// The estimate so far and its variance, the open slot included.
    fn estimate(&self, hits: u64, observed: Duration, wall: Duration) -> (f64, f64) {
        let mut s = self.clone();
        s.close(hits, observed, wall);
        if s.unobserved_wall.is_zero() || s.observed_wall.is_zero() {
            return (s.est, s.var);
        }
        // Unobserved slots at the rate of the observed ones.
        let k = 1.0 + s.unobserved_wall.as_secs_f64() / s.observed_wall.as_secs_f64();
        (s.est * k, s.var * k * k)
    }
}

/// One point's tier and its probes' time in.
#[derive(Clone, Debug, Default)]
struct PointTime {
    tier: u8,
    entries: Observed,
    ends: Observed,
    strata: Strata,
}

pub struct Tiers {
    points: Vec<PointTime>,
    /// Per point, the callee-RET point that ends its waits, if any.
    ends_at: Vec<Option<usize>>,
    pub next_rebalance: Instant,
}

/// A re-sort's outcome: each point's tier and each tier's budget (a share
/// of one CPU).
#[derive(Debug, PartialEq)]
pub struct Assignment {
    pub tiers: Vec<u8>,
    pub budgets: [f64; LOCK_TIERS],
}

/// Each tier's time in so far: its entries' and its ends'.
pub struct TierTime {
    pub entries: Vec<Duration>,
    pub ends: Vec<Duration>,
}

fn at(times: &[Duration], tier: u8) -> Duration {
    times.get(usize::from(tier)).copied().unwrap_or_default()
}

impl Tiers {
    /// Every point starts steady: the first short window measures them all.
    pub fn new(ends_at: Vec<Option<usize>>, now: Instant) -> Tiers {
        Tiers {
            points: vec![PointTime::default(); ends_at.len()],
            ends_at,
            next_rebalance: now + Duration::from_millis(100),
        }
    }

    pub fn tiers(&self) -> Vec<u8> {
        self.points.iter().map(|p| p.tier).collect()
    }

    /// How long point `i`'s entry probes were in, given each tier's time now.
    pub fn observed(&self, i: usize, tier_attached: &[Duration]) -> Duration {
        let p = &self.points[i];
        p.entries.now(at(tier_attached, p.tier))
    }

    /// Point `i`'s hits per second (entries and ends) at its last measurement.
    pub fn rate(&self, i: usize) -> f64 {
        self.points
            .get(i)
            .map_or(0.0, |p| p.entries.rate + p.ends.rate)
    }

    /// Point `i` just hit at `rates` (entries, ends) per second, far above
    /// its measured rate: the next re-sort places it by that.
    pub fn heat(&mut self, i: usize, rates: (f64, f64), hits: (u64, u64), time: &TierTime) {
        let Some(p) = self.points.get_mut(i) else {
            return;
        };
        p.entries.heat(rates.0, hits.0, at(&time.entries, p.tier));
        p.ends.heat(rates.1, hits.1, at(&time.ends, p.tier));
    }

    /// Ends the estimator's slot of every point (call before a re-sort
    /// moves points): `hits[i]` is point i's running entry hits, `wall` the
    /// time since the observation began.
    pub fn close_slot(&mut self, hits: &[u64], tier_attached: &[Duration], wall: Duration) {
        for (i, p) in self.points.iter_mut().enumerate() {
            let observed = p.entries.now(at(tier_attached, p.tier));
            p.strata
                .close(hits.get(i).copied().unwrap_or(0), observed, wall);
        }
    }

    /// Every point's estimated hits so far and the variance of that
    /// estimate (see `Strata`).
    pub fn estimates(
        &self,
        hits: &[u64],
        tier_attached: &[Duration],
        wall: Duration,
    ) -> Vec<(f64, f64)> {
        self.points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let observed = p.entries.now(at(tier_attached, p.tier));
                p.strata
                    .estimate(hits.get(i).copied().unwrap_or(0), observed, wall)
            })
            .collect()
    }

    /// Re-sorts the points by rate (hits per second observed since the last
    /// re-sort; `hits.0[i]` and `hits.1[i]` are point i's running raw entry
    /// and end hits, each over the time its kind of probe was in). `budget`
    /// is what all lock points may cost (a share of one CPU), `hit_cost`
    /// what one hit costs. None when nothing changed.
    pub fn rebalance(
        &mut self,
        hits: (&[u64], &[u64]),
        time: &TierTime,
        budget: f64,
        hit_cost: Duration,
    ) -> Option<Assignment> {
        for (i, p) in self.points.iter_mut().enumerate() {
            let (entries, ends) = (
                hits.0.get(i).copied().unwrap_or(0),
                hits.1.get(i).copied().unwrap_or(0),
            );
            p.entries.measure(entries, at(&time.entries, p.tier));
            p.ends.measure(ends, at(&time.ends, p.tier));
        }
        // Charged as if every window planted the ends: a point moved to the
        // steady tier does.
        let mut cost: Vec<f64> = self
            .points
            .iter()
            .map(|p| (p.entries.rate + p.ends.rate) * hit_cost.as_secs_f64())
            .collect();
        // A callee's RETs end its sites' waits only while both are in: it
        // goes with the site that waits most among those it serves, and that
        // site pays for it (every return of the callee traps, whoever called).
        let owners = self.owners();
        for &(callee, owner) in &owners {
            cost[owner] += cost[callee];
            cost[callee] = 0.0;
        }
        log::debug!(
            "point rates: {:?}",
            self.points
                .iter()
                .map(|p| (p.entries.rate + p.ends.rate).round())
                .collect::<Vec<_>>()
        );
        let mut a = assign(&cost, budget);
        for &(callee, owner) in &owners {
            a.tiers[callee] = a.tiers[owner];
        }
        if a.tiers == self.tiers() {
            return None;
        }
        for (i, &t) in a.tiers.iter().enumerate() {
            let p = &mut self.points[i];
            if p.tier != t {
                p.entries
                    .moved(at(&time.entries, p.tier), at(&time.entries, t));
                p.ends.moved(at(&time.ends, p.tier), at(&time.ends, t));
                p.tier = t;
            }
        }
        Some(a)
    }

    /// (callee point, the site it goes with) for every callee serving a site.
    fn owners(&self) -> Vec<(usize, usize)> {
        let mut best: std::collections::HashMap<usize, usize> = Default::default();
        for (i, e) in self.ends_at.iter().enumerate() {
            let Some(c) = *e else { continue };
            if c >= self.points.len() {
                continue;
            }
            let o = best.entry(c).or_insert(i);
            if self.points[i].entries.rate > self.points[*o].entries.rate {
                *o = i;
            }
        }
        best.into_iter().collect()
    }
}

/// Tiers for points costing `cost[i]` (share of one CPU if always in) under
/// `budget`: the budget is split evenly among the points that cost anything;
/// a point its share covers is steady and hands the rest of its share to
/// the others; each other point's duty is its share over its cost, rounded
/// down to a power of two, which names its tier.
pub fn assign(cost: &[f64], budget: f64) -> Assignment {
    let mut tiers = vec![0u8; cost.len()];
    let mut steady_cost = 0.0;
    let mut hot: Vec<usize> = (0..cost.len()).filter(|&i| cost[i] > 0.0).collect();
    // Peel off the points whose even share covers them, until none is left.
    loop {
        let share = (budget - steady_cost) / hot.len().max(1) as f64;
        let (cheap, rest): (Vec<usize>, Vec<usize>) = hot.iter().partition(|&&i| cost[i] <= share);
        if cheap.is_empty() {
            break;
        }
        steady_cost += cheap.iter().map(|&i| cost[i]).sum::<f64>();
        hot = rest;
    }
    let share = ((budget - steady_cost) / hot.len().max(1) as f64).max(0.0);
    let mut budgets = [0.0; LOCK_TIERS];
    for &i in &hot {
        let duty = share / cost[i];
        // duty in (2^-t, 2^-(t-1)] -> tier t.
        let t = ((1.0 / duty).log2().ceil() as usize).clamp(1, LOCK_TIERS - 1);
        tiers[i] = t as u8;
        budgets[t] += share;
    }
    // The steady tier keeps the rest: at least what its points cost, room
    // for one that heats up before the next re-sort.
    budgets[0] = (budget - budgets[1..].iter().sum::<f64>()).max(budget * 0.05);
    Assignment { tiers, budgets }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_seen_in_a_windowed_slot_is_not_diluted_by_a_steady_one() {
        let s = |ms: u64| Duration::from_millis(ms);
        let mut st = Strata::default();
        // 2 s steady and quiet: 10 hits, every one seen.
        st.close(10, s(2000), s(2000));
        // Then 2 s at 500/s, seen 10% of the time: 100 hits.
        let (e, v) = st.estimate(110, s(2200), s(4000));
        assert!((e - 1010.0).abs() < 1e-6, "{e}");
        // One elapsed/observed ratio would say 110 * 4000 / 2200 = 200.
        assert!((v - (10.0 + 100.0 * 100.0)).abs() < 1e-6, "{v}");
    }

    #[test]
    fn a_slot_never_observed_takes_the_rate_of_the_others() {
        let s = |ms: u64| Duration::from_millis(ms);
        let mut st = Strata::default();
        st.close(100, s(1000), s(1000));
        st.close(100, s(1000), s(3000));
        let (e, _) = st.estimate(100, s(1000), s(3000));
        assert!((e - 300.0).abs() < 1e-6, "{e}");
    }

    #[test]
    fn the_budget_buys_every_site_about_the_same_samples() {
        // 0.25% of a CPU; at 40 µs a wait: 1.3, 10, 30, 200 and 800 waits/s.
        let cost: Vec<f64> = [1.3, 10.0, 30.0, 200.0, 800.0, 0.0]
            .iter()
            .map(|r| r * 40e-6)
            .collect();
        let a = assign(&cost, 0.0025);
        // The two coldest fit their share and stay in; a never-hit point too.
        assert_eq!(a.tiers[0], 0);
        assert_eq!(a.tiers[1], 0);
        assert_eq!(a.tiers[5], 0);
        // The others are windowed, the hotter the rarer.
        assert!(
            a.tiers[2] >= 1 && a.tiers[2] < a.tiers[3] && a.tiers[3] < a.tiers[4],
            "{a:?}"
        );
        // Every windowed site gets the same share, which its duty buys.
        let spent: f64 = a.budgets[1..].iter().sum();
        assert!(spent + cost[0] + cost[1] <= 0.0025 + 1e-12, "{a:?}");
    }

    #[test]
    fn moving_a_point_banks_its_observed_time() {
        let now = Instant::now();
        let mut t = Tiers::new(vec![None; 3], now);
        let attached = [Duration::from_secs(1); LOCK_TIERS];
        let mut first = attached;
        first[1..].iter_mut().for_each(|d| *d = Duration::ZERO);
        let time = |t: &[Duration]| TierTime {
            entries: t.to_vec(),
            ends: t.to_vec(),
        };
        let a = t
            .rebalance(
                (&[10, 100, 100_000], &[0, 0, 0]),
                &time(&first),
                0.0025,
                Duration::from_micros(20),
            )
            .unwrap();
        let hot = usize::from(a.tiers[2]);
        assert!(hot >= 1, "{a:?}");
        // The hot point's steady second is banked; it then sees its tier's time.
        let mut later = [Duration::ZERO; LOCK_TIERS];
        later[0] = Duration::from_secs(3);
        later[hot] = Duration::from_millis(200);
        assert_eq!(t.observed(2, &later), Duration::from_millis(1200));
        assert_eq!(t.observed(0, &later), Duration::from_secs(3));
        assert_eq!(
            t.rebalance(
                (&[30, 300, 120_000], &[0, 0, 0]),
                &time(&later),
                0.0025,
                Duration::from_micros(20)
            ),
            None
        );
    }

    #[test]
    fn end_hits_count_over_the_time_the_ends_were_in() {
        let now = Instant::now();
        let mut t = Tiers::new(vec![None; 2], now);
        // One second in, the ends were in for a tenth of it: 1,000 end hits
        // are 10,000 a second, which the budget cannot keep steady.
        let time = TierTime {
            entries: vec![Duration::from_secs(1); LOCK_TIERS],
            ends: vec![Duration::from_millis(100); LOCK_TIERS],
        };
        let a = t
            .rebalance(
                (&[0, 1], &[1_000, 1]),
                &time,
                0.0025,
                Duration::from_micros(20),
            )
            .unwrap();
        assert!(a.tiers[0] >= 1, "{a:?}");
        assert_eq!(a.tiers[1], 0, "{a:?}");
    }

    #[test]
    fn a_callee_goes_with_the_site_it_ends_and_is_charged_to_it() {
        let now = Instant::now();
        // Point 0 and 1 end at callee 2; point 1 waits more. The callee's
        // RETs fire 10,000 times a second, for every caller.
        let mut t = Tiers::new(vec![Some(2), Some(2), None, None], now);
        let time = TierTime {
            entries: vec![Duration::from_secs(1); LOCK_TIERS],
            ends: vec![Duration::from_secs(1); LOCK_TIERS],
        };
        let a = t
            .rebalance(
                (&[1, 5, 0, 1], &[0, 0, 10_000, 1]),
                &time,
                0.0025,
                Duration::from_micros(20),
            )
            .unwrap();
        assert!(a.tiers[1] >= 1, "the busier site pays: {a:?}");
        assert_eq!(a.tiers[2], a.tiers[1], "{a:?}");
        assert_eq!(a.tiers[0], 0, "{a:?}");
        assert_eq!(a.tiers[3], 0, "{a:?}");
    }
}
