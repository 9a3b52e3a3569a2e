//! The crate's system calls that need `unsafe`: TUN/TAP and interface ioctls, and `madvise` /
//! `mincore` on guest memory mappings. Everything else goes through safe wrappers (std,
//! vmm-sys-util, rustix).

use std::ffi::c_void;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Builds an `ifreq` naming `name` (refusing names that do not fit `IFNAMSIZ - 1`).
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name `{name}`: use 1 to {} bytes without NUL", libc::IFNAMSIZ - 1),
        ));
    }
    // SAFETY: ifreq is plain old data (arrays, integers, pointers in a union); all zeros is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `TUNSETIFF`: attaches the open `/dev/net/tun` fd to interface `name` (created if missing) with
/// `flags`; returns the interface's name.
pub(crate) fn tun_set_iff(fd: RawFd, name: &str, flags: libc::c_short) -> io::Result<String> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags = flags;
    // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `req` is, and lives across the call.
    check(unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) })?;
    Ok(name_of(&req))
}

/// `TUNSETVNETHDRSZ`.
pub(crate) fn tun_set_vnet_hdr_size(fd: RawFd, size: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `size`.
    check(unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size) })
}

/// `TUNSETOFFLOAD` with `TUN_F_*` flags.
pub(crate) fn tun_set_offload(fd: RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes the flags as the integer argument itself; no memory is passed.
    check(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) })
}

/// A datagram socket to issue interface ioctls on (in the calling thread's network namespace).
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets `IFF_UP` (and `IFF_RUNNING`) on interface `name`.
pub(crate) fn if_set_up(name: &str) -> io::Result<()> {
    let sock = ctl_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an `ifreq`, which `req` is.
    unsafe {
        check(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req))?;
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req))
    }
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the kernel reads the
    // former through the latter's type, as the socket API defines.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives interface `name` the IPv4 address `addr/prefix`.
pub(crate) fn if_set_ipv4(name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    if prefix > 32 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("prefix length {prefix} is over 32")));
    }
    let sock = ctl_socket()?;
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: SIOCSIFADDR/SIOCSIFNETMASK read an `ifreq`, which `req` is.
    unsafe {
        check(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &mut req))?;
        req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
        check(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &mut req))
    }
}

/// Gives the host pages of `[ptr, ptr + len)` back to the kernel: `MADV_DONTNEED` for private
/// anonymous memory (the range reads as zeros afterwards), `MADV_REMOVE` for shared file-backed
/// memory (which `MADV_DONTNEED` would only unmap).
///
/// The caller passes a range it got from `vm-memory` for a guest range that lies wholly inside
/// one mapped region.
pub(crate) fn discard_host_range(ptr: *mut u8, len: usize, shared_file: bool) -> io::Result<()> {
    let advice = if shared_file { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
    // SAFETY: the range lies inside a live guest memory mapping owned by the GuestMemoryMmap (see
    // above); dropping its pages changes the guest's data (which is what the guest asked for)
    // but never the host's address space layout, so no Rust reference is invalidated.
    check(unsafe { libc::madvise(ptr as *mut c_void, len, advice) })
}

#[cfg(test)]
/// Which pages of `[ptr, ptr + len)` are resident (`mincore`); `ptr` page-aligned.
pub(crate) fn resident_pages(ptr: *const u8, len: usize) -> io::Result<Vec<bool>> {
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: mincore writes one byte per page of the range into `vec`, which has that many.
    check(unsafe { libc::mincore(ptr as *mut c_void, len, vec.as_mut_ptr()) })?;
    Ok(vec.iter().map(|b| b & 1 != 0).collect())
}

/// Moves the calling thread into the network namespace at `path` (for tests).
#[cfg(test)]
pub(crate) fn enter_netns(path: &std::path::Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: setns takes an fd we hold open and a flag; it only changes this thread's namespace.
    check(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) })
}
