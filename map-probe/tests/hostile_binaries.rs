//! Hostile and broken binaries: the ELF, build-info, pclntab, moduledata and
//! inline-tree readers meet thousands of truncated, bit-flipped and spliced
//! variants of real Go binaries, seeded so every failure replays. Each
//! variant is read or refused with an error, never a panic, within a time
//! limit, and with bounded memory (an address-space limit turns a runaway
//! allocation into a failure). `cargo xtask fuzz` runs the same mutator for
//! longer with fresh seeds.

mod common;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{go_fixture, tmp, GoToolchain, Variant};
use map_probe::{
    catalog::{self, Purpose},
    gobin::GoBinary,
};

/// xorshift64*: small, seeded, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Where the readers look hardest: the ELF and program headers, the section
/// headers, the pclntab (header and functab), the build info, moduledata.
fn hot_regions(data: &[u8]) -> Vec<(usize, usize)> {
    use object::{Object, ObjectSection};
    let mut out = vec![(0, 64.min(data.len()))];
    let Ok(file) = object::File::parse(data) else {
        return out;
    };
    for s in file.sections() {
        let name = s.name().unwrap_or("");
        if [
            ".gopclntab",
            ".go.buildinfo",
            ".go.module",
            ".noptrdata",
            ".data.rel.ro",
        ]
        .contains(&name)
        {
            if let Some((off, len)) = s.file_range() {
                out.push((off as usize, (len as usize).min(4096)));
            }
        }
    }
    out
}

/// One variant of `seeds[i]` and a line saying how it was made.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> (Vec<u8>, String) {
    let a = rng.below(seeds.len());
    let mut data = seeds[a].clone();
    match rng.below(4) {
        0 => {
            let cut = rng.below(data.len());
            data.truncate(cut);
            (data, format!("seed {a} truncated to {cut}"))
        }
        1 => {
            let n = 1 + rng.below(16);
            for _ in 0..n {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            (data, format!("seed {a} with {n} bit flips anywhere"))
        }
        2 => {
            let regions = hot_regions(&data);
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let (off, len) = regions[rng.below(regions.len())];
                let i = off + rng.below(len);
                if i < data.len() {
                    data[i] = match rng.below(3) {
                        0 => data[i] ^ (1 << rng.below(8)),
                        1 => 0xff,
                        _ => 0,
                    };
                }
            }
            (
                data,
                format!("seed {a} with {n} changes in its headers and tables"),
            )
        }
        _ => {
            let b = rng.below(seeds.len());
            let cut = rng.below(data.len().min(seeds[b].len()));
            data.truncate(cut);
            data.extend_from_slice(&seeds[b][cut..]);
            (data, format!("seed {a} spliced with seed {b} at {cut}"))
        }
    }
}

/// Everything map-probe asks of a binary it is about to probe; whether the
/// variant was read (true) or refused.
fn exercise(data: Vec<u8>, rng: &mut Rng) -> bool {
    let Ok(bin) = GoBinary::parse(data, Path::new("variant")) else {
        return false;
    };
    let _ = bin.go_version();
    for purpose in [Purpose::LockWait, Purpose::MapWrite, Purpose::Fatal] {
        let _ = catalog::plan(&bin, purpose);
    }
    let funcs: Vec<_> = bin.funcs().take(5000).collect();
    for _ in 0..200 {
        if funcs.is_empty() {
            break;
        }
        let f = &funcs[rng.below(funcs.len())];
        let pc = f.entry + rng.below(f.size().min(1 << 20) as usize) as u64;
        let _ = bin.frames_at(pc);
        let _ = bin.func_at(pc);
        let _ = bin.func_by_name(&f.name);
    }
    for f in funcs.iter().take(50) {
        let _ = bin.probe_points(f);
    }
    true
}

fn seeds() -> Vec<Vec<u8>> {
    let mut bins: Vec<PathBuf> = Vec::new();
    for go in GoToolchain::ALL {
        for v in [Variant::Plain, Variant::Pie, Variant::ExternalStripped] {
            bins.push(go_fixture("quickexit", go, v));
        }
    }
    bins.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Limits the test process's address space, so an allocation sized by a
/// corrupt header fails here instead of swapping the machine.
fn limit_memory(bytes: u64) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
}

/// What one variant may take.
const LIMIT: Duration = Duration::from_secs(3);

/// A reader that hangs never returns to the loop that would time it, so a
/// watchdog thread does: once the variant being read passes the limit, it
/// names the variant and ends the test process.
struct Watchdog {
    /// When the current variant began, in ms since `base`; 0 between variants.
    started_ms: Arc<AtomicU64>,
    recipe: Arc<Mutex<String>>,
    base: Instant,
}

