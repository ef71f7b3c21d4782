//! Directory trees (`send -r`, `recv -r`): one listing of each side decides what moves; small
//! files travel whole and pipelined over the connection pool (no round trip per file); large
//! files go through the chunked engine with all connections; links are copied as links; modes
//! and mtimes are kept; the receiving side is flushed once at the end.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use foldhash::{HashMap, HashSet, HashSetExt};
use futures_util::FutureExt;
use tokio::task::JoinSet;
use xfer_core::tree::{Unreadable, Walked};
use xfer_core::{CoreError, Root};
use xfer_net::compress::looks_compressed;
use xfer_proto::{
    Change, Delete, EntryKind, Frame, GetFile, ListTree, MakeDir, MakeLink, MetaEntry, PutFile,
    TreeEntry, TreeOptions,
};

use crate::engine::{self, Options};
use crate::meta::{MetaPlan, Tally};
use crate::mirror::{self, Mirror, Removals};
use crate::session::{unexpected, FirstFrames};
use crate::{ClientError, Session, Target};

/// Files up to this size travel whole in one frame.
pub const SMALL_FILE: u64 = 1 << 20;
/// Large files of a tree in flight at once.
const LARGE_AT_ONCE: usize = 2;
/// Files up to this size (a few chunks) are light: each is mostly round trips (open, delta,
/// commit), so [`LIGHT_AT_ONCE`] of them move at once, each on one connection.
const LIGHT_FILE: u64 = 16 * 1024 * 1024;
/// Light files of a tree in flight at once (a heavy one counts as several), a connection each:
/// half the daemon's default connections per address.
const LIGHT_AT_ONCE: usize = 32;
/// Requests a connection keeps in flight before it waits for answers. Small files are bounded
/// by [`PIPELINE_BYTES`] first (1,000 of 16 KiB a round trip carry 320 MB/s over 50 ms); the
/// requests that move no bytes (`SetMeta`, `MakeDir`, `Delete`) by this count: a tree's 52k
/// `SetMeta`s were 52 round trips at 1024, 2.6 s of a 9 s copy through a 50 ms path.
const PIPELINE: usize = 16 * 1024;
/// Small files a copy sends over its control connection rather than opening others, at most.
const FEW_FILES: usize = 1024;
/// Requests written at once, at most.
const BATCH: usize = 64;
/// Request bytes a connection keeps in flight before it waits for answers.
const PIPELINE_BYTES: usize = 16 << 20;
/// Bytes of small files packed into one `PackedPutFiles`, about: enough for zstd to find
/// what they share (markup, licences), small enough to keep the pipeline moving.
const PACK_BYTES: usize = 2 << 20;
/// Most small files packed into one `PackedPutFiles`.
const PACK_FILES: usize = 1024;
/// Most requests a tree's closing sent with its last commits holds (`CAP_TREE_CLOSE`): written
/// at once while the daemon waits for the commits, they sit in the socket buffers.
const EARLY_CLOSE_FRAMES: usize = 1024;

/// What a tree copy reports (`--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TreeSummary {
    /// Top of the tree on the server.
    pub name: String,
    /// Regular files in the source tree.
    pub files_total: u64,
    /// Files whose bytes moved this run.
    pub files_transferred: u64,
    /// Files already identical on the receiving side.
    pub files_skipped: u64,
    /// Bytes of all regular files in the source tree.
    pub bytes_total: u64,
    /// File bytes moved this run.
    pub bytes_transferred: u64,
    /// What `bytes_transferred` took on the wire, compressed where it was.
    pub wire_bytes: u64,
    /// Bytes of large files already held from an interrupted run.
    pub resumed_bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Connections per transfer: the fixed count, or the most an adaptive pool had at once.
    pub connections: usize,
    /// Chunks sent again after a CRC mismatch.
    pub crc_retries: u64,
    /// Entries left out (special files, links leading out of the tree).
    pub entries_skipped: u64,
    /// Source entries left out because they could not be read: files, and directories whose
    /// contents were left out. A copy with any is incomplete.
    pub entries_unreadable: u64,
    /// What each of those is and why it could not be read, as warned.
    #[serde(skip)]
    pub unreadable: Vec<String>,
    /// Source files gone between the listing and their reading: left out, with a warning each.
    pub entries_vanished: u64,
    /// TCP congestion control of the connections, as the kernel reports it.
    pub congestion: Option<String>,
    /// Entries the receiver could not give their owner or group (it lacks the privilege).
    pub not_chowned: u64,
    /// Entries whose extended attributes the receiving filesystem refused.
    pub xattrs_refused: u64,
    /// Names made hard links to a file copied once.
    pub hard_links: u64,
    /// Entries removed from the receiving tree (`--delete`), or that would be (`--dry-run`).
    pub entries_deleted: u64,
    /// Some large file went as a delta against the one the receiver held.
    pub delta: bool,
    /// Large files that went as deltas.
    pub delta_files: u64,
    /// Bytes sent as data (`bytes_transferred`).
    pub literal_bytes: u64,
    /// Bytes the receiver copied from the files it held instead of receiving them.
    pub matched_bytes: u64,
    /// What the copy changed, or would change under `--dry-run` (`--itemize`).
    #[serde(skip)]
    pub changes: Vec<Change>,
}

impl TreeSummary {
    /// For a copy that left out source entries it could not read, how many:
    /// `2 source entries could not be read and were left out`.
    pub fn unreadable_count(&self) -> Option<String> {
        let n = self.entries_unreadable;
        let (noun, verb) = if n == 1 {
            ("entry", "was")
        } else {
            ("entries", "were")
        };
        (n > 0).then(|| format!("{n} source {noun} could not be read and {verb} left out"))
    }

    /// [`TreeSummary::unreadable_count`] with the first few entries and their causes, on one
    /// line: what a copy that printed no warnings of its own reports.
    pub fn unreadable_error(&self) -> Option<String> {
        const NAMED: usize = 3;
        let mut named = self.unreadable[..self.unreadable.len().min(NAMED)].join("; ");
        if self.unreadable.len() > NAMED {
            named += "; …";
        }
        self.unreadable_count()
            .map(|count| format!("{count}: {named}"))
    }
}

pub(crate) fn join(top: &str, rel: &str) -> String {
    match (top.is_empty(), rel.is_empty()) {
        (_, true) => top.to_string(),
        (true, false) => rel.to_string(),
        (false, false) => format!("{top}/{rel}"),
    }
}

/// True when the receiver's copy can be kept: same size, mtime and permissions (and digest, if
/// compared).
fn unchanged(src: &TreeEntry, dst: Option<&TreeEntry>) -> bool {
    dst.is_some_and(|d| {
        d.kind == EntryKind::File
            && d.size == src.size
            && d.mode & 0o777 == src.mode & 0o777
            && d.mtime_ns == src.mtime_ns
            && d.digest == src.digest
    })
}

/// The listing of `dir` as a control connection's first request, sent with its `Auth` where the
/// daemon proves itself early: with metadata where the `Welcome` it is encoded for grants it.
fn listing_first(dir: &str, digests: bool, keep: TreeOptions) -> FirstFrames {
    let dir = dir.to_string();
    Arc::new(move |welcome: &xfer_proto::Welcome| {
        vec![listing_request(&dir, meta_granted(welcome), digests, keep)]
    })
}

/// The request that lists `dir`: with metadata (`ListTreeMeta`) when `with_meta`, else
/// `ListTree`.
fn listing_request(dir: &str, with_meta: bool, digests: bool, keep: TreeOptions) -> Frame {
    if with_meta {
        Frame::ListTreeMeta(xfer_proto::ListTreeMeta {
            dir: dir.to_string(),
            digests,
            xattrs: keep.xattrs,
        })
    } else {
        Frame::ListTree(ListTree {
            dir: dir.to_string(),
            digests,
        })
    }
}

async fn list_remote(
    session: &mut Session,
    request: &Frame,
) -> Result<Vec<TreeEntry>, ClientError> {
    list_pages(session, request, |frame| match frame {
        Frame::TreeListing(page) => Ok((page.entries, page.more)),
        other => Err(unexpected(other)),
    })
    .await
}

async fn list_remote_meta(
    session: &mut Session,
    request: &Frame,
) -> Result<Vec<MetaEntry>, ClientError> {
    list_pages(session, request, |frame| match frame {
        Frame::TreeMetaListing(page) => Ok((page.entries, page.more)),
        Frame::PackedTreeMetaListing(packed) => {
            let page = packed.unpack()?;
            Ok((page.entries, page.more))
        }
        other => Err(unexpected(other)),
    })
    .await
}

