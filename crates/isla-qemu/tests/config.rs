//! Configuration and state errors, checked without booting anything: each names the field or
//! file and what to do.

use std::path::Path;

use isla_qemu::{
    Cdrom, DiskConfig, DiskFormat, DiskInterface, KernelBoot, Machine, NicConfig, QemuConfig, QemuError, Vm,
};

fn raw_disk(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    isla_disk::create(&p, &isla_disk::CreateOptions::new(isla_disk::Format::Raw, 1 << 20)).unwrap();
    p
}

fn err(c: &QemuConfig) -> String {
    c.validate().unwrap_err().to_string()
}

#[test]
fn validation_names_field_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = raw_disk(tmp.path(), "d.raw");
    let ok = {
        let mut c = QemuConfig::new("ok");
        c.disks = vec![DiskConfig::new(&disk)];
        c
    };
    ok.validate().unwrap();

    let mut c = ok.clone();
    c.disks[0].path = tmp.path().join("missing.qcow2");
    let e = err(&c);
    assert!(e.starts_with("disks[0].path: ") && e.contains("missing.qcow2") && e.contains("No such file"), "{e}");

    let mut c = ok.clone();
    c.memory_mib = 0;
    let e = err(&c);
    assert!(e.starts_with("memory_mib: 0 MiB is out of range: give 16 to"), "{e}");
    c.memory_mib = u32::MAX;
    assert!(err(&c).starts_with("memory_mib:"));

    let mut c = ok.clone();
    c.cpus = 0;
    assert!(err(&c).starts_with("cpus: 0 is out of range"));

    let mut c = ok.clone();
    c.cdrom = Some(Cdrom { path: tmp.path().join("debian.iso"), boot_index: None });
    let e = err(&c);
    assert!(e.starts_with("cdrom.path: ") && e.contains("debian.iso"), "{e}");

    let mut c = ok.clone();
    c.cdrom = Some(Cdrom { path: tmp.path().to_path_buf(), boot_index: None });
    assert!(err(&c).contains("is not a regular file"));

    let c = QemuConfig::new("empty");
    assert_eq!(err(&c), "disks: nothing to boot from: add a disk, a cdrom ISO or a kernel");

    let mut c = ok.clone();
    c.name = "bad name/..".into();
    assert!(err(&c).starts_with("name: `bad name/..`: use 1 to 64 letters"));

    let mut c = ok.clone();
    c.disks[0].format = Some(DiskFormat::Qcow2);
    assert!(err(&c).contains("is not a qcow2 image; set format to raw"));

    let mut c = ok.clone();
    c.machine = Machine::Microvm;
    c.disks[0].interface = DiskInterface::Ide;
    assert!(err(&c).starts_with("disks[0].interface: the microvm machine has no IDE"));
    c.disks[0].interface = DiskInterface::Virtio;
    assert_eq!(err(&c), "kernel: the microvm machine has no firmware: give a kernel");

    let mut c = ok.clone();
    c.disks[0].boot_index = Some(1);
    c.cdrom = Some(Cdrom { path: disk.clone(), boot_index: Some(1) });
    assert_eq!(err(&c), "disks[0].boot_index: boot index 1 is also used by cdrom.boot_index");

    let mut c = ok.clone();
    c.kernel = Some(KernelBoot { kernel: tmp.path().join("bzImage"), initrd: None, append: String::new() });
    assert!(err(&c).starts_with("kernel.kernel: "));

    let mut c = ok.clone();
    c.nics = vec![NicConfig::Tap { ifname: "a-very-long-interface-name".into(), mac: None }];
    assert!(err(&c).starts_with("nics[0].ifname: "));
    c.nics = vec![NicConfig::User { mac: Some("01:00:5e:00:00:01".into()), hostfwd: vec![] }];
    assert!(err(&c).starts_with("nics[0].mac: ") && err(&c).contains("multicast"));

    let mut c = ok.clone();
    c.vnc = Some(isla_qemu::Vnc::Tcp(200));
    assert!(err(&c).starts_with("vnc: display 200"));
}

#[test]
fn state_directory_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = raw_disk(tmp.path(), "d.raw");
    let mut c = QemuConfig::new("st");
    c.disks = vec![DiskConfig::new(&disk)];
    let dir = tmp.path().join("vm");
    let mut vm = Vm::create(&dir, c.clone()).unwrap();
    assert_eq!(vm.config().disks[0].format, Some(DiskFormat::Raw), "format detected and recorded");

    let e = Vm::create(&dir, c.clone()).unwrap_err().to_string();
    assert!(e.contains("already holds a VM"), "{e}");

    // Internal snapshots need qcow2: a writable raw disk is refused, naming the fix.
    let e = vm.snapshot_create("s1").unwrap_err().to_string();
    assert!(e.starts_with("disks[0]: ") && e.contains("isla disk convert -O qcow2"), "{e}");
    let e = vm.snapshot_create("12").unwrap_err().to_string();
    assert!(e.starts_with("snapshot: `12`"), "{e}");

    // Operations that need QEMU running say so.
    let e = vm.pause().unwrap_err();
    assert!(matches!(e, QemuError::WrongState { .. }) && e.to_string().contains("start it first"), "{e}");
    assert_eq!(vm.shutdown(std::time::Duration::from_secs(1)).unwrap(), isla_qemu::ShutdownOutcome::AlreadyOff);
    vm.kill().unwrap();

    // A TAP that does not exist is refused before QEMU starts (when QEMU is installed).
    let mut t = c.clone();
    t.name = "tap".into();
    t.nics = vec![NicConfig::Tap { ifname: format!("isla-tx{}", std::process::id() % 100_000), mac: None }];
    let mut tv = Vm::create(&tmp.path().join("tapvm"), t).unwrap();
    assert!(tv.config().nics[0].mac().is_some_and(|m| m.starts_with("52:54:00:")), "MAC given at create");
    let e = tv.start().unwrap_err();
    assert!(matches!(e, QemuError::Net(_) | QemuError::NotInstalled), "{e}");
    assert_eq!(tv.status().unwrap().state, isla_qemu::VmState::Shutoff);

    // A damaged config.json is reported with its path; nothing is overwritten.
    std::fs::write(dir.join("config.json"), "{\"name\": 5").unwrap();
    let e = Vm::open(&dir).unwrap_err().to_string();
    assert!(e.contains("config.json: invalid type: integer `5`, expected a string"), "{e}");
    assert_eq!(std::fs::read_to_string(dir.join("config.json")).unwrap(), "{\"name\": 5");
    let e = Vm::open(&tmp.path().join("nothing")).unwrap_err().to_string();
    assert!(e.contains("nothing/config.json: read"), "{e}");
}
