//! Putting Debian's `sysbench`, `fio` and `iperf3` inside a kind: each binary with its shared
//! libraries (the `ldd` closure), copied into a container's root file system, or into an ext4
//! image the guests mount (the closure is about 80 MB, mostly fio's storage-engine libraries:
//! inside an initramfs the guest kernel would have to unpack all of it at every boot, where it
//! is emulated here, while a mounted disk is read only where it is touched). A small cpio
//! appended to the kit's initramfs carries the script, the guest check and the dynamic loader.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::host::{run_ok, which};
use crate::script::{GUEST_CHECK, LAB_SH};
use crate::{Error, Result};

/// The workload tools the lab puts inside each kind.
pub const TOOLS: [&str; 3] = ["sysbench", "fio", "iperf3"];

/// The files a dynamically linked program needs: itself, its libraries and the loader.
pub fn closure(program: &Path) -> Result<BTreeSet<PathBuf>> {
    let out = run_ok(Command::new("ldd").arg(program), Duration::from_secs(30))?;
    let mut files = parse_ldd(&out);
    files.insert(program.to_path_buf());
    Ok(files)
}

/// Library paths from `ldd` output.
pub fn parse_ldd(text: &str) -> BTreeSet<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The union of the tools' closures on this host; `Err(reason)` if one is missing.
pub fn find() -> std::result::Result<BTreeSet<PathBuf>, String> {
    let mut files = BTreeSet::new();
    for t in TOOLS {
        let bin = which(t).ok_or_else(|| format!("{t} is not installed (apt-get install sysbench fio iperf3)"))?;
        files.extend(closure(&bin).map_err(|e| e.to_string())?);
    }
    Ok(files)
}

/// Copies `files` (following symbolic links) under `root` at the same absolute paths.
pub fn install(files: &BTreeSet<PathBuf>, root: &Path) -> Result<()> {
    for f in files {
        let rel = f.strip_prefix("/").unwrap_or(f);
        let dest = root.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        // A symbolic link in the rootfs (busybox's usr/bin/... applets) must not be written through.
        let _ = std::fs::remove_file(&dest);
        std::fs::copy(f, &dest).map_err(|e| Error::io(f, e))?;
    }
    Ok(())
}

/// The library directories of `files`, under `prefix`, as an LD_LIBRARY_PATH.
pub fn library_path(files: &BTreeSet<PathBuf>, prefix: &str) -> String {
    let dirs: BTreeSet<String> = files
        .iter()
        .filter(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(".so")))
        .filter_map(|f| f.parent().map(|d| format!("{prefix}{}", d.display())))
        .collect();
    dirs.into_iter().collect::<Vec<_>>().join(":")
}

/// An ext4 image holding the tools' closure (and `ld-library-path` for the guest check).
pub fn tools_image(files: &BTreeSet<PathBuf>, dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("tools-tree");
    install(files, &tree)?;
    let lp = tree.join("ld-library-path");
    std::fs::write(&lp, library_path(files, "/lab") + "\n").map_err(|e| Error::io(&lp, e))?;
    let bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    let size_mib = bytes / (1 << 20) * 5 / 4 + 32;
    let img = dir.join("tools.ext4");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "isla-lab", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg(format!("{size_mib}M")),
        Duration::from_secs(120),
    )?;
    let _ = std::fs::remove_dir_all(&tree);
    Ok(img)
}

/// The kit's initramfs with a cpio appended that adds `/etc/isla/lab.sh`, the `lab` check and
/// (when `loader` is given) the dynamic loader at its standard path.
pub fn guest_initramfs(kit_initramfs: &Path, loader: Option<&Path>, dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("initramfs-extra");
    let checks = tree.join("etc/isla/checks");
    std::fs::create_dir_all(&checks).map_err(|e| Error::io(&checks, e))?;
    let write = |p: PathBuf, text: &str| -> Result<()> {
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).map_err(|e| Error::io(&p, e))
    };
    write(tree.join("etc/isla/lab.sh"), LAB_SH)?;
    write(checks.join("lab"), GUEST_CHECK)?;
    if let Some(l) = loader {
        let dest = tree.join(l.strip_prefix("/").unwrap_or(l));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::copy(l, &dest).map_err(|e| Error::io(l, e))?;
    }
    let extra = dir.join("extra.cpio");
    let script = format!(
        "cd {} && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0 > {}",
        sh_quote(&tree),
        sh_quote(&extra)
    );
    run_ok(Command::new("sh").args(["-c", &script]), Duration::from_secs(60))?;
    let mut bytes = std::fs::read(kit_initramfs).map_err(|e| Error::io(kit_initramfs, e))?;
    // The kernel reads concatenated archives; each starts on a 4-byte boundary.
    while bytes.len() % 4 != 0 {
        bytes.push(0);
    }
    bytes.extend(std::fs::read(&extra).map_err(|e| Error::io(&extra, e))?);
    let out = dir.join("initramfs-lab.cpio");
    std::fs::write(&out, bytes).map_err(|e| Error::io(&out, e))?;
    let _ = std::fs::remove_dir_all(&tree);
    Ok(out)
}

/// The ELF interpreter among a closure's files (`/lib64/ld-linux-x86-64.so.2` on x86-64 Debian).
pub fn loader(files: &BTreeSet<PathBuf>) -> Option<&PathBuf> {
    files.iter().find(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ld-linux")))
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x7f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x7f)\n\tlibgone.so => not found\n";
        let s = parse_ldd(text);
        let v: Vec<&str> = s.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(v, vec!["/lib/x86_64-linux-gnu/libm.so.6", "/lib64/ld-linux-x86-64.so.2"]);
        assert_eq!(loader(&s).unwrap(), Path::new("/lib64/ld-linux-x86-64.so.2"));
        assert_eq!(library_path(&s, "/lab"), "/lab/lib/x86_64-linux-gnu:/lab/lib64");
    }

    #[test]
    fn closure_of_a_real_program_runs_from_a_copy() {
        let sh = which("sh").unwrap();
        let files = closure(&sh).unwrap();
        assert!(files.iter().any(|f| f.to_string_lossy().contains("libc.so")), "{files:?}");
        let d = crate::host::tempdir_for("test-closure").unwrap();
        install(&files, &d).unwrap();
        // The copy runs in a chroot: the closure is complete.
        let out = Command::new("chroot").arg(&d).arg(&sh).args(["-c", "echo closure-ok"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "closure-ok", "{out:?}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
