use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::testing::TestGuest;

const GUEST_MAC: [u8; 6] = [0x02, 0x15, 0x1a, 0x00, 0x00, 0x02];
const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// A network namespace made for one test, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("isla-virtio-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let ok = Command::new("ip").args(["netns", "add", &name]).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "ip netns add {name} failed (iproute2 and root are needed)");
        Netns(name)
    }

    fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Creates the device's TAP inside `ns`, up, with HOST_IP/24.
fn net_in(ns: &Netns, mrg: bool) -> Net {
    let path = ns.path();
    std::thread::spawn(move || {
        crate::sys::enter_netns(&path).unwrap();
        let cfg =
            NetConfig { tap_name: "isla0".into(), mac: Some(GUEST_MAC), rx_rate_limiter: None, tx_rate_limiter: None };
        let mut net = Net::new(cfg).unwrap();
        if !mrg {
            net.features &= !features::MRG_RXBUF;
        }
        crate::tap::set_ipv4(net.tap_name(), HOST_IP, 24).unwrap();
        crate::tap::set_up(net.tap_name()).unwrap();
        net
    })
    .join()
    .unwrap()
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&HOST_IP.octets());
    f
}

fn icmp_echo(dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&GUEST_IP.octets());
    ip.extend_from_slice(&HOST_IP.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// Posts `n` receive chains of `size` bytes each; returns their addresses by head index.
fn post_rx(g: &mut TestGuest, n: usize, size: u32) -> std::collections::HashMap<u32, u64> {
    let mut bufs = std::collections::HashMap::new();
    for _ in 0..n {
        let a = g.alloc(size as usize);
        let head = g.add_chain(0, &[(a, size, true)]);
        bufs.insert(u32::from(head), a);
    }
    g.kick(0);
    bufs
}

/// Sends a frame (split over two descriptors) and waits for the transmit queue to return it.
fn send(g: &mut TestGuest, frame: &[u8]) {
    let a = g.alloc_with(&frame[..VNET_HDR_LEN]);
    let b = g.alloc_with(&frame[VNET_HDR_LEN..]);
    g.add_chain(1, &[(a, VNET_HDR_LEN as u32, false), (b, (frame.len() - VNET_HDR_LEN) as u32, false)]);
    g.kick(1);
    assert_eq!(g.wait_used(1, 1)[0].1, 0);
}

/// Waits for a received frame (without its virtio header) that `want` accepts, reposting buffers.
fn receive(g: &mut TestGuest, bufs: &mut std::collections::HashMap<u32, u64>, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    for _ in 0..64 {
        let (id, len) = g.wait_used(0, 1)[0];
        let addr = bufs.remove(&id).expect("used id is a posted buffer");
        let data = g.read(addr, len as usize);
        assert_eq!(u16::from_le_bytes([data[10], data[11]]), 1, "num_buffers");
        bufs.extend(post_rx(g, 1, 2048));
        if want(&data[VNET_HDR_LEN..]) {
            return data[VNET_HDR_LEN..].to_vec();
        }
    }
    panic!("the expected frame never came");
}

#[test]
fn arp_and_ping_through_a_tap_in_a_namespace() {
    let ns = Netns::new();
    let dev = Arc::new(Mutex::new(net_in(&ns, true)));
    let mut g = TestGuest::new(dev.clone());
    let wanted = VIRTIO_F_VERSION_1 | features::MAC | features::MRG_RXBUF | features::CSUM | features::GUEST_CSUM;
    g.init(wanted, &[16, 16]);
    assert_eq!(g.read_config(0, 6), GUEST_MAC);
    let mut bufs = post_rx(&mut g, 8, 2048);

    send(&mut g, &arp_request());
    let reply = receive(&mut g, &mut bufs, |f| f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]);
    assert_eq!(reply[0..6], GUEST_MAC);
    assert_eq!(reply[28..32], HOST_IP.octets());
    let host_mac: [u8; 6] = reply[22..28].try_into().unwrap();

    let payload = b"isla virtio-net ping";
    send(&mut g, &icmp_echo(host_mac, payload));
    let pong = receive(&mut g, &mut bufs, |f| f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[34] == 0);
    assert_eq!(pong[26..30], HOST_IP.octets());
    assert_eq!(&pong[42..], payload);
    let s = dev.lock().unwrap().stats();
    assert_eq!(s.tx_frames, 2);
    assert!(s.rx_frames >= 2);
    assert!(g.outside_untouched());
}

#[test]
fn frames_wait_for_receive_buffers_and_merge_across_them() {
    let ns = Netns::new();
    let dev = Arc::new(Mutex::new(net_in(&ns, true)));
    let mut g = TestGuest::new(dev.clone());
    g.init(VIRTIO_F_VERSION_1 | features::MAC | features::MRG_RXBUF, &[16, 16]);
    // No receive buffers yet: the ARP reply waits in the device.
    send(&mut g, &arp_request());
    g.wait_until("a frame read from the TAP", |_| {
        dev.lock().unwrap().active.as_ref().is_some_and(|a| lock(&a.worker).rx_pending.is_some())
    });
    assert!(g.take_used(0).is_empty());
    // Buffers of 32 bytes: the 12-byte header and a 42-byte ARP reply (or more) need 2 or more.
    let mut addrs = Vec::new();
    for _ in 0..8 {
        let a = g.alloc(32);
        let head = g.add_chain(0, &[(a, 32, true)]);
        addrs.push((u32::from(head), a));
    }
    g.kick(0);
    let first = g.wait_used(0, 1)[0];
    let first_addr = addrs.iter().find(|(h, _)| *h == first.0).unwrap().1;
    let hdr = g.read(first_addr, VNET_HDR_LEN);
    let n = u16::from_le_bytes([hdr[10], hdr[11]]) as usize;
    assert!(n >= 2, "num_buffers {n}");
    let rest = g.wait_used(0, n - 1);
    let mut frame = g.read(first_addr, first.1 as usize);
    for (id, len) in rest {
        let a = addrs.iter().find(|(h, _)| *h == id).unwrap().1;
        frame.extend(g.read(a, len as usize));
    }
    assert_eq!(frame[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14], [0x08, 0x06]);
}

#[test]
fn malformed_transmit_chains_are_returned_unsent() {
    let ns = Netns::new();
    let dev = Arc::new(Mutex::new(net_in(&ns, false)));
    let mut g = TestGuest::new(dev.clone());
    g.init(VIRTIO_F_VERSION_1, &[16, 16]);
    let a = g.alloc(64);
    // Writable buffer on the transmit queue; header only; both are dropped.
    g.add_chain(1, &[(a, 64, true)]);
    g.add_chain(1, &[(a, VNET_HDR_LEN as u32, false)]);
    g.kick(1);
    assert_eq!(g.wait_used(1, 2), vec![(0, 0), (1, 0)]);
    let s = dev.lock().unwrap().stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (0, 2));
    assert_eq!(g.status() & crate::mmio::status::NEEDS_RESET, 0);
}

#[test]
fn offloads_follow_the_guest_features() {
    assert_eq!(tap_offloads(features::GUEST_TSO4), 0, "TSO without checksum offload is not usable");
    assert_eq!(
        tap_offloads(features::GUEST_CSUM | features::GUEST_TSO4 | features::GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
}
