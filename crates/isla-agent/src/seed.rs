//! The seed disk of a container image booted as a microVM, and what the guest does with it.
//!
//! The image's root file system is an ext4 disk that many instances share through qcow2
//! overlays, so the host cannot write per-run files into it without mounting it. Instead each
//! start gets a small raw *seed disk* (`/dev/vdb`, `isla.seed=` on the kernel command line):
//!
//! ```text
//! offset 0          the run file: one JSON object (RunFile), then zero bytes
//! last 512 bytes    the status sector: zero until the guest writes `isla-exit N\n` there
//! ```
//!
//! The host writes the whole file afresh before every start (so a status, or anything else a
//! guest wrote, never outlives a run); the guest's init writes the container process's exit
//! status into the last sector before it powers off, and the host reads it back once the
//! monitor has exited ([`parse_status`]). A command line could not carry arbitrary argv and
//! environment safely; a JSON document can.
//!
//! In the guest, [`run_image`] (the agent binary's `--image ROOT SEED` mode) reads the run file,
//! sets the host name, writes `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` into the image, enters the image
//! root with `chroot`, starts the process (environment, working directory, uid/gid from the
//! file) and waits for it; the same process serves the agent meanwhile, so `isla exec` runs in
//! the image's root too.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Sector size of the seed disk.
pub const SECTOR: usize = 512;
/// Largest run file accepted (argv and environment included).
pub const MAX_RUN_FILE: usize = 1 << 20;
/// What precedes the status number in the status sector.
pub const STATUS_PREFIX: &str = "isla-exit ";

/// What to run, and the files the guest writes into the image before it runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// Program and arguments (ENTRYPOINT + CMD or the command line); `argv[0]` is looked up in
    /// the PATH of `env` inside the image.
    pub argv: Vec<String>,
    /// The whole environment, `NAME=value`.
    pub env: Vec<String>,
    /// Working directory inside the image (absolute).
    pub workdir: String,
    /// User id the process runs as.
    pub uid: u32,
    /// Group id the process runs as (supplementary groups are dropped).
    pub gid: u32,
    /// Host name (also written to `/etc/hostname`).
    pub hostname: String,
    /// Contents of `/etc/hosts`.
    pub hosts: String,
    /// Contents of `/etc/resolv.conf` (left alone when empty).
    pub resolv_conf: String,
}

/// Why a seed disk could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The run file is too big for [`MAX_RUN_FILE`].
    #[error("the run file is {0} bytes; at most {MAX_RUN_FILE} bytes of arguments and environment fit")]
    TooLarge(usize),
    /// The run file is not what [`RunFile`] describes.
    #[error("the seed disk's run file is invalid: {0}")]
    Invalid(String),
}

impl RunFile {
    /// Checks what the guest relies on: a program, `NAME=value` entries, an absolute workdir.
    pub fn validate(&self) -> Result<(), SeedError> {
        let bad = |m: String| Err(SeedError::Invalid(m));
        if self.argv.first().is_none_or(|p| p.is_empty()) {
            return bad("argv: no program to run".into());
        }
        if let Some(e) = self.env.iter().find(|e| e.split_once('=').is_none_or(|(k, _)| k.is_empty())) {
            return bad(format!("env: {e:?} is not NAME=value"));
        }
        if !self.workdir.starts_with('/') {
            return bad(format!("workdir: {:?} is not an absolute path", self.workdir));
        }
        if self.hostname.contains(['/', '\n']) {
            return bad(format!("hostname: {:?}", self.hostname));
        }
        Ok(())
    }

    /// The seed disk's bytes: this file as JSON, zero padding, and an empty status sector.
    pub fn to_seed(&self) -> Result<Vec<u8>, SeedError> {
        self.validate()?;
        let json = serde_json::to_vec(self).map_err(|e| SeedError::Invalid(e.to_string()))?;
        if json.len() > MAX_RUN_FILE {
            return Err(SeedError::TooLarge(json.len()));
        }
        // At least one zero byte ends the JSON; whole sectors; then the status sector.
        let body = (json.len() + 1).div_ceil(SECTOR) * SECTOR;
        let mut disk = vec![0u8; body + SECTOR];
        disk[..json.len()].copy_from_slice(&json);
        Ok(disk)
    }

