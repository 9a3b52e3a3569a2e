//! Loading and checking a bundle's `config.json`, and the default spec `isla runtime spec` writes.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxResources, Spec};

use crate::error::{Error, Result};

/// Major versions of the runtime spec this runtime implements.
pub const SUPPORTED_MAJOR: u64 = 1;

fn bundle_err(bundle: &Path, msg: impl Into<String>) -> Error {
    Error::Bundle { bundle: bundle.to_path_buf(), msg: msg.into() }
}

/// A loaded bundle: its directory, its spec, and the absolute rootfs path.
pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
    pub rootfs: PathBuf,
}

/// Read and check `bundle/config.json`: JSON, version, root, process.
pub fn load(bundle: &Path) -> Result<Bundle> {
    let dir = std::fs::canonicalize(bundle)
        .map_err(|e| bundle_err(bundle, format!("cannot open the bundle directory: {e}")))?;
    let file = dir.join("config.json");
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bundle_err(&dir, "no config.json in it (write one with `isla runtime spec`)"))
        }
        Err(e) => return Err(bundle_err(&dir, format!("config.json: {e}"))),
    };
    let spec: Spec = serde_json::from_str(&text).map_err(|e| {
        bundle_err(
            &dir,
            format!("config.json is not a valid runtime spec: {e} (line {}, column {})", e.line(), e.column()),
        )
    })?;
    check_version(spec.version()).map_err(|m| bundle_err(&dir, format!("config.json: ociVersion: {m}")))?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| bundle_err(&dir, "config.json has no root: add \"root\": {\"path\": \"rootfs\"}"))?;
    let rootfs = if root.path().is_absolute() { root.path().clone() } else { dir.join(root.path()) };
    match std::fs::metadata(&rootfs) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bundle_err(&dir, format!("root.path {} is not a directory", rootfs.display()))),
        Err(e) => return Err(bundle_err(&dir, format!("root.path {}: {e}", rootfs.display()))),
    }
    if spec.process().is_none() {
        return Err(bundle_err(&dir, "config.json has no process: nothing to run"));
    }
    Ok(Bundle { dir, spec, rootfs })
}

/// Accept 1.x.y (with pre-release tags such as 1.0.2-dev); anything else gets a clear message.
pub fn check_version(v: &str) -> std::result::Result<(), String> {
    if v.is_empty() {
        return Err("missing: set \"ociVersion\": \"1.0.2\"".into());
    }
    let major = v.split('.').next().and_then(|m| m.parse::<u64>().ok());
    match major {
        Some(SUPPORTED_MAJOR) if v.split('.').count() >= 2 => Ok(()),
        Some(m) => Err(format!("{v:?} is version {m}.x of the runtime spec; isla implements {SUPPORTED_MAJOR}.x")),
        None => Err(format!("{v:?} is not a semantic version such as 1.0.2")),
    }
}

/// The spec `isla runtime spec` writes: runc's default (sh on a terminal, the usual mounts,
/// masked and read-only paths, all devices denied but the defaults).
pub fn default_spec(rootless: bool) -> Spec {
    let mut spec = if rootless {
        Spec::rootless(nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw())
    } else {
        Spec::default()
    };
    spec.set_version("1.0.2".into());
    spec.set_hostname(Some("isla".into()));
    if let Some(p) = spec.process_mut() {
        p.set_terminal(Some(true));
    }
    if !rootless {
        if let Some(l) = spec.linux_mut() {
            let mut deny = LinuxDeviceCgroup::default();
            deny.set_allow(false);
            deny.set_access(Some("rwm".into()));
            let mut r = LinuxResources::default();
            r.set_devices(Some(vec![deny]));
            l.set_resources(Some(r));
        }
    }
    spec
}
