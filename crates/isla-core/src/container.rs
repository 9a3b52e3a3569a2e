//! The container driver: an overlay root file system from the image store, an OCI bundle
//! generated from the spec and the image configuration, isla's runtime (`isla-container`) for
//! the process, a veth into the container's network namespace and published ports from
//! `isla-net`.
//!
//! The runtime clones the calling process, so [`Driver::start`] runs in the single-threaded
//! supervisor (never in a multi-threaded caller); `exec`, which clones too, goes through the
//! `isla runtime exec` command. Everything else (state, kill, pause, stats, delete) is plain
//! file and signal work done in the caller.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use isla_container::{CreateOptions, Runtime, Signal};
use serde_json::{json, Value};

use crate::driver::{wait_until, Driver, Env, ExecOutput, ExecRequest, Launched, Stats, Stdio};
use crate::error::{io, sys, Error, Result};
use crate::model::{Instance, InstanceSpec, Kind, Status};

/// Runs instances as containers.
pub struct ContainerDriver;

/// Docker's default capability set (ping needs CAP_NET_RAW, package managers CAP_CHOWN, ...).
const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The cgroup of a container: absolute, so that it does not depend on where the supervisor runs.
pub fn cgroup_path(id: &str) -> String {
    format!("/isla/{id}")
}

fn runtime(env: &Env) -> Result<Runtime> {
    Ok(Runtime::new(env.runtime_root())?)
}

