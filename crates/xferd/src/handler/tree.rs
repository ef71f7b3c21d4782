//! Tree requests: listings, small files stored or read in batches, directories, links and `Sync`.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::timeout;
use tracing::{debug, info};
use xfer_core::CoreError;
use xfer_net::compress::looks_compressed;
use xfer_net::Compressor;
use xfer_proto::packed::{packs_in_file_data, packs_in_put_files};
use xfer_proto::session::Request;
use xfer_proto::{
    Done, ErrorCode, ErrorFrame, FileData, Frame, GetFile, ListTree, Listing, MakeDir, MetaSet,
    PackedFiles, PutFile, PutFileMeta, TreeListing, MAX_LISTING_ENTRIES, MAX_PACKED_FRAMES,
};

use super::{fatal, ConnError, Handler, READ_ONLY};
use crate::registry::blocking;
use crate::Shared;

/// Largest file `GetFile` sends whole: well inside one control frame.
const MAX_SMALL_FILE: u64 = 1 << 20;

/// Small files a connection stores or reads in one trip to the blocking pool, at most.
const BATCH_FILES: usize = 64;

/// File bytes in one such batch, at most (beyond the file that starts it).
const BATCH_BYTES: usize = 8 << 20;

/// A small file to store: alone (`PutFile`, answered `Done`) or with its owner and attributes
/// (`PutFileMeta`, answered `MetaSet`).
pub(super) enum SmallFile {
    Plain(PutFile),
    WithMeta(PutFileMeta),
}

impl SmallFile {
    fn file(&self) -> &PutFile {
        match self {
            Self::Plain(file) | Self::WithMeta(PutFileMeta { file, .. }) => file,
        }
    }

    /// The small file a request stores, if it is one.
    fn of(request: Request) -> Result<Self, Box<Request>> {
        match request {
            Request::PutFile(file) => Ok(Self::Plain(file)),
            Request::PutFileMeta(req) => Ok(Self::WithMeta(req)),
            other => Err(Box::new(other)),
        }
    }
}

/// Encoded answers packed into one `PackedFileData`, about: enough for zstd to find what
/// small files share, small enough that the client starts on them early.
const PACK_BYTES: usize = 2 << 20;

impl Handler {
    pub(super) async fn list(&mut self, dir: &str) -> Result<(), ConnError> {
        let (root, dir) = (self.root(), dir.to_string());
        let mut entries = match blocking(move || root.list(&dir)).await {
            Ok(entries) => entries,
            Err(e) => return self.reply_error(e.code(), e.to_string()).await,
        };
        self.drop_unspeakable(&mut entries, |e| [e.name.as_str()]);
        // Names are at most 255 bytes, so a page of MAX_LISTING_ENTRIES stays far below the
        // control-frame limit.
        let mut pages = entries.chunks(MAX_LISTING_ENTRIES).peekable();
        if pages.peek().is_none() {
            return Ok(self
                .writer
                .send(&Frame::Listing(Listing {
                    entries: vec![],
                    more: false,
                }))
                .await?);
        }
        while let Some(page) = pages.next() {
            let more = pages.peek().is_some();
            self.writer
                .send(&Frame::Listing(Listing {
                    entries: page.to_vec(),
                    more,
                }))
                .await?;
        }
        Ok(())
    }

    pub(super) async fn list_tree(&mut self, req: ListTree) -> Result<(), ConnError> {
        let root = self.root();
        let dir = req.dir.clone();
        let mut entries = match blocking(move || root.walk(&dir, req.digests)).await {
            Ok(entries) => entries,
            Err(e) => return self.reply_error(e.code(), e.to_string()).await,
        };
        self.drop_unspeakable(&mut entries, |e| [e.path.as_str(), e.target.as_str()]);
        // Pages bounded by count and by bytes, so each stays far below the control-frame limit.
        let mut page = Vec::new();
        let mut page_bytes = 0;
        let total = entries.len();
        for (i, entry) in entries.into_iter().enumerate() {
            page_bytes += 64 + entry.path.len() + entry.target.len();
            page.push(entry);
            if page.len() == MAX_LISTING_ENTRIES || page_bytes > 1 << 20 || i + 1 == total {
                let more = i + 1 < total;
                let entries = std::mem::take(&mut page);
                page_bytes = 0;
                self.writer
                    .send(&Frame::TreeListing(TreeListing { entries, more }))
                    .await?;
            }
        }
        Ok(())
    }

