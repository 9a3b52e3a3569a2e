//! Real containers on a busybox root file system (needs root): lifecycle, limits, isolation,
//! security settings and bad bundles. Run one after another on the main thread (see Cargo.toml).

use std::path::{Path, PathBuf};
use std::time::Duration;

use isla_container::cgroups::CgroupDriver;
use isla_container::testutil::TestBundle;
use isla_container::{CreateOptions, ExecOptions, Runtime, Signal, Status};
use serde_json::{json, Value};

type TestResult = Result<(), String>;

/// A runtime with its own state directory and a bundle whose /out is a host directory.
struct Env {
    rt: Runtime,
    bundle: TestBundle,
    spec: Value,
    id: String,
}

fn env(name: &str, script: &str) -> Env {
    let base = std::env::temp_dir().join(format!("isla-ct-{}", std::process::id()));
    std::fs::create_dir_all(&base).expect("temp dir");
    let rt = Runtime::new(base.join("state")).expect("runtime");
    let bundle = TestBundle::new(&base, name, &["/bin/sh", "-c", script])
        .expect("busybox bundle (is busybox-static installed?)");
    std::fs::create_dir_all(bundle.dir.join("out")).expect("out dir");
    let mut spec = serde_json::to_value(&bundle.spec).expect("spec");
    spec["mounts"].as_array_mut().expect("mounts").push(json!({
        "destination": "/out", "type": "bind", "source": bundle.dir.join("out"), "options": ["rbind", "rw"]
    }));
    Env { rt, bundle, spec, id: format!("{name}-{}", std::process::id()) }
}

impl Env {
    fn write(&self) {
        std::fs::write(self.bundle.dir.join("config.json"), serde_json::to_vec_pretty(&self.spec).expect("json"))
            .expect("config.json");
    }
    fn run(&self) -> Result<i32, String> {
        self.write();
        self.rt.run(&self.id, &self.bundle.dir, &CreateOptions::default()).map_err(|e| e.to_string())
    }
    fn out(&self, file: &str) -> String {
        std::fs::read_to_string(self.bundle.dir.join("out").join(file)).unwrap_or_default()
    }
    /// create + start, then wait for the init (our child) to end.
    fn run_created(&self) -> Result<(i32, isla_container::Container), String> {
        self.write();
        let mut c = self.rt.create(&self.id, &self.bundle.dir, &CreateOptions::default()).map_err(|e| e.to_string())?;
        c.start().map_err(|e| e.to_string())?;
        let code = match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(c.pid()), None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => code,
            Ok(nix::sys::wait::WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
            other => return Err(format!("wait: {other:?}")),
        };
        Ok((code, c))
    }
}

fn check(cond: bool, what: impl Into<String>) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(what.into())
    }
}

/// Directories a container's cgroup would occupy in the v1 pids and memory hierarchies.
fn v1_cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut dirs = Vec::new();
    for ctrl in ["pids", "memory"] {
        let mine = own.lines().find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, c, p) = (it.next()?, it.next()?, it.next()?);
            (c == ctrl).then(|| p.to_string())
        });
        if let Some(p) = mine {
            dirs.push(Path::new("/sys/fs/cgroup").join(ctrl).join(p.trim_start_matches('/')).join("isla").join(id));
        }
    }
    dirs
}

fn exit_codes_pass_through() -> TestResult {
    let e = env("exit", "exit 42");
    check(e.run()? == 42, "exit 42 should give 42")?;
    let e = env("exit0", "true");
    check(e.run()? == 0, "true should give 0")
}

fn sees_only_its_own_pids_hostname_mounts_and_network() -> TestResult {
    let mut e = env(
        "iso",
        "ps -o pid,comm > /out/ps; hostname > /out/host; cat /proc/mounts > /out/mounts; ls /sys/class/net > /out/net",
    );
    e.spec["hostname"] = json!("inside");
    check(e.run()? == 0, "script failed")?;
    let ps = e.out("ps");
    let pids: Vec<&str> = ps.lines().skip(1).map(|l| l.split_whitespace().next().unwrap_or("")).collect();
    check(pids.first() == Some(&"1") && pids.len() <= 2, format!("ps shows other processes: {ps}"))?;
    check(e.out("host").trim() == "inside", format!("hostname: {}", e.out("host")))?;
    let mounts = e.out("mounts");
    check(
        !mounts.contains("/work") && mounts.lines().any(|l| l.split(' ').nth(1) == Some("/")),
        format!("mounts: {mounts}"),
    )?;
    check(e.out("net").split_whitespace().collect::<Vec<_>>() == ["lo"], format!("network devices: {}", e.out("net")))
}

