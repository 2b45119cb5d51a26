//! The gateway's side of the cluster: accepted readings and refusals go to the readings topic
//! in place of the local write-ahead log, and security events go to the events topic.
//!
//! # Invariants
//!
//! - A reading's completion (the PUBACK trigger) fires `Ok` only from Kafka's delivery report,
//!   that is, once every in-sync replica has it (`acks=all`); the replay-guard state is
//!   updated just before.
//! - The producer is idempotent: its retries after a lost acknowledgement neither duplicate
//!   nor reorder a device's records within the partition.
//! - Memory is bounded twice: the submission queue holds at most `capacity` entries, and
//!   librdkafka's own queue at most [`PRODUCER_QUEUE_MESSAGES`]; when both are full the
//!   verifier waits, and back-pressure reaches the devices as it does with the local WAL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use serde::{Deserialize, Serialize};
use vigil_detect::events::{EventKind, Observation, ObservationReceiver, SecurityEvent};
use vigil_store::shared::{ExternalLog, LogEntry};
use vigil_store::{Completion, StoreError, WalEntry, truncate_rejection};

use crate::metrics::ClusterMetrics;
use crate::{ClusterConfig, Result, StageThread, Topics, client_config, kafka};

/// Most records librdkafka holds before `send` reports a full queue.
const PRODUCER_QUEUE_MESSAGES: usize = 100_000;

/// What travels with a record to its delivery report.
struct Pending {
    completion: Option<Completion>,
    /// (device, seq, signature digest) of a reading, to record once durable.
    reading: Option<(Arc<str>, u64, [u8; 16])>,
}

struct DeliveryContext {
    log: Arc<ExternalLog>,
    metrics: ClusterMetrics,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Self::DeliveryOpaque) {
        self.metrics.publish_in_flight.dec();
        let Pending {
            completion,
            reading,
        } = *pending;
        let outcome = match result {
            Ok(_) => {
                self.metrics.published.inc();
                if let Some((device_id, seq, digest)) = &reading {
                    self.log.record_durable(device_id, *seq, *digest);
                }
                Ok(())
            }
            Err((error, message)) => {
                self.metrics.publish_failures.inc();
                tracing::warn!(
                    %error,
                    partition = message.partition(),
                    "kafka did not take a reading; its device will send it again"
                );
                // Raised before the completion fires, as the local WAL writer does.
                self.log.record_failure();
                Err(StoreError::LogUnavailable {
                    reason: error.to_string(),
                })
            }
        };
        if let Some(completion) = completion {
            // A dropped receiver means the gateway stopped waiting: fine.
            let _ = completion.send(outcome);
        }
    }
}

/// Publishes what the verifier submits to the readings topic.
#[derive(Debug)]
pub struct ReadingPublisher {
    thread: StageThread,
}

impl ReadingPublisher {
    /// Starts the producer and the thread that drains `log` into it.
    pub fn start(
        config: &ClusterConfig,
        log: ExternalLog,
        metrics: ClusterMetrics,
    ) -> Result<Self> {
        let log = Arc::new(log);
        let producer: ThreadedProducer<DeliveryContext> = client_config(config)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set(
                "queue.buffering.max.messages",
                PRODUCER_QUEUE_MESSAGES.to_string(),
            )
            .set("message.timeout.ms", config.produce_timeout_ms.to_string())
            .create_with_context(DeliveryContext {
                log: log.clone(),
                metrics: metrics.clone(),
            })
            .map_err(kafka("readings producer"))?;
        let topic = Topics::new(&config.topic_prefix).readings;
        let flush_timeout = Duration::from_millis(config.produce_timeout_ms);
        let thread = StageThread::spawn("kafka-publisher", move |stop| {
            publish_loop(&producer, &log, &topic, flush_timeout, &metrics, stop);
            // Whatever is still in flight gets its delivery report (or fails) now.
            let _ = producer.flush(flush_timeout);
        })?;
        Ok(Self { thread })
    }

    /// Stops after the queue is drained and in-flight records are reported.
    pub fn stop(self) {
        self.thread.stop();
    }
}

