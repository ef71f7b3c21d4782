//! Encoding a frame into a buffer with room for it allocates nothing: a small file's bytes are
//! copied once, into the buffer, not into a body of their own first (a global allocator counts
//! what this thread allocates).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use xfer_proto::{Frame, PutFile};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; only a count is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_small_file_is_encoded_into_the_buffer_without_an_allocation() {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let frame = Frame::PutFile(PutFile {
        name: "doc/std/index.html".into(),
        mtime_ns: 1,
        mode: 0o644,
        crc32: crc32fast::hash(&data),
        data,
    });
    let mut buffer = BytesMut::with_capacity(1 << 20);
    let before = ALLOCATIONS.with(Cell::get);
    frame.encode(&mut buffer).unwrap();
    let allocations = ALLOCATIONS.with(Cell::get) - before;
    assert_eq!(allocations, 0, "encoding allocated {allocations} times");
    // The same bytes as ever: the frame decodes back to itself.
    let body = buffer.split_off(xfer_proto::LEN_PREFIX).freeze();
    assert_eq!(
        u32::from_be_bytes(buffer[..].try_into().unwrap()) as usize,
        body.len()
    );
    assert_eq!(Frame::decode(body).unwrap(), frame);
}
