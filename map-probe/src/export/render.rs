//! What of one interval's `Report` becomes which span and data point. Only
//! renders: everything it shows is in the report.
//!
//! - one span per concurrent-write risk (`risk.concurrent_write` = true),
//!   from first to last seen, each writer a span event with its stack in
//!   `code.stacktrace`, status error for a fatal one;
//! - one span per contended call site of the interval (the top N);
//! - metrics: `map_probe.lock.waits` and `map_probe.lock.wait.duration` per
//!   site and lock kind (top N, the rest folded into one series),
//!   `map_probe.concurrent_write.risks`, `map_probe.drops` by reason,
//!   `map_probe.probes.attached` per purpose.

use std::{
    hash::{Hash, Hasher},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry::{
    trace::{Span as _, SpanKind, Status, Tracer as _},
    KeyValue,
};

use super::sdk::Pipeline;
use crate::report::{FrameOut, Report, Risk, RiskKind, Site};

/// Histogram bucket bounds for lock waits, in seconds: 1 µs to 10 s.
pub const WAIT_BOUNDARIES: [f64; 15] = [
    1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 1.0, 10.0,
];

/// The function of the series every site past the top N is folded into.
pub const FOLDED: &str = "(other sites)";

/// One metric series: a top site, or the fold of the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteSeries {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub kind: Option<&'static str>,
    pub count: u64,
    pub timed: u64,
    pub wait_ns: u64,
}

/// The top `top` sites as their own series, the rest as one (absent when
/// there is no rest): bounded cardinality, nothing left out of the totals.
pub fn folded_sites(sites: &[Site], top: usize) -> Vec<SiteSeries> {
    let mut out: Vec<SiteSeries> = sites
        .iter()
        .take(top)
        .map(|s| SiteSeries {
            function: s.function.clone(),
            file: Some(s.file.clone()),
            line: Some(s.line),
            kind: Some(s.kind.as_str()),
            count: s.count,
            timed: s.wait.timed,
            wait_ns: s.wait.total_ns,
        })
        .collect();
    if sites.len() > top {
        let mut rest = SiteSeries {
            function: FOLDED.into(),
            file: None,
            line: None,
            kind: None,
            count: 0,
            timed: 0,
            wait_ns: 0,
        };
        for s in &sites[top..] {
            rest.count += s.count;
            rest.timed += s.wait.timed;
            rest.wait_ns += s.wait.total_ns;
        }
        out.push(rest);
    }
    out
}

fn at(unix_nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(unix_nanos)
}

fn code_attrs(function: &str, file: &str, line: u32) -> [KeyValue; 3] {
    [
        KeyValue::new("code.function.name", function.to_string()),
        KeyValue::new("code.file.path", file.to_string()),
        KeyValue::new("code.line.number", i64::from(line)),
    ]
}

/// A stack as Go prints one: `function` then a tab and `file:line`.
pub fn stacktrace(frames: &[FrameOut]) -> String {
    let mut s = String::new();
    for f in frames {
        s.push_str(&f.function);
        s.push_str("\n\t");
        s.push_str(&f.file);
        s.push(':');
        s.push_str(&f.line.to_string());
        s.push('\n');
    }
    s
}

