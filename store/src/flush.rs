//! Flushing the hot tier to Parquet, and the file layout under `tables/`.
//!
//! # Layout
//!
//! `tables/<table>/date=YYYY-MM-DD/hour=HH/<flush number, 16 digits>.parquet`, partitioned by
//! `received_at` (server clock, UTC). The flush number is the number of the WAL segment the
//! writer rolled to when the flush began, so it is unique and rises with every flush.
//!
//! # Steps (their order is what makes a crash at any point safe)
//!
//! 1. The writer rolls to segment `S` and seals the hot tier in the same step: every record
//!    of the segments below `S` is now in a sealed batch (or in an earlier committed file).
//! 2. The sealed rows are written to Parquet files numbered `S`: temporary name, fsync,
//!    rename, fsync of the directory.
//! 3. Under one catalog lock the files are listed and the sealed batches dropped: queries
//!    switch from the hot rows to the files in one step.
//! 4. The replay-guard snapshot is written with `flushed_before_segment = S`. This is the
//!    commit point: on open, files numbered above the committed value (or belonging to an
//!    aborted flush) are deleted, because their rows are still in the WAL.
//! 5. WAL segments below `S` are deleted.
//!
//! A failure in step 2 deletes that flush's files, records its number as aborted (persisted
//! by the next snapshot) and keeps the rows sealed in memory; the next flush writes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::{AsArray, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::TimestampMillisecondType;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::Shared;
use crate::error::{Result, StoreError};
use crate::guard::Snapshot;
use crate::tables::{ParquetFile, TableKind};
use crate::wal::{list_segments, segment_path, sync_dir};
use crate::writer::Command;

const MILLIS_PER_HOUR: i64 = 3_600_000;

/// Runs one flush (steps 1 to 5 above). Flushes are serialised.
pub(crate) fn flush(shared: &Shared) -> Result<()> {
    let mut state = shared.flush_state.lock();

    let flush_number = request_roll(shared)?;

    let sealed: Vec<(TableKind, Vec<RecordBatch>)> = {
        let catalog = shared.catalog.read();
        TableKind::ALL
            .iter()
            .map(|kind| (*kind, catalog.table(*kind).sealed.clone()))
            .collect()
    };
    let sealed_rows: usize = sealed
        .iter()
        .flat_map(|(_, b)| b.iter())
        .map(RecordBatch::num_rows)
        .sum();

    let mut written: Vec<(TableKind, ParquetFile)> = Vec::new();
    for (kind, batches) in &sealed {
        if let Err(error) = write_table(shared, *kind, batches, flush_number, &mut written) {
            state.aborted_flushes.insert(flush_number);
            for (_, file) in &written {
                if let Err(remove_error) = std::fs::remove_file(&file.path) {
                    tracing::warn!(
                        path = %file.path.display(),
                        error = %remove_error,
                        "could not delete a file of an aborted flush; it is ignored on restart"
                    );
                }
            }
            return Err(error);
        }
    }
    let file_count = written.len();

    {
        let mut catalog = shared.catalog.write();
        for kind in TableKind::ALL {
            catalog.table_mut(kind).sealed.clear();
        }
        for (kind, file) in written {
            catalog.table_mut(kind).files.push(file);
        }
        shared.metrics.hot_rows.set(catalog.hot_rows() as i64);
    }

    let snapshot = Snapshot {
        flushed_before_segment: flush_number,
        aborted_flushes: state.aborted_flushes.clone(),
        guard: shared.guard.lock().clone(),
    };
    snapshot.store(&shared.data_dir)?;

    let deleted = delete_segments_below(&shared.wal_dir, flush_number)?;
    tracing::info!(
        flush_number,
        rows = sealed_rows,
        files = file_count,
        deleted_segments = deleted,
        "flushed hot tier to parquet"
    );
    Ok(())
}

fn request_roll(shared: &Shared) -> Result<u64> {
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    shared
        .commands
        .send(Command::Roll(reply_tx))
        .map_err(|_| StoreError::Shutdown)?;
    reply_rx.recv().map_err(|_| StoreError::Shutdown)?
}

/// Deletes WAL segments numbered below `number`; returns how many.
pub(crate) fn delete_segments_below(wal_dir: &Path, number: u64) -> Result<usize> {
    let mut deleted = 0;
    for segment in list_segments(wal_dir)? {
        if segment >= number {
            break;
        }
        let path = segment_path(wal_dir, segment);
        std::fs::remove_file(&path).map_err(StoreError::io("delete WAL segment", &path))?;
        deleted += 1;
    }
    if deleted > 0 {
        sync_dir(wal_dir)?;
    }
    Ok(deleted)
}

/// Writes one table's sealed rows, one file per (date, hour) of `received_at`.
fn write_table(
    shared: &Shared,
    kind: TableKind,
    batches: &[RecordBatch],
    flush_number: u64,
    written: &mut Vec<(TableKind, ParquetFile)>,
) -> Result<()> {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Ok(());
    }
    let batch = concat_batches(&kind.schema(), batches)?;

    let received_at = batch
        .column(kind.received_at_column())
        .as_primitive::<TimestampMillisecondType>();
    let mut hours: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for (row, millis) in received_at.values().iter().enumerate() {
        hours
            .entry(millis.div_euclid(MILLIS_PER_HOUR))
            .or_default()
            .push(row as u32);
    }

    for (hour, rows) in hours {
        let part = if rows.len() == batch.num_rows() {
            batch.clone()
        } else {
            take_record_batch(&batch, &UInt32Array::from(rows))?
        };
        let dir = partition_dir(&shared.tables_dir, kind, hour);
        let file = write_parquet(&dir, &format!("{flush_number:016}.parquet"), &part)?;
        shared.metrics.parquet_files_written.inc();
        written.push((kind, file));
    }
    Ok(())
}

