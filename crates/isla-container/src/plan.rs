//! The set-up plan: everything the container's init will do, decided and allocated in the
//! runtime before the clone. The init (see `init.rs`) then walks it with allocation-free system
//! calls, and a failure is reported as an index into `labels`, which the runtime turns into a
//! message naming the mount, path or setting.

use std::ffi::{CString, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Mount, PosixRlimitType, Process, Spec};

use crate::error::{config, io, Error, Result};
use crate::seccomp;

/// A C string from a path or string; interior NULs are a configuration error.
pub(crate) fn cstr(s: impl AsRef<OsStr>, field: &str) -> Result<CString> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| config(field, "contains a NUL byte"))
}

/// NULL-terminated array of pointers into owned C strings (argv, envp).
pub(crate) struct CStrArray {
    _owned: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl CStrArray {
    pub fn new(items: Vec<CString>) -> Self {
        let mut ptrs: Vec<*const libc::c_char> = items.iter().map(|c| c.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CStrArray { _owned: items, ptrs }
    }
    pub fn as_ptrs(&self) -> &[*const libc::c_char] {
        &self.ptrs
    }
}

/// One step of the mount set-up.
pub(crate) enum Op {
    /// mount(2); `Some(errno)` in `ok_if` is tolerated.
    Mount { src: Option<CString>, target: CString, fstype: Option<CString>, flags: MsFlags, data: Option<CString> },
    /// mkdir(2), EEXIST tolerated.
    Mkdir(CString),
    /// Create an empty file if missing (bind-mount target).
    Touch(CString),
    /// mknod(2) and chown.
    Mknod { path: CString, kind: nix::sys::stat::SFlag, perm: u32, dev: u64, uid: u32, gid: u32 },
    /// symlink(2), EEXIST tolerated.
    Symlink { target: CString, link: CString },
    /// Hide a path: /dev/null over a file, an empty read-only tmpfs over a directory.
    Mask(CString),
    /// Bind a path onto itself and make it read-only (missing paths skipped).
    ReadOnly(CString),
    /// Remount a mount point read-only, keeping its other flags.
    RemountRo(CString),
    /// Write a file (sysctl).
    Write { path: CString, data: Vec<u8> },
}

/// Namespaces to join by path (setns) in the init, user first.
pub(crate) struct Join {
    pub fd: OwnedFd,
    pub kind: CloneFlags,
}

/// How the root file system is switched.
pub(crate) struct RootSwitch {
    pub rootfs: CString,
    pub no_pivot: bool,
}

/// A hook the init runs inside the container (createContainer, startContainer).
pub(crate) struct HookCmd {
    pub path: CString,
    pub argv: CStrArray,
    pub envp: CStrArray,
}

/// Capability sets as bit masks.
pub(crate) struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
    pub last_cap: u32,
}

/// The user process.
pub(crate) struct ProcPlan {
    pub terminal: bool,
    pub rlimits: Vec<(libc::c_int, u64, u64)>,
    pub caps: Option<CapSets>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<nix::unistd::Gid>,
    pub umask: Option<u32>,
    pub no_new_privs: bool,
    pub seccomp: Option<seccomp::Program>,
    pub cwd: CString,
    pub candidates: Vec<CString>,
    pub argv: CStrArray,
    pub envp: CStrArray,
    pub oom_score_adj: Option<i32>,
}

/// Everything the init does, in order.
pub(crate) struct Plan {
    pub clone_flags: CloneFlags,
    pub new_cgroupns: bool,
    pub new_userns: bool,
    pub joins: Vec<Join>,
    pub pid_join: Option<OwnedFd>,
    pub hostname: Option<CString>,
    pub domainname: Option<CString>,
    pub pre: Vec<(Op, usize)>,
    pub root: Option<RootSwitch>,
    pub post: Vec<(Op, usize)>,
    pub runtime_hooks: bool,
    pub container_hooks: Vec<(HookCmd, usize)>,
    pub start_hooks: Vec<(HookCmd, usize)>,
    pub proc: ProcPlan,
    pub labels: Vec<String>,
    /// Index of the first `pre` op that needs the cgroup (a cgroup mount); the init waits for the
    /// runtime there. usize::MAX: after all of them.
    pub wait_at: usize,
    /// State JSON for hooks run by the init, with a 10-character space for the pid at `pid_at`.
    pub hook_state: Vec<u8>,
    pub pid_at: usize,
}

impl Plan {
    fn label(&mut self, s: String) -> usize {
        self.labels.push(s);
        self.labels.len() - 1
    }
    fn pre(&mut self, op: Op, label: String) {
        let l = self.label(label);
        self.pre.push((op, l));
    }
    fn post(&mut self, op: Op, label: String) {
        let l = self.label(label);
        self.post.push((op, l));
    }
}

/// Map an OCI namespace type to its clone flag.
pub(crate) fn ns_flag(t: LinuxNamespaceType) -> Option<CloneFlags> {
    Some(match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => return None,
    })
}

