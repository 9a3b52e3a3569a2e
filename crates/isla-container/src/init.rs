//! The container's first process, between the clone and the exec of the user's program. It runs
//! in a copy of the runtime made without fork()'s bookkeeping (see `sys::clone_process`), so it
//! only reads the prepared [`Plan`] and calls allocation-free system calls; each failure goes to
//! the runtime as (step, label, errno) over the sync socket.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use crate::plan::{HookCmd, Op, Plan};
use crate::sys;

pub(crate) const STEP_OP: u8 = 1;
pub(crate) const STEP_HOOK: u8 = 2;
pub(crate) const STEP_EXEC: u8 = 3;
pub(crate) const STEP_PIVOT: u8 = 4;
const STEP_SETNS: u8 = 5;
const STEP_CGROUPNS: u8 = 6;
const STEP_HOSTNAME: u8 = 7;
const STEP_CGROUP_JOIN: u8 = 8;
const STEP_CONSOLE: u8 = 9;
const STEP_RLIMIT: u8 = 10;
const STEP_CAPS: u8 = 11;
const STEP_IDS: u8 = 12;
const STEP_NNP: u8 = 13;
const STEP_SECCOMP: u8 = 14;
const STEP_CWD: u8 = 15;
const STEP_WAIT: u8 = 16;
const STEP_DOMAIN: u8 = 17;

/// What a step number means, for error messages.
pub(crate) fn step_name(step: u8) -> &'static str {
    match step {
        STEP_EXEC => "executing process.args[0]",
        STEP_PIVOT => "switching to the rootfs (pivot_root)",
        STEP_SETNS => "joining a namespace from linux.namespaces[].path",
        STEP_CGROUPNS => "creating the cgroup namespace",
        STEP_HOSTNAME => "setting the hostname",
        STEP_DOMAIN => "setting the domainname",
        STEP_CGROUP_JOIN => "joining the cgroup",
        STEP_CONSOLE => "setting up the terminal (process.terminal)",
        STEP_RLIMIT => "setting process.rlimits",
        STEP_CAPS => "setting process.capabilities",
        STEP_IDS => "switching to process.user",
        STEP_NNP => "setting process.noNewPrivileges",
        STEP_SECCOMP => "loading linux.seccomp",
        STEP_CWD => "changing to process.cwd",
        STEP_WAIT => "waiting for start",
        _ => "setting up the container",
    }
}

/// Messages on the sync socket (fixed 16 bytes).
pub(crate) const MSG_READY: u8 = 1;
pub(crate) const MSG_ERROR: u8 = 2;
pub(crate) const MSG_HOOKS: u8 = 3;
pub(crate) const MSG_GO: u8 = 4;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Msg {
    pub tag: u8,
    pub step: u8,
    pub label: u32,
    pub value: i32,
}

impl Msg {
    pub fn encode(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.tag;
        b[1] = self.step;
        b[4..8].copy_from_slice(&self.label.to_ne_bytes());
        b[8..12].copy_from_slice(&self.value.to_ne_bytes());
        b
    }
    pub fn decode(b: &[u8; 16]) -> Msg {
        Msg {
            tag: b[0],
            step: b[1],
            label: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            value: i32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        }
    }
}

pub(crate) fn send(fd: BorrowedFd<'_>, m: Msg) -> Result<(), Errno> {
    nix::unistd::write(fd, &m.encode()).map(drop)
}

