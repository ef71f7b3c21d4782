//! [`ServerSession`]: the daemon's side of one connection as a state machine, without I/O.
//!
//! The daemon feeds it every frame it decodes: [`ServerSession::handle_handshake`] until the
//! handshake is done, [`ServerSession::handle_request`] after. The session checks that the
//! frame is allowed in the current phase and refers to an open transfer within bounds, and
//! tells the daemon what to do ([`Handshake`], [`Request`]), with the answers it owns
//! (`Challenge`, `Welcome`) ready to send. It owns the table of open transfers: the daemon
//! keeps its own state for each in it and reaches it through typed handles ([`UploadId`],
//! [`DownloadId`]). Token proofs are checked here too, with the nonce the daemon drew, and the
//! session says when it gives up on a silent peer ([`ServerSession::poll_timeout`]); the time
//! is always passed in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{
    auth, Challenge, ChunkRef, Commit, Data, ErrorCode, ErrorFrame, Frame, List, OpenRead,
    OpenWrite, Welcome, PROTOCOL_VERSION,
};

/// Settings for one server-side session.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Token clients must prove they hold; `None` lets everyone in.
    pub token: Option<Arc<[u8]>>,
    /// Largest chunk accepted or served.
    pub max_chunk: u32,
    /// Most transfers one connection may have open.
    pub max_open: usize,
    /// The daemon has a certificate: sessions must run over TLS.
    pub tls: bool,
    /// Chunks a client may have unanswered, told in `Welcome`.
    pub window: u32,
    /// The daemon's name and version, told in `Welcome`.
    pub agent: String,
    /// How long the handshake (TLS included) may take from the connection's start.
    pub handshake_timeout: Duration,
    /// How long a client may stay silent once the handshake is done.
    pub idle_timeout: Duration,
    /// The nonces of the early proofs this server took (`CAP_ZERO_RTT`), shared by all its
    /// connections; `None`: it does not take early proofs, and ignores the bit as a server
    /// that predates it does.
    pub replay: Option<Arc<crate::replay::ReplayCache>>,
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for `Hello`.
    AwaitHello,
    /// `Challenge` sent; waiting for `Auth` (or, after `EarlyChallenge`, `EarlyAuth`).
    AwaitAuth,
    /// Handshake done; requests allowed.
    Ready,
}

/// What the daemon must do for a handshake frame.
#[derive(Debug)]
pub enum Handshake {
    /// The client asked for TLS: send `StartTls`, run the TLS handshake as the server, and feed
    /// the frames read inside TLS from then on (starting with a new `Hello`).
    StartTls,
    /// Send this `Challenge`; the client answers with `Auth`.
    Challenge(Challenge),
    /// Send this `EarlyChallenge` (`CAP_EARLY_AUTH`); the client answers with `Auth` and may
    /// send its first requests right behind it, which wait, unanswered, for `Welcome`.
    EarlyChallenge(crate::EarlyChallenge),
    /// The handshake is done: send [`ServerSession::welcome_frames`] once the connection may
    /// be served.
    Admitted,
    /// The client reported an error: close without answering.
    PeerError(ErrorFrame),
    /// The client's `EarlyAuth` was not taken (`CAP_ZERO_RTT`): send this `EarlyRefused`; the
    /// client answers the `EarlyChallenge` with `Auth`, and what it sent before is discarded.
    EarlyRefused(crate::EarlyRefused),
    /// Nothing to send: read the next frame (a request sent behind an early proof that was
    /// refused, discarded).
    Next,
}

/// An upload open on this session: a handle only the session makes, valid until the upload
/// is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UploadId(u64);

/// A download open on this session, as [`UploadId`] is for uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DownloadId(u64);

impl UploadId {
    /// The transfer id on the wire.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl DownloadId {
    /// The transfer id on the wire.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// What the daemon must do for a request.
#[derive(Debug)]
pub enum Request {
    /// Open (or join) an upload, then record it with [`ServerSession::open_upload`]; with the
    /// holes of the source (`OpenWriteSparse`: sorted, within the file, at most `MAX_HOLES`),
    /// which a new partial reserves no space for; empty for `OpenWrite`.
    OpenWrite(OpenWrite, Vec<crate::ByteRange>),
    /// Write a chunk of an open upload (its bounds are already checked; the CRC is not).
    Data(UploadId, Data),
    /// Decompress a chunk of an open upload and write it as `Data` (its decompressed range is
    /// checked against the file and the chunk limit; neither its CRC nor its content are).
    DataZ(UploadId, crate::DataZ),
    /// Compress what this connection sends from now on as `SetCompression.mode` says (a valid
    /// mode).
    SetCompression(u8),
    /// Check the digest and make an upload final, then [`ServerSession::close_upload`] it.
    Commit(UploadId, Commit),
    /// Open a download, then record it with [`ServerSession::open_download`].
    OpenRead(OpenRead),
    /// Send a chunk of an open download (bounds checked).
    ReadChunk(DownloadId, ChunkRef),
    /// Compute the whole-file digest of an open download and send `DigestReply`.
    Digest(DownloadId),
    /// List a directory.
    List(List),
    /// List a tree recursively.
    ListTree(crate::ListTree),
    /// Store a whole small file; answer `Done` or `Error`.
    PutFile(crate::PutFile),
    /// Store a whole small file with its owner and attributes (`CAP_PUT_META`); answer
    /// `MetaSet` or `Error`.
    PutFileMeta(crate::PutFileMeta),
    /// Decompress `PutFile` frames (`CAP_PACKED_FILES`; the decoder checked the header
    /// against the limits, neither the CRC nor the content are checked), then hand each to
    /// [`ServerSession::handle_request`] as if it had come alone.
    PackedPutFiles(crate::PackedFiles),
    /// Create a directory; answer `Done` or `Error`.
    MakeDir(crate::MakeDir),
    /// Create a symbolic link; answer `Done` or `Error`.
    MakeLink(crate::MakeLink),
    /// Send a whole small file; answer `FileData` or `Error`.
    GetFile(crate::GetFile),
    /// Flush the root's filesystem; answer `Done` or `Error`.
    Sync,
    /// Push a file or tree to another daemon; answer with `Progress` frames, then `CopyDone`.
    CopyTo(crate::CopyTo),
    /// Mark a hole of an open upload as held (bounds checked); answer `Ack`.
    Zeros(UploadId, ChunkRef),
    /// List a tree with each entry's metadata.
    ListTreeMeta(crate::ListTreeMeta),
    /// Set an entry's owner, attributes, mode and mtime; answer `MetaSet` or `Error`.
    SetMeta(crate::SetMeta),
    /// Add a name to a stored file; answer `Done` or `Error`.
    MakeHardLink(crate::MakeHardLink),
    /// Create a device, FIFO or socket; answer `Done` or `Error`.
    MakeNode(crate::MakeNode),
    /// Remove one entry (`CAP_DELETE` is in force); answer `Done` or `Error`.
    Delete(crate::Delete),
    /// Wait until no upload of these names is open without its `Commit` carried out
    /// (`CAP_TREE_CLOSE` is in force; at most `MAX_AWAITED`), then answer `Done`.
    AwaitCommits(crate::AwaitCommits),
    /// Copy a tree to another daemon with its options, filters, deletion or dry run
    /// (`CAP_MIRROR` is in force); answer with `Progress` and `Changes` frames, then
    /// `CopyDoneMeta`.
    MirrorTo(crate::MirrorTo),
    /// Index the file held under an open upload's name (`CAP_DELTA`); answer `DeltaIndex`.
    DeltaOpen(UploadId, crate::DeltaOpen),
    /// Copy what the basis holds of these chunks (bounds checked); answer `DeltaMatch`.
    DeltaSig(UploadId, crate::DeltaSig),
    /// Copy what the basis holds of these guessed chunks where the previous match puts them,
    /// without searching (bounds checked as `DeltaSig`; `CAP_DELTA_GUESS`); answer
    /// `DeltaMatch`.
    DeltaGuess(UploadId, crate::DeltaSig),
    /// Cut the chunks of an open download's file from an offset (bounds checked); answer
    /// `DeltaSig`.
    ReadSig(DownloadId, crate::ReadSig),
    /// Say which spans of an open upload a `DeltaMatch` answered (`CAP_DELTA_PIPELINE`);
    /// answer `DeltaAgreed`.
    DeltaResume(UploadId, crate::DeltaResume),
    /// Open an upload as for `OpenWrite` (room and chunk size checked) and copy what the basis
    /// holds of the whole signature (`CAP_DELTA_PUT`; bounds checked); answer `WriteOpened`,
    /// then `DeltaMatch` or an `Error` without a basis (or only an `Error`).
    DeltaPut(crate::DeltaPut),
    /// A `DeltaPut` (otherwise sound) on a connection with as many transfers open as it allows
    /// (`max_open`): answer a non-fatal `Error{Busy}`, so that the client learns the limit and
    /// keeps the connection.
    DeltaPutFull(String, usize),
    /// Copy these runs of the basis into an upload (`CAP_DELTA_FINE`; bounds checked); not
    /// answered.
    DeltaCopy(UploadId, crate::DeltaCopy),
    /// Run the next `CopyTo` or `MirrorTo` of this connection with this delta choice
    /// (`CAP_COPY_DELTA`).
    CopyMode(crate::CopyDeltaMode),
    /// The client is done: close.
    Goodbye,
    /// Nothing to do nor answer: the client proved the nonce of the `EarlyChallenge` after an
    /// early proof was taken (it may send anything from now on), or sent an early proof to a
    /// server without a token, which ignores it.
    Skip,
    /// The client reported an error: close without answering.
    PeerError(ErrorFrame),
}

/// A frame that breaks the protocol in this session; the daemon sends `Error` and closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The frame is not allowed now.
    #[error("unexpected {frame} frame {phase}")]
    Unexpected {
        /// Frame type name.
        frame: &'static str,
        /// Where the session was.
        phase: &'static str,
    },
    /// No common protocol version.
    #[error("client speaks versions {min}..={max}, this daemon speaks 1..={PROTOCOL_VERSION}")]
    Version {
        /// Client's lowest.
        min: u16,
        /// Client's highest.
        max: u16,
    },
    /// The daemon requires TLS and the client did not ask for it.
    #[error("this server requires TLS: connect with xfer --tls")]
    TlsRequired,
    /// The client asked for TLS and the daemon has no certificate.
    #[error("this server does not offer TLS")]
    TlsUnavailable,
    /// Wrong token (or no valid nonce).
    #[error("authentication failed")]
    AuthFailed,
    /// The transfer id is not open on this connection as the right kind.
    #[error("{frame} for transfer {id}, which is not an open {kind} on this connection")]
    UnknownTransfer {
        /// Frame type name.
        frame: &'static str,
        /// The id sent.
        id: u64,
        /// "upload" or "download".
        kind: &'static str,
    },
    /// The range lies beyond the file.
    #[error("range {start}..{end} beyond the file size {size}")]
    OutOfRange {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// File size.
        size: u64,
    },
    /// An `OpenWriteSparse` listing more holes than `MAX_HOLES`.
    #[error("OpenWriteSparse with {0} holes, above the limit of {max}", max = crate::MAX_HOLES)]
    TooManyHoles(usize),
    /// A `SetCompression` mode that names no mode.
    #[error("SetCompression mode {0} is neither off, auto nor a zstd level")]
    BadCompression(u8),
    /// A chunk above the announced limit.
    #[error("chunk of {len} bytes above the limit of {max}")]
    ChunkTooLarge {
        /// Chunk length.
        len: u64,
        /// Limit.
        max: u32,
    },
    /// A grant was used for something other than writing under its scope.
    #[error("the copy grant only allows writing under {scope:?}: {what}")]
    OutOfScope {
        /// The grant's scope.
        scope: String,
        /// What was asked.
        what: String,
    },
    /// A grant that has expired or claims too long a life.
    #[error("the copy grant has expired or claims to live too long")]
    GrantExpired,
    /// A grant whose scope is no valid name (empty, absolute, or with `.` or `..`).
    #[error("the copy grant names an invalid scope {0:?}")]
    BadGrantScope(String),
    /// A handle on a transfer that has been closed since.
    #[error("transfer {0} is no longer open")]
    TransferClosed(u64),
    /// No complete handshake before its deadline.
    #[error("handshake timed out")]
    HandshakeTimedOut,
    /// No frame for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// Too many transfers open on one connection.
    #[error("more than {0} transfers open on one connection")]
    TooManyOpen(usize),
    /// A `DeltaSig` with more chunks than one may carry.
    #[error("DeltaSig of {0} chunks, above the limit of {max}", max = crate::MAX_DELTA_CHUNKS)]
    TooManyChunks(usize),
    /// A `DeltaCopy` with more runs than one may carry.
    #[error("DeltaCopy of {0} runs, above the limit of {max}", max = crate::MAX_FINE_COPIES)]
    TooManyCopies(usize),
    /// An `AwaitCommits` with more names than one may carry.
    #[error("AwaitCommits of {0} names, above the limit of {max}", max = crate::MAX_AWAITED)]
    TooManyAwaited(usize),
    /// A request that is not read-only on a connection admitted by an early proof, before
    /// the client proved the nonce of the `EarlyChallenge` with `Auth`.
    #[error("{0} before the Auth behind an early proof")]
    NotProven(&'static str),
    /// More requests behind a refused early proof than a server discards.
    #[error("more than {max} bytes of requests behind a refused early proof", max = crate::ZERO_RTT_DISCARD_MAX)]
    EarlyFlightTooLong,
}

/// The message `proto.md` gives every refused grant, whatever the reason.
pub const GRANT_REFUSED: &str = "the copy grant has expired, lives too long or has a bad scope";

impl SessionError {
    /// The message for the `Error` frame that reports it: its own, but for grants, whose
    /// refusal `proto.md` words once for every reason.
    pub fn wire_message(&self) -> String {
        match self {
            Self::GrantExpired | Self::BadGrantScope(_) => GRANT_REFUSED.into(),
            other => other.to_string(),
        }
    }

