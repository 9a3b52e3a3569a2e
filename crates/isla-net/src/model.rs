//! The network model: what a user asks for ([`NetworkSpec`], [`PortSpec`]) and what isla keeps
//! ([`Network`], [`Attachment`], [`Publication`]). These are also the persisted JSON records.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::Error;

/// How a network reaches the rest of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Driver {
    /// A bridge with the gateway address on the host; traffic leaving it is masqueraded.
    Nat,
    /// A bridge, optionally enslaving a host uplink (`parent`); no address, no NAT.
    Bridge,
    /// A bridge with the gateway address on the host; nothing is forwarded in or out.
    HostOnly,
}

impl Driver {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Nat => "nat",
            Driver::Bridge => "bridge",
            Driver::HostOnly => "host-only",
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Driver {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "nat" => Ok(Driver::Nat),
            "bridge" => Ok(Driver::Bridge),
            "host-only" | "hostonly" => Ok(Driver::HostOnly),
            _ => Err(Error::Invalid(format!("driver `{s}`: expected nat, bridge or host-only"))),
        }
    }
}

/// What `create` is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Network name: 1-64 characters of `[A-Za-z0-9_.-]`, starting with a letter or digit.
    pub name: String,
    /// The driver.
    pub driver: Driver,
    /// The subnet; by default the first free /24 of 10.88.0.0/16 (required for `bridge`).
    pub subnet: Option<Ipv4Net>,
    /// The gateway instances route through; by default the subnet's first address (the bridge's
    /// own address for nat and host-only; for `bridge`, the LAN's router if any).
    pub gateway: Option<Ipv4Addr>,
    /// `bridge` driver only: a host interface to enslave to the bridge.
    pub parent: Option<String>,
}

impl NetworkSpec {
    /// A spec with the driver's defaults.
    pub fn new(name: impl Into<String>, driver: Driver) -> Self {
        Self { name: name.into(), driver, subnet: None, gateway: None, parent: None }
    }
}

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(Error::Invalid(format!("protocol `{s}`: expected tcp or udp"))),
        }
    }
}

/// A port to publish: `host_ip:host_port` on the host forwards to `container_port` of the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Host address to listen on; `0.0.0.0` means every local address (127.0.0.1 included).
    pub host_ip: Ipv4Addr,
    /// Host port.
    pub host_port: u16,
    /// Port inside the instance.
    pub container_port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl FromStr for PortSpec {
    type Err = Error;
    /// Parses Docker's `-p` forms: `8080:80`, `127.0.0.1:8080:80`, each optionally with `/udp`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad =
            |why: &str| Error::Invalid(format!("port `{s}`: {why} (expected [HOST_IP:]HOST_PORT:PORT[/tcp|udp])"));
        let (ports, proto) = match s.split_once('/') {
            Some((p, proto)) => (p, proto.parse::<Proto>().map_err(|_| bad("unknown protocol"))?),
            None => (s, Proto::Tcp),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (ip, hp, cp) = match parts.as_slice() {
            [hp, cp] => (Ipv4Addr::UNSPECIFIED, *hp, *cp),
            [ip, hp, cp] => (ip.parse().map_err(|_| bad("bad host address"))?, *hp, *cp),
            _ => return Err(bad("wrong number of fields")),
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("ports are 1-65535"));
        Ok(PortSpec { host_ip: ip, host_port: port(hp)?, container_port: port(cp)?, proto })
    }
}

/// How an instance is plugged into a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachKind {
    /// A veth pair, one end in the container's network namespace.
    Veth,
    /// A persistent TAP device opened by a microVM's virtio-net.
    Tap,
}

/// One instance's place on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The instance.
    pub instance_id: String,
    /// Veth or TAP.
    pub kind: AttachKind,
    /// The instance's address.
    pub ip: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The instance's MAC address (set on the veth; to be given to the VM's virtio-net).
    pub mac: String,
    /// The default gateway, if the network has one.
    pub gateway: Option<Ipv4Addr>,
    /// The link on the host's bridge (veth end or TAP).
    pub host_ifname: String,
    /// The instance's DNS name on this network.
    pub hostname: Option<String>,
    /// Veth only: the namespace the other end was moved into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

impl Attachment {
    /// The Linux kernel command line `ip=` argument that configures this address in a microVM
    /// (`ip=CLIENT::GATEWAY:NETMASK:HOSTNAME:eth0:off`), with up to two name servers after the
    /// autoconf field (`...:off:DNS0:DNS1`, the kernel's `dns0-ip` and `dns1-ip`).
    pub fn kernel_ip_arg(&self, dns: &[Ipv4Addr]) -> String {
        let mask = Ipv4Net::new(self.ip, self.prefix_len).map(|n| n.netmask()).unwrap_or(Ipv4Addr::BROADCAST);
        let gw = self.gateway.map(|g| g.to_string()).unwrap_or_default();
        let dns: String = dns.iter().take(2).map(|d| format!(":{d}")).collect();
        format!("ip={}::{}:{}:{}:eth0:off{dns}", self.ip, gw, mask, self.hostname.as_deref().unwrap_or(""))
    }
}

