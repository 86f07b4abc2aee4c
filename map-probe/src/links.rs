//! uprobe_multi links planted and removed by a short-lived child process.
//!
//! The kernel writes each breakpoint into the target through the memory of
//! the process that creates or closes the link, and gives up when that
//! process has a fatal signal pending: a SIGKILL that lands on map-probe
//! while it plants or removes breakpoints leaves some planted ("failed to
//! unregister, leaking uprobe" in the kernel log), and every later hit of
//! them traps until something removes them. Measured here: 1 kill in 22 at
//! random moments left 6 map-write entry breakpoints behind. So the link is
//! created and its last reference dropped in a forked child that only makes
//! system calls: a SIGKILL of map-probe does not reach it, and it finishes
//! the kernel's work whatever happens to its parent.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_TRACE_UPROBE_MULTI: u32 = 48;

/// `union bpf_attr` as BPF_LINK_CREATE reads it for uprobe_multi.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: [u32; 13],
}

/// An attached uprobe_multi link; dropping it detaches through a child.
pub struct Link {
    fd: Option<OwnedFd>,
}

impl Link {
    /// Plants `points` (file offset, cookie) of `target` for `pid` with the
    /// program `prog`, in a child; returns once the link exists.
    pub fn attach(prog: RawFd, target: &Path, points: &[(u64, u64)], pid: u32) -> io::Result<Link> {
        let path = CString::new(target.as_os_str().as_encoded_bytes())?;
        let offsets: Vec<u64> = points.iter().map(|p| p.0).collect();
        let cookies: Vec<u64> = points.iter().map(|p| p.1).collect();
        let attr = LinkCreateAttr {
            prog_fd: prog as u32,
            attach_type: BPF_TRACE_UPROBE_MULTI,
            path: path.as_ptr() as u64,
            offsets: offsets.as_ptr() as u64,
            cookies: cookies.as_ptr() as u64,
            cnt: offsets.len() as u32,
            pid,
            ..LinkCreateAttr::default()
        };
        let (ours, theirs) = socketpair()?;
        // SAFETY: after fork the child only makes system calls on memory
        // prepared above, then _exits.
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(io::Error::last_os_error());
        }
        if child == 0 {
            unsafe {
                let fd = libc::syscall(
                    libc::SYS_bpf,
                    BPF_LINK_CREATE,
                    &attr as *const LinkCreateAttr,
                    std::mem::size_of::<LinkCreateAttr>() as u32,
                ) as i32;
                let err = if fd < 0 { *libc::__errno_location() } else { 0 };
                send(theirs.as_raw_fd(), err, fd);
                // Our copy closes on exit; the parent holds its own by now,
                // or, if it died, ours was the last and the kernel removes
                // the breakpoints here, where no signal interrupts it.
                libc::_exit(0);
            }
        }
        drop(theirs);
        let got = recv(ours.as_raw_fd());
        reap(child);
        match got? {
            (0, Some(fd)) => Ok(Link { fd: Some(fd) }),
            (0, None) => Err(io::Error::other(
                "the link's file descriptor did not arrive",
            )),
            (err, _) => Err(io::Error::from_raw_os_error(err)),
        }
    }

    /// Detaches: a child holding a copy of the link outlives our copy, so
    /// the last reference, and with it the breakpoints' removal, is its.
    /// Returns at once; the child exits when told to or when we die.
    pub fn detach(mut self) -> io::Result<()> {
        let Some(fd) = self.fd.take() else {
            return Ok(());
        };
        let mut pipe = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the child only reads a pipe and exits.
        let child = unsafe { libc::fork() };
        if child < 0 {
            let e = io::Error::last_os_error();
            unsafe {
                libc::close(pipe[0]);
                libc::close(pipe[1]);
            }
            drop(fd);
            return Err(e);
        }
        if child == 0 {
            unsafe {
                libc::close(pipe[1]);
                let mut b = 0u8;
                while libc::read(pipe[0], (&mut b as *mut u8).cast(), 1) < 0
                    && *libc::__errno_location() == libc::EINTR
                {}
                libc::_exit(0);
            }
        }
        unsafe { libc::close(pipe[0]) };
        drop(fd);
        // EOF for the child: it exits, dropping the last reference.
        unsafe { libc::close(pipe[1]) };
        CLOSERS.with(|c| c.borrow_mut().push(child));
        reap_closers(false);
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.fd.is_some() {
            let _ = Link { fd: self.fd.take() }.detach();
        }
    }
}

thread_local! {
    /// Closer children not yet reaped.
    static CLOSERS: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reaps closer children that have exited (all of them, waiting, if `all`).
pub fn reap_closers(all: bool) {
    CLOSERS.with(|c| {
        c.borrow_mut().retain(|&pid| {
            let flags = if all { 0 } else { libc::WNOHANG };
            let mut st = 0;
            // SAFETY: waitpid on our own child.
            let r = unsafe { libc::waitpid(pid, &mut st, flags) };
            r == 0
        })
    });
}

fn reap(pid: i32) {
    let mut st = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two descriptors.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

const CMSG_SPACE: usize = 24;

/// Sends `err` and, if `fd >= 0`, the descriptor (async-signal-safe).
unsafe fn send(sock: RawFd, err: i32, fd: RawFd) {
    let mut data = err;
    let mut iov = libc::iovec {
        iov_base: (&mut data as *mut i32).cast(),
        iov_len: 4,
    };
    let mut cbuf = [0u64; CMSG_SPACE / 8];
    let mut msg: libc::msghdr = std::mem::zeroed();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if fd >= 0 {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        *(libc::CMSG_DATA(c) as *mut i32) = fd;
    }
    // A parent that died has closed its end: no SIGPIPE for us, which
    // would be a fatal signal pending while our copy of the link closes.
    libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
}

fn recv(sock: RawFd) -> io::Result<(i32, Option<OwnedFd>)> {
    let mut data = 0i32;
    let mut iov = libc::iovec {
        iov_base: (&mut data as *mut i32).cast(),
        iov_len: 4,
    };
    let mut cbuf = [0u64; CMSG_SPACE / 8];
    // SAFETY: a plain recvmsg into buffers we own.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = CMSG_SPACE;
        let n = loop {
            let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 || *libc::__errno_location() != libc::EINTR {
                break n;
            }
        };
        if n < 4 {
            return Err(io::Error::other(
                "the child that plants the uprobes died before answering",
            ));
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        let fd = if !c.is_null()
            && (*c).cmsg_level == libc::SOL_SOCKET
            && (*c).cmsg_type == libc::SCM_RIGHTS
        {
            Some(OwnedFd::from_raw_fd(*(libc::CMSG_DATA(c) as *const i32)))
        } else {
            None
        };
        Ok((data, fd))
    }
}
