//! Helpers shared by the integration tests: the isla binary, the guest kit, and the rule that
//! tests needing KVM fail (not skip) when ISLA_REQUIRE_KVM=1, as in CI.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn isla() -> Command {
    Command::new(env!("CARGO_BIN_EXE_isla"))
}

pub struct Kit {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub nested_vmlinux: PathBuf,
    pub nested_bzimage: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

/// The guest kit and /dev/kvm, or None when they are missing and not required.
pub fn kvm_and_kit() -> Option<Kit> {
    let required = std::env::var("ISLA_REQUIRE_KVM").is_ok_and(|v| v == "1");
    let kvm = Path::new("/dev/kvm").exists();
    let out = isla().args(["guest", "path"]).output().expect("run isla");
    let kit = String::from_utf8_lossy(&out.stdout).to_string();
    let get = |k: &str| kit.lines().find_map(|l| l.strip_prefix(k)).map(|v| PathBuf::from(v.trim()));
    match (kvm, out.status.success()) {
        (true, true) => Some(Kit {
            vmlinux: get("vmlinux").unwrap(),
            bzimage: get("bzImage").unwrap(),
            nested_vmlinux: get("nested-vmlinux").unwrap(),
            nested_bzimage: get("nested-bzImage").unwrap(),
            initramfs: get("initramfs").unwrap(),
            rootfs: get("rootfs").unwrap(),
        }),
        _ if required => {
            panic!("ISLA_REQUIRE_KVM=1 but /dev/kvm present={kvm}, guest kit: {}", String::from_utf8_lossy(&out.stderr))
        }
        _ => {
            eprintln!("skipped: needs /dev/kvm and the guest kit (scripts/test provides both)");
            None
        }
    }
}

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("isla-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Makes network namespace `name` afresh (a leftover of a crashed run is deleted first) with its
/// loopback up; the caller deletes it (`ip netns del`) when done.
pub fn fresh_netns(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).stderr(std::process::Stdio::null()).status();
    assert!(Command::new("ip").args(["netns", "add", name]).status().unwrap().success(), "ip netns add {name}");
    assert!(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]).status().unwrap().success());
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The stdout of an `isla` run that must have succeeded (`args` name it in the failure).
pub fn expect_ok(args: &[&str], o: Output) -> String {
    assert!(o.status.success(), "isla {args:?}: {:?}\n{}", o.status, stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The stderr of an `isla` run that must have failed.
pub fn expect_failure(args: &[&str], o: Output) -> String {
    assert!(!o.status.success(), "isla {args:?} succeeded: {}", String::from_utf8_lossy(&o.stdout));
    stderr(&o)
}
