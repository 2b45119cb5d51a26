//! Table schemas, the hot tier, the list of committed Parquet files, and the DataFusion
//! table providers that read both.
//!
//! # Invariants
//!
//! - [`Catalog`] holds, per table, the hot batches (`active`: appended by the writer thread
//!   after each group commit; `sealed`: handed to the flusher at a WAL roll) and the committed
//!   Parquet files. A row is in exactly one of `active`, `sealed` or a listed file.
//! - A scan copies the batch list and the file list under one read lock; the flusher moves
//!   rows from `sealed` into a file under one write lock. So a query sees each row once.
//! - Nothing here is durable by itself: restart rebuilds `active` from the WAL and the file
//!   list from the `tables/` directory and the replay-guard snapshot.

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use arrow::array::{
    ArrayRef, Float64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
    UInt64Builder,
};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use parking_lot::RwLock;

use crate::{AcceptedReading, Rejection};

/// Longest `device_id` stored in `rejections`, in characters.
pub(crate) const REJECTION_DEVICE_ID_CHARS: usize = 128;
/// Longest `detail` stored in `rejections`, in characters.
pub(crate) const REJECTION_DETAIL_CHARS: usize = 512;
/// Hot batches smaller than this many rows are merged once enough of them pile up.
const SMALL_BATCH_ROWS: usize = 8192;
/// How many small hot batches trigger a merge.
const SMALL_BATCHES_TO_MERGE: usize = 32;

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

static READINGS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, false),
        Field::new("sampled_at", timestamp_type(), false),
        Field::new("received_at", timestamp_type(), false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
    ]))
});

static REJECTIONS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("received_at", timestamp_type(), false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("peer", DataType::Utf8, false),
    ]))
});

static DEVICES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("class", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("enrolled_at", timestamp_type(), true),
        Field::new("status_changed_at", timestamp_type(), true),
        Field::new("risk", DataType::Float64, true),
    ]))
});

pub(crate) fn devices_schema() -> SchemaRef {
    DEVICES_SCHEMA.clone()
}

static ALERTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("alert_id", DataType::UInt64, false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("raised_at", timestamp_type(), false),
        Field::new("detector", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
        Field::new("summary", DataType::Utf8, false),
        Field::new("action", DataType::Utf8, false),
        Field::new("evidence", DataType::Utf8, false),
        Field::new("acknowledged", DataType::Boolean, false),
        Field::new("device_class", DataType::Utf8, false),
    ]))
});

pub(crate) fn alerts_schema() -> SchemaRef {
    ALERTS_SCHEMA.clone()
}

/// The tables the store writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TableKind {
    Readings,
    Rejections,
}

impl TableKind {
    pub(crate) const ALL: [TableKind; 2] = [TableKind::Readings, TableKind::Rejections];

    pub(crate) fn name(self) -> &'static str {
        match self {
            TableKind::Readings => "readings",
            TableKind::Rejections => "rejections",
        }
    }

    pub(crate) fn schema(self) -> SchemaRef {
        match self {
            TableKind::Readings => READINGS_SCHEMA.clone(),
            TableKind::Rejections => REJECTIONS_SCHEMA.clone(),
        }
    }

    /// Index of the `received_at` column, which partitions the Parquet files.
    pub(crate) fn received_at_column(self) -> usize {
        match self {
            TableKind::Readings => 3,
            TableKind::Rejections => 1,
        }
    }
}

/// Cuts `text` to at most `max_chars` characters, on a character boundary.
pub(crate) fn truncate_chars(text: &mut String, max_chars: usize) {
    if let Some((byte_index, _)) = text.char_indices().nth(max_chars) {
        text.truncate(byte_index);
    }
}

/// The rows of `readings` for these readings, one per measurement, as the hot tier holds them.
pub fn readings_batch<'a>(
    readings: impl IntoIterator<Item = &'a AcceptedReading>,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut device_id = StringBuilder::new();
    let mut seq = UInt64Builder::new();
    let mut sampled_at = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut received_at = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut metric = StringBuilder::new();
    let mut value = Float64Builder::new();

    for reading in readings {
        for (name, measured) in &reading.measurements {
            device_id.append_value(&reading.device_id);
            seq.append_value(reading.seq);
            sampled_at.append_value(reading.sampled_at_ms);
            received_at.append_value(reading.received_at_ms);
            metric.append_value(name);
            value.append_value(*measured);
        }
    }

    let columns: Vec<ArrayRef> = vec![
        Arc::new(device_id.finish()),
        Arc::new(seq.finish()),
        Arc::new(sampled_at.finish()),
        Arc::new(received_at.finish()),
        Arc::new(metric.finish()),
        Arc::new(value.finish()),
    ];
    RecordBatch::try_new(READINGS_SCHEMA.clone(), columns)
}

/// Cuts a rejection's attacker-supplied fields to what the `rejections` table keeps.
pub fn truncate_rejection(rejection: &mut Rejection) {
    truncate_chars(&mut rejection.device_id, REJECTION_DEVICE_ID_CHARS);
    truncate_chars(&mut rejection.detail, REJECTION_DETAIL_CHARS);
}

