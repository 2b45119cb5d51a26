//! Peers whose logins are refused for a while, without checking them, after the detector
//! saw too many failed logins from them.
//!
//! Throttling works on the network address, never on a device id: anyone can fail logins
//! under a device's id, so blocking the id would let an attacker silence a patient's monitor.
//! The table is bounded; expired entries are dropped as new ones arrive.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Most peers throttled at once; beyond it new throttles are not recorded.
const MAX_THROTTLED_PEERS: usize = 100_000;

/// The throttled peers, by IP address.
#[derive(Debug, Default)]
pub struct PeerThrottle {
    until: Mutex<HashMap<String, Instant>>,
}

impl PeerThrottle {
    /// Refuses logins from `peer_ip` for `duration`.
    pub fn throttle(&self, peer_ip: &str, duration: Duration) {
        let now = Instant::now();
        let mut until = self.until.lock();
        if until.len() >= MAX_THROTTLED_PEERS {
            until.retain(|_, deadline| *deadline > now);
            if until.len() >= MAX_THROTTLED_PEERS {
                tracing::warn!(peer = peer_ip, "throttle table full; peer not throttled");
                return;
            }
        }
        until.insert(peer_ip.to_owned(), now + duration);
    }

    /// Whether logins from `peer` (`ip:port` or a bare IP) are refused now.
    pub fn is_throttled(&self, peer: &str) -> bool {
        let mut until = self.until.lock();
        if until.is_empty() {
            return false;
        }
        let ip = peer_ip(peer);
        match until.get(ip) {
            Some(deadline) if *deadline > Instant::now() => true,
            Some(_) => {
                until.remove(ip);
                false
            }
            None => false,
        }
    }
}

/// The IP address part of `ip:port` (or `[v6]:port`).
pub fn peer_ip(peer: &str) -> &str {
    match peer.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => {
            host.trim_start_matches('[').trim_end_matches(']')
        }
        _ => peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_applies_to_every_port_of_the_peer_and_expires() {
        let throttle = PeerThrottle::default();
        throttle.throttle("10.0.0.7", Duration::from_millis(50));
        assert!(throttle.is_throttled("10.0.0.7:5555"));
        assert!(throttle.is_throttled("10.0.0.7:6666"));
        assert!(!throttle.is_throttled("10.0.0.8:5555"));
        std::thread::sleep(Duration::from_millis(80));
        assert!(!throttle.is_throttled("10.0.0.7:5555"));
    }

    #[test]
    fn ipv6_peers_lose_their_port() {
        assert_eq!(peer_ip("[::1]:1883"), "::1");
        assert_eq!(peer_ip("127.0.0.1:1883"), "127.0.0.1");
        assert_eq!(peer_ip("unknown"), "unknown");
    }
}
