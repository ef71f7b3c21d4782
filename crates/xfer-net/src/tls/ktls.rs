//! Kernel TLS: once rustls has done a TLS 1.3 handshake, the kernel encrypts and decrypts the
//! records (`TCP_ULP` "tls", `TLS_TX`/`TLS_RX` with the secrets rustls hands over), so that
//! reads and writes on the socket carry plaintext and the chunks move without a copy through
//! userspace crypto buffers. Where the kernel offers no TLS (no `tls` ULP, an unsupported
//! suite), [`enable`] leaves the connection with rustls and says why, once.
//!
//! The kernel then sees every record. Our peers send nothing but application data after the
//! handshake: the daemon sends no session tickets (`send_tls13_tickets = 0`) and no side sends
//! a key update before 2^24 records of one connection. A `close_notify` alert is the one other
//! record, and a read that meets it (the kernel says `EIO`) ends the stream as an end of file.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls::{
    self, CipherSuite, ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion,
};

use super::TlsSocket;

/// Why a connection stays with rustls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fallback {
    /// The kernel has no TLS upper-layer protocol (`CONFIG_TLS`), or refused it.
    #[error("the kernel offers no TLS (setting TCP_ULP \"tls\": {0}; available: {1})")]
    NoUlp(String, String),
    /// Kernel TLS is only set up for TLS 1.3 here.
    #[error("TLS version {0:?} is not TLS 1.3")]
    Version(String),
    /// A cipher suite the kernel does not do.
    #[error("cipher suite {0} has no kernel TLS cipher")]
    Suite(String),
    /// Bytes past the handshake were already read or are still to be written.
    #[error("data was buffered past the handshake")]
    Buffered,
    /// Not a TCP socket (an in-memory pipe in tests).
    #[error("the stream is not a socket")]
    NoSocket,
}

/// The kernel ciphers (`include/uapi/linux/tls.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    /// `TLS_CIPHER_AES_GCM_128`.
    Aes128Gcm,
    /// `TLS_CIPHER_AES_GCM_256`.
    Aes256Gcm,
    /// `TLS_CIPHER_CHACHA20_POLY1305`.
    Chacha20Poly1305,
}

/// The kernel cipher for a negotiated TLS version and suite, or why there is none.
///
/// # Errors
/// [`Fallback::Version`] or [`Fallback::Suite`].
pub fn cipher_for(version: ProtocolVersion, suite: CipherSuite) -> Result<Cipher, Fallback> {
    if version != ProtocolVersion::TLSv1_3 {
        return Err(Fallback::Version(format!("{version:?}")));
    }
    match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => Ok(Cipher::Aes128Gcm),
        CipherSuite::TLS13_AES_256_GCM_SHA384 => Ok(Cipher::Aes256Gcm),
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Ok(Cipher::Chacha20Poly1305),
        other => Err(Fallback::Suite(format!("{other:?}"))),
    }
}

const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const RECORD_ALERT: u8 = 21;

/// `struct tls12_crypto_info_*` of the kernel's `tls.h`, as bytes: the header (version,
/// cipher), then IV, key, salt and record sequence number, each as the cipher sizes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptoInfo(Vec<u8>);

