//! [`SocketOptions`]: send and receive buffer sizes and the congestion control algorithm, set on
//! every data connection (by the client before it connects, by the daemon on its listener, whose
//! accepted sockets inherit them). Names an unusable algorithm up front instead of falling back.
//! Also TCP Fast Open on both sides, and what `TCP_INFO` says of a connection.

use std::os::fd::AsFd;

/// Where Linux lists the congestion control algorithms it has loaded.
const AVAILABLE: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";
/// Where Linux lists those an unprivileged process may choose.
const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";
/// Largest buffer asked for: Linux doubles the value into an `int`.
pub const MAX_BUFFER: u64 = 1 << 30;

/// A socket option that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The kernel has no such algorithm (nor a module for it).
    #[error("congestion control {name:?} is not available here (available: {available})")]
    Unavailable {
        /// The algorithm asked for.
        name: String,
        /// What the kernel offers.
        available: String,
    },
    /// The algorithm exists but this process may not choose it.
    #[error(
        "congestion control {name:?} is available but not allowed for this process (allowed: \
         {allowed}): add it to net.ipv4.tcp_allowed_congestion_control or run with CAP_NET_ADMIN"
    )]
    NotAllowed {
        /// The algorithm asked for.
        name: String,
        /// What unprivileged processes may choose.
        allowed: String,
    },
    /// A buffer size out of range.
    #[error("{option} must be between 1 and 1G bytes, not {value}")]
    BadBuffer {
        /// The option (`--sndbuf`, `rcvbuf`, ...).
        option: &'static str,
        /// The value given.
        value: u64,
    },
    /// Any other failure of `setsockopt`.
    #[error("setting {option}: {source}")]
    Io {
        /// The option being set.
        option: &'static str,
        /// What the kernel said.
        source: std::io::Error,
    },
}

/// Options for every data connection; `None` leaves the kernel's default (and autotuning).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketOptions {
    /// `SO_SNDBUF` in bytes.
    pub sndbuf: Option<u64>,
    /// `SO_RCVBUF` in bytes.
    pub rcvbuf: Option<u64>,
    /// `TCP_CONGESTION`, e.g. `bbr`.
    pub congestion: Option<String>,
}

/// What a socket ended up with, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    /// `SO_SNDBUF` (Linux reports twice the value set, for its bookkeeping).
    pub sndbuf: usize,
    /// `SO_RCVBUF`, likewise.
    pub rcvbuf: usize,
    /// The congestion control algorithm in force.
    pub congestion: String,
}

impl SocketOptions {
    /// True when nothing is set.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the buffer sizes and that the algorithm can be set here, on a socket of its own.
    ///
    /// # Errors
    /// [`SocketError::BadBuffer`], [`SocketError::Unavailable`], [`SocketError::NotAllowed`].
    pub fn check(
        &self,
        sndbuf_name: &'static str,
        rcvbuf_name: &'static str,
    ) -> Result<(), SocketError> {
        for (option, value) in [(sndbuf_name, self.sndbuf), (rcvbuf_name, self.rcvbuf)] {
            if let Some(value) = value {
                if !(1..=MAX_BUFFER).contains(&value) {
                    return Err(SocketError::BadBuffer { option, value });
                }
            }
        }
        if let Some(name) = &self.congestion {
            use rustix::net::{socket, AddressFamily, SocketType};
            // IPv6 where the host has no IPv4.
            let probe = socket(AddressFamily::INET, SocketType::STREAM, None)
                .or_else(|_| socket(AddressFamily::INET6, SocketType::STREAM, None))
                .map_err(|e| SocketError::Io {
                    option: "a probe socket",
                    source: e.into(),
                })?;
            set_congestion(&probe, name)?;
        }
        Ok(())
    }

