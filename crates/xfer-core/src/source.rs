//! [`SourceFile`]: the sending side of a transfer, read with positional reads so that many
//! connections can read different chunks of one file at once.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::sync::Arc;

use bytes::Bytes;
use xfer_proto::{ByteRange, FileIdentity};

use crate::budget::Reservation;
use crate::buffers::BufferPool;
use crate::{CoreError, Result};

/// A regular file being sent.
#[derive(Debug, Clone)]
pub struct SourceFile {
    file: Arc<File>,
    name: String,
    identity: FileIdentity,
    mode: u32,
    buffers: BufferPool,
    /// Fewer blocks than the size needs when opened: it may have holes.
    sparse: bool,
}

/// The identity (size, mtime) of an open file.
///
/// # Errors
/// I/O errors from `fstat`.
pub fn identity_of(file: &File) -> std::io::Result<(FileIdentity, u32)> {
    let meta = file.metadata()?;
    let identity = FileIdentity {
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
    };
    Ok((identity, meta.permissions().mode() & 0o777))
}

impl SourceFile {
    /// Chunk buffers kept for reuse once their bytes are sent (see [`BufferPool`]).
    const SPARE_BUFFERS: usize = 8;

    /// Wraps an open regular file; `name` is used in errors.
    ///
    /// # Errors
    /// `NotRegular` or I/O errors.
    pub fn new(file: File, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let meta = file
            .metadata()
            .map_err(|e| CoreError::io(format!("stat {name}"), e))?;
        if !meta.is_file() {
            return Err(CoreError::NotRegular(name));
        }
        let (identity, mode) =
            identity_of(&file).map_err(|e| CoreError::io(format!("stat {name}"), e))?;
        Ok(Self {
            file: Arc::new(file),
            name,
            identity,
            mode,
            buffers: BufferPool::new(Self::SPARE_BUFFERS),
            sparse: meta.blocks() * 512 < meta.len(),
        })
    }

    /// The open file, for reads of its own (a delta's chunking).
    pub fn file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// Identity at open time.
    pub fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// Permission bits.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// True when `range` lies wholly in a hole of the file (`SEEK_DATA` finds no data in it);
    /// false for a file stored whole, without a system call.
    pub fn is_hole(&self, range: ByteRange) -> bool {
        use std::os::fd::AsFd;
        if !self.sparse || range.is_empty() {
            return false;
        }
        match rustix::fs::seek(self.file.as_fd(), rustix::fs::SeekFrom::Data(range.start)) {
            Ok(data) => data >= range.end,
            // No data after `start`: but a file that shrank has none either; its reads say so.
            Err(rustix::io::Errno::NXIO) => {
                self.file.metadata().is_ok_and(|m| m.len() >= range.end)
            }
            Err(_) => false,
        }
    }

    /// The file's holes if it has fewer blocks than its size needs (see
    /// [`crate::meta::holes_of`]); none for a file stored whole.
    ///
    /// # Errors
    /// I/O errors.
    pub fn holes(&self) -> Result<Vec<ByteRange>> {
        let ctx = |e| CoreError::io(format!("finding holes of {}", self.name), e);
        let meta = self.file.metadata().map_err(ctx)?;
        if meta.blocks() * 512 >= meta.len() {
            return Ok(Vec::new());
        }
        crate::meta::holes_of(std::os::fd::AsFd::as_fd(&*self.file), self.identity.size)
            .map_err(ctx)
    }

    /// Reads `range` on a blocking thread.
    ///
    /// # Errors
    /// `Changed` if the file is now shorter; I/O errors.
    pub async fn read(&self, range: ByteRange) -> Result<Bytes> {
        self.read_with(range, None).await
    }

    /// Reads `range` into a buffer that `reservation` (at least `range`'s length, from a
    /// [`crate::MemoryBudget`]) pays for; the buffer and the reservation go back to the budget
    /// once the bytes returned are dropped.
    ///
    /// # Errors
    /// As [`SourceFile::read`].
    pub async fn read_reserved(&self, range: ByteRange, reservation: Reservation) -> Result<Bytes> {
        self.read_with(range, Some(reservation)).await
    }

    async fn read_with(&self, range: ByteRange, reservation: Option<Reservation>) -> Result<Bytes> {
        let file = Arc::clone(&self.file);
        let (name, buffers) = (self.name.clone(), self.buffers.clone());
        let task = tokio::task::spawn_blocking(move || {
            let (mut buf, reservation) = match reservation {
                Some(reservation) => {
                    let (buf, reservation) = reservation.buffer(range.len() as usize);
                    (buf, Some(reservation))
                }
                None => (buffers.take(range.len() as usize), None),
            };
            match file.read_exact_at(&mut buf, range.start) {
                Ok(()) => Ok(match reservation {
                    Some(reservation) => BufferPool::reserved_bytes(buf, reservation),
                    None => buffers.bytes(buf),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(CoreError::Changed(
                    format!("{name} shrank while being read"),
                )),
                Err(e) => Err(CoreError::io(format!("reading {name}"), e)),
            }
        });
        task.await
            .map_err(|e| CoreError::io("disk task", std::io::Error::other(e.to_string())))?
    }

    /// Digest of the whole file, read front to back on a blocking thread.
    ///
    /// # Errors
    /// `Changed` if the file is now shorter; I/O errors.
    pub async fn digest(&self) -> Result<crate::digest::Digest> {
        self.digest_as(crate::digest::DigestKind::Sequential).await
    }

    /// [`digest`](Self::digest) of `kind`, the one the session in force uses.
    ///
    /// # Errors
    /// As [`digest`](Self::digest).
    pub async fn digest_as(
        &self,
        kind: crate::digest::DigestKind,
    ) -> Result<crate::digest::Digest> {
        let (file, name, size) = (
            Arc::clone(&self.file),
            self.name.clone(),
            self.identity.size,
        );
        let task = tokio::task::spawn_blocking(move || {
            crate::digest::digest_file_as(kind, &file, size).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    CoreError::Changed(format!("{name} shrank while being read"))
                }
                _ => CoreError::io(format!("reading {name}"), e),
            })
        });
        task.await
            .map_err(|e| CoreError::io("disk task", std::io::Error::other(e.to_string())))?
    }

    /// Fails if the file's size or mtime differ from those at open time.
    ///
    /// # Errors
    /// `Changed` or I/O errors.
    pub fn check_unchanged(&self) -> Result<()> {
        let (now, _) =
            identity_of(&self.file).map_err(|e| CoreError::io(format!("stat {}", self.name), e))?;
        if now != self.identity {
            return Err(CoreError::Changed(self.name.clone()));
        }
        Ok(())
    }
}
