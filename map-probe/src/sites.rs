//! From the kernel's aggregates to the report's call sites: each stack
//! symbolized, its user frame found past the lock machinery, the lock kind
//! read from the frames in between, and stacks merged per site.

use std::collections::HashMap;

use crate::{
    aggregate::RawSite,
    catalog::{Kind, Point},
    report::{FrameOut, ProbeOut, Site, StackCount, Wait},
    symbolize::Symbolizer,
};

/// Frames that belong to the lock and map machinery rather than the user's code.
pub fn is_machinery(function: &str) -> bool {
    // Runtime assembly (aeshashbody, memeqbody, ...) has no package prefix.
    !function.contains('.')
        || [
            "sync.",
            "internal/sync.",
            "runtime.",
            "sync/atomic.",
            "internal/runtime/",
        ]
        .iter()
        .any(|p| function.starts_with(p))
}

/// The user's frame in a stack: the innermost one outside the machinery.
pub fn site_of(frames: &[FrameOut]) -> FrameOut {
    frames
        .iter()
        .find(|f| !is_machinery(&f.function))
        .or(frames.last())
        .cloned()
        .unwrap_or(FrameOut {
            function: "?".into(),
            file: "?".into(),
            line: 0,
            inlined: false,
        })
}

/// The site is the innermost frame outside the lock machinery (the user's
/// function that called Lock, inlined or not); the machinery frames in
/// between tell which kind of wait it was. None for a stack that never
/// leaves the machinery: the frame-pointer walk stopped early.
fn classify(frames: &[FrameOut], probe_kind: Kind) -> Option<(usize, Kind)> {
    let site = frames.iter().position(|f| !is_machinery(&f.function))?;
    let mut kind = probe_kind;
    if kind == Kind::Mutex {
        for f in &frames[..site] {
            match f.function.as_str() {
                "sync.(*RWMutex).RLock" => kind = Kind::RwmutexRead,
                "sync.(*RWMutex).Lock" => kind = Kind::RwmutexWrite,
                _ => continue,
            }
            break;
        }
    }
    Some((site, kind))
}

pub fn probe_hits(raw: &[RawSite], points: &[Point]) -> Vec<ProbeOut> {
    points
        .iter()
        .enumerate()
        .map(|(i, p)| ProbeOut {
            symbol: p.symbol.to_string(),
            kind: p.kind,
            entry_offset: p.entry_offset,
            ret_offsets: p.ret_offsets.len(),
            raw_hits: raw
                .iter()
                .filter(|r| r.point == i)
                .map(|r| r.stats.count)
                .sum(),
        })
        .collect()
}

/// The waits of one aggregation key, timed or not, times their mean wait:
/// a wait whose end fell outside a window is as long as the ones timed.
fn delay(s: &map_probe_common::SiteStats) -> u64 {
    match s.timed {
        0 => 0,
        t => (s.wait_ns as f64 * s.count.max(t) as f64 / t as f64).round() as u64,
    }
}

