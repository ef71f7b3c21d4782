//! The one integration-test binary: every end-to-end test, grouped by module. Each test starts its
//! own `xferd` on an ephemeral port over its own temporary tree, so tests run in parallel.

mod atomic;
mod compress;
mod concurrency;
mod contention;
mod copy;
mod crash;
mod delta;
mod disk;
mod early;
mod failures;
mod fast_open;
mod faults;
mod knobs;
mod ktls;
mod limits;
mod load;
mod malformed;
mod memory;
mod mirror_meta;
mod mirror_sync;
mod ops;
mod regression;
mod resume;
mod security;
mod shutdown;
mod transfer;
mod tree;
mod trust;

/// The old home of the raw-connection helpers, now in `xfer_tests`: test modules written before
/// the move still find them here.
#[allow(unused_imports)]
mod hostile {
    pub(crate) use xfer_tests::outside::*;
    pub(crate) use xfer_tests::raw::*;
    pub(crate) use xfer_tests::relay::*;
    pub(crate) use xfer_tests::{run_xfer, Pki};
}
