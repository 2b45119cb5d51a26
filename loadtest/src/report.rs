//! Counters and latency histograms shared by all device tasks, the per-second progress line,
//! and the final [`FleetReport`].
//!
//! Latencies are recorded in microseconds in HDR histograms (3 significant digits, up to one
//! hour) behind one mutex: one short lock per PUBACK, which two cores sustain at well over the
//! rates a single test machine can produce.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

const HIGHEST_LATENCY_US: u64 = 3_600_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;

/// What a fleet run achieved.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// Devices in the fleet.
    pub devices: usize,
    /// Most devices connected at the same time.
    pub connected: u64,
    /// Readings scheduled: devices × readings per device.
    pub offered: u64,
    /// Distinct readings written to a connection at least once.
    pub published: u64,
    /// Re-sends of readings after a reconnect.
    pub resent: u64,
    /// Distinct readings acknowledged by PUBACK.
    pub acked: u64,
    /// Readings never acknowledged by the end of the run (including those never sent).
    pub not_acked: u64,
    /// Established connections that were lost and had to be re-established.
    pub reconnects: u64,
    /// Connection attempts that failed (network error, timeout or refused CONNACK).
    pub connect_failures: u64,
    /// Connection attempts refused as not authorized (part of `connect_failures`).
    pub login_refusals: u64,
    /// Seconds from the first device's start to the last device's end, drain included.
    pub duration_s: f64,
    /// Seconds spent pre-signing the readings before the run.
    pub presign_s: f64,
    /// `acked / duration_s`.
    pub acked_per_s: f64,
    /// PUBACK latency from the moment the reading was written to the connection.
    pub latency_from_send_ms: LatencySummary,
    /// PUBACK latency from the moment the reading was due: includes waiting for an inflight
    /// slot and for a reconnect, which is what a device experiences.
    pub latency_from_schedule_ms: LatencySummary,
    /// Highest acknowledged seq of each device (0 when none was acknowledged), to check
    /// against `SELECT device_id, max(seq) FROM readings GROUP BY device_id`.
    pub per_device_last_acked_seq: BTreeMap<String, u64>,
    /// Every acknowledged seq of each device, to check against what the server stored.
    #[serde(skip)]
    pub acked_seqs: BTreeMap<String, Vec<u64>>,
}

/// Percentiles of one latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl LatencySummary {
    fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.5)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }
}

impl std::fmt::Display for FleetReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "fleet: {} devices, {} connected at peak, {:.1} s (pre-signing {:.1} s)",
            self.devices, self.connected, self.duration_s, self.presign_s
        )?;
        writeln!(
            f,
            "readings: {} offered, {} published ({} re-sent), {} acked, {} not acked",
            self.offered, self.published, self.resent, self.acked, self.not_acked
        )?;
        writeln!(
            f,
            "throughput: {:.1} acked/s; {} reconnects, {} failed connects ({} logins refused)",
            self.acked_per_s, self.reconnects, self.connect_failures, self.login_refusals
        )?;
        write_latency(
            f,
            "PUBACK latency from send:    ",
            &self.latency_from_send_ms,
        )?;
        write_latency(
            f,
            "PUBACK latency from schedule:",
            &self.latency_from_schedule_ms,
        )
    }
}

fn write_latency(
    f: &mut std::fmt::Formatter<'_>,
    label: &str,
    latency: &LatencySummary,
) -> std::fmt::Result {
    writeln!(
        f,
        "{label} p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        latency.p50, latency.p99, latency.p999, latency.max
    )
}

/// Counters and histograms every device task updates.
#[derive(Debug)]
pub(crate) struct FleetStats {
    connected: AtomicU64,
    connected_peak: AtomicU64,
    published: AtomicU64,
    resent: AtomicU64,
    acked: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    login_refusals: AtomicU64,
    latencies: Mutex<Latencies>,
}

#[derive(Debug)]
struct Latencies {
    from_send: Histogram<u64>,
    from_schedule: Histogram<u64>,
    /// From send, since the last progress line.
    recent: Histogram<u64>,
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(
        1,
        HIGHEST_LATENCY_US,
        SIGNIFICANT_DIGITS,
    )?)
}

