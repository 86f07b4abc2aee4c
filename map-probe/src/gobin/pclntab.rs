//! The runtime's own symbol table, `pclntab` (Go 1.18+ layout), read the way
//! `runtime/symtab.go` and `runtime/symtabinl.go` read it.
//!
//! Layout: a header, then funcnametab, cutab, filetab, pctab and pclntable
//! at offsets the header gives. pclntable starts with the functab
//! (`nfunc+1` pairs of u32 {entryoff, funcoff}, entryoff relative to
//! runtime.text), and `funcoff` points at a `_func` inside pclntable.

use super::buildinfo::uvarint;
use super::image::Image;

pub(crate) const MAGIC_GO118: u32 = 0xFFFF_FFF0;
pub(crate) const MAGIC_GO120: u32 = 0xFFFF_FFF1;
/// Magics of layouts map-probe does not read (Go 1.2–1.15, 1.16–1.17).
const MAGIC_OLD: [u32; 2] = [0xFFFF_FFFB, 0xFFFF_FFFA];

const PCDATA_INL_TREE_INDEX: u32 = 2;
const FUNCDATA_INL_TREE: u32 = 3;
const HEADER_LEN: usize = 8 + 8 * 8;

/// Which `_func` and `inlinedCall` layout applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Go 1.18 and 1.19: no startLine; inlinedCall carries parent/file/line.
    Go118,
    /// Go 1.20+: `_func.startLine` before funcID; 16-byte inlinedCall.
    Go120,
}

pub(crate) struct Pclntab {
    /// The table's own bytes (copied, so parsing is independent of the ELF).
    data: Vec<u8>,
    pub vaddr: u64,
    pub layout: Layout,
    pub nfunc: usize,
    /// Header `textStart`; 0 from Go 1.26 on.
    pub header_text_start: u64,
    pub funcname_off: usize,
    cu_off: usize,
    filetab_off: usize,
    pctab_off: usize,
    pcln_off: usize,
}

/// One `_func` record, decoded.
pub(crate) struct FuncInfo {
    pub name_off: i32,
    /// `_func.startLine`: the line of the `func` keyword (Go 1.20+; 0 before).
    pub start_line: u32,
    pub pcfile: u32,
    pub pcln: u32,
    pub cu_offset: u32,
    npcdata: u32,
    nfuncdata: u8,
    /// Offset in pclntab of the pcdata array, followed by the funcdata array.
    tables_at: usize,
}

/// An inline tree node, reduced to what both layouts have.
pub(crate) struct InlinedCall {
    pub name_off: i32,
    pub parent_pc: i32,
    /// The inlined function's `func` line (Go 1.20+; 0 before).
    pub start_line: u32,
}

#[derive(Debug)]
pub(crate) enum PclnError {
    /// An older layout, with the magic that says so.
    TooOld(u32),
    Corrupt(String),
}