/// A stable id for a risk, the same in every interval it shows up in.
pub fn risk_id(pid: u32, r: &Risk) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pid.hash(&mut h);
    r.map.hash(&mut h);
    matches!(r.kind, RiskKind::Fatal).hash(&mut h);
    for w in &r.writers {
        (&w.function, &w.file, w.line).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// Records `r` into the pipeline's tracer and instruments; returns the
/// number of spans made.
pub fn record(p: &mut Pipeline, r: &Report, top: usize, with_spans: bool) -> usize {
    let start = at(r.sampling.start_unix_nanos);
    let end = start + Duration::from_secs_f64(r.sampling.elapsed_secs.max(0.0));
    let mut spans = 0;
    if with_spans {
        for risk in &r.risks {
            risk_span(p, r, risk);
            spans += 1;
        }
        for s in r.sites.iter().take(top) {
            site_span(p, s, start, end);
            spans += 1;
        }
    }
    let ins = &p.instruments;
    for s in folded_sites(&r.sites, top) {
        let mut attrs = vec![KeyValue::new("code.function.name", s.function.clone())];
        if let (Some(file), Some(line)) = (&s.file, s.line) {
            attrs.push(KeyValue::new("code.file.path", file.clone()));
            attrs.push(KeyValue::new("code.line.number", i64::from(line)));
        }
        if let Some(kind) = s.kind {
            attrs.push(KeyValue::new("map_probe.lock.kind", kind));
        }
        ins.waits.add(s.count, &attrs);
        if s.timed > 0 {
            let mean = s.wait_ns as f64 / s.timed as f64 / 1e9;
            for _ in 0..s.timed {
                ins.wait_time.record(mean, &attrs);
            }
        }
    }
    for c in r.cas.iter().take(top) {
        let mut attrs = code_attrs(&c.function, &c.file, c.line).to_vec();
        if let Some(caller) = &c.caller {
            attrs.push(KeyValue::new("map_probe.caller", caller.function.clone()));
        }
        ins.cas_attempts.add(c.attempts, &attrs);
        ins.cas_failures.add(c.failures, &attrs);
    }
    let pid = r.target.pid;
    for risk in &r.risks {
        let id = risk_id(pid, risk);
        let before = p.risk_counts.insert(id, risk.count).unwrap_or(0);
        let kind = match risk.kind {
            RiskKind::Overlap => "overlap",
            RiskKind::Fatal => "fatal",
        };
        ins.risks.add(
            risk.count.saturating_sub(before),
            &[KeyValue::new("map_probe.risk.kind", kind)],
        );
    }
    let d = &r.drops;
    let export_drops = p.dropped - p.dropped_recorded;
    p.dropped_recorded = p.dropped;
    for (reason, n) in [
        ("stack_lost", d.stack_lost),
        ("site_map_full", d.site_map_full),
        ("inflight_full", d.inflight_full),
        ("otlp_export", export_drops),
    ] {
        ins.drops
            .add(n, &[KeyValue::new("map_probe.drop.reason", reason)]);
    }
    let elapsed = r.sampling.elapsed_secs.max(1e-9);
    ins.attached.record(
        (r.sampling.attached_secs / elapsed).min(1.0),
        &[KeyValue::new("map_probe.probe.purpose", "lock_wait")],
    );
    if let Some(m) = &r.sampling.map_writes {
        ins.attached.record(
            (m.attached_secs / elapsed).min(1.0),
            &[KeyValue::new("map_probe.probe.purpose", "map_write")],
        );
    }
    if let Some(c) = &r.sampling.cas {
        ins.attached.record(
            (c.attached_secs / elapsed).min(1.0),
            &[KeyValue::new("map_probe.probe.purpose", "cas")],
        );
    }
    spans
}

fn site_span(p: &Pipeline, s: &Site, start: SystemTime, end: SystemTime) {
    let mut attrs = code_attrs(&s.function, &s.file, s.line).to_vec();
    attrs.extend([
        KeyValue::new("map_probe.lock.kind", s.kind.as_str()),
        KeyValue::new("map_probe.lock.waits", s.count as i64),
        KeyValue::new("map_probe.lock.waits.raw", s.raw_count as i64),
        KeyValue::new("map_probe.lock.wait.timed", s.wait.timed as i64),
        KeyValue::new("map_probe.lock.wait.total_ns", s.wait.total_ns as i64),
        KeyValue::new("map_probe.lock.wait.mean_ns", s.wait.mean_ns as i64),
        KeyValue::new("map_probe.lock.wait.max_ns", s.wait.max_ns as i64),
        KeyValue::new("code.stacktrace", stacktrace(&s.stack)),
    ]);
    let mut span = p
        .tracer
        .span_builder("map_probe.lock.contention")
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attrs)
        .start(&p.tracer);
    span.end_with_timestamp(end);
}

