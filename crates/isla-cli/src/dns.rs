//! `isla __dns --root DIR NETWORK` (hidden): the DNS responder of one network, as its own small
//! process (what aardvark-dns is to podman). The instance manager starts it when an instance
//! joins a network that has none running (`isla_net::Networks::ensure_dns`); it answers the
//! names of the network's instances on the gateway address, UDP port 53, and ends when the
//! network has no instance left or is removed.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use isla_net::Networks;

#[derive(Args)]
pub struct DnsArgs {
    /// isla's state directory.
    #[arg(long, default_value = isla_core::DEFAULT_ROOT)]
    root: PathBuf,
    /// The network to serve.
    network: String,
}

/// Detaches (fork, the parent exits at once, the child leaves the session), then serves. The
/// starter reads one line from our standard output, `ok` or `error: ...`; after it, standard
/// output is /dev/null, so nothing else can reach a reader that has gone.
pub fn run(args: &DnsArgs) -> Result<i32> {
    nix::unistd::daemon(true, true).context("detaching the DNS responder")?;
    let nets = Networks::open(&args.root)
        .with_context(|| format!("opening the network state in {} (--root)", args.root.display()))?;
    nets.run_dns_responder(&args.network, |r| {
        let line = match r {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("error: {e}\n"),
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
        if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
        }
    })?;
    Ok(0)
}
