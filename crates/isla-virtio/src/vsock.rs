//! virtio-vsock (virtio 1.x section 5.10), stream sockets, with Firecracker's hybrid host side:
//! the host end of every connection is a unix socket.
//!
//! - Host to guest: a host program connects to the listening socket at `uds_path`, writes
//!   `CONNECT <port>\n`, and once the guest's listener on `<port>` accepts (the guest answers our
//!   REQUEST with a RESPONSE) it reads `OK <host port>\n`; after that the bytes flow both ways.
//! - Guest to host: a guest connection to CID 2, port `P`, is connected to the unix socket
//!   `<uds_path>_P`; no listener there means a RST.
//!
//! Queues: receive (0, device to guest), transmit (1), event (2, unused: no transport resets).
//! Flow control is the virtio-vsock credit scheme: each side advertises `buf_alloc` (its buffer
//! for the connection) and `fwd_cnt` (bytes it has consumed); a sender never has more than
//! `buf_alloc - (sent - fwd_cnt)` bytes in flight. The device holds at most [`CONN_BUF_ALLOC`]
//! bytes per connection that the host socket has not taken yet, and sends a CREDIT_UPDATE when
//! the guest's view of that space falls under half. A guest that sends past its credit, or
//! packets with the wrong CIDs, type or lengths, gets its packet dropped (and a RST where there is
//! a connection to reset). Host sockets are non-blocking and edge-triggered on the event loop.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use serde::Deserialize;

use crate::event_loop::{deactivate, Activation, DeviceWorker, Registrations, Token, EV_EDGE, EV_IN, EV_OUT, EV_RDHUP};
use crate::queue::{fail, Chain, VirtQueue};
use crate::{
    lock, read_config_bytes, ActivateContext, ActivateError, DeviceError, EventLoopHandle, GuestMemory, Interrupt,
    VirtioDevice, VIRTIO_F_VERSION_1,
};

/// `VIRTIO_ID_VSOCK`.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue size (all three queues).
pub const QUEUE_SIZE: u16 = 256;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Packet header length.
pub const HDR_LEN: usize = 44;
/// Buffer the device advertises per connection.
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// Largest payload of one packet, either way.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// First host port given to host-initiated connections (as Firecracker).
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE: usize = 32;

