//! The full-VM driver: QEMU through `isla-qemu`, as libvirt drives it. The supervisor starts
//! QEMU (its child, so it collects the exit status), with a TAP on the instance's network and
//! the first serial port in a file whose new lines it copies into the instance's log.
//!
//! `isla run --kind vm kit [WORDS]` boots the guest kit's bzImage and initramfs directly (the
//! words are added to the kernel command line); `--kernel` boots another kernel, `--rootfs`
//! attaches a disk image (raw or qcow2) as the first disk and boots from it with SeaBIOS when
//! no kernel is given. The accelerator is isla-qemu's `auto`: KVM on hardware virtualization,
//! TCG on this nested host (docs/qemu.md).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use isla_container::Signal;
use isla_qemu::{DiskConfig, KernelBoot, NicConfig, QemuConfig, Vm};

use crate::driver::{detach_network, process_stats, wait_until, Driver, Env, ExecRequest, Launched, Stats, Stdio};
use crate::error::{io, Error, Result};
use crate::guest::{self, KIT_IMAGE};
use crate::model::{Instance, InstanceSpec, Kind, Status};

/// Runs instances as full VMs.
pub struct VmDriver;

fn vm_dir(env: &Env, id: &str) -> PathBuf {
    env.instance_dir(id).join("qemu")
}

fn qemu(e: isla_qemu::QemuError) -> Error {
    Error::Supervisor { name: "qemu".into(), msg: e.to_string() }
}

