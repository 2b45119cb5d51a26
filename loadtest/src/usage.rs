//! CPU time and memory of a server process, read from `/proc/<pid>/stat` and
//! `/proc/<pid>/status` (Linux only).

use std::path::PathBuf;

use anyhow::Context;

/// What a process had used at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessUsage {
    /// User plus system CPU time since the process started, microseconds.
    pub cpu_us: u64,
    /// Resident memory now, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Highest resident memory since the process started, KiB (`VmHWM`).
    pub peak_rss_kib: u64,
}

impl ProcessUsage {
    /// Reads the usage of process `pid`.
    ///
    /// # Errors
    ///
    /// The process does not exist (any more), or its `/proc` files are not as Linux writes them.
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let stat_path = PathBuf::from(format!("/proc/{pid}/stat"));
        let stat = std::fs::read_to_string(&stat_path)
            .with_context(|| format!("reading {}", stat_path.display()))?;
        // The command name (field 2) may hold spaces; fields after it start past its ')'.
        let after_name = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .with_context(|| format!("{} has no command name", stat_path.display()))?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks = |index: usize| -> anyhow::Result<u64> {
            fields
                .get(index)
                .and_then(|field| field.parse().ok())
                .with_context(|| format!("{} lacks CPU times", stat_path.display()))
        };
        let cpu_ticks = ticks(11)? + ticks(12)?;

        let status_path = PathBuf::from(format!("/proc/{pid}/status"));
        let status = std::fs::read_to_string(&status_path)
            .with_context(|| format!("reading {}", status_path.display()))?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };

        Ok(Self {
            cpu_us: cpu_ticks * 1_000_000 / clock_ticks_per_s(),
            rss_kib: kib("VmRSS:"),
            peak_rss_kib: kib("VmHWM:"),
        })
    }
}

/// The kernel's clock tick (`getconf CLK_TCK`); 100 on every common Linux build.
fn clock_ticks_per_s() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|ticks| *ticks > 0)
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        // CPU time moves in clock ticks: spin until it has moved (a tick is 10 ms).
        let started = std::time::Instant::now();
        let mut usage = ProcessUsage::read(std::process::id()).unwrap();
        let mut spin = 0u64;
        while usage.cpu_us == 0 && started.elapsed() < std::time::Duration::from_secs(5) {
            for index in 0..100_000u64 {
                spin = spin.wrapping_add(std::hint::black_box(index));
            }
            usage = ProcessUsage::read(std::process::id()).unwrap();
        }
        assert!(usage.cpu_us > 0, "no CPU time after spinning ({spin})");
        assert!(usage.rss_kib > 0 && usage.peak_rss_kib >= usage.rss_kib);
        assert!(ProcessUsage::read(u32::MAX).is_err());
    }
}