fn spec_devices_are_created_and_allowed() -> TestResult {
    // /dev/fuse (c 10:229): made by mknod in the container's /dev and allowed by its device cgroup.
    let mut e = env("devices", "ls -l /dev/fuse > /out/ls; head -c 0 /dev/fuse 2> /out/err; echo $? > /out/rc");
    e.spec["linux"]["devices"] =
        json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438}]);
    check(e.run()? == 0, "script failed")?;
    check(e.out("ls").starts_with("crw-rw-rw-") && e.out("ls").contains("10,"), format!("ls: {}", e.out("ls")))?;
    check(!e.out("err").contains("Operation not permitted"), format!("the device cgroup refused it: {}", e.out("err")))
}

fn read_only_root_refuses_writes() -> TestResult {
    let mut e = env("ro", "touch /newfile 2> /out/err; echo $? > /out/rc");
    e.spec["root"]["readonly"] = json!(true);
    e.run()?;
    check(e.out("rc").trim() != "0", "touch on a read-only root succeeded")?;
    check(e.out("err").contains("Read-only file system"), format!("error: {}", e.out("err")))?;
    check(!e.bundle.dir.join("rootfs/newfile").exists(), "the file appeared in the rootfs")
}

fn dropped_capabilities_stop_privileged_calls() -> TestResult {
    // The default set (AUDIT_WRITE, KILL, NET_BIND_SERVICE): no CHOWN, no SYS_ADMIN.
    let e = env("caps", "touch /tmp/f; chown 1 /tmp/f 2> /out/chown; echo $? >> /out/chown; hostname x 2> /out/host; echo $? >> /out/host; grep CapEff /proc/self/status > /out/eff");
    e.run()?;
    check(e.out("chown").contains("Operation not permitted"), format!("chown without CAP_CHOWN: {}", e.out("chown")))?;
    check(e.out("host").trim_end().ends_with('1'), format!("sethostname without CAP_SYS_ADMIN: {}", e.out("host")))?;
    check(e.out("eff").contains("0000000020000420"), format!("effective set: {}", e.out("eff")))?;
    let mut e = env("caps2", "touch /tmp/f; chown 1 /tmp/f; echo $? > /out/chown");
    for set in ["bounding", "effective", "permitted"] {
        e.spec["process"]["capabilities"][set].as_array_mut().ok_or("caps")?.push(json!("CAP_CHOWN"));
    }
    e.run()?;
    check(e.out("chown").trim() == "0", format!("chown with CAP_CHOWN: {}", e.out("chown")))
}

fn seccomp_denies_a_blocked_syscall() -> TestResult {
    let mut e = env("seccomp", "mkdir /tmp/d 2> /out/err; echo $? > /out/rc; echo alive > /out/alive");
    e.spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    e.run()?;
    check(
        e.out("rc").trim() == "1" && e.out("err").contains("Operation not permitted"),
        format!("mkdir: {} {}", e.out("rc"), e.out("err")),
    )?;
    check(e.out("alive").trim() == "alive", "other system calls were blocked too")
}

fn memory_limit_oom_kills() -> TestResult {
    let mut e = env("oom", "dd if=/dev/zero of=/dev/null bs=64M count=1");
    e.spec["linux"]["resources"]["memory"] = json!({"limit": 16 * 1024 * 1024, "swap": 16 * 1024 * 1024});
    let (code, c) = e.run_created()?;
    let stats = c.stats().map_err(|e| e.to_string())?;
    c.delete(true).map_err(|e| e.to_string())?;
    check(code == 137, format!("dd under a 16 MiB limit ended with {code}, expected 137 (SIGKILL)"))?;
    check(stats.memory.oom_kill >= 1, format!("no OOM kill counted: {stats:?}"))
}

