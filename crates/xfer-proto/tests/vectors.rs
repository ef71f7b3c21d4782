//! The test vectors of `testdata/` (proto.md, Appendix A): every frame built from the field values
//! its file states encodes to exactly its bytes and decodes back to the same frame, and every
//! malformed input fails with the error code its file states.
//!
//! A vector file is `#` comment lines (the frame, its field values, and for malformed input an
//! `error: CODE` line) followed by a hex dump whose lines start with their offset. Each file must
//! have an entry in [`frames`] or be named `malformed-*`, and each entry a file.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;
use xfer_proto::auth::{client_proof, grant_key, server_proof, zero_rtt_proof};
use xfer_proto::*;

const TOKEN: &[u8] = b"correct horse battery staple";
const IDENTITY: FileIdentity = FileIdentity {
    size: 1_048_576,
    mtime_ns: 1_700_000_000_123_456_789,
};
const MTIME: i64 = 1_700_000_000_000_000_000;
/// XXH3-128 of `abc`, big-endian (proto.md §2.4).
const DIGEST_ABC: [u8; 16] = [
    0x06, 0xb0, 0x5a, 0xb6, 0x73, 0x3a, 0x61, 0x85, 0x78, 0xaf, 0x5f, 0x94, 0x89, 0x2f, 0x39, 0x50,
];
const CRC_ABC: u32 = 0x3524_41c2;
/// The client's clock in the `early-auth` vector: ms since the Unix epoch.
const EARLY_TIME_MS: u64 = 1_700_000_000_000;
/// A zstd frame of 64 ASCII `a` (what `zstd -1 --no-check` makes of them).
const ZSTD_64_A: [u8; 17] = [
    0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x48, 0x45, 0x00, 0x00, 0x10, 0x61, 0x61, 0x01, 0x00, 0x93, 0x00,
    0x16,
];

struct Vector {
    comments: Vec<String>,
    bytes: Vec<u8>,
}

fn read_vectors() -> BTreeMap<String, Vector> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut vectors = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("testdata directory") {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        assert_eq!(
            path.extension().unwrap(),
            "hex",
            "{name}: vectors are .hex files"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        vectors.insert(name.clone(), parse(&name, &text));
    }
    vectors
}

fn parse(name: &str, text: &str) -> Vector {
    let mut comments = Vec::new();
    let mut bytes = Vec::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix('#') {
            comments.push(comment.trim().to_owned());
            continue;
        }
        let mut words = line.split_whitespace();
        let Some(offset) = words.next() else { continue };
        let offset = usize::from_str_radix(offset, 16).unwrap();
        assert_eq!(offset, bytes.len(), "{name}: offset column is off");
        bytes.extend(words.map(|pair| u8::from_str_radix(pair, 16).unwrap()));
    }
    assert!(!bytes.is_empty(), "{name}: no bytes");
    Vector { comments, bytes }
}

/// Nc and Ns of the handshake vectors.
fn nonces() -> (Vec<u8>, Vec<u8>) {
    ((0x00..0x20).collect(), (0x20..0x40).collect())
}

fn grant() -> Grant {
    Grant {
        scope: "backups/big.iso".into(),
        expires: 1_700_086_400,
        nonce: (0x40..0x60).collect(),
    }
}

fn hello(capabilities: u64, nonce: Vec<u8>) -> Frame {
    Frame::Hello(Hello {
        version: 1,
        min_version: 1,
        capabilities,
        agent: "xfer/0.1.0".into(),
        nonce,
    })
}

fn welcome(capabilities: u64, proof: Vec<u8>) -> Frame {
    Frame::Welcome(Welcome {
        version: 1,
        capabilities,
        max_chunk_size: 16_777_216,
        window: 8,
        agent: "xferd/0.1.0".into(),
        proof,
    })
}

/// The `Welcome` that `early-challenge` announces and `welcome-early` is.
fn early_welcome() -> Welcome {
    let (nc, ns) = nonces();
    let Frame::Welcome(welcome) = welcome(CAP_AUTH | CAP_EARLY_AUTH, server_proof(TOKEN, &nc, &ns))
    else {
        unreachable!("welcome makes a Welcome")
    };
    welcome
}

fn chunk(transfer_id: u64, offset: u64, len: u32) -> ChunkRef {
    ChunkRef {
        transfer_id,
        offset,
        len,
    }
}

fn commit(transfer_id: u64, digest: &[u8]) -> Commit {
    Commit {
        transfer_id,
        digest: digest.to_vec(),
    }
}

