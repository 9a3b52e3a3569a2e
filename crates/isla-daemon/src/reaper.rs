//! Reaps the supervisors this daemon starts. A supervisor is our child until it exits; unreaped
//! it would stay a zombie, whose `/proc` entry makes it look alive to the manager (a `stop`
//! would then wait for it in vain). Only pids registered here are waited for, never `-1`, so
//! the children the manager waits for itself are left alone.

use std::sync::Mutex;
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The supervisors started by this daemon that have not been reaped yet.
#[derive(Debug, Default)]
pub struct Reaper {
    pids: Mutex<Vec<i32>>,
}

impl Reaper {
    /// Registers a supervisor (the `supervisor_pid` of a just started instance).
    pub fn add(&self, pid: i32) {
        if let Ok(mut p) = self.pids.lock() {
            p.push(pid);
        }
    }

    /// Takes over a just started instance's supervisor: the instance as it started.
    pub fn adopt(&self, started: isla_core::Started) -> isla_core::Instance {
        if let Some(pid) = started.instance.supervisor_pid {
            self.add(pid);
        }
        started.instance
    }

    /// Reaps every registered supervisor that has exited; how many are still running.
    pub fn reap(&self) -> usize {
        let Ok(mut pids) = self.pids.lock() else { return 0 };
        pids.retain(|&pid| {
            matches!(waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive))
        });
        pids.len()
    }
}

/// Reaps every 100 ms until shutdown.
pub async fn run(reaper: std::sync::Arc<Reaper>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => { reaper.reap(); }
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
