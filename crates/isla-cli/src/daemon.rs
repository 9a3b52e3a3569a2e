//! `isla daemon`: the REST API of crate isla-daemon on a unix socket (and TCP with a token).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args)]
pub struct DaemonArgs {
    /// isla's state directory (database, instances, images, networks).
    #[arg(long, default_value = isla_core::DEFAULT_ROOT)]
    root: PathBuf,
    /// Unix socket to serve on, mode 0600 (default: ROOT/isla.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve on this TCP address (e.g. 127.0.0.1:2375); needs --token-file.
    #[arg(long, requires = "token_file")]
    tcp: Option<SocketAddr>,
    /// File holding the bearer token TCP clients must send (readable by root only).
    #[arg(long, requires = "tcp")]
    token_file: Option<PathBuf>,
}

pub fn run(a: &DaemonArgs) -> Result<i32> {
    let helper = std::env::current_exe().context("finding the isla executable")?;
    let mut cfg = isla_daemon::Config::new(&a.root, helper);
    if let Some(s) = &a.socket {
        cfg.socket = s.clone();
    }
    if let (Some(addr), Some(f)) = (a.tcp, &a.token_file) {
        let meta = std::fs::metadata(f).with_context(|| format!("--token-file {}", f.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!("--token-file {}: others can read it; chmod 600 it", f.display());
        }
        let token = std::fs::read_to_string(f).with_context(|| format!("--token-file {}", f.display()))?;
        let token = token.trim().to_string();
        if token.len() < 16 {
            bail!(
                "--token-file {}: the token is shorter than 16 characters; use e.g. `openssl rand -hex 32`",
                f.display()
            );
        }
        cfg.tcp = Some((addr, token));
    }
    isla_daemon::serve(cfg)?;
    Ok(0)
}
