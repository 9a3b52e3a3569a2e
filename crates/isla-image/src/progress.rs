//! Progress reporting for long work (imports, pulls, pushes, unpacking). The library only calls
//! this trait; the CLI draws bars with indicatif, tests and library users pass [`Quiet`].

use std::io::{self, Read};

/// Receives progress of one task at a time.
pub trait Progress: Send + Sync {
    /// A task starts; `total` is its size in bytes when known.
    fn start(&self, task: &str, total: Option<u64>);
    /// `n` more bytes were handled.
    fn advance(&self, n: u64);
    /// The current task ended.
    fn finish(&self);
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// A reader that reports every read to a [`Progress`].
pub(crate) struct ProgressReader<'a, R> {
    pub inner: R,
    pub progress: &'a dyn Progress,
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}