/// Sends a listing request and gathers its pages (`page` takes one apart into its entries and
/// whether more follow); a directory the server does not have lists as empty. A session whose
/// connect sent its first frames sent the request with them.
async fn list_pages<T>(
    session: &mut Session,
    request: &Frame,
    page: impl Fn(Frame) -> Result<(Vec<T>, bool), ClientError>,
) -> Result<Vec<T>, ClientError> {
    if !std::mem::take(&mut session.first_sent) {
        session.send(request).await?;
    }
    let mut entries = Vec::new();
    loop {
        match session.next().await {
            Ok(frame) => {
                let (listed, more) = page(frame)?;
                entries.extend(listed);
                if !more {
                    return Ok(entries);
                }
            }
            Err(ClientError::Remote(e))
                if e.error_code() == Some(xfer_proto::ErrorCode::NotFound) =>
            {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        }
    }
}

/// True when the daemon on `session` keeps tree metadata (`CAP_TREE_META`).
fn keeps_meta(session: &Session) -> bool {
    meta_granted(&session.welcome)
}

/// Whether `welcome` grants a tree's metadata (`CAP_TREE_META`): also what a listing sent
/// before `Welcome` was encoded for, which [`keeps_meta`] must then read the same way.
fn meta_granted(welcome: &xfer_proto::Welcome) -> bool {
    welcome.capabilities & xfer_proto::CAP_TREE_META != 0
}

/// One frame of a pipeline, and what it costs.
struct Request {
    frame: Frame,
    /// Answers it gets: one, or one per file of a `PackedPutFiles`.
    answers: u32,
    /// Bytes it keeps in flight until answered: those it carries, or those its answer will.
    in_flight: u64,
    /// Bytes it puts on the wire, counted by `--bwlimit`.
    wire: u64,
}

impl Request {
    /// `answers` small files packed into one `PackedPutFiles`. It keeps in flight the bytes the
    /// daemon unpacks and stores, not the far fewer it takes on the wire: counted by the wire,
    /// a connection's budget held 25 times more of the docs tree's work than it says, so the
    /// first connections took most of the tree at once, and at the end some still stored their
    /// share for a second and more while the others had finished.
    fn packed(packed: xfer_proto::PackedFiles, answers: u32) -> Self {
        Self {
            in_flight: u64::from(packed.raw_len),
            wire: packed.zstd.len() as u64,
            answers,
            frame: Frame::PackedPutFiles(packed),
        }
    }
}

impl From<(Frame, u64)> for Request {
    /// A request answered once, keeping `in_flight` bytes in flight.
    fn from((frame, in_flight): (Frame, u64)) -> Self {
        Self {
            frame,
            answers: 1,
            in_flight,
            wire: 0,
        }
    }
}

/// Sends `requests` on `session` with up to `PIPELINE` requests and `PIPELINE_BYTES` in
/// flight, checking each answer with `check` (answers come in request order; an `Error`
/// answer is passed on too, and [`unexpected`] makes it the remote's error). A
/// `PackedFileData` is unpacked into the answers it holds. The file bytes on the wire are
/// counted both ways by `files`' limiter (`--bwlimit`): what requests carry, and the answers'
/// `FileData`, packed or not; the answers' also into its `wire`.
///
/// Requests are written and answers read side by side. Were the client to stop reading while
/// it writes, a deep pipeline could block both ends at once: the server writing answers
/// nobody reads, the client writing requests nobody reads. Requests go out in batches (what is
/// ready while there is room, one write each) and answers that arrived together are read from
/// one buffer, so the server stores them in batches too and neither side makes a system call
/// per file.
async fn pipeline<F>(
    session: &mut Session,
    files: Option<&Progress>,
    requests: impl Iterator<Item = impl Into<Request>>,
    mut check: F,
) -> Result<(), ClientError>
where
    F: FnMut(Frame) -> Result<(), ClientError>,
{
    let limiter = files.and_then(|f| f.limiter.as_ref());
    let budget = tokio::sync::Semaphore::new(PIPELINE_BYTES);
    // One entry per request in flight, in order: what its answers give back to the budget,
    // and how many they are.
    let (in_flight, mut answered) = tokio::sync::mpsc::channel::<(u32, u32)>(PIPELINE);
    let Session { reader, writer, .. } = session;
    let send = async {
        let mut batch = Vec::with_capacity(BATCH);
        for request in requests {
            let Request {
                frame,
                answers,
                in_flight: moves,
                wire,
            } = request.into();
            if let Some(limiter) = limiter.filter(|_| wire > 0) {
                // Nothing ready waits for the rate limit.
                send_batch(writer, &mut batch).await?;
                limiter.acquire(wire).await;
            }
            let size = (moves as usize + 64).min(PIPELINE_BYTES) as u32;
            let room = match (budget.try_acquire_many(size), in_flight.try_reserve()) {
                (Ok(bytes), Ok(slot)) => Some((bytes, slot)),
                _ => None,
            };
            let (bytes, slot) = match room {
                Some(room) => room,
                None => {
                    // Full: what is ready goes out before waiting for answers to make room.
                    send_batch(writer, &mut batch).await?;
                    let bytes = budget.acquire_many(size).await;
                    let slot = in_flight.reserve().await;
                    (
                        bytes.map_err(|_| ClientError::Closed)?,
                        slot.map_err(|_| ClientError::Closed)?,
                    )
                }
            };
            bytes.forget();
            slot.send((size, answers));
            batch.push(frame);
            if batch.len() >= BATCH {
                send_batch(writer, &mut batch).await?;
            }
        }
        send_batch(writer, &mut batch).await?;
        // Closing the channel tells the reader the last answer it waits for is the last one.
        drop(in_flight);
        Ok::<_, ClientError>(())
    };
    let receive = async {
        // Answers unpacked from a `PackedFileData` and not yet checked, oldest first.
        let mut unpacked = VecDeque::new();
        while let Some((size, answers)) = answered.recv().await {
            for _ in 0..answers {
                let answer = match unpacked.pop_front() {
                    Some(answer) => answer,
                    None => {
                        let frame = reader.read_frame().await?.ok_or(ClientError::Closed)?;
                        let wire = match &frame {
                            Frame::FileData(f) => f.data.len() as u64,
                            Frame::PackedFileData(p) => p.zstd.len() as u64,
                            _ => 0,
                        };
                        if let Some(files) = files.filter(|_| wire > 0) {
                            files.wire.fetch_add(wire, Ordering::Relaxed);
                            if let Some(limiter) = &files.limiter {
                                limiter.acquire(wire).await;
                            }
                        }
                        match frame {
                            Frame::PackedFileData(packed) => {
                                unpacked.extend(unpack_answers(packed)?);
                                unpacked.pop_front().ok_or(ClientError::Closed)?
                            }
                            other => other,
                        }
                    }
                };
                // An error answer goes to `check` too: some requests may fail alone.
                check(answer)?;
            }
            budget.add_permits(size as usize);
        }
        if !unpacked.is_empty() {
            return Err(ClientError::Unexpected("PackedFileData"));
        }
        Ok(())
    };
    tokio::try_join!(send, receive).map(|_| ())
}

/// The answers a `PackedFileData` holds, its CRC checked before it is decompressed (under
/// `block_in_place`: the runtime's other tasks go on meanwhile) into exactly the announced
/// size, which the decoder checked against the limit.
fn unpack_answers(packed: xfer_proto::PackedFiles) -> Result<Vec<Frame>, ClientError> {
    if !packed.crc_matches() {
        return Err(ClientError::Proto(xfer_proto::ProtoError::BadCrc {
            offset: 0,
        }));
    }
    let frames = tokio::task::block_in_place(|| {
        let buffer = Vec::with_capacity(packed.raw_len as usize);
        packed.unpack(
            "PackedFileData",
            buffer,
            xfer_proto::packed::packs_in_file_data,
        )
    })?;
    Ok(frames)
}

async fn send_batch(
    writer: &mut crate::session::Writer,
    batch: &mut Vec<Frame>,
) -> Result<(), ClientError> {
    if !batch.is_empty() {
        writer.send_all(batch).await?;
        batch.clear();
    }
    Ok(())
}

fn expect_done(frame: Frame) -> Result<(), ClientError> {
    match frame {
        Frame::Done(_) => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// What a tree copy must do, from the source's listing and the receiver's.
struct Plan {
    dirs: Vec<TreeEntry>,
    links: Vec<TreeEntry>,
    small: Vec<TreeEntry>,
    large: Vec<TreeEntry>,
}

impl Plan {
    /// Sorts the source's entries: files the receiver already holds and links it already has
    /// are skipped; links leading out of the tree and special files are left out with a warning.
    fn new(
        source: Vec<TreeEntry>,
        receiver: &HashMap<String, TreeEntry>,
        summary: &mut TreeSummary,
        safe_links: bool,
    ) -> Self {
        let mut plan = Self {
            dirs: Vec::new(),
            links: Vec::new(),
            small: Vec::new(),
            large: Vec::new(),
        };
        for entry in source {
            let theirs = receiver.get(&entry.path);
            match entry.kind {
                EntryKind::Special => {
                    eprintln!(
                        "xfer: warning: skipping {}: not a regular file, directory or link",
                        entry.path
                    );
                    summary.entries_skipped += 1;
                }
                EntryKind::Dir => plan.dirs.push(entry),
                EntryKind::Symlink => {
                    if safe_links
                        && xfer_core::tree::validate_link(&entry.path, &entry.target).is_err()
                    {
                        tracing::warn!(path = %entry.path, target = %entry.target, "link leads out of the tree; skipped");
                        eprintln!(
                            "xfer: warning: skipping {}: its link leads out of the tree",
                            entry.path
                        );
                        summary.entries_skipped += 1;
                    } else if theirs
                        .is_none_or(|t| t.kind != EntryKind::Symlink || t.target != entry.target)
                    {
                        plan.links.push(entry);
                    }
                }
                EntryKind::File => {
                    summary.files_total += 1;
                    summary.bytes_total += entry.size;
                    if unchanged(&entry, theirs) {
                        summary.files_skipped += 1;
                    } else if entry.size <= SMALL_FILE {
                        plan.small.push(entry);
                    } else {
                        plan.large.push(entry);
                    }
                }
            }
        }
        plan
    }
}

impl TreeSummary {
    fn new(name: &str, opts: &Options) -> Self {
        Self {
            name: name.to_string(),
            files_total: 0,
            files_transferred: 0,
            files_skipped: 0,
            bytes_total: 0,
            bytes_transferred: 0,
            wire_bytes: 0,
            resumed_bytes: 0,
            seconds: 0.0,
            connections: opts.connections.initial(),
            crc_retries: 0,
            entries_skipped: 0,
            entries_unreadable: 0,
            entries_vanished: 0,
            unreadable: Vec::new(),
            congestion: None,
            not_chowned: 0,
            xattrs_refused: 0,
            hard_links: 0,
            entries_deleted: 0,
            delta: false,
            delta_files: 0,
            literal_bytes: 0,
            matched_bytes: 0,
            changes: Vec::new(),
        }
    }
}

struct Progress {
    /// `--bwlimit` for the small files, shared by every connection of the tree.
    limiter: Option<crate::RateLimiter>,
    /// Packs the small files sent, for every connection of the tree: `auto` measures and
    /// decides for all of them at once.
    compressor: xfer_net::Compressor,
    /// File bytes on the wire, compressed where they were: small files and large ones.
    wire: AtomicU64,
    bar: Arc<dyn crate::Progress>,
    files_done: AtomicU64,
    files_total: u64,
    bytes_moved: AtomicU64,
    /// The small files' owners and attributes, when a send stores them with the files.
    file_metas: Option<crate::meta::FileMetas>,
    /// Starts writing the small files a download stored to disk before its closing flush.
    writeback: xfer_core::Writeback,
    /// Source files gone between the listing and their reading, by path: left out.
    vanished: Mutex<Vec<String>>,
}

impl Progress {
    fn new(
        small: &[TreeEntry],
        large: &[TreeEntry],
        opts: &Options,
        file_metas: Option<crate::meta::FileMetas>,
    ) -> Arc<Self> {
        let progress = Self {
            limiter: opts.bwlimit.map(crate::RateLimiter::new),
            compressor: xfer_net::Compressor::new(
                opts.connector.compress.unwrap_or_default(),
                "tree",
            )
            .with_delivered(opts.connector.delivered.clone()),
            wire: AtomicU64::new(0),
            bar: opts.progress.clone(),
            files_done: AtomicU64::new(0),
            files_total: (small.len() + large.len()) as u64,
            bytes_moved: AtomicU64::new(0),
            file_metas,
            writeback: xfer_core::Writeback::default(),
            vanished: Mutex::default(),
        };
        progress
            .bar
            .set_length(small.iter().chain(large).map(|e| e.size).sum());
        Arc::new(progress)
    }

    /// A source file gone since it was listed: left out of the copy with a warning, as if it
    /// had been removed just before (rsync's "file has vanished").
    fn vanished(&self, path: &str) {
        tracing::warn!(path, "vanished since it was listed; left out");
        eprintln!("xfer: warning: skipping {path}: it vanished during the copy");
        self.vanished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(path.to_string());
    }

    /// Takes the files that vanished out of those the copy wrote, and out of the metadata to
    /// set (names under `top`).
    fn settle_vanished(
        &self,
        top: &str,
        written: &mut HashSet<String>,
        meta: Option<&mut MetaPlan>,
    ) {
        let vanished = self.vanished_paths();
        for path in &vanished {
            written.remove(path);
        }
        if let Some(meta) = meta {
            meta.vanished(top, &vanished);
        }
    }

    /// The paths [`Progress::vanished`] took.
    fn vanished_paths(&self) -> Vec<String> {
        self.vanished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn file_done(&self, bytes: u64) {
        let done = self.files_done.fetch_add(1, Ordering::Relaxed) + 1;
        self.bytes_moved.fetch_add(bytes, Ordering::Relaxed);
        self.bar.inc(bytes);
        self.bar
            .set_message(format!("{done}/{} files", self.files_total));
    }
}

/// The file-moving part of a tree copy, the same both ways: small files from one shared queue
/// over `opts.connections.initial()` connections, large files through [`large_files`].
struct Files<'a> {
    local: &'a Root,
    target: &'a Target,
    /// The tree's top on the server.
    top: &'a str,
    opts: &'a Options,
    /// Connections already open, taken by the small-file workers before they open their own.
    ready: Vec<Session>,
}

/// A tree's control connection kept through the files for the tree's close, and since when it
/// has had nothing to do.
struct KeptControl {
    session: Session,
    idle_since: Instant,
}

impl KeptControl {
    /// Whether the daemon has surely not closed the connection for idleness by the time a
    /// request sent now arrives (see [`surely_open`]).
    fn still_open(&self) -> bool {
        let idle = self.idle_since.elapsed();
        surely_open(idle, self.session.rtt, self.session.idle_timeout)
    }
}

/// Half the shortest idle timeout a daemon may be given (`--idle-timeout` is at least one
/// second): how long a connection to a daemon that does not tell its own may idle, round trips
/// included, and surely still be open.
const SURELY_OPEN_UNTOLD: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether a connection whose last answer came `idle` ago is surely still open when a request
/// sent now arrives. The daemon counts idleness from that answer, which left it a one-way trip
/// earlier, and the request takes another: two round trips cover both with room. It closes a
/// connection at its idle timeout, `told` behind its `Welcome`; half of that leaves room for a
/// round trip grown under load or a daemon slow to read. A daemon that does not tell may have
/// been given the shortest, one second.
fn surely_open(
    idle: std::time::Duration,
    rtt: Option<std::time::Duration>,
    told: Option<std::time::Duration>,
) -> bool {
    let limit = told.map_or(SURELY_OPEN_UNTOLD, |timeout| timeout / 2);
    idle + rtt.unwrap_or_default() * 2 < limit
}

/// The small files of a tree not yet taken, shared by the connections that move them.
type FileQueue = Arc<Mutex<VecDeque<TreeEntry>>>;

/// What one small-file connection of a tree copy works with.
struct SmallFiles {
    target: Target,
    connector: crate::Connector,
    local: Root,
    /// The tree's top on the server.
    top: String,
    /// The small files not yet taken, shared by the connections.
    queue: FileQueue,
    progress: Arc<Progress>,
}

impl Files<'_> {
    /// Runs `small_worker` on each small-file connection and `one_large` for each large file,
    /// and waits for all of them; the first error is returned.
    async fn run<W, WFut, L, LFut>(
        self,
        queue: FileQueue,
        large: &[TreeEntry],
        (summary, progress): (&mut TreeSummary, &Arc<Progress>),
        small_worker: W,
        one_large: L,
    ) -> Result<(), ClientError>
    where
        W: Fn(SmallFiles, Option<Session>) -> WFut,
        WFut: std::future::Future<Output = Result<(), ClientError>> + Send + 'static,
        L: FnMut(TreeEntry) -> LFut,
        LFut: std::future::Future<Output = Result<engine::Summary, ClientError>>,
    {
        let mut ready = self.ready;
        let mut workers = JoinSet::new();
        // Small files over the starting count: each is one round trip, pipelined, so more
        // connections add little; large files size their own pools.
        for _ in 0..self.opts.connections.initial() {
            workers.spawn(small_worker(
                SmallFiles {
                    target: self.target.clone(),
                    connector: self.opts.connector.clone(),
                    local: self.local.clone(),
                    top: self.top.to_string(),
                    queue: Arc::clone(&queue),
                    progress: Arc::clone(progress),
                },
                ready.pop(),
            ));
        }
        for spare in ready {
            spare.close().await;
        }
        let large_result = large_files(large, summary, progress, one_large).await;
        while let Some(joined) = workers.join_next().await {
            joined.map_err(|e| CoreError::io("worker", std::io::Error::other(e.to_string())))??;
        }
        large_result
    }
}

/// Connections opened beside a tree copy's first one for its files: none on a short path,
/// where opening one later costs next to nothing.
fn spare_connections(opts: &Options, rtt: Option<std::time::Duration>) -> usize {
    match rtt {
        Some(rtt) if rtt >= engine::LONG_PATH => opts.connections.for_tree_on(Some(rtt)) - 1,
        _ => 0,
    }
}

/// Opens up to `count` sessions at once; one that fails is left out (the copy opens its own
/// later, or goes on with fewer).
async fn preconnect(target: &Target, connector: &crate::Connector, count: usize) -> Vec<Session> {
    let opens = (0..count).map(|_| Session::connect(target, connector));
    futures_util::future::join_all(opens)
        .await
        .into_iter()
        .filter_map(|opened| {
            opened
                .map_err(|e| tracing::debug!(error = %e, "a spare connection failed"))
                .ok()
        })
        .collect()
}

/// How long a tree copy waits for its first connection's TCP connect before it dials spare
/// connections on speculation: on loopback and LANs the connect has answered by then, and no
/// spare is dialled there; a long path loses this much of the round trip they save.
const SPARES_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// A tree copy's spare connections ([`spare_connections`]) for the round trip the first
/// connection's TCP connect will tell `measured`. Unless it is told within [`SPARES_WAIT`], as
/// many as a long path wants are dialled beside the first, so that their handshakes end with
/// the first's listing: started once the path was known, one round trip in, they ended a round
/// trip after it. Those a short path does not want are closed before their `Hello` (see
/// [`Session::connect_if`]); one that fails is left out, as in [`preconnect`].
async fn open_spares(
    target: &Target,
    opts: &Options,
    measured: impl std::future::Future<Output = Option<std::time::Duration>>,
) -> Vec<Session> {
    let wanted = measured.map(|rtt| spare_connections(opts, rtt)).shared();
    if let Ok(count) = tokio::time::timeout(SPARES_WAIT, wanted.clone()).await {
        return preconnect(target, &opts.connector, count).await;
    }
    let most = spare_connections(opts, Some(engine::LONG_PATH));
    let opens = (0..most).map(|i| {
        let wanted = wanted.clone();
        Session::connect_if(target, &opts.connector, async move { i < wanted.await })
    });
    futures_util::future::join_all(opens)
        .await
        .into_iter()
        .filter_map(|opened| {
            opened
                .map_err(|e| tracing::debug!(error = %e, "a spare connection failed"))
                .ok()
                .flatten()
        })
        .collect()
}

/// Splits `files` into `parts` shares of about equal bytes (largest first, each to the lightest
/// share), each in the order of `files`; none is empty unless there are fewer files than parts.
fn split_by_size(files: Vec<TreeEntry>, parts: usize) -> Vec<Vec<TreeEntry>> {
    let parts = parts.clamp(1, files.len().max(1));
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(files[i].size));
    let mut load = vec![0u64; parts];
    let mut share_of = vec![0usize; files.len()];
    for i in order {
        let lightest = (0..parts).min_by_key(|&p| load[p]).unwrap_or(0);
        load[lightest] += files[i].size + 1;
        share_of[i] = lightest;
    }
    let mut shares = vec![Vec::new(); parts];
    for (file, share) in files.into_iter().zip(share_of) {
        shares[share].push(file);
    }
    shares
}

/// Moves the large files of a tree, [`LARGE_AT_ONCE`] at a time (or up to [`LIGHT_AT_ONCE`]
/// light ones), each through the chunked engine with its own connections, and counts them into
/// `summary`. Several at once, so that one file's final flush and rename overlap the next one's
/// bytes, and the round trips of light files overlap. Stops at the first error (the others are
/// resumable, as any interrupted transfer).
async fn large_files<F, Fut>(
    large: &[TreeEntry],
    summary: &mut TreeSummary,
    progress: &Progress,
    one: F,
) -> Result<(), ClientError>
where
    F: FnMut(TreeEntry) -> Fut,
    Fut: std::future::Future<Output = Result<engine::Summary, ClientError>>,
{
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let weight = |e: &TreeEntry| match e.size <= LIGHT_FILE {
        true => 1,
        false => LIGHT_AT_ONCE / LARGE_AT_ONCE,
    };
    let mut one = one;
    let mut running = FuturesUnordered::new();
    // Largest first: each file opens its own connection and climbs out of slow start, so the
    // last to start sets the tree's end; started last, the largest ran alone after the small
    // files had ended (the docs tree's last 0.5 s through 50 ms, its CPUs idle).
    let mut largest_first: Vec<&TreeEntry> = large.iter().collect();
    largest_first.sort_by_key(|e| std::cmp::Reverse(e.size));
    let (mut room, mut files) = (LIGHT_AT_ONCE, largest_first.into_iter().peekable());
    loop {
        while let Some(entry) = files.next_if(|e| weight(e) <= room) {
            let w = weight(entry);
            room -= w;
            let file = one(entry.clone());
            running.push(async move { (w, file.await) });
        }
        let Some((w, result)) = running.next().await else {
            break;
        };
        room += w;
        let s = match result {
            Err(ClientError::Vanished(path)) => {
                progress.vanished(&path);
                continue;
            }
            result => result?,
        };
        summary.delta |= s.delta;
        summary.delta_files += u64::from(s.delta);
        summary.matched_bytes += s.matched_bytes;
        summary.resumed_bytes += s.resumed_bytes;
        summary.crc_retries += s.crc_retries;
        summary.connections = summary.connections.max(s.connections);
        progress.wire.fetch_add(s.wire_bytes, Ordering::Relaxed);
        progress.file_done(s.bytes_transferred);
    }
    Ok(())
}

/// Whether the daemon behind `session` takes a light file's delta in one request
/// (`CAP_DELTA_PUT`, with `CAP_DELTA`): where it does not, no file goes as a light delta.
fn takes_light_deltas(session: &Session) -> bool {
    let both = xfer_proto::CAP_DELTA | xfer_proto::CAP_DELTA_PUT;
    session.welcome.capabilities & both == both
}

/// The small files of a tree moved to go as light deltas ([`route_small_deltas`]), and why.
#[derive(Debug, Default)]
struct SmallDeltas {
    paths: HashSet<String>,
    why: String,
}

/// Moves the small files the receiver holds changed, of [`engine::MIN_SMALL_DELTA`] or more,
/// from `small` (sent whole, in batches) to `large`, whose light files go as deltas
/// ([`light_deltas`]), where a delta pays for a file of their sum ([`engine::choose_delta`]):
/// otherwise a tree of changed documents or shards of a few hundred KiB each moves every byte of
/// every changed file. Over a 50 ms path, 50 changed files of 128 KiB took 0.55 s whole and
/// 0.32 s as deltas.
fn route_small_deltas(
    small: &mut Vec<TreeEntry>,
    large: &mut Vec<TreeEntry>,
    remote: &HashMap<String, TreeEntry>,
    control: &Session,
    opts: &Options,
) -> SmallDeltas {
    if !takes_light_deltas(control) {
        return SmallDeltas::default();
    }
    let held = |e: &TreeEntry| {
        e.size >= engine::MIN_SMALL_DELTA
            && remote
                .get(&e.path)
                .is_some_and(|t| t.kind == EntryKind::File && t.size > 0)
    };
    let bytes = small.iter().filter(|e| held(e)).map(|e| e.size).sum();
    if bytes == 0 {
        return SmallDeltas::default();
    }
    let (wanted, why) = engine::choose_delta(opts.delta, control, opts.bwlimit, bytes);
    if !wanted {
        tracing::debug!(bytes, %why, "changed small files go whole");
        return SmallDeltas::default();
    }
    let (moved, kept): (Vec<_>, Vec<_>) = std::mem::take(small).into_iter().partition(held);
    *small = kept;
    let paths = moved.iter().map(|e| e.path.clone()).collect();
    tracing::debug!(files = moved.len(), bytes, %why, "changed small files go as deltas");
    large.extend(moved);
    SmallDeltas { paths, why }
}

/// Sends the light files of `large` that go as deltas against the receiver's files of the same
/// name (`remote`) over `control` and `spares` at once (see [`crate::light`]), where the daemon
/// speaks `CAP_DELTA_PUT`, and counts them into `summary`; those committed leave `large`. A
/// connection that failed is dropped (`control` then `None`); the files it carried stay in
/// `large`. Returns the paths whose delta did not add up, to be sent whole. With `close`, when
/// these files are all of `large`, the control connection sends the tree's closing once every
/// connection wrote its last `Commit` ([`crate::light::Close`]). Files `ahead` holds, read while
/// the listing came, are sent as they were read where that still holds.
///
/// On a short path, where no spare connections were opened, a few are opened here (as many as a
/// pool starts with): the daemon carries out one connection's requests one after the other, and
/// each file costs it a few milliseconds of copying, which more connections spread over its
/// cores.
async fn light_deltas(
    target: &Target,
    (control, spares): (&mut Option<Session>, &mut Vec<Session>),
    large: &mut Vec<TreeEntry>,
    (remote, small_deltas): (&HashMap<String, TreeEntry>, &SmallDeltas),
    (local, dest, ahead): (&Root, &str, &crate::light::Ahead),
    opts: &Options,
    (summary, progress, close): (&mut TreeSummary, &Progress, Option<&crate::light::Close>),
) -> HashSet<String> {
    let Some(first) = control.as_ref().filter(|c| takes_light_deltas(c)) else {
        return HashSet::new();
    };
    let mut why = None;
    let mut lights = Vec::new();
    for entry in large.iter() {
        let basis = remote
            .get(&entry.path)
            .filter(|t| t.kind == EntryKind::File);
        let Some(basis) = basis.filter(|_| entry.size <= LIGHT_FILE) else {
            continue;
        };
        let (wanted, reason) = match small_deltas.paths.contains(&entry.path) {
            true => (true, small_deltas.why.clone()),
            false => engine::choose_delta(opts.delta, first, opts.bwlimit, entry.size),
        };
        if wanted {
            why.get_or_insert(reason);
            lights.push((entry.clone(), basis.size));
        }
    }
    if lights.is_empty() {
        return HashSet::new();
    }
    let lights_cover_large = lights.len() == large.len();
    let wanted = opts.connections.for_tree_on(first.rtt).min(lights.len());
    let missing = wanted.saturating_sub(1 + spares.len());
    if missing > 0 {
        spares.extend(preconnect(target, &opts.connector, missing).await);
    }
    let basis_sizes: HashMap<String, u64> = lights
        .iter()
        .map(|(e, size)| (e.path.clone(), *size))
        .collect();
    let mut sessions: Vec<&mut Session> = control.iter_mut().chain(spares.iter_mut()).collect();
    let shares = split_by_size(lights.into_iter().map(|(e, _)| e).collect(), sessions.len());
    let why = why.unwrap_or_default();
    let done = |bytes| progress.file_done(bytes);
    let job = crate::light::Job {
        local,
        dest,
        chunk_size: opts.chunk_size,
        why: &why,
        limiter: progress.limiter.as_ref(),
        done: &done,
        ahead,
    };
    let sent = Mutex::new(crate::light::Sent::default());
    // The closing goes with the last commits only when they are the last of the tree.
    let close = close.filter(|_| lights_cover_large);
    if let Some(close) = close {
        close.start(sessions.len());
    }
    let runs = sessions
        .iter_mut()
        .zip(shares)
        .enumerate()
        .map(|(i, (session, share))| {
            let files = share
                .into_iter()
                .map(|e| crate::light::Light {
                    basis_size: basis_sizes[&e.path],
                    path: e.path,
                })
                .collect();
            // The first is the control connection.
            crate::light::send_over(session, files, &job, &sent, (close, i == 0))
        });
    let results = futures_util::future::join_all(runs).await;
    drop(sessions);
    // Connections that failed carry nothing more; their files go through the engine.
    let mut failed = results.iter().map(|r| {
        r.as_ref()
            .map_err(|e| tracing::debug!(error = %e, "a connection failed sending light files"))
            .is_err()
    });
    if failed.next().unwrap_or(false) {
        *control = None;
    }
    let mut kept = Vec::new();
    for (spare, failed) in std::mem::take(spares).into_iter().zip(failed) {
        if !failed {
            kept.push(spare);
        }
    }
    *spares = kept;
    let sent = sent.into_inner().unwrap_or_else(|p| p.into_inner());
    large.retain(|e| !sent.committed.contains(&e.path));
    summary.delta |= sent.delta_files > 0;
    summary.delta_files += sent.delta_files;
    summary.matched_bytes += sent.matched;
    progress.wire.fetch_add(sent.literal, Ordering::Relaxed);
    sent.whole
}

/// Options for a large file of a tree of `size` bytes: the tree reports its progress, not the
/// engine, and a light file moves on one connection (several move at once).
fn large_file_options(opts: &Options, size: u64) -> Options {
    let connections = match size <= LIGHT_FILE {
        true => engine::Connections::Fixed(1),
        false => opts.connections,
    };
    Options {
        progress: Arc::new(crate::NoProgress),
        connections,
        ..opts.clone()
    }
}

/// The directories a send must create or make writable before the files (`first`, parents
/// first), and those whose mode and mtime it must set afterwards (`last`, parents first; sent
/// reversed): the ones it created or made writable, those whose mode or mtime differ at the
/// receiver, and those an entry is added to or removed from. A rerun that changes little so
/// touches few directories instead of every one twice.
fn dir_passes<'a>(
    dirs: &'a [TreeEntry],
    receiver: &HashMap<String, TreeEntry>,
    changed: &[&[TreeEntry]],
    removals: &Removals,
) -> (Vec<&'a TreeEntry>, Vec<&'a TreeEntry>) {
    let parent = |path: &str| -> Option<String> {
        (!path.is_empty()).then(|| path.rsplit_once('/').map_or("", |(p, _)| p).to_string())
    };
    let first: Vec<&TreeEntry> = dirs
        .iter()
        .filter(|d| {
            receiver
                .get(&d.path)
                .is_none_or(|t| t.kind != EntryKind::Dir || t.mode & 0o700 != 0o700)
        })
        .collect();
    let created: HashSet<&str> = first.iter().map(|d| d.path.as_str()).collect();
    let mut touched: HashSet<String> = changed
        .iter()
        .flat_map(|entries| entries.iter())
        .chain(&removals.before)
        .chain(&removals.after)
        .filter_map(|e| parent(&e.path))
        .collect();
    touched.extend(first.iter().filter_map(|d| parent(&d.path)));
    let last = dirs
        .iter()
        .filter(|d| {
            created.contains(d.path.as_str())
                || touched.contains(&d.path)
                || receiver
                    .get(&d.path)
                    .is_none_or(|t| t.mode & 0o1777 != d.mode & 0o1777 || t.mtime_ns != d.mtime_ns)
        })
        .collect();
    (first, last)
}

