//! Real guests: the guest-kit kernel boots on isla's monitor until the kernel runs init.
//! On nested (PVM) hosts the guest kernel is emulated and, with the standard kernel, init's first
//! system call does not reach the kernel (docs/nested-kvm.md): those tests stop at the kernel
//! handing over to init. The `auto` flavour (the nested kernel there) runs init to power-off.

mod common;
use common::*;
use serde_json::Value;

fn boot(
    kernel: Option<&std::path::Path>,
    initrd: &std::path::Path,
    cpus: u8,
    stop_on: Option<&str>,
    name: &str,
) -> (i32, String, Value) {
    let console = tmp(&format!("{name}.console"));
    let report = tmp(&format!("{name}.json"));
    let mut cmd = isla();
    cmd.args(["vm", "run", "--cpus", &cpus.to_string(), "--memory", "128M"]);
    match kernel {
        Some(k) => cmd.arg("--kernel").arg(k),
        None => cmd.args(["--flavour", "auto"]),
    };
    cmd.arg("--initrd")
        .arg(initrd)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .arg("--report")
        .arg(&report);
    if let Some(s) = stop_on {
        cmd.args(["--stop-on-console", s]);
    }
    let o = cmd.output().unwrap();
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap_or_else(|_| panic!("no report: {err}"))).unwrap();
    eprintln!("{err}");
    (o.status.code().unwrap_or(-1), console, report)
}

#[test]
fn elf_vmlinux_with_two_vcpus_reaches_init() {
    let Some(kit) = kvm_and_kit() else { return };
    let (code, console, report) = boot(Some(&kit.vmlinux), &kit.initramfs, 2, None, "elf2");
    assert!(console.contains("Run /init as init process"), "console:\n{console}");
    assert!(console.contains("smpboot: Total of 2 processors activated"), "console:\n{console}");
    assert!(console.contains("ACPI: Interpreter enabled"), "the guest did not load isla's ACPI tables:\n{console}");
    assert!(!console.contains("ACPI Error"), "{console}");
    // Either init ran to poweroff (hardware KVM), or init died at the nested host's syscall wall,
    // the kernel panicked and panic=1 rebooted through the i8042: both end the monitor cleanly.
    let status = report["exit"]["status"].as_str().unwrap();
    match status {
        "poweroff" => {
            assert_eq!(code, 0);
            assert!(console.contains("isla-init: cpus=2"), "{console}");
        }
        "reboot" => {
            assert_eq!(code, 3);
            assert!(console.contains("Kernel panic"), "{console}");
        }
        _ => panic!("unexpected end {status}: {report}\n{console}"),
    }
    assert_eq!(report["vcpus_stopped"], true);
    assert!(report["phases"]["boot_start_to_init_exec_ms"].as_f64().unwrap() > 0.0);
    assert!(report["memory"]["vmm_overhead_pss_kib"].as_u64().unwrap() > 0);
}

#[test]
fn bzimage_reaches_init_and_stops_cleanly() {
    let Some(kit) = kvm_and_kit() else { return };
    let (code, console, report) = boot(Some(&kit.bzimage), &kit.initramfs, 1, Some("Run /init"), "bz1");
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["exit"]["status"], "stopped");
    assert_eq!(report["kernel_format"], "bzimage");
    assert!(console.contains("Run /init as init process"), "{console}");
    assert!(console.contains("Linux version 6.1"), "{console}");
    assert_eq!(report["vcpus_stopped"], true);
}

#[test]
fn auto_flavour_runs_init_to_the_boot_marker_and_powers_off() {
    let Some(kit) = kvm_and_kit() else { return };
    let (code, console, report) = boot(None, &kit.initramfs, 2, None, "auto2");
    // init ran in user space: it wrote the boot-time marker through /dev/mem and powered off
    // through the ACPI sleep register (ACPI S5).
    assert_eq!(report["exit"]["status"], "poweroff", "{report}\n{console}");
    assert_eq!(report["exit"]["via"], "acpi");
    assert_eq!(code, 0);
    assert!(console.contains("reboot: Power down"), "{console}");
    // init's own output reaches the console through the tty and the UART's interrupt.
    assert!(console.contains("isla-init: started"), "{console}");
    assert!(console.contains("isla-init: cpus=2 "), "the guest's user space sees 2 CPUs:\n{console}");
    assert!(report["milestones"].as_array().unwrap().iter().any(|m| m["name"] == "boot_marker"), "{report}");
    assert!(report["phases"]["boot_start_to_boot_marker_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(report["memory"]["measured_at"], "boot_marker");
    assert!(!console.contains("segfault"), "{console}");
}