impl CryptoInfo {
    /// The kernel's view of one direction's secrets, `seq` records already sent that way.
    ///
    /// AES-GCM's 12-byte nonce base is the kernel's 4-byte salt then 8-byte IV; ChaCha20's is
    /// the IV whole, with no salt.
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Option<Self> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => return None,
        };
        Some(Self::from_parts(cipher, key.as_ref(), iv.as_ref(), seq))
    }

    /// [`CryptoInfo::new`] from the key and the 12-byte nonce base.
    fn from_parts(cipher: Cipher, key: &[u8], iv: &[u8], seq: u64) -> Self {
        let code = match cipher {
            Cipher::Aes128Gcm => TLS_CIPHER_AES_GCM_128,
            Cipher::Aes256Gcm => TLS_CIPHER_AES_GCM_256,
            Cipher::Chacha20Poly1305 => TLS_CIPHER_CHACHA20_POLY1305,
        };
        let mut info = Vec::with_capacity(4 + 12 + 32 + 8);
        info.extend_from_slice(&TLS_1_3_VERSION.to_ne_bytes());
        info.extend_from_slice(&code.to_ne_bytes());
        if cipher == Cipher::Chacha20Poly1305 {
            info.extend_from_slice(iv);
            info.extend_from_slice(key);
        } else {
            info.extend_from_slice(&iv[4..]);
            info.extend_from_slice(key);
            info.extend_from_slice(&iv[..4]);
        }
        info.extend_from_slice(&seq.to_be_bytes());
        Self(info)
    }

    /// The bytes `setsockopt(SOL_TLS, TLS_TX/TLS_RX)` takes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is valid for its length for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attaches the kernel's TLS layer to a connected socket. It carries bytes through unchanged
/// until keys are installed, so a refusal leaves the socket as it was.
fn attach(fd: BorrowedFd<'_>) -> Result<(), Fallback> {
    setsockopt(fd.as_raw_fd(), libc::SOL_TCP, libc::TCP_ULP, b"tls").map_err(|e| {
        let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Fallback::NoUlp(e.to_string(), available)
    })
}

/// Installs both directions' keys.
fn install(fd: BorrowedFd<'_>, secrets: &ExtractedSecrets) -> io::Result<()> {
    for (name, (seq, secrets)) in [(TLS_TX, &secrets.tx), (TLS_RX, &secrets.rx)] {
        let info = CryptoInfo::new(secrets, *seq)
            .ok_or_else(|| io::Error::other("no kernel cipher for the negotiated suite"))?;
        setsockopt(fd.as_raw_fd(), libc::SOL_TLS, name, info.as_bytes())?;
    }
    Ok(())
}

/// Whether the fallback was logged at info level yet: once per process is enough to explain it.
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

fn log_fallback(why: &Fallback) {
    if FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::debug!(reason = %why, "kernel TLS not used; rustls encrypts");
    } else {
        tracing::info!(reason = %why, "kernel TLS not used; rustls encrypts");
    }
}

/// A connection after [`enable`]: the kernel's, or still rustls's.
#[derive(Debug)]
pub enum Enabled<S> {
    /// The socket, its records encrypted and decrypted by the kernel: read and write plaintext.
    /// First come the bytes rustls had already decrypted (the peer's first frames may come
    /// with the end of the handshake): [`KernelRead::new`] reads them first.
    Kernel(S, Vec<u8>),
    /// Still rustls's, reading through a buffer from now on, and why.
    Userspace(Box<tokio_rustls::TlsStream<TlsSocket<S>>>, Fallback),
}

/// Hands a connection whose TLS 1.3 handshake just finished to the kernel, if it can take it.
/// `fd` is the socket beneath (`None` for a stream that is not one). The server must have sent
/// no session tickets, and both sides' configurations must allow secret extraction.
///
/// # Errors
/// Once the kernel has accepted the TLS layer, a failure to install the keys leaves the
/// connection unusable: it is returned as an error.
pub fn enable<S>(
    mut stream: tokio_rustls::TlsStream<TlsSocket<S>>,
    fd: Option<RawFd>,
) -> io::Result<Enabled<S>> {
    match ready_for_kernel(&mut stream, fd) {
        Ok(()) => {}
        Err(why) => {
            log_fallback(&why);
            stream.get_mut().0.buffer_reads();
            return Ok(Enabled::Userspace(Box::new(stream), why));
        }
    }
    let (io, mut conn): (_, rustls::Connection) = match stream {
        tokio_rustls::TlsStream::Client(s) => {
            let (io, conn) = s.into_inner();
            (io, conn.into())
        }
        tokio_rustls::TlsStream::Server(s) => {
            let (io, conn) = s.into_inner();
            (io, conn.into())
        }
    };
    let mut early = Vec::new();
    match io::Read::read_to_end(&mut conn.reader(), &mut early) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| io::Error::other(format!("extracting TLS secrets: {e}")))?;
    let fd = fd.expect("checked by ready_for_kernel");
    // SAFETY: `io` owns the socket `fd` and is alive here.
    install(unsafe { BorrowedFd::borrow_raw(fd) }, &secrets)?;
    tracing::debug!("kernel TLS on");
    Ok(Enabled::Kernel(io.into_inner(), early))
}

