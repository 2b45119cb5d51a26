//! End-to-end tests of vigil-store: durability, recovery, flush, SQL and Flight SQL.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, UInt64Type};
use vigil_store::{
    AcceptedReading, Completion, RECENT_DIGESTS, Rejection, Store, StoreConfig, StoreError,
    WalEntry,
};

/// 2024-05-01T10:15:00Z
const T0: i64 = 1_714_558_500_000;
const HOUR: i64 = 3_600_000;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        data_dir: dir.to_path_buf(),
        // Long enough that the flusher never runs on its own during a test.
        flush_interval_ms: 3_600_000,
        flush_max_rows: 1_000_000,
        ..StoreConfig::default()
    }
}

fn reading(device: &str, seq: u64, received_at_ms: i64) -> AcceptedReading {
    AcceptedReading {
        device_id: Arc::from(device),
        seq,
        sampled_at_ms: received_at_ms - 20,
        received_at_ms,
        measurements: vec![
            ("heart_rate_bpm".to_owned(), 60.0 + seq as f64),
            ("spo2_pct".to_owned(), 97.0),
        ],
        signature_digest: [seq as u8; 16],
    }
}

fn completion() -> (
    Completion,
    tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
) {
    tokio::sync::oneshot::channel()
}

/// Submits readings `seqs` of `device` and waits until all are durable.
fn store_readings(store: &Store, device: &str, seqs: std::ops::Range<u64>, received_at_ms: i64) {
    let mut receivers = Vec::new();
    let mut entries = Vec::new();
    for seq in seqs {
        let (tx, rx) = completion();
        entries.push((
            WalEntry::Reading(reading(device, seq, received_at_ms)),
            Some(tx),
        ));
        receivers.push(rx);
    }
    store.wal_sender().submit_batch(entries).unwrap();
    for rx in receivers {
        rx.blocking_recv().unwrap().unwrap();
    }
}

async fn count(store: &Store, query: &str) -> i64 {
    let batches = store.sql(query).await.unwrap();
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

fn parquet_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.join("tables")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn wal_segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn completions_fire_after_durability_and_barrier_waits() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recovered) = Store::open(config(dir.path())).unwrap();
    assert_eq!(recovered.replayed_entries, 0);

    let (reading_tx, mut reading_rx) = completion();
    let (barrier_tx, barrier_rx) = completion();
    store
        .wal_sender()
        .submit_batch(vec![
            (
                WalEntry::Reading(reading("pump-1", 1, T0)),
                Some(reading_tx),
            ),
            (WalEntry::Barrier, Some(barrier_tx)),
        ])
        .unwrap();

    // The barrier completes only once the reading before it is durable.
    barrier_rx.blocking_recv().unwrap().unwrap();
    assert!(
        matches!(reading_rx.try_recv(), Ok(Ok(()))),
        "reading must be complete before barrier"
    );

    // Durable means in the WAL file, before anyone reads it back.
    let wal_bytes: u64 = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(wal_bytes > 0);
    store.shutdown();

    // Submissions after shutdown fail cleanly.
    let error = store
        .wal_sender()
        .submit_batch(vec![(WalEntry::Barrier, None)])
        .unwrap_err();
    assert!(matches!(error, StoreError::Shutdown));
}