/// `rootfs` joined with the container path `dest`, resolving symbolic links inside `rootfs` so
/// that a link in the image cannot send a mount outside it.
pub(crate) fn secure_join(rootfs: &Path, dest: &Path) -> PathBuf {
    // The components still to walk, last first (a stack).
    let stack = |p: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(PathBuf::from(n)),
                Component::ParentDir => Some(PathBuf::from("..")),
                _ => None,
            })
            .collect();
        v.reverse();
        v
    };
    let mut parts = stack(dest);
    let mut out = PathBuf::new();
    let mut links = 0;
    while let Some(p) = parts.pop() {
        if p.as_os_str() == ".." {
            out.pop();
            continue;
        }
        let candidate = rootfs.join(&out).join(&p);
        match std::fs::read_link(&candidate) {
            Ok(target) if links < 40 => {
                links += 1;
                if target.is_absolute() {
                    out = PathBuf::new();
                }
                parts.extend(stack(&target));
            }
            _ => out.push(p),
        }
    }
    rootfs.join(out)
}

/// Mount options to (flags applied at mount, propagation flags, data string, bind, recursive).
fn parse_options(opts: &[String]) -> (MsFlags, MsFlags, Vec<String>, bool, bool) {
    let mut flags = MsFlags::empty();
    let mut prop = MsFlags::empty();
    let mut data = Vec::new();
    let (mut bind, mut rec) = (false, false);
    for o in opts {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "suid" => flags &= !MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "dev" => flags &= !MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "exec" => flags &= !MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "async" => flags &= !MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "remount" => flags |= MsFlags::MS_REMOUNT,
            "mand" => flags |= MsFlags::MS_MANDLOCK,
            "nomand" => flags &= !MsFlags::MS_MANDLOCK,
            "atime" => flags &= !MsFlags::MS_NOATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "diratime" => flags &= !MsFlags::MS_NODIRATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "norelatime" => flags &= !MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "bind" => bind = true,
            "rbind" => (bind, rec) = (true, true),
            "private" => prop |= MsFlags::MS_PRIVATE,
            "rprivate" => prop |= MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            "shared" => prop |= MsFlags::MS_SHARED,
            "rshared" => prop |= MsFlags::MS_SHARED | MsFlags::MS_REC,
            "slave" => prop |= MsFlags::MS_SLAVE,
            "rslave" => prop |= MsFlags::MS_SLAVE | MsFlags::MS_REC,
            "unbindable" => prop |= MsFlags::MS_UNBINDABLE,
            "runbindable" => prop |= MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            other => data.push(other.to_string()),
        }
    }
    (flags, prop, data, bind, rec)
}

fn propagation(name: &str) -> Result<MsFlags> {
    Ok(match name {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        other => return Err(config("linux.rootfsPropagation", format!("{other:?} is not a propagation mode"))),
    })
}

/// mkdir ops for `path` and every ancestor below `rootfs`.
fn mkdirs(plan: &mut Plan, rootfs: &Path, path: &Path, label: &str) -> Result<()> {
    let rel = path.strip_prefix(rootfs).unwrap_or(path);
    let mut cur = rootfs.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        plan.pre(Op::Mkdir(cstr(&cur, label)?), format!("{label}: creating {}", cur.display()));
    }
    Ok(())
}