/// The runtime's record of `id`, if it has one.
fn loaded(env: &Env, id: &str) -> Result<Option<isla_container::Container>> {
    match runtime(env)?.load(id) {
        Ok(c) => Ok(Some(c)),
        Err(isla_container::Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn running(env: &Env, inst: &Instance) -> Result<isla_container::Container> {
    loaded(env, &inst.id)?.ok_or_else(|| Error::State {
        name: inst.spec.name.clone(),
        status: inst.status.to_string(),
        msg: "it has no running process (start it first)".into(),
    })
}

/// The process of an instance: the image's defaults merged with the spec.
pub(crate) struct Proc {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
}

/// The image's ENTRYPOINT, CMD (or the command line), ENV (with `-e`), WORKDIR (or `-w`) and
/// numeric USER.
pub(crate) fn process_of(img: &isla_image::Image, spec: &InstanceSpec) -> Result<Proc> {
    let cfg = img.config.config().clone().unwrap_or_default();
    let mut args = cfg.entrypoint().clone().unwrap_or_default();
    if spec.command.is_empty() {
        args.extend(cfg.cmd().clone().unwrap_or_default());
    } else {
        args.extend(spec.command.iter().cloned());
    }
    if args.is_empty() {
        return Err(Error::invalid(
            "command",
            format!("image `{}` has neither ENTRYPOINT nor CMD: give a command after the image", img_name(img, spec)),
        ));
    }
    let mut env: Vec<String> = cfg.env().clone().unwrap_or_default();
    for e in &spec.env {
        let (k, v) = match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            // `-e NAME` passes the caller's value, as Docker does; unset means "leave it out".
            None => match std::env::var(e) {
                Ok(v) => (e.clone(), v),
                Err(_) => continue,
            },
        };
        env.retain(|x| x.split_once('=').map(|(xk, _)| xk) != Some(&k));
        env.push(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let cwd =
        spec.workdir.clone().or(cfg.working_dir().clone().filter(|w| !w.is_empty())).unwrap_or_else(|| "/".into());
    let (uid, gid) = match cfg.user().as_deref().filter(|u| !u.is_empty()) {
        None => (0, 0),
        Some(u) => {
            let (a, b) = u.split_once(':').unwrap_or((u, "0"));
            match (a.parse(), b.parse()) {
                (Ok(a), Ok(b)) => (a, b),
                _ => {
                    return Err(Error::invalid(
                        "image USER",
                        format!("`{u}`: only numeric uid[:gid] is supported; rebuild the image with USER 1000:1000"),
                    ))
                }
            }
        }
    };
    Ok(Proc { args, env, cwd, uid, gid })
}

/// The spec's image from the store (`busybox` is made on first use), or an error naming it.
pub(crate) fn resolve_image(env: &Env, spec: &InstanceSpec) -> Result<isla_image::Image> {
    let image = spec.image.as_deref().unwrap_or_default();
    match isla_image::busybox::resolve_or_make(&env.images, image) {
        Err(isla_image::Error::NotFound(_)) => Err(Error::invalid(
            "image",
            format!(
                "no image `{image}` in the store (see `isla image ls`; `isla image pull` or `isla build` it first)"
            ),
        )),
        r => Ok(r?),
    }
}

fn img_name(img: &isla_image::Image, spec: &InstanceSpec) -> String {
    img.names.first().cloned().or(spec.image.clone()).unwrap_or_default()
}

/// The OCI runtime spec of an instance (isla's default spec with the instance's settings).
pub fn bundle_spec(img: &isla_image::Image, inst: &Instance, rootfs: &Path) -> Result<Value> {
    let spec = &inst.spec;
    let Proc { args, env, cwd, uid, gid } = process_of(img, spec)?;
    let mut v = serde_json::to_value(isla_container::spec::default_spec(false))
        .map_err(|e| Error::invalid("runtime spec", e.to_string()))?;
    v["process"]["terminal"] = json!(false);
    v["process"]["args"] = json!(args);
    v["process"]["env"] = json!(env);
    v["process"]["cwd"] = json!(cwd);
    v["process"]["user"] = json!({"uid": uid, "gid": gid});
    v["process"]["capabilities"] = json!({
        "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS,
        "inheritable": [], "ambient": [],
    });
    v["root"] = json!({"path": rootfs, "readonly": false});
    v["hostname"] = json!(spec.name);
    let mounts = v["mounts"].as_array_mut().ok_or_else(|| Error::invalid("runtime spec", "no mounts array"))?;
    for vol in &spec.volumes {
        let mode = if vol.readonly { "ro" } else { "rw" };
        mounts.push(json!({"destination": vol.guest, "type": "bind", "source": vol.host,
                           "options": ["rbind", "rprivate", mode]}));
    }
    let linux = &mut v["linux"];
    linux["cgroupsPath"] = json!(cgroup_path(&inst.id));
    if let Some(m) = spec.memory {
        linux["resources"]["memory"] = json!({"limit": m, "swap": m});
    }
    if let Some(c) = spec.cpus {
        let period = 100_000u64;
        linux["resources"]["cpu"] = json!({"quota": (c * period as f64).round() as i64, "period": period});
    }
    Ok(v)
}

/// Runs `f` with the process's stdin on /dev/null and stdout/stderr on `stdio`, so that the
/// container's init, cloned inside `f`, inherits them; restores the originals afterwards.
fn with_stdio<T>(stdio: &Stdio, f: impl FnOnce() -> T) -> Result<T> {
    let keep = |fd: std::os::fd::BorrowedFd<'_>| -> Result<OwnedFd> {
        let copy = nix::unistd::dup(fd).map_err(sys("saving stdio"))?;
        nix::fcntl::fcntl(&copy, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .map_err(sys("saving stdio"))?;
        Ok(copy)
    };
    let (in0, out0, err0) =
        (keep(std::io::stdin().as_fd())?, keep(std::io::stdout().as_fd())?, keep(std::io::stderr().as_fd())?);
    let null = std::fs::File::open("/dev/null").map_err(io("/dev/null"))?;
    let set = |i: &dyn AsFd, o: &dyn AsFd, e: &dyn AsFd| -> Result<()> {
        nix::unistd::dup2_stdin(i.as_fd()).map_err(sys("dup2 stdin"))?;
        nix::unistd::dup2_stdout(o.as_fd()).map_err(sys("dup2 stdout"))?;
        nix::unistd::dup2_stderr(e.as_fd()).map_err(sys("dup2 stderr"))
    };
    set(&null, &stdio.out, &stdio.err)?;
    let r = f();
    set(&in0, &out0, &err0)?;
    Ok(r)
}

impl ContainerDriver {
    fn detach(&self, env: &Env, inst: &Instance) -> Result<()> {
        if crate::driver::detach_network(env, inst)? {
            if let Some(net) = inst.spec.network_name() {
                refresh_hosts(env, &env.networks()?, net)?;
            }
        }
        Ok(())
    }

    fn plug(&self, env: &Env, inst: &Instance, pid: i32) -> Result<Option<isla_net::Attachment>> {
        let Some(net) = inst.spec.network_name() else { return Ok(None) };
        let nets = env.networks()?;
        ensure_network(&nets, net)?;
        let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let a = nets.attach_veth(net, &inst.id, &ns, "eth0", Some(&inst.spec.name))?;
        crate::proc::crash_point("start:attached");
        let r = (|| -> Result<()> {
            for p in &inst.spec.ports {
                nets.publish(net, &inst.id, *p)?;
            }
            let etc = env.images.rootfs(&inst.id)?.merged.join("etc");
            std::fs::create_dir_all(&etc).map_err(io(format!("creating {}", etc.display())))?;
            write(&etc.join("resolv.conf"), &crate::driver::instance_resolv_conf(env, &nets, net))?;
            refresh_hosts(env, &nets, net)
        })();
        match r {
            Ok(()) => Ok(Some(a)),
            Err(e) => {
                let _ = nets.detach(net, &inst.id);
                Err(e)
            }
        }
    }
}

fn write(p: &Path, s: &str) -> Result<()> {
    std::fs::write(p, s).map_err(io(format!("writing {}", p.display())))
}

/// The default network is made on first use; others must exist.
pub(crate) fn ensure_network(nets: &isla_net::Networks, name: &str) -> Result<()> {
    match nets.inspect(name) {
        Ok(_) => Ok(()),
        Err(isla_net::Error::NoSuchNetwork(_)) if name == crate::DEFAULT_NETWORK => {
            match nets.create(&isla_net::NetworkSpec::new(name, isla_net::Driver::Nat)) {
                Ok(_) | Err(isla_net::Error::NetworkExists(_)) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Rewrites `/etc/hosts` of every running container on `net`, so that each resolves the names
/// of all the others, including ones started after it.
fn refresh_hosts(env: &Env, nets: &isla_net::Networks, net: &str) -> Result<()> {
    let Ok(network) = nets.inspect(net) else { return Ok(()) };
    for a in network.attachments.values().filter(|a| a.kind == isla_net::AttachKind::Veth) {
        let Ok(rootfs) = env.images.rootfs(&a.instance_id) else { continue };
        if !rootfs.is_mounted() {
            continue;
        }
        let etc = rootfs.merged.join("etc");
        if etc.is_dir() {
            write(&etc.join("hosts"), &nets.hosts_file(net, &a.instance_id)?)?;
        }
    }
    Ok(())
}

/// `isla runtime exec` of `req` in the running container (the runtime clones, so it runs in a
/// fresh single-threaded process).
fn exec_command(env: &Env, inst: &Instance, req: &ExecRequest) -> Result<Command> {
    running(env, inst)?;
    let mut cmd = Command::new(&env.helper);
    cmd.arg("runtime").arg("--root").arg(env.runtime_root()).arg("exec");
    for e in &req.env {
        cmd.args(["--env", e]);
    }
    if let Some(w) = &req.workdir {
        cmd.args(["--cwd", w]);
    }
    if req.tty {
        cmd.arg("--tty");
    }
    cmd.arg(&inst.id).args(&req.args);
    Ok(cmd)
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    st.code().unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0))
}

impl Driver for ContainerDriver {
    fn kind(&self) -> Kind {
        Kind::Container
    }

    fn check(&self, env: &Env, spec: &InstanceSpec) -> Result<()> {
        process_of(&resolve_image(env, spec)?, spec).map(|_| ())
    }

    fn create(&self, env: &Env, inst: &Instance) -> Result<()> {
        let image = inst.spec.image.as_deref().unwrap_or_default();
        let rootfs = env.images.prepare_rootfs(image, &inst.id)?;
        let img = isla_image::busybox::resolve_or_make(&env.images, image)?;
        let empty = crate::volume::empty_named(&inst.spec.volumes)?;
        for v in &inst.spec.volumes {
            std::fs::create_dir_all(&v.host)
                .map_err(io(format!("-v: creating host directory {}", v.host.display())))?;
        }
        if !empty.is_empty() {
            // Docker's rule: a new container fills an empty named volume with its image's files.
            rootfs.mount()?;
            let copied = empty.iter().try_for_each(|v| crate::volume::populate(&rootfs.merged, v));
            rootfs.unmount()?;
            copied?;
        }
        let dir = env.instance_dir(&inst.id);
        let spec = bundle_spec(&img, inst, &rootfs.merged)?;
        let text = serde_json::to_vec_pretty(&spec).map_err(|e| Error::invalid("runtime spec", e.to_string()))?;
        write(&dir.join("config.json"), &String::from_utf8_lossy(&text))
    }

    fn start(&self, env: &Env, inst: &Instance, stdio: Stdio) -> Result<Launched> {
        let rootfs = env.images.rootfs(&inst.id)?;
        if !rootfs.is_mounted() {
            rootfs.mount()?;
        }
        let rt = runtime(env)?;
        if let Some(old) = loaded(env, &inst.id)? {
            old.delete(true)?;
        }
        let bundle = env.instance_dir(&inst.id);
        let mut c = with_stdio(&stdio, || rt.create(&inst.id, &bundle, &CreateOptions::default()))??;
        drop(stdio);
        let pid = c.pid();
        let r = self.plug(env, inst, pid).and_then(|a| {
            c.start()?;
            Ok(a)
        });
        match r {
            Ok(attachment) => Ok(Launched { pid, attachment, follow: None, keep: None }),
            Err(e) => {
                let _ = c.kill(Signal::SIGKILL, true);
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                let _ = c.delete(true);
                let _ = rootfs.unmount();
                Err(e)
            }
        }
    }

    fn release(&self, env: &Env, inst: &Instance) -> Result<()> {
        if let Some(c) = loaded(env, &inst.id)? {
            if c.status() != isla_container::Status::Stopped {
                let _ = c.resume();
                let _ = c.kill(Signal::SIGKILL, true);
                wait_until(Duration::from_secs(10), || c.status() == isla_container::Status::Stopped);
            }
            c.delete(true)?;
        }
        self.detach(env, inst)?;
        if let Ok(r) = env.images.rootfs(&inst.id) {
            r.unmount()?;
        }
        Ok(())
    }

    fn stop(&self, env: &Env, inst: &Instance, timeout: Duration) -> Result<()> {
        let Some(c) = loaded(env, &inst.id)? else { return Ok(()) };
        let gone = || c.status() == isla_container::Status::Stopped;
        if gone() {
            return Ok(());
        }
        if c.status() == isla_container::Status::Paused {
            c.resume()?;
        }
        if !timeout.is_zero() {
            let _ = c.kill(Signal::SIGTERM, false);
            if wait_until(timeout, gone) {
                return Ok(());
            }
        }
        let _ = c.kill(Signal::SIGKILL, true);
        if wait_until(Duration::from_secs(10), gone) {
            Ok(())
        } else {
            Err(Error::Supervisor { name: inst.spec.name.clone(), msg: "its process did not end after SIGKILL".into() })
        }
    }

    fn kill(&self, env: &Env, inst: &Instance, signal: Signal) -> Result<()> {
        Ok(running(env, inst)?.kill(signal, false)?)
    }

    fn pause(&self, env: &Env, inst: &Instance) -> Result<()> {
        Ok(running(env, inst)?.pause()?)
    }

    fn resume(&self, env: &Env, inst: &Instance) -> Result<()> {
        Ok(running(env, inst)?.resume()?)
    }

    fn remove(&self, env: &Env, inst: &Instance) -> Result<()> {
        self.release(env, inst)?;
        if env.images.root().join("containers").join(&inst.id).exists() {
            env.images.remove_rootfs(&inst.id)?;
        }
        crate::driver::remove_instance_dir(env, &inst.id)
    }

    fn state(&self, env: &Env, inst: &Instance) -> Result<Option<Status>> {
        Ok(loaded(env, &inst.id)?.and_then(|c| match c.status() {
            isla_container::Status::Running => Some(Status::Running),
            isla_container::Status::Paused => Some(Status::Paused),
            isla_container::Status::Created | isla_container::Status::Creating => Some(Status::Created),
            isla_container::Status::Stopped => None,
        }))
    }

    fn exec(&self, env: &Env, inst: &Instance, req: &ExecRequest) -> Result<i32> {
        let st = exec_command(env, inst, req)?
            .status()
            .map_err(io(format!("running {} runtime exec", env.helper.display())))?;
        Ok(exit_code(st))
    }

    fn exec_output(&self, env: &Env, inst: &Instance, req: &ExecRequest) -> Result<ExecOutput> {
        let out = exec_command(env, inst, req)?
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(io(format!("running {} runtime exec", env.helper.display())))?;
        Ok(ExecOutput {
            exit_code: exit_code(out.status),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn stats(&self, env: &Env, inst: &Instance) -> Result<Stats> {
        let s = running(env, inst)?.stats()?;
        Ok(Stats {
            cpu_ns: s.cpu.usage.total,
            memory: s.memory.usage,
            memory_limit: Some(s.memory.limit).filter(|l| *l != u64::MAX && *l < (1 << 62)),
            pids: s.pids.current,
        })
    }
}
