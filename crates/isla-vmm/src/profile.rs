//! A sampling profiler of the guest: where does a guest spend its time when `perf` cannot see it?
//!
//! On nested (PVM) hosts the guest kernel's code is run by the host's instruction emulator, so
//! host `perf` shows only the host's emulator, and the guest has no PMU. The monitor can still
//! look: a sampler thread kicks every vCPU thread out of `KVM_RUN` with a signal at a fixed rate,
//! and the vCPU thread reads its RIP (`KVM_GET_REGS`) before it re-enters. RIPs are resolved to
//! kernel symbols from the kernel's ELF symbol table (a vmlinux) or a `System.map`.
//!
//! The kick costs one exit per vCPU per sample, so the profiler is off unless asked for.
//! Samples land where `KVM_RUN` notices the signal, which on an emulating host may lag the
//! instruction that was running: read the profile as a distribution, not as exact attribution.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

/// User-space RIPs (below the kernel's half of the address space) are counted under this name.
pub const USER: &str = "[user]";
/// Kernel RIPs no symbol covers.
pub const UNKNOWN: &str = "[unknown]";

/// One sample: when (µs since boot start), which vCPU, and where.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Microseconds since boot start.
    pub t_us: u64,
    /// vCPU index.
    pub vcpu: u8,
    /// Guest RIP.
    pub rip: u64,
}

/// A sorted symbol table: (start address, name).
#[derive(Debug, Default)]
pub struct Symbols {
    entries: Vec<(u64, String)>,
}

impl Symbols {
    /// Loads function symbols from an ELF file's symbol table, or a `System.map` (text lines
    /// `ADDRESS TYPE NAME`). Returns an empty table (and says why) when neither is readable:
    /// a profile with addresses is still a profile.
    pub fn load(path: &Path) -> Result<Symbols, String> {
        let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if data.starts_with(b"\x7fELF") {
            Self::from_elf(&data).map_err(|e| format!("{}: {e}", path.display()))
        } else {
            let text =
                String::from_utf8(data).map_err(|_| format!("{}: neither ELF nor System.map", path.display()))?;
            Ok(Self::from_system_map(&text))
        }
    }

    fn from_elf(data: &[u8]) -> Result<Symbols, String> {
        use object::{Object, ObjectSymbol, SymbolKind};
        let file = object::File::parse(data).map_err(|e| format!("not a readable ELF file: {e}"))?;
        let entries = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| s.name().ok().map(|n| (s.address(), n.to_string())))
            .collect();
        Ok(Self::sorted(entries))
    }

    /// Parses a `System.map`: text (`t`/`T`/`w`/`W`) symbols only.
    pub fn from_system_map(text: &str) -> Symbols {
        let entries = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_string()))
            })
            .collect();
        Self::sorted(entries)
    }

    fn sorted(mut entries: Vec<(u64, String)>) -> Symbols {
        entries.sort_by_key(|e| e.0);
        entries.dedup_by_key(|e| e.0);
        Symbols { entries }
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no symbols.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The function containing `rip`: user space, the nearest symbol at or below it, or unknown.
    pub fn name(&self, rip: u64) -> String {
        if rip < 0x8000_0000_0000_0000 {
            return USER.to_string();
        }
        match self.entries.partition_point(|e| e.0 <= rip) {
            0 => format!("{UNKNOWN} {rip:#x}"),
            i => self.entries[i - 1].1.clone(),
        }
    }
}

/// A symbol and how many samples landed in it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Hot {
    /// Function name (or `[user]`, or `[unknown] ADDRESS`).
    pub symbol: String,
    /// Samples in it.
    pub samples: u64,
    /// Share of all samples, percent.
    pub percent: f64,
}

/// One slice of the run: which functions dominated it.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Start, seconds since boot start.
    pub start_s: f64,
    /// Samples in this window (all vCPUs).
    pub samples: u64,
    /// Most-sampled functions in the window.
    pub top: Vec<Hot>,
}

/// The profile of a run.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileReport {
    /// Sampling interval, milliseconds.
    pub interval_ms: f64,
    /// Symbols known (0: addresses only).
    pub symbols: usize,
    /// Samples taken (all vCPUs).
    pub samples: u64,
    /// Most-sampled functions over the whole run.
    pub top: Vec<Hot>,
    /// The run cut into windows, each with its hottest functions: the boot's phases.
    pub timeline: Vec<Window>,
}

