//! Fuzz target: arbitrary bytes as a compressed chunk (`DataZ`), decoded and decompressed as a
//! receiver would: bad sizes, decompression bombs and damaged frames must end in an error.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xfer_net::compress::fuzz_inflate(data));
