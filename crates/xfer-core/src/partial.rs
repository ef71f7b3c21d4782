//! [`PartialFile`]: the receiving side of a transfer. Chunks are written straight to their offset
//! in `.NAME.xfer-part`, recorded in the journal `.NAME.xfer-state`, and the partial is renamed
//! over `NAME` only once every byte is held and flushed.
//!
//! Both the daemon (uploads) and the client (downloads) receive through this type.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rustix::fs::{self as rfs, Mode, OFlags};
use xfer_proto::{ByteRange, FileIdentity};

use crate::digest::{Blocks, Digest, DigestKind, Frontier, WholeBlocks};
use crate::direct::{direct_io, DirectWriter};
use crate::journal::{self, Record};
use crate::root::Slot;
use crate::{journal_name, on_disk, partial_name, CoreError, RangeSet, Result};

/// Bytes written between two `fdatasync` barriers of one transfer.
pub const DEFAULT_SYNC_EVERY: u64 = 256 * 1024 * 1024;
/// Largest range one journal record can describe (its length field is 32 bits).
const MAX_RECORD_RANGE: u64 = 1 << 30;
/// Bytes behind the digest's frontier handed to writeback at once. Once written, the window
/// before is dropped from the page cache: nothing reads it again, and the next writes reuse its
/// pages. On this project's VMs a write into pages the guest has not used lately costs up to
/// eight times the copy (about 2.5 s of system time per GiB against 0.3 s), and the commit's
/// `fsync` finds little left to write.
pub const WRITE_BEHIND: u64 = 64 * 1024 * 1024;

/// `Agreed` records for `span`, each within a record's length field.
fn agreed_records(span: ByteRange) -> impl Iterator<Item = Record> {
    let mut start = span.start;
    std::iter::from_fn(move || {
        (start < span.end).then(|| {
            let end = span.end.min(start + MAX_RECORD_RANGE);
            let range = ByteRange::new(start, end);
            start = end;
            Record::Agreed { range }
        })
    })
}

/// When a commit's file is on stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// At the commit's answer: the file and its directory are flushed (`fsync`) before it.
    Flushed,
    /// At the next flush of the filesystem (`syncfs`, a tree's `Sync`), which the sender waits
    /// for: the commit flushes nothing itself. Its bytes are written to the disk (not flushed)
    /// before the rename, so on a filesystem that journals the rename after the writes it
    /// ordered before it (ext4, XFS), a crash before that flush leaves the old file or the
    /// complete new one under the name.
    AtSync,
}

/// The partial's data file, and the same file opened for direct writes where it can be.
type DataFiles = (Arc<File>, Option<Arc<DirectWriter>>);

/// A file being received.
#[derive(Debug)]
pub struct PartialFile {
    slot: Slot,
    part_leaf: String,
    journal_leaf: String,
    identity: FileIdentity,
    resumed: u64,
    sync_every: u64,
    /// The digest the receiver keeps as bytes land (a commit of the other kind reads the file).
    kind: DigestKind,
    /// Flushes (`fsync`, `fdatasync`) this partial asked of the disk: what a commit of
    /// [`Durability::AtSync`] spares, and its tests count.
    flushes: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
}

/// The whole-file digest so far, of the partial's kind.
#[derive(Debug)]
enum Progress {
    Sequential(Frontier),
    Blocks(Blocks),
}

impl Progress {
    fn new(kind: DigestKind, size: u64) -> Self {
        match kind {
            DigestKind::Sequential => Self::Sequential(Frontier::default()),
            DigestKind::Blocks => Self::Blocks(Blocks::new(size)),
        }
    }

    /// Bytes from the start of the file the digest has taken in.
    fn pos(&self) -> u64 {
        match self {
            Self::Sequential(f) => f.pos(),
            Self::Blocks(b) => b.pos(),
        }
    }
}

/// Reads `n` bytes at `pos` of `data` for the digest: around the cache through `direct` (as the
/// bytes were written), else through it.
fn read_for_digest(
    data: &File,
    direct: Option<&DirectWriter>,
    buf: &mut Vec<u8>,
    pos: u64,
    n: usize,
    sink: &mut dyn FnMut(&[u8]),
) -> std::io::Result<()> {
    match direct {
        Some(direct) => direct.read_at(data, pos, n, sink),
        None => crate::digest::read_through_cache(data, pos, n, buf, sink),
    }
}

/// Pieces the digest reads at once: the direct reader's block, or the cache's.
fn digest_read_block(direct: Option<&DirectWriter>) -> usize {
    match direct {
        Some(_) => crate::direct::READ_BLOCK,
        None => crate::digest::BUFFERED_READ_BLOCK,
    }
}

#[derive(Debug)]
struct State {
    /// The partial file (or, while `final_already`, the final file, read only).
    data: Arc<File>,
    /// The partial opened again for direct writes of aligned chunks, where offered.
    direct: Option<Arc<DirectWriter>>,
    journal: Arc<File>,
    journal_pos: u64,
    chunk_records: u64,
    held: RangeSet,
    unsynced: u64,
    sync_running: bool,
    /// Set once the partial can take no more writes: committed, or a barrier failed.
    closed: Option<String>,
    /// The digest the file was committed with: several clients may feed one upload, and
    /// the ones that finish after the first find their work already done.
    committed: Option<Digest>,
    /// The commit left its flush to a later `syncfs` ([`Durability::AtSync`]): a later commit
    /// that promises durability flushes first.
    committed_unflushed: bool,
    /// Digest of the file so far.
    digest: Progress,
    /// Counts resets of `digest`: a block read back off the lock is recorded only into the
    /// digest it was read for.
    epoch: u64,
    /// Ranges recorded as holes this session: hashed as zeros, never read back.
    zeros: RangeSet,
    /// Spans of the new file a delta's signature exchange answered for (journaled).
    agreed: RangeSet,
    /// Bytes the digest caught up on after they landed ahead of its frontier: read back from
    /// the file, or holes hashed as zeros (told in the commit's debug log).
    read_back: u64,
    write_behind: WriteBehind,
    /// The file's size.
    identity_size: u64,
    /// The final name already held this file when opened: nothing is written, and the commit
    /// only compares digests.
    final_already: bool,
}

/// How far behind the digest's frontier the partial was handed to writeback, and dropped from
/// the page cache once written (see [`WRITE_BEHIND`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct WriteBehind {
    started: u64,
    dropped: u64,
}

/// Ranges of the partial to hand to writeback, and to wait for and drop from the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Behind {
    start: ByteRange,
    drop: ByteRange,
}

impl WriteBehind {
    /// The ranges to act on now that the frontier is at `frontier`: writeback starts up to its
    /// last whole window, and what was started before is dropped.
    fn advance(&mut self, frontier: u64) -> Option<Behind> {
        let to = frontier / WRITE_BEHIND * WRITE_BEHIND;
        if to <= self.started {
            return None;
        }
        let behind = Behind {
            start: ByteRange::new(self.started, to),
            drop: ByteRange::new(self.dropped, self.started),
        };
        (self.dropped, self.started) = (self.started, to);
        Some(behind)
    }
}