impl Pclntab {
    /// Reads the header at `vaddr`. `limit` bounds the table when the
    /// section size is known; otherwise the rest of the segment is taken.
    pub fn parse(img: &Image, vaddr: u64, limit: Option<u64>) -> Result<Pclntab, PclnError> {
        let corrupt = |m: &str| PclnError::Corrupt(format!("pclntab at {vaddr:#x}: {m}"));
        let mut bytes = img
            .bytes_from(vaddr)
            .ok_or_else(|| corrupt("not in the file"))?;
        if let Some(l) = limit.and_then(|l| usize::try_from(l).ok()) {
            bytes = &bytes[..l.min(bytes.len())];
        }
        if bytes.len() < HEADER_LEN {
            return Err(corrupt("truncated header"));
        }
        let magic = u32::from_le_bytes(bytes[..4].try_into().unwrap());
        let layout = match magic {
            MAGIC_GO118 => Layout::Go118,
            MAGIC_GO120 => Layout::Go120,
            m if MAGIC_OLD.contains(&m) => return Err(PclnError::TooOld(m)),
            m => return Err(corrupt(&format!("unknown magic {m:#x}"))),
        };
        if bytes[4..8] != [0, 0, 1, 8] {
            return Err(corrupt("not an amd64 table (minLC/ptrSize)"));
        }
        let word = |i: usize| u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().unwrap());
        let off = |i: usize| -> Result<usize, PclnError> {
            usize::try_from(word(i))
                .ok()
                .filter(|&o| o <= bytes.len())
                .ok_or_else(|| corrupt("header offset out of range"))
        };
        let t = Pclntab {
            vaddr,
            layout,
            nfunc: usize::try_from(word(0)).map_err(|_| corrupt("nfunc"))?,
            // PIE carries textStart as a relocation, so read it as a pointer.
            header_text_start: img.word(vaddr + 24).unwrap_or(0),
            funcname_off: off(3)?,
            cu_off: off(4)?,
            filetab_off: off(5)?,
            pctab_off: off(6)?,
            pcln_off: off(7)?,
            data: bytes.to_vec(),
        };
        let ftab_end = (t.nfunc + 1)
            .checked_mul(8)
            .and_then(|n| n.checked_add(t.pcln_off));
        if t.nfunc == 0 || ftab_end.is_none_or(|e| e > t.data.len()) {
            return Err(corrupt("functab out of range"));
        }
        Ok(t)
    }

    /// Cheap plausibility check used when scanning memory for the magic.
    pub fn looks_like_header(bytes: &[u8]) -> bool {
        bytes.len() >= HEADER_LEN
            && matches!(
                u32::from_le_bytes(bytes[..4].try_into().unwrap()),
                MAGIC_GO118 | MAGIC_GO120
            )
            && bytes[4..8] == [0, 0, 1, 8]
    }

    fn u32_at(&self, off: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.data.get(off..off.checked_add(4)?)?.try_into().ok()?,
        ))
    }

    fn i32_at(&self, off: usize) -> Option<i32> {
        self.u32_at(off).map(|v| v as i32)
    }

    /// functab row `i` (0..=nfunc): (entry offset from runtime.text, funcoff).
    pub fn functab(&self, i: usize) -> Option<(u32, u32)> {
        let at = self.pcln_off + i * 8;
        Some((self.u32_at(at)?, self.u32_at(at + 4)?))
    }

    pub fn func(&self, funcoff: u32) -> Option<FuncInfo> {
        let at = self.pcln_off.checked_add(funcoff as usize)?;
        // _func: entryOff, nameOff, args, deferreturn, pcsp, pcfile, pcln,
        // npcdata, cuOffset, [startLine (1.20+)], funcID, flag, _, nfuncdata.
        let fixed = match self.layout {
            Layout::Go118 => 40,
            Layout::Go120 => 44,
        };
        let start_line = match self.layout {
            Layout::Go118 => 0,
            Layout::Go120 => self.u32_at(at + 36)?,
        };
        Some(FuncInfo {
            name_off: self.i32_at(at + 4)?,
            start_line,
            pcfile: self.u32_at(at + 20)?,
            pcln: self.u32_at(at + 24)?,
            npcdata: self.u32_at(at + 28)?,
            cu_offset: self.u32_at(at + 32)?,
            nfuncdata: *self.data.get(at + fixed - 1)?,
            tables_at: at + fixed,
        })
    }

    /// A NUL-terminated name from funcnametab.
    pub fn name(&self, name_off: i32) -> Option<&str> {
        let start = self
            .funcname_off
            .checked_add(usize::try_from(name_off).ok()?)?;
        let rest = self.data.get(start..)?;
        let len = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..len]).ok()
    }

    /// The value of a pc-value table at `target` (an offset from the
    /// function entry), or None if the table does not cover it.
    /// Mirrors runtime.pcvalue/step: zig-zag value deltas, pc deltas
    /// scaled by the quantum (1 on amd64), value starting at -1.
    pub fn pcvalue(&self, table_off: u32, target: u64) -> Option<i32> {
        if table_off == 0 {
            return None;
        }
        let mut p = self
            .data
            .get(self.pctab_off.checked_add(table_off as usize)?..)?;
        let mut val: i32 = -1;
        let mut pc: u64 = 0;
        let mut first = true;
        loop {
            let (uvdelta, n) = uvarint(p)?;
            if uvdelta == 0 && !first {
                return None;
            }
            first = false;
            p = &p[n..];
            let uv = uvdelta as u32;
            val = val.wrapping_add((-((uv & 1) as i32)) ^ ((uv >> 1) as i32));
            let (pcdelta, n) = uvarint(p)?;
            p = &p[n..];
            pc += pcdelta;
            if target < pc {
                return Some(val);
            }
        }
    }

    fn pcdata_table(&self, f: &FuncInfo, index: u32) -> Option<u32> {
        if index >= f.npcdata {
            return None;
        }
        self.u32_at(f.tables_at + 4 * index as usize)
    }

    fn funcdata_off(&self, f: &FuncInfo, index: u32) -> Option<u32> {
        if index >= u32::from(f.nfuncdata) {
            return None;
        }
        let at = f.tables_at + 4 * (f.npcdata as usize + index as usize);
        self.u32_at(at).filter(|&o| o != u32::MAX)
    }

    /// Source file and line at `pcoff` (offset from the function entry).
    /// For inlined code these are the innermost position, as in the runtime.
    pub fn file_line(&self, f: &FuncInfo, pcoff: u64) -> Option<(String, u32)> {
        let fileno = self.pcvalue(f.pcfile, pcoff)?;
        let line = self.pcvalue(f.pcln, pcoff)?;
        let cu_index = f.cu_offset.checked_add(u32::try_from(fileno).ok()?)?;
        let fileoff = self.u32_at(self.cu_off + 4 * cu_index as usize)?;
        if fileoff == u32::MAX {
            return None;
        }
        let rest = self
            .data
            .get(self.filetab_off.checked_add(fileoff as usize)?..)?;
        let len = rest.iter().position(|&b| b == 0)?;
        let file = String::from_utf8_lossy(&rest[..len]).into_owned();
        Some((file, u32::try_from(line).ok()?))
    }

    /// The inline tree index at `pcoff`; negative or None means "not inlined here".
    pub fn inl_index(&self, f: &FuncInfo, pcoff: u64) -> Option<i32> {
        self.pcvalue(self.pcdata_table(f, PCDATA_INL_TREE_INDEX)?, pcoff)
    }

    /// Where this function's inline tree lives: moduledata.gofunc + funcdata offset.
    pub fn inl_tree_addr(&self, f: &FuncInfo, gofunc: u64) -> Option<u64> {
        Some(gofunc + u64::from(self.funcdata_off(f, FUNCDATA_INL_TREE)?))
    }

    /// Node `ix` of the inline tree at `tree` (a vaddr in the image).
    pub fn inlined_call(&self, img: &Image, tree: u64, ix: i32) -> Option<InlinedCall> {
        let ix = u64::try_from(ix).ok()?;
        let rd = |at: u64| -> Option<i32> {
            Some(i32::from_le_bytes(img.bytes(at, 4)?.try_into().ok()?))
        };
        match self.layout {
            // {parent int16; funcID uint8; _ byte; file int32; line int32; func_ int32; parentPc int32}
            Layout::Go118 => {
                let node = tree + ix * 20;
                Some(InlinedCall {
                    name_off: rd(node + 12)?,
                    parent_pc: rd(node + 16)?,
                    start_line: 0,
                })
            }
            // {funcID uint8; _ [3]byte; nameOff int32; parentPc int32; startLine int32}
            Layout::Go120 => {
                let node = tree + ix * 16;
                Some(InlinedCall {
                    name_off: rd(node + 4)?,
                    parent_pc: rd(node + 8)?,
                    start_line: u32::try_from(rd(node + 12)?).unwrap_or(0),
                })
            }
        }
    }
}
