//! A tree's light files sent as deltas over the tree's connections already open
//! (`CAP_DELTA_PUT`): each file costs two round trips, all of them at once. The first flight
//! opens a file's upload with its whole signature (`DeltaPut`); the second, once the answer says
//! what the daemon copied from the file it holds, carries the literal data and the commit. The
//! literal data keeps within the daemon's window (`Welcome.window` unanswered `Data` per
//! connection, counted by size with `CAP_BYTE_WINDOW`), while the next files' `DeltaPut`s,
//! which it does not count, go on. A file
//! this cannot carry (refused, a digest that did not match, a connection lost) is left to the
//! chunked engine, which resumes it or sends it whole.

use std::collections::VecDeque;
use std::sync::Mutex;

use foldhash::HashSet;
use futures_util::stream::{self, StreamExt};
use tokio::sync::{mpsc, watch, Semaphore};
use xfer_core::delta;
use xfer_core::{CoreError, RangeSet, Root, SourceFile};
use xfer_proto::{
    fine_block_count, AwaitCommits, ByteRange, ChunkRef, Commit, Data, DeltaCopy, DeltaPut,
    ErrorCode, ErrorFrame, FineCopy, Frame, OpenWrite, MAX_AWAITED, MAX_DELTA_CHUNKS,
    MAX_FINE_COPIES,
};

use crate::session::unexpected;
use crate::{ClientError, Session};

/// Light files a connection keeps open at once: every one is an upload open on the daemon
/// until its commit is answered (64 at most per connection by default); 16 on each of a long
/// path's 8 connections carry a tree's changes in one wave.
const OPEN_AT_ONCE: usize = 16;
/// Files whose signature and digest are read ahead of their `DeltaPut`, per connection.
const PREPARED_AHEAD: usize = 2;

/// Light files read for their `DeltaPut` at once, by all connections: one per core. Reading and
/// hashing is bound by the CPU, so sharing the cores among every connection's files (16 at once
/// on a long path's 8) would only finish all of them late together; in turn, the first
/// `DeltaPut`s leave after one file's work, and the daemon starts on them while the rest are read.
static PREPARING: std::sync::LazyLock<Semaphore> =
    std::sync::LazyLock::new(|| Semaphore::new(xfer_core::cores()));

/// A light file to send, and the size of the file the receiver holds under its name.
#[derive(Debug, Clone)]
pub(crate) struct Light {
    /// Path below the local top.
    pub path: String,
    /// Size of the receiver's file, which the average chunk is chosen from as the daemon would.
    pub basis_size: u64,
}

/// What the light files of one connection came to.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    /// Paths committed.
    pub committed: HashSet<String>,
    /// Paths to send again whole: their delta's digest did not match.
    pub whole: HashSet<String>,
    /// Committed files that went as deltas.
    pub delta_files: u64,
    /// Bytes the daemon copied from the files it held.
    pub matched: u64,
    /// Bytes sent as data.
    pub literal: u64,
}

/// Where the light files go and how.
pub(crate) struct Job<'a> {
    pub local: &'a Root,
    /// The tree's top on the server.
    pub dest: &'a str,
    /// Chunk size asked for (within the daemon's limit on each connection).
    pub chunk_size: u32,
    /// Why a delta, as `-v` says it.
    pub why: &'a str,
    /// `--bwlimit`, shared with the rest of the tree: the literal data waits for it.
    pub limiter: Option<&'a crate::RateLimiter>,
    /// Told each committed file's literal bytes.
    pub done: &'a (dyn Fn(u64) + Sync),
    /// Files read ahead of the receiver's listing.
    pub ahead: &'a Ahead,
}

/// A tree's closing sent with its last commits (`CAP_TREE_CLOSE`): once every connection
/// wrote its last `Commit`, the control connection sends `AwaitCommits` naming the commits
/// still unanswered, then the closing (`SetMeta`s, `Sync`), which the daemon carries out once
/// those commits were: the closing's round trip overlaps the commits' own.
pub(crate) struct Close {
    /// The closing's requests, each answered by one frame.
    frames: Vec<Frame>,
    /// Connections whose writers are still sending light files.
    writing: watch::Sender<usize>,
    /// Names whose `Commit` went and is not answered yet.
    unanswered: Mutex<HashSet<String>>,
    /// The answers to `AwaitCommits` and the closing, once all were read.
    answers: Mutex<Option<Vec<Frame>>>,
}

impl Close {
    /// A closing of `frames`, sent once the writers of the connections [`Self::start`]
    /// counts are done.
    pub(crate) fn new(frames: Vec<Frame>) -> Self {
        Self {
            frames,
            writing: watch::Sender::new(0),
            unanswered: Mutex::default(),
            answers: Mutex::default(),
        }
    }

