//! The transfer engine: chunks of one file handed out from a shared queue to several
//! connections, each keeping a bounded window in flight, with reconnects on transient failures.
//! Uploads and downloads share the queue, the retry loop and the accounting; they differ only
//! in what a worker does with a chunk.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;
use xfer_core::{split_into_chunks, PartialFile, RangeSet, Slot, SourceFile};
use xfer_proto::{
    ByteRange, ChunkRef, Commit, Data, ErrorCode, FileIdentity, Frame, OpenRead, OpenWrite,
};

use crate::session::unexpected;
use crate::{ClientError, Connector, RateLimiter, Session, Target};

/// How a transfer runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Parallel connections.
    pub connections: usize,
    /// Chunk size asked for (the server may lower it).
    pub chunk_size: u32,
    /// Bytes per second across all connections, if limited.
    pub bwlimit: Option<u64>,
    /// How long to keep reconnecting after a transient failure before giving up.
    pub retry_deadline: Duration,
    /// Progress display (hidden when not on a terminal).
    pub progress: ProgressBar,
    /// Token and TLS settings for every connection.
    pub connector: Connector,
}

/// What a finished transfer reports (`--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Name on the server.
    pub name: String,
    /// Size of the file.
    pub bytes_total: u64,
    /// Payload bytes sent or received by this run (resends included).
    pub bytes_transferred: u64,
    /// Bytes already held at the start, not sent again.
    pub resumed_bytes: u64,
    /// Wall-clock seconds of this run.
    pub seconds: f64,
    /// Connections used.
    pub connections: usize,
    /// `bytes_transferred` / `seconds`, in MiB/s.
    pub mbytes_per_sec: f64,
    /// Chunks sent again because their CRC did not match.
    pub crc_retries: u64,
    /// TCP congestion control of the data connections, as the kernel reports it.
    pub congestion: Option<String>,
}

/// Chunks still to move, shared by the workers of one transfer.
struct Work {
    queue: Mutex<VecDeque<ByteRange>>,
    /// Bytes queued or in flight: not yet acknowledged (uploads) or written (downloads).
    outstanding: AtomicU64,
    /// True once `outstanding` reaches zero: workers still connecting can stop.
    finished: watch::Sender<bool>,
    transferred: AtomicU64,
    crc_retries: AtomicU64,
    progress: ProgressBar,
    limiter: Option<RateLimiter>,
}

impl Work {
    fn new(chunks: Vec<ByteRange>, opts: &Options) -> Self {
        let work = Self {
            queue: Mutex::new(VecDeque::new()),
            outstanding: AtomicU64::new(0),
            finished: watch::Sender::new(true),
            transferred: AtomicU64::new(0),
            crc_retries: AtomicU64::new(0),
            progress: opts.progress.clone(),
            limiter: opts.bwlimit.map(RateLimiter::new),
        };
        work.add(chunks);
        work
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<ByteRange>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues new chunks to move.
    fn add(&self, chunks: Vec<ByteRange>) {
        let bytes: u64 = chunks.iter().map(ByteRange::len).sum();
        self.lock().extend(chunks);
        let total = self.outstanding.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.finished.send_replace(total == 0);
    }

    fn pop(&self) -> Option<ByteRange> {
        self.lock().pop_front()
    }

    /// Puts chunks that were in flight on a failed connection back at the front.
    fn requeue(&self, chunks: impl DoubleEndedIterator<Item = ByteRange>) {
        let mut q = self.lock();
        for c in chunks.rev() {
            q.push_front(c);
        }
    }

    /// Marks `chunk` as moved for good.
    fn complete(&self, chunk: ByteRange) {
        self.progress.inc(chunk.len());
        if self.outstanding.fetch_sub(chunk.len(), Ordering::SeqCst) == chunk.len() {
            self.finished.send_replace(true);
        }
    }

    /// Resolves once every chunk is moved.
    async fn finished(&self) {
        let _ = self.finished.subscribe().wait_for(|done| *done).await;
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    async fn throttle(&self, bytes: u64) {
        if let Some(l) = &self.limiter {
            l.acquire(bytes).await;
        }
    }
}

/// What differs between an upload and a download.
trait Direction: Send + Sync + 'static {
    /// Opens the transfer on a fresh session; returns its transfer id.
    fn open(
        &self,
        session: &mut Session,
    ) -> impl std::future::Future<Output = Result<u64, ClientError>> + Send;
    /// Moves chunks from the queue until it is empty; on error, in-flight chunks are requeued.
    fn pump(
        &self,
        session: &mut Session,
        transfer_id: u64,
        work: &Work,
    ) -> impl std::future::Future<Output = Result<(), ClientError>> + Send;
}

fn window(session: &Session) -> usize {
    (session.welcome.window as usize).clamp(1, 64)
}

/// Runs `connections` workers over `work` until the queue is drained. Each worker reconnects
/// with exponential backoff and jitter after a transient failure, until `retry_deadline`.
/// Returns the sessions that finished cleanly (with their transfer ids).
async fn drive<D: Direction>(
    target: &Target,
    dir: Arc<D>,
    work: Arc<Work>,
    first: (Session, u64),
    opts: &Options,
) -> Result<Vec<(Session, u64)>, ClientError> {
    let mut workers = JoinSet::new();
    let mut first = Some(first);
    for _ in 0..opts.connections {
        let (dir, work, target) = (Arc::clone(&dir), Arc::clone(&work), target.clone());
        let first = first.take();
        let opts = opts.clone();
        workers.spawn(async move { worker(&target, &*dir, &work, first, &opts).await });
    }
    let mut done = Vec::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok(Some(session))) => done.push(session),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                workers.abort_all();
                return Err(e);
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    Ok(done)
}