impl Watchdog {
    fn start() -> Watchdog {
        let w = Watchdog {
            started_ms: Arc::new(AtomicU64::new(0)),
            recipe: Arc::new(Mutex::new(String::new())),
            base: Instant::now(),
        };
        let (started, recipe, base) = (w.started_ms.clone(), w.recipe.clone(), w.base);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(50));
            let at = started.load(Ordering::Acquire);
            let now = base.elapsed().as_millis() as u64;
            if at != 0 && now.saturating_sub(at) > LIMIT.as_millis() as u64 {
                eprintln!(
                    "hung: still reading after {} ms: {}",
                    now - at,
                    recipe.lock().unwrap()
                );
                std::process::exit(101);
            }
        });
        w
    }

    fn reading(&self, recipe: &str) {
        *self.recipe.lock().unwrap() = recipe.to_string();
        let now = (self.base.elapsed().as_millis() as u64).max(1);
        self.started_ms.store(now, Ordering::Release);
    }

    fn done(&self) {
        self.started_ms.store(0, Ordering::Release);
    }
}

/// Runs `count` variants from `seed`; the one being read is written to a file
/// first, so even an abort leaves its recipe behind.
fn run(seed: u64, count: usize, deadline: Option<Instant>) -> (usize, usize) {
    let seeds = seeds();
    limit_memory(8 << 30);
    let current = tmp("hostile-current.txt");
    let mut rng = Rng(seed | 1);
    let watchdog = Watchdog::start();
    let (mut done, mut read) = (0, 0);
    for i in 0..count {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let (data, how) = mutate(&mut rng, &seeds);
        let recipe = format!("seed {seed:#x}, variant {i}: {how}");
        std::fs::write(&current, &recipe).unwrap();
        let mut qrng = Rng(rng.next() | 1);
        let t = Instant::now();
        watchdog.reading(&recipe);
        let res =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exercise(data, &mut qrng)));
        watchdog.done();
        read += usize::from(res.as_ref().is_ok_and(|&r| r));
        assert!(res.is_ok(), "panicked on {recipe}");
        assert!(t.elapsed() < LIMIT, "took {:?} on {recipe}", t.elapsed());
        done += 1;
    }
    (done, read)
}

#[test]
fn thousands_of_broken_binaries_are_refused_or_read() {
    let t = Instant::now();
    let (n, read) = run(0x6d61_702d_7072_6f62, 5000, None);
    eprintln!(
        "{n} variants in {:.0} s: {read} read as Go binaries (and queried), {} refused",
        t.elapsed().as_secs_f64(),
        n - read
    );
    assert!(
        read > n / 10,
        "most variants refused early: the mutator is too blunt"
    );
}

/// `cargo xtask fuzz`: MAP_PROBE_FUZZ_SECS of variants from MAP_PROBE_FUZZ_SEED
/// (default: the clock).
#[test]
#[ignore = "run by `cargo xtask fuzz`"]
fn fuzz_for_a_while() {
    let secs: u64 = std::env::var("MAP_PROBE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = std::env::var("MAP_PROBE_FUZZ_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("fuzzing for {secs} s from seed {seed:#x} (MAP_PROBE_FUZZ_SEED={seed:x} replays it)");
    let (n, read) = run(
        seed,
        usize::MAX,
        Some(Instant::now() + Duration::from_secs(secs)),
    );
    eprintln!(
        "{n} variants ({read} read, {} refused), no failure",
        n - read
    );
}

/// The watchdog itself: a reader stuck past the limit ends the process with
/// the variant named, instead of hanging CI for its whole timeout.
#[test]
fn a_hung_reader_is_caught() {
    let t = Instant::now();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hang_for_the_watchdog",
            "--ignored",
            "--nocapture",
        ])
        .env("MAP_PROBE_HANG", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(101), "{err}");
    assert!(err.contains("hung: still reading after"), "{err}");
    assert!(err.contains("a deliberate hang"), "{err}");
    assert!(t.elapsed() < LIMIT * 3, "caught late: {:?}", t.elapsed());
}

#[test]
#[ignore = "run by a_hung_reader_is_caught"]
fn hang_for_the_watchdog() {
    if std::env::var_os("MAP_PROBE_HANG").is_none() {
        return;
    }
    let w = Watchdog::start();
    w.reading("a deliberate hang");
    std::thread::sleep(LIMIT * 10);
}