    /// Reads the run file from the start of a seed disk's bytes (up to the first zero byte).
    pub fn from_seed(bytes: &[u8]) -> Result<RunFile, SeedError> {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        if end > MAX_RUN_FILE {
            return Err(SeedError::TooLarge(end));
        }
        let rf: RunFile = serde_json::from_slice(&bytes[..end]).map_err(|e| SeedError::Invalid(e.to_string()))?;
        rf.validate()?;
        Ok(rf)
    }

    /// The PATH of the environment (the usual default when the image sets none).
    pub fn path(&self) -> &str {
        self.env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH)
    }
}

/// PATH when the image's environment has none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The exit status the guest wrote into the last sector of a seed disk, if it wrote one.
pub fn parse_status(last_sector: &[u8]) -> Option<i32> {
    let text = std::str::from_utf8(last_sector.split(|b| *b == 0).next()?).ok()?;
    let n: i32 = text.strip_prefix(STATUS_PREFIX)?.trim_end_matches('\n').parse().ok()?;
    (0..=255).contains(&n).then_some(n)
}

/// Guest side: writes the run file's `/etc` files under `root`, enters `root` (chroot), sets
/// this process's environment to the image's (so `isla exec` commands served by this process
/// get it too), starts the process and returns its exit status (128+N when killed by signal
/// N). `serve` is started (on its own thread, by the caller's choice) once the process runs.
/// Exit statuses without a process: 127 the program was not found, 126 it could not run.
pub fn run_image(root: &Path, seed: &Path, serve: impl FnOnce()) -> io::Result<i32> {
    let mut bytes = Vec::new();
    std::fs::File::open(seed)?.take(MAX_RUN_FILE as u64 + 1).read_to_end(&mut bytes)?;
    let rf = RunFile::from_seed(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc)?;
    for (name, text) in [("hostname", format!("{}\n", rf.hostname)), ("hosts", rf.hosts.clone())] {
        write_file(&etc.join(name), &text)?;
    }
    if !rf.resolv_conf.is_empty() {
        write_file(&etc.join("resolv.conf"), &rf.resolv_conf)?;
    }
    // The kernel's host name (the network's `ip=` may have set it already; the same name).
    if let Err(e) = std::fs::write("/proc/sys/kernel/hostname", &rf.hostname) {
        eprintln!("isla-init: setting the host name {:?}: {e}", rf.hostname);
    }
    std::os::unix::fs::chroot(root)?;
    std::env::set_current_dir("/")?;
    let env = image_env(&rf.env, std::env::var_os(GLIBC_TUNABLES));
    for (k, _) in std::env::vars_os() {
        std::env::remove_var(k);
    }
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut cmd = Command::new(&rf.argv[0]);
    cmd.args(&rf.argv[1..]).current_dir(&rf.workdir).uid(rf.uid).gid(rf.gid);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let path = rf.path();
            eprintln!("isla-init: cannot run {:?} in {} (PATH={path}): {e}", rf.argv[0], rf.workdir);
            return Ok(if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 });
        }
    };
    serve();
    let status = child.wait()?;
    Ok(status.code().or(status.signal().map(|s| 128 + s)).unwrap_or(255))
}

/// The variable the kit's `/init` sets when user space may use registers the guest kernel does
/// not save (docs/nested-kvm.md, "Fresh processes that read zeros").
const GLIBC_TUNABLES: &str = "GLIBC_TUNABLES";