/// Checks that nothing keeps the connection from the kernel, then attaches its TLS layer.
fn ready_for_kernel<S>(
    stream: &mut tokio_rustls::TlsStream<TlsSocket<S>>,
    fd: Option<RawFd>,
) -> Result<(), Fallback> {
    let fd = fd.ok_or(Fallback::NoSocket)?;
    let (io, common) = stream.get_ref();
    let version = common
        .protocol_version()
        .ok_or_else(|| Fallback::Version("none".into()))?;
    let suite = common
        .negotiated_cipher_suite()
        .ok_or_else(|| Fallback::Suite("none".into()))?;
    cipher_for(version, suite.suite())?;
    if !io.at_record_boundary() || common.wants_write() {
        return Err(Fallback::Buffered);
    }
    let pending = match stream {
        tokio_rustls::TlsStream::Client(s) => s.get_mut().1.process_new_packets(),
        tokio_rustls::TlsStream::Server(s) => s.get_mut().1.process_new_packets(),
    };
    // Plaintext already decrypted is handed over with the socket; records still to be sent
    // or a partial one read would be lost.
    match pending {
        Ok(state) if state.tls_bytes_to_write() == 0 => {}
        _ => return Err(Fallback::Buffered),
    }
    // SAFETY: the stream owns the socket `fd` and is alive here.
    attach(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// The read half of a kernel TLS socket, after what rustls had decrypted before: a
/// `close_notify` (or any record that is not data, which the kernel reports as `EIO`) ends the
/// stream.
#[derive(Debug)]
pub struct KernelRead<R> {
    early: Vec<u8>,
    taken: usize,
    inner: R,
}

impl<R> KernelRead<R> {
    /// Reads `early` first, then `inner`.
    pub fn new(inner: R, early: Vec<u8>) -> Self {
        Self {
            early,
            taken: 0,
            inner,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for KernelRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.taken < self.early.len() {
            let n = (self.early.len() - self.taken).min(buf.remaining());
            buf.put_slice(&self.early[self.taken..self.taken + n]);
            self.taken += n;
            if self.taken == self.early.len() {
                self.early = Vec::new();
                self.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.raw_os_error() == Some(libc::EIO) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

/// The write half of a kernel TLS socket: shutting it down sends `close_notify` first, as a
/// rustls peer expects before the end of the stream.
#[derive(Debug)]
pub struct KernelWrite<W> {
    /// The write half.
    pub inner: W,
    /// The socket beneath.
    pub fd: RawFd,
}

/// Sends a `close_notify` alert as its own record; best effort (a full socket buffer skips it).
fn send_close_notify(fd: RawFd) {
    let mut alert = [1u8, 0]; // warning, close_notify
    let mut iov = libc::iovec {
        iov_base: alert.as_mut_ptr().cast(),
        iov_len: alert.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `control` holds CMSG_SPACE(1) bytes, room for one header and one byte of data.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = RECORD_ALERT;
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT);
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for KernelWrite<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        send_close_notify(self.fd);
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    #[test]
    fn tls13_suites_map_to_kernel_ciphers() {
        let v13 = ProtocolVersion::TLSv1_3;
        assert_eq!(
            cipher_for(v13, CipherSuite::TLS13_AES_128_GCM_SHA256),
            Ok(Cipher::Aes128Gcm)
        );
        assert_eq!(
            cipher_for(v13, CipherSuite::TLS13_AES_256_GCM_SHA384),
            Ok(Cipher::Aes256Gcm)
        );
        assert_eq!(
            cipher_for(v13, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256),
            Ok(Cipher::Chacha20Poly1305)
        );
        assert!(matches!(
            cipher_for(
                ProtocolVersion::TLSv1_2,
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            ),
            Err(Fallback::Version(_))
        ));
        assert!(matches!(
            cipher_for(v13, CipherSuite::TLS13_AES_128_CCM_SHA256),
            Err(Fallback::Suite(_))
        ));
    }

    fn iv() -> Iv {
        Iv::from(std::array::from_fn::<u8, 12, _>(|i| 0xa0 + i as u8))
    }

    #[test]
    fn aes_gcm_secrets_split_the_nonce_into_salt_and_iv() {
        let key: [u8; 16] = std::array::from_fn(|i| i as u8);
        let info = CryptoInfo::from_parts(Cipher::Aes128Gcm, &key, iv().as_ref(), 0x0102);
        let b = info.as_bytes();
        // struct tls12_crypto_info_aes_gcm_128: info(4) iv(8) key(16) salt(4) rec_seq(8).
        assert_eq!(b.len(), 40);
        assert_eq!(&b[..2], &0x0304u16.to_ne_bytes());
        assert_eq!(&b[2..4], &51u16.to_ne_bytes());
        assert_eq!(&b[4..12], &[0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab]);
        assert_eq!(&b[12..28], &key);
        assert_eq!(&b[28..32], &[0xa0, 0xa1, 0xa2, 0xa3]);
        assert_eq!(&b[32..], &[0, 0, 0, 0, 0, 0, 1, 2]);
    }

    #[test]
    fn aes_256_and_chacha_secrets_have_the_kernels_sizes() {
        let key: [u8; 32] = std::array::from_fn(|i| 0x40 + i as u8);
        let aes = CryptoInfo::new(
            &ConnectionTrafficSecrets::Aes256Gcm {
                key: AeadKey::from(key),
                iv: iv(),
            },
            7,
        )
        .unwrap();
        // info(4) iv(8) key(32) salt(4) rec_seq(8).
        assert_eq!(aes.as_bytes().len(), 56);
        assert_eq!(&aes.as_bytes()[2..4], &52u16.to_ne_bytes());
        assert_eq!(&aes.as_bytes()[12..44], &key);
        let chacha = CryptoInfo::new(
            &ConnectionTrafficSecrets::Chacha20Poly1305 {
                key: AeadKey::from(key),
                iv: iv(),
            },
            7,
        )
        .unwrap();
        // info(4) iv(12) key(32) salt(0) rec_seq(8).
        let b = chacha.as_bytes();
        assert_eq!(b.len(), 56);
        assert_eq!(&b[2..4], &54u16.to_ne_bytes());
        assert_eq!(&b[4..16], iv().as_ref());
        assert_eq!(&b[16..48], &key);
        assert_eq!(&b[48..], &7u64.to_be_bytes());
    }

    #[test]
    fn a_kernel_without_tls_is_a_fallback_with_its_reason() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _server = listener.accept().unwrap();
        let ulp =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
        let offered = ulp.split_whitespace().any(|u| u == "tls");
        match attach(client.as_fd()) {
            Ok(()) => assert!(
                offered,
                "the kernel took the TLS ULP it does not list: {ulp}"
            ),
            Err(e @ Fallback::NoUlp(..)) => {
                assert!(!offered, "the kernel lists tls but refused it: {e}");
                assert!(e.to_string().contains("offers no TLS"), "{e}");
            }
            Err(e) => panic!("{e}"),
        }
    }

    use std::os::fd::AsFd;
}
