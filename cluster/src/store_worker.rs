//! A store worker: consumes the readings topic by partition, in the store workers' consumer
//! group, into Parquet files in the shared tables directory.
//!
//! # Invariants
//!
//! - Exactly once: a partition's readings go into files named after the offset range they
//!   cover, `p<partition>-<first>-<last>.parquet`, and the `readings` file of a range is its
//!   commit point (written, even empty, after the range's `rejections` file). On taking a
//!   partition, a worker resumes after the highest `last` among the partition's readings
//!   files, whatever offset the group committed: a crash between a file and its offset
//!   commit re-reads records already stored, and they are skipped. A `rejections` file
//!   without its `readings` file (a crash between the two) is deleted, and its range read
//!   again.
//! - Offsets are committed only after the file holding their records is durable.
//! - Per device, the highest stored seq is kept (rebuilt from the partition's files when a
//!   worker takes it); a reading at or below it is a device's re-send through another
//!   gateway, and is dropped and counted, not stored twice.
//! - A partition taken away (rebalance) is flushed first when possible; anything unflushed is
//!   dropped uncommitted, and its next owner reads it again.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Array, StringArray, UInt64Array};
use parking_lot::Mutex;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use vigil_store::shared::write_parquet_file;
use vigil_store::{AcceptedReading, Rejection, WalEntry, readings_batch, rejections_batch};

use crate::metrics::ClusterMetrics;
use crate::{ClusterConfig, Error, Result, StageThread, Topics, group_member_config, kafka};

/// What a worker holds for one partition it owns.
#[derive(Debug, Default)]
struct PartitionState {
    /// First offset not yet in a file: where the next file's range starts.
    next_offset: i64,
    /// Last offset consumed (buffered, or skipped as a duplicate or undecodable).
    last_consumed: Option<i64>,
    readings: Vec<AcceptedReading>,
    rejections: Vec<Rejection>,
    /// When the oldest buffered record arrived.
    oldest: Option<Instant>,
    /// Highest stored or buffered seq per device of this partition.
    highest_seq: HashMap<Arc<str>, u64>,
    /// No flush before this (after a failed one).
    retry_after: Option<Instant>,
}

impl PartitionState {
    fn buffered(&self) -> usize {
        self.readings.len() + self.rejections.len()
    }
}

type Partitions = Arc<Mutex<HashMap<i32, PartitionState>>>;

struct WorkerContext {
    partitions: Partitions,
    shared_dir: PathBuf,
    topic: String,
    metrics: ClusterMetrics,
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let mut partitions = self.partitions.lock();
        for element in list.elements_for_topic(&self.topic) {
            let partition = element.partition();
            if let Some(mut state) = partitions.remove(&partition) {
                // Still ours until this callback returns: hand over as little as possible.
                if let Err(error) = flush(
                    &mut state,
                    partition,
                    &self.shared_dir,
                    consumer,
                    &self.topic,
                    &self.metrics,
                ) {
                    tracing::warn!(partition, %error, "partition handed over unflushed");
                }
            }
        }
        self.metrics.partitions_owned.set(partitions.len() as i64);
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(list) = rebalance else {
            return;
        };
        let mut partitions = self.partitions.lock();
        for element in list.elements_for_topic(&self.topic) {
            let partition = element.partition();
            match load_partition(&self.shared_dir, partition) {
                Ok(state) => {
                    tracing::info!(
                        partition,
                        resume_at = state.next_offset,
                        devices = state.highest_seq.len(),
                        "partition taken"
                    );
                    partitions.insert(partition, state);
                }
                Err(error) => {
                    // Without its files' state the partition cannot be stored exactly once:
                    // leave it unowned here; its records wait in Kafka.
                    tracing::error!(partition, %error, "cannot take a partition");
                }
            }
        }
        self.metrics.partitions_owned.set(partitions.len() as i64);
    }
}

/// A running store worker.
#[derive(Debug)]
pub struct StoreWorker {
    thread: StageThread,
}