fn tree_listing(kind: EntryKind) -> Frame {
    Frame::TreeListing(TreeListing {
        entries: vec![TreeEntry {
            path: "sub/f.txt".into(),
            kind,
            size: 3,
            mtime_ns: MTIME,
            mode: 0o644,
            target: String::new(),
            digest: DIGEST_ABC.to_vec(),
        }],
        more: false,
    })
}

fn copy_to(grant: Option<(Grant, Vec<u8>)>, tls: bool, pin: Option<[u8; 32]>) -> Frame {
    Frame::CopyTo(CopyTo {
        source: "data/big.iso".into(),
        recursive: false,
        host: "dst.example".into(),
        port: 8888,
        dest: "backups/big.iso".into(),
        connections: 4,
        chunk_size: 4 << 20,
        grant,
        tls,
        pin,
    })
}

fn mirror_to() -> Frame {
    let Frame::CopyTo(copy) = copy_to(None, false, None) else {
        unreachable!()
    };
    Frame::MirrorTo(MirrorTo {
        copy: CopyTo {
            source: "data/t".into(),
            recursive: true,
            dest: "backups/t".into(),
            ..copy
        },
        options: TreeOptions {
            numeric_ids: true,
            ..TreeOptions::default()
        },
        rules: vec![
            FilterRule {
                include: false,
                pattern: "*.log".into(),
            },
            FilterRule {
                include: true,
                pattern: "keep.log".into(),
            },
        ],
        delete: true,
        delete_excluded: false,
        dry_run: false,
    })
}

fn change(action: ChangeAction, kind: EntryKind, differs: u32, path: &str, target: &str) -> Change {
    Change {
        action,
        kind,
        differs,
        path: path.into(),
        target: target.into(),
    }
}

/// `frames` packed as the packed vectors state: compressed at zstd level 19.
fn packed(frames: &[Frame]) -> PackedFiles {
    let raw = PackedFiles::encode_frames(frames).unwrap();
    PackedFiles::new(
        frames.len() as u32,
        &raw,
        zstd::bulk::compress(&raw, 19).unwrap(),
    )
}

/// The `put-file` frame twice, packed.
fn packed_put_files() -> PackedFiles {
    let put = Frame::PutFile(PutFile {
        name: "t/sub/f.txt".into(),
        mtime_ns: MTIME,
        mode: 0o644,
        crc32: CRC_ABC,
        data: b"abc".to_vec(),
    });
    packed(&[put.clone(), put])
}

/// A `FileData` of 64 `a` and a `NotFound`, packed.
fn packed_file_data() -> PackedFiles {
    let data = vec![b'a'; 64];
    let file = Frame::FileData(FileData {
        identity: FileIdentity {
            size: 64,
            mtime_ns: MTIME,
        },
        mode: 0o644,
        crc32: crc32fast::hash(&data),
        data,
    });
    packed(&[file, error(ErrorCode::NotFound, "t/sub/g.txt: not found")])
}

#[test]
fn the_packed_vectors_unpack_to_their_frames() {
    let vectors = read_vectors();
    let put = decode_stream(&vectors["put-file"].bytes).unwrap();
    let p = packed_put_files();
    assert!(p.crc_matches());
    let inside = p.unpack(
        "PackedPutFiles",
        vec![0; p.raw_len as usize],
        packed::packs_in_put_files,
    );
    assert_eq!(inside.unwrap(), [put.clone(), put].concat());
    let p = packed_file_data();
    let inside = p.unpack(
        "PackedFileData",
        vec![0; p.raw_len as usize],
        packed::packs_in_file_data,
    );
    assert_eq!(inside.unwrap().len(), 2);
}

fn error(code: ErrorCode, message: &str) -> Frame {
    Frame::Error(ErrorFrame::new(code, message))
}