/// Receive one message; `None` when the peer closed the socket.
pub(crate) fn recv(fd: BorrowedFd<'_>) -> Result<Option<Msg>, Errno> {
    let mut b = [0u8; 16];
    loop {
        match nix::unistd::read(fd, &mut b) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(Msg::decode(&b))),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// How the init waits before the exec.
pub(crate) enum StartWait {
    /// For the runtime's "go" on the sync socket (`run`, `exec`).
    Socket,
    /// Until `start` writes to the exec FIFO (`create`); the fd is the read end.
    Fifo(OwnedFd),
}

/// The init's file descriptors.
pub(crate) struct ChildFds {
    pub sock: OwnedFd,
    pub parent_end: RawFd,
    pub start: StartWait,
    /// Where the terminal's master goes: the console socket, or the sync socket for `run`.
    pub console: Option<OwnedFd>,
}

type Fail = (u8, u32, Errno);

/// The init's whole life: set up, report, wait, exec. Never returns.
pub(crate) fn run(plan: &mut Plan, fds: ChildFds) -> ! {
    let _ = nix::unistd::close(fds.parent_end);
    let sock = fds.sock.as_fd();
    let err = match setup(plan, &fds) {
        Ok(()) => exec(plan),
        Err(e) => e,
    };
    let (step, label, errno) = err;
    if send(sock, Msg { tag: MSG_ERROR, step, label, value: errno as i32 }).is_err() {
        // The runtime is gone (a created container whose exec failed): say it on stderr.
        let _ = nix::unistd::write(std::io::stderr(), b"isla init: ");
        let _ = nix::unistd::write(std::io::stderr(), step_name(step).as_bytes());
        let _ = nix::unistd::write(std::io::stderr(), b": ");
        let _ = nix::unistd::write(std::io::stderr(), errno.desc().as_bytes());
        let _ = nix::unistd::write(std::io::stderr(), b"\n");
    }
    sys::exit_now(if step == STEP_EXEC { 127 } else { 1 })
}

fn at(step: u8) -> impl Fn(Errno) -> Fail {
    move |e| (step, 0, e)
}

/// Wait for the runtime's go-ahead: user namespace maps written, cgroup joined. The message
/// carries the init's pid as the runtime sees it (for hooks' state). A new cgroup namespace is
/// made right after, so that its root is the container's cgroup.
fn wait_go(plan: &mut Plan, sock: BorrowedFd<'_>) -> Result<(), Fail> {
    match recv(sock).map_err(at(STEP_CGROUP_JOIN))? {
        Some(m) if m.tag == MSG_GO => write_pid(plan, m.value),
        _ => sys::exit_now(1),
    }
    if plan.new_cgroupns {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP).map_err(at(STEP_CGROUPNS))?;
    }
    Ok(())
}

