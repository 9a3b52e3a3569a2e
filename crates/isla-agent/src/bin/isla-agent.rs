//! The guest side: listens on vsock port [`isla_agent::AGENT_PORT`] and serves each connection on
//! its own thread. Started by the guest kit's init when `isla.agent=1` is on the command line.

use std::os::fd::AsRawFd;

use isla_agent::{serve, AGENT_PORT};

/// The vsock listening socket: the only `unsafe` in the agent (std has no AF_VSOCK).
mod vsock {
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};

    pub fn listen(port: u32) -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket this function owns from here on.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value before the fields are set.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes, alive across the call.
        if unsafe { libc::bind(fd, (&raw const addr).cast(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a bound stream socket.
        if unsafe { libc::listen(fd, 16) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    pub fn accept(listener: RawFd) -> io::Result<OwnedFd> {
        loop {
            // SAFETY: no address is requested back; the result is checked.
            let fd = unsafe { libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
            if fd >= 0 {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let listener = match vsock::listen(AGENT_PORT) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("isla-agent: cannot listen on vsock port {AGENT_PORT}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!("isla-agent: listening on vsock port {AGENT_PORT}");
    loop {
        match vsock::accept(listener.as_raw_fd()) {
            Ok(conn) => {
                let _ = std::thread::Builder::new().name("conn".into()).spawn(move || {
                    if let Err(e) = serve(std::fs::File::from(conn)) {
                        eprintln!("isla-agent: connection: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("isla-agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