impl FleetStats {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            connected: AtomicU64::new(0),
            connected_peak: AtomicU64::new(0),
            published: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            login_refusals: AtomicU64::new(0),
            latencies: Mutex::new(Latencies {
                from_send: new_histogram()?,
                from_schedule: new_histogram()?,
                recent: new_histogram()?,
            }),
        })
    }

    fn latencies(&self) -> MutexGuard<'_, Latencies> {
        self.latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn device_connected(&self) {
        let now = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.connected_peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn device_disconnected(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn count_published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_resent(&self) {
        self.resent.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_connect_failure(&self, login_refused: bool) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        if login_refused {
            self.login_refusals.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_ack(&self, from_send: Duration, from_schedule: Duration) {
        let send_us = micros(from_send);
        let schedule_us = micros(from_schedule);
        self.acked.fetch_add(1, Ordering::Relaxed);

        let mut latencies = self.latencies();
        latencies.from_send.saturating_record(send_us);
        latencies.from_schedule.saturating_record(schedule_us);
        latencies.recent.saturating_record(send_us);
    }

    pub(crate) fn report(
        &self,
        devices: usize,
        offered: u64,
        duration_s: f64,
        presign_s: f64,
        per_device_last_acked_seq: BTreeMap<String, u64>,
        acked_seqs: BTreeMap<String, Vec<u64>>,
    ) -> FleetReport {
        let acked = self.acked.load(Ordering::Relaxed);
        let latencies = self.latencies();
        FleetReport {
            devices,
            connected: self.connected_peak.load(Ordering::Relaxed),
            offered,
            published: self.published.load(Ordering::Relaxed),
            resent: self.resent.load(Ordering::Relaxed),
            acked,
            not_acked: offered.saturating_sub(acked),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            login_refusals: self.login_refusals.load(Ordering::Relaxed),
            duration_s,
            presign_s,
            acked_per_s: if duration_s > 0.0 {
                acked as f64 / duration_s
            } else {
                0.0
            },
            latency_from_send_ms: LatencySummary::of(&latencies.from_send),
            latency_from_schedule_ms: LatencySummary::of(&latencies.from_schedule),
            per_device_last_acked_seq,
            acked_seqs,
        }
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Prints one progress line per second to stderr until aborted: overwritten in place on a
/// terminal, one line each otherwise.
pub(crate) async fn report_progress(stats: Arc<FleetStats>, run_start: Instant) {
    let on_terminal = std::io::stderr().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut previous_acked = 0;

    loop {
        ticker.tick().await;
        let acked = stats.acked.load(Ordering::Relaxed);
        let (p50, p99) = {
            let mut latencies = stats.latencies();
            let summary = LatencySummary::of(&latencies.recent);
            latencies.recent.reset();
            (summary.p50, summary.p99)
        };
        let line = format!(
            "{:>6.1} s  connected {:>6}  acked {:>9}  {:>8} acked/s  puback p50 {:>7.2} ms  p99 {:>7.2} ms",
            run_start.elapsed().as_secs_f64(),
            stats.connected.load(Ordering::Relaxed),
            acked,
            acked - previous_acked,
            p50,
            p99,
        );
        previous_acked = acked;

        let mut stderr = std::io::stderr().lock();
        // Progress is best effort: a closed stderr must not stop the run.
        let _ = if on_terminal {
            write!(stderr, "\r{line}\x1b[K").and_then(|()| stderr.flush())
        } else {
            writeln!(stderr, "{line}")
        };
    }
}

/// Ends an overwritten progress line so that what follows starts on a new line.
pub(crate) fn finish_progress() {
    if std::io::stderr().is_terminal() {
        // Best effort, as for the progress lines themselves.
        let _ = writeln!(std::io::stderr());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_summarises_counters_and_latencies() {
        let stats = FleetStats::new().unwrap();
        stats.device_connected();
        stats.device_connected();
        stats.device_disconnected();
        stats.device_connected();
        for ms in 1..=1000 {
            stats.count_published();
            stats.record_ack(Duration::from_millis(ms), Duration::from_millis(ms + 5));
        }
        stats.count_connect_failure(true);

        let report = stats.report(3, 1200, 2.0, 0.5, BTreeMap::new(), BTreeMap::new());
        assert_eq!(report.connected, 2);
        assert_eq!(
            (report.published, report.acked, report.not_acked),
            (1000, 1000, 200)
        );
        assert_eq!((report.connect_failures, report.login_refusals), (1, 1));
        assert!((report.acked_per_s - 500.0).abs() < 1e-9);
        let send = report.latency_from_send_ms;
        assert_eq!(send.count, 1000);
        assert!((send.p50 - 500.0).abs() < 1.0, "{send:?}");
        assert!((send.p99 - 990.0).abs() < 1.5, "{send:?}");
        assert!((send.max - 1000.0).abs() < 1.0, "{send:?}");
        assert!(report.latency_from_schedule_ms.p50 > send.p50);

        let text = report.to_string();
        assert!(text.contains("1000 acked, 200 not acked"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["latency_from_send_ms"]["count"], 1000);
    }
}
