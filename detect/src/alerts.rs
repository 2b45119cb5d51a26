//! Alerts: what the detector decided, with its evidence, kept durably and streamed to the SOC.
//!
//! Invariants:
//! - Alert ids rise by one, in the order the alerts were raised, across restarts.
//! - An alert is appended to `alerts/alerts.jsonl` and fsynced before anyone can see it
//!   (stream, SQL), so a client that saw alert `n` finds it again after a crash.
//! - The file holds one JSON record per line: `{"alert": {...}}` or `{"ack": {...}}`. On
//!   open, every record is read back; a torn last line (a crash mid-write) is cut off.
//! - At most `max_in_memory` alerts stay in memory for the stream and SQL; older ones are only
//!   in the file. A client resuming from an id older than that gets the oldest kept ones and
//!   a `gap` marker in the log (the limit bites only after that many alerts).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{Error, Result};

/// How bad an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// One feature behind an alert and how far it is from normal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub feature: String,
    pub observed: f64,
    pub expected: f64,
    pub deviation: f64,
}

/// What was done about an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    None,
    Suspect,
    Quarantined,
    AwaitingConfirmation,
    Throttled,
    Released,
    Cleared,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::None => "none",
            Action::Suspect => "suspect",
            Action::Quarantined => "quarantined",
            Action::AwaitingConfirmation => "awaiting_confirmation",
            Action::Throttled => "throttled",
            Action::Released => "released",
            Action::Cleared => "cleared",
        }
    }
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub alert_id: u64,
    pub device_id: String,
    pub device_class: String,
    pub raised_at_ms: i64,
    pub detector: String,
    pub severity: Severity,
    /// The device's risk after this alert.
    pub score: f64,
    pub summary: String,
    pub evidence: Vec<Evidence>,
    pub action: Action,
    #[serde(default)]
    pub acknowledged: bool,
}

/// An alert before it has an id.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAlert {
    pub device_id: String,
    pub device_class: String,
    pub raised_at_ms: i64,
    pub detector: String,
    pub severity: Severity,
    pub score: f64,
    pub summary: String,
    pub evidence: Vec<Evidence>,
    pub action: Action,
}

#[derive(Debug, Serialize, Deserialize)]
struct Acknowledgement {
    alert_id: u64,
    at_ms: i64,
    note: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Alert(Alert),
    Ack(Acknowledgement),
}

struct LogState {
    file: File,
    kept: VecDeque<Alert>,
    next_id: u64,
}

/// The durable alert log; cheap to clone.
#[derive(Clone)]
pub struct AlertLog {
    path: Arc<PathBuf>,
    state: Arc<Mutex<LogState>>,
    latest: watch::Sender<u64>,
    max_in_memory: usize,
}

impl std::fmt::Debug for AlertLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertLog")
            .field("path", &self.path)
            .field("latest", &*self.latest.borrow())
            .finish()
    }
}

impl AlertLog {
    /// Opens (or creates) `<data_dir>/alerts/alerts.jsonl` and reads back every record.
    pub fn open(data_dir: &Path, max_in_memory: usize) -> Result<Self> {
        let dir = data_dir.join("alerts");
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("alerts.jsonl");
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };

