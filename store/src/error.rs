//! The store's error type: every variant names the file, setting or stage an operator needs.

use std::path::PathBuf;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed on `path`.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What was being done (`"write WAL segment"`, `"rename"`, ...).
        operation: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A WAL record failed its checks somewhere other than the tail of the last segment.
    #[error("corrupt WAL record in {path} at byte offset {offset}: {reason}")]
    WalCorrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the first bad record.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// The replay-guard snapshot could not be decoded.
    #[error("corrupt replay-guard snapshot {path}: {reason}")]
    SnapshotCorrupt {
        /// The snapshot file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
    /// Writing or fsyncing the WAL failed; the entries of that group are not durable.
    #[error("WAL group commit to {path} failed: {reason}")]
    WalWrite {
        /// The segment file being written.
        path: PathBuf,
        /// The I/O error, as text (shared by every entry of the group).
        reason: String,
    },
    /// A re-sent reading is not among the durable ones (its first write failed).
    #[error("re-sent reading seq {seq} is not durable")]
    ResentNotDurable { seq: u64 },
    /// Writing a Parquet file failed.
    #[error("parquet file {path}: {source}")]
    Parquet {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        source: parquet::errors::ParquetError,
    },
    /// Building an Arrow batch failed (a bug or a schema mismatch).
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Planning or running a SQL query failed.
    #[error("sql: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// A configuration value is unusable.
    #[error("invalid store setting `{setting}`: {reason}")]
    Config {
        /// The setting's name.
        setting: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The log that makes entries durable in place of the local WAL (Kafka, in a cluster)
    /// did not take them.
    #[error("the durable log did not take the entry: {reason}")]
    LogUnavailable {
        /// What the log reported.
        reason: String,
    },
    /// The store has been shut down (or its writer thread has stopped).
    #[error("store is shut down")]
    Shutdown,
}

impl StoreError {
    pub(crate) fn io(
        operation: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| StoreError::Io {
            operation,
            path,
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
