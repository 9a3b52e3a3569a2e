//! The microVM driver: each instance is an `isla vm run` monitor process (isla's own KVM
//! monitor, one process per guest), a child of the supervisor. The guest gets a TAP on the
//! instance's network (with its address on the kernel command line, `ip=`), its serial console
//! goes to the log, and a vsock device carries `exec` to the guest agent.
//!
//! Without `--kernel`, the monitor boots the guest kit (kernel and initramfs); `--rootfs` boots
//! an ext4 image instead. The command line's words are added to the kernel command line (e.g.
//! `isla.check=stress`). The kit's init powers the guest off when it is done, so the instance
//! then exits with the monitor's status (0: powered off). A container image boots on the kit
//! with the image as a disk (`imagevm`); its instance exits with its process's status.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use isla_container::Signal;

use crate::driver::{detach_network, wait_until, Driver, Env, ExecOutput, ExecRequest, Launched, Stats, Stdio};
use crate::error::{io, Error, Result};
use crate::guest;
use crate::imagevm;
use crate::model::{Instance, InstanceSpec, Kind, Status};

/// Runs instances as microVMs.
pub struct MicrovmDriver;

fn vsock_path(env: &Env, id: &str) -> PathBuf {
    env.instance_dir(id).join("vsock.sock")
}

impl Driver for MicrovmDriver {
    fn kind(&self) -> Kind {
        Kind::Microvm
    }

    fn check(&self, env: &Env, spec: &InstanceSpec) -> Result<()> {
        guest::check_spec(spec)?;
        if imagevm::is_image(spec) {
            imagevm::check(env, spec)?;
        }
        Ok(())
    }

    fn create(&self, env: &Env, inst: &Instance) -> Result<()> {
        if imagevm::is_image(&inst.spec) {
            imagevm::create(env, inst)?;
        }
        Ok(())
    }

    fn start(&self, env: &Env, inst: &Instance, stdio: Stdio) -> Result<Launched> {
        let spec = &inst.spec;
        let mut attachment = None;
        let mut cmdline =
            vec!["console=ttyS0".to_string(), "reboot=k".into(), "panic=1".into(), "pci=off".into(), "quiet".into()];
        let mut cmd = Command::new(&env.helper);
        cmd.args(["vm", "run", "--console", "stdio", "--quiet"]);
        if let Some(net) = spec.network_name() {
            let nets = env.networks()?;
            crate::container::ensure_network(&nets, net)?;
            let a = nets.attach_tap(net, &inst.id, Some(&spec.name))?;
            crate::proc::crash_point("start:attached");
            for p in &spec.ports {
                if let Err(e) = nets.publish(net, &inst.id, *p) {
                    let _ = nets.detach(net, &inst.id);
                    return Err(e.into());
                }
            }
            cmd.arg("--net").arg(format!("{},mac={}", a.host_ifname, a.mac));
            cmdline.push(a.kernel_ip_arg(&crate::driver::guest_dns(env, &nets, net)));
            attachment = Some(a);
        }
        if imagevm::is_image(spec) {
            match imagevm::start_args(env, inst, attachment.is_some()) {
                Ok((args, words)) => {
                    cmd.args(args);
                    cmdline.extend(words);
                }
                Err(e) => {
                    let _ = detach_network(env, inst);
                    return Err(e);
                }
            }
        } else {
            cmdline.extend(spec.command.iter().cloned());
        }
        cmd.arg("--cmdline").arg(cmdline.join(" "));
        let vsock = vsock_path(env, &inst.id);
        let _ = std::fs::remove_file(&vsock);
        cmd.arg("--vsock").arg(&vsock);
        if let Some(k) = &spec.kernel {
            cmd.arg("--kernel").arg(k);
        }
        if let Some(r) = &spec.rootfs {
            cmd.arg("--rootfs").arg(r);
        }
        if let Some(c) = spec.cpus {
            cmd.arg("--cpus").arg((c.ceil() as u64).clamp(1, 32).to_string());
        }
        if let Some(m) = spec.memory {
            cmd.arg("--memory").arg(format!("{}M", (m >> 20).max(32)));
        }
        cmd.stdin(std::process::Stdio::null()).stdout(stdio.out).stderr(stdio.err);
        match cmd.spawn() {
            // The supervisor reaps it with waitpid; the Child handle is not needed.
            Ok(child) => Ok(Launched { pid: child.id() as i32, attachment, follow: None, keep: None }),
            Err(e) => {
                let _ = detach_network(env, inst);
                Err(io(format!("starting {} vm run", env.helper.display()))(e))
            }
        }
    }

