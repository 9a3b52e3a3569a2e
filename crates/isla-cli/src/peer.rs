//! Measuring a monitor process from the outside, the same way for isla and for a peer
//! (Firecracker): time from spawn to the guest kernel's first console line, the process's memory
//! beside guest RAM, and how the run ended. Used by `isla vm bench --firecracker`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What one external measurement saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcessSample {
    /// Spawn to the monitor's own "guest started" log line, ms.
    pub spawn_to_ready_ms: Option<f64>,
    /// Spawn to the first console line containing "Linux version", ms.
    pub spawn_to_kernel_banner_ms: Option<f64>,
    /// Spawn to the stop text (e.g. "Run /init"), ms.
    pub spawn_to_stop_text_ms: Option<f64>,
    /// Pss of the process minus its guest-RAM mappings, KiB: one second after the guest started
    /// (at rest), or the last sample before the process ended.
    pub overhead_pss_kib: Option<u64>,
    /// How the run ended: "exit N", "signal", or "stopped by the bench after N s".
    pub ended: String,
    /// Spawn to end, ms.
    pub wall_ms: f64,
    /// The last console and error lines.
    pub tail: Vec<String>,
}

/// Pss of a process outside mappings of at least `guest_bytes * 9 / 10` (guest RAM), KiB.
pub fn overhead_pss_kib(pid: u32, guest_bytes: u64) -> Option<u64> {
    let is_guest = |start: u64, end: u64| end.saturating_sub(start) >= guest_bytes / 10 * 9;
    isla_vmm::host::pss_split_of(&format!("/proc/{pid}/smaps"), is_guest).map(|p| p.vmm_kib)
}

fn stop(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` (console on its stdout), stopping it when `stop_text` appears or after `limit`.
/// `ready_text` is the monitor's log line saying the guest has started.
pub fn measure(
    mut cmd: Command,
    guest_bytes: u64,
    ready_text: &str,
    stop_text: &str,
    limit: Duration,
) -> Result<ProcessSample> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    for pipe in [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1000.0;
    let (mut ready, mut banner, mut stopped_at, mut pss) = (None, None, None, None);
    let mut at_rest = false;
    let mut last_sample = Instant::now();
    let mut tail: Vec<String> = Vec::new();
    let ended = loop {
        while let Ok((t, line)) = rx.try_recv() {
            if ready.is_none() && line.contains(ready_text) {
                ready = Some(t);
            }
            if banner.is_none() && line.contains("Linux version") {
                banner = Some(t);
            }
            if stopped_at.is_none() && line.contains(stop_text) {
                stopped_at = Some(t);
            }
            tail.push(line);
            if tail.len() > 15 {
                tail.remove(0);
            }
        }
        // Memory at rest: one second after the guest started; until then, keep the latest sample
        // (every 250 ms) so that a monitor that dies early still has one.
        if !at_rest {
            if ready.or(banner).is_some_and(|r| r.elapsed() >= Duration::from_secs(1)) {
                pss = overhead_pss_kib(child.id(), guest_bytes).or(pss);
                at_rest = true;
            } else if last_sample.elapsed() >= Duration::from_millis(250) {
                pss = overhead_pss_kib(child.id(), guest_bytes).or(pss);
                last_sample = Instant::now();
            }
        }
        if let Some(status) = child.try_wait()? {
            break match status.code() {
                Some(c) => format!("exit {c}"),
                None => "signal".to_string(),
            };
        }
        if stopped_at.is_some() {
            stop(&mut child);
            break format!("stopped by the bench at {stop_text:?}");
        }
        if start.elapsed() > limit {
            stop(&mut child);
            break format!("stopped by the bench after {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let wall_ms = ms(Instant::now());
    std::thread::sleep(Duration::from_millis(50));
    while let Ok((_, line)) = rx.try_recv() {
        tail.push(line);
    }
    let skip = tail.len().saturating_sub(15);
    Ok(ProcessSample {
        spawn_to_ready_ms: ready.map(ms),
        spawn_to_kernel_banner_ms: banner.map(ms),
        spawn_to_stop_text_ms: stopped_at.map(ms),
        overhead_pss_kib: pss,
        ended,
        wall_ms,
        tail: tail.split_off(skip),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_real_process() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; echo 'Linux version 1'; sleep 1.5; echo 'Run /init'; sleep 5"]);
        let s = measure(cmd, 1 << 30, "started", "Run /init", Duration::from_secs(20)).unwrap();
        assert!(s.spawn_to_ready_ms.unwrap() <= s.spawn_to_kernel_banner_ms.unwrap());
        let b = s.spawn_to_kernel_banner_ms.unwrap();
        let r = s.spawn_to_stop_text_ms.unwrap();
        assert!(b < r, "{s:?}");
        assert!(s.ended.starts_with("stopped by the bench"), "{s:?}");
        assert!(s.overhead_pss_kib.unwrap() > 0);
        assert_eq!(s.tail, vec!["started", "Linux version 1", "Run /init"]);
    }

    #[test]
    fn reports_the_exit_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom >&2; sleep 0.6; exit 7"]);
        let s = measure(cmd, 1 << 30, "never", "never", Duration::from_secs(20)).unwrap();
        assert!(s.overhead_pss_kib.is_some(), "sampled before the process ended");
        assert_eq!(s.ended, "exit 7");
        assert_eq!(s.spawn_to_kernel_banner_ms, None);
        assert_eq!(s.tail, vec!["boom"]);
    }
}
