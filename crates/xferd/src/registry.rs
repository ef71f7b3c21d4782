//! [`Registry`]: the uploads open in the daemon, one per destination name, so that several
//! connections of one client join the same partial file and a different file cannot interleave.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;
use xfer_core::digest::DigestKind;
use xfer_core::{CoreError, PartialFile, Root};
use xfer_proto::{ErrorCode, FileIdentity};

/// Open uploads by destination name.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<String, Entry>>,
    next_id: std::sync::atomic::AtomicU64,
    metrics: Arc<crate::metrics::Metrics>,
}

#[derive(Debug)]
enum Entry {
    /// Another connection is opening this name; wait for it.
    Opening(Arc<Notify>),
    Open {
        id: u64,
        identity: FileIdentity,
        partial: Arc<PartialFile>,
        started: Instant,
        users: usize,
    },
}

/// Why an upload could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The name is open for a file with another identity.
    #[error("{0} is being uploaded by another client with a different file")]
    InUse(String),
    /// Opening the partial failed.
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl OpenError {
    /// The wire error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InUse(_) => ErrorCode::InUse,
            Self::Core(e) => e.code(),
        }
    }
}

/// A connection's share of an open upload; dropping it releases the share.
#[derive(Debug)]
pub struct Lease {
    registry: Arc<Registry>,
    name: String,
    id: u64,
    /// The partial file being written.
    pub partial: Arc<PartialFile>,
    /// When the first connection opened this upload.
    pub started: Instant,
}

impl Registry {
    /// An empty registry counting uploads (active, resumed, interrupted) into `metrics`.
    pub fn with_metrics(metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the upload of `name` if it is open with the same identity, or opens it (a new
    /// partial reserves no space for `holes`).
    ///
    /// # Errors
    /// `InUse` for another identity; errors opening the partial.
    pub async fn open(
        self: &Arc<Self>,
        root: &Root,
        name: &str,
        identity: FileIdentity,
        holes: Vec<xfer_proto::ByteRange>,
        digest: DigestKind,
    ) -> Result<Lease, OpenError> {
        loop {
            let waiting = {
                let mut map = self.lock();
                match map.get_mut(name) {
                    Some(Entry::Open {
                        id,
                        identity: held,
                        partial,
                        started,
                        users,
                    }) => {
                        if *held != identity {
                            return Err(OpenError::InUse(name.to_string()));
                        }
                        *users += 1;
                        return Ok(self.lease(name, *id, Arc::clone(partial), *started));
                    }
                    // Registered before the lock is released, so the wake-up cannot be missed.
                    Some(Entry::Opening(notify)) => Err(Arc::clone(notify).notified_owned()),
                    None => {
                        let notify = Arc::new(Notify::new());
                        map.insert(name.to_string(), Entry::Opening(Arc::clone(&notify)));
                        Ok(notify)
                    }
                }
            };
            let notify = match waiting {
                Ok(notify) => notify,
                Err(notified) => {
                    notified.await;
                    continue;
                }
            };
            let (root, owned) = (root.clone(), name.to_string());
            let opened = match blocking(move || root.slot(&owned, true)).await {
                Ok(slot) => {
                    PartialFile::open_sparse_as(slot, identity, holes.clone(), digest).await
                }
                Err(e) => Err(e),
            };
            let mut map = self.lock();
            let result = match opened {
                Ok(partial) => {
                    let id = self
                        .next_id
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let started = Instant::now();
                    self.metrics.uploads.active.inc();
                    if partial.resumed_bytes() > 0 {
                        self.metrics.uploads.resumed.inc();
                    }
                    map.insert(
                        name.to_string(),
                        Entry::Open {
                            id,
                            identity,
                            partial: Arc::clone(&partial),
                            started,
                            users: 1,
                        },
                    );
                    Ok(self.lease(name, id, partial, started))
                }
                Err(e) => {
                    map.remove(name);
                    Err(e.into())
                }
            };
            notify.notify_waiters();
            return result;
        }
    }

    fn lease(
        self: &Arc<Self>,
        name: &str,
        id: u64,
        partial: Arc<PartialFile>,
        started: Instant,
    ) -> Lease {
        Lease {
            registry: Arc::clone(self),
            name: name.to_string(),
            id,
            partial,
            started,
        }
    }

    /// True while an upload of `name` is open: tree writes must not touch its partial file.
    pub fn is_open(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Number of uploads open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no upload is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Lease {
    /// Forgets the upload after its commit, so that the next upload of the name starts fresh.
    pub fn retire(&self) {
        let mut map = self.registry.lock();
        if matches!(map.get(&self.name), Some(Entry::Open { id, .. }) if *id == self.id) {
            map.remove(&self.name);
            self.registry.metrics.uploads.active.dec();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.registry.lock();
        if let Some(Entry::Open { id, users, .. }) = map.get_mut(&self.name) {
            if *id == self.id {
                *users -= 1;
                if *users == 0 {
                    // Every connection left before the commit: the upload stays resumable.
                    map.remove(&self.name);
                    self.registry.metrics.uploads.active.dec();
                    self.registry.metrics.uploads.failed.inc();
                }
            }
        }
    }
}

/// Runs a short file operation (path resolution, `mkdir`) off the runtime's worker threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CoreError> + Send + 'static,
) -> Result<T, CoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoreError::io("file task", std::io::Error::other(e.to_string())))?
}