/// Splits the directories a send makes before its files (`first`, parents first) into those
/// the receiver holds under their names, fixed before any file goes (a file to replace, a mode
/// that shuts out its owner), and those it lacks, made alongside the files: the daemon makes a
/// file's missing parents as it stores it (proto.md §6.3, §5.1), so nothing waits for them but
/// the empty ones, and their modes and mtimes are set again after the files. A tree's
/// thousand directories cost a wait of several tenths of a second before its first file.
fn made_alongside<'a>(
    first: &[&'a TreeEntry],
    receiver: &HashMap<String, TreeEntry>,
) -> (Vec<&'a TreeEntry>, Vec<&'a TreeEntry>) {
    first.iter().partition(|d| receiver.contains_key(&d.path))
}

/// Warns of each entry the source walk could not read and counts them: the copy goes on
/// without them and ends in an error. The paths come back for the receiver to keep what it
/// holds there (a file), or below them (a directory), from `--delete`.
fn left_unread(unreadable: &[Unreadable], summary: &mut TreeSummary) -> Vec<String> {
    for u in unreadable {
        let what = match u.kind {
            EntryKind::Dir => format!("what is in {}/", u.path),
            _ => u.path.clone(),
        };
        tracing::warn!(path = %u.path, error = %u.error, "not readable; left out");
        eprintln!("xfer: warning: skipping {what}: {}", u.error);
        summary.unreadable.push(format!("{what}: {}", u.error));
    }
    summary.entries_unreadable += unreadable.len() as u64;
    unreadable.iter().map(|u| u.path.clone()).collect()
}

