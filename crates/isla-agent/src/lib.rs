//! `isla-agent`: the small agent that runs inside an isla microVM, and the host's client for it.
//!
//! The agent (binary `isla-agent`, statically linked, shipped in the guest kit) listens on vsock
//! port [`AGENT_PORT`]. The host reaches it through the monitor's hybrid vsock unix socket, as with
//! Firecracker: connect to the socket, write `CONNECT <port>\n`, read `OK <n>\n`, then talk.
//!
//! The protocol is one JSON object per line each way ([`Request`], [`Response`]): run a command
//! and collect its exit status and output ([`Request::Exec`]), or report the guest's memory,
//! uptime and load ([`Request::Info`]). Output is returned as text (invalid UTF-8 is replaced),
//! capped at [`MAX_OUTPUT`] bytes per stream.
//!
//! [`seed`] is the seed disk of a container image booted as a microVM: the run file the host
//! writes (what to run, as whom, where) and the status sector the guest writes back; the agent
//! binary's `--image` mode runs that process in the image's root and serves the agent there.
//!
//! Written by hand: the protocol is a few lines of serde, and the guest side must stay one small
//! static binary without an async runtime (no gRPC/ttrpc stack as Kata's agent uses).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod seed;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 52;
/// Bytes of each output stream kept; the rest is dropped and `truncated` is set.
pub const MAX_OUTPUT: usize = 16 << 20;
/// Longest request line accepted.
pub const MAX_REQUEST: usize = 1 << 20;

/// A request from the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check.
    Ping,
    /// Run a program and wait for it.
    Exec {
        /// Program and arguments (`argv[0]` is looked up in PATH).
        argv: Vec<String>,
        /// Extra environment variables, `NAME=value`.
        #[serde(default)]
        env: Vec<String>,
        /// Bytes for the program's standard input (empty: /dev/null).
        #[serde(default)]
        stdin: String,
        /// Kill the program after this many seconds (0: no limit).
        #[serde(default)]
        timeout_s: u64,
    },
    /// Memory, uptime and load of the guest.
    Info,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong {
        /// Agent version.
        version: String,
    },
    /// A finished program.
    Exited(ExecResult),
    /// Answer to [`Request::Info`].
    Info(GuestInfo),
    /// The request could not be carried out.
    Error {
        /// Why.
        message: String,
    },
}

/// How a program ended and what it printed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Killed by the agent because the timeout passed.
    pub timed_out: bool,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
    /// Output beyond [`MAX_OUTPUT`] was dropped.
    pub truncated: bool,
    /// Wall time inside the guest, in milliseconds.
    pub duration_ms: u64,
}

/// The guest's view of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Seconds since the guest kernel started (`/proc/uptime`).
    pub uptime_s: f64,
    /// `MemTotal` in KiB.
    pub mem_total_kib: u64,
    /// `MemFree` in KiB.
    pub mem_free_kib: u64,
    /// `MemAvailable` in KiB.
    pub mem_available_kib: u64,
    /// Online CPUs.
    pub cpus: u32,
    /// One-minute load average.
    pub load1: f64,
    /// Kernel release.
    pub kernel: String,
}

/// Errors of the host-side client.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The vsock socket could not be reached.
    #[error("{path}: {source} (is the microVM running with a vsock device?)")]
    Connect {
        /// The monitor's vsock unix socket.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// The monitor refused the CONNECT or nobody listens on the port in the guest.
    #[error("vsock handshake: {0}")]
    Handshake(String),
    /// I/O on an established connection.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// The agent sent something that is not a response.
    #[error("agent sent an invalid response: {0}")]
    Protocol(String),
    /// The agent answered with an error.
    #[error("agent: {0}")]
    Remote(String),
}

/// A connection to the agent of one microVM.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects through the monitor's hybrid vsock socket at `uds` to the agent's port.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let stream = UnixStream::connect(uds)
            .map_err(|source| AgentError::Connect { path: uds.display().to_string(), source })?;
        stream.set_read_timeout(Some(timeout))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        writer.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| AgentError::Handshake(e.to_string()))?;
        if !line.starts_with("OK ") {
            return Err(AgentError::Handshake(if line.is_empty() {
                format!("the connection closed: no agent listening on vsock port {AGENT_PORT}?")
            } else {
                format!("unexpected reply {:?}", line.trim_end())
            }));
        }
        Ok(Client { reader, writer })
    }

    /// Sends one request and reads its response; `timeout` bounds the wait for the answer.
    pub fn call(&mut self, req: &Request, timeout: Duration) -> Result<Response, AgentError> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let mut line = serde_json::to_string(req).map_err(|e| AgentError::Protocol(e.to_string()))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(AgentError::Protocol("the agent closed the connection".into()));
        }
        match serde_json::from_str(&answer) {
            Ok(Response::Error { message }) => Err(AgentError::Remote(message)),
            Ok(r) => Ok(r),
            Err(e) => Err(AgentError::Protocol(format!("{e}: {:?}", answer.trim_end()))),
        }
    }
}

