//! The device registry shared by every node: each node publishes its own changes (an
//! enrollment, a quarantine decided by a detect worker or an operator, a release) to the
//! compacted devices topic and applies everyone else's.
//!
//! # Invariants
//!
//! - The devices topic has one partition and is compacted: it keeps the latest record of
//!   every device, so a node that starts reads the whole registry, quarantines included,
//!   before it publishes anything of its own (a node that was down must not bring back a
//!   status that changed while it was away).
//! - A record carries the time of its status change where it was decided; a node applies a
//!   remote status unless it is older than the last record it published or applied for the
//!   device, so the last decision wins everywhere. A starting node applies only each
//!   device's latest record.
//! - A node never publishes back what it applied from the topic (no echo), only changes made
//!   locally.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use vigil_ingest::registry::{DeviceRegistry, DeviceStatus, Enrollment};

use crate::metrics::ClusterMetrics;
use crate::{ClusterConfig, Error, Result, Topics, client_config, kafka};

/// Per device, the status this node last published or applied, with the time the cluster's
/// record gives for it: a local change is a status that differs from it, and a remote record
/// older than it is stale.
type Known = Mutex<HashMap<String, (DeviceStatus, i64)>>;

/// Longest a starting node waits to read the devices topic to its end before publishing.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// One device's record on the devices topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    pub public_key_hex: String,
    pub class: String,
    pub status: DeviceStatus,
    pub status_changed_at_ms: i64,
}

/// What a node does with a status decided elsewhere.
pub trait StatusTarget: Send + Sync + 'static {
    /// The node's copy of the registry.
    fn registry(&self) -> &DeviceRegistry;
    /// Takes on `status` for a device: a gateway closes a quarantined device's session.
    fn apply_status(&self, device_id: &str, status: DeviceStatus);
}

/// The running follower and publisher threads.
#[derive(Debug)]
pub struct RegistryReplication {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl RegistryReplication {
    /// Reads the devices topic to its end (applying every record), then keeps following it
    /// and publishing local changes every `registry_publish_ms`.
    pub fn start(
        config: &ClusterConfig,
        node: &str,
        target: Arc<dyn StatusTarget>,
        metrics: ClusterMetrics,
    ) -> Result<Self> {
        let topic = Topics::new(&config.topic_prefix).devices;
        // Every node reads the whole topic: a group of its own, never committed.
        let consumer: BaseConsumer = client_config(config)
            .set(
                "group.id",
                format!(
                    "{}registry-{node}-{}-{}",
                    config.topic_prefix,
                    std::process::id(),
                    crate::now_ms()
                ),
            )
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(kafka("devices consumer"))?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(kafka("devices assignment"))?;
        consumer
            .assign(&assignment)
            .map_err(kafka("devices assignment"))?;
        let producer: ThreadedProducer<DefaultProducerContext> = client_config(config)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(kafka("devices producer"))?;

        let known: Arc<Known> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));

        // Catch up before anything is published.
        let end = consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(30))
            .map_err(kafka("devices watermarks"))?
            .1;
        let started = Instant::now();
        let mut position = 0;
        // Only each device's latest record counts (an uncompacted topic holds them all), so
        // that a starting node never passes through a status the cluster has left behind.
        let mut latest: HashMap<String, DeviceRecord> = HashMap::new();
        while position < end && started.elapsed() < CATCH_UP_TIMEOUT {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
                position = message.offset() + 1;
                if let Some(record) = decode(&message, &metrics) {
                    latest.insert(record.device_id.clone(), record);
                }
            }
        }
        for record in latest.into_values() {
            apply(record, target.as_ref(), &known, &metrics);
        }
        if position < end {
            tracing::warn!(
                position,
                end,
                "devices topic not read to its end in time; following it from here"
            );
        }
        tracing::info!(
            records = position,
            devices = target.registry().len(),
            "device registry caught up with the cluster"
        );

        let follower = {
            let (target, known, stop, metrics) =
                (target.clone(), known.clone(), stop.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("vigil-registry-follow".to_owned())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        match consumer.poll(Duration::from_millis(100)) {
                            Some(Ok(message)) => {
                                if let Some(record) = decode(&message, &metrics) {
                                    apply(record, target.as_ref(), &known, &metrics);
                                }
                            }
                            Some(Err(error)) => {
                                tracing::warn!(%error, "devices topic");
                                std::thread::sleep(Duration::from_millis(200));
                            }
                            None => {}
                        }
                    }
                })
                .map_err(|source| Error::Thread {
                    name: "registry follower",
                    source,
                })?
        };
        let publisher = {
            let interval = Duration::from_millis(config.registry_publish_ms.max(10));
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("vigil-registry-publish".to_owned())
                .spawn(move || {
                    loop {
                        publish_changes(&producer, &topic, target.as_ref(), &known, &metrics);
                        if stop.load(Ordering::Acquire) {
                            let _ = producer.flush(Duration::from_secs(5));
                            return;
                        }
                        std::thread::sleep(interval);
                    }
                })
                .map_err(|source| Error::Thread {
                    name: "registry publisher",
                    source,
                })?
        };
        Ok(Self {
            stop,
            threads: vec![follower, publisher],
        })
    }

    /// Publishes what changed since the last round, then stops following.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Publishes every device whose status differs from what this node last published or
