//! The replay guard: one device's readings are stored once, in rising `seq` order.
//!
//! Invariants:
//! - Each device belongs to exactly one verifier shard, and only that shard's thread touches
//!   the device's state, so no lock is needed and checks happen in arrival order.
//! - `highest_seq` is the highest seq accepted for storage; `recent` holds the signature
//!   digests of the last [`vigil_store::RECENT_DIGESTS`] accepted readings.
//! - The state is rebuilt on start from the store's durable copy (snapshot plus write-ahead
//!   log), which is updated by the writer in the same order, so after a restart an exact re-send
//!   is still recognised and a replay still refused.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use vigil_store::{RECENT_DIGESTS, SeqState};

/// The guard's verdict on one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// Above the highest seq: store it. `gap` counts skipped seqs.
    New { gap: u64 },
    /// Same seq and signature as a stored reading: acknowledge again, store nothing.
    Resend,
    /// Not above the highest seq and not an exact re-send.
    Replay { highest_seq: u64 },
    /// Further above the highest seq than the configured bound.
    JumpTooFar,
}

/// Per-device sequence state of one verifier shard.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    devices: HashMap<Arc<str>, SeqState>,
    max_seq_jump: u64,
    /// A device this guard has no state for takes its first seq as its baseline (its stored
    /// readings are not known here).
    unknown_baseline: bool,
}

impl ReplayGuard {
    pub fn new(max_seq_jump: u64) -> Self {
        Self {
            devices: HashMap::new(),
            max_seq_jump,
            unknown_baseline: false,
        }
    }

    /// A guard that does not know every stored reading (a cluster gateway: the store workers
    /// do, and drop seqs already stored): a device it has no state for starts from the first
    /// seq it sends, without the jump check.
    pub fn with_unknown_baseline(mut self) -> Self {
        self.unknown_baseline = true;
        self
    }

    /// Restores one device's state from the store.
    pub fn restore(&mut self, device_id: Arc<str>, state: SeqState) {
        self.devices.insert(device_id, state);
    }

    /// Classifies a reading and, when it is new, records it as accepted.
    /// Replaces every device's state with what `durable` says was stored (none: nothing),
    /// dropping what this guard counted as stored but never became durable.
    pub fn resync(&mut self, durable: impl Fn(&str) -> Option<SeqState>) {
        self.devices
            .retain(|device_id, state| match durable(device_id) {
                Some(stored) => {
                    *state = stored;
                    true
                }
                None => false,
            });
    }

    pub fn check(&mut self, device_id: &Arc<str>, seq: u64, digest: [u8; 16]) -> SeqCheck {
        let state = match self.devices.get_mut(device_id) {
            Some(state) => state,
            None => {
                let highest_seq = if self.unknown_baseline {
                    seq.saturating_sub(1)
                } else {
                    0
                };
                self.devices
                    .entry(device_id.clone())
                    .or_insert_with(|| SeqState {
                        highest_seq,
                        recent: VecDeque::new(),
                    })
            }
        };

        if seq <= state.highest_seq {
            let resend = state.recent.iter().any(|&(s, d)| s == seq && d == digest);
            return if resend {
                SeqCheck::Resend
            } else {
                SeqCheck::Replay {
                    highest_seq: state.highest_seq,
                }
            };
        }
        if seq - state.highest_seq > self.max_seq_jump {
            return SeqCheck::JumpTooFar;
        }

        let gap = seq - state.highest_seq - 1;
        state.highest_seq = seq;
        if state.recent.len() == RECENT_DIGESTS {
            state.recent.pop_front();
        }
        state.recent.push_back((seq, digest));
        SeqCheck::New { gap }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_resend_replay_and_jump() {
        let mut guard = ReplayGuard::new(1000);
        let id: Arc<str> = Arc::from("d");
        assert_eq!(guard.check(&id, 1, [1; 16]), SeqCheck::New { gap: 0 });
        assert_eq!(guard.check(&id, 4, [4; 16]), SeqCheck::New { gap: 2 });
        assert_eq!(guard.check(&id, 4, [4; 16]), SeqCheck::Resend);
        assert_eq!(guard.check(&id, 1, [1; 16]), SeqCheck::Resend);
        assert_eq!(
            guard.check(&id, 4, [9; 16]),
            SeqCheck::Replay { highest_seq: 4 }
        );
        assert_eq!(
            guard.check(&id, 2, [2; 16]),
            SeqCheck::Replay { highest_seq: 4 },
            "a gap is not refillable"
        );
        assert_eq!(guard.check(&id, 1005, [5; 16]), SeqCheck::JumpTooFar);
        assert_eq!(guard.check(&id, 1004, [5; 16]), SeqCheck::New { gap: 999 });
    }

    #[test]
    fn first_seq_must_be_within_the_jump_bound() {
        let mut guard = ReplayGuard::new(10);
        let id: Arc<str> = Arc::from("d");
        assert_eq!(guard.check(&id, u64::MAX, [1; 16]), SeqCheck::JumpTooFar);
        assert_eq!(guard.check(&id, 10, [1; 16]), SeqCheck::New { gap: 9 });
    }

    #[test]
    fn a_guard_without_the_stored_readings_takes_a_devices_first_seq_as_its_baseline() {
        let mut guard = ReplayGuard::new(10).with_unknown_baseline();
        let id: Arc<str> = Arc::from("d");
        assert_eq!(
            guard.check(&id, 5_000_000, [1; 16]),
            SeqCheck::New { gap: 0 }
        );
        assert_eq!(guard.check(&id, 5_000_000, [1; 16]), SeqCheck::Resend);
        assert_eq!(guard.check(&id, 5_000_100, [2; 16]), SeqCheck::JumpTooFar);
        assert_eq!(
            guard.check(&id, 5_000_001, [3; 16]),
            SeqCheck::New { gap: 0 }
        );
    }

    #[test]
    fn restored_state_recognises_resends() {
        let mut guard = ReplayGuard::new(10);
        let id: Arc<str> = Arc::from("d");
        let recent = VecDeque::from([(7, [7; 16])]);
        guard.restore(
            id.clone(),
            SeqState {
                highest_seq: 7,
                recent,
            },
        );
        assert_eq!(guard.check(&id, 7, [7; 16]), SeqCheck::Resend);
        assert_eq!(
            guard.check(&id, 6, [6; 16]),
            SeqCheck::Replay { highest_seq: 7 }
        );
    }
}
