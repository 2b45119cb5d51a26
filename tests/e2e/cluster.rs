//! Scale-out: two gateways, two store workers and two detect workers as separate `vigil`
//! processes around a Kafka-protocol broker, with a fleet publishing through both gateways.
//!
//! The broker is librdkafka's mock cluster (`rdkafka::mocking::MockCluster`), run inside this
//! test process on a loopback port. It is a stand-in, used because no Kafka broker can run on
//! this machine: no container engine, and no package source that serves Kafka or the JVM
//! libraries it is built from. It speaks the Kafka protocol the vigil processes use (topics
//! and partitions, consumer groups with rebalances, offset commits, idempotent producers), but
//! it is not Apache Kafka: it keeps everything in memory and does not compact topics.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use parking_lot::Mutex;
use prost::Message;
use rdkafka::mocking::MockCluster;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::crash::{
    Backlog, DRAIN_LIMIT, FleetState, MEASUREMENTS, login_refused, run_device, sample, stored_rows,
};
use crate::support::{Server, TestDevice, V3Device};
use vigil_proto::sign_reading;

const PARTITIONS: i32 = 4;

/// Polls `condition` every 100 ms until it holds; fails after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_stores_every_acknowledged_reading_once_and_cuts_off_on_every_gateway() {
    let kafka = MockCluster::new(1).unwrap();
    for (topic, partitions) in [
        ("vigil.readings", PARTITIONS),
        ("vigil.events", PARTITIONS),
        ("vigil.devices", 1),
    ] {
        kafka.create_topic(topic, partitions, 1).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    let config = dir.path().join("cluster.toml");
    // Cut-off needs the SOC's confirmation, so that the reconnects forced on the fleet cannot
    // quarantine a device; the quarantine below is an operator's.
    std::fs::write(
        &config,
        format!(
            "[detect]\ndefault_policy = \"alert_and_confirm\"\n\n\
             [cluster]\nbrokers = {:?}\nshared_dir = {:?}\npartitions = {PARTITIONS}\n\
             flush_interval_ms = 300\nregistry_publish_ms = 50\n",
            kafka.bootstrap_servers(),
            shared.display().to_string(),
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let node = |name: &str, role: &str| {
        let data_dir = dir.path().join(name);
        let args = ["--config", config, "--role", role];
        if role == "gateway" {
            Server::start_with(&data_dir, &args)
        } else {
            Server::start_worker(&data_dir, &args)
        }
    };
    let gateway_a = node("gateway-a", "gateway");
    let gateway_b = node("gateway-b", "gateway");
    let mut store_workers = [node("store-1", "store"), node("store-2", "store")];
    let detect_workers = [node("detect-1", "detect"), node("detect-2", "detect")];

    // Enrolled through one gateway, known to the other through the devices topic.
    let devices: Vec<Arc<TestDevice>> = (0..16)
        .map(|index| Arc::new(TestDevice::new(&format!("ward-{index:02}.spo2"))))
        .collect();
    let isolated = TestDevice::new("ward-isolated.spo2");
    let mut enrolled: Vec<&TestDevice> = devices.iter().map(|d| d.as_ref()).collect();
    enrolled.push(&isolated);
    gateway_a.enroll(&enrolled);
    eventually(
        Duration::from_secs(10),
        "enrollment reaches gateway b",
        || {
            let listed = gateway_b.cli(&["devices", "list"]);
            let known = enrolled.iter().all(|device| listed.contains(&device.id));
            async move { known }
        },
    )
    .await;

    // The fleet: half of it through each gateway, 20 readings a second per device.
    let fleet = Arc::new(FleetState::default());
    let period = Duration::from_millis(50);
    let mut samplers = Vec::new();
    let mut sessions = Vec::new();
    for (index, device) in devices.iter().enumerate() {
        let gateway = if index % 2 == 0 {
            &gateway_a
        } else {
            &gateway_b
        };
        let backlog = Arc::new(Backlog {
            unacked: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
        });
        let phase = period.mul_f64(index as f64 / devices.len() as f64);
        samplers.push(tokio::spawn(sample(
            device.clone(),
            backlog.clone(),
            fleet.clone(),
            period,
            phase,
        )));
        sessions.push((
            backlog.clone(),
            tokio::spawn(run_device(
                device.clone(),
                gateway.mqtt,
                backlog,
                fleet.clone(),
            )),
        ));
    }

    // One store worker is killed mid-run and comes back: its partitions move to the other
    // worker and back, and nothing it had taken but not yet committed is lost or doubled.
    let owned = |worker: &Server| worker.metric("vigil_cluster_partitions_owned") as i32;
    eventually(
        Duration::from_secs(30),
        "the store workers share the partitions",
        || {
            let shared = store_workers.iter().all(|worker| owned(worker) > 0);
            async move { shared }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    store_workers[0].kill_9();
    eventually(
        Duration::from_secs(30),
        "the surviving worker takes every partition",
        || {
            let all = owned(&store_workers[1]) == PARTITIONS;
            async move { all }
        },
    )
    .await;
    store_workers[0].restart();
    eventually(
        Duration::from_secs(30),
        "the restarted worker takes partitions back",
        || {
            let back = owned(&store_workers[0]) > 0;
            async move { back }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    *fleet.drain_deadline.lock() = Some(Instant::now() + DRAIN_LIMIT);
    fleet.stopping.store(true, Ordering::SeqCst);
    let mut highest_sampled = Vec::new();
    for sampler in samplers {
        highest_sampled.push(sampler.await.unwrap());
    }
    let mut acked: HashMap<String, Vec<u64>> = HashMap::new();
    for ((backlog, session), highest) in sessions.into_iter().zip(highest_sampled) {
        backlog.wake.notify_one();
        let log = session.await.unwrap();
        assert_eq!(
            log.left_unacked, 0,
            "{} left readings unacknowledged",
            log.device_id
        );
        assert!(log.acked.len() as u64 <= highest);
        acked.insert(log.device_id, log.acked);
    }
    let acknowledged: usize = acked.values().map(Vec::len).sum();
    assert!(
        acknowledged > 1000,
        "only {acknowledged} readings acknowledged"
    );

    // Every acknowledged reading, exactly once, in SQL on either gateway (the shared tables).
    eventually(
        Duration::from_secs(30),
        "every acknowledged reading stored",
        || {
            let gateway = &gateway_b;
            async move {
                let stored = gateway
                    .sql_count(
                        "SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM readings)",
                    )
                    .await;
                stored >= acknowledged as i64
            }
        },
    )
    .await;
    for gateway in [&gateway_a, &gateway_b] {
        let stored = stored_rows(gateway).await;
        for (device_id, seqs) in &acked {
            for seq in seqs {
                assert_eq!(
                    stored.get(&(device_id.clone(), *seq)),
                    Some(&MEASUREMENTS),
                    "{device_id} seq {seq}: acknowledged, so stored exactly once"
                );
            }
        }
        let doubled: Vec<_> = stored
            .iter()
            .filter(|(_, rows)| **rows != MEASUREMENTS)
            .collect();
        assert!(doubled.is_empty(), "stored more than once: {doubled:?}");
    }
    let files_written: f64 = store_workers
        .iter()
        .map(|worker| worker.metric("vigil_cluster_files_written_total"))
        .sum();
    assert!(files_written > 0.0);
    for worker in &detect_workers {
        assert!(
            worker.metric("vigil_cluster_observations_fed_total") > 0.0,
            "a detect worker got no partition of the readings"
        );
    }

    // A device that moves to the other gateway and sends its last readings again (it never
    // saw their PUBACKs, say) gets them acknowledged there, and they are stored once.
    let mover = &devices[0];
    let highest = *acked[&mover.id].iter().max().unwrap();
    let mut connection = V3Device::connect(mover, gateway_b.mqtt).await.unwrap();
    let payloads = (highest - 2..=highest + 3)
        .map(|seq| mover.payload(seq))
        .collect();
    connection
        .publish_all(&mover.topic(), payloads)
        .await
        .unwrap();
    let moved_rows = format!(
        "SELECT count(*) FROM readings WHERE device_id = '{}' AND seq BETWEEN {} AND {}",
        mover.id,
        highest - 2,
        highest + 3
    );
    eventually(
        Duration::from_secs(15),
        "the moved device's readings stored",
        || {
            let (gateway, query) = (&gateway_a, &moved_rows);
            async move { gateway.sql_count(query).await >= 6 * MEASUREMENTS }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gateway_a.sql_count(&moved_rows).await, 6 * MEASUREMENTS);
    let dropped: f64 = store_workers
        .iter()
        .map(|worker| worker.metric("vigil_cluster_duplicates_dropped_total"))
        .sum();
    assert!(
        dropped >= 3.0,
        "{dropped} re-sent seqs dropped by the store workers"
    );

    // A quarantine through gateway a cuts off a device connected to gateway b within a second,
    // and both refuse its logins; a release through gateway b restores them on both.
    let mut connection = V3Device::connect(&isolated, gateway_b.mqtt).await.unwrap();
    let decided = Instant::now();
    gateway_a.cli(&["devices", "quarantine", &isolated.id]);
    assert!(
        connection.closed_within(Duration::from_secs(5)).await,
        "the session on gateway b stayed open"
    );
    let cut_off_after = decided.elapsed();
    assert!(login_refused(&isolated, &gateway_b).await);
    assert!(login_refused(&isolated, &gateway_a).await);
    // A gateway started now learns the quarantine list (and the devices) before it serves.
    let gateway_c = node("gateway-c", "gateway");
    assert!(login_refused(&isolated, &gateway_c).await);
    eprintln!(
        "cluster test: quarantine on gateway a closed the session on gateway b after {cut_off_after:?}"
    );
    gateway_b.cli(&["devices", "release", &isolated.id]);
    for (name, gateway) in [("a", &gateway_a), ("c", &gateway_c)] {
        eventually(
            Duration::from_secs(10),
            &format!("release reaches gateway {name}"),
            || {
                let isolated = &isolated;
                async move { V3Device::connect(isolated, gateway.mqtt).await.is_ok() }
            },
        )
        .await;
    }

    // A device whose key signs a forgery inside its session is refused by the gateway; the
    // detect worker that owns the device sees the event and alerts the SOC.
    let forger = &devices[1];
    let mut connection = V3Device::connect(forger, gateway_b.mqtt).await.unwrap();
    let forged = sign_reading(&SigningKey::from_bytes(&[7; 32]), &forger.reading(100_000));
    // The gateway may close the session on the forgery before it acknowledges anything.
    let _ = connection
        .publish_all(&forger.topic(), vec![forged.encode_to_vec()])
        .await;
    let alert_query = format!(
        "SELECT count(*) FROM alerts WHERE device_id = '{}' AND detector = 'rule.bad_signature'",
        forger.id
    );
    eventually(
        Duration::from_secs(15),
        "an alert from a detect worker",
        || {
            let (workers, query) = (&detect_workers, &alert_query);
            async move {
                let mut alerts = 0;
                for worker in workers {
                    alerts += worker.sql_count(query).await;
                }
                alerts > 0
            }
        },
    )
    .await;

    let seen: HashSet<&str> = acked.keys().map(String::as_str).collect();
    eprintln!(
        "cluster test: 2 gateways, 2 store workers (one killed and restarted), 2 detect \
         workers; {} devices, {acknowledged} acknowledged readings, each stored exactly once; \
         {files_written} Parquet files",
        seen.len()
    );
}
