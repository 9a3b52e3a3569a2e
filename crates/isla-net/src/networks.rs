//! [`Networks`]: the operations, each one lock - load - change the kernel - save, undoing its
//! kernel changes if a later step fails.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::dns::DnsServer;
use crate::model::{
    check_name, AttachKind, Attachment, Driver, Loopback, Network, NetworkSpec, PortSpec, Proto, Publication, State,
};
use crate::netlink::{in_netns, Netlink};
use crate::responder;
use crate::store::Store;
use crate::{nft, tap, Error, LINK_PREFIX};

/// The pool default subnets come from: 10.88.N.0/24.
const POOL: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 0);

/// What [`Networks::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Attachments whose link had disappeared (their instance died), as `network/instance`.
    pub stale_attachments: Vec<String>,
    /// Networks with no instances, removed.
    pub networks: Vec<String>,
    /// `isla-` links no network accounts for, deleted.
    pub links: Vec<String>,
}

/// The networks of one isla root (`<root>/net`).
#[derive(Debug, Clone)]
pub struct Networks {
    store: Store,
}

/// Links created by an operation in progress, deleted again unless it commits.
struct Undo<'a> {
    nl: &'a Netlink,
    links: Vec<String>,
}

impl Undo<'_> {
    fn commit(mut self) {
        self.links.clear();
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        for l in self.links.iter().rev() {
            if let Err(e) = self.nl.delete(l) {
                tracing::warn!("undo: deleting {l}: {e}");
            }
        }
    }
}

/// FNV-1a, for short deterministic link names.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Link name `isla-<k><9 hex digits>` for an instance on a network (15 characters).
fn link_name(kind: char, net: &Network, instance: &str) -> String {
    let h = format!("{:016x}", fnv(&format!("{}/{instance}", net.id)));
    format!("{LINK_PREFIX}{kind}{}", &h[..9])
}

fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x1a, o[0], o[1], o[2], o[3]]
}

