//! Reading a Go executable without running it: version, function table, line
//! tables and inline trees from `.gopclntab`, and the instruction boundaries
//! where probes may go. Nothing here needs `.symtab` or DWARF.
//!
//! CONTRACT (the rest of map-probe codes against exactly this API):
//!
//! pub struct GoBinary;                         // parsed once, immutable, Send + Sync
//! impl GoBinary {
//!   pub fn open(path: &Path) -> Result<GoBinary, GoBinError>;
//!   pub fn parse(data: Vec<u8>, path: &Path) -> Result<GoBinary, GoBinError>;
//!   pub fn go_version(&self) -> &GoVersion;
//!   pub fn main_module(&self) -> Option<&str>; // the `mod` path in .go.buildinfo
//!   pub fn build_id(&self) -> Option<&str>;    // GNU build ID (hex), else Go's
//!   pub fn has_symtab(&self) -> bool;          // false when .symtab is stripped
//!   pub fn is_pie(&self) -> bool;              // ET_DYN
//!   pub fn text_start(&self) -> u64;           // runtime.text (link-time vaddr)
//!   pub fn func_by_name(&self, name: &str) -> Option<Func>;
//!   pub fn func_at(&self, vaddr: u64) -> Option<Func>;
//!   pub fn funcs(&self) -> impl Iterator<Item = Func> + '_;
//!   pub fn frames_at(&self, vaddr: u64) -> Vec<Frame>;   // innermost first, inlined expanded
//!   pub fn file_offset(&self, vaddr: u64) -> Option<u64>; // for uprobe attach
//!   pub fn probe_points(&self, f: &Func) -> Result<ProbePoints, GoBinError>;
//!   pub fn exec_segment(&self) -> (u64 /*p_vaddr*/, u64 /*p_offset*/, u64 /*p_memsz*/);
//!   pub fn calls_to(&self, targets: &[u64], skip: &[u64]) -> Vec<(Func, CallSite)>;
//! }
//! pub struct GoVersion { pub major: u32, pub minor: u32, pub patch: u32, pub raw: String }
//! pub struct Func { pub name: String, pub entry: u64, pub end: u64 }
//! pub struct Frame { pub function: String, pub file: String, pub line: u32, pub inlined: bool,
//!                    pub start_line: u32 }  // start_line 0 before Go 1.20
//! pub struct ProbePoints { pub entry: u64, pub after_check: u64, pub rets: Vec<u64> }
//! pub enum GoBinError { Io(..), NotElf(..), NotGo(..), Unsupported(..), Decode(..) } + Display
//!
//! All addresses are link-time virtual addresses (as in the ELF file); for a
//! PIE process, subtract the load bias before asking.

mod buildinfo;
mod disasm;
pub use disasm::{CallSite, CasInsn};
mod image;
mod moduledata;
mod pclntab;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{ElfFile64, FileHeader};
use object::{Object, ObjectSection, ObjectSymbol};

use image::Image;
use moduledata::Moduledata;
use pclntab::{PclnError, Pclntab};

/// The oldest Go whose pclntab layout and register ABI map-probe knows.
const MIN_MINOR: u32 = 19;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    /// As recorded in the binary, e.g. "go1.26.8".
    pub raw: String,
}

impl GoVersion {
    /// True if this version is `major.minor` or newer.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for GoVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Func {
    pub name: String,
    pub entry: u64,
    /// One past the last byte: the next function's entry (Go pads the gap with INT3).
    pub end: u64,
}

impl Func {
    pub fn size(&self) -> u64 {
        self.end - self.entry
    }

