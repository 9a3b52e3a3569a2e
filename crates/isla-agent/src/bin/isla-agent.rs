//! The guest side: listens on vsock port [`isla_agent::AGENT_PORT`] and serves each connection on
//! its own thread. Started by the guest kit's init when the VM has a vsock device; with
//! `--image ROOT SEED` it runs a container image's process instead (see `isla_agent::seed`).

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

/// Accepts connections on `listener` forever, serving each on its own thread.
fn serve_forever(listener: std::os::fd::OwnedFd) -> ! {
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

/// `isla-agent --image ROOT SEED`: run a container image's process (see `isla_agent::seed`) and
/// serve the agent inside the image root while it runs; exits with the process's status.
fn image_mode(root: &str, seed: &str) -> std::process::ExitCode {
    // Listen before the chroot: the vsock socket needs no file, but failing early is clearer.
    let listener = vsock::listen(AGENT_PORT).map_err(|e| eprintln!("isla-agent: no vsock listener: {e}")).ok();
    let serve = move || {
        if let Some(l) = listener {
            let _ = std::thread::Builder::new().name("agent".into()).spawn(move || serve_forever(l));
        }
    };
    match isla_agent::seed::run_image(root.as_ref(), seed.as_ref(), serve) {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("isla-init: running the image's process (root {root}, seed {seed}): {e}");
            std::process::ExitCode::from(125)
        }
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => {}
        ["--image", root, seed] => return image_mode(root, seed),
        _ => {
            eprintln!("usage: isla-agent [--image ROOT SEED-DEVICE]");
            return std::process::ExitCode::from(2);
        }
    }
    let listener = match vsock::listen(AGENT_PORT) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("isla-agent: cannot listen on vsock port {AGENT_PORT}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!("isla-agent: listening on vsock port {AGENT_PORT}");
    serve_forever(listener)
}