/// The frame of every well-formed vector, built from the values its file states.
fn frames() -> BTreeMap<&'static str, Frame> {
    let (nc, ns) = nonces();
    let key = grant_key(TOKEN, &grant());
    let abc = || Bytes::from_static(b"abc");
    BTreeMap::from([
        ("hello", hello(0, nc.clone())),
        ("hello-inner-tls", hello(CAP_TLS, nc.clone())),
        ("hello-tls-request", hello(CAP_TLS, vec![])),
        (
            "challenge",
            Frame::Challenge(Challenge { nonce: ns.clone() }),
        ),
        (
            "auth",
            Frame::Auth(Auth {
                proof: client_proof(TOKEN, &nc, &ns),
                grant: None,
            }),
        ),
        (
            "auth-grant",
            Frame::Auth(Auth {
                proof: client_proof(&key, &nc, &ns),
                grant: Some(grant()),
            }),
        ),
        (
            "welcome-auth",
            welcome(CAP_AUTH, server_proof(TOKEN, &nc, &ns)),
        ),
        (
            "welcome-grant",
            welcome(CAP_AUTH, server_proof(&key, &nc, &ns)),
        ),
        ("hello-early", hello(CAP_EARLY_AUTH, nc.clone())),
        (
            "early-challenge",
            Frame::EarlyChallenge(EarlyChallenge {
                nonce: ns.clone(),
                welcome: early_welcome(),
            }),
        ),
        ("welcome-early", Frame::Welcome(early_welcome())),
        (
            "hello-zero-rtt",
            hello(CAP_EARLY_AUTH | CAP_ZERO_RTT, nc.clone()),
        ),
        (
            "early-auth",
            Frame::EarlyAuth(EarlyAuth {
                time_ms: EARLY_TIME_MS,
                proof: zero_rtt_proof(TOKEN, &nc, EARLY_TIME_MS),
            }),
        ),
        (
            "early-refused",
            Frame::EarlyRefused(EarlyRefused {
                reason: "replay".into(),
            }),
        ),
        ("welcome", welcome(0, vec![])),
        ("welcome-tls", welcome(CAP_TLS, vec![])),
        ("welcome-byte-window", welcome(CAP_BYTE_WINDOW, vec![])),
        ("welcome-idle-timeout", welcome(CAP_IDLE_TIMEOUT, vec![])),
        (
            "idle-timeout",
            Frame::IdleTimeout(IdleTimeout { millis: 300_000 }),
        ),
        ("start-tls", Frame::StartTls),
        (
            "error-tls-required",
            error(
                ErrorCode::Protocol,
                "this server requires TLS: connect with xfer --tls",
            ),
        ),
        (
            "open-write",
            Frame::OpenWrite(OpenWrite {
                name: "a/b.bin".into(),
                identity: IDENTITY,
                mode: 0o644,
                chunk_size: 4 << 20,
            }),
        ),
        (
            "open-write-sparse",
            Frame::OpenWriteSparse(OpenWriteSparse {
                open: OpenWrite {
                    name: "a/b.bin".into(),
                    identity: IDENTITY,
                    mode: 0o644,
                    chunk_size: 4 << 20,
                },
                holes: vec![
                    ByteRange::new(4096, 512 << 10),
                    ByteRange::new(516 << 10, 1 << 20),
                ],
            }),
        ),
        (
            "write-opened",
            Frame::WriteOpened(WriteOpened {
                transfer_id: 1,
                held: vec![ByteRange::new(0, 4 << 20)],
            }),
        ),
        (
            "open-read",
            Frame::OpenRead(OpenRead {
                name: "x".into(),
                have_identity: Some(FileIdentity {
                    size: 16,
                    mtime_ns: -1,
                }),
                have: vec![ByteRange::new(0, 8)],
            }),
        ),
        (
            "open-read-fresh",
            Frame::OpenRead(OpenRead {
                name: "a/b.bin".into(),
                have_identity: None,
                have: vec![],
            }),
        ),
        (
            "read-opened",
            Frame::ReadOpened(ReadOpened {
                transfer_id: 2,
                identity: IDENTITY,
                mode: 0o644,
            }),
        ),
        (
            "read-opened-sparse",
            Frame::ReadOpenedSparse(ReadOpenedSparse {
                opened: ReadOpened {
                    transfer_id: 2,
                    identity: IDENTITY,
                    mode: 0o644,
                },
                holes: vec![ByteRange::new(64 << 10, 1 << 20)],
            }),
        ),
        ("read-chunk", Frame::ReadChunk(chunk(2, 4 << 20, 4 << 20))),
        ("data-abc", Frame::Data(Data::new(1, 0, abc()))),
        ("data-empty", Frame::Data(Data::new(1, 0, Bytes::new()))),
        (
            "dataz",
            Frame::DataZ(DataZ::new(1, 0, 64, Bytes::from_static(&ZSTD_64_A))),
        ),
        (
            "set-compression",
            Frame::SetCompression(SetCompression {
                mode: COMPRESSION_AUTO,
            }),
        ),
        ("ack", Frame::Ack(chunk(1, 0, 3))),
        ("delta-open", Frame::DeltaOpen(DeltaOpen { transfer_id: 1 })),
        (
            "delta-index",
            Frame::DeltaIndex(DeltaIndex {
                transfer_id: 1,
                basis: IDENTITY,
                avg_chunk: 16384,
                chunks: 64,
            }),
        ),
        (
            "delta-sig",
            Frame::DeltaSig(DeltaSig {
                transfer_id: 1,
                offset: 0,
                chunks: vec![SigChunk {
                    len: 3,
                    hash: DIGEST_ABC,
                }],
            }),
        ),
        (
            "delta-guess",
            Frame::DeltaGuess(DeltaSig {
                transfer_id: 1,
                offset: 16384,
                chunks: vec![SigChunk {
                    len: 3,
                    hash: DIGEST_ABC,
                }],
            }),
        ),
        (
            "read-sig",
            Frame::ReadSig(ReadSig {
                transfer_id: 1,
                offset: 0,
                end: 1_048_576,
                avg_chunk: 16384,
            }),
        ),
        (
            "delta-match",
            Frame::DeltaMatch(DeltaMatch {
                transfer_id: 1,
                offset: 0,
                matched: vec![ByteRange::new(0, 3)],
            }),
        ),
        (
            "delta-put",
            Frame::DeltaPut(DeltaPut {
                open: OpenWrite {
                    name: "a/b.bin".into(),
                    identity: FileIdentity {
                        size: 3,
                        mtime_ns: IDENTITY.mtime_ns,
                    },
                    mode: 0o644,
                    chunk_size: 4 << 20,
                },
                avg_chunk: 16384,
                chunks: vec![SigChunk {
                    len: 3,
                    hash: DIGEST_ABC,
                }],
            }),
        ),
        (
            "delta-blocks",
            Frame::DeltaBlocks(DeltaBlocks {
                transfer_id: 1,
                block_len: 1024,
                gaps: vec![FineGap {
                    new: ByteRange::new(0, 3000),
                    old: ByteRange::new(0, 2048),
                }],
                sums: vec![
                    BlockSum {
                        weak: 0x1234_5678,
                        strong: 0x0123_4567_89ab_cdef,
                    },
                    BlockSum {
                        weak: 0x9abc_def0,
                        strong: 0xfedc_ba98_7654_3210,
                    },
                ],
            }),
        ),
        (
            "delta-copy",
            Frame::DeltaCopy(DeltaCopy {
                transfer_id: 1,
                copies: vec![FineCopy {
                    new: 5,
                    old: 4096,
                    len: 3,
                    hash: DIGEST_ABC,
                }],
            }),
        ),
        (
            "delta-resume",
            Frame::DeltaResume(DeltaResume { transfer_id: 1 }),
        ),
        (
            "delta-agreed",
            Frame::DeltaAgreed(DeltaAgreed {
                transfer_id: 1,
                agreed: vec![ByteRange::new(0, 3)],
            }),
        ),
        ("reject", Frame::Reject(chunk(1, 0, 3))),
        ("commit", Frame::Commit(commit(1, &DIGEST_ABC))),
        ("committed", Frame::Committed(commit(1, &DIGEST_ABC))),
        ("commit-unchecked", Frame::Commit(commit(1, &[]))),
        (
            "commit-digest-5-bytes",
            Frame::Commit(commit(1, &[0xaa; 5])),
        ),
        ("digest-request", Frame::DigestRequest(commit(2, &[]))),
        (
            "digest-reply",
            Frame::DigestReply(DigestReply {
                transfer_id: 2,
                digest: DIGEST_ABC.to_vec(),
            }),
        ),
        ("list-root", Frame::List(List { dir: String::new() })),
        ("list", Frame::List(List { dir: "a".into() })),
        (
            "listing",
            Frame::Listing(Listing {
                entries: vec![
                    ListEntry {
                        name: "b.bin".into(),
                        size: 3,
                        mtime_ns: MTIME,
                        is_dir: false,
                    },
                    ListEntry {
                        name: "sub".into(),
                        size: 0,
                        mtime_ns: 0,
                        is_dir: true,
                    },
                ],
                more: false,
            }),
        ),
        (
            "list-tree",
            Frame::ListTree(ListTree {
                dir: "t".into(),
                digests: false,
            }),
        ),
        (
            "list-tree-digests",
            Frame::ListTree(ListTree {
                dir: "t".into(),
                digests: true,
            }),
        ),
        (
            "list-tree-root",
            Frame::ListTree(ListTree {
                dir: String::new(),
                digests: false,
            }),
        ),
        ("tree-listing", tree_listing(EntryKind::File)),
        ("tree-listing-dir", tree_listing(EntryKind::Dir)),
        ("tree-listing-symlink", tree_listing(EntryKind::Symlink)),
        ("tree-listing-special", tree_listing(EntryKind::Special)),
        (
            "put-file",
            Frame::PutFile(PutFile {
                name: "t/sub/f.txt".into(),
                mtime_ns: MTIME,
                mode: 0o644,
                crc32: CRC_ABC,
                data: b"abc".to_vec(),
            }),
        ),
        (
            "done",
            Frame::Done(Done {
                name: "t/sub/f.txt".into(),
            }),
        ),
        ("sync", Frame::Sync),
        (
            "done-sync",
            Frame::Done(Done {
                name: String::new(),
            }),
        ),
        (
            "make-dir",
            Frame::MakeDir(MakeDir {
                name: "t/sub".into(),
                mode: 0o755,
                mtime_ns: MTIME,
            }),
        ),
        (
            "make-link",
            Frame::MakeLink(MakeLink {
                name: "t/sub/l".into(),
                target: "f.txt".into(),
            }),
        ),
        (
            "get-file",
            Frame::GetFile(GetFile {
                name: "t/sub/f.txt".into(),
                max_size: 1 << 20,
            }),
        ),
        (
            "file-data",
            Frame::FileData(FileData {
                identity: FileIdentity {
                    size: 3,
                    mtime_ns: MTIME,
                },
                mode: 0o644,
                crc32: CRC_ABC,
                data: b"abc".to_vec(),
            }),
        ),
        (
            "packed-put-files",
            Frame::PackedPutFiles(packed_put_files()),
        ),
        (
            "packed-file-data",
            Frame::PackedFileData(packed_file_data()),
        ),
        (
            "copy-to-grant",
            copy_to(Some((grant(), key.clone())), true, None),
        ),
        ("copy-to", copy_to(None, false, None)),
        (
            "copy-to-pinned",
            copy_to(None, true, Some(std::array::from_fn(|i| 0xa0 + i as u8))),
        ),
        (
            "progress",
            Frame::Progress(Progress {
                bytes_done: 524_288,
                bytes_total: 1_048_576,
            }),
        ),
        (
            "copy-done",
            Frame::CopyDone(CopyDone {
                files_total: 1,
                files_transferred: 1,
                files_skipped: 0,
                bytes_total: 1_048_576,
                bytes_transferred: 524_288,
                resumed_bytes: 524_288,
                millis: 1250,
            }),
        ),
        (
            "copy-mode",
            Frame::CopyMode(CopyMode {
                delta: CopyDeltaMode::Delta,
            }),
        ),
        (
            "copy-delta",
            Frame::CopyDelta(CopyDelta {
                delta: true,
                literal_bytes: 19_995,
                matched_bytes: 4_174_309,
            }),
        ),
        (
            "copy-reason",
            Frame::CopyReason(CopyReason {
                reason: "delta transfer: --delta".into(),
            }),
        ),
        ("hello-delete", hello(CAP_DELETE | CAP_MIRROR, nc.clone())),
        (
            "error-delete-refused",
            error(
                ErrorCode::ReadOnly,
                "deletion refused: the daemon runs without --allow-delete (allow_delete = false)",
            ),
        ),
        (
            "await-commits",
            Frame::AwaitCommits(AwaitCommits {
                names: vec!["t/a".into(), "t/b".into()],
            }),
        ),
        (
            "delete",
            Frame::Delete(Delete {
                name: "backups/t/old.txt".into(),
            }),
        ),
        ("mirror-to", mirror_to()),
        (
            "changes",
            Frame::Changes(Changes {
                changes: vec![
                    change(ChangeAction::Delete, EntryKind::File, 0, "old.txt", ""),
                    change(
                        ChangeAction::Update,
                        EntryKind::File,
                        CHANGED_SIZE | CHANGED_MTIME,
                        "a.txt",
                        "",
                    ),
                    change(ChangeAction::Create, EntryKind::Symlink, 0, "ln", "a.txt"),
                ],
            }),
        ),
        ("goodbye", Frame::Goodbye),
        (
            "error-not-found",
            error(ErrorCode::NotFound, "no such file: x"),
        ),
        ("error-busy", error(ErrorCode::Busy, "")),
        ("error-corrupt", error(ErrorCode::Corrupt, "")),
        (
            "error-auth",
            error(ErrorCode::Auth, "authentication failed"),
        ),
    ])
    .into_iter()
    .chain(meta_frames())
    .collect()
}

