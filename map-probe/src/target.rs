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
    /// (device, inode) of the executable, to tell when the process has
    /// exec'd another program (the probes' offsets mean nothing there).
    exe_id: Option<(u64, u64)>,
}

fn exe_id(pid: u32) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Target {
    /// A running process, by PID.
    pub fn from_pid(pid: u32) -> Result<Target> {
        Self::from_pid_sharing(pid, |_| None)
    }

    /// Like `from_pid`, but takes the parsed binary from `known` when it has
    /// one for `/proc/PID/exe` (the agent: many processes of one program
    /// share one copy).
    pub fn from_pid_sharing(
        pid: u32,
        known: impl FnOnce(&Path) -> Option<Arc<GoBinary>>,
    ) -> Result<Target> {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        if pid == 0 || !proc_dir.exists() {
            bail!("no process with PID {pid}: check the PID with `ps -p {pid}`");
        }
        let status = Status::read(pid)
            .ok_or_else(|| anyhow!("no process with PID {pid}: it exited just now"))?;
        if status.tgid != pid {
            bail!(
                "PID {pid} is a thread of process {} ({}): attach with --pid {}",
                status.tgid,
                status.name,
                status.tgid
            );
        }
        match status.state {
            'Z' | 'X' => bail!(
                "PID {pid} ({}) has exited (a zombie its parent has not reaped yet)",
                status.name
            ),
            _ if status.kernel_thread => bail!(
                "PID {pid} ({}) is a kernel thread: point map-probe at a Go program",
                status.name
            ),
            _ => {}
        }
        let exe_link = proc_dir.join("exe");
        let exe = match fs::read_link(&exe_link) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                if !has_cap(CAP_SYS_PTRACE) && !status.same_user_as_us {
                    bail!(
                        "cannot read {} ({}): a process of another user, or with capabilities map-probe lacks, needs CAP_SYS_PTRACE (or run map-probe as its user with CAP_BPF and CAP_PERFMON)",
                        exe_link.display(),
                        status.name
                    )
                }
                if is_root() {
                    bail!(
                        "the kernel refuses root access to {} ({}): the process is in another \
                         user namespace or protected by a security module (Yama, SELinux, \
                         AppArmor); run map-probe where it can inspect the process",
                        exe_link.display(),
                        status.name
                    )
                }
                bail!(
                    "cannot read {}: permission denied (run map-probe as root)",
                    exe_link.display()
                )
            }
            Err(_) if !proc_dir.exists() => bail!("PID {pid} has exited"),
            Err(e) => bail!("cannot read {}: {e}", exe_link.display()),
        };
        let bin = match known(&exe_link) {
            Some(b) => b,
            None => Arc::new(open_go(&exe_link, &exe)?),
        };
        let bias = load_bias(pid, &bin)?;
        let start_time = start_time(pid).ok_or_else(|| anyhow!("PID {pid} has exited"))?;
        Ok(Target {
            pid,
            exe,
            open_path: exe_link,
            bin,
            bias,
            start_time,
            exe_id: exe_id(pid),
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
            exe_id: None,
        }
    }

    /// After the exec of a spawned target (stopped at its first
    /// instruction): learn where its binary landed.
    pub fn settle_after_exec(&mut self) -> Result<()> {
        self.bias = load_bias(self.pid, &self.bin)?;
        self.start_time = start_time(self.pid).unwrap_or(0);
        self.exe_id = exe_id(self.pid);
        Ok(())
    }

    /// Takes the one observation slot for this process: a second map-probe
    /// would spend the target's budget twice. Released when the claim drops
    /// (or map-probe dies: the kernel lets go of the lock).
    pub fn claim(&self, allow_second: bool) -> Result<Option<Claim>> {
        if allow_second {
            return Ok(None);
        }
        Claim::take(self.pid).map(Some)
    }

    /// Still the same process (not exited, not a zombie, PID not reused,
    /// not exec'd into another program)?
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
        !matches!(state, "Z" | "X" | "x")
            && (self.start_time == 0 || start == self.start_time)
            && self.exe_id.is_none_or(|id| exe_id(self.pid) == Some(id))
    }

    /// The program this process exec'd into, if it did (it lives on, but
    /// not as the binary that was probed).
    pub fn replaced_by(&self) -> Option<PathBuf> {
        let now = exe_id(self.pid)?;
        if self.exe_id.is_some_and(|id| id != now)
            && start_time(self.pid).is_some_and(|t| t == self.start_time)
        {
            return fs::read_link(format!("/proc/{}/exe", self.pid)).ok();
        }
        None
    }

    pub fn go_version(&self) -> &str {
        &self.bin.go_version().raw
    }
}