#[test]
fn a_resend_completes_only_if_the_reading_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(config(dir.path())).unwrap();
    let stored = reading("pump-1", 1, T0);
    let digest = stored.signature_digest;
    let resend = |seq: u64, signature_digest: [u8; 16]| {
        let (done, result) = completion();
        store
            .wal_sender()
            .submit_batch(vec![(
                WalEntry::Resend {
                    device_id: "pump-1".into(),
                    seq,
                    signature_digest,
                },
                Some(done),
            )])
            .unwrap();
        result.blocking_recv().unwrap()
    };

    assert!(
        matches!(
            resend(1, digest),
            Err(StoreError::ResentNotDurable { seq: 1 })
        ),
        "nothing is stored yet"
    );
    store
        .wal_sender()
        .submit_batch(vec![(WalEntry::Reading(stored), None)])
        .unwrap();
    resend(1, digest).unwrap();
    assert_eq!(store.wal_sender().failed_groups(), 0);
    assert_eq!(
        store
            .wal_sender()
            .durable_state("pump-1")
            .map(|state| state.highest_seq),
        Some(1)
    );
    store.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_restores_hot_rows_and_seq_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(config(dir.path())).unwrap();
        let writer = store.clone();
        tokio::task::spawn_blocking(move || {
            store_readings(&writer, "pump-1", 1..101, T0);
            store_readings(&writer, "pump-2", 5..8, T0);
            let (tx, rx) = completion();
            let rejection = Rejection {
                device_id: "x".repeat(300),
                received_at_ms: T0,
                reason: "bad_signature".to_owned(),
                detail: "é".repeat(1000),
                peer: "192.0.2.1:4242".to_owned(),
            };
            writer
                .wal_sender()
                .submit_batch(vec![(WalEntry::Rejection(rejection), Some(tx))])
                .unwrap();
            rx.blocking_recv().unwrap().unwrap();
        })
        .await
        .unwrap();

        // Visible to SQL as soon as acknowledged.
        assert_eq!(count(&store, "SELECT count(*) FROM readings").await, 206);
        store.shutdown();
    }

    let (store, recovered) = Store::open(config(dir.path())).unwrap();
    assert_eq!(recovered.replayed_entries, 104);
    assert_eq!(recovered.replayed_readings, 103);
    let pump1 = &recovered.devices["pump-1"];
    assert_eq!(pump1.highest_seq, 100);
    assert_eq!(pump1.recent.len(), RECENT_DIGESTS);
    assert_eq!(pump1.recent.front(), Some(&(37, [37u8; 16])));
    assert_eq!(pump1.recent.back(), Some(&(100, [100u8; 16])));
    assert_eq!(recovered.devices["pump-2"].highest_seq, 7);

    assert_eq!(count(&store, "SELECT count(*) FROM readings").await, 206);
    let batches = store
        .sql("SELECT character_length(device_id), character_length(detail) FROM rejections")
        .await
        .unwrap();
    let lengths = &batches[0];
    assert_eq!(
        lengths
            .column(0)
            .as_primitive::<arrow::datatypes::Int32Type>()
            .value(0),
        128
    );
    assert_eq!(
        lengths
            .column(1)
            .as_primitive::<arrow::datatypes::Int32Type>()
            .value(0),
        512
    );
    store.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_partitions_deletes_wal_and_reopen_does_not_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(config(dir.path())).unwrap();
    let writer = store.clone();
    tokio::task::spawn_blocking(move || {
        store_readings(&writer, "pump-1", 1..11, T0);
        store_readings(&writer, "pump-1", 11..21, T0 + HOUR);
        // Previous day, 23:xx.
        store_readings(&writer, "pump-1", 21..26, T0 - 11 * HOUR);
    })
    .await
    .unwrap();
    let segments_before = wal_segments(dir.path());

    let flusher = store.clone();
    tokio::task::spawn_blocking(move || flusher.flush_now())
        .await
        .unwrap()
        .unwrap();

    let files = parquet_files(dir.path());
    let relative: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(dir.path())
                .unwrap()
                .parent()
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        relative,
        vec![
            "tables/readings/date=2024-04-30/hour=23",
            "tables/readings/date=2024-05-01/hour=10",
            "tables/readings/date=2024-05-01/hour=11",
        ]
    );
    for old in &segments_before {
        assert!(
            !wal_segments(dir.path()).contains(old),
            "segment {old} should be deleted"
        );
    }
    assert!(dir.path().join("guard.snapshot").exists());

    // Rows after the flush are hot; together each row is seen once.
    let writer = store.clone();
    tokio::task::spawn_blocking(move || store_readings(&writer, "pump-1", 26..31, T0))
        .await
        .unwrap();
    assert_eq!(count(&store, "SELECT count(*) FROM readings").await, 60);
    assert_eq!(
        count(&store, "SELECT count(DISTINCT seq) FROM readings").await,
        30
    );
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM readings WHERE metric = 'spo2_pct' AND seq > 20"
        )
        .await,
        10
    );
    store.shutdown();

    let (store, recovered) = Store::open(config(dir.path())).unwrap();
    // Only the unflushed readings are replayed; the guard still knows all of them.
    assert_eq!(recovered.replayed_readings, 5);
    assert_eq!(recovered.devices["pump-1"].highest_seq, 30);
    assert_eq!(recovered.devices["pump-1"].recent.len(), 30);
    assert_eq!(count(&store, "SELECT count(*) FROM readings").await, 60);

    // SELECT * shows exactly the table's columns.
    let batches = store
        .sql("SELECT * FROM readings ORDER BY seq LIMIT 1")
        .await
        .unwrap();
    let names: Vec<String> = batches[0]
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "device_id",
            "seq",
            "sampled_at",
            "received_at",
            "metric",
            "value"
        ]
    );
    assert_eq!(
        batches[0].column(1).as_primitive::<UInt64Type>().value(0),
        1
    );
    store.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommitted_flush_files_are_dropped_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(config(dir.path())).unwrap();
    let writer = store.clone();
    tokio::task::spawn_blocking(move || store_readings(&writer, "pump-1", 1..4, T0))
        .await
        .unwrap();
    store.shutdown();

    // A crash after writing a Parquet file but before the snapshot commits it.
    let stray = dir.path().join("tables/readings/date=2024-05-01/hour=10");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(
        stray.join("0000000000000099.parquet"),
        b"not really parquet",
    )
    .unwrap();
    std::fs::write(stray.join("0000000000000099.parquet.tmp"), b"half").unwrap();

    let (store, _) = Store::open(config(dir.path())).unwrap();
    assert!(parquet_files(dir.path()).is_empty());
    assert_eq!(count(&store, "SELECT count(*) FROM readings").await, 6);
    store.shutdown();
}

