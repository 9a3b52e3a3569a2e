//! End-to-end tests of isla networks. Every link, rule and packet lives in network namespaces the
//! test creates: a "host" namespace (where the bridges and nftables rules go, entered by the
//! test thread through `in_netns`), "instance" namespaces attached by veth, and an "outside"
//! namespace standing for the world beyond the host. Nothing touches the machine's own namespace.
//! Needs root, `ip` (iproute2), `nft` (nftables) and busybox.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use isla_net::{in_netns, Driver, Error, Loopback, NetworkSpec, Networks, PortProxy, PortSpec, Proto};

static SEQ: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop with everything in it.
struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("islat{}-{}-{tag}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { path: Path::new("/run/netns").join(&name), name }
    }
    fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "-n", &self.name];
        a.extend_from_slice(args);
        sh(&a)
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend_from_slice(args);
        Command::new("ip").args(&a).output().expect("ip netns exec")
    }
    /// `isla-` links of this namespace.
    fn isla_links(&self) -> Vec<String> {
        self.ip(&["-o", "link"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("isla-"))
            .collect()
    }
    fn nft_tables(&self) -> String {
        String::from_utf8_lossy(&self.exec(&["nft", "list", "tables"]).stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Links `a` (as `a_if`, address `a_ip`) and `b` (as `b_if`, `b_ip`) with a veth pair.
fn wire(a: &Netns, a_if: &str, a_ip: &str, b: &Netns, b_if: &str, b_ip: &str) {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name]);
    a.ip(&["addr", "add", a_ip, "dev", a_if]);
    a.ip(&["link", "set", a_if, "up"]);
    if !b_ip.is_empty() {
        b.ip(&["addr", "add", b_ip, "dev", b_if]);
    }
    b.ip(&["link", "set", b_if, "up"]);
}

/// A TCP server in `ns` on `port` that answers each connection with the client's address, for
/// `count` connections.
fn peer_echo(ns: &Netns, port: u16, count: usize) -> JoinHandle<()> {
    let l = in_netns(&ns.path, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))).unwrap().unwrap();
    std::thread::spawn(move || {
        for _ in 0..count {
            let Ok((mut s, peer)) = l.accept() else { return };
            let _ = s.write_all(peer.ip().to_string().as_bytes());
        }
    })
}

/// Connects to `addr` and returns what the server says (the address it saw us come from).
fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn ping(ns: &Netns, ip: &str) -> bool {
    ns.exec(&["busybox", "ping", "-c", "1", "-W", "2", ip]).status.success()
}

fn dns_query(ns: &Netns, server: Ipv4Addr, name: &str) -> (u8, Option<Ipv4Addr>) {
    in_netns(&ns.path, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(&isla_net::dns::query(42, name, isla_net::dns::TYPE_A), (server, 53)).unwrap();
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        isla_net::dns::parse_response(42, &buf[..n]).expect("a DNS response")
    })
    .unwrap()
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s.split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
    v.try_into().unwrap()
}

/// Plays a microVM's virtio-net on TAP `tap`: sends an ARP request for `target` from `ip`/`mac`
/// and returns the MAC address in the reply.
fn arp_through_tap(tap: &str, mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> Option<[u8; 6]> {
    let mut dev = isla_net::open_tap(tap, false).unwrap();
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target.octets());
    let mut reader = dev.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok(n) = reader.read(&mut buf) {
            let f = &buf[..n];
            if n >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == target.octets() {
                let _ = tx.send(<[u8; 6]>::try_from(&f[22..28]).unwrap());
                return;
            }
        }
    });
    for _ in 0..3 {
        dev.write_all(&frame).unwrap();
        if let Ok(m) = rx.recv_timeout(Duration::from_secs(1)) {
            return Some(m);
        }
    }
    None
}

/// Runs `f` with the networks of a fresh state directory on a thread inside `host`, then checks
/// that no isla link and no isla table is left there.
fn in_host(host: &Netns, f: impl FnOnce(&Networks) + Send) {
    let root = tempfile::tempdir().unwrap();
    in_netns(&host.path, || f(&Networks::open(root.path()).unwrap())).unwrap();
    assert_eq!(host.isla_links(), Vec::<String>::new());
    assert!(!host.nft_tables().contains("isla"), "{}", host.nft_tables());
}

