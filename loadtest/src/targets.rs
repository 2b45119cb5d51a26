//! MQTT servers the load test starts and measures: vigil itself (the release binary, with a
//! fresh data directory), Mosquitto from the operating system, and rumqttd embedded in the
//! `rumqttd-peer` binary. Each runs as a child process on free loopback ports and is killed
//! when its handle is dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::fleet::{SimDevice, enrollment_csv};

/// How long a server has to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of the vigil server the load test starts: a bound on clock skew that admits a
/// corpus signed in an earlier run (its `sampled_at_ms` lags the send time by its age); the
/// rest are the defaults.
const VIGIL_CONFIG: &str = "[ingest]\n\
     # A signed corpus is reused for up to a week; its readings carry their signing time.\n\
     max_clock_skew_ms = 604800000\n";

/// Which server a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// vigil: login check, batch verification, write-ahead log, hot tier, detection.
    Vigil,
    /// Mosquitto 2: a broker alone, QoS 1, no authentication, no persistence.
    Mosquitto,
    /// rumqttd 0.20: a broker alone, QoS 1, no authentication.
    Rumqttd,
}

impl TargetKind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vigil => "vigil",
            Self::Mosquitto => "mosquitto",
            Self::Rumqttd => "rumqttd",
        }
    }
}

/// A server process started for one measurement.
#[derive(Debug)]
pub struct RunningTarget {
    /// Which server this is.
    pub kind: TargetKind,
    /// Its MQTT listener.
    pub mqtt: SocketAddr,
    /// Its gRPC address (`http://…`), vigil only.
    pub server_url: Option<String>,
    /// Its admin token, vigil only.
    pub token: Option<String>,
    child: Child,
    /// Data directory (vigil) or configuration (Mosquitto); removed on drop.
    scratch: tempfile::TempDir,
}

impl RunningTarget {
    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts vigil from `binary` with a fresh data directory.
    ///
    /// # Errors
    ///
    /// The binary cannot be started, or it exits or does not listen within a minute.
    pub fn start_vigil(binary: &Path) -> anyhow::Result<Self> {
        let scratch = tempfile::Builder::new()
            .prefix("vigil-loadtest-")
            .tempdir()?;
        let data_dir = scratch.path().join("data");
        let config = scratch.path().join("vigil.toml");
        std::fs::write(&config, VIGIL_CONFIG)?;
        let (mqtt, grpc, http) = (free_port()?, free_port()?, free_port()?);

        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--mqtt-listen", &mqtt.to_string()])
            .args(["--grpc-listen", &grpc.to_string()])
            .args(["--http-listen", &http.to_string()])
            .env("RUST_LOG", "warn");
        let mut target = Self::spawn(TargetKind::Vigil, command, binary, scratch, mqtt)?;
        target.server_url = Some(format!("http://{grpc}"));
        target.wait_listening(&[mqtt, grpc])?;

        let token_path = data_dir.join("admin.token");
        let token = std::fs::read_to_string(&token_path)
            .with_context(|| format!("vigil did not write {}", token_path.display()))?;
        target.token = Some(token.trim().to_owned());
        Ok(target)
    }

    /// Starts Mosquitto from `binary` with a generated configuration: one loopback listener,
    /// anonymous clients, no persistence.
    ///
    /// # Errors
    ///
    /// As [`RunningTarget::start_vigil`].
    pub fn start_mosquitto(binary: &Path) -> anyhow::Result<Self> {
        let scratch = tempfile::Builder::new()
            .prefix("mosquitto-loadtest-")
            .tempdir()?;
        let mqtt = free_port()?;
        let config = scratch.path().join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {} {}\nallow_anonymous true\npersistence false\n\
                 max_connections -1\nmax_inflight_messages 0\nmax_queued_messages 10000\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n",
                mqtt.port(),
                mqtt.ip()
            ),
        )?;
        let mut command = Command::new(binary);
        command.arg("-c").arg(&config);
        let mut target = Self::spawn(TargetKind::Mosquitto, command, binary, scratch, mqtt)?;
        target.wait_listening(&[mqtt])?;
        Ok(target)
    }

    /// Starts the `rumqttd-peer` binary on a free loopback port.
    ///
    /// # Errors
    ///
    /// As [`RunningTarget::start_vigil`].
    pub fn start_rumqttd(binary: &Path, max_connections: usize) -> anyhow::Result<Self> {
        let scratch = tempfile::Builder::new()
            .prefix("rumqttd-loadtest-")
            .tempdir()?;
        let mqtt = free_port()?;
        let mut command = Command::new(binary);
        command
            .arg(mqtt.to_string())
            .arg(max_connections.to_string())
            .env("RUST_LOG", "error");
        let mut target = Self::spawn(TargetKind::Rumqttd, command, binary, scratch, mqtt)?;
        target.wait_listening(&[mqtt])?;
        Ok(target)
    }

    /// Starts `command` with its stderr in `server.log` in `scratch`.
    fn spawn(
        kind: TargetKind,
        mut command: Command,
        binary: &Path,
        scratch: tempfile::TempDir,
        mqtt: SocketAddr,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(scratch.path().join("server.log"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Self {
            kind,
            mqtt,
            server_url: None,
            token: None,
            child,
            scratch,
        })
    }

    /// The server's log so far (stderr), for error messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.path().join("server.log")).unwrap_or_default()
    }

    fn wait_listening(&mut self, addresses: &[SocketAddr]) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} during start-up:\n{}",
                    self.kind.name(),
                    self.log()
                );
            }
            let listening = addresses.iter().all(|address| {
                TcpStream::connect_timeout(address, Duration::from_millis(200)).is_ok()
            });
            if listening {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not listen on {addresses:?} within {} s:\n{}",
                    self.kind.name(),
                    START_TIMEOUT.as_secs(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunningTarget {
    fn drop(&mut self) {
        // The server may have exited already; either way it is gone afterwards.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port that was free a moment ago.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("no free loopback port")?;
    Ok(listener.local_addr()?)
}

/// Enrolls `devices` with `vigil devices import`, run from `vigil_binary` against the server's
/// gRPC address with an admin token.
///
/// # Errors
///
/// The command cannot be started or reports an error (its stderr is in the message).
pub fn enroll(
    vigil_binary: &Path,
    server_url: &str,
    token: &str,
    devices: &[SimDevice],
) -> anyhow::Result<()> {
    let csv = tempfile::Builder::new()
        .prefix("fleet-")
        .suffix(".csv")
        .tempfile()?;
    std::fs::write(csv.path(), enrollment_csv(devices))?;
    let output = Command::new(vigil_binary)
        .args(["devices", "import"])
        .arg(csv.path())
        .args(["--server", server_url])
        .env("VIGIL_TOKEN", token)
        .output()
        .with_context(|| format!("cannot start {}", vigil_binary.display()))?;
    if !output.status.success() {
        bail!(
            "vigil devices import failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Where the binaries of this build live: the directory of the running executable, with
/// `deps/` stripped (test executables live there).
pub fn build_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Some(dir)
}

/// The `rumqttd-peer` binary built for the same profile as this one: it is a workspace of its
/// own (see its manifest), built into `target/rumqttd-peer/<profile>/`.
pub fn default_rumqttd_peer() -> Option<PathBuf> {
    let build_dir = build_dir()?;
    let profile = build_dir.file_name()?.to_owned();
    let target_dir = build_dir.parent()?;
    Some(
        target_dir
            .join("rumqttd-peer")
            .join(profile)
            .join("rumqttd-peer"),
    )
}

/// Mosquitto as Debian installs it.
pub const MOSQUITTO_BIN: &str = "/usr/sbin/mosquitto";
