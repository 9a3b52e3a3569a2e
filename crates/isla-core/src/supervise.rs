//! The supervisor: one small process per started instance (`isla __supervise ID`), what conmon
//! is to podman. Without a daemon somebody has to be the parent of the instance's process to
//! collect its exit code, read its output into the log, apply the restart policy, release the
//! network link, cgroup and mounts when it ends, and remove an `--rm` instance. The supervisor
//! is that parent; it leaves the caller's session, so the CLI can exit (or be killed) at once.
//!
//! The runtime clones the calling process and needs it single-threaded: the supervisor is, at
//! every start (the network library's threads are scoped and joined before it returns).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::driver::Stdio;
use crate::error::{sys, Error, Result};
use crate::logs::{LogWriter, Stream};
use crate::manager::{driver, Manager};
use crate::model::Status;
use crate::proc::{now_rfc3339, Owner};

/// Exit status of an attached supervisor whose instance could not start (Docker's 125).
pub const START_FAILED: i32 = 125;

/// Runs the supervisor of instance `id` under `root` until the instance ends for good (no
/// restart), and returns its last exit code. `ready_fd` receives `ok` once the instance runs,
/// or `error: MESSAGE`. With `attach` the output also goes to this process's stdout/stderr.
pub fn supervise(root: &Path, helper: PathBuf, id: &str, attach: bool, ready_fd: Option<i32>) -> Result<i32> {
    let mut ready: Option<File> = ready_fd.map(crate::sig::adopt_fd).transpose()?.map(File::from);
    if !attach {
        nix::unistd::setsid().map_err(sys("setsid"))?;
    }
    let report = |ready: &mut Option<File>, msg: &str| {
        if let Some(mut f) = ready.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    };
    match run(root, helper, id, attach, &mut ready, &report) {
        Ok(code) => Ok(code),
        Err(e) if ready.is_some() => {
            report(&mut ready, &format!("error: {e}\n"));
            Ok(START_FAILED)
        }
        Err(e) => Err(e),
    }
}

type Report<'a> = dyn Fn(&mut Option<File>, &str) + 'a;

fn run(
    root: &Path,
    helper: PathBuf,
    id: &str,
    attach: bool,
    ready: &mut Option<File>,
    report: &Report<'_>,
) -> Result<i32> {
    crate::sig::catch_forwarded()?;
    let m = Manager::open_with_helper(root, helper)?;
    let store = m.store();
    let rec = store.get(id)?.ok_or_else(|| Error::NotFound(id.to_string()))?;
    let name = rec.instance.spec.name.clone();
    if !store.claim_supervisor(id, Owner::current(), true)? {
        return Err(Error::State {
            name,
            status: rec.instance.status.to_string(),
            msg: "it is running already".into(),
        });
    }
    let d = driver(rec.instance.spec.kind)?;
    let mut log = LogWriter::open(&rec.instance.log_path)?;
    let code = loop {
        let inst = store.get(id)?.ok_or_else(|| Error::NotFound(id.to_string()))?.instance;
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        let launched =
            match crate::sig::with_default_sigpipe(|| d.start(m.env(), &inst, Stdio { out: out_w, err: err_w })) {
                Ok(l) => l,
                Err(e) => {
                    store.set_error(id, &e.to_string())?;
                    store.release_supervisor(id)?;
                    if ready.is_none() {
                        // A restart failed: the instance stays exited with the reason recorded.
                        tracing::error!("restarting {name}: {e}");
                        return Ok(START_FAILED);
                    }
                    return Err(e);
                }
            };
        let main = Owner::of(launched.pid).unwrap_or(Owner { pid: launched.pid, start: 0 });
        store.set_running(id, main, &now_rfc3339(), launched.attachment.as_ref())?;
        report(ready, "ok\n");
        let follow = launched.follow.as_deref().and_then(|p| File::open(p).ok());
        let code = pump(launched.pid, [Some(File::from(out_r)), Some(File::from(err_r)), follow], &mut log, attach)?;
        let code = d.exit_code(m.env(), &inst, code);
        drop(launched.keep);
        if let Err(e) = d.release(m.env(), &inst) {
            tracing::error!("releasing {name}: {e}");
            store.set_error(id, &format!("releasing after the exit: {e}"))?;
        }
        let now = store.get(id)?.ok_or_else(|| Error::NotFound(id.to_string()))?;
        let status = if now.stop_requested { Status::Stopped } else { Status::Exited(code) };
        store.set_ended(id, status, Some(code), &now_rfc3339(), None)?;
        if now.stop_requested || !inst.spec.restart.restarts(code, now.instance.restart_count) {
            break code;
        }
        let n = store.count_restart(id)?;
        // Back off 100 ms, 200 ms, ... up to 10 s between restarts; a stop request ends it.
        let delay = Duration::from_millis(100u64 << n.min(7)).min(Duration::from_secs(10));
        let stopped = crate::driver::wait_until(delay, || {
            crate::sig::take().is_some() || store.get(id).ok().flatten().is_none_or(|r| r.stop_requested)
        });
        if stopped {
            break code;
        }
    };
    store.release_supervisor(id)?;
    if let Some(rec) = store.get(id)?.filter(|r| r.instance.spec.auto_remove) {
        m.remove_record(&rec)?;
    }
    Ok(code)
}

