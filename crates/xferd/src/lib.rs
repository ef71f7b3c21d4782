//! The xfer daemon as a library: [`run`] serves a bound listener until its shutdown token fires.
//!
//! # Layout
//! - [`Config`]: validated settings (the binary turns flags into one).
//! - `handler`: one connection, from `Hello` to close.
//! - [`registry`]: uploads open by name, shared by the connections that feed them.
//! - `downloads`: downloads open by client and name, so that each ends as one logged transfer.
//! - `mirror`: who may delete (`--allow-delete`), and the answers of a mirror copy.
//! - [`metrics`]: counters and gauges, and the HTTP responder serving them to Prometheus.
//! - [`settings`]: the configuration file and flags, validated into a [`Config`].
//! - [`budget`]: the size of the memory budget every connection's buffers come from, and
//!   giving memory back after a burst.
//! - [`fds`]: the open-file limit, raised at start and checked against `max_streams`.
//!
//! Invariants: a connection's failure never ends the listener; the number of connections served
//! at once is bounded by `max_streams`, and the number accepted at all by `max_connections`;
//! the chunk and frame buffers of all of them together by `max_memory`.
//! A reload ([`run_with`]'s `reloads`) never touches an open connection: each connection keeps
//! the configuration it was accepted under, and the new one applies to connections accepted
//! after it; stream and connection limits change for everyone at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use xfer_core::{MemoryBudget, Root};

pub mod budget;
mod downloads;
pub mod fds;
mod handler;
pub mod identity;
pub mod metrics;
mod mirror;
pub mod registry;
pub mod settings;

/// Validated daemon settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory every name is resolved beneath.
    pub root: Root,
    /// Where the root is, for logs.
    pub root_path: PathBuf,
    /// Connections served at once; more wait for a slot.
    pub max_streams: usize,
    /// Connections accepted at once, serving or waiting; the listener pauses above it.
    pub max_connections: usize,
    /// Largest chunk accepted or served.
    pub chunk_size: u32,
    /// Bytes of chunk and frame buffers all connections together may hold (`max_memory`).
    pub max_memory: u64,
    /// Data frames (or read requests) a client may have unanswered per connection.
    pub window: u32,
    /// How long a connection may wait for a stream slot before it is told the daemon is busy.
    pub queue_timeout: Duration,
    /// How long a new connection has to send its `Hello`.
    pub handshake_timeout: Duration,
    /// How long a connection may stay silent.
    pub idle_timeout: Duration,
    /// Transfers one connection may have open at once.
    pub max_transfers_per_conn: usize,
    /// How long shutdown waits for connections to finish their current frame.
    pub drain_timeout: Duration,
    /// Refuse uploads.
    pub read_only: bool,
    /// Carry out the deletions of mirror copies (`--allow-delete`).
    pub allow_delete: bool,
    /// Write uploads around the page cache where the filesystem allows it (off with
    /// `--no-direct-io`).
    pub direct_io: bool,
    /// Connections accepted at once from one client address.
    pub max_per_address: usize,
    /// Shared secret every client must prove it holds; `None` serves anyone who can connect.
    pub token: Option<Arc<[u8]>>,
    /// Certificate and key: when set, every session runs over TLS.
    pub tls: Option<Tls>,
    /// The CAs trusted for the TLS leg of outgoing copies (`copy_ca`); `None` trusts the
    /// system's, loaded when a copy asks for TLS, so a daemon that never does is not bothered
    /// by a system without them.
    pub copy_trust: Option<CopyTrust>,
    /// Buffers and congestion control: set on the listener (accepted connections inherit them)
    /// and on the connections of server-to-server copies.
    pub socket: xfer_net::SocketOptions,
    /// How the chunks the daemon sends are compressed unless a client says otherwise.
    pub compress: xfer_net::Compression,
}

impl Config {
    /// Defaults for everything but the root.
    ///
    /// # Errors
    /// The root cannot be opened as a directory.
    pub fn new(root_path: PathBuf) -> xfer_core::Result<Self> {
        Ok(Self {
            root: Root::open(&root_path)?,
            root_path,
            max_streams: 64,
            max_connections: 64 * 4 + 64,
            chunk_size: xfer_proto::MAX_CHUNK_SIZE,
            max_memory: budget::default_max_memory(),
            window: 2,
            queue_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_transfers_per_conn: 64,
            drain_timeout: Duration::from_secs(10),
            read_only: false,
            allow_delete: false,
            direct_io: true,
            max_per_address: 64,
            token: None,
            tls: None,
            copy_trust: None,
            socket: xfer_net::SocketOptions::default(),
            compress: xfer_net::Compression::Auto,
        })
    }
}

