//! Server-to-server copies (`CopyTo`, `MirrorTo`): this daemon pushes to another one as its
//! client.

use std::sync::Arc;

use tracing::{info, warn};
use xfer_core::SourceFile;
use xfer_proto::{
    CopyDelta, CopyDeltaMode, CopyDone, CopyReason, CopyTo, ErrorCode, Frame, Progress,
};

use super::{fatal, ConnError, Handler};
use crate::registry::blocking;

impl Handler {
    /// Pushes a file or tree to another daemon as its client, reporting progress to ours.
    /// With `tree` (a `MirrorTo`), the tree copy keeps what its options say, mirrors as its
    /// filters, deletion and dry run say, and the answer is its changes, then `CopyDoneMeta`.
    pub(super) async fn copy_to(
        &mut self,
        req: CopyTo,
        tree: Option<(xfer_proto::TreeOptions, xfer_client::Mirror)>,
    ) -> Result<(), ConnError> {
        let mirrored = tree.is_some();
        // What the client chose for this copy (`CopyMode`); it holds for this one only.
        let delta_mode = std::mem::take(&mut self.copy_delta);
        let (keep, mirror) = tree.unwrap_or_default();
        let destination = xfer_client::Target {
            host: req.host.clone(),
            port: req.port,
        };
        info!(source = %req.source, destination = %destination, dest = %req.dest, "copy started");
        let progress = Arc::new(xfer_client::ProgressCounter::default());
        let (grant, key) = match req.grant {
            Some((grant, key)) => (Some(grant), Some(key.into())),
            None => (None, None),
        };
        let pinned = req
            .pin
            .map(|digest| xfer_client::trust::fingerprint_text(&digest));
        let tls = if req.tls {
            match copy_trust(self.shared.config.copy_trust.clone(), pinned, &destination).await {
                Ok(connector) => Some(connector),
                Err(e) => {
                    warn!(destination = %destination, error = %e, "copy failed");
                    return self
                        .reply_error(ErrorCode::Io, format!("copy to {destination} failed: {e}"))
                        .await;
                }
            }
        } else {
            None
        };
        let opts = xfer_client::Options {
            connections: xfer_client::Connections::Fixed(req.connections.clamp(1, 64) as usize),
            chunk_size: req
                .chunk_size
                .clamp(xfer_proto::MIN_CHUNK_SIZE, xfer_proto::MAX_CHUNK_SIZE),
            bwlimit: None,
            delta: match delta_mode {
                CopyDeltaMode::Auto => xfer_client::engine::DeltaMode::Auto,
                CopyDeltaMode::WholeFile => xfer_client::engine::DeltaMode::Never,
                CopyDeltaMode::Delta => xfer_client::engine::DeltaMode::Always,
            },
            retry_deadline: std::time::Duration::from_secs(60),
            progress: Arc::clone(&progress) as Arc<dyn xfer_client::Progress>,
            connector: xfer_client::Connector {
                token: key,
                tls_required: tls.is_some(),
                tls,
                tls_learned: Default::default(),
                trust: None,
                grant,
                // This daemon's own settings: its copies are its connections.
                socket: self.shared.config.socket.clone(),
                delivered: None,
                compress: Some(self.compression()),
                memory: None,
                offer: 0,
                // A copy proves itself with a grant, which no early proof can stand for.
                zero_rtt: None,
            },
            keep,
            // Unless the daemon's settings name one, as the client does.
            long_path_congestion: Some(Default::default()),
        };
        let root = self.root();
        let (source, dest, recursive) = (req.source, req.dest, req.recursive);
        let target = destination.clone();
        let mut task = tokio::spawn(async move {
            if recursive {
                let sub = blocking({
                    let (root, source) = (root.clone(), source.clone());
                    move || root.subroot(&source)
                })
                .await?;
                let s =
                    xfer_client::tree::send_tree_mirror(sub, &target, &dest, &opts, false, &mirror)
                        .await?;
                // The rest went; the copy still failed, and says what it left out.
                if let Some(unread) = s.unreadable_error() {
                    return Err(xfer_client::ClientError::Unreadable(unread));
                }
                let done = xfer_proto::CopyDoneMeta {
                    done: CopyDone {
                        files_total: s.files_total,
                        files_transferred: s.files_transferred,
                        files_skipped: s.files_skipped,
                        bytes_total: s.bytes_total,
                        bytes_transferred: s.bytes_transferred,
                        resumed_bytes: s.resumed_bytes,
                        millis: (s.seconds * 1000.0) as u64,
                    },
                    not_chowned: s.not_chowned,
                    xattrs_refused: s.xattrs_refused,
                    hard_links: s.hard_links,
                    entries_skipped: s.entries_skipped,
                };
                Ok::<_, xfer_client::ClientError>((done, s.changes, None, None))
            } else {
                let file =
                    blocking(move || SourceFile::new(root.open_read(&source)?, source)).await?;
                let s = xfer_client::send_file(file, &target, &dest, &opts).await?;
                let done = xfer_proto::CopyDoneMeta {
                    done: CopyDone {
                        files_total: 1,
                        files_transferred: 1,
                        files_skipped: 0,
                        bytes_total: s.bytes_total,
                        bytes_transferred: s.bytes_transferred,
                        resumed_bytes: s.resumed_bytes,
                        millis: (s.seconds * 1000.0) as u64,
                    },
                    not_chowned: 0,
                    xattrs_refused: 0,
                    hard_links: 0,
                    entries_skipped: 0,
                };
                let delta = CopyDelta {
                    delta: s.delta,
                    literal_bytes: s.literal_bytes,
                    matched_bytes: s.matched_bytes,
                };
                Ok((done, Vec::new(), Some(delta), s.delta_reason))
            }
        });
        let shutdown = self.shared.shutdown.clone();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        let outcome = loop {
            tokio::select! {
                outcome = &mut task => break outcome,
                () = shutdown.cancelled() => {
                    task.abort();
                    return Err(fatal(ErrorCode::ShuttingDown, "server shutting down; rerun the copy to resume"));
                }
                _ = tick.tick() => {
                    let p = Progress { bytes_done: progress.done(), bytes_total: progress.total() };
                    if let Err(e) = self.writer.send(&Frame::Progress(p)).await {
                        // The client is gone: nobody would learn how the copy ends.
                        task.abort();
                        return Err(e.into());
                    }
                }
            }
        };
        match outcome {
            Ok(Ok((done, changes, delta, reason))) => {
                info!(destination = %destination, bytes = done.done.bytes_transferred, millis = done.done.millis, reason = reason.as_deref().unwrap_or(""), "copy complete");
                // Only a client that offered CAP_COPY_DELTA knows the frame.
                let told = self.session.capabilities() & xfer_proto::CAP_COPY_DELTA != 0;
                // And `CopyReason` one that offered CAP_COPY_REASON too.
                let why = xfer_proto::CAP_COPY_DELTA | xfer_proto::CAP_COPY_REASON;
                if let Some(reason) = reason.filter(|_| self.session.capabilities() & why == why) {
                    let reason = one_line_within(&reason, xfer_proto::MAX_COPY_REASON);
                    self.writer
                        .send(&Frame::CopyReason(CopyReason { reason }))
                        .await?;
                }
                if let Some(delta) = delta.filter(|_| told) {
                    self.writer.send(&Frame::CopyDelta(delta)).await?;
                }
                if !mirrored {
                    return Ok(self.writer.send(&Frame::CopyDone(done.done)).await?);
                }
                for page in crate::mirror::pages(changes) {
                    self.writer.send(&Frame::Changes(page)).await?;
                }
                Ok(self.writer.send(&Frame::CopyDoneMeta(done)).await?)
            }
            Ok(Err(e)) => {
                warn!(destination = %destination, error = %e, "copy failed");
                let code = match &e {
                    xfer_client::ClientError::Local(c) if c.code().is_request_level() => c.code(),
                    _ => ErrorCode::Io,
                };
                // The destination's certificate was checked here, against this daemon's trust
                // anchors, not the client's: say which, or the client's --ca looks to blame.
                let hint = match &e {
                    xfer_client::ClientError::Tls(_) => {
                        " (the source daemon trusts the CAs of its copy_ca, or else the system's)"
                    }
                    _ => "",
                };
                self.reply_error(code, format!("copy to {destination} failed: {e}{hint}"))
                    .await
            }
            Err(e) => Err(fatal(ErrorCode::Io, format!("copy task failed: {e}"))),
        }
    }
}

/// `text` on one line, cut at a character boundary to at most `max` bytes.
fn one_line_within(text: &str, max: usize) -> String {
    let line = text.replace('\n', " ");
    let mut end = line.len().min(max);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_string()
}

/// How a copy over TLS checks its destination: by the fingerprint its client pinned, else by
/// `copy_ca`'s CAs, or the system's, read off the runtime.
async fn copy_trust(
    configured: Option<crate::CopyTrust>,
    pinned: Option<String>,
    destination: &xfer_client::Target,
) -> Result<tokio_rustls::TlsConnector, xfer_client::ClientError> {
    if pinned.is_some() {
        let trust = xfer_client::trust::Trust {
            roots: None,
            known_hosts: None,
            first_use: xfer_client::trust::FirstUse::Refuse,
            pinned,
        };
        return trust.connector(&destination.to_string());
    }
    if let Some(trust) = configured {
        return Ok(trust.0);
    }
    tokio::task::spawn_blocking(|| {
        xfer_client::Connector::tls_trusting(None, crate::CopyTrust::FIX)
    })
    .await
    .map_err(|e| xfer_client::ClientError::Trust(format!("loading the system's CAs: {e}")))?
}
