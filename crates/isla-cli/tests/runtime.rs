//! `isla runtime` from the outside: the runc command line through the `isla-runc` name, and
//! containerd driving it with `ctr run --runc-binary` (needs root, busybox-static, containerd).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use isla_container::testutil::TestBundle;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("isla-rt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A symbolic link named isla-runc to the isla binary in `dir`.
fn isla_runc(dir: &Path) -> PathBuf {
    let link = dir.join("isla-runc");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_isla"), &link).expect("symlink");
    link
}

fn runc(bin: &Path, root: &Path, args: &[&str]) -> Output {
    Command::new(bin).arg("--root").arg(root).args(args).output().expect("isla-runc")
}

/// `create` leaves the init holding its stdio: give it none, so nothing waits for EOF.
fn runc_create(bin: &Path, root: &Path, args: &[&str]) -> std::process::ExitStatus {
    Command::new(bin)
        .arg("--root")
        .arg(root)
        .arg("create")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("isla-runc")
}

#[test]
fn runc_command_line_lifecycle() {
    let s = Scratch::new("cli");
    let bin = isla_runc(&s.0);
    let root = s.0.join("state");
    let bundle = TestBundle::new(&s.0, "bundle", &["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"])
        .expect("bundle");
    bundle.write().expect("config.json");
    let b = bundle.dir.to_str().expect("utf-8 path");
    // Ids name cgroups too, which every state root shares: keep them unique per test run.
    let id = format!("c1-{}", std::process::id());
    let id = id.as_str();
    let pid_file = s.0.join("pid");
    assert!(
        runc_create(&bin, &root, &["--bundle", b, "--pid-file", pid_file.to_str().expect("path"), id]).success(),
        "create"
    );
    let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid file").trim().parse().expect("pid");
    let state: serde_json::Value =
        serde_json::from_slice(&runc(&bin, &root, &["state", id]).stdout).expect("state JSON");
    assert_eq!(state["status"], "created");
    assert_eq!(state["pid"], pid);
    assert!(runc(&bin, &root, &["start", id]).status.success());
    let state: serde_json::Value =
        serde_json::from_slice(&runc(&bin, &root, &["state", id]).stdout).expect("state JSON");
    assert_eq!(state["status"], "running");
    let ps: Vec<i32> =
        serde_json::from_slice(&runc(&bin, &root, &["ps", "--format", "json", id]).stdout).expect("ps JSON");
    assert!(ps.contains(&pid), "ps {ps:?}");
    let ex = runc(&bin, &root, &["exec", id, "sh", "-c", "exit 4"]);
    assert_eq!(ex.status.code(), Some(4), "exec: {}", String::from_utf8_lossy(&ex.stderr));
    let stats = runc(&bin, &root, &["events", "--stats", id]);
    let ev: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("events JSON");
    assert!(ev["data"]["pids"]["current"].as_u64().is_some_and(|n| n >= 1), "{ev}");
    let busy = runc(&bin, &root, &["delete", id]);
    assert!(!busy.status.success() && String::from_utf8_lossy(&busy.stderr).contains("--force"));
    assert!(runc(&bin, &root, &["kill", id, "KILL"]).status.success());
    // The init was reparented when `create` exited; wait until the kernel has it gone.
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
        && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let state: serde_json::Value =
        serde_json::from_slice(&runc(&bin, &root, &["state", id]).stdout).expect("state JSON");
    assert_eq!(state["status"], "stopped");
    assert!(runc(&bin, &root, &["delete", id]).status.success());
    let gone = runc(&bin, &root, &["state", id]);
    assert!(!gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("does not exist"));
}

#[test]
fn run_passes_the_exit_code_and_logs_errors_as_json() {
    let s = Scratch::new("run");
    let bundle = TestBundle::new(&s.0, "bundle", &["/bin/sh", "-c", "exit 9"]).expect("bundle");
    bundle.write().expect("config.json");
    let root = s.0.join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_isla"))
        .args(["runtime", "--root"])
        .arg(&root)
        .args(["run", "--bundle"])
        .arg(&bundle.dir)
        .arg("r1")
        .output()
        .expect("isla");
    assert_eq!(out.status.code(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
    let log = s.0.join("log.json");
    let out = Command::new(env!("CARGO_BIN_EXE_isla"))
        .args(["runtime", "--root"])
        .arg(&root)
        .arg("--log")
        .arg(&log)
        .args(["--log-format", "json", "run", "--bundle"])
        .arg(s.0.join("nowhere"))
        .arg("r2")
        .output()
        .expect("isla");
    assert_eq!(out.status.code(), Some(1));
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&log).expect("log").trim()).expect("JSON log line");
    assert_eq!(line["level"], "error");
    assert!(line["msg"].as_str().is_some_and(|m| m.contains("bundle directory")), "{line}");
}