/// One row per rejection; fields must already be truncated ([`truncate_rejection`]).
pub fn rejections_batch<'a>(
    rejections: impl IntoIterator<Item = &'a Rejection>,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut device_id = StringBuilder::new();
    let mut received_at = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut reason = StringBuilder::new();
    let mut detail = StringBuilder::new();
    let mut peer = StringBuilder::new();

    for rejection in rejections {
        device_id.append_value(&rejection.device_id);
        received_at.append_value(rejection.received_at_ms);
        reason.append_value(&rejection.reason);
        detail.append_value(&rejection.detail);
        peer.append_value(&rejection.peer);
    }

    let columns: Vec<ArrayRef> = vec![
        Arc::new(device_id.finish()),
        Arc::new(received_at.finish()),
        Arc::new(reason.finish()),
        Arc::new(detail.finish()),
        Arc::new(peer.finish()),
    ];
    RecordBatch::try_new(REJECTIONS_SCHEMA.clone(), columns)
}

/// A committed Parquet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParquetFile {
    /// Absolute path.
    pub(crate) path: std::path::PathBuf,
    pub(crate) size: u64,
}

/// Hot batches and files of one table.
#[derive(Debug, Default)]
pub(crate) struct TableData {
    pub(crate) active: Vec<RecordBatch>,
    pub(crate) active_rows: usize,
    pub(crate) sealed: Vec<RecordBatch>,
    pub(crate) files: Vec<ParquetFile>,
}

impl TableData {
    fn push_active(&mut self, batch: RecordBatch) -> Result<(), arrow::error::ArrowError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.active_rows += batch.num_rows();
        self.active.push(batch);

        // Many tiny groups (light load) would leave thousands of tiny batches: merge the tail.
        let small_tail = self
            .active
            .iter()
            .rev()
            .take_while(|b| b.num_rows() < SMALL_BATCH_ROWS)
            .count();
        if small_tail >= SMALL_BATCHES_TO_MERGE {
            let start = self.active.len() - small_tail;
            let merged = concat_batches(&self.active[start].schema(), &self.active[start..])?;
            self.active.truncate(start);
            self.active.push(merged);
        }
        Ok(())
    }
}

/// Hot tier and committed files of every table.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub(crate) readings: TableData,
    pub(crate) rejections: TableData,
    /// When the oldest row of `active` arrived (in this process).
    pub(crate) oldest_active: Option<Instant>,
}

impl Catalog {
    pub(crate) fn table(&self, kind: TableKind) -> &TableData {
        match kind {
            TableKind::Readings => &self.readings,
            TableKind::Rejections => &self.rejections,
        }
    }

    pub(crate) fn table_mut(&mut self, kind: TableKind) -> &mut TableData {
        match kind {
            TableKind::Readings => &mut self.readings,
            TableKind::Rejections => &mut self.rejections,
        }
    }

    /// Appends freshly durable rows to the hot tier.
    pub(crate) fn append(
        &mut self,
        kind: TableKind,
        batch: RecordBatch,
    ) -> Result<(), arrow::error::ArrowError> {
        if batch.num_rows() > 0 && self.oldest_active.is_none() {
            self.oldest_active = Some(Instant::now());
        }
        self.table_mut(kind).push_active(batch)
    }

    /// Moves every active batch to `sealed` (called at the WAL roll that starts a flush).
    pub(crate) fn seal(&mut self) {
        for kind in TableKind::ALL {
            let table = self.table_mut(kind);
            let active = std::mem::take(&mut table.active);
            table.sealed.extend(active);
            table.active_rows = 0;
        }
        self.oldest_active = None;
    }

    /// Rows in the hot tier (active and sealed), all tables.
    pub(crate) fn hot_rows(&self) -> usize {
        TableKind::ALL
            .iter()
            .map(|kind| {
                let table = self.table(*kind);
                table.active_rows
                    + table
                        .sealed
                        .iter()
                        .map(RecordBatch::num_rows)
                        .sum::<usize>()
            })
            .sum()
    }

    /// Rows not yet sealed, all tables.
    pub(crate) fn active_rows(&self) -> usize {
        self.readings.active_rows + self.rejections.active_rows
    }
}

/// `readings` or `rejections`: hot batches UNION committed Parquet files.
#[derive(Debug)]
pub(crate) struct StoreTable {
    kind: TableKind,
    catalog: Arc<RwLock<Catalog>>,
    /// A cluster's shared tables directory: its files are listed at each scan.
    shared_dir: Option<PathBuf>,
}

impl StoreTable {
    pub(crate) fn new(
        kind: TableKind,
        catalog: Arc<RwLock<Catalog>>,
        shared_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            kind,
            catalog,
            shared_dir,
        }
    }
}

