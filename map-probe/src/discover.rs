//! Finding the agent's targets in /proc: by PID, by the executable's base
//! name, or every Go process (recognised by the `.go.buildinfo` in its
//! executable, read once per distinct file).

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Which processes the agent watches.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub pids: Vec<u32>,
    /// Base names of executables (`contended`, not `/usr/bin/contended`).
    pub exes: Vec<String>,
    pub all_go: bool,
}

/// A process seen in /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    /// Start time in clock ticks: a PID reused later is another process.
    pub start_time: u64,
    pub exe: PathBuf,
}

impl Proc {
    pub fn exe_name(&self) -> String {
        self.exe
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }
}

/// Remembers which executables are Go, by (device, inode, mtime).
#[derive(Default)]
pub struct GoCache {
    known: HashMap<(u64, u64, i64), bool>,
}

impl GoCache {
    pub fn is_go(&mut self, pid: u32) -> bool {
        let link = format!("/proc/{pid}/exe");
        let Ok(m) = fs::metadata(&link) else {
            return false;
        };
        let key = (m.dev(), m.ino(), m.mtime());
        if self.known.len() > 4096 {
            self.known.clear();
        }
        *self
            .known
            .entry(key)
            .or_insert_with(|| crate::gobin::has_go_buildinfo(Path::new(&link)))
    }
}

/// Every user process (those with an executable) but map-probe itself.
pub fn processes() -> Vec<Proc> {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<Proc> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(proc_of)
        .collect();
    out.sort_by_key(|p| p.pid);
    out
}

/// One process, if it is there and has an executable.
pub fn proc_of(pid: u32) -> Option<Proc> {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => PathBuf::from(s),
        None => exe,
    };
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let start_time = rest.split_whitespace().nth(19)?.parse().ok()?;
    Some(Proc {
        pid,
        start_time,
        exe,
    })
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.exes.is_empty() && !self.all_go
    }

    /// Whether `p` is one of ours; `go` answers the (costlier) Go question.
    pub fn wants(&self, p: &Proc, go: impl FnOnce() -> bool) -> bool {
        self.pids.contains(&p.pid)
            || self.exes.iter().any(|e| *e == p.exe_name())
            || (self.all_go && go())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_by_pid_name_or_go() {
        let p = Proc {
            pid: 42,
            start_time: 1,
            exe: PathBuf::from("/srv/bin/shop"),
        };
        let by_name = Selector {
            exes: vec!["shop".into()],
            ..Default::default()
        };
        assert!(by_name.wants(&p, || false));
        let by_path = Selector {
            exes: vec!["/srv/bin/shop".into()],
            ..Default::default()
        };
        assert!(!by_path.wants(&p, || true));
        let by_pid = Selector {
            pids: vec![42],
            ..Default::default()
        };
        assert!(by_pid.wants(&p, || false));
        let go = Selector {
            all_go: true,
            ..Default::default()
        };
        assert!(go.wants(&p, || true));
        assert!(!go.wants(&p, || false));
        assert!(Selector::default().is_empty());
    }

    #[test]
    fn this_test_binary_is_not_go() {
        assert!(!GoCache::default().is_go(std::process::id()));
        assert_eq!(
            proc_of(std::process::id()).map(|p| p.pid),
            Some(std::process::id())
        );
    }
}