/// Inputs to [`build`] besides the spec.
pub(crate) struct PlanInput<'a> {
    pub spec: &'a Spec,
    pub bundle: &'a Path,
    pub rootfs: &'a Path,
    pub no_pivot: bool,
    pub cgroup_v1_mounts: &'a [crate::cgroups::v1::Mount],
    pub cgroup_v2: bool,
    /// False for `exec` into a running container: no namespaces, mounts or root switch.
    pub full: bool,
}

/// Build the plan for a container's init (or, with `full` false, for an exec'd process).
pub(crate) fn build(inp: &PlanInput<'_>, process: &Process, hook_state: Option<String>) -> Result<Plan> {
    let spec = inp.spec;
    let mut plan = Plan {
        clone_flags: CloneFlags::empty(),
        new_cgroupns: false,
        new_userns: false,
        joins: Vec::new(),
        pid_join: None,
        hostname: None,
        domainname: None,
        pre: Vec::new(),
        root: None,
        post: Vec::new(),
        runtime_hooks: false,
        container_hooks: Vec::new(),
        start_hooks: Vec::new(),
        proc: process_plan(spec, process)?,
        labels: Vec::new(),
        wait_at: usize::MAX,
        hook_state: Vec::new(),
        pid_at: 0,
    };
    if let Some(s) = hook_state {
        let marker = "\"pid\":0";
        let at = s.find(marker).map(|i| i + 6).ok_or_else(|| config("state", "no pid field"))?;
        let mut bytes = s.into_bytes();
        bytes.splice(at..at + 1, std::iter::repeat_n(b' ', 10));
        plan.hook_state = bytes;
        plan.pid_at = at;
    }
    if !inp.full {
        return Ok(plan);
    }
    let linux = spec.linux().as_ref();
    let mut userns_joined = false;
    let mut user_joins = Vec::new();
    let mut other_joins = Vec::new();
    for ns in linux.and_then(|l| l.namespaces().as_ref()).into_iter().flatten() {
        let Some(flag) = ns_flag(ns.typ()) else {
            return Err(config("linux.namespaces", "the time namespace is not supported by isla yet"));
        };
        match ns.path() {
            Some(p) => {
                let fd = std::fs::File::open(p).map_err(io(format!("linux.namespaces: {}", p.display())))?;
                let fd = OwnedFd::from(fd);
                if flag == CloneFlags::CLONE_NEWPID {
                    plan.pid_join = Some(fd);
                } else if flag == CloneFlags::CLONE_NEWUSER {
                    userns_joined = true;
                    user_joins.push(Join { fd, kind: flag });
                } else {
                    other_joins.push(Join { fd, kind: flag });
                }
            }
            None if flag == CloneFlags::CLONE_NEWCGROUP => plan.new_cgroupns = true,
            None => plan.clone_flags |= flag,
        }
    }
    plan.joins = user_joins.into_iter().chain(other_joins).collect();
    plan.new_userns = plan.clone_flags.contains(CloneFlags::CLONE_NEWUSER);
    let in_userns = plan.new_userns || userns_joined;
    if plan.new_userns && linux.and_then(|l| l.uid_mappings().as_ref()).is_none_or(|m| m.is_empty()) {
        return Err(config("linux.uidMappings", "a new user namespace needs uidMappings and gidMappings"));
    }
    let has_mntns = plan.clone_flags.contains(CloneFlags::CLONE_NEWNS);
    if let Some(h) = spec.hostname() {
        if !plan.clone_flags.contains(CloneFlags::CLONE_NEWUTS) && !h.is_empty() {
            return Err(config("hostname", "setting a hostname needs a new uts namespace in linux.namespaces"));
        }
        plan.hostname = Some(cstr(h, "hostname")?);
    }
    if let Some(d) = spec.domainname() {
        plan.domainname = Some(cstr(d, "domainname")?);
    }

    let rootfs = inp.rootfs;
    let rootfs_prop = linux.and_then(|l| l.rootfs_propagation().clone());
    if has_mntns {
        let first = match rootfs_prop.as_deref() {
            Some("private") | Some("rprivate") => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            _ => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        };
        plan.pre(
            Op::Mount { src: None, target: cstr("/", "")?, fstype: None, flags: first, data: None },
            "making / a slave mount".into(),
        );
        let r = cstr(rootfs, "root.path")?;
        plan.pre(
            Op::Mount {
                src: Some(r.clone()),
                target: r,
                fstype: None,
                flags: MsFlags::MS_BIND | MsFlags::MS_REC,
                data: None,
            },
            format!("bind-mounting the rootfs {}", rootfs.display()),
        );
    }
    let mut dev_is_tmpfs = false;
    let mut devpts = false;
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        if !has_mntns {
            return Err(config("mounts", "mounts need a new mount namespace in linux.namespaces"));
        }
        let dest = m.destination();
        if !dest.is_absolute() {
            return Err(config(
                format!("mounts[{i}].destination"),
                format!("{} must be an absolute path", dest.display()),
            ));
        }
        let typ = m.typ().clone().unwrap_or_default();
        if dest == Path::new("/dev") && typ != "bind" {
            dev_is_tmpfs = true;
        }
        if dest == Path::new("/dev/pts") && typ == "devpts" {
            devpts = true;
        }
        mount_ops(&mut plan, inp, m, i, in_userns)?;
    }
    if dev_is_tmpfs {
        device_ops(&mut plan, spec, rootfs, in_userns, devpts)?;
    }
    if linux.is_some_and(|l| l.devices().as_ref().is_some_and(|d| !d.is_empty())) && !dev_is_tmpfs {
        return Err(config("linux.devices", "devices are created in a /dev tmpfs: add a tmpfs mount on /dev"));
    }
    if has_mntns {
        plan.root = Some(RootSwitch { rootfs: cstr(rootfs, "root.path")?, no_pivot: inp.no_pivot });
    }
    plan.runtime_hooks = spec.hooks().as_ref().is_some_and(|h| {
        h.prestart().as_ref().is_some_and(|v| !v.is_empty())
            || h.create_runtime().as_ref().is_some_and(|v| !v.is_empty())
    });
    if let Some(h) = spec.hooks() {
        for (list, name, into_start) in
            [(h.create_container(), "createContainer", false), (h.start_container(), "startContainer", true)]
        {
            for (i, hook) in list.iter().flatten().enumerate() {
                let field = format!("hooks.{name}[{i}]");
                let args = hook.args().clone().unwrap_or_else(|| vec![hook.path().to_string_lossy().into_owned()]);
                let cmd = HookCmd {
                    path: cstr(hook.path(), &field)?,
                    argv: CStrArray::new(args.iter().map(|a| cstr(a, &field)).collect::<Result<_>>()?),
                    envp: CStrArray::new(hook.env().iter().flatten().map(|a| cstr(a, &field)).collect::<Result<_>>()?),
                };
                let l = plan.label(format!("{field} ({})", hook.path().display()));
                if into_start {
                    plan.start_hooks.push((cmd, l));
                } else {
                    plan.container_hooks.push((cmd, l));
                }
            }
        }
    }

    // After the root switch: sysctls, propagation, masked and read-only paths, read-only root.
    if let Some(l) = linux {
        for (k, v) in l.sysctl().iter().flatten() {
            if k.contains('/') || k.contains("..") {
                return Err(config(format!("linux.sysctl.{k}"), "is not a sysctl name"));
            }
            let path = format!("/proc/sys/{}", k.replace('.', "/"));
            plan.post(
                Op::Write { path: cstr(&path, "linux.sysctl")?, data: v.as_bytes().to_vec() },
                format!("linux.sysctl {k}={v}"),
            );
        }
    }
    if has_mntns {
        if let Some(p) = rootfs_prop.as_deref() {
            let flags = propagation(p)?;
            plan.post(
                Op::Mount { src: None, target: cstr("/", "")?, fstype: None, flags, data: None },
                format!("linux.rootfsPropagation {p}"),
            );
        }
        for p in linux.and_then(|l| l.masked_paths().as_ref()).into_iter().flatten() {
            plan.post(Op::Mask(cstr(p, "linux.maskedPaths")?), format!("linux.maskedPaths {p}"));
        }
        for p in linux.and_then(|l| l.readonly_paths().as_ref()).into_iter().flatten() {
            plan.post(Op::ReadOnly(cstr(p, "linux.readonlyPaths")?), format!("linux.readonlyPaths {p}"));
        }
        if spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
            plan.post(Op::RemountRo(cstr("/", "")?), "root.readonly".into());
        }
    }
    Ok(plan)
}

