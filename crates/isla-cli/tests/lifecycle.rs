//! `isla create|run|start|stop|...` end to end, as root, with real containers (the built-in
//! busybox image). Every test has its own state root and its own network namespace, which the
//! isla binary joins with `nsenter --net` (its mount namespace stays the machine's, so the
//! overlay mounts of one command are seen by the next, as in real use); bridges, veths and
//! nftables rules live and die with that namespace, and no test traffic leaves it.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A state root and a network namespace; everything is removed on drop, also after a failure.
struct Lab {
    ns: String,
    root: PathBuf,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let ns = format!("islalc{tag}{}", std::process::id());
        common::fresh_netns(&ns);
        let root = common::tmp(&format!("lifecycle-{tag}"));
        let _ = std::fs::remove_dir_all(&root);
        Lab { ns, root }
    }

    fn cmd(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns)).arg(env!("CARGO_BIN_EXE_isla"));
        c.arg(args[0]).arg("--root").arg(&self.root).args(&args[1..]);
        c.envs(env.iter().copied());
        c
    }

    fn isla(&self, args: &[&str]) -> Output {
        self.cmd(args, &[]).output().unwrap()
    }

    /// Runs isla and expects success: its stdout.
    fn ok(&self, args: &[&str]) -> String {
        common::expect_ok(args, self.isla(args))
    }

    /// Runs isla and expects failure: its stderr.
    fn fails(&self, args: &[&str]) -> String {
        common::expect_failure(args, self.isla(args))
    }

    /// A command in the namespace (the "host" of the test).
    fn sh(&self, cmd: &str) -> Output {
        let ns = format!("--net=/run/netns/{}", self.ns);
        Command::new("nsenter").args([ns.as_str(), "sh", "-c", cmd]).output().unwrap()
    }

    fn status(&self, name: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["inspect", name])).unwrap();
        v[0]["status"].clone()
    }

    fn ps_names(&self) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["ps", "-a", "--output", "json"])).unwrap();
        v.as_array().unwrap().iter().map(|i| i["spec"]["name"].as_str().unwrap().to_string()).collect()
    }

    /// Links, cgroups, rules and mounts that instances of this lab hold.
    fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let links = String::from_utf8_lossy(&self.sh("ip -o link").stdout).into_owned();
        out.extend(links.lines().filter(|l| l.contains("isla-v") || l.contains("isla-t")).map(|l| format!("link {l}")));
        let rules = String::from_utf8_lossy(&self.sh("nft list ruleset").stdout).into_owned();
        out.extend(rules.lines().filter(|l| l.contains("dnat to")).map(|l| format!("rule {}", l.trim())));
        let root = self.root.canonicalize().unwrap_or(self.root.clone());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        out.extend(
            mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| Path::new(m).starts_with(&root))
                .map(|m| format!("mount {m}")),
        );
        out.extend(self.dns_responders().iter().map(|p| format!("dns responder {p}")));
        for id in self.ids() {
            for hier in ["pids", "memory", "cpu", "freezer"] {
                let p = Path::new("/sys/fs/cgroup").join(hier).join("isla").join(&id);
                if p.exists() {
                    out.push(format!("cgroup {}", p.display()));
                }
            }
        }
        out
    }

    /// The DNS responder processes (`isla __dns`) of this lab's root.
    fn dns_responders(&self) -> Vec<i32> {
        let root = self.root.to_string_lossy().into_owned();
        let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
        procs
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<String> =
                    cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                args.iter().any(|a| a == "__dns") && args.contains(&root)
            })
            .collect()
    }

    /// Ids this lab's root ever gave out (instance and runtime directories, rootfs directories).
    fn ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for d in ["instances", "runtime", "images/containers"] {
            if let Ok(rd) = std::fs::read_dir(self.root.join(d)) {
                ids.extend(rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
            }
        }
        ids
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(o) = self.cmd(&["ps", "-aq"], &[]).output() {
            for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = self.cmd(&["rm", "-f", id], &[]).output();
            }
        }
        for pid in self.dns_responders() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let root = self.root.canonicalize().unwrap_or(self.root.clone());
        if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> =
                m.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| Path::new(p).starts_with(&root)).collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").args(["-l", p]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn run_passes_output_and_exit_codes_through() {
    let lab = Lab::new("run");
    let o = lab.isla(&["run", "busybox", "echo", "hi"]);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(0), "hi\n"),
        "{}",
        common::stderr(&o)
    );
    let o = lab.isla(&["run", "--name", "seven", "busybox", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", common::stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(common::stderr(&o), "err\n");
    assert_eq!(lab.status("seven"), serde_json::json!({"state": "exited", "exit_code": 7}));
    let logs = lab.isla(&["logs", "seven"]);
    assert_eq!((String::from_utf8_lossy(&logs.stdout).as_ref(), common::stderr(&logs).as_str()), ("out\n", "err\n"));
    // Environment, working directory, hostname and limits reach the process.
    let out = lab.ok(&[
        "run",
        "--rm",
        "--name",
        "envy",
        "-e",
        "GREETING=hola",
        "-w",
        "/tmp",
        "--memory",
        "64m",
        "--cpus",
        "0.5",
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        "echo $GREETING $(pwd) $(hostname)",
    ]);
    assert_eq!(out, "hola /tmp envy\n");
    // --rm removed it.
    let names = lab.ps_names();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].starts_with("i-") && names[1] == "seven", "{names:?}");
    // A process killed by a signal reports 128+N; `isla kill` counts as a user stop.
    lab.ok(&["run", "-d", "--name", "victim", "busybox", "sleep", "1000"]);
    lab.ok(&["kill", "victim"]);
    let v: serde_json::Value = serde_json::from_str(&lab.ok(&["inspect", "victim"])).unwrap();
    assert_eq!((v[0]["status"]["state"].as_str(), v[0]["exit_code"].as_i64()), (Some("stopped"), Some(137)));
    // on-failure:2 runs it three times, then leaves it exited with its code.
    lab.ok(&["run", "-d", "--name", "flaky", "--restart", "on-failure:2", "busybox", "sh", "-c", "echo try; exit 3"]);
    let mut v = serde_json::Value::Null;
    for _ in 0..200 {
        v = serde_json::from_str::<serde_json::Value>(&lab.ok(&["inspect", "flaky"])).unwrap()[0].clone();
        if v["supervisor_pid"].is_null() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!((v["status"]["exit_code"].as_i64(), v["restart_count"].as_u64()), (Some(3), Some(2)), "{v}");
    assert_eq!(lab.ok(&["logs", "flaky"]), "try\ntry\ntry\n");
    assert!(lab.leftovers().is_empty(), "{:?}", lab.leftovers());
}