    /// Sets the options on `fd`: before `connect` or `listen`, so that the window scale is
    /// negotiated for the buffer asked for. The kernel may clamp buffers to
    /// `net.core.wmem_max`/`rmem_max`; [`effective`] tells what it kept.
    ///
    /// # Errors
    /// The kernel refuses an option.
    pub fn apply(&self, fd: impl AsFd) -> Result<(), SocketError> {
        let fd = fd.as_fd();
        let io = |option| {
            move |e: rustix::io::Errno| SocketError::Io {
                option,
                source: e.into(),
            }
        };
        if let Some(n) = self.sndbuf {
            rustix::net::sockopt::set_socket_send_buffer_size(fd, n as usize)
                .map_err(io("SO_SNDBUF"))?;
        }
        if let Some(n) = self.rcvbuf {
            rustix::net::sockopt::set_socket_recv_buffer_size(fd, n as usize)
                .map_err(io("SO_RCVBUF"))?;
        }
        if let Some(name) = &self.congestion {
            set_congestion(fd, name)?;
        }
        if tracing::enabled!(tracing::Level::DEBUG) && !self.is_default() {
            if let Some(e) = effective(fd) {
                tracing::debug!(
                    sndbuf = ?self.sndbuf,
                    rcvbuf = ?self.rcvbuf,
                    effective_sndbuf = e.sndbuf,
                    effective_rcvbuf = e.rcvbuf,
                    congestion = %e.congestion,
                    "socket options set (buffers read back doubled; net.core.wmem_max and rmem_max clamp them)"
                );
            }
        }
        Ok(())
    }
}

/// Sets congestion control `name` on the connected socket `fd` if its round-trip time is at
/// least `from`; `Ok(false)` on a shorter (or unknown) path.
///
/// # Errors
/// [`SocketError::Unavailable`], [`SocketError::NotAllowed`], or the kernel refusing it.
pub fn congestion_for_long_path(
    fd: impl AsFd,
    name: &str,
    from: std::time::Duration,
) -> Result<bool, SocketError> {
    let fd = fd.as_fd();
    if rtt(fd).is_none_or(|rtt| rtt < from) {
        return Ok(false);
    }
    set_congestion(fd, name)?;
    Ok(true)
}

/// The buffers and congestion control `fd` has now; `None` if the kernel will not say.
pub fn effective(fd: impl AsFd) -> Option<Effective> {
    let fd = fd.as_fd();
    Some(Effective {
        sndbuf: rustix::net::sockopt::socket_send_buffer_size(fd).ok()?,
        rcvbuf: rustix::net::sockopt::socket_recv_buffer_size(fd).ok()?,
        congestion: rustix::net::sockopt::tcp_congestion(fd).ok()?,
    })
}

/// Bounds the bytes written to `fd` but not yet sent (`TCP_NOTSENT_LOWAT`) to about `bytes`:
/// past them, a write waits until the connection has sent what it holds; `0` lifts the bound
/// (the system's default, `net.ipv4.tcp_notsent_lowat`). A sender that feeds several
/// connections from one queue keeps its work in the queue, for whichever connection sends
/// fastest, rather than in the socket of a slow one.
///
/// # Errors
/// What `setsockopt` says.
pub fn limit_unsent(fd: impl AsFd, bytes: u32) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_tcp_int(fd, libc::TCP_NOTSENT_LOWAT, value)
}