/// A side's listing: with each entry's metadata when the daemon keeps it, else the plain
/// listing with empty metadata.
fn walk_listing(
    root: &Root,
    with_meta: bool,
    checksum: bool,
    keep: TreeOptions,
) -> xfer_core::Result<Vec<MetaEntry>> {
    if with_meta {
        root.walk_meta("", checksum, keep.xattrs)
    } else {
        Ok(root.walk("", checksum)?.into_iter().map(plain).collect())
    }
}

/// [`walk_listing`] of a source, leaving out what this process may not read (see
/// [`Root::walk_readable`]).
fn walk_source(
    root: &Root,
    with_meta: bool,
    checksum: bool,
    keep: TreeOptions,
) -> xfer_core::Result<Walked<MetaEntry>> {
    if with_meta {
        root.walk_meta_readable("", checksum, keep.xattrs)
    } else {
        let walked = root.walk_readable("", checksum)?;
        Ok(Walked {
            entries: walked.entries.into_iter().map(plain).collect(),
            unreadable: walked.unreadable,
        })
    }
}

/// The walk of `local` with each entry's metadata, started now on a thread of its own,
/// before the copy connects and so before it knows whether the daemon keeps metadata (if not,
/// the metadata goes unused: a third of the walk). Not on the blocking pool: a copy whose
/// connection fails returns its error at once rather than after a walk of a large tree, which
/// the runtime would wait for on the way out. With `lights`, the files to read ahead go there
/// first ([`light_candidates`]), but for those the filter leaves out.
fn walk_early(
    local: &Root,
    keep: TreeOptions,
    lights: Option<(LightCandidates, xfer_core::Filter)>,
) -> tokio::sync::oneshot::Receiver<xfer_core::Result<Walked<MetaEntry>>> {
    let (walked, walking) = tokio::sync::oneshot::channel();
    let local = local.clone();
    let spawned = std::thread::Builder::new()
        .name("xfer-walk".into())
        .spawn(move || {
            let started = Instant::now();
            let entries = local.walk_meta_readable("", false, keep.xattrs);
            // Timed on its own: the copy may take the listing later, after its handshake.
            tracing::debug!(elapsed = ?started.elapsed(), "source walk ended");
            if let (Some((lights, filter)), Ok(entries)) = (lights, &entries) {
                // Those the copy leaves out are not read either.
                let entries = entries.entries.iter().map(|e| &e.entry);
                let out = filter.excluded_set(
                    entries
                        .clone()
                        .map(|e| (e.path.as_str(), e.kind == EntryKind::Dir)),
                );
                let kept = entries.filter(|e| !out.contains(&e.path));
                let _ = lights.send(light_candidates(kept));
            }
            walked.send(entries)
        });
    if let Err(e) = spawned {
        // The sender went with the failed thread: the receiver reports the walk ended early.
        tracing::debug!(error = %e, "no thread for the walk");
    }
    walking
}

/// Where the walk hands over the files to read ahead (see [`light_candidates`]): paths and sizes.
type LightCandidates = tokio::sync::oneshot::Sender<Vec<(String, u64)>>;

/// The files of a walk that may go as light deltas, newest first (those changed since the last
/// copy, the likeliest to differ from the receiver's), with their sizes.
fn light_candidates<'a>(entries: impl Iterator<Item = &'a TreeEntry>) -> Vec<(String, u64)> {
    let mut files: Vec<&TreeEntry> = entries
        .filter(|e| {
            e.kind == EntryKind::File && e.size >= engine::MIN_SMALL_DELTA && e.size <= LIGHT_FILE
        })
        .collect();
    files.sort_by_key(|e| std::cmp::Reverse(e.mtime_ns));
    files
        .into_iter()
        .map(|e| (e.path.clone(), e.size))
        .collect()
}

/// The daemon's listing of `dir`, as [`walk_listing`] reads a local one.
async fn list_listing(
    session: &mut Session,
    dir: &str,
    with_meta: bool,
    checksum: bool,
    keep: TreeOptions,
) -> Result<Vec<MetaEntry>, ClientError> {
    let request = listing_request(dir, with_meta, checksum, keep);
    if with_meta {
        list_remote_meta(session, &request).await
    } else {
        let listed = list_remote(session, &request).await?;
        Ok(listed.into_iter().map(plain).collect())
    }
}

fn plain(entry: TreeEntry) -> MetaEntry {
    MetaEntry {
        entry,
        meta: xfer_proto::Meta::default(),
    }
}

/// What a tree copy does, from both sides' listings (the source's already filtered): the
/// removals of `--delete`, the metadata steps, and the entries left for [`Plan`].
struct MirrorPlan {
    /// The source's entries the usual plan copies (later hard-link names and nodes are the
    /// metadata plan's).
    source: Vec<TreeEntry>,
    /// The receiver's entries by path, without those removed before the copy.
    receiver: HashMap<String, TreeEntry>,
    meta: Option<MetaPlan>,
    removals: Removals,
}

impl MirrorPlan {
    /// Removals are decided on every name of the source, hard links and nodes included, so
    /// `--delete` never removes a name the copy links or makes. Fills in the summary's
    /// changes (hard links name the file they share) and deletion count. `unread` are the
    /// paths the source could not read ([`left_unread`]): the receiver keeps what it has there.
    fn new(
        source: Vec<MetaEntry>,
        receiver: Vec<MetaEntry>,
        with_meta: bool,
        keep: TreeOptions,
        mirror: &Mirror,
        unread: &[String],
        summary: &mut TreeSummary,
    ) -> Self {
        let every: Vec<TreeEntry> = source.iter().map(|e| e.entry.clone()).collect();
        let theirs: Vec<TreeEntry> = receiver.iter().map(|e| e.entry.clone()).collect();
        let removals = mirror.removals(&every, &theirs, unread);
        let in_the_way: HashSet<&str> = removals.before.iter().map(|e| e.path.as_str()).collect();
        let receiver: Vec<MetaEntry> = receiver
            .into_iter()
            .filter(|e| !in_the_way.contains(e.entry.path.as_str()))
            .collect();
        let (meta, plain_source, plain_receiver) = if with_meta {
            let (meta, s, r) = MetaPlan::new(source, receiver, keep, summary);
            (Some(meta), s, r)
        } else {
            let r = receiver
                .into_iter()
                .map(|e| (e.entry.path.clone(), e.entry));
            (None, every.clone(), r.collect())
        };
        let safe_links = meta.is_none() || keep.safe_links;
        let nodes: HashSet<&str> = meta
            .iter()
            .flat_map(|m| m.nodes.iter().map(|n| n.entry.path.as_str()))
            .collect();
        let sent = |e: &TreeEntry| match e.kind {
            EntryKind::Special => nodes.contains(e.path.as_str()),
            EntryKind::Symlink => {
                !safe_links || xfer_core::tree::validate_link(&e.path, &e.target).is_ok()
            }
            EntryKind::File | EntryKind::Dir => true,
        };
        let mut changes = mirror::changes(&every, &plain_receiver, &removals, sent);
        if let Some(meta) = &meta {
            let linked: HashMap<&str, &str> = meta
                .hard_links
                .iter()
                .map(|(name, existing)| (name.as_str(), existing.as_str()))
                .collect();
            for c in &mut changes {
                if c.kind == EntryKind::File && c.action != xfer_proto::ChangeAction::Delete {
                    if let Some(existing) = linked.get(c.path.as_str()) {
                        c.target = (*existing).to_string();
                    }
                }
            }
        }
        summary.changes = changes;
        summary.entries_deleted = (removals.before.len() + removals.after.len()) as u64;
        Self {
            source: plain_source,
            receiver: plain_receiver,
            meta,
            removals,
        }
    }
}

/// Connects, offering `CAP_DELETE` when the mirror removes entries. A daemon that does not
/// allow deletion refuses the handshake with a message naming its setting; one that predates
/// deletion does not take the capability, and is refused here: both before anything moves.
async fn connect_deleting(
    target: &Target,
    connector: &crate::Connector,
    mirror: &Mirror,
) -> Result<Session, ClientError> {
    connect_deleting_telling_rtt(target, connector, mirror, &mut None, None).await
}

/// [`connect_deleting`] that tells `dialed` the round trip once connected, before the
/// handshake (see [`Session::connect_telling_rtt`]).
async fn connect_deleting_telling_rtt(
    target: &Target,
    connector: &crate::Connector,
    mirror: &Mirror,
    dialed: &mut Option<tokio::sync::oneshot::Sender<Option<std::time::Duration>>>,
    first: Option<&FirstFrames>,
) -> Result<Session, ClientError> {
    let offer = mirror.offer();
    let session = Session::connect_sending(target, connector, offer, dialed, first).await?;
    if mirror.delete && session.welcome.capabilities & xfer_proto::CAP_DELETE == 0 {
        session.close().await;
        return Err(ClientError::Unsupported(format!(
            "--delete refused: the daemon at {target} is too old to delete (upgrade xferd)"
        )));
    }
    Ok(session)
}

/// Copies the local tree `dir` to `dest` on `target`.
///
/// # Errors
/// Local or remote file errors, connection failures past the retry deadline.
pub async fn send_tree(
    dir: &Path,
    target: &Target,
    dest: &str,
    opts: &Options,
    checksum: bool,
) -> Result<TreeSummary, ClientError> {
    send_tree_from(Root::open(dir)?, target, dest, opts, checksum).await
}

/// Copies the tree under `local` to `dest` on `target` (see [`send_tree`]); the daemon uses this
/// for server-to-server copies, with a `Root` beneath its own root.
///
/// # Errors
/// As [`send_tree`].
pub async fn send_tree_from(
    local: Root,
    target: &Target,
    dest: &str,
    opts: &Options,
    checksum: bool,
) -> Result<TreeSummary, ClientError> {
    send_tree_mirror(local, target, dest, opts, checksum, &Mirror::default()).await
}

/// [`send_tree`] as a mirror (see [`send_tree_mirror`]).
///
/// # Errors
/// As [`send_tree_mirror`].
pub async fn send_dir_mirror(
    dir: &Path,
    target: &Target,
    dest: &str,
    opts: &Options,
    checksum: bool,
    mirror: &Mirror,
) -> Result<TreeSummary, ClientError> {
    send_tree_mirror(Root::open(dir)?, target, dest, opts, checksum, mirror).await
}

