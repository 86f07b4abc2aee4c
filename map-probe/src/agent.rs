//! `map-probe agent`: the per-host daemon. It rescans /proc every few
//! seconds for the processes `discover::Selector` wants, attaches to new
//! ones (each with its own governors, so each target's cost stays inside
//! the budget), lets exited ones go (their last interval is exported), and
//! exports every target's interval over OTLP until SIGTERM or SIGINT, when
//! it exports what is left and detaches.
//!
//! Memory stays flat however long it runs: kernel site entries idle for an
//! interval are deleted, reports leave for the export thread through a
//! capped queue, and a target's state goes with it.
//!
//! Logs: one line per event on stderr (attached, let go, skipped, stopped);
//! under systemd (JOURNAL_STREAM set) each line carries its syslog priority
//! (`<6>`, `<4>`) so journald files it at the right level.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    discover::{self, GoCache, Selector},
    doctor::Host,
    export::Exporter,
    gobin::GoBinary,
    session::{self, End, Observation, Options, Step},
    target::{Claim, Target},
};

pub struct Config {
    pub select: Selector,
    pub rescan: Duration,
    pub interval: Duration,
    /// Stop after this long (tests, benchmarks); None: until a signal.
    pub duration: Option<Duration>,
    /// Watch a process another map-probe already watches.
    pub allow_second: bool,
}

#[derive(Clone, Copy)]
pub(crate) enum Level {
    Info,
    Warning,
}

/// One line on stderr, with a syslog priority when journald reads it.
pub(crate) fn log(level: Level, msg: &str) {
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let (prio, word) = match level {
        Level::Info => ("<6>", ""),
        Level::Warning => ("<4>", "warning: "),
    };
    eprintln!("{}map-probe: {word}{msg}", if journald { prio } else { "" });
}

struct Watched {
    obs: Observation,
    name: String,
    /// The one-observer slot of this process, held while watched.
    _claim: Option<Claim>,
    /// When its governors want the next look.
    next_tick: Instant,
}

impl Watched {
    fn describe(&self) -> String {
        format!("PID {} ({})", self.obs.target.pid, self.name)
    }
}

/// Runs until SIGTERM/SIGINT (or the duration); Ok once flushed and detached.
pub fn run(cfg: &Config, opts: &Options, host: &Host, export: Exporter) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    session::raise_priority();
    let mut agent = Agent {
        cfg,
        opts,
        host,
        export: &export,
        targets: Vec::new(),
        skipped: HashSet::new(),
        go: GoCache::default(),
        bins: HashMap::new(),
    };
    let what = describe_selector(&cfg.select);
    log(
        Level::Info,
        &format!(
            "agent started: watching {what}, rescanning every {:.0} s, exporting to {} every {:.0} s",
            cfg.rescan.as_secs_f64(),
            export.config.endpoint,
            cfg.interval.as_secs_f64()
        ),
    );
    let start = Instant::now();
    let why = rt.block_on(async {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut next_scan = start;
        let mut next_export = start + cfg.interval;
        let mut sleep = Duration::ZERO;
        loop {
            tokio::select! {
                _ = int.recv() => return anyhow::Ok(libc::SIGINT),
                _ = term.recv() => return anyhow::Ok(libc::SIGTERM),
                _ = tokio::time::sleep(sleep) => {}
            }
            let now = Instant::now();
            if cfg.duration.is_some_and(|d| now.duration_since(start) >= d) {
                return Ok(0);
            }
            if now >= next_scan {
                agent.scan();
                next_scan = now + cfg.rescan;
            }
            let mut next = agent.tick(now);
            if now >= next_export {
                agent.export_intervals();
                next_export += cfg.interval;
                if next_export < now {
                    next_export = now + cfg.interval;
                }
            }
            next = next
                .min(next_scan.saturating_duration_since(now))
                .min(next_export.saturating_duration_since(now));
            sleep = next.max(Duration::from_millis(1));
        }
    })?;
    let n = agent.targets.len();
    for w in std::mem::take(&mut agent.targets) {
        agent.let_go(w, End::Interrupted(why));
    }
    let dropped = export.shutdown(FLUSH_BOUND);
    let why = match why {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "the end of --duration",
    };
    log(
        Level::Info,
        &format!(
            "agent stopped on {why}: flushed and detached {n} target(s); {dropped} interval export(s) undelivered in all"
        ),
    );
    Ok(())
}

/// The longest the agent waits for its last exports when stopping.
const FLUSH_BOUND: Duration = Duration::from_secs(5);

fn describe_selector(s: &Selector) -> String {
    let mut parts = Vec::new();
    if s.all_go {
        parts.push("every Go process".to_string());
    }
    for e in &s.exes {
        parts.push(format!("--exe {e}"));
    }
    for p in &s.pids {
        parts.push(format!("--pid {p}"));
    }
    parts.join(", ")
}

