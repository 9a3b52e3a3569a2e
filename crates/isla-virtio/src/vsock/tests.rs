use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::time::Duration;

use super::*;
use crate::testing::TestGuest;

const CID: u32 = 3;

struct Setup {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    dev: Arc<Mutex<Vsock>>,
    g: TestGuest,
    /// Posted receive buffers by head index.
    rx: HashMap<u32, (u64, u64)>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let dev = Arc::new(Mutex::new(Vsock::new(VsockConfig { guest_cid: CID, uds_path: uds.clone() }).unwrap()));
    let mut g = TestGuest::new(dev.clone());
    g.init(VIRTIO_F_VERSION_1, &[16, 16, 16]);
    assert_eq!(g.read_config(0, 8), u64::from(CID).to_le_bytes());
    let mut s = Setup { _dir: dir, uds, dev, g, rx: HashMap::new() };
    for _ in 0..8 {
        s.post_rx();
    }
    s
}

impl Setup {
    /// Posts one receive buffer: header and payload in separate descriptors.
    fn post_rx(&mut self) {
        let h = self.g.alloc(HDR_LEN);
        let d = self.g.alloc(4096);
        let head = self.g.add_chain(0, &[(h, HDR_LEN as u32, true), (d, 4096, true)]);
        self.rx.insert(u32::from(head), (h, d));
        self.g.kick(0);
    }

    /// Next packet the device sent (header, payload).
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let (id, len) = self.g.wait_used(0, 1)[0];
        let (h, d) = self.rx.remove(&id).expect("used id is a posted buffer");
        let hdr = Header::from_bytes(&self.g.read(h, HDR_LEN).try_into().unwrap());
        assert_eq!(len as usize, HDR_LEN + hdr.len as usize);
        let payload = self.g.read(d, hdr.len as usize);
        self.post_rx();
        (hdr, payload)
    }

    /// Sends a packet from the guest.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let a = self.g.alloc_with(&h.to_bytes());
        if payload.is_empty() {
            self.g.add_chain(1, &[(a, HDR_LEN as u32, false)]);
        } else {
            let b = self.g.alloc_with(payload);
            self.g.add_chain(1, &[(a, HDR_LEN as u32, false), (b, payload.len() as u32, false)]);
        }
        self.g.kick(1);
        self.g.wait_used(1, 1);
    }
}

fn guest_pkt(src_port: u32, dst_port: u32, op: u16, len: u32, flags: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: u64::from(CID),
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        kind: TYPE_STREAM,
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    }
}

fn read_exact(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    stream.read_exact(&mut b).unwrap();
    b
}

#[test]
fn host_initiated_connection_exchanges_data_and_shuts_down() {
    let mut s = setup();
    let mut client = UnixStream::connect(&s.uds).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();
    let (req, _) = s.recv();
    assert_eq!((req.op, req.dst_port, req.dst_cid, req.src_cid), (op::REQUEST, 1234, u64::from(CID), HOST_CID));
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    let host_port = req.src_port;
    assert_eq!(host_port, FIRST_LOCAL_PORT);

    // The guest's listener accepts.
    s.send(guest_pkt(1234, host_port, op::RESPONSE, 0, 0, 64 << 10, 0), &[]);
    let mut line = String::new();
    BufReader::new(client.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));

    // Host to guest.
    client.write_all(b"hello guest").unwrap();
    let (rw, data) = s.recv();
    assert_eq!((rw.op, rw.src_port, rw.dst_port), (op::RW, host_port, 1234));
    assert_eq!(data, b"hello guest");

    // Guest to host.
    s.send(guest_pkt(1234, host_port, op::RW, 11, 0, 64 << 10, 11), b"hello host!");
    assert_eq!(read_exact(&mut client, 11), b"hello host!");

    // Credit request -> credit update carrying what the host consumed.
    s.send(guest_pkt(1234, host_port, op::CREDIT_REQUEST, 0, 0, 64 << 10, 11), &[]);
    let (cu, _) = s.recv();
    assert_eq!((cu.op, cu.fwd_cnt, cu.buf_alloc), (op::CREDIT_UPDATE, 11, CONN_BUF_ALLOC));

    // The guest closes: the host sees end-of-file, the guest gets a RST.
    s.send(guest_pkt(1234, host_port, op::SHUTDOWN, 0, SHUTDOWN_RCV | SHUTDOWN_SEND, 64 << 10, 11), &[]);
    let (rst, _) = s.recv();
    assert_eq!(rst.op, op::RST);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(s.dev.lock().unwrap().connections(), 0);
    assert!(s.g.outside_untouched());
}

