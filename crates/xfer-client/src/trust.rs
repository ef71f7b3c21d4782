//! Trust on first use, as ssh does: [`KnownHosts`] pins each daemon's certificate fingerprint in
//! a file, and [`Trust`] makes the TLS settings whose verifier accepts a daemon by its pin, by a
//! CA, or (the first time, as [`FirstUse`] says) by pinning it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};

use crate::ClientError;

/// The SHA-256 fingerprint of a DER certificate, as `xferd --fingerprint` prints it and
/// `known_hosts` holds it: `SHA256:` and 64 lowercase hex digits.
pub fn fingerprint(cert_der: &[u8]) -> String {
    fingerprint_text(&Sha256::digest(cert_der).into())
}

/// The 32 bytes of a fingerprint written as [`fingerprint`] writes it.
pub fn fingerprint_digest(fingerprint: &str) -> Option<[u8; 32]> {
    let hex = fingerprint.strip_prefix("SHA256:")?;
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A fingerprint as [`fingerprint`] writes it, from its 32 bytes.
pub fn fingerprint_text(digest: &[u8; 32]) -> String {
    let mut out = String::from("SHA256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Why a daemon's certificate was not trusted, worded for one line.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Neither pinned nor signed by a trusted CA, and the user was not asked.
    #[error(
        "{peer} is not a known host (certificate {fingerprint}); compare it with \
         `xferd --fingerprint` on the server, then rerun with --accept-new to trust it"
    )]
    Unknown {
        /// `HOST:PORT`.
        peer: String,
        /// Its certificate's fingerprint.
        fingerprint: String,
    },
    /// The user said no.
    #[error("{peer} not trusted (certificate {fingerprint})")]
    Declined {
        /// `HOST:PORT`.
        peer: String,
        /// Its certificate's fingerprint.
        fingerprint: String,
    },
    /// The pinned fingerprint differs from the one presented.
    #[error(
        "WARNING: the certificate of {peer} has CHANGED (now {fingerprint}): someone may be \
         intercepting the connection, or the daemon's key was replaced; if you expected this, \
         remove line {line} of {file} and connect again"
    )]
    Changed {
        /// `HOST:PORT`.
        peer: String,
        /// The fingerprint presented.
        fingerprint: String,
        /// The file holding the pin.
        file: String,
        /// Its line (from 1).
        line: usize,
    },
    /// A copy's destination presented another certificate than the one its client pinned.
    #[error("the certificate of {peer} is not the one pinned for it (got {fingerprint})")]
    Mismatch {
        /// `HOST:PORT`.
        peer: String,
        /// The fingerprint presented.
        fingerprint: String,
    },
    /// The known hosts file could not be read or written.
    #[error("{0}")]
    File(String),
}

/// The file of pinned fingerprints: one `HOST:PORT SHA256:…` per line, `#` comments.
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
}

impl KnownHosts {
    /// The file at `path`.
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    /// `$XDG_CONFIG_HOME/xfer/known_hosts`, else `~/.config/xfer/known_hosts`; `None` without
    /// a home.
    pub fn default_path() -> Option<PathBuf> {
        let config = match std::env::var_os("XDG_CONFIG_HOME") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(".config"),
        };
        Some(config.join("xfer").join("known_hosts"))
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fingerprint pinned for `peer` and its line number (from 1), if any.
    ///
    /// # Errors
    /// The file exists but cannot be read.
    pub fn lookup(&self, peer: &str) -> Result<Option<(usize, String)>, TrustError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(TrustError::File(format!(
                    "reading {}: {e}",
                    self.path.display()
                )))
            }
        };
        Ok(text.lines().enumerate().find_map(|(i, line)| {
            let mut fields = line.split_whitespace();
            match (fields.next(), fields.next()) {
                (Some(host), Some(fp)) if host == peer && !host.starts_with('#') => {
                    Some((i + 1, fp.to_string()))
                }
                _ => None,
            }
        }))
    }

    /// Pins `fingerprint` for `peer` (appends a line; creates the file and its directory).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn add(&self, peer: &str, fingerprint: &str) -> Result<(), TrustError> {
        let fail =
            |e: std::io::Error| TrustError::File(format!("writing {}: {e}", self.path.display()));
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(fail)?;
        writeln!(file, "{peer} {fingerprint}").map_err(fail)
    }
}

