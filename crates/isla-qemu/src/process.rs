//! Finding a VM's QEMU process again from its pid file, safely against pid reuse.

use std::path::Path;

/// The pid in QEMU's pid file, if the file exists and holds one.
pub(crate) fn read_pidfile(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().filter(|&p| p > 1)
}

/// True when `pid` is alive (not a zombie) and is the QEMU serving `qmp_socket`: its command
/// line names that socket. A pid reused by another process after QEMU died does not match.
pub(crate) fn is_our_qemu(pid: u32, qmp_socket: &Path) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // The socket appears inside `-chardev socket,id=qmp,path=...` with commas doubled.
    let want = format!("path={},", qmp_socket.to_string_lossy().replace(',', ",,"));
    cmdline.split(|&b| b == 0).any(|arg| String::from_utf8_lossy(arg).contains(&want))
}

/// Sends SIGKILL to `pid`.
pub(crate) fn kill(pid: u32) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfile_and_identity() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("qemu.pid");
        assert_eq!(read_pidfile(&f), None);
        std::fs::write(&f, "1234\n").unwrap();
        assert_eq!(read_pidfile(&f), Some(1234));
        std::fs::write(&f, "garbage").unwrap();
        assert_eq!(read_pidfile(&f), None);
        std::fs::write(&f, "1").unwrap();
        assert_eq!(read_pidfile(&f), None, "pid 1 is never a VM");
        // This test process is alive but is not a QEMU serving that socket.
        assert!(!is_our_qemu(std::process::id(), &d.path().join("qmp.sock")));
        assert!(!is_our_qemu(u32::MAX, &d.path().join("qmp.sock")));
    }
}