    pub fn contains(&self, vaddr: u64) -> bool {
        (self.entry..self.end).contains(&vaddr)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub function: String,
    pub file: String,
    pub line: u32,
    /// True for a call the compiler inlined into the next (outer) frame.
    pub inlined: bool,
    /// The line of the function's `func` keyword (`_func.startLine`, and
    /// the inline tree's own for inlined calls); 0 before Go 1.20, whose
    /// pclntab does not record it.
    pub start_line: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbePoints {
    /// The function's first instruction; a probe here can fire twice per call.
    pub entry: u64,
    /// First instruction after the stack-bound check and its JBE, which a
    /// morestack restart does not re-execute; `entry` for NOSPLIT functions.
    pub after_check: u64,
    /// Every RET in the function, for exit probes (kernel return probes
    /// break on Go's moving stacks).
    pub rets: Vec<u64>,
}

#[derive(Debug)]
pub enum GoBinError {
    Io(PathBuf, std::io::Error),
    NotElf(String),
    NotGo(String),
    Unsupported(String),
    Decode(String),
}

impl fmt::Display for GoBinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GoBinError::Io(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            GoBinError::NotElf(m)
            | GoBinError::NotGo(m)
            | GoBinError::Unsupported(m)
            | GoBinError::Decode(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for GoBinError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GoBinError::Io(_, e) => Some(e),
            _ => None,
        }
    }
}

/// Whether `path` is a Go executable, judged by its `.go.buildinfo` alone
/// (cheap next to [`GoBinary::open`]: no pclntab parsing). For the agent's
/// `--all-go` scan.
pub fn has_go_buildinfo(path: &Path) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let Ok(file) = ElfFile64::parse(data.as_slice()) else {
        return false;
    };
    let layout = Image::layout_of(&file);
    drop(file);
    buildinfo::version_string(&layout.with_data(data)).is_some()
}

/// A functab row with its address resolved.
struct FuncEntry {
    entry: u64,
    funcoff: u32,
}

pub struct GoBinary {
    path: PathBuf,
    img: Image,
    version: GoVersion,
    main_module: Option<String>,
    build_id: Option<String>,
    has_symtab: bool,
    is_pie: bool,
    text_start: u64,
    gofunc: Option<u64>,
    moduledata: Option<u64>,
    pcln: Pclntab,
    /// nfunc+1 rows; the last is the end sentinel (etext).
    table: Vec<FuncEntry>,
    by_name: HashMap<String, usize>,
    /// Names that more than one real (non-wrapper) function carries.
    ambiguous: HashSet<String>,
    exec_segment: (u64, u64, u64),
    /// (address, size, name) of every data object in `.symtab`, by address.
    data_symbols: Vec<(u64, u64, String)>,
}

fn data_symbols(file: &ElfFile64<'_>) -> Vec<(u64, u64, String)> {
    let mut out: Vec<(u64, u64, String)> = file
        .symbols()
        .filter(|s| s.kind() == object::SymbolKind::Data && s.address() != 0)
        .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
        .collect();
    out.sort_unstable();
    out.dedup_by_key(|d| d.0);
    out
}

impl GoBinary {
    pub fn open(path: &Path) -> Result<GoBinary, GoBinError> {
        let data = std::fs::read(path).map_err(|e| GoBinError::Io(path.to_path_buf(), e))?;
        Self::parse(data, path)
    }

