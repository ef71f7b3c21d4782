//! Downloads: [`recv`]. `ReadChunk` requests go out under the window and come back as `Data`,
//! written at their offset into a partial file beside the destination; the server's
//! whole-file digest is asked for on a connection of its own and checked before the rename.
//! A delta ([`delta`]) first copies what the local file already holds.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use xfer_core::buffers::BufferPool;
use xfer_core::digest::DigestKind;
use xfer_core::{split_into_chunks, PartialFile, RangeSet, Slot};
use xfer_proto::{ByteRange, ChunkRef, Commit, Data, FileIdentity, Frame, OpenRead};

use super::delta;
use super::path_reports::PathReports;
use super::pool::{drive, Early, Opener, Opening};
use super::queue::Work;
use super::retry::{reopen, COMMIT_ATTEMPTS};
use super::window::{Answer, Direction, Window};
use super::{chunk_size, close_all, join_error, metered, path_policy, Tally};
use super::{Options, Summary};
use crate::session::{unexpected, FirstFrames};
use crate::{ClientError, Connector, Session, Target};

struct Download {
    name: String,
    identity: FileIdentity,
    partial: Arc<PartialFile>,
    max_chunk: u32,
    /// Bytes the chunks took on the wire, compressed where they were.
    wire: AtomicU64,
    /// Buffers compressed chunks expand into, one per connection at most.
    buffers: BufferPool,
    /// What the daemon's sockets say of the path (`PathReport`): the sender times the queue.
    paths: PathReports,
}

/// What opened a download: its id, identity and mode, and the holes the daemon named, if it did.
type ReadOpened = (u64, FileIdentity, u32, Vec<ByteRange>);

/// Opens a download (see [`read_opened`]).
async fn open_read(session: &mut Session, request: &OpenRead) -> Result<ReadOpened, ClientError> {
    session.send(&Frame::OpenRead(request.clone())).await?;
    read_opened(session).await
}

/// The answer to the `OpenRead` `session` sent last, or with its handshake.
async fn read_opened(session: &mut Session) -> Result<ReadOpened, ClientError> {
    match session.next().await? {
        Frame::ReadOpened(r) => Ok((r.transfer_id, r.identity, r.mode, Vec::new())),
        Frame::ReadOpenedSparse(s) => {
            let r = s.opened;
            Ok((r.transfer_id, r.identity, r.mode, s.holes))
        }
        other => Err(unexpected(other)),
    }
}

impl Direction for Download {
    async fn open(&self, session: &mut Session) -> Result<u64, ClientError> {
        let (id, identity, ..) = open_read(session, &plain_open(&self.name)).await?;
        if identity != self.identity {
            return Err(ClientError::Changed(self.name.clone()));
        }
        Ok(id)
    }

    fn max_chunk(&self, session: &Session) -> u32 {
        session.welcome.max_chunk_size.min(self.max_chunk)
    }

    async fn request(
        &self,
        session: &mut Session,
        transfer_id: u64,
        chunk: ByteRange,
        _work: &Work,
    ) -> Result<(), ClientError> {
        let req = ChunkRef {
            transfer_id,
            offset: chunk.start,
            len: chunk.len() as u32,
        };
        session.send(&Frame::ReadChunk(req)).await
    }