fn mac_string(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn random_id() -> Result<String, Error> {
    let mut b = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::Io { path: "/dev/urandom".into(), source: e })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn write_sysctl(path: &str, value: &str) -> Result<(), Error> {
    std::fs::write(path, value).map_err(|e| Error::Io { path: path.into(), source: e })
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Networks {
    /// Opens (creating if needed) the network state under `root` (e.g. `/var/lib/isla`).
    pub fn open(root: &Path) -> Result<Self, Error> {
        Ok(Self { store: Store::open(root)? })
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The JSON state file.
    pub fn state_file(&self) -> PathBuf {
        self.store.file()
    }

    /// All networks, by name.
    pub fn list(&self) -> Result<Vec<Network>, Error> {
        let _l = self.store.lock(false)?;
        Ok(self.store.load()?.networks.into_values().collect())
    }

    /// One network with its attachments and publications.
    pub fn inspect(&self, name: &str) -> Result<Network, Error> {
        let _l = self.store.lock(false)?;
        Self::get(&self.store.load()?, name).cloned()
    }

    fn get<'s>(state: &'s State, name: &str) -> Result<&'s Network, Error> {
        state.networks.get(name).ok_or_else(|| Error::NoSuchNetwork(name.to_string()))
    }

    fn get_mut<'s>(state: &'s mut State, name: &str) -> Result<&'s mut Network, Error> {
        state.networks.get_mut(name).ok_or_else(|| Error::NoSuchNetwork(name.to_string()))
    }

    /// Saves `new` after applying its rules; on a failed save the old rules are put back.
    fn commit(&self, old: &State, new: &State, rules_changed: bool) -> Result<(), Error> {
        if rules_changed {
            nft::apply(new)?;
        }
        if let Err(e) = self.store.save(new) {
            if rules_changed {
                if let Err(e2) = nft::apply(old) {
                    tracing::warn!("restoring the previous nftables rules: {e2}");
                }
            }
            return Err(e);
        }
        Ok(())
    }

    fn choose_subnet(state: &State, spec: &NetworkSpec, nl: &Netlink) -> Result<Ipv4Net, Error> {
        let taken: Vec<(Ipv4Net, String)> =
            state.networks.values().map(|n| (n.subnet, format!("network `{}`", n.name))).collect();
        // A bridged network is the LAN of its parent, which the host routes already.
        let routes: Vec<(Ipv4Net, String)> = if spec.driver == Driver::Bridge {
            Vec::new()
        } else {
            nl.routed_subnets()?.into_iter().map(|r| (r, format!("the host route to {r}"))).collect()
        };
        let clash = |net: Ipv4Net| taken.iter().chain(&routes).find(|(t, _)| overlaps(*t, net)).map(|(_, w)| w.clone());
        if let Some(net) = spec.subnet {
            if net.network() != net.addr() {
                return Err(Error::Invalid(format!(
                    "subnet {net} is not a network address; did you mean {}?",
                    net.trunc()
                )));
            }
            if !(8..=29).contains(&net.prefix_len()) {
                return Err(Error::Invalid(format!("subnet {net}: the prefix length must be 8 to 29")));
            }
            if let Some(other) = clash(net) {
                return Err(Error::SubnetInUse { subnet: net, other });
            }
            return Ok(net);
        }
        if spec.driver == Driver::Bridge {
            return Err(Error::Invalid("the bridge driver needs --subnet (the addresses of the parent's LAN)".into()));
        }
        (0..=255u8)
            .filter_map(|n| Ipv4Net::new(Ipv4Addr::new(POOL.octets()[0], POOL.octets()[1], n, 0), 24).ok())
            .find(|net| clash(*net).is_none())
            .ok_or(Error::NoFreeSubnet)
    }

    /// Creates a network: its bridge (with the gateway address for nat and host-only, the parent
    /// enslaved for bridge) and its rules.
    pub fn create(&self, spec: &NetworkSpec) -> Result<Network, Error> {
        check_name("network name", &spec.name)?;
        if spec.parent.is_some() && spec.driver != Driver::Bridge {
            return Err(Error::Invalid(format!("--parent is for the bridge driver, not {}", spec.driver)));
        }
        let _l = self.store.lock(true)?;
        let old = self.store.load()?;
        if old.networks.contains_key(&spec.name) {
            return Err(Error::NetworkExists(spec.name.clone()));
        }
        let nl = Netlink::open()?;
        let subnet = Self::choose_subnet(&old, spec, &nl)?;
        let gateway = match (spec.gateway, spec.driver) {
            (Some(g), _) => Some(g),
            (None, Driver::Bridge) => None,
            (None, _) => subnet.hosts().next(),
        };
        if let Some(g) = gateway {
            if !subnet.contains(&g) || g == subnet.network() || g == subnet.broadcast() {
                return Err(Error::Invalid(format!("gateway {g} is not a host address of {subnet}")));
            }
        }
        let id = random_id()?;
        let bridge = format!("{LINK_PREFIX}br-{}", &id[..7]);
        if nl.link(&bridge)?.is_some() {
            return Err(Error::LinkExists(bridge));
        }
        if let Some(p) = &spec.parent {
            let l = nl.link(p)?.ok_or_else(|| Error::LinkMissing(p.clone()))?;
            if l.name.starts_with(LINK_PREFIX) || l.controller.is_some() {
                return Err(Error::Invalid(format!("--parent {p}: the interface is already part of a bridge")));
            }
        }
        let net = Network {
            name: spec.name.clone(),
            id,
            driver: spec.driver,
            subnet,
            gateway,
            bridge: bridge.clone(),
            parent: spec.parent.clone(),
            created: now(),
            attachments: Default::default(),
            publications: Default::default(),
        };

        let mut undo = Undo { nl: &nl, links: Vec::new() };
        Self::build_bridge(&nl, &net, &mut undo)?;
        let mut new = old.clone();
        new.version = 1;
        new.networks.insert(net.name.clone(), net.clone());
        self.commit(&old, &new, true)?;
        undo.commit();
        tracing::info!(network = %net.name, %bridge, %subnet, "network created");
        Ok(net)
    }

    /// Creates `net`'s bridge: its gateway address and `route_localnet` (nat, host-only), its
    /// parent (bridge), IPv4 forwarding (nat). The bridge is registered in `undo`.
    fn build_bridge(nl: &Netlink, net: &Network, undo: &mut Undo) -> Result<(), Error> {
        let br = nl.add_bridge(&net.bridge)?;
        undo.links.push(net.bridge.clone());
        if net.host_has_address() {
            if let Some(g) = net.gateway {
                let addr = Ipv4Net::new(g, net.subnet.prefix_len()).map_err(|e| Error::Invalid(e.to_string()))?;
                nl.add_addr(br, addr)?;
            }
            // Lets the output chain's DNAT send 127.0.0.1-sourced packets to instances.
            write_sysctl(&format!("/proc/sys/net/ipv4/conf/{}/route_localnet", net.bridge), "1")?;
        }
        if let Some(p) = &net.parent {
            nl.enslave_up(nl.index(p)?, br)?;
        }
        if net.driver == Driver::Nat {
            write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        }
        Ok(())
    }

    /// Brings the kernel back in line with the state after a reboot or a crash: recreates
    /// missing bridges and re-applies the rules. Returns the networks whose bridge was recreated.
    /// (Attachments whose instance is gone are left to [`Networks::prune`].)
    pub fn restore(&self) -> Result<Vec<String>, Error> {
        let _l = self.store.lock(true)?;
        let state = self.store.load()?;
        let nl = Netlink::open()?;
        let mut undo = Undo { nl: &nl, links: Vec::new() };
        for net in state.networks.values() {
            if nl.link(&net.bridge)?.is_none() {
                Self::build_bridge(&nl, net, &mut undo)?;
            }
        }
        nft::apply(&state)?;
        let rebuilt =
            state.networks.values().filter(|n| undo.links.contains(&n.bridge)).map(|n| n.name.clone()).collect();
        undo.commit();
        Ok(rebuilt)
    }

    /// Removes a network, its bridge and its rules. With instances attached it fails unless
    /// `force`, which detaches them first (their veth or TAP is deleted).
    pub fn remove(&self, name: &str, force: bool) -> Result<(), Error> {
        let _l = self.store.lock(true)?;
        let old = self.store.load()?;
        let net = Self::get(&old, name)?;
        if !net.attachments.is_empty() && !force {
            let instances = net.attachments.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(Error::InUse { network: name.to_string(), instances });
        }
        let nl = Netlink::open()?;
        let mut new = old.clone();
        new.networks.remove(name);
        // Rules first: once they are gone nothing refers to the links.
        nft::apply(&new)?;
        for a in net.attachments.values() {
            nl.delete(&a.host_ifname)?;
        }
        nl.delete(&net.bridge)?;
        self.store.save(&new)?;
        responder::stop_idle(&self.store, &old, &new);
        Ok(())
    }

    fn check_attach(state: &State, network: &str, instance: &str, hostname: Option<&str>) -> Result<(), Error> {
        check_name("instance id", instance)?;
        let net = Self::get(state, network)?;
        if net.attachments.contains_key(instance) {
            return Err(Error::AlreadyAttached { network: network.into(), instance: instance.into() });
        }
        if let Some(h) = hostname {
            check_name("hostname", h)?;
            if let Some(ip) = net.resolve(h) {
                let holder =
                    net.attachments.values().find(|a| a.ip == ip).map(|a| a.instance_id.clone()).unwrap_or_default();
                return Err(Error::NameInUse { network: network.into(), name: h.into(), instance: holder });
            }
        }
        Ok(())
    }

    fn allocate(net: &Network) -> Result<Ipv4Addr, Error> {
        let used: BTreeSet<Ipv4Addr> = net.attachments.values().map(|a| a.ip).chain(net.gateway).collect();
        net.subnet.hosts().skip(1).find(|ip| !used.contains(ip)).ok_or_else(|| Error::NoFreeAddress(net.name.clone()))
    }

    /// The first half of an attachment: checks, address, record (not saved yet).
    pub(crate) fn plan_attach(
        state: &State,
        network: &str,
        instance: &str,
        hostname: Option<&str>,
        kind: AttachKind,
    ) -> Result<Attachment, Error> {
        Self::check_attach(state, network, instance, hostname)?;
        let net = Self::get(state, network)?;
        let ip = Self::allocate(net)?;
        let letter = if kind == AttachKind::Veth { 'v' } else { 't' };
        Ok(Attachment {
            instance_id: instance.to_string(),
            kind,
            ip,
            prefix_len: net.subnet.prefix_len(),
            mac: mac_string(mac_for(ip)),
            gateway: net.gateway,
            host_ifname: link_name(letter, net, instance),
            hostname: hostname.map(str::to_string),
            netns: None,
        })
    }

    fn save_attachment(&self, mut state: State, network: &str, a: &Attachment) -> Result<(), Error> {
        Self::get_mut(&mut state, network)?.attachments.insert(a.instance_id.clone(), a.clone());
        self.store.save(&state)
    }

    /// Attaches a container: creates a veth pair on the network's bridge, moves the other end
    /// into the namespace at `netns` as `ifname_in_ns` with the instance's address and MAC, adds
    /// the default route via the gateway (unless the namespace has one already) and brings `lo` up.
    pub fn attach_veth(
        &self,
        network: &str,
        instance: &str,
        netns: &Path,
        ifname_in_ns: &str,
        hostname: Option<&str>,
    ) -> Result<Attachment, Error> {
        if ifname_in_ns.is_empty() || ifname_in_ns.len() > 15 || ifname_in_ns.contains(['/', ' ']) {
            return Err(Error::Invalid(format!("interface name `{ifname_in_ns}`: 1-15 characters, no `/` or space")));
        }
        let _l = self.store.lock(true)?;
        let state = self.store.load()?;
        let mut a = Self::plan_attach(&state, network, instance, hostname, AttachKind::Veth)?;
        a.netns = Some(netns.to_path_buf());
        let net = Self::get(&state, network)?;
        let ns = std::fs::File::open(netns).map_err(|e| Error::Netns { path: netns.to_path_buf(), source: e })?;
        let nl = Netlink::open()?;
        let peer = format!("{LINK_PREFIX}p{}", &a.host_ifname[LINK_PREFIX.len() + 1..]);
        for n in [&a.host_ifname, &peer] {
            if nl.link(n)?.is_some() {
                return Err(Error::LinkExists(n.clone()));
            }
        }
        let br = nl.index(&net.bridge)?;
        let mut undo = Undo { nl: &nl, links: Vec::new() };
        nl.add_veth(&a.host_ifname, &peer)?;
        // Deleting the host end deletes the pair, wherever the peer is by then.
        undo.links.push(a.host_ifname.clone());
        nl.enslave_up(nl.index(&a.host_ifname)?, br)?;
        nl.move_to_netns(nl.index(&peer)?, ns.as_raw_fd())?;
        let addr = Ipv4Net::new(a.ip, a.prefix_len).map_err(|e| Error::Invalid(e.to_string()))?;
        let (mac, gw) = (mac_for(a.ip), a.gateway);
        in_netns(netns, || -> Result<(), Error> {
            let inner = Netlink::open()?;
            if inner.link(ifname_in_ns)?.is_some() {
                return Err(Error::LinkExists(format!("{ifname_in_ns} (in {})", netns.display())));
            }
            let idx = inner.index(&peer)?;
            inner.rename_mac_up(idx, ifname_in_ns, mac)?;
            inner.add_addr(idx, addr)?;
            inner.up(inner.index("lo")?)?;
            if let Some(g) = gw {
                inner.add_default_route(g)?;
            }
            Ok(())
        })??;
        self.save_attachment(state, network, &a)?;
        undo.commit();
        Ok(a)
    }

    /// Attaches a microVM: creates a persistent TAP device (`isla-t…`, owned by root) enslaved
    /// to the bridge. The monitor opens it by name; the returned attachment has the address,
    /// gateway and MAC the guest should use ([`Attachment::kernel_ip_arg`]).
    pub fn attach_tap(&self, network: &str, instance: &str, hostname: Option<&str>) -> Result<Attachment, Error> {
        let _l = self.store.lock(true)?;
        let state = self.store.load()?;
        let a = Self::plan_attach(&state, network, instance, hostname, AttachKind::Tap)?;
        let net = Self::get(&state, network)?;
        let nl = Netlink::open()?;
        if nl.link(&a.host_ifname)?.is_some() {
            return Err(Error::LinkExists(a.host_ifname.clone()));
        }
        let br = nl.index(&net.bridge)?;
        let mut undo = Undo { nl: &nl, links: Vec::new() };
        tap::create_persistent(&a.host_ifname)?;
        undo.links.push(a.host_ifname.clone());
        nl.enslave_up(nl.index(&a.host_ifname)?, br)?;
        self.save_attachment(state, network, &a)?;
        undo.commit();
        Ok(a)
    }

    /// Detaches an instance: unpublishes its ports, deletes its veth or TAP, frees its address.
    /// A link already gone (the container's namespace died) is not an error.
    pub fn detach(&self, network: &str, instance: &str) -> Result<(), Error> {
        let _l = self.store.lock(true)?;
        let old = self.store.load()?;
        let mut new = old.clone();
        let net = Self::get_mut(&mut new, network)?;
        let a = net
            .attachments
            .remove(instance)
            .ok_or_else(|| Error::NotAttached { network: network.into(), instance: instance.into() })?;
        let had_ports = net.publications.remove(instance).is_some();
        if had_ports {
            nft::apply(&new)?;
        }
        Netlink::open()?.delete(&a.host_ifname)?;
        self.store.save(&new)?;
        responder::stop_idle(&self.store, &old, &new);
        Ok(())
    }

    /// Publishes `port` of an attached instance on the host, after checking that no other
    /// publication and no host socket holds it. 127.0.0.1 is served by the kernel
    /// ([`Loopback::Kernel`]); see [`Networks::publish_with`].
    pub fn publish(&self, network: &str, instance: &str, port: PortSpec) -> Result<Publication, Error> {
        self.publish_with(network, instance, port, Loopback::Kernel)
    }

    /// [`Networks::publish`] choosing how 127.0.0.1 reaches the port. With
    /// [`Loopback::Proxy`] the caller runs [`crate::PortProxy::start`] on the result.
    pub fn publish_with(
        &self,
        network: &str,
        instance: &str,
        port: PortSpec,
        loopback: Loopback,
    ) -> Result<Publication, Error> {
        if loopback == Loopback::Proxy && port.proto != Proto::Tcp {
            return Err(Error::Invalid(format!(
                "port {}/{}: the loopback proxy handles tcp only",
                port.host_port, port.proto
            )));
        }
        let _l = self.store.lock(true)?;
        let old = self.store.load()?;
        let net = Self::get(&old, network)?;
        if net.driver == Driver::Bridge {
            return Err(Error::Invalid(format!(
                "network `{network}` uses the bridge driver: its instances are reached at their own addresses, ports are not published"
            )));
        }
        let a = net
            .attachments
            .get(instance)
            .ok_or_else(|| Error::NotAttached { network: network.into(), instance: instance.into() })?;
        let in_use = |by: String| Error::PortInUse { ip: port.host_ip, port: port.host_port, proto: port.proto, by };
        for n in old.networks.values() {
            for (inst, pubs) in &n.publications {
                let clash = pubs.iter().any(|p| {
                    p.port.proto == port.proto
                        && p.port.host_port == port.host_port
                        && (p.port.host_ip == port.host_ip
                            || p.port.host_ip.is_unspecified()
                            || port.host_ip.is_unspecified())
                });
                if clash {
                    return Err(in_use(format!(" (published for instance `{inst}` on network `{}`)", n.name)));
                }
            }
        }
        check_port_free(port).map_err(|e| match e {
            Some(by) => in_use(by),
            None => Error::Invalid(format!("host address {} is not an address of this host", port.host_ip)),
        })?;
        let p = Publication { port, instance_ip: a.ip, loopback };
        let mut new = old.clone();
        Self::get_mut(&mut new, network)?.publications.entry(instance.to_string()).or_default().push(p);
        self.commit(&old, &new, true)?;
        Ok(p)
    }

    /// Removes a published port.
    pub fn unpublish(&self, network: &str, instance: &str, host_port: u16, proto: Proto) -> Result<(), Error> {
        let _l = self.store.lock(true)?;
        let old = self.store.load()?;
        let mut new = old.clone();
        let net = Self::get_mut(&mut new, network)?;
        let pubs = net.publications.entry(instance.to_string()).or_default();
        let before = pubs.len();
        pubs.retain(|p| !(p.port.host_port == host_port && p.port.proto == proto));
        if pubs.len() == before {
            return Err(Error::NotPublished { instance: instance.into(), port: host_port, proto });
        }
        if pubs.is_empty() {
            net.publications.remove(instance);
        }
        self.commit(&old, &new, true)
    }

    /// `/etc/hosts` for a container on `network`: localhost, then every named instance of the
    /// network (the instance itself first).
    pub fn hosts_file(&self, network: &str, instance: &str) -> Result<String, Error> {
        let net = self.inspect(network)?;
        let me = net
            .attachments
            .get(instance)
            .ok_or_else(|| Error::NotAttached { network: network.into(), instance: instance.into() })?;
        let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        let others = net.attachments.values().filter(|a| a.instance_id != instance);
        for a in std::iter::once(me).chain(others) {
            let name = a.hostname.as_deref().unwrap_or(&a.instance_id);
            s.push_str(&format!("{}\t{name} {name}.{}\n", a.ip, net.name));
        }
        Ok(s)
    }

    /// `/etc/resolv.conf` for a container on `network`: the network's DNS responder.
    pub fn resolv_conf(&self, network: &str) -> Result<String, Error> {
        let net = self.inspect(network)?;
        Ok(crate::dns::resolv_conf(Some(Self::dns_address(&net)?), &net.name, ""))
    }

    pub(crate) fn dns_address(net: &Network) -> Result<Ipv4Addr, Error> {
        net.gateway.filter(|_| net.host_has_address()).ok_or_else(|| {
            Error::Invalid(format!("network `{}` has no address on the host to serve DNS on (bridge driver)", net.name))
        })
    }

    /// Starts the DNS responder of `network` on its gateway address, UDP port 53, in the calling
    /// thread's namespace. It reads the state file for each query, so instances attached later,
    /// by any process, resolve too. It stops when the returned server is dropped.
    pub fn serve_dns(&self, network: &str) -> Result<DnsServer, Error> {
        let net = self.inspect(network)?;
        let addr = (Self::dns_address(&net)?, 53);
        let sock =
            UdpSocket::bind(addr).map_err(|e| Error::Io { path: format!("udp {}:53", addr.0).into(), source: e })?;
        let store = self.store.clone();
        let name = net.name.clone();
        DnsServer::spawn(sock, move |q| store.load().ok()?.networks.get(&name)?.resolve(q))
            .map_err(|e| Error::Io { path: "dns thread".into(), source: e })
    }

    /// Cleans up: drops attachments whose link is gone, removes networks without instances,
    /// deletes `isla-` links that no network accounts for and re-applies the rules. Assumes one
    /// isla root per network namespace (the links of another root would look like leftovers).
    pub fn prune(&self) -> Result<PruneReport, Error> {
        let _l = self.store.lock(true)?;
        let old = self.store.load()?;
        let mut new = old.clone();
        let nl = Netlink::open()?;
        let links = nl.links()?;
        let exists = |n: &str| links.iter().any(|l| l.name == n);
        let mut report = PruneReport::default();
        for net in new.networks.values_mut() {
            let gone: Vec<String> =
                net.attachments.values().filter(|a| !exists(&a.host_ifname)).map(|a| a.instance_id.clone()).collect();
            for inst in gone {
                net.attachments.remove(&inst);
                net.publications.remove(&inst);
                report.stale_attachments.push(format!("{}/{inst}", net.name));
            }
        }
        let unused: Vec<String> =
            new.networks.values().filter(|n| n.attachments.is_empty()).map(|n| n.name.clone()).collect();
        for n in &unused {
            new.networks.remove(n);
        }
        nft::apply(&new)?;
        for n in &unused {
            if let Some(net) = old.networks.get(n) {
                nl.delete(&net.bridge)?;
            }
        }
        report.networks = unused;
        let links = nl.links()?;
        let keep: BTreeSet<&str> = new
            .networks
            .values()
            .flat_map(|n| {
                std::iter::once(n.bridge.as_str()).chain(n.attachments.values().map(|a| a.host_ifname.as_str()))
            })
            .collect();
        for l in &links {
            if l.name.starts_with(LINK_PREFIX) && !keep.contains(l.name.as_str()) && nl.delete(&l.name)? {
                report.links.push(l.name.clone());
            }
        }
        self.store.save(&new)?;
        responder::stop_idle(&self.store, &old, &new);
        Ok(report)
    }
}

