//! Bugs found in the field, each pinned by the test that would have caught it: the comment above
//! each test says what went wrong. A test moves here when it exists because of a bug, not because
//! of a feature; it stays as long as the code it guards does.

use std::time::Duration;

use bytes::Bytes;
use xfer_proto::{Data, FileIdentity, Frame, OpenWrite};
use xfer_tests::raw::{encode, RawConn};
use xfer_tests::{random_file, run_xfer, sha256_file, Daemon, Pki, Tree};

/// Hang guard for a successful transfer of a few MiB.
const TRANSFER: Duration = Duration::from_secs(120);

/// Bug: frames were not flushed through TLS, so the tail of a chunk stayed in the TLS buffer
/// while the client waited for its acknowledgement, and a long transfer stalled until the idle
/// timeout. One chunk in flight per connection makes every frame the last one sent before waiting.
#[test]
fn long_tls_transfer_with_one_chunk_in_flight_does_not_stall() {
    let tree = Tree::new();
    let pki = Pki::new(&["127.0.0.1"]);
    let daemon = pki.start_daemon(&tree.root(), &["--window", "1"]);
    let src = tree.src("long.bin");
    let want = random_file(&src, 16 << 20, 21);
    let ca = pki.ca().display().to_string();
    let addr = daemon.addr();
    // One connection, so no other connection's traffic can push a stalled record out.
    let tls = [
        "--tls",
        "--ca",
        &ca,
        "-c",
        "1",
        "--chunk-size",
        "256K",
        "--retry-deadline",
        "0",
    ];
    let mut send = vec!["send", src.to_str().unwrap(), &addr, "--as", "long.bin"];
    send.extend(tls);
    run_xfer(&send, &[], TRANSFER).ok();
    assert_eq!(sha256_file(&tree.root().join("long.bin")), want);
    let out = tree.out("long.bin");
    let mut recv = vec!["recv", "long.bin", &addr, "-o", out.to_str().unwrap()];
    recv.extend(tls);
    run_xfer(&recv, &[], TRANSFER).ok();
    assert_eq!(sha256_file(&out), want);
}

/// Bug: with a chunk written behind, a chunk right after it that failed its CRC was rejected
/// before the first was acknowledged; clients match answers to chunks by order.
#[test]
fn answers_to_chunks_come_in_the_order_the_chunks_were_sent() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let mut conn = RawConn::handshaken(daemon.socket_addr(), None);
    let size = 2 << 20;
    let open = Frame::OpenWrite(OpenWrite {
        name: "ordered.bin".into(),
        identity: FileIdentity { size, mtime_ns: 0 },
        mode: 0o644,
        chunk_size: 1 << 20,
    });
    let id = match conn.request(&open) {
        Frame::WriteOpened(opened) => opened.transfer_id,
        other => panic!("OpenWrite answered with {other:?}"),
    };
    let good = Data::new(id, 0, Bytes::from(vec![7u8; 1 << 20]));
    let mut bad = Data::new(id, 1 << 20, Bytes::from(vec![9u8; 1 << 20]));
    bad.crc32 ^= 1;
    let both = [encode(&Frame::Data(good)), encode(&Frame::Data(bad))].concat();
    conn.send_bytes(&both).unwrap();
    let answers = [conn.recv(), conn.recv()];
    match answers {
        [Some(Frame::Ack(a)), Some(Frame::Reject(r))] => {
            assert_eq!((a.offset, r.offset), (0, 1 << 20));
        }
        other => panic!("want Ack(0) then Reject(1 MiB), got {other:?}"),
    }
    daemon.assert_running();
}
