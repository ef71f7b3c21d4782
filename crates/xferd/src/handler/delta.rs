//! Delta uploads (`CAP_DELTA`): `DeltaOpen` opens the file held under the upload's name,
//! and each `DeltaSig` copies the chunks that file still holds into the partial (found where
//! the previous match puts them, or searched for, see `xfer_core::delta::Basis`), recorded in
//! the journal like received chunks, so an interrupted delta resumes from what was copied.
//! `DeltaPut` (`CAP_DELTA_PUT`) does all three for a light file in one request. A `DeltaGuess`
//! is answered as a `DeltaSig`, its chunks looked for only where the previous match puts them.
//! With `CAP_DELTA_FINE`, a `DeltaPut`'s match is followed by `DeltaBlocks`, the basis around
//! each span it left summed in small blocks, and the client's `DeltaCopy` copies the blocks it
//! found there (`xfer_core::fine`).
//! A `DeltaPut` is answered once its chunks are matched; the matched runs are written, and
//! their span agreed, behind the answer ([`Copies`]): whatever needs those bytes on disk (the
//! commit above all) waits for them first.
//! For a download, `ReadSig` cuts the chunks of the file served, for the client to match.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc;
use tracing::info;
use xfer_core::delta::{self, Basis};
use xfer_core::fine;
use xfer_core::{CoreError, RangeSet};
use xfer_proto::session::{DownloadId, UploadId};
use xfer_proto::{
    ByteRange, DeltaAgreed, DeltaBlocks, DeltaCopy, DeltaIndex, DeltaMatch, DeltaPut, DeltaSig,
    ErrorCode, Frame, ReadSig, SigChunk, MAX_DELTA_CHUNKS, MAX_FINE_GAP, MAX_RANGES,
};

use super::{fatal, ConnError, Download, Handler, Upload};
use crate::registry::blocking;

/// Groups of basis bytes one `DeltaSig` copies at once: enough to keep the cores and the disk
/// busy, each group holding at most `delta::MAX_COPY` bytes of the memory budget.
const MAX_PARALLEL_COPIES: usize = 4;

impl Handler {
    pub(super) async fn delta_open(&mut self, id: UploadId) -> Result<(), ConnError> {
        let Upload { lease, name, .. } = self.session.upload(id)?;
        let (new_size, name) = (lease.partial.identity().size, name.clone());
        let avg = move |basis_size: u64| delta::avg_chunk(basis_size.max(new_size));
        let Some(basis) = self.open_basis(&name, avg).await? else {
            return Ok(());
        };
        info!(name = %name, basis_size = basis.identity().size, "delta basis opened");
        let reply = DeltaIndex {
            transfer_id: id.get(),
            basis: basis.identity(),
            avg_chunk: basis.avg_chunk(),
            chunks: 0,
        };
        self.session.upload(id)?.basis = Some(basis);
        self.writer.send(&Frame::DeltaIndex(reply)).await?;
        Ok(())
    }

    /// Opens the file `name` holds now as a delta's basis, cut with the average chunk `avg`
    /// gives for its size. Only opened: it is read while the chunks are matched (`Basis`), so
    /// the answer goes at once instead of after reading and indexing the whole file. `None`
    /// once the client was told why there is none (not fatal: the upload stays open).
    async fn open_basis(
        &mut self,
        name: &str,
        avg: impl FnOnce(u64) -> u32 + Send + 'static,
    ) -> Result<Option<Arc<Basis>>, ConnError> {
        let root = self.root();
        let basis = name.to_string();
        let opened = blocking(move || {
            let file = root.open_read(&basis)?;
            let reading = |e| CoreError::io(format!("reading {basis}"), e);
            let (identity, _) = xfer_core::source::identity_of(&file).map_err(reading)?;
            Basis::open(file, avg(identity.size)).map_err(reading)
        })
        .await;
        match opened {
            Ok(basis) => Ok(Some(Arc::new(basis))),
            Err(e) => {
                info!(name = %name, error = %e, "no basis for a delta");
                self.reply_error(e.code(), e.to_string()).await?;
                Ok(None)
            }
        }
    }

    pub(super) async fn delta_resume(&mut self, id: UploadId) -> Result<(), ConnError> {
        let Upload { lease, .. } = self.session.upload(id)?;
        let mut agreed = lease.partial.agreed();
        // Spans are few (consecutive ones merge); past the limit the rest is compared again.
        agreed.truncate(MAX_RANGES);
        self.writer
            .send(&Frame::DeltaAgreed(DeltaAgreed {
                transfer_id: id.get(),
                agreed,
            }))
            .await?;
        Ok(())
    }

