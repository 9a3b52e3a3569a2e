//! Links, addresses and routes through rtnetlink.
//!
//! rtnetlink is asynchronous; isla's callers are not. A [`Netlink`] owns a current-thread tokio
//! runtime and one rtnetlink connection whose socket was created on the calling thread, so it
//! works in the network namespace that thread was in when it opened it. [`in_netns`] runs a
//! closure on a short-lived thread that has entered another namespace: that is how the inside of
//! a container's namespace gets configured.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::runtime::Runtime;

use crate::Error;

/// One link as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Index of the bridge (or bond) this link is enslaved to.
    pub controller: Option<u32>,
}

/// A synchronous rtnetlink connection bound to the namespace of the thread that opened it.
pub(crate) struct Netlink {
    rt: Runtime,
    handle: Handle,
}

fn nl_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let op = op.into();
    move |e| Error::Netlink { op, message: e.to_string() }
}

/// True if the error is netlink's "no such device" (the link is already gone).
fn is_enodev(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV)
}

impl Netlink {
    /// Opens a connection in the calling thread's current network namespace.
    pub(crate) fn open() -> Result<Self, Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| Error::Netlink { op: "start the netlink runtime".into(), message: e.to_string() })?;
        let handle = {
            let _guard = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| Error::Netlink { op: "open a netlink socket".into(), message: e.to_string() })?;
            rt.spawn(conn);
            handle
        };
        Ok(Self { rt, handle })
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn info(msg: &LinkMessage) -> LinkInfo {
        let mut info = LinkInfo { index: msg.header.index, name: String::new(), controller: None };
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => info.name = n.clone(),
                LinkAttribute::Controller(c) => info.controller = Some(*c),
                _ => {}
            }
        }
        info
    }

    /// All links of this namespace.
    pub(crate) fn links(&self) -> Result<Vec<LinkInfo>, Error> {
        let h = self.handle.clone();
        self.block(async move {
            let msgs: Vec<LinkMessage> = h.link().get().execute().try_collect().await.map_err(nl_err("list links"))?;
            Ok(msgs.iter().map(Self::info).collect())
        })
    }

    /// The link called `name`, if there is one.
    pub(crate) fn link(&self, name: &str) -> Result<Option<LinkInfo>, Error> {
        let h = self.handle.clone();
        let name = name.to_string();
        self.block(async move {
            match h.link().get().match_name(name.clone()).execute().try_next().await {
                Ok(m) => Ok(m.as_ref().map(Self::info)),
                Err(e) if is_enodev(&e) => Ok(None),
                Err(e) => Err(nl_err(format!("look up link {name}"))(e)),
            }
        })
    }

    /// The index of link `name`, or an error naming it.
    pub(crate) fn index(&self, name: &str) -> Result<u32, Error> {
        self.link(name)?.map(|l| l.index).ok_or_else(|| Error::LinkMissing(name.to_string()))
    }

    /// Creates a bridge (up).
    pub(crate) fn add_bridge(&self, name: &str) -> Result<u32, Error> {
        let h = self.handle.clone();
        self.block(h.link().add(LinkBridge::new(name).build()).execute())
            .map_err(nl_err(format!("create bridge {name}")))?;
        self.index(name)
    }

    /// Creates a veth pair, both ends down, in this namespace.
    pub(crate) fn add_veth(&self, name: &str, peer: &str) -> Result<(), Error> {
        let h = self.handle.clone();
        self.block(h.link().add(LinkVeth::new(name, peer).build()).execute())
            .map_err(nl_err(format!("create veth pair {name}/{peer}")))
    }

    fn set(&self, msg: LinkMessage, op: String) -> Result<(), Error> {
        let h = self.handle.clone();
        self.block(h.link().set(msg).execute()).map_err(nl_err(op))
    }

    /// Enslaves link `index` to bridge `bridge` and brings it up.
    pub(crate) fn enslave_up(&self, index: u32, bridge: u32) -> Result<(), Error> {
        self.set(
            LinkUnspec::new_with_index(index).controller(bridge).up().build(),
            format!("attach link {index} to bridge {bridge}"),
        )
    }

    /// Brings link `index` up.
    pub(crate) fn up(&self, index: u32) -> Result<(), Error> {
        self.set(LinkUnspec::new_with_index(index).up().build(), format!("bring link {index} up"))
    }

    /// Renames link `index`, sets its MAC address and brings it up.
    pub(crate) fn rename_mac_up(&self, index: u32, name: &str, mac: [u8; 6]) -> Result<(), Error> {
        self.set(
            LinkUnspec::new_with_index(index).name(name.to_string()).address(mac.to_vec()).up().build(),
            format!("rename link {index} to {name}"),
        )
    }

    /// Moves link `index` into the network namespace open as `fd`.
    pub(crate) fn move_to_netns(&self, index: u32, fd: std::os::fd::RawFd) -> Result<(), Error> {
        self.set(
            LinkUnspec::new_with_index(index).setns_by_fd(fd).build(),
            format!("move link {index} into the namespace"),
        )
    }

    /// Adds an IPv4 address to link `index`.
    pub(crate) fn add_addr(&self, index: u32, net: Ipv4Net) -> Result<(), Error> {
        let h = self.handle.clone();
        self.block(h.address().add(index, IpAddr::V4(net.addr()), net.prefix_len()).execute())
            .map_err(nl_err(format!("add address {net} to link {index}")))
    }

    /// Adds the default route via `gateway`, unless there is one already (then returns false).
    pub(crate) fn add_default_route(&self, gateway: Ipv4Addr) -> Result<bool, Error> {
        let h = self.handle.clone();
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).build();
        match self.block(h.route().add(msg).execute()) {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => Ok(false),
            Err(e) => Err(nl_err(format!("add default route via {gateway}"))(e)),
        }
    }

    /// Deletes link `name`. Returns false if it did not exist.
    pub(crate) fn delete(&self, name: &str) -> Result<bool, Error> {
        let Some(l) = self.link(name)? else { return Ok(false) };
        let h = self.handle.clone();
        match self.block(h.link().del(l.index).execute()) {
            Ok(()) => Ok(true),
            Err(e) if is_enodev(&e) => Ok(false),
            Err(e) => Err(nl_err(format!("delete link {name}"))(e)),
        }
    }

    /// The IPv4 destinations of every route in every table of this namespace, default route
    /// excluded.
    pub(crate) fn routed_subnets(&self) -> Result<Vec<Ipv4Net>, Error> {
        let h = self.handle.clone();
        let msgs: Vec<_> = self
            .block(h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute().try_collect())
            .map_err(nl_err("list routes"))?;
        let mut out = Vec::new();
        for m in msgs {
            let len = m.header.destination_prefix_length;
            if len == 0 {
                continue;
            }
            for a in &m.attributes {
                if let RouteAttribute::Destination(RouteAddress::Inet(d)) = a {
                    if let Ok(n) = Ipv4Net::new(*d, len) {
                        out.push(n.trunc());
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Runs `f` on a thread that has entered the network namespace at `path` (a `/run/netns/NAME`
/// bind mount or `/proc/PID/ns/net`), and returns what it returns. Sockets created by `f` stay
/// in that namespace and may be used from any thread afterwards.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::Netns { path: path.to_path_buf(), source: e })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| Error::Netns { path: path.to_path_buf(), source: e.into() })?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