    /// Counts the `connections` about to send light files, each with this closing.
    pub(crate) fn start(&self, connections: usize) {
        self.writing.send_replace(connections);
    }

    /// The answers to `AwaitCommits` and each closing request, in order, when they were
    /// sent and all read.
    pub(crate) fn answers(self) -> Option<Vec<Frame>> {
        self.answers.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    fn unanswered(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.unanswered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection's writer still sending, until dropped (done or failed).
struct Writing<'a>(Option<&'a Close>);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if let Some(close) = self.0 {
            close.writing.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

/// A light file read for its `DeltaPut`: the request, the digest its commit carries, and the
/// file to read literal data from.
struct Prepared {
    path: String,
    source: SourceFile,
    put: DeltaPut,
    digest: Vec<u8>,
    /// How it was signed and digested: a file read ahead is sent only where this holds.
    signed: Signed,
}

/// How a light file is signed for its `DeltaPut` and digested for its commit: what the sizes
/// of both sides and the daemon's capabilities choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signed {
    avg: u32,
    /// In fixed blocks on the file's grid (see [`signed_in_blocks`]), else cut by content.
    blocks: bool,
    kind: xfer_core::digest::DigestKind,
}

impl Signed {
    /// For a file of `size` bytes against a basis of `basis_size`, with `fine`
    /// (`CAP_DELTA_FINE`), digested as `kind`.
    fn of(size: u64, basis_size: u64, kind: xfer_core::digest::DigestKind, fine: bool) -> Self {
        let mut avg = delta::avg_chunk(size.max(basis_size));
        if fine {
            // Blocks found within the chunks missed make up for coarser ones: a signature a
            // quarter as long, in a fresh connection's first window.
            avg = avg.max(xfer_core::fine::LIGHT_AVG_CHUNK);
        }
        Self {
            avg,
            blocks: signed_in_blocks(size, basis_size, fine),
            kind,
        }
    }
}

/// Light files at most read ahead of the receiver's listing, each holding a descriptor open.
const AHEAD_FILES: usize = 64;
/// Bytes at most read ahead of the receiver's listing.
const AHEAD_BYTES: u64 = 256 << 20;

/// Light files read for their `DeltaPut`s while the receiver's listing is on its way
/// ([`read_ahead`]), by path: [`prepare`] takes one where the guess it was read on held.
#[derive(Default)]
pub(crate) struct Ahead(Mutex<foldhash::HashMap<String, Prepared>>);

impl Ahead {
    fn files(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<String, Prepared>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file at `path` read ahead, if it was signed as `signed` says it must be now.
    fn take(&self, path: &str, signed: impl FnOnce(u64) -> Signed) -> Option<Prepared> {
        let file = self.files().remove(path)?;
        (file.signed == signed(file.put.open.identity.size)).then_some(file)
    }
}

/// Reads the light files a tree may send, `candidates` (paths and sizes, in the order to read
/// them), for their `DeltaPut`s into `ahead` until `listed` is cancelled, on the cores the
/// listing's round trips leave idle. Which of them the receiver holds, and at what size, is not
/// known yet: each is read as if it kept its size there (changed in place, the likeliest), for a
/// daemon of this version; where either guess fails, [`prepare`] reads it again. The files
/// being read when the listing comes are finished, so none is read twice at once.
pub(crate) async fn read_ahead(
    local: &Root,
    dest: &str,
    candidates: Vec<(String, u64)>,
    ahead: &Ahead,
    listed: &tokio_util::sync::CancellationToken,
) {
    let started = std::time::Instant::now();
    let mut reading = tokio::task::JoinSet::new();
    let mut left = AHEAD_BYTES;
    for (path, size) in candidates.into_iter().take(AHEAD_FILES) {
        let Some(after) = left.checked_sub(size) else {
            break;
        };
        left = after;
        let permit = tokio::select! {
            biased;
            () = listed.cancelled() => break,
            permit = PREPARING.acquire() => permit,
        };
        let (local, name) = (local.clone(), crate::tree::join(dest, &path));
        let kind = xfer_core::digest::DigestKind::Blocks;
        reading.spawn_blocking(move || {
            let _permit = permit;
            read_light(
                &local,
                path,
                name,
                |size| Signed::of(size, size, kind, true),
                0,
                true,
            )
        });
    }
    let mut read = 0;
    while let Some(done) = reading.join_next().await {
        match done {
            Ok(Ok(Some(file))) => {
                read += 1;
                ahead.files().insert(file.path.clone(), file);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "a light file not read ahead"),
            Err(e) => tracing::debug!(error = %e, "a light file not read ahead"),
        }
    }
    tracing::debug!(files = read, elapsed = ?started.elapsed(), "light files read ahead of the listing");
}

/// One frame written and the answer it waits for, in order.
enum Expect {
    Put(Box<Prepared>),
    Data(ChunkRef),
    Commit(Box<Prepared>, u64, Literal),
    /// The tree's closing: `AwaitCommits` and as many requests after it.
    Close(usize),
}

/// A file answered, with the chunks of its literal data not sent yet.
struct Second {
    file: Box<Prepared>,
    id: u64,
    literal: Literal,
    chunks: VecDeque<ByteRange>,
}

/// What the answer to a `DeltaPut` leaves to send.
struct Literal {
    ranges: Vec<ByteRange>,
    /// Runs of the basis to copy (`CAP_DELTA_FINE`), sent before the data.
    copies: Vec<FineCopy>,
    /// The daemon held a file to copy from.
    delta: bool,
    matched: u64,
}

/// What the reader hands back to the writer for each `DeltaPut` answered.
enum Next {
    /// Send these ranges of the upload, then commit it.
    Second(Box<Prepared>, u64, Literal),
    /// Nothing more to send for this file.
    Settled,
    /// Send its `DeltaPut` again when there is room.
    Again(Box<Prepared>),
}

/// Sends `files` over `session` as described in the module's documentation; what was
/// committed is recorded in `sent` as it is answered, so that after an error (also returned)
/// the caller knows what is left. With `close`, the tree's closing waits for this connection's
/// last `Commit` to be written, and with `closes` too, it goes on this connection once every
/// connection's did (see [`Close`]).
pub(crate) async fn send_over(
    session: &mut Session,
    files: Vec<Light>,
    job: &Job<'_>,
    sent: &Mutex<Sent>,
    (close, closes): (Option<&Close>, bool),
) -> Result<(), ClientError> {
    let count = files.len();
    let chunk_size = job
        .chunk_size
        .min(session.welcome.max_chunk_size)
        .max(xfer_proto::MIN_CHUNK_SIZE);
    let sparse_aware = session.welcome.capabilities & xfer_proto::CAP_TREE_META != 0;
    let kind = xfer_core::digest::DigestKind::of_capabilities(session.welcome.capabilities);
    let fine = session.welcome.capabilities & xfer_proto::CAP_DELTA_FINE != 0;
    let mut prepared = stream::iter(files)
        .map(|light| prepare(job, light, chunk_size, sparse_aware, kind, fine))
        .buffered(PREPARED_AHEAD);
    let room = Semaphore::new(OPEN_AT_ONCE);
    // `Data` unanswered on this connection, within the daemon's window (proto.md §5.11): the
    // permits of each frame sent, given back by its `Ack` or `Reject`.
    let window = DataWindow::of(&session.welcome);
    let permits = Semaphore::new(window.capacity());
    // One entry per file in flight at most: the reader never waits on it.
    let (next_tx, mut next_rx) = mpsc::channel::<Next>(OPEN_AT_ONCE);
    // Bounds what is written ahead of the answers read; the reader never waits on the writer.
    let (expect_tx, mut expect_rx) = mpsc::channel::<Expect>(4096);
    let Session { reader, writer, .. } = session;
    let write = async {
        let writing = Writing(close);
        let (mut put, mut settled) = (0, 0);
        let mut files_left = true;
        // Files answered whose literal data and commit are still to go, oldest first (at most
        // one per file open): their data waits for room in the window, while the next files'
        // `DeltaPut`s, which the window does not count, go on.
        let mut sending: VecDeque<Second> = VecDeque::new();
        // Files the daemon had no room for, to open again (at most one per file open).
        let mut again: VecDeque<Box<Prepared>> = VecDeque::new();
        loop {
            // A file whose data has all gone is committed at once.
            while sending.front().is_some_and(|s| s.chunks.is_empty()) {
                let Some(Second {
                    file, id, literal, ..
                }) = sending.pop_front()
                else {
                    break;
                };
                // A file changed since it was read goes through the engine, which says so. Its
                // upload stays open on the daemon and keeps its room, so no more files are
                // opened here: the room left might be none.
                if let Err(e) = file.source.check_unchanged() {
                    tracing::debug!(file = %file.path, error = %e, "changed while sent");
                    files_left = false;
                    again.clear();
                    continue;
                }
                let commit = Commit {
                    transfer_id: id,
                    digest: file.digest.clone(),
                };
                if let Some(close) = close {
                    close.unanswered().insert(file.put.open.name.clone());
                }
                let _ = expect_tx.send(Expect::Commit(file, id, literal)).await;
                writer.send(&Frame::Commit(commit)).await?;
            }
            if !files_left && again.is_empty() && settled == put && sending.is_empty() {
                break;
            }
            let next_cost = sending
                .front()
                .and_then(|s| s.chunks.front())
                .map_or(1, |chunk| window.cost(chunk.len()));
            tokio::select! {
                biased;
                next = next_rx.recv() => {
                    let Some(next) = next else { break };
                    settled += 1;
                    let (file, id, mut literal) = match next {
                        Next::Second(file, id, literal) => (file, id, literal),
                        Next::Settled => continue,
                        Next::Again(file) => {
                            again.push_back(file);
                            continue;
                        }
                    };
                    for copies in std::mem::take(&mut literal.copies).chunks(MAX_FINE_COPIES) {
                        let copy = DeltaCopy { transfer_id: id, copies: copies.to_vec() };
                        writer.send(&Frame::DeltaCopy(copy)).await?;
                    }
                    let chunks = xfer_core::split_into_chunks(&literal.ranges, chunk_size).into();
                    sending.push_back(Second { file, id, literal, chunks });
                }
                permit = permits.acquire_many(next_cost), if !sending.is_empty() => {
                    permit.map_err(|_| ClientError::Closed)?.forget();
                    let Some(second) = sending.front_mut() else { continue };
                    let Some(chunk) = second.chunks.pop_front() else { continue };
                    if let Some(limiter) = job.limiter {
                        limiter.acquire(chunk.len()).await;
                    }
                    let payload = second.file.source.read(chunk).await?;
                    let sent_ref = ChunkRef {
                        transfer_id: second.id,
                        offset: chunk.start,
                        len: chunk.len() as u32,
                    };
                    let _ = expect_tx.send(Expect::Data(sent_ref)).await;
                    writer.send(&Frame::Data(Data::new(second.id, chunk.start, payload))).await?;
                }
                permit = room.acquire(), if files_left || !again.is_empty() => {
                    permit.map_err(|_| ClientError::Closed)?.forget();
                    if let Some(file) = again.pop_front() {
                        let frame = Frame::DeltaPut(file.put.clone());
                        let _ = expect_tx.send(Expect::Put(file)).await;
                        writer.send(&frame).await?;
                        put += 1;
                        continue;
                    }
                    match prepared.next().await {
                        None => files_left = false,
                        Some(Ok(Some(file))) => {
                            let frame = Frame::DeltaPut(file.put.clone());
                            let _ = expect_tx.send(Expect::Put(Box::new(file))).await;
                            writer.send(&frame).await?;
                            put += 1;
                        }
                        // Left to the engine, which reads it again (and reports what failed).
                        Some(Ok(None)) => room.add_permits(1),
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "a light file goes through the engine");
                            room.add_permits(1);
                        }
                    }
                }
            }
        }
        drop(writing);
        if let Some(close) = close.filter(|_| closes) {
            let mut writing = close.writing.subscribe();
            // Every connection's commits are written: those still unanswered are the ones the
            // daemon may not have carried out yet.
            if writing.wait_for(|n| *n == 0).await.is_ok() {
                let names: Vec<String> = close.unanswered().iter().cloned().collect();
                if names.len() <= MAX_AWAITED {
                    tracing::debug!(awaited = names.len(), "closing sent with the last commits");
                    let mut frames = vec![Frame::AwaitCommits(AwaitCommits { names })];
                    frames.extend(close.frames.iter().cloned());
                    let _ = expect_tx.send(Expect::Close(frames.len())).await;
                    writer.send_all(&frames).await?;
                }
            }
        }
        drop(expect_tx);
        Ok::<_, ClientError>(())
    };
    let read = async {
        let mut opens = Opens::new(&room);
        while let Some(expect) = expect_rx.recv().await {
            match expect {
                Expect::Put(file) => {
                    let next = match opened(reader, file, fine).await? {
                        Opened::Open(file, id, literal) => {
                            opens.open += 1;
                            Next::Second(file, id, literal)
                        }
                        Opened::Refused => {
                            opens.give_back();
                            Next::Settled
                        }
                        Opened::Full(file) => match opens.full() {
                            true => Next::Again(file),
                            false => Next::Settled,
                        },
                    };
                    let _ = next_tx.send(next).await;
                }
                Expect::Data(chunk) => match read_answer(reader).await? {
                    Frame::Ack(a) if a == chunk => {
                        permits.add_permits(window.cost(u64::from(chunk.len)) as usize);
                    }
                    // The commit fails short of it, and the engine sends the file again.
                    Frame::Reject(r) if r == chunk => {
                        permits.add_permits(window.cost(u64::from(chunk.len)) as usize);
                    }
                    other => return Err(unexpected(other)),
                },
                Expect::Close(count) => {
                    let mut answers = Vec::with_capacity(count);
                    for _ in 0..count {
                        answers.push(read_answer(reader).await?);
                    }
                    if let Some(close) = close {
                        *close.answers.lock().unwrap_or_else(|p| p.into_inner()) = Some(answers);
                    }
                }
                Expect::Commit(file, id, literal) => match answered(reader, close, &file).await? {
                    Frame::Committed(c) if c.transfer_id == id => {
                        opens.closed();
                        let bytes: u64 = literal.ranges.iter().map(ByteRange::len).sum();
                        let reason = match literal.delta {
                            true => format!("delta transfer: {}", job.why),
                            false => format!(
                                "whole file: the daemon holds no file under the name to start from ({})",
                                job.why
                            ),
                        };
                        tracing::info!(file = %file.put.open.name, matched_bytes = literal.matched, literal = bytes, "{reason}");
                        let mut sent = sent.lock().unwrap_or_else(|p| p.into_inner());
                        sent.committed.insert(file.path);
                        sent.delta_files += u64::from(literal.delta);
                        sent.matched += literal.matched;
                        sent.literal += bytes;
                        drop(sent);
                        (job.done)(bytes);
                    }
                    Frame::Error(e) if e.error_code().is_some_and(ErrorCode::is_request_level) => {
                        tracing::warn!(file = %file.put.open.name, error = %e, "the delta's commit failed; the file goes through the engine");
                        // A digest that did not match closed the upload; one short of data
                        // keeps it open, and its room with it.
                        if e.error_code() == Some(ErrorCode::Corrupt) {
                            opens.closed();
                            let mut sent = sent.lock().unwrap_or_else(|p| p.into_inner());
                            sent.whole.insert(file.path);
                        }
                    }
                    other => return Err(unexpected(other)),
                },
            }
        }
        Ok(())
    };
    tokio::try_join!(write, read)?;
    let committed = sent
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .committed
        .len();
    tracing::debug!(
        files = count,
        committed,
        "light files sent over a connection"
    );
    Ok(())
}

/// The daemon's window (proto.md §5.11) as the light files' `Data` count against it: a
/// permit per frame, or with `CAP_BYTE_WINDOW` the frame's slots, so that the few KiB of a
/// file's literal data go at once instead of waiting for `Ack`s behind a count sized for whole
/// chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DataWindow {
    /// `Welcome.window`, within 1 and 64.
    frames: u32,
    /// `Welcome.max_chunk_size` when the window counts slots (`CAP_BYTE_WINDOW`).
    slots_of: Option<u32>,
}

