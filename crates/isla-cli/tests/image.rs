//! `isla image` end to end: an import killed with SIGKILL half-way leaves a consistent store
//! that a second import completes; `isla build` and `save`/`load` through the command line.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn isla(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_isla")).arg("image").arg("--root").arg(root).args(args).output().expect("run isla")
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = isla(root, args);
    assert!(out.status.success(), "isla image {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fsck(root: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(root, &["fsck", "--output", "json"])).expect("fsck json")
}

/// A `docker save` archive with one layer of `size` bytes (one file per MiB).
fn big_archive(path: &Path, size: usize) {
    let mut layer = tar::Builder::new(Vec::new());
    for i in 0..size >> 20 {
        let data = vec![(i % 251) as u8; 1 << 20];
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        layer.append_data(&mut h, format!("blob/{i:03}"), &data[..]).expect("append");
    }
    let layer = layer.into_inner().expect("layer");
    let diff = isla_image::digest::of_bytes(&layer).to_string();
    let config = serde_json::to_vec(
        &serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff]}}),
    )
    .expect("json");
    let manifest = serde_json::to_vec(
        &serde_json::json!([{"Config": "c.json", "RepoTags": ["big:1"], "Layers": ["l/layer.tar"]}]),
    )
    .expect("json");
    let mut out = tar::Builder::new(fs::File::create(path).expect("create"));
    for (name, data) in [("c.json", &config), ("l/layer.tar", &layer), ("manifest.json", &manifest)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        out.append_data(&mut h, name, &data[..]).expect("append");
    }
    out.into_inner().expect("finish").flush().expect("flush");
}

#[test]
fn killed_import_leaves_a_consistent_store_and_can_be_redone() {
    let dir = tempfile::Builder::new().prefix("isla-cli-image").tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let archive = dir.path().join("big.tar");
    big_archive(&archive, 48 << 20);

    let mut child = Command::new(env!("CARGO_BIN_EXE_isla"))
        .args(["image", "--root"])
        .arg(&root)
        .args(["load", "-i"])
        .arg(&archive)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn isla image load");
    // Kill it once a staging blob is being written.
    let deadline = Instant::now() + Duration::from_secs(60);
    let staging = root.join("tmp");
    loop {
        let writing = fs::read_dir(&staging)
            .map(|rd| rd.flatten().any(|e| e.metadata().map(|m| m.len() > (1 << 20)).unwrap_or(false)))
            .unwrap_or(false);
        if writing {
            break;
        }
        assert!(child.try_wait().expect("try_wait").is_none(), "the import finished before it could be interrupted");
        assert!(Instant::now() < deadline, "no staging file appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");

    let report = fsck(&root);
    assert_eq!(report["errors"].as_array().map(Vec::len), Some(0), "{report}");
    assert!(!report["leftovers"].as_array().expect("leftovers").is_empty(), "the kill left staging files: {report}");
    assert!(!ok(&root, &["ls"]).contains("big:1"), "a killed import names nothing");

    ok(&root, &["load", "-i", archive.to_str().expect("utf8")]);
    assert!(ok(&root, &["ls"]).contains("big:1"));
    ok(&root, &["fsck", "--repair"]);
    let report = fsck(&root);
    assert_eq!(report["leftovers"].as_array().map(Vec::len), Some(0), "{report}");
    assert_eq!(report["images"], 1);
}

#[test]
fn build_save_load_from_the_command_line() {
    let dir = tempfile::Builder::new().prefix("isla-cli-image").tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let ctx = dir.path().join("ctx");
    fs::create_dir(&ctx).expect("mkdir");
    // RUN runs in a container of isla's runtime: its own PID space (the shell is PID 1), the
    // build's host name, and the runtime's default capability set (not a root shell's full one).
    fs::write(
        ctx.join("Containerfile"),
        "FROM busybox\nRUN [ \"$$\" = 1 ] && [ \"$(hostname)\" = isla-build ] && grep CapBnd /proc/self/status | grep -qv ffffffff && echo built > /built\nCMD [\"cat\", \"/built\"]\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_isla"))
        .arg("build")
        .arg("--root")
        .arg(&root)
        .args(["-t", "cli:1"])
        .arg(&ctx)
        .output()
        .expect("isla build");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ls: serde_json::Value = serde_json::from_str(&ok(&root, &["ls", "--output", "json"])).expect("json");
    assert_eq!(ls.as_array().map(Vec::len), Some(2), "busybox was made on the fly: {ls}");

    let tarball = dir.path().join("cli.tar");
    ok(&root, &["save", "--format", "docker", "-o", tarball.to_str().expect("utf8"), "cli:1"]);
    let other = dir.path().join("other");
    ok(&other, &["load", "-i", tarball.to_str().expect("utf8")]);
    let inspect: serde_json::Value = serde_json::from_str(&ok(&other, &["inspect", "cli:1"])).expect("json");
    assert_eq!(inspect["config"]["config"]["Cmd"], serde_json::json!(["cat", "/built"]));

    // A failing RUN fails the build and says which command and how.
    fs::write(ctx.join("Containerfile"), "FROM busybox\nRUN exit 3\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_isla"))
        .arg("build")
        .arg("--root")
        .arg(&root)
        .arg(&ctx)
        .output()
        .expect("isla build");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("exit 3") && err.contains("status 3"), "{err}");

    let missing = isla(&other, &["inspect", "nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}
