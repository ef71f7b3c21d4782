//! Fuzz target: arbitrary bytes as a packed small-file frame (`PackedPutFiles` or
//! `PackedFileData`), decoded, checked and unpacked as a receiver would: bad sizes,
//! decompression bombs and frames of the wrong type inside must end in an error.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xfer_proto::fuzzing::unpack_files(data));