impl StoreWorker {
    pub fn start(config: &ClusterConfig, metrics: ClusterMetrics) -> Result<Self> {
        let topics = Topics::new(&config.topic_prefix);
        let shared_dir = config.shared_dir.clone();
        for table in ["readings", "rejections"] {
            let dir = shared_dir.join(table);
            std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir, source })?;
        }
        let partitions: Partitions = Arc::default();
        let context = WorkerContext {
            partitions: partitions.clone(),
            shared_dir: shared_dir.clone(),
            topic: topics.readings.clone(),
            metrics: metrics.clone(),
        };
        let consumer: BaseConsumer<WorkerContext> =
            group_member_config(config, &topics.store_group)
                .set("enable.auto.commit", "false")
                .create_with_context(context)
                .map_err(kafka("store consumer"))?;
        consumer
            .subscribe(&[&topics.readings])
            .map_err(kafka("subscribe to readings"))?;

        let flush_interval = Duration::from_millis(config.flush_interval_ms.max(1));
        let flush_max = config.flush_max_readings.max(1);
        let thread = StageThread::spawn("store-worker", move |stop| {
            let settings = LoopSettings {
                partitions,
                shared_dir,
                topic: topics.readings,
                flush_interval,
                flush_max,
                metrics,
            };
            consume_loop(&consumer, &settings, stop);
            // Store what is buffered before leaving the group.
            let mut partitions = settings.partitions.lock();
            for (partition, state) in partitions.iter_mut() {
                if let Err(error) = flush(
                    state,
                    *partition,
                    &settings.shared_dir,
                    &consumer,
                    &settings.topic,
                    &settings.metrics,
                ) {
                    tracing::warn!(partition, %error, "not flushed at stop");
                }
            }
            partitions.clear();
            drop(partitions);
            consumer.unsubscribe();
        })?;
        Ok(Self { thread })
    }

    /// Flushes what is buffered, commits, and leaves the group.
    pub fn stop(self) {
        self.thread.stop();
    }
}

struct LoopSettings {
    partitions: Partitions,
    shared_dir: PathBuf,
    topic: String,
    flush_interval: Duration,
    flush_max: usize,
    metrics: ClusterMetrics,
}

fn consume_loop(
    consumer: &BaseConsumer<WorkerContext>,
    settings: &LoopSettings,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Acquire) {
        // The lock is never held across `poll`: rebalance callbacks run inside it.
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(message)) => {
                let mut partitions = settings.partitions.lock();
                if let Some(state) = partitions.get_mut(&message.partition()) {
                    take(
                        state,
                        message.offset(),
                        message.payload(),
                        &settings.metrics,
                    );
                }
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "readings topic");
                std::thread::sleep(Duration::from_millis(100));
            }
            None => {}
        }
        let mut partitions = settings.partitions.lock();
        for (partition, state) in partitions.iter_mut() {
            let due = state
                .last_consumed
                .is_some_and(|last| last >= state.next_offset)
                && (state.buffered() >= settings.flush_max
                    || state
                        .oldest
                        .is_some_and(|oldest| oldest.elapsed() >= settings.flush_interval))
                && state
                    .retry_after
                    .is_none_or(|after| Instant::now() >= after);
            if !due {
                continue;
            }
            if let Err(error) = flush(
                state,
                *partition,
                &settings.shared_dir,
                consumer,
                &settings.topic,
                &settings.metrics,
            ) {
                tracing::error!(partition, %error, "cannot write readings to Parquet; retrying");
                state.retry_after = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }
}

/// Buffers one record of an owned partition.
fn take(state: &mut PartitionState, offset: i64, payload: Option<&[u8]>, metrics: &ClusterMetrics) {
    if offset < state.next_offset {
        // Already in a file (a crash came between the file and its offset commit).
        return;
    }
    state.last_consumed = Some(offset);
    state.oldest.get_or_insert_with(Instant::now);
    let entry = payload.map(vigil_wal_record::parse_record);
    match entry {
        Some(Ok((WalEntry::Reading(reading), _))) => {
            let highest = state.highest_seq.get(&reading.device_id).copied();
            if highest.is_some_and(|highest| reading.seq <= highest) {
                metrics.duplicates_dropped.inc();
                return;
            }
            state
                .highest_seq
                .insert(reading.device_id.clone(), reading.seq);
            state.readings.push(reading);
        }
        Some(Ok((WalEntry::Rejection(rejection), _))) => state.rejections.push(rejection),
        Some(Ok(_)) | Some(Err(_)) | None => {
            metrics.undecodable_records.inc();
            tracing::warn!(offset, "undecodable record on the readings topic skipped");
        }
    }
}

