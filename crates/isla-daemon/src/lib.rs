//! isla-daemon: `isla daemon`, a REST API (JSON over HTTP/1.1) in front of the instance manager.
//!
//! The daemon does not own instances: each started instance keeps its own supervisor process
//! (see `isla-core`), and every request opens the same SQLite store the CLI uses
//! ([`isla_core::Manager`], with its crash repair), so the CLI works with or without the daemon
//! and a killed daemon loses nothing. The manager is blocking; handlers call it on tokio's
//! blocking pool. It is safe in this multi-threaded process because the step that forks a
//! container (the runtime's clone) runs in the single-threaded supervisor, never here; the
//! daemon only reaps the supervisors it starts ([`reaper`]) so that they do not linger as
//! zombies that look alive.
//!
//! Main types: [`Config`] (root, socket, optional TCP address and token) and [`serve`] (binds,
//! then serves until SIGINT/SIGTERM). Routes are in [`api`], the event stream in [`events`],
//! Prometheus text in [`metrics`].
//!
//! Hand-written parts, and why: the bearer-token check (one header comparison; a tower-http
//! auth layer would add a dependency for five lines) and the Prometheus text (a handful of
//! lines in a fixed format; the `prometheus` crate would add a registry the daemon does not
//! need, since every scrape reads fresh numbers from the manager).

pub mod api;
pub mod events;
pub mod metrics;
pub mod reaper;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The daemon's errors (start-up; request errors become HTTP statuses in [`api`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket, file or runtime could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bad configuration (the message names the option and the fix).
    #[error("{0}")]
    Config(String),
    /// The instance manager could not open its store.
    #[error(transparent)]
    Core(#[from] isla_core::Error),
}

/// Result with the daemon's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// What the daemon serves and where.
#[derive(Debug, Clone)]
pub struct Config {
    /// isla's state directory (the CLI's `--root`).
    pub root: PathBuf,
    /// The `isla` binary that supervisors run as (`isla __supervise`).
    pub helper: PathBuf,
    /// The unix socket (mode 0600); default `<root>/isla.sock`.
    pub socket: PathBuf,
    /// Also serve on TCP here, with this bearer token required on every request.
    pub tcp: Option<(SocketAddr, String)>,
    /// How often the event poller reads the store.
    pub poll: std::time::Duration,
}

impl Config {
    /// The defaults for `root`: socket `<root>/isla.sock`, no TCP, polls every 500 ms.
    pub fn new(root: &Path, helper: PathBuf) -> Config {
        Config {
            root: root.to_path_buf(),
            helper,
            socket: root.join("isla.sock"),
            tcp: None,
            poll: std::time::Duration::from_millis(500),
        }
    }
}

/// Shared by every request.
#[derive(Clone)]
pub struct State {
    pub(crate) root: PathBuf,
    pub(crate) helper: PathBuf,
    pub(crate) reaper: Arc<reaper::Reaper>,
    pub(crate) events: tokio::sync::broadcast::Sender<String>,
    pub(crate) shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Binds the unix socket with mode 0600 from the start (umask 0177 around `bind`, so there is
/// no moment when others could connect). A stale socket file (nobody answers) is replaced; a
/// live one means another daemon runs.
fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Config(format!(
                "{}: another daemon is listening there; stop it or give --socket another path",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(io(format!("removing the stale socket {}", path.display())))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l.map_err(io(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod 0600 {}", path.display())))?;
    l.set_nonblocking(true).map_err(io("making the socket non-blocking"))?;
    Ok(l)
}

/// Opens the store (repairing what crashed commands left), binds the sockets, prints one
/// `listening on ...` line per socket on stdout and serves until SIGINT or SIGTERM; the unix
/// socket file is removed at the end.
pub fn serve(cfg: Config) -> Result<()> {
    if let Some((_, token)) = &cfg.tcp {
        if token.trim().is_empty() {
            return Err(Error::Config("the TCP token is empty; put a secret in the --token-file".into()));
        }
    }
    // The same repair every CLI command does first; also proves the root is usable.
    let m = isla_core::Manager::open_with_helper(&cfg.root, cfg.helper.clone())?;
    let rep = m.reconcile()?;
    drop(m);
    if !(rep.rolled_back.is_empty() && rep.removed.is_empty() && rep.dead.is_empty()) {
        tracing::warn!("repaired at start: {rep:?}");
    }
    let unix = bind_unix(&cfg.socket)?;
    let tcp = match &cfg.tcp {
        Some((addr, _)) => {
            let l = std::net::TcpListener::bind(addr).map_err(io(format!("binding TCP {addr}")))?;
            l.set_nonblocking(true).map_err(io("making the TCP socket non-blocking"))?;
            Some(l)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    let result = rt.block_on(serve_on(&cfg, unix, tcp));
    let _ = std::fs::remove_file(&cfg.socket);
    result
}

async fn serve_on(
    cfg: &Config,
    unix: std::os::unix::net::UnixListener,
    tcp: Option<std::net::TcpListener>,
) -> Result<()> {
    use std::io::Write;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let state = State {
        root: cfg.root.clone(),
        helper: cfg.helper.clone(),
        reaper: Arc::new(reaper::Reaper::default()),
        events: events.clone(),
        shutdown: stop_rx.clone(),
    };
    tokio::spawn(reaper::run(state.reaper.clone(), stop_rx.clone()));
    events::spawn_poller(cfg.root.clone(), cfg.helper.clone(), cfg.poll, events, stop_rx.clone());

    let unix = tokio::net::UnixListener::from_std(unix).map_err(io("unix socket"))?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on unix:{}", cfg.socket.display());
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    let app = api::router(state.clone());
    tasks.spawn(axum::serve(unix, app).with_graceful_shutdown(wait_stop(stop_rx.clone())).into_future());
    if let (Some(l), Some((_, token))) = (tcp, &cfg.tcp) {
        let l = tokio::net::TcpListener::from_std(l).map_err(io("TCP socket"))?;
        let addr = l.local_addr().map_err(io("TCP socket address"))?;
        let _ = writeln!(out, "listening on tcp:{addr}");
        let app = api::router(state.clone())
            .layer(axum::middleware::from_fn_with_state(Arc::new(token.trim().to_string()), api::require_token));
        tasks.spawn(axum::serve(l, app).with_graceful_shutdown(wait_stop(stop_rx.clone())).into_future());
    }
    let _ = out.flush();
    drop(out);

    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(io("catching SIGTERM"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        Some(r) = tasks.join_next() => {
            let _ = stop_tx.send(true);
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(io("serving")(e)),
                Err(e) => Err(Error::Config(format!("a server task failed: {e}"))),
            };
        }
    }
    let _ = stop_tx.send(true);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            return Err(io("serving")(e));
        }
    }
    Ok(())
}