/// The complete Parquet files of one table under a shared tables directory (temporary files
/// of writes under way end in `.tmp` and are skipped). A missing directory holds none.
fn list_shared_files(
    shared_dir: &std::path::Path,
    kind: TableKind,
) -> datafusion::error::Result<Vec<ParquetFile>> {
    let dir = shared_dir.join(kind.name());
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(DataFusionError::Execution(format!(
                "cannot list {}: {error}",
                dir.display()
            )));
        }
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path
            .extension()
            .is_none_or(|extension| extension != "parquet")
        {
            continue;
        }
        // A file deleted between listing and stat is simply not part of this scan.
        if let Ok(metadata) = entry.metadata() {
            files.push(ParquetFile {
                path,
                size: metadata.len(),
            });
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

#[async_trait]
impl TableProvider for StoreTable {
    fn schema(&self) -> SchemaRef {
        self.kind.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        // One lock for both lists: a row moving from hot to a file is seen in exactly one.
        let (hot, files) = {
            let catalog = self.catalog.read();
            let table = catalog.table(self.kind);
            let hot: Vec<RecordBatch> = table
                .sealed
                .iter()
                .chain(table.active.iter())
                .cloned()
                .collect();
            (hot, table.files.clone())
        };
        let mut files = files;
        if let Some(shared_dir) = &self.shared_dir {
            files.extend(list_shared_files(shared_dir, self.kind)?);
        }
        let schema = self.kind.schema();
        let partitions = state.config().target_partitions().max(1);
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();

        if !hot.is_empty() {
            let mut groups = vec![Vec::new(); partitions.min(hot.len())];
            let group_count = groups.len();
            for (index, batch) in hot.into_iter().enumerate() {
                groups[index % group_count].push(batch);
            }
            let source = MemorySourceConfig::try_new(&groups, schema.clone(), projection.cloned())?
                .with_limit(limit);
            inputs.push(DataSourceExec::from_data_source(source));
        }

        if !files.is_empty() {
            let mut groups = vec![Vec::new(); partitions.min(files.len())];
            let group_count = groups.len();
            for (index, file) in files.iter().enumerate() {
                let path = file.path.to_str().ok_or_else(|| {
                    DataFusionError::Execution(format!(
                        "parquet path is not UTF-8: {}",
                        file.path.display()
                    ))
                })?;
                groups[index % group_count].push(PartitionedFile::new(path, file.size));
            }
            let source = Arc::new(ParquetSource::new(schema.clone()));
            let config = FileScanConfigBuilder::new(ObjectStoreUrl::local_filesystem(), source)
                .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .build();
            inputs.push(DataSourceExec::from_data_source(config));
        }

        if inputs.is_empty() {
            let projected = match projection {
                Some(indices) => Arc::new(schema.project(indices)?),
                None => schema,
            };
            return Ok(Arc::new(EmptyExec::new(projected)));
        }
        UnionExec::try_new(inputs)
    }
}

/// Provider of a table kept elsewhere (`devices` by the registry in ingest, `alerts` by the
/// alert log in detect), called once per scan.
pub(crate) type BatchSource = Arc<dyn Fn() -> RecordBatch + Send + Sync>;

/// A table whose rows some other stage reports at scan time.
pub(crate) struct SourceTable {
    schema: SchemaRef,
    source: Option<BatchSource>,
}

impl std::fmt::Debug for SourceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceTable")
            .field("has_source", &self.source.is_some())
            .finish()
    }
}

impl SourceTable {
    pub(crate) fn new(schema: SchemaRef, source: Option<BatchSource>) -> Self {
        Self { schema, source }
    }
}

#[async_trait]
impl TableProvider for SourceTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let schema = self.schema.clone();
        let batches = match &self.source {
            Some(source) => {
                let batch = source();
                if batch.schema().fields() != schema.fields() {
                    return Err(DataFusionError::Execution(format!(
                        "table source returned schema {:?}, expected {:?}",
                        batch.schema(),
                        schema
                    )));
                }
                vec![batch.with_schema(schema.clone())?]
            }
            None => Vec::new(),
        };
        let source =
            MemorySourceConfig::try_new(&[batches], schema, projection.cloned())?.with_limit(limit);
        Ok(DataSourceExec::from_data_source(source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        let mut text = "é".repeat(600);
        truncate_chars(&mut text, REJECTION_DETAIL_CHARS);
        assert_eq!(text.chars().count(), REJECTION_DETAIL_CHARS);
        let mut short = "abc".to_owned();
        truncate_chars(&mut short, 128);
        assert_eq!(short, "abc");
    }

    #[test]
    fn small_batches_are_merged() {
        let mut table = TableData::default();
        let reading = AcceptedReading {
            device_id: Arc::from("d"),
            seq: 1,
            sampled_at_ms: 0,
            received_at_ms: 0,
            measurements: vec![("m".to_owned(), 1.0)],
            signature_digest: [0; 16],
        };
        for _ in 0..100 {
            let batch = readings_batch([&reading]).expect("batch");
            table.push_active(batch).expect("push");
        }
        assert_eq!(table.active_rows, 100);
        assert!(table.active.len() < 40, "{} batches", table.active.len());
        let total: usize = table.active.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(total, 100);
    }
}