fn pids_limit_stops_a_fork_bomb() -> TestResult {
    let mut e = env("pids", "(i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done) 2> /out/err; cat /sys/fs/cgroup/pids/pids.current > /out/cur");
    e.spec["linux"]["resources"]["pids"] = json!({"limit": 8});
    e.spec["linux"]["namespaces"].as_array_mut().ok_or("ns")?.push(json!({"type": "cgroup"}));
    let code = e.run()?;
    check(code == 0, format!("script ended with {code}"))?;
    check(
        e.out("err").contains("can't fork") || e.out("err").contains("Resource temporarily unavailable"),
        format!("forks were not refused: {}", e.out("err")),
    )?;
    let cur: u32 = e.out("cur").trim().parse().map_err(|_| format!("pids.current: {:?}", e.out("cur")))?;
    check(cur <= 8, format!("pids.current {cur} above the limit"))
}

fn cpu_quota_throttles() -> TestResult {
    let mut e = env("cpu", "timeout -s KILL 1 sh -c 'while :; do :; done'; true");
    e.spec["linux"]["resources"]["cpu"] = json!({"quota": 10000, "period": 100000});
    let (code, c) = e.run_created()?;
    let stats = c.stats().map_err(|e| e.to_string())?;
    c.delete(true).map_err(|e| e.to_string())?;
    check(code == 0, format!("exit {code}"))?;
    check(
        stats.cpu.throttling.throttled_periods > 0 && stats.cpu.throttling.throttled_time > 0,
        format!("not throttled: {stats:?}"),
    )
}

fn lifecycle_follows_the_spec() -> TestResult {
    let e = env("life", "trap 'exit 3' TERM; echo started > /out/started; while :; do sleep 1; done");
    e.write();
    let mut c = e.rt.create(&e.id, &e.bundle.dir, &CreateOptions::default()).map_err(|e| e.to_string())?;
    check(c.state().map_err(|e| e.to_string())?.status == Status::Created, "not created")?;
    check(e.out("started").is_empty(), "the process ran before start")?;
    check(c.pid() > 0 && Path::new(&format!("/proc/{}", c.pid())).exists(), "no init process")?;
    check(
        e.rt.create(&e.id, &e.bundle.dir, &CreateOptions::default())
            .is_err_and(|x| x.to_string().contains("already exists")),
        "duplicate id accepted",
    )?;
    c.start().map_err(|e| e.to_string())?;
    let c = e.rt.load(&e.id).map_err(|e| e.to_string())?;
    check(c.state().map_err(|e| e.to_string())?.status == Status::Running, "not running after start")?;
    let refused = e.rt.load(&e.id).map_err(|e| e.to_string())?.delete(false);
    check(
        refused.is_err_and(|x| x.to_string().contains("--force")),
        "delete of a running container without force succeeded",
    )?;
    for _ in 0..500 {
        if !e.out("started").is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let code = e.rt.load(&e.id).map_err(|e| e.to_string())?;
    let pids = code.ps().map_err(|e| e.to_string())?;
    check(pids.contains(&code.pid()), format!("ps {pids:?} lacks the init {}", code.pid()))?;
    code.pause().map_err(|e| e.to_string())?;
    check(code.status() == Status::Paused, "not paused")?;
    code.resume().map_err(|e| e.to_string())?;
    check(code.status() == Status::Running, "not resumed")?;
    let x = code
        .exec(&exec_process(&code, "hostname > /out/exec; exit 5"), &ExecOptions::default())
        .map_err(|e| e.to_string())?;
    check(x == 5 && e.out("exec").trim() == "isla", format!("exec gave {x}, output {:?}", e.out("exec")))?;
    code.kill(Signal::SIGTERM, false).map_err(|e| e.to_string())?;
    let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(code.pid()), None).map_err(|e| e.to_string())?;
    check(matches!(st, nix::sys::wait::WaitStatus::Exited(_, 3)), format!("after SIGTERM: {st:?}"))?;
    check(code.status() == Status::Stopped, "not stopped")?;
    check(code.kill(Signal::SIGTERM, false).is_err(), "kill of a stopped container succeeded")?;
    code.delete(false).map_err(|e| e.to_string())?;
    check(matches!(e.rt.load(&e.id), Err(isla_container::Error::NotFound(_))), "state remains after delete")?;
    check(v1_cgroup_dirs(&e.id).iter().all(|d| !d.exists()), "cgroup remains after delete")
}

