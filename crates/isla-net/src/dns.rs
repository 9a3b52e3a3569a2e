//! A tiny authoritative DNS responder for the instances of one network.
//!
//! It answers `A` queries for the instance names of its network (hostname or instance id,
//! optionally followed by `.<network>`), answers other types for those names with no records,
//! and answers `REFUSED` for every other name, so a resolver with a second `nameserver` line
//! moves on to it. It forwards nothing.
//!
//! The wire format is hand-written (RFC 1035 sections 4.1.1-4.1.3): a responder that only
//! reads one question and writes one A record needs about 100 lines, fewer than the glue a
//! general DNS crate would need, and it keeps the dependency tree small. Compression pointers are
//! refused in questions (no client sends them there).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Record type A.
pub const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
/// Response code: no error.
pub const RCODE_NOERROR: u8 = 0;
/// Response code: format error.
pub const RCODE_FORMERR: u8 = 1;
/// Response code: name does not exist.
pub const RCODE_NXDOMAIN: u8 = 3;
/// Response code: refused.
pub const RCODE_REFUSED: u8 = 5;
const TTL: u32 = 5;

/// One question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Transaction id.
    pub id: u16,
    /// Flags word of the query (opcode and RD are echoed).
    pub flags: u16,
    /// Name, labels joined by dots, no trailing dot.
    pub name: String,
    /// Query type.
    pub qtype: u16,
    /// Query class.
    pub qclass: u16,
    /// Byte length of header plus question (what the answer echoes).
    pub len: usize,
}

/// Parses a query with exactly one question. `None` if it is not one (or is a response).
pub fn parse_query(msg: &[u8]) -> Option<Question> {
    if msg.len() < 12 {
        return None;
    }
    let be = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    let (id, flags, qdcount) = (be(0), be(2), be(4));
    if flags & 0x8000 != 0 || qdcount != 1 {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // compression pointer or reserved label type
        }
        let label = msg.get(pos..pos + len)?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        pos += len;
        if pos > 12 + 255 {
            return None;
        }
    }
    msg.get(pos..pos + 4)?;
    Some(Question { id, flags, name: labels.join("."), qtype: be(pos), qclass: be(pos + 2), len: pos + 4 })
}

/// Builds the response to `q` (whose raw query is `query`) with `rcode` and, if given, one A record.
pub fn response(query: &[u8], q: &Question, rcode: u8, answer: Option<Ipv4Addr>) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.len + 16);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR=1, opcode echoed, AA=1, RD echoed, RA=0.
    let flags = 0x8000 | (q.flags & 0x7800) | 0x0400 | (q.flags & 0x0100) | u16::from(rcode & 0x0f);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(answer.is_some()).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&query[12..q.len]);
    if let Some(ip) = answer {
        out.extend_from_slice(&[0xc0, 12]); // pointer to the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// Answers one query datagram with `lookup` (name -> address); `None` if it deserves no answer.
pub fn answer(query: &[u8], lookup: impl Fn(&str) -> Option<Ipv4Addr>) -> Option<Vec<u8>> {
    let Some(q) = parse_query(query) else {
        // Answer FORMERR to something that at least has a query header.
        if query.len() >= 12 && query[2] & 0x80 == 0 {
            let mut out = query[..12].to_vec();
            out[2] = 0x80 | (query[2] & 0x79);
            out[3] = RCODE_FORMERR;
            out[4..12].fill(0);
            return Some(out);
        }
        return None;
    };
    if q.qclass != CLASS_IN || (q.flags >> 11) & 0xf != 0 {
        return Some(response(query, &q, RCODE_REFUSED, None));
    }
    Some(match lookup(&q.name) {
        Some(ip) if q.qtype == TYPE_A => response(query, &q, RCODE_NOERROR, Some(ip)),
        Some(_) => response(query, &q, RCODE_NOERROR, None),
        None => response(query, &q, RCODE_REFUSED, None),
    })
}

/// A running responder: a thread serving one UDP socket. Dropping it stops the thread.
pub struct DnsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Serves `socket` on a new thread, answering from `lookup`.
    pub(crate) fn spawn(
        socket: UdpSocket,
        lookup: impl Fn(&str) -> Option<Ipv4Addr> + Send + 'static,
    ) -> std::io::Result<Self> {
        let addr = socket.local_addr()?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name(format!("isla-dns-{addr}")).spawn(move || {
            let mut buf = [0u8; 512];
            while !flag.load(Ordering::Relaxed) {
                let (n, peer) = match socket.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        continue
                    }
                    Err(e) => {
                        tracing::warn!(%addr, "dns: {e}");
                        continue;
                    }
                };
                if let Some(reply) = answer(&buf[..n], &lookup) {
                    if let Err(e) = socket.send_to(&reply, peer) {
                        tracing::debug!(%peer, "dns reply: {e}");
                    }
                }
            }
        })?;
        Ok(Self { addr, stop, thread: Some(thread) })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// glibc reads at most three `nameserver` lines (`MAXNS`).