/// Write an OCI image layout tarball of `rootfs` named `name` (the layer uncompressed).
fn oci_image(dir: &Path, rootfs: &Path, name: &str) -> PathBuf {
    let img = dir.join("img");
    let blobs = img.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let sha = |p: &Path| -> (String, u64) {
        let out = Command::new("sha256sum").arg(p).output().expect("sha256sum");
        let d = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string();
        (d, std::fs::metadata(p).expect("blob").len())
    };
    let put = |tmp: &Path| -> (String, u64) {
        let (d, n) = sha(tmp);
        std::fs::rename(tmp, blobs.join(&d)).expect("blob");
        (d, n)
    };
    let layer = dir.join("layer.tar");
    assert!(Command::new("tar").arg("-C").arg(rootfs).arg("-cf").arg(&layer).arg(".").status().expect("tar").success());
    let (l, ls) = put(&layer);
    let write = |file: &str, v: serde_json::Value| -> (String, u64) {
        let p = dir.join(file);
        std::fs::write(&p, v.to_string()).expect("json blob");
        put(&p)
    };
    let (c, cs) = write(
        "config",
        serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{l}")]}}),
    );
    let (m, ms) = write(
        "manifest",
        serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{c}"), "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{l}"), "size": ls}]}),
    );
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{m}"), "size": ms,
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "test"}}]});
    std::fs::write(img.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(img.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let tar = dir.join("image.tar");
    assert!(Command::new("tar").arg("-C").arg(&img).arg("-cf").arg(&tar).arg(".").status().expect("tar").success());
    tar
}

/// containerd on its own root, state and socket, stopped on drop.
struct Containerd {
    child: Child,
    sock: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctr(d: &Containerd, args: &[&str]) -> Output {
    Command::new("ctr").arg("--address").arg(&d.sock).args(args).output().expect("ctr (install Debian's containerd)")
}

#[test]
fn containerd_runs_a_container_through_ctr() {
    let have = Command::new("containerd").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(have, "containerd is not installed: scripts/setup installs Debian's containerd package");
    let s = Scratch::new("ctd");
    let rootfs = s.0.join("rootfs");
    isla_container::testutil::make_rootfs(&rootfs).expect("busybox rootfs");
    let image = oci_image(&s.0, &rootfs, "docker.io/isla/busybox:test");
    let sock = s.0.join("containerd.sock");
    let config = format!(
        "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = {:?}\n[ttrpc]\n  address = {:?}\n",
        s.0.join("root"),
        s.0.join("run"),
        sock,
        s.0.join("containerd.sock.ttrpc")
    );
    std::fs::write(s.0.join("config.toml"), config).expect("config.toml");
    let log = std::fs::File::create(s.0.join("containerd.log")).expect("log");
    let child = Command::new("containerd")
        .arg("--config")
        .arg(s.0.join("config.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("containerd");
    let d = Containerd { child, sock };
    let t = Instant::now();
    while !ctr(&d, &["version"]).status.success() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "containerd did not come up: {}",
            std::fs::read_to_string(s.0.join("containerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let imp = ctr(&d, &["images", "import", image.to_str().expect("path")]);
    assert!(imp.status.success(), "import: {}", String::from_utf8_lossy(&imp.stderr));
    let bin = isla_runc(&s.0);
    let id = format!("ctr-{}", std::process::id());
    let run = ctr(
        &d,
        &[
            "run",
            "--rm",
            "--runc-binary",
            bin.to_str().expect("path"),
            "docker.io/isla/busybox:test",
            &id,
            "/bin/sh",
            "-c",
            "echo hello from ctr; ps -o pid | wc -l; exit 3",
        ],
    );
    let out = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(3), "ctr run: {out} {}", String::from_utf8_lossy(&run.stderr));
    assert!(out.contains("hello from ctr"), "{out}");
    let left = ctr(&d, &["containers", "ls", "-q"]);
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "containers left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

#[test]
fn rootless_run_as_an_unprivileged_user() {
    // uid 65534 (nobody) runs the runtime: a user namespace maps it to root, no cgroup is made.
    let s = Scratch::new("rootless");
    let rootfs = s.0.join("bundle/rootfs");
    isla_container::testutil::make_rootfs(&rootfs).expect("busybox rootfs");
    assert!(Command::new("chown").args(["-R", "65534:65534"]).arg(&s.0).status().expect("chown").success());
    let as_nobody = |args: &[&str]| -> Output {
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", env!("CARGO_BIN_EXE_isla"), "runtime"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("setpriv (util-linux)")
    };
    let bundle = s.0.join("bundle");
    let b = bundle.to_str().expect("path");
    let spec = as_nobody(&["spec", "--rootless", "--bundle", b]);
    assert!(spec.status.success(), "spec --rootless: {}", String::from_utf8_lossy(&spec.stderr));
    let path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("config.json")).expect("JSON");
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["/bin/sh", "-c", "id -u; cat /proc/self/uid_map; exit 6"]);
    std::fs::write(&path, cfg.to_string()).expect("config.json");
    let root = s.0.join("state");
    let run = as_nobody(&[
        "--root",
        root.to_str().expect("path"),
        "run",
        "--bundle",
        b,
        &format!("rl-{}", std::process::id()),
    ]);
    let out = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(6), "{out} {}", String::from_utf8_lossy(&run.stderr));
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines, [vec!["0"], vec!["0", "65534", "1"]], "{out}");
}