fn setup(plan: &mut Plan, fds: &ChildFds) -> Result<(), Fail> {
    let sock = fds.sock.as_fd();
    // With a new user namespace nothing can happen before the maps exist. Otherwise the runtime
    // makes the cgroup while the mounts below go on, and the init waits only where it needs the
    // cgroup: before the first cgroup mount, or after the last mount.
    let wait_at = if plan.new_userns {
        wait_go(plan, sock)?;
        usize::MAX
    } else {
        plan.wait_at.min(plan.pre.len())
    };
    for j in &plan.joins {
        nix::sched::setns(&j.fd, j.kind).map_err(at(STEP_SETNS))?;
    }
    if plan.new_userns {
        // Become the namespace's root for the set-up (the maps are written by now).
        let _ = nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0));
        let _ = nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0));
    }
    if let Some(h) = &plan.hostname {
        nix::unistd::sethostname(std::ffi::OsStr::from_bytes(h.to_bytes())).map_err(at(STEP_HOSTNAME))?;
    }
    if let Some(d) = &plan.domainname {
        sys::setdomainname(d.to_bytes()).map_err(at(STEP_DOMAIN))?;
    }
    for i in 0..plan.pre.len() {
        if i == wait_at {
            wait_go(plan, sock)?;
        }
        let (op, label) = &plan.pre[i];
        do_op(op).map_err(|e| (STEP_OP, *label as u32, e))?;
    }
    if wait_at == plan.pre.len() {
        wait_go(plan, sock)?;
    }
    if plan.runtime_hooks {
        send(sock, Msg { tag: MSG_HOOKS, step: 0, label: 0, value: 0 }).map_err(at(STEP_OP))?;
        match recv(sock).map_err(at(STEP_OP))? {
            Some(m) if m.tag == MSG_GO => {}
            _ => sys::exit_now(1),
        }
    }
    for (h, label) in &plan.container_hooks {
        run_hook(h, &plan.hook_state).map_err(|e| (STEP_HOOK, *label as u32, e))?;
    }
    if let Some(r) = &plan.root {
        switch_root(&r.rootfs, r.no_pivot).map_err(at(STEP_PIVOT))?;
    }
    for (op, label) in &plan.post {
        do_op(op).map_err(|e| (STEP_OP, *label as u32, e))?;
    }
    let p = &plan.proc;
    if p.terminal {
        let console = fds.console.as_ref().map(|c| c.as_fd()).unwrap_or(sock);
        terminal(console).map_err(at(STEP_CONSOLE))?;
    }
    for &(res, soft, hard) in &p.rlimits {
        sys::setrlimit(res, soft, hard).map_err(at(STEP_RLIMIT))?;
    }
    if let Some(m) = p.umask {
        nix::sys::stat::umask(Mode::from_bits_truncate(m));
    }
    if p.no_new_privs {
        sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(at(STEP_NNP))?;
    } else if let Some(s) = &p.seccomp {
        // Without no_new_privs the filter needs CAP_SYS_ADMIN, so it goes in before the drop.
        sys::seccomp_load(&s.filter, s.flags).map_err(at(STEP_SECCOMP))?;
    }
    identity(plan).map_err(|(s, e)| (s, 0, e))?;
    nix::unistd::chdir(plan.proc.cwd.as_c_str()).map_err(at(STEP_CWD))?;
    send(sock, Msg { tag: MSG_READY, step: 0, label: 0, value: 0 }).map_err(at(STEP_WAIT))?;
    match &fds.start {
        StartWait::Socket => match recv(sock).map_err(at(STEP_WAIT))? {
            Some(m) if m.tag == MSG_GO => {}
            _ => sys::exit_now(1),
        },
        StartWait::Fifo(fd) => loop {
            let mut pfd = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::NONE) {
                Ok(_) => {
                    let mut b = [0u8; 1];
                    match nix::unistd::read(fd, &mut b) {
                        Ok(1) => break,
                        Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
                        Err(e) => return Err((STEP_WAIT, 0, e)),
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err((STEP_WAIT, 0, e)),
            }
        },
    }
    for (h, label) in &plan.start_hooks {
        run_hook(h, &plan.hook_state).map_err(|e| (STEP_HOOK, *label as u32, e))?;
    }
    if plan.proc.no_new_privs {
        if let Some(s) = &plan.proc.seccomp {
            sys::seccomp_load(&s.filter, s.flags).map_err(at(STEP_SECCOMP))?;
        }
    }
    Ok(())
}

