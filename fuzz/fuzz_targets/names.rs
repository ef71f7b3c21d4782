//! Fuzz target: arbitrary bytes as a file name, escaped for the wire and back, and as a wire
//! name from a peer (`CAP_RAW_NAMES`, proto.md §8.5): nothing is lost, nothing panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xfer_proto::fuzzing::names(data));
