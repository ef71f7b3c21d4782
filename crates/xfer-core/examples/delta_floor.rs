//! The compute floor of a delta on this machine: reading a file, its whole-file digest
//! (XXH3-128, as `digest_file`), and cutting it into content-defined chunks (as `cut_region`),
//! on one core and on every core. `cargo run --release -p xfer-core --example delta_floor FILE`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use xfer_core::delta;
use xfer_proto::ByteRange;

fn read_all(file: &File, size: u64, each: &mut dyn FnMut(&[u8])) {
    let mut buf = vec![0u8; 128 << 10];
    let mut pos = 0;
    while pos < size {
        let n = file.read_at(&mut buf, pos).expect("read");
        each(&buf[..n]);
        pos += n as u64;
    }
}

fn timed(what: &str, size: u64, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    let s = t.elapsed().as_secs_f64();
    println!("{what:<44} {s:>6.2} s  {:>6.2} GB/s", size as f64 / s / 1e9);
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: delta_floor FILE");
    let file = File::open(&path).expect("open");
    let size = file.metadata().expect("stat").len();
    let avg = delta::avg_chunk(size);
    let cores = xfer_core::cores();
    timed("read (page cache), 128 KiB reads", size, || {
        read_all(&file, size, &mut |_| {})
    });
    timed("read + XXH3-128 digest (one core)", size, || {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        read_all(&file, size, &mut |b| h.update(b));
        std::hint::black_box(h.digest128());
    });
    timed("FastCDC cut + chunk hashes (one core)", size, || {
        let mut n = 0;
        delta::cut_region(&file, ByteRange::new(0, size), avg, |_| {
            n += 1;
            true
        })
        .expect("cut");
        std::hint::black_box(n);
    });
    let what = format!("FastCDC cut + chunk hashes ({cores} regions)");
    timed(&what, size, || {
        std::thread::scope(|s| {
            for region in delta::regions(size, cores) {
                let file = &file;
                s.spawn(move || {
                    delta::cut_region(file, region, avg, |_| true).expect("cut");
                });
            }
        });
    });
}
