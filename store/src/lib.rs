//! vigil-store: durable storage and SQL for vigil.
//!
//! In: verified readings and rejections from the ingest verifier, submitted through a
//! [`WalSender`]. Out: durability completions (the PUBACK trigger), the replay-guard state
//! recovered at start, and a DataFusion session / Flight SQL service over the tables
//! `readings`, `rejections` and `devices`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use crossbeam_channel::Sender;
use datafusion::dataframe::DataFrame;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{SessionConfig, SessionContext};
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;

mod error;
mod flight;
mod flush;
mod guard;
mod metrics;
pub mod shared;
mod tables;
pub mod wal;
#[cfg(test)]
mod wal_model;
mod writer;

pub use error::{Result, StoreError};
pub use flight::flight_sql_service;
pub use flush::parquet_properties;
pub use tables::{readings_batch, rejections_batch, truncate_rejection};

use guard::{GuardState, Snapshot};
use metrics::Metrics;
use tables::{BatchSource, Catalog, SourceTable, StoreTable, TableKind};
use writer::{Command, Writer};

/// How many recent (seq, signature digest) pairs the replay guard keeps per device.
pub const RECENT_DIGESTS: usize = 64;

/// Storage configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct StoreConfig {
    /// Data directory: WAL under `wal/`, Parquet under `tables/`.
    pub data_dir: PathBuf,
    /// Roll to a new WAL segment file past this size, in bytes.
    pub wal_segment_bytes: u64,
    /// Most entries in one group commit (entries).
    pub wal_max_group_entries: usize,
    /// Bound of the submission channel, in entries (back-pressure beyond it).
    pub queue_capacity: usize,
    /// Flush the hot tier to Parquet when its oldest row is this old, in milliseconds.
    pub flush_interval_ms: u64,
    /// ... or when it holds this many rows (rows).
    pub flush_max_rows: usize,
    /// In a cluster, the tables directory that store workers write Parquet files into;
    /// `readings` and `rejections` then also read every file under it.
    pub shared_dir: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./vigil-data"),
            wal_segment_bytes: 64 * 1024 * 1024,
            wal_max_group_entries: 4096,
            queue_capacity: 16384,
            flush_interval_ms: 60_000,
            flush_max_rows: 500_000,
            shared_dir: None,
        }
    }
}

pub use vigil_wal_record::{AcceptedReading, Rejection, WalEntry};

/// Fired once the entry is durable (or failed).
pub type Completion = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// Submission handle of the WAL writer; cheap to clone.
#[derive(Clone)]
pub struct WalSender {
    commands: Sender<Command>,
    guard: Arc<Mutex<GuardState>>,
    failed_groups: Arc<AtomicU64>,
}

impl std::fmt::Debug for WalSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalSender")
            .field("queue_depth", &self.queue_depth())
            .finish()
    }
}

impl WalSender {
    /// Blocking submit from a std thread (the verifier's worker threads); blocks while the
    /// queue is full (back-pressure). Entries keep their order; each completion fires once its
    /// entry is durable (or failed).
    ///
    /// # Errors
    ///
    /// [`StoreError::Shutdown`] once the writer has stopped; completions of entries not
    /// queued are dropped (their receivers see a closed channel).
    pub fn submit_batch(&self, entries: Vec<(WalEntry, Option<Completion>)>) -> Result<()> {
        for (entry, completion) in entries {
            self.commands
                .send(Command::Entry(entry, completion))
                .map_err(|_| StoreError::Shutdown)?;
        }
        Ok(())
    }

    /// Entries waiting in the submission queue.
    pub fn queue_depth(&self) -> usize {
        self.commands.len()
    }

    /// Group commits that failed since start. A submitter that keeps its own view of what is
    /// stored (the verifier's replay guard) re-reads [`WalSender::durable_state`] when this
    /// changes, so that a reading whose write failed can be sent again.
    pub fn failed_groups(&self) -> u64 {
        self.failed_groups.load(Ordering::Acquire)
    }

