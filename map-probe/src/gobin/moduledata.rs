//! Locating `runtime.firstmoduledata` without symbols, for the two values
//! the pclntab alone cannot give: `text` (runtime.text, where functab
//! offsets start) and `gofunc` (the base of funcdata offsets).
//!
//! Field offsets, counted from `type moduledata` in runtime/symtab.go
//! (pointers and uintptrs are 8 bytes, slices 24):
//!   pcHeader 0, funcnametab 8, cutab 32, filetab 56, pctab 80,
//!   pclntable 104, ftab 128, findfunctab 152, minpc 160, maxpc 168,
//!   text 176, etext 184, noptrdata..enoptrbss 192..248,
//!   Go 1.18/1.19: end 256, gcdata 264, gcbss 272, types 280, etypes 288,
//!                 rodata 296, gofunc 304;
//!   Go 1.20+ adds covctrs/ecovctrs at 256/264, pushing gofunc to 320;
//!   Go 1.27 adds typedesclen after types and itaboffset/itabsize before
//!   rodata, pushing gofunc to 344 (without it, inlined frames were not
//!   expanded and every Go 1.27 site named `internal/sync/mutex.go:70`).

use super::image::Image;
use super::pclntab::{Layout, Pclntab};

const OFF_FUNCNAMETAB: u64 = 8;
const OFF_TEXT: u64 = 176;
const OFF_GOFUNC_GO118: u64 = 304;
const OFF_GOFUNC_GO120: u64 = 320;
const OFF_GOFUNC_GO127: u64 = 344;

pub(crate) struct Moduledata {
    pub addr: u64,
    pub text: u64,
    pub gofunc: u64,
}

impl Moduledata {
    fn read(img: &Image, addr: u64, pcln: &Pclntab, minor: u32) -> Option<Moduledata> {
        let gofunc_off = match pcln.layout {
            Layout::Go118 => OFF_GOFUNC_GO118,
            Layout::Go120 if minor >= 27 => OFF_GOFUNC_GO127,
            Layout::Go120 => OFF_GOFUNC_GO120,
        };
        Some(Moduledata {
            addr,
            text: img.word(addr + OFF_TEXT)?,
            gofunc: img.word(addr + gofunc_off)?,
        })
    }

    /// The first two words pin moduledata down: the pclntab address and
    /// funcnametab's data pointer.
    fn matches(img: &Image, addr: u64, pcln: &Pclntab) -> bool {
        img.word(addr) == Some(pcln.vaddr)
            && img.word(addr + OFF_FUNCNAMETAB) == Some(pcln.vaddr + pcln.funcname_off as u64)
    }

    /// `.go.module` (Go 1.26+), then the symbol if the caller has one, then
    /// a scan for a word equal to the pclntab address: in the file images of
    /// writable segments for non-PIE, among relocation addends for PIE.
    /// `minor`: the Go release (1.x) the binary was built with.
    pub fn find(
        img: &Image,
        pcln: &Pclntab,
        symbol: Option<u64>,
        minor: u32,
    ) -> Option<Moduledata> {
        let candidates = img
            .section(".go.module")
            .map(|s| s.vaddr)
            .into_iter()
            .chain(symbol);
        for addr in candidates {
            if Self::matches(img, addr, pcln) {
                return Self::read(img, addr, pcln, minor);
            }
        }
        let mut relocated: Vec<u64> = img
            .relative
            .iter()
            .filter(|&(_, &v)| v == pcln.vaddr)
            .map(|(&at, _)| at)
            .collect();
        relocated.sort_unstable();
        if let Some(addr) = relocated.into_iter().find(|&a| Self::matches(img, a, pcln)) {
            return Self::read(img, addr, pcln, minor);
        }
        let needle = pcln.vaddr.to_le_bytes();
        for seg in img.segments.iter().filter(|s| s.write) {
            let Some(bytes) = img.bytes_from(seg.vaddr) else {
                continue;
            };
            let skew = ((8 - seg.vaddr % 8) % 8) as usize;
            let (words, _) = bytes.get(skew..).unwrap_or(&[]).as_chunks::<8>();
            for (i, w) in words.iter().enumerate() {
                let addr = seg.vaddr + (skew + i * 8) as u64;
                if *w == needle && Self::matches(img, addr, pcln) {
                    return Self::read(img, addr, pcln, minor);
                }
            }
        }
        None
    }
}
