//! [`Pki`]: a test CA, a leaf certificate signed by it and an unrelated CA, made with `rcgen`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::Daemon;

/// A CA and a leaf certificate for `127.0.0.1` and `localhost` signed by it, plus an unrelated
/// second CA, written as PEM files into a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Generates everything (a leaf for `names`, which is not a CA itself).
    pub fn new(names: &[&str]) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new()
            .prefix("xfer-pki-")
            .tempdir()
            .expect("tempdir");
        let make_ca = |cn: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca, ca_key) = make_ca("xfer test CA");
        let (other_ca, _) = make_ca("xfer unrelated CA");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "xferd test server");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        fs::write(dir.path().join("other-ca.pem"), other_ca.pem()).unwrap();
        fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        Self { dir }
    }

    /// The CA that signed the leaf.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed nothing the daemon presents.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// The daemon flags `--tls-cert CERT --tls-key KEY`.
    pub fn daemon_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.dir.path().join("cert.pem").display().to_string(),
            "--tls-key".into(),
            self.dir.path().join("key.pem").display().to_string(),
        ]
    }

    /// Starts `xferd --root ROOT` with this certificate ([`daemon_args`](Self::daemon_args))
    /// and `extra` flags.
    pub fn start_daemon(&self, root: &Path, extra: &[&str]) -> Daemon {
        let mut args = self.daemon_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(root, &args)
    }
}