/// Sets an `int` option at level `IPPROTO_TCP`.
fn set_tcp_int(fd: impl AsFd, option: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open for the call; the option takes one int, read from `value`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Lets a listener take data in the SYN of connections whose client holds its Fast Open cookie
/// (`TCP_FASTOPEN`, RFC 7413), up to `pending` such connections not yet accepted. It takes
/// effect only where `net.ipv4.tcp_fastopen` has the server bit (2).
///
/// # Errors
/// What `setsockopt` says.
pub fn fast_open_listener(fd: impl AsFd, pending: u32) -> std::io::Result<()> {
    let pending = libc::c_int::try_from(pending).unwrap_or(libc::c_int::MAX);
    set_tcp_int(fd, libc::TCP_FASTOPEN, pending)
}

/// Where Linux says which sides of TCP Fast Open it allows (bits: 1 clients, 2 servers, 0x400
/// servers without asking for it).
const FAST_OPEN: &str = "/proc/sys/net/ipv4/tcp_fastopen";

/// Whether this system lets listeners take data in the SYN (`net.ipv4.tcp_fastopen` has the
/// server bit), if it says.
pub fn fast_open_serving() -> Option<bool> {
    let value: u32 = std::fs::read_to_string(FAST_OPEN)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(value & (2 | 0x400) != 0)
}

/// Lets a socket about to connect carry its first write in the SYN where the kernel holds the
/// server's Fast Open cookie (`TCP_FASTOPEN_CONNECT`): `connect` then returns at once and the
/// handshake starts with the first write; without a cookie it connects as usual and asks for one.
///
/// # Errors
/// What `setsockopt` says.
pub fn fast_open_connect(fd: impl AsFd) -> std::io::Result<()> {
    set_tcp_int(fd, libc::TCP_FASTOPEN_CONNECT, 1)
}

/// Whether `e`, from a connection's first write, says that TCP Fast Open sent the SYN without
/// the data it was to carry (`EINPROGRESS`): nothing of the write was taken.
pub fn fast_open_fell_back(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINPROGRESS)
}

/// `tcpi_state` of a socket whose SYN is not answered yet (`include/net/tcp_states.h`).
const TCP_SYN_SENT: u8 = 2;
/// `tcpi_state` of an accepted socket whose SYN-ACK is not answered yet (Fast Open).
const TCP_SYN_RECV: u8 = 3;

/// Whether the connection's handshake is still to finish: on the connecting side, its SYN not
/// answered yet, or with Fast Open not even sent before the first write; on the accepting
/// side, a connection accepted with data in its SYN whose SYN-ACK is not acknowledged yet.
pub fn handshaking(fd: impl AsFd) -> bool {
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_state) + 1;
    tcp_info(fd, needed)
        .is_some_and(|(info, _)| matches!(info.tcpi_state, TCP_SYN_SENT | TCP_SYN_RECV))
}

/// Waits until the handshake of `fd` has finished (see [`handshaking`]) or failed, at most
/// `limit`; whether it did. A connecting socket turns writable when its SYN is answered, which
/// wakes the wait at once; an accepted one was writable all along, so it is also looked at
/// after 1, 2, 4 … ms, at most 64 ms apart.
///
/// `fd` is watched as it is: give it a descriptor the runtime does not watch already (the
/// callers' own copy, which outlives the connection they copied it from). One the runtime
/// watches (a `TcpStream`'s) cannot be registered twice, and is only looked at on the ticks.
pub async fn handshake_done(fd: impl AsFd, limit: std::time::Duration) -> bool {
    use tokio::io::{unix::AsyncFd, Interest};
    let fd = fd.as_fd();
    // SAFETY: `fd` is borrowed for as long as the `AsyncFd` lives, so it stays open and the same.
    let watched = unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) }.ok();
    let done = async {
        let mut pause = std::time::Duration::from_millis(1);
        while handshaking(fd) {
            let writable = async {
                match &watched {
                    Some(watched) => match watched.writable().await {
                        Ok(mut ready) if handshaking(fd) => ready.clear_ready(),
                        _ => {}
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = writable => {}
                () = tokio::time::sleep(pause) => {
                    pause = (pause * 2).min(std::time::Duration::from_millis(64));
                }
            }
        }
    };
    tokio::time::timeout(limit, done).await.is_ok()
}

/// The congestion control algorithm of `fd`, if the kernel says.
pub fn congestion(fd: impl AsFd) -> Option<String> {
    rustix::net::sockopt::tcp_congestion(fd.as_fd()).ok()
}

/// What a connection has moved across the path, and what its sending stands at: see [`sending`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sending {
    /// Bytes the peer has acknowledged (`tcpi_bytes_acked`).
    pub acked: u64,
    /// Bytes that arrived from the peer (`tcpi_bytes_received`).
    pub received: u64,
    /// Bytes written and not yet acknowledged: in flight or in the send buffer (`SIOCOUTQ`).
    pub queued: u64,
    /// Smoothed round-trip time (`tcpi_rtt`).
    pub rtt: Option<std::time::Duration>,
    /// The least round trip this connection has seen (`tcpi_min_rtt`): the path without a
    /// queue, if it ever had none.
    pub min_rtt: Option<std::time::Duration>,
}

