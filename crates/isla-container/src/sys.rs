//! The few system calls that neither nix nor std wraps in the form the runtime needs. All `unsafe`
//! of the crate lives here; every function is allocation-free so the container's init (a clone of
//! the runtime made without `fork()`'s malloc bookkeeping) may call it.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::Pid;

/// What `clone_process` returned in each of the two processes.
pub enum Forked {
    Parent(Pid),
    Child,
}

/// clone(2) with fork semantics (no new stack, copy-on-write memory) and `flags` (CLONE_NEW*).
/// Unlike glibc's `fork()` it runs no atfork handlers: the child must only use memory prepared
/// before the call and allocation-free system calls, which is how `init` is written.
pub fn clone_process(flags: libc::c_int) -> Result<Forked, Errno> {
    // SAFETY: the raw clone syscall with a null stack behaves like fork(): the child gets a
    // private copy of the address space and continues from here. No pointers are passed.
    let ret = unsafe {
        libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize)
    };
    match ret {
        -1 => Err(Errno::last()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Pid::from_raw(pid as i32))),
    }
}

/// execve(2) with NULL-terminated argument and environment arrays. Returns only on failure.
pub fn execve(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> Errno {
    debug_assert!(argv.last().is_some_and(|p| p.is_null()) && envp.last().is_some_and(|p| p.is_null()));
    // SAFETY: `path` is NUL-terminated; both arrays end with a null pointer (built by
    // `plan::CStrArray`) and point at CStrings that outlive this call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Errno::last()
}

/// Terminate the process at once (no atexit handlers, no stdio flush): the child's exit path.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no process state the parent shares.
    unsafe { libc::_exit(code) }
}

/// prctl(2) with integer arguments.
pub fn prctl(op: libc::c_int, a: libc::c_ulong, b: libc::c_ulong) -> Result<(), Errno> {
    // SAFETY: the options used by this crate (PR_CAPBSET_DROP, PR_SET_KEEPCAPS, PR_CAP_AMBIENT,
    // PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG) take integers only.
    let r = unsafe { libc::prctl(op, a, b, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    Errno::result(r).map(drop)
}

/// capset(2) for the calling thread: the three 64-bit sets.
pub fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<(), Errno> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let hdr = Header { version: 0x2008_0522, pid: 0 }; // _LINUX_CAPABILITY_VERSION_3
    let lo = |v: u64| v as u32;
    let hi = |v: u64| (v >> 32) as u32;
    let data = [
        Data { effective: lo(effective), permitted: lo(permitted), inheritable: lo(inheritable) },
        Data { effective: hi(effective), permitted: hi(permitted), inheritable: hi(inheritable) },
    ];
    // SAFETY: header and the two data structs have the kernel's layout for version 3.
    let r = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const Header, data.as_ptr()) };
    Errno::result(r).map(drop)
}

/// Load a classic BPF seccomp program (already compiled) with seccomp(2) flags.
pub fn seccomp_load(program: &[libc::sock_filter], flags: libc::c_ulong) -> Result<(), Errno> {
    let prog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr() as *mut libc::sock_filter };
    // SAFETY: `prog` points at `program`, which lives across the call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            1 as libc::c_ulong, /* SECCOMP_SET_MODE_FILTER */
            flags,
            &prog as *const _,
        )
    };
    Errno::result(r).map(drop)
}

/// setrlimit(2) by resource number.
pub fn setrlimit(resource: libc::c_int, soft: u64, hard: u64) -> Result<(), Errno> {
    let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: plain struct argument; the resource number comes from the kernel's list.
    let r = unsafe { libc::setrlimit(resource as _, &lim) };
    Errno::result(r).map(drop)
}

/// setdomainname(2).
pub fn setdomainname(name: &[u8]) -> Result<(), Errno> {
    // SAFETY: pointer and length describe `name`.
    let r = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
    Errno::result(r).map(drop)
}

/// ioctl(2) with an integer (or no) argument, for TIOCSCTTY.
pub fn ioctl_int(fd: RawFd, req: libc::c_ulong, arg: libc::c_int) -> Result<(), Errno> {
    // SAFETY: the requests used (TIOCSCTTY) take an int by value.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    Errno::result(r).map(drop)
}

/// Unlock a pseudo-terminal master and return its slave number (TIOCSPTLCK, TIOCGPTN).
pub fn pty_unlock(master: RawFd) -> Result<u32, Errno> {
    let unlock: libc::c_int = 0;
    let mut n: libc::c_uint = 0;
    // SAFETY: both requests take a pointer to an int that lives across the call.
    unsafe {
        Errno::result(libc::ioctl(master, libc::TIOCSPTLCK, &unlock))?;
        Errno::result(libc::ioctl(master, libc::TIOCGPTN, &mut n))?;
    }
    Ok(n)
}

/// Send one file descriptor over a connected unix socket (SCM_RIGHTS), without allocating.
pub fn send_fd(sock: BorrowedFd<'_>, fd: RawFd, payload: &[u8]) -> Result<(), Errno> {
    const SPACE: usize = 64;
    #[repr(C, align(8))]
    struct Buf([u8; SPACE]);
    let mut cbuf = Buf([0; SPACE]);
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    // SAFETY: msg_control points at `cbuf`, large enough (64 bytes) for one fd's control message;
    // CMSG_FIRSTHDR therefore returns a valid pointer into it, and the fd is copied with an
    // unaligned write into the data area CMSG_DATA computes.
    let r = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(sock.as_raw_fd(), &msg, 0)
    };
    Errno::result(r).map(drop)
}

/// Signal handler target for `forward_signals`.
static FORWARD_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = FORWARD_TO.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Forward the usual termination and user signals this process receives to `pid` (the container
/// of a foreground `run`), as runc does.
pub fn forward_signals(pid: Pid) {
    FORWARD_TO.store(pid.as_raw(), std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH]
    {
        // SAFETY: installs a handler that only calls the async-signal-safe kill(2).
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
}

/// Put this thread's handling of the forwarded signals back to the default.
pub fn stop_forwarding() {
    FORWARD_TO.store(0, std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH]
    {
        // SAFETY: restores the default disposition.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// Number of threads in this process (the `Threads:` line of /proc/self/status). `create`, `run`
/// and `exec` clone without fork()'s bookkeeping and refuse to run in a multi-threaded process.
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(1)
}