    fn release(&self, env: &Env, inst: &Instance) -> Result<()> {
        if let Some(m) = inst.main_process() {
            // Only the monitor this instance started (pid and start time recorded as running).
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(m.pid), Signal::SIGKILL);
            wait_until(Duration::from_secs(10), || !m.alive());
        }
        detach_network(env, inst).map(drop)?;
        let _ = std::fs::remove_file(vsock_path(env, &inst.id));
        Ok(())
    }

    fn stop(&self, _env: &Env, inst: &Instance, timeout: Duration) -> Result<()> {
        let Some(m) = inst.main_process() else { return Ok(()) };
        let pid = nix::unistd::Pid::from_raw(m.pid);
        // The monitor stops the guest cleanly on SIGTERM.
        if !timeout.is_zero() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
            if wait_until(timeout, || !m.alive()) {
                return Ok(());
            }
        }
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        if wait_until(Duration::from_secs(10), || !m.alive()) {
            Ok(())
        } else {
            Err(Error::Supervisor { name: inst.spec.name.clone(), msg: "its monitor did not end after SIGKILL".into() })
        }
    }

    fn kill(&self, _env: &Env, inst: &Instance, s: Signal) -> Result<()> {
        guest::signal(inst, s)
    }

    fn pause(&self, _env: &Env, inst: &Instance) -> Result<()> {
        guest::signal(inst, Signal::SIGSTOP)
    }

    fn resume(&self, _env: &Env, inst: &Instance) -> Result<()> {
        guest::signal(inst, Signal::SIGCONT)
    }

    fn remove(&self, env: &Env, inst: &Instance) -> Result<()> {
        self.release(env, inst)?;
        crate::driver::remove_instance_dir(env, &inst.id)
    }

    fn state(&self, _env: &Env, inst: &Instance) -> Result<Option<Status>> {
        Ok(inst.main_process().map(|_| inst.status))
    }

    fn exec(&self, env: &Env, inst: &Instance, req: &ExecRequest) -> Result<i32> {
        use std::io::Write;
        let x = self.exec_output(env, inst, req)?;
        let _ = std::io::stdout().write_all(x.stdout.as_bytes());
        let _ = std::io::stderr().write_all(x.stderr.as_bytes());
        Ok(x.exit_code)
    }

    fn exec_output(&self, env: &Env, inst: &Instance, req: &ExecRequest) -> Result<ExecOutput> {
        guest::main_process(inst)?;
        if req.tty || req.workdir.is_some() {
            return Err(Error::invalid("exec", "--tty and --workdir are not supported for microVMs"));
        }
        let agent =
            |e: isla_agent::AgentError| Error::Supervisor { name: inst.spec.name.clone(), msg: format!("agent: {e}") };
        let mut c = isla_agent::Client::connect(&vsock_path(env, &inst.id), Duration::from_secs(10)).map_err(agent)?;
        let r = isla_agent::Request::Exec {
            argv: req.args.clone(),
            env: req.env.clone(),
            stdin: String::new(),
            timeout_s: 0,
        };
        match c.call(&r, Duration::from_secs(24 * 3600)).map_err(agent)? {
            isla_agent::Response::Exited(x) => Ok(ExecOutput {
                exit_code: x.exit_code.unwrap_or_else(|| 128 + x.signal.unwrap_or(0)),
                stdout: x.stdout,
                stderr: x.stderr,
            }),
            other => Err(Error::Supervisor {
                name: inst.spec.name.clone(),
                msg: format!("agent: unexpected answer {other:?}"),
            }),
        }
    }

    fn stats(&self, _env: &Env, inst: &Instance) -> Result<Stats> {
        let m = guest::main_process(inst)?;
        crate::driver::process_stats(m.pid, inst.spec.memory)
    }

    fn exit_code(&self, env: &Env, inst: &Instance, code: i32) -> i32 {
        if imagevm::is_image(&inst.spec) {
            imagevm::exit_code(env, inst, code)
        } else {
            code
        }
    }
}