#[test]
fn detached_logs_exec_stop_start_keep_volumes() {
    let lab = Lab::new("vol");
    let host = lab.root.join("host-data");
    let host_s = host.to_str().unwrap().to_string();
    let vol = format!("{host_s}:/data");
    let id =
        lab.ok(&["run", "-d", "--name", "keeper", "-v", &vol, "busybox", "sh", "-c", "echo started; exec sleep 1000"]);
    assert_eq!(id.trim().len(), 32, "{id}");
    assert!(host.is_dir(), "the host directory of -v is made");
    assert_eq!(lab.status("keeper")["state"], "running");
    assert_eq!(
        lab.ok(&["exec", "keeper", "sh", "-c", "echo kept > /data/f; echo upper > /etc/mine; hostname"]),
        "keeper\n"
    );
    let code = lab.isla(&["exec", "keeper", "sh", "-c", "exit 4"]).status.code();
    assert_eq!(code, Some(4));
    assert!(lab.ok(&["logs", "keeper"]).contains("started"));
    let ps = lab.ok(&["ps"]);
    assert!(ps.contains("keeper") && ps.contains("running"), "{ps}");
    let stats: serde_json::Value = serde_json::from_str(&lab.ok(&["stats", "--output", "json", "keeper"])).unwrap();
    assert!(stats[0]["pids"].as_u64().unwrap() >= 1, "{stats}");
    let err = lab.fails(&["start", "keeper"]);
    assert!(err.contains("it is running already"), "{err}");
    // `logs -f` follows until the instance ends.
    let follower = lab.cmd(&["logs", "-f", "keeper"], &[]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    lab.ok(&["pause", "keeper"]);
    assert_eq!(lab.status("keeper")["state"], "paused");
    lab.ok(&["resume", "keeper"]);
    // sleep ignores nothing: SIGTERM ends it within the timeout.
    lab.ok(&["stop", "-t", "5", "keeper"]);
    assert_eq!(lab.status("keeper")["state"], "stopped");
    let followed = follower.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&followed.stdout), "started\n");
    assert!(!lab.ok(&["ps"]).contains("keeper"));
    assert!(lab.leftovers().is_empty(), "a stopped instance holds nothing: {:?}", lab.leftovers());
    lab.ok(&["start", "keeper"]);
    assert_eq!(lab.ok(&["exec", "keeper", "cat", "/data/f", "/etc/mine"]), "kept\nupper\n");
    assert_eq!(std::fs::read_to_string(host.join("f")).unwrap(), "kept\n");
    assert_eq!(lab.ok(&["logs", "keeper"]).matches("started").count(), 2);
    let err = lab.fails(&["rm", "keeper"]);
    assert!(err.contains("stop it first, or remove it with --force"), "{err}");
    lab.ok(&["restart", "-t", "1", "keeper"]);
    assert_eq!(lab.status("keeper")["state"], "running");
    lab.ok(&["rm", "-f", "keeper"]);
    assert!(lab.ps_names().is_empty());
    assert_eq!(std::fs::read_to_string(host.join("f")).unwrap(), "kept\n", "rm keeps the host directory");
    assert!(lab.leftovers().is_empty(), "{:?}", lab.leftovers());
    assert!(lab.ids().is_empty(), "{:?}", lab.ids());
}

