//! cgroup v1: one directory per mounted controller hierarchy (cpu, cpuacct, cpuset, memory,
//! devices, freezer, blkio, pids, name=systemd, ...).

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, LinuxResources, LinuxThrottleDevice};

use super::{keyed, read, read_pids, read_u64, remove_dir, write, write_limit, CgroupManager, Stats};
use crate::error::{Error, Result};

/// One v1 hierarchy: its controllers and where the container's directory is.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    /// Controllers of the hierarchy ("cpu", "memory", "name=systemd", ...).
    pub controllers: Vec<String>,
    /// Mount point of the hierarchy.
    pub mount: PathBuf,
    /// The container's directory in it.
    pub dir: PathBuf,
}

/// The v1 cgroup of one container.
pub struct V1 {
    hierarchies: Vec<Hierarchy>,
}

/// One v1 mount: controllers, mount point, root of the mount.
pub type Mount = (Vec<String>, PathBuf, String);

/// The cgroup v1 mounts of this process (read once per process: a command looks at them up to
/// three times, and they do not change under it).
pub fn mounts() -> Result<Vec<Mount>> {
    static CACHE: std::sync::OnceLock<Vec<Mount>> = std::sync::OnceLock::new();
    if let Some(m) = CACHE.get() {
        return Ok(m.clone());
    }
    let m = read_mounts()?;
    Ok(CACHE.get_or_init(|| m).clone())
}

fn read_mounts() -> Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(crate::error::io("/proc/self/mountinfo"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let mut r = right.split(' ');
        if r.next() != Some("cgroup") {
            continue;
        }
        let super_opts = r.nth(1).unwrap_or("");
        let l: Vec<&str> = left.split(' ').collect();
        if l.len() < 5 {
            continue;
        }
        let controllers: Vec<String> = super_opts
            .split(',')
            .filter(|o| !matches!(*o, "rw" | "ro") && !o.starts_with("release_agent") && *o != "clone_children")
            .map(str::to_string)
            .collect();
        out.push((controllers, PathBuf::from(l[4]), l[3].to_string()));
    }
    Ok(out)
}

/// This process's cgroup in each v1 hierarchy, from /proc/self/cgroup: controller list -> path.
fn own_paths() -> Vec<(Vec<String>, String)> {
    fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
            (!ctrls.is_empty()).then(|| (ctrls.split(',').map(str::to_string).collect(), path.to_string()))
        })
        .collect()
}

impl V1 {
    /// The container cgroup `rel` (absolute from each hierarchy's root, or relative to this
    /// process's own cgroup there) in every mounted v1 hierarchy.
    pub fn new(rel: &Path) -> Result<Self> {
        let own = own_paths();
        let mut hierarchies = Vec::new();
        for (controllers, mount, root) in mounts()? {
            let dir = if rel.is_absolute() {
                super::join(&mount, rel)?
            } else {
                let mine = own.iter().find(|(c, _)| *c == controllers).map(|(_, p)| p.as_str()).unwrap_or("/");
                // Inside a cgroup namespace or a bind mount the mount's root is a prefix of `mine`.
                let mine = mine.strip_prefix(root.as_str()).unwrap_or(mine);
                super::join(&super::join(&mount, Path::new(mine))?, rel)?
            };
            hierarchies.push(Hierarchy { controllers, mount, dir });
        }
        if hierarchies.is_empty() {
            return Err(Error::Cgroup {
                path: PathBuf::from("/sys/fs/cgroup"),
                msg: "no cgroup v1 hierarchy is mounted (use the v2 driver, or no cgroup)".into(),
            });
        }
        Ok(V1 { hierarchies })
    }

    /// The hierarchies of this cgroup.
    pub fn hierarchies(&self) -> &[Hierarchy] {
        &self.hierarchies
    }

    fn dir(&self, controller: &str) -> Option<&Path> {
        self.hierarchies.iter().find(|h| h.controllers.iter().any(|c| c == controller)).map(|h| h.dir.as_path())
    }