    /// A `DeltaSig`, or with `guessed` a `DeltaGuess`, whose chunks are looked for only where
    /// the previous match puts them.
    pub(super) async fn delta_sig(
        &mut self,
        id: UploadId,
        sig: DeltaSig,
        guessed: bool,
    ) -> Result<(), ConnError> {
        // The engine's batches are answered once written, as each match places the next.
        self.finish_copies(id).await?;
        let (matched, _, copies) = self
            .copy_from_basis(id, sig.offset, sig.chunks, guessed)
            .await?;
        copies.finish().await?;
        self.writer
            .send(&Frame::DeltaMatch(DeltaMatch {
                transfer_id: id.get(),
                offset: sig.offset,
                matched,
            }))
            .await?;
        Ok(())
    }

    /// `DeltaPut`: the upload opened as for `OpenWrite`, its basis as for `DeltaOpen` (with the
    /// client's average chunk), and the whole signature matched as one `DeltaSig` would be, but
    /// for the chunks the partial already holds (a resumed upload), which are not copied again.
    pub(super) async fn delta_put(&mut self, put: DeltaPut) -> Result<(), ConnError> {
        let DeltaPut {
            open,
            avg_chunk,
            chunks,
        } = put;
        let name = open.name.clone();
        let Some(id) = self.open_write(open, Vec::new()).await? else {
            return Ok(());
        };
        if self.session.capabilities() & xfer_proto::CAP_DELTA_PUT_SYNC != 0 {
            // The client ends the tree with `Sync` and waits for it: that flush covers this file.
            self.session.upload(id)?.durability = xfer_core::Durability::AtSync;
        }
        let Some(basis) = self.open_basis(&name, move |_| avg_chunk).await? else {
            return Ok(());
        };
        let upload = self.session.upload(id)?;
        upload.basis = Some(basis);
        let held = RangeSet::from_ranges(upload.lease.partial.held());
        // Runs of consecutive chunks the partial does not hold yet, each matched as a DeltaSig.
        let mut runs: Vec<(u64, Vec<SigChunk>)> = Vec::new();
        let mut at = 0;
        let mut last_end = None;
        for chunk in chunks {
            let range = ByteRange::new(at, at + u64::from(chunk.len));
            at = range.end;
            if held.contains(range) {
                continue;
            }
            match runs.last_mut() {
                Some((_, run)) if last_end == Some(range.start) => run.push(chunk),
                _ => runs.push((range.start, vec![chunk])),
            }
            last_end = Some(range.end);
        }
        let (mut matched, mut located) = (Vec::new(), Vec::new());
        for (offset, run) in runs {
            let (found, at, copies) = self.copy_from_basis(id, offset, run, false).await?;
            matched.extend(found);
            located.extend(at);
            // Written behind the answer: the client sends the rest meanwhile.
            self.copies.push(copies);
        }
        let fine = self.session.capabilities() & xfer_proto::CAP_DELTA_FINE != 0;
        let mut covered = held;
        matched.iter().for_each(|range| covered.insert(*range));
        self.writer
            .send(&Frame::DeltaMatch(DeltaMatch {
                transfer_id: id.get(),
                offset: 0,
                matched,
            }))
            .await?;
        if fine {
            self.send_blocks(id, covered, located).await?;
        }
        Ok(())
    }