/// Reconnect pacing: exponential backoff with jitter, giving up once one outage (failures with
/// no successful reconnect between them) has lasted `deadline`.
struct Retry {
    deadline: Duration,
    since: Option<Instant>,
    backoff: Duration,
}

impl Retry {
    fn new(deadline: Duration) -> Self {
        Self {
            deadline,
            since: None,
            backoff: Duration::from_millis(100),
        }
    }

    /// A connection got through: the next failure starts a new outage.
    fn succeeded(&mut self) {
        self.since = None;
        self.backoff = Duration::from_millis(100);
    }

    /// After a failure: the delay before the next attempt, or the error to end with (a final
    /// one, or the last one once the outage has lasted past the deadline).
    fn after(&mut self, e: ClientError) -> Result<Duration, ClientError> {
        if !e.is_transient() {
            return Err(e);
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.deadline {
            return Err(ClientError::GaveUp {
                last: Box::new(e),
                seconds: since.elapsed().as_secs_f64(),
            });
        }
        tracing::info!(error = %e, retry_in = ?self.backoff, "connection failed; reconnecting");
        let delay = self.backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        Ok(delay)
    }
}

/// Connects, retrying transient failures (a busy or restarting daemon) as [`Retry`] allows.
async fn connect_retrying(target: &Target, opts: &Options) -> Result<Session, ClientError> {
    let mut retry = Retry::new(opts.retry_deadline);
    loop {
        match Session::connect(target, &opts.connector).await {
            Ok(session) => return Ok(session),
            Err(e) if !e.is_transient_connect() => return Err(e),
            Err(e) => tokio::time::sleep(retry.after(e)?).await,
        }
    }
}

async fn worker<D: Direction>(
    target: &Target,
    dir: &D,
    work: &Work,
    mut session: Option<(Session, u64)>,
    opts: &Options,
) -> Result<Option<(Session, u64)>, ClientError> {
    let mut retry = Retry::new(opts.retry_deadline);
    loop {
        if session.is_none() && work.is_empty() {
            return Ok(None);
        }
        let mut connected = false;
        let attempt = async {
            let (mut s, id) = match session.take() {
                Some(open) => open,
                None => {
                    let connect = async {
                        let mut s = Session::connect(target, &opts.connector).await?;
                        let id = dir.open(&mut s).await?;
                        Ok::<_, ClientError>((s, id))
                    };
                    // Other connections may finish the file while this one waits for a slot
                    // on a busy daemon; it must not hold the transfer up, nor its slot.
                    tokio::select! {
                        open = connect => open?,
                        () = work.finished() => return Ok(None),
                    }
                }
            };
            connected = true;
            match dir.pump(&mut s, id, work).await {
                Ok(()) => Ok(Some((s, id))),
                Err(e) => Err(e),
            }
        };
        let outcome = attempt.await;
        if connected {
            retry.succeeded();
        }
        match outcome {
            Ok(open) => return Ok(open),
            Err(e) => {
                let delay = retry.after(e)?;
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = work.finished() => return Ok(None),
                }
            }
        }
    }
}

