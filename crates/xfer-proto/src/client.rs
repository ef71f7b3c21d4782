//! [`ClientSession`]: the client's side of the handshake as a state machine, without I/O.
//!
//! The client sends [`ClientSession::hello`], feeds every frame it reads to
//! [`ClientSession::handle_frame`] and does what the [`Step`] says: run TLS and send `hello()`
//! again inside it, send a frame (`Auth`), send `Auth` with its first requests when the server
//! proved itself early (`EarlyChallenge`), read the `IdleTimeout` behind a `Welcome` that
//! announces one, or go on with the `Welcome` it checked. Everything the client must check of the
//! server is checked here: the `StartTls` answer, the token proof, the version, chunk size and
//! capabilities of the `Welcome`.

use std::sync::Arc;
use std::time::Duration;

use crate::{
    auth, Auth, ErrorFrame, Frame, Grant, Hello, Welcome, CAP_AUTH, CAP_EARLY_AUTH,
    CAP_IDLE_TIMEOUT, CAP_TLS, MIN_CHUNK_SIZE, PROTOCOL_VERSION,
};

/// What a client brings to a handshake.
#[derive(Clone, Default)]
pub struct ClientConfig {
    /// The key to prove: the token, or a copy grant's derived key when `grant` is set.
    pub key: Option<Arc<[u8]>>,
    /// A copy grant, sent in `Auth` in place of the token.
    pub grant: Option<Grant>,
    /// Ask for TLS first (and refuse to go on without it).
    pub tls: bool,
    /// This software's name and version, told in `Hello`.
    pub agent: String,
    /// Further capabilities to offer in `Hello` (`CAP_DELETE`, `CAP_MIRROR`, `CAP_TREE_SYNC`,
    /// `CAP_TREE_CLOSE`);
    /// never in the plaintext `Hello` that asks for TLS. The `Welcome` says which the server
    /// took.
    pub offer: u64,
    /// Send `EarlyAuth` behind the `Hello`, made at this wall-clock time (ms since the Unix
    /// epoch): only to a server seen taking early proofs (`CAP_ZERO_RTT`), and only with the
    /// token.
    pub early_proof_at: Option<u64>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("grant", &self.grant.as_ref().map(|g| &g.scope))
            .field("tls", &self.tls)
            .field("agent", &self.agent)
            .field("offer", &self.offer)
            .field("early_proof_at", &self.early_proof_at)
            .finish()
    }
}

/// What the client must do after a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The server agreed to TLS: run the TLS handshake as the client, then send
    /// [`ClientSession::hello`] inside it.
    StartTls,
    /// Send this frame (`Auth`), then read the next.
    Send(Frame),
    /// The server proved itself early: send `auth`, and in the same flight the first requests,
    /// encoded for `welcome` (what the server's `Welcome` will say), then read the next frame,
    /// which is that `Welcome` or the server's refusal.
    Early {
        /// The `Auth` to send first.
        auth: Frame,
        /// The `Welcome` to come, already checked.
        welcome: Welcome,
    },
    /// The `Welcome` came and announced `IdleTimeout` (`CAP_IDLE_TIMEOUT`): read the next
    /// frame, which the server sent with it, before going on.
    Next,
    /// The handshake is done; the server's `Welcome`, checked.
    Welcomed(Welcome),
}

/// Why a handshake failed on the client's side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The server refused with an error frame.
    #[error("{0}")]
    Remote(ErrorFrame),
    /// The server asks for a token and the client has none; send
    /// [`HandshakeError::frame_to_send`] before closing.
    #[error("the server requires a token")]
    TokenRequired,
    /// The server's `Welcome` does not prove it holds the token.
    #[error("the server could not prove it holds the token")]
    ServerProof,
    /// The server's `EarlyChallenge` proves a token other than the client's: the client's token
    /// is wrong (or the server is not the one holding it). Nothing of the client's was sent.
    #[error("the server's proof does not match the token")]
    EarlyProof,
    /// A frame that has no place at this step of the handshake.
    #[error("unexpected {frame} frame {step}")]
    Unexpected {
        /// The frame that came.
        frame: &'static str,
        /// Where the handshake was.
        step: &'static str,
    },
    /// A `Welcome` outside what the client asked for.
    #[error("the server's Welcome {0}")]
    BadWelcome(&'static str),
}

