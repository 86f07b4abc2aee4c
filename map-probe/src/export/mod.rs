//! OTLP export to an OpenTelemetry Collector: each target's interval
//! `Report`s go out as spans and metrics, through the `opentelemetry`,
//! `opentelemetry_sdk` and `opentelemetry-otlp` crates, over gRPC or
//! HTTP/protobuf.
//!
//! Exporting never holds up profiling: reports are handed to one export
//! thread through a capped queue (a full queue drops the report and counts
//! it), the thread backs off from a failing collector, and every interval
//! whose spans did not arrive is counted in `drops.otlp_exports`. Metrics are
//! cumulative, so an interval that did not arrive is still in the next one.
//! The user sees one warning line when exports start failing and one when
//! they work again.
//!
//! `render` is the pure part: what of a `Report` becomes which span,
//! attribute and data point. `sdk` builds the per-target pipelines.
//! `profiles` renders and sends the OTLP Profiles signal (`--otlp-profiles`).

mod profiles;
mod render;
mod sdk;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use clap::Args;

use crate::{
    agent::{log, Level},
    report::{Report, RiskKind},
};

pub use render::{folded_sites, SiteSeries};

/// The OTLP flags, shared by `attach`, `run` and `agent`.
#[derive(Args, Clone, Debug, Default)]
pub struct OtlpArgs {
    /// Send spans and metrics to this OpenTelemetry Collector (OTLP), e.g.
    /// http://localhost:4317 (gRPC) or http://localhost:4318 (HTTP). Default:
    /// $OTEL_EXPORTER_OTLP_ENDPOINT; nothing is sent when neither is set.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`. Default: $OTEL_EXPORTER_OTLP_PROTOCOL, else
    /// http/protobuf.
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Export every this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub interval: f64,
    /// Contended call sites per interval exported as spans and as their own
    /// metric series; the rest are folded into one series.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub otlp_top: usize,
    /// Also send each interval's contention profile (contentions and delay
    /// per stack, as in --pprof) over the OTLP Profiles signal. It is a
    /// development signal (`v1development`): the collector needs
    /// `--feature-gates=service.profilesSupport`.
    #[arg(long)]
    pub otlp_profiles: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The collector's base URL (HTTP paths `/v1/traces`, `/v1/metrics` are added).
    pub endpoint: String,
    pub protocol: Protocol,
    /// Longest one export may take (OTEL_EXPORTER_OTLP_TIMEOUT, default 10 s).
    pub timeout: Duration,
    pub interval: Duration,
    pub top: usize,
    /// Send the OTLP Profiles signal too.
    pub profiles: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl OtlpArgs {
    /// None when no endpoint is configured: nothing is sent.
    pub fn config(&self) -> Result<Option<Config>> {
        if !(self.interval.is_finite() && self.interval >= 0.1) {
            bail!("--interval must be a number of seconds, at least 0.1");
        }
        let protocol = match self
            .otlp_protocol
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        {
            None => Protocol::HttpProtobuf,
            Some(p) => match p.trim() {
                "grpc" => Protocol::Grpc,
                "http/protobuf" => Protocol::HttpProtobuf,
                other => bail!(
                    "unsupported OTLP protocol `{other}` (--otlp-protocol / OTEL_EXPORTER_OTLP_PROTOCOL): use grpc or http/protobuf"
                ),
            },
        };
        let timeout = match env("OTEL_EXPORTER_OTLP_TIMEOUT") {
            None => Duration::from_secs(10),
            Some(ms) => match ms.trim().parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => bail!(
                    "OTEL_EXPORTER_OTLP_TIMEOUT must be a positive number of milliseconds (got `{ms}`)"
                ),
            },
        };
        let Some(endpoint) = self
            .otlp_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        else {
            if self.otlp_profiles {
                bail!("--otlp-profiles needs a collector: give --otlp-endpoint URL or set OTEL_EXPORTER_OTLP_ENDPOINT");
            }
            return Ok(None);
        };
        let endpoint = endpoint.trim().trim_end_matches('/').to_string();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            bail!("the OTLP endpoint must be an http:// or https:// URL (got `{endpoint}`)");
        }
        Ok(Some(Config {
            endpoint,
            protocol,
            timeout,
            interval: Duration::from_secs_f64(self.interval),
            top: self.otlp_top,
            profiles: self.otlp_profiles,
        }))
    }
}

/// Reports waiting for the export thread, at most: a slow collector costs
/// this many reports of memory, then reports are dropped (and counted).
const QUEUE: usize = 8;
/// The longest a failing collector is left alone before the next try.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The most spans held for a collector that is backed off from.
const MAX_PENDING_SPANS: usize = 1500;

enum Msg {
    Report(Box<Report>),
    /// The target is gone: flush its last spans and let its pipeline go.
    Forget(u32),
    Shutdown(mpsc::Sender<()>),
}

/// The handle the observation loops send to; one export thread behind it.
pub struct Exporter {
    tx: mpsc::SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    pub config: Config,
}

