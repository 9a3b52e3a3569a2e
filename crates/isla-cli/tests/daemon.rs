//! `isla daemon` end to end, as root: real busybox containers created, listed, stopped and
//! removed through the REST API on the unix socket; the TCP listener's token; bad JSON; the
//! Prometheus text; the event stream; following logs and exec; SIGKILL of the daemon (also in
//! the middle of a create) and a restart. Each test has its own state root, socket and network namespace (the daemon
//! and the CLI run under `nsenter --net`), all removed on drop, also after a failure.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A state root and a network namespace.
struct Lab {
    ns: String,
    root: PathBuf,
    netns: bool,
}

impl Lab {
    /// With `netns`, the daemon and the CLI run in a fresh network namespace.
    fn new(tag: &str, netns: bool) -> Lab {
        let ns = format!("isladm{tag}{}", std::process::id());
        if netns {
            common::fresh_netns(&ns);
        }
        let root = common::tmp(&format!("daemon-{tag}"));
        let _ = std::fs::remove_dir_all(&root);
        Lab { ns, root, netns }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = if self.netns {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", self.ns)).arg(env!("CARGO_BIN_EXE_isla"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_isla"))
        };
        c.arg(args[0]).arg("--root").arg(&self.root).args(&args[1..]);
        c
    }

    fn socket(&self) -> PathBuf {
        self.root.join("isla.sock")
    }

    /// Starts `isla daemon` with `extra` arguments and `env`; returns once it listens.
    fn daemon(&self, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut args = vec!["daemon"];
        args.extend_from_slice(extra);
        let mut child =
            self.cmd(&args).envs(env.iter().copied()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut tcp = None;
        let mut line = String::new();
        loop {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            assert!(n > 0, "the daemon ended before listening: {:?}", child.wait());
            if let Some(a) = line.trim().strip_prefix("listening on tcp:") {
                tcp = Some(a.to_string());
            }
            let want_tcp = extra.contains(&"--tcp");
            if (line.starts_with("listening on unix:") && !want_tcp) || tcp.is_some() {
                break;
            }
        }
        Daemon { child, tcp }
    }

    fn isla(&self, args: &[&str]) -> String {
        let o = self.cmd(args).output().unwrap();
        assert!(o.status.success(), "isla {args:?}: {}", common::stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn ids(&self) -> Vec<String> {
        std::fs::read_dir(self.root.join("instances"))
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(o) = self.cmd(&["ps", "-aq"]).output() {
            for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = self.cmd(&["rm", "-f", id]).output();
            }
        }
        if self.netns {
            let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        }
        let root = self.root.canonicalize().unwrap_or(self.root.clone());
        if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
            for p in m.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| Path::new(p).starts_with(&root)) {
                let _ = Command::new("umount").args(["-l", p]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A running daemon; killed on drop.
struct Daemon {
    child: Child,
    tcp: Option<String>,
}

impl Daemon {
    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// One HTTP/1.1 request (`Connection: close`): status and body.
fn http(mut s: impl Read + Write, method: &str, path: &str, body: &str, auth: Option<&str>) -> (u16, String) {
    let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: isla\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

fn unix(lab: &Lab, method: &str, path: &str, body: &str) -> (u16, Value) {
    let s = std::os::unix::net::UnixStream::connect(lab.socket()).unwrap();
    let (code, text) = http(s, method, path, body, None);
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The event stream, read by a thread: one line per message.
fn events(lab: &Lab) -> std::sync::mpsc::Receiver<String> {
    let mut ev = std::os::unix::net::UnixStream::connect(lab.socket()).unwrap();
    ev.write_all(b"GET /v1/events HTTP/1.1\r\nHost: isla\r\n\r\n").unwrap();
    // The headers come once the daemon has subscribed: no later change is missed.
    ev.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(ev);
    let mut line = String::new();
    while r.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
        assert!(line.starts_with("HTTP/1.1 200") || line.contains(':'), "{line}");
        line.clear();
    }
    r.get_ref().set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in r.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Lines of the stream up to the first that contains `needle` (at most 20 s).
fn wait_event(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains(needle)) {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("no event with {needle}; got {seen:?}"),
        }
    }
    seen
}

fn names(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|i| i["spec"]["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn instances_through_the_unix_socket() {
    let lab = Lab::new("api", true);
    let d = lab.daemon(&[], &[]);
    // Memory at rest, for docs/daemon.md (printed, not asserted).
    let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", d.child.id())).unwrap_or_default();
    let kb = |k: &str| rollup.lines().find(|l| l.starts_with(k)).unwrap_or_default().to_string();
    eprintln!("daemon at rest: {} / {}", kb("Rss:"), kb("Pss:"));
    let mode = std::fs::metadata(lab.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let events = events(&lab);

    let body = r#"{"name":"web","image":"busybox","command":["sh","-c","echo hello $A; exec sleep 1000"],"env":["A=1"],"memory":"64m"}"#;
    let (code, inst) = unix(&lab, "POST", "/v1/instances", body);
    assert_eq!(code, 201, "{inst}");
    assert_eq!(inst["status"]["state"], "running", "{inst}");
    assert_eq!(inst["spec"]["memory"], 64 << 20);

    // Clashes and bad input: clear errors, nothing half-made.
    let (code, e) = unix(&lab, "POST", "/v1/instances", r#"{"name":"web","image":"busybox"}"#);
    assert_eq!(code, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("`web` is already in use"), "{e}");
    for (bad, needle) in [
        (r#"{"name":"x","image":"busybox","cpus":"two"}"#, "field `cpus`"),
        (r#"{"name":"x","image":"busybox","imgae":"busybox"}"#, "unknown field `imgae`"),
        (r#"{"name":"x","image":"busybox""#, "request body"),
        (r#"{"name":"x","image":"busybox","ports":["eighty"]}"#, "field `ports[0]`"),
        (r#"{"name":"x","image":"no-such-image"}"#, "no-such-image"),
    ] {
        let (code, e) = unix(&lab, "POST", "/v1/instances", bad);
        assert_eq!(code, 400, "{bad}: {e}");
        assert!(e["error"].as_str().unwrap().contains(needle), "{bad}: {e}");
    }
    let (code, list) = unix(&lab, "GET", "/v1/instances?all=1", "");
    assert_eq!((code, names(&list)), (200, vec!["web".to_string()]));
    assert_eq!(lab.ids().len(), 1, "{:?}", lab.ids());
    // The CLI sees the same store.
    assert!(lab.isla(&["ps"]).contains("web"));

    let (code, m) = unix(&lab, "GET", "/metrics", "");
    let m = m.as_str().unwrap().to_string();
    assert_eq!(code, 200);
    let cpu = m
        .lines()
        .find(|l| l.starts_with("isla_instance_cpu_seconds_total{name=\"web\""))
        .unwrap_or_else(|| panic!("{m}"));
    assert!(cpu.rsplit(' ').next().unwrap().parse::<f64>().is_ok(), "{cpu}");
    assert!(m.contains("isla_instance_memory_limit_bytes{name=\"web\""), "{m}");
    assert!(m.contains("isla_instances{status=\"running\"} 1"), "{m}");

    // The supervisor copies the output into the log as it comes.
    let mut logs = Value::Null;
    for _ in 0..100 {
        let (code, l) = unix(&lab, "GET", "/v1/instances/web/logs?tail=5", "");
        assert_eq!(code, 200, "{l}");
        logs = l;
        if !logs[0].is_null() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(logs[0]["text"], "hello 1", "{logs}");
    assert_eq!(logs[0]["stream"], "stdout", "{logs}");
    let (code, st) = unix(&lab, "GET", "/v1/instances/web/stats", "");
    assert_eq!(code, 200, "{st}");
    assert!(st["memory"].as_u64().unwrap() > 0 && st["memory_limit"] == 64 << 20, "{st}");
    let (code, e) = unix(&lab, "POST", "/v1/instances/web/kill?signal=NOPE", "");
    assert_eq!(code, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("`signal`"), "{e}");
    let (code, e) = unix(&lab, "POST", "/v1/instances/nobody/stop", "");
    assert_eq!(code, 404, "{e}");
    let (code, e) = unix(&lab, "DELETE", "/v1/instances/web", "");
    assert_eq!(code, 409, "a running instance needs force: {e}");
    let (code, inst) = unix(&lab, "POST", "/v1/instances/web/stop?t=1", "");
    assert_eq!((code, &inst["status"]["state"]), (200, &Value::from("stopped")), "{inst}");
    let (code, inst) = unix(&lab, "POST", "/v1/instances/web/start", "");
    assert_eq!((code, &inst["status"]["state"]), (200, &Value::from("running")), "{inst}");
    let (code, inst) = unix(&lab, "POST", "/v1/instances/web/pause", "");
    assert_eq!((code, &inst["status"]["state"]), (200, &Value::from("paused")), "{inst}");
    let (code, inst) = unix(&lab, "POST", "/v1/instances/web/resume", "");
    assert_eq!((code, &inst["status"]["state"]), (200, &Value::from("running")), "{inst}");
    let (code, inst) = unix(&lab, "POST", "/v1/instances/web/kill", "");
    assert_eq!(
        (code, &inst["status"]["state"], &inst["exit_code"]),
        (200, &Value::from("stopped"), &Value::from(137)),
        "{inst}"
    );
    let (code, inst) = unix(&lab, "POST", "/v1/instances/web/restart?t=1", "");
    assert_eq!((code, &inst["status"]["state"]), (200, &Value::from("running")), "{inst}");
    let (code, e) = unix(&lab, "DELETE", "/v1/instances/web?force=1", "");
    assert_eq!(code, 200, "{e}");
    let (code, list) = unix(&lab, "GET", "/v1/instances?all=1", "");
    assert_eq!((code, list), (200, Value::Array(vec![])));
    assert!(lab.ids().is_empty(), "{:?}", lab.ids());

    // The stream saw web appear and go.
    let seen = wait_event(&events, r#""type":"removed""#);
    assert!(seen.iter().any(|l| l.contains(r#""type":"created""#) && l.contains(r#""name":"web""#)), "{seen:?}");
}

#[test]
fn sigkill_of_the_daemon_keeps_the_store_consistent() {
    let lab = Lab::new("kill", true);
    let mut d = lab.daemon(&[], &[]);
    let body = r#"{"name":"kept","image":"busybox","command":["sleep","1000"],"network":"none"}"#;
    let (code, inst) = unix(&lab, "POST", "/v1/instances", body);
    assert_eq!(code, 201, "{inst}");
    d.sigkill();
    drop(d);

    // Killed in the middle of a create (after the row is written, before anything is made).
    let mut d = lab.daemon(&[], &[("ISLA_CORE_CRASH_AT", "create:recorded")]);
    let s = std::os::unix::net::UnixStream::connect(lab.socket()).unwrap();
    let (code, _) = http(s, "POST", "/v1/instances", r#"{"name":"half","image":"busybox","network":"none"}"#, None);
    assert_eq!(code, 0, "the daemon answered instead of dying");
    let _ = d.child.wait();
    drop(d);

    // A new daemon on the same (stale) socket path: the instance is still there and running,
    // the half-made one is gone without a trace.
    let _d = lab.daemon(&[], &[]);
    let (code, list) = unix(&lab, "GET", "/v1/instances?all=1", "");
    assert_eq!((code, names(&list)), (200, vec!["kept".to_string()]), "{list}");
    assert_eq!(list[0]["status"]["state"], "running", "{list}");
    assert_eq!(lab.ids().len(), 1, "{:?}", lab.ids());
    assert!(lab.isla(&["ps", "-a"]).contains("kept"));
    // Its supervisor killed: the daemon's poller repairs it and reports it dead.
    let events = events(&lab);
    let sup = list[0]["supervisor_pid"].as_i64().unwrap().to_string();
    assert!(Command::new("kill").args(["-KILL", &sup]).status().unwrap().success());
    let seen = wait_event(&events, r#""status":"dead""#);
    assert!(seen.last().unwrap().contains(r#""name":"kept""#), "{seen:?}");
    let (code, e) = unix(&lab, "DELETE", "/v1/instances/kept?force=1", "");
    assert_eq!(code, 200, "{e}");
}

#[test]
fn tcp_needs_the_token() {
    // Loopback of the machine: no instance is made, so no namespace is needed.
    let lab = Lab::new("tcp", false);
    std::fs::create_dir_all(&lab.root).unwrap();
    let token_file = lab.root.join("token");
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tf = token_file.to_str().unwrap();
    // Refused: TCP without a token, a token others can read.
    let o = lab.cmd(&["daemon", "--tcp", "127.0.0.1:0"]).output().unwrap();
    assert!(!o.status.success() && common::stderr(&o).contains("--token-file"), "{}", common::stderr(&o));
    let o = lab.cmd(&["daemon", "--tcp", "127.0.0.1:0", "--token-file", tf]).output().unwrap();
    assert!(!o.status.success() && common::stderr(&o).contains("chmod 600"), "{}", common::stderr(&o));
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let d = lab.daemon(&["--tcp", "127.0.0.1:0", "--token-file", tf], &[]);
    let addr = d.tcp.clone().unwrap();
    let call = |auth: Option<&str>, path: &str| {
        let s = std::net::TcpStream::connect(&addr).unwrap();
        http(s, "GET", path, "", auth)
    };
    let (code, body) = call(None, "/v1/version");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    assert_eq!(call(Some("wrong"), "/v1/instances").0, 401);
    let (code, body) = call(Some("0123456789abcdef0123456789abcdef"), "/v1/version");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""api":"v1""#), "{body}");
    // The unix socket needs no token.
    assert_eq!(unix(&lab, "GET", "/v1/version", "").0, 200);
    // SIGTERM: a clean end, the socket file is gone.
    let mut d = d;
    assert!(Command::new("kill").args(["-TERM", &d.child.id().to_string()]).status().unwrap().success());
    let st = d.child.wait().unwrap();
    assert!(st.success(), "{st:?}");
    assert!(!lab.socket().exists());
}

#[test]
fn logs_follow_and_exec() {
    // Instances without a network: no namespace is needed.
    let lab = Lab::new("follow", false);
    let _d = lab.daemon(&[], &[]);
    let body = r#"{"name":"talker","image":"busybox","network":"none",
                   "command":["sh","-c","echo one; sleep 1; echo two >&2; sleep 1; echo three; exit 2"]}"#;
    let (code, inst) = unix(&lab, "POST", "/v1/instances", body);
    assert_eq!(code, 201, "{inst}");
    // The stream (chunked NDJSON) carries the lines as they come and ends with the instance.
    let s = std::os::unix::net::UnixStream::connect(lab.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (code, raw) = http(s, "GET", "/v1/instances/talker/logs?follow=1", "", None);
    assert_eq!(code, 200, "{raw}");
    let recs: Vec<Value> =
        raw.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(&str, &str)> =
        recs.iter().map(|r| (r["stream"].as_str().unwrap(), r["text"].as_str().unwrap())).collect();
    assert_eq!(got, [("stdout", "one"), ("stderr", "two"), ("stdout", "three")], "{raw}");
    let (_, inst) = unix(&lab, "GET", "/v1/instances/talker", "");
    assert_eq!(inst["status"]["exit_code"], 2, "the stream ended before the instance: {inst}");
    // Following an ended instance gives its log and ends; `tail` applies.
    let s = std::os::unix::net::UnixStream::connect(lab.socket()).unwrap();
    let (_, raw) = http(s, "GET", "/v1/instances/talker/logs?follow=1&tail=1", "", None);
    assert_eq!(raw.lines().filter(|l| l.contains("\"text\"")).count(), 1, "{raw}");
    assert_eq!(unix(&lab, "GET", "/v1/instances/nobody/logs?follow=1", "").0, 404);

    // exec: exit code and both outputs as JSON.
    let body = r#"{"name":"box","image":"busybox","network":"none","command":["sleep","1000"]}"#;
    assert_eq!(unix(&lab, "POST", "/v1/instances", body).0, 201);
    let (code, r) = unix(
        &lab,
        "POST",
        "/v1/instances/box/exec",
        r#"{"command":["sh","-c","echo out $X; echo err >&2; exit 3"],"env":["X=1"],"workdir":"/tmp"}"#,
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r, serde_json::json!({"exit_code": 3, "stdout": "out 1\n", "stderr": "err\n"}));
    let (code, r) = unix(&lab, "POST", "/v1/instances/box/exec", r#"{"command":["pwd"],"workdir":"/tmp"}"#);
    assert_eq!((code, &r["stdout"]), (200, &Value::from("/tmp\n")), "{r}");
    for (name, body, want_code, needle) in [
        ("box", r#"{"command":[]}"#, 400, "field `command`"),
        ("box", r#"{"cmd":["ls"]}"#, 400, "unknown field `cmd`"),
        ("talker", r#"{"command":["true"]}"#, 409, "exec needs a running instance"),
        ("nobody", r#"{"command":["true"]}"#, 404, "no instance named `nobody`"),
    ] {
        let (code, e) = unix(&lab, "POST", &format!("/v1/instances/{name}/exec"), body);
        assert_eq!(code, want_code, "{body}: {e}");
        assert!(e["error"].as_str().unwrap().contains(needle), "{body}: {e}");
    }
}