/// Operations.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
/// Stream socket type.
pub const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header (`virtio_vsock_hdr`, little-endian, 44 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes a header.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at =
            |i: usize| u64::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// The vsock device's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u32,
    /// The host-side listening unix socket; guest-initiated connections go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

/// The virtio-vsock device.
pub struct Vsock {
    cfg: VsockConfig,
    listener: Arc<UnixListener>,
    config_space: [u8; 8],
    active: Option<Activation<Worker>>,
}

impl Vsock {
    /// Binds the listening socket (replacing a stale socket file left at `uds_path`).
    pub fn new(cfg: VsockConfig) -> Result<Self, DeviceError> {
        if cfg.guest_cid < 3 {
            return Err(DeviceError::Config {
                field: "guest_cid",
                reason: format!(
                    "{} is reserved (0-2 are the hypervisor, local and host); use 3 or more",
                    cfg.guest_cid
                ),
            });
        }
        if let Ok(meta) = std::fs::symlink_metadata(&cfg.uds_path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(&cfg.uds_path);
            }
        }
        let listener = UnixListener::bind(&cfg.uds_path)
            .map_err(DeviceError::host(format!("uds_path {}", cfg.uds_path.display())))?;
        listener.set_nonblocking(true).map_err(DeviceError::host("vsock listener"))?;
        let config_space = u64::from(cfg.guest_cid).to_le_bytes();
        Ok(Vsock { cfg, listener: Arc::new(listener), config_space, active: None })
    }

    /// Open connections (for tests and metrics).
    pub fn connections(&self) -> usize {
        self.active.as_ref().map_or(0, |a| lock(&a.worker).conns.len())
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cfg.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-vsock: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut pairs = ctx.queues.into_iter().zip(ctx.queue_evts);
        let (Some((rxq, rxe)), Some((txq, txe)), Some((_, evq))) = (pairs.next(), pairs.next(), pairs.next()) else {
            return Err(ActivateError::BadQueue { index: 2, reason: "missing".into() });
        };
        let fds = (rxe.as_raw_fd(), txe.as_raw_fd(), evq.as_raw_fd());
        let worker = Arc::new(Mutex::new(Worker {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            rx: VirtQueue::new(rxq, rxe),
            tx: VirtQueue::new(txq, txe),
            event_kick: evq,
            guest_cid: u64::from(self.cfg.guest_cid),
            uds_path: self.cfg.uds_path.clone(),
            listener: self.listener.clone(),
            event_loop: ctx.event_loop.clone(),
            this: Weak::new(),
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_id: 0,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            data_ready: VecDeque::new(),
            buf: vec![0u8; MAX_PAYLOAD],
            active: true,
        }));
        lock(&worker).this = Arc::downgrade(&worker);
        let mut regs = Registrations::new(ctx.event_loop);
        regs.add(fds.0, EV_IN, &worker, |w, _| {
            w.rx.drain_kick();
            w.process_rx();
        })?;
        regs.add(fds.1, EV_IN, &worker, |w, _| {
            w.tx.drain_kick();
            w.process_tx();
        })?;
        regs.add(fds.2, EV_IN, &worker, |w, _| {
            let _ = w.event_kick.read();
        })?;
        regs.add(self.listener.as_raw_fd(), EV_IN, &worker, |w, _| w.accept())?;
        {
            let mut w = lock(&worker);
            w.accept();
            w.process_tx();
        }
        self.active = Some(Activation::new(worker, regs));
        Ok(())
    }

    fn reset(&mut self) -> bool {
        deactivate(&mut self.active);
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host client connected; waiting for its `CONNECT <port>\n`.
    Handshake,
    /// REQUEST sent to the guest; waiting for its RESPONSE.
    Connecting,
    Established,
    /// SHUTDOWN sent to the guest after the host side closed; waiting for the guest's RST.
    Closing,
}

struct Conn {
    stream: UnixStream,
    token: Option<Token>,
    state: State,
    line: Vec<u8>,
    local_port: u32,
    peer_port: u32,
    /// Host socket has (or may have) data to read.
    readable: bool,
    /// Host to guest: bytes sent, and the guest's advertised buffer and consumed count.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Guest to host: bytes received, bytes written to the host socket, fwd_cnt last told.
    rx_cnt: u32,
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    /// Bytes for the host socket not written yet: the handshake reply, then guest data.
    pending_out: VecDeque<u8>,
    /// How many of `pending_out`'s first bytes are the handshake reply.
    handshake_out: usize,
    /// The guest will send no more: shut the host socket's write side once flushed.
    guest_done_sending: bool,
}

impl Conn {
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A control packet waiting for a receive buffer.
#[derive(Debug, Clone, Copy)]
struct Ctl {
    local_port: u32,
    peer_port: u32,
    op: u16,
    flags: u32,
}

struct Worker {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    rx: VirtQueue,
    tx: VirtQueue,
    event_kick: vmm_sys_util::eventfd::EventFd,
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    event_loop: EventLoopHandle,
    this: Weak<Mutex<Worker>>,
    conns: HashMap<u64, Conn>,
    /// (host port, guest port) -> connection id.
    by_ports: HashMap<(u32, u32), u64>,
    next_id: u64,
    next_local_port: u32,
    control: VecDeque<Ctl>,
    data_ready: VecDeque<u64>,
    buf: Vec<u8>,
    active: bool,
}

impl DeviceWorker for Worker {
    fn stop(&mut self) {
        self.active = false;
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.close(id);
        }
    }
}

impl Worker {
    fn running(&self) -> bool {
        self.active && !self.interrupt.needs_reset()
    }

    /// Registers a host stream; its events go to [`Worker::on_stream`].
    fn add_conn(&mut self, conn: Conn) -> Option<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let fd = conn.stream.as_raw_fd();
        let weak = self.this.clone();
        let token = self.event_loop.add(
            fd,
            EV_IN | EV_OUT | EV_RDHUP | EV_EDGE,
            Box::new(move |ev| {
                if let Some(w) = weak.upgrade() {
                    lock(&w).on_stream(id, ev);
                }
            }),
        );
        match token {
            Ok(t) => {
                let mut conn = conn;
                conn.token = Some(t);
                if conn.state != State::Handshake {
                    self.by_ports.insert((conn.local_port, conn.peer_port), id);
                }
                self.conns.insert(id, conn);
                Some(id)
            }
            Err(e) => {
                tracing::warn!("virtio-vsock: registering a connection: {e}");
                None
            }
        }
    }

    /// Forgets a connection: its fd leaves the event loop before it is closed.
    fn close(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            if let Some(t) = c.token {
                self.event_loop.remove(t);
            }
            self.by_ports.remove(&(c.local_port, c.peer_port));
        }
    }

    fn accept(&mut self) {
        if !self.running() {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("virtio-vsock: {e}");
                        continue;
                    }
                    let conn = new_conn(stream, State::Handshake, 0, 0);
                    if let Some(id) = self.add_conn(conn) {
                        self.on_stream(id, EV_IN);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("virtio-vsock: accept on {}: {e}", self.uds_path.display());
                    break;
                }
            }
        }
    }

    fn on_stream(&mut self, id: u64, ev: u32) {
        if !self.running() {
            return;
        }
        let Some(state) = self.conns.get(&id).map(|c| c.state) else { return };
        if state == State::Handshake {
            self.handshake(id);
            return;
        }
        if ev & EV_OUT != 0 {
            self.flush_out(id);
        }
        if ev & !EV_OUT != 0 {
            if let Some(c) = self.conns.get_mut(&id) {
                c.readable = true;
            }
            self.data_ready.push_back(id);
        }
        self.process_rx();
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (so no data after it is consumed).
    fn handshake(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        let mut byte = [0u8; 1];
        let port = loop {
            match c.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect(&c.line),
                Ok(_) if c.line.len() >= MAX_HANDSHAKE => break None,
                Ok(_) => c.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break None,
            }
        };
        let Some(peer_port) = port else {
            tracing::debug!("virtio-vsock: bad or closed handshake {:?}", String::from_utf8_lossy(&c.line));
            return self.close(id);
        };
        let local_port = self.alloc_local_port(peer_port);
        if let Some(c) = self.conns.get_mut(&id) {
            c.state = State::Connecting;
            c.local_port = local_port;
            c.peer_port = peer_port;
        }
        self.by_ports.insert((local_port, peer_port), id);
        self.control.push_back(Ctl { local_port, peer_port, op: op::REQUEST, flags: 0 });
        self.process_rx();
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_ports.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    /// Writes what the host socket takes of the guest's pending bytes.
    fn flush_out(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        let mut broken = false;
        while !c.pending_out.is_empty() {
            let (front, _) = c.pending_out.as_slices();
            match c.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    c.pending_out.drain(..n);
                    // The `OK <port>` line is not guest data and takes no credit.
                    let handshake = n.min(c.handshake_out);
                    c.handshake_out -= handshake;
                    c.fwd_cnt = c.fwd_cnt.wrapping_add((n - handshake) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        let ports = (c.local_port, c.peer_port);
        if broken {
            // The host side is gone: reset the guest's end.
            self.close(id);
            self.push_ctl(ports, op::RST, 0);
            return;
        }
        if c.pending_out.is_empty() && c.guest_done_sending {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        // Tell the guest about freed space once its view of our buffer is half used.
        let seen_used = c.rx_cnt.wrapping_sub(c.fwd_cnt_told);
        if c.state == State::Established && c.fwd_cnt != c.fwd_cnt_told && seen_used > CONN_BUF_ALLOC / 2 {
            self.push_ctl(ports, op::CREDIT_UPDATE, 0);
        }
    }

    fn push_ctl(&mut self, (local_port, peer_port): (u32, u32), op: u16, flags: u32) {
        self.control.push_back(Ctl { local_port, peer_port, op, flags });
    }

    fn header_for(&mut self, local_port: u32, peer_port: u32, op: u16, flags: u32, len: u32) -> Header {
        let mut h = Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        if let Some(c) = self.by_ports.get(&(local_port, peer_port)).and_then(|id| self.conns.get_mut(id)) {
            h.buf_alloc = CONN_BUF_ALLOC;
            h.fwd_cnt = c.fwd_cnt;
            c.fwd_cnt_told = c.fwd_cnt;
        }
        h
    }

    /// Fills receive buffers: control packets first, then data from host sockets.
    fn process_rx(&mut self) {
        if !self.running() {
            return;
        }
        loop {
            if self.control.is_empty() && self.data_ready.is_empty() {
                break;
            }
            let Some(chain) = self.rx.pop_or_fail(&self.mem, "vsock", &self.interrupt) else { break };
            let room = chain.writable_len();
            if room < HDR_LEN as u64 || !chain.readable.is_empty() {
                // Not a receive buffer: give it back empty.
                self.return_rx(chain.head, 0);
                continue;
            }
            if let Some(ctl) = self.control.pop_front() {
                let h = self.header_for(ctl.local_port, ctl.peer_port, ctl.op, ctl.flags, 0);
                self.send_rx(&chain, &h, 0);
                continue;
            }
            if !self.send_data(&chain, room - HDR_LEN as u64) {
                self.rx.undo_pop();
            }
        }
        self.rx.notify(&self.interrupt);
    }

    /// Sends one RW packet from the first connection with data and credit; false if none had.
    fn send_data(&mut self, chain: &Chain, room: u64) -> bool {
        while let Some(id) = self.data_ready.pop_front() {
            let Some(c) = self.conns.get_mut(&id) else { continue };
            if c.state != State::Established || !c.readable {
                continue;
            }
            let want = (room.min(MAX_PAYLOAD as u64) as usize).min(c.peer_credit() as usize);
            if want == 0 {
                // Waits for a CREDIT_UPDATE (or a bigger buffer).
                continue;
            }
            match c.stream.read(&mut self.buf[..want]) {
                Ok(0) => {
                    c.readable = false;
                    c.state = State::Closing;
                    let ports = (c.local_port, c.peer_port);
                    self.push_ctl(ports, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                    return false;
                }
                Ok(n) => {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    let (l, p) = (c.local_port, c.peer_port);
                    // More may be there: keep it in the rotation.
                    self.data_ready.push_back(id);
                    let h = self.header_for(l, p, op::RW, 0, n as u32);
                    self.send_rx(chain, &h, n);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.readable = false,
                Err(_) => {
                    let ports = (c.local_port, c.peer_port);
                    self.close(id);
                    self.push_ctl(ports, op::RST, 0);
                    return false;
                }
            }
        }
        false
    }

    fn send_rx(&mut self, chain: &Chain, h: &Header, payload: usize) {
        let ok = chain.write_at(&self.mem, 0, &h.to_bytes()).is_ok()
            && chain.write_at(&self.mem, HDR_LEN as u64, &self.buf[..payload]).is_ok();
        self.return_rx(chain.head, if ok { (HDR_LEN + payload) as u32 } else { 0 });
    }

    fn return_rx(&mut self, head: u16, len: u32) {
        if let Err(e) = self.rx.add_used(&self.mem, head, len) {
            fail("vsock", &self.interrupt, &e);
        }
    }

    /// Handles the guest's packets.
    fn process_tx(&mut self) {
        if !self.running() {
            return;
        }
        while let Some(chain) = self.tx.pop_or_fail(&self.mem, "vsock", &self.interrupt) {
            self.handle_packet(&chain);
            if let Err(e) = self.tx.add_used(&self.mem, chain.head, 0) {
                fail("vsock", &self.interrupt, &e);
                return;
            }
        }
        self.tx.notify(&self.interrupt);
        self.process_rx();
    }

    fn handle_packet(&mut self, chain: &Chain) {
        let mut hb = [0u8; HDR_LEN];
        if chain.misordered || !chain.writable.is_empty() || chain.read_at(&self.mem, 0, &mut hb).is_err() {
            tracing::debug!("virtio-vsock: malformed transmit chain dropped");
            return;
        }
        let h = Header::from_bytes(&hb);
        let len = h.len as usize;
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            tracing::debug!("virtio-vsock: packet {} -> {} dropped (wrong CIDs)", h.src_cid, h.dst_cid);
            return;
        }
        let (local, peer) = (h.dst_port, h.src_port);
        let rst = Ctl { local_port: local, peer_port: peer, op: op::RST, flags: 0 };
        if h.kind != TYPE_STREAM || len > MAX_PAYLOAD || len as u64 > chain.readable_len() - HDR_LEN as u64 {
            if h.op != op::RST {
                self.control.push_back(rst);
            }
            return;
        }
        let id = self.by_ports.get(&(local, peer)).copied();
        if h.op == op::REQUEST {
            match id {
                Some(_) => self.control.push_back(rst),
                None => self.connect_to_host(&h),
            }
            return;
        }
        let Some(id) = id else {
            if h.op != op::RST {
                self.control.push_back(rst);
            }
            return;
        };
        let ports = (local, peer);
        let Some(c) = self.conns.get_mut(&id) else { return };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        let state = c.state;
        match h.op {
            op::RESPONSE if state == State::Connecting => {
                c.state = State::Established;
                let ok = format!("OK {}\n", c.local_port);
                c.handshake_out = ok.len();
                c.pending_out.extend(ok.bytes());
                self.flush_out(id);
                self.data_ready.push_back(id);
            }
            op::RW if state == State::Established || state == State::Closing => {
                let free = CONN_BUF_ALLOC.saturating_sub(c.rx_cnt.wrapping_sub(c.fwd_cnt)) as usize;
                if len > free {
                    tracing::debug!("virtio-vsock: guest sent {len} bytes with {free} of credit; reset");
                    self.close(id);
                    self.push_ctl(ports, op::RST, 0);
                    return;
                }
                let mut data = vec![0u8; len];
                if chain.read_at(&self.mem, HDR_LEN as u64, &mut data).is_err() {
                    return;
                }
                c.rx_cnt = c.rx_cnt.wrapping_add(len as u32);
                c.pending_out.extend(data);
                self.flush_out(id);
            }
            op::CREDIT_UPDATE => self.data_ready.push_back(id),
            op::CREDIT_REQUEST => self.push_ctl(ports, op::CREDIT_UPDATE, 0),
            op::SHUTDOWN => {
                let both = h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV;
                if state == State::Closing || both {
                    // Both directions done: flush what we can, reset and forget the connection.
                    c.guest_done_sending = true;
                    self.flush_out(id);
                    self.close(id);
                    self.push_ctl(ports, op::RST, 0);
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_done_sending = true;
                    self.flush_out(id);
                } else if h.flags & SHUTDOWN_RCV != 0 {
                    let _ = c.stream.shutdown(std::net::Shutdown::Read);
                }
            }
            op::RST => self.close(id),
            _ => {
                tracing::debug!("virtio-vsock: op {} in state {state:?}; reset", h.op);
                self.close(id);
                self.push_ctl(ports, op::RST, 0);
            }
        }
    }

    /// A guest REQUEST to the host: connect `<uds_path>_<port>`.
    fn connect_to_host(&mut self, h: &Header) {
        let (local, peer) = (h.dst_port, h.src_port);
        let path = host_socket_path(&self.uds_path, local);
        let op = match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                let mut conn = new_conn(stream, State::Established, local, peer);
                conn.peer_buf_alloc = h.buf_alloc;
                conn.peer_fwd_cnt = h.fwd_cnt;
                conn.readable = true;
                match self.add_conn(conn) {
                    Some(id) => {
                        self.data_ready.push_back(id);
                        op::RESPONSE
                    }
                    None => op::RST,
                }
            }
            Err(e) => {
                tracing::debug!("virtio-vsock: guest connection to {}: {e}", path.display());
                op::RST
            }
        };
        self.control.push_back(Ctl { local_port: local, peer_port: peer, op, flags: 0 });
    }
}

fn new_conn(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Conn {
    Conn {
        stream,
        token: None,
        state,
        line: Vec::new(),
        local_port,
        peer_port,
        readable: false,
        tx_cnt: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        rx_cnt: 0,
        fwd_cnt: 0,
        fwd_cnt_told: 0,
        pending_out: VecDeque::new(),
        handshake_out: 0,
        guest_done_sending: false,
    }
}

/// `CONNECT <port>` (the newline already stripped) -> port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

/// Where guest connections to host port `port` go.
pub fn host_socket_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests;