/// [`send_tree_from`] as a mirror: filtered, removing what the source lacks, or only saying
/// what would change (see [`mirror`]).
///
/// # Errors
/// As [`send_tree`]; `Unsupported` when `--delete` meets a daemon that predates it, and the
/// daemon's refusal when it does not allow deletion, both before anything moves.
pub async fn send_tree_mirror(
    local: Root,
    target: &Target,
    dest: &str,
    opts: &Options,
    checksum: bool,
    mirror: &Mirror,
) -> Result<TreeSummary, ClientError> {
    let started = Instant::now();
    let mut opts = opts.clone();
    opts.connector.delivered = engine::delivered_meter(&opts);
    // Every connection of the tree, whoever opens it, promises the closing `Sync` it waits for
    // below: the daemon then commits the large files without a flush each.
    // They also close it with the last commits where they can (`CAP_TREE_CLOSE`).
    opts.connector.offer |= xfer_proto::CAP_TREE_SYNC | xfer_proto::CAP_TREE_CLOSE;
    let opts = &opts;
    // The source is walked while the connection opens and the receiver lists its side: over
    // a long path both take round trips the walk need not wait for.
    let keep = opts.keep;
    // While the receiver lists its side, the light files the walk found are read for their
    // deltas (see `light::read_ahead`): over a long path its round trips hide that work.
    let (lights, candidates) = tokio::sync::oneshot::channel();
    let reads_ahead = opts.delta != engine::DeltaMode::Never && !mirror.dry_run;
    let lights = reads_ahead.then(|| (lights, mirror.filter.clone()));
    let walking = (!checksum).then(|| walk_early(&local, keep, lights));
    let ahead = crate::light::Ahead::default();
    let listed = tokio_util::sync::CancellationToken::new();
    let (dialed, dial_rtt) = tokio::sync::oneshot::channel();
    let dial_rtt = dial_rtt.map(|rtt| rtt.ok().flatten()).shared();
    let read_ahead_rtt = dial_rtt.clone();
    let read_ahead = async {
        // A round trip not told within the least that makes a delta pay is at least that long:
        // with TCP Fast Open, the connect tells it only when its SYN is answered, along with
        // the listing, and the files are read before then.
        let at_least = tokio::time::timeout(engine::LONG_PATH, read_ahead_rtt)
            .map(|told| told.unwrap_or(Some(engine::LONG_PATH)));
        let (Ok(candidates), rtt) = tokio::join!(candidates, at_least) else {
            return Ok(());
        };
        // Only where a delta may be chosen: over a short path the files go whole.
        if engine::may_choose_delta(opts.delta, opts.bwlimit, rtt) {
            crate::light::read_ahead(&local, dest, candidates, &ahead, &listed).await;
        }
        Ok::<_, ClientError>(())
    };
    let source = &local;
    let walk = |with_meta: bool| async move {
        let walked = match walking {
            Some(walking) => {
                let mut walked = walking.await.map_err(|_| {
                    CoreError::io("walking", std::io::Error::other("the walk ended early"))
                })??;
                if !with_meta {
                    walked.entries = walked.entries.into_iter().map(|e| plain(e.entry)).collect();
                }
                walked
            }
            None => on_local(source, move |r| walk_source(r, with_meta, checksum, keep)).await?,
        };
        tracing::debug!(entries = walked.entries.len(), elapsed = ?started.elapsed(), "source walked");
        Ok::<_, ClientError>(Walked {
            entries: mirror.filter_source(walked.entries),
            unreadable: mirror.filter_unreadable(walked.unreadable),
        })
    };
    // Over a long path the files' connections are opened while the first one does its
    // handshake and the receiver lists its side: each starts with a congestion window of its
    // own, and none costs a round trip later.
    let open_spares = async {
        let spares = match mirror.dry_run {
            true => Vec::new(),
            false => open_spares(target, opts, dial_rtt).await,
        };
        tracing::debug!(spares = spares.len(), elapsed = ?started.elapsed(), "spare connections welcomed");
        Ok::<_, ClientError>(spares)
    };
    let first = async {
        let mut dialed = Some(dialed);
        // The receiver's listing is asked with the control connection's `Auth` where the
        // daemon proves itself early: a round trip sooner.
        let listing = listing_first(dest, checksum, keep);
        let mut control = connect_deleting_telling_rtt(
            target,
            &opts.connector,
            mirror,
            &mut dialed,
            Some(&listing),
        )
        .await?;
        let with_meta = keeps_meta(&control);
        if !with_meta {
            crate::meta::warn_old_daemon(target);
        }
        let list = async {
            let _read_ahead_ends = listed.drop_guard_ref();
            let listed = list_listing(&mut control, dest, with_meta, checksum, keep).await?;
            tracing::debug!(entries = listed.len(), elapsed = ?started.elapsed(), "receiver listed");
            Ok(listed)
        };
        let (walked, listed) = tokio::try_join!(walk(with_meta), list)?;
        Ok::<_, ClientError>((control, with_meta, walked, listed))
    };
    let ((mut control, with_meta, walked, listed), mut spares, ()) =
        tokio::try_join!(first, open_spares, read_ahead)?;
    tracing::debug!(spares = spares.len(), elapsed = ?started.elapsed(), "connections open");
    let Walked {
        entries: walked,
        unreadable,
    } = walked;

    // Before anything moves: not a name the daemon would store as its escapes.
    let names = walked
        .iter()
        .flat_map(|e| [e.entry.path.as_str(), e.entry.target.as_str()]);
    crate::session::refuse_unspeakable(control.welcome.capabilities, names)?;
    let mut summary = TreeSummary::new(dest, opts);
    summary.congestion = control.congestion.clone();
    let unread = left_unread(&unreadable, &mut summary);
    let MirrorPlan {
        source: walked,
        receiver: remote,
        mut meta,
        removals,
    } = MirrorPlan::new(
        walked,
        listed,
        with_meta,
        keep,
        mirror,
        &unread,
        &mut summary,
    );
    let safe_links = meta.is_none() || keep.safe_links;
    if mirror.dry_run {
        Plan::new(walked, &remote, &mut summary, safe_links);
        control.close().await;
        summary.seconds = started.elapsed().as_secs_f64();
        summary.literal_bytes = summary.bytes_transferred;
        return Ok(summary);
    }
    let delete = |entries: &[TreeEntry]| -> Vec<(Frame, u64)> {
        entries
            .iter()
            .map(|e| {
                let name = join(dest, &e.path);
                (Frame::Delete(Delete { name }), 0)
            })
            .collect()
    };
    // Entries of another type are in the way of the source's: they go first.
    pipeline(
        &mut control,
        None,
        delete(&removals.before).into_iter(),
        expect_done,
    )
    .await?;
    let Plan {
        dirs,
        links,
        mut small,
        mut large,
    } = Plan::new(walked, &remote, &mut summary, safe_links);
    if let Some(meta) = &meta {
        meta.route_sparse(&mut small, &mut large);
    }
    let small_deltas = route_small_deltas(&mut small, &mut large, &remote, &control, opts);
    // A daemon that stores a small file with its owner and attributes spares it a `SetMeta`.
    let file_metas = meta
        .as_ref()
        .filter(|_| control.welcome.capabilities & xfer_proto::CAP_PUT_META != 0)
        .map(|m| m.file_metas(&small));
    let progress = Progress::new(&small, &large, opts, file_metas);
    let small_count = small.len();
    let (first_pass, last_pass) = dir_passes(&dirs, &remote, &[&small, &large, &links], &removals);
    // Of the directories, only those the copy makes, opens up or changes the contents of need
    // their metadata set again: the others are left to the comparison with the receiver's.
    let touched_dirs: Vec<TreeEntry> = last_pass.iter().map(|d| (*d).clone()).collect();
    let mut written = MetaPlan::written([&touched_dirs, &small, &large, &links]);

    // Directories are made writable by their owner until the last pass gives them their own
    // mode. Those the receiver holds are fixed before any file goes (a file in the way, a
    // mode that shuts its owner out); those it lacks are made alongside the files (see
    // [`made_alongside`]).
    let make_dirs = |entries: &[&TreeEntry], extra: u32| -> Vec<Frame> {
        entries
            .iter()
            .map(|d| {
                let (name, mode) = (join(dest, &d.path), d.mode | extra);
                Frame::MakeDir(MakeDir {
                    name,
                    mode,
                    mtime_ns: d.mtime_ns,
                })
            })
            .collect()
    };
    let (fixed_first, alongside) = made_alongside(&first_pass, &remote);
    pipeline(
        &mut control,
        None,
        make_dirs(&fixed_first, 0o700).into_iter().map(|f| (f, 0)),
        expect_done,
    )
    .await?;
    tracing::debug!(dirs = fixed_first.len(), elapsed = ?started.elapsed(), "directories the receiver holds fixed");
    let make_alongside = make_dirs(&alongside, 0o700);
    // A tree whose last files are light files sends its closing with their last commits.
    let close = match meta.as_ref() {
        _ if control.welcome.capabilities & xfer_proto::CAP_TREE_CLOSE == 0 => None,
        // Anything else still to send, or a directory the closing would shut to its owner
        // (a file the commits fail to carry is sent again after it), closes as before.
        _ if !small.is_empty()
            || !links.is_empty()
            || !removals.after.is_empty()
            || !make_alongside.is_empty()
            || dirs.iter().any(|d| d.mode & 0o200 == 0) =>
        {
            None
        }
        Some(meta) if !meta.nodes.is_empty() || !meta.hard_links.is_empty() => None,
        Some(meta) => {
            let mut requests = meta.requests(dest, &written);
            if control.welcome.capabilities & xfer_proto::CAP_TREE_META_V2 == 0 {
                for x in requests.iter_mut().filter_map(|r| r.xattrs.as_mut()) {
                    xfer_core::meta::xattrs_without_names(x);
                }
            }
            Some(requests.into_iter().map(Frame::SetMeta).collect())
        }
        None => {
            let mut last = make_dirs(&last_pass, 0);
            last.reverse();
            Some(last)
        }
    }
    .map(|mut frames: Vec<Frame>| {
        frames.push(Frame::Sync);
        frames
    })
    .filter(|frames| frames.len() <= EARLY_CLOSE_FRAMES)
    .map(crate::light::Close::new);
    let mut control = Some(control);
    // Light files changed at the receiver go as deltas over the connections already open, all
    // at once; what they cannot carry stays with the large files.
    let whole = light_deltas(
        target,
        (&mut control, &mut spares),
        &mut large,
        (&remote, &small_deltas),
        (&local, dest, &ahead),
        opts,
        (&mut summary, &progress, close.as_ref()),
    )
    .await;
    // Files read ahead and not sent so: their descriptors go now.
    drop(ahead);
    if let Some(answers) = close.and_then(crate::light::Close::answers) {
        let clean = answers
            .iter()
            .all(|a| matches!(a, Frame::Done(_) | Frame::MetaSet(_)));
        if let Some(control) = control.take().filter(|_| clean && large.is_empty()) {
            let mut tally = Tally::default();
            for answer in answers {
                if let Frame::MetaSet(m) = answer {
                    tally.count(&m.name, m.not_chowned, &m.xattrs_refused, &mut summary);
                }
            }
            control.close().await;
            for spare in spares {
                spare.close().await;
            }
            tracing::debug!(elapsed = ?started.elapsed(), "closed with the last commits: directory times set, receiver flushed");
            return Ok(finished(summary, &progress, started));
        }
        // Something is left to send (a commit failed, a connection was lost): the closing
        // goes again after it.
        tracing::debug!(clean, "the closing sent with the last commits goes again");
    }
    let mut control = match control {
        Some(control) => control,
        None => connect_deleting(target, &opts.connector, mirror).await?,
    };
    // A few small files and nothing large (a rerun, a mirror of a small change) go over the
    // control connection: new connections would cost more round trips than they save.
    let few = large.is_empty()
        && small.len() <= FEW_FILES
        && small.iter().map(|e| e.size).sum::<u64>() <= PIPELINE_BYTES as u64;
    // Small files over a session of its own or over the control connection: only the queue
    // they take from differs.
    let job_from = |queue: FileQueue| SmallFiles {
        target: target.clone(),
        connector: opts.connector.clone(),
        local: local.clone(),
        top: dest.to_string(),
        queue,
        progress: Arc::clone(&progress),
    };
    let (small, control, spares, make_alongside) = if few {
        let dirs = make_alongside.into_iter().map(|f| (f, 0));
        pipeline(&mut control, None, dirs, expect_done).await?;
        // Each connection takes a share of the bytes, so each window opens less far.
        let mut sessions: Vec<&mut Session> = std::iter::once(&mut control)
            .chain(spares.iter_mut())
            .collect();
        let shares = split_by_size(small, sessions.len());
        let jobs = shares
            .into_iter()
            .map(|share| job_from(Arc::new(Mutex::new(VecDeque::from(share)))));
        let sends = sessions
            .iter_mut()
            .zip(jobs)
            .map(|(session, job)| async move { send_small_files_over(session, &job).await });
        futures_util::future::try_join_all(sends).await?;
        for spare in spares {
            spare.close().await;
        }
        (FileQueue::default(), Some(control), Vec::new(), None)
    } else {
        // The control connection makes the directories while the files go, then moves small
        // files beside the others, so that it is still open, and busy until about when they
        // end, for the tree's close: opening it again there costs the handshake's round trips.
        let queue: FileQueue = Arc::new(Mutex::new(VecDeque::from(small)));
        let job = job_from(Arc::clone(&queue));
        let make = async move {
            let dirs = make_alongside.into_iter().map(|f| (f, 0));
            pipeline(&mut control, None, dirs, expect_done).await?;
            tracing::debug!(elapsed = ?started.elapsed(), "directories made");
            send_small_files_over(&mut control, &job).await?;
            Ok::<_, ClientError>(KeptControl {
                session: control,
                idle_since: Instant::now(),
            })
        };
        (queue, None, spares, Some(make))
    };

    let files = Files {
        local: &local,
        target,
        top: dest,
        opts,
        ready: spares,
    };
    let send_files = files.run(
        small,
        &large,
        (&mut summary, &progress),
        send_small_files,
        |entry| {
            let (local, mut opts) = (&local, large_file_options(opts, entry.size));
            if whole.contains(&entry.path) {
                opts.delta = engine::DeltaMode::Never;
            }
            // The tree's compressor decides for its large files too: one probe for all.
            let compressor = &progress.compressor;
            async move {
                let path = entry.path.clone();
                let source = on_local(local, move |r| {
                    xfer_core::SourceFile::new(r.open_read(&path)?, path)
                })
                .await
                .map_err(|e| vanished_as(e, &entry.path))?;
                let name = join(dest, &entry.path);
                engine::send_file_sharing(source, target, &name, &opts, Some(compressor)).await
            }
        },
    );
    let kept = match make_alongside {
        Some(make) => Some(tokio::try_join!(send_files, make)?.1),
        None => {
            send_files.await?;
            None
        }
    };
    tracing::debug!(small = small_count, large = large.len(), elapsed = ?started.elapsed(), "files sent");
    if let (Some(meta), Some(file_metas)) = (&mut meta, &progress.file_metas) {
        meta.stored_with_files(file_metas, &mut summary);
    }
    progress.settle_vanished(dest, &mut written, meta.as_mut());

    let mut control = match (control, kept) {
        (Some(control), _) => control,
        (None, Some(kept)) if kept.still_open() => {
            tracing::debug!(idle = ?kept.idle_since.elapsed(), told = ?kept.session.idle_timeout, "control connection kept for the close");
            kept.session
        }
        (None, kept) => {
            if let Some(kept) = kept {
                tracing::debug!(idle = ?kept.idle_since.elapsed(), told = ?kept.session.idle_timeout, "control connection idle too long: opened again for the close");
                kept.session.close().await;
            }
            connect_deleting(target, &opts.connector, mirror).await?
        }
    };
    let link_frames: Vec<Frame> = links
        .iter()
        .map(|l| {
            Frame::MakeLink(MakeLink {
                name: join(dest, &l.path),
                target: l.target.clone(),
            })
        })
        .collect();
    // Every file and link arrived: now what the source lacks goes, then the directories get
    // their modes and mtimes, children first (adding and removing entries changed them), and
    // the receiver is flushed: one pipeline, carried out in order. With metadata, nodes and
    // hard links come with the links, before the removals, and every entry's metadata after
    // them.
    let removed = delete(&removals.after);
    if let Some(meta) = &mut meta {
        send_meta(
            &mut control,
            meta,
            dest,
            written,
            (link_frames, removed),
            &mut summary,
        )
        .await?;
    } else {
        pipeline(
            &mut control,
            None,
            link_frames.into_iter().map(|f| (f, 0)),
            expect_done,
        )
        .await?;
        let mut last = make_dirs(&last_pass, 0);
        last.reverse();
        let finish = removed
            .into_iter()
            .chain(last.into_iter().map(|f| (f, 0)))
            .chain(std::iter::once((Frame::Sync, 0)));
        pipeline(&mut control, None, finish, expect_done).await?;
    }
    control.close().await;
    tracing::debug!(elapsed = ?started.elapsed(), "links, removals and directory times set, receiver flushed");
    Ok(finished(summary, &progress, started))
}

