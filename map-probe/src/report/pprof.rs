//! A gzipped pprof profile shaped like Go's own mutex profile, so `go tool
//! pprof`, Pyroscope and Parca read it as one: period type
//! `contentions/count` with period 1, sample types `contentions/count` and
//! `delay/nanoseconds`, one sample per stack, locations with their inlined
//! calls as several Lines (innermost first), functions with name, file and
//! start line, and one mapping for the executable with its build ID and the
//! flags that tell pprof the profile is symbolized already (a stripped
//! binary needs nothing from its file).
//!
//! The messages are written by hand on prost (the one opentelemetry-proto
//! uses); the `pprof` crate would bring an older prost and a CPU profiler.
//! Values are the report's estimated counts and delays (scaled), as in the
//! JSON; the stacks are the waiter's, at the wait, where Go's profile has
//! the unlocker's (see the README).

use std::io::Write;

use anyhow::Result;
use flate2::{write::GzEncoder, Compression};
use prost::Message;

use super::{
    profile::{self, CAS_FAILURES, CONTENTIONS, DELAY, KIND_KEY},
    Report,
};

#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// The profile message (not yet encoded), for tests and for `render`.
pub fn profile(report: &Report) -> Profile {
    // Go's mutex profile has two sample types; a third, only where CAS
    // failures were seen, keeps `-diff_base` against it working otherwise.
    let with_cas = report.cas_stacks.iter().any(|s| s.failures > 0);
    let mut t = if with_cas {
        profile::build_with_cas(report)
    } else {
        profile::build(report)
    };
    let mut vt = |(ty, unit): (&str, &str)| ValueType {
        r#type: t.strings.intern(ty) as i64,
        unit: t.strings.intern(unit) as i64,
    };
    let mut sample_type = vec![vt(CONTENTIONS), vt(DELAY)];
    if with_cas {
        sample_type.push(vt(CAS_FAILURES));
    }
    let period_type = Some(vt(CONTENTIONS));
    let kind_key = t.strings.intern(KIND_KEY) as i64;
    let sample = t
        .samples
        .iter()
        .map(|s| Sample {
            location_id: s.locations.iter().map(|&l| l as u64).collect(),
            value: if with_cas {
                vec![s.contentions, s.delay_ns, s.cas_failures]
            } else {
                vec![s.contentions, s.delay_ns]
            },
            label: vec![Label {
                key: kind_key,
                str: t.strings.intern(s.kind.as_str()) as i64,
            }],
        })
        .collect();
    let (start, limit, offset) = report.target.text_mapping;
    let mapping = vec![Mapping {
        id: 1,
        memory_start: start,
        memory_limit: limit,
        file_offset: offset,
        filename: t.strings.intern(&report.target.exe) as i64,
        build_id: t
            .strings
            .intern(report.target.build_id.as_deref().unwrap_or_default()) as i64,
        has_functions: true,
        has_filenames: true,
        has_line_numbers: true,
        has_inline_frames: true,
    }];
    let location = t
        .locations
        .iter()
        .enumerate()
        .skip(1)
        .map(|(id, l)| Location {
            id: id as u64,
            mapping_id: 1,
            // Stacks are kept by frame, not by PC: pprof needs none, since
            // the profile is symbolized (has_functions and the rest).
            address: 0,
            line: l
                .lines
                .iter()
                .map(|ln| Line {
                    function_id: ln.function as u64,
                    line: ln.line,
                })
                .collect(),
        })
        .collect();
    let function = t
        .functions
        .iter()
        .enumerate()
        .skip(1)
        .map(|(id, f)| Function {
            id: id as u64,
            name: f.name as i64,
            system_name: f.name as i64,
            filename: f.file as i64,
            start_line: f.start_line,
        })
        .collect();
    let comment = vec![t.strings.intern(&format!(
        "map-probe: lock waits charged to the waiter's stack at the wait; counts estimated (raw x {:.2}), {} probe window(s)",
        report.sampling.scale, report.sampling.windows
    )) as i64];
    Profile {
        sample_type,
        sample,
        mapping,
        location,
        function,
        string_table: t.strings.table,
        time_nanos: i64::try_from(report.sampling.start_unix_nanos).unwrap_or(i64::MAX),
        duration_nanos: (report.sampling.elapsed_secs * 1e9).round() as i64,
        period_type,
        period: 1,
        comment,
    }
}

/// The gzipped profile, as `go tool pprof` reads it.
pub fn render(report: &Report) -> Result<Vec<u8>> {
    let raw = profile(report).encode_to_vec();
    let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 3), Compression::default());
    gz.write_all(&raw)?;
    Ok(gz.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        catalog::Kind,
        report::{profile::tests::frame, tests::report_with, StackCount},
    };

    #[test]
    fn shaped_like_gos_mutex_profile() {
        let frames = vec![
            frame("internal/sync.runtime_SemacquireMutex", 94, false),
            frame("sync.(*Mutex).Lock", 70, true),
            frame("main.hot", 12, false),
        ];
        let r = report_with(vec![StackCount {
            kind: Kind::Mutex,
            frames,
            count: 7,
            delay_ns: 7000,
        }]);
        let bytes = render(&r).unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut raw)
            .unwrap();
        let p = Profile::decode(&raw[..]).unwrap();
        let s = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<_> = p
            .sample_type
            .iter()
            .map(|v| (s(v.r#type), s(v.unit)))
            .collect();
        assert_eq!(types, [CONTENTIONS, DELAY]);
        assert_eq!(p.period, 1);
        assert_eq!(p.sample[0].value, [7, 7000]);
        assert_eq!(p.sample[0].location_id.len(), 2);
        let loc = &p.location[p.sample[0].location_id[1] as usize - 1];
        let f = &p.function[loc.line[0].function_id as usize - 1];
        assert_eq!((s(f.name), f.start_line), ("sync.(*Mutex).Lock", 10));
        assert!(p.mapping[0].has_inline_frames && p.mapping[0].has_functions);
    }
}
