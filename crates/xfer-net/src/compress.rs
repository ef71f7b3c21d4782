//! Chunks on the wire compressed with zstd (`CAP_COMPRESSION`): [`Compression`] (what the user
//! asked for), [`Compressor`], which turns a chunk into `Data` or `DataZ` as asked (for `auto`,
//! as [`Adapt`] decides), and [`inflate`], which checks a `DataZ` and decompresses it into the
//! `Data` it stands for.
//!
//! Compressing and decompressing run on tokio's blocking pool, one chunk per connection at a
//! time: a connection awaits its chunk before it sends or writes it, so each holds at most one
//! buffer more than without compression.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use xfer_proto::{
    Data, DataZ, Frame, PackedFiles, COMPRESSION_AUTO, COMPRESSION_OFF, MAX_COMPRESSION_LEVEL,
};

use crate::adapt::{Adapt, Choice, Decision, Sent, INCOMPRESSIBLE, SAMPLE_LEN};

/// How a sender compresses its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Never.
    Off,
    /// Where it raises throughput, decided per chunk from measurements ([`Adapt`]).
    #[default]
    Auto,
    /// Every chunk that shrinks, at this zstd level (1..=22).
    Level(u8),
}

impl Compression {
    /// The `SetCompression.mode` byte.
    pub fn wire(self) -> u8 {
        match self {
            Self::Off => COMPRESSION_OFF,
            Self::Auto => COMPRESSION_AUTO,
            Self::Level(level) => level,
        }
    }

    /// The mode a `SetCompression.mode` byte names, if any.
    pub fn from_wire(mode: u8) -> Option<Self> {
        match mode {
            COMPRESSION_OFF => Some(Self::Off),
            COMPRESSION_AUTO => Some(Self::Auto),
            1..=MAX_COMPRESSION_LEVEL => Some(Self::Level(mode)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Auto => f.write_str("auto"),
            Self::Level(level) => write!(f, "{level}"),
        }
    }
}

/// Why a `DataZ` could not be turned back into its `Data`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InflateError {
    /// The payload is not one valid zstd frame, or expands beyond `raw_len`.
    #[error("compressed chunk at offset {offset} is damaged or expands beyond its {raw_len} bytes: {reason}")]
    Corrupt {
        /// Offset of the chunk.
        offset: u64,
        /// The size the frame announced.
        raw_len: u32,
        /// What zstd said.
        reason: String,
    },
    /// The payload expands to fewer bytes than announced.
    #[error("compressed chunk at offset {offset} expands to {got} bytes, not {raw_len}")]
    Short {
        /// Offset of the chunk.
        offset: u64,
        /// The size the frame announced.
        raw_len: u32,
        /// What it expanded to.
        got: usize,
    },
    /// The blocking task running the decompression failed.
    #[error("decompression task failed: {0}")]
    Task(String),
}

/// Decompresses `z.payload` into `buffer`, which must be exactly `z.raw_len` bytes long (the
/// caller has checked that length against its limits and reserved it). The CRC of the
/// compressed bytes must already have been checked.
///
/// # Errors
/// [`InflateError`] when the payload is not a zstd frame of exactly `raw_len` bytes.
pub fn inflate_into(z: &DataZ, buffer: &mut [u8]) -> Result<(), InflateError> {
    debug_assert_eq!(buffer.len(), z.raw_len as usize);
    let got = zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress_to_buffer(&z.payload[..], buffer))
        .map_err(|e| InflateError::Corrupt {
            offset: z.offset,
            raw_len: z.raw_len,
            reason: e.to_string(),
        })?;
    if got != buffer.len() {
        return Err(InflateError::Short {
            offset: z.offset,
            raw_len: z.raw_len,
            got,
        });
    }
    Ok(())
}