/// Asks the user about a daemon met for the first time: gets `HOST:PORT` and the fingerprint,
/// says whether to trust it.
pub type Ask = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// What to do with a daemon that is neither pinned nor signed by a trusted CA.
#[derive(Clone)]
pub enum FirstUse {
    /// Refuse it, saying how to accept it.
    Refuse,
    /// Pin it without asking (`--accept-new`).
    Accept,
    /// Ask: the function gets `HOST:PORT` and the fingerprint and says yes or no.
    Ask(Ask),
}

impl std::fmt::Debug for FirstUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Refuse => "Refuse",
            Self::Accept => "Accept",
            Self::Ask(_) => "Ask",
        })
    }
}

/// Whom to trust: CAs (from a file, or the system's), pins in a known hosts file, and what to
/// do the first time; or, for a copy's destination, one fingerprint its client pinned.
#[derive(Debug, Clone)]
pub struct Trust {
    /// Trusted CAs; `None` when there are none (no `--ca` and no system roots).
    pub roots: Option<Arc<rustls::RootCertStore>>,
    /// The pins; `None` to pin nothing.
    pub known_hosts: Option<KnownHosts>,
    /// A daemon neither pinned nor CA-signed.
    pub first_use: FirstUse,
    /// The one fingerprint to accept, whatever the CAs say (a copy's destination).
    pub pinned: Option<String>,
}

impl Trust {
    /// CAs from `ca` (PEM), or the system's when `ca` is `None` (none found is no error here:
    /// pins may do).
    ///
    /// # Errors
    /// `ca` cannot be read or holds no certificate.
    pub fn roots(ca: Option<&Path>) -> Result<Option<Arc<rustls::RootCertStore>>, ClientError> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(ca) => {
                let certs = CertificateDer::pem_file_iter(ca)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(|e| {
                        ClientError::Trust(format!(
                            "reading CA certificates from {}: {e}",
                            ca.display()
                        ))
                    })?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(ClientError::Trust(format!(
                        "no CA certificate in {}",
                        ca.display()
                    )));
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        Ok((!roots.is_empty()).then(|| Arc::new(roots)))
    }