    /// Reads a Go binary from its bytes (`path` names it in messages). Bytes
    /// that are not a well-formed Go binary give an error, never a panic, a
    /// hang or an unbounded allocation: the hostile-binaries test holds it to that.
    pub fn parse(data: Vec<u8>, path: &Path) -> Result<GoBinary, GoBinError> {
        let shown = path.display();
        if data.get(..4) != Some(b"\x7fELF") {
            return Err(GoBinError::NotElf(format!("{shown} is not an ELF file")));
        }
        if data.get(4) != Some(&2) {
            return Err(GoBinError::Unsupported(format!(
                "{shown} is a 32-bit ELF; map-probe supports x86-64 only"
            )));
        }
        let file = ElfFile64::parse(data.as_slice())
            .map_err(|e| GoBinError::NotElf(format!("{shown} is not a readable ELF file: {e}")))?;
        let endian = file.endian();
        let header = file.elf_header();
        if header.e_machine(endian) != elf::EM_X86_64 {
            return Err(GoBinError::Unsupported(format!(
                "{shown} is not an x86-64 binary; map-probe supports x86-64 only"
            )));
        }
        let is_pie = header.e_type(endian) == elf::ET_DYN;
        let has_symtab = file.symbols().next().is_some();
        let data_symbols = data_symbols(&file);
        let symbol = |name: &str| file.symbol_by_name(name).map(|s| s.address());
        let sym_text = symbol("runtime.text");
        let sym_pclntab = symbol("runtime.pclntab");
        let sym_moduledata = symbol("runtime.firstmoduledata");
        let sym_gofunc = symbol("go:func.*").or_else(|| symbol("go.func.*"));
        let build_id = build_id(&file);
        let layout = Image::layout_of(&file);
        drop(file);
        let img = layout.with_data(data);

        let raw_version = buildinfo::version_string(&img);
        let main_module = buildinfo::main_module(&img);
        let pcln = find_pclntab(&img, sym_pclntab);
        let (raw_version, pcln) = match (raw_version, pcln) {
            (None, Err(PclnError::Corrupt(_))) => {
                return Err(GoBinError::NotGo(format!(
                    "{shown} is not a Go binary (no .go.buildinfo or .gopclntab)"
                )))
            }
            (v, Err(PclnError::TooOld(magic))) => {
                let built =
                    v.unwrap_or_else(|| format!("a Go older than 1.18 (pclntab magic {magic:#x})"));
                return Err(unsupported(&built));
            }
            (v, Ok(p)) => (v, p),
            (Some(v), Err(PclnError::Corrupt(m))) => {
                let ok = buildinfo::parse_version(&v).is_some_and(|v| v.at_least(1, MIN_MINOR));
                if !ok {
                    return Err(unsupported(&v));
                }
                return Err(GoBinError::Decode(format!(
                    "{shown} ({v}) has no readable pclntab: {m}"
                )));
            }
        };
        let version = match &raw_version {
            Some(raw) => match buildinfo::parse_version(raw) {
                Some(v) if v.major == 1 && v.minor >= MIN_MINOR => v,
                _ => return Err(unsupported(raw)),
            },
            // No buildinfo (unusual, e.g. trimmed by a packer): the magic bounds it.
            None => GoVersion {
                major: 1,
                minor: if pcln.layout == pclntab::Layout::Go118 {
                    19
                } else {
                    20
                },
                patch: 0,
                raw: "unknown".into(),
            },
        };

        let md = Moduledata::find(&img, &pcln, sym_moduledata, version.minor);
        let text_start = sym_text
            .or(md.as_ref().map(|m| m.text))
            .or(Some(pcln.header_text_start).filter(|&t| t != 0))
            .ok_or_else(|| {
                GoBinError::Decode(format!(
                    "{shown}: cannot find runtime.text (no symbol, no moduledata, \
                     and the pclntab header leaves it 0)"
                ))
            })?;
        let gofunc = md.as_ref().map(|m| m.gofunc).or(sym_gofunc);
        if gofunc.is_none() {
            log::warn!("{shown}: moduledata not found; inlined frames will not be expanded");
        }

        let table = (0..=pcln.nfunc)
            .map(|i| {
                let (entryoff, funcoff) = pcln.functab(i).expect("bounds checked in parse");
                FuncEntry {
                    entry: text_start + u64::from(entryoff),
                    funcoff,
                }
            })
            .collect::<Vec<_>>();
        let (by_name, ambiguous) = index_names(&pcln, &table);

        let exec_segment = img
            .segment_of(text_start)
            .filter(|s| s.exec)
            .or_else(|| img.segments.iter().find(|s| s.exec))
            .map(|s| (s.vaddr, s.offset, s.memsz))
            .ok_or_else(|| GoBinError::Decode(format!("{shown} has no executable segment")))?;

        Ok(GoBinary {
            path: path.to_path_buf(),
            img,
            version,
            main_module,
            build_id,
            has_symtab,
            is_pie,
            text_start,
            gofunc,
            moduledata: md.map(|m| m.addr),
            pcln,
            table,
            by_name,
            ambiguous,
            exec_segment,
            data_symbols,
        })
    }

