//! RUN steps of a build: the [`RunStep`] trait and [`ChrootRunner`], which runs the command in
//! the mounted root filesystem with its own mount, PID, UTS and IPC namespaces and `chroot`.
//!
//! The runner is a small stand-in for the container runtime (which will implement
//! [`RunStep`] with its full isolation); it is real, not a stub: the child is created with
//! `clone(CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWUTS|CLONE_NEWIPC)`, becomes PID 1 of its namespace,
//! gets a private `/proc` and a `/dev` with the usual character devices, and execs the command
//! as the image's USER in its WORKDIR with its ENV. The network is the host's.
//!
//! After `clone` the child must not allocate (other threads of the parent may hold the
//! allocator's lock), so everything it needs is prepared as C strings beforehand and the child
//! only makes system calls; that code is the `unsafe` block in [`spawn`].

use std::ffi::{CStr, CString};
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use oci_spec::image::Config;
use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::error::{Error, IoContext, Result};

/// Runs one RUN command of a build inside a mounted root filesystem.
pub trait RunStep {
    /// Runs `argv` in `rootfs` with the image configuration's Env, WorkingDir and User, and
    /// fails unless it exits with status 0.
    fn run(&self, rootfs: &Path, config: &Config, argv: &[String]) -> Result<()>;
}

/// [`RunStep`] with `chroot` and fresh mount, PID, UTS and IPC namespaces.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChrootRunner;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The working directory a RUN step starts in: the image's WORKDIR, `/` without one.
pub fn step_workdir(config: &Config) -> String {
    config.working_dir().clone().filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into())
}

/// The environment of a RUN step: the image's ENV, with the usual PATH when it sets none.
pub fn step_env(config: &Config) -> Vec<String> {
    let mut env: Vec<String> = config.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    env
}
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Opens `path` (absolute, inside the image) relative to the root directory `root`, resolving
/// symbolic links as if `root` were `/`.
pub(crate) fn open_in_root(root: &impl AsFd, path: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    rustix::fs::openat2(root, rel, flags | OFlags::CLOEXEC, Mode::empty(), ResolveFlags::IN_ROOT)
}

/// Creates directory `path` and its parents inside `root` (symbolic links resolved inside).
pub(crate) fn mkdir_in_root(root: &impl AsFd, path: &str) -> rustix::io::Result<OwnedFd> {
    let mut cur = String::from("/");
    for c in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            cur.push_str("../");
            continue;
        }
        let parent = open_in_root(root, &cur, OFlags::PATH | OFlags::DIRECTORY)?;
        match rustix::fs::mkdirat(&parent, c, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e),
        }
        cur.push_str(c);
        cur.push('/');
    }
    open_in_root(root, &cur, OFlags::PATH | OFlags::DIRECTORY)
}

/// Reads a small text file inside `root`, or "" if absent.
fn read_in_root(root: &impl AsFd, path: &str) -> String {
    use std::io::Read;
    let Ok(fd) = open_in_root(root, path, OFlags::RDONLY) else { return String::new() };
    let mut s = String::new();
    let _ = fs::File::from(fd).take(1 << 20).read_to_string(&mut s);
    s
}

/// Resolves USER ("name", "uid", "name:group", "uid:gid") against the image's /etc/passwd and
/// /etc/group. Returns (uid, gid).
pub fn resolve_user(root: &impl AsFd, user: &str) -> Result<(u32, u32)> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = user.split_once(':').map(|(u, g)| (u, Some(g))).unwrap_or((user, None));
    let passwd = read_in_root(root, "/etc/passwd");
    let entry =
        passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() > 3 && (f[0] == u || f[2] == u));
    let uid = match (u.parse::<u32>(), &entry) {
        (Ok(n), _) => n,
        (Err(_), Some(f)) => f[2].parse().map_err(|_| Error::invalid("/etc/passwd", format!("bad uid for {u}")))?,
        (Err(_), None) => {
            return Err(Error::invalid(format!("USER {user}"), format!("no user {u:?} in the image's /etc/passwd")))
        }
    };
    let gid = match g {
        None => entry.and_then(|f| f[3].parse().ok()).unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                let group = read_in_root(root, "/etc/group");
                group
                    .lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() > 2 && f[0] == g)
                    .and_then(|f| f[2].parse().ok())
                    .ok_or_else(|| {
                        Error::invalid(format!("USER {user}"), format!("no group {g:?} in the image's /etc/group"))
                    })?
            }
        },
    };
    Ok((uid, gid))
}

fn cstr(s: impl AsRef<[u8]>, what: &str) -> Result<CString> {
    CString::new(s.as_ref()).map_err(|_| Error::invalid(what, "contains a NUL byte"))
}

/// Everything the child needs, prepared before `clone`.
struct Plan {
    rootfs: CString,
    proc_dir: Option<CString>,
    dev_dir: Option<CString>,
    devices: Vec<(CString, CString)>,
    workdir: CString,
    uid: u32,
    gid: u32,
    candidates: Vec<CString>,
    argv: Vec<CString>,
    env: Vec<CString>,
}

/// Whether `root/name` is a real directory (not a symbolic link).
fn real_dir(root: &Path, name: &str) -> bool {
    fs::symlink_metadata(root.join(name)).map(|m| m.is_dir()).unwrap_or(false)
}

