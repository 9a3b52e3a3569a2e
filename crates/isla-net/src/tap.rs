//! Persistent TAP devices (the two `/dev/net/tun` ioctls `ip tuntap add` uses).
//!
//! The kernel does not create tun/tap devices through rtnetlink's `RTM_NEWLINK`, so this is the
//! one place that talks ioctl. The device is made persistent and left owned by root (no
//! `TUNSETOWNER`): only a process with `CAP_NET_ADMIN` (the microVM monitor started by isla)
//! can open it, by name, with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` like virtio-net back ends do.
//! It is deleted through netlink like any other link. [`open_tap`] is the back end's side.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use crate::Error;

/// `struct ifreq` as `TUNSETIFF` reads it: a name and the flags, padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` and attaches it to TAP `name` (creating a non-persistent one if it does
/// not exist) with `flags`.
fn set_iff(name: &str, flags: libc::c_int) -> Result<File, Error> {
    let err = |source: std::io::Error| Error::Tap { name: name.to_string(), source };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(err(std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(err)?;
    let mut req = IfReqFlags { name: [0; libc::IFNAMSIZ], flags: flags as libc::c_short, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `tun` is an open /dev/net/tun descriptor and `req` is a live, properly sized and
    // aligned ifreq that the kernel only reads and writes within its 40 bytes.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReqFlags) };
    if rc < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(tun)
}

/// Creates the persistent TAP device `name` in the calling thread's network namespace.
pub(crate) fn create_persistent(name: &str) -> Result<(), Error> {
    let tun = set_iff(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)?;
    // SAFETY: TUNSETPERSIST takes its argument by value (an int flag); no memory is passed.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(Error::Tap { name: name.to_string(), source: std::io::Error::last_os_error() });
    }
    // Closing `tun` leaves the persistent device behind, detached from any queue.
    Ok(())
}

/// Opens the existing TAP device `name` (one made by [`crate::Networks::attach_tap`]) as a
/// virtio-net back end does: one queue, no packet information header, and with `vnet_hdr` the
/// 12-byte `virtio_net_hdr` in front of every frame. Reads and writes are whole Ethernet frames.
pub fn open_tap(name: &str, vnet_hdr: bool) -> Result<File, Error> {
    // TUNSETIFF would make a new device under a wrong name: check first.
    if crate::netlink::Netlink::open()?.link(name)?.is_none() {
        return Err(Error::LinkMissing(name.to_string()));
    }
    let vnet = if vnet_hdr { libc::IFF_VNET_HDR } else { 0 };
    set_iff(name, libc::IFF_TAP | libc::IFF_NO_PI | vnet)
}
