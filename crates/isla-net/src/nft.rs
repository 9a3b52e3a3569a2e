//! nftables rules, derived from the state and applied atomically with `nft -f -`.
//!
//! isla owns two tables: `inet isla` (filtering in the forward hook) and `ip isla-nat`
//! (DNAT for published ports, masquerade). Each network has its own chains in them
//! (`fwd-<id7>`, `pre-<id7>`, `out-<id7>`, `post-<id7>`), jumped to from the base chains. The
//! rules are a pure function of the state: every change rebuilds both tables in one nft
//! transaction (declare, delete, re-create), so the kernel never holds half a rule set, and a
//! network's rules disappear with it. With no networks left the tables are deleted.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::model::{Driver, Loopback, Network, Publication, State};
use crate::{Error, LINK_PREFIX};

/// The filter table.
pub const FILTER_TABLE: &str = "inet isla";
/// The NAT table.
pub const NAT_TABLE: &str = "ip isla-nat";

/// The nft script that replaces isla's tables with the rules for `state`.
pub(crate) fn script(state: &State) -> String {
    let mut s = String::new();
    for t in [FILTER_TABLE, NAT_TABLE] {
        let _ = writeln!(s, "table {t}\ndelete table {t}");
    }
    if state.networks.is_empty() {
        return s;
    }
    let nets: Vec<&Network> = state.networks.values().collect();
    let jumps = |prefix: &str| nets.iter().map(|n| format!("    jump {prefix}-{}\n", n.short_id())).collect::<String>();

    let _ = writeln!(s, "table {FILTER_TABLE} {{");
    let _ = writeln!(
        s,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{}  }}",
        jumps("fwd")
    );
    // route_localnet lets 127.0.0.0/8 travel on the bridges; never let an instance use it to
    // reach the host's loopback services (CVE-2020-8558). At raw priority, before conntrack
    // turns the replies of loopback-published ports back into 127.0.0.1.
    let _ = writeln!(
        s,
        "  chain guard {{\n    type filter hook prerouting priority raw; policy accept;\n    iifname \"{LINK_PREFIX}br-*\" ip daddr 127.0.0.0/8 counter drop\n  }}"
    );
    for n in &nets {
        let _ = writeln!(s, "  chain fwd-{} {{\n{}  }}", n.short_id(), forward_rules(n));
    }
    s.push_str("}\n");

    let _ = writeln!(s, "table {NAT_TABLE} {{");
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{}  }}",
        jumps("pre")
    );
    let _ =
        writeln!(s, "  chain output {{\n    type nat hook output priority -100; policy accept;\n{}  }}", jumps("out"));
    let _ = writeln!(
        s,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{}  }}",
        jumps("post")
    );
    for n in &nets {
        let pre: String = n.all_publications().map(|p| dnat_rule(p, false)).collect();
        let out: String = n.all_publications().map(|p| dnat_rule(p, true)).collect();
        let _ = writeln!(s, "  chain pre-{} {{\n{pre}  }}", n.short_id());
        let _ = writeln!(s, "  chain out-{} {{\n{out}  }}", n.short_id());
        let _ = writeln!(s, "  chain post-{} {{\n{}  }}", n.short_id(), postrouting_rules(n));
    }
    s.push_str("}\n");
    s
}

fn forward_rules(n: &Network) -> String {
    let b = &n.bridge;
    match n.driver {
        Driver::Nat => format!(
            // Networks are isolated from each other; out to anywhere else is allowed, in only
            // as replies or to published ports.
            "    iifname \"{b}\" oifname != \"{b}\" oifname \"isla-br-*\" drop\n\
             \x20   iifname \"{b}\" accept\n\
             \x20   oifname \"{b}\" ct state established,related accept\n\
             \x20   oifname \"{b}\" ct status dnat accept\n\
             \x20   oifname \"{b}\" iifname != \"{b}\" drop\n"
        ),
        Driver::HostOnly => {
            format!("    iifname \"{b}\" oifname != \"{b}\" drop\n    oifname \"{b}\" iifname != \"{b}\" drop\n")
        }
        // Bridged traffic is switched, not routed: nothing of it reaches this hook.
        Driver::Bridge => String::new(),
    }
}

