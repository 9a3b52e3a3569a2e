//! cgroup v2: one directory in the unified hierarchy; controllers are enabled top-down through
//! each ancestor's `cgroup.subtree_control`.

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use super::{keyed, limit_value, read, read_pids, read_u64, remove_dir, write, write_limit, CgroupManager, Stats};
use crate::error::{Error, Result};

/// The v2 cgroup of one container.
pub struct V2 {
    root: PathBuf,
    dir: PathBuf,
}

/// This process's cgroup in the unified hierarchy (the `0::` line of /proc/self/cgroup).
fn own_path() -> String {
    fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_else(|| "/".into())
}

/// cpu.shares (v1, 2..262144) to cpu.weight (v2, 1..10000), the conversion runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    1 + (shares.saturating_sub(2) * 9999) / 262_142
}

impl V2 {
    /// The container cgroup `rel` under the unified hierarchy mounted at `root`.
    pub fn new(root: &Path, rel: &Path) -> Result<Self> {
        if !super::is_cgroup2(root) {
            return Err(Error::Cgroup { path: root.to_path_buf(), msg: "is not a cgroup2 mount".into() });
        }
        let dir = if rel.is_absolute() {
            super::join(root, rel)?
        } else {
            super::join(&super::join(root, Path::new(&own_path()))?, rel)?
        };
        Ok(V2 { root: root.to_path_buf(), dir })
    }

    /// Controllers `r` needs, each with the spec field that asks for it.
    fn needed(r: &LinuxResources) -> Vec<(&'static str, &'static str)> {
        let mut n = Vec::new();
        if let Some(c) = r.cpu() {
            if c.shares().is_some_and(|s| s > 0) || c.quota().is_some() || c.period().is_some() || c.idle().is_some() {
                n.push(("cpu", "linux.resources.cpu"));
            }
            if c.cpus().as_ref().is_some_and(|s| !s.is_empty()) || c.mems().as_ref().is_some_and(|s| !s.is_empty()) {
                n.push(("cpuset", "linux.resources.cpu.cpus"));
            }
        }
        if r.memory().as_ref().is_some_and(|m| m.limit().is_some() || m.reservation().is_some() || m.swap().is_some()) {
            n.push(("memory", "linux.resources.memory"));
        }
        if r.pids().is_some() {
            n.push(("pids", "linux.resources.pids"));
        }
        if r.block_io().as_ref().is_some_and(|b| {
            b.weight().is_some()
                || [
                    b.throttle_read_bps_device(),
                    b.throttle_write_bps_device(),
                    b.throttle_read_iops_device(),
                    b.throttle_write_iops_device(),
                ]
                .iter()
                .any(|l| l.as_ref().is_some_and(|v| !v.is_empty()))
        }) {
            n.push(("io", "linux.resources.blockIO"));
        }
        if r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty()) {
            n.push(("hugetlb", "linux.resources.hugepageLimits"));
        }
        n
    }

    /// Enable `controllers` in every ancestor between the root and the container's directory.
    fn enable(&self, controllers: &[(&str, &str)]) -> Result<()> {
        if controllers.is_empty() {
            return Ok(());
        }
        let available = read(&self.root, "cgroup.controllers")?;
        for (c, field) in controllers {
            if !available.split_whitespace().any(|a| a == *c) {
                return Err(crate::error::config(
                    *field,
                    format!(
                        "the cgroup v2 '{c}' controller is not available in {} (it offers: {}); on hybrid hosts it is bound to a v1 hierarchy",
                        self.root.display(),
                        if available.trim().is_empty() { "none" } else { available.trim() }
                    ),
                ));
            }
        }
        let rel = self.dir.strip_prefix(&self.root).unwrap_or(Path::new(""));
        let mut d = self.root.clone();
        for comp in rel.components() {
            let line: Vec<String> = controllers.iter().map(|(c, _)| format!("+{c}")).collect();
            let have = read(&d, "cgroup.subtree_control")?;
            if controllers.iter().any(|(c, _)| !have.split_whitespace().any(|h| h == *c)) {
                write(&d, "cgroup.subtree_control", &line.join(" "), "")?;
            }
            d.push(comp);
        }
        Ok(())
    }

    fn apply(&self, r: &LinuxResources) -> Result<()> {
        let d = &self.dir;
        if let Some(c) = r.cpu() {
            if let Some(s) = c.shares().filter(|s| *s > 0) {
                write(d, "cpu.weight", &shares_to_weight(s).to_string(), "linux.resources.cpu.shares")?;
            }
            if c.quota().is_some() || c.period().is_some() {
                let q = match c.quota() {
                    Some(q) if q > 0 => q.to_string(),
                    _ => "max".into(),
                };
                let p = c.period().unwrap_or(100_000);
                write(d, "cpu.max", &format!("{q} {p}"), "linux.resources.cpu.quota")?;
            }
            if let Some(i) = c.idle() {
                write(d, "cpu.idle", &i.to_string(), "linux.resources.cpu.idle")?;
            }
            if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
                write(d, "cpuset.cpus", cpus, "linux.resources.cpu.cpus")?;
            }
            if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
                write(d, "cpuset.mems", mems, "linux.resources.cpu.mems")?;
            }
        }
        if let Some(m) = r.memory() {
            if let Some(l) = m.limit() {
                write_limit(d, "memory.max", l, "linux.resources.memory.limit", "max")?;
            }
            if let Some(res) = m.reservation() {
                write_limit(d, "memory.low", res, "linux.resources.memory.reservation", "max")?;
            }
            if let Some(s) = m.swap() {
                // OCI's swap is memory+swap; v2's memory.swap.max is swap alone.
                let v = match (s, m.limit()) {
                    (-1, _) => "max".to_string(),
                    (s, Some(l)) if l > 0 => (s - l).max(0).to_string(),
                    (s, _) => limit_value(s, "linux.resources.memory.swap", "max")?,
                };
                write(d, "memory.swap.max", &v, "linux.resources.memory.swap")?;
            }
        }
        if let Some(p) = r.pids() {
            let v = if p.limit() > 0 { p.limit().to_string() } else { "max".to_string() };
            write(d, "pids.max", &v, "linux.resources.pids.limit")?;
        }
        if let Some(b) = r.block_io() {
            if let Some(w) = b.weight() {
                // blkio weight 10..1000 to io weight 1..10000.
                let iow = 1 + (u64::from(w).saturating_sub(10) * 9999) / 990;
                write(d, "io.weight", &iow.to_string(), "linux.resources.blockIO.weight")?;
            }
            let kinds = [
                (b.throttle_read_bps_device(), "rbps"),
                (b.throttle_write_bps_device(), "wbps"),
                (b.throttle_read_iops_device(), "riops"),
                (b.throttle_write_iops_device(), "wiops"),
            ];
            for (list, key) in kinds {
                for t in list.iter().flatten() {
                    write(
                        d,
                        "io.max",
                        &format!("{}:{} {key}={}", t.major(), t.minor(), t.rate()),
                        "linux.resources.blockIO",
                    )?;
                }
            }
        }
        for h in r.hugepage_limits().iter().flatten() {
            write(
                d,
                &format!("hugetlb.{}.max", h.page_size()),
                &h.limit().to_string(),
                "linux.resources.hugepageLimits",
            )?;
        }
        for (k, v) in r.unified().iter().flatten() {
            if k.contains('/') || k.starts_with('.') {
                return Err(crate::error::config(
                    "linux.resources.unified",
                    format!("{k:?} is not a cgroup file name"),
                ));
            }
            write(d, k, v, &format!("linux.resources.unified.{k}"))?;
        }
        if r.devices().as_ref().is_some_and(|d| d.iter().any(|r| r.allow() && r.typ().is_some())) {
            tracing::debug!("cgroup v2 device rules need an eBPF program; isla does not load one yet");
        }
        Ok(())
    }
}