/// Acknowledged and queued bytes of this socket's sending, the bytes it received, and its round
/// trip; `None` where the kernel does not report them. Unlike bytes written, bytes still in the
/// socket buffers are not in `acked`.
pub fn sending(fd: impl AsFd) -> Option<Sending> {
    use std::os::fd::AsRawFd;
    let fd = fd.as_fd();
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    let (info, len) = tcp_info(fd, needed)?;
    // Older kernels fill less of the structure: what they leave out is not known.
    let filled = |end: usize| len >= end;
    let micros =
        |us: u32| (us > 0 && us != u32::MAX).then(|| std::time::Duration::from_micros(us.into()));
    let mut queued: libc::c_int = 0;
    // SAFETY: the fd is open for the call; SIOCOUTQ (TIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    Some(Sending {
        acked: info.tcpi_bytes_acked,
        received: info.tcpi_bytes_received,
        queued: if rc == 0 { queued.max(0) as u64 } else { 0 },
        rtt: micros(info.tcpi_rtt),
        min_rtt: filled(std::mem::offset_of!(libc::tcp_info, tcpi_min_rtt) + 4)
            .then(|| micros(info.tcpi_min_rtt))
            .flatten(),
    })
}

/// The kernel's smoothed round-trip time of this connection (`TCP_INFO`'s `tcpi_rtt`).
pub fn rtt(fd: impl AsFd) -> Option<std::time::Duration> {
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_rtt) + 4;
    tcp_info(fd, needed).map(|(info, _)| std::time::Duration::from_micros(info.tcpi_rtt.into()))
}

/// `TCP_INFO` of `fd` and how many of its bytes the kernel filled, if at least its first
/// `needed`.
fn tcp_info(fd: impl AsFd, needed: usize) -> Option<(libc::tcp_info, usize)> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero tcp_info is valid; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is open for the call; `info` and `len` outlive it.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    (rc == 0 && len as usize >= needed).then_some((info, len as usize))
}

fn set_congestion(fd: impl AsFd, name: &str) -> Result<(), SocketError> {
    match rustix::net::sockopt::set_tcp_congestion(fd.as_fd(), name) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOENT) => Err(SocketError::Unavailable {
            name: name.to_string(),
            available: listed(AVAILABLE),
        }),
        Err(rustix::io::Errno::PERM) => Err(SocketError::NotAllowed {
            name: name.to_string(),
            allowed: listed(ALLOWED),
        }),
        Err(e) => Err(SocketError::Io {
            option: "TCP_CONGESTION",
            source: e.into(),
        }),
    }
}

