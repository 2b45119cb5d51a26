//! The order in which a connection's PUBLISH packets arrived on the wire.
//!
//! ntex-mqtt runs the handlers of in-flight publishes concurrently and does not start them in
//! the order the packets arrived: one may be polled at once while an earlier one waits to be
//! scheduled. A handler cannot learn its packet's place from the call alone, so an I/O filter
//! below the MQTT codec scans the byte stream, numbers every PUBLISH as it passes, and notes
//! its packet id. A handler claims its number by packet id and queues its reading only once
//! every earlier publish of the connection has queued its own or given up, so a later reading
//! never overtakes an earlier one and makes it look like a replay.
//!
//! The scanner reads only the fixed header, the topic length and the packet id; it keeps no
//! payload bytes. Should it lose the framing (the MQTT decoder then ends the connection anyway),
//! handlers stop waiting for order rather than wait for ever.

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::num::NonZeroU16;
use std::rc::Rc;
use std::time::Duration;

use ntex::io::{FilterBuf, FilterLayer};

/// Announced but unclaimed publishes kept at most; older ones are forgotten.
const MAX_UNCLAIMED: usize = 4096;

/// Longest wait for earlier publishes that have not reached their handler (a connection that
/// is being closed drops them). An earlier publish whose handler has claimed its number is
/// waited for without a limit: its handler gives its place up in bounded time (it queues its
/// reading or sheds it within the overload deadline), and going on without it would let a later
/// reading overtake it.
const MAX_ORDER_WAIT: Duration = Duration::from_secs(2);

/// MQTT control packet type of PUBLISH.
const PUBLISH: u8 = 3;

/// One connection's arrival numbers and the progress of their handlers.
#[derive(Debug, Default)]
pub struct ArrivalOrder {
    announced: Cell<u64>,
    unclaimed: RefCell<VecDeque<(u64, Option<NonZeroU16>)>>,
    /// Every arrival below this number has finished.
    finished_below: Cell<u64>,
    /// Finished arrivals at or above `finished_below`.
    finished: RefCell<BTreeSet<u64>>,
    lost_framing: Cell<bool>,
    changed: tokio::sync::Notify,
    /// [`MAX_ORDER_WAIT`] unless a test shortens it.
    unclaimed_wait: Cell<Option<Duration>>,
}

impl ArrivalOrder {
    fn announce(&self, packet_id: Option<NonZeroU16>) {
        let number = self.announced.get();
        self.announced.set(number + 1);
        let mut unclaimed = self.unclaimed.borrow_mut();
        if unclaimed.len() == MAX_UNCLAIMED
            && let Some((forgotten, _)) = unclaimed.pop_front()
        {
            drop(unclaimed);
            self.finish(forgotten);
            unclaimed = self.unclaimed.borrow_mut();
        }
        unclaimed.push_back((number, packet_id));
    }

    /// Claims the arrival number of a decoded publish by its packet id (`None` for QoS 0).
    ///
    /// Without a number (the scanner lost the framing) the ticket does not wait for order.
    pub fn claim(self: &Rc<Self>, packet_id: Option<NonZeroU16>) -> Ticket {
        let mut unclaimed = self.unclaimed.borrow_mut();
        let found = unclaimed.iter().position(|(_, id)| *id == packet_id);
        let number = found.and_then(|index| unclaimed.remove(index).map(|(number, _)| number));
        drop(unclaimed);
        if number.is_some() {
            // Later publishes waiting on this one now wait without a limit.
            self.changed.notify_waiters();
        }
        Ticket {
            order: self.clone(),
            number,
        }
    }

    fn finish(&self, number: u64) {
        let mut finished = self.finished.borrow_mut();
        finished.insert(number);
        let mut below = self.finished_below.get();
        while finished.remove(&below) {
            below += 1;
        }
        self.finished_below.set(below);
        drop(finished);
        self.changed.notify_waiters();
    }
}

/// A publish's place in its connection's arrival order; finishes its place when dropped.
#[derive(Debug)]
pub struct Ticket {
    order: Rc<ArrivalOrder>,
    number: Option<u64>,
}