/// The frames of tree metadata (`CAP_TREE_META`, proto.md §6.10).
fn meta_frames() -> Vec<(&'static str, Frame)> {
    let entry = TreeEntry {
        path: "a".into(),
        kind: EntryKind::File,
        size: 8192,
        mtime_ns: MTIME,
        mode: 0o644,
        target: String::new(),
        digest: Vec::new(),
    };
    let meta = Meta {
        uid: 1000,
        gid: 100,
        user: "ann".into(),
        group: "users".into(),
        link_group: 1,
        st_mode: 0o100644,
        rdev: 0,
        allocated: 4096,
        holes: vec![ByteRange::new(4096, 8192)],
        xattrs: vec![Xattr {
            name: "user.k".into(),
            value: b"v".to_vec(),
        }],
    };
    vec![
        (
            "zeros",
            Frame::Zeros(ChunkRef {
                transfer_id: 1,
                offset: 4096,
                len: 4096,
            }),
        ),
        (
            "list-tree-meta",
            Frame::ListTreeMeta(ListTreeMeta {
                dir: "t".into(),
                digests: false,
                xattrs: true,
            }),
        ),
        (
            "tree-meta-listing",
            Frame::TreeMetaListing(TreeMetaListing {
                entries: vec![MetaEntry {
                    entry: entry.clone(),
                    meta: meta.clone(),
                }],
                more: false,
            }),
        ),
        (
            "packed-tree-meta-listing",
            Frame::PackedTreeMetaListing(
                PackedTreeMetaListing::pack(&TreeMetaListing {
                    entries: vec![MetaEntry { entry, meta }],
                    more: false,
                })
                .unwrap(),
            ),
        ),
        (
            "set-meta",
            Frame::SetMeta(SetMeta {
                name: "t/a".into(),
                mode: 0o4755,
                mtime_ns: MTIME,
                uid: 1000,
                gid: 100,
                user: "ann".into(),
                group: "users".into(),
                numeric_ids: false,
                xattrs: Some(Vec::new()),
            }),
        ),
        (
            "put-file-meta",
            Frame::PutFileMeta(PutFileMeta {
                file: PutFile {
                    name: "t/sub/f.txt".into(),
                    mtime_ns: MTIME,
                    mode: 0o644,
                    crc32: CRC_ABC,
                    data: b"abc".to_vec(),
                },
                uid: 1000,
                gid: 100,
                user: "ann".into(),
                group: "users".into(),
                numeric_ids: false,
                xattrs: Some(Vec::new()),
            }),
        ),
        (
            "meta-set",
            Frame::MetaSet(MetaSet {
                name: "t/a".into(),
                not_chowned: true,
                xattrs_refused: String::new(),
            }),
        ),
        (
            "make-hard-link",
            Frame::MakeHardLink(MakeHardLink {
                name: "t/b".into(),
                existing: "t/a".into(),
            }),
        ),
        (
            "make-node",
            Frame::MakeNode(MakeNode {
                name: "t/fifo".into(),
                st_mode: 0o010644,
                rdev: 0,
            }),
        ),
        (
            "path-report",
            Frame::PathReport(PathReport {
                rtt_us: 225_000,
                min_rtt_us: 150_000,
            }),
        ),
        (
            "copy-done-meta",
            Frame::CopyDoneMeta(CopyDoneMeta {
                done: CopyDone {
                    files_total: 3,
                    files_transferred: 2,
                    files_skipped: 1,
                    bytes_total: 8192,
                    bytes_transferred: 4096,
                    resumed_bytes: 0,
                    millis: 7,
                },
                not_chowned: 2,
                xattrs_refused: 0,
                hard_links: 1,
                entries_skipped: 0,
            }),
        ),
    ]
}