/// applied.
fn publish_changes(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    target: &dyn StatusTarget,
    known: &Known,
    metrics: &ClusterMetrics,
) {
    let devices = target.registry().list();
    let mut known = known.lock();
    for device in devices {
        let status = device.status();
        if known
            .get(device.id.as_ref())
            .is_some_and(|(known_status, _)| *known_status == status)
        {
            continue;
        }
        let record = DeviceRecord {
            device_id: device.id.to_string(),
            public_key_hex: device.public_key_hex(),
            class: device.class.to_string(),
            status,
            status_changed_at_ms: device.status_changed_at_ms(),
        };
        let Ok(payload) = serde_json::to_vec(&record) else {
            continue;
        };
        let sent = producer.send(
            BaseRecord::to(topic)
                .key(device.id.as_ref())
                .payload(&payload),
        );
        match sent {
            Ok(()) => {
                known.insert(record.device_id, (status, record.status_changed_at_ms));
                metrics.registry_published.inc();
            }
            // Tried again next round.
            Err((error, _)) => tracing::warn!(%error, "cannot publish a device record"),
        }
    }
}

/// One record of the devices topic; `None` (counted) when it does not decode.
fn decode(
    message: &rdkafka::message::BorrowedMessage<'_>,
    metrics: &ClusterMetrics,
) -> Option<DeviceRecord> {
    match serde_json::from_slice(message.payload()?) {
        Ok(record) => Some(record),
        Err(error) => {
            metrics.undecodable_records.inc();
            tracing::warn!(%error, offset = message.offset(), "undecodable device record");
            None
        }
    }
}

/// Applies one record of the devices topic.
fn apply(record: DeviceRecord, target: &dyn StatusTarget, known: &Known, metrics: &ClusterMetrics) {
    let registry = target.registry();
    let mut known = known.lock();
    let stamped = (record.status, record.status_changed_at_ms);
    let local = match registry.get(&record.device_id) {
        Some(local) => local,
        None => {
            let enrollment = Enrollment {
                device_id: record.device_id.clone(),
                public_key_hex: record.public_key_hex.clone(),
                class: Some(record.class.clone()),
            };
            if let Err(error) = registry.enroll(&[enrollment]) {
                tracing::warn!(%error, "cannot enroll a device from the devices topic");
                return;
            }
            metrics.registry_applied.inc();
            let Some(local) = registry.get(&record.device_id) else {
                return;
            };
            known.insert(record.device_id.clone(), stamped);
            if local.status() != record.status {
                target.apply_status(&record.device_id, record.status);
            }
            return;
        }
    };
    let last = known.get(&record.device_id).copied();
    if local.status() == record.status {
        let newest = last.map_or(stamped.1, |(_, at)| at.max(stamped.1));
        known.insert(record.device_id, (record.status, newest));
        return;
    }
    if last.is_some_and(|(_, at)| record.status_changed_at_ms < at) {
        // Older than what this node last published or applied.
        return;
    }
    // Under the same lock as `known`, so the publisher never sees the old status as a
    // local change.
    known.insert(record.device_id.clone(), stamped);
    target.apply_status(&record.device_id, record.status);
    metrics.registry_applied.inc();
    tracing::info!(
        device_id = record.device_id,
        status = record.status.as_str(),
        "device status from the cluster"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that only keeps the registry.
    struct RegistryOnly(Arc<DeviceRegistry>);

    impl StatusTarget for RegistryOnly {
        fn registry(&self) -> &DeviceRegistry {
            &self.0
        }

        fn apply_status(&self, device_id: &str, status: DeviceStatus) {
            self.0.set_status(device_id, status).unwrap();
        }
    }

    fn record(status: DeviceStatus, at_ms: i64) -> DeviceRecord {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        DeviceRecord {
            device_id: "pump-7".to_owned(),
            public_key_hex: hex::encode(key.as_bytes()),
            class: "infusion_pump".to_owned(),
            status,
            status_changed_at_ms: at_ms,
        }
    }

    #[test]
    fn the_latest_decision_wins_and_stale_records_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(DeviceRegistry::open(dir.path()).unwrap());
        let target = RegistryOnly(registry.clone());
        let (known, metrics) = (Known::default(), ClusterMetrics::default());
        let status = || registry.get("pump-7").unwrap().status();

        // Learnt from the topic long after the enrollment: the later quarantine still applies,
        // whatever this node's clock said when it enrolled the device.
        apply(
            record(DeviceStatus::Active, 1_000),
            &target,
            &known,
            &metrics,
        );
        assert_eq!(
            registry.get("pump-7").unwrap().class.as_ref(),
            "infusion_pump"
        );
        apply(
            record(DeviceStatus::Quarantined, 3_000),
            &target,
            &known,
            &metrics,
        );
        assert_eq!(status(), DeviceStatus::Quarantined);
        // A release decided before that quarantine arrives late: stale.
        apply(
            record(DeviceStatus::Active, 2_000),
            &target,
            &known,
            &metrics,
        );
        assert_eq!(status(), DeviceStatus::Quarantined);
        apply(
            record(DeviceStatus::Active, 4_000),
            &target,
            &known,
            &metrics,
        );
        assert_eq!(status(), DeviceStatus::Active);
        // What was applied is not a local change: nothing to publish back.
        let known = known.lock();
        assert_eq!(known.get("pump-7"), Some(&(DeviceStatus::Active, 4_000)));
    }
}
