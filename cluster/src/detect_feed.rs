//! A detect worker's input: the readings and events topics, consumed by partition in the
//! detect workers' consumer group, fed to the detectors.
//!
//! Both topics are keyed by device id with the same partition count, so one worker owns a
//! device's readings and its security events, and with them all of its detector state.
//! Offsets are committed as observations are handed over; a worker that crashes re-reads at
//! most its last commit interval. A partition that moves to another worker starts with fresh
//! per-device statistics there (they re-learn from the device's next readings).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use vigil_detect::ObservationSender;
use vigil_detect::events::{Observation, ReadingObservation};
use vigil_ingest::registry::{DEFAULT_CLASS, DeviceRegistry};
use vigil_store::WalEntry;

use crate::metrics::ClusterMetrics;
use crate::publisher::EventRecord;
use crate::{ClusterConfig, Result, StageThread, Topics, group_member_config, kafka};

struct FeedContext {
    topic: String,
    metrics: ClusterMetrics,
}

impl ClientContext for FeedContext {}

impl ConsumerContext for FeedContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let owned = list.elements_for_topic(&self.topic).len();
            self.metrics.partitions_owned.set(owned as i64);
            tracing::info!(partitions = owned, "detect partitions taken");
        }
    }
}

/// The running feed.
#[derive(Debug)]
pub struct DetectFeed {
    thread: StageThread,
}

impl DetectFeed {
    /// Consumes both topics into `observations`, waiting when the detector's queue is full
    /// (Kafka keeps what is not read yet). Classes come from the node's copy of the registry.
    pub fn start(
        config: &ClusterConfig,
        registry: Arc<DeviceRegistry>,
        observations: ObservationSender,
        metrics: ClusterMetrics,
    ) -> Result<Self> {
        let topics = Topics::new(&config.topic_prefix);
        let consumer: BaseConsumer<FeedContext> = group_member_config(config, &topics.detect_group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .create_with_context(FeedContext {
                topic: topics.readings.clone(),
                metrics: metrics.clone(),
            })
            .map_err(kafka("detect consumer"))?;
        consumer
            .subscribe(&[&topics.readings, &topics.events])
            .map_err(kafka("subscribe to readings and events"))?;
        let thread = StageThread::spawn("detect-feed", move |stop| {
            while !stop.load(Ordering::Acquire) {
                let message = match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "detect feed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    None => continue,
                };
                let observation = if message.topic() == topics.readings {
                    reading_observation(message.payload(), &registry)
                } else {
                    event_observation(message.key(), message.payload())
                };
                let Some(observation) = observation else {
                    // Refusals need no feeding (their events arrive on the events
                    // topic); anything else did not decode.
                    continue;
                };
                metrics.observations_fed.inc();
                if !observations.send_blocking(observation) {
                    return;
                }
            }
            consumer.unsubscribe();
        })?;
        Ok(Self { thread })
    }

    pub fn stop(self) {
        self.thread.stop();
    }
}

fn reading_observation(payload: Option<&[u8]>, registry: &DeviceRegistry) -> Option<Observation> {
    let (entry, _) = vigil_wal_record::parse_record(payload?).ok()?;
    let WalEntry::Reading(reading) = entry else {
        return None;
    };
    let class = registry
        .get(&reading.device_id)
        .map_or_else(|| Arc::from(DEFAULT_CLASS), |device| device.class.clone());
    Some(Observation::Reading(ReadingObservation {
        device_id: reading.device_id,
        class,
        seq: reading.seq,
        sampled_at_ms: reading.sampled_at_ms,
        received_at_ms: reading.received_at_ms,
        measurements: Arc::from(reading.measurements),
    }))
}

fn event_observation(key: Option<&[u8]>, payload: Option<&[u8]>) -> Option<Observation> {
    let device_id = std::str::from_utf8(key?).ok()?;
    let record: EventRecord = serde_json::from_slice(payload?).ok()?;
    Some(Observation::Security(record.into_event(device_id)?))
}
