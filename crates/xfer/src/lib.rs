//! The xfer command line's library half: the client library re-exported, and the defaults file.
//!
//! - [`config`]: the defaults file, `~/.config/xfer/config.toml`.
#![warn(missing_docs)]

pub mod config;

pub use xfer_client::*;
