//! `isla qemu ...` without booting: definitions, listing, and the errors a user sees (the
//! library's boots are tested in crates/isla-qemu/tests/boot.rs).

use std::process::{Command, Output};

fn isla(root: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_isla")).arg("qemu").arg("--root").arg(root).args(args).output().expect("run isla")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[test]
fn define_list_snapshot_clone_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let disk = root.join("base.qcow2");
    let st = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg("16M").status().unwrap();
    assert!(st.success());

    let o = isla(root, &["create", "web", "--memory", "1G", "--disk", &format!("{},if=ide,boot=1", disk.display())]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("qemu/web/config.json")).unwrap()).unwrap();
    assert_eq!((cfg["memory_mib"].as_u64(), cfg["disks"][0]["format"].as_str()), (Some(1024), Some("qcow2")));

    let o = isla(root, &["ls", "--output", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["name"], "web");
    assert_eq!(list[0]["state"], "shutoff");

    // Shut off: a disk-only snapshot on the qcow2 file, seen by qemu-img.
    assert!(isla(root, &["snapshot", "web", "create", "clean"]).status.success());
    let o = Command::new("qemu-img").args(["snapshot", "-l"]).arg(&disk).output().unwrap();
    assert!(text(&o.stdout).contains("clean"), "{}", text(&o.stdout));

    let o = isla(root, &["clone", "web", "web2"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = isla(root, &["delete", "web"]);
    assert!(!o.status.success() && text(&o.stderr).contains("linked clone"), "{}", text(&o.stderr));
    assert!(isla(root, &["delete", "web2"]).status.success());
    assert!(isla(root, &["delete", "web"]).status.success());
    assert!(disk.exists(), "a disk outside the VM directory stays");
}

#[test]
fn user_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let o = isla(root, &["create", "a", "--disk", "/nonexistent/x.qcow2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("disks[0].path: /nonexistent/x.qcow2"), "{}", text(&o.stderr));
    let o = isla(root, &["create", "a", "--cdrom", "/nonexistent/d.iso"]);
    assert!(text(&o.stderr).contains("cdrom.path: /nonexistent/d.iso"), "{}", text(&o.stderr));
    let o = isla(root, &["create", "a", "--cdrom", "/dev/null", "--memory", "8M"]);
    assert!(text(&o.stderr).contains("memory_mib: 8 MiB is out of range"), "{}", text(&o.stderr));
    let o = isla(root, &["create", "a", "--kernel", "/etc/hostname", "--nic", "bridge=br0"]);
    assert!(text(&o.stderr).contains("--nic bridge=br0: start with tap=IFNAME or user"), "{}", text(&o.stderr));
    let o = isla(root, &["start", "ghost"]);
    assert!(text(&o.stderr).contains("no VM named `ghost`"), "{}", text(&o.stderr));
}