fn risk_span(p: &Pipeline, r: &Report, risk: &Risk) {
    let first = risk.writers.first();
    let start = at(risk.first_seen_unix_nanos);
    let last_ns = risk.first_seen_unix_nanos
        + ((risk.last_seen_secs - risk.first_seen_secs).max(0.0) * 1e9) as u64;
    let end = at(last_ns);
    let kind = match risk.kind {
        RiskKind::Overlap => "overlap",
        RiskKind::Fatal => "fatal",
    };
    let mut attrs = vec![
        KeyValue::new("risk.concurrent_write", true),
        KeyValue::new("map_probe.risk.kind", kind),
        KeyValue::new("map_probe.risk.id", risk_id(r.target.pid, risk)),
        KeyValue::new("map_probe.risk.count", risk.count as i64),
    ];
    if !risk.message.is_empty() {
        attrs.push(KeyValue::new(
            "map_probe.risk.message",
            risk.message.clone(),
        ));
    }
    if let Some(m) = &risk.map {
        attrs.push(KeyValue::new("map_probe.map.address", m.clone()));
    }
    if let Some(w) = first {
        attrs.extend(code_attrs(&w.function, &w.file, w.line));
    }
    let mut span = p
        .tracer
        .span_builder("map_probe.concurrent_write")
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attrs)
        .start(&p.tracer);
    for w in &risk.writers {
        let mut ev = vec![
            KeyValue::new("map_probe.goroutine.id", w.goroutine as i64),
            KeyValue::new("map_probe.writer.state", w.state.clone()),
            KeyValue::new("code.stacktrace", stacktrace(&w.stack)),
        ];
        ev.extend(code_attrs(&w.function, &w.file, w.line));
        span.add_event_with_timestamp("map_probe.writer", start, ev);
    }
    if risk.kind == RiskKind::Fatal {
        let msg = if risk.message.is_empty() {
            "fatal error".to_string()
        } else {
            format!("fatal error: {}", risk.message)
        };
        span.set_status(Status::error(msg));
    }
    span.end_with_timestamp(end.max(start));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        catalog::Kind,
        report::{Site, Wait},
    };

    fn site(function: &str, count: u64) -> Site {
        Site {
            function: function.into(),
            file: "/src/x.go".into(),
            line: 7,
            kind: Kind::Mutex,
            count,
            raw_count: count,
            scale: 1.0,
            observed_share: 1.0,
            count_error: 0.0,
            measured: "call-site".into(),
            timed_at: "after-call".into(),
            wait: Wait {
                timed: count,
                total_ns: count * 1000,
                mean_ns: 1000,
                max_ns: 1000,
                delay_ns: count * 1000,
                p50_ns: 1000,
                p90_ns: 1000,
                p99_ns: 1000,
                hist: Vec::new(),
            },
            probe: String::new(),
            lock: None,
            lock_symbol: None,
            locks: 1,
            caller: None,
            shards: None,
            sync_map: None,
            stacks: 1,
            stack: Vec::new(),
        }
    }

    #[test]
    fn the_rest_is_folded_into_one_series() {
        let sites = vec![site("a", 30), site("b", 20), site("c", 5), site("d", 1)];
        let s = folded_sites(&sites, 2);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].function, "a");
        assert_eq!(s[2].function, FOLDED);
        assert_eq!((s[2].count, s[2].timed, s[2].wait_ns), (6, 6, 6000));
        assert_eq!(s[2].kind, None);
        assert_eq!(folded_sites(&sites, 10).len(), 4);
    }

    #[test]
    fn stacks_read_like_go_tracebacks() {
        let f = FrameOut {
            function: "main.writer".into(),
            file: "/src/mapcrash/main.go".into(),
            line: 17,
            inlined: false,
            start_line: 0,
        };
        assert_eq!(
            stacktrace(&[f]),
            "main.writer\n\t/src/mapcrash/main.go:17\n"
        );
    }
}