/// A source file's opening that found it gone as [`ClientError::Vanished`].
fn vanished_as(e: ClientError, path: &str) -> ClientError {
    match e {
        ClientError::Local(CoreError::NotFound(_)) => ClientError::Vanished(path.to_string()),
        e => e,
    }
}

/// A download the daemon answered `NotFound` (the file listed is gone there) as
/// [`ClientError::Vanished`].
fn vanished_at_the_daemon(e: ClientError, path: &str) -> ClientError {
    match e {
        ClientError::Remote(e) if e.error_code() == Some(xfer_proto::ErrorCode::NotFound) => {
            ClientError::Vanished(path.to_string())
        }
        e => e,
    }
}

/// `summary` of a tree copy, either way, with what `progress` counted.
fn finished(mut summary: TreeSummary, progress: &Progress, started: Instant) -> TreeSummary {
    progress.bar.finish();
    summary.files_transferred = progress.files_done.load(Ordering::Relaxed);
    summary.bytes_transferred = progress.bytes_moved.load(Ordering::Relaxed);
    summary.wire_bytes = progress.wire.load(Ordering::Relaxed);
    summary.entries_vanished = progress.vanished_paths().len() as u64;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.literal_bytes = summary.bytes_transferred;
    summary
}

/// Finishes a tree copy to a daemon that keeps metadata in two pipelines: first the links,
/// special nodes and hard links (a node the daemon refuses is skipped with a warning); once all
/// of them arrived, the removals, every entry's owner, attributes, mode and mtime (directories
/// last, deepest first), and the flush.
async fn send_meta(
    control: &mut Session,
    meta: &mut MetaPlan,
    dest: &str,
    mut written: HashSet<String>,
    (links, removed): (Vec<Frame>, Vec<(Frame, u64)>),
    summary: &mut TreeSummary,
) -> Result<(), ClientError> {
    meta.settle_hard_links(&written, summary);
    let nodes = std::mem::take(&mut meta.nodes);
    let node_frames = nodes.iter().map(|node| {
        Frame::MakeNode(xfer_proto::MakeNode {
            name: join(dest, &node.entry.path),
            st_mode: node.meta.st_mode,
            rdev: node.meta.rdev,
        })
    });
    let hard_links = meta.hard_links.iter().map(|(name, existing)| {
        Frame::MakeHardLink(xfer_proto::MakeHardLink {
            name: join(dest, name),
            existing: join(dest, existing),
        })
    });
    let (link_count, node_count) = (links.len(), nodes.len());
    let copy = links.into_iter().chain(node_frames).chain(hard_links);
    // Answers come in request order: the `answered`-th is a node's when it falls among them.
    let mut answered: usize = 0;
    let mut made = vec![false; node_count];
    let mut skipped = Vec::new();
    pipeline(control, None, copy.map(|f| (f, 0)), |frame| {
        let node = answered.checked_sub(link_count).filter(|&i| i < node_count);
        answered += 1;
        match (frame, node) {
            (Frame::Done(_), Some(i)) => {
                made[i] = true;
                Ok(())
            }
            (Frame::Error(e), Some(i))
                if e.error_code()
                    .is_some_and(xfer_proto::ErrorCode::is_request_level) =>
            {
                skipped.push((i, e));
                Ok(())
            }
            (frame, _) => expect_done(frame),
        }
    })
    .await?;
    for (i, e) in skipped {
        eprintln!("xfer: warning: skipping {}: {e}", nodes[i].entry.path);
        summary.entries_skipped += 1;
    }
    let made: Vec<_> = nodes
        .into_iter()
        .zip(made)
        .filter_map(|(node, made)| made.then_some(node))
        .collect();
    written.extend(made.iter().map(|n| n.entry.path.clone()));
    meta.nodes = made;
    // What the source lacks goes once every entry arrived, before the directories get their
    // mtimes; no hard link or node needs it (their names are the source's).
    let mut requests = meta.requests(dest, &written);
    // A daemon that predates named ACLs is sent the kernel's values, ids as they are.
    if control.welcome.capabilities & xfer_proto::CAP_TREE_META_V2 == 0 {
        for x in requests.iter_mut().filter_map(|r| r.xattrs.as_mut()) {
            xfer_core::meta::xattrs_without_names(x);
        }
    }
    tracing::debug!(
        removals = removed.len(),
        set_meta = requests.len(),
        "removing and setting metadata"
    );
    let mut tally = Tally::default();
    let frames = removed
        .into_iter()
        .chain(requests.into_iter().map(|r| (Frame::SetMeta(r), 0)))
        .chain(std::iter::once((Frame::Sync, 0)));
    pipeline(control, None, frames, |frame| match frame {
        Frame::MetaSet(m) => {
            tally.count(&m.name, m.not_chowned, &m.xattrs_refused, summary);
            Ok(())
        }
        other => expect_done(other),
    })
    .await
}

/// Whether a tree's small files travel packed under `mode` on a connection of round trip `rtt`
/// (`limited`: under a `--bwlimit`). A level always packs. `auto` packs only on a slow path, a
/// long round trip or a bandwidth limit: on a fast one the receiver's unpacking of thousands of
/// small files costs more than the link saves (the Rust HTML docs, 52k files, took 2.1x as long
/// packed on loopback), and `auto`'s probes cannot tell: even measuring delivered bytes, a tree's
/// rate changes with the sizes of the files each probe happens to carry, and delivered is not yet
/// unpacked (the same tree, packed where the probes chose, was still 0.75x off; measured again
/// with the benchmark's inode bias gone and a losing probe cut short, 0.79x, wire/raw 0.33).
fn packing_pays(
    mode: xfer_net::Compression,
    rtt: Option<std::time::Duration>,
    limited: bool,
) -> bool {
    match mode {
        xfer_net::Compression::Off => false,
        xfer_net::Compression::Level(_) => true,
        xfer_net::Compression::Auto => limited || rtt.is_some_and(|rtt| rtt >= engine::LONG_PATH),
    }
}

/// Sends small files from `job`'s queue over `ready`, or a connection of its own.
async fn send_small_files(job: SmallFiles, ready: Option<Session>) -> Result<(), ClientError> {
    if job
        .queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_empty()
    {
        if let Some(ready) = ready {
            ready.close().await;
        }
        return Ok(());
    }
    let mut session = match ready {
        Some(session) => session,
        None => Session::connect(&job.target, &job.connector).await?,
    };
    send_small_files_over(&mut session, &job).await?;
    session.close().await;
    Ok(())
}

/// Bytes of small files a connection over a long path holds written but not yet sent, about:
/// some 30 ms of a share of a 500 Mbit/s path, more than a pack compressed (what the
/// connection writes next, once its socket wakes it below half of this) takes to make. Beyond
/// it, files stay in the queue the connections share: at the end of a tree the last ones go to
/// whichever connection sends fastest, not into the socket of a slow one. A connection whose congestion control
/// had it at a tenth of the path's rate held 1.8 MB unsent there, the last half second of the
/// docs tree through 50 ms.
const UNSENT_SMALL_FILES: u32 = 256 << 10;

/// Sends small files from `job`'s queue over `session` until the queue is empty.
async fn send_small_files_over(session: &mut Session, job: &SmallFiles) -> Result<(), ClientError> {
    // Only a long path shares itself out unevenly; on a short one every connection sends as
    // fast as the receiver takes, and a bound would only wake the sender more often.
    let far = session.rtt.is_some_and(|rtt| rtt >= engine::LONG_PATH);
    if !far {
        return send_small_files_queued(session, job).await;
    }
    session.limit_unsent(UNSENT_SMALL_FILES);
    let sent = send_small_files_queued(session, job).await;
    // What follows on this connection (a tree's closing) is not bounded so.
    session.limit_unsent(0);
    sent
}

/// [`send_small_files_over`], once the connection is set for it.
async fn send_small_files_queued(
    session: &mut Session,
    job: &SmallFiles,
) -> Result<(), ClientError> {
    let local = &job.local;
    let (dest, queue, progress) = (job.top.as_str(), &*job.queue, &*job.progress);
    let pop = || queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
    // Files go packed where the daemon speaks it and compression is asked for or pays.
    let packs = session.welcome.capabilities & xfer_proto::CAP_PACKED_FILES != 0
        && packing_pays(
            progress.compressor.mode(),
            session.rtt,
            progress.limiter.is_some(),
        );
    let capabilities = session.welcome.capabilities;
    let file_metas = progress
        .file_metas
        .as_ref()
        .filter(|_| capabilities & xfer_proto::CAP_PUT_META != 0);
    let named_acls = capabilities & xfer_proto::CAP_TREE_META_V2 != 0;
    let sent = Mutex::new(VecDeque::new());
    let mut outgoing = Outgoing {
        sent: &sent,
        ready: VecDeque::new(),
        pending: Vec::new(),
        pending_bytes: 0,
        progress,
    };
    let mut error = None;
    let mut drained = false;
    // Each file is read just before it is sent, so memory holds only the pipeline's worth
    // (and one batch being packed).
    let requests = std::iter::from_fn(|| loop {
        if let Some(request) = outgoing.ready.pop_front() {
            return Some(request);
        }
        if drained {
            return None;
        }
        let Some(entry) = pop() else {
            drained = true;
            outgoing.pack();
            continue;
        };
        let read = tokio::task::block_in_place(|| local.read_listed_small(&entry.path, SMALL_FILE));
        match read {
            Ok((identity, mode, data)) => {
                // Compressed formats go as they are, without a trial.
                let packed = packs && !looks_compressed(&data);
                let file = PutFile {
                    name: join(dest, &entry.path),
                    mtime_ns: identity.mtime_ns,
                    mode,
                    crc32: crc32fast::hash(&data),
                    data,
                };
                let file = match file_metas {
                    Some(metas) => metas.put(&entry.path, file, named_acls),
                    None => Frame::PutFile(file),
                };
                if packed {
                    outgoing.add(file);
                } else {
                    outgoing.plain(file);
                }
            }
            Err(CoreError::NotFound(_)) => progress.vanished(&entry.path),
            Err(e) => {
                error = Some(e);
                return None;
            }
        }
    });
    pipeline(session, Some(progress), requests, |frame| {
        match (frame, file_metas) {
            (Frame::MetaSet(answer), Some(metas)) => metas.stored(answer),
            (frame, _) => expect_done(frame)?,
        }
        let size = sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .unwrap_or(0);
        progress.file_done(size);
        Ok(())
    })
    .await?;
    match error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// The file a small-file request stores.
fn file_of(frame: &Frame) -> &PutFile {
    match frame {
        Frame::PutFile(file) | Frame::PutFileMeta(xfer_proto::PutFileMeta { file, .. }) => file,
        _ => unreachable!("only small files are queued"),
    }
}

/// Small files read and on their way out, in the order their answers will come.
struct Outgoing<'a> {
    /// Sizes of the files sent and not yet answered, oldest first.
    sent: &'a Mutex<VecDeque<u64>>,
    /// Requests ready to go.
    ready: VecDeque<Request>,
    /// Files waiting to be packed together (`PutFile` or `PutFileMeta`).
    pending: Vec<Frame>,
    pending_bytes: usize,
    progress: &'a Progress,
}

impl Outgoing<'_> {
    /// Queues `file` (a `PutFile` or `PutFileMeta`) as a request of its own.
    fn plain(&mut self, file: Frame) {
        let size = file_of(&file).data.len() as u64;
        self.sent_sizes([size]);
        self.progress.wire.fetch_add(size, Ordering::Relaxed);
        self.ready.push_back(Request {
            frame: file,
            answers: 1,
            in_flight: size,
            wire: size,
        });
    }

    /// Adds `file` to the batch to be packed, and packs the batch once it is full.
    fn add(&mut self, file: Frame) {
        let put = file_of(&file);
        self.pending_bytes += put.data.len() + put.name.len() + 64;
        self.pending.push(file);
        if self.pending_bytes >= PACK_BYTES || self.pending.len() >= PACK_FILES {
            self.pack();
        }
    }

    /// Queues the batch as one `PackedPutFiles` where the compressor packs it, else file by
    /// file.
    fn pack(&mut self) {
        self.pending_bytes = 0;
        if self.pending.is_empty() {
            return;
        }
        let frames = std::mem::take(&mut self.pending);
        let compressor = &self.progress.compressor;
        let packed = tokio::task::block_in_place(|| compressor.pack_files(&frames));
        let Some(packed) = packed else {
            for frame in frames {
                self.plain(frame);
            }
            return;
        };
        self.sent_sizes(frames.iter().map(|f| file_of(f).data.len() as u64));
        let request = Request::packed(packed, frames.len() as u32);
        self.progress
            .wire
            .fetch_add(request.wire, Ordering::Relaxed);
        self.ready.push_back(request);
    }

    fn sent_sizes(&self, sizes: impl IntoIterator<Item = u64>) {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(sizes);
    }
}