    /// The code for the `Error` frame that reports it.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Version { .. } => ErrorCode::Version,
            Self::AuthFailed
            | Self::NotProven(_)
            | Self::OutOfScope { .. }
            | Self::GrantExpired
            | Self::BadGrantScope(_) => ErrorCode::Auth,
            Self::TooManyOpen(_)
            | Self::ChunkTooLarge { .. }
            | Self::TooManyChunks(_)
            | Self::TooManyCopies(_)
            | Self::TooManyAwaited(_) => ErrorCode::TooLarge,
            _ => ErrorCode::Protocol,
        }
    }
}

/// Kind of an open transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransferKind {
    /// Client → server.
    Upload,
    /// Server → client.
    Download,
}

/// An open transfer: its kind and size, with the daemon's state for it.
#[derive(Debug)]
enum Transfer<U, D> {
    Upload { size: u64, state: U },
    Download { size: u64, state: D },
}

/// The server side of one connection. `U` and `D` are what the daemon keeps for each open
/// upload and download.
#[derive(Debug)]
pub struct ServerSession<U = (), D = ()> {
    config: ServerConfig,
    phase: Phase,
    nonce: Vec<u8>,
    client_nonce: Vec<u8>,
    client_agent: String,
    open: HashMap<u64, Transfer<U, D>>,
    next_id: u64,
    tls_active: bool,
    client_capabilities: u64,
    /// The version agreed in `Hello`.
    version: u16,
    /// The server's proof for `Welcome`, once the client proved it holds the token.
    proof: Vec<u8>,
    /// Unix time (seconds) when the connection was accepted: grants are checked against it.
    now_unix: u64,
    /// When the handshake must be done.
    handshake_deadline: Option<Instant>,
    /// Set when the client authenticated with a grant: what it may write.
    scope: Option<String>,
    /// The server proved itself in `EarlyChallenge` (`CAP_EARLY_AUTH`).
    early: bool,
    /// Where the client's early proof (`CAP_ZERO_RTT`) stands.
    zero_rtt: ZeroRtt,
}

/// Where a client's early proof (`CAP_ZERO_RTT`) stands on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroRtt {
    /// Not offered (or not taken by a server without a token).
    None,
    /// Taken: read-only requests until the client proves the `EarlyChallenge`'s nonce.
    Accepted {
        /// The client proved it: anything goes.
        proven: bool,
    },
    /// Refused for this reason: the challenge went instead, and what the client sent before
    /// its `Auth` is discarded, at most `discard_left` more bytes of it.
    Refused {
        /// Why.
        why: crate::replay::Refusal,
        /// Bytes still to discard before it is a protocol error.
        discard_left: usize,
    },
}

/// Longest a grant may claim to live, in seconds.
pub const MAX_GRANT_LIFETIME: u64 = 7 * 24 * 3600;

