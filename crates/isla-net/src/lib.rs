//! isla-net: the networks instances are plugged into.
//!
//! A network is a Linux bridge (`isla-br-<id7>`) acting as the virtual switch. Containers join it
//! through a veth pair whose other end is moved into their network namespace
//! ([`Networks::attach_veth`]); microVMs through a persistent TAP device their virtio-net opens
//! by name ([`Networks::attach_tap`]). Three drivers ([`Driver`]):
//! - `nat`: the host holds the gateway address on the bridge and masquerades the subnet's
//!   traffic leaving through any other interface;
//! - `bridge`: no address and no NAT; a host uplink (`parent`) can be enslaved so instances sit
//!   on the physical LAN;
//! - `host-only`: gateway address on the bridge, nothing forwarded in or out: instances reach
//!   each other and the host only.
//!
//! Addresses are allocated per network (gateway `.1`, instances from `.2`) and released on
//! detach; default subnets are the first /24 of 10.88.0.0/16 that neither another isla network
//! nor any route of the host uses. Published ports ([`Networks::publish`]) are nftables DNAT
//! rules in the prerouting chain (traffic from outside) and the output chain (the host's own
//! connections, 127.0.0.1 included: the bridge has `route_localnet` on and the loopback source is
//! masqueraded; or, per publication, a userspace proxy on 127.0.0.1 instead: [`Loopback`],
//! [`PortProxy`]). Instance names are served by a small DNS responder, in a thread of the caller
//! ([`Networks::serve_dns`]) or as a process per network that the first instance starts and the
//! last one's detach stops ([`Networks::ensure_dns`], [`Networks::run_dns_responder`]), and
//! written into each container's `/etc/hosts` ([`Networks::hosts_file`]).
//!
//! Everything runs in the calling thread's network namespace, so tests build whole topologies
//! inside namespaces they create ([`in_netns`] enters one on a scoped thread).
//!
//! State ([`State`]) is a small JSON file, `<root>/net/networks.json`, replaced atomically
//! (write, fsync, rename) under an exclusive `flock` of `<root>/net/lock`. Rules are rebuilt from
//! the state on each change (see [`nft`]). Every operation that creates several things undoes
//! what it created when a later step fails. Everything isla creates carries the `isla-` prefix
//! (`isla-br-*`, `isla-v*` veths, `isla-t*` taps, tables `inet isla` and `ip isla-nat`), so
//! [`Networks::prune`] can find leftovers after a crash.
//!
//! Netlink goes through `rtnetlink` on a current-thread tokio runtime created per operation
//! (the library stays synchronous for its callers; rtnetlink is the maintained, typed netlink
//! crate). TAP creation uses two ioctls (the kernel cannot create tun devices over netlink).
//! nftables is driven through the `nft` command (a text ruleset on stdin is one atomic
//! transaction, and the text is what a user reads back with `nft list`). The DNS wire format is
//! hand-written ([`dns`] says why).

pub mod dns;
mod model;
mod netlink;
mod networks;
pub mod nft;
mod proxy;
mod responder;
mod store;
mod tap;

use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use dns::DnsServer;
pub use ipnet::Ipv4Net;
pub use model::{AttachKind, Attachment, Driver, Loopback, Network, NetworkSpec, PortSpec, Proto, Publication, State};
pub use netlink::{in_netns, LinkInfo};
pub use networks::{Networks, PruneReport};
pub use proxy::PortProxy;
pub use responder::Responder;
pub use tap::open_tap;

/// The prefix of every link isla creates.
pub const LINK_PREFIX: &str = "isla-";

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input (name, driver, subnet, port syntax).
    #[error("{0}")]
    Invalid(String),
    /// A network with this name exists.
    #[error("network `{0}` already exists; choose another name or remove it with `isla network rm {0}`")]
    NetworkExists(String),
    /// No network with this name.
    #[error("no network named `{0}` (see `isla network ls`)")]
    NoSuchNetwork(String),
    /// The subnet overlaps one in use.
    #[error("subnet {subnet} overlaps {other}; choose another --subnet")]
    SubnetInUse {
        /// Requested subnet.
        subnet: ipnet::Ipv4Net,
        /// What it overlaps (a network or a host route).
        other: String,
    },
    /// Every default subnet is taken.
    #[error("no free /24 left in 10.88.0.0/16; give a --subnet")]
    NoFreeSubnet,
    /// Every address of the subnet is allocated.
    #[error("network `{0}` has no free address left")]
    NoFreeAddress(String),
    /// The instance is attached already.
    #[error("instance `{instance}` is already attached to network `{network}`")]
    AlreadyAttached {
        /// Network.
        network: String,
        /// Instance.
        instance: String,
    },
    /// The instance is not attached.
    #[error("instance `{instance}` is not attached to network `{network}`")]
    NotAttached {
        /// Network.
        network: String,
        /// Instance.
        instance: String,
    },
    /// Another instance on the network has this DNS name.
    #[error("name `{name}` is already used by instance `{instance}` on network `{network}`")]
    NameInUse {
        /// Network.
        network: String,
        /// Name.
        name: String,
        /// The instance holding it.
        instance: String,
    },
    /// The network still has instances.
    #[error("network `{network}` has attached instances ({instances}); stop them or use --force")]
    InUse {
        /// Network.
        network: String,
        /// Comma-separated instance ids.
        instances: String,
    },
    /// The host port is taken.
    #[error("port {port}/{proto} on {ip} is already in use{by}")]
    PortInUse {
        /// Host address.
        ip: Ipv4Addr,
        /// Host port.
        port: u16,
        /// Protocol.
        proto: Proto,
        /// ` by instance X on network Y`, or empty when a host process holds it.
        by: String,
    },
    /// Not published.
    #[error("port {port}/{proto} is not published for instance `{instance}`")]
    NotPublished {
        /// Instance.
        instance: String,
        /// Host port.
        port: u16,
        /// Protocol.
        proto: Proto,
    },
    /// A link isla needs is missing.
    #[error("network interface `{0}` does not exist")]
    LinkMissing(String),
    /// A link isla wants to create exists already.
    #[error("network interface `{0}` already exists")]
    LinkExists(String),
    /// A netlink request failed.
    #[error("netlink: {op}: {message}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The error.
        message: String,
    },
    /// A network namespace could not be opened or entered.
    #[error("network namespace {path}: {source}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// TAP creation failed.
    #[error("creating TAP device {name}: {source}")]
    Tap {
        /// Device name.
        name: String,
        /// The error.
        source: std::io::Error,
    },
    /// `nft` is not installed.
    #[error("the `nft` command was not found; install the nftables package")]
    NftMissing,
    /// `nft` refused the rules.
    #[error("nftables: {0}")]
    Nft(String),
    /// The DNS responder of a network could not be started.
    #[error("the DNS responder of network `{network}` did not start: {msg} (its log: {log})")]
    Dns {
        /// Network.
        network: String,
        /// What went wrong.
        msg: String,
        /// Its log file.
        log: PathBuf,
    },
    /// A file of the state could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The state file does not parse.
    #[error("{path}: {message}; fix or move the file away (isla keeps no other copy)")]
    BadState {
        /// The file.
        path: PathBuf,
        /// The error.
        message: String,
    },
}
