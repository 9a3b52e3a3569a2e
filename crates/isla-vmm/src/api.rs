//! The monitor's API socket: HTTP/1.1 over a unix socket, the run-time subset of Firecracker's
//! API, so the tools that drive a Firecracker microVM (`curl --unix-socket`, SDKs) drive this one.
//!
//! | Request | Effect |
//! | --- | --- |
//! | `GET /` | instance information (`id`, `state`, `vmm_version`, `app_name`) |
//! | `GET /machine-config` | `vcpu_count`, `mem_size_mib` |
//! | `GET /balloon` | the balloon's configuration with its current target, and `actual_mib` |
//! | `PATCH /balloon` `{"amount_mib": N}` | a new target: the guest inflates or deflates |
//! | `GET /balloon/statistics` | the latest statistics the guest reported |
//!
//! `PUT /actions` answers `SendCtrlAltDel` with a fault: the monitor has no keyboard controller
//! to send it through (its i8042 is the reset line only); a guest is stopped from inside
//! (`poweroff`) or by SIGTERM to the monitor, which ends the run cleanly. Errors are Firecracker's: a status (400, 404, 405) and `{"fault_message": "..."}`. The
//! configuration-before-boot half of Firecracker's API (`PUT /boot-source`, `/drives`, ...) is
//! `--config-file` here.
//!
//! Written by hand: the server needs one request at a time on a unix socket, from one thread that
//! must not bring an async runtime into the monitor's process (its memory is what isla
//! measures); the HTTP crates that fit (hyper, axum) need tokio, and the small blocking ones listen
//! on TCP only. Requests are bounded (16 KiB of head, 64 KiB of body) and parsed strictly.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use isla_virtio::balloon::{BalloonConfig, BalloonHandle};
use serde_json::{json, Value};

use crate::state::VmShared;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

/// What the API serves.
pub struct ApiContext {
    pub shared: Arc<VmShared>,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub balloon: Option<(BalloonConfig, BalloonHandle)>,
}

/// The listening socket; the file is removed on drop.
pub struct ApiServer {
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket file, never another kind of file) with mode 0600
    /// and serves on a thread of its own.
    pub fn start(path: &Path, ctx: ApiContext) -> io::Result<ApiServer> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        std::thread::Builder::new().name("isla-api".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                if let Err(e) = serve_connection(stream, &ctx) {
                    tracing::debug!("api: connection ended: {e}");
                }
            }
        })?;
        Ok(ApiServer { path: path.to_path_buf() })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    pub close: bool,
}

/// A response: status and JSON body (none for 204).
#[derive(Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Value>,
}

impl Response {
    fn ok(body: Value) -> Self {
        Response { status: 200, body: Some(body) }
    }
    fn no_content() -> Self {
        Response { status: 204, body: None }
    }
    fn fault(status: u16, msg: impl Into<String>) -> Self {
        Response { status, body: Some(json!({ "fault_message": msg.into() })) }
    }
}

fn serve_connection(stream: UnixStream, ctx: &ApiContext) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let (resp, close) = match read_request(&mut reader) {
            Ok(None) => return Ok(()),
            Ok(Some(req)) => (handle(ctx, &req), req.close),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => (Response::fault(400, e.to_string()), true),
            Err(e) => return Err(e),
        };
        write_response(&mut writer, &resp)?;
        if close {
            return Ok(());
        }
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one request; `None` at a clean end of the connection.
pub fn read_request(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r.by_ref().take((MAX_HEAD + 1 - head.len().min(MAX_HEAD)) as u64).read_until(b'\n', &mut line)?;
        if n == 0 {
            return if head.is_empty() { Ok(None) } else { Err(bad("the request ended inside its head")) };
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(bad(format!("request head over {MAX_HEAD} bytes")));
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let text = std::str::from_utf8(&head).map_err(|_| bad("request head is not UTF-8"))?;
    let mut lines = text.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!("malformed request line `{request_line}`")));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad(format!("unsupported HTTP version `{version}`")));
    }
    let mut len = 0usize;
    let mut close = version == "HTTP/1.0";
    for h in lines.filter(|l| !l.is_empty()) {
        let (name, value) = h.split_once(':').ok_or_else(|| bad(format!("malformed header `{h}`")))?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                len = value.parse().map_err(|_| bad(format!("bad Content-Length `{value}`")))?;
                if len > MAX_BODY {
                    return Err(bad(format!("body over {MAX_BODY} bytes")));
                }
            }
            "transfer-encoding" => return Err(bad("chunked bodies are not supported; send Content-Length")),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(Request { method: method.to_string(), path: path.to_string(), body, close }))
}

