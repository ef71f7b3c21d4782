//! Deltas: whether one pays ([`choose`]); for an upload, the exchange that makes the daemon
//! copy what it already holds ([`negotiate`]): the new file is hashed in blocks the daemon
//! looks for where they were (or, from an older daemon, cut into content-defined chunks), its
//! regions on several cores at once, and their hashes stream to the daemon in bounded
//! batches, what moved cut by content and looked for again; for a download, the same the other way ([`copy_local`]): the daemon cuts
//! its file batch by batch and the client copies from its own copy. What the receiver does not
//! find then moves as ordinary chunks.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use xfer_core::delta::{self, Basis, Cut};
use xfer_core::{CoreError, PartialFile, RangeSet, SourceFile};
use xfer_proto::{
    ByteRange, DeltaOpen, DeltaResume, DeltaSig, Frame, ReadSig, SigChunk, CAP_DELTA,
    CAP_DELTA_GUESS, CAP_DELTA_PIPELINE, CAP_READ_SIG_PIPELINE, MAX_DELTA_CHUNKS,
};

use crate::session::{next_frame, unexpected};
use crate::{ClientError, Session};

/// Whether a file goes as a delta.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeltaMode {
    /// Decide from the path and the rate limit ([`choose`]).
    #[default]
    Auto,
    /// Always try a delta (`--delta`).
    Always,
    /// Never (`--whole-file`).
    Never,
}

/// Files below this size go whole unless `--delta`: a delta costs round trips a small file
/// does not repay.
pub(super) const MIN_DELTA_SIZE: u64 = 1024 * 1024;
/// A rate limit below this makes a delta pay: one core cuts and hashes the new file at about
/// 1 GB/s and the daemon reads its old one as fast, so a link slower than a quarter of that
/// is the bottleneck.
pub(super) const DELTA_PAYS_BELOW: u64 = 256 * 1024 * 1024;
/// A path with at least this round trip is a WAN, whose rate is well below what reading both
/// files costs; below it (loopback, a LAN) sending the whole file is as fast.
pub(super) const DELTA_PAYS_FROM_RTT: Duration = super::LONG_PATH;

/// Whether to try a delta for a file of `size` bytes over `session`, and why.
pub(crate) fn choose(
    mode: DeltaMode,
    session: &Session,
    bwlimit: Option<u64>,
    size: u64,
) -> (bool, String) {
    if mode == DeltaMode::Never {
        return (false, "--whole-file".into());
    }
    if session.welcome.capabilities & CAP_DELTA == 0 {
        return (false, "the daemon does not do deltas".into());
    }
    if mode == DeltaMode::Always {
        return (true, "--delta".into());
    }
    if size < MIN_DELTA_SIZE {
        return (false, format!("{size} bytes is below {MIN_DELTA_SIZE}"));
    }
    if let Some(rate) = bwlimit.filter(|&r| r < DELTA_PAYS_BELOW) {
        return (
            true,
            format!("--bwlimit {rate} B/s is below the {DELTA_PAYS_BELOW} B/s a delta reads at"),
        );
    }
    match session.rtt {
        Some(rtt) if rtt >= DELTA_PAYS_FROM_RTT => (
            true,
            format!("a round trip of {rtt:?} is a slow path: reading both files costs less"),
        ),
        Some(rtt) => (
            false,
            format!("a round trip of {rtt:?} is a fast path: sending the file costs less"),
        ),
        None => (false, "the path's round trip is unknown".into()),
    }
}

/// A tree's changed files below this size always travel whole: a signature and a round trip
/// cost about what they hold. From here up to the small-file limit they go as deltas together
/// where [`choose`] takes their sum for the size of one file: the round trip is theirs to share,
/// and sent whole over fresh connections they take several (TCP's slow start).
pub(crate) const MIN_SMALL_DELTA: u64 = 64 * 1024;

/// Whether [`choose`] may try a delta for a large enough file over a path of round trip `rtt`
/// to a daemon that does deltas: whether reading files for one ahead of the listing can pay.
pub(crate) fn may_choose(mode: DeltaMode, bwlimit: Option<u64>, rtt: Option<Duration>) -> bool {
    match mode {
        DeltaMode::Never => false,
        DeltaMode::Always => true,
        DeltaMode::Auto => {
            bwlimit.is_some_and(|rate| rate < DELTA_PAYS_BELOW)
                || rtt.is_some_and(|rtt| rtt >= DELTA_PAYS_FROM_RTT)
        }
    }
}

/// Chunks one `DeltaSig` carries: small enough that the daemon starts copying soon after the
/// first chunks are cut, large enough that a batch is worth a frame.
const SIG_BATCH: usize = 2048;
/// `DeltaSig` frames unanswered at once with `CAP_DELTA_PIPELINE`: enough to keep the daemon
/// busy across a round trip; their answers (at most `SIG_BATCH / 2 + 1` ranges each) stay
/// well within a socket buffer.
const SIGS_IN_FLIGHT: usize = 8;

/// What one signature batch on the wire asks, in the order the answers come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    /// A `DeltaGuess` of this span: blocks looked for where the last match puts them.
    Guess(ByteRange),
    /// A `DeltaSig` of this span: content-defined chunks, searched for if they moved.
    Sig(ByteRange),
    /// Every batch of the file was sent: only guesses' misses may still be cut and sent.
    AllSent,
}

