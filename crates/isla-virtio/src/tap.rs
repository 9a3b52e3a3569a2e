//! TAP interfaces: created (or attached to, if they exist) by name through `/dev/net/tun`, in the
//! network namespace of the calling thread, with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a
//! 12-byte virtio-net header (the virtio 1.x `virtio_net_hdr_v1`), non-blocking.
//!
//! [`set_up`] and [`set_ipv4`] configure an interface by name through `SIOCSIF*` ioctls (again
//! in the calling thread's namespace): enough for tests and simple set-ups; bridges and NAT are
//! the network layer's business.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::sys;

/// Size of the virtio-net header exchanged with the TAP.
pub const VNET_HDR_LEN: usize = 12;

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates or attaches to TAP interface `name` (at most 15 bytes).
    pub fn open(name: &str) -> io::Result<Tap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        let name = sys::tun_set_iff(file.as_raw_fd(), name, flags)
            .map_err(|e| io::Error::new(e.kind(), format!("TAP `{name}`: TUNSETIFF: {e}")))?;
        sys::tun_set_vnet_hdr_size(file.as_raw_fd(), VNET_HDR_LEN as libc::c_int)?;
        Ok(Tap { file, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `TUNSETOFFLOAD`: which `TUN_F_*` offloads the reader (the guest) handles.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        sys::tun_set_offload(self.file.as_raw_fd(), flags)
    }

    /// Reads one frame (virtio-net header first); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (virtio-net header first).
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Brings interface `name` up.
pub fn set_up(name: &str) -> io::Result<()> {
    sys::if_set_up(name).map_err(|e| io::Error::new(e.kind(), format!("interface `{name}`: up: {e}")))
}

/// Sets interface `name`'s IPv4 address and prefix length.
pub fn set_ipv4(name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    sys::if_set_ipv4(name, addr, prefix)
        .map_err(|e| io::Error::new(e.kind(), format!("interface `{name}`: address {addr}/{prefix}: {e}")))
}
