//! Small helpers shared by the tasks: running commands, paths, the pinned toolchain.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Rust toolchain everything in the workspace is built with (aya needs >= 1.98).
pub const TOOLCHAIN: &str = "1.98.0";

/// Prints one progress line.
pub fn step(task: &str, msg: &str) {
    println!("xtask {task}: {msg}");
}

/// The workspace root (xtask lives one level below it).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `$CARGO_HOME`, defaulting to `~/.cargo`.
pub fn cargo_home() -> Result<PathBuf, String> {
    if let Some(h) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// Whether we run with effective uid 0 (read from /proc, std only).
pub fn is_root() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false)
}

pub fn require_root(what: &str) -> Result<(), String> {
    if is_root() {
        Ok(())
    } else {
        Err(format!("{what} must run as root (it loads BPF programs)"))
    }
}

/// Finds `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// PATH with `$CARGO_HOME/bin` in it (so children find rustup's proxies and bpf-linker).
pub fn child_path() -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(home) = cargo_home() {
        let bin = home.join("bin");
        if !dirs.contains(&bin) {
            dirs.push(bin);
        }
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// A command with our PATH and none of the outer cargo's toolchain selection leaking in.
pub fn cmd(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env("PATH", child_path());
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "CARGO",
    ] {
        c.env_remove(var);
    }
    c
}

/// rustup's `cargo` proxy (so `+1.98.0` works), pinned toolchain selected.
pub fn cargo() -> Command {
    let proxy = cargo_home()
        .map(|h| h.join("bin/cargo"))
        .ok()
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("cargo"));
    let mut c = cmd(proxy);
    c.arg(format!("+{TOOLCHAIN}"));
    c.current_dir(repo_root());
    c
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `c` with inherited stdio; fails if it cannot start or exits non-zero.
pub fn run(c: &mut Command) -> Result<(), String> {
    let what = describe(c);
    println!("  $ {what}");
    let status = c
        .status()
        .map_err(|e| format!("cannot run `{what}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{what}` failed ({status})"))
    }
}

/// Runs `c` quietly and returns its stdout (trimmed) if it exited zero.
pub fn output(c: &mut Command) -> Option<String> {
    let out = c.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Like `output` but keeps stdout and stderr together and ignores the exit status.
pub fn output_any(c: &mut Command) -> Option<String> {
    let out = c.stdin(Stdio::null()).output().ok()?;
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(s.trim().to_string())
}

/// The machine's Go (`go` on PATH, else the usual install place).
pub fn machine_go() -> PathBuf {
    which("go")
        .or_else(|| Some(PathBuf::from("/usr/local/go/bin/go")).filter(|p| p.is_file()))
        .unwrap_or_else(|| PathBuf::from("go"))
}
