//! The resume journal `.NAME.xfer-state`: which ranges of a partial file are written, and which of
//! those are known to be on stable storage.
//!
//! Layout (big-endian): a 32-byte header `"XFERJNL1" | size u64 | mtime_ns i64 | 0u32 | crc32`,
//! then 24-byte records `kind u8 | 0 0 0 | offset u64 | len u32 | aux u32 | crc32`, where the CRC
//! covers the bytes before it. A chunk record (kind 1, aux = CRC32 of the data) is appended after
//! the data's `pwrite`. A barrier (kind 2, `offset` = N) says the first N chunk records' data was
//! flushed by an `fdatasync` that started after they were appended. On load, chunk records not
//! covered by a barrier are trusted only if their bytes still match their CRC: after a process
//! crash the page cache still holds them, after a power loss it may not.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use xfer_proto::{ByteRange, FileIdentity};

const MAGIC: &[u8; 8] = b"XFERJNL1";
/// Bytes of the header.
pub const HEADER_LEN: usize = 32;
/// Bytes of one record.
pub const RECORD_LEN: usize = 24;
const KIND_CHUNK: u8 = 1;
const KIND_BARRIER: u8 = 2;
const KIND_AGREED: u8 = 3;

/// One journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `range` was written; its bytes have CRC32 `crc32`.
    Chunk {
        /// Bytes written.
        range: ByteRange,
        /// CRC32 of those bytes.
        crc32: u32,
    },
    /// The data of the first `covered` chunk records is on stable storage.
    Barrier {
        /// Number of chunk records covered.
        covered: u64,
    },
    /// A delta's signature exchange answered for `range` of the new file: its matched chunks
    /// are recorded before it, and the rest is to come as data.
    Agreed {
        /// The span answered for.
        range: ByteRange,
    },
}

impl Record {
    /// The record's 24 bytes.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        let (kind, offset, len, aux) = match *self {
            Self::Chunk { range, crc32 } => (KIND_CHUNK, range.start, range.len() as u32, crc32),
            Self::Barrier { covered } => (KIND_BARRIER, covered, 0, 0),
            Self::Agreed { range } => (KIND_AGREED, range.start, range.len() as u32, 0),
        };
        out[0] = kind;
        out[4..12].copy_from_slice(&offset.to_be_bytes());
        out[12..16].copy_from_slice(&len.to_be_bytes());
        out[16..20].copy_from_slice(&aux.to_be_bytes());
        let crc = crc32fast::hash(&out[..20]);
        out[20..24].copy_from_slice(&crc.to_be_bytes());
        out
    }

    /// Parses 24 bytes; `None` for a torn or corrupt record.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != RECORD_LEN || bytes[1..4] != [0, 0, 0] {
            return None;
        }
        let crc = u32::from_be_bytes(bytes[20..24].try_into().ok()?);
        if crc32fast::hash(&bytes[..20]) != crc {
            return None;
        }
        let offset = u64::from_be_bytes(bytes[4..12].try_into().ok()?);
        let len = u32::from_be_bytes(bytes[12..16].try_into().ok()?);
        let aux = u32::from_be_bytes(bytes[16..20].try_into().ok()?);
        match bytes[0] {
            KIND_CHUNK => Some(Self::Chunk {
                range: ByteRange::new(offset, offset.checked_add(u64::from(len))?),
                crc32: aux,
            }),
            KIND_BARRIER => Some(Self::Barrier { covered: offset }),
            KIND_AGREED => Some(Self::Agreed {
                range: ByteRange::new(offset, offset.checked_add(u64::from(len))?),
            }),
            _ => None,
        }
    }
}

/// The header's 32 bytes for `identity`.
pub fn encode_header(identity: FileIdentity) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&identity.size.to_be_bytes());
    out[16..24].copy_from_slice(&identity.mtime_ns.to_be_bytes());
    let crc = crc32fast::hash(&out[..28]);
    out[28..32].copy_from_slice(&crc.to_be_bytes());
    out
}

fn decode_header(bytes: &[u8]) -> Option<FileIdentity> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_be_bytes(bytes[28..32].try_into().ok()?);
    if crc32fast::hash(&bytes[..28]) != crc {
        return None;
    }
    Some(FileIdentity {
        size: u64::from_be_bytes(bytes[8..16].try_into().ok()?),
        mtime_ns: i64::from_be_bytes(bytes[16..24].try_into().ok()?),
    })
}

/// What a journal file says, before any chunk is verified against the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// Identity of the file the partial belongs to.
    pub identity: FileIdentity,
    /// Chunk records in journal order, with their CRCs.
    pub chunks: Vec<(ByteRange, u32)>,
    /// How many leading chunk records a barrier covers.
    pub covered: u64,
    /// Spans a delta's signature exchange answered for.
    pub agreed: Vec<ByteRange>,
    /// Length of the valid prefix of the journal (header + whole, valid records).
    pub valid_len: u64,
}

impl Contents {
    /// Bytes the journal records as written, durable or not.
    pub fn recorded_bytes(&self) -> u64 {
        crate::RangeSet::from_ranges(self.chunks.iter().map(|(r, _)| *r)).total()
    }
}

/// Reads a journal. `Ok(None)` when the header is missing or invalid (treat as no journal).
///
/// # Errors
/// I/O errors reading the file.
pub fn read(file: &mut File) -> io::Result<Option<Contents>> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(parse(&bytes))
}