impl Behind {
    /// Hints only: durability comes from the barriers and the commit's `fsync`, so a failure
    /// here costs speed, never data.
    fn apply(self, data: &File) {
        use std::os::fd::AsRawFd;
        let sync_range = |range: ByteRange, flags| {
            if range.is_empty() {
                return;
            }
            // SAFETY: a plain system call on a descriptor `data` keeps open; no memory passed.
            let rc = unsafe {
                libc::sync_file_range(
                    data.as_raw_fd(),
                    range.start as libc::off64_t,
                    range.len() as libc::off64_t,
                    flags,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                tracing::debug!(error = %e, "sync_file_range failed");
            }
        };
        sync_range(self.start, libc::SYNC_FILE_RANGE_WRITE);
        let wait_and_write = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        sync_range(self.drop, wait_and_write);
        // Kept in the cache where the user asked for it (`--no-direct-io`): whoever reads the
        // file next wants it from memory.
        let dropped = std::num::NonZeroU64::new(self.drop.len()).filter(|_| direct_io());
        if let Some(len) = dropped {
            if let Err(e) = rfs::fadvise(data, self.drop.start, Some(len), rfs::Advice::DontNeed) {
                tracing::debug!(error = %e, "fadvise failed");
            }
        }
    }
}

impl State {
    /// Feeds the digest the held bytes that follow its position, read back from the file
    /// (holes recorded this session are hashed as zeros without being read).
    ///
    /// The block digest reads back the blocks touching `within` it cannot hash from memory (see
    /// [`Blocks`]) that are complete, or with `all`, every block not combined yet.
    fn catch_up(&mut self, within: ByteRange, all: bool) -> std::io::Result<()> {
        let (data, direct) = (&self.data, self.direct.as_deref());
        let block = digest_read_block(direct);
        let mut buf = Vec::new();
        let mut read = |pos, n, sink: &mut dyn FnMut(&[u8])| {
            read_for_digest(data, direct, &mut buf, pos, n, sink)
        };
        match &mut self.digest {
            Progress::Sequential(frontier) => {
                let before = frontier.pos();
                frontier.catch_up_reading(&self.held, &self.zeros, block, &mut read)?;
                self.read_back += frontier.pos() - before;
            }
            Progress::Blocks(blocks) => {
                let ready = match all {
                    true => blocks.not_combined(),
                    false => blocks.stale_and_held(&self.held, within),
                };
                for index in ready {
                    blocks.read_back(index, &self.zeros, block, &mut read)?;
                    self.read_back += crate::digest::block_range(index, self.identity_size).len();
                }
            }
        }
        Ok(())
    }
}

/// Writes every dirty page of `data` to the disk and waits for it, without flushing the disk's
/// cache or the file's metadata (`sync_file_range`): a commit of [`Durability::AtSync`] has its
/// bytes written before the rename is, so that the journal commit that makes the rename durable
/// (its cache flush first) makes them durable too. Without it, bytes still in the page cache of
/// a partial whose space was reserved would read as zeros after a crash, under the new name,
/// size and mtime.
fn write_out(data: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a plain system call on a descriptor `data` keeps open; no memory passed.
    match unsafe { libc::sync_file_range(data.as_raw_fd(), 0, 0, flags) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> impl std::future::Future<Output = Result<T>> {
    let task = tokio::task::spawn_blocking(f);
    async move {
        task.await
            .map_err(|e| CoreError::io("disk task", std::io::Error::other(e.to_string())))?
    }
}

/// The file at the slot's final name, if it is a regular file of this identity.
fn matching_final(slot: &Slot, identity: FileIdentity) -> Option<File> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file =
        File::from(rfs::openat(slot.dir.as_fd(), on_disk(&slot.leaf), flags, Mode::empty()).ok()?);
    let (found, _) = crate::source::identity_of(&file).ok()?;
    (file.metadata().ok()?.is_file() && found == identity).then_some(file)
}

/// Gives `data` the length `size` with disk space reserved for every byte outside `holes`.
/// Filesystems without `fallocate` still work; they just cannot reserve.
fn reserve(data: &File, size: u64, holes: &RangeSet) -> std::io::Result<()> {
    for range in holes.missing(size) {
        match rfs::fallocate(data, rfs::FallocateFlags::empty(), range.start, range.len()) {
            Ok(()) => {}
            Err(rustix::io::Errno::OPNOTSUPP) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // The space after the last reserved range (a hole at the end) is length only.
    if data.metadata()?.len() < size {
        data.set_len(size)?;
    }
    Ok(())
}

fn open_private(slot: &Slot, leaf: &str) -> Result<File> {
    // NOFOLLOW: a symlink planted under a reserved name must not redirect our writes.
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rfs::openat(
        slot.dir.as_fd(),
        on_disk(leaf),
        flags,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => Ok(File::from(fd)),
        Err(rustix::io::Errno::LOOP) => Err(CoreError::BadPath(format!("{leaf:?} is a symlink"))),
        Err(e) => Err(CoreError::io(format!("opening {leaf:?}"), e.into())),
    }
}

impl PartialFile {
    /// Opens (or creates) the partial for `slot` and `identity`, on a blocking thread.
    ///
    /// A journal for the same identity is resumed: its chunks are checked and kept. Any other
    /// partial at that slot is discarded. Disk space for the whole file is reserved up front,
    /// so a full filesystem fails here rather than half-way.
    ///
    /// # Errors
    /// `NoSpace`, `BadPath` (a reserved name is a symlink) or I/O errors.
    pub async fn open(slot: Slot, identity: FileIdentity) -> Result<Arc<Self>> {
        Self::open_sparse(slot, identity, Vec::new()).await
    }

    /// [`open`](Self::open) of a file with `holes`: a new partial reserves space only for the
    /// bytes between them, so a sparse file larger than the free space still fits; the holes
    /// are then recorded with [`write_zeros`](Self::write_zeros).
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn open_sparse(
        slot: Slot,
        identity: FileIdentity,
        holes: Vec<ByteRange>,
    ) -> Result<Arc<Self>> {
        Self::open_sparse_as(slot, identity, holes, DigestKind::Sequential).await
    }

    /// [`open_sparse`](Self::open_sparse) keeping the whole-file digest of `kind` as bytes
    /// land: the kind the session that opens it uses.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn open_sparse_as(
        slot: Slot,
        identity: FileIdentity,
        holes: Vec<ByteRange>,
        kind: DigestKind,
    ) -> Result<Arc<Self>> {
        let holes = RangeSet::from_ranges(holes);
        blocking(move || Self::open_blocking(slot, identity, DEFAULT_SYNC_EVERY, &holes, kind))
            .await
            .map(Arc::new)
    }

    /// [`open`](Self::open) with a custom barrier interval.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn open_with(
        slot: Slot,
        identity: FileIdentity,
        sync_every: u64,
    ) -> Result<Arc<Self>> {
        let holes = RangeSet::new();
        blocking(move || {
            Self::open_blocking(slot, identity, sync_every, &holes, DigestKind::Sequential)
                .map(Arc::new)
        })
        .await
    }

    fn open_blocking(
        slot: Slot,
        identity: FileIdentity,
        sync_every: u64,
        holes: &RangeSet,
        kind: DigestKind,
    ) -> Result<Self> {
        let part_leaf = partial_name(&slot.leaf);
        let journal_leaf = journal_name(&slot.leaf);
        let data = open_private(&slot, &part_leaf)?;
        let mut journal_file = open_private(&slot, &journal_leaf)?;
        let ctx = |what: &str| format!("{what} {:?}", slot.leaf);

        let contents = journal::read(&mut journal_file)
            .map_err(|e| CoreError::io(ctx("reading journal of"), e))?;
        let mut held = RangeSet::new();
        let mut agreed = RangeSet::new();
        match contents {
            Some(c) if c.identity == identity => {
                let ranges = journal::verified_ranges(&c, &data)
                    .map_err(|e| CoreError::io(ctx("verifying partial of"), e))?;
                held = RangeSet::from_ranges(ranges);
                agreed = RangeSet::from_ranges(c.agreed.iter().copied());
            }
            _ => {
                // No partial for this identity: if the final name already holds a file of this
                // size and mtime (a commit whose answer was lost, or a rerun), offer it as held;
                // the commit still compares its digest with the sender's.
                if let Some(final_file) = matching_final(&slot, identity) {
                    let dir = slot.dir.as_fd();
                    let _ = rfs::unlinkat(dir, on_disk(&part_leaf), rfs::AtFlags::empty());
                    let _ = rfs::unlinkat(dir, on_disk(&journal_leaf), rfs::AtFlags::empty());
                    return Ok(Self::already_final(
                        slot,
                        part_leaf,
                        journal_leaf,
                        final_file,
                        identity,
                        sync_every,
                        kind,
                    ));
                }
                data.set_len(0)
                    .map_err(|e| CoreError::io(ctx("truncating partial of"), e))?
            }
        }
        // A resumed partial got its space when it was started; reserving it again would fill
        // the holes already punched for a sparse source.
        if identity.size > 0 && held.total() == 0 {
            if let Err(e) = reserve(&data, identity.size, holes) {
                // A new partial that cannot get its space leaves nothing behind.
                if held.total() == 0 {
                    let dir = slot.dir.as_fd();
                    let _ = rfs::unlinkat(dir, on_disk(&part_leaf), rfs::AtFlags::empty());
                    let _ = rfs::unlinkat(dir, on_disk(&journal_leaf), rfs::AtFlags::empty());
                }
                return Err(CoreError::io(ctx("reserving space for"), e));
            }
        }
        // Rewrite the journal from what was verified: held data is flushed first, so one
        // barrier can cover all of it and unverifiable records do not linger. A new partial
        // holds nothing to cover: its flush would only make the disk commit the space just
        // reserved (a journal commit, a few ms, for each of a tree's light files).
        let opened_flushes = u64::from(held.total() > 0);
        if opened_flushes > 0 {
            data.sync_data()
                .map_err(|e| CoreError::io(ctx("flushing partial of"), e))?;
        }
        let mut records = Vec::new();
        for r in held.iter() {
            let mut start = r.start;
            while start < r.end {
                let end = r.end.min(start + MAX_RECORD_RANGE);
                records.push(Record::Chunk {
                    range: ByteRange::new(start, end),
                    crc32: 0,
                });
                start = end;
            }
        }
        let chunk_records = records.len() as u64;
        if chunk_records > 0 {
            records.push(Record::Barrier {
                covered: chunk_records,
            });
        }
        for r in agreed.iter() {
            records.extend(agreed_records(r));
        }
        let bytes = journal::build(identity, &records);
        journal::reset(&mut journal_file, identity)
            .and_then(|()| journal_file.write_all_at(&bytes, 0))
            .map_err(|e| CoreError::io(ctx("writing journal of"), e))?;
        let resumed = held.total();
        let direct = DirectWriter::open(slot.dir.as_fd(), &part_leaf, &data).map(Arc::new);
        let mut state = State {
            data: Arc::new(data),
            direct,
            journal: Arc::new(journal_file),
            journal_pos: bytes.len() as u64,
            chunk_records,
            held,
            unsynced: 0,
            sync_running: false,
            closed: None,
            committed: None,
            committed_unflushed: false,
            final_already: false,
            digest: Progress::new(kind, identity.size),
            epoch: 0,
            zeros: RangeSet::new(),
            agreed,
            read_back: 0,
            write_behind: WriteBehind::default(),
            identity_size: identity.size,
        };
        // Resumed bytes count toward the digest like new ones: they were never in this
        // process's memory, so they are read back from disk once, here (the blocks they fill
        // whole) or once their blocks are complete.
        if let Progress::Blocks(blocks) = &mut state.digest {
            for r in state.held.iter() {
                blocks.mark_stale(r);
            }
        }
        state
            .catch_up(ByteRange::new(0, identity.size), false)
            .map_err(|e| CoreError::io(ctx("reading back partial of"), e))?;
        Ok(Self {
            slot,
            part_leaf,
            journal_leaf,
            identity,
            resumed,
            sync_every,
            kind,
            flushes: opened_flushes.into(),
            state: Mutex::new(state),
        })
    }

    fn already_final(
        slot: Slot,
        part_leaf: String,
        journal_leaf: String,
        file: File,
        identity: FileIdentity,
        sync_every: u64,
        kind: DigestKind,
    ) -> Self {
        let file = Arc::new(file);
        Self {
            slot,
            part_leaf,
            journal_leaf,
            identity,
            resumed: identity.size,
            sync_every,
            kind,
            flushes: Default::default(),
            state: Mutex::new(State {
                data: Arc::clone(&file),
                direct: None,
                journal: file,
                journal_pos: 0,
                chunk_records: 0,
                held: RangeSet::from_ranges([ByteRange::new(0, identity.size)]),
                unsynced: 0,
                sync_running: false,
                closed: None,
                committed: None,
                committed_unflushed: false,
                final_already: true,
                digest: Progress::new(kind, identity.size),
                epoch: 0,
                zeros: RangeSet::new(),
                agreed: RangeSet::new(),
                read_back: 0,
                write_behind: WriteBehind::default(),
                identity_size: identity.size,
            }),
        }
    }

    /// The identity this partial belongs to.
    pub fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// Bytes that were already held when the partial was opened.
    pub fn resumed_bytes(&self) -> u64 {
        self.resumed
    }

    /// Ranges held now.
    pub fn held(&self) -> Vec<ByteRange> {
        self.lock().held.iter().collect()
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> u64 {
        self.lock().held.total()
    }

    /// Spans a delta's signature exchange answered for, here or before a resume.
    pub fn agreed(&self) -> Vec<ByteRange> {
        self.lock().agreed.iter().collect()
    }

    /// Records that a delta's signature exchange answered for `span`: its matched chunks are
    /// written and journaled already, and the rest comes as data; a resumed upload need not
    /// compare it again. Moot once the partial is final.
    ///
    /// # Errors
    /// A range outside the file, a closed partial or I/O errors.
    pub async fn agree(self: &Arc<Self>, span: ByteRange) -> Result<()> {
        self.check_within(span)?;
        let this = Arc::clone(self);
        blocking(move || {
            if this.data_to_write()?.is_none() {
                return Ok(());
            }
            let mut st = this.lock();
            for record in agreed_records(span) {
                st.journal_pos = journal::append(&st.journal, st.journal_pos, record)
                    .map_err(|e| CoreError::io(format!("journal of {:?}", this.slot.leaf), e))?;
            }
            st.agreed.insert(span);
            Ok(())
        })
        .await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `payload` at `offset` and records it in the journal. The caller has checked the
    /// payload's CRC; `crc32` is kept so a later resume can re-check the bytes on disk.
    ///
    /// # Errors
    /// A range outside the file, a closed partial, `NoSpace` or I/O errors.
    pub async fn write(self: &Arc<Self>, offset: u64, payload: Bytes, crc32: u32) -> Result<()> {
        let range = ByteRange::new(offset, offset + payload.len() as u64);
        self.check_within(range)?;
        if range.is_empty() {
            return Ok(());
        }
        let this = Arc::clone(self);
        let barrier = blocking(move || this.write_blocking(range, &payload, crc32)).await?;
        if let Some(covered) = barrier {
            let this = Arc::clone(self);
            // The barrier runs beside the writes: acks do not wait for the disk to catch up.
            tokio::task::spawn_blocking(move || this.barrier_blocking(covered));
        }
        Ok(())
    }

    /// Refuses a range that reaches past the end of the file.
    fn check_within(&self, range: ByteRange) -> Result<()> {
        if range.end > self.identity.size {
            return Err(CoreError::BadPath(format!(
                "range {}..{} beyond the size {}",
                range.start, range.end, self.identity.size
            )));
        }
        Ok(())
    }

    /// The data file to write into (and its direct descriptor), `None` once the partial is
    /// final (a late chunk is moot), or why it was closed.
    fn data_to_write(&self) -> Result<Option<DataFiles>> {
        let st = self.lock();
        if st.committed.is_some() || st.final_already {
            return Ok(None);
        }
        if let Some(why) = &st.closed {
            return Err(CoreError::io("write", std::io::Error::other(why.clone())));
        }
        Ok(Some((Arc::clone(&st.data), st.direct.clone())))
    }

    fn write_blocking(&self, range: ByteRange, payload: &[u8], crc32: u32) -> Result<Option<u64>> {
        let Some((data, direct)) = self.data_to_write()? else {
            return Ok(None);
        };
        crate::direct::write_at(direct.as_deref(), &data, payload, range.start)
            .map_err(|e| CoreError::io(format!("writing {:?}", self.slot.leaf), e))?;
        // The blocks the write covers whole are hashed before the lock, beside other writers.
        let whole = match self.kind {
            DigestKind::Blocks => WholeBlocks::of(self.identity.size, range.start, payload),
            DigestKind::Sequential => WholeBlocks::default(),
        };
        // The lock is held across one 24-byte journal write so that record order in the file
        // matches `chunk_records`, which barriers count by.
        let mut guard = self.lock();
        let st = &mut *guard;
        let record = Record::Chunk { range, crc32 };
        st.journal_pos = journal::append(&st.journal, st.journal_pos, record)
            .map_err(|e| CoreError::io(format!("journal of {:?}", self.slot.leaf), e))?;
        st.chunk_records += 1;
        st.held.insert(range);
        let to_read = match &mut st.digest {
            // Hashing here, under the lock, keeps the digest in file order; bytes that arrived
            // ahead of the frontier are read back (from the page cache) once it reaches them.
            Progress::Sequential(frontier) => {
                frontier.feed(range.start, payload);
                st.catch_up(range, false)
                    .map_err(|e| CoreError::io(format!("reading back {:?}", self.slot.leaf), e))?;
                Vec::new()
            }
            // Blocks whose pieces came out of order are read back below, off the lock.
            Progress::Blocks(blocks) => blocks.feed(range.start, payload, whole, &st.held),
        };
        st.unsynced += range.len();
        let barrier = (st.unsynced >= self.sync_every && !st.sync_running).then(|| {
            st.sync_running = true;
            st.unsynced = 0;
            st.chunk_records
        });
        let epoch = st.epoch;
        let zeros = (!to_read.is_empty() && st.zeros.total() > 0).then(|| st.zeros.clone());
        let frontier = st.digest.pos();
        let behind = st.write_behind.advance(frontier);
        drop(guard);
        if let Some(behind) = behind {
            behind.apply(&data);
        }
        if !to_read.is_empty() {
            self.read_blocks_back(
                &to_read,
                &data,
                direct.as_deref(),
                &zeros.unwrap_or_default(),
                epoch,
            )
            .map_err(|e| CoreError::io(format!("reading back {:?}", self.slot.leaf), e))?;
        }
        Ok(barrier)
    }

    /// Reads back and hashes the complete blocks `indices` (whose pieces arrived out of order)
    /// without the lock, then records them into the digest, unless it was reset meanwhile.
    fn read_blocks_back(
        &self,
        indices: &[u64],
        data: &File,
        direct: Option<&DirectWriter>,
        zeros: &RangeSet,
        epoch: u64,
    ) -> std::io::Result<()> {
        let size = self.identity.size;
        let block = digest_read_block(direct);
        let mut buf = Vec::new();
        let mut read = |pos, n, sink: &mut dyn FnMut(&[u8])| {
            read_for_digest(data, direct, &mut buf, pos, n, sink)
        };
        let mut digests = Vec::with_capacity(indices.len());
        for &index in indices {
            let range = crate::digest::block_range(index, size);
            let digest = crate::digest::hash_span(range.start, range.end, zeros, block, &mut read)?;
            digests.push((index, digest, range.len()));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.epoch != epoch {
            return Ok(());
        }
        if let Progress::Blocks(blocks) = &mut st.digest {
            for (index, digest, len) in digests {
                blocks.complete(index, digest);
                st.read_back += len;
            }
        }
        let behind = st.write_behind.advance(st.digest.pos());
        drop(guard);
        if let Some(behind) = behind {
            behind.apply(data);
        }
        Ok(())
    }

    /// Records `range` as held zeros without writing it: a hole of a sparse source. The range
    /// is punched (blocks given back, so anything a torn earlier write left there reads as
    /// zeros) and journaled with the CRC of zeros, which a resume checks like any other.
    ///
    /// # Errors
    /// A range outside the file, a closed partial or I/O errors.
    pub async fn write_zeros(self: &Arc<Self>, range: ByteRange) -> Result<()> {
        self.check_within(range)?;
        if range.is_empty() {
            return Ok(());
        }
        let this = Arc::clone(self);
        blocking(move || this.write_zeros_blocking(range)).await
    }

    fn write_zeros_blocking(&self, range: ByteRange) -> Result<()> {
        let ctx = || format!("punching a hole in {:?}", self.slot.leaf);
        let Some((data, _)) = self.data_to_write()? else {
            return Ok(());
        };
        crate::meta::punch_hole(&data, range).map_err(|e| CoreError::io(ctx(), e))?;
        let mut st = self.lock();
        let mut start = range.start;
        while start < range.end {
            let piece = ByteRange::new(start, range.end.min(start + MAX_RECORD_RANGE));
            let crc32 = crate::meta::crc32_of_zeros(piece.len());
            let record = Record::Chunk {
                range: piece,
                crc32,
            };
            st.journal_pos = journal::append(&st.journal, st.journal_pos, record)
                .map_err(|e| CoreError::io(format!("journal of {:?}", self.slot.leaf), e))?;
            st.chunk_records += 1;
            start = piece.end;
        }
        st.held.insert(range);
        st.zeros.insert(range);
        if let Progress::Blocks(blocks) = &mut st.digest {
            blocks.mark_stale(range);
        }
        // The digest covers the zeros too, hashed without reading them back.
        st.catch_up(range, false)
            .map_err(|e| CoreError::io(format!("reading back {:?}", self.slot.leaf), e))
    }

    fn barrier_blocking(&self, covered: u64) {
        let data = Arc::clone(&self.lock().data);
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = data.sync_data();
        let mut st = self.lock();
        st.sync_running = false;
        let result = result.and_then(|()| {
            st.journal_pos =
                journal::append(&st.journal, st.journal_pos, Record::Barrier { covered })?;
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!(file = %self.slot.leaf, error = %e, "flushing partial failed");
            st.closed
                .get_or_insert_with(|| format!("flushing partial failed: {e}"));
        }
    }

    /// Makes the file final: checks every byte is held, applies `mode` and `mtime_ns`, flushes
    /// data and metadata, renames the partial over the final name, removes the journal and
    /// flushes the directory. Readers of the final name see the old file or the new, never a mix.
    ///
    /// # Errors
    /// `Incomplete` while bytes are missing; I/O errors.
    /// `expected` is the sender's digest of the whole file; on a mismatch the partial is
    /// discarded (so a rerun starts over) and `Corrupt` is returned.
    pub async fn commit(
        self: &Arc<Self>,
        mode: u32,
        mtime_ns: i64,
        expected: Option<Digest>,
    ) -> Result<Digest> {
        self.commit_as(mode, mtime_ns, expected, self.kind, Durability::Flushed)
            .await
    }

    /// [`commit`](Self::commit) with `expected` of `kind`, the digest the committing session
    /// uses, made durable as `durability` says. A partial opened for the other kind (another
    /// client's session) reads the whole file to compute it.
    ///
    /// # Errors
    /// As [`commit`](Self::commit).
    pub async fn commit_as(
        self: &Arc<Self>,
        mode: u32,
        mtime_ns: i64,
        expected: Option<Digest>,
        kind: DigestKind,
        durability: Durability,
    ) -> Result<Digest> {
        let this = Arc::clone(self);
        let (digest, replaced) =
            blocking(move || this.commit_blocking(mode, mtime_ns, expected, kind, durability))
                .await?;
        if let Some(old) = replaced {
            // Its last close frees it: the answer need not wait for that.
            tokio::task::spawn_blocking(move || drop(old));
        }
        Ok(digest)
    }

    /// Flushes (`fsync`) the file and the directory of a partial committed without
    /// ([`Durability::AtSync`]), for a commit that promises durability.
    fn flush_committed(&self, st: &mut State) -> Result<()> {
        let ctx = |what: &str| format!("{what} {:?}", self.slot.leaf);
        st.data
            .sync_all()
            .map_err(|e| CoreError::io(ctx("flushing"), e))?;
        rfs::fsync(self.slot.dir.as_fd())
            .map_err(|e| CoreError::io(ctx("flushing directory of"), e.into()))?;
        self.flushes
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        st.committed_unflushed = false;
        Ok(())
    }

    /// Flushes (`fsync`, `fdatasync`) this partial has asked of the disk so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns the digest, and the file the rename replaced, still open, for the caller to close.
    fn commit_blocking(
        &self,
        mode: u32,
        mtime_ns: i64,
        expected: Option<Digest>,
        kind: DigestKind,
        durability: Durability,
    ) -> Result<(Digest, Option<File>)> {
        let ctx = |what: &str| format!("{what} {:?}", self.slot.leaf);
        let mut st = self.lock();
        if let Some(mut done) = st.committed {
            // Another client's commit came first and left its flush to a later `syncfs`.
            if st.committed_unflushed && durability == Durability::Flushed {
                self.flush_committed(&mut st)?;
            }
            if kind != self.kind {
                done = crate::digest::digest_file_as(kind, &st.data, self.identity.size)
                    .map_err(|e| CoreError::io(ctx("reading"), e))?;
            }
            if expected.is_some_and(|want| want != done) {
                let why = "committed meanwhile by another client with different content";
                return Err(CoreError::io(ctx("commit"), std::io::Error::other(why)));
            }
            return Ok((done, None));
        }
        if let Some(why) = &st.closed {
            return Err(CoreError::io(
                ctx("commit"),
                std::io::Error::other(why.clone()),
            ));
        }
        if st.final_already {
            let digest = crate::digest::digest_file_as(kind, &st.data, self.identity.size)
                .map_err(|e| CoreError::io(ctx("reading"), e))?;
            if expected.is_none_or(|want| want == digest) {
                // Kept in the partial's kind, the one later commits are compared in.
                st.committed = Some(match kind == self.kind {
                    true => digest,
                    false => crate::digest::digest_file_as(self.kind, &st.data, self.identity.size)
                        .map_err(|e| CoreError::io(ctx("reading"), e))?,
                });
                return Ok((digest, None));
            }
            // Same size and mtime, other bytes: receive the file after all. The sender learns
            // that nothing is held and sends everything; the old file stays until the rename.
            let part = open_private(&self.slot, &self.part_leaf)?;
            let mut journal_file = open_private(&self.slot, &self.journal_leaf)?;
            part.set_len(0)
                .and_then(|()| journal::reset(&mut journal_file, self.identity))
                .map_err(|e| CoreError::io(ctx("starting a partial for"), e))?;
            st.direct =
                DirectWriter::open(self.slot.dir.as_fd(), &self.part_leaf, &part).map(Arc::new);
            st.data = Arc::new(part);
            st.journal = Arc::new(journal_file);
            st.journal_pos = journal::HEADER_LEN as u64;
            st.chunk_records = 0;
            st.held = RangeSet::new();
            st.digest = Progress::new(self.kind, self.identity.size);
            st.epoch += 1;
            st.write_behind = WriteBehind::default();
            st.zeros = RangeSet::new();
            st.final_already = false;
            return Err(CoreError::Incomplete {
                missing: self.identity.size,
            });
        }
        let missing = self.identity.size - st.held.total();
        if missing > 0 {
            return Err(CoreError::Incomplete { missing });
        }
        let started = std::time::Instant::now();
        st.catch_up(ByteRange::new(0, self.identity.size), true)
            .map_err(|e| CoreError::io(ctx("reading back"), e))?;
        let caught_up = started.elapsed();
        let own = match &st.digest {
            Progress::Sequential(f) => (f.pos() == self.identity.size).then(|| f.digest()),
            Progress::Blocks(b) => b.digest(),
        };
        // A commit of the other kind than the partial keeps reads the file whole.
        let digest = match kind == self.kind {
            true => own,
            false => Some(
                crate::digest::digest_file_as(kind, &st.data, self.identity.size)
                    .map_err(|e| CoreError::io(ctx("reading back"), e))?,
            ),
        };
        let own = own.unwrap_or_default();
        let Some(digest) = digest.filter(|&d| expected.is_none_or(|want| want == d)) else {
            self.discard(&mut st)
                .map_err(|e| CoreError::io(ctx("discarding"), e))?;
            return Err(CoreError::Corrupt(self.slot.leaf.clone()));
        };
        let mtime = if mtime_ns >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64)
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_nanos(mtime_ns.unsigned_abs())
        };
        let data = Arc::clone(&st.data);
        data.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
            .and_then(|()| data.set_modified(mtime))
            .and_then(|()| match durability {
                Durability::Flushed => {
                    self.flushes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    data.sync_all()
                }
                Durability::AtSync => write_out(&data),
            })
            .map_err(|e| CoreError::io(ctx("flushing"), e))?;
        let flushed = started.elapsed();
        let dir = self.slot.dir.as_fd();
        // The file under the final name is held (`O_PATH`: opened for nothing, whatever it is)
        // across the rename: dropping its last name would free it inside the rename, its page
        // cache and blocks (about 0.4 s for 2 GiB here), before the sender hears that the file
        // is in place.
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let replaced = rfs::openat(dir, on_disk(&self.slot.leaf), flags, Mode::empty())
            .ok()
            .map(File::from);
        rfs::renameat(dir, on_disk(&self.part_leaf), dir, on_disk(&self.slot.leaf))
            .map_err(|e| CoreError::io(ctx("renaming partial to"), e.into()))?;
        let renamed = started.elapsed();
        st.committed = Some(own);
        st.committed_unflushed = durability == Durability::AtSync;
        if let Err(e) = rfs::unlinkat(dir, on_disk(&self.journal_leaf), rfs::AtFlags::empty()) {
            tracing::warn!(file = %self.slot.leaf, error = %e, "removing journal failed");
        }
        if durability == Durability::Flushed {
            self.flushes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rfs::fsync(dir).map_err(|e| CoreError::io(ctx("flushing directory of"), e.into()))?;
        }
        tracing::debug!(
            file = %self.slot.leaf,
            read_back = st.read_back,
            catch_up_ms = caught_up.as_millis() as u64,
            flush_ms = (flushed - caught_up).as_millis() as u64,
            rename_ms = (renamed - flushed).as_millis() as u64,
            dir_sync_ms = (started.elapsed() - renamed).as_millis() as u64,
            ?durability,
            "committed"
        );
        Ok((digest, replaced))
    }

    /// Drops everything received: the next run of this transfer starts from zero.
    fn discard(&self, st: &mut State) -> std::io::Result<()> {
        st.data.set_len(0)?;
        let bytes = journal::build(self.identity, &[]);
        st.journal.set_len(0)?;
        st.journal.write_all_at(&bytes, 0)?;
        st.journal_pos = bytes.len() as u64;
        st.chunk_records = 0;
        st.held = RangeSet::new();
        st.digest = Progress::new(self.kind, self.identity.size);
        st.epoch += 1;
        st.write_behind = WriteBehind::default();
        st.zeros = RangeSet::new();
        st.closed = Some("discarded after a digest mismatch".into());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Root;

    fn id(size: u64) -> FileIdentity {
        FileIdentity {
            size,
            mtime_ns: 1_700_000_000_000_000_000,
        }
    }

    async fn write(p: &Arc<PartialFile>, offset: u64, bytes: &[u8]) {
        p.write(
            offset,
            Bytes::copy_from_slice(bytes),
            crc32fast::hash(bytes),
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn chunks_land_at_their_offsets_and_commit_renames() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let p = PartialFile::open(root.slot("out.bin", true).unwrap(), id(10))
            .await
            .unwrap();
        write(&p, 5, b"56789").await;
        assert!(matches!(
            p.commit(0o640, 0, None).await,
            Err(CoreError::Incomplete { missing: 5 })
        ));
        assert!(!tmp.path().join("out.bin").exists());
        write(&p, 0, b"01234").await;
        p.commit(0o640, id(10).mtime_ns, None).await.unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("out.bin")).unwrap(),
            b"0123456789"
        );
        let meta = std::fs::metadata(tmp.path().join("out.bin")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert!(!tmp.path().join(".out.bin.xfer-part").exists());
        assert!(!tmp.path().join(".out.bin.xfer-state").exists());
        // Another client feeding the same upload finishes after the commit: its chunks are
        // not needed and its commit succeeds with the same digest.
        write(&p, 0, b"x").await;
        let digest = p.commit(0o640, 0, None).await.unwrap();
        assert_eq!(p.commit(0o640, 0, Some(digest)).await.unwrap(), digest);
        assert!(p.commit(0o640, 0, Some([1; 16])).await.is_err());
        assert_eq!(
            std::fs::read(tmp.path().join("out.bin")).unwrap(),
            b"0123456789"
        );
    }

    #[tokio::test]
    async fn a_commit_left_to_the_next_syncfs_flushes_nothing_until_one_must() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let open = |name: &str| {
            let slot = root.slot(name, true).unwrap();
            PartialFile::open_sparse_as(slot, id(10), Vec::new(), DigestKind::Blocks)
        };
        let (now, later) = (
            open("now.bin").await.unwrap(),
            open("later.bin").await.unwrap(),
        );
        // A new partial holds nothing its opening could flush for.
        assert_eq!((now.flushes(), later.flushes()), (0, 0));
        for p in [&now, &later] {
            write(p, 5, b"56789").await;
            write(p, 0, b"01234").await;
        }
        let kind = DigestKind::Blocks;
        let mtime = id(10).mtime_ns;
        now.commit_as(0o640, mtime, None, kind, Durability::Flushed)
            .await
            .unwrap();
        assert_eq!(now.flushes(), 2, "the file and its directory");
        let digest = later
            .commit_as(0o640, mtime, None, kind, Durability::AtSync)
            .await
            .unwrap();
        assert_eq!(later.flushes(), 0);
        let path = tmp.path().join("later.bin");
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(!tmp.path().join(".later.bin.xfer-state").exists());
        // Another client of the same upload is promised its commit is durable: it flushes.
        let again = later.commit_as(0o640, mtime, Some(digest), kind, Durability::Flushed);
        assert_eq!(again.await.unwrap(), digest);
        assert_eq!(later.flushes(), 2);
        let once_more = later.commit_as(0o640, mtime, Some(digest), kind, Durability::Flushed);
        once_more.await.unwrap();
        assert_eq!(later.flushes(), 2, "flushed once is enough");
    }

    #[tokio::test]
    async fn reopen_resumes_same_identity_and_discards_another() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let slot = root.slot("f", true).unwrap();
        let p = PartialFile::open_with(slot.clone(), id(8), 4)
            .await
            .unwrap();
        write(&p, 0, b"abcd").await;
        write(&p, 4, b"ef").await;
        drop(p);
        let p = PartialFile::open(slot.clone(), id(8)).await.unwrap();
        assert_eq!(p.resumed_bytes(), 6);
        assert_eq!(p.held(), vec![ByteRange::new(0, 6)]);
        drop(p);
        // Reopening twice keeps the rewritten journal valid.
        let p = PartialFile::open(slot.clone(), id(8)).await.unwrap();
        assert_eq!(p.resumed_bytes(), 6);
        drop(p);
        let other = FileIdentity {
            size: 8,
            mtime_ns: 5,
        };
        let p = PartialFile::open(slot, other).await.unwrap();
        assert_eq!(p.resumed_bytes(), 0);
    }

    #[tokio::test]
    async fn unsynced_records_with_wrong_bytes_are_dropped_on_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let slot = root.slot("f", true).unwrap();
        let p = PartialFile::open(slot.clone(), id(8)).await.unwrap();
        write(&p, 0, b"abcd").await;
        write(&p, 4, b"efgh").await;
        drop(p);
        // Simulate a power loss that kept the journal but not the data of the second chunk.
        std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path().join(".f.xfer-part"))
            .unwrap()
            .write_all_at(b"\0\0\0\0", 4)
            .unwrap();
        let p = PartialFile::open(slot, id(8)).await.unwrap();
        assert_eq!(p.held(), vec![ByteRange::new(0, 4)]);
    }

    #[tokio::test]
    async fn commit_checks_the_senders_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let slot = root.slot("f", true).unwrap();
        let p = PartialFile::open(slot.clone(), id(8)).await.unwrap();
        write(&p, 4, b"efgh").await;
        write(&p, 0, b"abcd").await;
        let mut want = Frontier::default();
        want.feed(0, b"abcdefgh");
        let err = p.commit(0o644, 0, Some([0; 16])).await.unwrap_err();
        assert!(matches!(err, CoreError::Corrupt(_)), "{err}");
        assert!(!tmp.path().join("f").exists());
        let p = PartialFile::open(slot.clone(), id(8)).await.unwrap();
        assert_eq!(p.resumed_bytes(), 0, "a mismatch discards the partial");
        write(&p, 0, b"abcdefgh").await;
        assert_eq!(
            p.commit(0o644, 0, Some(want.digest())).await.unwrap(),
            want.digest()
        );
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), b"abcdefgh");
    }

    /// A partial keeping the block digest: written out of order, in pieces, resumed; what a
    /// resume holds is read back from disk, so a change made there while stopped is caught.
    #[tokio::test]
    async fn the_block_digest_reads_resumed_bytes_back_and_catches_a_change_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let slot = root.slot("f", true).unwrap();
        let mib: usize = 1 << 20;
        let data: Vec<u8> = (0..5 * mib / 2).map(|i| (i * 13 % 253) as u8).collect();
        let path = tmp.path().join("want");
        std::fs::write(&path, &data).unwrap();
        let want = crate::digest::digest_file_as(
            DigestKind::Blocks,
            &File::open(&path).unwrap(),
            data.len() as u64,
        )
        .unwrap();
        let size = id(data.len() as u64);
        let open =
            || PartialFile::open_sparse_as(slot.clone(), size, Vec::new(), DigestKind::Blocks);
        for changed in [false, true] {
            let p = open().await.unwrap();
            // Block 1's pieces out of order, block 0 whole, part of block 2.
            write(&p, (3 * mib / 2) as u64, &data[3 * mib / 2..2 * mib]).await;
            write(&p, 0, &data[..mib]).await;
            write(&p, (2 * mib) as u64, &data[2 * mib..9 * mib / 4]).await;
            drop(p);
            // Opened again, the journal is rewritten with a barrier over what is held: a
            // later resume trusts those bytes without checking their CRCs.
            drop(open().await.unwrap());
            if changed {
                let part = File::options()
                    .write(true)
                    .open(tmp.path().join(".f.xfer-part"))
                    .unwrap();
                part.write_all_at(b"other bytes", 100).unwrap();
            }
            let p = open().await.unwrap();
            assert_eq!(p.resumed_bytes(), 7 * mib as u64 / 4);
            write(&p, (mib) as u64, &data[mib..3 * mib / 2]).await;
            write(&p, (9 * mib / 4) as u64, &data[9 * mib / 4..]).await;
            let committed = p.commit(0o644, 0, Some(want)).await;
            if changed {
                assert!(
                    matches!(committed, Err(CoreError::Corrupt(_))),
                    "{committed:?}"
                );
                assert!(!tmp.path().join("f").exists());
            } else {
                assert_eq!(committed.unwrap(), want);
                assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), data);
                std::fs::remove_file(tmp.path().join("f")).unwrap();
            }
        }
        // A commit in the other kind than the partial keeps reads the file whole.
        let p = open().await.unwrap();
        write(&p, 0, &data).await;
        let sequential =
            crate::digest::digest_file(&File::open(&path).unwrap(), size.size).unwrap();
        assert_eq!(
            p.commit_as(
                0o644,
                0,
                Some(sequential),
                DigestKind::Sequential,
                Durability::Flushed
            )
            .await
            .unwrap(),
            sequential
        );
        assert_eq!(p.commit(0o644, 0, Some(want)).await.unwrap(), want);
    }

    #[tokio::test]
    async fn resumed_bytes_count_toward_the_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let slot = root.slot("f", true).unwrap();
        let p = PartialFile::open(slot.clone(), id(8)).await.unwrap();
        write(&p, 0, b"abcd").await;
        drop(p);
        let p = PartialFile::open(slot, id(8)).await.unwrap();
        write(&p, 4, b"efgh").await;
        let mut want = Frontier::default();
        want.feed(0, b"abcdefgh");
        p.commit(0o644, 0, Some(want.digest())).await.unwrap();
    }

    #[tokio::test]
    async fn a_final_file_of_the_same_identity_counts_as_held() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let slot = root.slot("f", true).unwrap();
        let p = PartialFile::open(slot.clone(), id(4)).await.unwrap();
        write(&p, 0, b"abcd").await;
        let digest = p.commit(0o644, id(4).mtime_ns, None).await.unwrap();
        drop(p);
        // A rerun (say, after the commit's answer was lost) finds it all held.
        let p = PartialFile::open(slot.clone(), id(4)).await.unwrap();
        assert_eq!(p.resumed_bytes(), 4);
        assert_eq!(
            p.commit(0o644, id(4).mtime_ns, Some(digest)).await.unwrap(),
            digest
        );
        drop(p);
        // Other bytes with the same size and mtime: the commit asks for everything instead.
        let p = PartialFile::open(slot, id(4)).await.unwrap();
        let mut other = Frontier::default();
        other.feed(0, b"wxyz");
        let err = p
            .commit(0o644, id(4).mtime_ns, Some(other.digest()))
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::Incomplete { missing: 4 }), "{err}");
        assert_eq!(
            std::fs::read(tmp.path().join("f")).unwrap(),
            b"abcd",
            "old file kept"
        );
        write(&p, 0, b"wxyz").await;
        p.commit(0o644, id(4).mtime_ns, Some(other.digest()))
            .await
            .unwrap();
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), b"wxyz");
    }

    #[tokio::test]
    async fn writes_beyond_the_size_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let p = PartialFile::open(root.slot("f", true).unwrap(), id(4))
            .await
            .unwrap();
        assert!(p.write(2, Bytes::from_static(b"abc"), 0).await.is_err());
    }

    #[tokio::test]
    async fn a_sparse_partial_reserves_only_the_bytes_between_its_holes() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let size = 64 << 20;
        let holes = vec![
            ByteRange::new(1 << 20, 32 << 20),
            ByteRange::new(33 << 20, size),
        ];
        let p = PartialFile::open_sparse(root.slot("s", true).unwrap(), id(size), holes)
            .await
            .unwrap();
        let part = tmp.path().join(partial_name("s"));
        let meta = std::fs::metadata(&part).unwrap();
        assert_eq!(meta.len(), size, "the partial has the file's length");
        assert!(
            meta.blocks() * 512 <= (2 << 20) + 8192,
            "{} bytes allocated for 2 MiB of data",
            meta.blocks() * 512
        );
        drop(p);
        let dense = PartialFile::open(root.slot("d", true).unwrap(), id(size))
            .await
            .unwrap();
        let reserved = std::fs::metadata(tmp.path().join(partial_name("d"))).unwrap();
        assert_eq!(reserved.len(), size);
        drop(dense);
    }

    #[tokio::test]
    async fn holes_are_held_without_being_written_and_survive_a_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let size = 8 << 20;
        let mut want = vec![0u8; size as usize];
        want[..4096].fill(7);
        let identity = id(size);
        let p = PartialFile::open(root.slot("s", true).unwrap(), identity)
            .await
            .unwrap();
        p.write_zeros(ByteRange::new(4 << 20, size)).await.unwrap();
        drop(p);
        let p = PartialFile::open(root.slot("s", true).unwrap(), identity)
            .await
            .unwrap();
        assert_eq!(
            p.held_bytes(),
            4 << 20,
            "the hole's record is trusted on resume"
        );
        write(&p, 0, &want[..4096]).await;
        p.write_zeros(ByteRange::new(4096, 4 << 20)).await.unwrap();
        let expected = crate::digest::digest_file(
            &{
                let f = tempfile::tempfile().unwrap();
                f.write_all_at(&want, 0).unwrap();
                f
            },
            size,
        )
        .unwrap();
        p.commit(0o644, identity.mtime_ns, Some(expected))
            .await
            .unwrap();
        let meta = std::fs::metadata(tmp.path().join("s")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 64 << 10, "{} blocks", meta.blocks());
        assert_eq!(std::fs::read(tmp.path().join("s")).unwrap(), want);
    }

    #[test]
    fn write_behind_starts_whole_windows_behind_the_frontier_and_drops_the_ones_before() {
        let mut wb = WriteBehind::default();
        assert_eq!(wb.advance(WRITE_BEHIND - 1), None);
        let first = wb.advance(WRITE_BEHIND + 5).unwrap();
        assert_eq!(first.start, ByteRange::new(0, WRITE_BEHIND));
        assert!(first.drop.is_empty());
        assert_eq!(wb.advance(WRITE_BEHIND * 2 - 1), None);
        // A frontier jumping several windows (a hole filled late) starts them all at once.
        let next = wb.advance(WRITE_BEHIND * 4).unwrap();
        assert_eq!(next.start, ByteRange::new(WRITE_BEHIND, WRITE_BEHIND * 4));
        assert_eq!(next.drop, ByteRange::new(0, WRITE_BEHIND));
        let last = wb.advance(WRITE_BEHIND * 5).unwrap();
        assert_eq!(last.drop, ByteRange::new(WRITE_BEHIND, WRITE_BEHIND * 4));
    }

    /// Whether the page at `offset` of `file` is in the page cache: a read that must not wait
    /// for the disk fails with `EAGAIN` when it is not.
    fn cached(file: &File, offset: u64) -> bool {
        let mut byte = [0u8; 1];
        let flags = rustix::io::ReadWriteFlags::NOWAIT;
        let bufs = &mut [std::io::IoSliceMut::new(&mut byte)];
        match rustix::io::preadv2(file, bufs, offset, flags) {
            Ok(_) => true,
            Err(rustix::io::Errno::AGAIN) => false,
            Err(e) => panic!("preadv2: {e}"),
        }
    }

    #[tokio::test]
    async fn what_the_digest_passed_is_written_back_and_leaves_the_page_cache() {
        // On a disk: /tmp may be a tmpfs, whose pages never leave memory.
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let size = WRITE_BEHIND * 3 + 4096;
        let p = PartialFile::open(root.slot("big", true).unwrap(), id(size))
            .await
            .unwrap();
        // Pieces below what is written directly through an aligned block, from memory that is
        // never page-aligned: every byte goes through the page cache, and only the write-behind
        // can drop it.
        let piece = crate::direct::REALIGN_MIN / 2;
        let block: Vec<u8> = (0..piece as u32).map(|i| (i % 251) as u8).collect();
        let mut at = 0;
        while at < size {
            let n = block.len().min((size - at) as usize);
            let mut buf = Vec::with_capacity(n + 1);
            buf.push(0);
            buf.extend_from_slice(&block[..n]);
            let unaligned = Bytes::from(buf).slice(1..);
            p.write(at, unaligned, crc32fast::hash(&block[..n]))
                .await
                .unwrap();
            at += n as u64;
        }
        let part = File::open(tmp.path().join(partial_name("big"))).unwrap();
        assert!(!cached(&part, 0), "the first window is still cached");
        assert!(!cached(&part, WRITE_BEHIND - 4096));
        // The window being written back and the bytes ahead of it stay.
        assert!(cached(&part, WRITE_BEHIND * 3));
        p.commit(0o644, id(size).mtime_ns, None).await.unwrap();
    }

    #[tokio::test]
    async fn empty_file_commits() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let p = PartialFile::open(root.slot("e", true).unwrap(), id(0))
            .await
            .unwrap();
        p.commit(0o644, 0, None).await.unwrap();
        assert_eq!(std::fs::read(tmp.path().join("e")).unwrap(), b"");
    }
}
