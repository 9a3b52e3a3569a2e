//! Facts about the host the monitor runs on: nested (PVM) KVM, memory, clocks, and the monitor's
//! own memory use read from /proc.

use std::path::Path;

/// True when the host's KVM is the PVM module (nested, guest kernel run by the instruction
/// emulator): `/sys/module/kvm_pvm` exists.
pub fn is_nested_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Host RAM in bytes (MemTotal), if /proc/meminfo can be read.
pub fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&text, "MemTotal:").map(|kib| kib << 10)
}

fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; the clock ids used are always valid.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// CLOCK_MONOTONIC in microseconds: the time base of every timestamp isla records.
pub fn now_us() -> u64 {
    clock_us(libc::CLOCK_MONOTONIC)
}

/// When this process started, on the CLOCK_MONOTONIC time base, in microseconds.
///
/// A parent that spawns the monitor can pass its own reading of CLOCK_MONOTONIC in
/// `ISLA_START_TIME_US` (microsecond precision, as Firecracker's `--start-time-us`); otherwise the
/// kernel's start time of this process is used (clock-tick precision, 10 ms).
pub fn process_start_us() -> u64 {
    if let Some(t) = std::env::var("ISLA_START_TIME_US").ok().and_then(|v| v.parse().ok()) {
        return t;
    }
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Field 22 (starttime) counts clock ticks since boot; fields after the ")" of comm.
    let start_ticks: Option<u64> =
        stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(19)?.parse().ok());
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    match start_ticks {
        Some(ticks) => {
            let since_boot = clock_us(libc::CLOCK_BOOTTIME);
            let age = since_boot.saturating_sub(ticks * 1_000_000 / hz);
            now_us().saturating_sub(age)
        }
        None => now_us(),
    }
}

/// Proportional set size (KiB) of this process, split into the guest-memory mappings (whose host
/// start addresses are given) and everything else (the monitor's own overhead).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PssSplit {
    /// Pss of guest RAM mappings: guest memory actually touched.
    pub guest_kib: u64,
    /// Pss of everything else: binary, heap, stacks, kvm_run pages.
    pub vmm_kib: u64,
}

/// Reads /proc/self/smaps and splits Pss between guest RAM (mappings starting inside
/// `guest_ranges`, host start and length) and the rest.
pub fn pss_split(guest_ranges: &[(u64, u64)]) -> Option<PssSplit> {
    let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
    Some(parse_smaps(&text, |start, _| guest_ranges.iter().any(|&(s, len)| start >= s && start < s + len)))
}

/// Reads the smaps file of any process (`/proc/<pid>/smaps`) and splits Pss with `is_guest`,
/// which is given each mapping's host start and end address.
pub fn pss_split_of(smaps: &str, is_guest: impl Fn(u64, u64) -> bool) -> Option<PssSplit> {
    let text = std::fs::read_to_string(smaps).ok()?;
    Some(parse_smaps(&text, is_guest))
}

fn parse_smaps(text: &str, is_guest: impl Fn(u64, u64) -> bool) -> PssSplit {
    let mut split = PssSplit::default();
    let mut in_guest = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let range = first.split_once('-').and_then(|(a, b)| {
            let hex = |x: &str| {
                (!x.is_empty() && x.bytes().all(|c| c.is_ascii_hexdigit()))
                    .then(|| u64::from_str_radix(x, 16).ok())
                    .flatten()
            };
            Some((hex(a)?, hex(b)?))
        });
        if let Some((start, end)) = range {
            in_guest = is_guest(start, end);
        } else if let Some(rest) = line.strip_prefix("Pss:") {
            let kib: u64 = rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            if in_guest {
                split.guest_kib += kib;
            } else {
                split.vmm_kib += kib;
            }
        }
    }
    split
}

/// 32 bytes from the host's CRNG (getrandom), to seed the guest kernel's.
pub fn random_seed() -> Result<[u8; 32], crate::VmmError> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .map_err(|e| crate::VmmError::Setup(format!("random seed for the guest from /dev/urandom: {e}")))?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_split() {
        let text = "\
55d0a0000000-55d0a0100000 r-xp 00000000 fd:00 123  /usr/bin/isla
Size:               1024 kB
Pss:                 300 kB
Pss_Dirty:             0 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Pss:                4000 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]
Pss:                  12 kB
";
        let ranges = [(0x7f00_0000_0000u64, 128u64 << 20)];
        let s = parse_smaps(text, |start, _| ranges.iter().any(|&(r, len)| start >= r && start < r + len));
        assert_eq!(s, PssSplit { guest_kib: 4000, vmm_kib: 312 });
        assert_eq!(parse_smaps(text, |_, _| false).vmm_kib, 4312);
        // Selected by size, as the bench does for a peer it did not build.
        let by_size = parse_smaps(text, |start, end| end - start >= (128 << 20) / 10 * 9);
        assert_eq!(by_size, PssSplit { guest_kib: 4000, vmm_kib: 312 });
    }

    #[test]
    fn live_values_are_sane() {
        assert!(mem_total().unwrap() > 64 << 20);
        let start = process_start_us();
        let now = now_us();
        assert!(start <= now && now - start < 24 * 3600 * 1_000_000);
        let s = pss_split(&[]).unwrap();
        assert!(s.vmm_kib > 0 && s.guest_kib == 0);
        assert_eq!(meminfo_field("MemTotal:  100 kB\n", "MemTotal:"), Some(100));
    }
}