/// Copies the tree `name` on `target` into the local directory `dir` (created if missing).
///
/// # Errors
/// Local or remote file errors, connection failures past the retry deadline.
pub async fn recv_tree(
    target: &Target,
    name: &str,
    dir: &Path,
    opts: &Options,
    checksum: bool,
) -> Result<TreeSummary, ClientError> {
    recv_tree_mirror(target, name, dir, opts, checksum, &Mirror::default()).await
}

/// [`recv_tree`] as a mirror: filtered, removing from `dir` what the source lacks, or only
/// saying what would change (see [`mirror`]).
///
/// # Errors
/// As [`recv_tree`].
pub async fn recv_tree_mirror(
    target: &Target,
    name: &str,
    dir: &Path,
    opts: &Options,
    checksum: bool,
    mirror: &Mirror,
) -> Result<TreeSummary, ClientError> {
    let started = Instant::now();
    let keep = opts.keep;
    // The listing is asked with the control connection's `Auth` where the daemon proves
    // itself early: a round trip sooner.
    let listing = listing_first(name, checksum, keep);
    let mut control =
        Session::connect_sending(target, &opts.connector, 0, &mut None, Some(&listing)).await?;
    let with_meta = keeps_meta(&control);
    if !with_meta {
        crate::meta::warn_old_daemon(target);
    }
    let remote = list_listing(&mut control, name, with_meta, checksum, keep).await?;
    tracing::debug!(entries = remote.len(), elapsed = ?started.elapsed(), "source listed");
    let congestion = control.congestion.clone();
    control.close().await;
    if remote.is_empty() {
        return Err(CoreError::NotFound(name.to_string()).into());
    }
    let remote = mirror.filter_source(remote);
    let lists = (with_meta, keep);
    // A dry run creates nothing, not even the top.
    if mirror.dry_run && !dir.exists() {
        return dry_recv(
            name,
            opts,
            (remote, Vec::new()),
            lists,
            mirror,
            (congestion, started),
        );
    }
    let made = match mirror.dry_run {
        true => MadeDirs::default(),
        false => MadeDirs::create(dir)?,
    };
    let local = Root::open(dir)?;
    let walked = on_local(&local, move |r| walk_listing(r, with_meta, checksum, keep)).await?;
    if mirror.dry_run {
        return dry_recv(
            name,
            opts,
            (remote, walked),
            lists,
            mirror,
            (congestion, started),
        );
    }
    let mut summary = TreeSummary::new(name, opts);
    summary.congestion = congestion;
    let MirrorPlan {
        source: remote,
        receiver: have,
        mut meta,
        removals,
    } = MirrorPlan::new(remote, walked, with_meta, keep, mirror, &[], &mut summary);
    // Entries of another type are in the way of the source's: they go first.
    remove_local(&local, &removals.before).await?;
    let safe_links = meta.is_none() || keep.safe_links;
    let Plan {
        dirs,
        links,
        mut small,
        mut large,
    } = Plan::new(remote, &have, &mut summary, safe_links);
    if let Some(meta) = &meta {
        meta.route_sparse(&mut small, &mut large);
    }
    let mut written = MetaPlan::written([&dirs, &small, &large, &links]);
    let progress = Progress::new(&small, &large, opts, None);
    let top = dirs.iter().find(|d| d.path.is_empty()).cloned();
    let inner_dirs: Vec<TreeEntry> = dirs.into_iter().filter(|d| !d.path.is_empty()).collect();
    for d in &inner_dirs {
        let (path, mode, mtime) = (d.path.clone(), d.mode, d.mtime_ns);
        on_local(&local, move |r| r.make_dir(&path, mode | 0o700, mtime)).await?;
    }

    let files = Files {
        local: &local,
        target,
        top: name,
        opts,
        ready: Vec::new(),
    };
    files
        .run(
            Arc::new(Mutex::new(VecDeque::from(small))),
            &large,
            (&mut summary, &progress),
            recv_small_files,
            |entry| {
                let opts = large_file_options(opts, entry.size);
                let holes = meta.as_ref().and_then(|m| m.holes(&entry.path));
                async move {
                    let dest: PathBuf = dir.join(xfer_core::on_disk(&entry.path));
                    let name = join(name, &entry.path);
                    engine::recv_with_holes(target, &name, &dest, &opts, holes)
                        .await
                        .map_err(|e| vanished_at_the_daemon(e, &entry.path))
                }
            },
        )
        .await?;
    progress.settle_vanished("", &mut written, meta.as_mut());
    for l in &links {
        let (path, link) = (l.path.clone(), l.target.clone());
        let made = on_local(&local, move |r| match safe_links {
            true => r.make_link(&path, &link),
            false => r.make_link_verbatim(&path, &link),
        });
        if let Err(e) = made.await {
            eprintln!("xfer: warning: skipping link {}: {e}", l.path);
            summary.entries_skipped += 1;
        }
    }
    // Every file and link arrived: now what the source lacks goes, before the directories
    // get their mtimes.
    remove_local(&local, &removals.after).await?;
    if let Some(meta) = &mut meta {
        recv_meta(&local, meta, written, &mut summary).await?;
        on_local(&local, |r| r.sync()).await?;
        made.keep();
        return Ok(finished(summary, &progress, started));
    }
    for d in inner_dirs.iter().rev() {
        let (path, mode, mtime) = (d.path.clone(), d.mode, d.mtime_ns);
        on_local(&local, move |r| r.make_dir(&path, mode, mtime)).await?;
    }
    if let Some(top) = top {
        let f = std::fs::File::open(dir)
            .map_err(|e| CoreError::io(format!("opening {}", dir.display()), e))?;
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(top.mode))
            .and_then(|()| f.set_modified(xfer_core::tree::system_time(top.mtime_ns)))
            .map_err(|e| {
                CoreError::io(format!("setting mode and mtime of {}", dir.display()), e)
            })?;
    }
    on_local(&local, |r| r.sync()).await?;
    made.keep();
    Ok(finished(summary, &progress, started))
}

/// The directories a tree download made for its target, taken back if the download fails:
/// an empty directory under the name the user gave would tell a script the tree is there.
/// Only empty ones go, so partial files a rerun resumes from stay, with their directories.
#[derive(Default)]
struct MadeDirs {
    /// The highest directory this run created; `None` when the target already existed.
    top: Option<PathBuf>,
}

impl MadeDirs {
    fn create(dir: &Path) -> Result<Self, CoreError> {
        let top = dir.ancestors().take_while(|d| !d.exists()).last();
        let top = top
            .filter(|t| !t.as_os_str().is_empty())
            .map(Path::to_path_buf);
        std::fs::create_dir_all(dir)
            .map_err(|e| CoreError::io(format!("creating {}", dir.display()), e))?;
        Ok(Self { top })
    }

    /// The download succeeded: everything made stays.
    fn keep(mut self) {
        self.top = None;
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        if let Some(top) = &self.top {
            remove_empty_dirs(top);
        }
    }
}

/// Removes `dir` and the directories below it that hold nothing else, deepest first; never
/// follows a symbolic link.
fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    // Fails, as it should, where something is left.
    let _ = std::fs::remove_dir(dir);
}

/// Finishes a tree received with metadata: special nodes, hard links, then every entry's
/// owner, attributes, mode and mtime (directories last, deepest first, the top itself too).
async fn recv_meta(
    local: &Root,
    meta: &mut MetaPlan,
    mut written: HashSet<String>,
    summary: &mut TreeSummary,
) -> Result<(), ClientError> {
    for node in std::mem::take(&mut meta.nodes) {
        let (path, st_mode, rdev) = (node.entry.path.clone(), node.meta.st_mode, node.meta.rdev);
        match on_local(local, move |r| r.make_node(&path, st_mode, rdev)).await {
            Ok(()) => {
                written.insert(node.entry.path.clone());
                meta.nodes.push(node);
            }
            Err(e) => {
                eprintln!("xfer: warning: skipping {}: {e}", node.entry.path);
                summary.entries_skipped += 1;
            }
        }
    }
    meta.settle_hard_links(&written, summary);
    let links = meta.hard_links.clone();
    on_local(local, move |r| {
        links
            .iter()
            .try_for_each(|(name, existing)| r.make_hard_link(name, existing))
    })
    .await?;
    let requests = meta.requests("", &written);
    let outcomes = on_local(local, move |r| {
        requests
            .into_iter()
            .map(|req| r.set_meta(&req).map(|o| (req.name, o)))
            .collect::<xfer_core::Result<Vec<_>>>()
    })
    .await?;
    let mut tally = Tally::default();
    for (name, outcome) in outcomes {
        let refused = outcome.xattrs_refused.unwrap_or_default();
        tally.count(&name, outcome.not_chowned, &refused, summary);
    }
    Ok(())
}

/// The summary of a `recv -r --dry-run`: what would change in a receiving tree listed as
/// `walked` (empty when it does not exist yet).
fn dry_recv(
    name: &str,
    opts: &Options,
    (remote, walked): (Vec<MetaEntry>, Vec<MetaEntry>),
    (with_meta, keep): (bool, TreeOptions),
    mirror: &Mirror,
    (congestion, started): (Option<String>, Instant),
) -> Result<TreeSummary, ClientError> {
    let mut summary = TreeSummary::new(name, opts);
    summary.congestion = congestion;
    let plan = MirrorPlan::new(remote, walked, with_meta, keep, mirror, &[], &mut summary);
    let safe_links = plan.meta.is_none() || keep.safe_links;
    Plan::new(plan.source, &plan.receiver, &mut summary, safe_links);
    summary.seconds = started.elapsed().as_secs_f64();
    summary.literal_bytes = summary.bytes_transferred;
    Ok(summary)
}

/// Removes `entries` (contents first) from the local receiving tree, never through a link.
async fn remove_local(local: &Root, entries: &[TreeEntry]) -> Result<(), ClientError> {
    if entries.is_empty() {
        return Ok(());
    }
    let paths: Vec<String> = entries.iter().map(|e| e.path.clone()).collect();
    on_local(local, move |r| {
        paths.iter().try_for_each(|p| r.remove_entry(p).map(drop))
    })
    .await
}

/// Runs a local file operation on the blocking pool.
async fn on_local<T: Send + 'static>(
    local: &Root,
    f: impl FnOnce(&Root) -> xfer_core::Result<T> + Send + 'static,
) -> Result<T, ClientError> {
    let local = local.clone();
    let result = tokio::task::spawn_blocking(move || f(&local))
        .await
        .map_err(|e| CoreError::io("local task", std::io::Error::other(e.to_string())))?;
    Ok(result?)
}

