//! Durability: readings acknowledged before a `kill -9` are all there after a restart, each
//! exactly once, and the replay guard still recognises re-sends and replays.

use std::path::Path;

use crate::support::{Server, TestDevice, V3Device, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_readings_survive_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // Alert-only, so that the replay at the end is refused on a live session instead of
    // racing the cut-off it would cause.
    let mut server = Server::start_without_cut_off(&dir.path().join("data"));
    let devices: Vec<TestDevice> = (0..4)
        .map(|i| TestDevice::new(&format!("hr-{i}")))
        .collect();
    server.enroll(&devices.iter().collect::<Vec<_>>());

    const READINGS: u64 = 150;
    for device in &devices {
        let mut connection = V3Device::connect(device, server.mqtt).await.unwrap();
        let payloads = (1..=READINGS).map(|seq| device.payload(seq)).collect();
        connection
            .publish_all(&device.topic(), payloads)
            .await
            .unwrap();
    }

    let accepted = server.metric("vigil_ingest_readings_accepted_total");
    let refusals: Vec<String> = server
        .metrics()
        .lines()
        .filter(|l| l.contains("refused_total") && !l.ends_with(" 0"))
        .map(String::from)
        .collect();
    assert_eq!(
        accepted,
        4.0 * READINGS as f64,
        "every reading accepted before the crash: {refusals:?}"
    );
    server.restart();

    let total = "SELECT count(*) FROM readings";
    assert_eq!(server.sql_count(total).await, 4 * 2 * READINGS as i64);
    let distinct = "SELECT count(*) FROM (SELECT DISTINCT device_id, seq, metric FROM readings)";
    assert_eq!(server.sql_count(distinct).await, 4 * 2 * READINGS as i64);

    // The replay guard survives too: after another restart, an exact re-send of a stored
    // reading is acknowledged and stored once, and other content under that seq is a replay.
    let device = &devices[0];
    let last = device.payload(READINGS + 1);
    let mut connection = V3Device::connect(device, server.mqtt).await.unwrap();
    connection
        .publish_all(&device.topic(), vec![last.clone()])
        .await
        .unwrap();
    server.restart();

    let mut connection = V3Device::connect(device, server.mqtt).await.unwrap();
    let replay = device.payload(READINGS + 1);
    assert_ne!(
        replay, last,
        "the sampling time differs, so the signed bytes differ"
    );
    connection
        .publish_all(&device.topic(), vec![last, replay])
        .await
        .unwrap();

    let query = format!(
        "SELECT count(*) FROM readings WHERE device_id = '{}'",
        device.id
    );
    assert_eq!(server.sql_count(&query).await, 2 * (READINGS as i64 + 1));
    assert_eq!(server.metric("vigil_ingest_readings_resent_total"), 1.0);
    assert_eq!(
        server.metric("vigil_ingest_readings_refused_total{reason=\"replay\"}"),
        1.0
    );
}

/// With a data directory relative to the working directory (the example config's default),
/// readings written to Parquet stay queryable, and stay so across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_data_directory_serves_parquet_to_sql() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fast-flush.toml");
    std::fs::write(&config, "[store]\nflush_interval_ms = 200\n").unwrap();
    let mut server = Server::start_in(
        dir.path(),
        Path::new("vigil-data"),
        &["--config", config.to_str().unwrap()],
    );
    let device = TestDevice::new("relative-0");
    server.enroll(&[&device]);

    const READINGS: u64 = 20;
    let mut connection = V3Device::connect(&device, server.mqtt).await.unwrap();
    let payloads = (1..=READINGS).map(|seq| device.payload(seq)).collect();
    connection
        .publish_all(&device.topic(), payloads)
        .await
        .unwrap();

    let readings = dir.path().join("vigil-data/tables/readings");
    wait_for(
        || parquet_files(&readings) > 0,
        "the hot tier to be flushed to Parquet",
    )
    .await;
    let total = "SELECT count(*) FROM readings";
    assert_eq!(server.sql_count(total).await, 2 * READINGS as i64);
    server.restart();
    assert_eq!(server.sql_count(total).await, 2 * READINGS as i64);
}

fn parquet_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                parquet_files(&path)
            } else {
                usize::from(path.extension().is_some_and(|ext| ext == "parquet"))
            }
        })
        .sum()
}