fn make_summary(
    name: &str,
    size: u64,
    resumed: u64,
    work: &Work,
    started: Instant,
    connections: usize,
    congestion: Option<String>,
) -> Summary {
    let seconds = started.elapsed().as_secs_f64();
    let bytes_transferred = work.transferred.load(Ordering::Relaxed);
    Summary {
        name: name.to_string(),
        bytes_total: size,
        bytes_transferred,
        resumed_bytes: resumed,
        seconds,
        connections,
        mbytes_per_sec: bytes_transferred as f64 / seconds.max(1e-9) / (1024.0 * 1024.0),
        crc_retries: work.crc_retries.load(Ordering::Relaxed),
        congestion,
    }
}

async fn close_all(sessions: Vec<(Session, u64)>) {
    for (s, _) in sessions {
        s.close().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Upload

struct Upload {
    source: SourceFile,
    request: OpenWrite,
}

impl Upload {
    async fn open_with_held(
        &self,
        session: &mut Session,
    ) -> Result<(u64, Vec<ByteRange>), ClientError> {
        session
            .send(&Frame::OpenWrite(self.request.clone()))
            .await?;
        match session.next().await? {
            Frame::WriteOpened(w) => Ok((w.transfer_id, w.held)),
            other => Err(unexpected(other)),
        }
    }
}

impl Direction for Upload {
    async fn open(&self, session: &mut Session) -> Result<u64, ClientError> {
        Ok(self.open_with_held(session).await?.0)
    }

    async fn pump(
        &self,
        session: &mut Session,
        transfer_id: u64,
        work: &Work,
    ) -> Result<(), ClientError> {
        let window = window(session);
        let mut inflight: VecDeque<ByteRange> = VecDeque::with_capacity(window);
        let result = async {
            loop {
                while inflight.len() < window {
                    let Some(chunk) = work.pop() else { break };
                    inflight.push_back(chunk);
                    let payload = self.source.read(chunk).await?;
                    work.throttle(chunk.len()).await;
                    session
                        .send(&Frame::Data(Data::new(transfer_id, chunk.start, payload)))
                        .await?;
                    work.transferred.fetch_add(chunk.len(), Ordering::Relaxed);
                }
                if inflight.is_empty() {
                    return Ok(());
                }
                let (c, rejected) = match session.next().await? {
                    Frame::Ack(c) => (c, false),
                    Frame::Reject(c) => (c, true),
                    other => return Err(unexpected(other)),
                };
                let chunk = take_inflight(&mut inflight, c)?;
                if rejected {
                    work.crc_retries.fetch_add(1, Ordering::Relaxed);
                    work.requeue(std::iter::once(chunk));
                } else {
                    work.complete(chunk);
                }
            }
        }
        .await;
        if result.is_err() {
            work.requeue(inflight.drain(..));
        }
        result
    }
}

fn take_inflight(
    inflight: &mut VecDeque<ByteRange>,
    c: ChunkRef,
) -> Result<ByteRange, ClientError> {
    let want = ByteRange::new(c.offset, c.offset + u64::from(c.len));
    let pos = inflight
        .iter()
        .position(|r| *r == want)
        .ok_or(ClientError::Unexpected("Ack"))?;
    Ok(inflight.remove(pos).expect("position is in range"))
}

/// Uploads `path` to `target` as `name`.
///
/// # Errors
/// Local file errors, connection failures past the retry deadline, or the server's refusal.
pub async fn send(
    path: &Path,
    target: &Target,
    name: &str,
    opts: &Options,
) -> Result<Summary, ClientError> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => xfer_core::CoreError::NotFound(path.display().to_string()),
        _ => xfer_core::CoreError::io(format!("opening {}", path.display()), e),
    })?;
    send_file(
        SourceFile::new(file, path.display().to_string())?,
        target,
        name,
        opts,
    )
    .await
}