/// Decompresses `z` on the blocking pool into `buffer` (exactly `z.raw_len` bytes, from the
/// caller's pool or budget), and makes the `Data` it stands for, with the CRC of the
/// decompressed bytes (the one a journal records). `into_bytes` turns the filled buffer into
/// `Bytes` (handing it back to its pool once dropped).
///
/// # Errors
/// As [`inflate_into`].
pub async fn inflate(
    z: DataZ,
    mut buffer: Vec<u8>,
    into_bytes: impl FnOnce(Vec<u8>) -> Bytes + Send + 'static,
) -> Result<Data, InflateError> {
    tokio::task::spawn_blocking(move || {
        inflate_into(&z, &mut buffer)?;
        Ok(Data::new(z.transfer_id, z.offset, into_bytes(buffer)))
    })
    .await
    .map_err(|e| InflateError::Task(e.to_string()))?
}

/// A chunk ready to send, and what it cost.
#[derive(Debug)]
pub struct Packed {
    /// `Data` or `DataZ`.
    pub frame: Frame,
    /// Bytes of the file it covers.
    pub raw: u64,
    /// Payload bytes on the wire.
    pub wire: u64,
}

/// Turns chunks into frames, compressed as a [`Compression`] says. Clones share one policy:
/// a client's pool of connections measures and decides together.
#[derive(Debug, Clone)]
pub struct Compressor {
    mode: Compression,
    adapt: Arc<Mutex<AdaptState>>,
    /// Raw and wire bytes of every frame made, for summaries and metrics.
    totals: Arc<Totals>,
    /// What the connections the frames go out on have delivered, for `auto`'s probes.
    delivered: Option<crate::Delivered>,
}

#[derive(Debug)]
struct AdaptState {
    adapt: Adapt,
    reported: Option<Decision>,
    label: &'static str,
}

/// Raw and wire bytes of the chunks a [`Compressor`] made.
#[derive(Debug, Default)]
pub struct Totals {
    /// Bytes of the files.
    pub raw: AtomicU64,
    /// Payload bytes on the wire.
    pub wire: AtomicU64,
}

impl Compressor {
    /// A compressor for `mode`; `label` names the sender in the `auto` decisions it logs.
    pub fn new(mode: Compression, label: &'static str) -> Self {
        let cpus = xfer_core::cores();
        Self {
            mode,
            adapt: Arc::new(Mutex::new(AdaptState {
                adapt: Adapt::new(cpus),
                reported: None,
                label,
            })),
            totals: Arc::new(Totals::default()),
            delivered: None,
        }
    }

    /// This compressor, its `auto` probes measuring what `delivered` (the meter of the
    /// connections its frames go out on, if any) says was delivered, rather than what was
    /// handed to the sockets.
    pub fn with_delivered(mut self, delivered: Option<crate::Delivered>) -> Self {
        self.delivered = delivered;
        self
    }

    /// A compressor for another transfer of the same copy (a large file of a tree): it
    /// follows this one's `auto` policy, which measures and decides for both by this one's
    /// meter, and keeps totals of its own. A tree so decides once, rather than letting each of
    /// its large files start over with a probe of its own, sending raw meanwhile.
    pub fn sharing_decisions(&self) -> Self {
        Self {
            totals: Arc::new(Totals::default()),
            ..self.clone()
        }
    }

    /// The meter its `auto` probes measure by, if any.
    pub fn delivered(&self) -> Option<&crate::Delivered> {
        self.delivered.as_ref()
    }

    /// The mode it compresses by.
    pub fn mode(&self) -> Compression {
        self.mode
    }

    /// Raw and wire bytes of the chunks made so far.
    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// [`Compressor::pack`] on a connection where compressing is `allowed`
    /// (`CAP_COMPRESSION`), else `Data` (counted in the totals all the same).
    pub async fn pack_if(
        &self,
        allowed: bool,
        transfer_id: u64,
        offset: u64,
        payload: Bytes,
    ) -> Packed {
        if allowed {
            return self.pack(transfer_id, offset, payload).await;
        }
        let raw = payload.len() as u64;
        let frame = Frame::Data(Data::new(transfer_id, offset, payload));
        self.totals.raw.fetch_add(raw, Ordering::Relaxed);
        self.totals.wire.fetch_add(raw, Ordering::Relaxed);
        Packed {
            frame,
            raw,
            wire: raw,
        }
    }

