//! Errors: [`ProtoError`] for input that breaks the protocol, [`ErrorCode`] for `Error` frames.

/// Why a sequence of bytes or frames is not valid xfer protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The length prefix announced a frame larger than the limit; nothing was buffered for it.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: u32,
        /// Limit in force.
        max: u32,
    },
    /// The length prefix was zero: a frame has at least its type byte.
    #[error("empty frame")]
    EmptyFrame,
    /// The type byte names no known frame.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The body was shorter than its type requires.
    #[error("truncated {kind} frame: {len} bytes")]
    Truncated {
        /// Frame type name.
        kind: &'static str,
        /// Body length received.
        len: usize,
    },
    /// The body did not decode as its type, or had bytes left over.
    #[error("bad {kind} frame body: {reason}")]
    BadBody {
        /// Frame type name.
        kind: &'static str,
        /// What the decoder reported.
        reason: String,
    },
    /// A data frame's payload did not match its CRC32.
    #[error("crc mismatch on data at offset {offset}")]
    BadCrc {
        /// Offset of the chunk within its file.
        offset: u64,
    },
    /// The connection closed inside a frame.
    #[error("connection closed mid-frame ({buffered} bytes buffered)")]
    TruncatedStream {
        /// Bytes of the partial frame.
        buffered: usize,
    },
    /// Reading or writing the transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ProtoError {
    /// The error code to send to a peer that caused this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Protocol,
        }
    }
}

/// Error codes carried by `Error` frames (see `proto.md`, "Error codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer broke the protocol (malformed frame, frame out of order).
    Protocol = 1,
    /// No protocol version in common.
    Version = 2,
    /// The named file does not exist.
    NotFound = 3,
    /// The name is not acceptable (absolute, `..`, reserved, too long…).
    BadPath = 4,
    /// The name is being written by another transfer with a different identity.
    InUse = 5,
    /// The daemon waited too long for a free stream slot.
    Busy = 6,
    /// Not enough free space for the declared size.
    NoSpace = 7,
    /// A disk or other local I/O error on the side sending the frame.
    Io = 8,
    /// Authentication failed.
    Auth = 9,
    /// The daemon does not accept uploads.
    ReadOnly = 10,
    /// A data frame's CRC did not match.
    BadCrc = 11,
    /// A frame or request exceeded a limit.
    TooLarge = 12,
    /// The file changed while it was being read.
    Changed = 13,
    /// The daemon is shutting down.
    ShuttingDown = 14,
    /// The request is valid but cannot be satisfied now (e.g. commit before all data).
    Incomplete = 15,
    /// The whole-file digest did not match; the receiver discarded its partial copy.
    Corrupt = 16,
}

impl ErrorCode {
    const ALL: [Self; 16] = [
        Self::Protocol,
        Self::Version,
        Self::NotFound,
        Self::BadPath,
        Self::InUse,
        Self::Busy,
        Self::NoSpace,
        Self::Io,
        Self::Auth,
        Self::ReadOnly,
        Self::BadCrc,
        Self::TooLarge,
        Self::Changed,
        Self::ShuttingDown,
        Self::Incomplete,
        Self::Corrupt,
    ];

    /// The code for a wire value; unknown values (from a newer peer) read as `None`.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u16 == value)
    }

    /// True for codes that answer one request and leave the connection open (`proto.md`,
    /// "Error codes"); every other code is followed by the sender closing the connection.
    pub fn is_request_level(self) -> bool {
        matches!(
            self,
            Self::NotFound
                | Self::BadPath
                | Self::InUse
                | Self::NoSpace
                | Self::ReadOnly
                | Self::Changed
                | Self::Incomplete
                | Self::Corrupt
        )
    }

    /// Short human-readable name, used in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Protocol => "protocol error",
            Self::Version => "protocol version mismatch",
            Self::NotFound => "no such file",
            Self::BadPath => "bad path",
            Self::InUse => "in use",
            Self::Busy => "server busy",
            Self::NoSpace => "no space left on device",
            Self::Io => "I/O error",
            Self::Auth => "authentication failed",
            Self::ReadOnly => "read-only server",
            Self::BadCrc => "checksum mismatch",
            Self::TooLarge => "limit exceeded",
            Self::Changed => "file changed during transfer",
            Self::ShuttingDown => "server shutting down",
            Self::Incomplete => "transfer incomplete",
            Self::Corrupt => "whole-file checksum mismatch",
        }
    }
}
