//! The one integration-test binary: every end-to-end test, grouped by module. Each test starts its
//! own `xferd` on an ephemeral port over its own temporary tree, so tests run in parallel.

mod atomic;
mod concurrency;
mod contention;
mod copy;
mod crash;
mod disk;
mod faults;
mod hostile;
mod knobs;
mod limits;
mod load;
mod malformed;
mod mirror_sync;
mod ops;
mod resume;
mod security;
mod shutdown;
mod transfer;
mod tree;