/// Uploads an open file to `target` as `name` (see [`send`]).
///
/// # Errors
/// As [`send`].
pub async fn send_file(
    source: SourceFile,
    target: &Target,
    name: &str,
    opts: &Options,
) -> Result<Summary, ClientError> {
    let started = Instant::now();
    let identity = source.identity();
    let mut session = connect_retrying(target, opts).await?;
    let congestion = session.congestion.clone();
    let chunk_size = opts
        .chunk_size
        .min(session.welcome.max_chunk_size)
        .max(xfer_proto::MIN_CHUNK_SIZE);
    let upload = Arc::new(Upload {
        request: OpenWrite {
            name: name.to_string(),
            identity,
            mode: source.mode(),
            chunk_size,
        },
        source,
    });
    let (mut id, mut held) = upload.open_with_held(&mut session).await?;
    let resumed = RangeSet::from_ranges(held.iter().copied()).total();
    opts.progress.set_length(identity.size);
    opts.progress.set_position(resumed);
    // The whole-file digest is read front to back beside the transfer, not after it.
    let digest = {
        let source = upload.source.clone();
        tokio::spawn(async move { source.digest().await })
    };
    let work = Arc::new(Work::new(Vec::new(), opts));
    let mut session = Some(session);
    // A commit can find bytes missing only if the daemon lost acknowledged chunks (it restarted
    // after a power loss); then the missing ranges are sent again, a bounded number of times.
    let mut digest = Some(digest);
    let mut digest_bytes = Vec::new();
    for _ in 0..3 {
        let missing = RangeSet::from_ranges(held.iter().copied()).missing(identity.size);
        work.add(split_into_chunks(&missing, chunk_size));
        let first = match session.take() {
            Some(s) => (s, id),
            None => {
                let mut s = Session::connect(target, &opts.connector).await?;
                let id = upload.open(&mut s).await?;
                (s, id)
            }
        };
        let mut sessions =
            drive(target, Arc::clone(&upload), Arc::clone(&work), first, opts).await?;
        let (mut s, sid) = match sessions.pop() {
            Some(open) => open,
            None => {
                let mut s = Session::connect(target, &opts.connector).await?;
                let id = upload.open(&mut s).await?;
                (s, id)
            }
        };
        close_all(sessions).await;
        if let Some(task) = digest.take() {
            let d = task
                .await
                .map_err(|e| ClientError::Local(join_error(e)))??;
            digest_bytes = d.to_vec();
        }
        upload.source.check_unchanged()?;
        let commit = Commit {
            transfer_id: sid,
            digest: digest_bytes.clone(),
        };
        let answer = match s.send(&Frame::Commit(commit)).await {
            Ok(()) => s.next().await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Frame::Committed(_)) => {
                s.close().await;
                opts.progress.finish_and_clear();
                return Ok(make_summary(
                    name,
                    identity.size,
                    resumed,
                    &work,
                    started,
                    opts.connections,
                    congestion,
                ));
            }
            Err(ClientError::Remote(e)) if e.error_code() == Some(ErrorCode::Incomplete) => {
                (id, held) = upload.open_with_held(&mut s).await?;
                session = Some(s);
            }
            // The connection died around the commit: whether or not it took effect, a new
            // connection finds out (a committed file is offered back as held) and commits again.
            Err(e) if e.is_transient() => {
                tracing::info!(error = %e, "connection lost during commit; asking again");
                let mut s = connect_retrying(target, opts).await?;
                (id, held) = upload.open_with_held(&mut s).await?;
                session = Some(s);
            }
            Ok(other) => return Err(unexpected(other)),
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Remote(xfer_proto::ErrorFrame::new(
        ErrorCode::Incomplete,
        "server kept losing data",
    )))
}

// ---------------------------------------------------------------------------------------------
// Download

struct Download {
    name: String,
    identity: FileIdentity,
    partial: Arc<PartialFile>,
    max_chunk: u32,
}

async fn open_read(
    session: &mut Session,
    request: &OpenRead,
) -> Result<(u64, FileIdentity, u32), ClientError> {
    session.send(&Frame::OpenRead(request.clone())).await?;
    match session.next().await? {
        Frame::ReadOpened(r) => Ok((r.transfer_id, r.identity, r.mode)),
        other => Err(unexpected(other)),
    }
}

