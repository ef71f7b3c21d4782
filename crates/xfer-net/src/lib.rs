//! The transport both sides share: whole frames over any async byte stream, and the TCP
//! options every data connection gets.
//!
//! # Layout
//! - [`wire`]: [`FrameReader`]/[`FrameWriter`] over any `AsyncRead`/`AsyncWrite`.
//! - [`compress`]: chunks compressed with zstd ([`Compressor`], [`inflate`]), and [`adapt`],
//!   the `auto` policy that decides when compressing pays.
//! - [`sockopt`]: [`SocketOptions`], send and receive buffers and congestion control, and what
//!   `TCP_INFO` says about a connection.
//!
//! Invariant: nothing here opens a connection; callers hand in a socket or its halves.
#![warn(missing_docs)]

pub mod adapt;
pub mod compress;
pub mod sockopt;
pub mod wire;

pub use compress::{inflate, Compression, Compressor};
pub use sockopt::{SocketError, SocketOptions};
pub use wire::{FrameReader, FrameWriter};
