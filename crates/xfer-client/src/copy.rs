//! Server-to-server copies (`xfer copy`): the client asks the source daemon to push a file or
//! tree straight to the destination daemon, and shows the progress the source reports. The data
//! never passes through the client. When the destination needs a token, the client gives the
//! source a grant derived from it: good for writing under the destination name only, for a
//! limited time, and useless for anything else. Over TLS the grant travels inside the client's
//! TLS session, and `CopyTo.tls` has the source verify and encrypt its own leg too.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use xfer_proto::{
    auth, Change, CopyDelta, CopyDeltaMode, CopyDoneMeta, CopyMode, CopyTo, Frame, Grant, MirrorTo,
    CAP_COPY_DELTA, CAP_COPY_REASON, CAP_MIRROR, MAX_COPY_REASON,
};

use crate::session::unexpected;
use crate::{ClientError, Connector, Progress, Session, Target};

/// How long a grant given to a source daemon stays valid.
pub const GRANT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// One copy: where from, where to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// Source daemon.
    pub src: Target,
    /// File or tree on the source.
    pub name: String,
    /// Destination daemon.
    pub dst: Target,
    /// Name on the destination.
    pub dest: String,
}

fn split_host(spec: &str) -> Result<(String, &str), ClientError> {
    let bad = || {
        ClientError::Target(format!(
            "bad copy endpoint {spec:?}: expected HOST[:PORT]:NAME"
        ))
    };
    if let Some(rest) = spec.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        return Ok((
            format!("[{host}]"),
            after.strip_prefix(':').unwrap_or(after),
        ));
    }
    match spec.split_once(':') {
        Some((host, rest)) if !host.is_empty() => Ok((host.to_string(), rest)),
        None if !spec.is_empty() => Ok((spec.to_string(), "")),
        _ => Err(bad()),
    }
}

/// Splits `HOST[:PORT][:NAME]` into a target and the name (empty when absent). A segment of
/// digits right after the host is the port.
///
/// # Errors
/// `Target` for a malformed endpoint.
pub fn parse_endpoint(spec: &str) -> Result<(Target, String), ClientError> {
    let (host, rest) = split_host(spec)?;
    let (port, name) = match rest.split_once(':') {
        Some((p, name)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            (Some(p), name)
        }
        None if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) => (Some(rest), ""),
        _ => (None, rest),
    };
    let target = match port {
        Some(p) => format!("{host}:{p}").parse()?,
        None => host.parse()?,
    };
    Ok((target, name.to_string()))
}

impl CopySpec {
    /// `SRC_HOST[:PORT]:NAME` and `DST_HOST[:PORT][:DEST]` (DEST defaults to NAME).
    ///
    /// # Errors
    /// `Target` for malformed endpoints or a missing source name.
    pub fn parse(src: &str, dst: &str) -> Result<Self, ClientError> {
        let (src_target, name) = parse_endpoint(src)?;
        if name.is_empty() {
            return Err(ClientError::Target(format!(
                "{src:?} names no file: expected HOST[:PORT]:NAME"
            )));
        }
        let (dst_target, dest) = parse_endpoint(dst)?;
        let dest = if dest.is_empty() { name.clone() } else { dest };
        Ok(Self {
            src: src_target,
            name,
            dst: dst_target,
            dest,
        })
    }
}

/// A grant for writing under `dest` on a daemon whose token is `token`, with its key.
pub fn make_grant(token: &[u8], dest: &str) -> (Grant, Vec<u8>) {
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + GRANT_LIFETIME.as_secs();
    let mut nonce = vec![0u8; auth::NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let grant = Grant {
        scope: dest.to_string(),
        expires,
        nonce,
    };
    let key = auth::grant_key(token, &grant);
    (grant, key)
}

/// How a copy runs, beside where from and where to.
#[derive(Clone)]
pub struct CopyOptions {
    /// The destination's token, from which the copy's grant is made; never sent.
    pub dst_token: Option<Arc<[u8]>>,
    /// Copy a directory tree.
    pub recursive: bool,
    /// Connections from the source to the destination.
    pub connections: usize,
    /// Chunk size of the uploads to the destination.
    pub chunk_size: u32,
    /// Insist that the source reach the destination over TLS (`--tls`). Without it, it does
    /// whenever the destination serves TLS.
    pub dst_tls: bool,
    /// What a tree copy keeps (sent to the source daemon in `MirrorTo`).
    pub keep: crate::TreeOptions,
    /// Filters, deletion and dry run of a tree copy (`MirrorTo`); the default is a plain copy.
    pub mirror: crate::Mirror,
    /// Whether the source daemon tries a delta against what the destination holds
    /// (`--delta`, `--whole-file`); `Auto` lets it decide.
    pub delta: CopyDeltaMode,
}

/// What the source daemon reported about one copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Its counts.
    pub done: CopyDoneMeta,
    /// What a tree copy (`MirrorTo`) changed.
    pub changes: Vec<Change>,
    /// What a single-file copy's delta moved, from a source daemon that says
    /// (`CAP_COPY_DELTA`).
    pub delta: Option<CopyDelta>,
    /// Why a single-file copy's upload went as a delta or whole, from a source daemon that
    /// says (`CAP_COPY_REASON`).
    pub reason: Option<String>,
}