/// Writes the partition's buffered range to Parquet and commits its offsets.
fn flush(
    state: &mut PartitionState,
    partition: i32,
    shared_dir: &Path,
    consumer: &BaseConsumer<WorkerContext>,
    topic: &str,
    metrics: &ClusterMetrics,
) -> Result<()> {
    let Some(last) = state
        .last_consumed
        .filter(|last| *last >= state.next_offset)
    else {
        return Ok(());
    };
    let first = state.next_offset;
    let name = file_name(partition, first, last);
    if !state.rejections.is_empty() {
        let batch = rejections_batch(&state.rejections).map_err(vigil_store::StoreError::from)?;
        write_parquet_file(&shared_dir.join("rejections"), &name, &batch)?;
    }
    let batch = readings_batch(&state.readings).map_err(vigil_store::StoreError::from)?;
    write_parquet_file(&shared_dir.join("readings"), &name, &batch)?;

    metrics.files_written.inc();
    metrics.readings_stored.inc_by(state.readings.len() as u64);
    metrics
        .rejections_stored
        .inc_by(state.rejections.len() as u64);
    state.next_offset = last + 1;
    state.readings.clear();
    state.rejections.clear();
    state.oldest = None;
    state.retry_after = None;

    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(topic, partition, Offset::Offset(last + 1))
        .map_err(kafka("offsets"))?;
    // A lost commit only means re-reading records the files already hold.
    if let Err(error) = consumer.commit(&offsets, CommitMode::Async) {
        tracing::warn!(partition, %error, "offset commit failed; the files stay authoritative");
    }
    Ok(())
}

fn file_name(partition: i32, first: i64, last: i64) -> String {
    format!("p{partition:05}-{first:020}-{last:020}.parquet")
}

/// The (first, last) offsets of a file of `partition`, from its name.
fn parse_file_name(name: &str, partition: i32) -> Option<(i64, i64)> {
    let rest = name
        .strip_prefix(&format!("p{partition:05}-"))?
        .strip_suffix(".parquet")?;
    let (first, last) = rest.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// A partition's state from its files: where to resume, and each device's highest seq.
/// Deletes what a crash left half done: temporary files, and `rejections` files whose
/// `readings` file (the range's commit point) was never written.
fn load_partition(shared_dir: &Path, partition: i32) -> Result<PartitionState> {
    let readings_dir = shared_dir.join("readings");
    let mut state = PartitionState::default();
    let mut committed = Vec::new();
    for (path, name) in list_dir(&readings_dir)? {
        if name.starts_with(&format!("p{partition:05}-")) && name.ends_with(".tmp") {
            remove(&path)?;
        } else if let Some((_, last)) = parse_file_name(&name, partition) {
            state.next_offset = state.next_offset.max(last + 1);
            committed.push(path);
        }
    }
    for (path, name) in list_dir(&shared_dir.join("rejections"))? {
        let orphan = if name.starts_with(&format!("p{partition:05}-")) && name.ends_with(".tmp") {
            true
        } else {
            parse_file_name(&name, partition).is_some_and(|(first, _)| first >= state.next_offset)
        };
        if orphan {
            remove(&path)?;
        }
    }
    for path in committed {
        highest_seqs(&path, &mut state.highest_seq)?;
    }
    Ok(state)
}

fn list_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    Ok(entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            Some((entry.path(), name))
        })
        .collect())
}

