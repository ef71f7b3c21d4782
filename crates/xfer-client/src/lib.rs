//! The xfer client as a library: upload, download, list and copy against an `xferd`.
//!
//! # Layout
//! - [`copy`]: server-to-server copies, with grants for the destination.
//! - [`engine`]: the transfer engine shared by [`send`] and [`recv`].
//! - [`session`]: one connection past its handshake.
//! - [`list()`]: directory listings.
//! - [`mirror`]: `--delete`, filters, dry runs and itemize lines of tree copies.
//! - [`progress`]: [`Progress`], how transfers report the bytes they move.
//! - [`tree`]: directory trees (`-r`): small files whole and pipelined, large ones chunked.
//! - [`meta`]: what a tree copy keeps besides bytes (hard links, nodes, holes, `SetMeta`).
//! - [`trust`]: trust on first use: pinned certificate fingerprints, CAs, `known_hosts`.
//! - [`target`], [`limiter`], [`error`]: host parsing, `--bwlimit`, [`ClientError`].
#![warn(missing_docs)]

pub mod copy;
pub mod engine;
pub mod error;
mod light;
pub mod limiter;
pub mod list;
pub mod meta;
pub mod mirror;
pub mod progress;
pub mod session;
pub mod target;
pub mod tree;
pub mod trust;
pub mod zero_rtt;

pub use engine::{recv, send, send_file, Connections, Options, Summary};
pub use error::ClientError;
pub use limiter::RateLimiter;
pub use list::list;
pub use meta::TreeOptions;
pub use mirror::Mirror;
pub use progress::{NoProgress, Progress, ProgressCounter};
pub use session::{Connector, Session};
pub use target::Target;
pub use tree::{recv_tree, send_tree, send_tree_from, TreeSummary};
