//! Starting a program with the probes in place before its first instruction.
//! The child asks to be traced, stops itself before its exec, and the kernel
//! stops it again right after the exec (a traced exec raises SIGTRAP): the
//! probes go in during the first stop, the load address is read during the
//! second, and then the child is let go, untraced. A program that exits at
//! once is therefore never lost: its exec is seen before it can run.
//! std's `Command::spawn` cannot do this: it waits for the exec to happen.

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path, time::Duration};

use anyhow::{anyhow, bail, Result};

pub struct Stopped {
    pub pid: u32,
    status: Option<i32>,
    /// Read end of a close-on-exec pipe: EOF means the exec happened, four
    /// bytes are the errno of a failed one.
    exec_errors: i32,
    traced: bool,
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
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: between fork and exec the child only calls async-signal-safe
    // functions on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork failed: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            libc::close(fds[0]);
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            libc::raise(libc::SIGSTOP);
            libc::execv(path.as_ptr(), ptrs.as_ptr());
            let err = *libc::__errno_location();
            libc::write(fds[1], (&err as *const i32).cast(), 4);
            libc::_exit(127);
        }
    }
    // SAFETY: our copy of the write end; the child holds its own.
    unsafe { libc::close(fds[1]) };
    let mut child = Stopped {
        pid: pid as u32,
        status: None,
        exec_errors: fds[0],
        traced: true,
    };
    match child.wait_stop()? {
        libc::SIGSTOP => Ok(child),
        sig => bail!(
            "{} stopped with signal {sig} before its exec",
            exe.display()
        ),
    }
}

impl Stopped {
    /// Waits for the traced child's next stop and returns its signal.
    fn wait_stop(&mut self) -> Result<i32> {
        loop {
            let mut st = 0;
            // SAFETY: waitpid on our own child.
            let r = unsafe { libc::waitpid(self.pid as i32, &mut st, 0) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                bail!("waiting for PID {}: {e}", self.pid);
            }
            if libc::WIFSTOPPED(st) {
                return Ok(libc::WSTOPSIG(st));
            }
            self.status = Some(decode(st));
            self.traced = false;
            bail!("exited");
        }
    }

    /// Lets the child exec and stops it at its first instruction. An exec
    /// that fails is one line naming the reason.
    pub fn run_to_exec(&mut self, exe: &Path) -> Result<()> {
        let mut inject = 0;
        loop {
            // SAFETY: the child is ours and in a ptrace stop.
            unsafe { libc::ptrace(libc::PTRACE_CONT, self.pid as i32, 0, inject) };
            match self.wait_stop() {
                Ok(libc::SIGTRAP) => return Ok(()),
                // Some other signal arrived before the exec: deliver it.
                Ok(sig) => inject = sig,
                Err(_) => {
                    let mut err = 0i32;
                    // SAFETY: reading four bytes into an i32.
                    let n =
                        unsafe { libc::read(self.exec_errors, (&mut err as *mut i32).cast(), 4) };
                    if n == 4 {
                        bail!(
                            "cannot execute {}: {}",
                            exe.display(),
                            std::io::Error::from_raw_os_error(err)
                        );
                    }
                    bail!(
                        "{} exited before its exec (status {})",
                        exe.display(),
                        self.status.unwrap_or(1)
                    );
                }
            }
        }
    }

    /// Lets the child run on, no longer traced.
    pub fn release(&mut self) {
        if self.traced {
            // SAFETY: the child is in its post-exec ptrace stop.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, self.pid as i32, 0, 0) };
            self.traced = false;
        }
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
            let r = unsafe { libc::waitpid(self.pid as i32, &mut st, libc::WNOHANG) };
            if r == self.pid as i32 && (libc::WIFEXITED(st) || libc::WIFSIGNALED(st)) {
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
            } else if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                self.status = Some(1);
            }
        }
        self.status.unwrap_or(1)
    }

    /// Waits for the child to exit, passing SIGINT and SIGTERM sent to
    /// map-probe on to it, and returns its status.
    pub fn wait_forwarding(&mut self) -> i32 {
        // SAFETY: plain signal-set manipulation on stack memory.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            let tick = libc::timespec {
                tv_sec: 0,
                tv_nsec: Duration::from_millis(20).as_nanos() as i64,
            };
            loop {
                if let Some(code) = self.try_wait() {
                    return code;
                }
                let sig = libc::sigtimedwait(&set, std::ptr::null_mut(), &tick);
                if sig > 0 {
                    self.kill(sig);
                }
            }
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(self.exec_errors) };
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
