//! Starting a program stopped just before its exec, so uprobes are in place
//! before its first instruction. std's `Command::spawn` cannot do this: it
//! waits for the exec to happen, so a child that stops itself first would
//! never let it return.

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

use anyhow::{anyhow, bail, Result};

pub struct Stopped {
    pub pid: u32,
    status: Option<i32>,
}

/// Forks; the child stops itself with SIGSTOP and, once continued, execs
/// `exe` with `args` (argv[0] = exe). Returns once the child is stopped.
pub fn spawn_stopped(exe: &Path, args: &[String]) -> Result<Stopped> {
    let path = CString::new(exe.as_os_str().as_bytes())?;
    let mut argv: Vec<CString> = vec![path.clone()];
    for a in args {
        argv.push(
            CString::new(a.as_bytes()).map_err(|_| anyhow!("argument with a NUL byte: {a:?}"))?,
        );
    }
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: between fork and exec the child only calls async-signal-safe
    // functions on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork failed: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            libc::raise(libc::SIGSTOP);
            libc::execv(path.as_ptr(), ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    let mut st = 0;
    let r = unsafe { libc::waitpid(pid, &mut st, libc::WUNTRACED) };
    if r != pid || !libc::WIFSTOPPED(st) {
        bail!("{} did not start", exe.display());
    }
    Ok(Stopped {
        pid: pid as u32,
        status: None,
    })
}

impl Stopped {
    pub fn resume(&self) {
        unsafe { libc::kill(self.pid as i32, libc::SIGCONT) };
    }

    pub fn kill(&mut self, sig: i32) {
        if self.status.is_none() {
            unsafe { libc::kill(self.pid as i32, sig) };
        }
    }

    /// Some(exit code, or 128 + signal) once the child has exited; never blocks.
    pub fn try_wait(&mut self) -> Option<i32> {
        if self.status.is_none() {
            let mut st = 0;
            if unsafe { libc::waitpid(self.pid as i32, &mut st, libc::WNOHANG) } == self.pid as i32
            {
                self.status = Some(decode(st));
            }
        }
        self.status
    }

    pub fn wait(&mut self) -> i32 {
        while self.status.is_none() {
            let mut st = 0;
            let r = unsafe { libc::waitpid(self.pid as i32, &mut st, 0) };
            if r == self.pid as i32 && (libc::WIFEXITED(st) || libc::WIFSIGNALED(st)) {
                self.status = Some(decode(st));
            } else if r < 0 {
                self.status = Some(1);
            }
        }
        self.status.unwrap_or(1)
    }
}

fn decode(st: i32) -> i32 {
    if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else if libc::WIFSIGNALED(st) {
        128 + libc::WTERMSIG(st)
    } else {
        1
    }
}

impl crate::session::Child for Stopped {
    fn exited(&mut self) -> Option<i32> {
        self.try_wait()
    }
}
