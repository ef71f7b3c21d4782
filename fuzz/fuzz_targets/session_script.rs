//! Fuzz target: arbitrary frame sequences through the daemon's session state machine.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    xfer_proto::fuzzing::session_script(data, std::time::Instant::now())
});