fn mount_ops(plan: &mut Plan, inp: &PlanInput<'_>, m: &Mount, i: usize, in_userns: bool) -> Result<()> {
    let field = format!("mounts[{i}]");
    let dest = m.destination();
    let typ = m.typ().clone().unwrap_or_default();
    let target = secure_join(inp.rootfs, dest);
    let opts = m.options().clone().unwrap_or_default();
    let (flags, prop, data, bind, rec) = parse_options(&opts);
    let label = format!("{field} ({typ} on {})", dest.display());
    let tgt = cstr(&target, &field)?;
    if typ == "cgroup" {
        return cgroup_ops(plan, inp, &target, flags, &label, in_userns);
    }
    if bind || typ == "bind" {
        let src = m.source().clone().ok_or_else(|| config(format!("{field}.source"), "a bind mount needs a source"))?;
        let src = if src.is_absolute() { src } else { inp.bundle.join(src) };
        let meta = std::fs::metadata(&src)
            .map_err(|e| config(format!("{field}.source"), format!("{}: {e}", src.display())))?;
        if meta.is_dir() {
            mkdirs(plan, inp.rootfs, &target, &label)?;
        } else {
            if let Some(parent) = target.parent() {
                mkdirs(plan, inp.rootfs, parent, &label)?;
            }
            plan.pre(Op::Touch(tgt.clone()), format!("{label}: creating the file"));
        }
        let mut bflags = MsFlags::MS_BIND;
        if rec {
            bflags |= MsFlags::MS_REC;
        }
        plan.pre(
            Op::Mount { src: Some(cstr(&src, &field)?), target: tgt.clone(), fstype: None, flags: bflags, data: None },
            label.clone(),
        );
        let remount = flags - MsFlags::MS_REMOUNT;
        if !remount.is_empty() {
            plan.pre(
                Op::Mount {
                    src: None,
                    target: tgt.clone(),
                    fstype: None,
                    flags: MsFlags::MS_BIND | MsFlags::MS_REMOUNT | remount,
                    data: None,
                },
                format!("{label}: applying {opts:?}"),
            );
        }
    } else {
        mkdirs(plan, inp.rootfs, &target, &label)?;
        let src = m.source().clone().unwrap_or_else(|| PathBuf::from(&typ));
        let mut flags = flags;
        let data_s = data.join(",");
        if in_userns && typ == "sysfs" && !plan.clone_flags.contains(CloneFlags::CLONE_NEWNET) {
            // sysfs needs the network namespace's owner: fall back to binding the host's.
            plan.pre(
                Op::Mount {
                    src: Some(cstr("/sys", "")?),
                    target: tgt.clone(),
                    fstype: None,
                    flags: MsFlags::MS_BIND | MsFlags::MS_REC,
                    data: None,
                },
                label.clone(),
            );
            return Ok(());
        }
        if in_userns && typ == "mqueue" {
            flags -= MsFlags::MS_NODEV;
        }
        plan.pre(
            Op::Mount {
                src: Some(cstr(&src, &field)?),
                target: tgt.clone(),
                fstype: Some(cstr(&typ, &field)?),
                flags,
                data: (!data_s.is_empty()).then(|| cstr(&data_s, &field)).transpose()?,
            },
            label.clone(),
        );
    }
    if !prop.is_empty() {
        plan.pre(
            Op::Mount { src: None, target: tgt, fstype: None, flags: prop, data: None },
            format!("{label}: propagation"),
        );
    }
    Ok(())
}

