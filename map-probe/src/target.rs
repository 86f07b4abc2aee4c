//! Finding the process and its executable: what is running under a PID, the
//! Go binary behind it (opened through /proc so another mount namespace is no
//! obstacle) and where the kernel loaded it.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::gobin::GoBinary;

pub struct Target {
    pub pid: u32,
    /// What the user would call the program (the exe link's target).
    pub exe: PathBuf,
    /// The path we open and attach through: `/proc/PID/exe` for a running
    /// process (it resolves inside the target's mount namespace).
    pub open_path: PathBuf,
    pub bin: Arc<GoBinary>,
    /// Runtime address minus link-time address (non-zero for PIE).
    pub bias: u64,
    /// Start time in clock ticks, to tell our target from a reused PID.
    start_time: u64,
}

impl Target {
    /// A running process, by PID.
    pub fn from_pid(pid: u32) -> Result<Target> {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        if pid == 0 || !proc_dir.exists() {
            bail!("no process with PID {pid}: check the PID with `ps -p {pid}`");
        }
        let exe_link = proc_dir.join("exe");
        let exe = match fs::read_link(&exe_link) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                bail!(
                    "cannot read {}: permission denied (run map-probe as root)",
                    exe_link.display()
                )
            }
            Err(_) => bail!(
                "PID {pid} has no executable (a kernel thread?); point map-probe at a Go program"
            ),
        };
        let bin = open_go(&exe_link, &exe)?;
        let bias = load_bias(pid, &bin)?;
        let start_time = start_time(pid)
            .ok_or_else(|| anyhow!("PID {pid} exited while map-probe was starting"))?;
        Ok(Target {
            pid,
            exe,
            open_path: exe_link,
            bin: Arc::new(bin),
            bias,
            start_time,
        })
    }

    /// A process we started ourselves and hold stopped before its exec: the
    /// binary is known by path, its load address only after the exec.
    pub fn from_spawned(pid: u32, exe: PathBuf, bin: GoBinary) -> Target {
        Target {
            pid,
            open_path: exe.clone(),
            exe,
            bin: Arc::new(bin),
            bias: 0,
            start_time: 0,
        }
    }

    /// After the exec of a spawned target: learn where its binary landed.
    pub fn settle_after_exec(&mut self) -> Result<()> {
        let want = fs::metadata(&self.open_path)?.ino();
        let exe_link = format!("/proc/{}/exe", self.pid);
        for _ in 0..500 {
            if fs::metadata(&exe_link).is_ok_and(|m| m.ino() == want) {
                self.bias = load_bias(self.pid, &self.bin)?;
                self.start_time = start_time(self.pid).unwrap_or(0);
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        bail!("{} did not start (exec failed?)", self.exe.display())
    }

    /// Still the same process (not exited, not a zombie, PID not reused)?
    pub fn alive(&self) -> bool {
        let Ok(stat) = fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = fields.first().copied().unwrap_or("X");
        let start: u64 = fields.get(19).and_then(|s| s.parse().ok()).unwrap_or(0);
        !matches!(state, "Z" | "X" | "x") && (self.start_time == 0 || start == self.start_time)
    }

    pub fn go_version(&self) -> &str {
        &self.bin.go_version().raw
    }
}

/// Opens a Go binary, turning format errors into one line the user can act on.
pub fn open_go(path: &Path, shown: &Path) -> Result<GoBinary> {
    GoBinary::open(path).map_err(|e| anyhow!("{}: {e}", shown.display()))
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Bias from the mapping that holds the executable segment: the kernel maps
/// file offset `pgoff` at `start`, the linker put that offset at `p_vaddr`.
pub fn load_bias(pid: u32, bin: &GoBinary) -> Result<u64> {
    let exe_link = format!("/proc/{pid}/exe");
    let ino = fs::metadata(&exe_link)
        .with_context(|| format!("cannot stat {exe_link}"))?
        .ino();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("cannot read /proc/{pid}/maps (run map-probe as root)"))?;
    let (seg_vaddr, seg_off, _) = bin.exec_segment();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || f[4].parse::<u64>().ok() != Some(ino) {
            continue;
        }
        let start = u64::from_str_radix(f[0].split('-').next().unwrap_or(""), 16)?;
        let pgoff = u64::from_str_radix(f[2], 16)?;
        return Ok(start
            .wrapping_sub(pgoff)
            .wrapping_sub(seg_vaddr.wrapping_sub(seg_off)));
    }
    bail!("the executable of PID {pid} is not mapped executable (is it still starting?)")
}