impl<U, D> ServerSession<U, D> {
    /// A session waiting for `Hello`, for a connection accepted at `now` (Unix time
    /// `now_unix`). `nonce` is the server's fresh random challenge.
    pub fn new(config: ServerConfig, nonce: Vec<u8>, now_unix: u64, now: Instant) -> Self {
        Self {
            handshake_deadline: now.checked_add(config.handshake_timeout),
            config,
            phase: Phase::AwaitHello,
            nonce,
            client_nonce: Vec::new(),
            client_agent: String::new(),
            open: HashMap::new(),
            next_id: 1,
            tls_active: false,
            client_capabilities: 0,
            version: 0,
            proof: Vec::new(),
            now_unix,
            scope: None,
            early: false,
            zero_rtt: ZeroRtt::None,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The name a copy grant limits this session to, if it authenticated with one.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// The server's nonce, sent in `Challenge`.
    pub fn nonce(&self) -> &[u8] {
        &self.nonce
    }

    /// True when the server proved itself in `EarlyChallenge`: the client's first requests may
    /// arrive before `Welcome` is sent, and wait for it.
    pub fn is_early(&self) -> bool {
        self.early || matches!(self.zero_rtt, ZeroRtt::Accepted { .. })
    }

    /// Where the client's early proof (`CAP_ZERO_RTT`) stands.
    pub fn zero_rtt(&self) -> ZeroRtt {
        self.zero_rtt
    }

    /// The software the client named in its `Hello`.
    pub fn client_agent(&self) -> &str {
        &self.client_agent
    }

    /// Capability bits for `Welcome`.
    pub fn capabilities(&self) -> u64 {
        let auth = if self.config.token.is_some() {
            crate::CAP_AUTH
        } else {
            0
        };
        // Only bits the client offered, but CAP_AUTH, which the server asserts on its own.
        let tls = if self.tls_active {
            crate::CAP_TLS & self.client_capabilities
        } else {
            0
        };
        // The daemon refuses a `Hello` offering CAP_DELETE it does not allow before this.
        let granted = (crate::CAP_FEATURES & !crate::CAP_PACKED_FILES & !crate::CAP_PUT_META
            | crate::CAP_DELETE
            | crate::CAP_MIRROR
            | crate::CAP_TREE_SYNC
            | crate::CAP_TREE_CLOSE)
            & self.client_capabilities;
        // Owners and attributes come with files only where tree metadata is kept at all.
        let put_meta = if granted & crate::CAP_TREE_META != 0 {
            crate::CAP_PUT_META & self.client_capabilities
        } else {
            0
        };
        // Packed small files follow the compression mode, so they come with compression only.
        let packed = if granted & crate::CAP_COMPRESSION != 0 {
            crate::CAP_PACKED_FILES & self.client_capabilities
        } else {
            0
        };
        // Set only on a connection whose challenge was early, which the client offered.
        let early = if self.early { crate::CAP_EARLY_AUTH } else { 0 };
        // Set where the server proved itself early to a client that offered it: the same in
        // the EarlyChallenge's Welcome and the Welcome, whether this connection's early proof
        // was taken or not, so that a client learns which servers take one.
        let zero_rtt = if self.early && self.config.replay.is_some() {
            crate::CAP_ZERO_RTT & self.client_capabilities
        } else {
            0
        };
        auth | tls | granted | packed | put_meta | early | zero_rtt
    }

    /// The frames that end the handshake, once [`Handshake::Admitted`] said so, to go in one
    /// write: the [`Welcome`](Self::welcome), and right behind it, where the client offered
    /// `CAP_IDLE_TIMEOUT`, the idle timeout [`Self::poll_timeout`] keeps to on this connection
    /// (fixed at its start: a reload of the daemon's settings never changes it).
    pub fn welcome_frames(&self) -> Vec<Frame> {
        let welcome = self.welcome();
        let told = welcome.capabilities & crate::CAP_IDLE_TIMEOUT != 0;
        let mut frames = vec![Frame::Welcome(welcome)];
        if told {
            let millis = u64::try_from(self.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
            frames.push(Frame::IdleTimeout(crate::IdleTimeout { millis }));
        }
        frames
    }

    /// The `Welcome` that ends the handshake, once [`Handshake::Admitted`] said so; see
    /// [`Self::welcome_frames`] for what goes with it.
    pub fn welcome(&self) -> Welcome {
        Welcome {
            version: self.version,
            capabilities: self.capabilities(),
            max_chunk_size: self.config.max_chunk,
            window: self.config.window,
            agent: self.config.agent.clone(),
            proof: self.proof.clone(),
        }
    }

    /// Until when to wait for the peer's next frame, waiting from `now`: the handshake's
    /// deadline until it is done, then the idle timeout from `now`. `None`: no deadline.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        match self.phase {
            Phase::AwaitHello | Phase::AwaitAuth => self.handshake_deadline,
            Phase::Ready => now.checked_add(self.config.idle_timeout),
        }
    }

    /// The error for a peer that sent nothing before [`Self::poll_timeout`]'s deadline.
    pub fn timed_out(&self) -> SessionError {
        match self.phase {
            Phase::AwaitHello | Phase::AwaitAuth => SessionError::HandshakeTimedOut,
            Phase::Ready => SessionError::Idle(self.config.idle_timeout),
        }
    }

    /// Checks a frame of the handshake and says what to do with it.
    ///
    /// # Errors
    /// A [`SessionError`]: the daemon reports it with an `Error` frame and closes. Every frame
    /// once the handshake is done is one.
    pub fn handle_handshake(&mut self, frame: Frame) -> Result<Handshake, SessionError> {
        let unexpected = |frame: &Frame, phase: &'static str| SessionError::Unexpected {
            frame: frame.frame_type().name(),
            phase,
        };
        match (self.phase, frame) {
            (Phase::AwaitHello, Frame::Hello(hello)) if !self.tls_active && self.config.tls => {
                if hello.capabilities & crate::CAP_TLS == 0 {
                    return Err(SessionError::TlsRequired);
                }
                self.tls_active = true;
                Ok(Handshake::StartTls)
            }
            (Phase::AwaitHello, Frame::Hello(hello)) => {
                if !self.tls_active && hello.capabilities & crate::CAP_TLS != 0 {
                    return Err(SessionError::TlsUnavailable);
                }
                let version = hello.version.min(PROTOCOL_VERSION);
                if version < hello.min_version.max(1) {
                    return Err(SessionError::Version {
                        min: hello.min_version,
                        max: hello.version,
                    });
                }
                self.version = version;
                self.client_nonce = hello.nonce;
                self.client_agent = hello.agent;
                self.client_capabilities = hello.capabilities;
                if self.config.token.is_none() {
                    self.phase = Phase::Ready;
                    return Ok(Handshake::Admitted);
                }
                Ok(self.challenge())
            }
            (Phase::AwaitAuth, Frame::EarlyAuth(early))
                if self.capabilities() & crate::CAP_ZERO_RTT != 0
                    && self.zero_rtt == ZeroRtt::None =>
            {
                self.early_auth(&early)
            }
            (Phase::AwaitAuth, f) if f.is_read_only() && self.discarding() => self.discard(&f),
            (Phase::AwaitAuth, Frame::Auth(a)) => {
                // AwaitAuth comes only with a token.
                let Some(token) = self.config.token.as_deref() else {
                    return Err(SessionError::AuthFailed);
                };
                let key = match &a.grant {
                    None => token.to_vec(),
                    // The early proof was made with the token: a grant has no place after it.
                    Some(_) if self.early => return Err(SessionError::AuthFailed),
                    Some(grant) => {
                        let bad_scope = grant.scope.is_empty()
                            || grant.scope.starts_with('/')
                            || grant
                                .scope
                                .split('/')
                                .any(|p| p.is_empty() || p == "." || p == "..");
                        if bad_scope {
                            return Err(SessionError::BadGrantScope(grant.scope.clone()));
                        }
                        if grant.expires <= self.now_unix
                            || grant.expires > self.now_unix + MAX_GRANT_LIFETIME
                        {
                            return Err(SessionError::GrantExpired);
                        }
                        auth::grant_key(token, grant)
                    }
                };
                if self.client_nonce.len() != auth::NONCE_LEN
                    || !auth::verify_client(&key, &self.client_nonce, &self.nonce, &a.proof)
                {
                    return Err(SessionError::AuthFailed);
                }
                self.scope = a.grant.map(|g| g.scope);
                self.proof = auth::server_proof(&key, &self.client_nonce, &self.nonce);
                self.phase = Phase::Ready;
                Ok(Handshake::Admitted)
            }
            (_, Frame::Error(e)) => Ok(Handshake::PeerError(e)),
            (Phase::AwaitHello, f) => Err(unexpected(&f, "before Hello")),
            (Phase::AwaitAuth, f) => Err(unexpected(&f, "before Auth")),
            (Phase::Ready, f) => Err(unexpected(&f, "after the handshake")),
        }
    }

    /// The challenge for a client that proves itself with `Auth`: early where it asked and its
    /// nonce can be accepted.
    fn challenge(&mut self) -> Handshake {
        self.phase = Phase::AwaitAuth;
        // Both nonces are known now, so the server can prove itself first when the
        // client asks; a client nonce it could never accept gets the plain challenge.
        let token = self.config.token.as_deref().unwrap_or_default();
        if self.client_capabilities & crate::CAP_EARLY_AUTH != 0
            && self.client_nonce.len() == auth::NONCE_LEN
        {
            self.early = true;
            self.proof = auth::server_proof(token, &self.client_nonce, &self.nonce);
            return Handshake::EarlyChallenge(crate::EarlyChallenge {
                nonce: self.nonce.clone(),
                welcome: self.welcome(),
            });
        }
        Handshake::Challenge(Challenge {
            nonce: self.nonce.clone(),
        })
    }

    /// True while the requests a client sent behind a refused early proof are discarded.
    fn discarding(&self) -> bool {
        matches!(self.zero_rtt, ZeroRtt::Refused { .. })
    }

    /// Discards `frame`, sent behind an early proof that was refused, within the bound.
    fn discard(&mut self, frame: &Frame) -> Result<Handshake, SessionError> {
        let ZeroRtt::Refused { discard_left, .. } = &mut self.zero_rtt else {
            return Err(SessionError::EarlyFlightTooLong);
        };
        let mut encoded = bytes::BytesMut::new();
        let len = match frame.encode(&mut encoded) {
            Ok(()) => encoded.len(),
            Err(_) => usize::MAX,
        };
        *discard_left = discard_left
            .checked_sub(len)
            .ok_or(SessionError::EarlyFlightTooLong)?;
        Ok(Handshake::Next)
    }

    /// Takes the client's early proof (`CAP_ZERO_RTT`), after the `EarlyChallenge` went (so with
    /// a token and a 32-byte nonce), or refuses it: then the client answers that challenge.
    fn early_auth(&mut self, early: &crate::EarlyAuth) -> Result<Handshake, SessionError> {
        let (Some(token), Some(replay)) = (self.config.token.clone(), self.config.replay.clone())
        else {
            return Err(SessionError::AuthFailed);
        };
        // A wrong proof is a wrong token, whatever its time: refused as a wrong Auth is. Checked
        // before the cache, so that only holders of the token take room in it.
        if self.client_nonce.len() != auth::NONCE_LEN
            || !auth::verify_zero_rtt(&token, &self.client_nonce, early.time_ms, &early.proof)
        {
            return Err(SessionError::AuthFailed);
        }
        let now_ms = self.now_unix.saturating_mul(1000);
        if let Err(why) = replay.admit(&self.client_nonce, early.time_ms, now_ms) {
            self.zero_rtt = ZeroRtt::Refused {
                why,
                discard_left: crate::ZERO_RTT_DISCARD_MAX,
            };
            return Ok(Handshake::EarlyRefused(crate::EarlyRefused {
                reason: why.name().into(),
            }));
        }
        self.zero_rtt = ZeroRtt::Accepted { proven: false };
        self.phase = Phase::Ready;
        Ok(Handshake::Admitted)
    }

    /// On a connection admitted by an early proof, before the client proved the
    /// `EarlyChallenge`'s nonce: its `Auth` proves it, read-only requests pass, and nothing else
    /// does. Without a token, an `EarlyAuth` is ignored. `None`: the frame goes on as a request.
    fn unproven(&mut self, frame: &Frame) -> Option<Result<Request, SessionError>> {
        if let Frame::EarlyAuth(_) = frame {
            let ignored = self.config.token.is_none()
                && self.config.replay.is_some()
                && self.client_capabilities & crate::CAP_ZERO_RTT != 0;
            return ignored.then_some(Ok(Request::Skip));
        }
        if self.zero_rtt != (ZeroRtt::Accepted { proven: false }) {
            return None;
        }
        match frame {
            Frame::Auth(a) => {
                let token = self.config.token.as_deref().unwrap_or_default();
                if a.grant.is_some()
                    || !auth::verify_client(token, &self.client_nonce, &self.nonce, &a.proof)
                {
                    return Some(Err(SessionError::AuthFailed));
                }
                self.zero_rtt = ZeroRtt::Accepted { proven: true };
                Some(Ok(Request::Skip))
            }
            Frame::Goodbye | Frame::Error(_) => None,
            f if f.is_read_only() => None,
            f => Some(Err(SessionError::NotProven(f.frame_type().name()))),
        }
    }

    /// Under a grant, only writes below its scope are allowed.
    fn check_scope(&self, frame: &Frame) -> Result<(), SessionError> {
        let Some(scope) = &self.scope else {
            return Ok(());
        };
        let name = match frame {
            Frame::OpenWrite(r) => &r.name,
            Frame::OpenWriteSparse(r) => &r.open.name,
            Frame::DeltaPut(r) => &r.open.name,
            Frame::PutFile(r) => &r.name,
            Frame::PutFileMeta(r) => &r.file.name,
            Frame::MakeDir(r) => &r.name,
            Frame::MakeLink(r) => &r.name,
            Frame::ListTree(r) => &r.dir,
            Frame::ListTreeMeta(r) => &r.dir,
            Frame::SetMeta(r) => &r.name,
            Frame::MakeNode(r) => &r.name,
            Frame::Delete(r) => &r.name,
            Frame::AwaitCommits(r) => {
                for name in &r.names {
                    self.check_scope(&Frame::Delete(crate::Delete { name: name.clone() }))?;
                }
                return Ok(());
            }
            Frame::MakeHardLink(r) => {
                self.check_scope(&Frame::MakeLink(crate::MakeLink {
                    name: r.existing.clone(),
                    target: String::new(),
                }))?;
                &r.name
            }
            // Each PutFile inside is checked once unpacked.
            Frame::Data(_)
            | Frame::DataZ(_)
            | Frame::PackedPutFiles(_)
            | Frame::SetCompression(_)
            | Frame::Zeros(_)
            | Frame::DeltaOpen(_)
            | Frame::DeltaSig(_)
            | Frame::DeltaGuess(_)
            | Frame::DeltaResume(_)
            | Frame::DeltaCopy(_)
            | Frame::Commit(_)
            | Frame::Sync
            | Frame::Goodbye
            | Frame::Error(_) => return Ok(()),
            other => {
                return Err(SessionError::OutOfScope {
                    scope: scope.clone(),
                    what: other.frame_type().name().to_string(),
                })
            }
        };
        let inside = name == scope
            || (name.starts_with(scope.as_str())
                && name.as_bytes().get(scope.len()) == Some(&b'/'));
        if !inside {
            return Err(SessionError::OutOfScope {
                scope: scope.clone(),
                what: name.clone(),
            });
        }
        Ok(())
    }