async fn recv_small_files(job: SmallFiles, ready: Option<Session>) -> Result<(), ClientError> {
    let (target, connector, local) = (&job.target, &job.connector, &job.local);
    let (name, queue, progress) = (job.top.as_str(), &*job.queue, &*job.progress);
    let pop = || queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
    let Some(first) = pop() else {
        if let Some(ready) = ready {
            ready.close().await;
        }
        return Ok(());
    };
    let mut session = match ready {
        Some(session) => session,
        None => Session::connect(target, connector).await?,
    };
    // The daemon packs what this connection asked for: under `auto`, only where it pays.
    if connector.compress == Some(xfer_net::Compression::Auto)
        && session.welcome.capabilities & xfer_proto::CAP_COMPRESSION != 0
        && !packing_pays(
            xfer_net::Compression::Auto,
            session.rtt,
            progress.limiter.is_some(),
        )
    {
        let off = xfer_proto::SetCompression {
            mode: xfer_net::Compression::Off.wire(),
        };
        session.send(&Frame::SetCompression(off)).await?;
    }
    // Entries asked for and not yet answered, oldest first.
    let asked = Mutex::new(VecDeque::new());
    let mut dirs = xfer_core::DirCache::default();
    let mut next = Some(first);
    let requests = std::iter::from_fn(|| {
        let entry = next.take().or_else(pop)?;
        let frame = Frame::GetFile(GetFile {
            name: join(name, &entry.path),
            max_size: SMALL_FILE as u32,
        });
        let size = entry.size;
        asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(entry);
        Some((frame, size))
    });
    pipeline(&mut session, Some(progress), requests, |frame| {
        let f = match frame {
            Frame::FileData(f) => f,
            // Removed at the source since it was listed.
            Frame::Error(e) if e.error_code() == Some(xfer_proto::ErrorCode::NotFound) => {
                let entry = asked.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let entry = entry.ok_or(ClientError::Unexpected("Error"))?;
                progress.vanished(&entry.path);
                return Ok(());
            }
            frame => return Err(unexpected(frame)),
        };
        if crc32fast::hash(&f.data) != f.crc32 {
            return Err(ClientError::Proto(xfer_proto::ProtoError::BadCrc {
                offset: 0,
            }));
        }
        let entry = asked.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        let entry = entry.ok_or(ClientError::Unexpected("FileData"))?;
        // Written as it arrives: a small file costs a few syscalls, cheaper than a hop to the
        // blocking pool; block_in_place keeps the runtime's other tasks running meanwhile.
        tokio::task::block_in_place(|| {
            local.put_file(&mut dirs, &entry.path, f.identity.mtime_ns, f.mode, &f.data)
        })?;
        progress.writeback.stored(local, f.data.len() as u64);
        progress.file_done(f.identity.size);
        Ok(())
    })
    .await?;
    session.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use xfer_net::Compression;

    use super::*;

    /// A daemon that tells its idle timeout keeps a tree's control connection for the close
    /// through an idleness far beyond the half second of the guess: the 1.28 s a connection
    /// finishing its share of the small files early sat idle against the default 300 s, once
    /// reopened for nothing. Against a short timeout, or one untold, it is opened again.
    #[test]
    fn the_control_connection_is_kept_while_the_told_idle_timeout_allows() {
        let ms = Duration::from_millis;
        let default = Some(Duration::from_secs(300));
        let lan = Some(ms(1));
        assert!(surely_open(ms(1280), lan, default));
        assert!(surely_open(
            Duration::from_secs(140),
            Some(ms(150)),
            default
        ));
        assert!(!surely_open(Duration::from_secs(150), None, default));
        // Two round trips of a long path count against the limit.
        assert!(!surely_open(
            Duration::from_secs(149),
            Some(ms(600)),
            default
        ));
        let short = Some(Duration::from_secs(1));
        assert!(surely_open(ms(400), lan, short));
        assert!(!surely_open(ms(1280), lan, short));
        assert!(!surely_open(ms(400), Some(ms(60)), short));
        // A daemon that does not tell: the half second of the shortest it may be given.
        assert!(surely_open(ms(400), lan, None));
        assert!(!surely_open(ms(1280), lan, None));
    }

    #[test]
    fn a_packed_batch_holds_the_bytes_it_unpacks_to_in_flight() {
        let files: Vec<Frame> = (0..64u32)
            .map(|i| {
                let data = format!("<p>page {i}</p>").repeat(200).into_bytes();
                Frame::PutFile(PutFile {
                    name: format!("t/f{i}.html"),
                    mtime_ns: 0,
                    mode: 0o644,
                    crc32: crc32fast::hash(&data),
                    data,
                })
            })
            .collect();
        let raw: u64 = files.iter().map(|f| file_of(f).data.len() as u64).sum();
        let packed = xfer_net::Compressor::new(Compression::Level(1), "test")
            .pack_files(&files)
            .expect("markup shrinks");
        let request = Request::packed(packed, 64);
        assert!(request.wire * 10 < raw, "{} wire for {raw}", request.wire);
        assert!(request.in_flight >= raw, "{} in flight", request.in_flight);
        assert_eq!(request.answers, 64);
    }

    #[test]
    fn auto_packs_small_files_only_on_a_slow_path() {
        let (lan, wan) = (
            Some(Duration::from_micros(200)),
            Some(Duration::from_millis(50)),
        );
        assert!(!packing_pays(Compression::Auto, lan, false));
        assert!(!packing_pays(Compression::Auto, None, false));
        assert!(packing_pays(Compression::Auto, wan, false));
        assert!(packing_pays(Compression::Auto, lan, true));
        assert!(packing_pays(Compression::Level(3), lan, false));
        assert!(!packing_pays(Compression::Off, wan, true));
    }

    fn dir(path: &str, mode: u32) -> TreeEntry {
        TreeEntry {
            path: path.to_string(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: 0,
            mode,
            target: String::new(),
            digest: Vec::new(),
        }
    }

    #[test]
    fn only_the_directories_the_receiver_holds_are_made_before_the_files() {
        let source: Vec<TreeEntry> = ["", "new", "new/deeper", "shut", "was-file", "kept"]
            .into_iter()
            .map(|p| dir(p, 0o755))
            .collect();
        let mut was_file = dir("was-file", 0o644);
        was_file.kind = EntryKind::File;
        let receiver: HashMap<String, TreeEntry> = [
            dir("", 0o755),
            dir("shut", 0o500),
            was_file,
            dir("kept", 0o755),
        ]
        .into_iter()
        .map(|e| (e.path.clone(), e))
        .collect();
        let (first, _) = dir_passes(&source, &receiver, &[], &Removals::default());
        let (fixed_first, alongside) = made_alongside(&first, &receiver);
        let paths = |dirs: &[&TreeEntry]| dirs.iter().map(|d| d.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&fixed_first), ["shut", "was-file"]);
        assert_eq!(paths(&alongside), ["new", "new/deeper"]);
    }

    /// The files read ahead of the listing are those that may go as light deltas, small files
    /// of 64 KiB and more among them, the newest first: changed since the last copy, they are
    /// the likeliest to differ from the receiver's.
    #[test]
    fn light_candidates_are_the_light_files_newest_first() {
        let entry = |path: &str, kind, size, mtime_ns| TreeEntry {
            path: path.to_string(),
            kind,
            size,
            mtime_ns,
            mode: 0o644,
            target: String::new(),
            digest: Vec::new(),
        };
        let file = EntryKind::File;
        let entries = [
            entry("old", file, 2 << 20, 10),
            entry("new", file, 3 << 20, 30),
            entry("newer", file, LIGHT_FILE, 40),
            entry("small", file, SMALL_FILE, 50),
            entry("heavy", file, LIGHT_FILE + 1, 60),
            entry("dir", EntryKind::Dir, 2 << 20, 70),
            entry("mid", file, SMALL_FILE + 1, 20),
            entry("least", file, engine::MIN_SMALL_DELTA, 15),
            entry("tiny", file, engine::MIN_SMALL_DELTA - 1, 80),
        ];
        let candidates = light_candidates(entries.iter());
        let paths: Vec<&str> = candidates.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["small", "newer", "new", "mid", "least", "old"]);
        assert_eq!(candidates[2].1, 3 << 20);
    }

    /// The walk hands over the light files to read ahead as the copy will see them: those its
    /// filters leave out (by name, or in a directory left out) are not read.
    #[tokio::test]
    async fn the_walk_hands_over_no_light_file_the_filters_leave_out() {
        let dir = tempfile::tempdir().unwrap();
        let two_mib = vec![7u8; 2 << 20];
        std::fs::create_dir(dir.path().join("skip")).unwrap();
        for name in ["kept", "skip/inside", "noise.log"] {
            std::fs::write(dir.path().join(name), &two_mib).unwrap();
        }
        let local = Root::open(dir.path()).unwrap();
        let filter =
            xfer_core::Filter::new([(false, "skip/".to_string()), (false, "*.log".to_string())]);
        let (lights, candidates) = tokio::sync::oneshot::channel();
        let keep = TreeOptions::default();
        let walked = walk_early(&local, keep, Some((lights, filter.unwrap())));
        let candidates = candidates.await.unwrap();
        assert_eq!(candidates, [("kept".to_string(), 2 << 20)]);
        // The walk itself is whole: the filters apply to it later, as before.
        assert_eq!(walked.await.unwrap().unwrap().entries.len(), 5);
    }

    /// A tree's large files start largest first, whatever order the walk found them in: each
    /// opens a connection of its own, and the largest, started last, ended the docs tree alone
    /// after its small files.
    #[tokio::test]
    async fn large_files_start_largest_first() {
        let file = |path: &str, mib: u64| TreeEntry {
            path: path.to_string(),
            kind: EntryKind::File,
            size: mib << 20,
            mtime_ns: 0,
            mode: 0o644,
            target: String::new(),
            digest: Vec::new(),
        };
        let mut large: Vec<TreeEntry> =
            (0..40).map(|i| file(&format!("l{i}"), 2 + i % 5)).collect();
        large.extend([
            file("heavy", 64),
            file("light-biggest", 15),
            file("heavier", 100),
        ]);
        let opts = engine::test_options(Arc::new(crate::ProgressCounter::default()));
        let progress = Progress::new(&[], &large, &opts, None);
        let mut summary = TreeSummary::new("t", &opts);
        let started = Mutex::new(Vec::new());
        large_files(&large, &mut summary, &progress, |entry| {
            started.lock().unwrap().push(entry.size);
            let name = entry.path.clone();
            async move {
                Ok(engine::Summary {
                    name,
                    bytes_total: entry.size,
                    bytes_transferred: entry.size,
                    wire_bytes: entry.size,
                    resumed_bytes: 0,
                    seconds: 0.0,
                    connections: 1,
                    mbytes_per_sec: 0.0,
                    crc_retries: 0,
                    duplicate_chunks: 0,
                    congestion: None,
                    delta: false,
                    literal_bytes: entry.size,
                    matched_bytes: 0,
                    delta_reason: None,
                })
            }
        })
        .await
        .expect("every file moves");
        let started = started.into_inner().unwrap();
        assert_eq!(started.len(), large.len());
        let mut largest_first = started.clone();
        largest_first.sort_by_key(|&size| std::cmp::Reverse(size));
        assert_eq!(started, largest_first);
    }

    /// Options for a tree copy with an adaptive pool, as by default, and the spares a long
    /// path gives it.
    fn adaptive_tree() -> (Options, usize) {
        let mut opts = engine::test_options(Arc::new(crate::ProgressCounter::default()));
        opts.connections = engine::Connections::Adaptive { max: 64 };
        (opts, engine::TREE_START_LONG - 1)
    }

    /// Accepts `count` connections, each before the client was told the round trip: a bound
    /// on a hang only, should fewer connect.
    async fn accept(
        listener: &tokio::net::TcpListener,
        count: usize,
    ) -> Vec<tokio::net::TcpStream> {
        let mut accepted = Vec::new();
        while accepted.len() < count {
            let (socket, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
                .await
                .expect("every spare connects before the path is measured")
                .unwrap();
            accepted.push(socket);
        }
        accepted
    }

    /// A tree's spares opened before the first connection measured the path, against a fake
    /// daemon: the sender that tells them the round trip, the task opening them, and the
    /// connections the daemon accepted, as many as a long path wants.
    async fn spares_dialled_unmeasured() -> (
        tokio::sync::oneshot::Sender<Option<Duration>>,
        tokio::task::JoinHandle<Vec<Session>>,
        Vec<tokio::net::TcpStream>,
    ) {
        let (listener, target) = crate::session::fake_daemon().await;
        let (opts, most) = adaptive_tree();
        let (told, measured) = tokio::sync::oneshot::channel();
        let measured = measured.map(|rtt| rtt.ok().flatten());
        let client = tokio::spawn(async move { open_spares(&target, &opts, measured).await });
        let accepted = accept(&listener, most).await;
        (told, client, accepted)
    }

    /// A tree's spare connections connect at once, before the first connection has measured
    /// the path, so that their handshakes end with its listing; once it says the path is long
    /// each sends its `Hello`.
    #[tokio::test]
    async fn the_spares_connect_before_the_path_is_measured() {
        use tokio::io::AsyncReadExt;
        let (told, client, mut accepted) = spares_dialled_unmeasured().await;
        told.send(Some(Duration::from_millis(50))).unwrap();
        for socket in &mut accepted {
            // The length of a `Hello`: the handshake goes on.
            let mut hello = [0u8; 4];
            socket.read_exact(&mut hello).await.unwrap();
        }
        // Unanswered, every handshake fails, and those spares are left out.
        drop(accepted);
        assert!(client.await.unwrap().is_empty());
    }

    /// Moves the calling thread into a network namespace of its own whose loopback is up and
    /// whose system lets servers take data in the SYN (`net.ipv4.tcp_fastopen = 3`); `false`
    /// where that needs privileges this process lacks.
    fn fast_open_namespace() -> bool {
        if !rustix::process::geteuid().is_root() {
            return false;
        }
        // SAFETY: only the network namespace is unshared: no descriptor table is.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
            .expect("unshare");
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip");
        assert!(up.success());
        std::fs::write("/proc/sys/net/ipv4/tcp_fastopen", "3").unwrap();
        true
    }

    /// With TCP Fast Open, a spare's connect returns before its SYN leaves: the spares say
    /// `Hello` with their SYN before the path is measured (a round trip sooner than after it),
    /// and those the path then turns out not to want are given up without waiting for their
    /// handshake's answer.
    #[tokio::test]
    async fn with_fast_open_the_spares_say_hello_before_the_path_is_measured() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if !fast_open_namespace() {
            eprintln!("skipped: a network namespace of the test's own needs root");
            return;
        }
        let (listener, target) = crate::session::fake_daemon().await;
        xfer_net::sockopt::fast_open_listener(&listener, 64).unwrap();
        // A first connection gets the listener's cookie for the next ones.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        xfer_net::sockopt::fast_open_connect(&socket).unwrap();
        let mut first = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        first.write_all(b"x").await.unwrap();
        drop((first, listener.accept().await.unwrap()));
        let (opts, most) = adaptive_tree();
        let (told, measured) = tokio::sync::oneshot::channel();
        let measured = measured.map(|rtt| rtt.ok().flatten());
        let client = tokio::spawn(async move { open_spares(&target, &opts, measured).await });
        let mut accepted = accept(&listener, most).await;
        for socket in &mut accepted {
            // The length of a `Hello`, come before the path is known.
            let mut hello = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(30), socket.read_exact(&mut hello))
                .await
                .expect("a spare said nothing before the path was measured")
                .unwrap();
        }
        told.send(Some(Duration::from_micros(100))).unwrap();
        // Never answered, their handshakes are given up, not waited for until their own
        // timeout ends them.
        let guard = crate::session::HANDSHAKE_TIMEOUT / 2;
        let spares = tokio::time::timeout(guard, client).await;
        assert!(spares
            .expect("the spares were waited for")
            .unwrap()
            .is_empty());
        drop(accepted);
    }

    /// A short path the first connection measured at once (loopback, a LAN) dials no spare.
    #[tokio::test]
    async fn a_short_path_told_at_once_dials_no_spare() {
        let (listener, target) = crate::session::fake_daemon().await;
        let (opts, _) = adaptive_tree();
        let (told, measured) = tokio::sync::oneshot::channel();
        told.send(Some(Duration::from_micros(100))).unwrap();
        let measured = measured.map(|rtt| rtt.ok().flatten());
        assert!(open_spares(&target, &opts, measured).await.is_empty());
        // Any connection dialled was connected before `open_spares` returned.
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "a spare was dialled: {accepted:?}");
    }

    /// Where the first connection measured a short path late, the spares dialled beside it
    /// close before their `Hello`: the daemon reads nothing on them, so counts no handshake.
    #[tokio::test]
    async fn on_a_short_path_the_spares_close_before_their_hello() {
        use tokio::io::AsyncReadExt;
        let (told, client, mut accepted) = spares_dialled_unmeasured().await;
        told.send(Some(Duration::from_micros(100))).unwrap();
        for socket in &mut accepted {
            let mut sent = Vec::new();
            socket.read_to_end(&mut sent).await.unwrap();
            assert!(sent.is_empty(), "{sent:?}");
        }
        assert!(client.await.unwrap().is_empty());
    }
}