    /// Replay-guard state of the device's durable readings.
    pub fn durable_state(&self, device_id: &str) -> Option<SeqState> {
        self.guard.lock().devices.get(device_id).cloned()
    }
}

/// Replay-guard state of one device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqState {
    /// Highest stored seq.
    pub highest_seq: u64,
    /// Last [`RECENT_DIGESTS`] (seq, signature digest) of stored readings, oldest first.
    pub recent: VecDeque<(u64, [u8; 16])>,
}

/// What [`Store::open`] recovered.
#[derive(Debug, Clone, Default)]
pub struct RecoveredState {
    /// Replay-guard state per device.
    pub devices: HashMap<String, SeqState>,
    /// WAL entries replayed.
    pub replayed_entries: u64,
    /// Readings among them.
    pub replayed_readings: u64,
    /// `devices` does not cover every stored reading: the readings are stored elsewhere (a
    /// cluster gateway), so a device's first seq seen is taken as its baseline rather than
    /// measured against the largest allowed jump.
    pub partial: bool,
}

/// State shared by the store handle, the writer, the flusher and the table providers.
pub(crate) struct Shared {
    pub(crate) data_dir: PathBuf,
    pub(crate) wal_dir: PathBuf,
    pub(crate) tables_dir: PathBuf,
    pub(crate) flush_interval: Duration,
    pub(crate) flush_max_rows: usize,
    pub(crate) shared_dir: Option<PathBuf>,
    pub(crate) catalog: Arc<RwLock<Catalog>>,
    /// Live replay-guard state of the durable readings (updated by the writer).
    pub(crate) guard: Arc<Mutex<GuardState>>,
    /// Failed group commits since start (counted by the writer).
    pub(crate) failed_groups: Arc<AtomicU64>,
    pub(crate) metrics: Metrics,
    pub(crate) commands: Sender<Command>,
    /// Serialises flushes; holds what the next snapshot must record.
    pub(crate) flush_state: Mutex<FlushState>,
    devices_source: RwLock<Option<BatchSource>>,
    alerts_source: RwLock<Option<BatchSource>>,
    threads: Mutex<Option<Threads>>,
}

/// Flush bookkeeping that outlives one flush.
#[derive(Debug, Default)]
pub(crate) struct FlushState {
    pub(crate) aborted_flushes: BTreeSet<u64>,
}

struct Threads {
    writer: JoinHandle<()>,
    flusher: JoinHandle<()>,
    stop_flusher: Sender<()>,
}

/// The store: WAL, hot tier, Parquet files and SQL. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("data_dir", &self.shared.data_dir)
            .finish_non_exhaustive()
    }
}

fn check_config(config: &StoreConfig) -> Result<()> {
    let positive = [
        ("wal_segment_bytes", config.wal_segment_bytes == 0),
        ("wal_max_group_entries", config.wal_max_group_entries == 0),
        ("queue_capacity", config.queue_capacity == 0),
        ("flush_interval_ms", config.flush_interval_ms == 0),
        ("flush_max_rows", config.flush_max_rows == 0),
    ];
    for (setting, is_zero) in positive {
        if is_zero {
            return Err(StoreError::Config {
                setting,
                reason: "must be above zero".to_owned(),
            });
        }
    }
    Ok(())
}

fn create_dir(path: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(StoreError::io("create directory", path))
}

/// Rows replayed from the WAL, gathered into batches of this many entries.
const REPLAY_CHUNK_ENTRIES: usize = 16_384;

/// Accumulates replayed entries and moves them into the hot tier in chunks.
struct ReplayLoader<'a> {
    catalog: &'a mut Catalog,
    readings: Vec<AcceptedReading>,
    rejections: Vec<Rejection>,
}

