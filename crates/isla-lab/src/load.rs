//! Network clients run from the host side: a bounded HTTP load generator (written here: it must
//! enter a network namespace per worker thread, count and time-bound itself, and keep every
//! latency, which the common load tools do not do together) and the `iperf3` client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::host::run_bounded;
use crate::stats::percentile;

/// Bounds of one HTTP load run.
#[derive(Debug, Clone)]
pub struct HttpLoad {
    pub addr: SocketAddr,
    pub path: String,
    /// Concurrent connections (one worker thread each).
    pub concurrency: usize,
    /// At most this many requests in all.
    pub max_requests: u64,
    /// And at most this long.
    pub max_time: Duration,
    /// Run the workers in this network namespace (a file under /run/netns or /proc/PID/ns/net).
    pub netns: Option<PathBuf>,
}

/// What one HTTP load run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpResult {
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub requests_per_s: f64,
    /// Latency of every successful request, ms.
    pub latencies_ms: Vec<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

fn enter_netns(path: &Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns {}: {e}", path.display()))
}

/// One HTTP/1.0 GET; Ok(latency) on a 200 answer.
fn get(addr: SocketAddr, path: &str) -> Result<Duration, String> {
    let t = Instant::now();
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    // One write: `write!` would send each formatted piece on its own.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", addr.ip());
    s.write_all(request.as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).map_err(|e| format!("receive: {e}"))?;
    let head = String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned();
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answer {:?}", head.lines().next().unwrap_or("")));
    }
    Ok(t.elapsed())
}

/// Runs the load: `concurrency` workers, each in the namespace, until the count or time bound.
pub fn http(load: &HttpLoad) -> Result<HttpResult, String> {
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..load.concurrency.max(1))
        .map(|_| {
            let (l, issued) = (load.clone(), issued.clone());
            std::thread::spawn(move || -> Result<(Vec<f64>, u64, Option<String>), String> {
                if let Some(ns) = &l.netns {
                    enter_netns(ns)?;
                }
                let (mut lat, mut errors, mut first) = (Vec::new(), 0u64, None);
                while issued.fetch_add(1, Ordering::Relaxed) < l.max_requests && start.elapsed() < l.max_time {
                    match get(l.addr, &l.path) {
                        Ok(d) => lat.push(d.as_secs_f64() * 1000.0),
                        Err(e) => {
                            errors += 1;
                            first.get_or_insert(e);
                        }
                    }
                }
                Ok((lat, errors, first))
            })
        })
        .collect();
    let (mut lat, mut errors, mut first_error) = (Vec::new(), 0, None);
    for w in workers {
        let (l, e, f) = w.join().map_err(|_| "a load worker panicked".to_string())??;
        lat.extend(l);
        errors += e;
        first_error = first_error.or(f);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(HttpResult {
        requests: lat.len() as u64,
        errors,
        first_error,
        seconds,
        requests_per_s: lat.len() as f64 / seconds.max(1e-9),
        p50_ms: percentile(&sorted, 50.0),
        p90_ms: percentile(&sorted, 90.0),
        p99_ms: percentile(&sorted, 99.0),
        latencies_ms: lat,
    })
}

/// `iperf3 -c ADDR -t SECONDS -J` run in the namespace (through nsenter); Mbit/s received.
pub fn iperf3(netns: Option<&Path>, addr: &str, seconds: u64) -> Result<f64, String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("iperf3");
            c
        }
        None => Command::new("iperf3"),
    };
    cmd.args(["-c", addr, "-p", "5201", "-J", "--connect-timeout", "5000", "-t", &seconds.to_string()]);
    let limit = seconds + 30;
    let out = run_bounded(&mut cmd, Duration::from_secs(limit)).map_err(|e| match e {
        crate::Error::Timeout(_) => {
            format!("iperf3 -c -t {seconds} had not finished after {limit} s (the transfer stalled)")
        }
        e => e.to_string(),
    })?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        format!("iperf3 printed no JSON ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim())
    })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3: {e}"));
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(|b| b.as_f64())
        .map(|b| b / 1e6)
        .ok_or_else(|| "iperf3's JSON has no end.sum_received".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn loads_a_real_server_and_counts_errors() {
        // A real HTTP server on loopback: answers 200 to /ok and 404 to the rest.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                // Read the whole request first: closing with unread bytes would reset the connection.
                let mut req = Vec::new();
                let mut buf = [0u8; 512];
                while !req.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let ok = req.starts_with(b"GET /ok ");
                let status = if ok { "200 OK" } else { "404 Not Found" };
                let _ = write!(s, "HTTP/1.0 {status}\r\nContent-Length: 2\r\n\r\nhi");
            }
        });
        let mut load = HttpLoad {
            addr,
            path: "/ok".into(),
            concurrency: 3,
            max_requests: 60,
            max_time: Duration::from_secs(30),
            netns: None,
        };
        let r = http(&load).unwrap();
        assert_eq!((r.requests, r.errors), (60, 0));
        assert_eq!(r.latencies_ms.len(), 60);
        assert!(r.p50_ms.unwrap() <= r.p99_ms.unwrap());
        load.path = "/missing".into();
        load.max_requests = 5;
        let r = http(&load).unwrap();
        assert_eq!((r.requests, r.errors), (0, 5));
        assert!(r.first_error.unwrap().contains("404"));
        assert_eq!(r.p50_ms, None);
    }
}