    /// The global variable holding `vaddr` (link-time address) and the
    /// offset into it, from `.symtab` (none in a stripped binary).
    pub fn data_symbol_at(&self, vaddr: u64) -> Option<(&str, u64)> {
        let i = self.data_symbols.partition_point(|d| d.0 <= vaddr);
        let (addr, size, name) = self.data_symbols.get(i.checked_sub(1)?)?;
        (vaddr < addr + (*size).max(1)).then(|| (name.as_str(), vaddr - addr))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn go_version(&self) -> &GoVersion {
        &self.version
    }

    /// The main module's path from the build info (`mapprobe/fixtures`,
    /// `github.com/acme/shop`), when the binary was built in module mode.
    pub fn main_module(&self) -> Option<&str> {
        self.main_module.as_deref()
    }

    /// The build ID pprof matches binaries by: the GNU build ID in hex
    /// (`.note.gnu.build-id`, which external links and `-B` add), else the
    /// Go build ID (`.note.go.buildid`, which `go build` always writes).
    pub fn build_id(&self) -> Option<&str> {
        self.build_id.as_deref()
    }

    pub fn has_symtab(&self) -> bool {
        self.has_symtab
    }

    pub fn is_pie(&self) -> bool {
        self.is_pie
    }

    /// runtime.text: the base of every functab offset. Not the `.text`
    /// section address, which is lower in externally linked binaries.
    pub fn text_start(&self) -> u64 {
        self.text_start
    }

    /// moduledata.gofunc, the base of funcdata offsets, if it was found.
    pub fn gofunc(&self) -> Option<u64> {
        self.gofunc
    }

    /// Address of runtime.firstmoduledata, if it was found.
    pub fn moduledata_addr(&self) -> Option<u64> {
        self.moduledata
    }

    /// The Go 1.18/1.19 linker writes generic and array names with everything
    /// inside the outermost brackets elided (Go 1.26 writes them in full) ("type..eq.[...]runtime.Frame"),
    /// so a full name falls back to its elided form when that is unique.
    pub fn func_by_name(&self, name: &str) -> Option<Func> {
        if let Some(&i) = self.by_name.get(name) {
            return self.func(i);
        }
        let elided = elide_brackets(name)?;
        if self.ambiguous.contains(&elided) {
            return None;
        }
        self.by_name.get(&elided).and_then(|&i| self.func(i))
    }

    pub fn func_at(&self, vaddr: u64) -> Option<Func> {
        self.index_at(vaddr).and_then(|i| self.func(i))
    }

    pub fn funcs(&self) -> impl Iterator<Item = Func> + '_ {
        (0..self.pcln.nfunc).filter_map(|i| self.func(i))
    }

    /// Source frames at `pc`, innermost first, with inlined calls expanded
    /// the way the runtime's traceback does. `pc` must be an address inside
    /// an instruction: for a return address taken from a stack, pass
    /// `retaddr - 1` so the answer is the call site, not the next line.
    /// Empty if `pc` is in no Go function.
    pub fn frames_at(&self, pc: u64) -> Vec<Frame> {
        let Some(i) = self.index_at(pc) else {
            return Vec::new();
        };
        let entry = self.table[i].entry;
        let Some(f) = self.pcln.func(self.table[i].funcoff) else {
            return Vec::new();
        };
        let frame = |function: &str, start_line: u32, pcoff: u64, inlined: bool| {
            let (file, line) = self
                .pcln
                .file_line(&f, pcoff)
                .unwrap_or_else(|| ("?".into(), 0));
            Frame {
                function: function.to_string(),
                file,
                line,
                inlined,
                start_line,
            }
        };
        let mut frames = Vec::new();
        let mut pcoff = pc - entry;
        let tree = self.gofunc.and_then(|g| self.pcln.inl_tree_addr(&f, g));
        if let Some(tree) = tree {
            // Each step moves to a PC whose position is the call site, so the
            // walk ends; the bound only guards against a corrupt table.
            for _ in 0..64 {
                let Some(ix) = self.pcln.inl_index(&f, pcoff).filter(|&ix| ix >= 0) else {
                    break;
                };
                let Some(call) = self.pcln.inlined_call(&self.img, tree, ix) else {
                    break;
                };
                let name = self.pcln.name(call.name_off).unwrap_or("?");
                frames.push(frame(name, call.start_line, pcoff, true));
                match u64::try_from(call.parent_pc) {
                    Ok(p) => pcoff = p,
                    Err(_) => break,
                }
            }
        }
        let name = self.pcln.name(f.name_off).unwrap_or("?");
        frames.push(frame(name, f.start_line, pcoff, false));
        frames
    }

