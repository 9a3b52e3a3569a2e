//! A QMP client: JSON lines over a unix socket, synchronous, with a timeout on every call.
//!
//! Written here rather than taken from a crate: the `qapi` crate generates every QMP type from
//! QEMU's schema (thousands of items) and is built around its own codec, while isla needs a
//! dozen commands with a deadline each; the protocol itself is one JSON object per line
//! (QEMU's `docs/interop/qmp-spec.rst`): a greeting, `qmp_capabilities`, then commands tagged
//! with an `id`, answered by `return` or `error`, with asynchronous `event`s in between.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{QemuError, Result};

/// Longest line accepted from QEMU (a `query-block` of many disks stays far below).
const MAX_LINE: u64 = 16 << 20;

/// An asynchronous QMP event (STOP, RESUME, SHUTDOWN, POWERDOWN...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    /// Seconds and microseconds since the epoch, as QEMU stamped it.
    #[serde(default)]
    pub timestamp: Value,
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    /// QEMU's run state: running, paused, internal-error, guest-panicked, restore-vm...
    pub status: String,
    pub running: bool,
}

/// One snapshot as `query-block` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockSnapshot {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u64,
    #[serde(default)]
    pub vm_clock_sec: u64,
}

/// One block device of `query-block` (the fields isla uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    pub device: String,
    #[serde(default)]
    pub removable: bool,
    #[serde(default)]
    pub inserted: Option<BlockInserted>,
}

/// The medium of a [`BlockInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInserted {
    pub file: String,
    pub ro: bool,
    pub drv: String,
    #[serde(default)]
    pub image: Option<BlockImage>,
}

/// The image of a [`BlockInserted`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockImage {
    pub filename: String,
    pub format: String,
    #[serde(default)]
    pub backing_filename: Option<String>,
    #[serde(default)]
    pub snapshots: Vec<BlockSnapshot>,
}

/// `query-vnc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VncInfo {
    pub enabled: bool,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub family: Option<String>,
}