fn write_response(w: &mut impl Write, resp: &Response) -> io::Result<()> {
    let reason = match resp.status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let body = resp.body.as_ref().map(|b| b.to_string()).unwrap_or_default();
    let mut out = format!("HTTP/1.1 {} {reason}\r\nServer: isla\r\n", resp.status);
    if resp.status != 204 {
        out.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    w.write_all(out.as_bytes())?;
    w.flush()
}

fn parse_body(req: &Request) -> Result<Value, Response> {
    serde_json::from_slice(&req.body).map_err(|e| Response::fault(400, format!("the body is not valid JSON: {e}")))
}

/// Answers one request.
pub fn handle(ctx: &ApiContext, req: &Request) -> Response {
    let path = req.path.split('?').next().unwrap_or_default().trim_end_matches('/');
    let method = req.method.as_str();
    match (method, path) {
        ("GET", "") => Response::ok(json!({
            "id": "isla",
            "state": if ctx.shared.should_stop() { "Stopping" } else { "Running" },
            "vmm_version": env!("CARGO_PKG_VERSION"),
            "app_name": "isla",
        })),
        ("GET", "/machine-config") => Response::ok(json!({
            "vcpu_count": ctx.vcpus,
            "mem_size_mib": ctx.memory_mib,
            "smt": false,
        })),
        ("GET", "/balloon") => match &ctx.balloon {
            None => Response::fault(400, "this VM has no balloon device (start it with --balloon)"),
            Some((cfg, h)) => Response::ok(json!({
                "amount_mib": h.target_mib(),
                "actual_mib": h.actual_mib(),
                "deflate_on_oom": cfg.deflate_on_oom,
                "stats_polling_interval_s": cfg.stats_polling_interval_s,
                "free_page_reporting": cfg.free_page_reporting,
            })),
        },
        ("PATCH", "/balloon") => {
            let Some((_, h)) = &ctx.balloon else {
                return Response::fault(400, "this VM has no balloon device (start it with --balloon)");
            };
            let body = match parse_body(req) {
                Ok(b) => b,
                Err(r) => return r,
            };
            let Some(obj) = body.as_object() else { return Response::fault(400, "the body must be a JSON object") };
            if let Some(k) = obj.keys().find(|k| k.as_str() != "amount_mib") {
                return Response::fault(400, format!("unknown field `{k}` (PATCH /balloon takes amount_mib)"));
            }
            let Some(mib) = obj.get("amount_mib").and_then(Value::as_u64) else {
                return Response::fault(400, "amount_mib: a whole number of MiB is required");
            };
            if mib > ctx.memory_mib {
                return Response::fault(
                    400,
                    format!("amount_mib {mib} is more than the guest's memory ({} MiB)", ctx.memory_mib),
                );
            }
            match h.set_target_mib(mib as u32) {
                Ok(()) => Response::no_content(),
                Err(e) => Response::fault(400, format!("telling the guest: {e}")),
            }
        }
        ("GET", "/balloon/statistics") => match &ctx.balloon {
            None => Response::fault(400, "this VM has no balloon device (start it with --balloon)"),
            Some((cfg, _)) if cfg.stats_polling_interval_s == 0 => {
                Response::fault(400, "balloon statistics are off (start with --balloon MIB,stats=SECONDS)")
            }
            Some((_, h)) => {
                let mut v = serde_json::to_value(h.stats()).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.retain(|_, v| !v.is_null());
                    o.insert("target_mib".into(), json!(h.target_mib()));
                    o.insert("actual_mib".into(), json!(h.actual_mib()));
                    o.insert("target_pages".into(), json!(u64::from(h.target_mib()) * 256));
                    o.insert("actual_pages".into(), json!(u64::from(h.actual_mib()) * 256));
                    o.insert("discarded_pages".into(), json!(h.discarded_pages()));
                }
                Response::ok(v)
            }
        },
        ("PUT", "/actions") => {
            let body = match parse_body(req) {
                Ok(b) => b,
                Err(r) => return r,
            };
            match body.get("action_type").and_then(Value::as_str) {
                Some("SendCtrlAltDel") => Response::fault(
                    400,
                    "SendCtrlAltDel: this monitor has no keyboard controller; power the guest off from inside, \
                     or send SIGTERM to the monitor",
                ),
                Some("InstanceStart") => Response::fault(400, "the instance is already running"),
                Some(other) => Response::fault(400, format!("unsupported action_type `{other}` (SendCtrlAltDel)")),
                None => Response::fault(400, "action_type is required"),
            }
        }
        (_, "" | "/machine-config" | "/balloon" | "/balloon/statistics" | "/actions") => {
            Response::fault(405, format!("{method} is not allowed on {}", req.path))
        }
        _ => Response::fault(404, format!("no such resource: {}", req.path)),
    }
}