#[test]
fn host_to_guest_data_respects_the_guests_credit() {
    let mut s = setup();
    let mut client = UnixStream::connect(&s.uds).unwrap();
    client.write_all(b"CONNECT 7\n").unwrap();
    let (req, _) = s.recv();
    let hp = req.src_port;
    // The guest has only 8 bytes of buffer.
    s.send(guest_pkt(7, hp, op::RESPONSE, 0, 0, 8, 0), &[]);
    let mut line = String::new();
    BufReader::new(client.try_clone().unwrap()).read_line(&mut line).unwrap();
    client.write_all(b"0123456789abcdefghij").unwrap();
    let (p1, d1) = s.recv();
    assert_eq!((p1.op, d1.as_slice()), (op::RW, &b"01234567"[..]));
    // Nothing more until the guest consumes: its credit is zero.
    assert!(s.g.take_used(0).is_empty());
    s.send(guest_pkt(7, hp, op::CREDIT_UPDATE, 0, 0, 8, 8), &[]);
    let (_, d2) = s.recv();
    assert_eq!(d2, b"89abcdef");
    s.send(guest_pkt(7, hp, op::CREDIT_UPDATE, 0, 0, 8, 16), &[]);
    let (_, d3) = s.recv();
    assert_eq!(d3, b"ghij");
    // The host closes its end: the guest is told both directions are shut down.
    drop(client);
    let (sd, _) = s.recv();
    assert_eq!((sd.op, sd.flags), (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
    s.send(guest_pkt(7, hp, op::RST, 0, 0, 8, 20), &[]);
    s.g.wait_until("connection forgotten", |_| s.dev.lock().unwrap().connections() == 0);
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let mut s = setup();
    let listener = UnixListener::bind(host_socket_path(&s.uds, 5000)).unwrap();
    s.send(guest_pkt(4000, 5000, op::REQUEST, 0, 0, 64 << 10, 0), &[]);
    let (resp, _) = s.recv();
    assert_eq!((resp.op, resp.src_port, resp.dst_port), (op::RESPONSE, 5000, 4000));
    let (mut server, _) = listener.accept().unwrap();
    server.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.send(guest_pkt(4000, 5000, op::RW, 4, 0, 64 << 10, 0), b"ping");
    assert_eq!(read_exact(&mut server, 4), b"ping");
    server.write_all(b"pong").unwrap();
    let (rw, data) = s.recv();
    assert_eq!((rw.op, data.as_slice()), (op::RW, &b"pong"[..]));
    // The guest stops sending: the host reads end-of-file but may still write.
    s.send(guest_pkt(4000, 5000, op::SHUTDOWN, 0, SHUTDOWN_SEND, 64 << 10, 4), &[]);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    server.write_all(b"bye").unwrap();
    assert_eq!(s.recv().1, b"bye");

    // No socket for port 5001: RST.
    s.send(guest_pkt(4001, 5001, op::REQUEST, 0, 0, 64 << 10, 0), &[]);
    let (rst, _) = s.recv();
    assert_eq!((rst.op, rst.dst_port), (op::RST, 4001));
}

#[test]
fn hostile_packets_are_dropped_or_reset() {
    let mut s = setup();
    let listener = UnixListener::bind(host_socket_path(&s.uds, 6000)).unwrap();
    // Wrong source CID: dropped silently.
    let mut h = guest_pkt(1, 6000, op::REQUEST, 0, 0, 4096, 0);
    h.src_cid = 99;
    s.send(h, &[]);
    // Length larger than the buffers: RST.
    s.send(guest_pkt(1, 6000, op::RW, 1000, 0, 4096, 0), b"short");
    let (rst, _) = s.recv();
    assert_eq!(rst.op, op::RST);
    // RW without a connection: RST.
    s.send(guest_pkt(2, 6000, op::RW, 3, 0, 4096, 0), b"abc");
    assert_eq!(s.recv().0.op, op::RST);
    // Sending past the device's credit resets the connection.
    s.send(guest_pkt(3, 6000, op::REQUEST, 0, 0, 4096, 0), &[]);
    assert_eq!(s.recv().0.op, op::RESPONSE);
    let (server, _) = listener.accept().unwrap();
    let big = vec![7u8; MAX_PAYLOAD];
    // The host socket never reads, so the device's buffer (CONN_BUF_ALLOC) fills up.
    let mut sent = 0u32;
    let mut reset = false;
    for _ in 0..(CONN_BUF_ALLOC as usize / MAX_PAYLOAD + 40) {
        s.send(guest_pkt(3, 6000, op::RW, big.len() as u32, 0, 4096, 0), &big);
        sent += big.len() as u32;
        if let Some((id, _)) = s.g.take_used(0).first().copied() {
            let (a, _) = s.rx.remove(&id).unwrap();
            let hdr = Header::from_bytes(&s.g.read(a, HDR_LEN).try_into().unwrap());
            if hdr.op == op::RST {
                reset = true;
                break;
            }
        }
    }
    assert!(reset, "no RST after {sent} bytes past the credit");
    drop(server);
    assert_eq!(s.g.status() & crate::mmio::status::NEEDS_RESET, 0);
    assert!(s.g.outside_untouched());
}

#[test]
fn handshake_lines_are_checked() {
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    assert_eq!(parse_connect(b"CONNECT x"), None);
    assert_eq!(parse_connect(b"connect 52"), None);
    assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    assert_eq!(host_socket_path(Path::new("/run/v.sock"), 52), PathBuf::from("/run/v.sock_52"));
    let h = guest_pkt(1, 2, op::RW, 3, 4, 5, 6);
    assert_eq!(Header::from_bytes(&h.to_bytes()), h);
}
