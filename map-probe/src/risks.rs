//! Concurrent writes to plain maps, as the kernel saw them: overlapping
//! writers, the fatal error that ends a racy program, and what every other
//! thread was doing at that moment. Turned into `report::Risk`s, each ready
//! to travel as a `risk.concurrent_write` span.

use std::collections::HashMap;

use anyhow::Result;
use map_probe_common::{Fatal, FATAL_MSG};

use crate::{
    catalog::{is_map_write_frame, Plan},
    probes::Probes,
    report::{FrameOut, Risk, RiskKind, WriterOut},
    sites::{is_machinery, site_of},
    symbolize::Symbolizer,
};

/// Converts kernel timestamps (CLOCK_MONOTONIC ns) to run-relative seconds
/// and Unix time.
#[derive(Clone, Copy)]
pub struct Clock {
    mono_start_ns: u64,
    unix_start_ns: u64,
}

impl Clock {
    pub fn now() -> Clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Clock {
            mono_start_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            unix_start_ns: unix,
        }
    }
    fn secs(&self, ns: u64) -> f64 {
        (ns as f64 - self.mono_start_ns as f64) / 1e9
    }
    fn unix(&self, ns: u64) -> u64 {
        (self.unix_start_ns as i128 + ns as i128 - self.mono_start_ns as i128).max(0) as u64
    }
}

struct Ctx<'a, 'b> {
    probes: &'a Probes,
    sym: &'a mut Symbolizer<'b>,
}

impl Ctx<'_, '_> {
    /// Frames for a stack captured at a probe on a function's first
    /// instructions, with the caller the frame-pointer walk misses.
    fn stack_at_probe(&mut self, stack_id: i32, caller: u64) -> Vec<FrameOut> {
        let (pcs, first_is_ip) = self.probes.stack_at_entry(stack_id, caller);
        self.sym
            .stack(&pcs, first_is_ip)
            .iter()
            .map(FrameOut::from)
            .collect()
    }

    /// Frames for a stack caught mid-function (a signal delivery).
    fn stack_anywhere(&mut self, stack_id: i32) -> Vec<FrameOut> {
        let pcs = if stack_id >= 0 {
            self.probes.stack(stack_id).unwrap_or_default()
        } else {
            Vec::new()
        };
        self.sym
            .stack(&pcs, true)
            .iter()
            .map(FrameOut::from)
            .collect()
    }
}

/// Standard-library packages have no dot in their first path element
/// (`strconv`, `net/http`); `main` and modules (`github.com/...`) are the
/// user's.
fn is_std(function: &str) -> bool {
    let first = match function.find('/') {
        Some(i) => &function[..i],
        None => function.split('.').next().unwrap_or(function),
    };
    first != "main" && !first.contains('.')
}

/// The writer's line in the user's code: the innermost frame outside the
/// runtime and the standard library (a write reached through `strconv` or
/// `url.Values.Set` is the caller's), else the innermost outside the runtime.
fn user_site(stack: &[FrameOut]) -> FrameOut {
    stack
        .iter()
        .find(|f| !is_machinery(&f.function) && !is_std(&f.function))
        .cloned()
        .unwrap_or_else(|| site_of(stack))
}

fn writer(goroutine: u64, state: &str, stack: Vec<FrameOut>) -> WriterOut {
    let site = user_site(&stack);
    WriterOut {
        goroutine,
        state: state.into(),
        function: site.function.clone(),
        file: site.file.clone(),
        line: site.line,
        stack,
    }
}

pub fn collect(
    probes: &Probes,
    maps: Option<&Plan>,
    sym: &mut Symbolizer,
    clock: Clock,
) -> Result<Vec<Risk>> {
    let mut cx = Ctx { probes, sym };
    let mut risks = overlaps(&mut cx, maps, clock)?;
    if let Some(f) = fatal(&mut cx, &risks, clock)? {
        risks.insert(0, f);
    }
    Ok(risks)
}

fn overlaps(cx: &mut Ctx, maps: Option<&Plan>, clock: Clock) -> Result<Vec<Risk>> {
    // Two goroutines writing one map from the same pair of call sites is one
    // risk, whichever of them happened to be inside first.
    type Site = (String, u32);
    let mut by_sites: HashMap<(u64, Site, Site), Risk> = HashMap::new();
    for (k, v) in cx.probes.overlaps()? {
        let first = cx.stack_at_probe(k.first_stack, k.first_caller);
        let second = cx.stack_at_probe(k.second_stack, k.second_caller);
        let (a, b) = (site_of(&first), site_of(&second));
        let (a, b) = ((a.function.clone(), a.line), (b.function.clone(), b.line));
        let key = if a <= b { (k.map, a, b) } else { (k.map, b, a) };
        let probe = |i: u32| {
            maps.and_then(|p| p.points.get(i as usize))
                .map_or("map write", |p| p.symbol)
        };
        let r = by_sites.entry(key).or_insert_with(|| Risk {
            map: Some(format!("{:#x}", k.map)),
            kind: RiskKind::Overlap,
            message: format!(
                "two goroutines inside writes to one map at once ({} and {})",
                probe(v.first_probe),
                probe(v.second_probe)
            ),
            count: 0,
            first_seen_secs: clock.secs(v.first_ns),
            last_seen_secs: clock.secs(v.last_ns),
            first_seen_unix_nanos: clock.unix(v.first_ns),
            writers: vec![
                writer(v.first_goid, "in-map-write", first),
                writer(v.second_goid, "in-map-write", second),
            ],
        });
        r.count += v.count;
        r.first_seen_secs = r.first_seen_secs.min(clock.secs(v.first_ns));
        r.last_seen_secs = r.last_seen_secs.max(clock.secs(v.last_ns));
        r.first_seen_unix_nanos = r.first_seen_unix_nanos.min(clock.unix(v.first_ns));
    }
    let mut out: Vec<Risk> = by_sites.into_values().collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.first_seen_secs.total_cmp(&b.first_seen_secs))
    });
    Ok(out)
}