#[test]
fn containers_reach_each_other_by_name_and_published_ports_serve_the_host() {
    let lab = Lab::new("net");
    let www = lab.root.join("host-www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "<h1>isla web</h1>\n").unwrap();
    let vol = format!("{}:/www:ro", www.display());
    lab.ok(&[
        "run", "-d", "--name", "web", "-p", "8080:80", "-v", &vol, "busybox", "httpd", "-f", "-p", "80", "-h", "/www",
    ]);
    lab.ok(&["run", "-d", "--name", "client", "busybox", "sleep", "1000"]);
    // By name both ways: web was started first and still learns client's name.
    let page = lab.ok(&["exec", "client", "wget", "-q", "-O", "-", "http://web/index.html"]);
    assert_eq!(page, "<h1>isla web</h1>\n");
    assert!(lab.ok(&["exec", "web", "ping", "-c", "1", "-W", "2", "client"]).contains("1 packets received"));
    // The "host" (the test's namespace) through 127.0.0.1 and through the gateway address.
    for url in ["http://127.0.0.1:8080/index.html", "http://10.88.0.1:8080/index.html"] {
        let o = lab.sh(&format!("busybox wget -q -O - {url}"));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "<h1>isla web</h1>\n", "{url}: {}", common::stderr(&o));
    }
    let inspect: serde_json::Value = serde_json::from_str(&lab.ok(&["inspect", "web"])).unwrap();
    assert_eq!(inspect[0]["attachment"]["hostname"], "web");
    assert!(lab.ok(&["ps"]).contains("0.0.0.0:8080->80/tcp"));
    // The port is busy while web holds it: a second publisher fails and leaves nothing.
    let err = lab.fails(&["run", "-d", "--name", "web2", "-p", "8080:80", "busybox", "httpd", "-f", "-p", "80"]);
    assert!(err.contains("8080") && err.contains("in use"), "{err}");
    assert_eq!(lab.ps_names(), ["web", "client"]);
    lab.ok(&["rm", "-f", "web", "client"]);
    assert!(lab.leftovers().is_empty(), "{:?}", lab.leftovers());
}