/// Checks that nothing on the host holds `port`: `Ok` if free, `Err(Some(by))` if taken,
/// `Err(None)` if the address is not local.
fn check_port_free(port: PortSpec) -> Result<(), Option<String>> {
    let addr = (port.host_ip, port.host_port);
    let r = match port.proto {
        Proto::Tcp => TcpListener::bind(addr).map(drop),
        Proto::Udp => UdpSocket::bind(addr).map(drop),
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Some(" (a host process listens on it)".into())),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Err(None),
        Err(e) => Err(Some(format!(" ({e})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_fit_ifnamsiz_and_differ() {
        let mut n = crate::model::sample_network(Driver::Nat);
        let a = link_name('v', &n, "web");
        assert_eq!(a.len(), 15);
        assert_ne!(a, link_name('v', &n, "web2"));
        assert_eq!(Networks::allocate(&n).unwrap(), Ipv4Addr::new(10, 88, 3, 2));
        let plan = Networks::plan_attach(
            &State { version: 1, networks: [("n".to_string(), n.clone())].into() },
            "n",
            "web",
            Some("web"),
            AttachKind::Veth,
        )
        .unwrap();
        n.attachments.insert("web".into(), plan);
        assert_eq!(Networks::allocate(&n).unwrap(), Ipv4Addr::new(10, 88, 3, 3));
        let st = State { version: 1, networks: [("n".to_string(), n)].into() };
        assert!(matches!(Networks::check_attach(&st, "n", "other", Some("WEB")), Err(Error::NameInUse { .. })));
        assert!(matches!(Networks::check_attach(&st, "n", "web", None), Err(Error::AlreadyAttached { .. })));
    }

    #[test]
    fn subnets_overlap() {
        let a: Ipv4Net = "10.88.0.0/16".parse().unwrap();
        assert!(overlaps(a, "10.88.5.0/24".parse().unwrap()));
        assert!(overlaps("10.88.5.0/24".parse().unwrap(), a));
        assert!(!overlaps(a, "10.89.0.0/24".parse().unwrap()));
    }
}