    /// File offset of `vaddr` through its PT_LOAD (what uprobe attach wants).
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.img.file_offset(vaddr)
    }

    /// Entry, post-stack-check and RET addresses of `f`. Fails rather than
    /// guessing if any byte of the function does not decode.
    pub fn probe_points(&self, f: &Func) -> Result<ProbePoints, GoBinError> {
        let len = usize::try_from(f.size()).unwrap_or(usize::MAX);
        let code = self.img.bytes(f.entry, len).ok_or_else(|| {
            GoBinError::Decode(format!(
                "{}: code at {:#x}..{:#x} is not in the file",
                f.name, f.entry, f.end
            ))
        })?;
        disasm::probe_points(code, f.entry, &f.name)
    }

    /// Every direct CALL, in every function but those in `targets` and
    /// `skip`, to one of `targets` (entry addresses). One pass over the text:
    /// a 50 MB binary's ~20 MB of code decodes in a fraction of a second.
    pub fn calls_to(&self, targets: &[u64], skip: &[u64]) -> Vec<(Func, CallSite)> {
        let mut sorted = targets.to_vec();
        sorted.sort_unstable();
        let mut out = Vec::new();
        for f in self.funcs() {
            if sorted.binary_search(&f.entry).is_ok() || skip.contains(&f.entry) {
                continue;
            }
            let Ok(len) = usize::try_from(f.size()) else {
                continue;
            };
            let Some(code) = self.img.bytes(f.entry, len) else {
                continue;
            };
            for c in disasm::calls_to(code, f.entry, &sorted) {
                out.push((f.clone(), c));
            }
        }
        out
    }

    /// Every LOCK CMPXCHG / CMPXCHG16B in `f` (none if its code is not in
    /// the file or does not decode).
    pub fn cas_instructions(&self, f: &Func) -> Vec<disasm::CasInsn> {
        let Ok(len) = usize::try_from(f.size()) else {
            return Vec::new();
        };
        self.img
            .bytes(f.entry, len)
            .map_or_else(Vec::new, |code| disasm::cas_instructions(code, f.entry))
    }

    /// The PT_LOAD holding runtime.text: (p_vaddr, p_offset, p_memsz).
    pub fn exec_segment(&self) -> (u64, u64, u64) {
        self.exec_segment
    }

    fn index_at(&self, vaddr: u64) -> Option<usize> {
        let n = self.pcln.nfunc;
        if vaddr < self.table.first()?.entry || vaddr >= self.table[n].entry {
            return None;
        }
        Some(self.table[..n].partition_point(|e| e.entry <= vaddr) - 1)
    }

    fn func(&self, i: usize) -> Option<Func> {
        let info = self.pcln.func(self.table[i].funcoff)?;
        Some(Func {
            name: self.pcln.name(info.name_off)?.to_string(),
            entry: self.table[i].entry,
            end: self.table[i + 1].entry,
        })
    }
}