impl Ticket {
    /// Waits until every earlier publish of the connection has finished, or until an earlier
    /// one has stayed unclaimed by any handler for [`MAX_ORDER_WAIT`].
    pub async fn turn(&self) {
        let Some(number) = self.number else {
            return;
        };
        let limit = self.order.unclaimed_wait.get().unwrap_or(MAX_ORDER_WAIT);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.order.changed.notified();
            if self.order.finished_below.get() >= number || self.order.lost_framing.get() {
                return;
            }
            let earlier_unclaimed = self
                .order
                .unclaimed
                .borrow()
                .front()
                .is_some_and(|(earliest, _)| *earliest < number);
            if !earlier_unclaimed {
                changed.await;
            } else if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::debug!(
                    arrival = number,
                    "earlier publishes did not reach their handlers; going on"
                );
                return;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(number) = self.number {
            self.order.finish(number);
        }
    }
}

/// Where the scanner is in the byte stream.
#[derive(Debug, Clone, Copy)]
enum Scan {
    /// At the first byte of a packet.
    PacketStart,
    /// Reading the remaining-length varint.
    Length {
        publish_qos: Option<u8>,
        value: u32,
        shift: u32,
    },
    /// Inside a packet body, `left` bytes to go.
    Body {
        left: u32,
        publish: Option<PublishScan>,
    },
    /// The framing is lost; nothing more is scanned.
    Lost,
}

/// Progress through a PUBLISH's variable header towards its packet id.
#[derive(Debug, Clone, Copy)]
struct PublishScan {
    qos: u8,
    /// Bytes of the body read so far.
    read: u32,
    topic_len: u16,
    packet_id: u16,
}

/// The I/O filter layer that numbers PUBLISH packets; see the module documentation.
#[derive(Debug)]
pub struct ArrivalScanner {
    order: Rc<ArrivalOrder>,
    state: Cell<Scan>,
}

/// What a handshake queries from the I/O object to find the connection's [`ArrivalOrder`].
#[derive(Debug, Clone)]
pub struct ArrivalHandle(pub Rc<ArrivalOrder>);

impl Default for ArrivalScanner {
    fn default() -> Self {
        Self {
            order: Rc::new(ArrivalOrder::default()),
            state: Cell::new(Scan::PacketStart),
        }
    }
}

impl ArrivalScanner {
    /// The order this scanner feeds.
    pub fn order(&self) -> Rc<ArrivalOrder> {
        self.order.clone()
    }

    /// Scans a chunk of the stream.
    pub fn scan(&self, mut bytes: &[u8]) {
        let mut state = self.state.get();
        while !bytes.is_empty() {
            state = match state {
                Scan::Lost => break,
                Scan::PacketStart => {
                    let first = bytes[0];
                    bytes = &bytes[1..];
                    let publish_qos = (first >> 4 == PUBLISH).then_some((first >> 1) & 0b11);
                    Scan::Length {
                        publish_qos,
                        value: 0,
                        shift: 0,
                    }
                }
                Scan::Length {
                    publish_qos,
                    value,
                    shift,
                } => {
                    let byte = bytes[0];
                    bytes = &bytes[1..];
                    let value = value | (u32::from(byte & 0x7f) << shift);
                    if byte & 0x80 != 0 {
                        if shift == 21 {
                            Scan::Lost
                        } else {
                            Scan::Length {
                                publish_qos,
                                value,
                                shift: shift + 7,
                            }
                        }
                    } else {
                        let publish = publish_qos.map(|qos| PublishScan {
                            qos,
                            read: 0,
                            topic_len: 0,
                            packet_id: 0,
                        });
                        self.body_state(value, publish)
                    }
                }
                Scan::Body { left, publish } => match publish {
                    Some(mut publish) => {
                        let byte = bytes[0];
                        bytes = &bytes[1..];
                        let at = publish.read;
                        publish.read += 1;
                        let topic_end = 2 + u32::from(publish.topic_len);
                        match at {
                            0 => publish.topic_len = u16::from(byte) << 8,
                            1 => publish.topic_len |= u16::from(byte),
                            _ if at == topic_end => publish.packet_id = u16::from(byte) << 8,
                            _ if at == topic_end + 1 => publish.packet_id |= u16::from(byte),
                            _ => {}
                        }
                        let left = left - 1;
                        // The packet id is the last field read; past it the body is skipped.
                        let done = if publish.qos == 0 {
                            at + 1 == topic_end
                        } else {
                            at == topic_end + 1
                        };
                        if done {
                            let packet_id = if publish.qos == 0 {
                                None
                            } else {
                                NonZeroU16::new(publish.packet_id)
                            };
                            self.order.announce(packet_id);
                            self.body_state(left, None)
                        } else {
                            self.body_state(left, Some(publish))
                        }
                    }
                    None => {
                        let skipped = (left as usize).min(bytes.len());
                        bytes = &bytes[skipped..];
                        self.body_state(left - skipped as u32, None)
                    }
                },
            };
        }
        if matches!(state, Scan::Lost) {
            self.order.lost_framing.set(true);
            self.order.changed.notify_waiters();
        }
        self.state.set(state);
    }