/// The names in a `/proc` list, space-separated, or "unknown".
fn listed(path: &str) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => {
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        }
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `TCP_NOTSENT_LOWAT` of `fd`, as the kernel holds it.
    fn unsent_limit(fd: impl AsFd) -> libc::c_int {
        tcp_int(fd, libc::TCP_NOTSENT_LOWAT)
    }

    /// The `int` option `option` at level `IPPROTO_TCP` of `fd`, as the kernel holds it.
    fn tcp_int(fd: impl AsFd, option: libc::c_int) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut value: libc::c_int = -1;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the fd is open; the kernel writes one int into `value`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_fd().as_raw_fd(),
                libc::IPPROTO_TCP,
                option,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0);
        value
    }

    #[test]
    fn the_unsent_bound_is_set_and_lifted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        limit_unsent(&stream, 256 << 10).unwrap();
        assert_eq!(unsent_limit(&stream), 256 << 10);
        limit_unsent(&stream, 0).unwrap();
        assert_eq!(unsent_limit(&stream), 0);
    }

    #[test]
    fn fast_open_is_asked_of_listeners_and_of_sockets_about_to_connect() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        fast_open_listener(&listener, 16).unwrap();
        assert_eq!(tcp_int(&listener, libc::TCP_FASTOPEN), 16);
        let socket = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .unwrap();
        assert_eq!(tcp_int(&socket, libc::TCP_FASTOPEN_CONNECT), 0);
        fast_open_connect(&socket).unwrap();
        assert_eq!(tcp_int(&socket, libc::TCP_FASTOPEN_CONNECT), 1);
        // Connected without a cookie to send data with: its handshake is over.
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(!handshaking(&stream));
        assert!(fast_open_fell_back(&std::io::Error::from_raw_os_error(
            libc::EINPROGRESS
        )));
        assert!(!fast_open_fell_back(&std::io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
    }

    /// A socket whose SYN is dropped (the listener's queue is full) is still in its handshake,
    /// and waiting for it ends at the limit; an established one is done at once.
    #[tokio::test]
    async fn a_handshake_is_waited_for_until_it_is_done_or_the_limit() {
        use rustix::net::{AddressFamily, SocketAddrV4, SocketFlags, SocketType};
        let listener = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        rustix::net::bind(&listener, &SocketAddrV4::new([127, 0, 0, 1].into(), 0)).unwrap();
        // A queue of one connection, which the first fills.
        rustix::net::listen(&listener, 0).unwrap();
        let at =
            std::net::SocketAddr::try_from(rustix::net::getsockname(&listener).unwrap()).unwrap();
        let first = std::net::TcpStream::connect(at).unwrap();
        assert!(!handshaking(&first));
        assert!(handshake_done(&first, std::time::Duration::ZERO).await);
        let kind = SocketType::STREAM;
        let second =
            rustix::net::socket_with(AddressFamily::INET, kind, SocketFlags::NONBLOCK, None)
                .unwrap();
        let started = rustix::net::connect(&second, &at);
        assert_eq!(started, Err(rustix::io::Errno::INPROGRESS));
        assert!(handshaking(&second));
        let limit = std::time::Duration::from_millis(20);
        assert!(!handshake_done(&second, limit).await);
    }

    #[test]
    fn reno_is_always_there_and_nonsense_is_named() {
        let reno = SocketOptions {
            congestion: Some("reno".into()),
            ..SocketOptions::default()
        };
        reno.check("--sndbuf", "--rcvbuf").unwrap();
        let bad = SocketOptions {
            congestion: Some("nosuchcc".into()),
            ..SocketOptions::default()
        };
        let e = bad.check("--sndbuf", "--rcvbuf").unwrap_err().to_string();
        assert!(
            e.starts_with("congestion control \"nosuchcc\" is not available here (available: "),
            "{e}"
        );
        assert!(e.contains("reno"), "{e}");
    }

    #[test]
    fn buffers_are_set_and_read_back() {
        let opts = SocketOptions {
            sndbuf: Some(256 << 10),
            rcvbuf: Some(0),
            congestion: None,
        };
        let e = opts.check("--sndbuf", "--rcvbuf").unwrap_err().to_string();
        assert_eq!(e, "--rcvbuf must be between 1 and 1G bytes, not 0");
        let opts = SocketOptions {
            rcvbuf: Some(128 << 10),
            ..opts
        };
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        opts.apply(&socket).unwrap();
        let e = effective(&socket).unwrap();
        // Linux doubles what it keeps; it may clamp to rmem_max/wmem_max, never to zero.
        assert!(e.sndbuf > 0 && e.rcvbuf > 0, "{e:?}");
    }
}