    async fn answer(
        &self,
        session: &mut Session,
        transfer_id: u64,
        window: &mut Window,
        work: &Work,
    ) -> Result<Answer, ClientError> {
        let mut frame = session.next().await?;
        while let Frame::PathReport(report) = frame {
            if session.welcome.capabilities & xfer_proto::CAP_PATH_REPORT == 0 {
                return Err(unexpected(frame));
            }
            self.paths.record(&report);
            frame = session.next().await?;
        }
        // `--bwlimit` limits the wire: what a chunk took there holds back the next request.
        let wire = match &frame {
            Frame::Data(d) => d.payload.len() as u64,
            Frame::DataZ(z) => z.payload.len() as u64,
            _ => 0,
        };
        self.wire.fetch_add(wire, Ordering::Relaxed);
        work.throttle(wire).await;
        let data = match frame {
            Frame::Data(d) => d,
            Frame::DataZ(z) if z.transfer_id == transfer_id => {
                // Matched to its request (so `raw_len` is what was asked for, within the chunk
                // size) before anything is allocated for it.
                let chunk = window.answered(z.range(), "DataZ")?;
                work.transferred.fetch_add(chunk.len(), Ordering::Relaxed);
                if !z.crc_matches() {
                    tracing::warn!(
                        offset = chunk.start,
                        "compressed chunk failed its CRC; asking again"
                    );
                    return Ok(Answer::Corrupt(chunk));
                }
                // Claimed before it is decompressed: a duplicate of the endgame costs no CPU.
                let buffers = self.buffers.clone();
                return land(chunk, work, window, async move {
                    let buffer = buffers.take(z.raw_len as usize);
                    let data = xfer_net::inflate(z, buffer, move |b| buffers.bytes(b))
                        .await
                        .map_err(|e| {
                            ClientError::Proto(xfer_proto::ProtoError::BadBody {
                                kind: "DataZ",
                                reason: e.to_string(),
                            })
                        })?;
                    self.write(data).await
                })
                .await;
            }
            // A hole at the server: nothing to write but a hole of our own.
            Frame::Zeros(z) if z.transfer_id == transfer_id => {
                let range = ByteRange::new(z.offset, z.offset + u64::from(z.len));
                let chunk = window.answered(range, "Zeros")?;
                return land(chunk, work, window, async {
                    Ok(self.partial.write_zeros(chunk).await?)
                })
                .await;
            }
            other => return Err(unexpected(other)),
        };
        if data.transfer_id != transfer_id {
            return Err(ClientError::Unexpected("Data"));
        }
        let chunk = window.answered(data.range(), "Data")?;
        work.transferred.fetch_add(chunk.len(), Ordering::Relaxed);
        if data.verify().is_err() {
            tracing::warn!(offset = chunk.start, "chunk failed its CRC; asking again");
            return Ok(Answer::Corrupt(chunk));
        }
        land(chunk, work, window, self.write(data)).await
    }

    fn reported_queue(&self) -> Option<std::time::Duration> {
        self.paths.take_queue()
    }
}

impl Download {
    /// Writes a received chunk at its offset.
    async fn write(&self, data: Data) -> Result<(), ClientError> {
        Ok(self
            .partial
            .write(data.offset, data.payload, data.crc32)
            .await?)
    }
}

/// Lands `chunk` with `write` unless another connection already did: in the endgame two
/// connections may bring the same chunk, the first is written and the other dropped unread. A
/// failed write gives the claim back and puts the chunk back in the window, to be asked again.
async fn land(
    chunk: ByteRange,
    work: &Work,
    window: &mut Window,
    write: impl std::future::Future<Output = Result<(), ClientError>>,
) -> Result<Answer, ClientError> {
    if !work.claim(chunk) {
        return Ok(Answer::Dropped(chunk));
    }
    if let Err(e) = write.await {
        work.unclaim(chunk);
        window.restore(chunk);
        return Err(e);
    }
    Ok(Answer::Moved(chunk))
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
    recv_with_holes(target, name, dest, opts, None).await
}