impl RunStep for ChrootRunner {
    fn run(&self, rootfs: &Path, config: &Config, argv: &[String]) -> Result<()> {
        let shown = argv.join(" ");
        let fail = |msg: String| Error::Run { cmd: shown.clone(), msg };
        if argv.is_empty() {
            return Err(fail("empty command".into()));
        }
        let root =
            rustix::fs::open(rootfs, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).at(rootfs)?;
        let workdir = step_workdir(config);
        mkdir_in_root(&root, &workdir).map_err(|e| fail(format!("creating WORKDIR {workdir}: {e}")))?;
        let (uid, gid) = resolve_user(&root, config.user().as_deref().unwrap_or(""))?;
        let env = step_env(config);
        let path_var = env.iter().rev().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH).to_string();
        let candidates: Vec<String> = if argv[0].contains('/') {
            vec![argv[0].clone()]
        } else {
            path_var
                .split(':')
                .filter(|d| !d.is_empty())
                .map(|d| format!("{}/{}", d.trim_end_matches('/'), argv[0]))
                .collect()
        };
        let sub = |name: &str| cstr(rootfs.join(name).as_os_str().as_bytes(), "rootfs path");
        let has_dev = real_dir(rootfs, "dev");
        let plan = Plan {
            rootfs: cstr(rootfs.as_os_str().as_bytes(), "rootfs path")?,
            proc_dir: if real_dir(rootfs, "proc") { Some(sub("proc")?) } else { None },
            dev_dir: if has_dev { Some(sub("dev")?) } else { None },
            devices: if has_dev {
                DEVICES
                    .iter()
                    .map(|d| Ok((cstr(format!("/dev/{d}"), "device")?, sub(&format!("dev/{d}"))?)))
                    .collect::<Result<_>>()?
            } else {
                vec![]
            },
            workdir: cstr(&workdir, "WORKDIR")?,
            uid,
            gid,
            candidates: candidates.iter().map(|c| cstr(c, "command")).collect::<Result<_>>()?,
            argv: argv.iter().map(|a| cstr(a, "argument")).collect::<Result<_>>()?,
            env: env.iter().map(|e| cstr(e, "ENV")).collect::<Result<_>>()?,
        };
        let status = spawn(&plan).map_err(|e| fail(format!("starting the command: {e}")))?;
        match status {
            0 => Ok(()),
            127 => Err(fail(format!("exit status 127 (command not found? looked for {})", candidates.join(", ")))),
            s if s >= 128 => Err(fail(format!("killed by signal {}", s - 128))),
            s => Err(fail(format!("exit status {s}"))),
        }
    }
}

/// Clones the child, waits for it and returns its exit status (128+N when killed by signal N).
fn spawn(plan: &Plan) -> std::io::Result<i32> {
    let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter().map(|c| c.as_ptr()).chain([std::ptr::null()]).collect()
    };
    let argv = ptrs(&plan.argv);
    let envp = ptrs(&plan.env);
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    // SAFETY: raw clone without CLONE_VM and with a null stack behaves like fork: the child gets
    // a copy of the address space. The child only makes system calls on memory prepared above
    // (no allocation, no locks) and always ends in execve or _exit.
    let pid = unsafe {
        libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize)
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; every pointer comes from a live CString or a null-terminated array.
        unsafe { child(plan, &argv, &envp) }
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid pointer to an int.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if r >= 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) })
}

/// The child: set up mounts, chroot, drop to the user, exec. Never returns.
///
/// # Safety
/// Must only run in the freshly cloned child; `argv` and `envp` are null-terminated arrays of
/// pointers into `plan`.
unsafe fn child(plan: &Plan, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> ! {
    unsafe fn die(msg: &CStr) -> ! {
        let m = msg.to_bytes();
        libc::write(2, m.as_ptr().cast(), m.len());
        libc::_exit(126)
    }
    let null = std::ptr::null::<libc::c_char>();
    if libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0 {
        die(c"isla build: making mounts private failed\n");
    }
    if let Some(p) = &plan.proc_dir {
        if libc::mount(
            c"proc".as_ptr(),
            p.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            die(c"isla build: mounting /proc failed\n");
        }
    }
    if let Some(d) = &plan.dev_dir {
        if libc::mount(
            c"tmpfs".as_ptr(),
            d.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            c"mode=755".as_ptr().cast(),
        ) != 0
        {
            die(c"isla build: mounting /dev failed\n");
        }
        for (src, dst) in &plan.devices {
            let fd = libc::open(dst.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o666);
            if fd >= 0 {
                libc::close(fd);
                libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND, std::ptr::null());
            }
        }
    }
    let host = b"isla-build";
    libc::sethostname(host.as_ptr().cast(), host.len());
    if libc::chroot(plan.rootfs.as_ptr()) != 0 || libc::chdir(plan.workdir.as_ptr()) != 0 {
        die(c"isla build: chroot or chdir to WORKDIR failed\n");
    }
    let gid = plan.gid as libc::gid_t;
    if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(plan.uid as libc::uid_t) != 0 {
        die(c"isla build: switching to USER failed\n");
    }
    for c in &plan.candidates {
        libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    let m = b"isla build: command not found in the image\n";
    libc::write(2, m.as_ptr().cast(), m.len());
    libc::_exit(127)
}

/// Paths in the build context: resolves `rel` inside `context` and refuses escapes.
pub(crate) fn context_path(context: &Path, rel: &str) -> Result<PathBuf> {
    let base = context.canonicalize().at(context)?;
    let p = base.join(rel.trim_start_matches('/'));
    let canon = p.canonicalize().at(&p)?;
    if !canon.starts_with(&base) {
        return Err(Error::invalid(rel, format!("is outside the build context {}", base.display())));
    }
    Ok(canon)
}
