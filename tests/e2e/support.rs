//! Starting the server binary, fake devices, and queries.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use arrow_flight::sql::client::FlightSqlServiceClient;
use ed25519_dalek::SigningKey;
use futures::TryStreamExt;
use prost::Message;
use rumqttc::v5::mqttbytes::QoS as V5QoS;
use rumqttc::v5::mqttbytes::v5::{Packet as V5Packet, PubAckReason};
use rumqttc::v5::{
    AsyncClient as V5Client, Event as V5Event, EventLoop as V5EventLoop, MqttOptions as V5Options,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tonic::transport::Channel;
use vigil_proto::v1::{Measurement, Reading};
use vigil_proto::{fresh_login_token, readings_topic, sign_reading};

pub const BIN: &str = env!("CARGO_BIN_EXE_vigil");

/// A `vigil run` child process on free loopback ports.
pub struct Server {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub mqtt: SocketAddr,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub token: String,
    /// The certificate client commands trust when the gRPC port speaks TLS; `None` for
    /// plaintext gRPC.
    pub grpc_ca: Option<PathBuf>,
    /// `RUST_LOG` of the server process.
    pub log_filter: String,
    extra_args: Vec<String>,
    /// Whether the process listens for MQTT (not a cluster's store or detect worker).
    serves_mqtt: bool,
    /// Where the server runs and what `--data-dir` says, when the directory is given relative
    /// to it.
    relative: Option<(PathBuf, PathBuf)>,
}

/// A free loopback port below the kernel's ephemeral range (32768 and up on Linux). A server
/// restarted on its old ports must find them free: a port handed out by `bind(0)` could be
/// taken meanwhile by any client socket of a concurrent test, and the restart would fail.
fn free_port() -> SocketAddr {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Each test process starts at its own offset; ports are never reused within a process.
    let start = std::process::id().wrapping_mul(7919) % COUNT;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + offset) % COUNT) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().unwrap();
        }
    }
}

impl Server {
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    /// Starts with the detector told to propose cut-offs instead of making them, so that a
    /// test can send one bad message after another on the same session and see each refusal.
    pub fn start_without_cut_off(data_dir: &Path) -> Self {
        let config = data_dir.with_extension("alert-only.toml");
        std::fs::write(
            &config,
            "[detect]\ndefault_policy = \"alert_and_confirm\"\n",
        )
        .unwrap();
        Self::start_with(data_dir, &["--config", config.to_str().unwrap()])
    }

    /// Starts with extra `vigil run` arguments (e.g. a config file).
    pub fn start_with(data_dir: &Path, extra_args: &[&str]) -> Self {
        let mut server = Self::unstarted(data_dir, extra_args);
        server.spawn();
        server
    }

    /// A server on free ports, not yet spawned.
    fn unstarted(data_dir: &Path, extra_args: &[&str]) -> Self {
        Server {
            child: None,
            data_dir: data_dir.to_owned(),
            mqtt: free_port(),
            grpc: free_port(),
            http: free_port(),
            token: String::new(),
            grpc_ca: None,
            log_filter: "info".to_owned(),
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
            serves_mqtt: true,
            relative: None,
        }
    }

    /// Starts a process that serves no MQTT (a cluster's store or detect worker, given its
    /// `--role` in `extra_args`); ready once its HTTP port answers.
    pub fn start_worker(data_dir: &Path, extra_args: &[&str]) -> Self {
        let mut server = Self::unstarted(data_dir, extra_args);
        server.serves_mqtt = false;
        server.spawn();
        server
    }

    /// Starts in `working_dir` with `--data-dir` relative to it, as an operator would with the
    /// example config.
    pub fn start_in(working_dir: &Path, relative_data_dir: &Path, extra_args: &[&str]) -> Self {
        let mut server = Self::unstarted(&working_dir.join(relative_data_dir), extra_args);
        server.relative = Some((working_dir.to_owned(), relative_data_dir.to_owned()));
        server.spawn();
        server
    }

    /// Starts with `RUST_LOG` set to `log_filter` and extra `vigil run` arguments.
    pub fn start_logging(data_dir: &Path, log_filter: &str, extra_args: &[&str]) -> Self {
        let mut server = Self::unstarted(data_dir, extra_args);
        server.log_filter = log_filter.to_owned();
        server.spawn();
        server
    }