fn exec_process(c: &isla_container::Container, script: &str) -> isla_container::Process {
    let mut p = c.spec().process().clone().unwrap_or_default();
    p.set_args(Some(vec!["/bin/sh".into(), "-c".into(), script.into()]));
    p
}

fn user_namespace_maps_ids() -> TestResult {
    let mut e = env("userns", "id -u > /out/id; cat /proc/self/uid_map > /out/map");
    let out = std::process::Command::new("chown")
        .args(["-R", "-h", "200000:200000"])
        .arg(&e.bundle.dir)
        .status()
        .map_err(|x| x.to_string())?;
    check(out.success(), "chown of the bundle")?;
    e.spec["linux"]["namespaces"].as_array_mut().ok_or("ns")?.push(json!({"type": "user"}));
    e.spec["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    e.spec["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    let code = e.run()?;
    check(code == 0, format!("exit {code}"))?;
    check(e.out("id").trim() == "0", format!("id -u: {}", e.out("id")))?;
    check(
        e.out("map").split_whitespace().collect::<Vec<_>>() == ["0", "200000", "65536"],
        format!("uid_map: {}", e.out("map")),
    )
}

fn cgroup_v2_in_a_cgroup_namespace() -> TestResult {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let root = if unified.exists() { unified } else { Path::new("/sys/fs/cgroup") };
    let mut e = env("v2", "cat /proc/self/cgroup > /out/cg; ls /sys/fs/cgroup > /out/ls; sleep 30");
    e.rt.cgroup_driver = CgroupDriver::V2(root.into());
    e.spec["linux"]["namespaces"].as_array_mut().ok_or("ns")?.push(json!({"type": "cgroup"}));
    let hp = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default().contains("hugetlb");
    if hp {
        e.spec["linux"]["resources"]["hugepageLimits"] = json!([{"pageSize": "2MB", "limit": 0}]);
    }
    e.write();
    let mut c = e.rt.create(&e.id, &e.bundle.dir, &CreateOptions::default()).map_err(|e| e.to_string())?;
    c.start().map_err(|e| e.to_string())?;
    for _ in 0..500 {
        if !e.out("ls").is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let dir = root.join("isla").join(&e.id);
    let result = (|| {
        check(dir.join("cgroup.procs").exists(), format!("{} missing", dir.display()))?;
        check(c.ps().map_err(|e| e.to_string())?.contains(&c.pid()), "init not in the v2 cgroup")?;
        check(e.out("cg").lines().any(|l| l == "0::/"), format!("the container sees {:?}", e.out("cg")))?;
        check(e.out("ls").contains("cgroup.procs"), format!("no cgroup2 mount inside: {}", e.out("ls")))?;
        if hp {
            check(
                std::fs::read_to_string(dir.join("hugetlb.2MB.max")).unwrap_or_default().trim() == "0",
                "hugetlb.2MB.max not set",
            )?;
        }
        c.pause().map_err(|e| e.to_string())?;
        check(c.status() == Status::Paused, "not frozen")?;
        c.resume().map_err(|e| e.to_string())
    })();
    c.delete(true).map_err(|e| e.to_string())?;
    result?;
    check(!dir.exists(), "v2 cgroup remains")?;
    // A controller the hierarchy lacks is refused by name, before anything is left behind.
    let mut e = env("v2mem", "true");
    e.rt.cgroup_driver = CgroupDriver::V2(root.into());
    e.spec["linux"]["resources"]["memory"] = json!({"limit": 64 * 1024 * 1024});
    if std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default().contains("memory") {
        return Ok(());
    }
    let err = e.run().err().unwrap_or_default();
    check(err.contains("'memory' controller is not available"), format!("error: {err}"))?;
    check(!root.join("isla").join(&e.id).exists(), "cgroup left behind")
}

/// A bad-bundle case: name, how to spoil the spec, what the error must say.
type Case = (&'static str, Box<dyn Fn(&mut Env)>, &'static str);

fn bad_bundles_get_clear_errors_and_leave_nothing() -> TestResult {
    let cases: Vec<Case> = vec![
        ("nocfg", Box::new(|e: &mut Env| e.spec = Value::Null), "no config.json"),
        ("badjson", Box::new(|e: &mut Env| e.spec = json!("{ not json")), "not a valid runtime spec"),
        ("version", Box::new(|e: &mut Env| e.spec["ociVersion"] = json!("2.0.0")), "isla implements 1.x"),
        ("norootfs", Box::new(|e: &mut Env| e.spec["root"]["path"] = json!("missing")), "root.path"),
        ("mem", Box::new(|e: &mut Env| e.spec["linux"]["resources"]["memory"] = json!({"limit": 100})), "too small"),
        (
            "quota",
            Box::new(|e: &mut Env| e.spec["linux"]["resources"]["cpu"] = json!({"quota": 10, "period": 100000})),
            "at least 1000",
        ),
        ("cpuset", Box::new(|e: &mut Env| e.spec["linux"]["resources"]["cpu"] = json!({"cpus": "999"})), "cpuset.cpus"),
        ("exe", Box::new(|e: &mut Env| e.spec["process"]["args"] = json!(["/no/such/program"])), "process.args[0]"),
    ];
    for (name, edit, want) in cases {
        let mut e = env(name, "true");
        edit(&mut e);
        match &e.spec {
            Value::Null => {}
            Value::String(s) => std::fs::write(e.bundle.dir.join("config.json"), s).map_err(|x| x.to_string())?,
            _ => e.write(),
        }
        let r = e.rt.create(&e.id, &e.bundle.dir, &CreateOptions::default());
        let msg = match r {
            Ok(c) => {
                let _ = c.delete(true);
                String::new()
            }
            Err(err) => err.to_string(),
        };
        // A bad executable is only found at exec time: a created container then fails at start.
        let msg = if name == "exe" { run_error(&e) } else { msg };
        check(msg.contains(want), format!("{name}: expected an error with {want:?}, got {msg:?}"))?;
        check(!e.rt.root().join(&e.id).exists(), format!("{name}: state directory left behind"))?;
        check(v1_cgroup_dirs(&e.id).iter().all(|d| !d.exists()), format!("{name}: cgroup left behind"))?;
    }
    Ok(())
}

fn run_error(e: &Env) -> String {
    e.rt.run(&e.id, &e.bundle.dir, &CreateOptions::default()).err().map(|x| x.to_string()).unwrap_or_default()
}

fn hooks_get_the_state() -> TestResult {
    let mut e = env("hooks", "true");
    let out = e.bundle.dir.join("out");
    e.spec["hooks"] = json!({
        "createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}/create.json", out.display())]}],
        "poststop": [{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}/stop.json", out.display())]}],
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "cat > /out/start.json"]}]
    });
    check(e.run()? == 0, "run")?;
    let created: Value = serde_json::from_str(&e.out("create.json"))
        .map_err(|x| format!("createRuntime state: {x}: {:?}", e.out("create.json")))?;
    check(
        created["id"] == json!(e.id) && created["pid"].as_i64().is_some_and(|p| p > 0),
        format!("createRuntime state {created}"),
    )?;
    let started: Value = serde_json::from_str(&e.out("start.json"))
        .map_err(|x| format!("startContainer state: {x}: {:?}", e.out("start.json")))?;
    check(started["pid"] == created["pid"], format!("startContainer state {started}"))?;
    check(e.out("stop.json").contains("\"stopped\""), format!("poststop state {}", e.out("stop.json")))
}

