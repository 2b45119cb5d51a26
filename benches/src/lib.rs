//! criterion benchmarks of vigil's hot paths; the benchmarks live in `benches/`.
//!
//! Run them with `cargo bench -p vigil-benches`.