    /// Starts with TLS on the gRPC port, from the certificate and key in `tls`; client
    /// commands then use `https://localhost:<port>` and trust that certificate.
    pub fn start_with_grpc_tls(data_dir: &Path, tls: &SelfSignedCert) -> Self {
        let config = data_dir.with_extension("grpc-tls.toml");
        std::fs::write(
            &config,
            format!(
                "grpc_tls_cert_path = {:?}\ngrpc_tls_key_path = {:?}\n",
                tls.cert.display().to_string(),
                tls.key.display().to_string()
            ),
        )
        .unwrap();
        let mut server = Self::start_with(data_dir, &["--config", config.to_str().unwrap()]);
        server.grpc_ca = Some(tls.cert.clone());
        server
    }

    /// The URL client commands use for the gRPC port.
    pub fn grpc_url(&self) -> String {
        match self.grpc_ca {
            Some(_) => format!("https://localhost:{}", self.grpc.port()),
            None => format!("http://{}", self.grpc),
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .unwrap();
        let mut command = Command::new(BIN);
        match &self.relative {
            Some((working_dir, data_dir)) => command
                .current_dir(working_dir)
                .arg("run")
                .arg("--data-dir")
                .arg(data_dir),
            None => command.arg("run").arg("--data-dir").arg(&self.data_dir),
        };
        let child = command
            .arg("--mqtt-listen")
            .arg(self.mqtt.to_string())
            .arg("--grpc-listen")
            .arg(self.grpc.to_string())
            .arg("--http-listen")
            .arg(self.http.to_string())
            .args(&self.extra_args)
            .env("RUST_LOG", &self.log_filter)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
        self.token = std::fs::read_to_string(self.data_dir.join("admin.token")).unwrap();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(self.data_dir.with_extension("log"))
                    .unwrap_or_default();
                panic!("server exited with {status} during start-up:\n{log}");
            }
            let http_up = http_get(self.http, "/healthz").is_some_and(|body| body.contains("ok"));
            if http_up && (!self.serves_mqtt || TcpStream::connect(self.mqtt).is_ok()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not start within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Kills the process with SIGKILL: no shutdown code runs.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.kill_9();
        self.spawn();
    }

    /// Everything the server process wrote to its log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap()
    }

    pub fn metrics(&self) -> String {
        http_get(self.http, "/metrics").expect("metrics endpoint answers")
    }

    /// The value of one metric line, e.g. `vigil_ingest_readings_refused_total{reason="replay"}`.
    pub fn metric(&self, name: &str) -> f64 {
        let metrics = self.metrics();
        metrics
            .lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|value| value.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{metrics}"))
    }