/// The guest kit's bzImage and initramfs, as `isla guest path` reports them.
fn kit(env: &Env) -> Result<(PathBuf, PathBuf)> {
    let out = Command::new(&env.helper).args(["guest", "path"]).output().map_err(io("running isla guest path"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(|v| PathBuf::from(v.trim()));
    match (out.status.success(), get("bzImage "), get("initramfs ")) {
        (true, Some(k), Some(i)) => Ok((k, i)),
        _ => Err(Error::invalid(
            "image kit",
            format!("no guest kit: {} (build it with `isla guest build`)", String::from_utf8_lossy(&out.stderr).trim()),
        )),
    }
}

fn open(env: &Env, inst: &Instance) -> Result<Vm> {
    Vm::open(&vm_dir(env, &inst.id)).map_err(qemu)
}

impl VmDriver {
    fn config(
        &self,
        env: &Env,
        spec: &InstanceSpec,
        nic: Option<NicConfig>,
        ip_arg: Option<String>,
    ) -> Result<QemuConfig> {
        let mut cfg = QemuConfig::new(spec.name.clone());
        if let Some(m) = spec.memory {
            cfg.memory_mib = u32::try_from(m >> 20).unwrap_or(u32::MAX).max(64);
        } else {
            cfg.memory_mib = 256;
        }
        cfg.cpus = spec.cpus.map_or(1, |c| c.ceil() as u32);
        let mut append = vec!["console=ttyS0".to_string(), "panic=-1".into(), "quiet".into()];
        append.extend(ip_arg);
        append.extend(spec.command.iter().cloned());
        let append = append.join(" ");
        match (&spec.kernel, spec.image.as_deref()) {
            (Some(k), _) => cfg.kernel = Some(KernelBoot { kernel: k.clone(), initrd: None, append }),
            (None, Some(KIT_IMAGE)) if spec.rootfs.is_none() => {
                let (kernel, initrd) = kit(env)?;
                cfg.kernel = Some(KernelBoot { kernel, initrd: Some(initrd), append });
            }
            _ => {}
        }
        if let Some(r) = &spec.rootfs {
            cfg.disks.push(DiskConfig::new(r.clone()));
        }
        cfg.nics.extend(nic);
        cfg.validate().map_err(qemu)?;
        Ok(cfg)
    }
}

impl Driver for VmDriver {
    fn kind(&self) -> Kind {
        Kind::Vm
    }

    fn check(&self, env: &Env, spec: &InstanceSpec) -> Result<()> {
        guest::check_spec(spec)?;
        self.config(env, spec, None, None).map(|_| ())
    }

    fn create(&self, _env: &Env, _inst: &Instance) -> Result<()> {
        Ok(())
    }

    fn start(&self, env: &Env, inst: &Instance, _stdio: Stdio) -> Result<Launched> {
        let dir = vm_dir(env, &inst.id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))?;
        }
        let mut attachment = None;
        let mut nic = None;
        if let Some(net) = inst.spec.network_name() {
            let nets = env.networks()?;
            crate::container::ensure_network(&nets, net)?;
            let a = nets.attach_tap(net, &inst.id, Some(&inst.spec.name))?;
            crate::proc::crash_point("start:attached");
            nic = Some(NicConfig::Tap { ifname: a.host_ifname.clone(), mac: Some(a.mac.clone()) });
            attachment = Some(a);
        }
        let started = (|| -> Result<(Vm, i32)> {
            let mut dns = Vec::new();
            if let (Some(net), Some(_)) = (inst.spec.network_name(), &attachment) {
                let nets = env.networks()?;
                for p in &inst.spec.ports {
                    nets.publish(net, &inst.id, *p)?;
                }
                dns = crate::driver::guest_dns(env, &nets, net);
            }
            let ip = attachment.as_ref().map(|a| a.kernel_ip_arg(&dns));
            let mut vm = Vm::create(&dir, self.config(env, &inst.spec, nic, ip)?).map_err(qemu)?;
            let info = vm.start().map_err(qemu)?;
            Ok((vm, info.pid as i32))
        })();
        match started {
            Ok((vm, pid)) => Ok(Launched {
                pid,
                attachment,
                follow: Some(vm.paths().serial_log.clone()),
                // The handle must outlive QEMU: dropping it hands the child to a reaper thread.
                keep: Some(Box::new(vm)),
            }),
            Err(e) => {
                let _ = detach_network(env, inst);
                Err(e)
            }
        }
    }

    fn release(&self, env: &Env, inst: &Instance) -> Result<()> {
        if let Some(m) = inst.main_process() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(m.pid), Signal::SIGKILL);
            wait_until(Duration::from_secs(10), || !m.alive());
        }
        detach_network(env, inst).map(drop)
    }

    fn stop(&self, env: &Env, inst: &Instance, timeout: Duration) -> Result<()> {
        let Some(m) = inst.main_process() else { return Ok(()) };
        if timeout.is_zero() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(m.pid), Signal::SIGKILL);
        } else {
            // ACPI power button, then QMP quit, then SIGKILL (isla-qemu's shutdown).
            open(env, inst)?.shutdown(timeout).map_err(qemu)?;
        }
        if wait_until(Duration::from_secs(10), || !m.alive()) {
            Ok(())
        } else {
            Err(Error::Supervisor { name: inst.spec.name.clone(), msg: "QEMU did not end".into() })
        }
    }

    fn kill(&self, _env: &Env, inst: &Instance, s: Signal) -> Result<()> {
        let m = guest::main_process(inst)?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(m.pid), s)
            .map_err(crate::error::sys(format!("signalling {}", inst.spec.name)))
    }

    fn pause(&self, env: &Env, inst: &Instance) -> Result<()> {
        open(env, inst)?.pause().map_err(qemu)
    }

    fn resume(&self, env: &Env, inst: &Instance) -> Result<()> {
        open(env, inst)?.resume().map_err(qemu)
    }

    fn remove(&self, env: &Env, inst: &Instance) -> Result<()> {
        self.release(env, inst)?;
        crate::driver::remove_instance_dir(env, &inst.id)
    }

    fn state(&self, _env: &Env, inst: &Instance) -> Result<Option<Status>> {
        Ok(inst.main_process().map(|_| inst.status))
    }

    fn exec(&self, _env: &Env, inst: &Instance, _req: &ExecRequest) -> Result<i32> {
        Err(Error::State {
            name: inst.spec.name.clone(),
            status: inst.status.to_string(),
            msg: "exec in a full VM needs a guest agent, which isla's vm kind does not have yet".into(),
        })
    }

    fn stats(&self, _env: &Env, inst: &Instance) -> Result<Stats> {
        let m = guest::main_process(inst)?;
        process_stats(m.pid, inst.spec.memory)
    }
}
