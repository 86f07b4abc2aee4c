//! One target's OTLP pipeline: its resource, a tracer provider and a meter
//! provider over OTLP exporters that report their own failures, and the
//! instruments `render` records into. Exports happen only when the export
//! thread flushes (once per interval), never on the SDK's own timers.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, Result};
use opentelemetry::{
    metrics::{Counter, Gauge, Histogram, MeterProvider as _},
    trace::TracerProvider as _,
    InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    error::OTelSdkResult,
    metrics::{
        data::ResourceMetrics, exporter::PushMetricExporter, PeriodicReader, SdkMeterProvider,
        Temporality,
    },
    resource::{EnvResourceDetector, ResourceDetector},
    trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData},
    Resource,
};

use super::{profiles, render, Config, Protocol};
use crate::report::{Report, TargetInfo};
use opentelemetry_proto::tonic::{
    collector::profiles::v1development::ExportProfilesServiceRequest,
    resource::v1::Resource as ProtoResource,
};

/// The SDK's own timers never fire in practice: the export thread flushes.
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// The last export error a pipeline's exporters saw, taken by `flush`.
#[derive(Default, Debug)]
struct Health {
    error: Mutex<Option<String>>,
}

impl Health {
    fn note(&self, r: &OTelSdkResult) {
        if let Err(e) = r {
            *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        }
    }
    fn take(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// An exporter that tells `Health` how each export went.
#[derive(Debug)]
struct Watched<E> {
    inner: E,
    health: Arc<Health>,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Watched<E>
{
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let r = self.inner.export(batch).await;
        self.health.note(&r);
        r
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Watched<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let r = self.inner.export(metrics).await;
        self.health.note(&r);
        r
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// The instruments, named and unit-ed the OpenTelemetry way in our own
/// `map_probe.` namespace (no semantic convention covers lock contention).
pub struct Instruments {
    pub waits: Counter<u64>,
    pub wait_time: Histogram<f64>,
    pub risks: Counter<u64>,
    pub cas_attempts: Counter<u64>,
    pub cas_failures: Counter<u64>,
    pub drops: Counter<u64>,
    pub attached: Gauge<f64>,
}

pub struct Pipeline {
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    pub tracer: SdkTracer,
    pub instruments: Instruments,
    /// What the span and the metric exporter last failed with.
    span_health: Arc<Health>,
    metric_health: Arc<Health>,
    /// Intervals recorded since the last flush that reached the collector,
    /// and those whose spans a failed flush would lose.
    pub pending_intervals: u64,
    pub lost_intervals: u64,
    pub pending_spans: usize,
    /// Exports of this target dropped, and how many the drops metric has.
    pub dropped: u64,
    pub dropped_recorded: u64,
    /// Risk counts already added to the risks counter, by risk id.
    pub risk_counts: std::collections::HashMap<String, u64>,
    /// `--otlp-profiles`: the sender, the target's resource as a proto
    /// message, and the intervals' profiles not yet sent (at most
    /// `MAX_PENDING_PROFILES`; older ones go first, counted as lost).
    profiles: Option<(profiles::Sender, ProtoResource)>,
    pending_profiles: Vec<ExportProfilesServiceRequest>,
}

/// Profiles held for a collector that is backed off from.
const MAX_PENDING_PROFILES: usize = 4;

impl Pipeline {
    /// Must run inside the export thread's tokio runtime (tonic needs it).
    pub fn new(cfg: &Config, target: &TargetInfo) -> Result<Pipeline> {
        let resource = resource(target);
        let profiles = if cfg.profiles {
            Some((profiles::Sender::new(cfg)?, profiles::resource(&resource)))
        } else {
            None
        };
        let span_health = Arc::new(Health::default());
        let metric_health = Arc::new(Health::default());
        let (spans, metrics) = exporters(cfg)?;
        let spans = Watched {
            inner: spans,
            health: span_health.clone(),
        };
        let metrics = Watched {
            inner: metrics,
            health: metric_health.clone(),
        };
        let batch = BatchSpanProcessor::builder(spans)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(2048)
                    .with_max_export_batch_size(2048)
                    .with_scheduled_delay(NEVER)
                    .build(),
            )
            .build();
        let tracer_provider = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_span_processor(batch)
            .build();
        let meter_provider = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(
                PeriodicReader::builder(metrics)
                    .with_interval(NEVER)
                    .build(),
            )
            .build();
        let scope = InstrumentationScope::builder("map-probe")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let tracer = tracer_provider.tracer_with_scope(scope.clone());
        let meter = meter_provider.meter_with_scope(scope);
        let instruments = Instruments {
            waits: meter
                .u64_counter("map_probe.lock.waits")
                .with_unit("{wait}")
                .with_description("Goroutines that parked on a sync.Mutex or RWMutex (estimated: measured waits scaled by elapsed/attached time)")
                .build(),
            wait_time: meter
                .f64_histogram("map_probe.lock.wait.duration")
                .with_unit("s")
                .with_description("How long measured lock waits lasted (each at its site's mean wait for the interval)")
                .with_boundaries(render::WAIT_BOUNDARIES.to_vec())
                .build(),
            risks: meter
                .u64_counter("map_probe.concurrent_write.risks")
                .with_unit("{risk}")
                .with_description("Concurrent writes to a plain map: overlapping writers seen, or the fatal error")
                .build(),
            cas_attempts: meter
                .u64_counter("map_probe.cas.attempts")
                .with_unit("{attempt}")
                .with_description("Compare-and-swap instructions executed at a site (estimated: measured ones scaled by elapsed/attached time)")
                .build(),
            cas_failures: meter
                .u64_counter("map_probe.cas.failures")
                .with_unit("{attempt}")
                .with_description("Compare-and-swaps that failed at a site, each a retry of the loop around it (estimated)")
                .build(),
            drops: meter
                .u64_counter("map_probe.drops")
                .with_unit("{event}")
                .with_description("What map-probe could not record or deliver, by reason")
                .build(),
            attached: meter
                .f64_gauge("map_probe.probes.attached")
                .with_unit("1")
                .with_description("Share of the interval the probes of a purpose were attached")
                .build(),
        };
        Ok(Pipeline {
            tracer_provider,
            meter_provider,
            tracer,
            instruments,
            span_health,
            metric_health,
            pending_intervals: 0,
            lost_intervals: 0,
            pending_spans: 0,
            dropped: 0,
            dropped_recorded: 0,
            risk_counts: Default::default(),
            profiles,
            pending_profiles: Vec::new(),
        })
    }

    /// Records one interval's report (spans only when `with_spans`).
    pub fn record(&mut self, r: &Report, top: usize, with_spans: bool) {
        let spans = render::record(self, r, top, with_spans);
        if let Some((_, res)) = &self.profiles {
            if let Some(req) = profiles::request(r, res.clone()) {
                if self.pending_profiles.len() >= MAX_PENDING_PROFILES {
                    self.pending_profiles.remove(0);
                    self.dropped += 1;
                }
                self.pending_profiles.push(req);
            }
        }
        self.pending_intervals += 1;
        if with_spans {
            self.lost_intervals += 1;
            self.pending_spans += spans;
        }
    }

    /// Exports what was recorded. On failure, the error and how many
    /// intervals' spans were lost with it (the metrics are cumulative: they
    /// go with the next flush that works).
    pub fn flush(&mut self) -> Result<(), (String, u64)> {
        let t = self.tracer_provider.force_flush();
        let m = self.meter_provider.force_flush();
        self.pending_spans = 0;
        let spans = self
            .span_health
            .take()
            .or_else(|| t.err().map(|e| e.to_string()));
        let metrics = self
            .metric_health
            .take()
            .or_else(|| m.err().map(|e| e.to_string()));
        let mut lost = if spans.is_some() {
            self.lost_intervals
        } else {
            0
        };
        self.lost_intervals = 0;
        // Profiles after the other signals; a failed one is not retried
        // (the next interval brings its own), but counted.
        let mut profile_error = None;
        if let Some((sender, _)) = self.profiles.as_mut() {
            let pending = std::mem::take(&mut self.pending_profiles);
            let n = pending.len() as u64;
            for (i, req) in pending.into_iter().enumerate() {
                if let Err(e) = sender.send(req) {
                    lost = lost.max(n - i as u64);
                    profile_error = Some(e);
                    break;
                }
            }
        }
        match spans.or(metrics).or(profile_error) {
            None => {
                self.pending_intervals = 0;
                Ok(())
            }
            Some(e) => Err((e, lost)),
        }
    }

    pub fn shutdown(self, timeout: Duration) {
        let _ = self.tracer_provider.shutdown_with_timeout(timeout);
        let _ = self.meter_provider.shutdown_with_timeout(timeout);
    }
}

fn exporters(
    cfg: &Config,
) -> Result<(
    opentelemetry_otlp::SpanExporter,
    opentelemetry_otlp::MetricExporter,
)> {
    let err = |e: opentelemetry_otlp::ExporterBuildError| anyhow!("OTLP exporter: {e}");
    Ok(match cfg.protocol {
        Protocol::Grpc => (
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&cfg.endpoint)
                .with_timeout(cfg.timeout)
                .build()
                .map_err(err)?,
            opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(&cfg.endpoint)
                .with_timeout(cfg.timeout)
                .build()
                .map_err(err)?,
        ),
        Protocol::HttpProtobuf => (
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(format!("{}/v1/traces", cfg.endpoint))
                .with_timeout(cfg.timeout)
                .build()
                .map_err(err)?,
            opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(format!("{}/v1/metrics", cfg.endpoint))
                .with_timeout(cfg.timeout)
                .build()
                .map_err(err)?,
        ),
    })
}

/// The target's resource: `service.name` from OTEL_SERVICE_NAME, else
/// OTEL_RESOURCE_ATTRIBUTES, else the main module's path, else the
/// executable's name (the spec has OTEL_SERVICE_NAME win, which the SDK's
/// own merge does not); the target's `process.*` (the SDK can only describe
/// its own process); `host.name`; and what OTEL_RESOURCE_ATTRIBUTES adds.
pub fn resource(t: &TargetInfo) -> Resource {
    let env = EnvResourceDetector::new().detect();
    let exe_name = std::path::Path::new(&t.exe)
        .file_name()
        .map_or_else(|| t.exe.clone(), |n| n.to_string_lossy().into_owned());
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| env.get(&"service.name".into()).map(|v| v.to_string()))
        .or_else(|| t.module.clone())
        .unwrap_or_else(|| exe_name.clone());
    let ours = vec![
        KeyValue::new("service.name", service),
        KeyValue::new("process.pid", i64::from(t.pid)),
        KeyValue::new("process.executable.name", exe_name),
        KeyValue::new("process.executable.path", t.exe.clone()),
        KeyValue::new("process.runtime.name", "go"),
        KeyValue::new("process.runtime.version", t.go_version.clone()),
        KeyValue::new("host.name", host_name()),
    ];
    let mut attrs: Vec<KeyValue> = env
        .iter()
        .filter(|(k, _)| !ours.iter().any(|o| o.key == **k))
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    attrs.extend(ours);
    Resource::builder_empty().with_attributes(attrs).build()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