impl ReplayLoader<'_> {
    fn push(&mut self, entry: WalEntry) -> Result<()> {
        match entry {
            WalEntry::Reading(reading) => self.readings.push(reading),
            WalEntry::Rejection(rejection) => self.rejections.push(rejection),
            WalEntry::Barrier | WalEntry::Resend { .. } => {}
        }
        if self.readings.len() + self.rejections.len() >= REPLAY_CHUNK_ENTRIES {
            self.finish_chunk()?;
        }
        Ok(())
    }

    fn finish_chunk(&mut self) -> Result<()> {
        let readings = tables::readings_batch(&self.readings)?;
        let rejections = tables::rejections_batch(&self.rejections)?;
        self.catalog.append(TableKind::Readings, readings)?;
        self.catalog.append(TableKind::Rejections, rejections)?;
        self.readings.clear();
        self.rejections.clear();
        Ok(())
    }
}

/// Readings that were already durable when their device was quarantined, and so were kept:
/// those received in the ten minutes before a quarantine alert (the detectors' horizon), and
/// those still in flight when it was raised (the verifier refuses everything after it). Each
/// row names the alert, so an analyst can tell kept readings from trusted ones.
const FLAGGED_READINGS_VIEW: &str = "CREATE VIEW flagged_readings AS \
    SELECT r.device_id, r.seq, r.sampled_at, r.received_at, r.metric, r.value, \
           a.alert_id, a.detector, a.raised_at AS quarantined_at \
    FROM readings r JOIN alerts a ON r.device_id = a.device_id \
    WHERE a.action = 'quarantined' \
      AND r.received_at >= a.raised_at - INTERVAL '10 minutes' \
      AND r.received_at <= a.raised_at + INTERVAL '5 seconds'";

impl Store {
    /// Opens the data dir, replays the WAL into the hot tier, restores the replay-guard state
    /// (durable snapshot + WAL records after it), starts the writer and flusher threads.
    ///
    /// # Errors
    ///
    /// An unusable setting, an I/O error (with its path), a corrupt WAL record outside the
    /// tail of the last segment, or a corrupt snapshot.
    pub fn open(config: StoreConfig) -> Result<(Store, RecoveredState)> {
        check_config(&config)?;
        let data_dir = config.data_dir.clone();
        let wal_dir = data_dir.join("wal");
        let tables_dir = data_dir.join("tables");
        for dir in [&data_dir, &wal_dir, &tables_dir] {
            create_dir(dir)?;
        }

        // Committed state first: the snapshot says which files and segments are settled.
        let snapshot = Snapshot::load(&data_dir)?;
        let mut catalog = Catalog::default();
        for (kind, file) in flush::load_committed_files(&tables_dir, &snapshot)? {
            catalog.table_mut(kind).files.push(file);
        }

        // Replay: every reading feeds the guard; only unflushed segments feed the hot tier.
        let mut guard = snapshot.guard.clone();
        let mut replayed_readings = 0u64;
        let mut loader = ReplayLoader {
            catalog: &mut catalog,
            readings: Vec::new(),
            rejections: Vec::new(),
        };
        let mut load_error = None;
        let summary = wal::replay(&wal_dir, |segment, entry| {
            if let WalEntry::Reading(reading) = &entry {
                replayed_readings += 1;
                guard.apply(&reading.device_id, reading.seq, reading.signature_digest);
            }
            if segment >= snapshot.flushed_before_segment
                && load_error.is_none()
                && let Err(error) = loader.push(entry)
            {
                load_error = Some(error);
            }
        })?;
        if let Some(error) = load_error {
            return Err(error);
        }
        loader.finish_chunk()?;

        // A crash between snapshot and segment deletion leaves settled segments behind.
        flush::delete_segments_below(&wal_dir, snapshot.flushed_before_segment)?;

        let last_segment = summary.segments.last().map_or(0, |n| n + 1);
        let first_segment = last_segment.max(snapshot.flushed_before_segment);
        let segment = wal::SegmentWriter::create(&wal_dir, first_segment)?;

        let metrics = Metrics::default();
        metrics.hot_rows.set(catalog.hot_rows() as i64);
        let recovered = RecoveredState {
            devices: guard.devices.clone(),
            replayed_entries: summary.records,
            replayed_readings,
            partial: false,
        };
        tracing::info!(
            data_dir = %data_dir.display(),
            replayed_entries = summary.records,
            replayed_readings,
            devices = recovered.devices.len(),
            hot_rows = catalog.hot_rows(),
            segment = first_segment,
            "store opened"
        );

        let (commands_tx, commands_rx) = crossbeam_channel::bounded(config.queue_capacity);
        let (nudge_tx, nudge_rx) = crossbeam_channel::bounded(1);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared {
            data_dir,
            wal_dir,
            tables_dir,
            flush_interval: Duration::from_millis(config.flush_interval_ms),
            flush_max_rows: config.flush_max_rows,
            shared_dir: config.shared_dir.clone(),
            catalog: Arc::new(RwLock::new(catalog)),
            guard: Arc::new(Mutex::new(guard)),
            failed_groups: Arc::new(AtomicU64::new(0)),
            metrics: metrics.clone(),
            commands: commands_tx,
            flush_state: Mutex::new(FlushState {
                aborted_flushes: snapshot.aborted_flushes.clone(),
            }),
            devices_source: RwLock::new(None),
            alerts_source: RwLock::new(None),
            threads: Mutex::new(None),
        });