impl DataWindow {
    fn of(welcome: &xfer_proto::Welcome) -> Self {
        let by_size = welcome.capabilities & xfer_proto::CAP_BYTE_WINDOW != 0;
        Self {
            frames: welcome.window.clamp(1, 64),
            slots_of: by_size.then_some(welcome.max_chunk_size),
        }
    }

    /// Permits the whole window holds.
    fn capacity(self) -> usize {
        match self.slots_of {
            Some(_) => (self.frames * xfer_proto::WINDOW_SLOTS) as usize,
            None => self.frames as usize,
        }
    }

    /// Permits a `Data` frame of `len` bytes takes until it is answered.
    fn cost(self, len: u64) -> u32 {
        match self.slots_of {
            Some(max_chunk) => xfer_proto::window_slots(len, max_chunk),
            None => 1,
        }
    }
}

/// The uploads a connection has open, and its room for more (`room`, a permit per file from
/// its `DeltaPut` until its upload is closed), cut to the daemon's limit once it says it has no
/// more room. The reader's, which sees every answer in order.
struct Opens<'a> {
    room: &'a Semaphore,
    /// Uploads open on the daemon, as its answers read so far left them.
    open: usize,
    /// Permits `room` holds in all.
    size: usize,
    /// Permits still to take out of `room` as they come back.
    debt: usize,
}