impl CgroupManager for V2 {
    fn version(&self) -> &'static str {
        "v2"
    }

    fn create(&self, resources: Option<&LinuxResources>) -> Result<()> {
        if let Some(r) = resources {
            super::validate(r)?;
        }
        if self.dir.exists() && read_pids(&self.dir).is_ok_and(|p| !p.is_empty()) {
            return Err(Error::Cgroup { path: self.dir.clone(), msg: "already exists and has processes in it".into() });
        }
        let mut made = Vec::new();
        let mut d = self.dir.clone();
        while !d.exists() && d != self.root {
            made.push(d.clone());
            d.pop();
        }
        let result = (|| {
            for m in made.iter().rev() {
                fs::create_dir(m).map_err(|e| Error::Cgroup { path: m.clone(), msg: format!("creating: {e}") })?;
            }
            match resources {
                Some(r) => {
                    self.enable(&Self::needed(r))?;
                    self.apply(r)
                }
                None => Ok(()),
            }
        })();
        if result.is_err() {
            for m in &made {
                let _ = fs::remove_dir(m);
            }
        }
        result
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        vec![self.dir.join("cgroup.procs")]
    }

    fn pids(&self) -> Result<Vec<i32>> {
        read_pids(&self.dir)
    }

    fn freeze(&self, frozen: bool) -> Result<()> {
        write(&self.dir, "cgroup.freeze", if frozen { "1" } else { "0" }, "")?;
        for _ in 0..1000 {
            if self.frozen()? == frozen {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(Error::Cgroup { path: self.dir.join("cgroup.events"), msg: "the freezer did not settle".into() })
    }

    fn frozen(&self) -> Result<bool> {
        Ok(keyed(&read(&self.dir, "cgroup.events")?, "frozen") == 1)
    }

    fn stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        let cpu = read(&self.dir, "cpu.stat").unwrap_or_default();
        s.cpu.usage.total = keyed(&cpu, "usage_usec") * 1000;
        s.cpu.usage.user = keyed(&cpu, "user_usec") * 1000;
        s.cpu.usage.kernel = keyed(&cpu, "system_usec") * 1000;
        s.cpu.throttling.periods = keyed(&cpu, "nr_periods");
        s.cpu.throttling.throttled_periods = keyed(&cpu, "nr_throttled");
        s.cpu.throttling.throttled_time = keyed(&cpu, "throttled_usec") * 1000;
        s.memory.usage = read_u64(&self.dir, "memory.current");
        s.memory.max = read_u64(&self.dir, "memory.peak");
        s.memory.limit = read_u64(&self.dir, "memory.max");
        let ev = read(&self.dir, "memory.events").unwrap_or_default();
        s.memory.failcnt = keyed(&ev, "max");
        s.memory.oom_kill = keyed(&ev, "oom_kill");
        s.pids.current = read_u64(&self.dir, "pids.current");
        s.pids.limit = read_u64(&self.dir, "pids.max");
        Ok(s)
    }

    fn destroy(&self) -> Result<()> {
        remove_dir(&self.dir)
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }
}
