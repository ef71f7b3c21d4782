//! Entry points shared by the fuzz targets (`fuzz/`) and by the regression test that replays
//! their corpus in `cargo test`. Each must never panic, whatever the input.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::session::{Phase, Request, ServerConfig, ServerSession, TransferKind};
use crate::{auth, Auth, Frame, FrameCodec};

/// Decodes `data` as a stream of frames; every frame decoded must re-encode to a frame that
/// decodes equal to it.
pub fn decode_frames(data: &[u8]) {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode_eof(&mut buf) {
        let mut again = BytesMut::new();
        if frame.encode(&mut again).is_ok() {
            let back = FrameCodec::default().decode_eof(&mut again);
            assert_eq!(
                back.ok().flatten().as_ref(),
                Some(&frame),
                "re-encoding changed the frame"
            );
            assert!(again.is_empty(), "re-encoding left bytes over");
        }
    }
}

/// Feeds the frames in `data[1..]` to a [`ServerSession`] as a daemon would. Bit 0 of `data[0]`
/// gives the session a token; bit 1 makes the script answer a challenge correctly, so that
/// sessions with a token also reach the request phase; bit 2 makes the daemon require TLS.
pub fn session_script(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let token: Option<&[u8]> = if flags & 1 != 0 {
        Some(b"fuzz-token")
    } else {
        None
    };
    let config = ServerConfig {
        token: token.map(Into::into),
        max_chunk: 1 << 16,
        max_open: 4,
        tls: flags & 4 != 0,
    };
    let mut session = ServerSession::new(config, vec![0x5a; auth::NONCE_LEN], 1_000_000);
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(rest);
    let mut client_nonce = Vec::new();
    while let Ok(Some(mut frame)) = codec.decode_eof(&mut buf) {
        if flags & 2 != 0 && session.phase() == Phase::AwaitAuth {
            let token = token.expect("AwaitAuth only with a token");
            let proof = auth::client_proof(token, &client_nonce, session.nonce());
            frame = Frame::Auth(Auth { proof, grant: None });
        }
        if let Frame::Hello(h) = &frame {
            client_nonce.clone_from(&h.nonce);
        }
        let Ok(request) = session.handle_frame(frame) else {
            return;
        };
        match request {
            Request::OpenWrite(req) => {
                session.opened(TransferKind::Upload, req.identity.size);
            }
            Request::OpenRead(req) => {
                session.opened(TransferKind::Download, req.name.len() as u64);
            }
            Request::Commit(c) => session.closed(c.transfer_id),
            // The daemon would switch to TLS here; the next frames stand for what it decrypts.
            Request::StartTls => {}
            Request::Goodbye
            | Request::PeerError(_)
            | Request::CopyTo(_)
            | Request::MirrorTo(_) => return,
            _ => {}
        }
        assert!(session.open_count() <= 4, "open transfers beyond the limit");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Replays every input the fuzzers kept (`fuzz/corpus/*`), so what they once found stays
    /// fixed without running a fuzzer.
    #[test]
    fn fuzz_corpus_replays() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let mut replayed = 0;
        for (target, run) in [
            ("decode_frame", super::decode_frames as fn(&[u8])),
            ("session_script", super::session_script as fn(&[u8])),
        ] {
            for entry in std::fs::read_dir(corpus.join(target)).expect("corpus directory") {
                let path = entry.expect("corpus entry").path();
                run(&std::fs::read(&path).expect("corpus file"));
                replayed += 1;
            }
        }
        assert!(
            replayed >= 10,
            "only {replayed} corpus inputs found under {}",
            corpus.display()
        );
    }
}
