//! The transport both sides share: whole frames over any async byte stream, and the TCP
//! options every data connection gets.
//!
//! # Layout
//! - [`wire`]: [`FrameReader`]/[`FrameWriter`] over any `AsyncRead`/`AsyncWrite`.
//! - [`compress`]: chunks compressed with zstd ([`Compressor`], [`inflate`]), and [`adapt`],
//!   the `auto` policy that decides when compressing pays.
//! - [`delivered`]: [`Delivered`], the bytes a group of connections had acknowledged and
//!   received, read from the kernel: what throughput is measured from.
//! - [`sockopt`]: [`SocketOptions`], send and receive buffers and congestion control, and what
//!   `TCP_INFO` says about a connection.
//! - [`tls`]: the socket beneath a rustls session ([`tls::TlsSocket`]) and kernel TLS
//!   ([`tls::ktls`]).
//!
//! Invariant: nothing here opens a connection; callers hand in a socket or its halves.
#![warn(missing_docs)]

pub mod adapt;
pub mod compress;
pub mod delivered;
pub mod sockopt;
pub mod tls;
pub mod wire;

pub use compress::{inflate, Compression, Compressor};
pub use delivered::{Delivered, Delivery};
pub use sockopt::{SocketError, SocketOptions};
pub use wire::{FrameReader, FrameWriter};