/// The image's environment as (name, value) pairs, plus the GLIBC_TUNABLES this process was
/// started with, unless the image sets its own: the kit's init found the host needs it, and the
/// image's processes would crash without it just as the kit's do.
fn image_env(env: &[String], inherited_tunables: Option<OsString>) -> Vec<(OsString, OsString)> {
    let mut out: Vec<(OsString, OsString)> =
        env.iter().filter_map(|e| e.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
    if let Some(t) = inherited_tunables {
        if !out.iter().any(|(k, _)| k == GLIBC_TUNABLES) {
            out.push((GLIBC_TUNABLES.into(), t));
        }
    }
    out
}

/// Replaces `path` (a symbolic link there is replaced, not followed).
fn write_file(path: &Path, text: &str) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.is_file() => std::fs::remove_file(path)?,
        _ => {}
    }
    std::fs::File::create(path)?.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inherited_glibc_tunables_reach_the_image_unless_it_sets_its_own() {
        let env = vec!["PATH=/bin".to_string(), "X=1=2".to_string(), "junk".to_string()];
        let got = image_env(&env, Some("glibc.cpu.hwcaps=-AVX".into()));
        let pairs: Vec<(&str, &str)> = got.iter().map(|(k, v)| (k.to_str().unwrap(), v.to_str().unwrap())).collect();
        assert_eq!(pairs, [("PATH", "/bin"), ("X", "1=2"), ("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX")]);
        let own = vec!["GLIBC_TUNABLES=glibc.malloc.check=3".to_string()];
        let got = image_env(&own, Some("glibc.cpu.hwcaps=-AVX".into()));
        assert_eq!(got, [(OsString::from("GLIBC_TUNABLES"), OsString::from("glibc.malloc.check=3"))]);
        assert_eq!(image_env(&env, None).len(), 2);
    }

    fn sample() -> RunFile {
        RunFile {
            argv: vec!["sh".into(), "-c".into(), "echo 'a b' \"$X\"\nexit 7".into()],
            env: vec!["PATH=/bin".into(), "X=1=2".into(), "EMPTY=".into()],
            workdir: "/srv".into(),
            uid: 1000,
            gid: 100,
            hostname: "web".into(),
            hosts: "127.0.0.1 localhost\n".into(),
            resolv_conf: String::new(),
        }
    }

    #[test]
    fn seed_round_trips_and_is_sector_aligned() {
        let rf = sample();
        let disk = rf.to_seed().unwrap();
        assert_eq!(disk.len() % SECTOR, 0);
        assert!(disk.len() >= 2 * SECTOR);
        assert_eq!(RunFile::from_seed(&disk).unwrap(), rf);
        // A fresh seed carries no status.
        assert_eq!(parse_status(&disk[disk.len() - SECTOR..]), None);
        assert_eq!(rf.path(), "/bin");
    }

    #[test]
    fn status_sector_is_parsed_strictly() {
        let mut sector = vec![0u8; SECTOR];
        sector[..13].copy_from_slice(b"isla-exit 7\n\0");
        assert_eq!(parse_status(&sector), Some(7));
        for bad in [&b"isla-exit 256\n"[..], b"isla-exit -1\n", b"exit 3\n", b"isla-exit x\n", b"\xffisla"] {
            let mut s = vec![0u8; SECTOR];
            s[..bad.len()].copy_from_slice(bad);
            assert_eq!(parse_status(&s), None, "{bad:?}");
        }
    }

    #[test]
    fn bad_run_files_are_refused_with_the_field_named() {
        type Spoil = fn(&mut RunFile);
        let cases: [(Spoil, &str); 4] = [
            (|r| r.argv.clear(), "argv"),
            (|r| r.env.push("NOEQUALS".into()), "env"),
            (|r| r.workdir = "srv".into(), "workdir"),
            (|r| r.hostname = "a/b".into(), "hostname"),
        ];
        for (spoil, field) in cases {
            let mut rf = sample();
            spoil(&mut rf);
            let e = rf.to_seed().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        let big = RunFile { argv: vec!["x".repeat(MAX_RUN_FILE)], ..sample() };
        assert!(matches!(big.to_seed(), Err(SeedError::TooLarge(_))));
        assert!(RunFile::from_seed(b"{\"argv\":[\"sh\"]}\0").unwrap_err().to_string().contains("missing field"));
        assert!(RunFile::from_seed(&[0u8; 64]).is_err());
    }
}
