//! [`CoreError`]: what can go wrong resolving names and moving bytes to and from disk.

use std::io;

use xfer_proto::ErrorCode;

/// A failure of a file operation, typed so that each side can map it to a wire error code.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The name breaks the naming rules or resolves outside the root.
    #[error("bad path: {0}")]
    BadPath(String),
    /// The name does not exist.
    #[error("no such file: {0}")]
    NotFound(String),
    /// The name exists but is not a regular file (directory, device, FIFO, socket…).
    #[error("not a regular file: {0}")]
    NotRegular(String),
    /// The filesystem is full.
    #[error("no space left on device")]
    NoSpace,
    /// Commit was asked for while bytes are still missing.
    #[error("transfer incomplete: {missing} bytes missing")]
    Incomplete {
        /// Bytes not yet held.
        missing: u64,
    },
    /// The received file's digest differs from the sender's; the partial was discarded.
    #[error("whole-file checksum mismatch on {0}; the partial copy was discarded, rerun to send it again")]
    Corrupt(String),
    /// A request beyond a limit (a file too large to send whole, say).
    #[error("{0}")]
    TooLarge(String),
    /// The source file changed while it was being read.
    #[error("file changed during transfer: {0}")]
    Changed(String),
    /// Another I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: io::Error,
    },
}

impl CoreError {
    /// Wraps an I/O error, recognising "no space" so it keeps its own message.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc_enospc()) {
            return Self::NoSpace;
        }
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The wire error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadPath(_) | Self::NotRegular(_) => ErrorCode::BadPath,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::NoSpace => ErrorCode::NoSpace,
            Self::Incomplete { .. } => ErrorCode::Incomplete,
            Self::Changed(_) => ErrorCode::Changed,
            Self::Corrupt(_) => ErrorCode::Corrupt,
            Self::TooLarge(_) => ErrorCode::TooLarge,
            Self::Io { .. } => ErrorCode::Io,
        }
    }
}

fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

/// Result alias for this crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