/// Runs `bytes` through the codec as a whole stream, as a receiver would.
fn decode_stream(bytes: &[u8]) -> Result<Vec<Frame>, ProtoError> {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = codec.decode_eof(&mut buf)? {
        frames.push(frame);
    }
    Ok(frames)
}

#[test]
fn every_frame_vector_encodes_to_its_bytes_and_decodes_back() {
    let vectors = read_vectors();
    let frames = frames();
    for (name, frame) in &frames {
        let vector = vectors
            .get(*name)
            .unwrap_or_else(|| panic!("no testdata/{name}.hex"));
        let mut wire = BytesMut::new();
        frame.clone().encode(&mut wire).unwrap();
        assert_eq!(
            &wire[..],
            &vector.bytes[..],
            "{name}: the encoder disagrees with the vector"
        );
        let decoded = decode_stream(&vector.bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            decoded,
            vec![frame.clone()],
            "{name}: decodes to another frame"
        );
    }
    for name in vectors.keys() {
        assert!(
            frames.contains_key(name.as_str()) || name.starts_with("malformed-"),
            "testdata/{name}.hex has no frame in this test"
        );
    }
}

/// The early handshake vectors are one conversation (proto.md §4.5): a client with the vectors'
/// token and `Nc` answers `early-challenge` with `auth` before any `Welcome`, and a server with
/// their `Ns` answers `hello-early` with `early-challenge` and `auth` with `welcome-early`.
/// The daemon of the handshake vectors: the token, limits and agent they were made with.
fn vector_server_config(
    replay: Option<std::sync::Arc<replay::ReplayCache>>,
) -> session::ServerConfig {
    session::ServerConfig {
        token: Some(TOKEN.into()),
        max_chunk: 16_777_216,
        max_open: 4,
        tls: false,
        window: 8,
        agent: "xferd/0.1.0".into(),
        handshake_timeout: std::time::Duration::from_secs(10),
        idle_timeout: std::time::Duration::from_secs(300),
        replay,
    }
}

