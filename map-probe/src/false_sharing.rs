//! False-sharing suspects without a PMU: these machines count no cache
//! misses or HITM events, so a bouncing cache line is inferred from what the
//! probes saw written. Hot words come from three places: the words CASes
//! and other atomic writes in scope wrote (`cas`), and the locks sites
//! waited on (`sites`). Two distinct hot words in one 64-byte line, written
//! by different goroutines on more than one CPU, are a suspect: every write
//! to one takes the line from the other's cache. One word written from many
//! places is true sharing (contention, shown as CAS failures or lock waits)
//! and is never flagged here.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::report::{FalseSharing, FrameOut, SharedWord};

pub const CACHE_LINE: u64 = 64;

/// Below this many estimated writes a second, a word is not hot enough to
/// be worth padding, and its few raw samples say little about who wrote it.
const HOT_WRITES_PER_SEC: f64 = 1000.0;
const HOT_MIN_RAW: u64 = 20;
/// A contended lock is hot from this many waits a second: every wait is at
/// least two more writes to its word (the failed fast path, the unlock that
/// wakes it) beside the uncontended ones no probe sees.
const HOT_WAITS_PER_SEC: f64 = 50.0;
const HOT_MIN_WAITS: u64 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WordKind {
    /// The target of a compare-and-swap.
    Cas,
    /// Written by an atomic add, swap, store or bit operation.
    Atomic,
    /// A contended lock (its state word).
    Lock,
}

impl WordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WordKind::Cas => "cas",
            WordKind::Atomic => "atomic",
            WordKind::Lock => "lock",
        }
    }
}

/// One written word as a probe saw it.
#[derive(Clone, Debug)]
pub struct HotWord {
    pub addr: u64,
    pub kind: WordKind,
    /// Raw events (writes, or a lock's waits) and their estimate per second.
    pub raw: u64,
    pub per_sec: f64,
    /// Goroutines seen writing it (a lock's are not told apart: a wait
    /// means a holder and a waiter, two at least).
    pub goroutines: HashSet<u64>,
    /// CPUs seen writing it, bit `cpu % 64`.
    pub cpus: u64,
    /// Where it is written (the busiest site).
    pub at: Option<FrameOut>,
}

impl HotWord {
    fn is_hot(&self) -> bool {
        match self.kind {
            WordKind::Lock => self.raw >= HOT_MIN_WAITS && self.per_sec >= HOT_WAITS_PER_SEC,
            _ => self.raw >= HOT_MIN_RAW && self.per_sec >= HOT_WRITES_PER_SEC,
        }
    }

    fn goroutines(&self) -> usize {
        match self.kind {
            WordKind::Lock => self.goroutines.len().max(2),
            _ => self.goroutines.len(),
        }
    }

    /// Whether some goroutine writes `other` that is not the one writing this.
    fn writers_differ(&self, other: &HotWord) -> bool {
        self.kind == WordKind::Lock
            || other.kind == WordKind::Lock
            || self
                .goroutines
                .iter()
                .any(|g| other.goroutines.iter().any(|h| g != h))
    }
}

/// The suspects among `words` (several entries for one address, from
/// different sites or kinds, count as one word); `name` gives a word's data
/// symbol.
pub fn find(words: Vec<HotWord>, name: impl Fn(u64) -> Option<String>) -> Vec<FalseSharing> {
    let mut merged: BTreeMap<u64, HotWord> = BTreeMap::new();
    for w in words.into_iter().filter(|w| w.addr != 0) {
        match merged.get_mut(&w.addr) {
            Some(m) => {
                if w.per_sec > m.per_sec {
                    m.at = w.at.clone();
                    m.kind = w.kind;
                }
                m.raw += w.raw;
                m.per_sec += w.per_sec;
                m.goroutines.extend(w.goroutines);
                m.cpus |= w.cpus;
            }
            None => {
                merged.insert(w.addr, w);
            }
        }
    }
    let mut lines: BTreeMap<u64, Vec<&HotWord>> = BTreeMap::new();
    for w in merged.values().filter(|w| w.is_hot()) {
        lines.entry(w.addr & !(CACHE_LINE - 1)).or_default().push(w);
    }
    let mut out = Vec::new();
    for (line, words) in lines {
        if words.len() < 2 {
            continue;
        }
        // Some pair of its words must be written by different goroutines,
        // and the line on more than one CPU: else nothing bounces it.
        let split = words.iter().enumerate().any(|(i, a)| {
            words[i + 1..]
                .iter()
                .any(|b| a.writers_differ(b) && (a.cpus | b.cpus).count_ones() >= 2)
        });
        if !split {
            continue;
        }
        let shared = words
            .iter()
            .map(|w| SharedWord {
                addr: format!("{:#x}", w.addr),
                symbol: name(w.addr),
                kind: w.kind,
                function: w.at.as_ref().map_or("?".into(), |f| f.function.clone()),
                file: w.at.as_ref().map_or("?".into(), |f| f.file.clone()),
                line: w.at.as_ref().map_or(0, |f| f.line),
                writes_per_sec: match w.kind {
                    WordKind::Lock => 2.0 * w.per_sec,
                    _ => w.per_sec,
                },
                waits_per_sec: (w.kind == WordKind::Lock).then_some(w.per_sec),
                goroutines: w.goroutines(),
                cpus: w.cpus.count_ones() as usize,
            })
            .collect();
        out.push(FalseSharing {
            cache_line: format!("{line:#x}"),
            words: shared,
            suggestion: format!(
                "these words share one {CACHE_LINE}-byte cache line and are written by different goroutines: pad them apart (e.g. `_ [{}]byte` after an 8-byte word, or cpu.CacheLinePad)",
                CACHE_LINE - 8
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(addr: u64, kind: WordKind, g: &[u64], cpus: u64) -> HotWord {
        HotWord {
            addr,
            kind,
            raw: 1000,
            per_sec: 100_000.0,
            goroutines: g.iter().copied().collect(),
            cpus,
            at: None,
        }
    }

    fn suspects(words: Vec<HotWord>) -> usize {
        find(words, |_| None).len()
    }

    #[test]
    fn two_words_of_one_line_written_apart_are_suspects() {
        let a = word(0x1000, WordKind::Cas, &[1], 0b01);
        let b = word(0x1008, WordKind::Atomic, &[2], 0b10);
        assert_eq!(suspects(vec![a, b]), 1);
    }

    #[test]
    fn a_word_alone_on_its_line_or_one_writer_or_one_cpu_is_not() {
        let a = word(0x1000, WordKind::Cas, &[1], 0b01);
        assert_eq!(
            suspects(vec![a.clone(), word(0x1040, WordKind::Cas, &[2], 0b10)]),
            0
        );
        assert_eq!(
            suspects(vec![a.clone(), word(0x1008, WordKind::Cas, &[1], 0b10)]),
            0
        );
        assert_eq!(
            suspects(vec![a.clone(), word(0x1008, WordKind::Cas, &[2], 0b01)]),
            0
        );
        // One word from two places: true sharing.
        assert_eq!(
            suspects(vec![a, word(0x1000, WordKind::Cas, &[2], 0b10)]),
            0
        );
    }

    #[test]
    fn contended_locks_side_by_side_are_suspects() {
        let a = word(0x2000, WordKind::Lock, &[], 0b01);
        let b = word(0x2008, WordKind::Lock, &[], 0b10);
        assert_eq!(suspects(vec![a, b]), 1);
    }
}