impl<'a> Opens<'a> {
    fn new(room: &'a Semaphore) -> Self {
        Self {
            room,
            open: 0,
            size: OPEN_AT_ONCE,
            debt: 0,
        }
    }

    /// A permit comes back, unless it pays for a cut room.
    fn give_back(&mut self) {
        match self.debt {
            0 => self.room.add_permits(1),
            _ => self.debt -= 1,
        }
    }

    /// An upload was closed (committed, or failed its digest).
    fn closed(&mut self) {
        self.open = self.open.saturating_sub(1);
        self.give_back();
    }

    /// The daemon had no room for a `DeltaPut`: it holds exactly the uploads open now, its
    /// limit, and the room is cut to that. Whether to send the file again once an upload is
    /// closed (not when none is open here: the room would never come).
    fn full(&mut self) -> bool {
        let limit = self.open;
        if limit > 0 && limit < self.size {
            let cut = self.size - limit;
            self.size = limit;
            self.debt += cut - self.room.forget_permits(cut);
        }
        self.give_back();
        limit > 0
    }
}

/// The answer to `file`'s `Commit`: whatever it says, the daemon carried the commit out, and
/// the closing need not wait for it.
async fn answered(
    reader: &mut crate::session::Reader,
    close: Option<&Close>,
    file: &Prepared,
) -> Result<Frame, ClientError> {
    let answer = read_answer(reader).await?;
    if let Some(close) = close {
        close.unanswered().remove(&file.put.open.name);
    }
    Ok(answer)
}