/// A `cgroup` mount: cgroup2 on unified hosts; on v1 hosts a tmpfs with one mount per hierarchy.
fn cgroup_ops(
    plan: &mut Plan,
    inp: &PlanInput<'_>,
    target: &Path,
    flags: MsFlags,
    label: &str,
    in_userns: bool,
) -> Result<()> {
    plan.wait_at = plan.wait_at.min(plan.pre.len());
    mkdirs(plan, inp.rootfs, target, label)?;
    let tgt = cstr(target, label)?;
    let cg_flags = flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if inp.cgroup_v2 {
        plan.pre(
            Op::Mount {
                src: Some(cstr("cgroup2", "")?),
                target: tgt,
                fstype: Some(cstr("cgroup2", "")?),
                flags: cg_flags,
                data: None,
            },
            label.to_string(),
        );
        return Ok(());
    }
    if in_userns && !plan.new_cgroupns {
        // Without a cgroup namespace a user namespace may not mount cgroup hierarchies.
        return Ok(());
    }
    let tmp_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    plan.pre(
        Op::Mount {
            src: Some(cstr("tmpfs", "")?),
            target: tgt.clone(),
            fstype: Some(cstr("tmpfs", "")?),
            flags: tmp_flags,
            data: Some(cstr("mode=755", "")?),
        },
        format!("{label}: tmpfs"),
    );
    for (ctrls, mount, _) in inp.cgroup_v1_mounts {
        let name = mount.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| ctrls.join(","));
        let sub = target.join(&name);
        plan.pre(Op::Mkdir(cstr(&sub, label)?), format!("{label}: creating {name}"));
        plan.pre(
            Op::Mount {
                src: Some(cstr("cgroup", "")?),
                target: cstr(&sub, label)?,
                fstype: Some(cstr("cgroup", "")?),
                flags: cg_flags,
                data: Some(cstr(ctrls.join(","), label)?),
            },
            format!("{label}: cgroup v1 {}", ctrls.join(",")),
        );
    }
    if flags.contains(MsFlags::MS_RDONLY) {
        plan.pre(
            Op::Mount {
                src: None,
                target: tgt,
                fstype: None,
                flags: MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | tmp_flags,
                data: None,
            },
            format!("{label}: read-only"),
        );
    }
    Ok(())
}

