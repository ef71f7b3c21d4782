//! [`DirectWriter`]: received chunks written around the page cache (`O_DIRECT`).
//!
//! A buffered write of a received file costs the receiver a fresh page-cache page per 4 KiB,
//! the copy into it and the writeback later. Measured on the 2-core VM of the benchmarks, 2 GiB
//! written by `dd bs=4M` took 4.2–4.5 s of system time buffered and 0.17 s with
//! `oflag=direct`; the daemon's upload receiver spent 79 % of its CPU copying into the page
//! cache. A chunk whose offset, length and memory are aligned goes to the disk straight from
//! the buffer it was received into; anything else (a file's unaligned tail, a decompressed
//! chunk in an unaligned buffer, a filesystem without direct I/O) is written as before.
//!
//! The receiver's digest reads back the chunks that landed ahead of its frontier (about half of
//! a 1 GiB upload over 8 connections, counted with strace). Those bytes are read directly too:
//! read through the cache, they would cost the fresh pages the writes saved.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, StatxFlags};

use crate::digest::read_through_cache;
use crate::on_disk;

/// Alignment chunk payloads are received at (the frame reader of `xfer-net` places them so),
/// and the least a direct write is aligned to: a page, so a direct write and a buffered one
/// never share a page of the cache.
pub const PAYLOAD_ALIGN: usize = 4096;

/// A second, `O_DIRECT` descriptor of a file being received.
#[derive(Debug)]
pub struct DirectWriter {
    file: File,
    /// File offsets and lengths of a direct write are multiples of this.
    offset_align: u64,
    /// Buffers of a direct write start at a multiple of this.
    mem_align: usize,
    /// Cleared when the filesystem refused a direct write it said it could take: every later
    /// write is buffered.
    usable: AtomicBool,
    /// The aligned block direct reads land in, made at the first ([`READ_BLOCK`] bytes).
    scratch: Mutex<Vec<u8>>,
}

/// Bytes a direct read-back asks for at once: each is a round trip to the disk.
pub const READ_BLOCK: usize = 1 << 20;
/// Whole pages a write at an unaligned offset or from unaligned memory must hold for them to go
/// directly, through an aligned block (see [`DirectWriter::write_at`]): below it, a write's
/// wait for the disk costs more than the pages it saves.
pub const REALIGN_MIN: usize = 256 * 1024;
/// Aligned blocks of [`READ_BLOCK`] bytes the realigned writes of a process share, at most: a
/// write that finds none free goes through the cache. They are kept once made (a fresh block
/// costs a zeroed page per 4 KiB), outside the memory budget: 8 MiB at most.
pub const REALIGN_BLOCKS: usize = 8;

/// Whether this process writes received files around the page cache: directly where the
/// filesystem allows it, the rest dropped from the cache once written (the partial's
/// write-behind). A policy of the whole process, set at start from the user's settings
/// (`xferd --no-direct-io`, `xfer recv --no-direct-io`): a user who reads what arrived right
/// after wants it kept in memory.
static DIRECT_IO: AtomicBool = AtomicBool::new(true);

/// Turns writing around the page cache on or off for the files opened from now on (direct
/// descriptors already open stay).
pub fn set_direct_io(on: bool) {
    DIRECT_IO.store(on, Ordering::Relaxed);
}

/// Whether received files are written around the page cache (see [`set_direct_io`]).
pub fn direct_io() -> bool {
    DIRECT_IO.load(Ordering::Relaxed)
}

/// The free realigned-write blocks, and how many exist.
static BLOCKS: Mutex<(Vec<Vec<u8>>, usize)> = Mutex::new((Vec::new(), 0));

/// A realigned-write block, back among the free ones when dropped.
struct Block(Vec<u8>);

impl Block {
    /// A free block, or a new one while fewer than [`REALIGN_BLOCKS`] exist.
    fn take() -> Option<Self> {
        let mut blocks = BLOCKS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(block) = blocks.0.pop() {
            return Some(Self(block));
        }
        if blocks.1 >= REALIGN_BLOCKS {
            return None;
        }
        blocks.1 += 1;
        drop(blocks);
        Some(Self(vec![0; READ_BLOCK + PAYLOAD_ALIGN]))
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let block = std::mem::take(&mut self.0);
        BLOCKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .push(block);
    }
}

