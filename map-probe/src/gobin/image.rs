//! The ELF file as the loader would see it: PT_LOAD segments, and the words
//! that `R_X86_64_RELATIVE` relocations fill in at load time.
//!
//! PIE binaries keep pointers inside moduledata and `.go.buildinfo` as zeros in
//! the file; the real link-time value is the relocation addend. Reading every
//! pointer through [`Image::word`] lets one code path serve PIE and non-PIE.

use std::collections::HashMap;

use object::elf;
use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Object, ObjectSection, RelocationFlags, RelocationTarget};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    pub vaddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub exec: bool,
    pub write: bool,
}

/// A section's placement, kept after `object`'s borrowed view is gone.
#[derive(Debug, Clone)]
pub(crate) struct SectionInfo {
    pub name: String,
    pub vaddr: u64,
    pub size: u64,
}

pub(crate) struct Image {
    pub data: Vec<u8>,
    pub segments: Vec<Segment>,
    pub sections: Vec<SectionInfo>,
    /// r_offset → addend of every R_X86_64_RELATIVE relocation.
    pub relative: HashMap<u64, u64>,
}

impl Image {
    /// Copies what later lookups need out of the parsed ELF. The file bytes
    /// are attached with [`Image::with_data`] once `elf` no longer borrows them.
    pub fn layout_of(elf: &ElfFile64<'_>) -> Image {
        let endian = elf.endian();
        let segments = elf
            .elf_program_headers()
            .iter()
            .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
            .map(|ph| {
                let flags = ph.p_flags(endian);
                Segment {
                    vaddr: ph.p_vaddr(endian),
                    offset: ph.p_offset(endian),
                    filesz: ph.p_filesz(endian),
                    memsz: ph.p_memsz(endian),
                    exec: flags & elf::PF_X != elf::ProgramFlags::default(),
                    write: flags & elf::PF_W != elf::ProgramFlags::default(),
                }
            })
            .collect();
        let sections = elf
            .sections()
            .filter_map(|s| {
                Some(SectionInfo {
                    name: s.name().ok()?.to_string(),
                    vaddr: s.address(),
                    size: s.size(),
                })
            })
            .collect();
        let mut relative = HashMap::new();
        if let Some(relocs) = elf.dynamic_relocations() {
            for (offset, r) in relocs {
                let is_relative = matches!(
                    r.flags(),
                    RelocationFlags::Elf { r_type } if r_type == elf::R_X86_64_RELATIVE
                );
                if is_relative && matches!(r.target(), RelocationTarget::Absolute) {
                    relative.insert(offset, r.addend() as u64);
                }
            }
        }
        Image {
            data: Vec::new(),
            segments,
            sections,
            relative,
        }
    }

    pub fn with_data(self, data: Vec<u8>) -> Image {
        Image { data, ..self }
    }

    pub fn section(&self, name: &str) -> Option<&SectionInfo> {
        self.sections.iter().find(|s| s.name == name)
    }

    pub fn segment_of(&self, vaddr: u64) -> Option<&Segment> {
        self.segments
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.memsz)
    }

    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        let seg = self.segment_of(vaddr)?;
        Some(vaddr - seg.vaddr + seg.offset)
    }

    /// File bytes from `vaddr` to the end of its segment's file image
    /// (bytes in the zero-filled tail are not in the file and not returned).
    pub fn bytes_from(&self, vaddr: u64) -> Option<&[u8]> {
        let seg = self.segment_of(vaddr)?;
        let rel = vaddr - seg.vaddr;
        if rel >= seg.filesz {
            return None;
        }
        let start = usize::try_from(seg.offset + rel).ok()?;
        let end = usize::try_from(seg.offset + seg.filesz).ok()?;
        self.data.get(start..end.min(self.data.len()))
    }

    pub fn bytes(&self, vaddr: u64, len: usize) -> Option<&[u8]> {
        self.bytes_from(vaddr)?.get(..len)
    }

    /// The pointer-sized value at `vaddr` after load-time relocation.
    pub fn word(&self, vaddr: u64) -> Option<u64> {
        if let Some(&addend) = self.relative.get(&vaddr) {
            return Some(addend);
        }
        match self.bytes(vaddr, 8) {
            Some(b) => Some(u64::from_le_bytes(b.try_into().ok()?)),
            // Inside a segment but past its file image: .bss, zero at load.
            None => self.segment_of(vaddr).map(|_| 0),
        }
    }
}