/// The next frame on `reader`, an `Error` as it came.
async fn read_answer(reader: &mut crate::session::Reader) -> Result<Frame, ClientError> {
    reader.read_frame().await?.ok_or(ClientError::Closed)
}

/// What the answer to a `DeltaPut` opened.
enum Opened {
    /// The upload, and what is left to send of it.
    Open(Box<Prepared>, u64, Literal),
    /// Nothing: the engine tries again and reports why.
    Refused,
    /// Nothing, as the connection has as many transfers open as the daemon allows.
    Full(Box<Prepared>),
}

/// Reads the answer to `file`'s `DeltaPut`, and with `fine` (`CAP_DELTA_FINE`) the blocks of
/// the basis around the spans it left, which it looks for there.
async fn opened(
    reader: &mut crate::session::Reader,
    file: Box<Prepared>,
    fine: bool,
) -> Result<Opened, ClientError> {
    let request_level = |e: &ErrorFrame| e.error_code().is_some_and(ErrorCode::is_request_level);
    let opened = match read_answer(reader).await? {
        Frame::WriteOpened(w) => w,
        Frame::Error(e) if request_level(&e) => {
            tracing::debug!(file = %file.put.open.name, error = %e, "light file refused");
            return Ok(Opened::Refused);
        }
        Frame::Error(e) if e.error_code() == Some(ErrorCode::Busy) => {
            tracing::debug!(file = %file.put.open.name, error = %e, "light file refused");
            return Ok(Opened::Full(file));
        }
        other => return Err(unexpected(other)),
    };
    let size = file.put.open.identity.size;
    let mut have = RangeSet::from_ranges(opened.held.iter().copied());
    let (delta, mut matched) = match read_answer(reader).await? {
        Frame::DeltaMatch(m) if m.transfer_id == opened.transfer_id && m.offset == 0 => {
            let mut end = 0;
            for range in &m.matched {
                if range.is_empty() || range.start < end || range.end > size {
                    return Err(ClientError::Unexpected(
                        "DeltaMatch with ranges out of order",
                    ));
                }
                end = range.end;
                have.insert(*range);
            }
            (true, m.matched.iter().map(ByteRange::len).sum())
        }
        // No file under the name to start from: the whole file follows.
        Frame::Error(e) if request_level(&e) => (false, 0),
        other => return Err(unexpected(other)),
    };
    let mut copies = Vec::new();
    if delta && fine {
        let blocks = match read_answer(reader).await? {
            Frame::DeltaBlocks(b) if b.transfer_id == opened.transfer_id => b,
            other => return Err(unexpected(other)),
        };
        blocks.check(size).map_err(ClientError::Unexpected)?;
        let mut sums = &blocks.sums[..];
        for gap in &blocks.gaps {
            let (mine, rest) = sums.split_at(fine_block_count(gap.old, blocks.block_len) as usize);
            sums = rest;
            // Bytes the match or the resume already supplied are not looked for again.
            if have.contains(gap.new) || mine.is_empty() {
                continue;
            }
            let bytes = file.source.read(gap.new).await?;
            for copy in xfer_core::fine::find_blocks(&bytes, gap, blocks.block_len, mine) {
                let range = ByteRange::new(copy.new, copy.new + u64::from(copy.len));
                matched += range.len();
                have.insert(range);
                copies.push(copy);
            }
        }
    }
    let literal = Literal {
        ranges: have.missing(size),
        copies,
        delta,
        matched,
    };
    Ok(Opened::Open(file, opened.transfer_id, literal))
}

