//! What one uprobe hit costs on this host, measured rather than assumed: a
//! trap took ~10 µs on the VMs we developed on and well under 1 µs on bare
//! metal, so a fixed figure either starves a fast host of samples or lets a
//! slow one overspend its budget. map-probe puts its own lock-wait program
//! on a function in its own process, calls it a few thousand times with and
//! without the probe, and takes the difference per call as the trap's cost.
//! The budget counts a hit as twice that: a trap on a lock or map path also
//! delays the goroutines queued behind it (the bench's lock mode went over
//! its 5% limit when the budget counted the bare trap).

/// What the budget charges per hit, in measured traps.
pub const HIT_COST_PER_TRAP: u32 = 2;

use std::{
    hint::black_box,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};

/// The function the calibration probe sits on. Never inlined, and `no_mangle`
/// so it stays one real function with one address.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn map_probe_calibration_point(x: u64) -> u64 {
    black_box(x).wrapping_mul(3).wrapping_add(1)
}

/// Calls per timed loop: with a 10 µs trap, 20 ms probed.
const CALLS: u32 = 2000;
/// A hit never costs less than this in the budget (timer noise on a host
/// whose trap is nearly free must not make probing look free).
const FLOOR: Duration = Duration::from_nanos(300);

fn run_loop() -> Duration {
    let t = Instant::now();
    let mut x = 0u64;
    for i in 0..CALLS {
        x = map_probe_calibration_point(x ^ u64::from(i));
    }
    black_box(x);
    t.elapsed()
}

/// Where the calibration function lives: the executable's path and the
/// file offset of its first instruction (from /proc/self/maps, so it holds
/// for a stripped or PIE build alike).
pub fn point() -> Result<(std::path::PathBuf, u64)> {
    let addr = map_probe_calibration_point as *const () as u64;
    let maps = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(off), Some(_dev), Some(_inode), Some(path)) =
            (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi), Ok(off)) = (
            u64::from_str_radix(lo, 16),
            u64::from_str_radix(hi, 16),
            u64::from_str_radix(off, 16),
        ) else {
            continue;
        };
        if (lo..hi).contains(&addr) {
            return Ok((path.into(), addr - lo + off));
        }
    }
    Err(anyhow!("the calibration function is in no file mapping"))
}

/// A probe that can be put on `point()` and taken out again.
pub trait Probe {
    fn attach_calibration(&mut self) -> Result<()>;
    fn detach_calibration(&mut self) -> Result<()>;
}

/// The cost of one hit: the fastest probed loop less the fastest plain one,
/// of three each, since a loop another process interrupted only ever looks
/// slower. (The best of three *differences* was not that: an interrupted
/// plain loop shrank its difference, and under load the trap read 0.3 µs,
/// the floor, against 1.5-9 µs measured otherwise on the same VM.)
pub fn measure(p: &mut impl Probe) -> Result<Duration> {
    let (mut base, mut probed) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        base = base.min(run_loop());
        p.attach_calibration()?;
        probed = probed.min(run_loop());
        p.detach_calibration()?;
    }
    Ok((probed.saturating_sub(base) / CALLS).max(FLOOR))
}

/// One measurement per map-probe process (the agent attaches to many
/// targets; the host's trap cost is the same for each).
pub fn once(p: &mut impl Probe) -> Result<Duration> {
    static COST: OnceLock<Duration> = OnceLock::new();
    if let Some(c) = COST.get() {
        return Ok(*c);
    }
    let c = measure(p)?;
    Ok(*COST.get_or_init(|| c))
}
