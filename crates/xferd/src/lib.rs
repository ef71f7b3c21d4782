//! The xfer daemon as a library: [`run`] serves a bound listener until its shutdown token fires.
//!
//! # Layout
//! - [`Config`]: validated settings (the binary turns flags into one).
//! - `handler`: one connection, from `Hello` to close.
//! - [`registry`]: uploads open by name, shared by the connections that feed them.
//!
//! Invariants: a connection's failure never ends the listener; the number of connections served
//! at once is bounded by `max_streams`, and the number accepted at all by `max_connections`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use xfer_core::Root;

mod handler;
pub mod registry;

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
    /// Data frames (or read requests) a client may have unanswered per connection.
    pub window: u32,
    /// How long a connection may wait for a stream slot before it is told the daemon is busy.
    pub queue_timeout: Duration,
    /// How long a new connection has to send its `Hello`.
    pub handshake_timeout: Duration,
    /// How long a connection may stay silent.
    pub idle_timeout: Duration,
    /// How long shutdown waits for connections to finish their current frame.
    pub drain_timeout: Duration,
    /// Refuse uploads.
    pub read_only: bool,
    /// Connections accepted at once from one client address.
    pub max_per_address: usize,
    /// Shared secret every client must prove it holds; `None` serves anyone who can connect.
    pub token: Option<Arc<[u8]>>,
    /// Certificate and key: when set, every session runs over TLS.
    pub tls: Option<Tls>,
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
            window: 2,
            queue_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(10),
            read_only: false,
            max_per_address: 64,
            token: None,
            tls: None,
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
        let config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("certificate and key do not fit together")?;
        Ok(Self(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }
}

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) streams: Arc<Semaphore>,
    pub(crate) registry: Arc<registry::Registry>,
    pub(crate) shutdown: CancellationToken,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in the per-address count; released on drop.
pub(crate) struct AddressSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Shared {
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
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let drain = config.drain_timeout;
    info!(
        root = %config.root_path.display(),
        max_streams = config.max_streams,
        chunk_size = config.chunk_size,
        "serving"
    );
    let shared = Arc::new(Shared {
        streams: Arc::new(Semaphore::new(config.max_streams)),
        config,
        registry: Arc::default(),
        shutdown: shutdown.clone(),
        per_address: Mutex::default(),
    });
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        // The connection permit is taken before accept: past the limit, new clients wait in the
        // kernel's backlog instead of costing us a file descriptor each.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&connections).acquire_owned() => permit.expect("never closed"),
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, peer)) => {
                backoff = Duration::from_millis(5);
                let slot = shared.admit(peer.ip());
                let shared = Arc::clone(&shared);
                tracker.spawn(async move {
                    match slot {
                        Some(_slot) => handler::serve(shared, socket, peer).await,
                        None => {
                            handler::refuse_busy(
                                socket,
                                peer,
                                "too many connections from this address",
                            )
                            .await
                        }
                    }
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
