//! [`ClientError`]: every way a client command can fail, worded for a one-line `xfer: …` message.

use xfer_core::CoreError;
use xfer_proto::{ErrorCode, ErrorFrame, ProtoError};

/// A failed client operation.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The target (`HOST[:PORT]`, a copy endpoint) could not be parsed or resolved.
    #[error("{0}")]
    Target(String),
    /// The CA certificates to trust could not be loaded: a CA file unreadable or holding none,
    /// or no system roots.
    #[error("{0}")]
    Trust(String),
    /// A daemon's certificate is neither pinned nor vouched for by a CA, and was not accepted.
    #[error("{0}")]
    UnknownHost(String),
    /// The local output path names no file (it ends in `..` or is not UTF-8).
    #[error("bad output path {}", .0.display())]
    OutputPath(std::path::PathBuf),
    /// TCP connect failed (refused, unreachable, timed out).
    #[error("cannot connect to {addr}: {reason} (is xferd running? is the port open?)")]
    Connect {
        /// Address tried.
        addr: String,
        /// Short cause ("connection refused", …).
        reason: String,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// Authentication failed; the text says why.
    #[error("authentication failed: {0}; set XFER_TOKEN or --token-file to the server's token")]
    Auth(String),
    /// The server answered with an error frame.
    #[error("{0}")]
    Remote(ErrorFrame),
    /// The server broke the protocol or the connection failed mid-way.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// A local file operation failed.
    #[error(transparent)]
    Local(#[from] CoreError),
    /// A socket option (buffer size, congestion control) cannot be used.
    #[error(transparent)]
    Socket(#[from] xfer_net::SocketError),
    /// The connection closed where a reply was due.
    #[error("server closed the connection unexpectedly")]
    Closed,
    /// The server sent a frame that does not fit here.
    #[error("protocol error: unexpected {0} frame from the server")]
    Unexpected(&'static str),
    /// The server's side of the handshake is not one this client can accept.
    #[error("protocol error: {0}")]
    Handshake(xfer_proto::client::HandshakeError),
    /// The server's file changed between connections.
    #[error("file changed on the server during the transfer: {0}")]
    Changed(String),
    /// The server does not speak a part of the protocol the command needs.
    #[error("{0}")]
    Unsupported(String),
    /// A tree's source file was gone when its turn came (the copy goes on without it).
    #[error("{0} vanished during the copy")]
    Vanished(String),
    /// A tree copy went on without source entries it could not read
    /// ([`crate::tree::TreeSummary::unreadable_error`]).
    #[error("{0}")]
    Unreadable(String),
    /// The whole-file fetch that follows a delta whose digest did not match failed too.
    #[error(
        "{0} (fetching the whole file again after the delta's whole-file digest did not match)"
    )]
    AfterDelta(Box<Self>),
    /// Every retry failed within the deadline.
    #[error("{last} (gave up after {seconds:.0} s of retries; rerun to resume)")]
    GaveUp {
        /// The last error seen.
        last: Box<Self>,
        /// Seconds spent retrying.
        seconds: f64,
    },
}

impl ClientError {
    /// What the daemon's non-fatal answer about a name says: `Some(true)` when nothing is
    /// there (`NotFound`), `Some(false)` when something is that is not a regular file
    /// (`BadPath`); `None` for any other error. Either answer leaves the connection usable.
    pub(crate) fn no_file_at_name(&self) -> Option<bool> {
        match self {
            Self::Remote(frame) => match frame.error_code() {
                Some(ErrorCode::NotFound) => Some(true),
                Some(ErrorCode::BadPath) => Some(false),
                _ => None,
            },
            _ => None,
        }
    }

    /// True for failures to get a connection that waiting may fix: nothing listening yet, a
    /// dropped connection, a busy or restarting daemon. A refusal of the handshake itself
    /// (TLS required, version, authentication) is final.
    pub fn is_transient_connect(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Closed | Self::Proto(ProtoError::Io(_)) => true,
            Self::Remote(frame) => {
                matches!(
                    frame.error_code(),
                    Some(ErrorCode::Busy | ErrorCode::ShuttingDown)
                )
            }
            _ => false,
        }
    }

    /// True for failures that a new connection may fix: dropped connections, a restarting or
    /// busy daemon, a corrupted stream. Errors about the request itself are final.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Closed => true,
            Self::Proto(ProtoError::Io(_) | ProtoError::TruncatedStream { .. }) => true,
            // A corrupted header shows up as a malformed frame; the next connection is clean.
            Self::Proto(_) => true,
            Self::Remote(frame) => matches!(
                frame.error_code(),
                Some(
                    ErrorCode::Busy
                        | ErrorCode::ShuttingDown
                        | ErrorCode::BadCrc
                        | ErrorCode::Protocol
                )
            ),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::Connector;

    #[test]
    fn trust_and_output_failures_are_their_own_variants_on_one_line() {
        let missing = Path::new("/nonexistent/ca.pem");
        let Err(e) = Connector::tls(Some(missing)) else {
            panic!("a missing CA file was accepted");
        };
        assert!(matches!(e, ClientError::Trust(_)), "{e:?}");
        assert!(e
            .to_string()
            .starts_with("reading CA certificates from /nonexistent/ca.pem: "));
        assert!(!e.to_string().contains('\n'));
        assert!(!e.is_transient() && !e.is_transient_connect());
        let e = ClientError::OutputPath("/tmp/..".into());
        assert_eq!(e.to_string(), "bad output path /tmp/..");
    }
}
