//! Per-mnemonic counters of handled instructions, for the monitor's reports.

use std::collections::BTreeMap;
use std::fmt;

/// How many times each mnemonic was handled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    counts: BTreeMap<&'static str, u64>,
}

impl Stats {
    /// A set of counters, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one more `mnemonic`.
    pub fn record(&mut self, mnemonic: &'static str) {
        let n = self.counts.entry(mnemonic).or_insert(0);
        *n = n.saturating_add(1);
    }

    /// The count of `mnemonic` (0 if never recorded).
    pub fn get(&self, mnemonic: &str) -> u64 {
        self.counts.get(mnemonic).copied().unwrap_or(0)
    }

    /// The sum of all counts.
    pub fn total(&self) -> u64 {
        self.counts.values().fold(0u64, |a, &n| a.saturating_add(n))
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// `(mnemonic, count)` pairs in alphabetical order of mnemonic.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.counts.iter().map(|(&m, &n)| (m, n))
    }

    /// `(mnemonic, count)` pairs, most frequent first, ties in alphabetical order.
    pub fn sorted_by_count(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self.iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }
}

impl fmt::Display for Stats {
    /// `mnemonic=count` pairs, most frequent first, separated by spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (m, n)) in self.sorted_by_count().into_iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{m}={n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_orders() {
        let mut s = Stats::new();
        assert!(s.is_empty());
        for m in ["popcnt", "clac", "popcnt", "stac", "popcnt", "clac"] {
            s.record(m);
        }
        assert_eq!(s.get("popcnt"), 3);
        assert_eq!(s.get("fxsave"), 0);
        assert_eq!(s.total(), 6);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![("clac", 2), ("popcnt", 3), ("stac", 1)]);
        assert_eq!(s.sorted_by_count(), vec![("popcnt", 3), ("clac", 2), ("stac", 1)]);
        assert_eq!(s.to_string(), "popcnt=3 clac=2 stac=1");
    }
}