/// Copies the instance's output to the log (and to our stdout/stderr when attached): the
/// stdout and stderr pipes, and a console file the instance appends to (read as stdout).
/// Forwards the signals this process catches, and returns the exit code once `pid` has ended.
fn pump(pid: i32, files: [Option<File>; 3], log: &mut LogWriter, attach: bool) -> Result<i32> {
    let pid = Pid::from_raw(pid);
    for f in files.iter().take(2).flatten() {
        let fl = nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_GETFL).map_err(sys("fcntl"))?;
        let fl = nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(sys("fcntl"))?;
    }
    let [out, err, console] = files;
    let mut streams = [(out, Stream::Stdout), (err, Stream::Stderr)];
    let mut console = console;
    let mut buf = vec![0u8; 64 * 1024];
    let mut drain = |streams: &mut [(Option<File>, Stream); 2], log: &mut LogWriter| -> Result<()> {
        for (f, stream) in streams.iter_mut() {
            while let Some(file) = f.as_mut() {
                match file.read(&mut buf) {
                    Ok(0) => *f = None,
                    Ok(n) => {
                        log.write(*stream, &buf[..n])?;
                        if attach {
                            let _ = match stream {
                                Stream::Stdout => std::io::stdout().write_all(&buf[..n]),
                                Stream::Stderr => std::io::stderr().write_all(&buf[..n]),
                            };
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        Ok(())
    };
    // A regular file: read to its current end each round (EOF only means "nothing new yet").
    let tail = |console: &mut Option<File>, log: &mut LogWriter| -> Result<()> {
        if let Some(f) = console.as_mut() {
            let mut chunk = Vec::new();
            if f.read_to_end(&mut chunk).is_ok() && !chunk.is_empty() {
                log.write(Stream::Stdout, &chunk)?;
                if attach {
                    let _ = std::io::stdout().write_all(&chunk);
                }
            }
        }
        Ok(())
    };
    loop {
        if let Some(s) = crate::sig::take() {
            let _ = nix::sys::signal::kill(pid, s);
        }
        {
            let mut fds: Vec<PollFd<'_>> = streams
                .iter()
                .filter_map(|(f, _)| f.as_ref())
                .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
                .collect();
            let _ = poll(&mut fds, PollTimeout::from(200u16));
        }
        drain(&mut streams, log)?;
        tail(&mut console, log)?;
        let code = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, c)) => c,
            Ok(WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(sys("waiting for the instance")(e)),
        };
        // Whatever the process wrote before it ended; descendants that keep the pipes open
        // are not waited for.
        drain(&mut streams, log)?;
        tail(&mut console, log)?;
        return Ok(code);
    }
}
