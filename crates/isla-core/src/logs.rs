//! Instance logs: what the instance writes on stdout and stderr, one record per line in the CRI
//! log format (`TIME STREAM F|P TEXT`, as containerd and CRI-O write them): `F` ends a line, `P`
//! is a piece of a longer line (or a last line without a newline). It keeps the two streams
//! apart and timestamps every line while staying a plain text file that `grep` reads.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use crate::error::{io, Result};

/// Which output stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Appends records to a log file.
pub struct LogWriter {
    file: File,
}

impl LogWriter {
    /// Opens `path` for appending (created with mode 0640 if missing).
    pub fn open(path: &Path) -> Result<LogWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .map_err(io(format!("opening log {}", path.display())))?;
        Ok(LogWriter { file })
    }

    /// Writes what one read returned: a record per complete line, then one `P` record for a
    /// trailing piece without newline.
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> Result<()> {
        let ts = crate::proc::now_rfc3339();
        let mut out = Vec::with_capacity(data.len() + 64);
        let mut rest = data;
        while !rest.is_empty() {
            let (line, tag, next) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], "F", &rest[i + 1..]),
                None => (rest, "P", &rest[rest.len()..]),
            };
            out.extend_from_slice(format!("{ts} {} {tag} ", stream.as_str()).as_bytes());
            out.extend_from_slice(line);
            out.push(b'\n');
            rest = next;
        }
        self.file.write_all(&out).map_err(io("writing the log"))
    }
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// RFC 3339 time the supervisor read it.
    pub time: String,
    /// Stream.
    pub stream: Stream,
    /// Whether the record ends a line.
    pub full: bool,
    /// The text (without the newline).
    pub text: Vec<u8>,
}

/// Reads every record of `path` (a missing file has none); with `tail`, only the records of the
/// last `tail` lines. Lines that are not records (a damaged file) are skipped.
pub fn read(path: &Path, tail: Option<usize>) -> Result<Vec<Record>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("reading log {}", path.display()))(e)),
    };
    let mut out = Vec::new();
    for line in BufReader::new(f).split(b'\n') {
        let line = line.map_err(io(format!("reading log {}", path.display())))?;
        if let Some(r) = parse(&line) {
            out.push(r);
        }
    }
    if let Some(n) = tail {
        out.drain(..tail_start(&out, n));
    }
    Ok(out)
}

/// Reads the records written after byte `offset` of `path`, up to the last complete line (a
/// line being written is left for the next call); also returns the offset to continue from.
/// This is how `logs --follow` reads a log that grows.
pub fn read_from(path: &Path, offset: u64) -> Result<(Vec<Record>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let what = || format!("reading log {}", path.display());
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), offset)),
        Err(e) => return Err(io(what())(e)),
    };
    f.seek(SeekFrom::Start(offset)).map_err(io(what()))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(io(what()))?;
    let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let records = buf[..end].split(|&b| b == b'\n').filter_map(parse).collect();
    Ok((records, offset + end as u64))
}

/// The index of the first record of the last `n` lines of `records`.
pub fn tail_start(records: &[Record], n: usize) -> usize {
    let mut lines = 0;
    let mut cut = records.len();
    for (i, r) in records.iter().enumerate().rev() {
        if r.full || i + 1 == records.len() {
            if lines == n {
                break;
            }
            lines += 1;
        }
        cut = i;
    }
    cut
}

fn parse(line: &[u8]) -> Option<Record> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let full = match parts.next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    Some(Record { time, stream, full, text: parts.next().unwrap_or_default().to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_pieces_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut w = LogWriter::open(&p).unwrap();
        w.write(Stream::Stdout, b"one\ntwo\nthr").unwrap();
        w.write(Stream::Stdout, b"ee\n").unwrap();
        w.write(Stream::Stderr, b"oops with  spaces\n").unwrap();
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"garbage line\n").unwrap();
        let all = read(&p, None).unwrap();
        let text: Vec<(&[u8], bool)> = all.iter().map(|r| (r.text.as_slice(), r.full)).collect();
        assert_eq!(
            text,
            [(&b"one"[..], true), (b"two", true), (b"thr", false), (b"ee", true), (b"oops with  spaces", true)]
        );
        assert_eq!(all[4].stream, Stream::Stderr);
        let last2 = read(&p, Some(2)).unwrap();
        assert_eq!(
            last2.iter().map(|r| r.text.clone()).collect::<Vec<_>>(),
            [b"thr".to_vec(), b"ee".to_vec(), b"oops with  spaces".to_vec()]
        );
        assert!(read(&dir.path().join("none"), None).unwrap().is_empty());
        // Following: a line being written waits for its newline.
        let (recs, off) = read_from(&p, 0).unwrap();
        assert_eq!(recs, all);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"2020-01-01T00:00:00Z stdout F ha")
            .unwrap();
        let (recs, off2) = read_from(&p, off).unwrap();
        assert!(recs.is_empty() && off2 == off);
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"lf\n").unwrap();
        let (recs, _) = read_from(&p, off2).unwrap();
        assert_eq!(recs.iter().map(|r| r.text.clone()).collect::<Vec<_>>(), [b"half".to_vec()]);
    }
}