    /// Runs the `vigil` binary as a client command against this server, with the admin token.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_as(self.token.trim(), args)
    }

    /// Runs a client command with `token` in `VIGIL_TOKEN`; panics unless it succeeds.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> String {
        let output = self.run_cli(token, args);
        assert!(
            output.status.success(),
            "vigil {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs a client command with `token` in `VIGIL_TOKEN`; panics unless it fails, and
    /// returns its stderr.
    pub fn cli_fails_as(&self, token: &str, args: &[&str]) -> String {
        let output = self.run_cli(token, args);
        assert!(
            !output.status.success(),
            "vigil {args:?} succeeded: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stderr).unwrap()
    }

    /// Starts a client command with `token` in `VIGIL_TOKEN`, its stdout and stderr piped, for
    /// commands that run until stopped (`alerts tail`).
    pub fn spawn_cli_as(&self, token: &str, args: &[&str]) -> Child {
        self.cli_command(token, args).spawn().unwrap()
    }

    /// A client command against this server's gRPC port, with `token` in `VIGIL_TOKEN`.
    fn cli_command(&self, token: &str, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .arg("--server")
            .arg(self.grpc_url())
            .env("VIGIL_TOKEN", token)
            .env_remove("VIGIL_CA_CERT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ca) = &self.grpc_ca {
            command.arg("--ca-cert").arg(ca);
        }
        command
    }

    /// Runs a client command, killing it if it has not ended within 60 s.
    fn run_cli(&self, token: &str, args: &[&str]) -> std::process::Output {
        let child = self.cli_command(token, args).spawn().unwrap();
        let pid = child.id();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || sender.send(child.wait_with_output()));
        match receiver.recv_timeout(Duration::from_secs(60)) {
            Ok(output) => output.unwrap(),
            Err(_) => {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                panic!("vigil {args:?} did not end within 60 s");
            }
        }
    }

    pub async fn sql(&self, query: &str) -> Vec<RecordBatch> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = FlightSqlServiceClient::new(channel);
        client.set_token(self.token.trim().to_owned());
        let info = client.execute(query.to_owned(), None).await.unwrap();
        let mut batches = Vec::new();
        for endpoint in info.endpoint {
            let stream = client.do_get(endpoint.ticket.unwrap()).await.unwrap();
            batches.extend(stream.try_collect::<Vec<_>>().await.unwrap());
        }
        batches
    }

    /// A query whose answer is one integer.
    pub async fn sql_count(&self, query: &str) -> i64 {
        let batches = self.sql(query).await;
        let batch = batches
            .iter()
            .find(|batch| batch.num_rows() > 0)
            .expect("one row");
        let column =
            arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Int64).unwrap();
        column
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap()
            .value(0)
    }

    /// Enrolls devices with the `vigil devices import` command.
    pub fn enroll(&self, devices: &[&TestDevice]) {
        let mut csv = String::from("device_id,public_key_hex,class\n");
        for device in devices {
            csv.push_str(&format!(
                "{},{},pulse_oximeter\n",
                device.id,
                device.public_key_hex()
            ));
        }
        let path = self
            .data_dir
            .with_extension(format!("{}.csv", rand::random::<u32>()));
        std::fs::write(&path, csv).unwrap();
        self.cli(&["devices", "import", path.to_str().unwrap()]);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// A self-signed server certificate for `localhost` and 127.0.0.1, made by openssl, and its
/// key; a client trusts it by naming it as its CA certificate.
pub struct SelfSignedCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl SelfSignedCert {
    /// Writes `cert.pem` and `key.pem` (P-256) into `dir`.
    pub fn generate(dir: &Path) -> Self {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let generated = Command::new("openssl")
            .args(["req", "-x509", "-nodes", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:P-256"])
            .args(["-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            // A server certificate, not a CA: webpki refuses a CA used as an end entity.
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-addext", "keyUsage=critical,digitalSignature"])
            .args(["-addext", "extendedKeyUsage=serverAuth"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl runs");
        assert!(
            generated.status.success(),
            "{}",
            String::from_utf8_lossy(&generated.stderr)
        );
        Self { cert, key }
    }
}

/// A minimal HTTP/1.1 GET; `None` when nothing answers.
pub fn http_get(address: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A device with its own key, as the device side holds it.
#[derive(Clone)]
pub struct TestDevice {
    pub id: String,
    pub key: SigningKey,
}

impl TestDevice {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            key: SigningKey::from_bytes(&rand::random()),
        }
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    pub fn token(&self) -> String {
        fresh_login_token(&self.key, &self.id, now_s(), 120)
    }

    pub fn topic(&self) -> String {
        readings_topic(&self.id)
    }

    pub fn reading(&self, seq: u64) -> Reading {
        Reading {
            device_id: self.id.clone(),
            seq,
            sampled_at_ms: now_ms(),
            measurements: vec![
                Measurement {
                    metric: "spo2_pct".into(),
                    value: 97.0 + (seq % 3) as f64,
                },
                Measurement {
                    metric: "heart_rate_bpm".into(),
                    value: 70.0 + (seq % 7) as f64,
                },
            ],
        }
    }

    pub fn payload(&self, seq: u64) -> Vec<u8> {
        sign_reading(&self.key, &self.reading(seq)).encode_to_vec()
    }

    pub fn options(&self, mqtt: SocketAddr) -> MqttOptions {
        let mut options = MqttOptions::new(&self.id, mqtt.ip().to_string(), mqtt.port());
        options.set_credentials(&self.id, self.token());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        options
    }
}

/// An MQTT 3.1.1 device connection driven by the test.
pub struct V3Device {
    pub client: AsyncClient,
    pub events: EventLoop,
}

impl V3Device {
    /// Connects and waits for the CONNACK; `Err` carries the connection error.
    pub async fn connect(
        device: &TestDevice,
        mqtt: SocketAddr,
    ) -> Result<Self, rumqttc::ConnectionError> {
        Self::connect_with(device.options(mqtt)).await
    }

    pub async fn connect_with(options: MqttOptions) -> Result<Self, rumqttc::ConnectionError> {
        let (client, mut events) = AsyncClient::new(options, 1024);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(Self { client, events }),
                Ok(Ok(_)) => continue,
                Ok(Err(error)) => return Err(error),
                Err(_) => panic!("no CONNACK within 10 s"),
            }
        }
    }

    /// Publishes every payload with QoS 1 and waits until each has its PUBACK.
    pub async fn publish_all(
        &mut self,
        topic: &str,
        payloads: Vec<Vec<u8>>,
    ) -> Result<usize, String> {
        let expected = payloads.len();
        let client = self.client.clone();
        let topic = topic.to_owned();
        let sender = tokio::spawn(async move {
            for payload in payloads {
                client
                    .publish(&topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
            }
        });

        let mut acked = 0;
        while acked < expected {
            match tokio::time::timeout(Duration::from_secs(20), self.events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(format!("after {acked} acks: {error}")),
                Err(_) => return Err(format!("timed out after {acked} of {expected} acks")),
            }
        }
        sender.await.unwrap();
        Ok(acked)
    }

    /// Polls until the server closes the connection; `true` if it did within `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => return true,
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Waits until the server has processed everything the test sent, by the metrics.
pub async fn wait_for(mut condition: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A device on MQTT v5, whose PUBACKs carry the server's reason codes.
pub struct V5Device {
    client: V5Client,
    events: V5EventLoop,
}

impl V5Device {
    pub async fn connect(device: &TestDevice, server: &Server) -> Self {
        let mut options =
            V5Options::new(&device.id, server.mqtt.ip().to_string(), server.mqtt.port());
        options.set_credentials(&device.id, device.token());
        let (client, mut events) = V5Client::new(options, 64);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll())
                .await
                .unwrap()
            {
                Ok(V5Event::Incoming(V5Packet::ConnAck(_))) => return Self { client, events },
                Ok(_) => continue,
                Err(error) => panic!("v5 connect failed: {error}"),
            }
        }
    }

    /// Publishes one message and returns the PUBACK's reason code.
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> PubAckReason {
        self.client
            .publish(topic, V5QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.events.poll())
                .await
                .unwrap()
            {
                Ok(V5Event::Incoming(V5Packet::PubAck(ack))) => return ack.reason,
                Ok(_) => continue,
                Err(error) => panic!("v5 connection failed: {error}"),
            }
        }
    }
}

/// A server with MQTT over TLS on a port of its own; returns it, the TLS address and the
/// certificate a client trusts.
pub fn tls_server(dir: &Path) -> (Server, SocketAddr, PathBuf) {
    let SelfSignedCert { cert, key } = SelfSignedCert::generate(dir);
    let tls_address = free_port();
    let config = dir.join("vigil-tls.toml");
    std::fs::write(
        &config,
        format!(
            "[ingest]\ntls_cert_path = {:?}\ntls_key_path = {:?}\nmqtt_tls_listen = \"{tls_address}\"\n\n\
             [detect]\ndefault_policy = \"alert_and_confirm\"\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let server = Server::start_with(&dir.join("data"), &["--config", config.to_str().unwrap()]);
    (server, tls_address, cert)
}

/// Publishes one reading with QoS 1 over MQTT/TLS with `mosquitto_pub`, an independent client,
/// trusting `cert`; returns its output.
pub fn publish_over_tls(
    dir: &Path,
    tls_address: SocketAddr,
    cert: &Path,
    device: &TestDevice,
    payload: Vec<u8>,
) -> std::process::Output {
    let payload_file = dir.join(format!("{}.reading.bin", device.id));
    std::fs::write(&payload_file, payload).unwrap();
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &tls_address.port().to_string()])
        .arg("--cafile")
        .arg(cert)
        .arg("--insecure")
        .args(["-V", "mqttv311", "-q", "1"])
        .args(["-i", &device.id, "-u", &device.id, "-P", &device.token()])
        .args(["-t", &device.topic()])
        .arg("-f")
        .arg(&payload_file)
        .output()
        .unwrap()
}