#[test]
fn nat_network_end_to_end() {
    let (host, web, web2, outside) = (Netns::new("host"), Netns::new("web"), Netns::new("web2"), Netns::new("out"));
    // The host's uplink to "the outside" (documentation addresses, inside the test namespaces).
    wire(&host, "uplink", "198.51.100.1/24", &outside, "eth0", "198.51.100.2/24");

    in_host(&host, |nets| {
        let net = nets.create(&NetworkSpec::new("front", Driver::Nat)).unwrap();
        assert_eq!(net.subnet.to_string(), "10.88.0.0/24");
        assert_eq!(net.gateway, Some(Ipv4Addr::new(10, 88, 0, 1)));

        // Name clash: a clear error and nothing new on the host.
        let links_before = host.isla_links();
        let e = nets.create(&NetworkSpec::new("front", Driver::HostOnly)).unwrap_err();
        assert!(matches!(e, Error::NetworkExists(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "network `front` already exists; choose another name or remove it with `isla network rm front`"
        );
        assert_eq!(host.isla_links(), links_before);

        let a1 = nets.attach_veth("front", "c-web", &web.path, "eth0", Some("web")).unwrap();
        let a2 = nets.attach_veth("front", "c-web2", &web2.path, "eth0", Some("web2")).unwrap();
        assert_eq!((a1.ip, a2.ip), (Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 3)));
        assert!(web.ip(&["-o", "addr", "show", "eth0"]).contains("10.88.0.2/24"));
        assert!(web.ip(&["link", "show", "eth0"]).contains(&a1.mac));
        assert!(web.ip(&["route"]).contains("default via 10.88.0.1 dev eth0"));
        assert!(ping(&web, "10.88.0.3"), "instance to instance");
        assert!(ping(&web2, "10.88.0.1"), "instance to gateway");

        // A microVM's TAP on the same switch.
        let t = nets.attach_tap("front", "vm-1", Some("vm1")).unwrap();
        assert_eq!(t.ip, Ipv4Addr::new(10, 88, 0, 4));
        let tap_line = host.ip(&["-d", "link", "show", &t.host_ifname]);
        assert!(tap_line.contains(&format!("master {}", net.bridge)), "{tap_line}");
        assert!(tap_line.contains("tun type tap"), "{tap_line}");
        // Frames from the TAP reach the switch: the gateway answers the "VM"'s ARP.
        let gw_mac = host.ip(&["link", "show", &net.bridge]).split("link/ether ").nth(1).unwrap()[..17].to_string();
        let answer = arp_through_tap(&t.host_ifname, parse_mac(&t.mac), t.ip, Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(answer, Some(parse_mac(&gw_mac)));
        assert!(matches!(isla_net::open_tap("isla-tnosuch", false), Err(Error::LinkMissing(_))));

        // A published port: from outside, through the host's address, and through 127.0.0.1.
        let server = peer_echo(&web, 80, 6);
        let p = nets
            .publish(
                "front",
                "c-web",
                PortSpec { host_ip: Ipv4Addr::UNSPECIFIED, host_port: 8080, container_port: 80, proto: Proto::Tcp },
            )
            .unwrap();
        assert_eq!(p.instance_ip, a1.ip);
        let from_outside = in_netns(&outside.path, || ask("198.51.100.1:8080".parse().unwrap())).unwrap().unwrap();
        assert_eq!(from_outside, "198.51.100.2", "DNAT keeps the client's address");
        assert_eq!(ask("198.51.100.1:8080".parse().unwrap()).unwrap(), "198.51.100.1");
        assert_eq!(ask("127.0.0.1:8080".parse().unwrap()).unwrap(), "10.88.0.1", "loopback, masqueraded to the bridge");
        // Hairpin: an instance through the host's published port.
        let hairpin = in_netns(&web2.path, || ask("198.51.100.1:8080".parse().unwrap())).unwrap().unwrap();
        assert_eq!(hairpin, "10.88.0.1");
        // The userspace fallback: DNAT leaves 127.0.0.1 to a proxy the owner runs.
        let port = PortSpec { host_port: 8090, ..p.port };
        let pp = nets.publish_with("front", "c-web", port, Loopback::Proxy).unwrap();
        assert!(ask("127.0.0.1:8090".parse().unwrap()).is_err(), "no proxy yet, no kernel path");
        let proxy = PortProxy::start(&pp).unwrap();
        assert_eq!(ask("127.0.0.1:8090".parse().unwrap()).unwrap(), "10.88.0.1");
        let from_outside = in_netns(&outside.path, || ask("198.51.100.1:8090".parse().unwrap())).unwrap().unwrap();
        assert_eq!(from_outside, "198.51.100.2");
        drop(proxy);
        nets.unpublish("front", "c-web", 8090, Proto::Tcp).unwrap();
        server.join().unwrap();

        // Busy ports: held by a host process, or published already.
        let holder = TcpListener::bind("0.0.0.0:8081").unwrap();
        let port = PortSpec { host_ip: Ipv4Addr::UNSPECIFIED, host_port: 8081, container_port: 80, proto: Proto::Tcp };
        let e = nets.publish("front", "c-web2", port).unwrap_err();
        assert!(e.to_string().starts_with("port 8081/tcp on 0.0.0.0 is already in use"), "{e}");
        drop(holder);
        let again = PortSpec { host_ip: Ipv4Addr::LOCALHOST, host_port: 8080, ..port };
        let e = nets.publish("front", "c-web2", again).unwrap_err();
        assert!(e.to_string().contains("published for instance `c-web` on network `front`"), "{e}");
        // UDP is a separate space.
        nets.publish("front", "c-web2", PortSpec { proto: Proto::Udp, host_port: 8080, ..port }).unwrap();

        // Masquerade: the outside sees the host's address.
        let far = peer_echo(&outside, 9000, 1);
        let seen = in_netns(&web.path, || ask("198.51.100.2:9000".parse().unwrap())).unwrap().unwrap();
        assert_eq!(seen, "198.51.100.1");
        far.join().unwrap();

        // DNS: instance names, from inside the instances.
        let dns = nets.serve_dns("front").unwrap();
        assert_eq!(dns_query(&web, a1.gateway.unwrap(), "web2"), (0, Some(a2.ip)));
        assert_eq!(dns_query(&web2, a1.gateway.unwrap(), "vm1.front."), (0, Some(t.ip)));
        assert_eq!(dns_query(&web2, a1.gateway.unwrap(), "example.org").0, isla_net::dns::RCODE_REFUSED);
        let out = web.exec(&["busybox", "nslookup", "web2", "10.88.0.1"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("10.88.0.3"), "{out:?}");
        drop(dns);
        let hosts = nets.hosts_file("front", "c-web").unwrap();
        assert!(
            hosts.contains("10.88.0.2\tweb web.front\n") && hosts.contains("10.88.0.3\tweb2 web2.front\n"),
            "{hosts}"
        );
        assert_eq!(nets.resolv_conf("front").unwrap(), "nameserver 10.88.0.1\nsearch front\n");

        // Rules are per network, and go away with it.
        let rules = isla_net::nft::list_rules().unwrap();
        assert!(rules.contains(&format!("chain pre-{}", net.short_id())), "{rules}");
        assert!(rules.contains("dnat to 10.88.0.2:80"), "{rules}");
        let e = nets.remove("front", false).unwrap_err();
        assert!(e.to_string().contains("has attached instances (c-web, c-web2, vm-1)"), "{e}");
        nets.detach("front", "c-web").unwrap();
        assert!(!isla_net::nft::list_rules().unwrap().contains("10.88.0.2:80"));
        assert!(web.ip(&["-o", "link"]).lines().all(|l| !l.contains("eth0")), "the veth left the instance");
        nets.remove("front", true).unwrap();
        assert!(nets.list().unwrap().is_empty());
    });
}

#[test]
fn host_only_and_bridge_drivers() {
    let (host, inst, lan) = (Netns::new("host"), Netns::new("inst"), Netns::new("lan"));
    wire(&host, "uplink", "198.51.100.1/24", &lan, "eth0", "198.51.100.2/24");
    // A second host interface for the bridge driver's parent; its far end is a LAN machine.
    host.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", "eth1", "netns", &lan.name]);
    host.ip(&["link", "set", "lan0", "up"]);
    lan.ip(&["addr", "add", "203.0.113.100/24", "dev", "eth1"]);
    lan.ip(&["link", "set", "eth1", "up"]);

    in_host(&host, |nets| {
        // host-only: the host and the instance see each other; nothing goes beyond.
        let mut spec = NetworkSpec::new("private", Driver::HostOnly);
        spec.subnet = Some("10.99.0.0/24".parse().unwrap());
        let net = nets.create(&spec).unwrap();
        nets.attach_veth("private", "i1", &inst.path, "eth0", None).unwrap();
        assert!(ping(&inst, "10.99.0.1"));
        let far = in_netns(&lan.path, || TcpListener::bind("0.0.0.0:9000")).unwrap().unwrap();
        let r = in_netns(&inst.path, || {
            TcpStream::connect_timeout(&"198.51.100.2:9000".parse().unwrap(), Duration::from_secs(1))
        })
        .unwrap();
        assert!(r.is_err(), "host-only must not forward out");
        drop(far);
        let rules = isla_net::nft::list_rules().unwrap();
        assert!(!rules.contains("masquerade"), "{rules}");
        // An overlapping subnet is refused, naming what it overlaps.
        let mut clash = NetworkSpec::new("other", Driver::Nat);
        clash.subnet = Some("10.99.0.0/16".parse().unwrap());
        let e = nets.create(&clash).unwrap_err();
        assert_eq!(e.to_string(), "subnet 10.99.0.0/16 overlaps network `private`; choose another --subnet");
        clash.subnet = Some("198.51.100.0/25".parse().unwrap());
        let e = nets.create(&clash).unwrap_err();
        assert!(e.to_string().contains("overlaps the host route to 198.51.100.0/24"), "{e}");
        // The default pool skips subnets the host routes.
        host.ip(&["route", "add", "10.88.0.0/24", "dev", "uplink"]);
        assert_eq!(nets.create(&NetworkSpec::new("auto", Driver::Nat)).unwrap().subnet.to_string(), "10.88.1.0/24");
        nets.remove("auto", false).unwrap();
        nets.detach("private", "i1").unwrap();
        nets.remove(&net.name, false).unwrap();

        // bridge: the parent is enslaved, the instance sits on its LAN.
        let mut spec = NetworkSpec::new("lan", Driver::Bridge);
        spec.parent = Some("lan0".into());
        let e = nets.create(&spec).unwrap_err();
        assert!(e.to_string().contains("needs --subnet"), "{e}");
        spec.subnet = Some("203.0.113.0/24".parse().unwrap());
        let net = nets.create(&spec).unwrap();
        assert!(host.ip(&["link", "show", "lan0"]).contains(&format!("master {}", net.bridge)));
        let a = nets.attach_veth("lan", "i2", &inst.path, "eth0", None).unwrap();
        assert_eq!((a.ip, a.gateway), (Ipv4Addr::new(203, 0, 113, 2), None));
        assert!(ping(&inst, "203.0.113.100"), "instance to a LAN machine through the parent");
        let e = nets.publish("lan", "i2", "8080:80".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("ports are not published"), "{e}");
        nets.remove("lan", true).unwrap();
        let parent = host.ip(&["link", "show", "lan0"]);
        assert!(!parent.contains("master"), "parent released: {parent}");
    });
}

#[test]
fn failures_leave_nothing_half_created() {
    let (host, inst) = (Netns::new("host"), Netns::new("inst"));
    in_host(&host, |nets| {
        for (subnet, want) in [
            ("10.1.2.5/24", "not a network address; did you mean 10.1.2.0/24?"),
            ("10.1.2.0/30", "the prefix length must be 8 to 29"),
        ] {
            let mut s = NetworkSpec::new("bad", Driver::Nat);
            s.subnet = Some(subnet.parse().unwrap());
            let e = nets.create(&s).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        let mut s = NetworkSpec::new("bad", Driver::Nat);
        s.gateway = Some(Ipv4Addr::new(10, 77, 0, 1));
        assert!(nets.create(&s).unwrap_err().to_string().contains("is not a host address of 10.88.0.0/24"));
        assert!(nets.create(&NetworkSpec::new("no/slash", Driver::Nat)).is_err());
        let mut s = NetworkSpec::new("bad", Driver::Bridge);
        s.subnet = Some("10.5.0.0/24".parse().unwrap());
        s.parent = Some("nosuch0".into());
        assert_eq!(nets.create(&s).unwrap_err().to_string(), "network interface `nosuch0` does not exist");
        assert_eq!(host.isla_links(), Vec::<String>::new());
        assert!(nets.list().unwrap().is_empty());

        nets.create(&NetworkSpec::new("n", Driver::Nat)).unwrap();
        let links = host.isla_links();
        // A namespace that does not exist, and an interface name taken inside the namespace:
        // errors, and no veth left on either side.
        let e = nets.attach_veth("n", "c1", Path::new("/run/netns/isla-no-such-ns"), "eth0", None).unwrap_err();
        assert!(e.to_string().starts_with("network namespace /run/netns/isla-no-such-ns"), "{e}");
        let e = nets.attach_veth("n", "c1", &inst.path, "lo", None).unwrap_err();
        assert!(e.to_string().contains("`lo (in /run/netns/"), "{e}");
        assert_eq!(host.isla_links(), links);
        assert!(!inst.ip(&["-o", "link"]).contains("isla-"), "{}", inst.ip(&["-o", "link"]));
        assert!(nets.inspect("n").unwrap().attachments.is_empty(), "no address kept");
        // Now it works, with the first address.
        let a = nets.attach_veth("n", "c1", &inst.path, "eth0", Some("c1")).unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(10, 88, 0, 2));
        assert!(matches!(nets.attach_tap("n", "c2", Some("C1")), Err(Error::NameInUse { .. })));
        assert!(matches!(nets.attach_tap("n", "c1", None), Err(Error::AlreadyAttached { .. })));
        let e = nets.publish("n", "c9", "8080:80".parse().unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "instance `c9` is not attached to network `n`");
        let e = nets.publish("n", "c1", "192.0.2.7:8080:80".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("not an address of this host"), "{e}");
        assert!(matches!(nets.unpublish("n", "c1", 8080, Proto::Tcp), Err(Error::NotPublished { .. })));

        // prune: a dead instance (its namespace and veth gone), a stray isla link, and the
        // now unused network.
        host.ip(&["link", "add", "isla-vstray", "type", "bridge"]);
        let t = nets.attach_tap("n", "vm", None).unwrap();
        host.ip(&["link", "del", &t.host_ifname]);
        let report = nets.prune().unwrap();
        assert_eq!(report.stale_attachments, vec!["n/vm".to_string()]);
        assert_eq!(report.links, vec!["isla-vstray".to_string()]);
        assert!(report.networks.is_empty(), "c1 still uses n");
        nets.remove("n", true).unwrap();
    });
}

#[test]
fn instances_cannot_reach_host_loopback_services() {
    let (host, inst) = (Netns::new("host"), Netns::new("inst"));
    in_host(&host, |nets| {
        nets.create(&NetworkSpec::new("n", Driver::Nat)).unwrap();
        nets.attach_veth("n", "evil", &inst.path, "eth0", None).unwrap();
        let secret = TcpListener::bind("127.0.0.1:7777").unwrap();
        // The instance routes 127.0.0.1 to the host through its eth0, as an attacker would
        // (CVE-2020-8558: the bridge has route_localnet on for loopback-published ports).
        for cmd in [
            "ip rule del pref 0 lookup local",
            "ip rule add pref 100 lookup local",
            "ip rule add pref 10 to 127.0.0.1 lookup 200",
            "ip route add 127.0.0.1 via 10.88.0.1 dev eth0 table 200",
            "sysctl -qw net.ipv4.conf.eth0.route_localnet=1",
        ] {
            let args: Vec<&str> = cmd.split(' ').collect();
            assert!(inst.exec(&args).status.success(), "{cmd}");
        }
        let r = in_netns(&inst.path, || {
            TcpStream::connect_timeout(&"127.0.0.1:7777".parse().unwrap(), Duration::from_secs(1))
        })
        .unwrap();
        assert!(r.is_err(), "reached the host's 127.0.0.1:7777");
        let guard =
            String::from_utf8_lossy(&host.exec(&["nft", "list", "chain", "inet", "isla", "guard"]).stdout).into_owned();
        let dropped: u64 = guard
            .split("counter packets ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(dropped > 0, "the guard dropped the attempts: {guard}");
        drop(secret);
        nets.remove("n", true).unwrap();
    });
}

#[test]
fn restore_after_a_reboot_and_concurrent_attaches() {
    let host = Netns::new("host");
    in_host(&host, |nets| {
        let net = nets.create(&NetworkSpec::new("n", Driver::Nat)).unwrap();
        // What a reboot does: the bridge and the rules are gone, the state remains.
        host.ip(&["link", "del", &net.bridge]);
        assert!(host.exec(&["nft", "flush", "ruleset"]).status.success());
        assert!(matches!(nets.attach_tap("n", "vm0", None), Err(Error::LinkMissing(_))));
        assert_eq!(nets.restore().unwrap(), vec!["n".to_string()]);
        assert!(host.ip(&["-o", "addr", "show", &net.bridge]).contains("10.88.0.1/24"));
        assert!(host.nft_tables().contains("isla-nat"));
        assert!(nets.restore().unwrap().is_empty(), "nothing to do the second time");

        // Several processes' worth of attaches at once: the lock gives each its own address.
        let ips: Vec<Ipv4Addr> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|i| {
                    let nets = nets.clone();
                    s.spawn(move || nets.attach_tap("n", &format!("vm{i}"), None).unwrap().ip)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = ips.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 6, "{ips:?}");
        assert_eq!(nets.inspect("n").unwrap().attachments.len(), 6);
        let enslaved = host.ip(&["-o", "link", "show", "master", &net.bridge]);
        assert_eq!(enslaved.lines().count(), 6, "{enslaved}");
        nets.remove("n", true).unwrap();
    });
}

/// Seed 004's exercise at the network layer: `web`..`web5`, each port 80 published on
/// 8080..8084, each reachable through 127.0.0.1 and by name from the others.
#[test]
fn five_web_servers_on_8080_to_8084() {
    let host = Netns::new("host");
    let names = ["web", "web2", "web3", "web4", "web5"];
    let inst: Vec<Netns> = names.iter().map(|n| Netns::new(n)).collect();
    in_host(&host, |nets| {
        nets.create(&NetworkSpec::new("compose", Driver::Nat)).unwrap();
        let mut servers = Vec::new();
        for (i, (name, ns)) in names.iter().zip(&inst).enumerate() {
            nets.attach_veth("compose", name, &ns.path, "eth0", Some(name)).unwrap();
            let l = in_netns(&ns.path, || TcpListener::bind("0.0.0.0:80")).unwrap().unwrap();
            let reply = name.to_string();
            servers.push(std::thread::spawn(move || {
                if let Ok((mut s, _)) = l.accept() {
                    let _ = s.write_all(reply.as_bytes());
                }
            }));
            let port = PortSpec {
                host_ip: Ipv4Addr::UNSPECIFIED,
                host_port: 8080 + i as u16,
                container_port: 80,
                proto: Proto::Tcp,
            };
            nets.publish("compose", name, port).unwrap();
        }
        for (i, name) in names.iter().enumerate() {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080 + i as u16));
            assert_eq!(ask(addr).unwrap(), *name);
        }
        servers.into_iter().for_each(|s| s.join().unwrap());
        let dns = nets.serve_dns("compose").unwrap();
        for (i, name) in names.iter().enumerate() {
            assert_eq!(
                dns_query(&inst[0], Ipv4Addr::new(10, 88, 0, 1), name),
                (0, Some(Ipv4Addr::new(10, 88, 0, 2 + i as u8)))
            );
        }
        drop(dns);
        for name in names {
            nets.detach("compose", name).unwrap();
        }
        nets.remove("compose", false).unwrap();
    });
}
