//! Live MQTT sessions, one per device, and the means to close one from any thread.
//!
//! Invariants:
//! - At most one live session per device: a new login replaces the old session, which is told
//!   to close (MQTT's session takeover) and recorded as a security event.
//! - MQTT sinks are tied to the worker thread that owns the connection, so a session is closed
//!   by sending its close order over a channel to a task on that thread.
//! - An entry is removed only by the session that created it (matched by generation), so the
//!   end of a replaced session never removes its successor.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Why the server closes a live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseOrder {
    /// Another session logged in with the same device id.
    Replaced,
    /// The device was quarantined; a notice goes out first where possible.
    Quarantined { reason: String },
    /// The server shed this session's readings; v5 sessions get DISCONNECT 0x97 "quota
    /// exceeded", and the device re-sends after reconnecting.
    Overloaded,
}

#[derive(Debug)]
struct LiveSession {
    generation: u64,
    close: oneshot::Sender<CloseOrder>,
}

/// Every live session, by device id.
#[derive(Debug, Default)]
pub struct SessionTable {
    live: Mutex<HashMap<Arc<str>, LiveSession>>,
    next_generation: AtomicU64,
}

impl SessionTable {
    /// Registers a new session; returns its generation, the receiver of its close order, and
    /// whether it replaced a live one.
    pub fn open(&self, device_id: &Arc<str>) -> (u64, oneshot::Receiver<CloseOrder>, bool) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let (close, receiver) = oneshot::channel();

        let previous = self
            .live
            .lock()
            .insert(device_id.clone(), LiveSession { generation, close });
        let replaced = match previous {
            // The old session may be closing already; then nobody reads the order.
            Some(old) => old.close.send(CloseOrder::Replaced).is_ok(),
            None => false,
        };
        (generation, receiver, replaced)
    }

    /// Forgets a session that ended, unless a newer one took its place.
    pub fn closed(&self, device_id: &str, generation: u64) {
        let mut live = self.live.lock();
        if live
            .get(device_id)
            .is_some_and(|session| session.generation == generation)
        {
            live.remove(device_id);
        }
    }

    /// Orders a device's live session to close. Returns whether there was one.
    pub fn close(&self, device_id: &str, order: CloseOrder) -> bool {
        match self.live.lock().remove(device_id) {
            Some(session) => session.close.send(order).is_ok(),
            None => false,
        }
    }

    /// Closes the device's live session only if it is still the one of `generation`.
    pub fn close_generation(&self, device_id: &str, generation: u64, order: CloseOrder) -> bool {
        let mut live = self.live.lock();
        if live
            .get(device_id)
            .is_some_and(|session| session.generation == generation)
            && let Some(session) = live.remove(device_id)
        {
            return session.close.send(order).is_ok();
        }
        false
    }

    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_connected(&self, device_id: &str) -> bool {
        self.live.lock().contains_key(device_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_login_replaces_the_old_session() {
        let table = SessionTable::default();
        let id: Arc<str> = Arc::from("d");
        let (first, mut first_close, replaced) = table.open(&id);
        assert!(!replaced);
        let (second, _second_close, replaced) = table.open(&id);
        assert!(replaced);
        assert_eq!(first_close.try_recv().unwrap(), CloseOrder::Replaced);

        table.closed("d", first);
        assert!(
            table.is_connected("d"),
            "the old session's end keeps the new one"
        );
        table.closed("d", second);
        assert!(!table.is_connected("d"));
    }
}
