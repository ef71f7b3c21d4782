//! [`Registry`]: the uploads open in the daemon, one per destination name, so that several
//! connections of one client join the same partial file and a different file cannot interleave.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{watch, Notify};
use xfer_core::digest::DigestKind;
use xfer_core::{CoreError, PartialFile, Root};
use xfer_proto::{ErrorCode, FileIdentity};

/// Open uploads by destination name.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<String, Entry>>,
    next_id: std::sync::atomic::AtomicU64,
    metrics: Arc<crate::metrics::Metrics>,
    /// Counts every upload closed and every commit carried out, so that `AwaitCommits`
    /// looks again only when one may have settled what it waits for.
    settled: watch::Sender<u64>,
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
        /// A `Commit` of it was carried out and failed, leaving it open (short of data).
        commit_failed: bool,
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
                        ..
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
                            commit_failed: false,
                        },
                    );
                    Ok(self.lease(name, id, partial, started))
                }
                Err(e) => {
                    map.remove(name);
                    Err(e.into())
                }
            };
            drop(map);
            notify.notify_waiters();
            self.settle();
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

    /// Returns once no upload of any of `names` is open without a `Commit` carried out: each
    /// was committed, failed its commit, or lost every connection (`AwaitCommits`). Bounded
    /// by those connections: one that ends drops its share, and the upload is forgotten.
    pub async fn await_commits(&self, names: &[String]) {
        let mut settled = self.settled.subscribe();
        loop {
            let waiting = {
                let map = self.lock();
                names.iter().any(|name| match map.get(name) {
                    None => false,
                    Some(Entry::Opening(_)) => true,
                    Some(Entry::Open { commit_failed, .. }) => !commit_failed,
                })
            };
            if !waiting {
                return;
            }
            // Marked seen at `subscribe` or the last `changed`: a change since is not missed.
            if settled.changed().await.is_err() {
                return;
            }
        }
    }

    /// Tells those waiting in [`Self::await_commits`] to look again.
    fn settle(&self) {
        self.settled.send_modify(|n| *n = n.wrapping_add(1));
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
        drop(map);
        self.registry.settle();
    }

    /// Records a `Commit` carried out that failed and left the upload open: what waits for
    /// its commit waits no longer.
    pub fn commit_failed(&self) {
        let mut map = self.registry.lock();
        if let Some(Entry::Open {
            id, commit_failed, ..
        }) = map.get_mut(&self.name)
        {
            if *id == self.id {
                *commit_failed = true;
            }
        }
        drop(map);
        self.registry.settle();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.registry.lock();
        let mut forgotten = false;
        if let Some(Entry::Open { id, users, .. }) = map.get_mut(&self.name) {
            if *id == self.id {
                *users -= 1;
                forgotten = *users == 0;
            }
        }
        if forgotten {
            // Every connection left before the commit: the upload stays resumable.
            map.remove(&self.name);
            self.registry.metrics.uploads.active.dec();
            self.registry.metrics.uploads.failed.inc();
            drop(map);
            self.registry.settle();
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

#[cfg(test)]
mod tests {
    use super::*;

    const IDENTITY: FileIdentity = FileIdentity {
        size: 10,
        mtime_ns: 0,
    };

    /// Whether `await_commits(names)` returns before anything else happens.
    async fn settled_now(registry: &Arc<Registry>, names: &[&str]) -> bool {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let waiting = registry.await_commits(&names);
        tokio::time::timeout(std::time::Duration::from_millis(50), waiting)
            .await
            .is_ok()
    }

    async fn open(registry: &Arc<Registry>, root: &Root, name: &str) -> Lease {
        registry
            .open(root, name, IDENTITY, Vec::new(), DigestKind::Sequential)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn awaited_commits_wait_for_each_upload_open_until_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let registry = Arc::new(Registry::default());
        // Names no upload holds are settled: committed before, or never opened.
        assert!(settled_now(&registry, &["gone"]).await);
        let (a, b, c) = (
            open(&registry, &root, "a").await,
            open(&registry, &root, "b").await,
            open(&registry, &root, "c").await,
        );
        assert!(!settled_now(&registry, &["a"]).await);
        // Committed (retired), failed with the upload left open, or every connection gone.
        a.retire();
        assert!(settled_now(&registry, &["a"]).await);
        assert!(!settled_now(&registry, &["a", "b", "c"]).await);
        b.commit_failed();
        assert!(!settled_now(&registry, &["a", "b", "c"]).await);
        // A waiter already waiting is woken by the last one settling.
        let names = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let waiter = {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move { registry.await_commits(&names).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(c);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("woken once the last upload settled")
            .unwrap();
    }
}