fn publish_loop(
    producer: &ThreadedProducer<DeliveryContext>,
    log: &ExternalLog,
    topic: &str,
    flush_timeout: Duration,
    metrics: &ClusterMetrics,
    stop: &AtomicBool,
) {
    let mut buffer = Vec::with_capacity(512);
    loop {
        let (entry, completion) = match log.recv_timeout(Duration::from_millis(100)) {
            LogEntry::Entry(entry, completion) => (entry, completion),
            LogEntry::Idle if stop.load(Ordering::Acquire) && log.queued() == 0 => return,
            LogEntry::Idle => continue,
            LogEntry::Closed => return,
        };
        match entry {
            WalEntry::Reading(reading) => {
                buffer.clear();
                let pending = Box::new(Pending {
                    completion,
                    reading: Some((
                        reading.device_id.clone(),
                        reading.seq,
                        reading.signature_digest,
                    )),
                });
                let key = reading.device_id.clone();
                vigil_wal_record::encode_entry(&mut buffer, &WalEntry::Reading(reading));
                send(producer, topic, &key, &buffer, pending, metrics);
            }
            WalEntry::Rejection(mut rejection) => {
                truncate_rejection(&mut rejection);
                let key = rejection.device_id.clone();
                buffer.clear();
                vigil_wal_record::encode_entry(&mut buffer, &WalEntry::Rejection(rejection));
                let pending = Box::new(Pending {
                    completion,
                    reading: None,
                });
                send(producer, topic, &key, &buffer, pending, metrics);
            }
            // Completes once everything submitted before it is reported.
            WalEntry::Barrier => {
                let flushed = producer.flush(flush_timeout);
                if let Some(completion) = completion {
                    let _ = completion.send(flushed.map_err(|error| StoreError::LogUnavailable {
                        reason: error.to_string(),
                    }));
                }
            }
            WalEntry::Resend {
                device_id,
                seq,
                signature_digest,
            } => {
                // The original may still be in flight: wait for its report first.
                let _ = producer.flush(flush_timeout);
                let result = if log.holds(&device_id, seq, signature_digest) {
                    Ok(())
                } else {
                    Err(StoreError::ResentNotDurable { seq })
                };
                if let Some(completion) = completion {
                    let _ = completion.send(result);
                }
            }
        }
    }
}

/// Hands one record to the producer, waiting while its queue is full.
fn send(
    producer: &ThreadedProducer<DeliveryContext>,
    topic: &str,
    key: &str,
    payload: &[u8],
    pending: Box<Pending>,
    metrics: &ClusterMetrics,
) {
    let mut record = BaseRecord::with_opaque_to(topic, pending)
        .key(key)
        .payload(payload);
    metrics.publish_in_flight.inc();
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((error, returned)) => {
                metrics.publish_in_flight.dec();
                metrics.publish_failures.inc();
                tracing::error!(%error, "kafka refused a reading");
                let pending = returned.delivery_opaque;
                if let Some(completion) = pending.completion {
                    let _ = completion.send(Err(StoreError::LogUnavailable {
                        reason: error.to_string(),
                    }));
                }
                return;
            }
        }
    }
}

/// A security event as the events topic carries it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct EventRecord {
    pub(crate) kind: String,
    pub(crate) at_ms: i64,
    pub(crate) peer: String,
}

impl EventRecord {
    pub(crate) fn into_event(self, device_id: &str) -> Option<SecurityEvent> {
        Some(SecurityEvent {
            device_id: Arc::from(device_id),
            kind: EventKind::parse(&self.kind)?,
            at_ms: self.at_ms,
            peer: Arc::from(self.peer),
        })
    }
}

/// Passes the gateway's security events on to the events topic. Accepted readings need no
/// passing on: detect workers read them from the readings topic.
#[derive(Debug)]
pub struct EventForwarder {
    thread: StageThread,
}

impl EventForwarder {
    pub fn start(
        config: &ClusterConfig,
        observations: ObservationReceiver,
        metrics: ClusterMetrics,
    ) -> Result<Self> {
        // Events are evidence, not readings: at most once is enough, and a full producer
        // queue drops them (counted) rather than holding up the gateway.
        let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
            client_config(config)
                .set("linger.ms", "20")
                .set("queue.buffering.max.messages", "100000")
                .create()
                .map_err(kafka("events producer"))?;
        let topic = Topics::new(&config.topic_prefix).events;
        let thread = StageThread::spawn("kafka-events", move |stop| {
            while !stop.load(Ordering::Acquire) {
                let Some(observation) = observations.recv_timeout(Duration::from_millis(100))
                else {
                    continue;
                };
                let Observation::Security(event) = observation else {
                    continue;
                };
                let record = EventRecord {
                    kind: event.kind.as_str().to_owned(),
                    at_ms: event.at_ms,
                    peer: event.peer.to_string(),
                };
                let Ok(payload) = serde_json::to_vec(&record) else {
                    continue;
                };
                let sent = producer.send(
                    BaseRecord::to(&topic)
                        .key(event.device_id.as_ref())
                        .payload(&payload),
                );
                if sent.is_ok() {
                    metrics.events_published.inc();
                }
            }
            let _ = producer.flush(Duration::from_secs(5));
        })?;
        Ok(Self { thread })
    }

    pub fn stop(self) {
        self.thread.stop();
    }
}
