//! Test data shared by the unit tests of the delta modules: files of given bytes and
//! reproducible pseudo-random content.

use std::fs::File;
use std::io::Write;

/// An unnamed temporary file holding `content`.
pub(crate) fn file_with(content: &[u8]) -> File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(content).unwrap();
    f
}

/// `len` bytes of xorshift output from `seed`: the same for the same seed, incompressible.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
