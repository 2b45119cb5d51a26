//! vigil-cluster: the stages of vigil as separate processes around Kafka.
//!
//! In a cluster, gateways publish accepted readings (and refusals) to the readings topic and
//! security events to the events topic, both keyed by device id, and send a PUBACK once Kafka
//! has the reading ([`publisher`]). Store workers consume the readings topic by partition
//! into Parquet files in a shared tables directory, exactly once ([`store_worker`]); detect
//! workers consume both topics into the detectors ([`detect_feed`]). The device registry,
//! with every quarantine and release, travels on a compacted devices topic that every node
//! follows and publishes its own changes to ([`registry`]).
//!
//! Topics, all created on first start if missing:
//!
//! | topic | key | value | partitions |
//! |---|---|---|---|
//! | `<prefix>readings` | device id | one WAL record (reading or refusal, checksummed) | `partitions` |
//! | `<prefix>events` | device id | a security event, JSON | `partitions` |
//! | `<prefix>devices` | device id | the device's registry record, JSON (compacted) | 1 |

pub mod detect_feed;
pub mod metrics;
pub mod publisher;
pub mod registry;
pub mod store_worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer};

pub use vigil_config::{ClusterConfig, Role};

/// Errors of the cluster stages; each names what an operator needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka ({what}): {source}")]
    Kafka {
        what: &'static str,
        source: KafkaError,
    },
    #[error("cannot create topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] vigil_store::StoreError),
    #[error(transparent)]
    Ingest(#[from] vigil_ingest::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn kafka(what: &'static str) -> impl FnOnce(KafkaError) -> Error {
    move |source| Error::Kafka { what, source }
}

/// The names of the cluster's topics and consumer groups.
#[derive(Debug, Clone)]
pub struct Topics {
    pub readings: String,
    pub events: String,
    pub devices: String,
    /// Consumer group of the store workers.
    pub store_group: String,
    /// Consumer group of the detect workers.
    pub detect_group: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            readings: format!("{prefix}readings"),
            events: format!("{prefix}events"),
            devices: format!("{prefix}devices"),
            store_group: format!("{prefix}store"),
            detect_group: format!("{prefix}detect"),
        }
    }
}

/// Client settings shared by every producer and consumer of the cluster.
pub fn client_config(config: &ClusterConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "vigil")
        // Metadata refreshes quickly after a broker or partition change.
        .set("topic.metadata.refresh.interval.ms", "10000")
        .set("socket.keepalive.enable", "true");
    client
}

/// Settings of a consumer in one of the workers' groups: from the start of a topic the group
/// has never read, and a member that stops heartbeating for 10 s loses its partitions.
pub(crate) fn group_member_config(config: &ClusterConfig, group: &str) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    client
}

/// Creates the topics that are missing: readings and events with `partitions` partitions,
/// devices with one, compacted, so that it keeps the last record of every device for ever.
/// Topics that exist are left as they are (an operator may have made them with more
/// partitions or replicas). Fails when Kafka cannot be reached.
pub async fn ensure_topics(config: &ClusterConfig) -> Result<()> {
    let topics = Topics::new(&config.topic_prefix);
    let probe: BaseProducer = client_config(config)
        .create()
        .map_err(kafka("metadata client"))?;
    let metadata = probe
        .client()
        .fetch_metadata(None, Duration::from_secs(30))
        .map_err(kafka("cluster metadata"))?;
    let existing: Vec<&str> = metadata.topics().iter().map(|topic| topic.name()).collect();
    let replication = || TopicReplication::Fixed(config.replication_factor.max(1));
    let partitions = config.partitions.max(1);
    let new_topics: Vec<NewTopic<'_>> = [
        NewTopic::new(&topics.readings, partitions, replication()),
        NewTopic::new(&topics.events, partitions, replication()),
        NewTopic::new(&topics.devices, 1, replication()).set("cleanup.policy", "compact"),
    ]
    .into_iter()
    .filter(|topic| !existing.contains(&topic.name))
    .collect();
    if new_topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(config)
        .create()
        .map_err(kafka("admin client"))?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(kafka("create topics"))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, "kafka topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Topic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// A thread that runs until asked to stop: the shape of every cluster stage's loop.
#[derive(Debug)]
pub(crate) struct StageThread {
    name: &'static str,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StageThread {
    /// Spawns `vigil-<name>` running `body`, which should return soon after its flag is set.
    pub(crate) fn spawn(
        name: &'static str,
        body: impl FnOnce(&AtomicBool) + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vigil-{name}"))
            .spawn(move || body(&flag))
            .map_err(|source| Error::Thread { name, source })?;
        Ok(Self {
            name,
            stop,
            thread: Some(thread),
        })
    }

    /// Sets the flag and waits for the thread to end.
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(thread = self.name, "cluster thread panicked");
        }
    }
}