impl std::fmt::Debug for CopyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOptions")
            .field("dst_token", &self.dst_token.as_ref().map(|_| "<redacted>"))
            .field("recursive", &self.recursive)
            .field("connections", &self.connections)
            .field("chunk_size", &self.chunk_size)
            .field("dst_tls", &self.dst_tls)
            .field("keep", &self.keep)
            .field("mirror", &self.mirror)
            .field("delta", &self.delta)
            .finish()
    }
}

/// Runs one copy and returns what the source daemon reported.
///
/// # Errors
/// Connection or authentication failures to the source, or the copy's own failure as the
/// source reports it.
pub async fn copy(
    spec: &CopySpec,
    src: &Connector,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyDoneMeta, ClientError> {
    copy_mirror(spec, src, opts, progress)
        .await
        .map(|report| report.done)
}

/// [`copy`], with the changes the source daemon reported for a tree copy (`MirrorTo`) and what
/// a single-file copy's delta moved.
///
/// A tree copy is one `MirrorTo` whenever the source daemon knows it: it carries what the
/// copy keeps as well as its filters, deletion and dry run. A source daemon that predates it
/// gets a plain `CopyTo` (and one warning), unless the copy needs filters, deletion or a dry
/// run, which it refuses.
///
/// # Errors
/// As [`copy`]; `Unsupported` when the source daemon predates mirror copies and the copy needs
/// one, or predates `CAP_COPY_DELTA` and the copy forces a delta or the whole file.
pub async fn copy_mirror(
    spec: &CopySpec,
    src: &Connector,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport, ClientError> {
    let offer = if opts.recursive { CAP_MIRROR } else { 0 };
    // The destination is checked from here, with the user's pins and CAs, before the source
    // is sent there: a destination with a certificate is reached over TLS, pinned. Checked
    // beside the source's handshake, so that the request can go with the source's `Auth`
    // where it proves itself early (a round trip sooner), if the answer is in by then.
    let to_destination = Connector {
        tls_required: opts.dst_tls,
        ..src.clone()
    };
    let asked = Arc::new(CopyAsk {
        spec: spec.clone(),
        opts: opts.clone(),
        grant: opts
            .dst_token
            .as_deref()
            .map(|token| make_grant(token, &spec.dest)),
        trust: src.trust.clone(),
        tls: std::sync::OnceLock::new(),
        sent: std::sync::atomic::AtomicBool::new(false),
    });
    let probe = async {
        let tls = match Session::serves_tls(&spec.dst, &to_destination).await {
            Ok(tls) => tls,
            // Not pinned here and no CA of ours vouches for it: the source's CAs decide.
            Err(ClientError::UnknownHost(_)) => true,
            Err(e) => return Err(e),
        };
        let _ = asked.tls.set(tls);
        Ok(tls)
    };
    let first: crate::session::FirstFrames = {
        let asked = Arc::clone(&asked);
        Arc::new(move |welcome: &xfer_proto::Welcome| {
            let frames = asked.tls.get().and_then(|&tls| asked.frames(tls, welcome));
            asked.sent.store(frames.is_some(), Ordering::SeqCst);
            frames.unwrap_or_default()
        })
    };
    let mut no_rtt = None;
    let connect = Session::connect_sending(&spec.src, src, offer, &mut no_rtt, Some(&first));
    let (session, tls) = tokio::join!(connect, probe);
    // The source's failure first: it is the one the user reaches directly.
    let mut session = session?;
    let sent = std::mem::take(&mut session.first_sent) && asked.sent.load(Ordering::SeqCst);
    // A forced choice the source cannot be told would be ignored without a word: refuse.
    let knows_delta = session.welcome.capabilities & CAP_COPY_DELTA != 0;
    if opts.delta != CopyDeltaMode::Auto && !knows_delta {
        session.close().await;
        let flag = match opts.delta {
            CopyDeltaMode::Delta => "--delta",
            _ => "--whole-file",
        };
        return Err(ClientError::Unsupported(format!(
            "the source daemon at {} is too old to be told {flag} for a copy (upgrade xferd, \
             or copy without {flag})",
            spec.src
        )));
    }
    let mirrored = opts.recursive && session.welcome.capabilities & CAP_MIRROR != 0;
    if opts.recursive && !mirrored {
        if !opts.mirror.is_plain() {
            session.close().await;
            return Err(ClientError::Unsupported(format!(
                "the source daemon at {} is too old for --delete, filters or --dry-run on \
                 copy -r (upgrade xferd)",
                spec.src
            )));
        }
        crate::meta::warn_old_daemon(&spec.src);
    }
    let tls = match tls {
        Ok(tls) => tls,
        Err(e) => {
            session.close().await;
            return Err(e);
        }
    };
    if !sent {
        let frames = asked
            .frames(tls, &session.welcome)
            .expect("a copy the source can carry out");
        session.send_all(&frames).await?;
    }
    let mut changes = Vec::new();
    let mut delta = None;
    let mut reason = None;
    let knows_reason = knows_delta && session.welcome.capabilities & CAP_COPY_REASON != 0;
    loop {
        match session.next().await? {
            Frame::Progress(p) => {
                progress.set_length(p.bytes_total);
                progress.set_position(p.bytes_done);
            }
            Frame::Changes(page) if mirrored => changes.extend(page.changes),
            // Once, before `CopyDelta`.
            Frame::CopyReason(r)
                if knows_reason
                    && !mirrored
                    && reason.is_none()
                    && delta.is_none()
                    && r.reason.len() <= MAX_COPY_REASON =>
            {
                reason = Some(r.reason);
            }
            Frame::CopyDelta(d) if knows_delta && !mirrored && delta.is_none() => delta = Some(d),
            Frame::CopyDoneMeta(done) if mirrored => {
                session.close().await;
                return Ok(CopyReport {
                    done,
                    changes,
                    delta,
                    reason,
                });
            }
            Frame::CopyDone(done) if !mirrored => {
                session.close().await;
                let done = CopyDoneMeta {
                    done,
                    not_chowned: 0,
                    xattrs_refused: 0,
                    hard_links: 0,
                    entries_skipped: 0,
                };
                return Ok(CopyReport {
                    done,
                    changes,
                    delta,
                    reason,
                });
            }
            other => return Err(unexpected(other)),
        }
    }
}

/// What a copy asks its source daemon for, once the destination's TLS is known.
struct CopyAsk {
    spec: CopySpec,
    opts: CopyOptions,
    /// The grant for the destination, made once: every request built carries the same.
    grant: Option<(Grant, Vec<u8>)>,
    /// The user's pins, whose pin for the destination the source is told to expect.
    trust: Option<Arc<crate::trust::PeerTls>>,
    /// Whether the destination is reached over TLS, once checked.
    tls: std::sync::OnceLock<bool>,
    /// The request went with the source's handshake.
    sent: std::sync::atomic::AtomicBool,
}

impl CopyAsk {
    /// The frames that ask a source daemon whose `Welcome` is `welcome` for the copy, to a
    /// destination reached over TLS if `tls`: `MirrorTo` for a tree where it knows it, the
    /// delta's mode first where one is forced; `None` when the source cannot carry the copy
    /// out (too old for the forced mode, or for the filters, deletion or dry run asked).
    fn frames(&self, tls: bool, welcome: &xfer_proto::Welcome) -> Option<Vec<Frame>> {
        let (spec, opts) = (&self.spec, &self.opts);
        let knows_delta = welcome.capabilities & CAP_COPY_DELTA != 0;
        let mirrored = opts.recursive && welcome.capabilities & CAP_MIRROR != 0;
        if (opts.delta != CopyDeltaMode::Auto && !knows_delta)
            || (opts.recursive && !mirrored && !opts.mirror.is_plain())
        {
            return None;
        }
        let pin = match &self.trust {
            Some(trust) if tls => trust
                .pinned(&spec.dst.to_string())
                .and_then(|fp| crate::trust::fingerprint_digest(&fp)),
            _ => None,
        };
        let request = CopyTo {
            source: spec.name.clone(),
            recursive: opts.recursive,
            host: spec.dst.host.clone(),
            port: spec.dst.port,
            dest: spec.dest.clone(),
            connections: opts.connections as u32,
            chunk_size: opts.chunk_size,
            grant: self.grant.clone(),
            tls,
            pin,
        };
        let mut frames = Vec::with_capacity(2);
        if opts.delta != CopyDeltaMode::Auto {
            frames.push(Frame::CopyMode(CopyMode { delta: opts.delta }));
        }
        let m = &opts.mirror;
        frames.push(match mirrored {
            true => Frame::MirrorTo(MirrorTo {
                copy: request,
                options: opts.keep,
                rules: m.wire_rules(),
                delete: m.delete,
                delete_excluded: m.delete_excluded,
                dry_run: m.dry_run,
            }),
            false => Frame::CopyTo(request),
        });
        Some(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(host: &str, port: u16) -> Target {
        Target {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint("src:data/x").unwrap(),
            (t("src", 8888), "data/x".into())
        );
        assert_eq!(
            parse_endpoint("src:9000:data/x").unwrap(),
            (t("src", 9000), "data/x".into())
        );
        assert_eq!(
            parse_endpoint("[::1]:9000:x").unwrap(),
            (t("::1", 9000), "x".into())
        );
        assert_eq!(
            parse_endpoint("[::1]:x").unwrap(),
            (t("::1", 8888), "x".into())
        );
        assert_eq!(
            parse_endpoint("dst:9001").unwrap(),
            (t("dst", 9001), String::new())
        );
        assert_eq!(
            parse_endpoint("dst").unwrap(),
            (t("dst", 8888), String::new())
        );
        assert!(parse_endpoint(":x").is_err());
        let spec = CopySpec::parse("a:1:f", "b:2").unwrap();
        assert_eq!((spec.dest.as_str(), spec.dst.port), ("f", 2));
        assert!(CopySpec::parse("a:1", "b").is_err());
    }

    /// What a copy sends its source with the handshake is what it would send after it: one
    /// request, the grant made once, and nothing for a copy the source cannot carry out.
    #[test]
    fn the_request_sent_with_auth_is_the_one_the_source_can_carry_out() {
        let spec = CopySpec::parse("a:1:f", "b:2:g").unwrap();
        let mut opts = CopyOptions {
            dst_token: Some(b"t".as_slice().into()),
            recursive: false,
            connections: 4,
            chunk_size: 1 << 20,
            dst_tls: false,
            keep: crate::TreeOptions::default(),
            mirror: crate::Mirror::default(),
            delta: CopyDeltaMode::Auto,
        };
        let asked = |opts: &CopyOptions| CopyAsk {
            spec: spec.clone(),
            opts: opts.clone(),
            grant: opts.dst_token.as_deref().map(|t| make_grant(t, "g")),
            trust: None,
            tls: std::sync::OnceLock::new(),
            sent: std::sync::atomic::AtomicBool::new(false),
        };
        let welcome = |capabilities| xfer_proto::Welcome {
            version: 1,
            capabilities,
            max_chunk_size: 1 << 20,
            window: 4,
            agent: "xferd/test".into(),
            proof: vec![],
        };
        let ask = asked(&opts);
        let once = ask.frames(true, &welcome(CAP_COPY_DELTA)).unwrap();
        let again = ask.frames(true, &welcome(CAP_COPY_DELTA)).unwrap();
        assert_eq!(once, again, "one grant, made once");
        let [Frame::CopyTo(to)] = once.as_slice() else {
            panic!("{once:?}")
        };
        assert!(to.tls && to.grant.is_some() && to.dest == "g");
        // A forced mode goes first, to a source that can be told it; to one that cannot,
        // nothing goes.
        opts.delta = CopyDeltaMode::Delta;
        let ask = asked(&opts);
        let forced = ask.frames(false, &welcome(CAP_COPY_DELTA)).unwrap();
        assert!(matches!(
            forced.as_slice(),
            [Frame::CopyMode(_), Frame::CopyTo(_)]
        ));
        assert!(ask.frames(false, &welcome(0)).is_none());
        // A tree is a MirrorTo where the source knows it, else a plain CopyTo.
        opts.delta = CopyDeltaMode::Auto;
        opts.recursive = true;
        let ask = asked(&opts);
        let tree = ask.frames(false, &welcome(CAP_MIRROR)).unwrap();
        assert!(matches!(tree.as_slice(), [Frame::MirrorTo(_)]));
        let old = ask.frames(false, &welcome(0)).unwrap();
        assert!(matches!(old.as_slice(), [Frame::CopyTo(c)] if c.recursive));
    }

    #[test]
    fn grants_are_fresh_and_scoped() {
        let (g1, k1) = make_grant(b"t", "d");
        let (g2, k2) = make_grant(b"t", "d");
        assert_eq!(g1.scope, "d");
        assert_ne!(g1.nonce, g2.nonce);
        assert_ne!(k1, k2);
        assert_eq!(k1, auth::grant_key(b"t", &g1));
    }
}