#[test]
fn torn_wal_tail_recovers_complete_records() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(config(dir.path())).unwrap();
    store_readings(&store, "pump-1", 1..6, T0);
    store.shutdown();

    let segment = dir
        .path()
        .join("wal")
        .join(wal_segments(dir.path()).last().unwrap());
    let length = std::fs::metadata(&segment).unwrap().len();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.truncate(length as usize - 7);
    bytes.extend_from_slice(&[0x5A; 23]);
    std::fs::write(&segment, bytes).unwrap();

    let (store, recovered) = Store::open(config(dir.path())).unwrap();
    assert_eq!(recovered.replayed_readings, 4);
    assert_eq!(recovered.devices["pump-1"].highest_seq, 4);
    store.shutdown();
}

#[test]
fn corrupt_wal_in_the_middle_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(config(dir.path())).unwrap();
    store_readings(&store, "pump-1", 1..6, T0);
    store.shutdown();
    // A second run adds a later segment, so the damaged one is no longer last.
    let (store, _) = Store::open(config(dir.path())).unwrap();
    store_readings(&store, "pump-1", 6..8, T0);
    store.shutdown();

    let segments = wal_segments(dir.path());
    let first = dir.path().join("wal").join(&segments[0]);
    let mut bytes = std::fs::read(&first).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&first, bytes).unwrap();

    let error = Store::open(config(dir.path())).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, StoreError::WalCorrupt { .. }), "{message}");
    assert!(message.contains(&segments[0]), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_table_and_sql_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(config(dir.path())).unwrap();
    assert_eq!(count(&store, "SELECT count(*) FROM devices").await, 0);

    store.set_devices_source(Arc::new(|| {
        use arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};
        let ts = || TimestampMillisecondArray::from(vec![Some(T0)]).with_timezone("UTC");
        RecordBatch::try_new(
            Store::devices_schema(),
            vec![
                Arc::new(StringArray::from(vec!["pump-1"])),
                Arc::new(StringArray::from(vec!["infusion_pump"])),
                Arc::new(StringArray::from(vec!["active"])),
                Arc::new(ts()),
                Arc::new(ts()),
                Arc::new(Float64Array::from(vec![0.25])),
            ],
        )
        .unwrap()
    }));
    let batches = store.sql("SELECT class, risk FROM devices").await.unwrap();
    assert_eq!(batches[0].num_rows(), 1);
    assert!(batches[0].column(1).is_valid(0));

    let error = store.sql("SELECT nope FROM readings").await.unwrap_err();
    assert!(matches!(error, StoreError::DataFusion(_)), "{error}");
    // Remote queries must not create tables over server files.
    let ddl = store
        .sql("CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'")
        .await;
    assert!(ddl.is_err());
    store.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_round_trip() {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures::TryStreamExt;

    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(config(dir.path())).unwrap();
    let writer = store.clone();
    tokio::task::spawn_blocking(move || {
        store_readings(&writer, "pump-1", 1..4, T0);
        writer.flush_now().unwrap();
        store_readings(&writer, "pump-1", 4..6, T0);
    })
    .await
    .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = vigil_store::flight_sql_service(store.clone());
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FlightSqlServiceClient::new(channel);

    // Plain statement.
    let info = client
        .execute(
            "SELECT seq, value FROM readings WHERE metric = 'heart_rate_bpm' ORDER BY seq"
                .to_owned(),
            None,
        )
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let batches: Vec<RecordBatch> = client
        .do_get(ticket)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let seqs: Vec<u64> = batches
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<UInt64Type>().values().to_vec())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);

    // Prepared statement, as ADBC and JDBC drivers do it.
    let mut prepared = client
        .prepare("SELECT count(*) AS n FROM readings".to_owned(), None)
        .await
        .unwrap();
    let info = prepared.execute().await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let batches: Vec<RecordBatch> = client
        .do_get(ticket)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        batches[0].column(0).as_primitive::<Int64Type>().value(0),
        10
    );
    prepared.close().await.unwrap();

    // A SQL error is a clear invalid-argument status.
    let error = client
        .execute("SELEC 1".to_owned(), None)
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("InvalidArgument") || text.contains("invalid argument"),
        "{text}"
    );

    server.abort();
    store.shutdown();
}

#[test]
fn flusher_thread_flushes_when_the_hot_tier_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        flush_max_rows: 10,
        ..config(dir.path())
    };
    let (store, _) = Store::open(config).unwrap();
    store_readings(&store, "pump-1", 1..9, T0);

    // Poll (bounded) until the flusher thread has written a file.
    let mut waited = 0;
    while parquet_files(dir.path()).is_empty() && waited < 500 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
    }
    assert_eq!(parquet_files(dir.path()).len(), 1);
    store.shutdown();
}