impl Direction for Download {
    async fn open(&self, session: &mut Session) -> Result<u64, ClientError> {
        let request = OpenRead {
            name: self.name.clone(),
            have_identity: None,
            have: vec![],
        };
        let (id, identity, _) = open_read(session, &request).await?;
        if identity != self.identity {
            return Err(ClientError::Changed(self.name.clone()));
        }
        Ok(id)
    }

    async fn pump(
        &self,
        session: &mut Session,
        transfer_id: u64,
        work: &Work,
    ) -> Result<(), ClientError> {
        let window = window(session);
        let max = session.welcome.max_chunk_size.min(self.max_chunk);
        let mut inflight: VecDeque<ByteRange> = VecDeque::with_capacity(window);
        let result = async {
            loop {
                while inflight.len() < window {
                    let Some(chunk) = work.pop() else { break };
                    if chunk.len() > u64::from(max) {
                        // The server serves smaller chunks than planned: split this one.
                        work.requeue(split_into_chunks(&[chunk], max).into_iter());
                        continue;
                    }
                    inflight.push_back(chunk);
                    work.throttle(chunk.len()).await;
                    let req = ChunkRef {
                        transfer_id,
                        offset: chunk.start,
                        len: chunk.len() as u32,
                    };
                    session.send(&Frame::ReadChunk(req)).await?;
                }
                let Some(&want) = inflight.front() else {
                    return Ok(());
                };
                let data = match session.next().await? {
                    Frame::Data(d) => d,
                    other => return Err(unexpected(other)),
                };
                if data.transfer_id != transfer_id || data.range() != want {
                    return Err(ClientError::Unexpected("Data"));
                }
                inflight.pop_front();
                work.transferred.fetch_add(want.len(), Ordering::Relaxed);
                if data.verify().is_err() {
                    work.crc_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(offset = want.start, "chunk failed its CRC; asking again");
                    work.requeue(std::iter::once(want));
                    continue;
                }
                if let Err(e) = self
                    .partial
                    .write(data.offset, data.payload, data.crc32)
                    .await
                {
                    inflight.push_front(want);
                    return Err(e.into());
                }
                work.complete(want);
            }
        }
        .await;
        if result.is_err() {
            work.requeue(inflight.drain(..));
        }
        result
    }
}