    /// `DeltaBlocks` for a `DeltaPut` whose chunks left the upload `covered`: the basis around
    /// each span left (found from the shift of the runs `located` either side, see
    /// `xfer_core::fine::plan`), summed in blocks.
    async fn send_blocks(
        &mut self,
        id: UploadId,
        covered: RangeSet,
        located: Vec<(ByteRange, u64)>,
    ) -> Result<(), ConnError> {
        let Upload {
            lease, name, basis, ..
        } = self.session.upload(id)?;
        let Some(basis) = basis.clone() else {
            return Err(fatal(ErrorCode::Protocol, "DeltaBlocks without a basis"));
        };
        let (size, name) = (lease.partial.identity().size, name.clone());
        // One gap's basis bytes are read at once.
        let _reservation = self.shared.budget.reserve(fine::MAX_OLD_LEN as usize).await;
        let summed = blocking(move || {
            let basis_size = basis.identity().size;
            let (block_len, gaps) = fine::plan(size, basis_size, &covered, &located);
            let sums = fine::block_sums(basis.file(), &gaps, block_len)
                .map_err(|e| CoreError::io("reading the delta basis", e))?;
            Ok((block_len, gaps, sums))
        })
        .await;
        let (block_len, gaps, sums) = match summed {
            Ok(summed) => summed,
            // A basis that shrank since it was opened: no blocks, the spans go as data.
            Err(e) => {
                tracing::debug!(name = %name, error = %e, "no blocks to match finer");
                (fine::FINE_BLOCK, Vec::new(), Vec::new())
            }
        };
        self.shared
            .metrics
            .delta_basis_read
            .add(gaps.iter().map(|g| g.old.len()).sum());
        self.writer
            .send(&Frame::DeltaBlocks(DeltaBlocks {
                transfer_id: id.get(),
                block_len,
                gaps,
                sums,
            }))
            .await?;
        Ok(())
    }

    /// `DeltaCopy`: copies into the upload `id` the runs of its basis the client found within
    /// the spans of `DeltaBlocks`, each only if its bytes still hash as the client's. Not
    /// answered: a run left out leaves the upload short of it at the commit.
    pub(super) async fn delta_copy(
        &mut self,
        id: UploadId,
        copy: DeltaCopy,
    ) -> Result<(), ConnError> {
        let Upload {
            lease, name, basis, ..
        } = self.session.upload(id)?;
        let Some(basis) = basis.clone() else {
            return Err(fatal(ErrorCode::Protocol, "DeltaCopy before a basis"));
        };
        let (partial, name) = (Arc::clone(&lease.partial), name.clone());
        self.finish_copies(id).await?;
        // A group (at most MAX_COPY, or one run of up to MAX_FINE_GAP) being written, one
        // queued and one read, as for the matched chunks' (parallel * 2 + 1) below.
        let _reservation = self
            .shared
            .budget
            .reserve(3 * (delta::MAX_COPY.max(MAX_FINE_GAP)) as usize)
            .await;
        let pieces: Vec<delta::Piece> = copy
            .copies
            .iter()
            .map(|c| delta::Piece {
                new: c.new,
                old: c.old,
                len: c.len,
                hash: u128::from_be_bytes(c.hash),
            })
            .collect();
        // One run written at a time.
        let (matched, writing) = pump_runs(&partial, &name, 1, move |emit| {
            basis.copy_pieces(&pieces, |offset, bytes| emit(offset, None, bytes))
        })
        .await?;
        let (read, copied) = (matched.read, written(writing, &name).await?);
        self.shared.metrics.delta_basis_read.add(read);
        self.shared.metrics.delta_copied.add(copied);
        tracing::debug!(runs = copy.copies.len(), copied, "delta copies written");
        Ok(())
    }

    /// Copies into upload `id`'s partial the chunks (the first at `offset`) its basis holds,
    /// searched for or, `guessed`, looked for only where the previous match puts them, and
    /// records their span as agreed; the ranges matched, sorted and merged, and (but for guessed
    /// chunks) each run matched with where it starts in the basis, in order, once matched; and
    /// the copies, still being written (the span is agreed once they are).
    async fn copy_from_basis(
        &mut self,
        id: UploadId,
        offset: u64,
        chunks: Vec<SigChunk>,
        guessed: bool,
    ) -> Result<(Vec<ByteRange>, Vec<(ByteRange, u64)>, Copies), ConnError> {
        let span_len: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        let sig_offset = offset;
        let Upload {
            lease, name, basis, ..
        } = self.session.upload(id)?;
        let Some(basis) = basis.clone() else {
            return Err(fatal(ErrorCode::Protocol, "DeltaSig before DeltaIndex"));
        };
        let (partial, name) = (Arc::clone(&lease.partial), name.clone());
        let started = std::time::Instant::now();
        let parallel = xfer_core::cores().clamp(2, MAX_PARALLEL_COPIES);
        // The runs being matched, queued and written at once, each at most MAX_COPY bytes.
        let mut reservation = self
            .shared
            .budget
            .reserve((parallel * 2 + 1) * delta::MAX_COPY as usize)
            .await;
        // One thread checks the chunks in order (each match tells where the next chunk is
        // looked for) while the runs it found are written on several at once.
        let (
            Matched {
                matched,
                located,
                read,
                emitted,
            },
            writing,
        ) = pump_runs(&partial, &name, parallel, move |emit| match guessed {
            true => basis.copy_guessed(sig_offset, &chunks, |offset, bytes| {
                emit(offset, None, bytes)
            }),
            false => basis.copy_batch_located(sig_offset, &chunks, |offset, old, bytes| {
                emit(offset, Some(old), bytes)
            }),
        })
        .await?;
        self.shared.metrics.delta_basis_read.add(read);
        tracing::debug!(
            offset = sig_offset,
            span = span_len,
            emitted,
            read,
            guessed,
            ms = started.elapsed().as_millis() as u64,
            "delta batch answered"
        );
        // The reader is done: only the runs it emitted are still held, queued or being written.
        let held = reservation.split(usize::try_from(emitted).unwrap_or(usize::MAX));
        drop(reservation);
        let metrics = Arc::clone(&self.shared.metrics);
        let task = tokio::spawn(async move {
            let _held = held;
            let copied = written(writing, &name).await?;
            // Recorded once its matched chunks are written: a resumed upload sends the rest
            // as data without comparing this span again.
            partial
                .agree(ByteRange::new(sig_offset, sig_offset + span_len))
                .await
                .map_err(|e| fatal(e.code(), format!("{name}: {e}")))?;
            metrics.delta_copied.add(copied);
            Ok::<_, ConnError>(())
        });
        Ok((matched, located, Copies { upload: id, task }))
    }

