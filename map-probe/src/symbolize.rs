//! Turning runtime addresses into Go frames from `.gopclntab` alone, inlined
//! calls expanded, so a stripped production binary symbolizes as well as a
//! debug build.

use std::collections::HashMap;

use crate::gobin::{Frame, GoBinary};

pub struct Symbolizer<'a> {
    bin: &'a GoBinary,
    bias: u64,
    cache: HashMap<u64, Vec<Frame>>,
}

impl<'a> Symbolizer<'a> {
    pub fn new(bin: &'a GoBinary, bias: u64) -> Self {
        Symbolizer {
            bin,
            bias,
            cache: HashMap::new(),
        }
    }

    /// Frames for a stack, innermost first. Return addresses point after the
    /// call, so they are looked up one byte earlier, inside the CALL.
    pub fn stack(&mut self, pcs: &[u64], first_is_ip: bool) -> Vec<Frame> {
        let mut out = Vec::new();
        for (i, &pc) in pcs.iter().enumerate() {
            let lookup = if i == 0 && first_is_ip {
                pc
            } else {
                pc.wrapping_sub(1)
            };
            out.extend(self.frames(lookup).iter().cloned());
        }
        out
    }

    /// Frames at a link-time address (a probe point's own instruction).
    pub fn frames_at_link(&mut self, pc: u64) -> Vec<Frame> {
        self.frames(pc.wrapping_add(self.bias)).to_vec()
    }

    /// A runtime data address as `symbol+offset` (`main.cache+8`), when the
    /// binary's symbol table has the global that holds it.
    pub fn data(&self, addr: u64) -> Option<String> {
        let (name, off) = self.bin.data_symbol_at(addr.wrapping_sub(self.bias))?;
        Some(match off {
            0 => name.to_string(),
            o => format!("{name}+{o}"),
        })
    }

    fn frames(&mut self, pc: u64) -> &[Frame] {
        let (bin, bias) = (self.bin, self.bias);
        self.cache.entry(pc).or_insert_with(|| {
            let frames = bin.frames_at(pc.wrapping_sub(bias));
            if frames.is_empty() {
                vec![Frame {
                    function: format!("{pc:#x}"),
                    file: "?".into(),
                    line: 0,
                    inlined: false,
                    start_line: 0,
                }]
            } else {
                frames
            }
        })
    }
}