/// Serves one connection: reads requests line by line until the peer closes.
pub fn serve<S: Read + Write>(stream: S) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = reader.by_ref().take(MAX_REQUEST as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let response = if line.len() > MAX_REQUEST {
            Response::Error { message: format!("request longer than {MAX_REQUEST} bytes") }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => handle(&req),
                Err(e) => Response::Error { message: format!("invalid request: {e}") },
            }
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|e| {
            format!("{{\"status\":\"error\",\"message\":\"cannot encode the response: {e}\"}}").into_bytes()
        });
        out.push(b'\n');
        reader.get_mut().write_all(&out)?;
        if line.len() > MAX_REQUEST {
            return Ok(());
        }
    }
}

/// Carries out one request.
pub fn handle(req: &Request) -> Response {
    match req {
        Request::Ping => Response::Pong { version: env!("CARGO_PKG_VERSION").into() },
        Request::Info => match guest_info() {
            Ok(i) => Response::Info(i),
            Err(e) => Response::Error { message: format!("reading /proc: {e}") },
        },
        Request::Exec { argv, env, stdin, timeout_s } => match exec(argv, env, stdin, *timeout_s) {
            Ok(r) => Response::Exited(r),
            Err(e) => Response::Error { message: e },
        },
    }
}

fn exec(argv: &[String], env: &[String], stdin: &str, timeout_s: u64) -> Result<ExecResult, String> {
    let (prog, args) = argv.split_first().ok_or("exec: empty argv")?;
    let resolved = program(prog);
    let mut cmd = Command::new(&resolved[0]);
    cmd.args(&resolved[1..]).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_empty() { Stdio::null() } else { Stdio::piped() });
    for kv in env {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("exec: environment entry {kv:?} has no '='"))?;
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("exec {prog}: {e}"))?;
    let feeder = child.stdin.take().map(|mut pipe| {
        let data = stdin.as_bytes().to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let readers = [child.stdout.take().map(drain), child.stderr.take().map(drain)];
    let deadline = (timeout_s > 0).then(|| start + Duration::from_secs(timeout_s));
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            break status;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            let _ = child.kill();
            break child.wait().map_err(|e| format!("wait: {e}"))?;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let [out, err] = readers.map(|r| r.and_then(|h| h.join().ok()).unwrap_or_default());
    use std::os::unix::process::ExitStatusExt;
    Ok(ExecResult {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        truncated: out.1 || err.1,
        stdout: String::from_utf8_lossy(&out.0).into_owned(),
        stderr: String::from_utf8_lossy(&err.0).into_owned(),
        duration_ms: start.elapsed().as_millis() as u64,
    })
}

/// `prog` as given, or, for a bare name that is not in PATH, busybox's applet of that name (the
/// guest kit's initramfs has busybox without its applet links).
fn program(prog: &str) -> Vec<String> {
    const BUSYBOX: &str = "/bin/busybox";
    let in_path = |dir: &str| Path::new(dir).join(prog).exists();
    let path = std::env::var("PATH").unwrap_or_else(|_| "/bin:/sbin:/usr/bin:/usr/sbin".into());
    if prog.contains('/') || path.split(':').any(in_path) || !Path::new(BUSYBOX).exists() {
        vec![prog.to_string()]
    } else {
        vec![BUSYBOX.to_string(), prog.to_string()]
    }
}

/// Reads a pipe to its end on a thread, keeping at most [`MAX_OUTPUT`] bytes.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<(Vec<u8>, bool)> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut truncated = false;
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = MAX_OUTPUT - kept.len();
            kept.extend_from_slice(&buf[..n.min(room)]);
            truncated |= n > room;
        }
        (kept, truncated)
    })
}

fn guest_info() -> io::Result<GuestInfo> {
    let read = |p: &str| std::fs::read_to_string(p);
    let mut info = parse_meminfo(&read("/proc/meminfo")?);
    info.uptime_s = first_number(&read("/proc/uptime")?);
    info.load1 = first_number(&read("/proc/loadavg")?);
    info.kernel = read("/proc/sys/kernel/osrelease")?.trim().to_string();
    info.cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    Ok(info)
}