const MAX_NAMESERVERS: usize = 3;

/// The host's name servers an instance can reach: the `nameserver` lines of `host` (the host's
/// resolv.conf) in order, without loopback ones (systemd-resolved's 127.0.0.53, a local
/// dnsmasq), which are the host's own and unreachable from an instance.
pub fn host_servers(host: &str) -> Vec<&str> {
    host.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter(|a| !a.starts_with("127.") && *a != "::1")
        .collect()
}

/// `/etc/resolv.conf` for an instance of `network`. With a responder (`nameserver`), it comes
/// first and `search` starts with the network's name; the host's reachable name servers follow
/// ([`host_servers`]), because the responder forwards nothing: it answers REFUSED for names it
/// does not know, and a resolver then asks the next server. Without a responder (bridge driver)
/// only the host's servers are listed.
pub fn resolv_conf(nameserver: Option<Ipv4Addr>, network: &str, host: &str) -> String {
    let mut servers: Vec<String> = nameserver.map(|n| n.to_string()).into_iter().collect();
    for a in host_servers(host) {
        if !servers.iter().any(|s| s == a) {
            servers.push(a.to_string());
        }
    }
    let mut search: Vec<&str> = if nameserver.is_some() { vec![network] } else { Vec::new() };
    let mut options = Vec::new();
    for line in host.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            // The last `search` (or `domain`) line is the one resolvers use.
            Some("search" | "domain") => {
                search.truncate(usize::from(nameserver.is_some()));
                search.extend(w.filter(|d| *d != network));
            }
            Some("options") => options.push(line.trim()),
            _ => {}
        }
    }
    let mut out: String = servers.iter().take(MAX_NAMESERVERS).map(|s| format!("nameserver {s}\n")).collect();
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    out.extend(options.iter().map(|o| format!("{o}\n")));
    out
}

