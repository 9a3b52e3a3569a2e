//! `isla network bench`: how long the network operations take, and what the data paths of a
//! published port carry. Everything happens in network namespaces the bench creates and
//! deletes (a "host" one for the bridge and rules, one per instance); the machine's own
//! namespace is not touched.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use isla_net::{in_netns, Driver, Loopback, NetworkSpec, Networks, PortProxy, PortSpec, Proto};

use crate::bench::stats;

#[derive(Args)]
pub struct BenchArgs {
    /// Repetitions of each operation.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// MiB sent through each data path.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=16384))]
    mib: u64,
}

/// A network namespace made with `ip netns add`, deleted on drop.
struct Ns {
    name: String,
}

impl Ns {
    fn new(tag: &str) -> Result<Self> {
        let name = format!("isla-bench-{}-{tag}", std::process::id());
        let ok = |args: &[&str]| -> Result<()> {
            let st = Command::new("ip").args(args).status().context("running ip (iproute2)")?;
            if !st.success() {
                bail!("ip {}: failed", args.join(" "));
            }
            Ok(())
        };
        ok(&["netns", "add", &name])?;
        let ns = Ns { name };
        ok(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn row(what: &str, samples: &[f64]) {
    if let Some((med, min, max)) = stats(samples) {
        println!("{what:<34} {med:>10.2} {min:>10.2} {max:>10.2}");
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let host = Ns::new("host")?;
    let inst = Ns::new("inst")?;
    let root = std::env::temp_dir().join(format!("isla-netbench-{}", std::process::id()));
    let result = in_netns(&host.path(), || bench_in_host(&root, &inst, args))?;
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn bench_in_host(root: &Path, inst: &Ns, args: &BenchArgs) -> Result<()> {
    let nets = Networks::open(root)?;
    let (mut create, mut veth, mut tap, mut publish, mut unpublish, mut detach, mut remove) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let port = PortSpec { host_ip: Ipv4Addr::UNSPECIFIED, host_port: 8080, container_port: 5001, proto: Proto::Tcp };
    for _ in 0..args.runs {
        let t = Instant::now();
        nets.create(&NetworkSpec::new("bench", Driver::Nat))?;
        create.push(ms(t));
        let t = Instant::now();
        nets.attach_veth("bench", "c", &inst.path(), "eth0", Some("c"))?;
        veth.push(ms(t));
        let t = Instant::now();
        nets.attach_tap("bench", "vm", Some("vm"))?;
        tap.push(ms(t));
        let t = Instant::now();
        nets.publish("bench", "c", port)?;
        publish.push(ms(t));
        let t = Instant::now();
        nets.unpublish("bench", "c", port.host_port, port.proto)?;
        unpublish.push(ms(t));
        let t = Instant::now();
        nets.detach("bench", "c")?;
        detach.push(ms(t));
        let t = Instant::now();
        nets.remove("bench", true)?;
        remove.push(ms(t));
    }
    println!("operation (ms, {} runs)                 median        min        max", args.runs);
    for (what, s) in [
        ("create (nat)", &create),
        ("attach_veth", &veth),
        ("attach_tap", &tap),
        ("publish", &publish),
        ("unpublish", &unpublish),
        ("detach (veth)", &detach),
        ("remove (1 tap left, --force)", &remove),
    ] {
        row(what, s);
    }

    // Data paths: a sink in the instance, fed from the host.
    nets.create(&NetworkSpec::new("bench", Driver::Nat))?;
    let a = nets.attach_veth("bench", "c", &inst.path(), "eth0", Some("c"))?;
    let sink = in_netns(&inst.path(), || TcpListener::bind((Ipv4Addr::UNSPECIFIED, 5001)))??;
    let sink_thread = std::thread::spawn(move || {
        for conn in sink.incoming() {
            let Ok(mut c) = conn else { break };
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            // The byte count tells the sender everything arrived; an empty count ends the sink.
            let _ = c.write_all(&n.to_be_bytes());
            if n == 0 {
                break;
            }
        }
    });
    nets.publish("bench", "c", port)?;
    let proxied = PortSpec { host_port: 8081, ..port };
    let pp = nets.publish_with("bench", "c", proxied, Loopback::Proxy)?;
    let proxy = PortProxy::start(&pp)?;
    let gw = a.gateway.context("a nat network has a gateway")?;
    println!("\ndata path ({} MiB, host -> instance)        MiB/s", args.mib);
    for (what, addr) in [
        ("direct to the instance address", SocketAddr::from((a.ip, 5001))),
        ("DNAT on the gateway address", SocketAddr::from((gw, 8080))),
        ("DNAT on 127.0.0.1 (kernel)", SocketAddr::from((Ipv4Addr::LOCALHOST, 8080))),
        ("127.0.0.1 via the userspace proxy", SocketAddr::from((Ipv4Addr::LOCALHOST, 8081))),
    ] {
        let rate = send(addr, args.mib).with_context(|| format!("{what} ({addr})"))?;
        println!("{what:<40} {rate:>10.0}");
    }
    drop(proxy);
    // An empty connection stops the sink.
    drop(TcpStream::connect((a.ip, 5001)));
    let _ = sink_thread.join();
    nets.remove("bench", true)?;
    Ok(())
}

/// Sends `mib` MiB to `addr` and waits for the sink's byte count; returns MiB/s.
fn send(addr: SocketAddr, mib: u64) -> Result<f64> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        c.write_all(&chunk)?;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let mut n = [0u8; 8];
    c.read_exact(&mut n)?;
    let secs = t.elapsed().as_secs_f64();
    if u64::from_be_bytes(n) != mib << 20 {
        bail!("the sink got {} bytes of {}", u64::from_be_bytes(n), mib << 20);
    }
    Ok(mib as f64 / secs)
}
