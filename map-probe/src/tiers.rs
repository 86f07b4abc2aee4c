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
pub const REBALANCE_MIN: Duration = Duration::from_millis(250);
/// A point's rate is re-measured once it was observed this long, or saw
/// this many hits.
const MIN_OBSERVED: Duration = Duration::from_millis(100);
const MIN_HITS: u64 = 50;

/// One point's tier and the time its probes were in, across tier moves.
#[derive(Clone, Debug, Default)]
struct PointTime {
    tier: u8,
    /// Observed time banked from tiers the point has left.
    banked: Duration,
    /// Its tier's attached time when it joined.
    joined: Duration,
    /// Hits and observed time at the last re-sort, and the rate then.
    hits0: u64,
    observed0: Duration,
    rate: f64,
}

pub struct Tiers {
    points: Vec<PointTime>,
    pub next_rebalance: Instant,
}

/// A re-sort's outcome: each point's tier and each tier's budget (a share
/// of one CPU).
#[derive(Debug, PartialEq)]
pub struct Assignment {
    pub tiers: Vec<u8>,
    pub budgets: [f64; LOCK_TIERS],
}

impl Tiers {
    /// Every point starts steady: the first short window measures them all.
    pub fn new(n: usize, now: Instant) -> Tiers {
        Tiers {
            points: vec![PointTime::default(); n],
            next_rebalance: now + Duration::from_millis(100),
        }
    }

    pub fn tiers(&self) -> Vec<u8> {
        self.points.iter().map(|p| p.tier).collect()
    }

    /// How long point `i`'s probes were in, given each tier's attached time now.
    pub fn observed(&self, i: usize, tier_attached: &[Duration]) -> Duration {
        let p = &self.points[i];
        let now = tier_attached
            .get(usize::from(p.tier))
            .copied()
            .unwrap_or_default();
        p.banked + now.saturating_sub(p.joined)
    }

    pub fn all_observed(&self, tier_attached: &[Duration]) -> Vec<Duration> {
        (0..self.points.len())
            .map(|i| self.observed(i, tier_attached))
            .collect()
    }

    /// Re-sorts the points by rate (hits per second observed since the last
    /// re-sort; `hits[i]` is point i's running raw hit count, entries and
    /// ends). `budget` is what all lock points may cost (a share of one
    /// CPU), `hit_cost` what one hit costs. None when nothing changed.
    pub fn rebalance(
        &mut self,
        hits: &[u64],
        tier_attached: &[Duration],
        budget: f64,
        hit_cost: Duration,
    ) -> Option<Assignment> {
        for (i, h) in hits.iter().enumerate().take(self.points.len()) {
            let observed = self.observed(i, tier_attached);
            let p = &mut self.points[i];
            let dt = observed.saturating_sub(p.observed0);
            let n = h.saturating_sub(p.hits0);
            // A rate from a few ms or a handful of hits is noise that would
            // move points back and forth: keep the last one until more is seen.
            if dt >= MIN_OBSERVED || (n >= MIN_HITS && dt >= Duration::from_millis(10)) {
                p.rate = n as f64 / dt.as_secs_f64();
                p.hits0 = *h;
                p.observed0 = observed;
            }
        }
        let cost: Vec<f64> = self
            .points
            .iter()
            .map(|p| p.rate * hit_cost.as_secs_f64())
            .collect();
        log::debug!(
            "point rates: {:?}",
            self.points
                .iter()
                .map(|p| p.rate.round())
                .collect::<Vec<_>>()
        );
        let a = assign(&cost, budget);
        if a.tiers == self.tiers() {
            return None;
        }
        for (i, &t) in a.tiers.iter().enumerate() {
            let p = &mut self.points[i];
            if p.tier != t {
                let at = |tier: u8| {
                    tier_attached
                        .get(usize::from(tier))
                        .copied()
                        .unwrap_or_default()
                };
                p.banked += at(p.tier).saturating_sub(p.joined);
                p.joined = at(t);
                p.tier = t;
            }
        }
        Some(a)
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
        let mut t = Tiers::new(3, now);
        let attached = [Duration::from_secs(1); LOCK_TIERS];
        let mut first = attached;
        first[1..].iter_mut().for_each(|d| *d = Duration::ZERO);
        let a = t
            .rebalance(
                &[10, 100, 100_000],
                &first,
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
                &[30, 300, 120_000],
                &later,
                0.0025,
                Duration::from_micros(20)
            ),
            None
        );
    }
}