/// Parses a journal's bytes; see [`read`].
pub fn parse(bytes: &[u8]) -> Option<Contents> {
    let identity = decode_header(bytes)?;
    let mut chunks = Vec::new();
    let mut covered = 0;
    let mut agreed = Vec::new();
    let mut valid_len = HEADER_LEN;
    for rec in bytes[HEADER_LEN..].chunks(RECORD_LEN) {
        // A torn or corrupt record ends the journal: nothing after it can be trusted.
        let Some(record) = Record::decode(rec) else {
            break;
        };
        match record {
            Record::Chunk { range, crc32 } if range.end <= identity.size => {
                chunks.push((range, crc32))
            }
            Record::Chunk { .. } => break,
            Record::Barrier { covered: n } => covered = covered.max(n.min(chunks.len() as u64)),
            Record::Agreed { range } if range.end <= identity.size => agreed.push(range),
            Record::Agreed { .. } => break,
        }
        valid_len += RECORD_LEN;
    }
    Some(Contents {
        identity,
        chunks,
        covered,
        agreed,
        valid_len: valid_len as u64,
    })
}

/// Reads a journal at `path` and returns its identity and the bytes it records as written.
/// For tools and tests that inspect a partial transfer from outside.
///
/// # Errors
/// I/O errors other than "not found".
pub fn recorded_at(path: &std::path::Path) -> io::Result<Option<(FileIdentity, u64)>> {
    match File::open(path) {
        Ok(mut f) => Ok(read(&mut f)?.map(|c| (c.identity, c.recorded_bytes()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Checks which recorded chunks are really present in `data`: those covered by a barrier, and
/// later ones whose bytes match their CRC. Returns the ranges held.
///
/// # Errors
/// I/O errors reading `data`.
pub fn verified_ranges(contents: &Contents, data: &File) -> io::Result<Vec<ByteRange>> {
    let mut held = Vec::with_capacity(contents.chunks.len());
    let mut buf = Vec::new();
    for (i, (range, crc)) in contents.chunks.iter().enumerate() {
        if (i as u64) < contents.covered {
            held.push(*range);
            continue;
        }
        buf.resize(range.len() as usize, 0);
        match data.read_exact_at(&mut buf, range.start) {
            Ok(()) if crc32fast::hash(&buf) == *crc => held.push(*range),
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e),
        }
    }
    Ok(held)
}

/// Writes a fresh journal (header only) into `file`, truncating it.
///
/// # Errors
/// I/O errors.
pub fn reset(file: &mut File, identity: FileIdentity) -> io::Result<()> {
    file.set_len(0)?;
    file.write_all_at(&encode_header(identity), 0)?;
    Ok(())
}

/// Appends a record at `pos` and returns the position after it.
///
/// # Errors
/// I/O errors.
pub fn append(file: &File, pos: u64, record: Record) -> io::Result<u64> {
    file.write_all_at(&record.encode(), pos)?;
    Ok(pos + RECORD_LEN as u64)
}

/// Builds a complete journal in memory (for tests and tools).
pub fn build(identity: FileIdentity, records: &[Record]) -> Vec<u8> {
    let mut out = encode_header(identity).to_vec();
    for r in records {
        out.extend_from_slice(&r.encode());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: FileIdentity = FileIdentity {
        size: 100,
        mtime_ns: 42,
    };

    fn chunk(s: u64, e: u64, crc: u32) -> Record {
        Record::Chunk {
            range: ByteRange::new(s, e),
            crc32: crc,
        }
    }

    #[test]
    fn records_round_trip() {
        for r in [
            chunk(0, 10, 7),
            chunk(5, 100, u32::MAX),
            Record::Barrier { covered: 3 },
        ] {
            assert_eq!(Record::decode(&r.encode()), Some(r));
        }
    }

    #[test]
    fn parse_stops_at_torn_record() {
        let mut bytes = build(
            ID,
            &[
                chunk(0, 10, 1),
                Record::Barrier { covered: 1 },
                chunk(10, 20, 2),
            ],
        );
        let full = bytes.len();
        bytes.truncate(full - 5);
        let c = parse(&bytes).unwrap();
        assert_eq!(c.chunks, vec![(ByteRange::new(0, 10), 1)]);
        assert_eq!(c.covered, 1);
        assert_eq!(c.valid_len, (HEADER_LEN + 2 * RECORD_LEN) as u64);
    }

    #[test]
    fn parse_stops_at_corrupt_record_and_rejects_bad_header() {
        let mut bytes = build(ID, &[chunk(0, 10, 1), chunk(10, 20, 2)]);
        bytes[HEADER_LEN + RECORD_LEN + 6] ^= 0xff;
        assert_eq!(parse(&bytes).unwrap().chunks.len(), 1);
        let mut bytes = build(ID, &[]);
        bytes[9] ^= 1;
        assert_eq!(parse(&bytes), None);
        assert_eq!(parse(b"short"), None);
    }

    #[test]
    fn chunks_past_the_end_are_rejected() {
        let bytes = build(ID, &[chunk(90, 101, 1)]);
        assert!(parse(&bytes).unwrap().chunks.is_empty());
    }

    #[test]
    fn uncovered_chunks_are_verified_against_data() {
        let dir = tempfile::tempdir().unwrap();
        let data_path = dir.path().join("d");
        let data: Vec<u8> = (0..100u8).collect();
        std::fs::write(&data_path, &data).unwrap();
        let good = crc32fast::hash(&data[20..30]);
        let bytes = build(
            ID,
            &[
                chunk(0, 10, 0xdead), // covered: trusted without reading
                Record::Barrier { covered: 1 },
                chunk(20, 30, good),
                chunk(30, 40, good), // wrong crc for these bytes
            ],
        );
        let contents = parse(&bytes).unwrap();
        let held = verified_ranges(&contents, &File::open(&data_path).unwrap()).unwrap();
        assert_eq!(held, vec![ByteRange::new(0, 10), ByteRange::new(20, 30)]);
    }
}