/// [`recv`] of a file whose holes a tree listing gave, with the identity it had then: if the
/// file still has it, the holes are not asked for but punched into the partial file.
///
/// A delta whose whole-file digest does not match the server's (bytes changed under the
/// partial file while it ran: what was copied from the local file is checked chunk by chunk,
/// so not by the local file changing) is not renamed into place: its partial is discarded and
/// the file is fetched once more, whole.
///
/// # Errors
/// As [`recv`]; a failure of the whole-file fetch after such a delta says so.
pub async fn recv_with_holes(
    target: &Target,
    name: &str,
    dest: &Path,
    opts: &Options,
    holes: Option<(FileIdentity, Vec<ByteRange>)>,
) -> Result<Summary, ClientError> {
    let started = Instant::now();
    match recv_once(target, name, dest, opts, holes.clone(), started).await? {
        Attempt::Done(summary) => Ok(summary),
        Attempt::DeltaCorrupt => {
            tracing::info!(
                file = %name,
                "whole file: the delta's whole-file digest did not match the server's, its partial \
                 was discarded; fetching the whole file once more"
            );
            let whole = Options {
                delta: delta::DeltaMode::Never,
                ..opts.clone()
            };
            match recv_once(target, name, dest, &whole, holes, started).await {
                Ok(Attempt::Done(mut summary)) => {
                    summary.delta_reason = Some(
                        "whole file: fetched again after the delta's digest did not match".into(),
                    );
                    Ok(summary)
                }
                // Without a delta a mismatch is an error of its own.
                Ok(Attempt::DeltaCorrupt) => Err(xfer_core::CoreError::Corrupt(name.into()).into()),
                Err(e) => Err(ClientError::AfterDelta(Box::new(e))),
            }
        }
    }
}

/// How one attempt at a download ended.
enum Attempt {
    Done(Summary),
    /// A delta ran and the whole-file digest did not match: the partial was discarded.
    DeltaCorrupt,
}

/// The `OpenRead` of `name` a connection other than the first sends.
fn plain_open(name: &str) -> OpenRead {
    OpenRead {
        name: name.to_string(),
        have_identity: None,
        have: vec![],
    }
}

/// Opens `name` on an early connection as soon as it is welcomed, beside the first connection's
/// open: the file must be the one the first connection opened (`expected`, once it knows).
fn opener(name: &str, expected: tokio::sync::watch::Receiver<Option<FileIdentity>>) -> Opener {
    let name = name.to_string();
    let answered = answered(&name, expected);
    Arc::new(move |mut session: Session| {
        let (request, answered) = (plain_open(&name), Arc::clone(&answered));
        Box::pin(async move {
            session.send(&Frame::OpenRead(request)).await?;
            answered(session).await
        })
    })
}

/// Reads the answer to an `OpenRead` of `name` a connection sent: the file must be the one the
/// first connection opened (`expected`, once it knows).
fn answered(name: &str, expected: tokio::sync::watch::Receiver<Option<FileIdentity>>) -> Opener {
    let name = name.to_string();
    Arc::new(move |mut session: Session| {
        let (name, mut expected) = (name.clone(), expected.clone());
        Box::pin(async move {
            let (id, identity, ..) = read_opened(&mut session).await?;
            let first = expected
                .wait_for(Option::is_some)
                .await
                .map_err(|_| ClientError::Unexpected("the first connection did not open"))?;
            if *first != Some(identity) {
                return Err(ClientError::Changed(name));
            }
            drop(first);
            Ok((session, id))
        })
    })
}

/// How a download is opened with the handshake where the daemon proves itself early: the first
/// connection's `request` (what the local journal holds), every other's [`plain_open`], their
/// answers checked against the file the first opened (`expected`, once it knows).
fn opening(
    name: &str,
    request: &OpenRead,
    expected: &tokio::sync::watch::Receiver<Option<FileIdentity>>,
) -> Opening {
    let frames = |request: OpenRead| -> FirstFrames {
        Arc::new(move |_: &xfer_proto::Welcome| vec![Frame::OpenRead(request.clone())])
    };
    Opening {
        first: frames(request.clone()),
        others: frames(plain_open(name)),
        answered: Some(answered(name, expected.clone())),
    }
}