    /// Leaves out of a listing the entries whose name (or link target) stands for bytes that
    /// are not UTF-8, for a client that cannot take them (no `CAP_RAW_NAMES`, proto.md §8.5):
    /// it would store the escapes as characters.
    pub(super) fn drop_unspeakable<T, const N: usize>(
        &self,
        entries: &mut Vec<T>,
        names: impl Fn(&T) -> [&str; N],
    ) {
        if self.session.capabilities() & xfer_proto::CAP_RAW_NAMES != 0 {
            return;
        }
        let before = entries.len();
        entries.retain(|e| !names(e).iter().any(|n| xfer_proto::names::is_escaped(n)));
        if entries.len() < before {
            tracing::warn!(
                left_out = before - entries.len(),
                "entries whose names are not UTF-8 left out of a listing: the client predates CAP_RAW_NAMES"
            );
        }
    }

    /// Runs one tree operation that changes the root, answering `Done` or an error.
    pub(super) async fn tree_op(
        &mut self,
        name: String,
        op: impl FnOnce(&xfer_core::Root) -> xfer_core::Result<()> + Send + 'static,
    ) -> Result<(), ConnError> {
        if self.shared.config.read_only {
            return self
                .reply_error(ErrorCode::ReadOnly, READ_ONLY.into())
                .await;
        }
        if self.shared.registry.is_open(&name) {
            let message = format!("{name} is being uploaded by another client");
            return self.reply_error(ErrorCode::InUse, message).await;
        }
        let root = self.root();
        match blocking(move || op(&root)).await {
            Ok(()) => Ok(self.writer.send(&Frame::Done(Done { name })).await?),
            Err(e) => {
                info!(name = %name, error = %e, "tree request refused");
                self.reply_error(e.code(), e.to_string()).await
            }
        }
    }

    /// Makes directory `first` and those pipelined behind it that are already buffered, in one
    /// trip to the blocking pool, and answers them in order with one write: a tree's
    /// directories cost a trip each before, which on a busy machine is a wait for the
    /// scheduler each. An error that ends the connection ends it after the answers before it.
    pub(super) async fn make_dirs(&mut self, first: MakeDir) -> Result<(), ConnError> {
        let batch = self.gather(
            first,
            |_| 0,
            |request| match request {
                Request::MakeDir(req) => Ok(req),
                other => Err(Box::new(other)),
            },
        )?;
        let outcomes = self.on_disk(batch, |r| r.name.clone(), make_dirs).await;
        self.answer(outcomes, None).await
    }

