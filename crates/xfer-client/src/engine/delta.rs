//! Deltas: whether one pays ([`choose`]); for an upload, the exchange that makes the daemon
//! copy what it already holds ([`negotiate`]): the new file is cut into content-defined
//! chunks, its regions on several cores at once, and their hashes stream to the daemon in
//! bounded batches; for a download, the same the other way ([`copy_local`]): the daemon cuts
//! its file batch by batch and the client copies from its own copy. What the receiver does not
//! find then moves as ordinary chunks.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use xfer_core::delta::{self, Basis, Cut};
use xfer_core::{CoreError, PartialFile, RangeSet, SourceFile};
use xfer_proto::{
    ByteRange, DeltaOpen, DeltaResume, DeltaSig, ErrorCode, Frame, ReadSig, SigChunk, CAP_DELTA,
    CAP_DELTA_PIPELINE,
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
pub(super) fn choose(
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

/// Chunks one `DeltaSig` carries: small enough that the daemon starts copying soon after the
/// first chunks are cut, large enough that a batch is worth a frame.
const SIG_BATCH: usize = 2048;
/// `DeltaSig` frames unanswered at once with `CAP_DELTA_PIPELINE`: enough to keep the daemon
/// busy across a round trip; their answers (at most `SIG_BATCH / 2 + 1` ranges each) stay
/// well within a socket buffer.
const SIGS_IN_FLIGHT: usize = 8;

/// Asks the daemon to index the file it holds under the upload's name and copy the chunks of
/// `source` it finds there. `held` chunks are not sent again (a resumed delta). `answered` is
/// told each span of the new file the daemon answered for and the ranges of it it copied, as
/// the answers come. False when the daemon holds no file to start from.
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
    // The daemon picks the average chunk from the larger of both files, which for files of
    // similar size is the one this file gives: the cutting starts while the daemon indexes.
    let mut cutting = Cutting::start(source, held, delta::avg_chunk(size));
    session
        .send(&Frame::DeltaOpen(DeltaOpen { transfer_id }))
        .await?;
    let index = match session.next().await {
        Ok(Frame::DeltaIndex(index)) if index.transfer_id == transfer_id => index,
        Ok(other) => return Err(unexpected(other)),
        // Nothing under the name to start from (or not a regular file): the file goes whole.
        Err(ClientError::Remote(e))
            if matches!(
                e.error_code(),
                Some(ErrorCode::NotFound | ErrorCode::BadPath)
            ) =>
        {
            return Ok(false)
        }
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
        "the daemon indexed its file"
    );
    if avg != cutting.avg {
        // A basis much larger than this file: cut again, with the daemon's average.
        cutting = Cutting::start(source, held, avg);
    }
    let depth = if session.welcome.capabilities & CAP_DELTA_PIPELINE != 0 {
        SIGS_IN_FLIGHT
    } else {
        1
    };
    // Batches go out as they are cut while their answers are read: `room` bounds the ones
    // unanswered, `spans` says in order what each answer covers.
    let room = Semaphore::new(depth);
    let (spans, mut answers_for) = mpsc::channel::<ByteRange>(depth);
    let Session { reader, writer, .. } = session;
    let regions = &mut cutting.regions;
    let send = async {
        // In file order, region after region: the daemon hashes what it copies as it lands
        // when it lands in order, and reads back what landed ahead. The cutters of later
        // regions run ahead meanwhile.
        for batches in regions.iter_mut() {
            while let Some((span, chunks)) = batches.recv().await {
                room.acquire()
                    .await
                    .map_err(|_| ClientError::Closed)?
                    .forget();
                // Never waits: a span is queued only with room taken, `depth` at most.
                let _ = spans.send(span).await;
                let sig = DeltaSig {
                    transfer_id,
                    offset: span.start,
                    chunks,
                };
                writer.send(&Frame::DeltaSig(sig)).await?;
            }
        }
        drop(spans);
        tracing::debug!("delta: every signature batch sent");
        Ok::<_, ClientError>(())
    };
    let receive = async {
        while let Some(span) = answers_for.recv().await {
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
            answered(span, &answer.matched);
            room.add_permits(1);
        }
        Ok(())
    };
    tokio::try_join!(send, receive)?;
    tracing::debug!("delta: every signature batch answered");
    for cutter in cutting.cutters {
        cutter
            .await
            .map_err(|e| ClientError::Local(super::join_error(e)))?
            .map_err(|e| ClientError::Local(CoreError::io("cutting the file", e)))?;
    }
    Ok(true)
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
    fn start(source: &SourceFile, held: &RangeSet, avg: u32) -> Self {
        let size = source.identity().size;
        let regions = delta::regions(size, delta::parallelism());
        let ahead = (BATCHES_AHEAD / regions.len()).max(2);
        let (receivers, cutters) = regions
            .into_iter()
            .map(|region| {
                let (tx, rx) = mpsc::channel(ahead);
                let (file, held) = (source.file(), held.clone());
                let cutter = tokio::task::spawn_blocking(move || {
                    let mut batch = Batch::default();
                    let mut open = true;
                    delta::cut_region(&file, region, avg, |cut| {
                        // Chunks the receiver holds are left out, and end a batch: a batch is
                        // consecutive chunks.
                        let skip = held.contains(cut.range());
                        if skip || !batch.extends(&cut) || batch.chunks.len() == SIG_BATCH {
                            if let Some(full) = batch.take() {
                                open = tx.blocking_send(full).is_ok();
                            }
                        }
                        if !skip {
                            batch.push(cut);
                        }
                        open
                    })?;
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
    let held = RangeSet::from_ranges(partial.held());
    let (mut copied, mut read) = (0, 0);
    for region in delta::regions(size, delta::parallelism()) {
        let mut pos = region.start;
        while pos < region.end {
            let ask = ReadSig {
                transfer_id,
                offset: pos,
                end: region.end,
                avg_chunk: basis.avg_chunk(),
            };
            session.send(&Frame::ReadSig(ask)).await?;
            let sig = match session.next().await? {
                Frame::DeltaSig(s) if s.transfer_id == transfer_id && s.offset == pos => s,
                other => return Err(unexpected(other)),
            };
            let span: u64 = sig.chunks.iter().map(|c| u64::from(c.len)).sum();
            if sig.chunks.is_empty() || pos + span > region.end {
                return Err(ClientError::Unexpected(
                    "DeltaSig outside the region asked for",
                ));
            }
            // Runs are matched on one thread and written as they come, a few at once.
            let (runs_tx, mut runs_rx) = mpsc::channel(COPIES_AHEAD);
            let matcher = Arc::clone(&basis);
            let matching = tokio::task::spawn_blocking(move || {
                matcher.copy_batch(pos, &sig.chunks, |offset, bytes| {
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
            pos += span;
        }
    }
    tracing::debug!(
        copied,
        read,
        "delta: bytes copied from the local file, and bytes of it read to find them"
    );
    Ok(Some(copied))
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
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_region_is_cut_into_batches_of_consecutive_chunks_but_the_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut x = 7u64;
        let content: Vec<u8> = (0..(3 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&path, &content).unwrap();
        let source = SourceFile::new(std::fs::File::open(&path).unwrap(), "f").unwrap();
        let held = RangeSet::from_ranges([ByteRange::new(1 << 20, 2 << 20)]);
        let mut cutting = Cutting::start(&source, &held, delta::MIN_AVG_CHUNK);
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