/// Whether a light file of `size` bytes, against a basis of `basis_size`, is signed in fixed
/// blocks on its grid rather than cut by content: one that kept its size most likely changed in
/// place, where blocks find what a cut finds, hashed several times faster than a cut (the
/// sender's signatures of a tree's changes were most of its work). The daemon looks for each
/// where the previous match puts it, as for chunks; bytes that moved within the file, which a
/// block there misses, are found again by the finer blocks (`CAP_DELTA_FINE`) of the span
/// missed, so only with them.
fn signed_in_blocks(size: u64, basis_size: u64, fine: bool) -> bool {
    fine && size == basis_size
}

/// Reads `light` for its `DeltaPut` on the blocking pool (unless it was read ahead as it must
/// be now, see [`read_ahead`]): cut whole with the average chunk the daemon would choose (at
/// least `LIGHT_AVG_CHUNK` with `fine`, `CAP_DELTA_FINE`), or in blocks of that length (see
/// [`signed_in_blocks`]), and digested. `None` leaves the file to the engine: one that has holes
/// (where the daemon keeps them) or more chunks than one request carries.
async fn prepare(
    job: &Job<'_>,
    light: Light,
    chunk_size: u32,
    sparse_aware: bool,
    kind: xfer_core::digest::DigestKind,
    fine: bool,
) -> Result<Option<Prepared>, ClientError> {
    let basis_size = light.basis_size;
    let signed = move |size| Signed::of(size, basis_size, kind, fine);
    if let Some(mut file) = job.ahead.take(&light.path, signed) {
        file.put.open.chunk_size = chunk_size;
        return Ok(Some(file));
    }
    let (local, name) = (job.local.clone(), crate::tree::join(job.dest, &light.path));
    let permit = PREPARING.acquire().await;
    let task = tokio::task::spawn_blocking(move || -> Result<Option<Prepared>, CoreError> {
        let _permit = permit;
        read_light(&local, light.path, name, signed, chunk_size, sparse_aware)
    });
    let prepared = task
        .await
        .map_err(|e| CoreError::io("light file", std::io::Error::other(e.to_string())))??;
    Ok(prepared)
}