/// `tables/<table>/date=YYYY-MM-DD/hour=HH` for an hour counted from the Unix epoch.
pub(crate) fn partition_dir(tables_dir: &Path, kind: TableKind, hour: i64) -> PathBuf {
    let (year, month, day) = civil_from_days(hour.div_euclid(24));
    tables_dir
        .join(kind.name())
        .join(format!("date={year:04}-{month:02}-{day:02}"))
        .join(format!("hour={:02}", hour.rem_euclid(24)))
}

/// Gregorian (year, month, day) of a day counted from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// How every Parquet file of the store is encoded: zstd at its default level.
pub fn parquet_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build()
}

/// Writes `batch` to `dir/name` atomically and durably.
pub(crate) fn write_parquet(dir: &Path, name: &str, batch: &RecordBatch) -> Result<ParquetFile> {
    std::fs::create_dir_all(dir).map_err(StoreError::io("create partition directory", dir))?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));

    let file = std::fs::File::create(&tmp).map_err(StoreError::io("create parquet file", &tmp))?;
    let properties = parquet_properties();
    let parquet_error = |source| StoreError::Parquet {
        path: tmp.clone(),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(&file, batch.schema(), Some(properties)).map_err(parquet_error)?;
    writer.write(batch).map_err(parquet_error)?;
    writer.close().map_err(parquet_error)?;
    file.sync_all()
        .map_err(StoreError::io("fsync parquet file", &tmp))?;
    let size = file
        .metadata()
        .map_err(StoreError::io("stat parquet file", &tmp))?
        .len();
    drop(file);

    std::fs::rename(&tmp, &path).map_err(StoreError::io("rename parquet file", &path))?;
    sync_dir(dir)?;
    // A new partition directory must itself be durable in its parent.
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(ParquetFile { path, size })
}

/// Lists the committed Parquet files of every table, deleting temporary files and the files
/// of uncommitted or aborted flushes (their rows are still in the WAL).
pub(crate) fn load_committed_files(
    tables_dir: &Path,
    snapshot: &Snapshot,
) -> Result<Vec<(TableKind, ParquetFile)>> {
    let mut files = Vec::new();
    for kind in TableKind::ALL {
        let table_dir = tables_dir.join(kind.name());
        for date_dir in sub_dirs(&table_dir, "date=")? {
            for hour_dir in sub_dirs(&date_dir, "hour=")? {
                collect_partition(&hour_dir, kind, snapshot, &mut files)?;
            }
        }
    }
    files.sort_by(|a, b| a.1.path.cmp(&b.1.path));
    Ok(files)
}

fn sub_dirs(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let read_dir = match std::fs::read_dir(dir) {
        Ok(read_dir) => read_dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("list directory", dir)(e)),
    };
    let mut dirs = Vec::new();
    for dir_entry in read_dir {
        let dir_entry = dir_entry.map_err(StoreError::io("list directory", dir))?;
        let path = dir_entry.path();
        let matches = dir_entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix));
        if matches && path.is_dir() {
            dirs.push(path);
        }
    }
    Ok(dirs)
}

fn collect_partition(
    dir: &Path,
    kind: TableKind,
    snapshot: &Snapshot,
    files: &mut Vec<(TableKind, ParquetFile)>,
) -> Result<()> {
    let read_dir = std::fs::read_dir(dir).map_err(StoreError::io("list directory", dir))?;
    for dir_entry in read_dir {
        let dir_entry = dir_entry.map_err(StoreError::io("list directory", dir))?;
        let path = dir_entry.path();
        let Some(name) = dir_entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };

        if name.ends_with(".parquet.tmp") {
            std::fs::remove_file(&path)
                .map_err(StoreError::io("delete unfinished parquet file", &path))?;
            continue;
        }
        let Some(number) = name
            .strip_suffix(".parquet")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let committed = number <= snapshot.flushed_before_segment
            && !snapshot.aborted_flushes.contains(&number);
        if !committed {
            tracing::info!(path = %path.display(), "deleting parquet file of an uncommitted flush");
            std::fs::remove_file(&path)
                .map_err(StoreError::io("delete uncommitted parquet file", &path))?;
            continue;
        }
        let size = dir_entry
            .metadata()
            .map_err(StoreError::io("stat parquet file", &path))?
            .len();
        files.push((kind, ParquetFile { path, size }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // 2024-02-29 is day 19782.
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(19_783), (2024, 3, 1));
    }

    #[test]
    fn partition_dirs() {
        let dir = partition_dir(Path::new("/t"), TableKind::Readings, 19_782 * 24 + 23);
        assert_eq!(dir, Path::new("/t/readings/date=2024-02-29/hour=23"));
    }
}
