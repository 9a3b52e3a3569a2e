//! `isla vm exec`: run a command in a running microVM through its agent (vsock).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use isla_agent::{Client, Request, Response};

#[derive(Args)]
pub struct ExecArgs {
    /// The microVM's vsock unix socket (the `uds` of its `--vsock`).
    #[arg(long)]
    vsock: PathBuf,
    /// Give up when the guest has not answered after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Environment variables for the command, NAME=value (repeatable).
    #[arg(long, short)]
    env: Vec<String>,
    /// Print the guest's memory, uptime and load as JSON instead of running a command.
    #[arg(long, conflicts_with = "command")]
    info: bool,
    /// Program and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required_unless_present = "info")]
    command: Vec<String>,
}

/// Runs the command; the exit status is the command's (128 + signal if it was killed).
pub fn run(a: &ExecArgs) -> Result<i32> {
    let timeout = Duration::from_secs(a.timeout.max(1));
    let mut client = Client::connect(&a.vsock, timeout)?;
    if a.info {
        let r = client.call(&Request::Info, timeout)?;
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    let req = Request::Exec { argv: a.command.clone(), env: a.env.clone(), stdin: String::new(), timeout_s: a.timeout };
    match client.call(&req, timeout + Duration::from_secs(5))? {
        Response::Exited(r) => {
            std::io::stdout().write_all(r.stdout.as_bytes())?;
            std::io::stderr().write_all(r.stderr.as_bytes())?;
            if r.truncated {
                eprintln!("isla: output truncated at {} bytes per stream", isla_agent::MAX_OUTPUT);
            }
            if r.timed_out {
                bail!("the command ran longer than --timeout {} s and was killed", a.timeout);
            }
            Ok(r.exit_code.unwrap_or_else(|| 128 + r.signal.unwrap_or(0)))
        }
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}

#[derive(Args)]
pub struct BalloonArgs {
    /// The microVM's API socket (its `--api-sock`).
    #[arg(long)]
    api_sock: PathBuf,
    /// Set the balloon's target to this many MiB (the guest gives that much memory back).
    #[arg(long, value_name = "MIB")]
    set: Option<u64>,
    /// Print the guest's latest balloon statistics instead of the configuration.
    #[arg(long)]
    stats: bool,
}

/// `isla vm balloon`: a client of the monitor's API socket for the balloon.
pub fn balloon(a: &BalloonArgs) -> Result<i32> {
    use isla_vmm::api::call;
    let fault = |status: u16, v: &serde_json::Value| -> Result<()> {
        if status >= 400 {
            bail!("the monitor answered {status}: {}", v["fault_message"].as_str().unwrap_or("(no message)"));
        }
        Ok(())
    };
    if let Some(mib) = a.set {
        let (status, v) = call(&a.api_sock, "PATCH", "/balloon", Some(&serde_json::json!({ "amount_mib": mib })))?;
        fault(status, &v)?;
    }
    let path = if a.stats { "/balloon/statistics" } else { "/balloon" };
    let (status, v) = call(&a.api_sock, "GET", path, None)?;
    fault(status, &v)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}