struct Agent<'a> {
    cfg: &'a Config,
    opts: &'a Options,
    host: &'a Host,
    export: &'a Exporter,
    targets: Vec<Watched>,
    /// Processes (pid, start time) that could not be watched: said once.
    skipped: HashSet<(u32, u64)>,
    go: GoCache,
    /// Parsed binaries by (device, inode, mtime), shared by the processes
    /// of one program while any of them is watched.
    bins: HashMap<(u64, u64, i64), Weak<GoBinary>>,
}

impl Agent<'_> {
    fn scan(&mut self) {
        let live: Vec<discover::Proc> = discover::processes();
        // Forget skipped processes that are gone, so the set stays small.
        self.skipped
            .retain(|k| live.iter().any(|p| (p.pid, p.start_time) == *k));
        for p in live {
            if self.targets.iter().any(|w| w.obs.target.pid == p.pid)
                || self.skipped.contains(&(p.pid, p.start_time))
            {
                continue;
            }
            let go = &mut self.go;
            if !self.cfg.select.wants(&p, || go.is_go(p.pid)) {
                continue;
            }
            match self.watch(&p) {
                Ok(w) => {
                    let module = w
                        .obs
                        .target
                        .bin
                        .main_module()
                        .map_or(String::new(), |m| format!(", module {m}"));
                    log(
                        Level::Info,
                        &format!(
                            "attached to PID {} {} ({}{module})",
                            p.pid,
                            p.exe.display(),
                            w.obs.target.go_version(),
                        ),
                    );
                    self.targets.push(w);
                }
                Err(e) => {
                    log(
                        Level::Warning,
                        &format!("not watching PID {} ({}): {e:#}", p.pid, p.exe_name()),
                    );
                    self.skipped.insert((p.pid, p.start_time));
                }
            }
        }
    }

    fn watch(&mut self, p: &discover::Proc) -> Result<Watched> {
        self.bins.retain(|_, b| b.strong_count() > 0);
        let key = std::fs::metadata(format!("/proc/{}/exe", p.pid))
            .map(|m| (m.dev(), m.ino(), m.mtime()))
            .ok();
        let known = key.and_then(|k| self.bins.get(&k)?.upgrade());
        let target = Target::from_pid_sharing(p.pid, |_| known)?;
        if let Some(k) = key {
            self.bins.insert(k, Arc::downgrade(&target.bin));
        }
        let claim = target.claim(self.cfg.allow_second)?;
        let (plans, probes) = session::prepare(&target, self.opts, self.host)?;
        let mut obs = Observation::new(target, plans, probes, self.opts);
        obs.evict_idle = true;
        Ok(Watched {
            obs,
            name: p.exe_name(),
            _claim: claim,
            next_tick: Instant::now(),
        })
    }

    /// One governor step for every target that is due; the time until
    /// the next one is.
    fn tick(&mut self, now: Instant) -> Duration {
        let mut next = Duration::from_millis(20);
        let mut gone = Vec::new();
        for (i, w) in self.targets.iter_mut().enumerate() {
            if now < w.next_tick {
                next = next.min(w.next_tick - now);
                continue;
            }
            if !w.obs.alive() {
                gone.push(i);
                continue;
            }
            match w.obs.tick(now) {
                Ok(Step::Next(d)) => {
                    w.next_tick = now + d;
                    next = next.min(d);
                }
                Ok(Step::Gone) => gone.push(i),
                Err(e) => {
                    log(Level::Warning, &format!("{}: {e:#}", w.describe()));
                    gone.push(i);
                }
            }
        }
        for i in gone.into_iter().rev() {
            let w = self.targets.remove(i);
            self.let_go(w, End::TargetExited);
        }
        next
    }

    fn export_intervals(&mut self) {
        for w in &mut self.targets {
            match w.obs.interval(None) {
                Ok(r) => self.export.send(r),
                Err(e) => log(Level::Warning, &format!("{}: {e:#}", w.describe())),
            }
        }
    }

    /// Closes the target's windows, exports its last interval and drops it
    /// (which detaches everything).
    fn let_go(&self, mut w: Watched, end: End) {
        let alive = w.obs.alive();
        let _ = w.obs.close();
        let who = w.describe();
        let last = w.obs.interval(Some(end));
        let pid = w.obs.target.pid;
        let mut fatal = None;
        match last {
            Ok(r) => {
                fatal = r
                    .risks
                    .iter()
                    .find(|k| k.kind == crate::report::RiskKind::Fatal)
                    .map(|k| k.message.clone());
                self.export.send(r);
            }
            Err(e) => log(Level::Warning, &format!("{who}: last interval lost: {e:#}")),
        }
        self.export.forget(pid);
        drop(w);
        if end == End::TargetExited {
            let how = match (&fatal, alive) {
                (Some(m), _) => format!("died (fatal error: {m})"),
                (None, true) => "could not be observed any more".into(),
                (None, false) => "exited".into(),
            };
            log(Level::Info, &format!("{who} {how}; let go"));
        }
    }
}