/// Reads the light file at `path` of `local` for its `DeltaPut` to `name`, signed and digested
/// as `signed` says for its size; `None` as for [`prepare`] (holes only where `sparse_aware`).
fn read_light(
    local: &Root,
    path: String,
    name: String,
    signed: impl FnOnce(u64) -> Signed,
    chunk_size: u32,
    sparse_aware: bool,
) -> Result<Option<Prepared>, CoreError> {
    let source = SourceFile::new(local.open_read(&path)?, path.clone())?;
    let identity = source.identity();
    let signed = signed(identity.size);
    if sparse_aware && !source.holes()?.is_empty() {
        return Ok(None);
    }
    let file = source.file();
    let mut chunks = Vec::new();
    let each = |cut: delta::Cut| {
        chunks.push(cut.sig());
        chunks.len() <= MAX_DELTA_CHUNKS
    };
    // Read once for both the signature and the commit's digest (no holes here: the daemon
    // that keeps them was ruled out above, and a hole reads as the zeros it holds).
    let (avg, kind) = (signed.avg, signed.kind);
    let digest = match signed.blocks {
        true => delta::blocks_and_digest(&file, identity.size, avg, kind, each),
        false => delta::cut_and_digest(&file, identity.size, avg, kind, each),
    }
    .map_err(|e| CoreError::io(format!("reading {path}"), e))?;
    let Some(digest) = digest else {
        return Ok(None);
    };
    let put = DeltaPut {
        open: OpenWrite {
            name,
            identity,
            mode: source.mode(),
            chunk_size,
        },
        avg_chunk: avg,
        chunks,
    };
    Ok(Some(Prepared {
        path,
        source,
        put,
        digest: digest.to_vec(),
        signed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn welcome(capabilities: u64, window: u32) -> xfer_proto::Welcome {
        xfer_proto::Welcome {
            version: 1,
            capabilities,
            max_chunk_size: 16 << 20,
            window,
            agent: String::new(),
            proof: Vec::new(),
        }
    }

    /// How many `Data` frames of `len` bytes go before the first is answered.
    fn in_one_flight(window: DataWindow, len: u64) -> usize {
        window.capacity() / window.cost(len) as usize
    }

    /// 2 MiB of noise (xorshift from `seed`), which a cut by content splits at varied lengths.
    fn noise(seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..2 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    /// A job sending from `local` to `t` on the daemon, with the files `ahead` holds.
    fn job_into_t<'a>(local: &'a Root, ahead: &'a Ahead) -> Job<'a> {
        Job {
            local,
            dest: "t",
            chunk_size: 1 << 20,
            why: "",
            limiter: None,
            done: &|_| {},
            ahead,
        }
    }

    /// The chunk lengths of the `DeltaPut` prepared for a 2 MiB file against a basis of
    /// `basis_size` bytes, with `fine` (`CAP_DELTA_FINE`) or not.
    async fn signature_lengths(basis_size: u64, fine: bool) -> Vec<u32> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), noise(0x9e37_79b9_7f4a_7c15)).unwrap();
        let local = Root::open(dir.path()).unwrap();
        let ahead = Ahead::default();
        let job = job_into_t(&local, &ahead);
        let light = Light {
            path: "f".into(),
            basis_size,
        };
        let kind = xfer_core::digest::DigestKind::Blocks;
        let file = prepare(&job, light, 1 << 20, false, kind, fine)
            .await
            .unwrap()
            .unwrap();
        let want = xfer_core::digest::digest_file_as(kind, file.source.file().as_ref(), 2 << 20);
        assert_eq!(file.digest, want.unwrap().to_vec());
        file.put.chunks.iter().map(|c| c.len).collect()
    }

    #[tokio::test]
    async fn a_light_file_that_kept_its_size_is_signed_in_blocks_and_one_that_did_not_is_cut() {
        let block = xfer_core::fine::LIGHT_AVG_CHUNK;
        let same = signature_lengths(2 << 20, true).await;
        assert_eq!(same, vec![block; (2 << 20) / block as usize]);
        // A file that grew or shrank most likely moved: cut by content, its chunks of any length.
        for lengths in [
            signature_lengths(3 << 20, true).await,
            signature_lengths(2 << 20, false).await,
        ] {
            assert_eq!(lengths.iter().map(|&l| u64::from(l)).sum::<u64>(), 2 << 20);
            assert!(lengths.iter().any(|&l| l != lengths[0]), "{lengths:?}");
        }
    }

    /// A file read ahead is sent as it was read where both guesses held (the receiver's file
    /// kept its size, the daemon is of this version), and read again where either did not.
    #[tokio::test]
    async fn a_file_read_ahead_is_sent_only_where_its_guesses_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let local = Root::open(dir.path()).unwrap();
        let ahead = Ahead::default();
        let job = job_into_t(&local, &ahead);
        let (blocks, sequential) = (
            xfer_core::digest::DigestKind::Blocks,
            xfer_core::digest::DigestKind::Sequential,
        );
        let digest_now = |kind| {
            let file = std::fs::File::open(&path).unwrap();
            xfer_core::digest::digest_file_as(kind, &file, 2 << 20)
                .unwrap()
                .to_vec()
        };
        let listed = tokio_util::sync::CancellationToken::new();
        // What `prepare` sends for a receiver's file of `basis_size` bytes, after the file was
        // read ahead and then rewritten: the digest tells which of the two contents it read.
        let after_read_ahead = |basis_size: u64, kind| {
            let (job, listed, path) = (&job, &listed, &path);
            async move {
                std::fs::write(path, noise(1)).unwrap();
                let candidates = vec![("f".to_string(), 2 << 20)];
                read_ahead(job.local, job.dest, candidates, job.ahead, listed).await;
                std::fs::write(path, noise(2)).unwrap();
                let light = Light {
                    path: "f".into(),
                    basis_size,
                };
                let file = prepare(job, light, 4 << 20, true, kind, true).await;
                let file = file.unwrap().unwrap();
                assert_eq!(file.put.open.chunk_size, 4 << 20);
                assert_eq!(file.put.open.name, "t/f");
                file.digest
            }
        };
        let first = {
            std::fs::write(&path, noise(1)).unwrap();
            digest_now(blocks)
        };
        // Both guesses held: the file as it was read ahead.
        assert_eq!(after_read_ahead(2 << 20, blocks).await, first);
        assert!(ahead.files().is_empty());
        // The receiver's file was of another size, or the daemon digests in order: read again.
        assert_eq!(after_read_ahead(3 << 20, blocks).await, digest_now(blocks));
        assert_eq!(
            after_read_ahead(2 << 20, sequential).await,
            digest_now(sequential)
        );
        // Once the listing came, nothing more is read ahead.
        listed.cancel();
        let candidates = vec![("f".to_string(), 2 << 20)];
        read_ahead(&local, "t", candidates, &ahead, &listed).await;
        assert!(ahead.files().is_empty());
    }

    #[test]
    fn a_byte_window_lets_small_literal_data_go_in_one_flight() {
        let by_size = DataWindow::of(&welcome(xfer_proto::CAP_BYTE_WINDOW, 2));
        // A light file's literal data: a few KiB each, 128 of them before any `Ack`.
        assert_eq!(in_one_flight(by_size, 25_000), 128);
        // Whole chunks: as many as the window counted in frames.
        assert_eq!(in_one_flight(by_size, 16 << 20), 2);
        // A daemon that counts frames: two, whatever their size.
        let by_frame = DataWindow::of(&welcome(0, 2));
        assert_eq!(in_one_flight(by_frame, 25_000), 2);
        assert_eq!(in_one_flight(by_frame, 16 << 20), 2);
        // Out-of-range windows are held within 1 and 64 frames.
        assert_eq!(DataWindow::of(&welcome(0, 0)).capacity(), 1);
        let widest = DataWindow::of(&welcome(xfer_proto::CAP_BYTE_WINDOW, 1000));
        assert_eq!(widest.capacity(), 64 * 64);
    }
}