        let writer = Writer {
            segment,
            segment_bytes: config.wal_segment_bytes,
            max_group_entries: config.wal_max_group_entries,
            flush_max_rows: config.flush_max_rows,
            commands: commands_rx,
            catalog: shared.catalog.clone(),
            guard: shared.guard.clone(),
            failed_groups: shared.failed_groups.clone(),
            metrics,
            flush_nudge: nudge_tx,
        };
        let writer = std::thread::Builder::new()
            .name("vigil-wal-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(StoreError::io("spawn wal writer thread", &shared.wal_dir))?;

        let flusher_shared = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("vigil-flusher".to_owned())
            .spawn(move || run_flusher(&flusher_shared, &nudge_rx, &stop_rx))
            .map_err(StoreError::io("spawn flusher thread", &shared.tables_dir))?;

        *shared.threads.lock() = Some(Threads {
            writer,
            flusher,
            stop_flusher: stop_tx,
        });
        Ok((Store { shared }, recovered))
    }

    /// Submission handle of the WAL writer.
    pub fn wal_sender(&self) -> WalSender {
        WalSender {
            commands: self.shared.commands.clone(),
            guard: self.shared.guard.clone(),
            failed_groups: self.shared.failed_groups.clone(),
        }
    }

    /// Provider of the `devices` table (the registry lives in ingest); called per query.
    pub fn set_devices_source(&self, source: Arc<dyn Fn() -> RecordBatch + Send + Sync>) {
        *self.shared.devices_source.write() = Some(source);
    }

    /// Provider of the `alerts` table (the alert log lives in detect); called per query.
    pub fn set_alerts_source(&self, source: Arc<dyn Fn() -> RecordBatch + Send + Sync>) {
        *self.shared.alerts_source.write() = Some(source);
    }

    /// Schema of the `alerts` table: `alert_id` UInt64, `device_id` Utf8, `raised_at`
    /// Timestamp(ms, "UTC"), `detector`, `severity` Utf8, `score` Float64, `summary`,
    /// `action`, `evidence` (JSON) Utf8, `acknowledged` Boolean, `device_class` Utf8.
    pub fn alerts_schema() -> SchemaRef {
        tables::alerts_schema()
    }

    /// Schema of the `devices` table: `device_id` Utf8, `class` Utf8, `status` Utf8,
    /// `enrolled_at` and `status_changed_at` Timestamp(ms, "UTC"), `risk` Float64.
    pub fn devices_schema() -> SchemaRef {
        tables::devices_schema()
    }