/// How a published port is reached through the host's loopback address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loopback {
    /// The output chain's DNAT covers 127.0.0.1 too (`route_localnet` on the bridge, the
    /// loopback source masqueraded). Nothing has to run.
    #[default]
    Kernel,
    /// DNAT leaves 127.0.0.0/8 alone; a userspace proxy ([`crate::PortProxy`]), run by the
    /// process that owns the instance, listens on 127.0.0.1 and holds the port. TCP only.
    Proxy,
}

/// A published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// What was asked.
    #[serde(flatten)]
    pub port: PortSpec,
    /// The instance's address the port forwards to.
    pub instance_ip: Ipv4Addr,
    /// How 127.0.0.1 reaches it.
    #[serde(default)]
    pub loopback: Loopback,
}

/// A network as isla keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Name.
    pub name: String,
    /// Random 12-hex-digit identity; the bridge and chain names use its first 7 digits.
    pub id: String,
    /// Driver.
    pub driver: Driver,
    /// Subnet.
    pub subnet: Ipv4Net,
    /// Gateway for instances (on the bridge for nat and host-only).
    pub gateway: Option<Ipv4Addr>,
    /// The bridge (`isla-br-<id7>`).
    pub bridge: String,
    /// Enslaved host uplink (`bridge` driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Attached instances by id.
    #[serde(default)]
    pub attachments: BTreeMap<String, Attachment>,
    /// Published ports, keyed by instance id.
    #[serde(default)]
    pub publications: BTreeMap<String, Vec<Publication>>,
}

impl Network {
    /// The short id used in link and nftables chain names.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(7)]
    }

    /// True if the host has an address on the bridge (nat, host-only).
    pub fn host_has_address(&self) -> bool {
        self.driver != Driver::Bridge
    }

    /// All published ports of the network.
    pub fn all_publications(&self) -> impl Iterator<Item = &Publication> {
        self.publications.values().flatten()
    }

    /// The address of instance `name` (its hostname or its id) on this network.
    pub fn resolve(&self, name: &str) -> Option<Ipv4Addr> {
        let name = name.trim_end_matches('.');
        let short = name.strip_suffix(&format!(".{}", self.name)).unwrap_or(name);
        self.attachments
            .values()
            .find(|a| {
                a.hostname.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(short))
                    || a.instance_id.eq_ignore_ascii_case(short)
            })
            .map(|a| a.ip)
    }
}

/// The whole persisted state: every network of one isla root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format version (1).
    pub version: u32,
    /// Networks by name.
    pub networks: BTreeMap<String, Network>,
}

/// Checks a network name, instance id or hostname: 1-64 of `[A-Za-z0-9_.-]`, starting with a
/// letter or digit.
pub(crate) fn check_name(what: &str, s: &str) -> Result<(), Error> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} `{s}`: use 1-64 letters, digits, `-`, `_` or `.`, starting with a letter or digit"
        )))
    }
}

/// A network record for unit tests: `n`, 10.88.3.0/24, gateway .1, bridge `isla-br-abcdef0`.
#[cfg(test)]
pub(crate) fn sample_network(driver: Driver) -> Network {
    Network {
        name: "n".into(),
        id: "abcdef012345".into(),
        driver,
        subnet: "10.88.3.0/24".parse().unwrap(),
        gateway: Some(Ipv4Addr::new(10, 88, 3, 1)),
        bridge: "isla-br-abcdef0".into(),
        parent: None,
        created: 0,
        attachments: BTreeMap::new(),
        publications: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse_like_docker() {
        let p: PortSpec = "8080:80".parse().unwrap();
        assert_eq!((p.host_ip, p.host_port, p.container_port, p.proto), (Ipv4Addr::UNSPECIFIED, 8080, 80, Proto::Tcp));
        let p: PortSpec = "127.0.0.1:5353:53/udp".parse().unwrap();
        assert_eq!((p.host_ip, p.host_port, p.container_port, p.proto), (Ipv4Addr::LOCALHOST, 5353, 53, Proto::Udp));
        for bad in ["80", "0:80", "a:80", "1.2.3:80:80", "8080:80/sctp", "70000:80"] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("network", "web_1.net").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_name("network", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kernel_ip_argument() {
        let a = Attachment {
            instance_id: "vm1".into(),
            kind: AttachKind::Tap,
            ip: Ipv4Addr::new(10, 88, 0, 5),
            prefix_len: 24,
            mac: "02:1a:0a:58:00:05".into(),
            gateway: Some(Ipv4Addr::new(10, 88, 0, 1)),
            host_ifname: "isla-t0".into(),
            hostname: Some("vm1".into()),
            netns: None,
        };
        assert_eq!(a.kernel_ip_arg(&[]), "ip=10.88.0.5::10.88.0.1:255.255.255.0:vm1:eth0:off");
        assert_eq!(
            a.kernel_ip_arg(&[Ipv4Addr::new(10, 88, 0, 1), Ipv4Addr::new(192, 0, 2, 53)]),
            "ip=10.88.0.5::10.88.0.1:255.255.255.0:vm1:eth0:off:10.88.0.1:192.0.2.53"
        );
    }
}
