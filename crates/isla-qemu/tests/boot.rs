//! Real QEMU boots of the guest kit (kernel + initramfs): two boots in all.
//!
//! Needs `qemu-system-x86_64` (Debian package qemu-system-x86) and the guest kit
//! (~/.cache/isla/guest-kit.env, written by guest/build.sh). Both are installed by
//! scripts/setup; with ISLA_REQUIRE_KVM=1 (CI) a missing one fails the test instead of skipping.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use isla_qemu::{
    DiskConfig, KernelBoot, NicConfig, QemuConfig, QemuError, Qmp, ShutdownOutcome, Vm, VmState, Vnc, QMP_TIMEOUT,
};

/// Generous bound for a boot: about 1 s with TCG here, minutes on a loaded CI machine.
const BOOT: Duration = Duration::from_secs(240);

struct Kit {
    bzimage: PathBuf,
    initramfs: PathBuf,
}

fn kit() -> Option<Kit> {
    let required = std::env::var("ISLA_REQUIRE_KVM").is_ok_and(|v| v == "1");
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into());
    let env = std::fs::read_to_string(home.join(".cache/isla/guest-kit.env")).unwrap_or_default();
    let get = |k: &str| env.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix('=')).map(PathBuf::from);
    let kit = match (get("ISLA_KERNEL_BZIMAGE"), get("ISLA_INITRAMFS")) {
        (Some(bzimage), Some(initramfs)) if bzimage.is_file() && initramfs.is_file() => {
            Some(Kit { bzimage, initramfs })
        }
        _ => None,
    };
    let qemu = isla_qemu::qemu_binary();
    match (kit, qemu) {
        (Some(k), Ok(_)) => Some(k),
        (k, q) if required => panic!(
            "ISLA_REQUIRE_KVM=1 but the guest kit ({}) or QEMU ({:?}) is missing: run scripts/setup",
            if k.is_some() { "found" } else { "missing" },
            q.err()
        ),
        _ => {
            eprintln!("skipped: needs qemu-system-x86_64 and the guest kit (scripts/setup installs both)");
            None
        }
    }
}

fn kit_vm(name: &str, kit: &Kit, shell: bool) -> QemuConfig {
    let mut c = QemuConfig::new(format!("{name}-{}", std::process::id()));
    c.memory_mib = 256;
    let shell = if shell { " isla.shell=1" } else { "" };
    c.kernel = Some(KernelBoot {
        kernel: kit.bzimage.clone(),
        initrd: Some(kit.initramfs.clone()),
        append: format!("console=ttyS0 panic=-1{shell}"),
    });
    c
}

/// A network namespace of the test's own (`ip netns add`) holding a TAP; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn with_tap(tap: &str) -> Netns {
        let name = format!("isla-qemu-{}", std::process::id());
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("run ip");
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn qemu_img_json(args: &[&str], image: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img").args(args).arg("--output=json").arg(image).output().expect("run qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("qemu-img JSON")
}

fn serial(vm: &Vm) -> String {
    String::from_utf8_lossy(&std::fs::read(&vm.paths().serial_log).unwrap_or_default()).into_owned()
}

