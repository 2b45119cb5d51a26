//! The device registry: who may log in, with which public key, and in which state.
//!
//! Invariants:
//! - The registry file (`<data-dir>/registry.json`) is rewritten whole and atomically (temporary
//!   file, fsync, rename, fsync of the directory) on every change, so a crash leaves either the
//!   old or the new registry, never a mix.
//! - Only public keys are stored. A key is decoded and checked once at enrollment; the decoded
//!   key is cached in memory for the verifier.
//! - A device's status is read on every login and every reading without taking the registry
//!   lock (an atomic in the shared entry), so a quarantine takes effect at once everywhere.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};

use ed25519_dalek::VerifyingKey;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use vigil_proto::contract::is_valid_device_id;
use vigil_proto::strong_public_key;

use crate::{Error, Result, now_ms};

/// Class given to a device enrolled without one.
pub const DEFAULT_CLASS: &str = "generic";

/// Where a device stands with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Active,
    Suspect,
    Quarantined,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Active => "active",
            DeviceStatus::Suspect => "suspect",
            DeviceStatus::Quarantined => "quarantined",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => DeviceStatus::Suspect,
            2 => DeviceStatus::Quarantined,
            _ => DeviceStatus::Active,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            DeviceStatus::Active => 0,
            DeviceStatus::Suspect => 1,
            DeviceStatus::Quarantined => 2,
        }
    }
}

/// A device as an operator enrolls it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    pub device_id: String,
    pub public_key_hex: String,
    pub class: Option<String>,
}

/// One enrolled device, shared by the gateway and the verifier.
#[derive(Debug)]
pub struct DeviceEntry {
    pub id: Arc<str>,
    pub class: Arc<str>,
    pub key: VerifyingKey,
    pub enrolled_at_ms: i64,
    status: AtomicU8,
    status_changed_at_ms: AtomicI64,
}