/// Put `pid` (the init as the runtime sees it) into the hooks' state JSON, right-aligned in the
/// ten spaces the plan left for it.
fn write_pid(plan: &mut Plan, pid: i32) {
    if plan.hook_state.is_empty() {
        return;
    }
    let mut v = pid.max(0) as u32;
    let mut i = plan.pid_at + 9;
    loop {
        plan.hook_state[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == plan.pid_at {
            break;
        }
        i -= 1;
    }
}

fn tolerate(r: Result<(), Errno>, ok: &[Errno]) -> Result<(), Errno> {
    match r {
        Err(e) if ok.contains(&e) => Ok(()),
        r => r,
    }
}

fn do_op(op: &Op) -> Result<(), Errno> {
    match op {
        Op::Mount { src, target, fstype, flags, data } => {
            mount(src.as_deref(), target.as_c_str(), fstype.as_deref(), *flags, data.as_deref())
        }
        Op::Mkdir(p) => tolerate(nix::unistd::mkdir(p.as_c_str(), Mode::from_bits_truncate(0o755)), &[Errno::EEXIST]),
        Op::Touch(p) => {
            match nix::fcntl::open(
                p.as_c_str(),
                OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            ) {
                Ok(_fd) => Ok(()),
                // A directory or a read-only file system with the file already present is fine.
                Err(Errno::EISDIR) | Err(Errno::EROFS) if nix::sys::stat::stat(p.as_c_str()).is_ok() => Ok(()),
                Err(e) => Err(e),
            }
        }
        Op::Mknod { path, kind, perm, dev, uid, gid } => {
            let _ = nix::unistd::unlink(path.as_c_str());
            nix::sys::stat::mknod(path.as_c_str(), *kind, Mode::from_bits_truncate(*perm), *dev)?;
            nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                path.as_c_str(),
                Mode::from_bits_truncate(*perm),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )?;
            nix::unistd::chown(path.as_c_str(), Some(Uid::from_raw(*uid)), Some(Gid::from_raw(*gid)))
        }
        Op::Symlink { target, link } => {
            tolerate(nix::unistd::symlinkat(target.as_c_str(), nix::fcntl::AT_FDCWD, link.as_c_str()), &[Errno::EEXIST])
        }
        Op::Mask(p) => match nix::sys::stat::stat(p.as_c_str()) {
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e),
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                mount(Some(c"tmpfs"), p.as_c_str(), Some(c"tmpfs"), MsFlags::MS_RDONLY, None::<&std::ffi::CStr>)
            }
            Ok(_) => mount(
                Some(c"/dev/null"),
                p.as_c_str(),
                None::<&std::ffi::CStr>,
                MsFlags::MS_BIND,
                None::<&std::ffi::CStr>,
            ),
        },
        Op::ReadOnly(p) => {
            match mount(
                Some(p.as_c_str()),
                p.as_c_str(),
                None::<&std::ffi::CStr>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&std::ffi::CStr>,
            ) {
                Err(Errno::ENOENT) => return Ok(()),
                r => r?,
            }
            remount_ro(p)
        }
        Op::RemountRo(p) => remount_ro(p),
        Op::Write { path, data } => {
            let fd = nix::fcntl::open(path.as_c_str(), OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
            nix::unistd::write(&fd, data).map(drop)
        }
    }
}

/// Remount read-only, keeping the flags a user namespace may not clear.
fn remount_ro(p: &std::ffi::CStr) -> Result<(), Errno> {
    let st = nix::sys::statvfs::statvfs(p)?;
    let keep = st.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    use nix::sys::statvfs::FsFlags;
    for (f, m) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if keep.contains(f) {
            flags |= m;
        }
    }
    mount(None::<&std::ffi::CStr>, p, None::<&std::ffi::CStr>, flags, None::<&std::ffi::CStr>)
}

fn switch_root(rootfs: &std::ffi::CStr, no_pivot: bool) -> Result<(), Errno> {
    nix::unistd::chdir(rootfs)?;
    if no_pivot {
        mount(Some(rootfs), c"/", None::<&std::ffi::CStr>, MsFlags::MS_MOVE, None::<&std::ffi::CStr>)?;
        nix::unistd::chroot(c".")?;
    } else {
        // pivot_root(".", ".") stacks the old root on the new one; unmounting "." then drops it
        // without needing a put_old directory in the image.
        nix::unistd::pivot_root(c".", c".")?;
        umount2(c".", MntFlags::MNT_DETACH)?;
    }
    nix::unistd::chdir(c"/")
}