/// Boot with a qcow2 data disk; pause/resume, live snapshots, re-attach, shutdown, offline
/// snapshots, linked clone, delete.
#[test]
fn lifecycle_snapshots_and_linked_clone() {
    let Some(kit) = kit() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.qcow2");
    isla_disk::create(&data, &isla_disk::CreateOptions::new(isla_disk::Format::Qcow2, 64 << 20)).unwrap();
    let mut cfg = kit_vm("life", &kit, true);
    cfg.disks = vec![DiskConfig::new(&data)];
    cfg.vnc = Some(Vnc::Unix);
    // A TAP (opened by isla, its descriptor passed to QEMU) and user-mode networking with a port
    // forward, both inside a namespace of the test's own: no link or port on the host.
    let ns = Netns::with_tap("isla-tq0");
    cfg.nics = vec![
        NicConfig::Tap { ifname: "isla-tq0".into(), mac: None },
        NicConfig::User { mac: None, hostfwd: vec!["tcp:127.0.0.1:2222-:22".parse().unwrap()] },
    ];
    let dir = tmp.path().join("vm");
    let mut vm = Vm::create(&dir, cfg).unwrap();
    assert_eq!(vm.config().disks[0].format, Some(isla_qemu::DiskFormat::Qcow2), "format recorded at create");
    assert_eq!(vm.status().unwrap().state, VmState::Shutoff);

    let started = isla_net::in_netns(&ns.path(), || vm.start()).unwrap();
    let info = match started {
        Ok(i) => i,
        Err(e) => panic!("start: {e}; qemu.log: {}", std::fs::read_to_string(&vm.paths().qemu_log).unwrap_or_default()),
    };
    eprintln!("started pid {} with {} ({}), QEMU {:?}", info.pid, info.accel, info.accel_reason, info.qemu_version);
    let booted = vm.wait_for_serial("isla-init: started", BOOT);
    assert!(booted, "no marker on the serial console; serial.log:\n{}", serial(&vm));
    let st = vm.status().unwrap();
    assert_eq!((st.state, st.pid), (VmState::Running, Some(info.pid)));

    vm.pause().unwrap();
    let st = vm.status().unwrap();
    assert_eq!((st.state, st.qemu_status.as_deref()), (VmState::Paused, Some("paused")));
    vm.resume().unwrap();
    assert_eq!(vm.status().unwrap().state, VmState::Running);

    // The monitor: VNC on its unix socket, errors carry QEMU's class.
    let mut q = vm.qmp(QMP_TIMEOUT).unwrap();
    let vnc = q.query_vnc().unwrap();
    assert!(vnc.enabled && vnc.family.as_deref() == Some("unix"), "{vnc:?}");
    let net = q.human_monitor_command("info network").unwrap();
    let mac = vm.config().nics[0].mac().unwrap();
    assert!(net.contains("net0: index=0,type=tap,fd=") && net.contains(mac), "{net}");
    assert!(net.contains("net1: index=0,type=user"), "{net}");
    let usernet = q.human_monitor_command("info usernet").unwrap();
    assert!(usernet.contains("2222") && usernet.contains("22"), "{usernet}");
    let e = q.execute("no-such-command", None).unwrap_err().to_string();
    assert!(e.contains("no-such-command") && e.contains("CommandNotFound"), "{e}");
    drop(q);

    // Live snapshot: disks, RAM and devices, into the qcow2 disk.
    vm.snapshot_create("live1").unwrap();
    let snaps = vm.snapshot_list().unwrap();
    let live = snaps.iter().find(|s| s.name == "live1").expect("live1 listed");
    assert!(live.vm_state_size > 0, "a running snapshot holds the VM state: {live:?}");
    let text = vm.qmp(QMP_TIMEOUT).unwrap().info_snapshots().unwrap();
    assert!(text.contains("live1"), "{text}");
    vm.snapshot_apply("live1").unwrap();
    assert_eq!(vm.status().unwrap().state, VmState::Running, "loadvm resumes a running VM");
    let e = vm.snapshot_apply("missing").unwrap_err();
    assert!(matches!(e, QemuError::NoSuchSnapshot { .. }), "{e}");
    assert_eq!(vm.status().unwrap().state, VmState::Running);

    // A second handle finds the running VM from the directory alone (a manager restart).
    let mut again = Vm::open(&dir).unwrap();
    assert_eq!(again.status().unwrap().pid, Some(info.pid));
    let e = again.start().unwrap_err().to_string();
    assert!(e.contains("already started"), "{e}");
    drop(again);

    // The kit's shell ignores the ACPI button: shutdown falls back to quit after the timeout.
    let out = vm.shutdown(Duration::from_secs(3)).unwrap();
    assert!(matches!(out, ShutdownOutcome::Acpi | ShutdownOutcome::Quit), "{out:?}");
    let st = vm.status().unwrap();
    assert_eq!(st.state, VmState::Shutoff, "{st:?}");
    assert!(!vm.paths().pid.exists() && !vm.paths().qmp.exists());
    assert!(Qmp::connect(&vm.paths().qmp, Duration::from_secs(1)).is_err());

    // Shut off: snapshots go through isla-disk on the qcow2 file.
    vm.snapshot_create("off1").unwrap();
    let names: Vec<_> = vm.snapshot_list().unwrap().into_iter().map(|s| (s.name, s.vm_state_size)).collect();
    assert!(names.iter().any(|(n, sz)| n == "live1" && *sz > 0), "{names:?}");
    assert!(names.contains(&("off1".to_string(), 0)), "{names:?}");
    vm.snapshot_delete("live1").unwrap();
    let check = Command::new("qemu-img").args(["check", "-q"]).arg(&data).status().unwrap();
    assert!(check.success(), "qemu-img check of the data disk");
    let info = qemu_img_json(&["info"], &data);
    let snaps: Vec<_> = info["snapshots"].as_array().unwrap().iter().map(|s| s["name"].clone()).collect();
    assert_eq!(snaps, vec![serde_json::json!("off1")]);

    // Linked clone: a thin overlay over the data disk, which becomes a frozen base.
    let clone_dir = tmp.path().join("clone");
    let clone = vm.clone_linked(&clone_dir, &format!("{}-clone", vm.name())).unwrap();
    let overlay = &clone.config().disks[0].path;
    assert!(overlay.starts_with(&clone_dir));
    let info = qemu_img_json(&["info"], overlay);
    let base = std::fs::canonicalize(&data).unwrap();
    assert_eq!(info["backing-filename"].as_str(), Some(base.to_str().unwrap()), "{info}");
    assert_eq!(clone.config().linked_from.as_deref(), Some(std::fs::canonicalize(&dir).unwrap().as_path()));
    assert_eq!(vm.config().linked_clones, vec![std::fs::canonicalize(&clone_dir).unwrap()]);
    let e = vm.start().unwrap_err().to_string();
    assert!(e.contains("linked clone"), "{e}");
    let e = vm.snapshot_create("nope").unwrap_err().to_string();
    assert!(e.contains("linked clone"), "{e}");
    clone.delete().unwrap();
    assert!(!clone_dir.exists());
    let vm = Vm::open(&dir).unwrap();
    assert!(vm.config().linked_clones.is_empty(), "the clone unregistered itself");

    vm.delete().unwrap();
    assert!(!dir.exists());
    assert!(data.exists(), "a disk outside the VM directory is the user's and stays");
}

/// The kit's init powers off (ACPI S5): QEMU ends by itself and the VM reads as shut off.
#[test]
fn guest_poweroff_ends_qemu() {
    let Some(kit) = kit() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::create(&tmp.path().join("vm"), kit_vm("off", &kit, false)).unwrap();
    vm.start().unwrap();
    let ended = vm.wait_exit(BOOT);
    if !ended {
        let _ = vm.kill();
    }
    let log = serial(&vm);
    assert!(ended, "QEMU still running; serial.log:\n{log}");
    assert!(log.contains("isla-init: started") && log.contains("isla-init: powering off"), "{log}");
    let st = vm.status().unwrap();
    assert_eq!(st.state, VmState::Shutoff, "{st:?}");
    assert_eq!(st.detail.as_deref(), Some("QEMU exited normally"));
    assert!(!vm.paths().pid.exists(), "QEMU removes its pid file on a clean exit");
}