/// Name → functab index. ABI wrappers share their target's name in the
/// pclntab (an assembly function's ABIInternal wrapper, a Go function's ABI0
/// wrapper); the name maps to the real body, which every call reaches, and
/// the wrapper is recognised by its "<autogenerated>" source file.
fn index_names(pcln: &Pclntab, table: &[FuncEntry]) -> (HashMap<String, usize>, HashSet<String>) {
    let autogenerated = |i: usize| {
        let f = pcln.func(table[i].funcoff);
        f.and_then(|f| pcln.file_line(&f, 0))
            .is_some_and(|(file, _)| file == "<autogenerated>")
    };
    let mut by_name: HashMap<String, usize> = HashMap::with_capacity(pcln.nfunc);
    let mut ambiguous = HashSet::new();
    for (i, e) in table[..pcln.nfunc].iter().enumerate() {
        let Some(name) = pcln.func(e.funcoff).and_then(|f| pcln.name(f.name_off)) else {
            continue;
        };
        let Some(kept) = by_name.get_mut(name) else {
            by_name.insert(name.to_string(), i);
            continue;
        };
        match (autogenerated(*kept), autogenerated(i)) {
            (true, false) => *kept = i,
            (false, true) => {}
            _ => {
                ambiguous.insert(name.to_string());
            }
        }
    }
    (by_name, ambiguous)
}

/// "a[b[c]]d" → "a[...]d", as Go 1.19's cmd/link (pcln.go nameParts) writes them.
fn elide_brackets(name: &str) -> Option<String> {
    let i = name.find('[')?;
    let j = name.rfind(']').filter(|&j| j > i)?;
    Some(format!("{}[...]{}", &name[..i], &name[j + 1..]))
}

/// The GNU build ID in hex, else the Go build ID: both are ELF notes, which
/// `strip` and `-ldflags=-s -w` keep.
fn build_id(file: &ElfFile64<'_>) -> Option<String> {
    if let Ok(Some(id)) = file.build_id() {
        if !id.is_empty() {
            return Some(id.iter().map(|b| format!("{b:02x}")).collect());
        }
    }
    let data = file.section_by_name(".note.go.buildid")?.data().ok()?;
    // One note: namesz, descsz, type (4, "Go\0\0"), then the ID string.
    let word = |at: usize| Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?));
    let (namesz, descsz) = (word(0)? as usize, word(4)? as usize);
    let desc_at = 12usize.checked_add(namesz.checked_add(3)? & !3)?;
    let desc = data.get(desc_at..desc_at.checked_add(descsz)?)?;
    let id = std::str::from_utf8(desc).ok()?.trim_end_matches('\0');
    (!id.is_empty()).then(|| id.to_string())
}

fn unsupported(raw: &str) -> GoBinError {
    GoBinError::Unsupported(format!(
        "built with {raw}; map-probe supports Go 1.19 and newer"
    ))
}

/// Section by name, then the runtime.pclntab symbol, then a magic scan of
/// the read-only data segments (what survives any strip).
fn find_pclntab(img: &Image, symbol: Option<u64>) -> Result<Pclntab, PclnError> {
    for name in [".gopclntab", ".data.rel.ro.gopclntab"] {
        if let Some(s) = img.section(name) {
            return Pclntab::parse(img, s.vaddr, Some(s.size));
        }
    }
    if let Some(addr) = symbol {
        return Pclntab::parse(img, addr, None);
    }
    let mut last_err = PclnError::Corrupt("no pclntab magic found".into());
    for seg in img.segments.iter().filter(|s| !s.exec) {
        let Some(bytes) = img.bytes_from(seg.vaddr) else {
            continue;
        };
        let skew = ((8 - seg.vaddr % 8) % 8) as usize;
        let mut i = skew;
        while i + 8 <= bytes.len() {
            if Pclntab::looks_like_header(&bytes[i..]) {
                match Pclntab::parse(img, seg.vaddr + i as u64, None) {
                    Ok(t) => return Ok(t),
                    Err(e) => last_err = e,
                }
            }
            i += 8;
        }
    }
    Err(last_err)
}