impl Exporter {
    pub fn start(config: Config) -> Result<Exporter> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut worker = Worker::new(config.clone(), dropped.clone())?;
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || worker.run(rx))?;
        Ok(Exporter {
            tx,
            dropped,
            thread: Some(thread),
            config,
        })
    }

    /// Hands a report over without waiting; a full queue drops it (counted).
    pub fn send(&self, report: Report) {
        if self.tx.try_send(Msg::Report(Box::new(report))).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The target exited: its pipeline flushes and goes.
    pub fn forget(&self, pid: u32) {
        let _ = self.tx.try_send(Msg::Forget(pid));
    }

    /// Interval exports not delivered so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends what is queued (one last try, whatever the backoff) and shuts
    /// the pipelines down, waiting at most `bound`. Returns the exports
    /// dropped in all.
    pub fn shutdown(mut self, bound: Duration) -> u64 {
        let (done_tx, done_rx) = mpsc::channel();
        let deadline = Instant::now() + bound;
        // The queue may be full while the thread waits on a slow collector.
        let mut msg = Msg::Shutdown(done_tx);
        let sent = loop {
            match self.tx.try_send(msg) {
                Ok(()) => break true,
                Err(mpsc::TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => break false,
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if !sent || done_rx.recv_timeout(left).is_err() {
            log(
                Level::Warning,
                &format!(
                    "OTLP: the last export did not finish within {:.0} s; leaving it",
                    bound.as_secs_f64()
                ),
            );
            // The thread goes with the process; what it held is undelivered.
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.thread.take();
        } else if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.dropped()
    }
}

/// The export thread: one pipeline (tracer and meter provider with the
/// target's resource) per target.
struct Worker {
    cfg: Config,
    rt: tokio::runtime::Runtime,
    pipelines: HashMap<u32, sdk::Pipeline>,
    dropped: Arc<AtomicU64>,
    /// Consecutive failed flushes, and when the next may be tried.
    failures: u32,
    next_try: Instant,
    failing_since: Option<Instant>,
}

impl Worker {
    fn new(cfg: Config, dropped: Arc<AtomicU64>) -> Result<Worker> {
        // The tonic exporters need a reactor for as long as they live.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("otlp-io")
            .enable_all()
            .build()?;
        Ok(Worker {
            cfg,
            rt,
            pipelines: HashMap::new(),
            dropped,
            failures: 0,
            next_try: Instant::now(),
            failing_since: None,
        })
    }

    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            match msg {
                Msg::Report(r) => self.report(&r, false),
                Msg::Forget(pid) => {
                    if let Some(mut p) = self.pipelines.remove(&pid) {
                        self.flush_one(&mut p, true);
                        // Short: other targets' exports wait meanwhile.
                        p.shutdown(self.cfg.timeout.min(Duration::from_secs(2)));
                    }
                }
                Msg::Shutdown(done) => {
                    // Whatever is still queued first, then one last flush each.
                    while let Ok(m) = rx.try_recv() {
                        if let Msg::Report(r) = m {
                            self.report(&r, true);
                        }
                    }
                    // Every last report flushed itself (urgently) above; what a
                    // backed-off collector still owes goes only if it is due.
                    let pids: Vec<u32> = self.pipelines.keys().copied().collect();
                    for pid in pids {
                        if let Some(mut p) = self.pipelines.remove(&pid) {
                            self.flush_one(&mut p, false);
                            p.shutdown(self.cfg.timeout);
                        }
                    }
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    fn report(&mut self, r: &Report, last: bool) {
        let pid = r.target.pid;
        if !self.pipelines.contains_key(&pid) {
            let _guard = self.rt.enter();
            match sdk::Pipeline::new(&self.cfg, &r.target) {
                Ok(p) => {
                    self.pipelines.insert(pid, p);
                }
                Err(e) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    self.warn_once(&format!("{e:#}"));
                    return;
                }
            }
        }
        let Some(mut p) = self.pipelines.remove(&pid) else {
            return;
        };
        let with_spans = p.pending_spans < MAX_PENDING_SPANS;
        if !with_spans {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            p.dropped += 1;
        }
        p.record(r, self.cfg.top, with_spans);
        let urgent =
            last || r.end != "running" || r.risks.iter().any(|k| k.kind == RiskKind::Fatal);
        self.flush_one(&mut p, urgent);
        self.pipelines.insert(pid, p);
    }

    /// Flushes one pipeline unless the collector is backed off from (an
    /// urgent flush, such as a fatal risk or the last one, goes anyway).
    fn flush_one(&mut self, p: &mut sdk::Pipeline, urgent: bool) {
        if p.pending_intervals == 0 {
            return;
        }
        if !urgent && Instant::now() < self.next_try {
            return;
        }
        match p.flush() {
            Ok(()) => {
                self.failures = 0;
                if let Some(since) = self.failing_since.take() {
                    log(
                        Level::Info,
                        &format!(
                            "OTLP export to {} works again after {:.0} s ({} interval export(s) dropped so far)",
                            self.cfg.endpoint,
                            since.elapsed().as_secs_f64(),
                            self.dropped.load(Ordering::Relaxed)
                        ),
                    );
                }
            }
            Err((e, lost)) => {
                self.dropped.fetch_add(lost, Ordering::Relaxed);
                p.dropped += lost;
                self.failures = self.failures.saturating_add(1);
                let backoff = self
                    .cfg
                    .interval
                    .saturating_mul(1 << (self.failures - 1).min(10))
                    .min(MAX_BACKOFF.max(self.cfg.interval));
                self.next_try = Instant::now() + backoff;
                self.warn_once(&e);
            }
        }
    }

    fn warn_once(&mut self, e: &str) {
        if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
            log(
                Level::Warning,
                &format!(
                    "OTLP export to {} failed ({e}); profiling goes on, retrying with backoff, undelivered intervals are counted in drops",
                    self.cfg.endpoint
                ),
            );
        }
    }
}
