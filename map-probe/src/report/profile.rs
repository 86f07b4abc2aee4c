//! What a pprof file and an OTLP profile share: the report's stacks as
//! samples over interned strings, functions and locations. A location is one
//! physical frame with the calls inlined into it, innermost first (Go's
//! order: the Lines of a pprof Location). `pprof` and `export::profiles`
//! only map these tables onto their own messages.
//!
//! Every table keeps a zero entry at index 0 (the empty string, an empty
//! function, an empty location), which is what both formats want: pprof's
//! IDs start at 1 and its string table at "", and OTLP's dictionaries must
//! start with a zero value. So an index here is a pprof ID and an OTLP index.

use std::collections::HashMap;

use super::{FrameOut, Report};
use crate::catalog::Kind;

/// The sample types, as Go's own mutex profile names them.
pub const CONTENTIONS: (&str, &str) = ("contentions", "count");
/// The third sample type of a pprof file where CAS failures were seen.
pub const CAS_FAILURES: (&str, &str) = ("cas_failures", "count");
pub const DELAY: (&str, &str) = ("delay", "nanoseconds");
/// The sample label (pprof) and attribute (OTLP) carrying the lock kind.
pub const KIND_KEY: &str = "lock.kind";

#[derive(Default, Debug)]
pub struct Strings {
    pub table: Vec<String>,
    index: HashMap<String, usize>,
}

impl Strings {
    fn new() -> Strings {
        let mut s = Strings::default();
        s.intern("");
        s
    }

    pub fn intern(&mut self, s: &str) -> usize {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), self.table.len() - 1);
        self.table.len() - 1
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Function {
    /// String indexes; the name is also the system name (Go writes both alike).
    pub name: usize,
    pub file: usize,
    pub start_line: i64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Line {
    pub function: usize,
    pub line: i64,
}

#[derive(Clone, Debug, Default)]
pub struct Location {
    /// Innermost first: the inlined calls, then the frame they sit in.
    pub lines: Vec<Line>,
}

#[derive(Clone, Debug)]
pub struct Sample {
    /// Location indexes, innermost (the leaf) first.
    pub locations: Vec<usize>,
    pub kind: Kind,
    /// Estimated waits and estimated total wait, scaled as in the report.
    pub contentions: i64,
    pub delay_ns: i64,
    /// Estimated failed CASes (CAS samples, `build_with_cas` only).
    pub cas_failures: i64,
}

#[derive(Debug)]
pub struct Tables {
    pub strings: Strings,
    pub functions: Vec<Function>,
    pub locations: Vec<Location>,
    pub samples: Vec<Sample>,
}

/// One sample per stack with waits, over interned tables.
pub fn build(report: &Report) -> Tables {
    build_with(report, false)
}

/// `build`, plus one sample per CAS stack that failed (its waits and delay
/// zero), kind `cas`.
pub fn build_with_cas(report: &Report) -> Tables {
    build_with(report, true)
}

fn build_with(report: &Report, cas: bool) -> Tables {
    let mut t = Tables {
        strings: Strings::new(),
        functions: vec![Function::default()],
        locations: vec![Location::default()],
        samples: Vec::new(),
    };
    let mut functions: HashMap<Function, usize> = HashMap::new();
    let mut locations: HashMap<Vec<Line>, usize> = HashMap::new();
    let lock_samples = report
        .stacks
        .iter()
        .filter(|s| s.count > 0)
        .map(|s| (&s.frames[..], s.kind, s.count, s.delay_ns, 0));
    let cas_samples = report
        .cas_stacks
        .iter()
        .filter(|s| cas && s.failures > 0)
        .map(|s| (&s.frames[..], Kind::Cas, 0, 0, s.failures));
    for (frames, kind, count, delay_ns, cas_failures) in lock_samples.chain(cas_samples) {
        let mut ids = Vec::new();
        let mut lines = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            lines.push(Line {
                function: function(&mut t, &mut functions, f),
                line: i64::from(f.line),
            });
            // A frame not inlined ends a location (so does the outermost one).
            if !f.inlined || i + 1 == frames.len() {
                let key = std::mem::take(&mut lines);
                let id = *locations.entry(key.clone()).or_insert_with(|| {
                    t.locations.push(Location { lines: key });
                    t.locations.len() - 1
                });
                ids.push(id);
            }
        }
        t.samples.push(Sample {
            locations: ids,
            kind,
            contentions: i64::try_from(count).unwrap_or(i64::MAX),
            delay_ns: i64::try_from(delay_ns).unwrap_or(i64::MAX),
            cas_failures: i64::try_from(cas_failures).unwrap_or(i64::MAX),
        });
    }
    t
}

fn function(t: &mut Tables, seen: &mut HashMap<Function, usize>, f: &FrameOut) -> usize {
    let key = Function {
        name: t.strings.intern(&f.function),
        file: t.strings.intern(&f.file),
        start_line: i64::from(f.start_line),
    };
    *seen.entry(key).or_insert_with(|| {
        t.functions.push(key);
        t.functions.len() - 1
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::StackCount;

    pub(crate) fn frame(function: &str, line: u32, inlined: bool) -> FrameOut {
        FrameOut {
            function: function.into(),
            file: "/src/main.go".into(),
            line,
            inlined,
            start_line: 10,
        }
    }

    #[test]
    fn inlined_frames_share_their_callers_location() {
        let frames = vec![
            frame("internal/sync.runtime_SemacquireMutex", 94, false),
            frame("sync.(*Mutex).Lock", 70, true),
            frame("main.hot", 12, false),
            frame("runtime.goexit", 1700, false),
        ];
        let stacks = vec![
            StackCount {
                kind: Kind::Mutex,
                frames: frames.clone(),
                count: 5,
                delay_ns: 500,
            },
            StackCount {
                kind: Kind::Mutex,
                frames: frames[1..].to_vec(),
                count: 0,
                delay_ns: 0,
            },
        ];
        let t = build(&crate::report::tests::report_with(stacks));
        assert_eq!(t.samples.len(), 1, "stacks without waits are left out");
        let s = &t.samples[0];
        assert_eq!(s.locations.len(), 3);
        let names = |loc: usize| -> Vec<&str> {
            t.locations[loc]
                .lines
                .iter()
                .map(|l| t.strings.table[t.functions[l.function].name].as_str())
                .collect()
        };
        assert_eq!(names(s.locations[1]), ["sync.(*Mutex).Lock", "main.hot"]);
        assert_eq!((s.contentions, s.delay_ns), (5, 500));
        assert_eq!(t.strings.table[0], "");
        assert_eq!(t.functions[0], Function::default());
    }
}