    /// A DataFusion session over hot tier + Parquet, tables `readings`, `rejections`,
    /// `devices`, `alerts`, and the view `flagged_readings`. The session allows every statement DataFusion knows (including DDL that
    /// reads or writes server files); give remote users [`Store::sql`] or Flight SQL instead.
    pub async fn session(&self) -> Result<SessionContext> {
        let config = SessionConfig::new().with_information_schema(true);
        let context = SessionContext::new_with_config(config);
        for kind in TableKind::ALL {
            let table = StoreTable::new(
                kind,
                self.shared.catalog.clone(),
                self.shared.shared_dir.clone(),
            );
            context.register_table(kind.name(), Arc::new(table))?;
        }
        let devices = SourceTable::new(
            tables::devices_schema(),
            self.shared.devices_source.read().clone(),
        );
        context.register_table("devices", Arc::new(devices))?;
        let alerts = SourceTable::new(
            tables::alerts_schema(),
            self.shared.alerts_source.read().clone(),
        );
        context.register_table("alerts", Arc::new(alerts))?;
        context.sql(FLAGGED_READINGS_VIEW).await?;
        Ok(context)
    }

    /// Plans a read-only query (no DDL, DML or `SET`: a query must not touch server files).
    pub(crate) async fn plan_query(&self, query: &str) -> Result<DataFrame> {
        let context = self.session().await?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        Ok(context.sql_with_options(query, options).await?)
    }

    /// Runs one read-only query and collects its result.
    pub async fn sql(&self, query: &str) -> Result<Vec<RecordBatch>> {
        Ok(self.plan_query(query).await?.collect().await?)
    }

    /// Writes the whole hot tier to Parquet now and deletes covered WAL segments. Blocks.
    pub fn flush_now(&self) -> Result<()> {
        flush::flush(&self.shared)
    }

    /// Registers the `vigil_store_*` metrics.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.shared.metrics.register(registry);
    }

    /// Drains the queue, fsyncs, stops the threads (flushes nothing to Parquet: the WAL covers
    /// it). Later submissions fail with [`StoreError::Shutdown`]. Idempotent.
    pub fn shutdown(&self) {
        let Some(threads) = self.shared.threads.lock().take() else {
            return;
        };

        // The flusher first: it may be waiting for a roll from the writer.
        let _ = threads.stop_flusher.send(());
        if threads.flusher.join().is_err() {
            tracing::error!("flusher thread panicked");
        }

        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        if self
            .shared
            .commands
            .send(Command::Shutdown(reply_tx))
            .is_ok()
        {
            // An error means the writer already stopped.
            let _ = reply_rx.recv();
        }
        if threads.writer.join().is_err() {
            tracing::error!("wal writer thread panicked");
        }
        tracing::info!(data_dir = %self.shared.data_dir.display(), "store shut down");
    }
}

/// Flushes when the oldest hot row is `flush_interval` old or the hot tier is full.
fn run_flusher(
    shared: &Shared,
    nudge: &crossbeam_channel::Receiver<()>,
    stop: &crossbeam_channel::Receiver<()>,
) {
    let tick = shared.flush_interval.min(Duration::from_secs(1));
    let mut retry_after: Option<Instant> = None;
    loop {
        crossbeam_channel::select! {
            recv(stop) -> _ => return,
            recv(nudge) -> _ => {},
            default(tick) => {},
        }

        let due = {
            let catalog = shared.catalog.read();
            let old = catalog
                .oldest_active
                .is_some_and(|t| t.elapsed() >= shared.flush_interval);
            let full = catalog.active_rows() >= shared.flush_max_rows;
            let left_over = catalog.readings.sealed.len() + catalog.rejections.sealed.len() > 0;
            old || full || left_over
        };
        if !due || retry_after.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        match flush::flush(shared) {
            Ok(()) => retry_after = None,
            Err(StoreError::Shutdown) => return,
            Err(error) => {
                tracing::error!(%error, "flush to parquet failed; the rows stay in memory and WAL");
                retry_after =
                    Some(Instant::now() + shared.flush_interval.min(Duration::from_secs(10)));
            }
        }
    }
}
