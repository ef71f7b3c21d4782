//! The xfer client as a library: upload, download and list against an `xferd`.
//!
//! # Layout
//! - [`engine`]: the transfer engine shared by [`send`] and [`recv`].
//! - [`session`]: one connection past its handshake.
//! - [`list()`]: directory listings.
//! - [`target`], [`limiter`], [`error`]: host parsing, `--bwlimit`, [`ClientError`].
#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod limiter;
pub mod list;
pub mod session;
pub mod target;

pub use engine::{recv, send, Options, Summary};
pub use error::ClientError;
pub use limiter::RateLimiter;
pub use list::list;
pub use session::{Connector, Session};
pub use target::Target;
