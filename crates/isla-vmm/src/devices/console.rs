//! The serial console sink: writes guest output to its destination and watches it line by line,
//! recording boot milestones and the optional stop pattern.

use std::io::{self, Write};
use std::sync::Arc;

use crate::state::{GuestExit, VmShared};

/// Console lines that mark a boot milestone (first occurrence is recorded).
pub const CONSOLE_MILESTONES: &[(&str, &str)] = &[
    ("Linux version ", "kernel_banner"),
    ("x86/fpu: ", "fpu_init"),
    ("ACPI: Interpreter enabled", "acpi_enabled"),
    ("smpboot: Total of ", "smp_up"),
    ("Serial: 8250/16550 driver", "serial_driver"),
    ("Trying to unpack rootfs image as initramfs", "initramfs_unpack"),
    ("Freeing unused kernel image", "free_init"),
    (" as init process", "init_exec"),
    ("isla-init: started", "init_started"),
    ("isla-init: powering off", "init_poweroff"),
    ("Kernel panic", "kernel_panic"),
];

/// Parses a printk timestamp prefix `[   12.345678]`.
pub fn printk_time(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (num, _) = rest.split_once(']')?;
    num.trim().parse().ok()
}

/// Console output sink.
pub struct Console {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    shared: Arc<VmShared>,
    stop_on: Option<String>,
}

impl Console {
    /// A console writing to `out`.
    pub fn new(out: Box<dyn Write + Send>, shared: Arc<VmShared>, stop_on: Option<String>) -> Self {
        Console { out, line: Vec::with_capacity(256), shared, stop_on }
    }

    fn end_of_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let t =
                self.shared.boot_start_us().map_or(0.0, |b| crate::host::now_us().saturating_sub(b) as f64 / 1000.0);
            tracing::debug!("console at {t:.1} ms: {text}");
        }
        for (needle, name) in CONSOLE_MILESTONES {
            if text.contains(needle) && self.shared.milestone(name, printk_time(&text)) && *name == "init_exec" {
                self.shared.measure_memory("init_exec");
            }
        }
        if let Some(pat) = &self.stop_on {
            if text.contains(pat.as_str()) {
                self.shared.request_exit(GuestExit::Stopped { reason: format!("console printed {pat:?}") });
            }
        }
        self.line.clear();
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write_all(buf)?;
        for &b in buf {
            match b {
                b'\n' => {
                    self.end_of_line();
                    self.out.flush()?;
                }
                b'\r' => {}
                _ if self.line.len() < 4096 => self.line.push(b),
                _ => {}
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn printk_timestamps() {
        assert_eq!(printk_time("[    1.250000] Run /init as init process"), Some(1.25));
        assert_eq!(printk_time("no stamp"), None);
        assert_eq!(printk_time("[ garbage ] x"), None);
    }

    #[test]
    fn milestones_and_stop_pattern() {
        let shared = Arc::new(VmShared::new(0));
        shared.mark_boot_start();
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()), shared.clone(), Some("Run /init".into()));
        c.write_all(b"[    0.000000] Linux version 6.1\r\n[    2.5] Run /init as init process\n").unwrap();
        assert_eq!(
            &*sink.0.lock().unwrap(),
            b"[    0.000000] Linux version 6.1\r\n[    2.5] Run /init as init process\n"
        );
        let names: Vec<_> = shared.milestones().iter().map(|m| m.name).collect();
        assert_eq!(names, vec!["kernel_banner", "init_exec"]);
        assert_eq!(shared.milestones()[1].guest_time_s, Some(2.5));
        assert!(shared.should_stop());
        assert!(matches!(shared.wait_exit(|| None), GuestExit::Stopped { .. }));
        assert!(shared.memory().is_some());
    }

    #[test]
    fn long_lines_are_bounded() {
        let shared = Arc::new(VmShared::new(0));
        let mut c = Console::new(Box::new(io::sink()), shared, None);
        c.write_all(&vec![b'x'; 100_000]).unwrap();
        assert!(c.line.len() <= 4096);
    }
}