#[test]
fn bad_input_gives_clear_errors_and_leaves_nothing() {
    let lab = Lab::new("bad");
    lab.ok(&["create", "--name", "one", "busybox", "true"]);
    let err = lab.fails(&["create", "--name", "one", "busybox", "true"]);
    assert!(err.contains("name `one` is already in use"), "{err}");
    let err = lab.fails(&["run", "--name", "two", "nosuchimage:1", "true"]);
    assert!(err.contains("no image `nosuchimage:1`"), "{err}");
    for (args, want) in [
        (&["run", "-v", "rel/data:/data", "busybox", "true"][..], "a host path must be absolute"),
        (&["run", "--memory", "lots", "busybox", "true"], "--memory"),
        (&["run", "-p", "80", "busybox", "true"], "port `80`"),
        (&["run", "--restart", "sometimes", "busybox", "true"], "--restart"),
        (&["run", "--name", "bad name", "busybox", "true"], "--name"),
        (&["run", "--kind", "vm", "busybox", "true"], "vm instances of container images"),
        (&["run", "--network", "nosuchnet", "busybox", "true"], "no network named `nosuchnet`"),
    ] {
        let err = lab.fails(args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let err = lab.fails(&["start", "nosuch"]);
    assert!(err.contains("no instance named `nosuch`"), "{err}");
    let err = lab.fails(&["exec", "one", "true"]);
    assert!(err.contains("exec needs a running instance"), "{err}");
    assert_eq!(lab.ps_names(), ["one"]);
    assert_eq!(lab.ids().len(), 2, "one instance directory and one rootfs: {:?}", lab.ids());
    lab.ok(&["rm", "one"]);
    assert!(lab.ids().is_empty() && lab.leftovers().is_empty(), "{:?} {:?}", lab.ids(), lab.leftovers());
}

/// SIGKILL at each step of create, start and rm (the `ISLA_CORE_CRASH_AT` hook), then any
/// command (it opens the manager, which repairs): the store is consistent and nothing leaks.
#[test]
fn sigkill_mid_operation_is_repaired_by_the_next_command() {
    let lab = Lab::new("crash");
    for point in ["create:recorded", "create:prepared"] {
        let o = lab
            .cmd(&["create", "--name", "half", "-p", "8081:80", "busybox", "true"], &[("ISLA_CORE_CRASH_AT", point)])
            .output()
            .unwrap();
        assert_eq!(o.status.signal(), Some(9), "{point}: {o:?}");
        assert!(lab.ps_names().is_empty(), "{point}: the half-created instance is rolled back");
        assert!(lab.ids().is_empty(), "{point}: {:?}", lab.ids());
        lab.ok(&["create", "--name", "half", "busybox", "true"]);
        lab.ok(&["rm", "half"]);
    }
    // The supervisor dies after plugging the veth and publishing nothing yet: the next command
    // releases the link, cgroup, runtime state and mount, and marks the instance dead.
    lab.ok(&["create", "--name", "sup", "-p", "8082:80", "busybox", "httpd", "-f", "-p", "80"]);
    let o = lab.cmd(&["start", "sup"], &[("ISLA_CORE_CRASH_AT", "start:attached")]).output().unwrap();
    assert!(common::stderr(&o).contains("supervisor ended"), "{}", common::stderr(&o));
    assert_eq!(lab.status("sup")["state"], "dead");
    assert!(lab.leftovers().is_empty(), "{:?}", lab.leftovers());
    lab.ok(&["start", "sup"]);
    let o = lab.sh("busybox wget -q -O - http://127.0.0.1:8082/ 2>&1; true");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("refused"), "{o:?}");
    for point in ["remove:marked", "remove:released"] {
        lab.ok(&["create", "--name", "gone", "busybox", "true"]);
        let o = lab.cmd(&["rm", "gone"], &[("ISLA_CORE_CRASH_AT", point)]).output().unwrap();
        assert_eq!(o.status.signal(), Some(9), "{point}");
        assert_eq!(lab.ps_names(), ["sup"], "{point}: the removal was finished");
    }
    lab.ok(&["rm", "-f", "sup"]);
    assert!(lab.ids().is_empty() && lab.leftovers().is_empty(), "{:?} {:?}", lab.ids(), lab.leftovers());
}

/// microVM instances of the guest kit. A detached one with `isla.agent=serve` stays up: its init
/// configures eth0 from the network's address (the kernel's `ip=` argument), `exec` runs through
/// the agent and reaches the network's gateway, SIGTERM stops it and nothing is left behind. An
/// attached one boots to the kit's power-off (exit 0) with the console in its log.
#[test]
fn microvm_instances_boot_the_guest_kit() {
    if common::kvm_and_kit().is_none() {
        return;
    }
    let lab = Lab::new("vm");
    lab.ok(&["run", "-d", "--kind", "microvm", "--name", "vm1", "--memory", "128m", "kit", "isla.agent=serve"]);
    let links = String::from_utf8_lossy(&lab.sh("ip -o link").stdout).into_owned();
    assert!(links.contains("isla-t"), "a TAP for the running microVM: {links}");
    let ps = lab.ok(&["ps"]);
    assert!(ps.contains("vm1") && ps.contains("microvm"), "{ps}");
    let inspect: serde_json::Value = serde_json::from_str(&lab.ok(&["inspect", "vm1"])).unwrap();
    let text = inspect.to_string();
    // The guest boots for tens of seconds on nested hosts: exec until the agent answers, and again
    // when a guest process hits the nested host's known crash (docs/nested-kvm.md).
    let start = std::time::Instant::now();
    let out = loop {
        let o = lab.isla(&[
            "exec",
            "vm1",
            "sh",
            "-c",
            "ip -o -4 addr show eth0; ping -c 1 -W 5 $(ip route | sed -n 's/^default via \\([0-9.]*\\).*/\\1/p')",
        ]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() && out.contains("1 packets received") {
            break out;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(300),
            "no answer from vm1: {out} {}",
            common::stderr(&o)
        );
        std::thread::sleep(std::time::Duration::from_secs(2));
    };
    assert!(out.contains("eth0") && out.contains("inet "), "{out}");
    let ip = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(!ip.is_empty() && text.contains(&ip), "the guest's address {ip} is the one the network gave: {text}");
    lab.ok(&["stop", "-t", "10", "vm1"]);
    assert_eq!(lab.status("vm1")["state"], "stopped");
    assert!(lab.leftovers().is_empty(), "{:?}", lab.leftovers());
    lab.ok(&["rm", "vm1"]);

    let o = lab.isla(&["run", "--kind", "microvm", "--name", "vm2", "--memory", "128m", "kit"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("isla-init: cpus=1"), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(lab.status("vm2"), serde_json::json!({"state": "exited", "exit_code": 0}));
    assert!(lab.ok(&["logs", "vm2"]).contains("isla-init: powering off"));
    lab.ok(&["rm", "vm2"]);
    assert!(lab.ids().is_empty() && lab.leftovers().is_empty(), "{:?} {:?}", lab.ids(), lab.leftovers());
}

/// Names on a network (issue 7): two containers and a microVM on one NAT network reach each other
/// by name through the network's DNS responder, one `isla __dns` process started by the first
/// instance and gone once the last one is removed. One guest boot.
#[test]
fn containers_and_a_microvm_reach_each_other_by_name() {
    if common::kvm_and_kit().is_none() {
        return;
    }
    let lab = Lab::new("names");
    let serve_hostname = "mkdir -p /www && hostname >/www/name && exec httpd -f -p 80 -h /www";
    // The two containers start at once: both may find no responder, only one runs.
    let web = ["run", "-d", "--name", "web", "busybox", "sh", "-c", serve_hostname];
    let client = ["run", "-d", "--name", "client", "busybox", "sleep", "1000"];
    std::thread::scope(|s| {
        let w = s.spawn(|| lab.ok(&web));
        let c = s.spawn(|| lab.ok(&client));
        (w.join().unwrap(), c.join().unwrap())
    });
    let responders = lab.dns_responders();
    assert_eq!(responders.len(), 1, "the first instances start one responder: {responders:?}");
    lab.ok(&["run", "-d", "--kind", "microvm", "--name", "vm", "--memory", "128m", "kit", "isla.agent=serve"]);
    assert_eq!(lab.dns_responders(), responders, "later instances use the running responder");
    let net: serde_json::Value = serde_json::from_str(&lab.ok(&["network", "inspect", "isla0"])).unwrap();
    assert_eq!(net[0]["dns_responder"], responders[0], "{net}");
    let gw = "10.88.0.1";
    let resolv = lab.ok(&["exec", "client", "cat", "/etc/resolv.conf"]);
    assert!(resolv.starts_with(&format!("nameserver {gw}\n")) && resolv.contains("search isla0\n"), "{resolv}");
    // The microVM started after the containers, so it is not in their /etc/hosts: DNS only.
    assert!(!lab.ok(&["exec", "client", "cat", "/etc/hosts"]).contains("vm"));
    let ns = lab.ok(&["exec", "client", "nslookup", "vm"]);
    assert!(ns.contains(&format!("Server:\t\t{gw}")) && ns.contains("Address: 10.88.0."), "{ns}");
    assert_eq!(lab.ok(&["exec", "client", "wget", "-q", "-O", "-", "http://web/name"]), "web\n");
    let ping = |from: &str, to: &str| {
        let out = lab.ok(&["exec", from, "ping", "-c", "1", "-W", "5", to]);
        assert!(out.contains("1 packets received"), "{from} -> {to}: {out}");
    };
    ping("client", "web");
    ping("web", "client");
    // The guest: exec until its agent answers (tens of seconds of boot on nested hosts), and
    // again when a guest process hits the nested host's known crash (docs/nested-kvm.md).
    let vm_exec = |script: &str, want: &str, within: u64| -> String {
        let start = std::time::Instant::now();
        loop {
            let o = lab.isla(&["exec", "vm", "sh", "-c", script]);
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            if o.status.success() && out.contains(want) {
                return out;
            }
            assert!(start.elapsed().as_secs() < within, "vm: {script}: {out} {}", common::stderr(&o));
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    };
    let out = vm_exec("cat /etc/resolv.conf; hostname", "vm", 300);
    // dns0 of ip= first (dns1, one of the host's servers, depends on the machine).
    assert!(out.starts_with(&format!("nameserver {gw}\n")) && out.ends_with("\nvm\n"), "{out}");
    ping("client", "vm");
    ping("web", "vm.isla0");
    let out = vm_exec("ping -c 1 -W 5 web && ping -c 1 -W 5 client && wget -q -O - http://web/name", "\nweb\n", 120);
    assert_eq!(out.matches("1 packets received").count(), 2, "{out}");
    // And into the guest by name: a web server there, fetched from a container.
    vm_exec("httpd -p 8000 -h /etc && echo started", "started", 60);
    assert_eq!(lab.ok(&["exec", "client", "wget", "-q", "-O", "-", "http://vm:8000/hostname"]), "vm\n");
    // A responder that dies is started again by the next start on its network.
    assert!(Command::new("kill").args(["-9", &responders[0].to_string()]).status().unwrap().success());
    lab.ok(&["restart", "-t", "1", "client"]);
    let responders = lab.dns_responders();
    assert_eq!(responders.len(), 1, "{responders:?}");
    assert!(lab.ok(&["exec", "client", "nslookup", "vm"]).contains("Address: 10.88.0."));
    // It outlives any one instance, and ends with the last one.
    lab.ok(&["rm", "-f", "web"]);
    assert_eq!(lab.dns_responders(), responders);
    let o = lab.isla(&["exec", "client", "ping", "-c", "1", "-W", "2", "web"]);
    assert!(!o.status.success(), "a removed instance's name is gone: {}", String::from_utf8_lossy(&o.stdout));
    lab.ok(&["rm", "-f", "client", "vm"]);
    assert!(lab.ids().is_empty() && lab.leftovers().is_empty(), "{:?} {:?}", lab.ids(), lab.leftovers());
}

/// A DNS responder that cannot start (another server holds port 53) does not stop instances: the
/// container starts with the host's name servers and a warning naming the cause, and the next
/// start once the port is free brings the responder.
#[test]
fn instances_start_when_the_dns_responder_cannot() {
    let lab = Lab::new("dnsbusy");
    let netns = PathBuf::from(format!("/run/netns/{}", lab.ns));
    let squatter = isla_net::in_netns(&netns, || std::net::UdpSocket::bind("0.0.0.0:53")).unwrap().unwrap();
    lab.ok(&["run", "-d", "--name", "c", "busybox", "sleep", "1000"]);
    assert!(lab.dns_responders().is_empty());
    assert!(!lab.ok(&["exec", "c", "cat", "/etc/resolv.conf"]).contains("nameserver 10.88.0.1"));
    let id = lab.ok(&["inspect", "c"]);
    let id: serde_json::Value = serde_json::from_str(&id).unwrap();
    let log = lab.root.join("instances").join(id[0]["id"].as_str().unwrap()).join("supervisor.log");
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("DNS responder of network `isla0` did not start") && log.contains("in use"), "{log}");
    drop(squatter);
    lab.ok(&["restart", "-t", "1", "c"]);
    assert_eq!(lab.dns_responders().len(), 1);
    assert!(lab.ok(&["exec", "c", "cat", "/etc/resolv.conf"]).starts_with("nameserver 10.88.0.1\n"));
    lab.ok(&["rm", "-f", "c"]);
    assert!(lab.leftovers().is_empty(), "{:?}", lab.leftovers());
}

/// A full VM (QEMU; TCG here, KVM on hardware virtualization) of the guest kit: the attached
/// run boots to power-off with the serial console in the output and the log; a detached one
/// with a shell stays up, pauses and resumes through QMP, has a TAP, and stops.
#[test]
fn vm_instances_run_the_guest_kit_under_qemu() {
    if common::kvm_and_kit().is_none() {
        return;
    }
    let lab = Lab::new("qemu");
    let o = lab.isla(&["run", "--kind", "vm", "--name", "q1", "kit"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("isla-init: cpus=1"), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(lab.ok(&["logs", "q1"]).contains("isla-init: powering off"));
    assert_eq!(lab.status("q1"), serde_json::json!({"state": "exited", "exit_code": 0}));
    // isla.shell=1: the kit's init waits on the serial console, so the VM stays up.
    lab.ok(&["run", "-d", "--kind", "vm", "--name", "q2", "--memory", "256m", "kit", "isla.shell=1"]);
    assert!(String::from_utf8_lossy(&lab.sh("ip -o link").stdout).contains("isla-t"));
    lab.ok(&["pause", "q2"]);
    assert_eq!(lab.status("q2")["state"], "paused");
    lab.ok(&["resume", "q2"]);
    let stats: serde_json::Value = serde_json::from_str(&lab.ok(&["stats", "--output", "json", "q2"])).unwrap();
    assert!(stats[0]["memory"].as_u64().unwrap() > 0, "{stats}");
    let err = lab.fails(&["exec", "q2", "true"]);
    assert!(err.contains("needs a guest agent"), "{err}");
    lab.ok(&["stop", "-t", "2", "q2"]);
    assert_eq!(lab.status("q2")["state"], "stopped");
    lab.ok(&["rm", "q1", "q2"]);
    assert!(lab.ids().is_empty() && lab.leftovers().is_empty(), "{:?} {:?}", lab.ids(), lab.leftovers());
}

/// A container image booted as a microVM (one boot; a second only if the first met the nested
/// host's crash): the image's files, CMD-less command line, `-e`, the image's ENV, WORKDIR and
/// USER, the host name and `/etc/hosts` of its network, `exec` in the image's root while the
/// process runs, and the process's exit status as the instance's. Bad input is refused before
/// anything boots and leaves nothing.
#[test]
fn microvm_instances_boot_container_images() {
    if common::kvm_and_kit().is_none() {
        return;
    }
    let lab = Lab::new("img");
    let ctx = lab.root.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("marker"), "from-the-image\n").unwrap();
    std::fs::write(
        ctx.join("Containerfile"),
        "FROM busybox\nCOPY marker /srv/marker\nENV GREETING=hello\nWORKDIR /srv\nUSER 1000:1000\n",
    )
    .unwrap();
    let images = lab.root.join("images");
    let build = |tag: &str, dir: &Path| {
        let mut c = common::isla();
        c.arg("build").arg("--root").arg(&images).args(["-t", tag]).arg(dir);
        common::expect_ok(&["build", tag], c.output().unwrap());
    };
    build("mark:1", &ctx);
    // An image with one file: no shell, no ENTRYPOINT or CMD.
    let bare = lab.root.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::write(bare.join("data"), "no shell here\n").unwrap();
    std::fs::write(bare.join("Containerfile"), "FROM scratch\nCOPY data /data\n").unwrap();
    build("bare:1", &bare);

    // Refused before anything is recorded or booted.
    let err = lab.fails(&["run", "--kind", "microvm", "bare:1"]);
    assert!(err.contains("neither ENTRYPOINT nor CMD"), "{err}");
    let err = lab.fails(&["run", "--kind", "microvm", "bare:1", "sh"]);
    assert!(err.contains("`sh` is not an executable file in image `bare:1`"), "{err}");
    let err = lab.fails(&["run", "--kind", "microvm", "mark:1", "no-such-program"]);
    assert!(err.contains("no-such-program"), "{err}");
    let err = lab.fails(&["run", "--kind", "microvm", "--rootfs", "/etc/hostname", "mark:1", "true"]);
    assert!(err.contains("drop --rootfs"), "{err}");
    let err = lab.fails(&["run", "--kind", "microvm", "--kernel", "/etc/hostname", "mark:1", "true"]);
    assert!(err.contains("drop --kernel"), "{err}");
    assert!(lab.ps_names().is_empty(), "{:?}", lab.ps_names());

    let script = "cat /etc/hostname; echo \"$FOO $GREETING\"; pwd; id -u; cat marker; grep -w iv /etc/hosts; \
                  while [ ! -e /tmp/go ]; do sleep 1; done; exit 7";
    let attempt = |name: &str| -> (Option<i32>, String) {
        let run = lab
            .cmd(&["run", "--kind", "microvm", "--name", name, "-e", "FOO=bar", "mark:1", "sh", "-c", script], &[])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The guest boots for tens of seconds here: exec until the agent answers (and again when
        // an exec'd process meets the nested host's start-up crash, docs/nested-kvm.md).
        let start = std::time::Instant::now();
        loop {
            let o = lab.isla(&["exec", name, "cat", "/srv/marker"]);
            if o.status.success() {
                assert_eq!(String::from_utf8_lossy(&o.stdout), "from-the-image\n");
                break;
            }
            if start.elapsed() > std::time::Duration::from_secs(300) {
                panic!("no exec answer from {name}: {}", common::stderr(&o));
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        for _ in 0..3 {
            if lab.isla(&["exec", name, "touch", "/tmp/go"]).status.success() {
                break;
            }
        }
        let o = run.wait_with_output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let expected = ["iv\n", "bar hello\n", "/srv\n", "1000\n", "from-the-image\n", "\tiv iv.isla0\n"];
    let complete = |out: &str| expected.iter().all(|l| out.contains(l));
    let (mut code, mut out) = attempt("iv");
    if code != Some(7) || !complete(&out) {
        // One retry: a busybox start-up in the guest occasionally segfaults on this nested host
        // (docs/nested-kvm.md, "Fresh processes that read zeros"; worked around for glibc programs),
        // the test must not hang on one unlucky process.
        eprintln!("first boot did not complete (exit {code:?}): {out}");
        lab.ok(&["rm", "-f", "iv"]);
        (code, out) = attempt("iv");
    }
    assert_eq!(code, Some(7), "{out}");
    assert!(complete(&out), "expected {expected:?} in: {out}");
    assert_eq!(lab.status("iv"), serde_json::json!({"state": "exited", "exit_code": 7}));
    assert!(lab.ok(&["logs", "iv"]).contains("from-the-image"));
    lab.ok(&["rm", "iv"]);
    assert!(lab.ids().is_empty() && lab.leftovers().is_empty(), "{:?} {:?}", lab.ids(), lab.leftovers());
}
