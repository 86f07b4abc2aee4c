//! Keeps the probes' cost to the target inside a budget. A uprobe hit is a
//! trap (10-30 µs on the VMs we measured), so a busy path probed all the
//! time slows the service it is meant to observe. The governor opens the
//! probes in windows, measures the hit rate inside each, and spaces windows
//! so that the average cost stays under the budget; counts are later scaled
//! by the share of time the probes were attached. A window also closes early
//! once it has cost `max_window_cost`, so one burst of a hot path (a map
//! write at a million calls a second) cannot stall the target for long.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Share of one CPU the probes may cost the target (0.005 = 0.5%); None
    /// (`--budget unlimited`) turns the governor off and keeps the probes
    /// attached.
    pub budget: Option<f64>,
    /// Estimated cost of one uprobe hit to the target.
    pub hit_cost: Duration,
    /// How long one window stays open at most.
    pub window: Duration,
    /// The longest gap between windows, so a short run still samples.
    pub max_gap: Duration,
    /// The most one window may cost the target before it closes early.
    pub max_window_cost: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Attach,
    Detach,
    Stay,
}

pub struct Governor {
    cfg: Config,
    window_start: Option<Instant>,
    window_hits0: u64,
    /// Length of the next window: shortened when the last one was costly.
    window_len: Duration,
    next_attach: Instant,
    /// Attached time so far: from the middle of each attach call (probes go
    /// live during it) to the start of the detach call.
    attached: Duration,
    pub windows: u32,
    pub last_rate: f64,
}

/// Shorter than this, a window is mostly attach and detach latency.
const MIN_WINDOW: Duration = Duration::from_millis(20);