impl DirectWriter {
    /// Opens `leaf` in `dir` (which must be `data`, checked by inode) for direct writes, if its
    /// filesystem says how to align them (`statx` `STATX_DIOALIGN`, Linux 6.1) within
    /// [`PAYLOAD_ALIGN`]. `None` where direct I/O is not offered or turned off
    /// ([`set_direct_io`]): writes stay buffered.
    pub fn open(dir: BorrowedFd<'_>, leaf: &str, data: &File) -> Option<Self> {
        if !direct_io() {
            return None;
        }
        let st = rfs::statx(data, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok()?;
        if !StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::DIOALIGN)
            || st.stx_dio_offset_align == 0
            || st.stx_dio_mem_align == 0
        {
            return None;
        }
        let offset_align = u64::from(st.stx_dio_offset_align).max(PAYLOAD_ALIGN as u64);
        let mem_align = st.stx_dio_mem_align as usize;
        if offset_align > PAYLOAD_ALIGN as u64 || mem_align > PAYLOAD_ALIGN {
            return None;
        }
        let flags = OFlags::RDWR | OFlags::DIRECT | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let file = File::from(rfs::openat(dir, on_disk(leaf), flags, Mode::empty()).ok()?);
        // The name could have been replaced between the two opens: write only to `data`.
        let (a, b) = (rfs::fstat(&file).ok()?, rfs::fstat(data.as_fd()).ok()?);
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
            return None;
        }
        Some(Self {
            file,
            offset_align,
            mem_align,
            usable: AtomicBool::new(true),
            scratch: Mutex::default(),
        })
    }

    /// Hands `sink` the `n` bytes at `offset` of the file (`n` at most [`READ_BLOCK`]): the
    /// aligned part read directly, the rest through `data`.
    ///
    /// # Errors
    /// I/O errors, or a file shorter than `offset + n`.
    pub fn read_at(
        &self,
        data: &File,
        offset: u64,
        n: usize,
        sink: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        let aligned = offset % self.offset_align == 0 && self.usable.load(Ordering::Relaxed);
        let direct_len = if aligned {
            n.min(READ_BLOCK) - n.min(READ_BLOCK) % self.offset_align as usize
        } else {
            0
        };
        if direct_len > 0 {
            // A block the process shares first: a tree's light files each read a block back
            // once, and a scratch of each file's own cost a zeroed page per 4 KiB every time.
            let mut shared = Block::take();
            let mut own;
            let scratch = match shared.as_mut() {
                Some(block) => &mut block.0,
                None => {
                    own = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
                    if own.is_empty() {
                        own.resize(READ_BLOCK + PAYLOAD_ALIGN, 0);
                    }
                    &mut *own
                }
            };
            let pad = scratch.as_ptr().align_offset(PAYLOAD_ALIGN);
            let block = &mut scratch[pad..pad + direct_len];
            match self.file.read_exact_at(block, offset) {
                Ok(()) => sink(block),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    self.usable.store(false, Ordering::Relaxed);
                    return read_through_cache(data, offset, n, &mut Vec::new(), sink);
                }
                Err(e) => return Err(e),
            }
        }
        read_through_cache(
            data,
            offset + direct_len as u64,
            n - direct_len,
            &mut Vec::new(),
            sink,
        )
    }

    /// Writes `payload` at `offset` of the file: its aligned part directly, the rest through
    /// `data` (the buffered descriptor of the same file). Returns the bytes written directly.
    ///
    /// A payload at an unaligned offset or in unaligned memory (a delta's run copied from the
    /// old file, its literal ranges, a decompressed chunk) with at least [`REALIGN_MIN`] bytes of
    /// whole pages has those pages copied through an aligned block and written directly, its
    /// ragged head and tail through the cache: the copy costs far less than the fresh page-cache
    /// pages (a tree's delta of 50 files of 2 MiB spent 44 % of the daemon's CPU filling them).
    ///
    /// # Errors
    /// I/O errors of either write.
    pub fn write_at(&self, data: &File, payload: &[u8], offset: u64) -> io::Result<usize> {
        let direct_len = self.direct_len(payload, offset);
        if direct_len > 0 {
            match self.file.write_all_at(&payload[..direct_len], offset) {
                Ok(()) => {
                    data.write_all_at(&payload[direct_len..], offset + direct_len as u64)?;
                    return Ok(direct_len);
                }
                // Alignment the filesystem did not announce: buffered from now on, and this
                // chunk again whole (a direct write cut short left nothing that matters).
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    self.usable.store(false, Ordering::Relaxed);
                    tracing::debug!(error = %e, "direct write refused; writing through the cache");
                }
                Err(e) => return Err(e),
            }
        } else if let Some(written) = self.write_realigned(data, payload, offset)? {
            return Ok(written);
        }
        data.write_all_at(payload, offset)?;
        Ok(0)
    }

    /// The whole pages inside `payload` (at `offset`) written directly through an aligned block,
    /// the rest through `data`; `None` (nothing written) where they are too few, no block is
    /// free, or direct writes are off.
    fn write_realigned(
        &self,
        data: &File,
        payload: &[u8],
        offset: u64,
    ) -> io::Result<Option<usize>> {
        let align = self.offset_align;
        let head = ((align - offset % align) % align) as usize;
        if !self.usable.load(Ordering::Relaxed) || payload.len() < head + REALIGN_MIN {
            return Ok(None);
        }
        let body_len = (payload.len() - head) / align as usize * align as usize;
        let Some(mut scratch) = Block::take() else {
            return Ok(None);
        };
        let pad = scratch.0.as_ptr().align_offset(PAYLOAD_ALIGN);
        let at = offset + head as u64;
        let mut done = 0;
        while done < body_len {
            let n = (body_len - done).min(READ_BLOCK);
            let block = &mut scratch.0[pad..pad + n];
            block.copy_from_slice(&payload[head + done..head + done + n]);
            match self.file.write_all_at(block, at + done as u64) {
                Ok(()) => done += n,
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    self.usable.store(false, Ordering::Relaxed);
                    tracing::debug!(error = %e, "direct write refused; writing through the cache");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        drop(scratch);
        data.write_all_at(&payload[..head], offset)?;
        data.write_all_at(&payload[head + done..], at + done as u64)?;
        Ok(Some(done))
    }

    /// How many bytes from the start of `payload` can be written directly at `offset`.
    fn direct_len(&self, payload: &[u8], offset: u64) -> usize {
        if !self.usable.load(Ordering::Relaxed)
            || offset % self.offset_align != 0
            || (payload.as_ptr() as usize) % self.mem_align != 0
        {
            return 0;
        }
        payload.len() - payload.len() % self.offset_align as usize
    }
}

/// Writes `payload` at `offset` of `data`, directly through `direct` where it can.
///
/// # Errors
/// I/O errors.
pub fn write_at(
    direct: Option<&DirectWriter>,
    data: &File,
    payload: &[u8],
    offset: u64,
) -> io::Result<usize> {
    match direct {
        Some(direct) => direct.write_at(data, payload, offset),
        None => data.write_all_at(payload, offset).map(|()| 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer of `len` bytes whose first byte is at a multiple of [`PAYLOAD_ALIGN`].
    fn aligned(len: usize, fill: impl Fn(usize) -> u8) -> (Vec<u8>, usize) {
        let mut buf = vec![0u8; len + PAYLOAD_ALIGN];
        let pad = buf.as_ptr().align_offset(PAYLOAD_ALIGN);
        for (i, b) in buf[pad..pad + len].iter_mut().enumerate() {
            *b = fill(i);
        }
        (buf, pad)
    }

    /// A file in the temporary directory (on tmpfs, direct I/O may not be offered: skipped).
    fn disk_file(dir: &std::path::Path) -> (File, std::path::PathBuf) {
        let path = dir.join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (file, path)
    }

    /// A direct descriptor of `dir/f` (`data`), or `None`, said on stderr, where the directory's
    /// filesystem offers no direct I/O: the test is skipped.
    fn direct_on(dir: &std::path::Path, data: &File) -> Option<DirectWriter> {
        let dirfd = File::open(dir).unwrap();
        let direct = DirectWriter::open(dirfd.as_fd(), "f", data);
        if direct.is_none() {
            eprintln!("no direct I/O on {}: skipped", dir.display());
        }
        direct
    }

    #[test]
    fn whole_pages_of_an_unaligned_write_go_direct_through_an_aligned_block() {
        let dir = tempfile::tempdir().unwrap();
        let (data, path) = disk_file(dir.path());
        let Some(direct) = direct_on(dir.path(), &data) else {
            return;
        };
        // Unaligned memory and offset, more than the scratch block holds at once.
        let len = READ_BLOCK + REALIGN_MIN + 300;
        let (buf, pad) = aligned(len + 1, |i| (i * 7 % 253) as u8);
        let payload = &buf[pad + 1..pad + 1 + len];
        let offset = 1000;
        let head = PAYLOAD_ALIGN - 1000;
        let pages = (len - head) / PAYLOAD_ALIGN * PAYLOAD_ALIGN;
        assert_eq!(direct.write_at(&data, payload, offset).unwrap(), pages);
        // Too few whole pages: all through the cache.
        let small = &payload[..REALIGN_MIN - 1];
        assert_eq!(direct.write_at(&data, small, 1 << 24).unwrap(), 0);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[1000..1000 + len], payload);
        assert_eq!(&on_disk[1 << 24..], small);
    }

    #[test]
    fn aligned_bytes_go_direct_and_the_tail_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (data, path) = disk_file(dir.path());
        let Some(direct) = direct_on(dir.path(), &data) else {
            return;
        };
        let len = 3 * PAYLOAD_ALIGN + 100;
        let (buf, pad) = aligned(len, |i| (i * 31 % 251) as u8);
        let payload = &buf[pad..pad + len];
        // Aligned: all but the 100-byte tail directly.
        assert_eq!(
            direct.write_at(&data, payload, 0).unwrap(),
            3 * PAYLOAD_ALIGN
        );
        // Misaligned memory or offset: all through the cache.
        let (second, third) = (PAYLOAD_ALIGN as u64 * 8, PAYLOAD_ALIGN as u64 * 16 + 512);
        assert_eq!(direct.write_at(&data, &payload[1..], second).unwrap(), 0);
        assert_eq!(direct.write_at(&data, payload, third).unwrap(), 0);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[..len], payload);
        assert_eq!(&on_disk[second as usize..][..len - 1], &payload[1..]);
        assert_eq!(&on_disk[third as usize..][..len], payload);
    }

    #[test]
    fn read_back_hands_over_exactly_the_bytes_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = disk_file(dir.path());
        let want: Vec<u8> = (0..3 * READ_BLOCK + 777)
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        data.write_all_at(&want, 0).unwrap();
        let Some(direct) = direct_on(dir.path(), &data) else {
            return;
        };
        // Aligned whole blocks, an aligned start with a ragged end, a ragged start.
        for (offset, n) in [
            (0, READ_BLOCK),
            (READ_BLOCK as u64, READ_BLOCK),
            (2 * READ_BLOCK as u64, READ_BLOCK - 1),
            (3 * READ_BLOCK as u64, 777),
            (100, 5000),
        ] {
            let mut got = Vec::new();
            direct
                .read_at(&data, offset, n, &mut |b| got.extend_from_slice(b))
                .unwrap();
            assert_eq!(got, want[offset as usize..][..n], "{offset} {n}");
        }
    }

    #[test]
    fn a_read_back_takes_a_shared_block_and_makes_no_scratch_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = disk_file(dir.path());
        let want: Vec<u8> = (0..READ_BLOCK).map(|i| (i * 11 % 251) as u8).collect();
        data.write_all_at(&want, 0).unwrap();
        let Some(direct) = direct_on(dir.path(), &data) else {
            return;
        };
        let mut got = Vec::new();
        direct
            .read_at(&data, 0, READ_BLOCK, &mut |b| got.extend_from_slice(b))
            .unwrap();
        assert_eq!(got, want);
        // Only while every shared block is in use does a file make its own.
        let all_taken = BLOCKS.lock().unwrap_or_else(|p| p.into_inner()).1 >= REALIGN_BLOCKS;
        if !all_taken {
            assert!(direct.scratch.lock().unwrap().is_empty());
        }
    }

    #[test]
    fn a_replaced_name_gets_no_direct_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let (data, path) = disk_file(dir.path());
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"another file").unwrap();
        let dirfd = File::open(dir.path()).unwrap();
        assert!(DirectWriter::open(dirfd.as_fd(), "f", &data).is_none());
    }
}
