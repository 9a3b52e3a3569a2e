//! `isla disk` end to end, with qemu-img on the same files (needs qemu-utils).

use std::path::{Path, PathBuf};
use std::process::Command;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(name: &str) -> Dir {
    let p = std::env::temp_dir().join(format!("isla-cli-disk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Dir(p)
}

/// Runs a program in `cwd`; returns (exit code, stdout, stderr).
fn run(cwd: &Path, prog: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(prog).current_dir(cwd).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn isla(cwd: &Path, args: &[&str]) -> String {
    let mut all = vec!["disk"];
    all.extend_from_slice(args);
    let (code, out, err) = run(cwd, env!("CARGO_BIN_EXE_isla"), &all);
    assert_eq!(code, 0, "isla disk {args:?} failed: {err}");
    out
}

#[test]
fn qemu_img_conventions() {
    let d = dir("conv");
    let cwd = d.0.as_path();
    isla(cwd, &["create", "-f", "qcow2", "-o", "cluster_size=4k", "base.qcow2", "8M"]);
    let (code, _, err) = run(cwd, "qemu-io", &["-c", "write -P 0x61 0 1M", "base.qcow2"]);
    assert_eq!(code, 0, "{err}");
    isla(cwd, &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    let info: serde_json::Value = serde_json::from_str(&isla(cwd, &["info", "--output", "json", "top.qcow2"])).unwrap();
    assert_eq!(info["virtual-size"], 8 << 20);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
    let qinfo: serde_json::Value =
        serde_json::from_str(&run(cwd, "qemu-img", &["info", "--output=json", "top.qcow2"]).1).unwrap();
    assert_eq!(qinfo["virtual-size"], info["virtual-size"]);
    assert_eq!(qinfo["cluster-size"], info["cluster-size"]);

    isla(cwd, &["snapshot", "-c", "first", "top.qcow2"]);
    assert!(isla(cwd, &["snapshot", "-l", "top.qcow2"]).contains("first"));
    assert!(run(cwd, "qemu-img", &["snapshot", "-l", "top.qcow2"]).1.contains("first"));
    isla(cwd, &["resize", "top.qcow2", "+8M"]);
    assert_eq!(run(cwd, "qemu-img", &["check", "top.qcow2"]).0, 0);
    let check: serde_json::Value =
        serde_json::from_str(&isla(cwd, &["check", "--output", "json", "top.qcow2"])).unwrap();
    assert_eq!(check["corruptions"], 0);
    assert_eq!(check["leaks"], 0);
    let (code, _, err) = run(cwd, env!("CARGO_BIN_EXE_isla"), &["disk", "resize", "top.qcow2", "-1M"]);
    assert_ne!(code, 0);
    assert!(err.contains("--shrink"), "{err}");

    isla(cwd, &["convert", "-O", "raw", "top.qcow2", "flat.raw"]);
    let flat = std::fs::read(cwd.join("flat.raw")).unwrap();
    assert_eq!(flat.len(), 16 << 20);
    assert!(flat[..1 << 20].iter().all(|&b| b == 0x61) && flat[1 << 20..].iter().all(|&b| b == 0));
    assert_eq!(isla(cwd, &["info", "flat.raw"]).lines().nth(1), Some("file format: raw"));

    // check on a raw image is an error with a reason, like qemu-img.
    let (code, _, err) = run(cwd, env!("CARGO_BIN_EXE_isla"), &["disk", "check", "flat.raw"]);
    assert_eq!(code, 1);
    assert!(err.contains("raw images"), "{err}");
}