fn first_number(s: &str) -> f64 {
    s.split_whitespace().next().and_then(|w| w.parse().ok()).unwrap_or(0.0)
}

/// The memory fields of `/proc/meminfo` (everything else zero).
pub fn parse_meminfo(text: &str) -> GuestInfo {
    let mut info = GuestInfo {
        uptime_s: 0.0,
        mem_total_kib: 0,
        mem_free_kib: 0,
        mem_available_kib: 0,
        cpus: 0,
        load1: 0.0,
        kernel: String::new(),
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next().and_then(|v| v.parse::<u64>().ok())) else {
            continue;
        };
        match key {
            "MemTotal:" => info.mem_total_kib = value,
            "MemFree:" => info.mem_free_kib = value,
            "MemAvailable:" => info.mem_available_kib = value,
            _ => {}
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn roundtrip(requests: &[&str]) -> Vec<Response> {
        let (host, guest) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve(guest));
        let mut w = host.try_clone().unwrap();
        for r in requests {
            w.write_all(r.as_bytes()).unwrap();
            w.write_all(b"\n").unwrap();
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
        let out: Vec<Response> =
            BufReader::new(host).lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
        server.join().unwrap().unwrap();
        out
    }

    #[test]
    fn exec_passes_exit_codes_output_stdin_and_env() {
        let req = Request::Exec {
            argv: vec!["sh".into(), "-c".into(), "read x; echo \"$x-$V\"; echo err >&2; exit 7".into()],
            env: vec!["V=env".into()],
            stdin: "in\n".into(),
            timeout_s: 0,
        };
        let out = roundtrip(&[&serde_json::to_string(&req).unwrap()]);
        let Response::Exited(r) = &out[0] else { panic!("{out:?}") };
        assert_eq!((r.exit_code, r.signal, r.timed_out), (Some(7), None, false));
        assert_eq!(r.stdout, "in-env\n");
        assert_eq!(r.stderr, "err\n");
    }

    #[test]
    fn exec_timeout_kills_the_program() {
        let req =
            Request::Exec { argv: vec!["sleep".into(), "30".into()], env: vec![], stdin: String::new(), timeout_s: 1 };
        let Response::Exited(r) = handle(&req) else { panic!() };
        assert!(r.timed_out);
        assert_eq!(r.signal, Some(libc::SIGKILL));
    }

    #[test]
    fn bad_requests_get_errors_and_the_connection_goes_on() {
        let out = roundtrip(&[
            "not json",
            r#"{"op":"exec","argv":[]}"#,
            r#"{"op":"exec","argv":["/nonexistent"]}"#,
            r#"{"op":"ping"}"#,
        ]);
        assert_eq!(out.len(), 4);
        for (i, want) in ["invalid request", "empty argv", "/nonexistent"].iter().enumerate() {
            let Response::Error { message } = &out[i] else { panic!("{:?}", out[i]) };
            assert!(message.contains(want), "{message}");
        }
        assert!(matches!(out[3], Response::Pong { .. }));
    }

    #[test]
    fn oversized_request_is_refused() {
        let big = "x".repeat(MAX_REQUEST + 10);
        let out = roundtrip(&[&big]);
        let Response::Error { message } = &out[0] else { panic!() };
        assert!(message.contains("longer than"));
    }

    #[test]
    fn meminfo_and_info() {
        let i = parse_meminfo("MemTotal:  117252 kB\nMemFree: 100 kB\nMemAvailable: 90000 kB\nBuffers: 1 kB\n");
        assert_eq!((i.mem_total_kib, i.mem_free_kib, i.mem_available_kib), (117252, 100, 90000));
        let Response::Info(i) = handle(&Request::Info) else { panic!() };
        assert!(i.mem_total_kib > 0 && i.uptime_s > 0.0 && i.cpus >= 1 && !i.kernel.is_empty());
    }

    #[test]
    fn client_handshake_errors_are_clear() {
        let dir = std::env::temp_dir().join(format!("isla-agent-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("v.sock");
        let _ = std::fs::remove_file(&sock);
        let err = Client::connect(&sock, Duration::from_secs(1)).err().unwrap();
        assert!(err.to_string().contains("vsock device"), "{err}");
        // A monitor that closes the connection: nobody listens on the port.
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut b = [0u8; 64];
            let _ = s.read(&mut b);
        });
        let err = Client::connect(&sock, Duration::from_secs(5)).err().unwrap();
        assert!(err.to_string().contains("no agent listening"), "{err}");
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