/// Downloads `name` from `target` into `dest` (a file path), through a partial file beside it.
///
/// # Errors
/// Local file errors, connection failures past the retry deadline, or the server's refusal.
pub async fn recv(
    target: &Target,
    name: &str,
    dest: &Path,
    opts: &Options,
) -> Result<Summary, ClientError> {
    let started = Instant::now();
    let slot = local_slot(dest)?;
    let journal_path = dest.with_file_name(xfer_core::journal_name(&slot.leaf));
    let have = read_local_journal(&journal_path);
    let mut session = connect_retrying(target, opts).await?;
    let congestion = session.congestion.clone();
    let request = OpenRead {
        name: name.to_string(),
        have_identity: have.as_ref().map(|c| c.identity),
        have: have
            .as_ref()
            .map(|c| c.chunks.iter().map(|(r, _)| *r).collect())
            .unwrap_or_default(),
    };
    let (id, identity, mode) = open_read(&mut session, &request).await?;
    let partial = PartialFile::open(slot, identity).await?;
    let resumed = partial.resumed_bytes();
    let chunk_size = opts
        .chunk_size
        .min(session.welcome.max_chunk_size)
        .max(xfer_proto::MIN_CHUNK_SIZE);
    let missing = RangeSet::from_ranges(partial.held()).missing(identity.size);
    opts.progress.set_length(identity.size);
    opts.progress.set_position(resumed);
    let work = Arc::new(Work::new(split_into_chunks(&missing, chunk_size), opts));
    let download = Arc::new(Download {
        name: name.to_string(),
        identity,
        partial: Arc::clone(&partial),
        max_chunk: chunk_size,
    });
    let digest = tokio::spawn(remote_digest(
        target.clone(),
        opts.connector.clone(),
        name.to_string(),
        identity,
    ));
    let mut sessions = drive(
        target,
        Arc::clone(&download),
        Arc::clone(&work),
        (session, id),
        opts,
    )
    .await?;
    // The extra connection's answer, if it has one by now; otherwise (it is still waiting for a
    // stream slot on a busy daemon, or failed on the way) ask on a data connection, now free.
    let early = if digest.is_finished() {
        match digest
            .await
            .map_err(|e| ClientError::Local(join_error(e)))?
        {
            Ok(digest) => Some(digest),
            Err(e) if e.is_transient() => None,
            Err(e) => return Err(e),
        }
    } else {
        digest.abort();
        None
    };
    let digest = match early {
        Some(digest) => digest,
        None => {
            let (mut s, id) = match sessions.pop() {
                Some(open) => open,
                None => {
                    let mut s = Session::connect(target, &opts.connector).await?;
                    let id = download.open(&mut s).await?;
                    (s, id)
                }
            };
            let digest = digest_over(&mut s, id).await;
            s.close().await;
            digest?
        }
    };
    match partial.commit(mode, identity.mtime_ns, Some(digest)).await {
        Ok(_) => close_all(sessions).await,
        // The local file had the server's size and mtime but other bytes: fetch it all now.
        Err(xfer_core::CoreError::Incomplete { .. }) => {
            let missing = RangeSet::from_ranges(partial.held()).missing(identity.size);
            opts.progress.set_position(0);
            work.add(split_into_chunks(&missing, chunk_size));
            let first = match sessions.pop() {
                Some(open) => open,
                None => {
                    let mut s = connect_retrying(target, opts).await?;
                    let id = download.open(&mut s).await?;
                    (s, id)
                }
            };
            close_all(sessions).await;
            let again = drive(
                target,
                Arc::clone(&download),
                Arc::clone(&work),
                first,
                opts,
            )
            .await?;
            close_all(again).await;
            partial
                .commit(mode, identity.mtime_ns, Some(digest))
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    opts.progress.finish_and_clear();
    Ok(make_summary(
        name,
        identity.size,
        resumed,
        &work,
        started,
        opts.connections,
        congestion,
    ))
}

fn join_error(e: tokio::task::JoinError) -> xfer_core::CoreError {
    xfer_core::CoreError::io("digest task", std::io::Error::other(e.to_string()))
}

/// Asks the server for the whole-file digest of `name` on a connection of its own, so the
/// server reads the file beside the data connections rather than after them.
async fn remote_digest(
    target: Target,
    connector: Connector,
    name: String,
    identity: FileIdentity,
) -> Result<xfer_core::digest::Digest, ClientError> {
    let mut session = Session::connect(&target, &connector).await?;
    let request = OpenRead {
        name: name.clone(),
        have_identity: None,
        have: vec![],
    };
    let (id, now, _) = open_read(&mut session, &request).await?;
    if now != identity {
        return Err(ClientError::Changed(name));
    }
    let digest = digest_over(&mut session, id).await;
    session.close().await;
    digest
}

/// Asks for the digest of download `id` open on `session`.
async fn digest_over(
    session: &mut Session,
    id: u64,
) -> Result<xfer_core::digest::Digest, ClientError> {
    session
        .send(&Frame::DigestRequest(Commit {
            transfer_id: id,
            digest: vec![],
        }))
        .await?;
    match session.next().await? {
        Frame::DigestReply(c) if c.transfer_id == id => c
            .digest
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Unexpected("DigestReply")),
        other => Err(unexpected(other)),
    }
}

fn read_local_journal(path: &Path) -> Option<xfer_core::journal::Contents> {
    let mut f = std::fs::File::open(path).ok()?;
    xfer_core::journal::read(&mut f).ok().flatten()
}

fn local_slot(dest: &Path) -> Result<Slot, ClientError> {
    let leaf = dest
        .file_name()
        .and_then(|l| l.to_str())
        .ok_or_else(|| ClientError::Target(format!("bad output path {}", dest.display())))?;
    if xfer_core::is_reserved_name(leaf) {
        return Err(xfer_core::CoreError::BadPath(format!("reserved output name {leaf:?}")).into());
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::File::open(parent).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            xfer_core::CoreError::NotFound(format!("output directory {}", parent.display()))
        }
        _ => xfer_core::CoreError::io(format!("opening {}", parent.display()), e),
    })?;
    Ok(Slot {
        dir: Arc::new(dir),
        leaf: leaf.to_string(),
    })
}
