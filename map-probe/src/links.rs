//! uprobe_multi links, created and removed by the *planter*: a small child
//! forked when map-probe starts.
//!
//! The kernel writes each breakpoint into the target through the memory of
//! the process that creates or closes the link, and gives up when that
//! process has a fatal signal pending: a SIGKILL that lands on map-probe
//! while it plants or removes breakpoints leaves some planted ("failed to
//! unregister, leaking uprobe" in the kernel log), and every later hit of
//! them traps until something removes them. Measured here: 1 kill in 22 at
//! random moments left 6 map-write entry breakpoints behind. So no link is
//! ever held by map-probe itself: the planter creates each one, keeps its
//! only descriptor, and closes it on request (a thread per close: the
//! kernel waits ~100 ms for in-flight hits). A SIGKILL of map-probe does not
//! reach it (it ignores the terminal's signals); it sees its socket close,
//! closes every link left and exits.
//!
//! Before, a child was forked from map-probe for every link made or closed:
//! with a big binary parsed, each fork copied tens of MB of page tables, and
//! on Debian's caddy that was a third of map-probe's own CPU.

use std::{
    collections::HashMap,
    ffi::CString,
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    sync::Mutex,
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

const OP_ATTACH: u32 = 1;
const OP_DETACH: u32 = 2;
const OP_SYNC: u32 = 3;

/// A request's fixed part; an attach is followed by the path, the offsets
/// and the cookies, and carries the program's descriptor.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Req {
    op: u32,
    id: u32,
    pid: u32,
    cnt: u32,
    path_len: u32,
    _pad: u32,
}

const REQ: usize = std::mem::size_of::<Req>();

struct Planter {
    sock: UnixStream,
    pid: i32,
}

static PLANTER: Mutex<Option<Planter>> = Mutex::new(None);

/// Forks the planter, if it is not running yet. Call it early: a fork
/// copies the page tables of everything map-probe has mapped by then.
pub fn start() -> io::Result<()> {
    let mut p = PLANTER.lock().unwrap_or_else(|e| e.into_inner());
    if p.is_none() {
        *p = Some(spawn()?);
    }
    Ok(())
}

fn spawn() -> io::Result<Planter> {
    let (ours, theirs) = UnixStream::pair()?;
    // SAFETY: the child runs `serve` and exits; it never returns here.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        drop(ours);
        serve(theirs);
    }
    drop(theirs);
    Ok(Planter {
        sock: ours,
        pid: child,
    })
}

/// The planter's CPU time so far (user and system, its close threads
/// included): the kernel's work of planting and removing breakpoints.
pub fn planter_cpu() -> std::time::Duration {
    let pid = match PLANTER.lock() {
        Ok(p) => p.as_ref().map(|p| p.pid),
        Err(_) => None,
    };
    let Some(stat) = pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
    else {
        return std::time::Duration::ZERO;
    };
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::time::Duration::from_secs_f64(f.iter().sum::<u64>() as f64 / hz)
}

/// One round trip with the planter: `req` (and `tail`, and `fd` beside it),
/// then its answer (status, link id).
fn call(req: Req, tail: &[u8], fd: Option<RawFd>) -> io::Result<(i32, u32)> {
    start()?;
    let mut guard = PLANTER.lock().unwrap_or_else(|e| e.into_inner());
    let p = guard
        .as_mut()
        .ok_or_else(|| io::Error::other("no planter"))?;
    let head: [u8; REQ] = unsafe { std::mem::transmute(req) };
    send_with_fd(p.sock.as_raw_fd(), &head, fd)?;
    p.sock.write_all(tail)?;
    let mut ans = [0u8; 8];
    p.sock.read_exact(&mut ans).map_err(|e| {
        io::Error::other(format!(
            "the process that plants the uprobes stopped answering: {e}"
        ))
    })?;
    Ok((
        i32::from_ne_bytes(ans[..4].try_into().unwrap()),
        u32::from_ne_bytes(ans[4..].try_into().unwrap()),
    ))
}

/// An attached uprobe_multi link, held by the planter; dropping it detaches.
pub struct Link {
    id: Option<u32>,
}

impl Link {
    /// Plants `points` (file offset, cookie) of `target` for `pid` with the
    /// program `prog`; returns once the link exists.
    pub fn attach(prog: RawFd, target: &Path, points: &[(u64, u64)], pid: u32) -> io::Result<Link> {
        let path = target.as_os_str().as_encoded_bytes();
        let mut tail = Vec::with_capacity(path.len() + 16 * points.len());
        tail.extend_from_slice(path);
        tail.extend(points.iter().flat_map(|p| p.0.to_ne_bytes()));
        tail.extend(points.iter().flat_map(|p| p.1.to_ne_bytes()));
        let req = Req {
            op: OP_ATTACH,
            pid,
            cnt: points.len() as u32,
            path_len: path.len() as u32,
            ..Req::default()
        };
        match call(req, &tail, Some(prog))? {
            (0, id) => Ok(Link { id: Some(id) }),
            (err, _) => Err(io::Error::from_raw_os_error(err)),
        }
    }

    /// Detaches: the planter closes the link in a thread of its own and
    /// answers at once; the breakpoints leave while the kernel waits out
    /// in-flight hits (`sync` waits for that).
    pub fn detach(mut self) -> io::Result<()> {
        self.release()
    }