/// Open a pseudo-terminal in the container's devpts, send the master away, make the slave the
/// controlling terminal and stdio.
fn terminal(console: BorrowedFd<'_>) -> Result<(), Errno> {
    let master = nix::fcntl::open(c"/dev/ptmx", OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, Mode::empty())?;
    let n = sys::pty_unlock(master.as_raw_fd())?;
    let mut path = *b"/dev/pts/\0\0\0\0\0\0\0\0\0\0\0";
    let mut digits = [0u8; 10];
    let (mut v, mut len) = (n, 0);
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..len {
        path[9 + i] = digits[len - 1 - i];
    }
    let cpath = std::ffi::CStr::from_bytes_until_nul(&path).map_err(|_| Errno::EINVAL)?;
    let slave = nix::fcntl::open(cpath, OFlag::O_RDWR | OFlag::O_NOCTTY, Mode::empty())?;
    sys::send_fd(console, master.as_raw_fd(), b"console")?;
    drop(master);
    nix::unistd::setsid()?;
    sys::ioctl_int(slave.as_raw_fd(), libc::TIOCSCTTY as libc::c_ulong, 0)?;
    nix::unistd::dup2_stdin(&slave)?;
    nix::unistd::dup2_stdout(&slave)?;
    nix::unistd::dup2_stderr(&slave)?;
    Ok(())
}

/// Capabilities and ids, in runc's order: bounding set, keep caps across the uid change,
/// groups and ids, then the final sets and the ambient ones.
fn identity(plan: &Plan) -> Result<(), (u8, Errno)> {
    let p = &plan.proc;
    if let Some(c) = &p.caps {
        for cap in 0..=c.last_cap {
            if c.bounding & (1 << cap) == 0 {
                match sys::prctl(libc::PR_CAPBSET_DROP, cap.into(), 0) {
                    Ok(()) | Err(Errno::EINVAL) => {}
                    Err(e) => return Err((STEP_CAPS, e)),
                }
            }
        }
        sys::prctl(libc::PR_SET_KEEPCAPS, 1, 0).map_err(|e| (STEP_CAPS, e))?;
    }
    match nix::unistd::setgroups(&p.groups) {
        Ok(()) => {}
        // A user namespace with setgroups denied (rootless) cannot change groups at all.
        Err(Errno::EPERM) if p.groups.is_empty() => {}
        Err(e) => return Err((STEP_IDS, e)),
    }
    let (g, u) = (Gid::from_raw(p.gid), Uid::from_raw(p.uid));
    nix::unistd::setresgid(g, g, g).map_err(|e| (STEP_IDS, e))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| (STEP_IDS, e))?;
    if let Some(c) = &p.caps {
        sys::prctl(libc::PR_SET_KEEPCAPS, 0, 0).map_err(|e| (STEP_CAPS, e))?;
        sys::capset(c.effective, c.permitted, c.inheritable).map_err(|e| (STEP_CAPS, e))?;
        for cap in 0..=c.last_cap {
            if c.ambient & (1 << cap) != 0 {
                sys::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong, cap.into())
                    .map_err(|e| (STEP_CAPS, e))?;
            }
        }
    }
    Ok(())
}

/// Run a hook from inside the container: fork, state on its stdin, wait for success.
fn run_hook(h: &HookCmd, state: &[u8]) -> Result<(), Errno> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    match sys::clone_process(0)? {
        sys::Forked::Child => {
            let _ = nix::unistd::dup2_stdin(&r);
            let e = sys::execve(&h.path, h.argv.as_ptrs(), h.envp.as_ptrs());
            sys::exit_now(120 + (e as i32 % 7))
        }
        sys::Forked::Parent(pid) => {
            drop(r);
            let _ = nix::unistd::write(&w, state);
            drop(w);
            loop {
                match nix::sys::wait::waitpid(pid, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => return Ok(()),
                    Ok(_) => return Err(Errno::ECANCELED),
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Try each PATH candidate for args[0]; returns only if none could be executed.
fn exec(plan: &Plan) -> Fail {
    let p = &plan.proc;
    let mut last = Errno::ENOENT;
    for c in &p.candidates {
        let e = sys::execve(c, p.argv.as_ptrs(), p.envp.as_ptrs());
        if !matches!(e, Errno::ENOENT | Errno::ENOTDIR) {
            last = e;
        }
    }
    (STEP_EXEC, 0, last)
}
