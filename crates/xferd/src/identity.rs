//! The daemon's own TLS identity for trust on first use: a key and self-signed certificate
//! made on the first start with `tls` and no `tls_cert`/`tls_key`, kept in the state directory
//! (`cert.pem`, `key.pem`, both 0600), and their fingerprint for `xferd --fingerprint`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The certificate's file name in the state directory.
pub const CERT_FILE: &str = "cert.pem";
/// The private key's file name in the state directory.
pub const KEY_FILE: &str = "key.pem";

/// The state directory: `state_dir` if set, else `$STATE_DIRECTORY` (systemd's
/// `StateDirectory=`; its first entry), else `~/.local/state/xferd`.
///
/// # Errors
/// None of them is available (no home).
pub fn state_dir(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = configured {
        return Ok(dir.to_path_buf());
    }
    if let Some(dirs) = std::env::var_os("STATE_DIRECTORY") {
        if let Some(first) = dirs.to_string_lossy().split(':').find(|d| !d.is_empty()) {
            return Ok(PathBuf::from(first));
        }
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("no state directory: set state_dir (--state-dir DIR)")?;
    Ok(PathBuf::from(home).join(".local/state/xferd"))
}

/// The certificate and key in `dir`, made first if neither exists yet.
///
/// # Errors
/// The directory or files cannot be made, or only one of the two exists.
pub fn load_or_create(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    match (cert.exists(), key.exists()) {
        (true, true) => return Ok((cert, key)),
        (false, false) => {}
        _ => anyhow::bail!(
            "{} holds only one of {CERT_FILE} and {KEY_FILE}: remove it to make a new identity",
            dir.display()
        ),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let names = vec![host, "localhost".to_string()];
    let made = rcgen::generate_simple_self_signed(names).context("making a certificate")?;
    // The key first: a certificate without its key would stop every later start.
    write_new(&key, made.key_pair.serialize_pem().as_bytes())?;
    write_new(&cert, made.cert.pem().as_bytes())?;
    tracing::info!(
        cert = %cert.display(),
        fingerprint = %fingerprint(&cert)?,
        "made a self-signed TLS certificate; clients pin its fingerprint on first use"
    );
    Ok((cert, key))
}

/// Writes `bytes` to a new file `path` (mode 0600) through a temporary name, so that a crash
/// never leaves a half-written key or certificate under its name.
fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("pem.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("naming {}", path.display()))
}

/// The SHA-256 fingerprint of the first certificate in the PEM file `cert`.
///
/// # Errors
/// The file cannot be read or holds no certificate.
pub fn fingerprint(cert: &Path) -> anyhow::Result<String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    let der = CertificateDer::from_pem_file(cert)
        .with_context(|| format!("reading the certificate {}", cert.display()))?;
    Ok(xfer_client::trust::fingerprint(&der))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_identity_is_made_once_with_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (cert, key) = load_or_create(&state).unwrap();
        for f in [&cert, &key] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
        let first = fingerprint(&cert).unwrap();
        assert!(
            first.starts_with("SHA256:") && first.len() == 7 + 64,
            "{first}"
        );
        load_or_create(&state).unwrap();
        assert_eq!(fingerprint(&cert).unwrap(), first, "made again");
        crate::Tls::from_pem_files(&cert, &key).unwrap();
        std::fs::remove_file(&key).unwrap();
        assert!(load_or_create(&state).is_err());
    }
}
