//! The one integration-test binary: every end-to-end test, grouped by module. Each test starts its
//! own `xferd` on an ephemeral port over its own temporary tree, so tests run in parallel.

mod atomic;
mod concurrency;
mod malformed;
mod resume;
mod transfer;
