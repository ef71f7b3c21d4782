//! The transport both sides share: whole frames over any async byte stream, and the TCP
//! options every data connection gets.
//!
//! # Layout
//! - [`wire`]: [`FrameReader`]/[`FrameWriter`] over any `AsyncRead`/`AsyncWrite`.
//! - [`sockopt`]: [`SocketOptions`], send and receive buffers and congestion control, and what
//!   `TCP_INFO` says about a connection.
//! - [`tls`]: the socket beneath a rustls session ([`tls::TlsSocket`]) and kernel TLS
//!   ([`tls::ktls`]).
//!
//! Invariant: nothing here opens a connection; callers hand in a socket or its halves.
#![warn(missing_docs)]

pub mod sockopt;
pub mod tls;
pub mod wire;

pub use sockopt::{SocketError, SocketOptions};
pub use wire::{FrameReader, FrameWriter};