/// Default devices, the spec's devices and the /dev symbolic links.
fn device_ops(plan: &mut Plan, spec: &Spec, rootfs: &Path, in_userns: bool, devpts: bool) -> Result<()> {
    use nix::sys::stat::SFlag;
    let mut devs: Vec<(PathBuf, SFlag, u64, u64, u32, u32, u32)> = Vec::new();
    for (name, maj, min) in
        [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)]
    {
        devs.push((PathBuf::from("/dev").join(name), SFlag::S_IFCHR, maj, min, 0o666, 0, 0));
    }
    for (i, d) in spec.linux().as_ref().and_then(|l| l.devices().as_ref()).into_iter().flatten().enumerate() {
        let kind = match d.typ() {
            oci_spec::runtime::LinuxDeviceType::B => SFlag::S_IFBLK,
            oci_spec::runtime::LinuxDeviceType::C | oci_spec::runtime::LinuxDeviceType::U => SFlag::S_IFCHR,
            oci_spec::runtime::LinuxDeviceType::P => SFlag::S_IFIFO,
            _ => return Err(config(format!("linux.devices[{i}].type"), "must be b, c, u or p")),
        };
        if !d.path().starts_with("/dev/") {
            return Err(config(
                format!("linux.devices[{i}].path"),
                format!("{} is not under /dev", d.path().display()),
            ));
        }
        devs.retain(|x| x.0 != *d.path());
        devs.push((
            d.path().clone(),
            kind,
            d.major() as u64,
            d.minor() as u64,
            d.file_mode().unwrap_or(0o666),
            d.uid().unwrap_or(0),
            d.gid().unwrap_or(0),
        ));
    }
    for (path, kind, maj, min, perm, uid, gid) in devs {
        let target = secure_join(rootfs, &path);
        let label = format!("device {}", path.display());
        if let Some(parent) = target.parent() {
            mkdirs(plan, rootfs, parent, &label)?;
        }
        let t = cstr(&target, &label)?;
        if in_userns {
            // mknod is not allowed in a user namespace: bind the host's node instead.
            plan.pre(Op::Touch(t.clone()), label.clone());
            plan.pre(
                Op::Mount {
                    src: Some(cstr(&path, &label)?),
                    target: t,
                    fstype: None,
                    flags: MsFlags::MS_BIND,
                    data: None,
                },
                label,
            );
        } else {
            plan.pre(Op::Mknod { path: t, kind, perm, dev: nix::sys::stat::makedev(maj, min), uid, gid }, label);
        }
    }
    let mut links = vec![
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
        ("/proc/kcore", "/dev/core"),
    ];
    if devpts {
        links.push(("pts/ptmx", "/dev/ptmx"));
    }
    for (t, l) in links {
        plan.pre(
            Op::Symlink { target: cstr(t, "")?, link: cstr(rootfs.join(&l[1..]), "")? },
            format!("symlink {l} -> {t}"),
        );
    }
    Ok(())
}