/// The daemon's TLS identity (certificate chain and key), ready to accept handshakes.
#[derive(Clone)]
pub struct Tls(pub tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

impl Tls {
    /// Loads a PEM certificate chain and private key.
    ///
    /// # Errors
    /// Unreadable files, no certificate or key in them, or a key that does not fit.
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .with_context(|| format!("reading certificates from {}", cert.display()))?;
        if certs.is_empty() {
            anyhow::bail!("no certificate in {}", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading the private key from {}", key.display()))?;
        let mut config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("certificate and key do not fit together")?;
        // Kernel TLS takes the keys over once the handshake is done; it would see tickets as
        // records it cannot hand over, and no client resumes a session anyway.
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        Ok(Self(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }
}

/// The CA certificates a daemon trusts when it copies to another one over TLS.
#[derive(Clone)]
pub struct CopyTrust(pub tokio_rustls::TlsConnector);

impl std::fmt::Debug for CopyTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CopyTrust(..)")
    }
}

impl CopyTrust {
    /// What `copy_ca` names when unset, and the hint given when the system has no CAs either.
    pub const FIX: &'static str = "set copy_ca (--copy-ca FILE) on the source daemon";

    /// Trusts the PEM CA certificates in `ca`.
    ///
    /// # Errors
    /// The file cannot be read or holds no certificate.
    pub fn from_pem_file(ca: &std::path::Path) -> anyhow::Result<Self> {
        Ok(Self(xfer_client::Connector::tls_trusting(
            Some(ca),
            Self::FIX,
        )?))
    }
}

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) streams: Arc<Semaphore>,
    pub(crate) registry: Arc<registry::Registry>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) downloads: Arc<downloads::Downloads>,
    /// Every chunk and frame buffer of every connection is reserved from it.
    pub(crate) budget: MemoryBudget,
    /// Starts writing stored small files to disk before the tree's `Sync` asks for it.
    pub(crate) writeback: Arc<xfer_core::Writeback>,
    /// The nonces of the early proofs taken (`CAP_ZERO_RTT`), kept across reloads.
    pub(crate) replay: Arc<xfer_proto::replay::ReplayCache>,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A stream slot held by a connection; frees the slot when dropped.
pub(crate) struct StreamPermit {
    _permit: OwnedSemaphorePermit,
    _active: metrics::GaugeGuard,
}

/// One connection's place in the per-address count; released on drop.
pub(crate) struct AddressSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Shared {
    /// Waits for a stream slot, counted as waiting meanwhile.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future leaves the queue and the waiting count.
    pub(crate) async fn acquire_stream(&self) -> Result<StreamPermit, AcquireError> {
        let waiting = metrics::GaugeGuard::new(&self.metrics, |m| &m.connections_waiting);
        let permit = Arc::clone(&self.streams).acquire_owned().await?;
        drop(waiting);
        Ok(StreamPermit {
            _permit: permit,
            _active: metrics::GaugeGuard::new(&self.metrics, |m| &m.streams_active),
        })
    }

    /// The same shared state under a new configuration, for connections accepted from now on.
    fn reconfigured(&self, config: Config) -> Self {
        Self {
            config,
            streams: Arc::clone(&self.streams),
            registry: Arc::clone(&self.registry),
            shutdown: self.shutdown.clone(),
            metrics: Arc::clone(&self.metrics),
            downloads: Arc::clone(&self.downloads),
            budget: self.budget.clone(),
            writeback: Arc::clone(&self.writeback),
            replay: Arc::clone(&self.replay),
            per_address: Arc::clone(&self.per_address),
        }
    }