/// One attempt at [`recv_with_holes`].
async fn recv_once(
    target: &Target,
    name: &str,
    dest: &Path,
    opts: &Options,
    holes: Option<(FileIdentity, Vec<ByteRange>)>,
    started: Instant,
) -> Result<Attempt, ClientError> {
    let opts = &metered(opts);
    let slot = local_slot(dest)?;
    let journal_path =
        dest.with_file_name(xfer_core::on_disk(&xfer_core::journal_name(&slot.leaf)));
    let have = read_local_journal(&journal_path);
    // The size is known only once the file is open, so the pool's larger start for a large
    // file on a far path opens then, not beside the first handshake: opened at the first
    // connect for any file on the emulated 150 ms path, a 2 GiB download moved 0.97-0.99 of
    // the rate it moved so (3 runs each, alternated, loaded), where uploads gained.
    let start_on = |_| 0;
    let request = OpenRead {
        name: name.to_string(),
        have_identity: have.as_ref().map(|c| c.identity),
        have: have
            .as_ref()
            .map(|c| c.chunks.iter().map(|(r, _)| *r).collect())
            .unwrap_or_default(),
    };
    let (expected, opened) = tokio::sync::watch::channel(None);
    // The first connection opens the file with its `Auth` where the daemon proves itself
    // early: the open's round trip overlaps the handshake's last.
    let opening = opening(name, &request, &opened);
    let (mut session, mut early) =
        Early::connect_first(target, opts, start_on, Some(opening), None).await?;
    let (opts, congestion) = path_policy(opts, &mut session);
    let opts = &opts;
    early.open_ahead(opener(name, opened), None);
    let (id, identity, mode, named) = match std::mem::take(&mut session.first_sent) {
        true => read_opened(&mut session).await?,
        false => open_read(&mut session, &request).await?,
    };
    expected.send_replace(Some(identity));
    // Once the size is known: a large file on a far path starts with more connections.
    early.top_up(target, opts, session.rtt, identity.size);
    let early = Arc::new(early);
    // The holes the listing gave at this identity, else those the daemon named as it opened.
    let holes = holes
        .filter(|(seen, _)| *seen == identity)
        .map(|(_, h)| h)
        .or((!named.is_empty()).then_some(named));
    // Space is reserved only for the bytes between the holes the listing gave.
    let kind = DigestKind::of_capabilities(session.welcome.capabilities);
    let partial =
        PartialFile::open_sparse_as(slot, identity, holes.clone().unwrap_or_default(), kind)
            .await?;
    let resumed = partial.resumed_bytes();
    let chunk_size = chunk_size(opts, &session);
    let mut missing = RangeSet::from_ranges(partial.held()).missing(identity.size);
    if let Some(holes) = holes {
        let holes = RangeSet::from_ranges(holes);
        for piece in xfer_core::meta::split_at_holes(&missing, &holes, chunk_size) {
            if holes.contains(piece) {
                partial.write_zeros(piece).await?;
            }
        }
        missing = RangeSet::from_ranges(partial.held()).missing(identity.size);
    }
    let mut tally = Tally::start(opts, name, identity.size, resumed, started, congestion);
    if !missing.is_empty() {
        let (wanted, why) = delta::choose(opts.delta, &session, opts.bwlimit, identity.size);
        let copied = match wanted {
            true => delta::copy_local(&mut session, id, dest, &partial).await?,
            false => None,
        };
        match copied {
            Some(copied) => {
                tracing::info!(file = %name, matched_bytes = copied, "delta transfer: {why}");
                tally.why = Some(format!("delta transfer: {why}"));
                tally.delta = true;
                tally.matched = copied;
                opts.progress.set_position(partial.held_bytes());
                missing = RangeSet::from_ranges(partial.held()).missing(identity.size);
            }
            None => {
                let whole = if wanted {
                    format!("whole file: no local file to start from ({why})")
                } else {
                    format!("whole file: {why}")
                };
                tracing::info!(file = %name, "{whole}");
                tally.why = Some(whole);
            }
        }
    }
    let work = Arc::new(Work::new(split_into_chunks(&missing, chunk_size), opts));
    let download = Arc::new(Download {
        name: name.to_string(),
        identity,
        partial: Arc::clone(&partial),
        max_chunk: chunk_size,
        wire: AtomicU64::new(0),
        buffers: BufferPool::new(1),
        paths: PathReports::default(),
    });
    let mut digest_task = Some(tokio::spawn(remote_digest(
        target.clone(),
        opts.connector.clone(),
        name.to_string(),
        identity,
    )));
    let mut digest = None;
    let mut first = Some((session, id));
    for attempt in 1..=COMMIT_ATTEMPTS {
        let mut sessions = drive(
            target,
            Arc::clone(&download),
            Arc::clone(&work),
            first.take(),
            Arc::clone(&early),
            opts,
        )
        .await?;
        let digest = match digest {
            Some(digest) => digest,
            None => {
                let task = digest_task
                    .take()
                    .expect("the digest task runs until first asked");
                let got =
                    digest_after_transfer(task, &mut sessions, target, &download, opts).await?;
                *digest.insert(got)
            }
        };
        match partial.commit(mode, identity.mtime_ns, Some(digest)).await {
            Ok(_) => {
                close_all(sessions).await;
                break;
            }
            // The local file had the server's size and mtime but other bytes: fetch it all now.
            // Not renamed into place; the caller fetches the file again, whole.
            Err(xfer_core::CoreError::Corrupt(_)) if tally.delta => {
                close_all(sessions).await;
                return Ok(Attempt::DeltaCorrupt);
            }
            Err(xfer_core::CoreError::Incomplete { .. }) if attempt < COMMIT_ATTEMPTS => {
                let missing = RangeSet::from_ranges(partial.held()).missing(identity.size);
                opts.progress.set_position(0);
                work.add(split_into_chunks(&missing, chunk_size));
                first = sessions.pop();
                close_all(sessions).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut summary = tally.finish(&work, opts);
    summary.wire_bytes = download.wire.load(Ordering::Relaxed);
    Ok(Attempt::Done(summary))
}

/// The server's digest once the data is in: the extra connection's answer, if it has one by
/// now; otherwise (it is still waiting for a stream slot on a busy daemon, or failed on the
/// way) asked on a data connection, now free.
async fn digest_after_transfer(
    task: tokio::task::JoinHandle<Result<xfer_core::digest::Digest, ClientError>>,
    sessions: &mut Vec<(Session, u64)>,
    target: &Target,
    download: &Download,
    opts: &Options,
) -> Result<xfer_core::digest::Digest, ClientError> {
    if task.is_finished() {
        match task.await.map_err(|e| ClientError::Local(join_error(e)))? {
            Ok(digest) => return Ok(digest),
            Err(e) if e.is_transient() => {}
            Err(e) => return Err(e),
        }
    } else {
        task.abort();
    }
    let (mut s, id) = match sessions.pop() {
        Some(open) => open,
        None => reopen(target, download, opts).await?,
    };
    let digest = digest_over(&mut s, id).await;
    s.close().await;
    digest
}

/// Asks the server for the whole-file digest of `name` on a connection of its own, so the
/// server reads the file beside the data connections rather than after them.
async fn remote_digest(
    target: Target,
    connector: Connector,
    name: String,
    identity: FileIdentity,
) -> Result<xfer_core::digest::Digest, ClientError> {
    // The open goes with the `Auth` where the daemon proves itself early.
    let request = plain_open(&name);
    let open: FirstFrames = {
        let request = request.clone();
        Arc::new(move |_: &xfer_proto::Welcome| vec![Frame::OpenRead(request.clone())])
    };
    let mut session =
        Session::connect_sending(&target, &connector, 0, &mut None, Some(&open)).await?;
    let (id, now, ..) = match std::mem::take(&mut session.first_sent) {
        true => read_opened(&mut session).await?,
        false => open_read(&mut session, &request).await?,
    };
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
    // The leaf as a name of its own (escaped where it is not UTF-8), as the root's are.
    let leaf = dest
        .file_name()
        .map(|l| xfer_proto::names::escape(std::os::unix::ffi::OsStrExt::as_bytes(l)))
        .ok_or_else(|| ClientError::OutputPath(dest.to_path_buf()))?;
    let leaf = leaf.as_ref();
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

#[cfg(test)]
mod tests {
    use xfer_net::{FrameReader, FrameWriter};
    use xfer_proto::Data;

    use super::super::window::{pump, Pumped};
    use super::super::{test_options, test_session};
    use super::*;
    use crate::ProgressCounter;

    #[tokio::test]
    async fn a_download_writes_each_chunk_at_its_offset_and_asks_again_for_a_corrupt_one() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        let content: Vec<u8> = (0..10_000u32).map(|i| (i * 13) as u8).collect();
        let identity = FileIdentity {
            size: 10_000,
            mtime_ns: 1_000_000_000,
        };
        let partial = PartialFile::open(local_slot(&dest).unwrap(), identity)
            .await
            .unwrap();
        let download = Download {
            name: "f".into(),
            identity,
            partial: Arc::clone(&partial),
            max_chunk: 4096,
            wire: AtomicU64::new(0),
            buffers: BufferPool::new(1),
            paths: PathReports::default(),
        };
        let progress = Arc::new(ProgressCounter::default());
        let chunks = split_into_chunks(&[ByteRange::new(0, 10_000)], 4096);
        let work = Work::new(chunks, &test_options(progress.clone()));
        let (mut session, theirs) = test_session(2, 4096);
        let served = content.clone();
        let daemon = tokio::spawn(async move {
            let (read, write) = tokio::io::split(theirs);
            let (mut reader, mut writer) = (FrameReader::new(read), FrameWriter::new(write));
            let mut asked = Vec::new();
            for i in 0..4 {
                let Some(Frame::ReadChunk(c)) = reader.read_frame().await.unwrap() else {
                    panic!("expected a chunk request");
                };
                asked.push(c.offset);
                let (start, end) = (c.offset as usize, c.offset as usize + c.len as usize);
                let mut data = Data::new(5, c.offset, served[start..end].to_vec().into());
                if i == 0 {
                    data.crc32 ^= 1; // damaged on the way
                }
                writer.send(&Frame::Data(data)).await.unwrap();
            }
            asked
        });
        assert_eq!(
            pump(&download, &mut session, 5, &work).await.unwrap(),
            Pumped::Drained
        );
        // The damaged first chunk went back to the front and was asked for again.
        assert_eq!(daemon.await.unwrap(), [0, 4096, 0, 8192]);
        assert_eq!(work.crc_retries.load(Ordering::Relaxed), 1);
        assert_eq!(progress.done(), 10_000);
        assert_eq!(partial.held(), [ByteRange::new(0, 10_000)]);
        partial
            .commit(0o644, identity.mtime_ns, None)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), content);
    }

    #[test]
    fn an_output_path_naming_no_file_is_an_output_error() {
        let e = local_slot(Path::new("/tmp/..")).unwrap_err();
        assert!(matches!(e, ClientError::OutputPath(_)), "{e:?}");
        let e = local_slot(Path::new("/nonexistent-dir/file")).unwrap_err();
        assert!(
            matches!(e, ClientError::Local(xfer_core::CoreError::NotFound(_))),
            "{e:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let e = local_slot(&dir.path().join(xfer_core::partial_name("f"))).unwrap_err();
        assert!(
            matches!(e, ClientError::Local(xfer_core::CoreError::BadPath(_))),
            "{e:?}"
        );
        assert_eq!(local_slot(&dir.path().join("f")).unwrap().leaf, "f");
    }
}