impl DeviceEntry {
    pub fn status(&self) -> DeviceStatus {
        DeviceStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    pub fn status_changed_at_ms(&self) -> i64 {
        self.status_changed_at_ms.load(Ordering::Acquire)
    }

    pub fn is_quarantined(&self) -> bool {
        self.status() == DeviceStatus::Quarantined
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredDevice {
    device_id: String,
    public_key_hex: String,
    class: String,
    status: DeviceStatus,
    enrolled_at_ms: i64,
    status_changed_at_ms: i64,
}

/// The durable set of enrolled devices.
#[derive(Debug)]
pub struct DeviceRegistry {
    path: PathBuf,
    devices: RwLock<HashMap<Arc<str>, Arc<DeviceEntry>>>,
    /// Serialises rewrites of the registry file.
    write_lock: Mutex<()>,
}

impl DeviceRegistry {
    /// Loads `<data_dir>/registry.json`, or starts empty when it does not exist.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join("registry.json");
        let mut devices = HashMap::new();

        if path.exists() {
            let text = fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let stored: Vec<StoredDevice> =
                serde_json::from_str(&text).map_err(|source| Error::Corrupt {
                    path: path.clone(),
                    detail: source.to_string(),
                })?;
            for device in stored {
                let key =
                    strong_public_key(&device.public_key_hex).map_err(|weak| Error::Corrupt {
                        path: path.clone(),
                        detail: format!("{}: {weak}", device.device_id),
                    })?;
                let entry = DeviceEntry {
                    id: Arc::from(device.device_id.as_str()),
                    class: Arc::from(device.class),
                    key,
                    enrolled_at_ms: device.enrolled_at_ms,
                    status: AtomicU8::new(device.status.to_u8()),
                    status_changed_at_ms: AtomicI64::new(device.status_changed_at_ms),
                };
                devices.insert(entry.id.clone(), Arc::new(entry));
            }
        }

        Ok(Self {
            path,
            devices: RwLock::new(devices),
            write_lock: Mutex::new(()),
        })
    }

    pub fn get(&self, device_id: &str) -> Option<Arc<DeviceEntry>> {
        self.devices.read().get(device_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.devices.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All devices, sorted by id.
    pub fn list(&self) -> Vec<Arc<DeviceEntry>> {
        let mut all: Vec<_> = self.devices.read().values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Enrolls devices, all or none. Re-enrolling a device with the same key and class is a
    /// no-op; with a different key it is refused (a key change needs an explicit removal).
    /// Returns how many devices were new.
    pub fn enroll(&self, enrollments: &[Enrollment]) -> Result<usize> {
        let _writer = self.write_lock.lock();
        let now = now_ms();
        let mut new_entries = Vec::new();

        {
            let devices = self.devices.read();
            let mut seen = std::collections::HashSet::new();
            for enrollment in enrollments {
                let id = enrollment.device_id.as_str();
                if !is_valid_device_id(id) {
                    return Err(Error::InvalidEnrollment {
                        device_id: truncate_for_display(id),
                        reason: "device id must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
                            .to_owned(),
                    });
                }
                if !seen.insert(id) {
                    return Err(Error::InvalidEnrollment {
                        device_id: id.to_owned(),
                        reason: "listed twice".to_owned(),
                    });
                }
                let key = strong_public_key(&enrollment.public_key_hex).map_err(|weak| {
                    Error::InvalidEnrollment {
                        device_id: id.to_owned(),
                        reason: weak.to_string(),
                    }
                })?;
                let class = enrollment
                    .class
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CLASS.to_owned());
                if !is_valid_class(&class) {
                    return Err(Error::InvalidEnrollment {
                        device_id: id.to_owned(),
                        reason: "class must be 1 to 64 characters of a-z 0-9 _ -".to_owned(),
                    });
                }

                if let Some(existing) = devices.get(id) {
                    if existing.key != key {
                        return Err(Error::InvalidEnrollment {
                            device_id: id.to_owned(),
                            reason: "already enrolled with another key".to_owned(),
                        });
                    }
                    continue;
                }
                new_entries.push(DeviceEntry {
                    id: Arc::from(id),
                    class: Arc::from(class),
                    key,
                    enrolled_at_ms: now,
                    status: AtomicU8::new(DeviceStatus::Active.to_u8()),
                    status_changed_at_ms: AtomicI64::new(now),
                });
            }
        }

        let added = new_entries.len();
        if added == 0 {
            return Ok(0);
        }
        let mut next = self.devices.read().clone();
        for entry in new_entries {
            next.insert(entry.id.clone(), Arc::new(entry));
        }
        self.persist(&next)?;
        *self.devices.write() = next;
        Ok(added)
    }

    /// Changes a device's status durably. Returns the entry, or `None` for an unknown device.
    pub fn set_status(
        &self,
        device_id: &str,
        status: DeviceStatus,
    ) -> Result<Option<Arc<DeviceEntry>>> {
        self.set_status_if(device_id, status, |_| true)
    }

    /// Changes a device's status durably if `allowed` accepts its current status (checked
    /// under the same lock as the write, so no concurrent change slips between).
    pub fn set_status_if(
        &self,
        device_id: &str,
        status: DeviceStatus,
        allowed: impl Fn(DeviceStatus) -> bool,
    ) -> Result<Option<Arc<DeviceEntry>>> {
        let _writer = self.write_lock.lock();
        let Some(entry) = self.get(device_id) else {
            return Ok(None);
        };
        if !allowed(entry.status()) || entry.status() == status {
            return Ok(Some(entry));
        }

        let previous = entry.status.swap(status.to_u8(), Ordering::AcqRel);
        let previous_changed = entry.status_changed_at_ms.swap(now_ms(), Ordering::AcqRel);
        if let Err(error) = self.persist(&self.devices.read()) {
            entry.status.store(previous, Ordering::Release);
            entry
                .status_changed_at_ms
                .store(previous_changed, Ordering::Release);
            return Err(error);
        }
        Ok(Some(entry))
    }

    fn persist(&self, devices: &HashMap<Arc<str>, Arc<DeviceEntry>>) -> Result<()> {
        let mut stored: Vec<StoredDevice> = devices
            .values()
            .map(|entry| StoredDevice {
                device_id: entry.id.to_string(),
                public_key_hex: entry.public_key_hex(),
                class: entry.class.to_string(),
                status: entry.status(),
                enrolled_at_ms: entry.enrolled_at_ms,
                status_changed_at_ms: entry.status_changed_at_ms(),
            })
            .collect();
        stored.sort_by(|a, b| a.device_id.cmp(&b.device_id));

        let text = serde_json::to_vec_pretty(&stored).map_err(|source| Error::Corrupt {
            path: self.path.clone(),
            detail: source.to_string(),
        })?;
        write_atomically(&self.path, &text)
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new content, never a mix.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io_error = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("tmp");

    let mut file = fs::File::create(&temporary).map_err(io_error)?;
    file.write_all(bytes).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    fs::rename(&temporary, path).map_err(io_error)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error)?;
    }
    Ok(())
}

fn is_valid_class(class: &str) -> bool {
    !class.is_empty()
        && class.len() <= 64
        && class
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Attacker-supplied text shortened for an error message; it stays data, never markup.
pub(crate) fn truncate_for_display(text: &str) -> String {
    text.chars()
        .take(80)
        .flat_map(char::escape_default)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn enrollment(id: &str, seed: u8) -> Enrollment {
        let key = SigningKey::from_bytes(&[seed; 32]).verifying_key();
        Enrollment {
            device_id: id.to_owned(),
            public_key_hex: hex::encode(key.as_bytes()),
            class: None,
        }
    }

    #[test]
    fn enrollment_is_durable_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let registry = DeviceRegistry::open(dir.path()).unwrap();
        assert_eq!(
            registry
                .enroll(&[enrollment("a", 1), enrollment("b", 2)])
                .unwrap(),
            2
        );
        assert_eq!(registry.enroll(&[enrollment("a", 1)]).unwrap(), 0);
        registry.set_status("b", DeviceStatus::Quarantined).unwrap();

        let reopened = DeviceRegistry::open(dir.path()).unwrap();
        assert_eq!(reopened.len(), 2);
        assert_eq!(&*reopened.get("a").unwrap().class, DEFAULT_CLASS);
        assert!(reopened.get("b").unwrap().is_quarantined());
    }

    #[test]
    fn bad_enrollments_refuse_the_whole_request() {
        let dir = tempfile::tempdir().unwrap();
        let registry = DeviceRegistry::open(dir.path()).unwrap();
        let mut weak = enrollment("weak", 3);
        weak.public_key_hex = "00".repeat(32);
        assert!(registry.enroll(&[enrollment("ok", 1), weak]).is_err());
        assert!(registry.is_empty());

        assert!(registry.enroll(&[enrollment("bad/id", 1)]).is_err());
        registry.enroll(&[enrollment("x", 1)]).unwrap();
        assert!(registry.enroll(&[enrollment("x", 2)]).is_err());
    }
}