#[test]
fn the_early_vectors_are_one_handshake() {
    use xfer_proto::client::{ClientConfig, ClientSession, Step};
    use xfer_proto::session::{Handshake, ServerSession};
    let vectors = read_vectors();
    let frame = |name: &str| decode_stream(&vectors[name].bytes).unwrap().remove(0);
    let (nc, ns) = nonces();
    let config = vector_server_config(Some(Default::default()));
    let mut server: ServerSession = ServerSession::new(config, ns, 0, std::time::Instant::now());
    let Ok(Handshake::EarlyChallenge(early)) = server.handle_handshake(frame("hello-early")) else {
        panic!("hello-early is not answered early")
    };
    assert_eq!(Frame::EarlyChallenge(early), frame("early-challenge"));
    let mut client = ClientSession::new(
        ClientConfig {
            key: Some(TOKEN.into()),
            ..ClientConfig::default()
        },
        nc,
    );
    client.hello();
    let Ok(Step::Early { auth, .. }) = client.handle_frame(frame("early-challenge")) else {
        panic!("early-challenge does not let Auth go early")
    };
    assert_eq!(auth, frame("auth"));
    assert!(matches!(
        server.handle_handshake(auth),
        Ok(Handshake::Admitted)
    ));
    assert_eq!(Frame::Welcome(server.welcome()), frame("welcome-early"));
    assert!(matches!(
        client.handle_frame(frame("welcome-early")),
        Ok(Step::Welcomed(_))
    ));
}

