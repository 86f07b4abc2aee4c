//! Checks `gobin` against real Go binaries built here from
//! tests/gobin-testdata with Go 1.26 (`go`) and Debian's Go 1.19, in the link
//! modes services ship with. The referees are Go's own tools: `go version`,
//! `go tool nm`, `go tool addr2line` and `go tool objdump`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use map_probe::gobin::{GoBinError, GoBinary};

const GO126: &str = "/usr/local/go/bin/go";
const GO119: &str = "/usr/lib/go-1.19/bin/go";
const TOOLCHAINS: [&str; 2] = [GO126, GO119];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Variant {
    Plain,
    Stripped,
    Pie,
    External,
    ExternalStripped,
}

const VARIANTS: [Variant; 5] = [
    Variant::Plain,
    Variant::Stripped,
    Variant::Pie,
    Variant::External,
    Variant::ExternalStripped,
];

impl Variant {
    fn build_args(self) -> &'static [&'static str] {
        match self {
            Variant::Plain => &[],
            Variant::Stripped => &["-ldflags=-s -w"],
            Variant::Pie => &["-buildmode=pie"],
            Variant::External => &["-ldflags=-linkmode=external"],
            Variant::ExternalStripped => &["-ldflags=-linkmode=external -s -w"],
        }
    }

    fn external(self) -> bool {
        matches!(self, Variant::External | Variant::ExternalStripped)
    }

    /// The build with the same code layout and a symbol table.
    fn twin(self) -> Variant {
        match self {
            Variant::Stripped => Variant::Plain,
            Variant::ExternalStripped => Variant::External,
            v => v,
        }
    }

    fn stripped(self) -> bool {
        self.twin() != self
    }
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gobin-testdata")
}

fn go_cmd(go: &str) -> Command {
    let mut c = Command::new(go);
    c.env("GOTOOLCHAIN", "local").env("GOFLAGS", "-mod=mod");
    c
}

fn short(go: &str) -> &'static str {
    if go == GO126 {
        "go126"
    } else {
        "go119"
    }
}

/// Every (toolchain, variant) binary, built once per test run, in parallel.
fn fixtures() -> &'static BTreeMap<(&'static str, Variant), PathBuf> {
    static BUILT: OnceLock<BTreeMap<(&'static str, Variant), PathBuf>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gobin-testdata");
        std::fs::create_dir_all(&out).unwrap();
        std::thread::scope(|s| {
            let jobs: Vec<_> = TOOLCHAINS
                .iter()
                .flat_map(|&go| VARIANTS.iter().map(move |&v| (go, v)))
                .map(|(go, v)| {
                    let bin = out.join(format!("{}-{v:?}", short(go)));
                    s.spawn(move || {
                        let res = go_cmd(go)
                            .current_dir(testdata())
                            .env("CGO_ENABLED", if v.external() { "1" } else { "0" })
                            .arg("build")
                            .arg("-o")
                            .arg(&bin)
                            .args(v.build_args())
                            .arg(".")
                            .output()
                            .expect("run go build");
                        assert!(
                            res.status.success(),
                            "{go} build {v:?}: {}",
                            String::from_utf8_lossy(&res.stderr)
                        );
                        ((go, v), bin)
                    })
                })
                .collect();
            jobs.into_iter().map(|j| j.join().unwrap()).collect()
        })
    })
}