    /// The outcome of each request of `batch`, in order: `work` runs them in one trip to the
    /// blocking pool, or each is refused on a read-only daemon. A failed trip is one outcome
    /// that ends the connection. Borrows nothing of the handler while it runs.
    fn on_disk<T: Send + 'static>(
        &self,
        batch: Vec<T>,
        name: impl Fn(&T) -> String,
        work: fn(&xfer_core::Root, &Shared, Vec<T>) -> Vec<StoreOutcome>,
    ) -> impl std::future::Future<Output = Vec<StoreOutcome>> + Send + 'static {
        let refused = self.shared.config.read_only.then(|| {
            let refusal = || Err((ErrorCode::ReadOnly, READ_ONLY.to_string()));
            batch.iter().map(|r| (name(r), refusal())).collect()
        });
        let (root, shared) = (self.root(), Arc::clone(&self.shared));
        async move {
            match refused {
                Some(outcomes) => outcomes,
                None => blocking(move || Ok(work(&root, &shared, batch)))
                    .await
                    .unwrap_or_else(|e: CoreError| {
                        vec![(String::new(), Err((e.code(), e.to_string())))]
                    }),
            }
        }
    }

    /// Stores `first` and the small files pipelined behind it that are already buffered, in one
    /// trip to the blocking pool, and answers them with one write: per file, the cost is the
    /// filesystem's alone. Each is answered (`Done` or a request-level error) in order.
    pub(super) async fn put_files(&mut self, first: SmallFile) -> Result<(), ConnError> {
        let batch = self.gather(first, |r| r.file().data.len(), SmallFile::of)?;
        let wire = batch.iter().map(|r| r.file().data.len() as u64).sum();
        self.store_files(batch, wire).await
    }

    /// Unpacks a `PackedPutFiles` on the blocking pool, into memory reserved from the
    /// daemon's budget first (the decompressed bytes and the frames decoded from them), and
    /// stores the files as if each `PutFile` had come alone.
    pub(super) async fn packed_put_files(&mut self, packed: PackedFiles) -> Result<(), ConnError> {
        // Damage is caught before a byte is decompressed; like a PutFile's, it ends the
        // connection.
        if !packed.crc_matches() {
            let message = "packed small files failed their CRC";
            return Err(fatal(ErrorCode::BadCrc, message));
        }
        let wire = packed.zstd.len() as u64;
        let raw_len = packed.raw_len as usize;
        let mut reservation = self.shared.budget.reserve(2 * raw_len).await;
        // Half for the frames decoded, half for the bytes decompressed, into a buffer the
        // budget kept from an earlier batch where it has one (its pages already touched).
        let for_frames = reservation.split(raw_len);
        let (buffer, reservation) = reservation.buffer(raw_len);
        let (frames, buffer) = tokio::task::spawn_blocking(move || {
            let mut buffer = buffer;
            let frames = packed.unpack_reusing("PackedPutFiles", &mut buffer, packs_in_put_files);
            (frames, buffer)
        })
        .await
        .map_err(|e| fatal(ErrorCode::Io, format!("decompression task failed: {e}")))?;
        // The frames copied what they keep: the buffer may serve the next batch.
        reservation.recycle(buffer);
        let frames = frames.map_err(|e| fatal(ErrorCode::Protocol, e.to_string()))?;
        let mut batch = Vec::with_capacity(frames.len());
        for frame in frames {
            // Checked one by one as the session checks any request (a grant's scope).
            match SmallFile::of(self.session.handle_request(frame)?) {
                Ok(file) => batch.push(file),
                Err(_) => unreachable!("only small files unpack from PackedPutFiles"),
            }
        }
        let stored = self.store_files(batch, wire).await;
        drop(for_frames);
        stored
    }

    /// Stores a batch of small files (`wire`: the bytes they took on the wire) and answers
    /// each, in order, with one write.
    async fn store_files(&mut self, mut batch: Vec<SmallFile>, wire: u64) -> Result<(), ConnError> {
        let metrics = &self.shared.metrics;
        let bytes = batch.iter().map(|r| r.file().data.len() as u64).sum();
        metrics.small_file_bytes_received.add(bytes);
        metrics.small_file_wire_bytes_received.add(wire);
        // Bit errors in a control frame: the stream can no longer be trusted. The files before
        // it are stored and answered; the connection ends there.
        let mut end = None;
        if let Some(bad) = batch
            .iter()
            .position(|r| crc32fast::hash(&r.file().data) != r.file().crc32)
        {
            let message = format!("{}: data failed its CRC", batch[bad].file().name);
            end = Some(fatal(ErrorCode::BadCrc, message));
            batch.truncate(bad);
        }
        let outcomes = self
            .on_disk(batch, |r| r.file().name.clone(), store_small_files)
            .await;
        if !self.shared.config.read_only {
            self.shared.writeback.stored(&self.root(), bytes);
        }
        self.answer(outcomes, end).await
    }

    /// Answers `outcomes` in order with one write, up to the first error that ends the
    /// connection; that error, or `end` if none, is returned after the answers are sent.
    async fn answer(
        &mut self,
        outcomes: Vec<StoreOutcome>,
        mut end: Option<ConnError>,
    ) -> Result<(), ConnError> {
        let mut replies = Vec::with_capacity(outcomes.len());
        for (name, outcome) in outcomes {
            match outcome {
                Ok(answer) => replies.push(answer),
                Err((code, message)) if code.is_request_level() => {
                    info!(name = %name, error = %message, "tree request refused");
                    replies.push(Frame::Error(ErrorFrame::new(code, message)));
                }
                Err((code, message)) => {
                    end = Some(fatal(code, message));
                    break;
                }
            }
        }
        self.writer.send_all(&replies).await?;
        end.map_or(Ok(()), Err)
    }

    /// Reads `first` and the `GetFile`s pipelined behind it that are already buffered, in one
    /// trip to the blocking pool per 8 MiB of answers, and answers them in order with one write.
    pub(super) async fn get_files(&mut self, first: GetFile) -> Result<(), ConnError> {
        let mut batch = VecDeque::from(self.gather(
            first,
            |_| 0,
            |request| match request {
                Request::GetFile(req) => Ok(req),
                other => Err(Box::new(other)),
            },
        )?);
        // Answers travel packed where the client speaks it and compression is not off.
        let packer = match self.compression() {
            xfer_net::Compression::Off => None,
            _ if self.session.capabilities() & xfer_proto::CAP_PACKED_FILES == 0 => None,
            mode => Some(self.compressor(mode).clone()),
        };
        while !batch.is_empty() {
            let root = self.root();
            let packer = packer.clone();
            let shared = Arc::clone(&self.shared);
            // The answers are held in bytes reserved from the daemon's budget until sent.
            let most: u64 = batch
                .iter()
                .map(|r| u64::from(r.max_size).min(MAX_SMALL_FILE))
                .sum();
            let most = most.min((BATCH_BYTES as u64) + MAX_SMALL_FILE);
            // Packing holds the answers encoded beside them while it compresses them.
            let most = if packer.is_some() { 2 * most } else { most };
            let reservation = self.shared.budget.reserve(most as usize).await;
            let (replies, rest, end) = blocking(move || {
                let (replies, rest, end) = read_small_files(&root, batch);
                let metrics = &shared.metrics;
                let raw = replies.iter().map(file_bytes).sum();
                metrics.small_file_bytes_sent.add(raw);
                let replies = match &packer {
                    Some(packer) => pack_answers(packer, replies),
                    None => replies,
                };
                let wire = replies.iter().map(file_bytes).sum();
                metrics.small_file_wire_bytes_sent.add(wire);
                Ok((replies, rest, end))
            })
            .await
            .map_err(|e| fatal(e.code(), e.to_string()))?;
            batch = rest;
            self.writer.send_all(&replies).await?;
            drop(replies);
            drop(reservation);
            if let Some(e) = end {
                return Err(ConnError::Fatal(e));
            }
        }
        Ok(())
    }

    /// `first` and the requests of its kind already buffered behind it, up to
    /// `BATCH_FILES` of them and `BATCH_BYTES` as `size` counts; a request of another
    /// kind read meanwhile is kept to be handled next.
    pub(super) fn gather<T>(
        &mut self,
        first: T,
        size: impl Fn(&T) -> usize,
        pick: impl Fn(Request) -> Result<T, Box<Request>>,
    ) -> Result<Vec<T>, ConnError> {
        let mut bytes = size(&first);
        let mut batch = vec![first];
        while batch.len() < BATCH_FILES && bytes < BATCH_BYTES {
            let Some(frame) = self.reader.buffered_frame()? else {
                break;
            };
            match pick(self.session.handle_request(frame)?) {
                Ok(req) => {
                    bytes += size(&req);
                    batch.push(req);
                }
                Err(other) => {
                    self.pending = Some(*other);
                    break;
                }
            }
        }
        Ok(batch)
    }

    pub(super) async fn sync(&mut self) -> Result<(), ConnError> {
        let root = self.root();
        blocking(move || root.sync())
            .await
            .map_err(|e| fatal(e.code(), e.to_string()))?;
        Ok(self
            .writer
            .send(&Frame::Done(Done {
                name: String::new(),
            }))
            .await?)
    }

    /// `AwaitCommits`: holds what follows on this connection (a tree's closing) until the
    /// commits of the uploads named, carried out on the tree's other connections, settle; then
    /// answers `Done`. Bounded as an idle connection is: those commits were all sent before this
    /// request, so one still unsettled after that long is not coming, and the client is told.
    pub(super) async fn await_commits(&mut self, names: &[String]) -> Result<(), ConnError> {
        let idle = self.shared.config.idle_timeout;
        let shutdown = self.shared.shutdown.clone();
        let settled = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                return Err(fatal(ErrorCode::ShuttingDown, "server shutting down; rerun to resume"));
            }
            settled = timeout(idle, self.shared.registry.await_commits(names)) => settled,
        };
        if settled.is_err() {
            let message = format!("awaited commits not carried out within {idle:?}");
            return self.reply_error(ErrorCode::Incomplete, message).await;
        }
        debug!(names = names.len(), "awaited commits settled");
        Ok(self
            .writer
            .send(&Frame::Done(Done {
                name: String::new(),
            }))
            .await?)
    }
}