    fn release(&mut self) -> io::Result<()> {
        let Some(id) = self.id.take() else {
            return Ok(());
        };
        let req = Req {
            op: OP_DETACH,
            id,
            ..Req::default()
        };
        call(req, &[], None).map(|_| ())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// Waits until every link asked to close is closed.
pub fn sync() {
    if PLANTER.lock().map_or(true, |p| p.is_none()) {
        return;
    }
    let _ = call(
        Req {
            op: OP_SYNC,
            ..Req::default()
        },
        &[],
        None,
    );
}

/// The planter's loop. It answers requests until its socket closes, then
/// closes every link left and exits.
fn serve(sock: UnixStream) -> ! {
    // The terminal's Ctrl-C reaches the whole process group: a planter
    // killed while it holds links would leave their breakpoints planted.
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGPIPE,
    ] {
        // SAFETY: setting a disposition.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let mut sock = sock;
    let mut links: HashMap<u32, OwnedFd> = HashMap::new();
    let mut closing: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let mut next = 1u32;
    loop {
        let Ok(Some((req, fd))) = recv_req(sock.as_raw_fd()) else {
            break;
        };
        let answer = match req.op {
            OP_ATTACH => {
                let n = req.cnt as usize;
                let mut tail = vec![0u8; req.path_len as usize + 16 * n];
                if sock.read_exact(&mut tail).is_err() {
                    break;
                }
                match (create(&req, &tail, fd), next) {
                    (Ok(link), id) => {
                        links.insert(id, link);
                        next = next.wrapping_add(1).max(1);
                        (0, id)
                    }
                    (Err(e), _) => (e.raw_os_error().unwrap_or(libc::EIO), 0),
                }
            }
            OP_DETACH => {
                if let Some(link) = links.remove(&req.id) {
                    closing.push(std::thread::spawn(move || drop(link)));
                }
                (0, req.id)
            }
            OP_SYNC => {
                for t in closing.drain(..) {
                    let _ = t.join();
                }
                (0, 0)
            }
            _ => (libc::EINVAL, 0),
        };
        let mut ans = [0u8; 8];
        ans[..4].copy_from_slice(&i32::to_ne_bytes(answer.0));
        ans[4..].copy_from_slice(&u32::to_ne_bytes(answer.1));
        if sock.write_all(&ans).is_err() {
            break;
        }
        closing.retain(|t| !t.is_finished());
    }
    // map-probe is gone or done: what it left is closed here, where no
    // signal interrupts the kernel's work.
    for (_, link) in links.drain() {
        closing.push(std::thread::spawn(move || drop(link)));
    }
    for t in closing {
        let _ = t.join();
    }
    // SAFETY: leaving the child without running the parent's exit handlers.
    unsafe { libc::_exit(0) }
}

fn create(req: &Req, tail: &[u8], prog: Option<OwnedFd>) -> io::Result<OwnedFd> {
    let prog = prog.ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
    let n = req.cnt as usize;
    let (path, rest) = tail.split_at(req.path_len as usize);
    let words = |b: &[u8]| -> Vec<u64> {
        b.as_chunks::<8>()
            .0
            .iter()
            .map(|c| u64::from_ne_bytes(*c))
            .collect()
    };
    let offsets = words(&rest[..8 * n]);
    let cookies = words(&rest[8 * n..]);
    let path = CString::new(path)?;
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_TRACE_UPROBE_MULTI,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        cookies: cookies.as_ptr() as u64,
        cnt: n as u32,
        pid: req.pid,
        ..LinkCreateAttr::default()
    };
    // SAFETY: the attr points at buffers that live across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr as *const LinkCreateAttr,
            std::mem::size_of::<LinkCreateAttr>() as u32,
        )
    } as i32;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const CMSG_SPACE: usize = 24;

/// Writes `bytes` whole, the first of them carrying `fd` (SCM_RIGHTS).
fn send_with_fd(sock: RawFd, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut cbuf = [0u64; CMSG_SPACE / 8];
    // SAFETY: a plain sendmsg from buffers we own.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            *(libc::CMSG_DATA(c) as *mut i32) = fd;
        }
        loop {
            let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
            if n >= 0 || *libc::__errno_location() != libc::EINTR {
                break n;
            }
        }
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < bytes.len() {
        // SAFETY: the socket stays ours; a borrowed stream writes the rest.
        let mut s = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(sock) });
        s.write_all(&bytes[n..])?;
    }
    Ok(())
}

/// Reads one request's fixed part and the descriptor beside it; None at EOF.
fn recv_req(sock: RawFd) -> io::Result<Option<(Req, Option<OwnedFd>)>> {
    let mut head = [0u8; REQ];
    let mut got = 0;
    let mut fd = None;
    while got < REQ {
        let mut iov = libc::iovec {
            iov_base: head[got..].as_mut_ptr().cast(),
            iov_len: REQ - got,
        };
        let mut cbuf = [0u64; CMSG_SPACE / 8];
        // SAFETY: a plain recvmsg into buffers we own.
        let n = unsafe {
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
            let c = libc::CMSG_FIRSTHDR(&msg);
            if n > 0
                && !c.is_null()
                && (*c).cmsg_level == libc::SOL_SOCKET
                && (*c).cmsg_type == libc::SCM_RIGHTS
            {
                fd = Some(OwnedFd::from_raw_fd(*(libc::CMSG_DATA(c) as *const i32)));
            }
            n
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(None);
        }
        got += n as usize;
    }
    // SAFETY: Req is plain integers.
    let req: Req = unsafe { std::mem::transmute(head) };
    Ok(Some((req, fd)))
}
