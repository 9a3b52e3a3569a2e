//! sha256 digests: hashing readers and writers, and the mapping from a digest to a file name.

use std::io::{self, Read, Write};

use oci_spec::image::{Digest, DigestAlgorithm};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `sha256:<hex>` of a finished hasher.
pub fn finish(h: Sha256) -> Digest {
    // 64 lower-case hex digits after "sha256:" is exactly the grammar the parser accepts; no
    // input reaches this string.
    format!("sha256:{}", hex(&h.finalize())).parse().expect("sha256 hex is a valid digest")
}

/// The digest of `bytes`.
pub fn of_bytes(bytes: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update(bytes);
    finish(h)
}

/// Parses `s` as a digest; `what` names where it came from for the error.
pub fn parse(s: &str, what: &str) -> Result<Digest> {
    s.parse::<Digest>().map_err(|e| Error::invalid(what, format!("bad digest {s:?}: {e}")))
}

/// The hex part of a sha256 digest (safe to use as a file name: 64 lower-case hex digits,
/// checked by the parser). Other algorithms are refused.
pub fn sha256_hex(d: &Digest) -> Result<&str> {
    match d.algorithm() {
        DigestAlgorithm::Sha256 => Ok(d.digest()),
        other => Err(Error::invalid(d.to_string(), format!("digest algorithm {other} is not supported (only sha256)"))),
    }
}

/// Fails with [`Error::DigestMismatch`] unless `actual == expected`.
pub fn verify(what: &str, expected: &Digest, actual: &Digest) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), count: 0 }
    }
    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Reads the rest of the stream (tar archives may carry padding after their last entry) and
    /// returns the digest and length of everything read.
    pub fn drain(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((finish(self.hasher), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), count: 0 }
    }
    /// The wrapped writer, the digest and the length of everything written.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, finish(self.hasher), self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