/// Reads the small files `batch` asks for, in order, until the answers hold `BATCH_BYTES`;
/// returns the answers (`FileData` or a request-level error each), the requests left, and an
/// error that ends the connection (only errors about one request leave it usable).
fn read_small_files(
    root: &xfer_core::Root,
    mut batch: VecDeque<GetFile>,
) -> (Vec<Frame>, VecDeque<GetFile>, Option<ErrorFrame>) {
    let mut replies = Vec::with_capacity(batch.len());
    let mut bytes = 0;
    while bytes < BATCH_BYTES {
        let Some(req) = batch.pop_front() else { break };
        let max = u64::from(req.max_size).min(MAX_SMALL_FILE);
        replies.push(match root.read_small(&req.name, max) {
            Ok((identity, mode, data)) => {
                bytes += data.len();
                Frame::FileData(FileData {
                    identity,
                    mode,
                    crc32: crc32fast::hash(&data),
                    data,
                })
            }
            Err(e) if e.code().is_request_level() => {
                Frame::Error(ErrorFrame::new(e.code(), e.to_string()))
            }
            Err(e) => {
                return (
                    replies,
                    VecDeque::new(),
                    Some(ErrorFrame::new(e.code(), e.to_string())),
                )
            }
        });
    }
    (replies, batch, None)
}