/// The name servers of a VM guest, for the kernel's `ip=` argument, which has two (`dns0`,
/// `dns1`): the responder, then the host's first reachable IPv4 server (see [`resolv_conf`]).
pub fn guest_servers(nameserver: Option<Ipv4Addr>, host: &str) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = nameserver.into_iter().collect();
    for a in host_servers(host).into_iter().filter_map(|a| a.parse::<Ipv4Addr>().ok()) {
        if out.len() < 2 && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// Encodes an A query for `name` (for clients and tests).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
        let l = &label.as_bytes()[..label.len().min(63)];
        q.push(l.len() as u8);
        q.extend_from_slice(l);
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// Reads the rcode and the first A record of a response to `id`.
pub fn parse_response(id: u16, msg: &[u8]) -> Option<(u8, Option<Ipv4Addr>)> {
    if msg.len() < 12 || u16::from_be_bytes([msg[0], msg[1]]) != id || msg[2] & 0x80 == 0 {
        return None;
    }
    let rcode = msg[3] & 0x0f;
    let ancount = u16::from_be_bytes([msg[6], msg[7]]);
    let q = parse_query(&[&msg[..2], &[0, 0], &msg[4..]].concat())?;
    if ancount == 0 {
        return Some((rcode, None));
    }
    // Answer: 2-byte name pointer, type, class, ttl, rdlength, rdata.
    let a = msg.get(q.len..q.len + 16)?;
    (u16::from_be_bytes([a[2], a[3]]) == TYPE_A && a[10..12] == [0, 4])
        .then(|| (rcode, Some(Ipv4Addr::new(a[12], a[13], a[14], a[15]))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<Ipv4Addr> {
        (name == "web2").then_some(Ipv4Addr::new(10, 88, 0, 3))
    }

    #[test]
    fn answers_a_known_name() {
        let q = query(0x1234, "web2.", TYPE_A);
        let r = answer(&q, lookup).unwrap();
        assert_eq!(parse_response(0x1234, &r), Some((RCODE_NOERROR, Some(Ipv4Addr::new(10, 88, 0, 3)))));
        assert_eq!(r[2] & 0x04, 0x04, "authoritative");
        assert_eq!(r[2] & 0x01, 0x01, "RD echoed");
    }

    #[test]
    fn other_types_and_names() {
        let r = answer(&query(7, "web2", 28), lookup).unwrap();
        assert_eq!(parse_response(7, &r), Some((RCODE_NOERROR, None)));
        let r = answer(&query(8, "example.org", TYPE_A), lookup).unwrap();
        assert_eq!(parse_response(8, &r), Some((RCODE_REFUSED, None)));
    }

    #[test]
    fn resolv_conf_puts_the_responder_first_and_keeps_reachable_host_servers() {
        let host = "# generated\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver ::1\nnameservers 192.0.2.9\n\
                    nameserver 192.0.2.54\nnameserver 192.0.2.55\nsearch example.org\noptions edns0 trust-ad\n";
        let gw = Some(Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(
            resolv_conf(gw, "front", host),
            "nameserver 10.88.0.1\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n\
             search front example.org\noptions edns0 trust-ad\n"
        );
        assert_eq!(resolv_conf(gw, "front", ""), "nameserver 10.88.0.1\nsearch front\n");
        // A host that only has a loopback resolver: the instances resolve isla names only.
        assert_eq!(resolv_conf(gw, "front", "nameserver 127.0.0.53\n"), "nameserver 10.88.0.1\nsearch front\n");
        // Bridge driver: no responder, the host's reachable servers as they are.
        assert_eq!(
            resolv_conf(None, "lan", "domain corp.example\nnameserver 192.0.2.53\n"),
            "nameserver 192.0.2.53\nsearch corp.example\n"
        );
        // The host's last search line wins, and the network's name is not repeated.
        assert_eq!(
            resolv_conf(gw, "front", "search a.example\nsearch front b.example\n"),
            "nameserver 10.88.0.1\nsearch front b.example\n"
        );
    }

    #[test]
    fn guests_get_the_responder_and_one_host_server() {
        let gw = Some(Ipv4Addr::new(10, 88, 0, 1));
        let host = "nameserver 127.0.0.53\nnameserver 2001:db8::53\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n";
        assert_eq!(guest_servers(gw, host), [Ipv4Addr::new(10, 88, 0, 1), Ipv4Addr::new(192, 0, 2, 53)]);
        assert_eq!(guest_servers(gw, "nameserver 127.0.0.53\n"), [Ipv4Addr::new(10, 88, 0, 1)]);
        assert_eq!(guest_servers(None, host), [Ipv4Addr::new(192, 0, 2, 53), Ipv4Addr::new(192, 0, 2, 54)]);
    }

    #[test]
    fn hostile_input_is_answered_or_ignored_without_panicking() {
        assert!(answer(&[1, 2, 3], lookup).is_none());
        let mut q = query(9, "web2", TYPE_A);
        q[12] = 0xc0; // compression pointer in the question
        assert_eq!(answer(&q, lookup).unwrap()[3] & 0x0f, RCODE_FORMERR);
        let mut resp = query(9, "web2", TYPE_A);
        resp[2] |= 0x80;
        assert!(answer(&resp, lookup).is_none(), "responses are not answered");
        for cut in 0..q.len() {
            let _ = answer(&query(9, "web2", TYPE_A)[..cut], lookup);
        }
    }
}