    fn body_state(&self, left: u32, publish: Option<PublishScan>) -> Scan {
        if left == 0 {
            if publish.is_some() {
                // A PUBLISH too short for its own header: the decoder refuses it.
                return Scan::Lost;
            }
            Scan::PacketStart
        } else {
            Scan::Body { left, publish }
        }
    }
}

impl FilterLayer for ArrivalScanner {
    fn query(&self, id: TypeId) -> Option<Box<dyn Any>> {
        (id == TypeId::of::<ArrivalHandle>())
            .then(|| Box::new(ArrivalHandle(self.order.clone())) as Box<dyn Any>)
    }

    fn process_read_buf(&self, buf: &FilterBuf<'_>) -> io::Result<()> {
        buf.with_read_buffers(|source, destination| {
            if let Some(source) = source {
                self.scan(source);
                destination.extend_from_slice(source);
                source.clear();
            }
        });
        Ok(())
    }

    fn process_write_buf(&self, buf: &FilterBuf<'_>) -> io::Result<()> {
        buf.with_write_buffers(|source, destination| source.move_to(destination));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, qos: u8, packet_id: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&packet_id.to_be_bytes());
        }
        body.extend_from_slice(payload);
        let mut packet = vec![(PUBLISH << 4) | (qos << 1)];
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

    fn ping() -> Vec<u8> {
        vec![0xc0, 0x00]
    }

    fn announced(scanner: &ArrivalScanner) -> Vec<(u64, Option<u16>)> {
        scanner
            .order
            .unclaimed
            .borrow()
            .iter()
            .map(|(number, id)| (*number, id.map(NonZeroU16::get)))
            .collect()
    }

    #[test]
    fn numbers_publishes_in_stream_order_whatever_the_chunking() {
        let mut stream = Vec::new();
        stream.extend(publish("vigil/v1/devices/a/readings", 1, 7, &[1; 300]));
        stream.extend(ping());
        stream.extend(publish("t", 0, 0, b"qos0"));
        stream.extend(publish("vigil/v1/devices/a/readings", 1, 2, &[]));
        stream.extend(publish("x", 1, 65535, &[9; 20_000]));
        let expected = vec![(0, Some(7)), (1, None), (2, Some(2)), (3, Some(65535))];

        for chunk in [1, 2, 3, 7, 64, 1000, stream.len()] {
            let scanner = ArrivalScanner::default();
            for piece in stream.chunks(chunk) {
                scanner.scan(piece);
            }
            assert_eq!(announced(&scanner), expected, "chunks of {chunk}");
            assert!(!scanner.order.lost_framing.get());
        }
    }

    #[test]
    fn an_overlong_length_loses_the_framing_and_stops_the_waiting() {
        let scanner = ArrivalScanner::default();
        scanner.scan(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(scanner.order.lost_framing.get());
    }

    #[tokio::test]
    async fn a_later_ticket_waits_for_every_earlier_one() {
        let scanner = ArrivalScanner::default();
        for id in 1..=3u16 {
            scanner.scan(&publish("t", 1, id, b"x"));
        }
        let order = scanner.order();
        // Claimed out of order, as ntex may start the handlers.
        let third = order.claim(NonZeroU16::new(3));
        let first = order.claim(NonZeroU16::new(1));
        let second = order.claim(NonZeroU16::new(2));

        let finished = Rc::new(RefCell::new(Vec::new()));
        let local = tokio::task::LocalSet::new();
        for (name, ticket) in [(3, third), (2, second), (1, first)] {
            let finished = finished.clone();
            local.spawn_local(async move {
                ticket.turn().await;
                finished.borrow_mut().push(name);
                drop(ticket);
            });
        }
        local.await;
        assert_eq!(*finished.borrow(), vec![1, 2, 3]);
    }

    /// The limit on waiting for unclaimed publishes, shortened for the tests.
    const SHORT_WAIT: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn a_claimed_earlier_publish_is_waited_for_however_long_it_takes() {
        let scanner = ArrivalScanner::default();
        scanner.order().unclaimed_wait.set(Some(SHORT_WAIT));
        for id in 1..=2u16 {
            scanner.scan(&publish("t", 1, id, b"x"));
        }
        let order = scanner.order();
        let first = order.claim(NonZeroU16::new(1));
        let second = order.claim(NonZeroU16::new(2));

        let local = tokio::task::LocalSet::new();
        let waited = local.spawn_local(async move {
            let started = tokio::time::Instant::now();
            second.turn().await;
            started.elapsed()
        });
        local
            .run_until(async move {
                // The first handler holds its place well past MAX_ORDER_WAIT (a reading
                // waiting for room under overload).
                tokio::time::sleep(SHORT_WAIT * 3).await;
                drop(first);
                let waited = waited.await.unwrap();
                assert!(waited >= SHORT_WAIT * 3, "went on after {waited:?}");
            })
            .await;
    }

    #[tokio::test]
    async fn an_earlier_publish_no_handler_claims_is_given_up_after_the_limit() {
        let scanner = ArrivalScanner::default();
        scanner.order().unclaimed_wait.set(Some(SHORT_WAIT));
        for id in 1..=2u16 {
            scanner.scan(&publish("t", 1, id, b"x"));
        }
        let order = scanner.order();
        let second = order.claim(NonZeroU16::new(2));
        let started = tokio::time::Instant::now();
        second.turn().await;
        assert!(started.elapsed() >= SHORT_WAIT);
    }

    #[tokio::test]
    async fn a_late_claim_lifts_the_limit() {
        let scanner = ArrivalScanner::default();
        scanner.order().unclaimed_wait.set(Some(SHORT_WAIT));
        for id in 1..=2u16 {
            scanner.scan(&publish("t", 1, id, b"x"));
        }
        let order = scanner.order();
        let second = order.claim(NonZeroU16::new(2));
        let local = tokio::task::LocalSet::new();
        let waited = local.spawn_local(async move {
            let started = tokio::time::Instant::now();
            second.turn().await;
            started.elapsed()
        });
        local
            .run_until(async move {
                tokio::time::sleep(SHORT_WAIT / 2).await;
                let first = order.claim(NonZeroU16::new(1));
                tokio::time::sleep(SHORT_WAIT * 2).await;
                drop(first);
                let waited = waited.await.unwrap();
                assert!(waited >= SHORT_WAIT * 2, "went on after {waited:?}");
            })
            .await;
    }

    #[tokio::test]
    async fn an_unknown_packet_id_does_not_wait() {
        let scanner = ArrivalScanner::default();
        scanner.scan(&publish("t", 1, 1, b"x"));
        let order = scanner.order();
        let stray = order.claim(NonZeroU16::new(9));
        stray.turn().await;
    }
}