    /// Checks a request from the client and says what to do with it.
    ///
    /// # Errors
    /// A [`SessionError`]: the daemon reports it with an `Error` frame and closes. Every frame
    /// before the handshake is done is one.
    pub fn handle_request(&mut self, frame: Frame) -> Result<Request, SessionError> {
        match (self.phase, frame) {
            (_, Frame::Error(e)) => Ok(Request::PeerError(e)),
            (Phase::AwaitHello, f) => Err(SessionError::Unexpected {
                frame: f.frame_type().name(),
                phase: "before Hello",
            }),
            (Phase::AwaitAuth, f) => Err(SessionError::Unexpected {
                frame: f.frame_type().name(),
                phase: "before Auth",
            }),
            (Phase::Ready, frame) => match self.unproven(&frame) {
                Some(answer) => answer,
                None => self.request(frame),
            },
        }
    }

    fn request(&mut self, frame: Frame) -> Result<Request, SessionError> {
        // Guessed chunks only in a pipelined delta: the client learns where guesses missed
        // from answers it does not wait for.
        const GUESS: u64 = crate::CAP_DELTA | crate::CAP_DELTA_PIPELINE | crate::CAP_DELTA_GUESS;
        const FINE: u64 = crate::CAP_DELTA | crate::CAP_DELTA_PUT | crate::CAP_DELTA_FINE;
        self.check_scope(&frame)?;
        let meta_frame = matches!(
            frame,
            Frame::Zeros(_)
                | Frame::ListTreeMeta(_)
                | Frame::SetMeta(_)
                | Frame::MakeHardLink(_)
                | Frame::MakeNode(_)
        );
        if matches!(frame, Frame::DataZ(_) | Frame::SetCompression(_))
            && self.client_capabilities & crate::CAP_COMPRESSION == 0
        {
            return Err(SessionError::Unexpected {
                frame: frame.frame_type().name(),
                phase: "without CAP_COMPRESSION",
            });
        }
        if meta_frame && self.client_capabilities & crate::CAP_TREE_META == 0 {
            return Err(SessionError::Unexpected {
                frame: frame.frame_type().name(),
                phase: "without CAP_TREE_META",
            });
        }
        if matches!(frame, Frame::OpenWriteSparse(_))
            && self.client_capabilities & crate::CAP_TREE_META_V2 == 0
        {
            return Err(SessionError::Unexpected {
                frame: frame.frame_type().name(),
                phase: "without CAP_TREE_META_V2",
            });
        }
        match frame {
            Frame::OpenWrite(req) => self.open_write(req, Vec::new()),
            Frame::OpenWriteSparse(req) => {
                let size = req.open.identity.size;
                if req.holes.len() > crate::MAX_HOLES {
                    return Err(SessionError::TooManyHoles(req.holes.len()));
                }
                let mut end = 0;
                for hole in &req.holes {
                    if hole.start < end || hole.end < hole.start || hole.end > size {
                        return Err(SessionError::OutOfRange {
                            start: hole.start,
                            end: hole.end,
                            size,
                        });
                    }
                    end = hole.end;
                }
                self.open_write(req.open, req.holes)
            }
            Frame::OpenRead(req) => {
                self.check_room()?;
                Ok(Request::OpenRead(req))
            }
            Frame::Data(data) => {
                let size = self.transfer("Data", data.transfer_id, TransferKind::Upload)?;
                self.check_chunk(data.offset, data.payload.len() as u64, size)?;
                Ok(Request::Data(UploadId(data.transfer_id), data))
            }
            Frame::DataZ(z) => {
                let size = self.transfer("DataZ", z.transfer_id, TransferKind::Upload)?;
                self.check_chunk(z.offset, z.raw_len.into(), size)?;
                Ok(Request::DataZ(UploadId(z.transfer_id), z))
            }
            Frame::SetCompression(c) => match c.mode {
                crate::COMPRESSION_OFF
                | crate::COMPRESSION_AUTO
                | 1..=crate::MAX_COMPRESSION_LEVEL => Ok(Request::SetCompression(c.mode)),
                other => Err(SessionError::BadCompression(other)),
            },
            Frame::Zeros(c) => {
                let size = self.transfer("Zeros", c.transfer_id, TransferKind::Upload)?;
                self.check_chunk(c.offset, c.len.into(), size)?;
                Ok(Request::Zeros(UploadId(c.transfer_id), c))
            }
            Frame::ReadChunk(c) => {
                let size = self.transfer("ReadChunk", c.transfer_id, TransferKind::Download)?;
                self.check_chunk(c.offset, c.len.into(), size)?;
                Ok(Request::ReadChunk(DownloadId(c.transfer_id), c))
            }
            Frame::Commit(c) => {
                self.transfer("Commit", c.transfer_id, TransferKind::Upload)?;
                Ok(Request::Commit(UploadId(c.transfer_id), c))
            }
            Frame::DigestRequest(c) => {
                self.transfer("DigestRequest", c.transfer_id, TransferKind::Download)?;
                Ok(Request::Digest(DownloadId(c.transfer_id)))
            }
            Frame::List(list) => Ok(Request::List(list)),
            Frame::ListTree(req) => Ok(Request::ListTree(req)),
            Frame::PutFile(req) => Ok(Request::PutFile(req)),
            Frame::PutFileMeta(req) if self.capabilities() & crate::CAP_PUT_META != 0 => {
                Ok(Request::PutFileMeta(req))
            }
            Frame::PackedPutFiles(p) if self.capabilities() & crate::CAP_PACKED_FILES != 0 => {
                Ok(Request::PackedPutFiles(p))
            }
            Frame::MakeDir(req) => Ok(Request::MakeDir(req)),
            Frame::MakeLink(req) => Ok(Request::MakeLink(req)),
            Frame::GetFile(req) => Ok(Request::GetFile(req)),
            Frame::Sync => Ok(Request::Sync),
            Frame::CopyTo(req) => Ok(Request::CopyTo(req)),
            Frame::ListTreeMeta(req) => Ok(Request::ListTreeMeta(req)),
            Frame::SetMeta(req) => Ok(Request::SetMeta(req)),
            Frame::MakeHardLink(req) => Ok(Request::MakeHardLink(req)),
            Frame::MakeNode(req) => Ok(Request::MakeNode(req)),
            Frame::Delete(req) if self.client_capabilities & crate::CAP_DELETE != 0 => {
                Ok(Request::Delete(req))
            }
            Frame::MirrorTo(req) if self.client_capabilities & crate::CAP_MIRROR != 0 => {
                Ok(Request::MirrorTo(req))
            }
            Frame::AwaitCommits(req) if self.client_capabilities & crate::CAP_TREE_CLOSE != 0 => {
                if req.names.len() > crate::MAX_AWAITED {
                    return Err(SessionError::TooManyAwaited(req.names.len()));
                }
                Ok(Request::AwaitCommits(req))
            }
            Frame::DeltaOpen(d) if self.client_capabilities & crate::CAP_DELTA != 0 => {
                self.transfer("DeltaOpen", d.transfer_id, TransferKind::Upload)?;
                Ok(Request::DeltaOpen(UploadId(d.transfer_id), d))
            }
            Frame::DeltaSig(d) if self.client_capabilities & crate::CAP_DELTA != 0 => {
                let size = self.transfer("DeltaSig", d.transfer_id, TransferKind::Upload)?;
                self.check_sig(d.offset, &d.chunks, size)?;
                Ok(Request::DeltaSig(UploadId(d.transfer_id), d))
            }
            Frame::DeltaGuess(d) if self.client_capabilities & GUESS == GUESS => {
                let size = self.transfer("DeltaGuess", d.transfer_id, TransferKind::Upload)?;
                self.check_sig(d.offset, &d.chunks, size)?;
                Ok(Request::DeltaGuess(UploadId(d.transfer_id), d))
            }
            Frame::ReadSig(r) if self.client_capabilities & crate::CAP_DELTA != 0 => {
                let size = self.transfer("ReadSig", r.transfer_id, TransferKind::Download)?;
                let avg_ok = r.avg_chunk.is_power_of_two()
                    && (crate::MIN_AVG_CHUNK..=crate::MAX_AVG_CHUNK).contains(&r.avg_chunk);
                if r.offset >= r.end || r.end > size || !avg_ok {
                    return Err(SessionError::Unexpected {
                        frame: "ReadSig",
                        phase: "with an empty range, one beyond the file, or a bad avg_chunk",
                    });
                }
                Ok(Request::ReadSig(DownloadId(r.transfer_id), r))
            }
            Frame::DeltaResume(d)
                if self.client_capabilities & (crate::CAP_DELTA | crate::CAP_DELTA_PIPELINE)
                    == crate::CAP_DELTA | crate::CAP_DELTA_PIPELINE =>
            {
                self.transfer("DeltaResume", d.transfer_id, TransferKind::Upload)?;
                Ok(Request::DeltaResume(UploadId(d.transfer_id), d))
            }
            Frame::CopyMode(m) if self.client_capabilities & crate::CAP_COPY_DELTA != 0 => {
                Ok(Request::CopyMode(m.delta))
            }
            Frame::DeltaPut(d)
                if self.client_capabilities & (crate::CAP_DELTA | crate::CAP_DELTA_PUT)
                    == crate::CAP_DELTA | crate::CAP_DELTA_PUT =>
            {
                self.check_whole_sig(&d)?;
                if self.open.len() >= self.config.max_open {
                    return Ok(Request::DeltaPutFull(d.open.name, self.config.max_open));
                }
                let Request::OpenWrite(open, _) = self.open_write(d.open, Vec::new())? else {
                    unreachable!("open_write answers OpenWrite");
                };
                Ok(Request::DeltaPut(crate::DeltaPut { open, ..d }))
            }
            Frame::DeltaCopy(d) if self.client_capabilities & FINE == FINE => {
                let size = self.transfer("DeltaCopy", d.transfer_id, TransferKind::Upload)?;
                self.check_copies(&d.copies, size)?;
                Ok(Request::DeltaCopy(UploadId(d.transfer_id), d))
            }
            Frame::Goodbye => Ok(Request::Goodbye),
            other @ (Frame::Delete(_)
            | Frame::AwaitCommits(_)
            | Frame::DeltaCopy(_)
            | Frame::CopyMode(_)
            | Frame::PackedPutFiles(_)
            | Frame::PutFileMeta(_)
            | Frame::ReadSig(_)
            | Frame::MirrorTo(_)
            | Frame::DeltaOpen(_)
            | Frame::DeltaSig(_)
            | Frame::DeltaPut(_)
            | Frame::DeltaGuess(_)
            | Frame::DeltaResume(_)) => Err(SessionError::Unexpected {
                frame: other.frame_type().name(),
                phase: "without its capability negotiated",
            }),
            other => Err(SessionError::Unexpected {
                frame: other.frame_type().name(),
                phase: "from a client",
            }),
        }
    }