    fn need(&self, controller: &str, field: &str) -> Result<&Path> {
        self.dir(controller).ok_or_else(|| {
            crate::error::config(field, format!("the cgroup v1 '{controller}' controller is not mounted on this host"))
        })
    }

    /// mkdir -p, copying cpuset.cpus/mems from the parent into each new cpuset directory (v1
    /// leaves them empty, and an empty cpuset cannot take tasks).
    fn make(&self, h: &Hierarchy, made: &mut Vec<PathBuf>) -> Result<()> {
        let mut missing = Vec::new();
        let mut d = h.dir.clone();
        while !d.exists() && d != h.mount {
            missing.push(d.clone());
            if !d.pop() {
                break;
            }
        }
        for d in missing.into_iter().rev() {
            fs::create_dir(&d).map_err(|e| Error::Cgroup { path: d.clone(), msg: format!("creating: {e}") })?;
            made.push(d.clone());
            if h.controllers.iter().any(|c| c == "cpuset") {
                let parent = d.parent().unwrap_or(&h.mount);
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if read(&d, f)?.trim().is_empty() {
                        write(&d, f, read(parent, f)?.trim(), "")?;
                    }
                }
            }
        }
        Ok(())
    }

    fn apply(&self, r: &LinuxResources) -> Result<()> {
        if let Some(c) = r.cpu() {
            if c.shares().is_some_and(|s| s > 0)
                || c.quota().is_some()
                || c.period().is_some()
                || c.realtime_runtime().is_some()
            {
                let d = self.need("cpu", "linux.resources.cpu")?;
                if let Some(s) = c.shares().filter(|s| *s > 0) {
                    write(d, "cpu.shares", &s.to_string(), "linux.resources.cpu.shares")?;
                }
                if let Some(p) = c.period() {
                    write(d, "cpu.cfs_period_us", &p.to_string(), "linux.resources.cpu.period")?;
                }
                if let Some(q) = c.quota() {
                    write(d, "cpu.cfs_quota_us", &q.to_string(), "linux.resources.cpu.quota")?;
                }
                if let Some(b) = c.burst() {
                    write(d, "cpu.cfs_burst_us", &b.to_string(), "linux.resources.cpu.burst")?;
                }
                if let Some(p) = c.realtime_period() {
                    write(d, "cpu.rt_period_us", &p.to_string(), "linux.resources.cpu.realtimePeriod")?;
                }
                if let Some(rt) = c.realtime_runtime() {
                    write(d, "cpu.rt_runtime_us", &rt.to_string(), "linux.resources.cpu.realtimeRuntime")?;
                }
            }
            if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
                write(
                    self.need("cpuset", "linux.resources.cpu.cpus")?,
                    "cpuset.cpus",
                    cpus,
                    "linux.resources.cpu.cpus",
                )?;
            }
            if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
                write(
                    self.need("cpuset", "linux.resources.cpu.mems")?,
                    "cpuset.mems",
                    mems,
                    "linux.resources.cpu.mems",
                )?;
            }
        }
        if let Some(m) = r.memory() {
            let field = "linux.resources.memory";
            if m.limit().is_some()
                || m.reservation().is_some()
                || m.swap().is_some()
                || m.swappiness().is_some()
                || m.disable_oom_killer().is_some()
            {
                let d = self.need("memory", field)?;
                if let Some(l) = m.limit() {
                    write_limit(d, "memory.limit_in_bytes", l, "linux.resources.memory.limit", "-1")?;
                }
                if let Some(s) = m.swap() {
                    write_limit(d, "memory.memsw.limit_in_bytes", s, "linux.resources.memory.swap", "-1")?;
                }
                if let Some(res) = m.reservation() {
                    write_limit(d, "memory.soft_limit_in_bytes", res, "linux.resources.memory.reservation", "-1")?;
                }
                if let Some(sw) = m.swappiness() {
                    write(d, "memory.swappiness", &sw.to_string(), "linux.resources.memory.swappiness")?;
                }
                if m.disable_oom_killer() == Some(true) {
                    write(d, "memory.oom_control", "1", "linux.resources.memory.disableOOMKiller")?;
                }
            }
        }
        if let Some(p) = r.pids() {
            let v = if p.limit() > 0 { p.limit().to_string() } else { "max".to_string() };
            write(self.need("pids", "linux.resources.pids")?, "pids.max", &v, "linux.resources.pids.limit")?;
        }
        if let Some(b) = r.block_io() {
            let field = "linux.resources.blockIO";
            if let Some(w) = b.weight() {
                let d = self.need("blkio", field)?;
                let file = if d.join("blkio.weight").exists() { "blkio.weight" } else { "blkio.bfq.weight" };
                write(d, file, &w.to_string(), "linux.resources.blockIO.weight")?;
            }
            for wd in b.weight_device().iter().flatten() {
                if let Some(w) = wd.weight() {
                    let d = self.need("blkio", field)?;
                    let file = if d.join("blkio.weight_device").exists() {
                        "blkio.weight_device"
                    } else {
                        "blkio.bfq.weight_device"
                    };
                    write(
                        d,
                        file,
                        &format!("{}:{} {w}", wd.major(), wd.minor()),
                        "linux.resources.blockIO.weightDevice",
                    )?;
                }
            }
            let throttles: [(&Option<Vec<LinuxThrottleDevice>>, &str, &str); 4] = [
                (b.throttle_read_bps_device(), "blkio.throttle.read_bps_device", "throttleReadBpsDevice"),
                (b.throttle_write_bps_device(), "blkio.throttle.write_bps_device", "throttleWriteBpsDevice"),
                (b.throttle_read_iops_device(), "blkio.throttle.read_iops_device", "throttleReadIOPSDevice"),
                (b.throttle_write_iops_device(), "blkio.throttle.write_iops_device", "throttleWriteIOPSDevice"),
            ];
            for (list, file, name) in throttles {
                for t in list.iter().flatten() {
                    let d = self.need("blkio", field)?;
                    write(d, file, &format!("{}:{} {}", t.major(), t.minor(), t.rate()), &format!("{field}.{name}"))?;
                }
            }
        }
        for h in r.hugepage_limits().iter().flatten() {
            let d = self.need("hugetlb", "linux.resources.hugepageLimits")?;
            write(
                d,
                &format!("hugetlb.{}.limit_in_bytes", h.page_size()),
                &h.limit().to_string(),
                "linux.resources.hugepageLimits",
            )?;
        }
        if let Some(n) = r.network() {
            if let Some(id) = n.class_id() {
                write(
                    self.need("net_cls", "linux.resources.network")?,
                    "net_cls.classid",
                    &id.to_string(),
                    "linux.resources.network.classID",
                )?;
            }
            for p in n.priorities().iter().flatten() {
                let d = self.need("net_prio", "linux.resources.network")?;
                write(
                    d,
                    "net_prio.ifpriomap",
                    &format!("{} {}", p.name(), p.priority()),
                    "linux.resources.network.priorities",
                )?;
            }
        }
        if let Some(devs) = r.devices() {
            if let Some(d) = self.dir("devices") {
                for rule in devs {
                    let (file, line) = device_rule(rule);
                    write(d, file, &line, "linux.resources.devices")?;
                }
                // The devices every container gets (as runc allows them): mknod of any node,
                // null, zero, full, random, urandom, tty, console, ptmx and the pts.
                for line in DEFAULT_ALLOWED {
                    write(d, "devices.allow", line, "linux.resources.devices")?;
                }
            }
        }
        if r.unified().as_ref().is_some_and(|u| !u.is_empty()) {
            return Err(crate::error::config(
                "linux.resources.unified",
                "only applies to cgroup v2, and this container uses v1",
            ));
        }
        Ok(())
    }
}