    /// Counts a connection from `ip`; `None` when that address is at its limit.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut map = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        let count = map.entry(ip).or_insert(0);
        if *count >= self.config.max_per_address {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            shared: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Serves `listener` until `shutdown` is cancelled, then lets connections finish the frame they
/// are on (each tells its client the daemon is stopping) for at most `drain_timeout`.
///
/// # Errors
/// None today: accept errors are logged and retried with backoff.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    run_with(listener, config, shutdown, Hooks::default()).await
}

/// What the daemon binary plugs into [`run_with`] beside the listener and configuration.
#[derive(Debug, Default)]
pub struct Hooks {
    /// New configurations to apply while running (`SIGHUP`). Each applies to connections
    /// accepted after it; connections already open keep theirs; the root never changes.
    pub reloads: Option<mpsc::Receiver<Config>>,
    /// Where to count; shared with the metrics endpoint.
    pub metrics: Arc<metrics::Metrics>,
}

/// [`run`], taking new configurations from `hooks.reloads` and counting into `hooks.metrics`.
///
/// # Errors
/// None today: accept errors are logged and retried with backoff.
pub async fn run_with(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> std::io::Result<()> {
    let Hooks {
        mut reloads,
        metrics,
    } = hooks;
    let budget = budget::shared_budget(&metrics, config.max_memory);
    tokio::spawn(budget::trim_when_idle(
        budget.clone(),
        Arc::clone(&metrics),
        shutdown.clone(),
    ));
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let drain = config.drain_timeout;
    apply_socket_options(&listener, &config);
    xfer_core::direct::set_direct_io(config.direct_io);
    info!(
        root = %config.root_path.display(),
        max_streams = config.max_streams,
        chunk_size = config.chunk_size,
        max_memory = config.max_memory,
        "serving"
    );
    metrics.streams_max.set(config.max_streams as i64);
    let mut shared = Arc::new(Shared {
        streams: Arc::new(Semaphore::new(config.max_streams)),
        config,
        registry: Arc::new(registry::Registry::with_metrics(Arc::clone(&metrics))),
        shutdown: shutdown.clone(),
        downloads: Arc::new(downloads::Downloads::new(Arc::clone(&metrics))),
        metrics,
        budget,
        writeback: Arc::default(),
        replay: Arc::default(),
        per_address: Arc::default(),
    });
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        // The connection permit is taken before accept: past the limit, new clients wait in the
        // kernel's backlog instead of costing us a file descriptor each.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            reload = next_reload(&mut reloads) => {
                match reload {
                    Some(config) => shared = apply_reload(&shared, &connections, config),
                    None => reloads = None,
                }
                continue;
            }
            permit = Arc::clone(&connections).acquire_owned() => permit.expect("never closed"),
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            // A reload applies before the next accept, never to a connection accepted earlier.
            reload = next_reload(&mut reloads) => {
                match reload {
                    Some(config) => {
                        shared = apply_reload(&shared, &connections, config);
                        apply_socket_options(&listener, &shared.config);
                    }
                    None => reloads = None,
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, peer)) => {
                backoff = Duration::from_millis(5);
                let slot = shared.admit(peer.ip());
                let shared = Arc::clone(&shared);
                shared.metrics.connections_accepted.inc();
                let open = metrics::GaugeGuard::new(&shared.metrics, |m| &m.connections_open);
                tracker.spawn(async move {
                    match slot {
                        Some(_slot) => {
                            // Small control frames (Ack, Welcome) go out at once.
                            let _ = socket.set_nodelay(true);
                            if shared.config.socket.congestion.is_none() {
                                long_path_congestion(&socket, peer);
                            }
                            handler::serve(shared, socket, peer).await
                        }
                        None => {
                            handler::refuse_busy(
                                socket,
                                peer,
                                "too many connections from this address",
                            )
                            .await
                        }
                    }
                    drop(open);
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: wait for connections to end rather than spin or exit.
                warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    drop(listener);
    tracker.close();
    info!(connections = tracker.len(), "shutting down; draining");
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        warn!(
            remaining = tracker.len(),
            "drain deadline hit; exiting with connections open"
        );
    } else {
        info!("drained");
    }
    Ok(())
}

/// Without a configured congestion control, a connection from a long path (its handshake's
/// round trip of `LONG_PATH` or more) sends with `LONG_PATH_CONGESTION`, as the client does for
/// uploads (see `xfer_client::engine`): the daemon is the sender of downloads. If the kernel does
/// not allow it, one line says so (once) and the connection keeps the system's.
///
/// A connection accepted with data in its SYN (TCP Fast Open) has no round trip yet: the
/// choice waits, beside the connection's serving, for the client to acknowledge the SYN-ACK (a
/// task of its own, not one of the connections the shutdown drains: it ends within
/// [`FAST_OPEN_HANDSHAKE`]).
fn long_path_congestion(socket: &tokio::net::TcpStream, peer: SocketAddr) {
    if !xfer_net::sockopt::handshaking(socket) {
        return choose_congestion(socket, peer);
    }
    // A descriptor of its own: the connection may end before the handshake does.
    let Ok(socket) = std::os::fd::AsFd::as_fd(socket).try_clone_to_owned() else {
        return;
    };
    tokio::spawn(async move {
        if xfer_net::sockopt::handshake_done(&socket, FAST_OPEN_HANDSHAKE).await {
            choose_congestion(&socket, peer);
        }
    });
}

/// How long a connection accepted with data in its SYN may take to finish its handshake for the
/// daemon to choose its congestion control by its round trip: the SYN-ACK's retransmissions
/// (1 s, then 2 s) included.
const FAST_OPEN_HANDSHAKE: Duration = Duration::from_secs(4);

/// [`long_path_congestion`] for `socket`, whose handshake is done.
fn choose_congestion(socket: impl std::os::fd::AsFd, peer: SocketAddr) {
    use xfer_client::engine::{LONG_PATH, LONG_PATH_CONGESTION};
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match xfer_net::sockopt::congestion_for_long_path(socket, LONG_PATH_CONGESTION, LONG_PATH) {
        Ok(true) => debug!(%peer, congestion = LONG_PATH_CONGESTION, "long path"),
        Ok(false) => {}
        Err(e) if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) => {
            warn!(%peer, "long path, but {e}; keeping the system's congestion control");
        }
        Err(_) => {}
    }
}

/// Sets the configured buffers and congestion control on the listener: accepted connections
/// inherit them. The binary sets them before `listen` too, for the window scale; a listener
/// passed in (tests, socket activation) gets them here. A failure is logged, not fatal: the
/// settings were checked when the configuration was built.
///
/// TCP Fast Open too, wherever the system allows it for servers: a client that connected
/// before sends its `Hello` and first requests with the SYN, and they are answered a round
/// trip sooner.
fn apply_socket_options(listener: &TcpListener, config: &Config) {
    if let Err(e) = config.socket.apply(listener) {
        warn!(error = %e, "cannot set socket options on the listener");
    }
    if let Err(e) = xfer_net::sockopt::fast_open_listener(listener, FAST_OPEN_PENDING) {
        debug!(error = %e, "no TCP Fast Open on the listener");
    }
}

/// Connections whose SYN brought data that the listener holds before they are accepted, as
/// many as its backlog.
const FAST_OPEN_PENDING: u32 = 1024;

/// The next configuration from `reloads`; never, once there is no sender left.
async fn next_reload(reloads: &mut Option<mpsc::Receiver<Config>>) -> Option<Config> {
    match reloads {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Applies a reloaded configuration and returns the state new connections get.
///
/// Everything in [`Config`] takes effect for connections accepted from now on (token, TLS
/// identity, timeouts, chunk size, window, read-only, per-address limit); `max_streams` and
/// `max_connections` change the shared limits at once, for everyone. Connections already open
/// keep the settings they started with, so no transfer is dropped. The root stays the one the
/// daemon started with (a new root needs a restart): uploads in progress are tied to it.
fn apply_reload(
    shared: &Arc<Shared>,
    connections: &Arc<Semaphore>,
    mut config: Config,
) -> Arc<Shared> {
    let old = &shared.config;
    if config.root_path != old.root_path {
        warn!(
            root = %old.root_path.display(),
            requested = %config.root_path.display(),
            "a new root needs a restart; keeping the current one"
        );
    }
    config.root = old.root.clone();
    config.root_path = old.root_path.clone();
    config.drain_timeout = old.drain_timeout;
    if config.max_memory != old.max_memory {
        warn!(
            max_memory = old.max_memory,
            requested = config.max_memory,
            "max_memory changed: takes effect at the next restart"
        );
        config.max_memory = old.max_memory;
    }
    fds::fit(&mut config, fds::soft_limit());
    xfer_core::direct::set_direct_io(config.direct_io);
    let changes = describe_changes(old, &config);
    resize(&shared.streams, old.max_streams, config.max_streams);
    resize(connections, old.max_connections, config.max_connections);
    shared.metrics.streams_max.set(config.max_streams as i64);
    shared.metrics.reloads.inc();
    if changes.is_empty() {
        info!("configuration reloaded; nothing changed");
    } else {
        info!(changes = %changes.join(", "), "configuration reloaded");
    }
    Arc::new(shared.reconfigured(config))
}

/// What differs between two configurations, one `key: old -> new` per change (secrets only as
/// "changed").
fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut diff = |key: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{key}: {a} -> {b}"));
        }
    };
    diff(
        "max_streams",
        old.max_streams.to_string(),
        new.max_streams.to_string(),
    );
    diff(
        "chunk_size",
        old.chunk_size.to_string(),
        new.chunk_size.to_string(),
    );
    diff("window", old.window.to_string(), new.window.to_string());
    let size = |v: Option<u64>| v.map_or_else(|| "default".to_string(), |n| n.to_string());
    diff("sndbuf", size(old.socket.sndbuf), size(new.socket.sndbuf));
    diff("rcvbuf", size(old.socket.rcvbuf), size(new.socket.rcvbuf));
    let cc = |v: &Option<String>| v.clone().unwrap_or_else(|| "default".to_string());
    diff(
        "congestion",
        cc(&old.socket.congestion),
        cc(&new.socket.congestion),
    );
    diff(
        "queue_timeout",
        format!("{:?}", old.queue_timeout),
        format!("{:?}", new.queue_timeout),
    );
    diff(
        "idle_timeout",
        format!("{:?}", old.idle_timeout),
        format!("{:?}", new.idle_timeout),
    );
    diff(
        "read_only",
        old.read_only.to_string(),
        new.read_only.to_string(),
    );
    diff(
        "allow_delete",
        old.allow_delete.to_string(),
        new.allow_delete.to_string(),
    );
    diff(
        "direct_io",
        old.direct_io.to_string(),
        new.direct_io.to_string(),
    );
    diff(
        "max_conns_per_ip",
        old.max_per_address.to_string(),
        new.max_per_address.to_string(),
    );
    let token = |t: &Option<Arc<[u8]>>| if t.is_some() { "set" } else { "none" }.to_string();
    if old.token != new.token {
        match (&old.token, &new.token) {
            (Some(_), Some(_)) => out.push("token: changed".into()),
            _ => out.push(format!(
                "token: {} -> {}",
                token(&old.token),
                token(&new.token)
            )),
        }
    }
    match (&old.tls, &new.tls) {
        (None, None) => {}
        (Some(_), Some(_)) => out.push("tls: certificate reloaded".into()),
        (a, b) => out.push(format!(
            "tls: {} -> {}",
            if a.is_some() { "on" } else { "off" },
            if b.is_some() { "on" } else { "off" }
        )),
    }
    let trust = |t: &Option<CopyTrust>| if t.is_some() { "copy_ca" } else { "system CAs" };
    match (&old.copy_trust, &new.copy_trust) {
        (None, None) => {}
        (Some(_), Some(_)) => out.push("copy_ca: reloaded".into()),
        (a, b) => out.push(format!("copy_ca: {} -> {}", trust(a), trust(b))),
    }
    out
}

/// Changes a semaphore's capacity from `from` to `to` permits. Growing is immediate; shrinking
/// takes the free permits at once and the rest as holders release them (the debt queues ahead
/// of new waiters, so the new limit holds from then on).
fn resize(sem: &Arc<Semaphore>, from: usize, to: usize) {
    if to > from {
        sem.add_permits(to - from);
    } else if from > to {
        let owed = from - to;
        let taken = sem.forget_permits(owed);
        if taken < owed {
            let rest = u32::try_from(owed - taken).unwrap_or(u32::MAX);
            let sem = Arc::clone(sem);
            tokio::spawn(async move {
                if let Ok(permits) = sem.acquire_many_owned(rest).await {
                    permits.forget();
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resize_grows_and_shrinks_with_permits_in_use() {
        let sem = Arc::new(Semaphore::new(4));
        let held: Vec<_> = (0..3)
            .map(|_| Arc::clone(&sem).try_acquire_owned().unwrap())
            .collect();
        // 4 -> 2 with 3 in use: 1 free permit goes now, 1 more when a holder leaves.
        resize(&sem, 4, 2);
        assert_eq!(sem.available_permits(), 0);
        drop(held);
        tokio::task::yield_now().await;
        for _ in 0..10 {
            if sem.available_permits() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(sem.available_permits(), 2);
        resize(&sem, 2, 5);
        assert_eq!(sem.available_permits(), 5);
    }

    #[test]
    fn changes_are_described_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let old = Config::new(dir.path().to_path_buf()).unwrap();
        let mut new = old.clone();
        new.max_streams = 8;
        new.read_only = true;
        new.token = Some(Arc::from(&b"s3cret"[..]));
        let changes = describe_changes(&old, &new).join(", ");
        assert_eq!(
            changes,
            "max_streams: 64 -> 8, read_only: false -> true, token: none -> set"
        );
    }
}