/// A client for the API socket: sends one request, returns the status and the parsed body
/// (`Value::Null` when there is none).
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> io::Result<(u16, Value)> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        io::Error::new(e.kind(), format!("{}: {e} (is the microVM running with --api-sock?)", socket.display()))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| bad("the response has no end of head"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("malformed status line in `{head}`")))?;
    let value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).map_err(|e| bad(format!("response body: {e}")))?
    };
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(balloon: bool) -> ApiContext {
        ApiContext {
            shared: Arc::new(VmShared::new(0)),
            vcpus: 2,
            memory_mib: 256,
            balloon: balloon.then(|| {
                let cfg = BalloonConfig { amount_mib: 0, stats_polling_interval_s: 1, ..Default::default() };
                let b = isla_virtio::balloon::Balloon::new(cfg.clone());
                (cfg, b.handle())
            }),
        }
    }

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request { method: method.into(), path: path.into(), body: body.as_bytes().to_vec(), close: true }
    }

    #[test]
    fn parses_requests_with_and_without_bodies() {
        let raw = b"PATCH /balloon HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"amount_mib\": 6}GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut r = BufReader::new(&raw[..]);
        let a = read_request(&mut r).unwrap().unwrap();
        assert_eq!(
            (a.method.as_str(), a.path.as_str(), a.body.as_slice(), a.close),
            ("PATCH", "/balloon", &b"{\"amount_mib\": 6}"[..], false)
        );
        let b = read_request(&mut r).unwrap().unwrap();
        assert_eq!((b.method.as_str(), b.close), ("GET", true));
        assert!(read_request(&mut r).unwrap().is_none());
    }

    #[test]
    fn rejects_malformed_and_oversized_requests() {
        for raw in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/2\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nno-colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x",
        ] {
            let e = read_request(&mut BufReader::new(raw)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{raw:?}: {e}");
        }
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert!(read_request(&mut BufReader::new(&huge[..])).is_err());
    }

    #[test]
    fn balloon_requests_set_the_target_and_check_their_input() {
        let c = ctx(true);
        assert_eq!(handle(&c, &req("PATCH", "/balloon", r#"{"amount_mib": 64}"#)).status, 204);
        let r = handle(&c, &req("GET", "/balloon", ""));
        assert_eq!(r.body.unwrap()["amount_mib"], 64);
        for body in [r#"{"amount_mib": 999}"#, r#"{"amount_mib": -1}"#, r#"{"amount": 1}"#, "not json", "[]"] {
            let r = handle(&c, &req("PATCH", "/balloon", body));
            assert_eq!(r.status, 400, "{body}");
            assert!(r.body.unwrap()["fault_message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let stats = handle(&c, &req("GET", "/balloon/statistics", "")).body.unwrap();
        assert_eq!(stats["target_mib"], 64);
        assert_eq!(stats["target_pages"], 64 * 256);
    }

    #[test]
    fn unknown_paths_methods_and_devices_get_faults() {
        let c = ctx(false);
        assert_eq!(handle(&c, &req("GET", "/nope", "")).status, 404);
        assert_eq!(handle(&c, &req("DELETE", "/balloon", "")).status, 405);
        assert_eq!(handle(&c, &req("GET", "/balloon", "")).status, 400);
        assert_eq!(handle(&c, &req("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#)).status, 400);
        assert_eq!(handle(&c, &req("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#)).status, 400);
        let info = handle(&c, &req("GET", "/", "")).body.unwrap();
        assert_eq!(info["state"], "Running");
        assert_eq!(handle(&c, &req("GET", "/machine-config", "")).body.unwrap()["vcpu_count"], 2);
    }

    #[test]
    fn serves_over_a_unix_socket() {
        let dir = std::env::temp_dir().join(format!("isla-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let server = ApiServer::start(&sock, ctx(true)).unwrap();
        let (status, _) = call(&sock, "PATCH", "/balloon", Some(&json!({"amount_mib": 32}))).unwrap();
        assert_eq!(status, 204);
        let (status, v) = call(&sock, "GET", "/balloon", None).unwrap();
        assert_eq!((status, v["amount_mib"].as_u64()), (200, Some(32)));
        drop(server);
        assert!(!sock.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