/// The ranked sites, every stack for the flamegraph, and how many raw waits
/// had a stack that never left the lock machinery (the frame-pointer walk
/// stopped early), counted as drops rather than shown as a site named after
/// `sync` internals.
pub fn build_sites(
    raw: &[RawSite],
    points: &[Point],
    sym: &mut Symbolizer,
    scale: f64,
) -> (Vec<Site>, Vec<StackCount>, u64) {
    struct Acc {
        site: FrameOut,
        kind: Kind,
        raw: u64,
        timed: u64,
        wait_ns: u64,
        max_ns: u64,
        /// Raw waits times their mean wait: the delay of every counted wait,
        /// timed or not.
        delay_ns: u64,
        probes: Vec<&'static str>,
        /// Index into `uniq` -> waits through that stack.
        stacks: HashMap<usize, u64>,
    }
    let mut by_site: HashMap<(Kind, String, String, u32), Acc> = HashMap::new();
    // Every distinct stack once (a full table holds 16,384 of them, tens of
    // frames each), found again by its hash; sites refer to it by index.
    let mut uniq: Vec<StackCount> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut incomplete = 0;
    for r in raw {
        let Some(point) = points.get(r.point) else {
            continue;
        };
        let frames: Vec<FrameOut> = sym
            .stack(&r.pcs, r.first_is_ip)
            .iter()
            .map(FrameOut::from)
            .collect();
        if frames.is_empty() {
            continue;
        }
        let Some((at, kind)) = classify(&frames, point.kind) else {
            // A lost stack (only the caller is known) is in `stack_lost` already.
            if r.first_is_ip {
                incomplete += r.stats.count;
            }
            continue;
        };
        let site = frames[at].clone();
        let key = (kind, site.function.clone(), site.file.clone(), site.line);
        let acc = by_site.entry(key).or_insert_with(|| Acc {
            site,
            kind,
            raw: 0,
            timed: 0,
            wait_ns: 0,
            max_ns: 0,
            delay_ns: 0,
            probes: Vec::new(),
            stacks: HashMap::new(),
        });
        acc.raw += r.stats.count;
        acc.timed += r.stats.timed;
        acc.wait_ns += r.stats.wait_ns;
        acc.max_ns = acc.max_ns.max(r.stats.max_wait_ns);
        acc.delay_ns += delay(&r.stats);
        if !acc.probes.contains(&point.symbol) {
            acc.probes.push(point.symbol);
        }
        let h = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (kind, &frames).hash(&mut h);
            h.finish()
        };
        let i = *index.entry(h).or_insert_with(|| {
            uniq.push(StackCount {
                kind,
                frames,
                count: 0,
                delay_ns: 0,
            });
            uniq.len() - 1
        });
        uniq[i].count += r.stats.count;
        uniq[i].delay_ns += delay(&r.stats);
        *acc.stacks.entry(i).or_default() += r.stats.count;
    }
    drop(index);
    let scaled = |n: u64| (n as f64 * scale).round() as u64;
    let mut sites: Vec<Site> = by_site
        .into_values()
        .map(|a| {
            let stacks = a.stacks.len();
            let stack = a
                .stacks
                .into_iter()
                .max_by(|x, y| {
                    x.1.cmp(&y.1)
                        .then_with(|| uniq[y.0].frames.len().cmp(&uniq[x.0].frames.len()))
                })
                .map(|(i, _)| uniq[i].frames.clone())
                .unwrap_or_default();
            Site {
                function: a.site.function,
                file: a.site.file,
                line: a.site.line,
                kind: a.kind,
                count: scaled(a.raw),
                raw_count: a.raw,
                wait: Wait {
                    timed: a.timed,
                    total_ns: a.wait_ns,
                    mean_ns: a.wait_ns.checked_div(a.timed).unwrap_or(0),
                    max_ns: a.max_ns,
                    delay_ns: scaled(a.delay_ns),
                },
                probe: a.probes.join(","),
                stacks,
                stack,
            }
        })
        .collect();
    sites.sort_by(|a, b| {
        b.raw_count
            .cmp(&a.raw_count)
            .then(b.wait.total_ns.cmp(&a.wait.total_ns))
            .then_with(|| a.function.cmp(&b.function))
    });
    let mut stacks = uniq;
    for s in &mut stacks {
        s.count = scaled(s.count);
        s.delay_ns = scaled(s.delay_ns);
    }
    stacks.sort_by_key(|s| std::cmp::Reverse(s.count));
    (sites, stacks, incomplete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str) -> FrameOut {
        FrameOut {
            function: name.into(),
            file: "x.go".into(),
            line: 1,
            inlined: false,
        }
    }

    #[test]
    fn site_skips_lock_machinery_and_reads_the_kind() {
        let frames = vec![
            f("sync.runtime_SemacquireMutex"),
            f("sync.(*Mutex).lockSlow"),
            f("sync.(*Mutex).Lock"),
            f("sync.(*RWMutex).Lock"),
            f("main.writeConfig"),
            f("runtime.goexit"),
        ];
        assert_eq!(
            classify(&frames, Kind::Mutex),
            Some((4, Kind::RwmutexWrite))
        );
        let frames = vec![
            f("sync.runtime_SemacquireMutex"),
            f("sync.(*RWMutex).RLock"),
            f("main.read"),
        ];
        assert_eq!(classify(&frames, Kind::Mutex), Some((2, Kind::RwmutexRead)));
        let frames = vec![f("internal/sync.runtime_SemacquireMutex"), f("main.hot")];
        assert_eq!(classify(&frames, Kind::Mutex), Some((1, Kind::Mutex)));
        // A dedicated RWMutex probe keeps its kind.
        let frames = vec![f("sync.runtime_SemacquireRWMutexR"), f("main.read")];
        assert_eq!(
            classify(&frames, Kind::RwmutexRead),
            Some((1, Kind::RwmutexRead))
        );
        // A lost stack is no site, not one named after sync's internals.
        let frames = vec![f("sync.(*Mutex).lockSlow")];
        assert_eq!(classify(&frames, Kind::Mutex), None);
        let frames = vec![f("sync.runtime_SemacquireMutex"), f("runtime.goexit")];
        assert_eq!(classify(&frames, Kind::Mutex), None);
    }
}