    /// `payload`, the bytes at `offset` of transfer `transfer_id`, as the frame to send:
    /// `DataZ` where compressing shrinks it and the mode asks for it, else `Data`.
    pub async fn pack(&self, transfer_id: u64, offset: u64, payload: Bytes) -> Packed {
        let choice = self.choose();
        let raw = payload.len() as u64;
        let Choice::Compress { level, sample } = choice else {
            let frame = Frame::Data(Data::new(transfer_id, offset, payload));
            return self.finish(frame, raw, raw, None);
        };
        let (payload, packed, spent) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let packed = with_packer(|packer| packer.shrink(&payload, level, sample));
            (payload, packed, started.elapsed())
        })
        .await
        .expect("zstd does not panic");
        let frame = match packed {
            Some(z) => Frame::DataZ(DataZ::new(transfer_id, offset, raw as u32, z.into())),
            None => Frame::Data(Data::new(transfer_id, offset, payload)),
        };
        let wire = match &frame {
            Frame::DataZ(z) => z.payload.len() as u64,
            _ => raw,
        };
        self.finish(frame, raw, wire, Some(spent))
    }

    /// Small files of a tree (`PutFile` frames, or `FileData` and `Error` answers to
    /// `GetFile`), as one packed frame's body where the mode asks for compression and it
    /// shrinks them; `None`: send them as they are. Blocks on zstd: call it off the runtime's
    /// workers (on the blocking pool, or under `block_in_place`).
    pub fn pack_files(&self, frames: &[Frame]) -> Option<PackedFiles> {
        self.pack_files_with(&PACKERS, frames)
    }

    /// [`Compressor::pack_files`] with a packer of `packers`.
    fn pack_files_with(&self, packers: &Packers, frames: &[Frame]) -> Option<PackedFiles> {
        let raw: u64 = frames.iter().map(|f| file_bytes(f) as u64).sum();
        let choice = self.choose();
        let Choice::Compress { level, sample } = choice else {
            self.account(raw, raw, None);
            return None;
        };
        let started = Instant::now();
        let packed = packers.lend(|packer| {
            let mut encoded = std::mem::take(&mut packer.encoded);
            let packed = PackedFiles::encode_frames_into(frames, &mut encoded)
                .ok()
                .filter(|_| encoded.len() <= xfer_proto::MAX_PACKED_LEN as usize)
                .and_then(|_| packer.shrink(&encoded, level, sample))
                .map(|zstd| PackedFiles::new(frames.len() as u32, &encoded, zstd));
            packer.encoded = encoded;
            packed
        });
        let spent = started.elapsed();
        // What the files took on the wire: the compressed bytes carry them all.
        let wire = packed
            .as_ref()
            .map_or(raw, |p| (p.zstd.len() as u64).min(raw));
        self.account(raw, wire, Some(spent));
        packed
    }

    /// What to do with the next chunk or batch: the mode's answer, or `auto`'s.
    fn choose(&self) -> Choice {
        match self.mode {
            Compression::Off => Choice::Raw,
            Compression::Level(level) => Choice::Compress {
                level: i32::from(level),
                sample: false,
            },
            Compression::Auto => {
                let reading = self.delivered.as_ref().and_then(crate::Delivered::read);
                let mut state = self.lock();
                if let Some(reading) = reading {
                    state.adapt.delivered(reading);
                }
                // Tokio's clock: the same as the system's, except in a test that pauses it.
                state.adapt.choose(tokio::time::Instant::now().into_std())
            }
        }
    }

    fn finish(&self, frame: Frame, raw: u64, wire: u64, spent: Option<Duration>) -> Packed {
        self.account(raw, wire, spent);
        Packed { frame, raw, wire }
    }

    /// Counts what went out, and tells `auto` what it cost.
    fn account(&self, raw: u64, wire: u64, spent: Option<Duration>) {
        self.totals.raw.fetch_add(raw, Ordering::Relaxed);
        self.totals.wire.fetch_add(wire, Ordering::Relaxed);
        if self.mode == Compression::Auto {
            let machine = machine_ticks();
            let mut state = self.lock();
            if let Some((busy, total)) = machine {
                state.adapt.machine_ticks(busy, total);
            }
            if spent.is_some() && wire == raw {
                state.adapt.incompressible();
            }
            state.adapt.sent(Sent {
                raw,
                wire,
                compress: spent.unwrap_or_default(),
            });
            state.report();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AdaptState> {
        // The state is numbers only: one left half-updated by a panic is still usable.
        self.adapt.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AdaptState {
    /// Logs a decision `auto` took, once.
    fn report(&mut self) {
        let decision = self.adapt.decision();
        if decision.is_none() || decision == self.reported {
            return;
        }
        self.reported = decision;
        let Some(d) = decision else { return };
        tracing::info!(
            sender = self.label,
            compress = if d.on { "on" } else { "off" },
            level = d.level,
            ratio = format_args!("{:.2}", d.ratio),
            rate_off_mib_s = format_args!("{:.1}", d.off_rate / f64::from(1 << 20)),
            // Where off was not probed, its rate is the wire rate the path took compressed.
            off_probed = d.off_probed,
            rate_on_mib_s = format_args!("{:.1}", d.on_rate / f64::from(1 << 20)),
            "compression decision"
        );
    }
}

/// The machine's CPU time so far in ticks, busy and in all, from the first line of
/// `/proc/stat` (busy: all but idle and iowait); `None` where there is none.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// File bytes a small-file frame carries.
fn file_bytes(frame: &Frame) -> usize {
    match frame {
        Frame::PutFile(p) | Frame::PutFileMeta(xfer_proto::PutFileMeta { file: p, .. }) => {
            p.data.len()
        }
        Frame::FileData(f) => f.data.len(),
        _ => 0,
    }
}

/// True for bytes that start as a compressed format does (gzip, zstd, xz, bzip2, zip and the
/// formats built on it, PNG, JPEG, GIF, WebP and other RIFF media, MP4, Ogg, FLAC, MP3, 7z,
/// WOFF fonts): compressing them again is all cost. Cheap enough to ask of every small file,
/// so that a tree's already-compressed files travel as they are without a trial.
pub fn looks_compressed(head: &[u8]) -> bool {
    const MAGIC: &[&[u8]] = &[
        b"\x1f\x8b",           // gzip
        b"\x28\xb5\x2f\xfd",   // zstd
        b"\xfd7zXZ\x00",       // xz
        b"BZh",                // bzip2
        b"PK\x03\x04",         // zip, jar, docx, odt, epub
        b"\x89PNG",            // PNG
        b"\xff\xd8\xff",       // JPEG
        b"GIF8",               // GIF
        b"RIFF",               // WebP, AVI, WAV
        b"OggS",               // Ogg
        b"fLaC",               // FLAC
        b"ID3",                // MP3
        b"7z\xbc\xaf\x27\x1c", // 7z
        b"wOFF",               // WOFF
        b"wOF2",               // WOFF2
        b"\x04\x22\x4d\x18",   // lz4
    ];
    MAGIC.iter().any(|m| head.starts_with(m))
        // ISO media (MP4, MOV, HEIF, AVIF): a box size, then `ftyp`.
        || head.get(4..8) == Some(b"ftyp")
}

/// What compressing takes besides the input: a zstd context (its tables allocated and their
/// pages touched once, not per chunk or batch), the buffer small files are encoded into before
/// they are compressed, and the one zstd writes into. A context is large (a few MiB at level
/// 3, tens at 19), so the process keeps no more of them than compressions can run at once
/// ([`with_packer`]), whichever threads and connections ask.
struct Packer {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Small files encoded for a `PackedPutFiles` or `PackedFileData`.
    encoded: bytes::BytesMut,
    /// What zstd writes into, copied out at its exact length: a frame keeps only its bytes
    /// while it waits for the socket, not zstd's worst-case bound.
    out: Vec<u8>,
}

impl Packer {
    fn new() -> Self {
        Self {
            zstd: None,
            encoded: bytes::BytesMut::new(),
            out: Vec::new(),
        }
    }

    /// `payload` compressed at `level`, if it shrinks below [`INCOMPRESSIBLE`]; with `sample`,
    /// only after its first [`SAMPLE_LEN`] bytes did at level 1.
    fn shrink(&mut self, payload: &[u8], level: i32, sample: bool) -> Option<Vec<u8>> {
        if payload.is_empty() {
            return None;
        }
        let shrinks = |input: &[u8], out: usize| (out as f64) < input.len() as f64 * INCOMPRESSIBLE;
        if sample && payload.len() > SAMPLE_LEN {
            let head = &payload[..SAMPLE_LEN];
            let out = self.compress(head, 1).ok()?;
            if !shrinks(head, out) {
                return None;
            }
        }
        let out = self.compress(payload, level).ok()?;
        shrinks(payload, out).then(|| self.out[..out].to_vec())
    }

    /// Compresses `payload` at `level` into `out`; its compressed length.
    fn compress(&mut self, payload: &[u8], level: i32) -> std::io::Result<usize> {
        let zstd = match &mut self.zstd {
            Some(c) => {
                c.set_compression_level(level)?;
                c
            }
            empty => empty.insert(zstd::bulk::Compressor::new(level)?),
        };
        self.out.clear();
        self.out
            .reserve(zstd::zstd_safe::compress_bound(payload.len()));
        zstd.compress_to_buffer(payload, &mut self.out)
    }

    /// Drops buffers grown past twice the packed limit ([`xfer_proto::MAX_PACKED_LEN`]: a
    /// refused batch, or a chunk larger than any batch) instead of keeping them.
    fn trim(&mut self) {
        let limit = 2 * xfer_proto::MAX_PACKED_LEN as usize;
        self.encoded.clear();
        if self.encoded.capacity() > limit {
            self.encoded = bytes::BytesMut::new();
        }
        if self.out.capacity() > limit {
            self.out = Vec::new();
        }
    }
}

/// Packers lent to whoever compresses, at most `limit` in existence at once.
struct Packers {
    state: Mutex<PackersState>,
    returned: std::sync::Condvar,
}

struct PackersState {
    idle: Vec<Packer>,
    made: usize,
    /// Most packers in existence at once.
    limit: usize,
    /// Most that were ever lent at once.
    most_lent: usize,
    /// Callers waiting for one to come back.
    waiting: usize,
}

/// The process's packers, one per CPU at most: compressing is CPU-bound, so more at once
/// would only share the CPUs.
static PACKERS: std::sync::LazyLock<Packers> =
    std::sync::LazyLock::new(|| Packers::new(xfer_core::cores()));

/// Runs `f` with one of the process's packers, waiting for one while all are in use: every
/// connection and thread shares them. A zstd context and encode buffer per thread grew with
/// the blocking threads (`block_in_place` moves a connection's task to another thread): 70
/// of each, 270 MiB of a tree sender's 360 MiB at level 3. Blocks: call it off the runtime's
/// workers.
fn with_packer<T>(f: impl FnOnce(&mut Packer) -> T) -> T {
    PACKERS.lend(f)
}

impl Packers {
    fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(PackersState {
                idle: Vec::new(),
                made: 0,
                limit: limit.max(1),
                most_lent: 0,
                waiting: 0,
            }),
            returned: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PackersState> {
        // Counts and idle packers only: a state left by a panic is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with a packer: an idle one, a new one while fewer than the limit exist, else
    /// the next one handed back.
    fn lend<T>(&self, f: impl FnOnce(&mut Packer) -> T) -> T {
        /// Hands the packer back when dropped; after a panic in `f` its place instead.
        struct Lent<'a>(&'a Packers, Option<Packer>);
        impl Drop for Lent<'_> {
            fn drop(&mut self) {
                let mut state = self.0.lock();
                match self.1.take().filter(|_| !std::thread::panicking()) {
                    Some(mut packer) => {
                        packer.trim();
                        state.idle.push(packer);
                    }
                    None => state.made -= 1,
                }
                drop(state);
                self.0.returned.notify_one();
            }
        }
        let mut state = self.lock();
        let packer = loop {
            if let Some(packer) = state.idle.pop() {
                break packer;
            }
            if state.made < state.limit {
                state.made += 1;
                break Packer::new();
            }
            state.waiting += 1;
            state = self.returned.wait(state).unwrap_or_else(|p| p.into_inner());
            state.waiting -= 1;
        };
        let lent_now = state.made - state.idle.len();
        state.most_lent = state.most_lent.max(lent_now);
        drop(state);
        let mut lent = Lent(self, Some(packer));
        f(lent.1.as_mut().expect("lent above"))
    }
}

/// Fuzz entry point (`fuzz/fuzz_targets/inflate.rs`): `data` as the body of a `DataZ` frame,
/// decompressed as a receiver would if it decodes. Must never panic nor allocate more than the
/// frame's checked `raw_len`, whatever the input.
pub fn fuzz_inflate(data: &[u8]) {
    let mut frame = vec![xfer_proto::FrameType::DataZ as u8];
    frame.extend_from_slice(data);
    let Ok(Frame::DataZ(z)) = Frame::decode(Bytes::from(frame)) else {
        return;
    };
    let mut buffer = vec![0; z.raw_len as usize];
    if inflate_into(&z, &mut buffer).is_ok() {
        assert!(z.payload.len() <= buffer.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| b"id,name,amount\n1,alice,12.50\n"[i % 29])
            .collect()
    }

    fn random(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[tokio::test]
    async fn a_fixed_level_compresses_what_shrinks_and_round_trips() {
        let c = Compressor::new(Compression::Level(3), "test");
        let content = text(1 << 20);
        let packed = c.pack(7, 4096, Bytes::from(content.clone())).await;
        let Frame::DataZ(z) = packed.frame else {
            panic!("text goes compressed");
        };
        assert!(z.crc_matches());
        assert_eq!(z.raw_len, 1 << 20);
        assert!(packed.wire < packed.raw / 10);
        let data = inflate(z, vec![0; 1 << 20], Bytes::from).await.unwrap();
        assert_eq!(data.payload, content);
        assert_eq!((data.transfer_id, data.offset), (7, 4096));
        data.verify().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_compressor_sharing_decisions_follows_the_probe_of_the_other() {
        let tree = Compressor::new(Compression::Auto, "tree");
        let large_file = tree.sharing_decisions();
        let chunk = || Bytes::from(text(1 << 20));
        // The first probe sends raw; once it has measured long enough (without a meter: for
        // as long as a probe lasts, on the paused clock), the next chunk starts the probe with
        // compression on, whichever of the two sends it.
        let first = tree.pack(1, 0, chunk()).await;
        assert!(matches!(first.frame, Frame::Data(_)));
        tokio::time::sleep(crate::adapt::PROBE + Duration::from_millis(10)).await;
        let next = large_file.pack(2, 0, chunk()).await;
        assert!(
            matches!(next.frame, Frame::DataZ(_)),
            "the large file follows the tree's probe, not one of its own"
        );
        // Each counts what it sent.
        assert_eq!(tree.totals().raw.load(Ordering::Relaxed), 1 << 20);
        assert_eq!(large_file.totals().raw.load(Ordering::Relaxed), 1 << 20);
        assert!(large_file.totals().wire.load(Ordering::Relaxed) < 1 << 19);
    }

    #[tokio::test]
    async fn random_data_goes_raw_even_at_a_fixed_level() {
        let c = Compressor::new(Compression::Level(3), "test");
        let packed = c.pack(1, 0, Bytes::from(random(1 << 20))).await;
        assert!(matches!(packed.frame, Frame::Data(_)));
        assert_eq!(c.totals().wire.load(Ordering::Relaxed), 1 << 20);
    }

    #[tokio::test]
    async fn off_never_compresses() {
        let c = Compressor::new(Compression::Off, "test");
        let packed = c.pack(1, 0, Bytes::from(text(1 << 16))).await;
        assert!(matches!(packed.frame, Frame::Data(_)));
    }

    fn z_of(content: &[u8], raw_len: u32) -> DataZ {
        DataZ::new(
            1,
            0,
            raw_len,
            zstd::bulk::compress(content, 1).unwrap().into(),
        )
    }

    #[test]
    fn a_bomb_stops_at_the_announced_size() {
        // 16 MiB of zeros announced as 4 KiB: decompression stops at the buffer's end.
        let z = z_of(&vec![0; 16 << 20], 4096);
        let err = inflate_into(&z, &mut vec![0; 4096]).unwrap_err();
        assert!(matches!(err, InflateError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_payload_shorter_than_announced_is_refused() {
        let z = z_of(&text(1000), 2000);
        let err = inflate_into(&z, &mut vec![0; 2000]).unwrap_err();
        assert_eq!(
            err,
            InflateError::Short {
                offset: 0,
                raw_len: 2000,
                got: 1000
            }
        );
    }

    /// The payload of `testdata/dataz.hex` in xfer-proto.
    #[test]
    fn the_dataz_vector_expands_to_64_a() {
        let frame = [
            0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x48, 0x45, 0x00, 0x00, 0x10, 0x61, 0x61, 0x01, 0x00,
            0x93, 0x00, 0x16,
        ];
        let z = DataZ::new(1, 0, 64, Bytes::copy_from_slice(&frame));
        let mut out = [0; 64];
        inflate_into(&z, &mut out).unwrap();
        assert_eq!(out, [b'a'; 64]);
    }

    /// Replays the `inflate` fuzz corpus (`fuzz/corpus/inflate`).
    #[test]
    fn fuzz_corpus_replays() {
        let corpus =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/inflate");
        let mut replayed = 0;
        for entry in std::fs::read_dir(corpus).expect("corpus directory") {
            fuzz_inflate(&std::fs::read(entry.unwrap().path()).unwrap());
            replayed += 1;
        }
        assert!(replayed >= 3);
    }

    #[test]
    fn garbage_is_refused() {
        let z = DataZ::new(1, 0, 100, Bytes::from_static(b"not zstd at all"));
        assert!(matches!(
            inflate_into(&z, &mut [0; 100]),
            Err(InflateError::Corrupt { .. })
        ));
    }

    fn put(name: &str, data: Vec<u8>) -> Frame {
        Frame::PutFile(xfer_proto::PutFile {
            name: name.into(),
            mtime_ns: 0,
            mode: 0o644,
            crc32: crc32fast::hash(&data),
            data,
        })
    }

    #[test]
    fn small_files_pack_together_where_they_shrink() {
        let c = Compressor::new(Compression::Level(3), "test");
        let files: Vec<Frame> = (0..50)
            .map(|i| put(&format!("p{i}.html"), text(3000 + i)))
            .collect();
        let packed = c.pack_files(&files).expect("text shrinks");
        let back = packed
            .unpack(
                "PackedPutFiles",
                vec![0; packed.raw_len as usize],
                xfer_proto::packed::packs_in_put_files,
            )
            .unwrap();
        assert_eq!(back, files);
        let raw = c.totals().raw.load(Ordering::Relaxed);
        assert_eq!(raw, (0..50).map(|i| 3000 + i).sum::<u64>());
        assert_eq!(
            c.totals().wire.load(Ordering::Relaxed),
            packed.zstd.len() as u64
        );

        let noise = [put("r.bin", random(100_000))];
        assert!(c.pack_files(&noise).is_none(), "random data goes as it is");
        let off = Compressor::new(Compression::Off, "test");
        assert!(off.pack_files(&files).is_none());
    }

    #[test]
    fn small_files_are_encoded_into_one_buffer_batch_after_batch() {
        let c = Compressor::new(Compression::Level(1), "test");
        let packers = Packers::new(1);
        let batch: Vec<Frame> = (0..64)
            .map(|i| put(&format!("p{i}.html"), text(16 << 10)))
            .collect();
        let kept = || packers.lend(|p| (p.encoded.capacity(), p.encoded.as_ptr()));
        assert!(c.pack_files_with(&packers, &batch).is_some());
        let (capacity, first) = kept();
        assert!(capacity >= 64 << 14, "the buffer is kept: {capacity}");
        assert!(c.pack_files_with(&packers, &batch).is_some());
        assert_eq!(kept().1, first, "the same allocation, not a fresh one");
    }

    #[test]
    fn however_many_threads_pack_at_once_no_more_packers_exist_than_the_limit() {
        const THREADS: usize = 8;
        let packers = Packers::new(2);
        let entered = std::sync::atomic::AtomicUsize::new(0);
        let input = text(64 << 10);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    packers.lend(|p| {
                        assert!(p.shrink(&input, 3, false).is_some());
                        // Each holds its packer until all threads hold one or some wait for
                        // one: without a limit, all would hold one at once.
                        entered.fetch_add(1, Ordering::SeqCst);
                        while entered.load(Ordering::SeqCst) < THREADS
                            && packers.lock().waiting == 0
                        {
                            std::thread::yield_now();
                        }
                    });
                });
            }
        });
        let state = packers.lock();
        assert!(state.most_lent <= 2, "{} lent at once", state.most_lent);
        assert!(state.made <= 2, "{} zstd contexts made", state.made);
        assert_eq!(state.idle.len(), state.made, "every packer came back");
    }

    #[test]
    fn a_compressed_frame_keeps_only_its_bytes() {
        let packers = Packers::new(1);
        let input = text(1 << 20);
        let out = packers
            .lend(|p| p.shrink(&input, 3, true))
            .expect("text shrinks");
        assert!(out.len() < input.len() / 10);
        assert_eq!(out.capacity(), out.len(), "not zstd's worst-case bound");
        assert_eq!(zstd::bulk::decompress(&out, 1 << 20).unwrap(), input);
    }

    #[test]
    fn compressed_formats_are_known_by_their_first_bytes() {
        let zstd_frame = zstd::bulk::compress(b"x", 1).unwrap();
        assert!(looks_compressed(&zstd_frame));
        assert!(looks_compressed(b"\x1f\x8b\x08\x00"));
        assert!(looks_compressed(b"\x00\x00\x00\x20ftypisom"));
        assert!(looks_compressed(b"\x89PNG\r\n"));
        assert!(!looks_compressed(b"<!DOCTYPE html>"));
        assert!(!looks_compressed(b""));
    }

    #[test]
    fn modes_round_trip_through_their_byte() {
        for mode in [Compression::Off, Compression::Auto, Compression::Level(19)] {
            assert_eq!(Compression::from_wire(mode.wire()), Some(mode));
        }
        assert_eq!(Compression::from_wire(23), None);
    }
}
