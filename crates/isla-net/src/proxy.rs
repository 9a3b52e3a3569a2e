//! The userspace fallback for published ports reached through 127.0.0.1 ([`Loopback::Proxy`]).
//!
//! A TCP listener on `127.0.0.1:HOST_PORT` (in the calling thread's namespace) that connects
//! each client to the instance and copies bytes both ways, one thread per direction. It also
//! holds the port, so no host process can take it while the publication lives. The instance
//! sees the connection coming from the bridge's address.
//!
//! [`Loopback::Proxy`]: crate::Loopback::Proxy

use std::io::ErrorKind;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::model::{Proto, Publication};
use crate::Error;

/// A running loopback proxy; dropping it closes the listener (connections in flight finish).
pub struct PortProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PortProxy {
    /// Starts proxying `127.0.0.1:<host port>` of `publication` to its instance.
    pub fn start(publication: &Publication) -> Result<Self, Error> {
        let p = publication.port;
        if p.proto != Proto::Tcp {
            return Err(Error::Invalid(format!(
                "port {}/{}: the loopback proxy handles tcp only",
                p.host_port, p.proto
            )));
        }
        let listen = SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.host_port);
        let in_use = |e: std::io::Error| match e.kind() {
            ErrorKind::AddrInUse => {
                Error::PortInUse { ip: *listen.ip(), port: p.host_port, proto: p.proto, by: String::new() }
            }
            _ => Error::Io { path: format!("tcp {listen}").into(), source: e },
        };
        let listener = TcpListener::bind(listen).map_err(in_use)?;
        let addr = listener.local_addr().map_err(in_use)?;
        let target = SocketAddr::from((publication.instance_ip, p.container_port));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("isla-proxy-{}", p.host_port))
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn {
                        Ok(client) => splice(client, target),
                        Err(e) => tracing::debug!(%addr, "proxy accept: {e}"),
                    }
                }
            })
            .map_err(|e| Error::Io { path: "proxy thread".into(), source: e })?;
        Ok(Self { addr, stop, thread: Some(thread) })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Connects `client` to `target` and copies both ways on two threads.
fn splice(client: TcpStream, target: SocketAddr) {
    let server = match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%target, "proxy connect: {e}");
            return;
        }
    };
    let pair = client.try_clone().and_then(|c| Ok((c, server.try_clone()?)));
    let Ok((client2, server2)) = pair else { return };
    let pump = |mut from: TcpStream, mut to: TcpStream| {
        move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        }
    };
    let spawned = std::thread::Builder::new()
        .spawn(pump(client, server))
        .and_then(|_| std::thread::Builder::new().spawn(pump(server2, client2)));
    if let Err(e) = spawned {
        tracing::warn!("proxy: cannot start a copy thread: {e}");
    }
}

impl Drop for PortProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
