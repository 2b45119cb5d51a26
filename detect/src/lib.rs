//! Per-device features, detectors, risk and alerts; here: the streaming statistics detector
//! and the NAB benchmark that measures it. [`streaming`] holds detectors that see one reading
//! at a time with bounded memory, so they can run per device and metric; [`nab`] loads a
//! Numenta Anomaly Benchmark directory, runs a detector over it and scores the result with
//! NAB v1.1's rules.

pub mod nab;
pub mod streaming;