        let mut kept: VecDeque<Alert> = VecDeque::new();
        let mut next_id = 1;
        let mut valid_len = 0u64;
        if path.exists() {
            let reader = BufReader::new(File::open(&path).map_err(io)?);
            for line in reader.split(b'\n') {
                let line = line.map_err(io)?;
                let Ok(record) = serde_json::from_slice::<Record>(&line) else {
                    // A torn tail from a crash mid-write; everything before it is intact.
                    tracing::warn!(path = %path.display(), "alert log ends in a torn record; cut");
                    break;
                };
                valid_len += line.len() as u64 + 1;
                match record {
                    Record::Alert(alert) => {
                        next_id = next_id.max(alert.alert_id + 1);
                        kept.push_back(alert);
                        if kept.len() > max_in_memory.max(1) {
                            kept.pop_front();
                        }
                    }
                    Record::Ack(ack) => {
                        if let Some(alert) = find_mut(&mut kept, ack.alert_id) {
                            alert.acknowledged = true;
                        }
                    }
                }
            }
        }

        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        file.set_len(valid_len).map_err(io)?;
        let (latest, _) = watch::channel(next_id - 1);
        Ok(Self {
            path: Arc::new(path),
            state: Arc::new(Mutex::new(LogState {
                file,
                kept,
                next_id,
            })),
            latest,
            max_in_memory: max_in_memory.max(1),
        })
    }

    /// Gives each alert its id, appends them durably (one fsync), then publishes them.
    pub fn append(&self, alerts: Vec<NewAlert>) -> Result<Vec<Alert>> {
        if alerts.is_empty() {
            return Ok(Vec::new());
        }
        let mut state = self.state.lock();
        let mut text = Vec::new();
        let mut raised = Vec::with_capacity(alerts.len());
        for (offset, alert) in alerts.into_iter().enumerate() {
            let alert = Alert {
                alert_id: state.next_id + offset as u64,
                device_id: alert.device_id,
                device_class: alert.device_class,
                raised_at_ms: alert.raised_at_ms,
                detector: alert.detector,
                severity: alert.severity,
                score: alert.score,
                summary: alert.summary,
                evidence: alert.evidence,
                action: alert.action,
                acknowledged: false,
            };
            write_record(&mut text, &Record::Alert(alert.clone()), &self.path)?;
            raised.push(alert);
        }
        self.write_durably(&mut state.file, &text)?;

        state.next_id += raised.len() as u64;
        for alert in &raised {
            state.kept.push_back(alert.clone());
        }
        while state.kept.len() > self.max_in_memory {
            state.kept.pop_front();
        }
        let latest = state.next_id - 1;
        drop(state);
        self.latest.send_replace(latest);
        Ok(raised)
    }

    /// Marks an alert acknowledged, durably. Returns it, or `None` for an unknown id.
    pub fn acknowledge(&self, alert_id: u64, note: &str, at_ms: i64) -> Result<Option<Alert>> {
        let mut state = self.state.lock();
        let Some(alert) = find_mut(&mut state.kept, alert_id) else {
            return Ok(None);
        };
        alert.acknowledged = true;
        let alert = alert.clone();

        let mut text = Vec::new();
        let ack = Acknowledgement {
            alert_id,
            at_ms,
            note: note.chars().take(1_000).collect(),
        };
        write_record(&mut text, &Record::Ack(ack), &self.path)?;
        self.write_durably(&mut state.file, &text)?;
        Ok(Some(alert))
    }

    /// Kept alerts with an id above `after_id`, at most `limit` of them, oldest first.
    pub fn after(&self, after_id: u64, limit: usize) -> Vec<Alert> {
        let state = self.state.lock();
        let start = state
            .kept
            .partition_point(|alert| alert.alert_id <= after_id);
        state.kept.iter().skip(start).take(limit).cloned().collect()
    }

    /// Every kept alert, oldest first (the SQL table).
    pub fn all(&self) -> Vec<Alert> {
        self.state.lock().kept.iter().cloned().collect()
    }

    /// The id of the newest alert (0 when none), changing whenever alerts are appended.
    pub fn latest(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    fn write_durably(&self, file: &mut File, text: &[u8]) -> Result<()> {
        let io = |source| Error::Io {
            path: self.path.to_path_buf(),
            source,
        };
        file.write_all(text).map_err(io)?;
        file.sync_data().map_err(io)
    }
}

fn write_record(text: &mut Vec<u8>, record: &Record, path: &Path) -> Result<()> {
    serde_json::to_writer(&mut *text, record).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source: source.into(),
    })?;
    text.push(b'\n');
    Ok(())
}

fn find_mut(kept: &mut VecDeque<Alert>, alert_id: u64) -> Option<&mut Alert> {
    let index = kept.partition_point(|alert| alert.alert_id < alert_id);
    kept.get_mut(index)
        .filter(|alert| alert.alert_id == alert_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(device: &str) -> NewAlert {
        NewAlert {
            device_id: device.to_owned(),
            device_class: "pulse_oximeter".to_owned(),
            raised_at_ms: 1,
            detector: "rule.bad_signature".to_owned(),
            severity: Severity::Critical,
            score: 0.9,
            summary: "forged signature".to_owned(),
            evidence: vec![Evidence {
                feature: "bad_signatures".to_owned(),
                observed: 1.0,
                expected: 0.0,
                deviation: 1.0,
            }],
            action: Action::Quarantined,
        }
    }

    #[test]
    fn alerts_and_acknowledgements_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = AlertLog::open(dir.path(), 100).unwrap();
        let raised = log.append(vec![sample("a"), sample("b")]).unwrap();
        assert_eq!(raised[0].alert_id, 1);
        assert_eq!(raised[1].alert_id, 2);
        log.acknowledge(1, "seen", 5).unwrap().unwrap();
        drop(log);

        let log = AlertLog::open(dir.path(), 100).unwrap();
        let all = log.all();
        assert_eq!(all.len(), 2);
        assert!(all[0].acknowledged);
        assert!(!all[1].acknowledged);
        assert_eq!(log.append(vec![sample("c")]).unwrap()[0].alert_id, 3);
        assert_eq!(log.after(1, 10).len(), 2);
    }

    #[test]
    fn a_torn_tail_is_cut_and_earlier_alerts_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = AlertLog::open(dir.path(), 100).unwrap();
        log.append(vec![sample("a")]).unwrap();
        drop(log);
        let path = dir.path().join("alerts/alerts.jsonl");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"alert\": {\"alert_id\": 2, \"dev")
            .unwrap();
        drop(file);

        let log = AlertLog::open(dir.path(), 100).unwrap();
        assert_eq!(log.all().len(), 1);
        assert_eq!(log.append(vec![sample("b")]).unwrap()[0].alert_id, 2);
        drop(log);
        assert_eq!(AlertLog::open(dir.path(), 100).unwrap().all().len(), 2);
    }
}
