//! Floods and stalls: while hundreds of connections sit silent or stall half-way through the
//! TLS handshake, and another host floods logins with bad tokens, a device still logs in over
//! plain MQTT and over TLS and its readings are stored. The silent and stalled connections are
//! closed by the connect and handshake timeouts, and the flooding host is throttled, not the
//! device.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{TestDevice, V3Device, publish_over_tls, tls_server};

/// Source address of the login flood: another host as far as the server can tell.
const FLOOD_SOURCE: &str = "127.0.0.3";

/// An MQTT 3.1.1 CONNECT with the given credentials.
fn connect_packet(client_id: &str, password: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let string = |bytes: &[u8], body: &mut Vec<u8>| {
        body.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        body.extend_from_slice(bytes);
    };
    string(b"MQTT", &mut body);
    body.push(4); // protocol level 3.1.1
    body.push(0b1100_0010); // user name, password, clean session
    body.extend_from_slice(&30u16.to_be_bytes());
    string(client_id.as_bytes(), &mut body);
    string(client_id.as_bytes(), &mut body);
    string(password, &mut body);

    let mut packet = vec![0x10];
    let mut length = body.len();
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if length == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

/// One login with a bad token from [`FLOOD_SOURCE`]; returns the CONNACK return code, or
/// `None` when the server closed the connection without one.
async fn bad_login(server: SocketAddr, device_id: String) -> Option<u8> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{FLOOD_SOURCE}:0").parse().unwrap())
        .unwrap();
    let mut stream = socket.connect(server).await.ok()?;
    stream
        .write_all(&connect_packet(&device_id, b"not-a-token"))
        .await
        .ok()?;
    let mut connack = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut connack));
    match read.await {
        Ok(Ok(_)) => Some(connack[3]),
        _ => None,
    }
}

/// `true` once the server has closed the socket (end of stream or reset).
fn closed_by_server(mut socket: TcpStream) -> bool {
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buffer = [0u8; 512];
    loop {
        match socket.read(&mut buffer) {
            Ok(0) => return true,
            // A TLS alert may come before the close.
            Ok(_) => continue,
            Err(error) => return error.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_and_stalled_handshakes_do_not_keep_a_device_out() {
    let dir = tempfile::tempdir().unwrap();
    let (server, tls_address, cert) = tls_server(dir.path());
    let device = TestDevice::new("flood-survivor");
    server.enroll(&[&device]);

    // Silent sockets on both ports, and TLS handshakes that stall after a partial record.
    let silent_plain: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(server.mqtt).unwrap())
        .collect();
    let silent_tls: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(tls_address).unwrap())
        .collect();
    let stalled_tls: Vec<TcpStream> = (0..100)
        .map(|_| {
            use std::io::Write as _;
            let mut socket = TcpStream::connect(tls_address).unwrap();
            socket.write_all(&[0x16, 0x03, 0x01, 0x02]).unwrap();
            socket
        })
        .collect();

    // A login flood from another host, under the device's own id and under made-up ones.
    let flood: Vec<_> = (0..150)
        .map(|attempt| {
            let id = if attempt % 2 == 0 {
                device.id.clone()
            } else {
                format!("made-up-{attempt}")
            };
            tokio::spawn(bad_login(server.mqtt, id))
        })
        .collect();
    let mut codes = Vec::new();
    for attempt in flood {
        codes.push(attempt.await.unwrap());
    }
    assert!(
        codes.iter().all(|code| *code != Some(0)),
        "no bad login is accepted: {codes:?}"
    );
    assert!(
        codes.contains(&Some(5)),
        "bad logins are refused as not authorized: {codes:?}"
    );
    assert!(
        server.metric("vigil_ingest_logins_refused_total{reason=\"login_peer_throttled\"}") >= 1.0,
        "the flooding host is throttled"
    );

    // Meanwhile the device logs in from its own host, over plain MQTT and over TLS.
    let mut connection = V3Device::connect(&device, server.mqtt).await.unwrap();
    connection
        .publish_all(&device.topic(), vec![device.payload(1)])
        .await
        .unwrap();
    drop(connection);

    let published = publish_over_tls(dir.path(), tls_address, &cert, &device, device.payload(2));
    assert!(
        published.status.success(),
        "TLS login during the flood: {}",
        String::from_utf8_lossy(&published.stderr)
    );

    let query = format!(
        "SELECT count(DISTINCT seq) FROM readings WHERE device_id = '{}'",
        device.id
    );
    assert_eq!(server.sql_count(&query).await, 2);

    // The connect timeout and the TLS handshake timeout (5 s each) close every stalled socket.
    let still_open = tokio::task::spawn_blocking(move || {
        silent_plain
            .into_iter()
            .chain(silent_tls)
            .chain(stalled_tls)
            .filter(|socket| !closed_by_server(socket.try_clone().unwrap()))
            .count()
    })
    .await
    .unwrap();
    assert_eq!(still_open, 0, "stalled connections left open by the server");
}
