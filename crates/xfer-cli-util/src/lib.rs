//! What both command lines, `xfer` and `xferd`, read from their users the same way, as
//! ripgrep's `grep-cli` serves its tools: neither binary links the other, and the libraries
//! below them take numbers and bytes, not text typed by a user.
//!
//! - [`compress`]: `--compress auto|off|LEVEL`.
//! - [`units`]: sizes such as `64K` or `4M` in flags and configuration files.
//! - [`token`]: the shared token, read from a file.
//! - [`message`]: an error as the one line a command prints.
#![warn(missing_docs)]

pub mod compress;
pub mod message;
pub mod token;
pub mod units;