/// What `/proc/PID/status` and `stat` say about a process or thread.
struct Status {
    name: String,
    tgid: u32,
    state: char,
    kernel_thread: bool,
    /// Same real uid as map-probe, and no capability map-probe lacks: what
    /// the kernel's ptrace access check asks without CAP_SYS_PTRACE.
    same_user_as_us: bool,
}

const CAP_SYS_PTRACE: u32 = 19;

fn caps_of(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

fn has_cap(cap: u32) -> bool {
    let me = fs::read_to_string("/proc/self/status").unwrap_or_default();
    caps_of(&me, "CapEff:") & (1 << cap) != 0
}

impl Status {
    fn read(pid: u32) -> Option<Status> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        // Field 9 of stat (the 7th after the name and state): the task flags.
        let flags: u64 = rest.split_whitespace().nth(6)?.parse().ok()?;
        const PF_KTHREAD: u64 = 0x0020_0000;
        let me = fs::read_to_string("/proc/self/status").ok()?;
        let uid = |st: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_string))
        };
        let theirs = caps_of(&status, "CapPrm:");
        let ours = caps_of(&me, "CapPrm:");
        Some(Status {
            same_user_as_us: uid(&status) == uid(&me) && theirs & !ours == 0,
            name: field("Name:")?,
            tgid: field("Tgid:")?.parse().ok()?,
            state: rest.chars().next()?,
            kernel_thread: flags & PF_KTHREAD != 0,
        })
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Processes whose executable's base name is `name` (our own excluded),
/// oldest first.
pub fn pids_named(name: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut found: Vec<(u64, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| {
                p.file_name().is_some_and(|n| {
                    // A replaced binary reads "name (deleted)".
                    let n = n.to_string_lossy();
                    n == name || n.strip_suffix(" (deleted)") == Some(name)
                })
            })
        })
        .map(|pid| (start_time(pid).unwrap_or(0), pid))
        .collect();
    found.sort();
    found.into_iter().map(|(_, pid)| pid).collect()
}

/// The one PID `--exe NAME` means: refused when none or several match,
/// unless `newest` picks the most recently started.
pub fn pid_by_name(name: &str, newest: bool) -> Result<u32> {
    let pids = pids_named(name);
    match pids.as_slice() {
        [] => {
            bail!("no running process has an executable named {name}: check with `pgrep -x {name}`")
        }
        [pid] => Ok(*pid),
        [.., last] if newest => Ok(*last),
        many => bail!(
            "{name} matches {} processes (PIDs {}): pick one with --pid, or pass --newest",
            many.len(),
            many.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// An exclusive lock on `<dir>/<pid>.lock`, holding the owner's PID.
pub struct Claim {
    _file: fs::File,
}

impl Claim {
    /// `/run/map-probe`, shared by every user like /tmp (mode 1777), so a
    /// map-probe running as a service's own user still sees the others.
    fn open(pid: u32) -> Result<(PathBuf, fs::File)> {
        use std::os::unix::fs::PermissionsExt;
        let dirs = match std::env::var_os("MAP_PROBE_RUN_DIR") {
            Some(d) => vec![PathBuf::from(d)],
            None => vec![
                PathBuf::from("/run/map-probe"),
                std::env::temp_dir().join("map-probe"),
            ],
        };
        let mut last = None;
        for dir in dirs {
            if fs::create_dir(&dir).is_ok() {
                let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777));
            }
            let path = dir.join(format!("{pid}.lock"));
            match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
            {
                Ok(f) => return Ok((path, f)),
                Err(e) => last = Some(anyhow!("cannot open {}: {e}", path.display())),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no folder for the lock file")))
    }

    fn take(pid: u32) -> Result<Claim> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let (_, mut file) = Self::open(pid)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let owner = owner.trim();
            let who = if owner.is_empty() {
                "another map-probe".to_string()
            } else {
                format!("map-probe (PID {owner})")
            };
            bail!(
                "PID {pid} is already being probed by {who}: two would spend its budget twice; \
                 stop that one or pass --allow-second"
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(Claim { _file: file })
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
