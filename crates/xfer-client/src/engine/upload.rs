//! Uploads: [`send`] and [`send_file`]. Data frames go out under the window and come back as
//! `Ack` or `Reject`; the whole-file digest is read beside the transfer and sent with the
//! commit. A delta ([`delta`]) first lets the daemon copy what its old file holds.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;
use xfer_core::digest::DigestKind;
use xfer_core::{MemoryBudget, RangeSet, SourceFile};
use xfer_net::Compressor;
use xfer_proto::{ByteRange, ChunkRef, Commit, ErrorCode, Frame, List, OpenWrite, OpenWriteSparse};

use super::delta;
use super::pool::{drive, Early, Opener, Opening};
use super::queue::Work;
use super::retry::{connect_retrying, reopen, COMMIT_ATTEMPTS};
use super::window::{acknowledged, Answer, Direction, Window};
use super::{chunk_size, chunk_size_for, close_all, join_error, metered, path_policy, Tally};
use super::{Options, Summary};
use crate::session::refuse_unspeakable;
use crate::session::{unexpected, FirstFrames};
use crate::{ClientError, Session, Target};

struct Upload {
    source: SourceFile,
    request: OpenWrite,
    /// Holes of the source, sent as `Zeros` (only to a daemon with `CAP_TREE_META`).
    holes: RangeSet,
    /// Compresses chunks for every connection of the pool, which measures and decides as one.
    compressor: Compressor,
    /// What every chunk read is reserved from first (the process's memory budget).
    memory: Option<MemoryBudget>,
}

impl Upload {
    async fn open_with_held(
        &self,
        session: &mut Session,
    ) -> Result<(u64, Vec<ByteRange>), ClientError> {
        let open = open_frame(&self.request, &self.holes, session.welcome.capabilities);
        session.send(&open).await?;
        Self::opened(session).await
    }

    /// The answer to the open `session` sent.
    async fn opened(session: &mut Session) -> Result<(u64, Vec<ByteRange>), ClientError> {
        match session.next().await? {
            Frame::WriteOpened(w) => Ok((w.transfer_id, w.held)),
            other => Err(unexpected(other)),
        }
    }
}

/// The frame that opens `request` on a connection of `capabilities`, for a source with `holes`
/// (which reach only a daemon with `CAP_TREE_META`).
fn open_frame(request: &OpenWrite, holes: &RangeSet, capabilities: u64) -> Frame {
    // A daemon that knows the holes up front reserves no space for them.
    if holes.total() > 0 && capabilities & xfer_proto::CAP_TREE_META_V2 != 0 {
        Frame::OpenWriteSparse(OpenWriteSparse {
            open: request.clone(),
            holes: holes.iter().collect(),
        })
    } else {
        Frame::OpenWrite(request.clone())
    }
}

/// The holes of `source` a daemon granting `capabilities` is told of.
fn holes_for(holes: &RangeSet, capabilities: u64) -> RangeSet {
    if capabilities & xfer_proto::CAP_TREE_META != 0 {
        holes.clone()
    } else {
        RangeSet::new()
    }
}

impl Direction for Upload {
    async fn open(&self, session: &mut Session) -> Result<u64, ClientError> {
        Ok(self.open_with_held(session).await?.0)
    }

    fn max_chunk(&self, _: &Session) -> u32 {
        // Chunks were planned within the daemon's limit when the upload was opened.
        u32::MAX
    }

    async fn request(
        &self,
        session: &mut Session,
        transfer_id: u64,
        chunk: ByteRange,
        work: &Work,
    ) -> Result<(), ClientError> {
        if self.holes.contains(chunk) {
            let zeros = ChunkRef {
                transfer_id,
                offset: chunk.start,
                len: chunk.len() as u32,
            };
            return session.send(&Frame::Zeros(zeros)).await;
        }
        let payload = match &self.memory {
            Some(budget) => {
                let reservation = budget.reserve(chunk.len() as usize).await;
                self.source.read_reserved(chunk, reservation).await?
            }
            None => self.source.read(chunk).await?,
        };
        let compresses = session.welcome.capabilities & xfer_proto::CAP_COMPRESSION != 0;
        let packed = self
            .compressor
            .pack_if(compresses, transfer_id, chunk.start, payload)
            .await;
        // `--bwlimit` limits the wire: a compressed chunk costs what it takes there.
        work.throttle(packed.wire).await;
        session.send(&packed.frame).await?;
        work.transferred.fetch_add(chunk.len(), Ordering::Relaxed);
        Ok(())
    }

