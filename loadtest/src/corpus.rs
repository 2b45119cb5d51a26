//! Pre-signed readings: every reading of a run, encoded and signed before the first connect.
//!
//! A device's readings are stored back to back in one shared buffer with their end offsets, so
//! a payload handed to the MQTT client is a cheap slice of that buffer (no copy, no allocation
//! per reading). Seqs run from 1 to the schedule's count; `sampled_at_ms` of seq `k` is the run
//! start plus the schedule's offset of `k`, so that the signed time equals the planned send time.
//!
//! A signed corpus can be kept on disk and used again by a later run with the same fleet and
//! schedules ([`save_corpus`], [`load_corpus`]). Its `sampled_at_ms` then lags the send time by
//! the corpus's age: a server refuses such readings once that age exceeds its clock-skew bound.
//!
//! File format (all integers little-endian):
//!
//! ```text
//! "vigil-corpus-v1\n" start_unix_ms:i64 devices:u32
//! per device: readings:u32 (end:u32)*readings buffer_len:u32 buffer:[u8]
//! ```

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use bytes::Bytes;
use prost::Message;
use vigil_proto::v1::Reading;

use crate::fleet::SimDevice;
use crate::profiles::Patient;

/// When one device sends, relative to the start of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSchedule {
    /// When the device first connects.
    pub connect_offset: Duration,
    /// When reading seq 1 is due.
    pub first_offset: Duration,
    /// Time between consecutive readings.
    pub interval: Duration,
    /// Number of readings: seqs 1 to `count`.
    pub count: u64,
}

impl DeviceSchedule {
    /// When reading `seq` (1-based) is due, relative to the start of the run.
    pub fn offset_of(&self, seq: u64) -> Duration {
        let nanos = self
            .interval
            .as_nanos()
            .saturating_mul(u128::from(seq.saturating_sub(1)));
        self.first_offset + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// When the last reading is due, relative to the start of the run.
    pub fn last_offset(&self) -> Duration {
        self.offset_of(self.count)
    }
}

/// Every reading of one device for a run, as `SignedReading` payloads ready to publish.
#[derive(Debug, Clone, Default)]
pub struct PresignedReadings {
    buffer: Bytes,
    ends: Vec<usize>,
}

impl PresignedReadings {
    /// Generates the device's readings for `schedule` from its patient and signs each one.
    pub fn sign(device: &SimDevice, schedule: &DeviceSchedule, start_unix_ms: i64) -> Self {
        let mut patient = Patient::new(device.class, device.patient_seed());
        let capacity = usize::try_from(schedule.count).unwrap_or(0);
        let mut buffer = Vec::with_capacity(capacity.saturating_mul(160));
        let mut ends = Vec::with_capacity(capacity);

        for seq in 1..=schedule.count {
            let sampled_at_ms = start_unix_ms + schedule.offset_of(seq).as_millis() as i64;
            let reading = Reading {
                device_id: device.device_id.clone(),
                seq,
                sampled_at_ms,
                measurements: patient.sample(sampled_at_ms),
            };
            let signed = vigil_proto::sign_reading(&device.signing_key, &reading);
            buffer.extend_from_slice(&signed.encode_to_vec());
            ends.push(buffer.len());
        }

        Self {
            buffer: Bytes::from(buffer),
            ends,
        }
    }

    /// Number of readings.
    pub fn len(&self) -> u64 {
        self.ends.len() as u64
    }

    /// True when there are no readings.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The encoded `SignedReading` of `seq` (1-based), sharing the corpus buffer.
    pub fn payload(&self, seq: u64) -> Option<Bytes> {
        let index = usize::try_from(seq.checked_sub(1)?).ok()?;
        let end = *self.ends.get(index)?;
        let start = index
            .checked_sub(1)
            .map_or(0, |previous| self.ends[previous]);
        Some(self.buffer.slice(start..end))
    }