impl Governor {
    pub fn new(cfg: Config, now: Instant) -> Governor {
        Governor {
            cfg,
            window_start: None,
            window_hits0: 0,
            // The first window only measures the rate: short, in case the
            // path is hot.
            window_len: MIN_WINDOW.min(cfg.window),
            next_attach: now,
            attached: Duration::ZERO,
            windows: 0,
            last_rate: 0.0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn is_open(&self) -> bool {
        self.window_start.is_some()
    }

    pub fn tick(&mut self, now: Instant, hits: u64) -> Decision {
        let Some(start) = self.window_start else {
            return if now >= self.next_attach {
                Decision::Attach
            } else {
                Decision::Stay
            };
        };
        let open = now.saturating_duration_since(start);
        let in_window = hits.saturating_sub(self.window_hits0);
        let spent = self.cfg.hit_cost.mul_f64(in_window as f64);
        let budget = self.cfg.budget;
        if open < self.window_len && !(budget.is_some() && spent > self.cfg.max_window_cost) {
            return Decision::Stay;
        }
        let rate = in_window as f64 / open.as_secs_f64().max(1e-3);
        self.last_rate = rate;
        let cost = rate * self.cfg.hit_cost.as_secs_f64();
        let Some(budget) = budget.filter(|&b| cost > b) else {
            // Affordable: keep the probes in and judge the next stretch afresh.
            self.attached += open;
            self.window_start = Some(now);
            self.window_hits0 = hits;
            self.window_len = self.cfg.window;
            return Decision::Stay;
        };
        // Next window: short enough to cost at most max_window_cost...
        let affordable = self.cfg.max_window_cost.as_secs_f64() / cost;
        self.window_len = Duration::from_secs_f64(affordable).clamp(MIN_WINDOW, self.cfg.window);
        // ...and far enough away that on average the budget holds.
        let duty = budget / cost;
        let gap = open.mul_f64(1.0 / duty - 1.0).min(self.cfg.max_gap);
        self.next_attach = now + gap;
        Decision::Detach
    }

    /// A new budget (a lock tier's share). Its windows cost at most a
    /// second's worth of it, so that a low duty is many short windows spread
    /// over the run rather than one long one, and a point that heats up
    /// while in is soon out.
    pub fn set_budget(&mut self, budget: f64) {
        if self.cfg.budget.is_none() {
            return;
        }
        // An empty tier's budget is 0; a floor keeps the arithmetic finite.
        let budget = budget.max(1e-7);
        self.cfg.budget = Some(budget);
        self.cfg.max_window_cost = Duration::from_secs_f64(budget).max(Duration::from_micros(500));
    }

    /// The set's points changed (a tier re-sort): judge it afresh with a
    /// short measuring window, now if it is closed.
    /// `gap_start`..`now` is when the set was being re-linked, its probes
    /// out: not attached time.
    pub fn restart(&mut self, gap_start: Instant, now: Instant, hits: u64) {
        self.window_len = MIN_WINDOW.min(self.cfg.window);
        match self.window_start {
            Some(ws) => {
                self.attached += gap_start.saturating_duration_since(ws);
                self.window_start = Some(now);
                self.window_hits0 = hits;
            }
            None => self.next_attach = now,
        }
    }

    /// Keeps the probes in after `tick` said `Detach` (the steady lock tier
    /// moves its hot points out instead of unplanting every point): the
    /// stretch so far counts as attached, and the next is judged afresh.
    pub fn keep(&mut self, now: Instant, hits: u64) {
        if let Some(ws) = self.window_start {
            self.attached += now.saturating_duration_since(ws);
            self.window_start = Some(now);
            self.window_hits0 = hits;
            self.window_len = self.cfg.window;
        }
    }

    /// How soon the loop must look at this set again (None while closed,
    /// or unbudgeted): by the window's end, and before the rate it runs at
    /// (in this window, or the last one if higher) could spend half of
    /// `max_window_cost`. A window that sees no hits is looked at rarely:
    /// looking every 2 ms at windows that never trap cost map-probe 4-5% of
    /// a CPU on caddy, where the CAS and steady lock sets stay open all run.
    pub fn next_look(&self, now: Instant, hits: u64) -> Option<Duration> {
        let ws = self.window_start?;
        self.cfg.budget?;
        if self.window_len <= MIN_WINDOW {
            // A measuring window: the rate is not known yet, and may be a
            // map write's 100k/s.
            return Some(Duration::ZERO);
        }
        let open = now.saturating_duration_since(ws);
        let n = hits.saturating_sub(self.window_hits0) as f64;
        let rate = (n / open.as_secs_f64().max(1e-3)).max(self.last_rate);
        let spend = rate * self.cfg.hit_cost.as_secs_f64();
        let by_cost = if spend > 0.0 {
            Duration::from_secs_f64(self.cfg.max_window_cost.as_secs_f64() / spend / 2.0)
        } else {
            Duration::MAX
        };
        Some(by_cost.min(self.window_len.saturating_sub(open)))
    }

    /// When the window now open began being judged.
    pub fn judged_since(&self) -> Option<Instant> {
        self.window_start
    }

    /// `start`/`end` bracket the attach call.
    pub fn attached_at(&mut self, start: Instant, end: Instant, hits: u64) {
        self.window_start = Some(start + (end - start) / 2);
        self.window_hits0 = hits;
        self.windows += 1;
    }

    /// `start`/`end` bracket the detach call. The kernel restores the
    /// original instructions at its start and spends the rest (~100 ms here)
    /// waiting for a grace period, so the window closes at `start`. `hits`
    /// is read after the detach: the probes go on firing while they are
    /// being removed, and that tail is paid for by the gap like the rest.
    pub fn detached_at(&mut self, start: Instant, end: Instant, hits: u64) {
        if let Some(ws) = self.window_start.take() {
            self.attached += start.saturating_duration_since(ws);
            // The detach itself took time the target spent unprobed anyway.
            self.next_attach = self.next_attach.max(end);
            if let Some(budget) = self.cfg.budget {
                let spent = self
                    .cfg
                    .hit_cost
                    .mul_f64(hits.saturating_sub(self.window_hits0) as f64);
                let payback = spent.div_f64(budget).min(self.cfg.max_gap);
                self.next_attach = self.next_attach.max(ws + payback);
            }
        }
    }

    pub fn attached_time(&self, now: Instant) -> Duration {
        self.attached
            + self
                .window_start
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }

    /// Elapsed over attached: what raw counts are multiplied by.
    pub fn scale(&self, elapsed: Duration, now: Instant) -> f64 {
        scale(elapsed, self.attached_time(now), self.cfg.budget.is_some())
    }
}

/// Elapsed over attached, for a span a governed set spent `attached` of
/// attached; 1 when nothing was governed (or nothing attached).
pub fn scale(elapsed: Duration, attached: Duration, governed: bool) -> f64 {
    let attached = attached.min(elapsed);
    if !governed || attached.is_zero() {
        1.0
    } else {
        (elapsed.as_secs_f64() / attached.as_secs_f64()).max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(budget: f64) -> Config {
        Config {
            budget: Some(budget).filter(|&b| b > 0.0),
            hit_cost: Duration::from_micros(10),
            window: Duration::from_millis(500),
            max_gap: Duration::from_secs(30),
            max_window_cost: Duration::from_millis(20),
        }
    }

    #[test]
    fn quiet_windows_are_looked_at_rarely_hot_ones_often() {
        let t0 = Instant::now();
        let mut g = Governor::new(cfg(0.005), t0);
        g.attached_at(t0, t0, 0);
        // The first window measures: looked at as often as the loop can.
        assert_eq!(g.next_look(t0, 0), Some(Duration::ZERO));
        assert_eq!(g.tick(t0 + Duration::from_millis(20), 0), Decision::Stay);
        let quiet = g.next_look(t0 + Duration::from_millis(25), 0).unwrap();
        assert!(quiet >= Duration::from_millis(400), "{quiet:?}");
        // 100 hits in 5 ms = 20k/s * 10 µs = 20% of a CPU: 20 ms of cost in 100 ms.
        let t1 = t0 + Duration::from_millis(25);
        let hot = g.next_look(t1, 100).unwrap();
        assert!(hot <= Duration::from_millis(60), "{hot:?}");
        assert!(Governor::new(cfg(0.005), t0).next_look(t0, 0).is_none());
    }

    #[test]
    fn cheap_probes_stay_attached() {
        let t0 = Instant::now();
        let mut g = Governor::new(cfg(0.01), t0);
        assert_eq!(g.tick(t0, 0), Decision::Attach);
        g.attached_at(t0, t0, 0);
        // 100 hits/s * 10 µs = 0.1% of a CPU: within a 1% budget.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(g.tick(t1, 100), Decision::Stay);
        assert_eq!(g.tick(t1 + Duration::from_secs(1), 200), Decision::Stay);
        assert!((g.attached_time(t1 + Duration::from_secs(1)).as_secs_f64() - 2.0).abs() < 1e-6);
    }

    #[test]
    fn busy_probes_get_spaced_to_the_budget() {
        let t0 = Instant::now();
        let mut g = Governor::new(cfg(0.01), t0);
        g.attached_at(t0, t0, 0);
        // 1000 hits in 500 ms = 2k hits/s * 10 µs = 2% of a CPU: twice the
        // budget -> 50% duty; the window cost 10 ms, under the 20 ms cap.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(g.tick(t1, 1000), Decision::Detach);
        g.detached_at(t1, t1, 1000);
        assert_eq!(
            g.tick(t1 + Duration::from_millis(400), 1000),
            Decision::Stay
        );
        assert_eq!(
            g.tick(t1 + Duration::from_millis(500), 1000),
            Decision::Attach
        );
        assert_eq!(g.attached_time(t1), Duration::from_millis(500));
        assert!((g.scale(Duration::from_secs(1), t1) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_hot_path_closes_the_window_early_and_shortens_the_next() {
        let t0 = Instant::now();
        let mut g = Governor::new(cfg(0.005), t0);
        g.attached_at(t0, t0, 0);
        // 50 ms in, 5000 hits = 50 ms of traps: over the 20 ms cap.
        let t1 = t0 + Duration::from_millis(50);
        assert_eq!(g.tick(t1, 5000), Decision::Detach);
        g.detached_at(t1, t1, 5000);
        // 100k hits/s = 1 CPU: next window 20 ms, duty 0.5% -> ~10 s away.
        assert_eq!(g.window_len, Duration::from_millis(20));
        assert_eq!(g.tick(t1 + Duration::from_secs(9), 5000), Decision::Stay);
        assert_eq!(g.tick(t1 + Duration::from_secs(10), 5000), Decision::Attach);
    }

    #[test]
    fn hits_while_detaching_push_the_next_window_back() {
        let t0 = Instant::now();
        let mut g = Governor::new(cfg(0.005), t0);
        g.attached_at(t0, t0, 0);
        let t1 = t0 + Duration::from_millis(20);
        assert_eq!(g.tick(t1, 3000), Decision::Detach);
        // 2000 more hits before the probes were gone: 5000 * 10 µs = 50 ms
        // of the target's time, paid back over 10 s at 0.5%.
        g.detached_at(t1, t1 + Duration::from_millis(30), 5000);
        assert_eq!(
            g.tick(t0 + Duration::from_millis(9990), 5000),
            Decision::Stay
        );
        assert_eq!(g.tick(t0 + Duration::from_secs(10), 5000), Decision::Attach);
    }

    #[test]
    fn unlimited_budget_means_always_attached() {
        let t0 = Instant::now();
        let mut g = Governor::new(cfg(0.0), t0);
        g.attached_at(t0, t0, 0);
        assert_eq!(
            g.tick(t0 + Duration::from_secs(5), 10_000_000),
            Decision::Stay
        );
        assert_eq!(
            g.scale(Duration::from_secs(5), t0 + Duration::from_secs(5)),
            1.0
        );
    }
}
