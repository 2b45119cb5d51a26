//! Load shedding: one bound on the bytes of readings the server holds, and the refusal of new
//! work once devices have been held back for too long.
//!
//! A reading holds its share of the budget from the moment its payload passed the checks that
//! need no key until its PUBACK is decided, through the verifier queue, the write-ahead log's
//! queue and its group commit. While storage keeps up, the budget is never reached: full
//! queues stop a connection's handler first, which stops the reading of its socket, and the
//! device waits with its in-flight window full (back-pressure). When storage stalls, the
//! waiting grows; a reading that cannot take its share, or cannot be queued, within
//! `overload_wait_ms` is shed: refused as `overloaded` and never stored, so the device sends it
//! again later. From then on, for `overload_wait_ms` after the last shed reading, new logins are
//! refused as "server unavailable", so that devices do not pile onto a server that cannot store
//! what it already has.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::now_ms;

/// What a reading costs beyond its payload while it is held: the job, its channels, its log
/// entry and the copies made for the detector. An estimate, so that a flood of tiny readings
/// cannot hide behind a bound counted in payload bytes alone.
pub const READING_OVERHEAD_BYTES: usize = 512;

/// The bound on bytes held for readings whose PUBACK is not decided yet.
#[derive(Debug)]
pub struct PendingBudget {
    permits: Semaphore,
    limit_bytes: usize,
    wait: Duration,
    /// Until when (Unix ms) the server sheds new work; 0 when it has never shed.
    shedding_until_ms: AtomicI64,
    held_bytes: Gauge,
}

/// A reading's share of the budget, given back on drop.
#[derive(Debug)]
pub struct Held<'a> {
    _permit: SemaphorePermit<'a>,
    bytes: i64,
    gauge: &'a Gauge,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes);
    }
}

impl PendingBudget {
    /// Largest budget: permits are counted in bytes and taken as `u32`.
    pub const MAX_LIMIT_BYTES: usize = u32::MAX as usize;

    /// A budget of `limit_bytes` (at most [`Self::MAX_LIMIT_BYTES`]); a reading waits at most
    /// `wait` for its share and its queue slot.
    pub fn new(limit_bytes: usize, wait: Duration, held_bytes: Gauge) -> Self {
        let limit_bytes = limit_bytes.clamp(READING_OVERHEAD_BYTES, Self::MAX_LIMIT_BYTES);
        Self {
            permits: Semaphore::new(limit_bytes),
            limit_bytes,
            wait,
            shedding_until_ms: AtomicI64::new(0),
            held_bytes,
        }
    }

    /// The longest a reading waits for its share or its queue slot before it is shed.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.limit_bytes - self.permits.available_permits()
    }

    /// Takes the share of a reading of `payload_bytes`, waiting until `deadline` at most.
    /// `None` means the reading must be shed (and the server now sheds new logins too).
    pub async fn hold(
        &self,
        payload_bytes: usize,
        deadline: std::time::Instant,
    ) -> Option<Held<'_>> {
        let bytes = payload_bytes
            .saturating_add(READING_OVERHEAD_BYTES)
            .min(self.limit_bytes);
        // `bytes` is at most `limit_bytes`, which fits a u32.
        let permits = bytes as u32;
        let permit = match self.permits.try_acquire_many(permits) {
            Ok(permit) => permit,
            Err(_) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match tokio::time::timeout(left, self.permits.acquire_many(permits)).await {
                    Ok(Ok(permit)) => permit,
                    // Timed out, or closed (never: the semaphore is not closed).
                    _ => {
                        self.shed();
                        return None;
                    }
                }
            }
        };
        self.held_bytes.inc_by(bytes as i64);
        Some(Held {
            _permit: permit,
            bytes: bytes as i64,
            gauge: &self.held_bytes,
        })
    }

    /// Notes that a reading was shed: new logins are refused for the next `wait`.
    pub fn shed(&self) {
        let until = now_ms().saturating_add(self.wait.as_millis() as i64);
        self.shedding_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// Whether new work is refused now.
    pub fn shedding(&self) -> bool {
        now_ms() < self.shedding_until_ms.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn budget(limit: usize, wait_ms: u64) -> PendingBudget {
        PendingBudget::new(limit, Duration::from_millis(wait_ms), Gauge::default())
    }

    #[tokio::test]
    async fn shares_are_given_back_on_drop() {
        let budget = budget(4 * READING_OVERHEAD_BYTES, 10);
        let deadline = Instant::now() + budget.wait();
        let first = budget.hold(READING_OVERHEAD_BYTES, deadline).await.unwrap();
        assert_eq!(budget.held_bytes(), 2 * READING_OVERHEAD_BYTES);
        assert_eq!(budget.held_bytes.get(), 2 * READING_OVERHEAD_BYTES as i64);
        drop(first);
        assert_eq!(budget.held_bytes(), 0);
        assert_eq!(budget.held_bytes.get(), 0);
        assert!(!budget.shedding());
    }

    #[tokio::test]
    async fn a_reading_that_cannot_get_its_share_in_time_is_shed_and_logins_pause() {
        let budget = budget(2 * READING_OVERHEAD_BYTES, 50);
        let deadline = Instant::now() + budget.wait();
        let _held = budget.hold(READING_OVERHEAD_BYTES, deadline).await.unwrap();
        let started = Instant::now();
        let deadline = started + budget.wait();
        assert!(budget.hold(1, deadline).await.is_none());
        assert!(started.elapsed() >= Duration::from_millis(40));
        assert!(
            budget.shedding(),
            "new work is refused after a shed reading"
        );
    }

    #[tokio::test]
    async fn a_waiting_reading_gets_its_share_when_one_is_given_back() {
        let budget = std::sync::Arc::new(budget(2 * READING_OVERHEAD_BYTES, 5_000));
        let deadline = Instant::now() + budget.wait();
        let held = budget.hold(READING_OVERHEAD_BYTES, deadline).await.unwrap();
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.hold(100, deadline).await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap());
        assert!(!budget.shedding());
    }

    #[tokio::test]
    async fn a_reading_larger_than_the_budget_takes_all_of_it_rather_than_never_passing() {
        let budget = budget(READING_OVERHEAD_BYTES * 2, 10);
        let deadline = Instant::now() + budget.wait();
        let held = budget.hold(1 << 20, deadline).await.unwrap();
        assert_eq!(budget.held_bytes(), budget.limit_bytes());
        drop(held);
    }
}