fn terminal_goes_to_the_console_socket() -> TestResult {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut e = env("tty", "[ -t 0 ] && [ -t 1 ] && echo on-a-tty; tty");
    e.spec["process"]["terminal"] = json!(true);
    e.write();
    let sock = e.bundle.dir.join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).map_err(|x| x.to_string())?;
    let opts = CreateOptions { console_socket: Some(sock), ..Default::default() };
    let mut c = e.rt.create(&e.id, &e.bundle.dir, &opts).map_err(|x| x.to_string())?;
    let (conn, _) = listener.accept().map_err(|x| x.to_string())?;
    let mut buf = [0u8; 16];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = nix::sys::socket::recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::empty(),
    )
    .map_err(|x| x.to_string())?;
    let mut master = None;
    for m in msg.cmsgs().map_err(|x| x.to_string())? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = m {
            // SAFETY: the descriptor was just received from the runtime and is owned here.
            master = fds.first().map(|f| unsafe { OwnedFd::from_raw_fd(*f) });
        }
    }
    let master = master.ok_or("no terminal master received")?;
    c.start().map_err(|x| x.to_string())?;
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(c.pid()), None);
    let mut out = String::new();
    let mut f = std::fs::File::from(master);
    let mut chunk = [0u8; 256];
    while let Ok(n) = f.read(&mut chunk) {
        if n == 0 {
            break;
        }
        out.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    c.delete(true).map_err(|x| x.to_string())?;
    check(out.contains("on-a-tty") && out.contains("/dev/pts/0"), format!("terminal output: {out:?}"))
}