fn run(mut c: Command) -> String {
    let out = c.output().expect("run referee");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `go tool nm`: name → (address, type letter). Names may contain spaces
/// (generic instantiations), so only the first two fields are split off.
fn nm(go: &str, bin: &Path) -> HashMap<String, (u64, char)> {
    let mut c = go_cmd(go);
    c.args(["tool", "nm"]).arg(bin);
    run(c)
        .lines()
        .filter_map(|l| {
            let (addr, rest) = l.trim_start().split_once(' ')?;
            let (kind, name) = rest.split_once(' ')?;
            let addr = u64::from_str_radix(addr, 16).ok()?;
            Some((name.to_string(), (addr, kind.chars().next()?)))
        })
        .collect()
}

/// `go tool addr2line`: for each PC, (outermost function, innermost file:line).
fn addr2line(go: &str, bin: &Path, pcs: &[u64]) -> Vec<(String, String)> {
    let mut child = go_cmd(go)
        .args(["tool", "addr2line"])
        .arg(bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input: String = pcs.iter().map(|pc| format!("{pc:#x}\n")).collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2 * pcs.len(), "addr2line output: {text}");
    lines
        .chunks(2)
        .map(|c| (c[0].to_string(), c[1].to_string()))
        .collect()
}

/// `go tool objdump -s`: (address, instruction text) of one function.
fn objdump(go: &str, bin: &Path, func: &str) -> Vec<(u64, String)> {
    let mut c = go_cmd(go);
    c.args(["tool", "objdump", "-s", &format!("^{}$", regex_quote(func))])
        .arg(bin);
    run(c)
        .lines()
        .filter(|l| !l.starts_with("TEXT"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').filter(|s| !s.is_empty()).collect();
            let addr = u64::from_str_radix(f.get(1)?.trim_start_matches("0x"), 16).ok()?;
            Some((addr, f.get(3)?.trim().to_string()))
        })
        .collect()
}

fn regex_quote(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc = "\\.+*?()|[]{}^$".contains(c);
            esc.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// Line number of the source line carrying `marker`.
fn marked_line(marker: &str) -> u32 {
    let src = std::fs::read_to_string(testdata().join("main.go")).unwrap();
    let idx = src
        .lines()
        .position(|l| l.ends_with(&format!("// {marker}")))
        .unwrap_or_else(|| panic!("{marker} not in main.go"));
    idx as u32 + 1
}

fn semacquire(go: &str) -> &'static str {
    if go == GO126 {
        "internal/sync.runtime_SemacquireMutex"
    } else {
        "sync.runtime_SemacquireMutex"
    }
}

#[test]
fn version_text_start_and_moduledata_match_go_tools() {
    for ((go, v), bin) in fixtures() {
        let b = GoBinary::open(bin).unwrap();
        let mut c = go_cmd(go);
        c.arg("version").arg(bin);
        let said = run(c);
        let said = said.split_whitespace().nth(1).unwrap();
        assert_eq!(b.go_version().raw, said, "{bin:?}");
        assert_eq!(b.has_symtab(), !v.stripped(), "{bin:?}");
        assert_eq!(b.is_pie(), *v == Variant::Pie, "{bin:?}");

        let sym = nm(go, &fixtures()[&(*go, v.twin())]);
        assert_eq!(
            b.text_start(),
            sym["runtime.text"].0,
            "runtime.text of {bin:?}"
        );
        if !v.stripped() {
            // Data layout differs between a binary and its stripped twin, so
            // only unstripped builds can be compared to their own symbols.
            let gofunc = sym.get("go:func.*").or(sym.get("go.func.*")).unwrap().0;
            assert_eq!(b.gofunc(), Some(gofunc), "gofunc of {bin:?}");
            let md = sym["runtime.firstmoduledata"].0;
            assert_eq!(b.moduledata_addr(), Some(md), "moduledata of {bin:?}");
        }
        let (vaddr, offset, memsz) = b.exec_segment();
        assert!((vaddr..vaddr + memsz).contains(&b.text_start()));
        assert_eq!(
            b.file_offset(b.text_start()),
            Some(b.text_start() - vaddr + offset)
        );
    }
}

#[test]
fn function_entries_match_nm_of_unstripped_twin() {
    for ((go, v), bin) in fixtures() {
        let b = GoBinary::open(bin).unwrap();
        let sym = nm(go, &fixtures()[&(*go, v.twin())]);
        let go_text = b.text_start()..b.funcs().last().unwrap().end;
        let mut compared = 0;
        let mut mismatched = Vec::new();
        for (name, &(addr, kind)) in &sym {
            // Text symbols without a pclntab entry: section markers, and C
            // code (cgo runtime, libc start files) outside Go's text range.
            if !matches!(kind, 'T' | 't') || !name.contains('.') || name.starts_with('_') {
                continue;
            }
            if matches!(name.as_str(), "runtime.text" | "runtime.etext") || !go_text.contains(&addr)
            {
                continue;
            }
            // The pclntab names an assembly body without nm's ".abi0" suffix,
            // and nm prints the linker's "·" as ".".
            let want = pclntab_name(go, name.strip_suffix(".abi0").unwrap_or(name));
            let f = match b.func_at(addr) {
                Some(f) if f.entry == addr && f.name.replace('·', ".") == want => f,
                other => {
                    mismatched.push(format!("{name} at {addr:#x}: {other:?}"));
                    continue;
                }
            };
            compared += 1;
            // A name shared with an ABI wrapper maps to the body, which nm
            // calls NAME.abi0 when it is assembly.
            let by_name = b.func_by_name(&f.name).map(|f| f.entry);
            let at = |n: &str| sym.get(n).map(|s| s.0);
            let stem = name.strip_suffix(".abi0").unwrap_or(name);
            if by_name != at(stem) && by_name != at(&format!("{stem}.abi0")) {
                // Go 1.19 names several instantiations alike; those are ambiguous.
                assert!(
                    f.name.contains("[...]"),
                    "{name} in {bin:?}: by name {by_name:x?}"
                );
            }
        }
        assert!(mismatched.is_empty(), "{bin:?}: {mismatched:#?}");

        let mut wanted = vec![
            "main.main",
            "main.record",
            "main.spin",
            "runtime.mapassign_faststr",
            semacquire(go),
        ];
        wanted.extend(if *go == GO126 {
            [
                "internal/sync.(*Mutex).lockSlow",
                "internal/sync.(*Mutex).Unlock",
            ]
        } else {
            ["sync.(*Mutex).lockSlow", "sync.(*Mutex).unlockSlow"]
        });
        for name in wanted {
            let f = b
                .func_by_name(name)
                .unwrap_or_else(|| panic!("{name} in {bin:?}"));
            assert_eq!(f.entry, sym[name].0, "{name} in {bin:?}");
            assert_eq!(b.func_at(f.entry + 1).unwrap().name, name);
        }
        eprintln!(
            "{bin:?}: {compared} function entries and names equal to nm, {} funcs",
            b.funcs().count()
        );
        assert!(
            compared > 1000,
            "{bin:?}: only {compared} functions compared"
        );
    }
}

/// Go 1.19's linker elides bracket contents in pclntab names.
fn pclntab_name(go: &str, name: &str) -> String {
    match (name.find('['), name.rfind(']')) {
        (Some(i), Some(j)) if go == GO119 && j > i => {
            format!("{}[...]{}", &name[..i], &name[j + 1..])
        }
        _ => name.to_string(),
    }
}

/// ~200 PCs: every byte of main.record and main.spin, then one PC inside
/// each of evenly spaced functions across the binary.
fn sample_pcs(b: &GoBinary) -> Vec<u64> {
    let mut pcs: Vec<u64> = ["main.record", "main.spin"]
        .iter()
        .flat_map(|n| {
            let f = b.func_by_name(n).unwrap();
            (f.entry..f.end).step_by(3)
        })
        .collect();
    let funcs: Vec<_> = b.funcs().collect();
    let step = funcs.len() / 100;
    for (k, f) in funcs.iter().step_by(step).enumerate() {
        pcs.push(f.entry + (k as u64 * 37) % f.size());
    }
    pcs
}

#[test]
fn frames_agree_with_addr2line() {
    let mut total = 0;
    for ((go, v), bin) in fixtures() {
        let b = GoBinary::open(bin).unwrap();
        // addr2line needs a symbol table; use the twin, which has the same
        // text. Go 1.19's addr2line answers "?" for every PC of a Go 1.19 PIE
        // (it takes textStart from the file, where PIE leaves it 0 for the
        // loader to fill), so the newer tool referees both versions.
        let pcs = sample_pcs(&b);
        let want = addr2line(GO126, &fixtures()[&(*go, v.twin())], &pcs);
        let mut mismatches = Vec::new();
        let mut inlined = 0;
        for (pc, (func, file_line)) in pcs.iter().zip(&want) {
            let frames = b.frames_at(*pc);
            let (inner, outer) = (frames.first().unwrap(), frames.last().unwrap());
            inlined += usize::from(frames.len() > 1);
            // Padding after a function's code has no line; addr2line says ":-1".
            let got = match inner.line {
                0 => ":-1".to_string(),
                _ => format!("{}:{}", inner.file, inner.line),
            };
            if outer.function != pclntab_name(go, func) || got != *file_line {
                mismatches.push(format!("{pc:#x}: {frames:?} vs {func} {file_line}"));
            }
        }
        eprintln!(
            "{bin:?}: {} PCs ({inlined} in inlined code) compared with addr2line, {} mismatches",
            pcs.len(),
            mismatches.len()
        );
        assert!(mismatches.is_empty(), "{bin:?}:\n{}", mismatches.join("\n"));
        total += pcs.len();
    }
    assert!(total >= 10 * 200);
}

#[test]
fn inlined_calls_are_expanded_with_call_sites() {
    let body = marked_line("INLINE-BODY");
    let call = marked_line("INLINE-CALL");
    let lock = marked_line("LOCK-CALL");
    for ((go, _), bin) in fixtures() {
        let b = GoBinary::open(bin).unwrap();
        let record = b.func_by_name("main.record").unwrap();
        let frames: Vec<_> = (record.entry..record.end)
            .map(|pc| b.frames_at(pc))
            .collect();

        let bump = frames
            .iter()
            .find(|f| f[0].function == "main.bump")
            .unwrap_or_else(|| panic!("{bin:?}: no PC in main.record is inlined main.bump"));
        assert_eq!(bump.len(), 2, "{bump:?}");
        assert!(bump[0].inlined && !bump[1].inlined);
        assert!(bump[0].file.ends_with("gobin-testdata/main.go"));
        assert_eq!((bump[0].line, bump[1].line), (body, call), "{bin:?}");
        assert_eq!(bump[1].function, "main.record");

        // Go 1.24+ nests internal/sync.(*Mutex).Lock inside sync.(*Mutex).Lock.
        let inner_lock = if *go == GO126 {
            "internal/sync.(*Mutex).Lock"
        } else {
            "sync.(*Mutex).Lock"
        };
        let locked = frames
            .iter()
            .find(|f| f[0].function == inner_lock)
            .unwrap_or_else(|| panic!("{bin:?}: no inlined {inner_lock} in main.record"));
        let names: Vec<&str> = locked.iter().map(|f| f.function.as_str()).collect();
        let mut want = vec!["sync.(*Mutex).Lock", "main.record"];
        if *go == GO126 {
            want.insert(0, inner_lock);
        }
        assert_eq!(names, want, "{bin:?}");
        assert!(locked[0].file.ends_with("sync/mutex.go"), "{locked:?}");
        let caller = locked.last().unwrap();
        assert_eq!(caller.line, lock, "{bin:?}");
    }
}

#[test]
fn probe_points_match_objdump() {
    for ((go, v), bin) in fixtures() {
        let b = GoBinary::open(bin).unwrap();
        let data = std::fs::read(bin).unwrap();
        let byte_at = |vaddr: u64| data[b.file_offset(vaddr).unwrap() as usize];
        let twin = &fixtures()[&(*go, v.twin())];
        for name in ["runtime.mapassign_faststr", semacquire(go), "main.record"] {
            let f = b.func_by_name(name).unwrap();
            let pp = b.probe_points(&f).unwrap();
            assert_eq!(pp.entry, f.entry);
            assert!(pp.after_check > pp.entry, "{name}: {pp:x?}");
            let head: Vec<u8> = (0..4).map(|i| byte_at(f.entry + i)).collect();
            assert!(
                head == [0x49, 0x3b, 0x66, 0x10] || head == [0x4c, 0x8d, 0x64, 0x24],
                "{name} starts with {head:x?}"
            );
            assert!(!pp.rets.is_empty(), "{name}");
            assert!(pp.rets.iter().all(|&r| byte_at(r) == 0xc3), "{name}");

            let dis = objdump(go, twin, name);
            let rets: Vec<u64> = dis
                .iter()
                .filter(|(_, t)| t.starts_with("RET"))
                .map(|d| d.0)
                .collect();
            assert_eq!(pp.rets, rets, "{name} in {bin:?}");
            let jbe = dis.iter().position(|(_, t)| t.starts_with("JBE")).unwrap();
            assert!(jbe <= 2, "{name}: {dis:?}");
            assert_eq!(pp.after_check, dis[jbe + 1].0, "{name} in {bin:?}");
        }

        // main.spin has no frame, so the compiler makes it NOSPLIT.
        let spin = b.func_by_name("main.spin").unwrap();
        let pp = b.probe_points(&spin).unwrap();
        let dis = objdump(go, twin, "main.spin");
        assert!(!dis[0].1.starts_with("CMPQ"), "{dis:?}");
        assert_eq!(pp.after_check, pp.entry);
        assert!(!pp.rets.is_empty());

        // Every function decodes: failing closed must not mean failing often.
        let mut failed = Vec::new();
        let mut with_check = 0;
        let funcs: Vec<_> = b.funcs().collect();
        for f in &funcs {
            match b.probe_points(f) {
                Ok(pp) => with_check += usize::from(pp.after_check != pp.entry),
                Err(e) => failed.push(format!("{}: {e}", f.name)),
            }
        }
        eprintln!(
            "{bin:?}: {} functions decoded, {with_check} with a stack check, {} failed",
            funcs.len(),
            failed.len()
        );
        assert!(failed.is_empty(), "{bin:?}: {failed:#?}");
    }
}

#[test]
fn refuses_non_go_and_old_go() {
    let err = GoBinary::open(Path::new("/bin/true")).err().unwrap();
    assert!(matches!(err, GoBinError::NotGo(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "/bin/true is not a Go binary (no .go.buildinfo or .gopclntab)"
    );

    let src = testdata().join("main.go");
    let err = GoBinary::open(&src).err().unwrap();
    assert!(matches!(err, GoBinError::NotElf(_)), "{err}");

    let err = GoBinary::open(Path::new("/nonexistent/x")).err().unwrap();
    assert!(matches!(err, GoBinError::Io(..)), "{err}");

    let mut data = std::fs::read(&fixtures()[&(GO119, Variant::Stripped)]).unwrap();
    let magic = b"\xff Go buildinf:";
    let at = data.windows(magic.len()).position(|w| w == magic).unwrap();
    let rel = data[at..]
        .windows(8)
        .position(|w| w == b"go1.19.8")
        .unwrap();
    data[at + rel..at + rel + 8].copy_from_slice(b"go1.17.8");
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old");
    std::fs::write(&old, &data).unwrap();
    let err = GoBinary::open(&old).err().unwrap();
    assert!(matches!(err, GoBinError::Unsupported(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "built with go1.17.8; map-probe supports Go 1.19 and newer"
    );
}

/// The Go toolchains' own compilers are large, stripped, real-world Go binaries.
#[test]
fn opens_large_binaries_quickly() {
    for (go, minor) in [(GO126, 26), (GO119, 19)] {
        let mut c = go_cmd(go);
        c.args(["env", "GOTOOLDIR"]);
        let compile = PathBuf::from(run(c).trim()).join("compile");
        let size = std::fs::metadata(&compile).unwrap().len();
        let t = std::time::Instant::now();
        let b = GoBinary::open(&compile).unwrap();
        let took = t.elapsed();
        eprintln!(
            "{compile:?}: {} MB, {} funcs, opened in {took:?}",
            size >> 20,
            b.funcs().count()
        );
        assert_eq!(b.go_version().minor, minor);
        assert!(took.as_secs_f64() < 2.0, "{took:?}");
        let f = b.func_by_name("runtime.mapassign_faststr").unwrap();
        assert!(b.probe_points(&f).unwrap().after_check > f.entry);
        let main = b.func_by_name("main.main").unwrap();
        let frames = b.frames_at(main.entry);
        assert_eq!(frames.last().unwrap().function, "main.main");
    }
}

/// With no section headers at all, every lookup falls back to scanning the
/// segments: buildinfo and pclntab by magic, moduledata by its first words.
#[test]
fn works_without_section_headers() {
    for go in TOOLCHAINS {
        for v in [Variant::Stripped, Variant::ExternalStripped] {
            let bin = &fixtures()[&(go, v)];
            let want = GoBinary::open(bin).unwrap();
            let mut data = std::fs::read(bin).unwrap();
            // e_shoff (8 bytes at 0x28), e_shnum (0x3c) and e_shstrndx (0x3e).
            data[0x28..0x30].fill(0);
            data[0x3c..0x40].fill(0);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("noshdr");
            std::fs::write(&path, &data).unwrap();
            let b = GoBinary::open(&path).unwrap();
            assert_eq!(b.go_version(), want.go_version(), "{bin:?}");
            assert_eq!(b.text_start(), want.text_start(), "{bin:?}");
            assert_eq!(b.gofunc(), want.gofunc(), "{bin:?}");
            let f = b.func_by_name("main.record").unwrap();
            assert_eq!(b.frames_at(f.entry + 0x20), want.frames_at(f.entry + 0x20));
        }
    }
}
