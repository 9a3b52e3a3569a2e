//! Helpers shared by the integration tests: scratch directories, qemu-img, a seeded RNG.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use isla_disk::{open, BlockBackend, CreateOptions, Format, OpenOptions};

/// A scratch directory removed on drop (also when the test fails).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("isla-disk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a qemu tool; returns (exit code, stdout + stderr).
pub fn run(tool: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool} is needed by this test: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

pub fn qemu_img(args: &[&str]) -> String {
    let (code, text) = run("qemu-img", args);
    assert_eq!(code, 0, "qemu-img {args:?} failed:\n{text}");
    text
}

pub fn qemu_io(file: &Path, fmt: &str, cmd: &str) {
    let (code, text) = run("qemu-io", &["-f", fmt, "-c", cmd, s(file)]);
    assert_eq!(code, 0, "qemu-io {cmd} failed:\n{text}");
    assert!(!text.contains("error") && !text.contains("failed"), "qemu-io {cmd}:\n{text}");
}

/// `qemu-img check` must find nothing wrong.
pub fn qemu_check_clean(file: &Path) {
    let (code, text) = run("qemu-img", &["check", s(file)]);
    assert!(code == 0 && text.contains("No errors were found"), "qemu-img check {}:\n{text}", file.display());
}

/// The image's guest content as qemu sees it (`qemu-img convert -O raw`).
pub fn qemu_content(file: &Path, dir: &Scratch) -> Vec<u8> {
    let out = dir.path(&format!("{}.qemu-raw", file.file_name().unwrap().to_string_lossy()));
    let _ = std::fs::remove_file(&out);
    qemu_img(&["convert", "-O", "raw", s(file), s(&out)]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// The image's guest content as isla reads it.
pub fn isla_content(file: &Path) -> Vec<u8> {
    let mut d = open(file, OpenOptions { read_only: true, format: None }).unwrap();
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn create_qcow2(path: &Path, size: u64, cluster_size: u32) {
    let mut o = CreateOptions::new(Format::Qcow2, size);
    o.cluster_size = Some(cluster_size);
    isla_disk::create(path, &o).unwrap();
}

/// Creates a qcow2 overlay over `backing` (a name relative to the overlay's directory), sized
/// like the backing file.
pub fn create_overlay(path: &Path, backing: &str, fmt: Format, cluster_size: Option<u32>) {
    let o = CreateOptions { format: Format::Qcow2, size: None, backing: Some((backing.into(), fmt)), cluster_size };
    isla_disk::create(path, &o).unwrap();
}

pub fn open_rw(path: &Path) -> Box<dyn BlockBackend> {
    open(path, OpenOptions { read_only: false, format: None }).unwrap()
}

/// xorshift64*: a fixed-seed generator so every run does the same operations.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        let v = self.next();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (v >> ((i % 8) * 8)) as u8 ^ (i / 8) as u8;
        }
    }
}

/// A random request inside `size`: mostly small and unaligned, some spanning clusters.
pub fn random_range(rng: &mut Rng, size: u64, cluster: u64) -> (u64, u64) {
    let len = match rng.below(4) {
        0 => 1 + rng.below(512),
        1 => 1 + rng.below(cluster * 3),
        2 => cluster,
        _ => 4096,
    }
    .min(size);
    let off = if rng.below(3) == 0 { rng.below(size / cluster) * cluster } else { rng.below(size - len + 1) };
    (off.min(size - len), len)
}
