//! Checks against what a vigil server stored, over Flight SQL: which acknowledged readings are
//! missing or stored twice, and how long a reading takes to become visible to SQL.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tonic::transport::Channel;

use crate::fleet::SimDevice;

/// A Flight SQL connection to a vigil server.
#[derive(Debug, Clone)]
pub struct SqlClient {
    channel: Channel,
    token: String,
}

/// What the server stored of the acknowledged readings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredCheck {
    /// Acknowledged readings the server does not have.
    pub lost: u64,
    /// Readings stored more than once (each extra copy counts).
    pub duplicated: u64,
}

impl SqlClient {
    /// Connects to the gRPC address of a vigil server (`http://host:port`).
    ///
    /// # Errors
    ///
    /// The address is not a URL, or nothing answers there.
    pub async fn connect(server_url: &str, token: &str) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(server_url.to_owned())
            .with_context(|| format!("{server_url} is not a server URL"))?
            .connect()
            .await
            .with_context(|| format!("connecting to {server_url} for Flight SQL"))?;
        Ok(Self {
            channel,
            token: token.trim().to_owned(),
        })
    }

    /// Runs one query and collects its result.
    ///
    /// # Errors
    ///
    /// The server refuses or fails the query.
    pub async fn query(&self, query: &str) -> anyhow::Result<Vec<RecordBatch>> {
        let mut flight = FlightSqlServiceClient::new(self.channel.clone());
        flight.set_token(self.token.clone());
        let info = flight
            .execute(query.to_owned(), None)
            .await
            .with_context(|| format!("query failed: {query}"))?;
        let mut batches = Vec::new();
        for endpoint in info.endpoint {
            let ticket = endpoint
                .ticket
                .context("flight endpoint without a ticket")?;
            let stream = flight.do_get(ticket).await?;
            batches.extend(stream.try_collect::<Vec<_>>().await?);
        }
        Ok(batches)
    }

    /// Whether reading `seq` of `device_id` is visible to SQL.
    ///
    /// # Errors
    ///
    /// The query fails.
    pub async fn has_reading(&self, device_id: &str, seq: u64) -> anyhow::Result<bool> {
        let query = format!(
            "SELECT count(*) FROM readings WHERE device_id = '{device_id}' AND seq = {seq}"
        );
        let counts = int64_column(&self.query(&query).await?, 0)?;
        Ok(counts.first().is_some_and(|count| *count > 0))
    }

    /// Compares the acknowledged seqs of each device with the rows the server stored, once the
    /// stored count has stopped changing (the hot tier shows a reading within a second of its
    /// PUBACK) or `settle` has passed.
    ///
    /// # Errors
    ///
    /// A query fails.
    pub async fn check_stored(
        &self,
        devices: &[SimDevice],
        acked_seqs: &BTreeMap<String, Vec<u64>>,
        settle: Duration,
    ) -> anyhow::Result<StoredCheck> {
        let acked: u64 = acked_seqs.values().map(|seqs| seqs.len() as u64).sum();
        let count_query = "SELECT count(DISTINCT device_id || '/' || CAST(seq AS VARCHAR)) \
                           FROM readings WHERE device_id LIKE 'sim-%'";
        let deadline = Instant::now() + settle;
        let mut previous = None;
        loop {
            let stored = int64_column(&self.query(count_query).await?, 0)?
                .first()
                .copied()
                .unwrap_or(0);
            let settled = stored as u64 >= acked || previous == Some(stored);
            if settled || Instant::now() >= deadline {
                break;
            }
            previous = Some(stored);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        // Rows per reading: one per measurement of the device's class.
        let batches = self
            .query(
                "SELECT device_id, CAST(seq AS BIGINT), CAST(count(*) AS BIGINT) FROM readings \
                 WHERE device_id LIKE 'sim-%' GROUP BY device_id, seq",
            )
            .await?;
        let mut rows: HashMap<(String, i64), i64> = HashMap::new();
        for batch in &batches {
            let ids = string_column(batch, 0)?;
            let seqs = int64_column(std::slice::from_ref(batch), 1)?;
            let counts = int64_column(std::slice::from_ref(batch), 2)?;
            for ((id, seq), count) in ids.into_iter().zip(seqs).zip(counts) {
                rows.insert((id, seq), count);
            }
        }

        let mut check = StoredCheck::default();
        for device in devices {
            let measurements = device.class.metrics().len().max(1) as i64;
            for seq in acked_seqs.get(&device.device_id).into_iter().flatten() {
                match rows.get(&(device.device_id.clone(), *seq as i64)) {
                    None => check.lost += 1,
                    Some(count) => check.duplicated += (*count / measurements - 1).max(0) as u64,
                }
            }
        }
        Ok(check)
    }
}

fn int64_column(batches: &[RecordBatch], index: usize) -> anyhow::Result<Vec<i64>> {
    let mut values = Vec::new();
    for batch in batches {
        let column = batch
            .columns()
            .get(index)
            .context("query answered with fewer columns than asked")?;
        let column = arrow::compute::cast(column, &DataType::Int64)?;
        let column = column.as_primitive::<Int64Type>();
        values.extend((0..column.len()).map(|row| column.value(row)));
    }
    Ok(values)
}

fn string_column(batch: &RecordBatch, index: usize) -> anyhow::Result<Vec<String>> {
    let column = batch
        .columns()
        .get(index)
        .context("query answered with fewer columns than asked")?;
    let column = arrow::compute::cast(column, &DataType::Utf8)?;
    let column = column.as_string::<i32>();
    Ok((0..column.len())
        .map(|row| column.value(row).to_owned())
        .collect())
}