    fn check_room(&self) -> Result<(), SessionError> {
        if self.open.len() >= self.config.max_open {
            return Err(SessionError::TooManyOpen(self.config.max_open));
        }
        Ok(())
    }

    fn transfer(
        &self,
        frame: &'static str,
        id: u64,
        kind: TransferKind,
    ) -> Result<u64, SessionError> {
        match (self.open.get(&id), kind) {
            (Some(Transfer::Upload { size, .. }), TransferKind::Upload)
            | (Some(Transfer::Download { size, .. }), TransferKind::Download) => Ok(*size),
            _ => Err(SessionError::UnknownTransfer {
                frame,
                id,
                kind: match kind {
                    TransferKind::Upload => "upload",
                    TransferKind::Download => "download",
                },
            }),
        }
    }

    fn check_chunk(&self, offset: u64, len: u64, size: u64) -> Result<(), SessionError> {
        if len > u64::from(self.config.max_chunk) {
            return Err(SessionError::ChunkTooLarge {
                len,
                max: self.config.max_chunk,
            });
        }
        let end = offset.saturating_add(len);
        if end > size {
            return Err(SessionError::OutOfRange {
                start: offset,
                end,
                size,
            });
        }
        Ok(())
    }

    /// A `DeltaSig` names at most `MAX_DELTA_CHUNKS` non-empty chunks, each within the largest
    /// `Data` payload, that end within the upload.
    fn check_sig(
        &self,
        offset: u64,
        chunks: &[crate::SigChunk],
        size: u64,
    ) -> Result<(), SessionError> {
        if chunks.len() > crate::MAX_DELTA_CHUNKS {
            return Err(SessionError::TooManyChunks(chunks.len()));
        }
        let mut end = offset;
        for chunk in chunks {
            if chunk.len == 0 || chunk.len > crate::MAX_CHUNK_SIZE {
                return Err(SessionError::ChunkTooLarge {
                    len: chunk.len.into(),
                    max: crate::MAX_CHUNK_SIZE,
                });
            }
            end = end.saturating_add(chunk.len.into());
        }
        if end > size {
            return Err(SessionError::OutOfRange {
                start: offset,
                end,
                size,
            });
        }
        Ok(())
    }

    /// A `DeltaCopy` names at most `MAX_FINE_COPIES` non-empty runs, none longer than
    /// `MAX_FINE_GAP`, that end within the upload (and, in the basis, within 64 bits).
    fn check_copies(&self, copies: &[crate::FineCopy], size: u64) -> Result<(), SessionError> {
        if copies.len() > crate::MAX_FINE_COPIES {
            return Err(SessionError::TooManyCopies(copies.len()));
        }
        for copy in copies {
            let len = u64::from(copy.len);
            if len == 0 || len > crate::MAX_FINE_GAP {
                return Err(SessionError::ChunkTooLarge {
                    len,
                    max: crate::MAX_FINE_GAP as u32,
                });
            }
            let end = copy.new.saturating_add(len);
            if end > size || copy.old.checked_add(len).is_none() {
                return Err(SessionError::OutOfRange {
                    start: copy.new,
                    end,
                    size,
                });
            }
        }
        Ok(())
    }

    /// A `DeltaPut`'s signature is a whole file's, cut with a valid average: chunks as for
    /// `DeltaSig`, from offset 0, adding up to exactly the file's size.
    fn check_whole_sig(&self, put: &crate::DeltaPut) -> Result<(), SessionError> {
        let avg = put.avg_chunk;
        if !avg.is_power_of_two() || !(crate::MIN_AVG_CHUNK..=crate::MAX_AVG_CHUNK).contains(&avg) {
            return Err(SessionError::Unexpected {
                frame: "DeltaPut",
                phase: "with a bad avg_chunk",
            });
        }
        let size = put.open.identity.size;
        self.check_sig(0, &put.chunks, size)?;
        let covered: u64 = put.chunks.iter().map(|c| u64::from(c.len)).sum();
        if covered != size {
            return Err(SessionError::OutOfRange {
                start: 0,
                end: covered,
                size,
            });
        }
        Ok(())
    }