/// The DNAT rule of a publication; in the output chain (`local`), a port whose loopback side is
/// a userspace proxy leaves 127.0.0.0/8 to it.
fn dnat_rule(p: &Publication, local: bool) -> String {
    let proxied = local && p.loopback == Loopback::Proxy;
    if proxied && p.port.host_ip.is_loopback() {
        return String::new();
    }
    let mut dst = if p.port.host_ip.is_unspecified() {
        "fib daddr type local".to_string()
    } else {
        format!("ip daddr {}", p.port.host_ip)
    };
    if proxied {
        dst.push_str(" ip daddr != 127.0.0.0/8");
    }
    format!(
        "    {dst} {proto} dport {hp} dnat to {ip}:{cp}\n",
        proto = p.port.proto,
        hp = p.port.host_port,
        ip = p.instance_ip,
        cp = p.port.container_port
    )
}

fn postrouting_rules(n: &Network) -> String {
    let (b, net) = (&n.bridge, n.subnet);
    let mut r = String::new();
    if n.host_has_address() && n.all_publications().next().is_some() {
        // Published ports reached through 127.0.0.1: the output chain's DNAT sends the packet
        // out of the bridge with a loopback source (allowed by route_localnet on the bridge);
        // give it the bridge's address so the reply comes back.
        let _ = writeln!(r, "    oifname \"{b}\" ip saddr 127.0.0.0/8 masquerade");
        // Hairpin: an instance reaching a published port of its own network.
        let _ = writeln!(r, "    oifname \"{b}\" ip saddr {net} ct status dnat masquerade");
    }
    if n.driver == Driver::Nat {
        let _ = writeln!(r, "    ip saddr {net} oifname != \"{b}\" masquerade");
    }
    r
}

/// Runs `nft` with `args`, feeding it `stdin`.
fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NftMissing,
            _ => Error::Nft(format!("cannot run nft: {e}")),
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|e| Error::Nft(format!("writing the rules to nft: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| Error::Nft(format!("waiting for nft: {e}")))?;
    if !out.status.success() {
        return Err(Error::Nft(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Replaces isla's tables with the rules for `state`, in one transaction.
pub(crate) fn apply(state: &State) -> Result<(), Error> {
    let text = script(state);
    tracing::debug!(rules = %text, "nft -f -");
    nft(&["-f", "-"], Some(&text)).map(drop)
}

/// isla's current rules as `nft list table` prints them (empty if isla has no tables).
pub fn list_rules() -> Result<String, Error> {
    let mut out = String::new();
    for t in [FILTER_TABLE, NAT_TABLE] {
        let (family, name) = t.split_once(' ').unwrap_or(("ip", t));
        match nft(&["list", "table", family, name], None) {
            Ok(text) => out.push_str(&text),
            Err(Error::Nft(msg)) if msg.contains("No such file or directory") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{sample_network, PortSpec, Proto};
    use std::net::Ipv4Addr;

    #[test]
    fn empty_state_only_deletes() {
        let s = script(&State::default());
        assert_eq!(s, "table inet isla\ndelete table inet isla\ntable ip isla-nat\ndelete table ip isla-nat\n");
    }

    #[test]
    fn nat_network_with_a_published_port() {
        let mut n = sample_network(Driver::Nat);
        let port = PortSpec { host_ip: Ipv4Addr::UNSPECIFIED, host_port: 8080, container_port: 80, proto: Proto::Tcp };
        let ip = Ipv4Addr::new(10, 88, 3, 2);
        let proxied = PortSpec { host_port: 8081, ..port };
        n.publications.insert(
            "web".into(),
            vec![
                Publication { port, instance_ip: ip, loopback: Loopback::Kernel },
                Publication { port: proxied, instance_ip: ip, loopback: Loopback::Proxy },
            ],
        );
        let mut st = State::default();
        st.networks.insert(n.name.clone(), n);
        let s = script(&st);
        assert!(s.contains("jump fwd-abcdef0"));
        assert!(s.contains(
            "chain pre-abcdef0 {\n    fib daddr type local tcp dport 8080 dnat to 10.88.3.2:80\n    \
             fib daddr type local tcp dport 8081 dnat to 10.88.3.2:80\n  }"
        ));
        assert!(s.contains("fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8081 dnat to 10.88.3.2:80"));
        assert!(s.contains("iifname \"isla-br-*\" ip daddr 127.0.0.0/8 counter drop"));
        assert!(s.contains("ip saddr 10.88.3.0/24 oifname != \"isla-br-abcdef0\" masquerade"));
        assert!(s.contains("ip saddr 127.0.0.0/8 masquerade"));
    }

    #[test]
    fn host_only_has_no_masquerade() {
        let mut st = State::default();
        st.networks.insert("n".into(), sample_network(Driver::HostOnly));
        let s = script(&st);
        assert!(!s.contains("masquerade"));
        assert!(s.contains("iifname \"isla-br-abcdef0\" oifname != \"isla-br-abcdef0\" drop"));
    }
}