impl HandshakeError {
    /// The frame to tell the server why the client gives up, if any.
    pub fn frame_to_send(&self) -> Option<Frame> {
        match self {
            Self::TokenRequired => Some(Frame::Error(ErrorFrame::new(
                crate::ErrorCode::Auth,
                "no token",
            ))),
            // So that the daemon's log tells a wrong token from a client that went away.
            Self::EarlyProof => Some(Frame::Error(ErrorFrame::new(
                crate::ErrorCode::Auth,
                "the server's proof does not match the client's token",
            ))),
            _ => None,
        }
    }
}

/// Where the client's handshake is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Nothing sent yet.
    Start,
    /// The plaintext `Hello` asking for TLS is sent.
    AwaitStartTls,
    /// TLS is up; the `Hello` inside it is still to be sent.
    TlsReady,
    /// `Hello` sent: a `Challenge` or the `Welcome` comes next.
    AwaitChallenge,
    /// `Auth` sent: the `Welcome` with the server's proof comes next.
    AwaitWelcome { server_nonce: Vec<u8> },
    /// The server proved itself early and `Auth` is sent: the `Welcome` it announced comes
    /// next.
    AwaitEarlyWelcome { announced: Welcome },
    /// The server proved itself early after a `Hello` the client sent `EarlyAuth` behind: the
    /// `Welcome` announced comes next if the early proof was taken, else `EarlyRefused`.
    AwaitEarlyAnswer { announced: Welcome, proof: Vec<u8> },
    /// The `Welcome` came, checked, and said that `IdleTimeout` follows it.
    AwaitIdleTimeout { welcome: Welcome },
    /// Welcomed, or failed: no more frames belong to the handshake.
    Done,
}

/// The client side of one connection's handshake.
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    nonce: Vec<u8>,
    state: State,
    idle_timeout: Option<Duration>,
    /// `EarlyAuth` went behind the `Hello`.
    early_proof_sent: bool,
    /// The early proof was taken: the `Auth` that proves the `EarlyChallenge`'s nonce, to send
    /// before anything that is not read-only.
    late_auth: Option<Frame>,
}

impl ClientSession {
    /// A handshake about to start. `nonce` is the client's fresh random challenge
    /// ([`auth::NONCE_LEN`] bytes).
    pub fn new(config: ClientConfig, nonce: Vec<u8>) -> Self {
        Self {
            config,
            nonce,
            state: State::Start,
            idle_timeout: None,
            early_proof_sent: false,
            late_auth: None,
        }
    }

    /// How long the server lets the connection sit without a frame from the client before it
    /// closes it, as it told in `IdleTimeout`; `None` from a server that does not tell
    /// (`CAP_IDLE_TIMEOUT` not in force) or before the handshake is done.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// True once the handshake is over (welcomed or failed).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// What the client offers: [`crate::CAP_FEATURES`] always (this implementation speaks
    /// them; an older server ignores the bits), `CAP_TLS` when it wants TLS, the mirroring and
    /// tree bits it was asked to offer, and `CAP_EARLY_AUTH` when it holds the token: a grant's
    /// key proves nothing until the server has seen the grant in `Auth`.
    fn capabilities(&self) -> u64 {
        let asked =
            crate::CAP_DELETE | crate::CAP_MIRROR | crate::CAP_TREE_SYNC | crate::CAP_TREE_CLOSE;
        let offer = self.config.offer & asked;
        let tls = if self.config.tls { CAP_TLS } else { 0 };
        let early = if self.config.key.is_some() && self.config.grant.is_none() {
            CAP_EARLY_AUTH | crate::CAP_ZERO_RTT
        } else {
            0
        };
        crate::CAP_FEATURES | tls | offer | early
    }

    /// The capabilities the real `Hello` offers (not the TLS request's).
    pub fn offered(&self) -> u64 {
        self.capabilities()
    }

