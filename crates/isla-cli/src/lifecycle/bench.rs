//! `isla instance-bench`: how fast instances start and how much their supervisors cost.
//! Everything runs in a network namespace the bench creates (the isla commands through
//! `nsenter --net`, the HTTP client on a thread that entered it), on a scratch root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    /// `run -d` to HTTP answer: how many containers, one after another.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Containers started at once.
    #[arg(long, default_value_t = 50)]
    parallel: usize,
    /// Also boot this many guest-kit microVMs: `run -d -p` to `isla-init: started` and to the
    /// published port answering (httpd started in the guest through the agent), about 40 s each here.
    #[arg(long, default_value_t = 0)]
    microvms: usize,
}

struct Bench {
    ns: String,
    root: PathBuf,
    isla: PathBuf,
}

impl Bench {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns)).arg(&self.isla).arg(args[0]).arg("--root").arg(&self.root);
        c.args(&args[1..]);
        c
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let o: Output = self.cmd(args).output().with_context(|| format!("isla {args:?}"))?;
        if !o.status.success() {
            bail!("isla {args:?}: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.ns))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Ok(ids) = self.ok(&["ps", "-aq"]) {
            let mut rm = vec!["rm", "-f"];
            rm.extend(ids.split_whitespace());
            if rm.len() > 2 {
                let _ = self.cmd(&rm).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Whether an HTTP server answers on 127.0.0.1:port (any status line).
fn answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 8];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

fn median_ms(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!("{:.1} ms (min {:.1}, max {:.1}, n={})", ms(v[v.len() / 2]), ms(v[0]), ms(v[v.len() - 1]), v.len())
}

fn kib(pid: i64, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let b = Bench {
        ns: format!("isla-ibench-{}", std::process::id()),
        root: Path::new("/var/tmp").join(format!("isla-instance-bench-{}", std::process::id())),
        isla: std::env::current_exe()?,
    };
    let st = Command::new("ip").args(["netns", "add", &b.ns]).status()?;
    let st2 = Command::new("ip").args(["-n", &b.ns, "link", "set", "lo", "up"]).status()?;
    if !st.success() || !st2.success() {
        bail!("could not create the bench's network namespace {}", b.ns);
    }
    // Warm-up: makes the busybox image and the default network.
    b.ok(&["run", "--rm", "busybox", "true"])?;

    let (mut cli, mut answer) = (Vec::new(), Vec::new());
    for i in 0..a.runs {
        let port = 18000 + i as u16;
        let name = format!("web{i}");
        let t0 = Instant::now();
        b.ok(&["run", "-d", "--name", &name, "-p", &format!("{port}:80"), "busybox", "httpd", "-f", "-p", "80"])?;
        cli.push(t0.elapsed());
        let up = isla_net::in_netns(&b.netns(), || {
            while t0.elapsed() < Duration::from_secs(30) {
                if answers(port) {
                    return Some(t0.elapsed());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            None
        })?;
        answer.push(up.with_context(|| format!("{name} did not answer on 127.0.0.1:{port} within 30 s"))?);
        b.ok(&["rm", "-f", &name])?;
    }
    println!("run -d (returns)              {}", median_ms(cli));
    println!("run -d to HTTP answer         {}", median_ms(answer));

    let t0 = Instant::now();
    let children = (0..a.parallel)
        .map(|i| {
            let mut c = b.cmd(&["run", "-d", "--name", &format!("p{i}"), "busybox", "sleep", "1000"]);
            c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let failed = children.into_iter().map(|mut c| c.wait()).filter(|s| !s.as_ref().is_ok_and(|s| s.success())).count();
    let started = t0.elapsed();
    let list: serde_json::Value = serde_json::from_str(&b.ok(&["ps", "--output", "json"])?)?;
    let ids: Vec<String> =
        list.as_array().into_iter().flatten().filter_map(|i| i["id"].as_str().map(String::from)).collect();
    println!("{} x run -d at once: {:.2} s, {} running, {failed} failed", a.parallel, started.as_secs_f64(), ids.len());
    let (mut rss, mut pss) = (Vec::new(), Vec::new());
    for i in list.as_array().into_iter().flatten() {
        if let Some(pid) = i["supervisor_pid"].as_i64() {
            rss.extend(kib(pid, "status", "VmRSS:"));
            pss.extend(kib(pid, "smaps_rollup", "Pss:"));
        }
    }
    rss.sort();
    pss.sort();
    if !rss.is_empty() {
        println!(
            "supervisor at rest: RSS median {} KiB, PSS median {} KiB, PSS total {} KiB for {} supervisors",
            rss[rss.len() / 2],
            pss.get(pss.len() / 2).copied().unwrap_or(0),
            pss.iter().sum::<u64>(),
            rss.len()
        );
    }
    let t0 = Instant::now();
    let mut rm = vec!["rm", "-f"];
    rm.extend(ids.iter().map(String::as_str));
    b.ok(&rm)?;
    println!("rm -f of {} (one command): {:.2} s", ids.len(), t0.elapsed().as_secs_f64());

    // MicroVMs: to the kit's init, and to a port published from the guest answering. The kit
    // runs no service of its own: once the agent answers, `exec` starts busybox httpd in the guest.
    let (mut boots, mut served) = (Vec::new(), Vec::new());
    for i in 0..a.microvms {
        let name = format!("vm{i}");
        let port = 18500 + i as u16;
        let publish = format!("{port}:80");
        let t0 = Instant::now();
        let deadline = |what: &str| -> Result<()> {
            if t0.elapsed() > Duration::from_secs(300) {
                bail!("{name}: {what} within 300 s");
            }
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        };
        b.ok(&["run", "-d", "--kind", "microvm", "--name", &name, "-p", &publish, "kit", "isla.agent=serve"])?;
        while !b.ok(&["logs", &name])?.contains("isla-init: started") {
            deadline("no `isla-init: started`")?;
        }
        boots.push(t0.elapsed());
        while b.ok(&["exec", &name, "httpd", "-p", "80", "-h", "/etc"]).is_err() {
            deadline("the agent did not start httpd")?;
        }
        while !isla_net::in_netns(&b.netns(), || answers(port))? {
            deadline(&format!("nothing answered on 127.0.0.1:{port}"))?;
        }
        served.push(t0.elapsed());
        b.ok(&["rm", "-f", &name])?;
    }
    if a.microvms > 0 {
        println!("microVM run -d to init        {}", median_ms(boots));
        println!("microVM run -d to HTTP answer {}", median_ms(served));
    }
    Ok(())
}
