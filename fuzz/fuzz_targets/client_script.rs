//! Fuzz target: arbitrary server answers through the client's handshake state machine.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xfer_proto::fuzzing::client_script(data));