#[test]
fn the_packed_listing_vector_holds_the_plain_listing_vector() {
    let vectors = read_vectors();
    let plain = &vectors["tree-meta-listing"].bytes;
    let Ok(Some(Frame::PackedTreeMetaListing(packed))) = FrameCodec::default().decode(
        &mut BytesMut::from(&vectors["packed-tree-meta-listing"].bytes[..]),
    ) else {
        panic!("packed-tree-meta-listing is not a PackedTreeMetaListing");
    };
    let unpacked = zstd_body(&packed);
    assert_eq!(unpacked, plain[5..], "the packed body is the plain one");
    assert!(packed.unpack().is_ok());
}

/// The body a packed listing holds, re-encoded.
fn zstd_body(packed: &PackedTreeMetaListing) -> Vec<u8> {
    let mut wire = BytesMut::new();
    Frame::TreeMetaListing(packed.unpack().unwrap())
        .encode(&mut wire)
        .unwrap();
    wire[5..].to_vec()
}

#[test]
fn a_packed_listing_that_inflates_past_the_limit_is_refused() {
    let page = TreeMetaListing {
        entries: Vec::new(),
        more: false,
    };
    let mut packed = PackedTreeMetaListing::pack(&page).unwrap();
    assert!(packed.unpack().is_ok());
    packed.zstd = vec![0; 16];
    assert!(packed.unpack().is_err(), "not a zstd frame");
}