fn remove(path: &Path) -> Result<()> {
    tracing::info!(path = %path.display(), "removing a file left by an interrupted write");
    std::fs::remove_file(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// Raises `highest` to each device's highest seq in one readings file.
fn highest_seqs(path: &Path, highest: &mut HashMap<Arc<str>, u64>) -> Result<()> {
    let parquet_error = |source: parquet::errors::ParquetError| {
        Error::Store(vigil_store::StoreError::Parquet {
            path: path.to_owned(),
            source,
        })
    };
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_error)?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [0, 1]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(parquet_error)?;
    for batch in reader {
        let batch = batch.map_err(vigil_store::StoreError::from)?;
        let (Some(devices), Some(seqs)) = (
            batch.column(0).as_any().downcast_ref::<StringArray>(),
            batch.column(1).as_any().downcast_ref::<UInt64Array>(),
        ) else {
            continue;
        };
        for row in 0..batch.num_rows() {
            if devices.is_null(row) {
                continue;
            }
            let device = devices.value(row);
            let seq = seqs.value(row);
            match highest.get_mut(device) {
                Some(kept) => *kept = (*kept).max(seq),
                None => {
                    highest.insert(Arc::from(device), seq);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_sort_by_offset() {
        let name = file_name(3, 10, 99);
        assert_eq!(parse_file_name(&name, 3), Some((10, 99)));
        assert_eq!(parse_file_name(&name, 4), None);
        assert!(file_name(3, 100, 200) > file_name(3, 10, 99));
        assert_eq!(parse_file_name("p00003-1-2.parquet.tmp", 3), None);
    }

    fn reading(device: &str, seq: u64) -> AcceptedReading {
        AcceptedReading {
            device_id: Arc::from(device),
            seq,
            sampled_at_ms: 1_714_558_500_000,
            received_at_ms: 1_714_558_500_000,
            measurements: vec![("heart_rate".to_owned(), 70.0)],
            signature_digest: [seq as u8; 16],
        }
    }

    #[test]
    fn a_partition_resumes_after_its_last_file_and_forgets_half_written_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path();
        let batch = readings_batch(&[reading("a", 4), reading("b", 9)]).unwrap();
        write_parquet_file(&shared.join("readings"), &file_name(2, 0, 7), &batch).unwrap();
        // A rejections file whose readings file was never written, and a torn temporary.
        let rejection = Rejection {
            device_id: "a".to_owned(),
            received_at_ms: 1,
            reason: "bad_signature".to_owned(),
            detail: String::new(),
            peer: "127.0.0.1".to_owned(),
        };
        let rejections = rejections_batch(&[rejection]).unwrap();
        write_parquet_file(&shared.join("rejections"), &file_name(2, 8, 9), &rejections).unwrap();
        std::fs::write(
            shared.join("readings").join("p00002-8-9.parquet.tmp"),
            b"torn",
        )
        .unwrap();
        // Another partition's files are not this one's business.
        write_parquet_file(&shared.join("readings"), &file_name(5, 0, 99), &batch).unwrap();

        let state = load_partition(shared, 2).unwrap();
        assert_eq!(state.next_offset, 8);
        assert_eq!(state.highest_seq.get("a"), Some(&4));
        assert_eq!(state.highest_seq.get("b"), Some(&9));
        assert!(!shared.join("rejections").join(file_name(2, 8, 9)).exists());
        assert!(
            !shared
                .join("readings")
                .join("p00002-8-9.parquet.tmp")
                .exists()
        );
        assert!(shared.join("readings").join(file_name(5, 0, 99)).exists());
    }

    #[test]
    fn records_already_in_files_and_re_sent_seqs_are_not_stored_again() {
        let metrics = ClusterMetrics::default();
        let mut state = PartitionState {
            next_offset: 10,
            ..PartitionState::default()
        };
        state.highest_seq.insert(Arc::from("a"), 5);
        let encode = |reading: AcceptedReading| {
            let mut buffer = Vec::new();
            vigil_wal_record::encode_entry(&mut buffer, &WalEntry::Reading(reading));
            buffer
        };
        take(&mut state, 9, Some(&encode(reading("a", 6))), &metrics);
        assert!(state.readings.is_empty(), "offset 9 is in a file already");
        take(&mut state, 10, Some(&encode(reading("a", 5))), &metrics);
        take(&mut state, 11, Some(&encode(reading("a", 6))), &metrics);
        take(&mut state, 12, Some(&encode(reading("a", 6))), &metrics);
        take(&mut state, 13, Some(b"not a record"), &metrics);
        assert_eq!(state.readings.len(), 1);
        assert_eq!(state.last_consumed, Some(13));
        assert_eq!(metrics.duplicates_dropped.get(), 2);
        assert_eq!(metrics.undecodable_records.get(), 1);
    }
}