/// File bytes a frame carries on the wire: a `FileData`'s, a packed frame's compressed bytes.
fn file_bytes(frame: &Frame) -> u64 {
    match frame {
        Frame::FileData(f) => f.data.len() as u64,
        Frame::PackedFileData(p) => p.zstd.len() as u64,
        _ => 0,
    }
}

/// Answers to `GetFile` as they go out with packing in force: runs of answers packed by
/// `packer` (as it decides, about [`PACK_BYTES`] each), files that look compressed already
/// as they are, all in the same order.
fn pack_answers(packer: &Compressor, replies: Vec<Frame>) -> Vec<Frame> {
    let mut out = Vec::with_capacity(replies.len());
    let mut run = Vec::new();
    let mut run_bytes = 0;
    let flush = |run: &mut Vec<Frame>, out: &mut Vec<Frame>| {
        if run.is_empty() {
            return;
        }
        match packer.pack_files(run) {
            Some(packed) => {
                out.push(Frame::PackedFileData(packed));
                run.clear();
            }
            None => out.append(run),
        }
    };
    for reply in replies {
        let packs = match &reply {
            Frame::FileData(f) => !looks_compressed(&f.data),
            other => packs_in_file_data(other),
        };
        if !packs {
            // Sent as it is; the run before it is packed first, so answers keep their order.
            flush(&mut run, &mut out);
            run_bytes = 0;
            out.push(reply);
            continue;
        }
        run_bytes += match &reply {
            Frame::FileData(f) => f.data.len() + 64,
            _ => 64,
        };
        run.push(reply);
        if run_bytes >= PACK_BYTES || run.len() >= MAX_PACKED_FRAMES as usize {
            flush(&mut run, &mut out);
            run_bytes = 0;
        }
    }
    flush(&mut run, &mut out);
    out
}

/// A stored file's name, and its answer or the error it got.
type StoreOutcome = (String, Result<Frame, (ErrorCode, String)>);

/// Makes a batch of directories in order, stopping at the first error that ends the connection.
fn make_dirs(root: &xfer_core::Root, shared: &Shared, batch: Vec<MakeDir>) -> Vec<StoreOutcome> {
    let mut outcomes = Vec::with_capacity(batch.len());
    for req in batch {
        let outcome = if shared.registry.is_open(&req.name) {
            let message = format!("{} is being uploaded by another client", req.name);
            Err((ErrorCode::InUse, message))
        } else {
            root.make_dir(&req.name, req.mode, req.mtime_ns)
                .map(|()| {
                    Frame::Done(Done {
                        name: req.name.clone(),
                    })
                })
                .map_err(|e| (e.code(), e.to_string()))
        };
        let fatal = outcome
            .as_ref()
            .is_err_and(|(code, _)| !code.is_request_level());
        outcomes.push((req.name, outcome));
        if fatal {
            break;
        }
    }
    outcomes
}

/// Stores a batch of small files in order, stopping at the first error that ends the connection
/// (request-level errors, such as a directory in the way, do not stop it).
fn store_small_files(
    root: &xfer_core::Root,
    shared: &Shared,
    batch: Vec<SmallFile>,
) -> Vec<StoreOutcome> {
    let mut dirs = xfer_core::DirCache::default();
    let mut outcomes = Vec::with_capacity(batch.len());
    for req in batch {
        let name = req.file().name.clone();
        let outcome = if shared.registry.is_open(&name) {
            let message = format!("{name} is being uploaded by another client");
            Err((ErrorCode::InUse, message))
        } else {
            match &req {
                SmallFile::Plain(f) => root
                    .put_file(&mut dirs, &f.name, f.mtime_ns, f.mode, &f.data)
                    .map(|()| Frame::Done(Done { name: name.clone() })),
                SmallFile::WithMeta(r) => root
                    .put_file_meta(&mut dirs, &r.file.data, &r.set_meta())
                    .map(|outcome| {
                        Frame::MetaSet(MetaSet {
                            name: name.clone(),
                            not_chowned: outcome.not_chowned,
                            xattrs_refused: outcome.xattrs_refused.unwrap_or_default(),
                        })
                    }),
            }
            .map_err(|e| (e.code(), e.to_string()))
        };
        let fatal = outcome
            .as_ref()
            .is_err_and(|(code, _)| !code.is_request_level());
        outcomes.push((name, outcome));
        if fatal {
            break;
        }
    }
    outcomes
}