    async fn answer(
        &self,
        session: &mut Session,
        _transfer_id: u64,
        window: &mut Window,
        _work: &Work,
    ) -> Result<Answer, ClientError> {
        acknowledged(session, window).await
    }
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
    send_file_sharing(source, target, name, opts, None).await
}

/// [`send_file`] for a file of a larger copy (a tree's large file): with `shared`, the copy's
/// compressor, whose `auto` decisions this upload follows, measured by the copy's meter of
/// delivered bytes (`opts.connector.delivered`), which this upload's connections feed too.
///
/// # Errors
/// As [`send`].
pub(crate) async fn send_file_sharing(
    source: SourceFile,
    target: &Target,
    name: &str,
    opts: &Options,
    shared: Option<&Compressor>,
) -> Result<Summary, ClientError> {
    let started = Instant::now();
    let mut opts = metered(opts);
    let compressor = match shared {
        Some(shared) => {
            opts.connector.delivered = shared.delivered().cloned();
            shared.sharing_decisions()
        }
        None => Compressor::new(opts.connector.compress.unwrap_or_default(), "upload")
            .with_delivered(opts.connector.delivered.clone()),
    };
    let opts = &opts;
    let identity = source.identity();
    let (connections, size) = (opts.connections, identity.size);
    let start_on = move |rtt| connections.initial_for(rtt, size);
    // The holes are found before connecting, so that the open can go with the handshake.
    let all_holes = {
        let source = source.clone();
        let holes = tokio::task::spawn_blocking(move || source.holes())
            .await
            .map_err(|e| ClientError::Local(join_error(e)))??;
        RangeSet::from_ranges(holes)
    };
    let (open_name, mode, wanted_chunk) = (name.to_string(), source.mode(), opts.chunk_size);
    let request = move |welcome: &xfer_proto::Welcome| OpenWrite {
        name: open_name.clone(),
        identity,
        mode,
        chunk_size: chunk_size_for(wanted_chunk, welcome),
    };
    // The first connection opens the upload with its `Auth` where the daemon proves itself
    // early: the open's round trip overlaps the handshake's last.
    let open_first: FirstFrames = {
        let (holes, request) = (all_holes.clone(), request.clone());
        Arc::new(move |welcome: &xfer_proto::Welcome| {
            let open = request(welcome);
            // Not a name the daemon would store as its escapes: refused once connected.
            if refuse_unspeakable(welcome.capabilities, [open.name.as_str()]).is_err() {
                return Vec::new();
            }
            let holes = holes_for(&holes, welcome.capabilities);
            vec![open_frame(&open, &holes, welcome.capabilities)]
        })
    };
    let probe: FirstFrames = {
        let name = name.to_string();
        Arc::new(move |_: &xfer_proto::Welcome| vec![probe_frame(&name)])
    };
    let opening = Opening {
        first: Arc::clone(&open_first),
        others: open_first,
        answered: None,
    };
    let (mut session, mut early) =
        Early::connect_first(target, opts, start_on, Some(opening), Some(probe)).await?;
    refuse_unspeakable(session.welcome.capabilities, [name])?;
    let (opts, congestion) = path_policy(opts, &mut session);
    let opts = &opts;
    early.top_up(target, opts, session.rtt, identity.size);
    let chunk_size = chunk_size(opts, &session);
    let holes = holes_for(&all_holes, session.welcome.capabilities);
    let upload = Arc::new(Upload {
        request: request(&session.welcome),
        source,
        holes,
        compressor,
        memory: opts.connector.memory.clone(),
    });
    let size = identity.size;
    let (wanted, why) = delta::choose(opts.delta, &session, opts.bwlimit, size);
    // Where a delta is wanted, a connection started beside this one asks whether the name
    // holds a file at all while this one opens the upload: for a new name the data then goes
    // at once, where the delta's own question would have held it back a round trip.
    let (probe, absent) = if wanted {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Some(probe_opener(&upload, tx)), Some(rx))
    } else {
        (None, None)
    };
    early.open_ahead(opener(&upload), probe);
    let early = Arc::new(early);
    let (mut id, mut held) = match std::mem::take(&mut session.first_sent) {
        true => Upload::opened(&mut session).await?,
        false => upload.open_with_held(&mut session).await?,
    };
    // Every connection of the upload reaches the same daemon, which grants the same bits.
    let digest_kind = DigestKind::of_capabilities(session.welcome.capabilities);
    let resumed = RangeSet::from_ranges(held.iter().copied()).total();
    let mut tally = Tally::start(opts, name, identity.size, resumed, started, congestion);
    let work = Arc::new(Work::new(Vec::new(), opts));
    let mut have = RangeSet::from_ranges(held.iter().copied());
    let mut queued = false;
    if wanted && have.total() > 0 && have.total() < size {
        // A resumed delta: what an earlier run's exchange answered for is not compared again,
        // and its literal data goes at once.
        let agreed = delta::agreed(&mut session, id).await?;
        if !agreed.is_empty() {
            let literal: Vec<ByteRange> = agreed
                .iter()
                .flat_map(|&span| delta::literal_in(span, &have, &[]))
                .collect();
            tracing::debug!(
                agreed = agreed.iter().map(ByteRange::len).sum::<u64>(),
                "a resumed delta: spans already compared"
            );
            work.add(xfer_core::meta::split_at_holes(
                &literal,
                &upload.holes,
                chunk_size,
            ));
            for span in agreed {
                have.insert(span);
            }
            tally.delta = true;
            tally.why = Some(format!("delta transfer, resumed: {why}"));
            queued = true;
        }
    }
    let mut negotiation = JoinSet::new();
    let mut inline = None;
    let mut session = Some(session);
    let fresh = match absent {
        // Not for a resumed upload: its delta's agreed spans are asked for below.
        Some(absent) if !queued && have.total() == 0 => absent.await.unwrap_or(false),
        _ => false,
    };
    if wanted && fresh {
        tracing::info!(file = %name, "whole file: the daemon holds no file under the name");
        tally.why = Some(format!(
            "whole file: the daemon holds no file under the name to start from ({why})"
        ));
    } else if wanted && have.total() < size {
        if let Some(mut s) = session.take() {
            if opts.connections.initial_for(s.rtt, size) == 1 {
                // A pool of one: nothing to overlap with, the literal data follows on it.
                let progress = &*opts.progress;
                let (found, usable) =
                    run_delta(&mut s, id, &upload, have, &work, chunk_size, progress).await;
                inline = Some(found);
                session = usable.then_some(s);
            } else {
                // The signatures are compared on the first connection while the rest of the
                // pool moves the literal data each answer leaves, as it comes.
                let hold = work.hold();
                let (upload, work) = (Arc::clone(&upload), Arc::clone(&work));
                let progress = opts.progress.clone();
                negotiation.spawn(async move {
                    let (found, usable) =
                        run_delta(&mut s, id, &upload, have, &work, chunk_size, &*progress).await;
                    drop(hold);
                    if usable {
                        s.close().await;
                    }
                    found
                });
            }
            queued = true;
        }
    } else if !queued {
        tracing::info!(file = %name, "whole file: {why}");
        tally.why = Some(format!("whole file: {why}"));
    }
    let mut delta_used = tally.delta;
    // The whole-file digest is read front to back beside the transfer, not after it.
    let digest = {
        let source = upload.source.clone();
        tokio::spawn(async move { source.digest_as(digest_kind).await })
    };
    let mut digest = Some(digest);
    let mut digest_bytes = Vec::new();
    for _ in 0..COMMIT_ATTEMPTS {
        if !std::mem::take(&mut queued) {
            let missing = RangeSet::from_ranges(held.iter().copied()).missing(identity.size);
            work.add(xfer_core::meta::split_at_holes(
                &missing,
                &upload.holes,
                chunk_size,
            ));
        }
        // Without a connection of its own (the first one compares signatures), the pool
        // starts on its early connections at once rather than after a new handshake.
        let first = session.take().map(|s| (s, id));
        let mut sessions = drive(
            target,
            Arc::clone(&upload),
            Arc::clone(&work),
            first,
            Arc::clone(&early),
            opts,
        )
        .await?;
        // A next attempt opens the upload anew: what was opened ahead is not used for it.
        early.expire();
        let (mut s, sid) = match sessions.pop() {
            Some(open) => open,
            None => reopen(target, &*upload, opts).await?,
        };
        close_all(sessions).await;
        let found = match negotiation.join_next().await {
            Some(joined) => Some(joined.map_err(|e| ClientError::Local(join_error(e)))?),
            None => inline.take(),
        };
        if let Some(found) = found {
            delta_used |= found.is_some();
            tally.delta = delta_used;
            tally.matched = found.unwrap_or(0);
            if delta_used {
                tracing::info!(
                    file = %name,
                    matched_bytes = tally.matched,
                    literal = size - resumed - tally.matched,
                    "delta transfer: {why}"
                );
                tally.why = Some(format!("delta transfer: {why}"));
            } else {
                tally.why = Some(format!(
                    "whole file: the daemon holds no file under the name to start from ({why})"
                ));
            }
        }
        if let Some(task) = digest.take() {
            let d = task
                .await
                .map_err(|e| ClientError::Local(join_error(e)))??;
            digest_bytes = d.to_vec();
        }
        upload.source.check_unchanged()?;
        tracing::debug!("every byte sent and the digest read: committing");
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
                let mut summary = tally.finish(&work, opts);
                summary.wire_bytes = upload.compressor.totals().wire.load(Ordering::Relaxed);
                return Ok(summary);
            }
            // The file the daemon held changed while chunks were copied from it: the digest
            // caught it and the daemon dropped the partial. Everything goes again, whole.
            Err(ClientError::Remote(e))
                if delta_used && e.error_code() == Some(ErrorCode::Corrupt) =>
            {
                tracing::warn!(file = %name, error = %e, "the delta did not add up; sending the whole file");
                delta_used = false;
                tally.delta = false;
                tally.matched = 0;
                tally.why =
                    Some("whole file: sent again after the delta's digest did not match".into());
                (id, held) = upload.open_with_held(&mut s).await?;
                session = Some(s);
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

/// Opens `upload` on an early connection as soon as it is welcomed.
fn opener(upload: &Arc<Upload>) -> Opener {
    let upload = Arc::clone(upload);
    Arc::new(move |mut session: Session| {
        let upload = Arc::clone(&upload);
        Box::pin(async move {
            let id = upload.open(&mut session).await?;
            Ok((session, id))
        })
    })
}

/// Opens `upload` as [`opener`] does, after asking whether the daemon holds anything under the
/// upload's name: `absent` gets true if nothing (`List` of the name answered `NotFound`, as
/// `DeltaOpen` would), false if something or if the answer says neither.
fn probe_opener(upload: &Arc<Upload>, absent: tokio::sync::oneshot::Sender<bool>) -> Opener {
    let upload = Arc::clone(upload);
    let absent = std::sync::Mutex::new(Some(absent));
    Arc::new(move |mut session: Session| {
        let upload = Arc::clone(&upload);
        let absent = absent.lock().unwrap_or_else(|p| p.into_inner()).take();
        Box::pin(async move {
            let found = name_is_absent(&mut session, &upload.request.name).await;
            if let Some(absent) = absent {
                let _ = absent.send(matches!(found, Ok(true)));
            }
            found?;
            let id = upload.open(&mut session).await?;
            Ok((session, id))
        })
    })
}

/// Whether nothing is at `name` on the daemon: `List` of a name that does not exist is answered
/// `NotFound`; of a file, `BadPath`; of a directory, its listing, read to the end.
async fn name_is_absent(session: &mut Session, name: &str) -> Result<bool, ClientError> {
    // Asked with the handshake and answered already.
    if let Some(absent) = session.absent.take() {
        return Ok(absent);
    }
    session.send(&probe_frame(name)).await?;
    absence_answer(session).await
}

/// The probe of a delta: a `List` of the upload's name.
fn probe_frame(name: &str) -> Frame {
    Frame::List(List {
        dir: name.to_string(),
    })
}

/// Reads the answer to [`probe_frame`]: true if the daemon holds nothing under the name.
pub(super) async fn absence_answer(session: &mut Session) -> Result<bool, ClientError> {
    loop {
        match session.next().await {
            Ok(Frame::Listing(page)) if page.more => {}
            Ok(Frame::Listing(_)) => return Ok(false),
            Ok(other) => return Err(unexpected(other)),
            Err(e) => return e.no_file_at_name().ok_or(e),
        }
    }
}

/// Runs a delta on `session`: every span the daemon answers for queues on `work` what it did not
/// copy, and once the exchange ends whatever it did not answer for goes whole. The bytes the
/// daemon copied, or `None` when it had no file to start from; and whether `session` is still
/// usable (false after a failed exchange).
async fn run_delta(
    session: &mut Session,
    id: u64,
    upload: &Upload,
    held: RangeSet,
    work: &Work,
    chunk_size: u32,
    progress: &dyn crate::Progress,
) -> (Option<u64>, bool) {
    let mut answered = held.clone();
    let mut matched = 0;
    let outcome = delta::negotiate(session, id, &upload.source, &held, |span, copied| {
        let literal = delta::literal_in(span, &held, copied);
        work.add(xfer_core::meta::split_at_holes(
            &literal,
            &upload.holes,
            chunk_size,
        ));
        let bytes: u64 = copied.iter().map(ByteRange::len).sum();
        progress.inc(bytes);
        matched += bytes;
        answered.insert(span);
    })
    .await;
    let rest = answered.missing(upload.source.identity().size);
    work.add(xfer_core::meta::split_at_holes(
        &rest,
        &upload.holes,
        chunk_size,
    ));
    match outcome {
        Ok(true) => (Some(matched), true),
        Ok(false) => {
            tracing::info!("whole file: the daemon holds no file under the name");
            (None, true)
        }
        Err(e) => {
            tracing::warn!(error = %e, "the delta failed; the rest of the file goes whole");
            ((matched > 0).then_some(matched), false)
        }
    }
}

#[cfg(test)]
mod tests {
    use xfer_net::{FrameReader, FrameWriter};

    use super::super::window::{pump, Pumped};
    use super::super::{test_options, test_session};
    use super::*;
    use crate::ProgressCounter;

    #[tokio::test]
    async fn an_upload_sends_each_chunk_of_the_file_with_its_crc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let source = SourceFile::new(std::fs::File::open(&path).unwrap(), "f").unwrap();
        let upload = Upload {
            request: OpenWrite {
                name: "f".into(),
                identity: source.identity(),
                mode: 0o644,
                chunk_size: 4096,
            },
            source,
            holes: RangeSet::new(),
            compressor: Compressor::new(xfer_net::Compression::Off, "upload"),
            memory: None,
        };
        let progress = Arc::new(ProgressCounter::default());
        let chunks = xfer_core::split_into_chunks(&[ByteRange::new(0, 10_000)], 4096);
        let work = Work::new(chunks, &test_options(progress.clone()));
        let (mut session, theirs) = test_session(2, 4096);
        let daemon = tokio::spawn(async move {
            let (read, write) = tokio::io::split(theirs);
            let (mut reader, mut writer) = (FrameReader::new(read), FrameWriter::new(write));
            let mut received = vec![0; 10_000];
            for _ in 0..3 {
                let Some(Frame::Data(data)) = reader.read_frame().await.unwrap() else {
                    panic!("expected data");
                };
                assert_eq!(data.transfer_id, 9);
                data.verify().unwrap();
                let range = data.range();
                received[range.start as usize..range.end as usize].copy_from_slice(&data.payload);
                let chunk = ChunkRef {
                    transfer_id: 9,
                    offset: range.start,
                    len: range.len() as u32,
                };
                writer.send(&Frame::Ack(chunk)).await.unwrap();
            }
            received
        });
        assert_eq!(
            pump(&upload, &mut session, 9, &work).await.unwrap(),
            Pumped::Drained
        );
        assert_eq!(daemon.await.unwrap(), content);
        assert_eq!(work.transferred.load(Ordering::Relaxed), 10_000);
        assert_eq!(progress.done(), 10_000);
    }
}