    /// The `Hello` to send now: at the start (in plaintext, asking for TLS when the client
    /// wants it), and again inside TLS after [`Step::StartTls`].
    pub fn hello(&mut self) -> Frame {
        // Only the TLS bit matters before TLS: the real Hello follows inside it.
        let (nonce, capabilities) = if self.state == State::Start && self.config.tls {
            self.state = State::AwaitStartTls;
            (Vec::new(), CAP_TLS)
        } else {
            self.state = State::AwaitChallenge;
            (self.nonce.clone(), self.capabilities())
        };
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            min_version: 1,
            capabilities,
            agent: self.config.agent.clone(),
            nonce,
        })
    }

    /// The `EarlyAuth` to send right behind the `Hello` just made, in the same write, when the
    /// client was configured to (`early_proof_at`) and the `Hello` offers `CAP_ZERO_RTT`.
    pub fn early_auth(&mut self) -> Option<Frame> {
        let time_ms = self.config.early_proof_at?;
        if self.state != State::AwaitChallenge || self.capabilities() & crate::CAP_ZERO_RTT == 0 {
            return None;
        }
        let key = self.config.key.as_deref()?;
        self.early_proof_sent = true;
        Some(Frame::EarlyAuth(crate::EarlyAuth {
            time_ms,
            proof: auth::zero_rtt_proof(key, &self.nonce, time_ms),
        }))
    }

    /// The `Auth` to send once welcomed after an early proof that was taken: it proves the
    /// `EarlyChallenge`'s nonce, which the server wants before anything not read-only. `None`
    /// on any other connection.
    pub fn take_late_auth(&mut self) -> Option<Frame> {
        self.late_auth.take()
    }

    /// Checks a frame from the server and says what to do next.
    ///
    /// # Errors
    /// A [`HandshakeError`]: the handshake has failed and the connection is to be closed.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<Step, HandshakeError> {
        let state = std::mem::replace(&mut self.state, State::Done);
        let unexpected = |frame: &Frame, step| HandshakeError::Unexpected {
            frame: frame.frame_type().name(),
            step,
        };
        match (state, frame) {
            (_, Frame::Error(e)) => Err(HandshakeError::Remote(e)),
            (State::AwaitStartTls, Frame::StartTls) => {
                self.state = State::TlsReady;
                Ok(Step::StartTls)
            }
            (State::AwaitChallenge, Frame::Challenge(challenge)) => {
                let Some(key) = self.config.key.clone() else {
                    return Err(HandshakeError::TokenRequired);
                };
                let proof = auth::client_proof(&key, &self.nonce, &challenge.nonce);
                self.state = State::AwaitWelcome {
                    server_nonce: challenge.nonce,
                };
                Ok(Step::Send(Frame::Auth(Auth {
                    proof,
                    grant: self.config.grant.clone(),
                })))
            }
            (State::AwaitChallenge, Frame::EarlyChallenge(early))
                if self.capabilities() & CAP_EARLY_AUTH != 0 =>
            {
                let key = self.config.key.as_deref().unwrap_or_default().to_vec();
                // Checked before anything of the client's goes: a server that cannot prove
                // the token gets neither the client's proof nor a request.
                if !auth::verify_server(&key, &self.nonce, &early.nonce, &early.welcome.proof) {
                    return Err(HandshakeError::EarlyProof);
                }
                if early.welcome.capabilities & (CAP_AUTH | CAP_EARLY_AUTH)
                    != CAP_AUTH | CAP_EARLY_AUTH
                {
                    return Err(HandshakeError::BadWelcome(
                        "announced early lacks CAP_AUTH or CAP_EARLY_AUTH",
                    ));
                }
                let welcome = self.check_welcome(early.welcome)?;
                let proof = auth::client_proof(&key, &self.nonce, &early.nonce);
                // The answer to the EarlyAuth comes in the same flight: the Welcome or a refusal.
                if self.early_proof_sent {
                    self.state = State::AwaitEarlyAnswer {
                        announced: welcome,
                        proof,
                    };
                    return Ok(Step::Next);
                }
                self.state = State::AwaitEarlyWelcome {
                    announced: welcome.clone(),
                };
                Ok(Step::Early {
                    auth: Frame::Auth(Auth { proof, grant: None }),
                    welcome,
                })
            }
            (State::AwaitEarlyAnswer { announced, proof }, Frame::Welcome(welcome)) => {
                if welcome != announced {
                    return Err(HandshakeError::BadWelcome(
                        "differs from the one its EarlyChallenge announced",
                    ));
                }
                self.late_auth = Some(Frame::Auth(Auth { proof, grant: None }));
                Ok(self.admitted(welcome))
            }
            // Refused (out of the window, a replay, no room): answered as after EarlyChallenge,
            // the first requests sent again, since the server discarded those that came early.
            (State::AwaitEarlyAnswer { announced, proof }, Frame::EarlyRefused(_)) => {
                self.state = State::AwaitEarlyWelcome {
                    announced: announced.clone(),
                };
                Ok(Step::Early {
                    auth: Frame::Auth(Auth { proof, grant: None }),
                    welcome: announced,
                })
            }
            (State::AwaitEarlyWelcome { announced }, Frame::Welcome(welcome)) => {
                // The first requests were encoded for what was announced.
                if welcome != announced {
                    return Err(HandshakeError::BadWelcome(
                        "differs from the one its EarlyChallenge announced",
                    ));
                }
                Ok(self.admitted(welcome))
            }
            (State::AwaitChallenge, Frame::Welcome(welcome)) => {
                Ok(self.admitted(self.check_welcome(welcome)?))
            }
            (State::AwaitWelcome { server_nonce }, Frame::Welcome(welcome)) => {
                let key = self.config.key.as_deref().unwrap_or_default();
                if !auth::verify_server(key, &self.nonce, &server_nonce, &welcome.proof) {
                    return Err(HandshakeError::ServerProof);
                }
                Ok(self.admitted(self.check_welcome(welcome)?))
            }
            (State::AwaitIdleTimeout { welcome }, Frame::IdleTimeout(told)) => {
                self.idle_timeout = Some(Duration::from_millis(told.millis));
                Ok(Step::Welcomed(welcome))
            }
            (State::Start | State::TlsReady, f) => Err(unexpected(&f, "before Hello")),
            (State::AwaitStartTls, f) => Err(unexpected(&f, "in answer to a Hello asking for TLS")),
            (State::AwaitChallenge, f) => Err(unexpected(&f, "in answer to Hello")),
            (State::AwaitWelcome { .. } | State::AwaitEarlyWelcome { .. }, f) => {
                Err(unexpected(&f, "in answer to Auth"))
            }
            (State::AwaitEarlyAnswer { .. }, f) => Err(unexpected(&f, "in answer to EarlyAuth")),
            (State::AwaitIdleTimeout { .. }, f) => {
                Err(unexpected(&f, "behind a Welcome announcing IdleTimeout"))
            }
            (State::Done, f) => Err(unexpected(&f, "after the handshake")),
        }
    }

    /// The step after a checked `welcome`: done, or the `IdleTimeout` it announced to read first.
    fn admitted(&mut self, welcome: Welcome) -> Step {
        if welcome.capabilities & CAP_IDLE_TIMEOUT == 0 {
            return Step::Welcomed(welcome);
        }
        self.state = State::AwaitIdleTimeout { welcome };
        Step::Next
    }

    /// Checks that `welcome` is within what the client asked for.
    fn check_welcome(&self, welcome: Welcome) -> Result<Welcome, HandshakeError> {
        if !(1..=PROTOCOL_VERSION).contains(&welcome.version) {
            return Err(HandshakeError::BadWelcome(
                "names a version the client does not speak",
            ));
        }
        if welcome.max_chunk_size < MIN_CHUNK_SIZE {
            return Err(HandshakeError::BadWelcome(
                "allows chunks below the minimum size",
            ));
        }
        if welcome.capabilities & !(CAP_AUTH | self.capabilities()) != 0 {
            return Err(HandshakeError::BadWelcome(
                "claims capabilities the client did not offer",
            ));
        }
        Ok(welcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Handshake, Request, ServerConfig, ServerSession};
    use crate::{Challenge, ErrorCode, CAP_FEATURES};
    use std::time::{Duration, Instant};

    fn client(key: Option<&[u8]>, tls: bool) -> ClientSession {
        let config = ClientConfig {
            key: key.map(Into::into),
            grant: None,
            tls,
            agent: "xfer/test".into(),
            offer: 0,
            early_proof_at: None,
        };
        ClientSession::new(config, vec![1; auth::NONCE_LEN])
    }

    fn server(token: Option<&[u8]>, tls: bool) -> ServerSession {
        let config = ServerConfig {
            token: token.map(Into::into),
            max_chunk: 1 << 20,
            max_open: 4,
            tls,
            window: 2,
            agent: "xferd/test".into(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            replay: Some(Default::default()),
        };
        ServerSession::new(config, vec![2; auth::NONCE_LEN], 0, Instant::now())
    }

    /// Runs both sides against each other until one stops; the client's outcome.
    fn handshake(
        client: &mut ClientSession,
        server: &mut ServerSession,
    ) -> Result<Welcome, HandshakeError> {
        let mut to_server = Some(client.hello());
        loop {
            let frame = to_server
                .take()
                .expect("the client answered the last frame");
            let answers = match server.handle_handshake(frame) {
                Ok(Handshake::StartTls) => vec![Frame::StartTls],
                Ok(Handshake::Challenge(c)) => vec![Frame::Challenge(c)],
                Ok(Handshake::EarlyChallenge(c)) => vec![Frame::EarlyChallenge(c)],
                Ok(Handshake::Admitted) => server.welcome_frames(),
                Ok(Handshake::EarlyRefused(r)) => vec![Frame::EarlyRefused(r)],
                Ok(Handshake::Next) => vec![],
                Ok(Handshake::PeerError(e)) => panic!("client gave up: {e}"),
                Err(e) => vec![Frame::Error(ErrorFrame::new(e.code(), e.to_string()))],
            };
            for answer in answers {
                match client.handle_frame(answer)? {
                    Step::StartTls => to_server = Some(client.hello()),
                    Step::Send(frame) | Step::Early { auth: frame, .. } => to_server = Some(frame),
                    Step::Next => {}
                    Step::Welcomed(welcome) => return Ok(welcome),
                }
            }
        }
    }

    /// A `Hello` as a client predating `CAP_EARLY_AUTH` sends it (or as a server predating it
    /// reads it: it ignores the bit).
    fn without_early(hello: Frame) -> Frame {
        let Frame::Hello(hello) = hello else {
            panic!("want Hello")
        };
        Frame::Hello(Hello {
            capabilities: hello.capabilities & !CAP_EARLY_AUTH,
            ..hello
        })
    }

    fn list() -> Frame {
        Frame::List(crate::List { dir: String::new() })
    }

    #[test]
    fn a_plain_handshake_is_welcomed() {
        let welcome = handshake(&mut client(None, false), &mut server(None, false)).unwrap();
        assert_eq!(welcome.version, PROTOCOL_VERSION);
        assert_eq!(welcome.capabilities, CAP_FEATURES);
    }

    #[test]
    fn a_token_is_proven_both_ways() {
        let mut c = client(Some(b"tok"), false);
        let welcome = handshake(&mut c, &mut server(Some(b"tok"), false)).unwrap();
        assert_eq!(
            welcome.capabilities,
            CAP_AUTH | CAP_EARLY_AUTH | crate::CAP_ZERO_RTT | CAP_FEATURES
        );
        assert!(c.is_done());
    }

    /// The server proves itself in its challenge, so the client's `Auth` and first request
    /// leave together, before any `Welcome`: one round trip less. The server holds the request
    /// until it has sent the `Welcome` it announced, and then serves it.
    #[test]
    fn an_early_challenge_lets_the_first_request_go_with_auth() {
        let mut c = client(Some(b"tok"), false);
        let mut s = server(Some(b"tok"), false);
        let Ok(Handshake::EarlyChallenge(early)) = s.handle_handshake(c.hello()) else {
            panic!("want an early challenge")
        };
        let Ok(Step::Early { auth, welcome }) = c.handle_frame(Frame::EarlyChallenge(early)) else {
            panic!("want Auth to send with the first request")
        };
        assert!(!c.is_done(), "the Welcome is still to come");
        assert_eq!(welcome.capabilities & CAP_FEATURES, CAP_FEATURES);
        assert!(matches!(s.handle_handshake(auth), Ok(Handshake::Admitted)));
        assert!(s.is_early());
        // The request sent with Auth, read by the server before it sends Welcome.
        assert!(matches!(s.handle_request(list()), Ok(Request::List(_))));
        let [told_welcome, told_idle] = <[Frame; 2]>::try_from(s.welcome_frames()).unwrap();
        assert_eq!(c.handle_frame(told_welcome), Ok(Step::Next));
        assert_eq!(c.handle_frame(told_idle), Ok(Step::Welcomed(welcome)));
        assert!(c.is_done());
        assert_eq!(c.idle_timeout(), Some(Duration::from_secs(300)));
    }

    /// A server that cannot prove the client's token (the client's token is wrong) gets
    /// neither the client's proof nor a request: only an `Error{Auth}` that says why.
    #[test]
    fn a_wrong_early_proof_stops_the_client_before_auth() {
        let mut c = client(Some(b"bad"), false);
        let mut s = server(Some(b"tok"), false);
        let Ok(Handshake::EarlyChallenge(early)) = s.handle_handshake(c.hello()) else {
            panic!("want an early challenge")
        };
        let err = c.handle_frame(Frame::EarlyChallenge(early)).unwrap_err();
        assert_eq!(err, HandshakeError::EarlyProof);
        assert!(c.is_done());
        let Some(Frame::Error(e)) = err.frame_to_send() else {
            panic!("want an error frame to send, not Auth")
        };
        assert_eq!(e.error_code(), Some(ErrorCode::Auth));
    }

    /// A client whose proof is wrong after an early challenge is refused with `Error{Auth}`, and
    /// its request is never served; so is a grant, which the early proof did not cover.
    #[test]
    fn a_wrong_client_proof_after_an_early_challenge_is_refused() {
        for auth in [
            Auth {
                proof: vec![0; auth::PROOF_LEN],
                grant: None,
            },
            Auth {
                proof: auth::client_proof(b"tok", &[1; auth::NONCE_LEN], &[2; auth::NONCE_LEN]),
                grant: Some(Grant {
                    scope: "x".into(),
                    expires: 100,
                    nonce: vec![3; auth::NONCE_LEN],
                }),
            },
        ] {
            let mut s = server(Some(b"tok"), false);
            let hello = client(Some(b"tok"), false).hello();
            assert!(matches!(
                s.handle_handshake(hello),
                Ok(Handshake::EarlyChallenge(_))
            ));
            let err = s.handle_handshake(Frame::Auth(auth)).unwrap_err();
            assert_eq!(err.code(), ErrorCode::Auth);
            assert!(s.handle_request(list()).is_err(), "a request was let in");
        }
    }

    /// A client predating `CAP_EARLY_AUTH` gets the plain challenge; a client holding a grant
    /// does not offer the bit, since the server can prove nothing before it sees the grant.
    #[test]
    fn old_clients_and_grant_holders_get_the_plain_challenge() {
        let mut s = server(Some(b"tok"), false);
        let hello = without_early(client(Some(b"tok"), false).hello());
        assert!(matches!(
            s.handle_handshake(hello),
            Ok(Handshake::Challenge(_))
        ));
        assert!(!s.is_early());
        let mut holder = client(Some(b"key"), false);
        holder.config.grant = Some(Grant {
            scope: "x".into(),
            expires: 100,
            nonce: vec![3; auth::NONCE_LEN],
        });
        let Frame::Hello(hello) = holder.hello() else {
            panic!("want Hello")
        };
        assert_eq!(hello.capabilities & CAP_EARLY_AUTH, 0);
        // The old client's whole handshake, as before: Welcome without the bit.
        let welcome = plain_exchange(&mut client(Some(b"tok"), false));
        assert_eq!(welcome.capabilities & CAP_EARLY_AUTH, 0);
    }

    /// The exchange without the early proof, the bit left out of the `Hello` on its way (an
    /// old client's, or one an old server ignores): `Challenge`, `Auth` alone, then `Welcome`,
    /// which the client checks and takes as it came. Returns it.
    fn plain_exchange(c: &mut ClientSession) -> Welcome {
        let mut old = server(Some(b"tok"), false);
        let Ok(Handshake::Challenge(challenge)) = old.handle_handshake(without_early(c.hello()))
        else {
            panic!("want a plain challenge")
        };
        let Ok(Step::Send(auth)) = c.handle_frame(Frame::Challenge(challenge)) else {
            panic!("want Auth alone, the request after Welcome")
        };
        assert!(matches!(
            old.handle_handshake(auth),
            Ok(Handshake::Admitted)
        ));
        let welcome = old.welcome();
        let mut frames = old.welcome_frames().into_iter();
        assert_eq!(frames.next(), Some(Frame::Welcome(welcome.clone())));
        assert_eq!(
            c.handle_frame(Frame::Welcome(welcome.clone())),
            Ok(Step::Next)
        );
        assert_eq!(
            c.handle_frame(frames.next().expect("IdleTimeout behind the Welcome")),
            Ok(Step::Welcomed(welcome.clone()))
        );
        welcome
    }

    /// A new client offering the bit to a server predating it (which ignores the bit) goes the
    /// plain way: `Auth` alone, then `Welcome`, whose proof it checks.
    #[test]
    fn a_server_predating_early_challenges_is_answered_the_plain_way() {
        let mut c = client(Some(b"tok"), false);
        let welcome = plain_exchange(&mut c);
        assert_eq!(welcome.capabilities & CAP_EARLY_AUTH, 0);
        assert!(c.is_done());
    }

    /// The first request was encoded for the announced `Welcome`: another one is refused, and
    /// so is an early challenge the client did not ask for (it holds no token).
    #[test]
    fn a_welcome_other_than_the_announced_one_is_refused() {
        let mut c = client(Some(b"tok"), false);
        let mut s = server(Some(b"tok"), false);
        let Ok(Handshake::EarlyChallenge(early)) = s.handle_handshake(c.hello()) else {
            panic!("want an early challenge")
        };
        let Ok(Step::Early { welcome, .. }) = c.handle_frame(Frame::EarlyChallenge(early.clone()))
        else {
            panic!("want Early")
        };
        let other = Welcome {
            window: welcome.window + 1,
            ..welcome
        };
        assert!(matches!(
            c.handle_frame(Frame::Welcome(other)),
            Err(HandshakeError::BadWelcome(_))
        ));
        let mut anonymous = client(None, false);
        anonymous.hello();
        assert!(matches!(
            anonymous.handle_frame(Frame::EarlyChallenge(early)),
            Err(HandshakeError::Unexpected { .. })
        ));
    }

    #[test]
    fn tls_comes_first_then_the_real_hello() {
        let mut c = client(None, true);
        let Frame::Hello(first) = c.hello() else {
            panic!("want Hello")
        };
        assert_eq!(first.capabilities, CAP_TLS);
        assert!(
            first.nonce.is_empty(),
            "the plaintext Hello carries no nonce"
        );
        assert_eq!(c.handle_frame(Frame::StartTls), Ok(Step::StartTls));
        let Frame::Hello(inner) = c.hello() else {
            panic!("want Hello")
        };
        assert_eq!(inner.nonce.len(), auth::NONCE_LEN);
        let welcome = handshake(&mut client(Some(b"t"), true), &mut server(Some(b"t"), true));
        assert_eq!(
            welcome.unwrap().capabilities,
            CAP_AUTH | CAP_EARLY_AUTH | crate::CAP_ZERO_RTT | CAP_TLS | CAP_FEATURES
        );
    }

    /// Without early challenges (a client predating them), a wrong token is found by the server.
    #[test]
    fn a_wrong_token_is_the_server_s_refusal() {
        let mut c = client(Some(b"bad"), false);
        let mut s = server(Some(b"tok"), false);
        let Ok(Handshake::Challenge(challenge)) = s.handle_handshake(without_early(c.hello()))
        else {
            panic!("want a plain challenge")
        };
        let Ok(Step::Send(auth)) = c.handle_frame(Frame::Challenge(challenge)) else {
            panic!("want Auth")
        };
        let refusal = s.handle_handshake(auth).unwrap_err();
        let refusal = ErrorFrame::new(refusal.code(), refusal.to_string());
        let err = c.handle_frame(Frame::Error(refusal)).unwrap_err();
        let HandshakeError::Remote(frame) = err else {
            panic!("want the server's refusal, got {err}")
        };
        assert_eq!(frame.error_code(), Some(ErrorCode::Auth));
    }

    #[test]
    fn a_challenge_without_a_token_is_answered_with_an_error() {
        let err =
            handshake(&mut client(None, false), &mut server(Some(b"tok"), false)).unwrap_err();
        assert_eq!(err, HandshakeError::TokenRequired);
        let Some(Frame::Error(e)) = err.frame_to_send() else {
            panic!("want an error frame to send")
        };
        assert_eq!(e.error_code(), Some(ErrorCode::Auth));
    }

    #[test]
    fn a_server_without_the_token_is_caught() {
        let mut c = client(Some(b"tok"), false);
        c.hello();
        let step = c.handle_frame(Frame::Challenge(Challenge {
            nonce: vec![9; auth::NONCE_LEN],
        }));
        assert!(matches!(step, Ok(Step::Send(Frame::Auth(_)))));
        let forged = Welcome {
            version: 1,
            capabilities: CAP_AUTH,
            max_chunk_size: MIN_CHUNK_SIZE,
            window: 1,
            agent: String::new(),
            proof: vec![0; 32],
        };
        assert_eq!(
            c.handle_frame(Frame::Welcome(forged)),
            Err(HandshakeError::ServerProof)
        );
    }

    #[test]
    fn welcomes_beyond_what_was_asked_are_refused() {
        let good = Welcome {
            version: 1,
            capabilities: 0,
            max_chunk_size: MIN_CHUNK_SIZE,
            window: 1,
            agent: String::new(),
            proof: vec![],
        };
        for bad in [
            Welcome {
                version: PROTOCOL_VERSION + 1,
                ..good.clone()
            },
            Welcome {
                version: 0,
                ..good.clone()
            },
            Welcome {
                max_chunk_size: MIN_CHUNK_SIZE - 1,
                ..good.clone()
            },
            Welcome {
                capabilities: CAP_TLS,
                ..good.clone()
            },
        ] {
            let mut c = client(None, false);
            c.hello();
            assert!(matches!(
                c.handle_frame(Frame::Welcome(bad)),
                Err(HandshakeError::BadWelcome(_))
            ));
        }
        let mut c = client(None, false);
        c.hello();
        assert_eq!(
            c.handle_frame(Frame::Welcome(good.clone())),
            Ok(Step::Welcomed(good))
        );
    }

    /// A server that keeps to the bit sends its idle timeout right behind the `Welcome`, in the
    /// same write, and the client takes it as part of the handshake: the `Welcome` alone does not
    /// end it.
    #[test]
    fn the_idle_timeout_comes_behind_the_welcome() {
        let mut c = client(None, false);
        let mut s = server(None, false);
        assert!(matches!(
            s.handle_handshake(c.hello()),
            Ok(Handshake::Admitted)
        ));
        let frames = s.welcome_frames();
        assert_eq!(
            frames[1..],
            [Frame::IdleTimeout(crate::IdleTimeout { millis: 300_000 })]
        );
        let [welcome, idle] = <[Frame; 2]>::try_from(frames).unwrap();
        assert_eq!(c.handle_frame(welcome), Ok(Step::Next));
        assert!(!c.is_done(), "the IdleTimeout is still to come");
        assert!(matches!(c.handle_frame(idle), Ok(Step::Welcomed(_))));
        assert_eq!(c.idle_timeout(), Some(Duration::from_secs(300)));
    }

    /// Neither side predating `CAP_IDLE_TIMEOUT` sees a frame it does not know: a server that
    /// ignores the bit sends the `Welcome` alone, which ends the client's handshake with no idle
    /// timeout told; a client that does not offer it gets the `Welcome` alone.
    #[test]
    fn old_peers_neither_send_nor_expect_the_idle_timeout() {
        let without_idle = |hello: Frame| {
            let Frame::Hello(hello) = hello else {
                panic!("want Hello")
            };
            Frame::Hello(Hello {
                capabilities: hello.capabilities & !CAP_IDLE_TIMEOUT,
                ..hello
            })
        };
        let mut c = client(None, false);
        let mut old = server(None, false);
        assert!(matches!(
            old.handle_handshake(without_idle(c.hello())),
            Ok(Handshake::Admitted)
        ));
        let frames = old.welcome_frames();
        assert_eq!(frames, [Frame::Welcome(old.welcome())]);
        let welcome = old.welcome();
        assert_eq!(
            c.handle_frame(Frame::Welcome(welcome.clone())),
            Ok(Step::Welcomed(welcome))
        );
        assert!(c.is_done());
        assert_eq!(c.idle_timeout(), None);
    }

    /// Only `IdleTimeout` may follow a `Welcome` that announced it.
    #[test]
    fn a_welcome_announcing_the_idle_timeout_must_be_followed_by_it() {
        let mut c = client(None, false);
        let mut s = server(None, false);
        s.handle_handshake(c.hello()).unwrap();
        assert_eq!(c.handle_frame(Frame::Welcome(s.welcome())), Ok(Step::Next));
        assert_eq!(
            c.handle_frame(list()),
            Err(HandshakeError::Unexpected {
                frame: "List",
                step: "behind a Welcome announcing IdleTimeout"
            })
        );
        assert_eq!(c.idle_timeout(), None);
        let mut c = client(None, false);
        c.hello();
        assert!(matches!(
            c.handle_frame(Frame::IdleTimeout(crate::IdleTimeout { millis: 1 })),
            Err(HandshakeError::Unexpected { .. })
        ));
    }

    #[test]
    fn unexpected_frames_are_named_as_they_came() {
        let mut c = client(None, true);
        c.hello();
        assert_eq!(
            c.handle_frame(Frame::Goodbye),
            Err(HandshakeError::Unexpected {
                frame: "Goodbye",
                step: "in answer to a Hello asking for TLS"
            })
        );
        let mut c = client(None, false);
        c.hello();
        let err = c.handle_frame(Frame::Sync).unwrap_err();
        assert_eq!(err.to_string(), "unexpected Sync frame in answer to Hello");
        assert!(
            c.handle_frame(Frame::Sync).is_err(),
            "nothing goes after a failure"
        );
    }
}
