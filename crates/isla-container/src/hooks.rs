//! Hooks the runtime runs in its own namespaces (prestart, createRuntime, poststart, poststop):
//! the container's state JSON on stdin, an optional timeout, a non-zero exit is an error.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

use crate::error::{Error, Result};

/// Run `hooks` in order with `state` on stdin; the first failure stops the list.
pub fn run(hooks: &[Hook], state: &[u8], kind: &str) -> Result<()> {
    for (i, h) in hooks.iter().enumerate() {
        let err = |msg: String| Error::Hook { path: h.path().clone(), msg: format!("hooks.{kind}[{i}]: {msg}") };
        let mut cmd = Command::new(h.path());
        if let Some(args) = h.args() {
            if let Some(a0) = args.first() {
                std::os::unix::process::CommandExt::arg0(&mut cmd, a0);
            }
            cmd.args(args.iter().skip(1));
        }
        cmd.env_clear();
        for e in h.env().iter().flatten() {
            if let Some((k, v)) = e.split_once('=') {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.stdin(Stdio::piped()).spawn().map_err(|e| err(format!("cannot start: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(state);
        }
        let deadline = h.timeout().filter(|t| *t > 0).map(|t| Instant::now() + Duration::from_secs(t as u64));
        let status = loop {
            if let Some(st) = child.try_wait().map_err(|e| err(e.to_string()))? {
                break st;
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!("timed out after {} s", h.timeout().unwrap_or(0))));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if !status.success() {
            return Err(err(format!("exited with {status}")));
        }
    }
    Ok(())
}