fn rlimit_number(t: PosixRlimitType) -> libc::c_int {
    (match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as libc::c_int
}

fn cap_mask(set: &Option<oci_spec::runtime::Capabilities>, field: &str, last: u32) -> Result<u64> {
    let mut m = 0u64;
    for c in set.iter().flatten() {
        let name = format!("CAP_{c}");
        let cap: caps::Capability = name.parse().map_err(|_| config(field, format!("unknown capability {name}")))?;
        let bit = u32::from(cap.index());
        if bit <= last {
            m |= 1 << bit;
        } else {
            tracing::warn!("{field}: {name} is not known to this kernel; ignored");
        }
    }
    Ok(m)
}

/// The user process: identity, limits, capabilities, seccomp, command.
pub(crate) fn process_plan(spec: &Spec, p: &Process) -> Result<ProcPlan> {
    let args = p.args().clone().unwrap_or_default();
    let arg0 = args.first().ok_or_else(|| config("process.args", "must name the program to run"))?.clone();
    let env: Vec<String> = p.env().clone().unwrap_or_default();
    if !p.cwd().is_absolute() {
        return Err(config("process.cwd", format!("{} must be an absolute path", p.cwd().display())));
    }
    let candidates = if arg0.contains('/') {
        vec![cstr(&arg0, "process.args")?]
    } else {
        let path = env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| cstr(format!("{d}/{arg0}"), "process.args"))
            .collect::<Result<_>>()?
    };
    let last_cap: u32 =
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40);
    let caps = match p.capabilities() {
        None => None,
        Some(c) => Some(CapSets {
            bounding: cap_mask(c.bounding(), "process.capabilities.bounding", last_cap)?,
            effective: cap_mask(c.effective(), "process.capabilities.effective", last_cap)?,
            permitted: cap_mask(c.permitted(), "process.capabilities.permitted", last_cap)?,
            inheritable: cap_mask(c.inheritable(), "process.capabilities.inheritable", last_cap)?,
            ambient: cap_mask(c.ambient(), "process.capabilities.ambient", last_cap)?,
            last_cap,
        }),
    };
    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(s) => Some(seccomp::compile(s)?),
        None => None,
    };
    let u = p.user();
    Ok(ProcPlan {
        terminal: p.terminal().unwrap_or(false),
        rlimits: p.rlimits().iter().flatten().map(|r| (rlimit_number(r.typ()), r.soft(), r.hard())).collect(),
        caps,
        uid: u.uid(),
        gid: u.gid(),
        groups: u.additional_gids().iter().flatten().map(|g| nix::unistd::Gid::from_raw(*g)).collect(),
        umask: u.umask(),
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        seccomp,
        cwd: cstr(p.cwd(), "process.cwd")?,
        candidates,
        argv: CStrArray::new(args.iter().map(|a| cstr(a, "process.args")).collect::<Result<_>>()?),
        envp: CStrArray::new(env.iter().map(|a| cstr(a, "process.env")).collect::<Result<_>>()?),
        oom_score_adj: p.oom_score_adj(),
    })
}

/// The error for a failure the init reported: (step, index into the plan's labels, errno).
pub(crate) fn describe_failure(labels: &[String], step: u8, label: u32, errno: i32) -> Error {
    let what = match step {
        crate::init::STEP_OP | crate::init::STEP_HOOK => {
            labels.get(label as usize).cloned().unwrap_or_else(|| "set-up".into())
        }
        s => crate::init::step_name(s).to_string(),
    };
    let e = nix::errno::Errno::from_raw(errno);
    let hint = match (step, e) {
        (crate::init::STEP_EXEC, nix::errno::Errno::ENOENT) => " (not found in the container's PATH or root)",
        (crate::init::STEP_EXEC, nix::errno::Errno::EACCES) => " (not executable)",
        (crate::init::STEP_PIVOT, nix::errno::Errno::EINVAL) => {
            " (the rootfs cannot be pivoted here, e.g. on a ramfs: retry with --no-pivot)"
        }
        _ => "",
    };
    Error::Init(format!("{what}: {e}{hint}"))
}