/// Asks the daemon to index the file it holds under the upload's name and copy the chunks of
/// `source` it finds there. `held` chunks are not sent again (a resumed delta). `answered` is
/// told each span of the new file the daemon answered for and the ranges of it it copied, as
/// the answers come. False when the daemon holds no file to start from.
///
/// With `CAP_DELTA_GUESS` the file is not cut by content first: it is hashed in blocks of the
/// average chunk, which the daemon looks for where its last match puts them (a change in
/// place or an append leaves everything else there). Only a guess that misses up to its end,
/// where data was inserted or removed and the rest moved, is then cut by content and sent as a
/// `DeltaSig`, which the daemon searches for; its match moves the shift the next guesses are
/// looked for at. The first guess goes alone, so a file that moved from its start is not
/// guessed at the old shift beyond it; and the bytes a small growth put past the old file's
/// end go as literal data at once, not after the last answer.
///
/// # Errors
/// Connection and protocol errors; local read errors.
pub(super) async fn negotiate(
    session: &mut Session,
    transfer_id: u64,
    source: &SourceFile,
    held: &RangeSet,
    mut answered: impl FnMut(ByteRange, &[ByteRange]) + Send,
) -> Result<bool, ClientError> {
    let size = source.identity().size;
    let guess_caps = CAP_DELTA | CAP_DELTA_PIPELINE | CAP_DELTA_GUESS;
    let guessing = session.welcome.capabilities & guess_caps == guess_caps;
    // The daemon picks the average chunk from the larger of both files, which for files of
    // similar size is the one this file gives: the cutting starts while the daemon indexes.
    let mut cutting = Cutting::start(source, held, delta::avg_chunk(size), guessing);
    session
        .send(&Frame::DeltaOpen(DeltaOpen { transfer_id }))
        .await?;
    let index = match session.next().await {
        Ok(Frame::DeltaIndex(index)) if index.transfer_id == transfer_id => index,
        Ok(other) => return Err(unexpected(other)),
        // Nothing under the name to start from (or not a regular file): the file goes whole.
        Err(e) if e.no_file_at_name().is_some() => return Ok(false),
        Err(e) => return Err(e),
    };
    let avg = index.avg_chunk;
    if !avg.is_power_of_two() || !(delta::MIN_AVG_CHUNK..=delta::MAX_AVG_CHUNK).contains(&avg) {
        return Err(ClientError::Unexpected("DeltaIndex with a bad avg_chunk"));
    }
    tracing::debug!(
        basis_size = index.basis.size,
        chunks = index.chunks,
        avg_chunk = avg,
        guessing,
        "the daemon indexed its file"
    );
    let basis_size = index.basis.size;
    // Bytes past the old file's end are most often appended: they are not guessed, and once
    // the first guess shows the file's start where it was, they go as literal data at once,
    // beside the matching instead of after its last answer. Otherwise (the start moved:
    // bytes inserted, the tail may be old bytes moved there) they are cut by content. An
    // insertion further on costs the link the growth, so only for a small one.
    let appended = (guessing && size > basis_size && size - basis_size <= size / APPENDED_AT_ONCE)
        .then(|| ByteRange::new(basis_size, size));
    if let Some(tail) = appended {
        let mut skip = held.clone();
        skip.insert(tail);
        cutting = Cutting::start(source, &skip, avg, guessing);
    } else if avg != cutting.avg {
        // A basis much larger than this file: cut again, with the daemon's average.
        cutting = Cutting::start(source, held, avg, guessing);
    }
    let depth = if session.welcome.capabilities & CAP_DELTA_PIPELINE != 0 {
        SIGS_IN_FLIGHT
    } else {
        1
    };
    // The misses of guesses to cut by content: at most one per guess batch (its end), so
    // bounded by the batches of the file; not bounded by a channel, since the answers that
    // feed it must always be read.
    let (misses_tx, misses_rx) = mpsc::unbounded_channel::<ByteRange>();
    let (recut_tx, mut recut) = mpsc::channel(RECUTS_AHEAD);
    let recutter = {
        let file = source.file();
        tokio::task::spawn_blocking(move || cut_misses(&file, avg, misses_rx, recut_tx))
    };
    // Misses sent to be cut whose last batch is not sent yet: no guess goes before them, so
    // that the daemon's search of their cut sets the shift the next guesses are looked for at.
    let due = AtomicUsize::new(0);
    // A guess found nothing, and no cut since found anything: where the file moved to is not known
    // yet, so the next batches are cut by content too, not guessed at the old shift, until a
    // cut's answer matches (and set the daemon's shift).
    let searching = AtomicBool::new(false);
    let mut cut_instead = Some(misses_tx.clone());
    // Batches go out as they are cut while their answers are read: `room` bounds the ones
    // unanswered, `asked` says in order what each answer covers (and when all were sent). A
    // first guess goes alone: if the file moved from its start, no other guess is looked for
    // at the old shift (a round trip).
    let room = Semaphore::new(if guessing { 1 } else { depth });
    let (asked_tx, mut answers_for) = mpsc::channel::<Asked>(depth + 1);
    let Session { reader, writer, .. } = session;
    let regions = &mut cutting.regions;
    let send = async {
        // In file order, region after region: the daemon hashes what it copies as it lands
        // when it lands in order, and reads back what landed ahead. The cutters of later
        // regions run ahead meanwhile.
        let mut region = 0;
        let mut recuts_open = true;
        let mut all_sent = false;
        // The next batch of the file, held while a miss is due.
        let mut waiting: Option<(ByteRange, Vec<SigChunk>)> = None;
        loop {
            if !all_sent && waiting.is_none() && region == regions.len() {
                all_sent = true;
                // No batch of the file is left to cut instead of guess: the misses close once
                // the answers have none left either.
                drop(cut_instead.take());
                // Room for it is kept: the channel holds `depth + 1`.
                let _ = asked_tx.send(Asked::AllSent).await;
            }
            let next = match waiting.take() {
                Some(batch) if due.load(Ordering::SeqCst) == 0 => (batch, guessing),
                held => {
                    waiting = held;
                    tokio::select! {
                        biased;
                        next = recut.recv(), if recuts_open => match next {
                            Some((batch, last)) => {
                                if last {
                                    due.fetch_sub(1, Ordering::SeqCst);
                                }
                                (batch, false)
                            }
                            None => {
                                recuts_open = false;
                                continue;
                            }
                        },
                        next = async {
                            match regions.get_mut(region) {
                                Some(batches) => batches.recv().await,
                                None => None,
                            }
                        }, if waiting.is_none() && region < regions.len() => {
                            match next {
                                Some(batch) => waiting = Some(batch),
                                None => region += 1,
                            }
                            continue;
                        },
                        else => break,
                    }
                }
            };
            let ((span, chunks), guessed) = next;
            if guessed && searching.load(Ordering::SeqCst) {
                if let Some(tx) = &cut_instead {
                    due.fetch_add(1, Ordering::SeqCst);
                    if tx.send(span).is_ok() {
                        continue;
                    }
                    due.fetch_sub(1, Ordering::SeqCst);
                }
            }
            room.acquire()
                .await
                .map_err(|_| ClientError::Closed)?
                .forget();
            if guessed && due.load(Ordering::SeqCst) > 0 {
                // A miss came back while this guess waited for room: its cut goes first.
                waiting = Some((span, chunks));
                room.add_permits(1);
                continue;
            }
            // Never waits: a span is queued only with room taken, `depth` at most.
            let asked = if guessed {
                Asked::Guess(span)
            } else {
                Asked::Sig(span)
            };
            let _ = asked_tx.send(asked).await;
            let sig = DeltaSig {
                transfer_id,
                offset: span.start,
                chunks,
            };
            let frame = if guessed {
                Frame::DeltaGuess(sig)
            } else {
                Frame::DeltaSig(sig)
            };
            writer.send(&frame).await?;
        }
        drop(asked_tx);
        tracing::debug!("delta: every signature batch sent");
        Ok::<_, ClientError>(())
    };
    let receive = async {
        let mut misses = Some(misses_tx);
        let mut first = true;
        // The appended bytes, once they went as literal data.
        let mut literal_tail: Option<ByteRange> = None;
        while let Some(asked) = answers_for.recv().await {
            let (span, guessed) = match asked {
                Asked::Guess(span) => (span, true),
                Asked::Sig(span) => (span, false),
                Asked::AllSent => {
                    // Every guess sent was answered before this: no more misses to cut.
                    misses = None;
                    continue;
                }
            };
            let answer = match next_frame(reader).await? {
                Frame::DeltaMatch(m) if m.transfer_id == transfer_id && m.offset == span.start => m,
                other => return Err(unexpected(other)),
            };
            let mut last_end = span.start;
            for range in &answer.matched {
                if range.is_empty() || range.start < last_end || range.end > span.end {
                    return Err(ClientError::Unexpected(
                        "DeltaMatch with ranges out of order",
                    ));
                }
                last_end = range.end;
            }
            let is_first = std::mem::take(&mut first);
            if let Some(tail) = appended.filter(|_| is_first) {
                if guessed && answer.matched == [span] {
                    literal_tail = Some(tail);
                    answered(tail, &[]);
                } else if let Some(tx) = misses.as_ref() {
                    due.fetch_add(1, Ordering::SeqCst);
                    if tx.send(tail).is_err() {
                        due.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            let miss = guessed
                .then(|| moved_miss(span, &answer.matched, basis_size, avg))
                .flatten();
            // Counted due before the room it frees: no guess may overtake its cut.
            let cutting = match (miss, misses.as_ref()) {
                (Some(miss), Some(tx)) => {
                    due.fetch_add(1, Ordering::SeqCst);
                    // A guess that found nothing at all: the file moved (a miss after matches
                    // is more often a change in place that reached the batch's end).
                    if answer.matched.is_empty() {
                        searching.store(true, Ordering::SeqCst);
                    }
                    let sent = tx.send(miss).is_ok();
                    if !sent {
                        due.fetch_sub(1, Ordering::SeqCst);
                    }
                    sent.then_some(miss)
                }
                _ => None,
            };
            if !guessed && !answer.matched.is_empty() {
                searching.store(false, Ordering::SeqCst);
            }
            match cutting {
                // Answered when its cut is: until then neither copied nor literal.
                Some(miss) => answered(ByteRange::new(span.start, miss.start), &answer.matched),
                // A guess's last block may reach past the old end, into what was answered.
                None => match literal_tail {
                    Some(tail) if span.start < tail.start && span.end > tail.start => {
                        answered(ByteRange::new(span.start, tail.start), &answer.matched)
                    }
                    _ => answered(span, &answer.matched),
                },
            }
            let widen = if is_first && guessing { depth - 1 } else { 0 };
            room.add_permits(1 + widen);
        }
        Ok(())
    };
    tokio::try_join!(send, receive)?;
    tracing::debug!("delta: every signature batch answered");
    recutter
        .await
        .map_err(|e| ClientError::Local(super::join_error(e)))?
        .map_err(|e| ClientError::Local(CoreError::io("cutting the file", e)))?;
    for cutter in cutting.cutters {
        cutter
            .await
            .map_err(|e| ClientError::Local(super::join_error(e)))?
            .map_err(|e| ClientError::Local(CoreError::io("cutting the file", e)))?;
    }
    Ok(true)
}

/// Growth of a file, as a share of its size (1/8), up to which the bytes past the old file's
/// end go as literal data at once.
const APPENDED_AT_ONCE: u64 = 8;

/// Chunks of a region's first guess batch; each next one holds twice as many, up to
/// [`SIG_BATCH`].
const FIRST_GUESS_BATCH: usize = 64;

/// Batches of misses cut by content ahead of what was sent.
const RECUTS_AHEAD: usize = 8;

/// The part of a guessed `span` worth cutting by content and sending again, given what the
/// daemon `matched` of it: the miss that runs to the span's end. A miss followed by a match
/// was changed in place (the rest is where it was) and stays literal data; one that runs to
/// the end may be where data was inserted or removed, everything after it moved, which only
/// a content-defined cut finds again. Not a miss from within a block of where the old file's
/// `basis_size` bytes end, or past it: bytes appended, found nowhere (if the file moved
/// instead, what guesses sent before the move was found lose their matches there).
fn moved_miss(
    span: ByteRange,
    matched: &[ByteRange],
    basis_size: u64,
    avg: u32,
) -> Option<ByteRange> {
    let from = matched.last().map_or(span.start, |r| r.end);
    let appended = from + u64::from(avg) >= basis_size;
    (from < span.end && !appended).then(|| ByteRange::new(from, span.end))
}

/// A batch of a miss cut by content, and whether it is the miss's last.
type RecutBatch = ((ByteRange, Vec<SigChunk>), bool);

/// Cuts each miss `misses` sends by content into `DeltaSig` batches for `batches`, until
/// either side closes. Blocking.
fn cut_misses(
    file: &std::fs::File,
    avg: u32,
    mut misses: mpsc::UnboundedReceiver<ByteRange>,
    batches: mpsc::Sender<RecutBatch>,
) -> std::io::Result<()> {
    while let Some(miss) = misses.blocking_recv() {
        let mut batch = Batch::default();
        let mut open = true;
        delta::cut_region(file, miss, avg, |cut| {
            if batch.chunks.len() == SIG_BATCH {
                if let Some(full) = batch.take() {
                    open = batches.blocking_send((full, false)).is_ok();
                }
            }
            batch.push(cut);
            open
        })?;
        // A miss is never empty: its last batch holds a chunk at least.
        if let Some(last) = batch.take().filter(|_| open) {
            open = batches.blocking_send((last, true)).is_ok();
        }
        if !open {
            break;
        }
    }
    Ok(())
}

/// Matched runs of a download's delta (at most `delta::MAX_COPY` bytes each) read ahead of
/// their writes.
const COPIES_AHEAD: usize = 2;

/// Batches of `DeltaSig` chunks cut ahead of what was sent, for all regions together (each
/// batch is `SIG_BATCH` chunks of 20 bytes: about 5 MB in all). At 2 GiB and 2 cores, each region
/// is cut whole while the daemon indexes and the first region's batches go out.
const BATCHES_AHEAD: usize = 128;

/// The new file being cut into signature batches, every region on its own blocking thread at
/// once, each a bounded number of batches ahead of what was sent. Dropping it stops the
/// cutting.
struct Cutting {
    avg: u32,
    /// Each region's batches, in file order.
    regions: Vec<mpsc::Receiver<(ByteRange, Vec<SigChunk>)>>,
    cutters: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Cutting {
    /// With `guess`, each region is hashed in blocks of `avg` bytes (`DeltaGuess`), else cut
    /// by content (`DeltaSig`).
    fn start(source: &SourceFile, held: &RangeSet, avg: u32, guess: bool) -> Self {
        let size = source.identity().size;
        let regions = delta::regions(size, xfer_core::cores());
        let ahead = (BATCHES_AHEAD / regions.len()).max(2);
        let (receivers, cutters) = regions
            .into_iter()
            .map(|region| {
                let (tx, rx) = mpsc::channel(ahead);
                let (file, held) = (source.file(), held.clone());
                let cutter = tokio::task::spawn_blocking(move || {
                    let mut batch = Batch::default();
                    let mut open = true;
                    // Guesses start small and double: the first goes alone (see
                    // `negotiate`), and soon answered.
                    let mut most = if guess { FIRST_GUESS_BATCH } else { SIG_BATCH };
                    let each = |cut: Cut| {
                        // Chunks the receiver holds are left out, and end a batch: a batch is
                        // consecutive chunks.
                        let skip = held.contains(cut.range());
                        if skip || !batch.extends(&cut) || batch.chunks.len() >= most {
                            if let Some(full) = batch.take() {
                                open = tx.blocking_send(full).is_ok();
                                most = (most * 2).min(SIG_BATCH);
                            }
                        }
                        if !skip {
                            batch.push(cut);
                        }
                        open
                    };
                    if guess {
                        delta::blocks_of_region(&file, region, avg, each)?;
                    } else {
                        delta::cut_region(&file, region, avg, each)?;
                    }
                    if let Some(last) = batch.take().filter(|_| open) {
                        let _ = tx.blocking_send(last);
                    }
                    Ok(())
                });
                (rx, cutter)
            })
            .unzip();
        Self {
            avg,
            regions: receivers,
            cutters,
        }
    }
}

/// The spans of upload `transfer_id` an earlier run's signature exchange answered for (with
/// `CAP_DELTA_PIPELINE`; none without).
///
/// # Errors
/// Connection and protocol errors.
pub(super) async fn agreed(
    session: &mut Session,
    transfer_id: u64,
) -> Result<Vec<ByteRange>, ClientError> {
    let both = CAP_DELTA | CAP_DELTA_PIPELINE;
    if session.welcome.capabilities & both != both {
        return Ok(Vec::new());
    }
    session
        .send(&Frame::DeltaResume(DeltaResume { transfer_id }))
        .await?;
    match session.next().await? {
        Frame::DeltaAgreed(a) if a.transfer_id == transfer_id => Ok(a.agreed),
        other => Err(unexpected(other)),
    }
}

/// The parts of `span` neither `held` before the delta nor `copied` by the daemon: what must
/// still move as data.
pub(super) fn literal_in(span: ByteRange, held: &RangeSet, copied: &[ByteRange]) -> Vec<ByteRange> {
    let mut cover = RangeSet::from_ranges(copied.iter().copied());
    for range in held.iter() {
        let (start, end) = (range.start.max(span.start), range.end.min(span.end));
        if start < end {
            cover.insert(ByteRange::new(start, end));
        }
    }
    if span.start > 0 {
        cover.insert(ByteRange::new(0, span.start));
    }
    cover.missing(span.end)
}

/// Copies into `partial` (a download of `name`, open on `session` as `transfer_id`) every chunk
/// of the server's file that the local file at `basis` holds, checked against its hash and
/// journaled like a received chunk; returns the bytes copied, or `None` without a local file.
///
/// The server's file is asked for in pieces ([`sig_pieces`]), each answered whole by one
/// `DeltaSig`; with `CAP_READ_SIG_PIPELINE` up to [`READ_SIGS_IN_FLIGHT`] are asked ahead, so
/// the server cuts the next pieces while this side matches one, without a round trip each.
///
/// # Errors
/// Connection and protocol errors; local read and write errors.
pub(super) async fn copy_local(
    session: &mut Session,
    transfer_id: u64,
    basis: &Path,
    partial: &Arc<PartialFile>,
) -> Result<Option<u64>, ClientError> {
    let file = match std::fs::File::open(basis) {
        Ok(file) if file.metadata().is_ok_and(|m| m.is_file()) => file,
        _ => return Ok(None),
    };
    let size = partial.identity().size;
    // Opened, not indexed: the chunks are looked for where the previous match puts them, and
    // the local file is cut only around misses in a row (`delta::Basis`).
    let basis = tokio::task::spawn_blocking(move || {
        let (old, _) = xfer_core::source::identity_of(&file)?;
        Basis::open(file, delta::avg_chunk(old.size.max(size)))
    })
    .await
    .map_err(|e| ClientError::Local(super::join_error(e)))?
    .map_err(|e| ClientError::Local(CoreError::io(format!("reading {}", basis.display()), e)))?;
    let basis = Arc::new(basis);
    let avg_chunk = basis.avg_chunk();
    let held = RangeSet::from_ranges(partial.held());
    // A piece held whole before this run (a resumed download) is not asked for.
    let pieces: Vec<ByteRange> = sig_pieces(size, avg_chunk)
        .into_iter()
        .filter(|piece| !held.contains(*piece))
        .collect();
    let depth = if session.welcome.capabilities & CAP_READ_SIG_PIPELINE != 0 {
        READ_SIGS_IN_FLIGHT
    } else {
        1
    };
    // `room` bounds the pieces asked for and not answered; `asked` says in order what each
    // answer covers.
    let room = Semaphore::new(depth);
    let (asked_tx, mut asked) = mpsc::channel::<ByteRange>(depth);
    let Session { reader, writer, .. } = session;
    let ask = async {
        for piece in &pieces {
            room.acquire()
                .await
                .map_err(|_| ClientError::Closed)?
                .forget();
            // Never waits: a piece is queued only with room taken, `depth` at most.
            let _ = asked_tx.send(*piece).await;
            let request = ReadSig {
                transfer_id,
                offset: piece.start,
                end: piece.end,
                avg_chunk,
            };
            writer.send(&Frame::ReadSig(request)).await?;
        }
        drop(asked_tx);
        Ok::<_, ClientError>(())
    };
    let copy = async {
        let (mut copied, mut read) = (0, 0);
        while let Some(piece) = asked.recv().await {
            let sig = match next_frame(reader).await? {
                Frame::DeltaSig(s) if s.transfer_id == transfer_id && s.offset == piece.start => s,
                other => return Err(unexpected(other)),
            };
            // Room for the next request at once: the server cuts it while this one is matched.
            room.add_permits(1);
            let span: u64 = sig.chunks.iter().map(|c| u64::from(c.len)).sum();
            if span != piece.len() {
                return Err(ClientError::Unexpected(
                    "DeltaSig not covering the piece asked for",
                ));
            }
            // Runs are matched on one thread and written as they come, a few at once.
            let (runs_tx, mut runs_rx) = mpsc::channel(COPIES_AHEAD);
            let matcher = Arc::clone(&basis);
            let matching = tokio::task::spawn_blocking(move || {
                matcher.copy_batch(piece.start, &sig.chunks, |offset, bytes| {
                    runs_tx.blocking_send((offset, bytes)).is_ok()
                })
            });
            while let Some((offset, bytes)) = runs_rx.recv().await {
                let range = ByteRange::new(offset, offset + bytes.len() as u64);
                // Held before this run started (a resumed download): already in place.
                if held.contains(range) {
                    continue;
                }
                let crc = crc32fast::hash(&bytes);
                partial.write(offset, bytes, crc).await?;
                copied += range.len();
            }
            read += matching
                .await
                .map_err(|e| ClientError::Local(super::join_error(e)))?
                .map_err(|e| ClientError::Local(CoreError::io("reading the local file", e)))?;
        }
        Ok((copied, read))
    };
    let ((), (copied, read)) = tokio::try_join!(ask, copy)?;
    tracing::debug!(
        copied,
        read,
        "delta: bytes copied from the local file, and bytes of it read to find them"
    );
    Ok(Some(copied))
}

/// `ReadSig` requests unanswered at once with `CAP_READ_SIG_PIPELINE`: enough that the server
/// cuts the next pieces across a round trip while this side matches one; each answer is at
/// most `MAX_DELTA_CHUNKS` chunks of 20 bytes (about 330 KB), so all of them fit the socket
/// buffers.
const READ_SIGS_IN_FLIGHT: usize = 4;
/// Most bytes of the server's file one `ReadSig` asks for: small enough that the first answer
/// comes soon and the matching starts, large enough that the forced cuts at the edges of the
/// pieces cost little (a chunk or two each).
const MAX_SIG_PIECE: u64 = 32 * 1024 * 1024;

/// The pieces a download's delta asks the server to cut, in file order: within the regions
/// both sides cut (so the regions' edges stay cut points), each at most [`MAX_SIG_PIECE`]
/// bytes and at most `MAX_DELTA_CHUNKS` chunks of the least length FastCDC cuts (`avg / 4`),
/// so that one `DeltaSig` answers it whole.
fn sig_pieces(size: u64, avg_chunk: u32) -> Vec<ByteRange> {
    let most = (MAX_DELTA_CHUNKS as u64 * u64::from(avg_chunk / 4)).min(MAX_SIG_PIECE);
    delta::regions(size, xfer_core::cores())
        .into_iter()
        .filter(|region| !region.is_empty())
        .flat_map(|region| {
            (region.start..region.end)
                .step_by(most as usize)
                .map(move |start| ByteRange::new(start, (start + most).min(region.end)))
        })
        .collect()
}

/// Consecutive chunks of the new file waiting to be sent in one `DeltaSig`.
#[derive(Debug, Default)]
struct Batch {
    offset: u64,
    end: u64,
    chunks: Vec<SigChunk>,
}

impl Batch {
    fn extends(&self, cut: &Cut) -> bool {
        self.chunks.is_empty() || cut.offset == self.end
    }

    fn push(&mut self, cut: Cut) {
        if self.chunks.is_empty() {
            self.offset = cut.offset;
        }
        self.end = cut.range().end;
        self.chunks.push(cut.sig());
    }

    /// The bytes the batch covers and its chunks, if it holds any; the batch is empty after.
    fn take(&mut self) -> Option<(ByteRange, Vec<SigChunk>)> {
        let span = (!self.chunks.is_empty()).then(|| ByteRange::new(self.offset, self.end))?;
        Some((span, std::mem::take(&mut self.chunks)))
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::bytes::Bytes;

    use super::*;

    /// Files are read ahead of the listing only where a delta may be chosen for them.
    #[test]
    fn a_delta_may_be_chosen_only_over_a_slow_path_or_a_low_rate_limit() {
        let (wan, lan) = (Some(DELTA_PAYS_FROM_RTT), Some(Duration::from_micros(200)));
        let slow = Some(DELTA_PAYS_BELOW - 1);
        assert!(may_choose(DeltaMode::Auto, None, wan));
        assert!(may_choose(DeltaMode::Auto, slow, lan));
        assert!(!may_choose(DeltaMode::Auto, None, lan));
        assert!(!may_choose(DeltaMode::Auto, Some(DELTA_PAYS_BELOW), lan));
        assert!(!may_choose(DeltaMode::Auto, None, None));
        assert!(may_choose(DeltaMode::Always, None, lan));
        assert!(!may_choose(DeltaMode::Never, slow, wan));
    }

    fn noise(len: usize, mut x: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// What a delta with guesses finds, run as `negotiate` runs it without the wire: `new`
    /// hashed in guess batches of `batch` blocks, each answered by a basis of `old` in the
    /// order sent, and the miss an answer leaves cut by content and sent `SIGS_IN_FLIGHT`
    /// batches later (the answers come a pipeline behind). The bytes matched, and the bytes
    /// of `new` cut by content.
    fn guessed_delta(old: &[u8], new: &[u8], batch: usize) -> (u64, u64) {
        let avg = delta::MIN_AVG_CHUNK;
        let file = |content: &[u8]| {
            let mut f = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut f, content).unwrap();
            f
        };
        let basis = Basis::open(file(old), avg).unwrap();
        let new_file = file(new);
        let size = new.len() as u64;
        let mut guesses = Vec::new();
        for region in delta::regions(size, 2) {
            let mut b = Batch::default();
            delta::blocks_of_region(&new_file, region, avg, |cut| {
                if b.chunks.len() == batch {
                    guesses.extend(b.take());
                }
                b.push(cut);
                true
            })
            .unwrap();
            guesses.extend(b.take());
        }
        let (mut matched, mut cut) = (0, 0);
        let mut copy = |span: ByteRange, chunks: &[SigChunk], guessed: bool| {
            let mut ranges: Vec<ByteRange> = Vec::new();
            let emit = |at: u64, bytes: Bytes| {
                assert_eq!(&new[at as usize..at as usize + bytes.len()], &bytes[..]);
                let range = ByteRange::new(at, at + bytes.len() as u64);
                match ranges.last_mut() {
                    Some(last) if last.end == range.start => last.end = range.end,
                    _ => ranges.push(range),
                }
                true
            };
            if guessed {
                basis.copy_guessed(span.start, chunks, emit).unwrap();
            } else {
                basis.copy_batch(span.start, chunks, emit).unwrap();
            }
            matched += ranges.iter().map(ByteRange::len).sum::<u64>();
            ranges
        };
        // Cuts `miss` by content and has it copied; whether anything of it was found.
        let mut recut = |miss: ByteRange, copy: &mut CopyFn| {
            cut += miss.len();
            let (tx, mut rx) = mpsc::channel(usize::MAX >> 4);
            let (misses_tx, misses_rx) = mpsc::unbounded_channel();
            misses_tx.send(miss).unwrap();
            drop(misses_tx);
            cut_misses(&new_file, avg, misses_rx, tx).unwrap();
            let mut found = false;
            while let Ok(((span, chunks), _)) = rx.try_recv() {
                found |= !copy(span, &chunks, false).is_empty();
            }
            found
        };
        let mut due = std::collections::VecDeque::new();
        // As `negotiate`'s: after a miss, batches are cut instead of guessed until a cut
        // finds something (here as soon as it does: its answer is not waited for).
        let mut searching = false;
        for (i, (span, chunks)) in guesses.iter().enumerate() {
            while due.front().is_some_and(|&(at, _)| at <= i) {
                let (_, miss) = due.pop_front().unwrap();
                if recut(miss, &mut copy) {
                    searching = false;
                }
            }
            if searching {
                if recut(*span, &mut copy) {
                    searching = false;
                }
                continue;
            }
            let ranges = copy(*span, chunks, true);
            if let Some(miss) = moved_miss(*span, &ranges, old.len() as u64, avg) {
                // The first guess goes alone; later ones a pipeline ahead of their answers.
                let ahead = if i == 0 { 1 } else { SIGS_IN_FLIGHT };
                due.push_back((i + ahead, miss));
                searching = ranges.is_empty();
            }
        }
        for (_, miss) in due {
            recut(miss, &mut copy);
        }
        (matched, cut)
    }

    /// Copies a batch's chunks from the basis (`true`: guessed); the ranges found.
    type CopyFn<'a> = dyn FnMut(ByteRange, &[SigChunk], bool) -> Vec<ByteRange> + 'a;

    /// Guess batches of 1 MiB: a 32 MiB file is 32 of them.
    const TEST_BATCH: usize = 64;

    #[test]
    fn guesses_find_an_unchanged_file_whole_without_cutting_it() {
        let old = noise(32 << 20, 21);
        assert_eq!(guessed_delta(&old, &old, TEST_BATCH), (old.len() as u64, 0));
    }

    #[test]
    fn guesses_find_a_change_in_place_and_cut_only_around_a_batch_end() {
        let old = noise(32 << 20, 22);
        let mut new = old.clone();
        for i in 0..20 {
            let at = i * 1_600_000 + 12_345;
            new[at..at + 100].fill(0xaa);
        }
        // A run at the very end of a batch looks like a move: cut, found nowhere.
        new[(5 << 20) - 50..(5 << 20) + 50].fill(0xbb);
        let (matched, cut) = guessed_delta(&old, &new, TEST_BATCH);
        let block = u64::from(delta::MIN_AVG_CHUNK);
        assert!(matched >= new.len() as u64 - 22 * 2 * block, "{matched}");
        assert!(matched < new.len() as u64);
        assert!(cut > 0 && cut <= 2 * block, "{cut}");
    }

    #[test]
    fn guesses_after_an_insertion_follow_the_shift_the_cut_misses_found() {
        let old = noise(32 << 20, 23);
        let mut new = old[..2_000_000].to_vec();
        new.extend(noise(300_000, 24));
        new.extend(&old[2_000_000..]);
        let (matched, cut) = guessed_delta(&old, &new, TEST_BATCH);
        let block = u64::from(delta::MIN_AVG_CHUNK);
        assert!(matched >= old.len() as u64 - 16 * block, "{matched}");
        // Only the batches sent before the first miss came back are cut.
        let batch = TEST_BATCH as u64 * block;
        assert!(cut <= (SIGS_IN_FLIGHT as u64 + 1) * batch, "{cut}");
        assert!(cut < new.len() as u64 / 2, "{cut}");
    }

    #[test]
    fn guesses_after_a_removal_follow_the_shift_the_cut_misses_found() {
        let old = noise(32 << 20, 25);
        let mut new = old[..3_000_000].to_vec();
        new.extend(&old[4_000_000..]);
        let (matched, _) = guessed_delta(&old, &new, TEST_BATCH);
        let block = u64::from(delta::MIN_AVG_CHUNK);
        assert!(
            matched >= new.len() as u64 - 1_000_000 / delta::REACH_PER_MISS - 16 * block,
            "{matched}"
        );
    }

    #[test]
    fn guesses_leave_an_appended_tail_literal_without_cutting_it() {
        let old = noise(32 << 20, 26);
        let mut new = old.clone();
        new.extend(noise(1 << 20, 27));
        let (matched, cut) = guessed_delta(&old, &new, TEST_BATCH);
        assert_eq!(matched, old.len() as u64);
        assert_eq!(cut, 0);
    }

    #[test]
    fn guesses_find_a_truncated_file_whole() {
        let old = noise(32 << 20, 28);
        let new = &old[..(20 << 20) + 5];
        assert_eq!(guessed_delta(&old, new, TEST_BATCH), (new.len() as u64, 0));
    }

    #[test]
    fn guesses_that_find_nothing_cut_the_file_once() {
        let old = noise(16 << 20, 29);
        let new = noise(16 << 20, 30);
        assert_eq!(guessed_delta(&old, &new, TEST_BATCH), (0, new.len() as u64));
    }

    #[test]
    fn pieces_cover_the_file_within_the_regions_each_answerable_by_one_sig() {
        for (size, avg) in [
            (1u64, delta::MIN_AVG_CHUNK),
            (100 << 20, delta::MIN_AVG_CHUNK),
            (5 << 30, 1 << 16),
        ] {
            let pieces = sig_pieces(size, avg);
            let mut at = 0;
            for piece in &pieces {
                assert_eq!(piece.start, at, "{pieces:?}");
                assert!(!piece.is_empty() && piece.len() <= MAX_SIG_PIECE);
                assert!(piece.len() <= MAX_DELTA_CHUNKS as u64 * u64::from(avg / 4));
                at = piece.end;
            }
            assert_eq!(at, size);
            // Every region edge is a piece edge: both sides force a cut there.
            for region in delta::regions(size, xfer_core::cores()) {
                assert!(pieces.iter().any(|p| p.start == region.start));
            }
        }
    }

    /// With `CAP_READ_SIG_PIPELINE` the pieces are all asked for before the first answer: the
    /// fake daemon reads every request before it answers any.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_download_asks_for_the_next_pieces_before_the_first_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let content = noise(80 << 20, 9);
        let size = content.len() as u64;
        let (local, served) = (dir.path().join("local"), dir.path().join("served"));
        std::fs::write(&local, &content).unwrap();
        std::fs::write(&served, &content).unwrap();
        let slot = xfer_core::Slot {
            dir: Arc::new(std::fs::File::open(dir.path()).unwrap()),
            leaf: "new".into(),
        };
        let identity = xfer_proto::FileIdentity { size, mtime_ns: 1 };
        let partial = PartialFile::open(slot, identity).await.unwrap();
        let (mut session, theirs) = super::super::test_session(2, 1 << 20);
        session.welcome.capabilities = CAP_DELTA | CAP_READ_SIG_PIPELINE;
        let expected = sig_pieces(size, delta::avg_chunk(size)).len();
        assert!(expected > 2);
        let daemon = tokio::spawn(async move {
            let (read, write) = tokio::io::split(theirs);
            let mut reader = xfer_net::FrameReader::new(read);
            let mut writer = xfer_net::FrameWriter::new(write);
            let mut asked = Vec::new();
            while asked.len() < expected {
                match reader.read_frame().await.unwrap() {
                    Some(Frame::ReadSig(r)) => asked.push(r),
                    other => panic!("expected a ReadSig, got {other:?}"),
                }
            }
            let file = std::fs::File::open(&served).unwrap();
            for r in asked {
                let mut chunks = Vec::new();
                delta::cut_region(&file, ByteRange::new(r.offset, r.end), r.avg_chunk, |cut| {
                    chunks.push(cut.sig());
                    true
                })
                .unwrap();
                let sig = DeltaSig {
                    transfer_id: r.transfer_id,
                    offset: r.offset,
                    chunks,
                };
                writer.send(&Frame::DeltaSig(sig)).await.unwrap();
            }
        });
        // A hang guard: without the pipeline the daemon waits for requests never sent.
        let copied = tokio::time::timeout(
            Duration::from_secs(120),
            copy_local(&mut session, 5, &local, &partial),
        )
        .await
        .expect("the pieces were asked for one at a time")
        .unwrap();
        daemon.await.unwrap();
        assert_eq!(copied, Some(size));
        assert_eq!(partial.held(), [ByteRange::new(0, size)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_region_is_cut_into_batches_of_consecutive_chunks_but_the_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content = noise(3 << 20, 7);
        std::fs::write(&path, &content).unwrap();
        let source = SourceFile::new(std::fs::File::open(&path).unwrap(), "f").unwrap();
        let held = RangeSet::from_ranges([ByteRange::new(1 << 20, 2 << 20)]);
        let mut cutting = Cutting::start(&source, &held, delta::MIN_AVG_CHUNK, false);
        let mut covered = RangeSet::new();
        assert_eq!(cutting.regions.len(), 1);
        while let Some((span, chunks)) = cutting.regions[0].recv().await {
            assert!(!chunks.is_empty() && chunks.len() <= SIG_BATCH);
            let len: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
            assert_eq!(span.len(), len);
            assert!(chunks.iter().all(|c| c.len <= 4 * delta::MIN_AVG_CHUNK));
            let before = covered.total();
            covered.insert(span);
            assert_eq!(covered.total(), before + span.len(), "batches overlap");
        }
        for cutter in cutting.cutters {
            cutter.await.unwrap().unwrap();
        }
        // The chunks not sent are those wholly within the held range, no more.
        let missing = covered.missing(content.len() as u64);
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(held.contains(missing[0]));
        assert!(missing[0].len() > (1 << 20) - 8 * 64 * 1024);
    }
}