fn message(f: &Fatal) -> String {
    let n = (f.msg_len as usize).min(FATAL_MSG);
    String::from_utf8_lossy(&f.msg[..n]).into_owned()
}

/// The crash: the throwing goroutine, every thread Go stopped to die (the
/// other writer among them when it was still inside its write), and the
/// writers earlier windows saw overlapping on the same map.
fn fatal(cx: &mut Ctx, overlaps: &[Risk], clock: Clock) -> Result<Option<Risk>> {
    let mut fatals = cx.probes.fatals()?;
    if fatals.is_empty() {
        return Ok(None);
    }
    fatals.sort_by_key(|(_, f)| f.ts_ns);
    let first = fatals[0].1;
    // The dying map: the one the throwing goroutine was seen writing, or,
    // when its write began while every map window was closed, the map of
    // the latest overlap that goroutine took part in.
    let map = fatals
        .iter()
        .map(|(_, f)| f.map)
        .find(|&m| m != 0)
        .or_else(|| {
            overlaps
                .iter()
                .filter(|r| {
                    r.writers.iter().any(|w| {
                        fatals
                            .iter()
                            .any(|(_, f)| f.goid != 0 && f.goid == w.goroutine)
                    })
                })
                .max_by(|a, b| a.last_seen_secs.total_cmp(&b.last_seen_secs))
                .and_then(|r| r.map.as_deref())
                .and_then(|m| u64::from_str_radix(m.trim_start_matches("0x"), 16).ok())
        });
    let mut writers = Vec::new();
    for (_, f) in &fatals {
        let stack = cx.stack_at_probe(f.stack_id, f.caller);
        writers.push(writer(f.goid, "throwing", stack));
    }
    let throwing: Vec<u32> = fatals.iter().map(|(tid, _)| *tid).collect();
    let mut others = cx.probes.crash_stacks()?;
    others.sort_by_key(|(_, s)| s.ts_ns);
    for (tid, s) in others {
        if throwing.contains(&tid) || s.stack_id < 0 {
            continue;
        }
        let stack = cx.stack_anywhere(s.stack_id);
        if stack.is_empty() {
            continue;
        }
        let inside = stack
            .first()
            .is_some_and(|f| is_map_write_frame(&f.function))
            || stack
                .iter()
                .take(3)
                .any(|f| is_map_write_frame(&f.function));
        let state = if inside {
            "in-map-write"
        } else if stack.iter().any(|f| !is_machinery(&f.function)) {
            "running"
        } else {
            // Parked in the scheduler: Go 1.21+ cuts the frame chain at
            // morestack, so a goroutine preempted on its way into a write
            // leaves no user frames on its thread.
            "in-runtime"
        };
        // R14 is the goroutine only in Go code; elsewhere its goid is noise.
        let goid = if s.goid < (1 << 40) { s.goid } else { 0 };
        writers.push(writer(goid, state, stack));
    }
    if let Some(m) = map {
        // Writes to the dying map still in progress (their end will never
        // come), and the goroutines that entered it meanwhile.
        // The thrower's own write is one of them: the goroutine that entered
        // the map during it is the other writer, even if it has left since.
        let throwing = |goid: u64| fatals.iter().any(|(_, f)| f.goid == goid);
        for w in cx.probes.unfinished_writes()?.iter().filter(|w| w.map == m) {
            if !throwing(w.goid) {
                let stack = cx.stack_at_probe(w.stack_id, w.caller);
                writers.push(writer(w.goid, "in-map-write", stack));
            }
            if w.overlaps > 0 && !throwing(w.second_goid) {
                let stack = cx.stack_at_probe(w.second_stack, w.second_caller);
                writers.push(writer(w.second_goid, "in-map-write", stack));
            }
        }
        let tag = format!("{m:#x}");
        for r in overlaps.iter().filter(|r| r.map.as_deref() == Some(&tag)) {
            for w in &r.writers {
                let mut w = w.clone();
                w.state = "overlapping-writer".into();
                writers.push(w);
            }
        }
    }
    Ok(Some(Risk {
        map: map.map(|m| format!("{m:#x}")),
        kind: RiskKind::Fatal,
        message: message(&first),
        count: 1,
        first_seen_secs: clock.secs(first.ts_ns),
        last_seen_secs: clock.secs(first.ts_ns),
        first_seen_unix_nanos: clock.unix(first.ts_ns),
        writers,
    }))
}

#[cfg(test)]
mod tests {
    use super::is_std;

    #[test]
    fn standard_library_is_told_from_user_code() {
        for f in [
            "strconv.FormatInt",
            "net/http.(*conn).serve",
            "encoding/json.Marshal",
        ] {
            assert!(is_std(f), "{f}");
        }
        for f in [
            "main.writer",
            "main.main.func1",
            "github.com/x/y.(*T).Put",
            "example.com/m.F",
        ] {
            assert!(!is_std(f), "{f}");
        }
    }
}