    fn open_write(
        &mut self,
        req: OpenWrite,
        holes: Vec<crate::ByteRange>,
    ) -> Result<Request, SessionError> {
        self.check_room()?;
        if req.chunk_size > self.config.max_chunk {
            return Err(SessionError::ChunkTooLarge {
                len: req.chunk_size.into(),
                max: self.config.max_chunk,
            });
        }
        Ok(Request::OpenWrite(req, holes))
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Records the upload the daemon opened for the last `OpenWrite`, with its state; returns
    /// its handle (`get()` is the id to send in `WriteOpened`).
    pub fn open_upload(&mut self, size: u64, state: U) -> UploadId {
        let id = self.next_id();
        self.open.insert(id, Transfer::Upload { size, state });
        UploadId(id)
    }

    /// Records the download the daemon opened for the last `OpenRead`, with its state.
    pub fn open_download(&mut self, size: u64, state: D) -> DownloadId {
        let id = self.next_id();
        self.open.insert(id, Transfer::Download { size, state });
        DownloadId(id)
    }

    /// The daemon's state for an open upload.
    ///
    /// # Errors
    /// [`SessionError::TransferClosed`] once the upload is closed.
    pub fn upload(&mut self, id: UploadId) -> Result<&mut U, SessionError> {
        match self.open.get_mut(&id.0) {
            Some(Transfer::Upload { state, .. }) => Ok(state),
            _ => Err(SessionError::TransferClosed(id.0)),
        }
    }

    /// The daemon's state for an open download.
    ///
    /// # Errors
    /// [`SessionError::TransferClosed`] once the download is closed.
    pub fn download(&mut self, id: DownloadId) -> Result<&mut D, SessionError> {
        match self.open.get_mut(&id.0) {
            Some(Transfer::Download { state, .. }) => Ok(state),
            _ => Err(SessionError::TransferClosed(id.0)),
        }
    }

    /// Forgets an upload (committed or abandoned) and hands its state back.
    ///
    /// # Errors
    /// [`SessionError::TransferClosed`] if it was closed already.
    pub fn close_upload(&mut self, id: UploadId) -> Result<U, SessionError> {
        match self.open.remove(&id.0) {
            Some(Transfer::Upload { state, .. }) => Ok(state),
            Some(other) => {
                self.open.insert(id.0, other);
                Err(SessionError::TransferClosed(id.0))
            }
            None => Err(SessionError::TransferClosed(id.0)),
        }
    }

    /// The daemon's state for every open upload.
    pub fn uploads(&self) -> impl Iterator<Item = &U> {
        self.open.values().filter_map(|t| match t {
            Transfer::Upload { state, .. } => Some(state),
            Transfer::Download { .. } => None,
        })
    }

    /// The daemon's state for every open download.
    pub fn downloads(&self) -> impl Iterator<Item = &D> {
        self.open.values().filter_map(|t| match t {
            Transfer::Download { state, .. } => Some(state),
            Transfer::Upload { .. } => None,
        })
    }

    /// Number of transfers open.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Auth, ByteRange, Commit, FileIdentity, Hello};
    use bytes::Bytes;

    fn hello(nonce: Vec<u8>) -> Frame {
        Frame::Hello(Hello {
            version: 1,
            min_version: 1,
            capabilities: 0,
            agent: "t".into(),
            nonce,
        })
    }

    fn config(token: Option<&[u8]>) -> ServerConfig {
        ServerConfig {
            token: token.map(Into::into),
            max_chunk: 1024,
            max_open: 2,
            tls: false,
            window: 4,
            agent: "xferd/test".into(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            replay: Some(Default::default()),
        }
    }

    fn session(token: Option<&[u8]>) -> ServerSession {
        ServerSession::new(
            config(token),
            vec![7; auth::NONCE_LEN],
            1_000_000,
            Instant::now(),
        )
    }

    fn ready() -> ServerSession {
        let mut s = session(None);
        s.handle_handshake(hello(vec![])).unwrap();
        s
    }

    /// A session admitted after a `Hello` offering `capabilities`.
    fn offering(capabilities: u64) -> ServerSession {
        let Frame::Hello(mut h) = hello(vec![]) else {
            unreachable!()
        };
        h.capabilities = capabilities;
        let mut s = session(None);
        s.handle_handshake(Frame::Hello(h)).unwrap();
        s
    }

    fn open_write(size: u64) -> Frame {
        Frame::OpenWrite(OpenWrite {
            name: "f".into(),
            identity: FileIdentity { size, mtime_ns: 0 },
            mode: 0o644,
            chunk_size: 512,
        })
    }

    #[test]
    fn a_sparse_open_needs_the_capability_and_holes_in_order_within_the_file() {
        let sparse = |holes: Vec<ByteRange>| {
            let Frame::OpenWrite(open) = open_write(100) else {
                unreachable!()
            };
            Frame::OpenWriteSparse(crate::OpenWriteSparse { open, holes })
        };
        assert!(matches!(
            ready().handle_request(sparse(vec![])),
            Err(SessionError::Unexpected { .. })
        ));
        let offered = || {
            let s = offering(crate::CAP_TREE_META_V2);
            assert_eq!(s.capabilities(), crate::CAP_TREE_META_V2);
            s
        };
        let holes = vec![ByteRange::new(10, 20), ByteRange::new(20, 100)];
        match offered().handle_request(sparse(holes.clone())) {
            Ok(Request::OpenWrite(open, got)) => {
                assert_eq!(open.name, "f");
                assert_eq!(got, holes);
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            vec![ByteRange::new(50, 60), ByteRange::new(10, 20)],
            vec![ByteRange::new(90, 101)],
        ] {
            assert!(matches!(
                offered().handle_request(sparse(bad)),
                Err(SessionError::OutOfRange { .. })
            ));
        }
        let many = (0..=crate::MAX_HOLES as u64)
            .map(|i| ByteRange::new(i, i))
            .collect();
        assert!(matches!(
            offered().handle_request(sparse(many)),
            Err(SessionError::TooManyHoles(_))
        ));
    }

    #[test]
    fn a_delta_put_needs_both_capabilities_room_and_a_whole_signature() {
        let put = |avg_chunk, lens: &[u32]| {
            let Frame::OpenWrite(open) = open_write(100) else {
                unreachable!()
            };
            Frame::DeltaPut(crate::DeltaPut {
                open,
                avg_chunk,
                chunks: lens
                    .iter()
                    .map(|&len| crate::SigChunk { len, hash: [0; 16] })
                    .collect(),
            })
        };
        let both = crate::CAP_DELTA | crate::CAP_DELTA_PUT;
        for capabilities in [0, crate::CAP_DELTA, crate::CAP_DELTA_PUT] {
            assert!(matches!(
                offering(capabilities).handle_request(put(16384, &[60, 40])),
                Err(SessionError::Unexpected { .. })
            ));
        }
        let mut s = offering(both);
        assert_eq!(s.capabilities(), both);
        match s.handle_request(put(16384, &[60, 40])) {
            Ok(Request::DeltaPut(p)) => {
                assert_eq!((p.open.name.as_str(), p.chunks.len()), ("f", 2))
            }
            other => panic!("{other:?}"),
        }
        // Short of the file, beyond it, an empty chunk, a bad average: refused.
        for (avg, lens) in [
            (16384, &[60, 39][..]),
            (16384, &[60, 41]),
            (16384, &[100, 0]),
            (16385, &[100]),
            (1024, &[100]),
        ] {
            assert!(
                offering(both).handle_request(put(avg, lens)).is_err(),
                "{avg} {lens:?}"
            );
        }
        // It opens an upload: no more than the connection's room (two here), beyond which it
        // is refused and the connection goes on.
        s.open_upload(100, ());
        s.open_upload(100, ());
        match s.handle_request(put(16384, &[100])) {
            Ok(Request::DeltaPutFull(name, 2)) => assert_eq!(name, "f"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.open_count(), 2);
        assert!(matches!(
            s.handle_request(open_write(100)),
            Err(SessionError::TooManyOpen(2))
        ));
    }

    #[test]
    fn delta_frames_need_the_capability_and_stay_within_the_upload() {
        let sig = |id, offset, lens: &[u32]| {
            Frame::DeltaSig(crate::DeltaSig {
                transfer_id: id,
                offset,
                chunks: lens
                    .iter()
                    .map(|&len| crate::SigChunk { len, hash: [0; 16] })
                    .collect(),
            })
        };
        let open = |transfer_id| Frame::DeltaOpen(crate::DeltaOpen { transfer_id });
        let mut old = ready();
        assert!(matches!(
            old.handle_request(open_write(100)),
            Ok(Request::OpenWrite(..))
        ));
        let id = old.open_upload(100, ()).get();
        assert!(matches!(
            old.handle_request(open(id)),
            Err(SessionError::Unexpected { .. })
        ));

        let mut s = offering(crate::CAP_DELTA);
        assert_eq!(s.capabilities(), crate::CAP_DELTA);
        assert!(matches!(
            s.handle_request(open(7)),
            Err(SessionError::UnknownTransfer { .. })
        ));
        s.handle_request(open_write(100)).unwrap();
        let id = s.open_upload(100, ()).get();
        assert!(matches!(
            s.handle_request(open(id)),
            Ok(Request::DeltaOpen(..))
        ));
        assert!(matches!(
            s.handle_request(sig(id, 40, &[30, 30])),
            Ok(Request::DeltaSig(..))
        ));
        assert!(matches!(
            s.handle_request(sig(id, 40, &[30, 31])),
            Err(SessionError::OutOfRange { end: 101, .. })
        ));
        let guess = |id, offset, lens: &[u32]| match sig(id, offset, lens) {
            Frame::DeltaSig(body) => Frame::DeltaGuess(body),
            _ => unreachable!(),
        };
        assert!(
            matches!(
                s.handle_request(guess(id, 40, &[30, 30])),
                Err(SessionError::Unexpected { .. })
            ),
            "DeltaGuess without CAP_DELTA_GUESS"
        );
        let mut g = offering(crate::CAP_DELTA | crate::CAP_DELTA_PIPELINE | crate::CAP_DELTA_GUESS);
        g.handle_request(open_write(100)).unwrap();
        let gid = g.open_upload(100, ()).get();
        assert!(matches!(
            g.handle_request(guess(gid, 40, &[30, 30])),
            Ok(Request::DeltaGuess(..))
        ));
        assert!(matches!(
            g.handle_request(guess(gid, 40, &[30, 31])),
            Err(SessionError::OutOfRange { end: 101, .. })
        ));
        assert!(matches!(
            g.handle_request(guess(gid, 0, &[0])),
            Err(SessionError::ChunkTooLarge { .. })
        ));
        assert!(matches!(
            s.handle_request(sig(id, 0, &[0])),
            Err(SessionError::ChunkTooLarge { .. })
        ));
        assert!(matches!(
            s.handle_request(sig(id, u64::MAX, &[1])),
            Err(SessionError::OutOfRange { .. })
        ));
        let read_sig = |transfer_id, offset, end, avg_chunk| {
            Frame::ReadSig(crate::ReadSig {
                transfer_id,
                offset,
                end,
                avg_chunk,
            })
        };
        assert!(matches!(
            s.handle_request(read_sig(id, 0, 50, 16384)),
            Err(SessionError::UnknownTransfer { .. })
        ));
        s.handle_request(Frame::OpenRead(OpenRead {
            name: "f".into(),
            have_identity: None,
            have: vec![],
        }))
        .unwrap();
        let down = s.open_download(100, ()).get();
        assert!(matches!(
            s.handle_request(read_sig(down, 0, 100, 16384)),
            Ok(Request::ReadSig(..))
        ));
        for (offset, end, avg) in [
            (10, 10, 16384),
            (0, 101, 16384),
            (0, 50, 16385),
            (0, 50, 1024),
        ] {
            assert!(
                s.handle_request(read_sig(down, offset, end, avg)).is_err(),
                "{offset}..{end} avg {avg}"
            );
        }
        let too_many = vec![1; crate::MAX_DELTA_CHUNKS + 1];
        let err = s.handle_request(sig(id, 0, &too_many)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::TooLarge);
    }

    #[test]
    fn files_with_metadata_need_the_capability_and_tree_metadata() {
        let put = || {
            Frame::PutFileMeta(crate::PutFileMeta {
                file: crate::PutFile {
                    name: "t/a".into(),
                    mtime_ns: 0,
                    mode: 0o644,
                    crc32: 0,
                    data: Vec::new(),
                },
                uid: 0,
                gid: 0,
                user: String::new(),
                group: String::new(),
                numeric_ids: true,
                xattrs: None,
            })
        };
        let hello = |capabilities| {
            let mut s = session(None);
            s.handle_handshake(Frame::Hello(Hello {
                version: 1,
                min_version: 1,
                capabilities,
                agent: "t".into(),
                nonce: vec![],
            }))
            .unwrap();
            s
        };
        // Offered alone it is not granted, and the frame is refused.
        let mut alone = hello(crate::CAP_PUT_META);
        assert_eq!(alone.capabilities(), 0);
        assert!(matches!(
            alone.handle_request(put()),
            Err(SessionError::Unexpected { .. })
        ));
        let both = crate::CAP_PUT_META | crate::CAP_TREE_META;
        let mut s = hello(both);
        assert_eq!(s.capabilities(), both);
        assert!(matches!(
            s.handle_request(put()),
            Ok(Request::PutFileMeta(_))
        ));
    }

    #[test]
    fn tree_metadata_frames_need_the_capability() {
        let set_meta = || {
            Frame::SetMeta(crate::SetMeta {
                name: "t/a".into(),
                mode: 0o644,
                mtime_ns: 0,
                uid: 0,
                gid: 0,
                user: String::new(),
                group: String::new(),
                numeric_ids: true,
                xattrs: None,
            })
        };
        let mut old = ready();
        assert_eq!(old.capabilities() & crate::CAP_TREE_META, 0);
        assert!(matches!(
            old.handle_request(set_meta()),
            Err(SessionError::Unexpected { .. })
        ));

        let mut s = offering(crate::CAP_TREE_META);
        assert_eq!(s.capabilities(), crate::CAP_TREE_META);
        assert!(matches!(
            s.handle_request(set_meta()),
            Ok(Request::SetMeta(_))
        ));
        s.handle_request(open_write(1000)).unwrap();
        let id = s.open_upload(1000, ()).get();
        let zeros = |offset, len| {
            Frame::Zeros(ChunkRef {
                transfer_id: id,
                offset,
                len,
            })
        };
        assert!(matches!(
            s.handle_request(zeros(0, 512)),
            Ok(Request::Zeros(_, _))
        ));
        assert!(matches!(
            s.handle_request(zeros(900, 512)),
            Err(SessionError::OutOfRange { .. })
        ));
    }

    #[test]
    fn requests_before_hello_are_refused() {
        let err = session(None).handle_request(open_write(1)).unwrap_err();
        assert!(matches!(
            err,
            SessionError::Unexpected {
                frame: "OpenWrite",
                ..
            }
        ));
        assert_eq!(err.code(), ErrorCode::Protocol);
    }

    #[test]
    fn version_is_negotiated() {
        let mut s = session(None);
        let f = Frame::Hello(Hello {
            version: 9,
            min_version: 2,
            capabilities: 0,
            agent: String::new(),
            nonce: vec![],
        });
        assert!(matches!(
            s.handle_handshake(f),
            Err(SessionError::Version { min: 2, max: 9 })
        ));
        let mut s = session(None);
        let f = Frame::Hello(Hello {
            version: 9,
            min_version: 1,
            capabilities: 0,
            agent: String::new(),
            nonce: vec![],
        });
        assert!(matches!(s.handle_handshake(f), Ok(Handshake::Admitted)));
        assert_eq!(s.phase(), Phase::Ready);
        assert_eq!(s.welcome().version, 1);
    }

    #[test]
    fn token_must_be_proven() {
        let cn = vec![1; auth::NONCE_LEN];
        let mut s = session(Some(b"tok"));
        let Ok(Handshake::Challenge(challenge)) = s.handle_handshake(hello(cn.clone())) else {
            panic!("want Challenge")
        };
        assert_eq!(challenge.nonce, s.nonce());
        assert_eq!(s.phase(), Phase::AwaitAuth);
        assert!(
            s.handle_request(open_write(1)).is_err(),
            "no requests before Auth"
        );

        let mut s = session(Some(b"tok"));
        s.handle_handshake(hello(cn.clone())).unwrap();
        let bad = auth::client_proof(b"other", &cn, s.nonce());
        assert_eq!(
            s.handle_handshake(Frame::Auth(Auth {
                proof: bad,
                grant: None
            }))
            .unwrap_err(),
            SessionError::AuthFailed
        );

        let mut s = session(Some(b"tok"));
        s.handle_handshake(hello(cn.clone())).unwrap();
        let good = auth::client_proof(b"tok", &cn, s.nonce());
        let Ok(Handshake::Admitted) = s.handle_handshake(Frame::Auth(Auth {
            proof: good,
            grant: None,
        })) else {
            panic!("want Admitted")
        };
        let welcome = s.welcome();
        assert!(auth::verify_server(b"tok", &cn, s.nonce(), &welcome.proof));
        assert_eq!(welcome.capabilities, crate::CAP_AUTH);
        assert_eq!((welcome.window, welcome.agent.as_str()), (4, "xferd/test"));
        assert!(s.handle_request(open_write(1)).is_ok());
        assert!(
            s.handle_handshake(hello(cn.clone())).is_err(),
            "no second handshake"
        );
    }

    /// A session with the token `tok`, its clock at `NOW_MS`, its `Hello` offering the early
    /// proof already answered by `EarlyChallenge`, sharing `replay`.
    fn zero_rtt_session(replay: &Arc<crate::replay::ReplayCache>) -> ServerSession {
        zero_rtt_session_of(replay, 1)
    }

    /// [`zero_rtt_session`] for a client whose nonce is `nonce_byte` repeated.
    fn zero_rtt_session_of(
        replay: &Arc<crate::replay::ReplayCache>,
        nonce_byte: u8,
    ) -> ServerSession {
        let config = ServerConfig {
            replay: Some(Arc::clone(replay)),
            ..config(Some(b"tok"))
        };
        let mut s = ServerSession::new(
            config,
            vec![7; auth::NONCE_LEN],
            NOW_MS / 1000,
            Instant::now(),
        );
        let Frame::Hello(mut h) = hello(vec![nonce_byte; auth::NONCE_LEN]) else {
            unreachable!()
        };
        h.capabilities = crate::CAP_EARLY_AUTH | crate::CAP_ZERO_RTT;
        let Ok(Handshake::EarlyChallenge(early)) = s.handle_handshake(Frame::Hello(h)) else {
            panic!("want EarlyChallenge")
        };
        assert_ne!(early.welcome.capabilities & crate::CAP_ZERO_RTT, 0);
        s
    }

    const NOW_MS: u64 = 1_700_000_000_000;

    fn early_auth(token: &[u8], time_ms: u64) -> Frame {
        Frame::EarlyAuth(crate::EarlyAuth {
            time_ms,
            proof: auth::zero_rtt_proof(token, &[1; auth::NONCE_LEN], time_ms),
        })
    }

    fn list() -> Frame {
        Frame::List(List { dir: String::new() })
    }

    #[test]
    fn an_early_proof_is_taken_once_within_its_window_then_reads_until_auth() {
        let replay = Arc::new(crate::replay::ReplayCache::default());
        let mut s = zero_rtt_session(&replay);
        let Ok(Handshake::Admitted) = s.handle_handshake(early_auth(b"tok", NOW_MS + 2000)) else {
            panic!("want the early proof taken")
        };
        assert!(s.is_early() && s.capabilities() & crate::CAP_AUTH != 0);
        assert!(matches!(s.handle_request(list()), Ok(Request::List(_))));
        assert_eq!(
            s.handle_request(open_write(1)).unwrap_err(),
            SessionError::NotProven("OpenWrite"),
            "nothing but reads before the Auth"
        );
        let mut s = zero_rtt_session(&Arc::default());
        s.handle_handshake(early_auth(b"tok", NOW_MS)).unwrap();
        let proof = auth::client_proof(b"tok", &[1; auth::NONCE_LEN], s.nonce());
        let auth = Frame::Auth(Auth { proof, grant: None });
        assert!(matches!(s.handle_request(auth), Ok(Request::Skip)));
        assert!(s.handle_request(open_write(1)).is_ok(), "proven: anything");
    }

    #[test]
    fn a_replayed_or_skewed_early_proof_falls_back_to_the_challenge_and_discards_reads() {
        let replay = Arc::new(crate::replay::ReplayCache::default());
        let mut s = zero_rtt_session(&replay);
        s.handle_handshake(early_auth(b"tok", NOW_MS)).unwrap();
        for (time_ms, why) in [
            (NOW_MS, "replay"),
            (NOW_MS + crate::ZERO_RTT_WINDOW_MS + 1, "skew"),
        ] {
            let mut s = zero_rtt_session(&replay);
            let Ok(Handshake::EarlyRefused(refused)) =
                s.handle_handshake(early_auth(b"tok", time_ms))
            else {
                panic!("want {why} refused")
            };
            assert_eq!(refused.reason, why);
            assert!(matches!(s.handle_handshake(list()), Ok(Handshake::Next)));
            assert!(
                s.handle_handshake(open_write(1)).is_err(),
                "only reads are discarded"
            );
            let mut s = zero_rtt_session(&replay);
            s.handle_handshake(early_auth(b"tok", time_ms)).unwrap();
            s.handle_handshake(list()).unwrap();
            let proof = auth::client_proof(b"tok", &[1; auth::NONCE_LEN], s.nonce());
            let Ok(Handshake::Admitted) =
                s.handle_handshake(Frame::Auth(Auth { proof, grant: None }))
            else {
                panic!("want the challenge answered")
            };
            assert!(s.handle_request(open_write(1)).is_ok());
        }
    }

    #[test]
    fn a_wrong_early_proof_fails_and_discarding_is_bounded() {
        let replay = Arc::new(crate::replay::ReplayCache::default());
        let mut s = zero_rtt_session(&replay);
        assert_eq!(
            s.handle_handshake(early_auth(b"other", NOW_MS))
                .unwrap_err(),
            SessionError::AuthFailed
        );
        assert!(replay.is_empty(), "a wrong proof takes no room");
        let mut s = zero_rtt_session(&replay);
        s.handle_handshake(early_auth(b"tok", NOW_MS - crate::ZERO_RTT_WINDOW_MS - 1))
            .unwrap();
        let big = Frame::List(List {
            dir: "d".repeat(60_000),
        });
        let mut discarded = 0;
        let error = loop {
            match s.handle_handshake(big.clone()) {
                Ok(_) => discarded += 60_000,
                Err(e) => break e,
            }
        };
        assert_eq!(error, SessionError::EarlyFlightTooLong);
        assert!(discarded <= crate::ZERO_RTT_DISCARD_MAX);
    }

    #[test]
    fn a_full_replay_cache_refuses_rather_than_grows() {
        let replay = Arc::new(crate::replay::ReplayCache::with_capacity(1));
        let mut s = zero_rtt_session(&replay);
        s.handle_handshake(early_auth(b"tok", NOW_MS)).unwrap();
        let mut s = zero_rtt_session_of(&replay, 2);
        let early = Frame::EarlyAuth(crate::EarlyAuth {
            time_ms: NOW_MS,
            proof: auth::zero_rtt_proof(b"tok", &[2; auth::NONCE_LEN], NOW_MS),
        });
        let Ok(Handshake::EarlyRefused(refused)) = s.handle_handshake(early) else {
            panic!("want refused")
        };
        assert_eq!((refused.reason.as_str(), replay.len()), ("full", 1));
    }

    #[test]
    fn an_early_proof_is_a_protocol_error_where_it_is_not_taken() {
        // Without the cache the server predates the bit: frame 0x06 has no place.
        let Frame::Hello(mut h) = hello(vec![1; auth::NONCE_LEN]) else {
            unreachable!()
        };
        h.capabilities = crate::CAP_EARLY_AUTH | crate::CAP_ZERO_RTT;
        let config = ServerConfig {
            replay: None,
            ..config(Some(b"tok"))
        };
        let mut s: ServerSession =
            ServerSession::new(config, vec![7; 32], NOW_MS / 1000, Instant::now());
        let Ok(Handshake::EarlyChallenge(early)) = s.handle_handshake(Frame::Hello(h)) else {
            panic!("want EarlyChallenge")
        };
        assert_eq!(early.welcome.capabilities & crate::CAP_ZERO_RTT, 0);
        assert_eq!(
            s.handle_handshake(early_auth(b"tok", NOW_MS))
                .unwrap_err()
                .code(),
            ErrorCode::Protocol
        );
    }

    #[test]
    fn deadlines_are_the_handshake_s_then_the_idle_timeout() {
        let start = Instant::now();
        let mut s: ServerSession =
            ServerSession::new(config(Some(b"tok")), vec![7; auth::NONCE_LEN], 0, start);
        let later = start + Duration::from_secs(3);
        let handshake_deadline = Some(start + Duration::from_secs(10));
        assert_eq!(s.poll_timeout(later), handshake_deadline);
        assert_eq!(s.timed_out(), SessionError::HandshakeTimedOut);
        let cn = vec![1; auth::NONCE_LEN];
        s.handle_handshake(hello(cn.clone())).unwrap();
        assert_eq!(
            s.poll_timeout(later),
            handshake_deadline,
            "Hello does not extend the handshake"
        );
        let proof = auth::client_proof(b"tok", &cn, s.nonce());
        s.handle_handshake(Frame::Auth(Auth { proof, grant: None }))
            .unwrap();
        assert_eq!(
            s.poll_timeout(later),
            Some(later + Duration::from_secs(300))
        );
        assert_eq!(s.timed_out(), SessionError::Idle(Duration::from_secs(300)));
        assert_eq!(s.timed_out().to_string(), "idle for 300s");
    }

    /// The idle timeout told behind the `Welcome` is the one the session keeps to, whatever it
    /// is configured to, and only a client that offered the bit is told it.
    #[test]
    fn the_idle_timeout_told_is_the_one_kept() {
        let start = Instant::now();
        let config = ServerConfig {
            idle_timeout: Duration::from_millis(1500),
            ..config(None)
        };
        let mut s: ServerSession = ServerSession::new(config, vec![7; auth::NONCE_LEN], 0, start);
        let Frame::Hello(mut h) = hello(vec![]) else {
            unreachable!()
        };
        h.capabilities = crate::CAP_IDLE_TIMEOUT;
        s.handle_handshake(Frame::Hello(h)).unwrap();
        let frames = s.welcome_frames();
        assert_eq!(frames[0], Frame::Welcome(s.welcome()));
        let Frame::IdleTimeout(told) = frames[1] else {
            panic!("want IdleTimeout behind the Welcome, got {frames:?}")
        };
        let told = Duration::from_millis(told.millis);
        assert_eq!(s.poll_timeout(start), Some(start + told));
        assert_eq!(
            ready().welcome_frames(),
            [Frame::Welcome(ready().welcome())]
        );
    }

    #[test]
    fn empty_client_nonce_cannot_authenticate() {
        let mut s = session(Some(b"tok"));
        s.handle_handshake(hello(vec![])).unwrap();
        let proof = auth::client_proof(b"tok", &[], s.nonce());
        assert_eq!(
            s.handle_handshake(Frame::Auth(Auth { proof, grant: None }))
                .unwrap_err(),
            SessionError::AuthFailed
        );
    }

    #[test]
    fn data_is_checked_against_its_transfer() {
        let mut s: ServerSession<&str> = ServerSession::new(
            config(None),
            vec![7; auth::NONCE_LEN],
            1_000_000,
            Instant::now(),
        );
        s.handle_handshake(hello(vec![])).unwrap();
        let data =
            |id, offset, len: usize| Frame::Data(Data::new(id, offset, Bytes::from(vec![0; len])));
        assert!(matches!(
            s.handle_request(data(1, 0, 1)),
            Err(SessionError::UnknownTransfer { .. })
        ));
        assert!(matches!(
            s.handle_request(open_write(1000)),
            Ok(Request::OpenWrite(..))
        ));
        let handle = s.open_upload(1000, "state");
        let id = handle.get();
        assert!(matches!(
            s.handle_request(data(id, 0, 1000)),
            Ok(Request::Data(h, _)) if h == handle
        ));
        assert!(matches!(
            s.handle_request(data(id, 1, 1000)),
            Err(SessionError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.handle_request(data(id, u64::MAX, 1)),
            Err(SessionError::OutOfRange { .. })
        ));
        let read = Frame::ReadChunk(ChunkRef {
            transfer_id: id,
            offset: 0,
            len: 1,
        });
        assert!(matches!(
            s.handle_request(read),
            Err(SessionError::UnknownTransfer { .. })
        ));
        assert!(matches!(
            s.handle_request(Frame::Commit(Commit {
                transfer_id: id,
                digest: vec![]
            })),
            Ok(Request::Commit(h, _)) if h == handle
        ));
        assert_eq!(s.upload(handle).map(|state| *state), Ok("state"));
        assert_eq!(s.close_upload(handle), Ok("state"));
        assert_eq!(s.upload(handle), Err(SessionError::TransferClosed(id)));
        assert!(s
            .handle_request(Frame::Commit(Commit {
                transfer_id: id,
                digest: vec![]
            }))
            .is_err());
    }

    #[test]
    fn chunks_and_open_transfers_are_limited() {
        let mut s = ready();
        let id = s.open_download(1 << 20, ()).get();
        let big = Frame::ReadChunk(ChunkRef {
            transfer_id: id,
            offset: 0,
            len: 1025,
        });
        assert!(matches!(
            s.handle_request(big),
            Err(SessionError::ChunkTooLarge { .. })
        ));
        s.open_download(1, ());
        assert!(matches!(
            s.handle_request(open_write(1)),
            Err(SessionError::TooManyOpen(2))
        ));
    }

    #[test]
    fn tls_is_negotiated_before_the_real_hello() {
        let tls_hello = |caps| {
            Frame::Hello(Hello {
                version: 1,
                min_version: 1,
                capabilities: caps,
                agent: String::new(),
                nonce: vec![],
            })
        };
        let config = ServerConfig {
            tls: true,
            ..config(None)
        };
        let mut s: ServerSession = ServerSession::new(config.clone(), vec![], 0, Instant::now());
        assert_eq!(
            s.handle_handshake(tls_hello(0)).unwrap_err(),
            SessionError::TlsRequired
        );
        let mut s: ServerSession = ServerSession::new(config, vec![], 0, Instant::now());
        assert!(matches!(
            s.handle_handshake(tls_hello(crate::CAP_TLS)),
            Ok(Handshake::StartTls)
        ));
        assert_eq!(s.phase(), Phase::AwaitHello);
        assert!(matches!(
            s.handle_handshake(tls_hello(crate::CAP_TLS)),
            Ok(Handshake::Admitted)
        ));
        assert_eq!(s.capabilities(), crate::CAP_TLS);
        let mut plain = session(None);
        assert_eq!(
            plain
                .handle_handshake(tls_hello(crate::CAP_TLS))
                .unwrap_err(),
            SessionError::TlsUnavailable
        );
    }

    #[test]
    fn a_grant_allows_writing_under_its_scope_only() {
        let cn = vec![1; auth::NONCE_LEN];
        let grant = crate::Grant {
            scope: "in/box".into(),
            expires: 1_000_100,
            nonce: vec![3; 32],
        };
        let key = auth::grant_key(b"tok", &grant);
        let start = |grant: crate::Grant, key: &[u8]| {
            let mut s = session(Some(b"tok"));
            s.handle_handshake(hello(cn.clone())).unwrap();
            let proof = auth::client_proof(key, &cn, s.nonce());
            let r = s.handle_handshake(Frame::Auth(Auth {
                proof,
                grant: Some(grant),
            }));
            (s, r)
        };
        let (mut s, r) = start(grant.clone(), &key);
        assert!(matches!(r, Ok(Handshake::Admitted)));
        let write = |name: &str| {
            Frame::OpenWrite(OpenWrite {
                name: name.into(),
                identity: FileIdentity {
                    size: 1,
                    mtime_ns: 0,
                },
                mode: 0o644,
                chunk_size: 512,
            })
        };
        assert!(s.handle_request(write("in/box/f")).is_ok());
        assert!(s.handle_request(write("in/box")).is_ok());
        assert!(matches!(
            s.handle_request(write("in/boxes")),
            Err(SessionError::OutOfScope { .. })
        ));
        let read = Frame::OpenRead(OpenRead {
            name: "in/box/f".into(),
            have_identity: None,
            have: vec![],
        });
        assert!(matches!(
            s.handle_request(read),
            Err(SessionError::OutOfScope { .. })
        ));
        // A grant signed with another token, or a changed scope, does not verify.
        let (_, r) = start(
            crate::Grant {
                scope: "in".into(),
                ..grant.clone()
            },
            &key,
        );
        assert_eq!(r.unwrap_err(), SessionError::AuthFailed);
        let (_, r) = start(
            crate::Grant {
                expires: 999_999,
                ..grant.clone()
            },
            &key,
        );
        assert_eq!(r.unwrap_err(), SessionError::GrantExpired);
        let (_, r) = start(
            crate::Grant {
                scope: "in/../out".into(),
                ..grant.clone()
            },
            &key,
        );
        let err = r.unwrap_err();
        assert_eq!(err, SessionError::BadGrantScope("in/../out".into()));
        assert_eq!(err.wire_message(), GRANT_REFUSED, "one message on the wire");
        let (_, r) = start(grant.clone(), &auth::grant_key(b"other", &grant));
        assert_eq!(r.unwrap_err(), SessionError::AuthFailed);
    }

    #[test]
    fn server_frames_from_a_client_are_refused() {
        let mut s = ready();
        let f = Frame::Committed(Commit {
            transfer_id: 1,
            digest: vec![],
        });
        assert!(matches!(
            s.handle_request(f),
            Err(SessionError::Unexpected {
                frame: "Committed",
                ..
            })
        ));
    }

    #[test]
    fn a_tree_sync_is_granted_only_where_the_client_promised_it() {
        assert_eq!(ready().capabilities() & crate::CAP_TREE_SYNC, 0);
        assert_eq!(
            offering(crate::CAP_FEATURES).capabilities() & crate::CAP_TREE_SYNC,
            0
        );
        let tree = offering(crate::CAP_FEATURES | crate::CAP_TREE_SYNC);
        assert_ne!(tree.capabilities() & crate::CAP_TREE_SYNC, 0);
    }

    #[test]
    fn a_tree_close_needs_its_capability_and_keeps_within_its_limit() {
        let wait = |count: usize| {
            Frame::AwaitCommits(crate::AwaitCommits {
                names: (0..count).map(|i| format!("t/f{i}")).collect(),
            })
        };
        let mut plain = ready();
        assert_eq!(plain.capabilities() & crate::CAP_TREE_CLOSE, 0);
        assert!(matches!(
            plain.handle_request(wait(2)),
            Err(SessionError::Unexpected {
                frame: "AwaitCommits",
                ..
            })
        ));
        let mut tree = offering(crate::CAP_TREE_SYNC | crate::CAP_TREE_CLOSE);
        assert_ne!(tree.capabilities() & crate::CAP_TREE_CLOSE, 0);
        assert!(matches!(
            tree.handle_request(wait(crate::MAX_AWAITED)),
            Ok(Request::AwaitCommits(a)) if a.names.len() == crate::MAX_AWAITED
        ));
        let too_many = tree.handle_request(wait(crate::MAX_AWAITED + 1));
        assert!(matches!(too_many, Err(SessionError::TooManyAwaited(_))));
        assert_eq!(too_many.unwrap_err().code(), ErrorCode::TooLarge);
    }

    #[test]
    fn mirror_frames_need_their_capability() {
        let delete = || Frame::Delete(crate::Delete { name: "t/x".into() });
        let mut plain = ready();
        assert_eq!(plain.capabilities() & crate::CAP_DELETE, 0);
        assert!(matches!(
            plain.handle_request(delete()),
            Err(SessionError::Unexpected {
                frame: "Delete",
                ..
            })
        ));
        let mut s = offering(crate::CAP_DELETE | crate::CAP_MIRROR | (1 << 40));
        // Unknown bits are never echoed; the mirror bits are.
        assert_eq!(s.capabilities(), crate::CAP_DELETE | crate::CAP_MIRROR);
        assert!(matches!(s.handle_request(delete()), Ok(Request::Delete(_))));
    }

    #[test]
    fn a_copy_mode_needs_its_capability() {
        let mode = || {
            Frame::CopyMode(crate::CopyMode {
                delta: crate::CopyDeltaMode::Delta,
            })
        };
        let mut plain = ready();
        assert!(matches!(
            plain.handle_request(mode()),
            Err(SessionError::Unexpected {
                frame: "CopyMode",
                ..
            })
        ));
        let mut s = offering(crate::CAP_COPY_DELTA);
        assert_eq!(s.capabilities(), crate::CAP_COPY_DELTA);
        assert!(matches!(
            s.handle_request(mode()),
            Ok(Request::CopyMode(crate::CopyDeltaMode::Delta))
        ));
    }
}
