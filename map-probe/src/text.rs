//! The target's code as it runs, read through `/proc/PID/mem`: where the
//! kernel has planted a uprobe, the byte at the probed address reads INT3.
//! This tells when a detached link's breakpoints are really gone, and proves
//! that none is left behind.

use std::{
    fs::File,
    io,
    os::unix::fs::{FileExt, MetadataExt},
    path::Path,
};

const INT3: u8 = 0xcc;

/// One executable mapping of the target's file: `[start, end)` holds the
/// file bytes from `pgoff` on.
struct Mapping {
    start: u64,
    end: u64,
    pgoff: u64,
}

pub struct Text {
    mem: File,
    maps: Vec<Mapping>,
}

impl Text {
    /// The target's mappings of `exe` (by inode), or None when the process
    /// or its memory cannot be read.
    pub fn of(pid: u32, exe: &Path) -> Option<Text> {
        let ino = std::fs::metadata(exe).ok()?.ino();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        let maps = maps
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 6 || f[4].parse::<u64>().ok()? != ino {
                    return None;
                }
                let (a, b) = f[0].split_once('-')?;
                Some(Mapping {
                    start: u64::from_str_radix(a, 16).ok()?,
                    end: u64::from_str_radix(b, 16).ok()?,
                    pgoff: u64::from_str_radix(f[2], 16).ok()?,
                })
            })
            .collect::<Vec<_>>();
        let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
        (!maps.is_empty()).then_some(Text { mem, maps })
    }

    /// The runtime address of file offset `off`, if it is mapped.
    pub fn addr(&self, off: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|m| off >= m.pgoff && off - m.pgoff < m.end - m.start)
            .map(|m| m.start + off - m.pgoff)
    }

    /// The target's byte at file offset `off` as it runs.
    pub fn byte(&self, off: u64) -> io::Result<u8> {
        let addr = self
            .addr(off)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "offset not mapped"))?;
        let mut b = [0u8];
        self.mem.read_exact_at(&mut b, addr)?;
        Ok(b[0])
    }

    /// Whether a breakpoint is still planted at any of `offsets`.
    pub fn any_planted(&self, offsets: &[u64]) -> io::Result<bool> {
        for &off in offsets {
            if self.byte(off)? == INT3 {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