fn hottest<'a>(names: impl Iterator<Item = &'a str>, limit: usize) -> (u64, Vec<Hot>) {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total = 0;
    for n in names {
        *counts.entry(n).or_default() += 1;
        total += 1;
    }
    let mut v: Vec<(&str, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let top = v
        .into_iter()
        .take(limit)
        .map(|(symbol, samples)| Hot {
            symbol: symbol.to_string(),
            samples,
            percent: 100.0 * samples as f64 / total.max(1) as f64,
        })
        .collect();
    (total, top)
}

impl ProfileReport {
    /// Builds the report: the `limit` hottest functions, and the run in `window_s`-second windows.
    pub fn new(samples: &[Sample], symbols: &Symbols, interval_ms: f64, limit: usize, window_s: f64) -> Self {
        // Each sample's function, resolved once for both views.
        let named: Vec<(u64, String)> = samples.iter().map(|s| (s.t_us, symbols.name(s.rip))).collect();
        let (total, top) = hottest(named.iter().map(|(_, n)| n.as_str()), limit);
        let window_us = (window_s * 1e6).max(1.0) as u64;
        let mut by_window: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
        for (t_us, name) in &named {
            by_window.entry(t_us / window_us).or_default().push(name);
        }
        let timeline = by_window
            .into_iter()
            .map(|(w, names)| {
                let (n, top) = hottest(names.into_iter(), 3);
                Window { start_s: (w * window_us) as f64 / 1e6, samples: n, top }
            })
            .collect();
        ProfileReport { interval_ms, symbols: symbols.len(), samples: total, top, timeline }
    }

    /// Human-readable summary: the hottest functions and the timeline.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = format!(
            "isla: profile: {} samples every {:.0} ms per vCPU ({} symbols)\n",
            self.samples, self.interval_ms, self.symbols
        );
        for h in &self.top {
            let _ = writeln!(s, "isla:   {:5.1}% {:6}  {}", h.percent, h.samples, h.symbol);
        }
        let _ = writeln!(s, "isla: profile timeline (hottest functions per window):");
        for w in &self.timeline {
            let names: Vec<String> = w.top.iter().map(|h| format!("{} {:.0}%", h.symbol, h.percent)).collect();
            let _ = writeln!(s, "isla:   {:6.1}s {:4}  {}", w.start_s, w.samples, names.join(", "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "ffffffff81000000 T _text\n\
                       ffffffff81001000 t memset_orig\n\
                       ffffffff81002000 T clear_page_rep\n\
                       ffffffff81003000 D some_data\n\
                       ffffffff81004000 W weak_fn\n\
                       garbage line\n";

    #[test]
    fn system_map_text_symbols_resolve() {
        let s = Symbols::from_system_map(MAP);
        assert_eq!(s.len(), 4, "data symbols and garbage are skipped");
        assert_eq!(s.name(0xffff_ffff_8100_1010), "memset_orig");
        assert_eq!(s.name(0xffff_ffff_8100_2000), "clear_page_rep");
        // A data symbol is not a function: the address falls in the previous function.
        assert_eq!(s.name(0xffff_ffff_8100_3008), "clear_page_rep");
        assert_eq!(s.name(0xffff_ffff_8100_4001), "weak_fn");
        assert_eq!(s.name(0x401000), USER);
        assert!(s.name(0xffff_ffff_8000_0000).starts_with(UNKNOWN));
    }

    #[test]
    fn report_counts_hottest_and_windows() {
        let s = Symbols::from_system_map(MAP);
        let mut samples = Vec::new();
        for i in 0..10u64 {
            samples.push(Sample { t_us: i * 100_000, vcpu: 0, rip: 0xffff_ffff_8100_1004 });
        }
        for i in 0..5u64 {
            samples.push(Sample { t_us: 1_000_000 + i * 100_000, vcpu: 1, rip: 0x400000 });
        }
        let r = ProfileReport::new(&samples, &s, 10.0, 2, 1.0);
        assert_eq!(r.samples, 15);
        assert_eq!(r.top[0].symbol, "memset_orig");
        assert_eq!(r.top[0].samples, 10);
        assert_eq!(r.top[1].symbol, USER);
        assert_eq!(r.timeline.len(), 2);
        assert_eq!(r.timeline[1].start_s, 1.0);
        assert_eq!(r.timeline[1].top[0].symbol, USER);
        assert!(r.summary().contains("memset_orig"));
    }

    #[test]
    fn elf_symbols_come_from_the_symbol_table() {
        // The test binary itself is an ELF file with a symbol table.
        let exe = std::env::current_exe().unwrap();
        let s = Symbols::load(&exe).unwrap();
        assert!(!s.is_empty());
        assert!(Symbols::load(Path::new("/nonexistent/vmlinux")).is_err());
    }
}