    /// Waits for the copies still being written into upload `id` (see [`Copies`]); the first
    /// error of any ends the connection, as it would have where they were made.
    pub(super) async fn finish_copies(&mut self, id: UploadId) -> Result<(), ConnError> {
        let (mine, others) = std::mem::take(&mut self.copies)
            .into_iter()
            .partition::<Vec<_>, _>(|c| c.upload == id);
        self.copies = others;
        let mut first_error = Ok(());
        // All of them land before an error is told: nothing goes on writing behind it.
        for copies in mine {
            if let Err(e) = copies.finish().await {
                first_error = first_error.and(Err(e));
            }
        }
        first_error
    }

    /// Waits for every copy still being written on this connection, their errors dropped: the
    /// connection is ending, and an unwritten span is not agreed, so it is sent again.
    pub(super) async fn settle_copies(&mut self) {
        for copies in std::mem::take(&mut self.copies) {
            let _ = copies.finish().await;
        }
    }
}

/// A `DeltaPut`'s matched runs being written into upload `upload`, then their span agreed,
/// behind the answer. The task holds the memory of the runs still queued.
pub(super) struct Copies {
    upload: UploadId,
    task: tokio::task::JoinHandle<Result<(), ConnError>>,
}

impl Copies {
    /// Waits for the runs to be written and their span agreed.
    async fn finish(self) -> Result<(), ConnError> {
        self.task
            .await
            .map_err(|e| fatal(ErrorCode::Io, format!("delta copy task: {e}")))?
    }
}

/// The bytes the writing side of [`pump_runs`] wrote, once it is done, or its error.
async fn written(writing: Writing, name: &str) -> Result<u64, ConnError> {
    writing
        .await
        .map_err(|e| fatal(ErrorCode::Io, format!("{name}: delta copy task: {e}")))?
}

/// What [`pump_runs`]' reader matched: the ranges (sorted and merged), each run with where it
/// starts in the basis where the reader said, the bytes it read and the bytes it emitted.
struct Matched {
    matched: Vec<ByteRange>,
    located: Vec<(ByteRange, u64)>,
    read: u64,
    emitted: u64,
}

/// The writes of the runs [`pump_runs`]' reader emitted, going on: the bytes written.
type Writing = tokio::task::JoinHandle<Result<u64, ConnError>>;

