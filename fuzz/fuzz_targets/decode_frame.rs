//! Fuzz target: arbitrary bytes through the frame decoder (and re-encoding of what decodes).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xfer_proto::fuzzing::decode_frames(data));