#[test]
fn every_malformed_vector_fails_with_its_stated_error() {
    let mut checked = 0;
    for (name, vector) in read_vectors() {
        if !name.starts_with("malformed-") {
            continue;
        }
        let expected = vector
            .comments
            .iter()
            .find_map(|c| c.strip_prefix("error: "))
            .unwrap_or_else(|| panic!("{name}: no `error:` line"));
        let err = decode_stream(&vector.bytes)
            .map(|frames| panic!("{name}: decoded to {frames:?}"))
            .unwrap_err();
        if expected == "none" {
            assert!(
                matches!(err, ProtoError::TruncatedStream { .. }),
                "{name}: {err}"
            );
        } else {
            assert_eq!(format!("{:?}", err.code()), expected, "{name}: {err}");
        }
        checked += 1;
    }
    assert!(checked > 0, "no malformed vectors");
}

#[test]
fn frame_vectors_that_end_early_are_truncated_streams() {
    // Every proper prefix of a well-formed frame is a stream cut inside a frame (proto.md §3.3).
    for (name, vector) in read_vectors() {
        if name.starts_with("malformed-") {
            continue;
        }
        for cut in 1..vector.bytes.len() {
            let err = decode_stream(&vector.bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, ProtoError::TruncatedStream { .. }),
                "{name} cut at {cut}: {err}"
            );
        }
    }
}

#[test]
fn checksum_and_digest_vectors() {
    // proto.md §2.3 and §2.4.
    assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
    assert_eq!(crc32fast::hash(b"abc"), CRC_ABC);
    let empty: [u8; 16] = [
        0x99, 0xaa, 0x06, 0xd3, 0x01, 0x47, 0x98, 0xd8, 0x60, 0x01, 0xc3, 0x24, 0x46, 0x8d, 0x49,
        0x7f,
    ];
    assert_eq!(xxhash_rust::xxh3::xxh3_128(b"").to_be_bytes(), empty);
    assert_eq!(
        xxhash_rust::xxh3::xxh3_128(b"abc").to_be_bytes(),
        DIGEST_ABC
    );
}

#[test]
fn the_worked_example_in_proto_md_is_the_data_vector() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto.md");
    let spec = std::fs::read_to_string(spec).unwrap();
    let example = spec
        .split("Worked example")
        .nth(1)
        .and_then(|rest| rest.split("```\n").nth(1))
        .expect("proto.md has its worked example");
    let bytes: Vec<u8> = example
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .map(|pair| u8::from_str_radix(pair, 16).unwrap())
        .collect();
    assert_eq!(bytes, read_vectors()["data-abc"].bytes);
}

/// The zero round trip vectors are one handshake (proto.md §4.5): a server with the vectors'
/// token, `Ns` and a clock at `early-auth`'s time answers `hello-zero-rtt` with an
/// `EarlyChallenge` announcing `CAP_ZERO_RTT`, takes `early-auth` at once, and refuses it, with
/// `early-refused`, on a second connection bringing the same flight again.
#[test]
fn the_zero_rtt_vectors_are_one_handshake() {
    use std::sync::Arc;
    use xfer_proto::replay::ReplayCache;
    use xfer_proto::session::{Handshake, ServerSession, ZeroRtt};
    let vectors = read_vectors();
    let frame = |name: &str| decode_stream(&vectors[name].bytes).unwrap().remove(0);
    let (_, ns) = nonces();
    let replay = Arc::new(ReplayCache::default());
    let server = || {
        let config = vector_server_config(Some(Arc::clone(&replay)));
        let now_unix = EARLY_TIME_MS / 1000;
        let mut server: ServerSession =
            ServerSession::new(config, ns.clone(), now_unix, std::time::Instant::now());
        let Ok(Handshake::EarlyChallenge(early)) = server.handle_handshake(frame("hello-zero-rtt"))
        else {
            panic!("hello-zero-rtt is not answered early")
        };
        assert_ne!(early.welcome.capabilities & CAP_ZERO_RTT, 0);
        server
    };
    let mut first = server();
    assert!(matches!(
        first.handle_handshake(frame("early-auth")),
        Ok(Handshake::Admitted)
    ));
    assert_eq!(first.zero_rtt(), ZeroRtt::Accepted { proven: false });
    let mut replayed = server();
    let Ok(Handshake::EarlyRefused(refused)) = replayed.handle_handshake(frame("early-auth"))
    else {
        panic!("a replayed early-auth is taken")
    };
    assert_eq!(Frame::EarlyRefused(refused), frame("early-refused"));
}
