//! A Kafka-protocol stand-in for trying a cluster on one machine where no Kafka can run:
//! librdkafka's mock cluster, on a loopback port, until the process is killed. It keeps
//! everything in memory and compacts nothing; it is for experiments and measurements, never
//! for devices' readings.
//!
//! ```sh
//! cargo run --release -p vigil-cluster --example mock_kafka -- 12   # partitions
//! ```
//!
//! Prints the bootstrap address to give `vigil run --brokers`.

use rdkafka::mocking::MockCluster;

fn main() {
    let partitions: i32 = std::env::args()
        .nth(1)
        .map_or(12, |text| text.parse().expect("partitions is a number"));
    let cluster = MockCluster::new(1).expect("mock cluster starts");
    for (topic, count) in [
        ("vigil.readings", partitions),
        ("vigil.events", partitions),
        ("vigil.devices", 1),
    ] {
        cluster
            .create_topic(topic, count, 1)
            .expect("topic is created");
    }
    println!("{}", cluster.bootstrap_servers());
    loop {
        std::thread::park();
    }
}