    /// TLS settings for connections to `peer` (`HOST:PORT`, the key of its pin).
    ///
    /// # Errors
    /// The CAs cannot be made into a verifier.
    pub fn connector(&self, peer: &str) -> Result<tokio_rustls::TlsConnector, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = match &self.roots {
            Some(roots) => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::clone(roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| ClientError::Trust(format!("trusted CAs: {e}")))?,
            ),
            None => None,
        };
        let verifier = PinVerifier {
            peer: peer.to_string(),
            trust: self.clone(),
            ca,
            provider: Arc::clone(&provider),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Trust(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        // Kernel TLS takes the keys over once the handshake is done.
        config.enable_secret_extraction = true;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// [`Trust`] for whichever daemons a command reaches: TLS settings made once per `HOST:PORT`.
pub struct PeerTls {
    trust: Trust,
    made: std::sync::Mutex<std::collections::HashMap<String, tokio_rustls::TlsConnector>>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Connections trusting as `trust` says.
    pub fn new(trust: Trust) -> Self {
        Self {
            trust,
            made: Default::default(),
        }
    }

    /// The TLS settings for `peer` (`HOST:PORT`).
    ///
    /// # Errors
    /// As [`Trust::connector`].
    pub fn for_peer(&self, peer: &str) -> Result<tokio_rustls::TlsConnector, ClientError> {
        let mut made = self
            .made
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tls) = made.get(peer) {
            return Ok(tls.clone());
        }
        let tls = self.trust.connector(peer)?;
        made.insert(peer.to_string(), tls.clone());
        Ok(tls)
    }

    /// The fingerprint pinned for `peer`, if any (what a copy's source daemon is told to
    /// expect of the destination).
    pub fn pinned(&self, peer: &str) -> Option<String> {
        let known = self.trust.known_hosts.as_ref()?;
        known.lookup(peer).ok().flatten().map(|(_, fp)| fp)
    }
}

/// Checks a daemon's certificate against its pin, then the CAs, then [`FirstUse`]; the
/// handshake's signature is verified with the provider's algorithms either way.
#[derive(Debug)]
struct PinVerifier {
    peer: String,
    trust: Trust,
    ca: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

fn refuse(e: TrustError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

impl PinVerifier {
    fn decide(
        &self,
        end_entity: &CertificateDer<'_>,
        ca_accepts: impl FnOnce() -> bool,
    ) -> Result<(), TrustError> {
        let fingerprint = fingerprint(end_entity);
        let peer = self.peer.clone();
        if let Some(pinned) = &self.trust.pinned {
            return if *pinned == fingerprint {
                Ok(())
            } else {
                Err(TrustError::Mismatch { peer, fingerprint })
            };
        }
        let known = self.trust.known_hosts.as_ref();
        if let Some(known) = known {
            if let Some((line, pinned)) = known.lookup(&peer)? {
                return if pinned == fingerprint {
                    Ok(())
                } else {
                    Err(TrustError::Changed {
                        peer,
                        fingerprint,
                        file: known.path().display().to_string(),
                        line,
                    })
                };
            }
        }
        if ca_accepts() {
            return Ok(());
        }
        let accepted = match &self.trust.first_use {
            FirstUse::Refuse => return Err(TrustError::Unknown { peer, fingerprint }),
            FirstUse::Accept => true,
            FirstUse::Ask(ask) => {
                // One question at a time: a copy checks its destination beside its source's
                // handshake, and two questions must not share the terminal.
                static ASKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
                let _one = ASKING
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                ask(&peer, &fingerprint)
            }
        };
        if !accepted {
            return Err(TrustError::Declined { peer, fingerprint });
        }
        if let Some(known) = known {
            known.add(&peer, &fingerprint)?;
        }
        Ok(())
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca_accepts = || {
            self.ca.as_ref().is_some_and(|ca| {
                ca.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                    .is_ok()
            })
        };
        self.decide(end_entity, ca_accepts).map_err(refuse)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The [`TrustError`] inside a failed TLS handshake's error, if the verifier refused.
pub(crate) fn refusal(e: &std::io::Error) -> Option<&TrustError> {
    let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) =
        e.get_ref()?.downcast_ref::<rustls::Error>()?
    else {
        return None;
    };
    other.0.downcast_ref::<TrustError>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust(dir: &Path, first_use: FirstUse) -> PinVerifier {
        PinVerifier {
            peer: "h:1".into(),
            trust: Trust {
                roots: None,
                known_hosts: Some(KnownHosts::at(dir.join("kh"))),
                first_use,
                pinned: None,
            },
            ca: None,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    #[test]
    fn first_use_pins_then_a_change_names_the_line_to_remove() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path().join("kh"), "# mine\nother:2 SHA256:00\n").unwrap();
        let a = CertificateDer::from(vec![1u8, 2, 3]);
        let b = CertificateDer::from(vec![4u8, 5, 6]);
        let refuse = trust(dir.path(), FirstUse::Refuse);
        assert!(matches!(
            refuse.decide(&a, || false),
            Err(TrustError::Unknown { .. })
        ));
        assert!(refuse.decide(&a, || true).is_ok(), "a CA still vouches");
        let accept = trust(dir.path(), FirstUse::Accept);
        accept.decide(&a, || false).unwrap();
        refuse.decide(&a, || false).unwrap();
        let e = refuse.decide(&b, || true).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "remove line 3 of {}",
                dir.path().join("kh").display()
            )),
            "{e}"
        );
    }

    #[test]
    fn fingerprints_read_back_as_their_digest() {
        let text = fingerprint(b"cert");
        let digest = fingerprint_digest(&text).unwrap();
        assert_eq!(fingerprint_text(&digest), text);
        assert_eq!(fingerprint_digest("SHA256:zz"), None);
        assert_eq!(fingerprint_digest(&text[1..]), None);
    }

    #[test]
    fn a_pinned_fingerprint_alone_decides() {
        let dir = tempfile::tempdir().unwrap();
        let a = CertificateDer::from(vec![1u8]);
        let mut v = trust(dir.path(), FirstUse::Accept);
        v.trust.pinned = Some(fingerprint(&a));
        assert!(v.decide(&a, || false).is_ok());
        v.trust.pinned = Some(fingerprint(&[2u8]));
        assert!(matches!(
            v.decide(&a, || true),
            Err(TrustError::Mismatch { .. })
        ));
        assert!(!dir.path().join("kh").exists());
    }
}