/// A connection to a QEMU monitor in control mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
    next_id: u64,
    events: Vec<QmpEvent>,
    greeting: Value,
    /// Set when a call timed out or the stream broke: the next answer could belong to the old call.
    broken: bool,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities; `timeout` bounds each call.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self> {
        let writer = UnixStream::connect(socket).map_err(|e| QemuError::io(socket, "connect to QMP socket", e))?;
        let reader = BufReader::new(writer.try_clone().map_err(|e| QemuError::io(socket, "clone QMP socket", e))?);
        let mut q =
            Qmp { reader, writer, timeout, next_id: 1, events: Vec::new(), greeting: Value::Null, broken: false };
        let deadline = Instant::now() + timeout;
        let greeting = q.read_message("greeting", deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::QmpProtocol {
                command: "greeting".into(),
                msg: format!("not a QMP greeting: {greeting}"),
            });
        }
        q.greeting = greeting;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The greeting (`{"QMP": {"version": ..., "capabilities": [...]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU's version as `major.minor.micro`, from the greeting.
    pub fn qemu_version(&self) -> Option<String> {
        let v = self.greeting.pointer("/QMP/version/qemu")?;
        Some(format!("{}.{}.{}", v.get("major")?, v.get("minor")?, v.get("micro")?))
    }

    /// Runs a command and returns its `return` value; events read meanwhile are kept.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        if self.broken {
            return Err(QemuError::QmpProtocol {
                command: command.into(),
                msg: "the connection is unusable after an earlier timeout or error; connect again".into(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let deadline = Instant::now() + self.timeout;
        self.writer.set_write_timeout(Some(self.timeout)).map_err(|e| self.fail(command, e))?;
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            return Err(self.fail(command, e));
        }
        loop {
            let m = self.read_message(command, deadline)?;
            if m.get("event").is_some() {
                match serde_json::from_value::<QmpEvent>(m) {
                    Ok(ev) => self.events.push(ev),
                    Err(e) => tracing::warn!("QMP: ignoring a malformed event: {e}"),
                }
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // an answer to an older call of this connection
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(QemuError::Qmp { command: command.into(), class: s("class"), desc: s("desc") });
            }
            return Err(QemuError::QmpProtocol { command: command.into(), msg: format!("unexpected message: {m}") });
        }
    }

    fn fail(&mut self, command: &str, e: std::io::Error) -> QemuError {
        self.broken = true;
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            QemuError::QmpTimeout { command: command.into(), timeout: self.timeout }
        } else {
            QemuError::QmpProtocol { command: command.into(), msg: e.to_string() }
        }
    }

    /// Reads one JSON line before `deadline`.
    fn read_message(&mut self, command: &str, deadline: Instant) -> Result<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.broken = true;
            return Err(QemuError::QmpTimeout { command: command.into(), timeout: self.timeout });
        }
        if let Err(e) = self.reader.get_ref().set_read_timeout(Some(left)) {
            return Err(self.fail(command, e));
        }
        let mut line = String::new();
        match (&mut self.reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) => {
                self.broken = true;
                Err(QemuError::QmpProtocol {
                    command: command.into(),
                    msg: "QEMU closed the monitor connection".into(),
                })
            }
            Ok(_) if !line.ends_with('\n') => {
                self.broken = true;
                Err(QemuError::QmpProtocol { command: command.into(), msg: "over-long or truncated line".into() })
            }
            Ok(_) => serde_json::from_str(&line).map_err(|e| {
                self.broken = true;
                QemuError::QmpProtocol { command: command.into(), msg: format!("not JSON ({e}): {}", line.trim_end()) }
            }),
            Err(e) => Err(self.fail(command, e)),
        }
    }

    /// Events received so far (oldest first).
    pub fn events(&self) -> &[QmpEvent] {
        &self.events
    }

    /// Takes the events received so far.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        std::mem::take(&mut self.events)
    }

    /// Waits until event `name` arrives (or was already received), for at most `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e.event == name) {
                return Ok(self.events.remove(i));
            }
            let what = format!("wait for event {name}");
            let m = self.read_message(&what, deadline).map_err(|e| match e {
                QemuError::QmpTimeout { command, .. } => QemuError::QmpTimeout { command, timeout },
                e => e,
            })?;
            if m.get("event").is_some() {
                if let Ok(ev) = serde_json::from_value::<QmpEvent>(m) {
                    self.events.push(ev);
                }
            }
        }
    }

    fn unit(&mut self, command: &str) -> Result<()> {
        self.execute(command, None).map(|_| ())
    }

    fn typed<T: serde::de::DeserializeOwned>(&mut self, command: &str) -> Result<T> {
        let v = self.execute(command, None)?;
        serde_json::from_value(v)
            .map_err(|e| QemuError::QmpProtocol { command: command.into(), msg: format!("unexpected answer: {e}") })
    }

    pub fn query_status(&mut self) -> Result<RunStatus> {
        self.typed("query-status")
    }

    /// Pauses the vCPUs.
    pub fn stop(&mut self) -> Result<()> {
        self.unit("stop")
    }

    /// Resumes the vCPUs.
    pub fn cont(&mut self) -> Result<()> {
        self.unit("cont")
    }

    /// Presses the ACPI power button (the guest decides what to do).
    pub fn system_powerdown(&mut self) -> Result<()> {
        self.unit("system_powerdown")
    }

    /// Resets the machine (with `-no-reboot`, QEMU exits instead).
    pub fn system_reset(&mut self) -> Result<()> {
        self.unit("system_reset")
    }

    /// Ends QEMU at once (like pulling the plug, but QEMU flushes its disks).
    pub fn quit(&mut self) -> Result<()> {
        match self.unit("quit") {
            // QEMU may close the socket before the answer arrives.
            Err(QemuError::QmpProtocol { msg, .. }) if msg.contains("closed") => Ok(()),
            r => r,
        }
    }

    pub fn query_block(&mut self) -> Result<Vec<BlockInfo>> {
        self.typed("query-block")
    }

    pub fn query_vnc(&mut self) -> Result<VncInfo> {
        self.typed("query-vnc")
    }

    /// Runs a human-monitor (HMP) command and returns its text output.
    pub fn human_monitor_command(&mut self, line: &str) -> Result<String> {
        let v = self.execute("human-monitor-command", Some(json!({ "command-line": line })))?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// HMP commands that print nothing on success and an error message on failure.
    fn hmp_silent(&mut self, line: &str) -> Result<()> {
        let out = self.human_monitor_command(line)?;
        let out = out.trim();
        if out.is_empty() {
            Ok(())
        } else {
            Err(QemuError::Monitor { command: line.into(), msg: out.trim_start_matches("Error: ").to_string() })
        }
    }

    /// `savevm NAME`: internal snapshot of every writable disk plus the VM state (RAM, devices)
    /// into the first qcow2 disk. The VM pauses while it is written. A name in use is replaced.
    pub fn savevm(&mut self, name: &str) -> Result<()> {
        self.hmp_silent(&format!("savevm {name}"))
    }

    /// `loadvm NAME`: returns disks and VM state to the snapshot.
    pub fn loadvm(&mut self, name: &str) -> Result<()> {
        self.hmp_silent(&format!("loadvm {name}"))
    }

    /// `delvm NAME` (QEMU says nothing when the name does not exist).
    pub fn delvm(&mut self, name: &str) -> Result<()> {
        self.hmp_silent(&format!("delvm {name}"))
    }

    /// `info snapshots`: QEMU's text table of the snapshots present on all disks.
    pub fn info_snapshots(&mut self) -> Result<String> {
        self.human_monitor_command("info snapshots")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted peer speaking QMP on a real socket: the client's framing, ids, events and
    /// errors are exercised without QEMU (the real QEMU is exercised in tests/boot.rs).
    fn peer(
        script: impl FnOnce(&mut BufReader<UnixStream>, &mut UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}}, \"capabilities\": []}}\n").unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"), "{line}");
            let id: Value = serde_json::from_str(&line).unwrap();
            s.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", id["id"]).as_bytes()).unwrap();
            script(&mut r, &mut s);
        });
        (dir, path)
    }

    fn next_id(r: &mut BufReader<UnixStream>) -> (String, Value) {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        (v["execute"].as_str().unwrap().to_string(), v["id"].clone())
    }

    #[test]
    fn events_errors_and_stale_ids() {
        let (_d, path) = peer(|r, s| {
            let (cmd, id) = next_id(r);
            assert_eq!(cmd, "stop");
            s.write_all(b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n").unwrap();
            s.write_all(b"{\"return\": {}, \"id\": 999}\n").unwrap();
            s.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes()).unwrap();
            let (cmd, id) = next_id(r);
            assert_eq!(cmd, "cont");
            let e = format!("{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"nope\"}}, \"id\": {id}}}\n");
            s.write_all(e.as_bytes()).unwrap();
            let (_, id) = next_id(r);
            s.write_all(
                format!("{{\"return\": \"Error: Snapshot 'x' does not exist\\r\\n\", \"id\": {id}}}\n").as_bytes(),
            )
            .unwrap();
            let (_, _) = next_id(r);
            // No answer: the client times out.
            std::thread::sleep(Duration::from_millis(800));
        });
        let mut q = Qmp::connect(&path, Duration::from_millis(300)).unwrap();
        assert_eq!(q.qemu_version().as_deref(), Some("10.0.2"));
        q.stop().unwrap();
        assert_eq!(q.events().len(), 1);
        assert_eq!(q.wait_event("STOP", Duration::from_millis(10)).unwrap().event, "STOP");
        let e = q.cont().unwrap_err().to_string();
        assert_eq!(e, "QMP `cont` failed: GenericError: nope");
        let e = q.loadvm("x").unwrap_err().to_string();
        assert_eq!(e, "`loadvm x` failed: Snapshot 'x' does not exist");
        let e = q.query_status().unwrap_err();
        assert!(matches!(e, QemuError::QmpTimeout { .. }), "{e}");
        assert!(q.query_status().unwrap_err().to_string().contains("connect again"));
    }

    #[test]
    fn not_qmp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"SSH-2.0-OpenSSH\n").unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let e = Qmp::connect(&path, Duration::from_secs(2)).err().unwrap().to_string();
        assert!(e.contains("greeting") && e.contains("not JSON"), "{e}");
        let e = Qmp::connect(&dir.path().join("missing"), Duration::from_secs(1)).err().unwrap().to_string();
        assert!(e.contains("connect to QMP socket"), "{e}");
    }
}