    /// Bytes held for all payloads.
    pub fn payload_bytes(&self) -> usize {
        self.buffer.len()
    }
}

const CORPUS_MAGIC: &[u8] = b"vigil-corpus-v1\n";

/// Writes a signed corpus to `path` (through a temporary file, so that a reader never sees half
/// a corpus).
///
/// # Errors
///
/// The file cannot be written, or a device's payloads exceed 4 GiB.
pub fn save_corpus(
    path: &Path,
    start_unix_ms: i64,
    corpus: &[PresignedReadings],
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let partial = path.with_extension("partial");
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut out = BufWriter::new(file);
    let u32_of = |value: usize| {
        u32::try_from(value).context("a device's corpus is larger than the file format allows")
    };

    out.write_all(CORPUS_MAGIC)?;
    out.write_all(&start_unix_ms.to_le_bytes())?;
    out.write_all(&u32_of(corpus.len())?.to_le_bytes())?;
    for readings in corpus {
        out.write_all(&u32_of(readings.ends.len())?.to_le_bytes())?;
        for end in &readings.ends {
            out.write_all(&u32_of(*end)?.to_le_bytes())?;
        }
        out.write_all(&u32_of(readings.buffer.len())?.to_le_bytes())?;
        out.write_all(&readings.buffer)?;
    }
    out.into_inner()
        .map_err(|error| error.into_error())
        .and_then(|file| file.sync_all())
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Reads a corpus written by [`save_corpus`]: its start time and each device's readings.
///
/// # Errors
///
/// The file cannot be read or is not a corpus (truncated, another format).
pub fn load_corpus(path: &Path) -> anyhow::Result<(i64, Vec<PresignedReadings>)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut input = BufReader::new(file);
    let corrupt = || format!("{} is not a complete signed corpus", path.display());

    let mut magic = [0u8; CORPUS_MAGIC.len()];
    input.read_exact(&mut magic).with_context(corrupt)?;
    anyhow::ensure!(magic == CORPUS_MAGIC, corrupt());
    let start_unix_ms = i64::from_le_bytes(read_array(&mut input).with_context(corrupt)?);
    let devices = read_u32(&mut input).with_context(corrupt)?;

    let mut corpus = Vec::with_capacity(devices);
    for _ in 0..devices {
        let count = read_u32(&mut input).with_context(corrupt)?;
        let ends = (0..count)
            .map(|_| read_u32(&mut input))
            .collect::<std::io::Result<Vec<usize>>>()
            .with_context(corrupt)?;
        let mut buffer = vec![0u8; read_u32(&mut input).with_context(corrupt)?];
        input.read_exact(&mut buffer).with_context(corrupt)?;
        let ordered = ends.windows(2).all(|pair| pair[0] <= pair[1]);
        anyhow::ensure!(
            ordered && ends.last().is_none_or(|last| *last == buffer.len()),
            corrupt()
        );
        corpus.push(PresignedReadings {
            buffer: Bytes::from(buffer),
            ends,
        });
    }
    Ok((start_unix_ms, corpus))
}

fn read_array<const N: usize>(input: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    input.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn read_u32(input: &mut impl Read) -> std::io::Result<usize> {
    Ok(u32::from_le_bytes(read_array(input)?) as usize)
}

/// Signs the readings of every device, spreading devices over all cores.
///
/// # Errors
///
/// `devices` and `schedules` differ in length, or a signing thread panicked.
pub fn presign_fleet(
    devices: &[SimDevice],
    schedules: &[DeviceSchedule],
    start_unix_ms: i64,
) -> anyhow::Result<Vec<PresignedReadings>> {
    anyhow::ensure!(
        devices.len() == schedules.len(),
        "one schedule per device is needed"
    );
    if devices.is_empty() {
        return Ok(Vec::new());
    }

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = devices.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = devices
            .chunks(chunk)
            .zip(schedules.chunks(chunk))
            .map(|(devices, schedules)| {
                scope.spawn(move || {
                    devices
                        .iter()
                        .zip(schedules)
                        .map(|(device, schedule)| {
                            PresignedReadings::sign(device, schedule, start_unix_ms)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();

        let mut all = Vec::with_capacity(devices.len());
        for worker in workers {
            let signed = worker
                .join()
                .map_err(|_| anyhow::anyhow!("a pre-signing thread panicked"))?;
            all.extend(signed);
        }
        Ok(all)
    })
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::Signature;
    use vigil_proto::v1::SignedReading;

    use super::*;
    use crate::fleet::generate_fleet;
    use crate::profiles::plausible_range;

    #[test]
    fn every_presigned_reading_verifies_with_its_device_key() {
        let devices = generate_fleet(13, 4);
        let schedules: Vec<DeviceSchedule> = (0..devices.len())
            .map(|index| DeviceSchedule {
                connect_offset: Duration::ZERO,
                first_offset: Duration::from_millis(index as u64 * 10),
                interval: Duration::from_millis(250),
                count: 40,
            })
            .collect();
        let start_unix_ms = 1_800_000_000_000;
        let corpora = presign_fleet(&devices, &schedules, start_unix_ms).unwrap();
        assert_eq!(corpora.len(), devices.len());

        for ((device, corpus), schedule) in devices.iter().zip(&corpora).zip(&schedules) {
            assert_eq!(corpus.len(), 40);
            assert!(corpus.payload(0).is_none() && corpus.payload(41).is_none());
            let key = device.signing_key.verifying_key();

            for seq in 1..=40 {
                let payload = corpus.payload(seq).unwrap();
                assert!(payload.len() < 200, "payload of {} bytes", payload.len());
                let signed = SignedReading::decode(payload).unwrap();
                let signature = Signature::from_slice(&signed.signature).unwrap();
                let message = vigil_proto::reading_signing_message(&signed.reading);
                key.verify_strict(&message, &signature).unwrap();

                let reading = Reading::decode(signed.reading.as_slice()).unwrap();
                assert_eq!(reading.device_id, device.device_id);
                assert_eq!(reading.seq, seq);
                let planned = start_unix_ms + schedule.offset_of(seq).as_millis() as i64;
                assert_eq!(reading.sampled_at_ms, planned);
                let metrics: Vec<&str> = reading
                    .measurements
                    .iter()
                    .map(|m| m.metric.as_str())
                    .collect();
                assert_eq!(metrics, device.class.metrics());
                for measurement in &reading.measurements {
                    let (min, max) = plausible_range(&measurement.metric).unwrap();
                    assert!((min..=max).contains(&measurement.value));
                }
            }
        }
    }

    #[test]
    fn a_saved_corpus_reads_back_byte_for_byte() {
        let devices = generate_fleet(3, 8);
        let schedules: Vec<DeviceSchedule> = (1..=3)
            .map(|count| DeviceSchedule {
                connect_offset: Duration::ZERO,
                first_offset: Duration::ZERO,
                interval: Duration::from_millis(100),
                count,
            })
            .collect();
        let corpus = presign_fleet(&devices, &schedules, 1_700_000_000_000).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.corpus");

        save_corpus(&path, 1_700_000_000_000, &corpus).unwrap();
        let (start, loaded) = load_corpus(&path).unwrap();
        assert_eq!(start, 1_700_000_000_000);
        assert_eq!(loaded.len(), 3);
        for (original, again) in corpus.iter().zip(&loaded) {
            assert_eq!(original.len(), again.len());
            for seq in 1..=original.len() {
                assert_eq!(original.payload(seq), again.payload(seq));
            }
        }

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let error = load_corpus(&path).unwrap_err().to_string();
        assert!(error.contains("not a complete signed corpus"), "{error}");
    }

    #[test]
    fn signing_is_deterministic() {
        let device = &generate_fleet(1, 5)[0];
        let schedule = DeviceSchedule {
            connect_offset: Duration::ZERO,
            first_offset: Duration::ZERO,
            interval: Duration::from_secs(1),
            count: 5,
        };
        let first = PresignedReadings::sign(device, &schedule, 1_000);
        let again = PresignedReadings::sign(device, &schedule, 1_000);
        assert_eq!(first.payload(5), again.payload(5));
        assert!(first.payload_bytes() > 5 * 100);
    }
}