/// Runs `read` on the blocking pool, which hands `emit` each run of basis bytes it finds (where
/// it goes in the upload, where it starts in the basis if known, its bytes) and returns the
/// bytes it read, while a task writes the runs into `partial`, `parallel` at once, in order.
/// Returns once the reader is done, with what it matched, and the writes still going. The
/// queue between them holds `parallel` runs: the caller's reservation covers them.
async fn pump_runs<R>(
    partial: &Arc<xfer_core::PartialFile>,
    name: &str,
    parallel: usize,
    read: R,
) -> Result<(Matched, Writing), ConnError>
where
    R: FnOnce(&dyn Fn(u64, Option<u64>, Bytes) -> bool) -> std::io::Result<u64> + Send + 'static,
{
    let (runs_tx, mut runs_rx) = mpsc::channel::<(u64, Option<u64>, Bytes)>(parallel);
    let reading = blocking(move || {
        // The reader checks each run's hash before emitting it: what it emits is matched,
        // whether or not it is written yet.
        let found = std::cell::RefCell::new((Vec::<ByteRange>::new(), Vec::new(), 0u64));
        let read = read(&|offset, old, bytes| {
            let range = ByteRange::new(offset, offset + bytes.len() as u64);
            let (matched, located, emitted) = &mut *found.borrow_mut();
            located.extend(old.map(|old| (range, old)));
            *emitted += range.len();
            match matched.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => matched.push(range),
            }
            runs_tx.blocking_send((offset, old, bytes)).is_ok()
        })
        .map_err(|e| CoreError::io("reading the delta basis", e))?;
        let (matched, located, emitted) = found.into_inner();
        Ok(Matched {
            matched,
            located,
            read,
            emitted,
        })
    });
    let write_run = {
        let (partial, name) = (Arc::clone(partial), name.to_string());
        move |(offset, _, bytes): (u64, Option<u64>, Bytes)| {
            let (partial, name) = (Arc::clone(&partial), name.clone());
            async move {
                #[cfg(test)]
                if let Some(gate) = tests_gate::of(&name) {
                    // Closed when the test lets the copies go.
                    let _ = gate.acquire().await;
                }
                let crc = crc32fast::hash(&bytes);
                let len = bytes.len() as u64;
                partial
                    .write(offset, bytes, crc)
                    .await
                    .map_err(|e| fatal(e.code(), format!("{name}: {e}")))?;
                Ok::<_, ConnError>(len)
            }
        }
    };
    let writing = tokio::spawn(async move {
        let writes = stream::poll_fn(move |cx| runs_rx.poll_recv(cx))
            .map(write_run)
            .buffered(parallel);
        let mut writes = std::pin::pin!(writes);
        let mut copied = 0;
        while let Some(run) = writes.next().await {
            copied += run?;
        }
        Ok::<_, ConnError>(copied)
    });
    match reading.await {
        Ok(matched) => Ok((matched, writing)),
        Err(e) => {
            // Nothing goes on writing behind the error.
            let _ = writing.await;
            Err(fatal(e.code(), format!("{name}: {e}")))
        }
    }
}

impl Handler {
    pub(super) async fn read_sig(&mut self, id: DownloadId, req: ReadSig) -> Result<(), ConnError> {
        let Download { source, name, .. } = self.session.download(id)?;
        let name = name.clone();
        // As for ReadChunk: a file that changed since it was opened ends the download.
        source
            .check_unchanged()
            .map_err(|e| fatal(e.code(), e.to_string()))?;
        let file = source.file();
        let region = ByteRange::new(req.offset, req.end);
        let cut = blocking(move || {
            let mut chunks = Vec::new();
            delta::cut_region(&file, region, req.avg_chunk, |cut| {
                chunks.push(cut.sig());
                chunks.len() < MAX_DELTA_CHUNKS
            })
            .map(|()| chunks)
            .map_err(|e| CoreError::io("cutting the file", e))
        })
        .await
        .map_err(|e| fatal(e.code(), format!("{name}: {e}")))?;
        self.writer
            .send(&Frame::DeltaSig(DeltaSig {
                transfer_id: id.get(),
                offset: req.offset,
                chunks: cut,
            }))
            .await?;
        Ok(())
    }
}

/// Copies into one file held back while a test looks at what goes before they are written.
#[cfg(test)]
pub(super) mod tests_gate {
    use std::sync::{Arc, Mutex};
    use tokio::sync::Semaphore;

    static HELD: Mutex<Option<(String, Arc<Semaphore>)>> = Mutex::new(None);

    /// Holds the copies into `name` until the semaphore returned is closed.
    pub(in crate::handler) fn hold(name: &str) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *HELD.lock().unwrap() = Some((name.to_string(), Arc::clone(&gate)));
        gate
    }

    /// The gate the copies into `name` wait at, if a test holds them.
    pub(super) fn of(name: &str) -> Option<Arc<Semaphore>> {
        let held = HELD.lock().unwrap();
        held.as_ref()
            .filter(|(held, _)| held == name)
            .map(|(_, gate)| Arc::clone(gate))
    }
}
