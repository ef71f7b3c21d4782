//! [`BufferPool`]: chunk-sized buffers reused once the bytes in them have been sent or written.
//!
//! A fresh buffer per chunk costs a page fault and a zeroed page per 4 KiB (measured: a fifth of
//! a loopback upload's client CPU, and the same again in the daemon's receive path).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::budget::Reservation;

/// A bounded set of spare buffers: beyond `keep` spares, returned buffers are freed.
#[derive(Debug, Clone)]
pub struct BufferPool {
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` spare buffers.
    pub fn new(keep: usize) -> Self {
        Self {
            spare: Arc::default(),
            keep,
        }
    }

    /// A buffer of `len` bytes, of unspecified content.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self.lock().pop().unwrap_or_default();
        // Only bytes beyond what the buffer held before are zeroed.
        buf.resize(len, 0);
        buf
    }

    /// `buf` as `Bytes` that hand the buffer back to the pool when the last clone is dropped.
    pub fn bytes(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
            reservation: None,
        })
    }

    /// `buf` as `Bytes` that hand it and `reservation` back to the budget when the last clone
    /// is dropped ([`Reservation::recycle`]: freed, or kept there as a spare; never here).
    pub fn reserved_bytes(buf: Vec<u8>, reservation: Reservation) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: Self::new(0),
            reservation: Some(reservation),
        })
    }

    /// A buffer of `len` bytes, of unspecified content, lent for the borrower's scope: it comes
    /// back here when dropped, as a spare (up to `keep`).
    pub fn lend(&self, len: usize) -> Lent<'_> {
        Lent {
            buf: self.take(len),
            pool: self,
        }
    }

    /// Keeps `buf` as a spare, or frees it beyond `keep` spares.
    fn give_back(&self, buf: Vec<u8>) {
        let mut spare = self.lock();
        if spare.len() < self.keep {
            spare.push(buf);
        } else {
            drop(spare);
            drop(buf);
        }
    }

    /// Frees every spare buffer held now (a quiet daemon hands its memory back).
    pub fn drop_spares(&self) {
        self.lock().clear();
    }

    /// Whether `other` hands out and keeps the same spares.
    #[cfg(test)]
    pub(crate) fn same_pool(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.spare, &other.spare)
    }

    /// Spare buffers held now.
    #[cfg(test)]
    pub(crate) fn spares(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // A panic while holding the lock leaves a plain list behind; keep going with it.
        self.spare.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: BufferPool,
    /// Budget bytes held for `buf`, given back only once it is freed.
    reservation: Option<Reservation>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if let Some(reservation) = self.reservation.take() {
            // The budget frees it, or keeps it (still reserved) for the next chunk.
            reservation.recycle(buf);
            return;
        }
        self.pool.give_back(buf);
    }
}

/// A buffer lent by [`BufferPool::lend`] for a read in place: back to its pool when dropped.
pub struct Lent<'a> {
    buf: Vec<u8>,
    pool: &'a BufferPool,
}

impl std::ops::Deref for Lent<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for Lent<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_buffer_comes_back_as_a_spare() {
        let pool = BufferPool::new(1);
        let lent = pool.lend(4096);
        let addr = lent.as_ptr();
        drop(lent);
        assert_eq!(pool.spares(), 1);
        // Shorter this time: the same memory, cut to the length asked for.
        let again = pool.lend(1024);
        assert_eq!((again.as_ptr(), again.len()), (addr, 1024));
        drop((again, pool.lend(8), pool.lend(8))); // beyond the one spare kept: freed
        assert_eq!(pool.spares(), 1);
    }

    #[test]
    fn a_returned_buffer_is_reused_and_the_spares_are_bounded() {
        let pool = BufferPool::new(1);
        let first = pool.take(1024);
        let addr = first.as_ptr();
        let (a, b) = (pool.bytes(first), pool.bytes(pool.take(1024)));
        drop(a);
        drop(b); // beyond the one spare kept: freed
        assert_eq!(pool.lock().len(), 1);
        let again = pool.take(512);
        assert_eq!((again.as_ptr(), again.len()), (addr, 512));
    }

    #[test]
    fn dropping_the_spares_frees_them_and_the_pool_goes_on() {
        let pool = BufferPool::new(2);
        drop((pool.bytes(pool.take(64)), pool.bytes(pool.take(64))));
        assert_eq!(pool.spares(), 2);
        pool.drop_spares();
        assert_eq!(pool.spares(), 0);
        drop(pool.bytes(pool.take(64)));
        assert_eq!(pool.spares(), 1);
    }
}
