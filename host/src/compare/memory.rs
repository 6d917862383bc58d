//! Peak memory of the process (resident set), per strategy where the OS allows it.
//!
//! Linux keeps the peak resident set size in `VmHWM` of `/proc/self/status`; writing `5` to
//! `/proc/self/clear_refs` resets it to the current size, so each strategy's peak is measured on
//! its own. Where that write is refused the peak is the process's since it started, and the
//! report says so. Elsewhere there is no measurement. GPU memory is not measured.

/// A peak measurement.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Peak {
    pub bytes: u64,
    /// True when the peak was reset before the strategy (its own peak); false: the process's
    /// peak since it started.
    pub per_strategy: bool,
}

/// The peak resident set size (`VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    status_kib("VmHWM:")
}

/// The current resident set size (`VmRSS`), in bytes.
pub fn current_rss() -> Option<u64> {
    status_kib("VmRSS:")
}

fn status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib(&text, key)
}

/// The value of a `Key:   1234 kB` line, in bytes.
fn parse_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the peak to the current resident size; false where the OS does not allow it.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Measures the peak of one piece of work: reset (when allowed) at the start, read at the end.
pub struct PeakMeter {
    reset: bool,
}

impl PeakMeter {
    pub fn start() -> Self {
        Self { reset: reset_peak() }
    }

    pub fn finish(&self) -> Option<Peak> {
        peak_rss().map(|bytes| Peak { bytes, per_strategy: self.reset })
    }
}

/// `1.23 GiB`, `456.7 MiB`, `12.0 KiB`, `17 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        let s = "Name:\tgraft\nVmPeak:\t  2000 kB\nVmHWM:\t    1500 kB\nVmRSS:\t    1200 kB\n";
        assert_eq!(parse_kib(s, "VmHWM:"), Some(1500 * 1024));
        assert_eq!(parse_kib(s, "VmRSS:"), Some(1200 * 1024));
        assert_eq!(parse_kib(s, "VmSwap:"), None);
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(17), "17 B");
        assert_eq!(human_bytes(12 * 1024), "12.0 KiB");
        assert_eq!(human_bytes(1536 * 1024 * 1024), "1.5 GiB");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let peak = peak_rss().unwrap();
        assert!(peak >= current_rss().unwrap() / 2 && peak > 0);
        let m = PeakMeter::start();
        assert!(m.finish().unwrap().bytes > 0);
    }
}