fn joins_namespaces_by_path_and_runs_without_pivot_root() -> TestResult {
    let mut a = env("nsa", "sleep 30");
    a.spec["hostname"] = json!("first");
    a.write();
    let mut ca = a.rt.create(&a.id, &a.bundle.dir, &CreateOptions::default()).map_err(|x| x.to_string())?;
    ca.start().map_err(|x| x.to_string())?;
    let mut b = env("nsb", "hostname > /out/host");
    for ns in b.spec["linux"]["namespaces"].as_array_mut().ok_or("ns")? {
        if ns["type"] == "uts" {
            ns["path"] = json!(format!("/proc/{}/ns/uts", ca.pid()));
        }
    }
    b.spec["hostname"] = Value::Null;
    b.write();
    let opts = CreateOptions { no_pivot: true, ..Default::default() };
    let code = b.rt.run(&b.id, &b.bundle.dir, &opts).map_err(|x| x.to_string());
    ca.delete(true).map_err(|x| x.to_string())?;
    check(code? == 0, "second container failed")?;
    check(b.out("host").trim() == "first", format!("joined uts namespace shows {:?}", b.out("host")))
}

type Test = (&'static str, fn() -> TestResult);

fn main() -> std::process::ExitCode {
    let tests: &[Test] = &[
        ("exit_codes_pass_through", exit_codes_pass_through),
        ("sees_only_its_own_pids_hostname_mounts_and_network", sees_only_its_own_pids_hostname_mounts_and_network),
        ("read_only_root_refuses_writes", read_only_root_refuses_writes),
        ("spec_devices_are_created_and_allowed", spec_devices_are_created_and_allowed),
        ("dropped_capabilities_stop_privileged_calls", dropped_capabilities_stop_privileged_calls),
        ("seccomp_denies_a_blocked_syscall", seccomp_denies_a_blocked_syscall),
        ("memory_limit_oom_kills", memory_limit_oom_kills),
        ("pids_limit_stops_a_fork_bomb", pids_limit_stops_a_fork_bomb),
        ("cpu_quota_throttles", cpu_quota_throttles),
        ("lifecycle_follows_the_spec", lifecycle_follows_the_spec),
        ("user_namespace_maps_ids", user_namespace_maps_ids),
        ("cgroup_v2_in_a_cgroup_namespace", cgroup_v2_in_a_cgroup_namespace),
        ("bad_bundles_get_clear_errors_and_leave_nothing", bad_bundles_get_clear_errors_and_leave_nothing),
        ("hooks_get_the_state", hooks_get_the_state),
        ("terminal_goes_to_the_console_socket", terminal_goes_to_the_console_socket),
        ("joins_namespaces_by_path_and_runs_without_pivot_root", joins_namespaces_by_path_and_runs_without_pivot_root),
    ];
    // Name filters as with libtest; options (and bare numbers such as a --test-threads value) are
    // not filters.
    let filter: Vec<String> =
        std::env::args().skip(1).filter(|a| !a.starts_with('-') && !a.chars().all(|c| c.is_ascii_digit())).collect();
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return std::process::ExitCode::SUCCESS;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("these tests create real containers and need root");
        return std::process::ExitCode::FAILURE;
    }
    let (mut passed, mut failed) = (0, 0);
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|p| name.contains(p.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    for (name, f) in selected.iter().copied() {
        let r = std::panic::catch_unwind(f).unwrap_or_else(|_| Err("panicked".into()));
        match r {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED\n    {e}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("isla-ct-{}", std::process::id())));
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    let filtered = tests.len() - passed - failed;
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out\n"
    );
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