/// Device rules added after the spec's, as runc does.
const DEFAULT_ALLOWED: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c 10:200 rwm",
];

/// A devices.allow / devices.deny line for one OCI device rule.
pub(crate) fn device_rule(rule: &LinuxDeviceCgroup) -> (&'static str, String) {
    let t = match rule.typ() {
        Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => "c",
        Some(LinuxDeviceType::B) => "b",
        Some(LinuxDeviceType::P) => "p",
        _ => "a",
    };
    let num = |n: Option<i64>| n.filter(|v| *v >= 0).map_or("*".to_string(), |v| v.to_string());
    let access = rule.access().clone().unwrap_or_else(|| "rwm".into());
    let file = if rule.allow() { "devices.allow" } else { "devices.deny" };
    let line = if t == "a" && rule.major().is_none() && rule.minor().is_none() {
        "a".to_string()
    } else {
        format!("{t} {}:{} {access}", num(rule.major()), num(rule.minor()))
    };
    (file, line)
}

impl CgroupManager for V1 {
    fn version(&self) -> &'static str {
        "v1"
    }

    fn create(&self, resources: Option<&LinuxResources>) -> Result<()> {
        if let Some(r) = resources {
            super::validate(r)?;
        }
        let mut made = Vec::new();
        let result = (|| {
            for h in &self.hierarchies {
                if h.dir.exists() && read_pids(&h.dir).is_ok_and(|p| !p.is_empty()) {
                    return Err(Error::Cgroup {
                        path: h.dir.clone(),
                        msg: "already exists and has processes in it".into(),
                    });
                }
                self.make(h, &mut made)?;
            }
            match resources {
                Some(r) => self.apply(r),
                None => Ok(()),
            }
        })();
        if result.is_err() {
            for d in made.iter().rev() {
                let _ = fs::remove_dir(d);
            }
        }
        result
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| h.dir.join("cgroup.procs")).collect()
    }

    fn pids(&self) -> Result<Vec<i32>> {
        let d = self.dir("pids").or_else(|| self.dir("freezer")).unwrap_or(&self.hierarchies[0].dir);
        read_pids(d)
    }

    fn freeze(&self, frozen: bool) -> Result<()> {
        let d = self.need("freezer", "pause")?;
        let want = if frozen { "FROZEN" } else { "THAWED" };
        for _ in 0..1000 {
            write(d, "freezer.state", want, "")?;
            if read(d, "freezer.state")?.trim() == want {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(Error::Cgroup { path: d.join("freezer.state"), msg: format!("did not reach {want}") })
    }

    fn frozen(&self) -> Result<bool> {
        match self.dir("freezer") {
            Some(d) => Ok(read(d, "freezer.state")?.trim() == "FROZEN"),
            None => Ok(false),
        }
    }

    fn stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        if let Some(d) = self.dir("cpuacct") {
            s.cpu.usage.total = read_u64(d, "cpuacct.usage");
            let st = read(d, "cpuacct.stat").unwrap_or_default();
            // USER_HZ ticks (100 per second on Linux) to nanoseconds.
            s.cpu.usage.user = keyed(&st, "user") * 10_000_000;
            s.cpu.usage.kernel = keyed(&st, "system") * 10_000_000;
        }
        if let Some(d) = self.dir("cpu") {
            let st = read(d, "cpu.stat").unwrap_or_default();
            s.cpu.throttling.periods = keyed(&st, "nr_periods");
            s.cpu.throttling.throttled_periods = keyed(&st, "nr_throttled");
            s.cpu.throttling.throttled_time = keyed(&st, "throttled_time");
        }
        if let Some(d) = self.dir("memory") {
            s.memory.usage = read_u64(d, "memory.usage_in_bytes");
            s.memory.max = read_u64(d, "memory.max_usage_in_bytes");
            s.memory.limit = read_u64(d, "memory.limit_in_bytes");
            s.memory.failcnt = read_u64(d, "memory.failcnt");
            s.memory.oom_kill = keyed(&read(d, "memory.oom_control").unwrap_or_default(), "oom_kill");
        }
        if let Some(d) = self.dir("pids") {
            s.pids.current = read_u64(d, "pids.current");
            s.pids.limit = read_u64(d, "pids.max");
        }
        Ok(s)
    }

    fn destroy(&self) -> Result<()> {
        let mut first = None;
        for h in &self.hierarchies {
            if let Err(e) = remove_dir(&h.dir) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| h.dir.clone()).collect()
    }
}
