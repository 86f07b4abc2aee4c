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

/// Where the target maps its executable: enough to turn a file offset into
/// the address the CPU runs it at (PIE or not), without reading memory.
pub struct Layout {
    maps: Vec<Mapping>,
}

impl Layout {
    /// The target's mappings of `exe` (by inode), or None when the process
    /// is gone or maps none of it.
    pub fn of(pid: u32, exe: &Path) -> Option<Layout> {
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
        (!maps.is_empty()).then_some(Layout { maps })
    }

    /// The runtime address of file offset `off`, if it is mapped.
    pub fn addr(&self, off: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|m| off >= m.pgoff && off - m.pgoff < m.end - m.start)
            .map(|m| m.start + off - m.pgoff)
    }
}

pub struct Text {
    mem: File,
    layout: Layout,
}

impl Text {
    /// The target's code as it runs, or None when the process or its
    /// memory cannot be read.
    pub fn of(pid: u32, exe: &Path) -> Option<Text> {
        let layout = Layout::of(pid, exe)?;
        let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
        Some(Text { mem, layout })
    }

    /// The runtime address of file offset `off`, if it is mapped.
    pub fn addr(&self, off: u64) -> Option<u64> {
        self.layout.addr(off)
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
