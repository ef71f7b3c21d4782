//! Daemon settings: the configuration file (`/etc/xferd/xferd.toml`), command-line flags laid
//! over it and defaults under both, validated into a [`Config`].
//!
//! Every key is optional and named after its flag (`max_streams` is `--max-streams`). An unknown
//! key is an error, so a typo cannot silently leave a default in force. Secrets never pass through
//! here: the file names the token *file*, and [`Settings::render`] prints that path, never what
//! it holds.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::Config;

/// Below this many bytes a token cannot hold 128 random bits.
const SHORT_TOKEN: usize = 16;

/// Where the daemon reads its configuration when `--config` is not given (if the file exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/xferd/xferd.toml";
/// The systemd credential that holds the token (`LoadCredential=token:/etc/xferd/token`), used
/// when no `token_file` is set.
pub const TOKEN_CREDENTIAL: &str = "token";

/// Every daemon option; `None` means "not set at this layer".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to bind (`--listen`); ignored when systemd passes a listening socket.
    pub listen: Option<String>,
    /// Directory served (`--root`).
    pub root: Option<PathBuf>,
    /// Connections served at once (`--max-streams`).
    pub max_streams: Option<usize>,
    /// Largest chunk accepted or served (`--chunk-size`): bytes, or a string like `"16M"`.
    pub chunk_size: Option<Size>,
    /// Bytes of chunk and frame buffers all connections together may hold (`--max-memory`);
    /// unset, a quarter of the machine's memory, at least 64M and at most 1G.
    pub max_memory: Option<Size>,
    /// Seconds a connection waits for a stream before it is told the daemon is busy.
    pub queue_timeout: Option<u64>,
    /// Seconds of silence after which a connection is closed.
    pub idle_timeout: Option<u64>,
    /// Seconds a new connection has to finish its handshake (`--handshake-timeout`).
    pub handshake_timeout: Option<u64>,
    /// Transfers one connection may have open at once (`--max-transfers-per-conn`).
    pub max_transfers_per_conn: Option<usize>,
    /// Connections accepted at once from one client address (`--max-conns-per-ip`).
    pub max_conns_per_ip: Option<usize>,
    /// Chunks a client may have unacknowledged per connection (`--window`).
    pub window: Option<u32>,
    /// Refuse uploads (`--read-only`).
    pub read_only: Option<bool>,
    /// Carry out the deletions of mirror copies (`--allow-delete`).
    pub allow_delete: Option<bool>,
    /// Write uploads around the page cache where the filesystem allows it (`--no-direct-io`
    /// sets it false).
    pub direct_io: Option<bool>,
    /// File holding the shared token (`--token-file`).
    pub token_file: Option<PathBuf>,
    /// Serve without a token on a non-loopback address (`--allow-anonymous`).
    pub allow_anonymous: Option<bool>,
    /// Serve over TLS (`--tls`): with `tls_cert`/`tls_key` unset, with a self-signed
    /// certificate made on the first start and kept in `state_dir`.
    pub tls: Option<bool>,
    /// Where the daemon keeps its own key and certificate (`--state-dir`); unset,
    /// `$STATE_DIRECTORY` under systemd, else `~/.local/state/xferd`.
    pub state_dir: Option<PathBuf>,
    /// PEM certificate chain (`--tls-cert`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (`--tls-key`).
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates trusted for the destination of a copy over TLS (`--copy-ca`);
    /// unset, the system's.
    pub copy_ca: Option<PathBuf>,
    /// Log filter (`--log-level`; `RUST_LOG` overrides both).
    pub log_level: Option<String>,
    /// Address of the Prometheus endpoint (`--metrics`); none by default.
    pub metrics: Option<String>,
    /// Send buffer of every connection (`--sndbuf`); the kernel's autotuning when unset.
    pub sndbuf: Option<Size>,
    /// Receive buffer of every connection (`--rcvbuf`); the kernel's autotuning when unset.
    pub rcvbuf: Option<Size>,
    /// TCP congestion control of every connection (`--congestion`); the system's when unset.
    pub congestion: Option<String>,
    /// How chunks the daemon sends are compressed when the client does not say
    /// (`--compress`): `"auto"`, `"off"` or a zstd level such as `"3"`.
    pub compress: Option<String>,
}

/// A byte count written as a number or as a string with a `K`, `M`, `G` suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
            if n != 0 && n % (1 << shift) == 0 {
                return write!(f, "{}{suffix}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        xfer_cli_util::units::parse_size(s).map(Size)
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: a number of bytes, or a string like \"16M\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Settings {
    /// The built-in defaults: what the daemon does with no file and no flags.
    pub fn defaults() -> Self {
        Self {
            listen: Some("127.0.0.1:8888".into()),
            root: Some(".".into()),
            max_streams: Some(64),
            chunk_size: Some(Size(16 << 20)),
            max_memory: None,
            queue_timeout: Some(30),
            idle_timeout: Some(300),
            handshake_timeout: Some(10),
            max_transfers_per_conn: Some(64),
            max_conns_per_ip: Some(64),
            window: Some(2),
            read_only: Some(false),
            allow_delete: Some(false),
            direct_io: Some(true),
            token_file: None,
            allow_anonymous: Some(false),
            tls: None,
            state_dir: None,
            tls_cert: None,
            tls_key: None,
            copy_ca: None,
            log_level: Some("info".into()),
            metrics: None,
            sndbuf: None,
            rcvbuf: None,
            congestion: None,
            compress: Some("auto".into()),
        }
    }

    /// Parses the text of a configuration file.
    ///
    /// # Errors
    /// TOML syntax, a value of the wrong type, or an unknown key; the message names the key and
    /// its line.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| {
            let Some(span) = e.span() else {
                return anyhow::anyhow!("{}", e.message());
            };
            let start = span.start.min(text.len());
            let number = text[..start].matches('\n').count() + 1;
            let line = text.lines().nth(number - 1).unwrap_or_default().trim();
            anyhow::anyhow!("line {number} `{line}`: {}", e.message())
        })
    }

    /// Reads and parses a configuration file. Relative paths in it are taken relative to the
    /// file's directory.
    ///
    /// # Errors
    /// The file cannot be read, or [`Settings::parse`] fails.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration {}", path.display()))?;
        let mut s = Self::parse(&text)
            .with_context(|| format!("in the configuration {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut s.root,
            &mut s.token_file,
            &mut s.tls_cert,
            &mut s.tls_key,
            &mut s.copy_ca,
            &mut s.state_dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(s)
    }

    /// `self` with every key that `over` sets replaced by `over`'s value.
    pub fn overlay(self, over: Self) -> Self {
        Self {
            listen: over.listen.or(self.listen),
            root: over.root.or(self.root),
            max_streams: over.max_streams.or(self.max_streams),
            chunk_size: over.chunk_size.or(self.chunk_size),
            max_memory: over.max_memory.or(self.max_memory),
            queue_timeout: over.queue_timeout.or(self.queue_timeout),
            idle_timeout: over.idle_timeout.or(self.idle_timeout),
            handshake_timeout: over.handshake_timeout.or(self.handshake_timeout),
            max_transfers_per_conn: over.max_transfers_per_conn.or(self.max_transfers_per_conn),
            max_conns_per_ip: over.max_conns_per_ip.or(self.max_conns_per_ip),
            window: over.window.or(self.window),
            read_only: over.read_only.or(self.read_only),
            allow_delete: over.allow_delete.or(self.allow_delete),
            direct_io: over.direct_io.or(self.direct_io),
            token_file: over.token_file.or(self.token_file),
            allow_anonymous: over.allow_anonymous.or(self.allow_anonymous),
            tls: over.tls.or(self.tls),
            state_dir: over.state_dir.or(self.state_dir),
            tls_cert: over.tls_cert.or(self.tls_cert),
            tls_key: over.tls_key.or(self.tls_key),
            copy_ca: over.copy_ca.or(self.copy_ca),
            log_level: over.log_level.or(self.log_level),
            metrics: over.metrics.or(self.metrics),
            compress: over.compress.or(self.compress),
            sndbuf: over.sndbuf.or(self.sndbuf),
            rcvbuf: over.rcvbuf.or(self.rcvbuf),
            congestion: over.congestion.or(self.congestion),
        }
    }

    /// The effective settings: defaults, then the file, then the flags; with no `token_file`
    /// anywhere, the systemd credential `token` if the service manager passed one.
    pub fn effective(file: Self, flags: Self) -> Self {
        let mut s = Self::defaults().overlay(file).overlay(flags);
        if s.token_file.is_none() {
            s.token_file = credential_token_file();
        }
        s
    }

    /// Checks every value that can be checked without touching the system, naming the key (and
    /// its flag) at fault.
    ///
    /// # Errors
    /// The first value out of range, or an inconsistent combination.
    pub fn check(&self) -> anyhow::Result<()> {
        let chunk = self
            .chunk_size
            .unwrap_or(Size(u64::from(xfer_proto::MAX_CHUNK_SIZE)));
        let (min, max) = (xfer_proto::MIN_CHUNK_SIZE, xfer_proto::MAX_CHUNK_SIZE);
        if !(u64::from(min)..=u64::from(max)).contains(&chunk.0) {
            bail!("chunk_size (--chunk-size) must be between 4K and 16M, not {chunk}");
        }
        if let Some(compress) = &self.compress {
            if let Err(e) = xfer_cli_util::compress::parse_compression(compress) {
                bail!("compress (--compress): {e}");
            }
        }
        if self.max_streams == Some(0) {
            bail!("max_streams (--max-streams) must be at least 1");
        }
        if let Some(memory) = self.max_memory {
            let min = Size(crate::budget::MIN_MAX_MEMORY);
            if memory < min {
                bail!(
                    "max_memory (--max-memory) must be at least {min} (two of the largest \
                     frames a client may send: a 16M chunk and its header), not {memory}"
                );
            }
        }
        if self.max_conns_per_ip == Some(0) {
            bail!("max_conns_per_ip (--max-conns-per-ip) must be at least 1");
        }
        if let Some(w) = self.window {
            if !(1..=64).contains(&w) {
                bail!("window (--window) must be between 1 and 64, not {w}");
            }
        }
        if self.idle_timeout == Some(0) {
            bail!("idle_timeout (--idle-timeout) must be at least 1 second");
        }
        if self.handshake_timeout == Some(0) {
            bail!("handshake_timeout (--handshake-timeout) must be at least 1 second");
        }
        if self.max_transfers_per_conn == Some(0) {
            bail!("max_transfers_per_conn (--max-transfers-per-conn) must be at least 1");
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => bail!(
                "tls_cert (--tls-cert) is set but tls_key (--tls-key) is not: set both, or neither"
            ),
            (None, Some(_)) => bail!(
                "tls_key (--tls-key) is set but tls_cert (--tls-cert) is not: set both, or neither"
            ),
            _ => {}
        }
        if let Some(level) = &self.log_level {
            tracing_subscriber::EnvFilter::try_new(level).map_err(|e| {
                anyhow::anyhow!("log_level (--log-level) {level:?} is not a log filter: {e} (try info, debug, or xferd=debug)")
            })?;
        }
        if let Some(metrics) = &self.metrics {
            metrics.parse::<std::net::SocketAddr>().map_err(|_| {
                anyhow::anyhow!(
                    "metrics (--metrics) {metrics:?} is not an address like 127.0.0.1:9108"
                )
            })?;
        }
        Ok(())
    }

    /// Refuses to serve anyone who can reach `addr` unless a token is set or anonymous access was
    /// asked for explicitly.
    ///
    /// # Errors
    /// No token, not loopback, and no `allow_anonymous`.
    pub fn check_exposure(&self, addr: &str) -> anyhow::Result<()> {
        if self.token_file.is_none() && self.allow_anonymous != Some(true) && !is_loopback(addr) {
            bail!(
                "refusing to listen on {addr} without a token: set token_file (--token-file FILE), \
                 or allow_anonymous = true (--allow-anonymous) to serve anyone who can connect"
            );
        }
        Ok(())
    }

    /// The certificate clients see: `tls_cert`, else the one made in the state directory
    /// (`None` if not made yet).
    ///
    /// # Errors
    /// No state directory can be found.
    pub fn certificate(&self) -> anyhow::Result<Option<PathBuf>> {
        if let Some(cert) = &self.tls_cert {
            return Ok(Some(cert.clone()));
        }
        let dir = crate::identity::state_dir(self.state_dir.as_deref())?;
        let cert = dir.join(crate::identity::CERT_FILE);
        Ok(cert.exists().then_some(cert))
    }

    /// Builds the daemon's [`Config`]: reads the token, opens the root, loads the TLS identity.
    ///
    /// # Errors
    /// [`Settings::check`] fails, or a file named in the settings cannot be used.
    pub fn to_config(&self) -> anyhow::Result<Config> {
        self.check()?;
        let defaults = Self::defaults();
        let root = self.root.clone().or(defaults.root).unwrap_or_default();
        // Its error names the root already.
        let mut cfg = Config::new(root.clone())?;
        probe_openat2(&root)?;
        let get = |v: Option<u64>, d: Option<u64>| v.or(d).unwrap_or_default();
        cfg.max_streams = self.max_streams.or(defaults.max_streams).unwrap_or(64);
        cfg.max_connections = cfg.max_streams.saturating_mul(4).saturating_add(64);
        cfg.chunk_size = self
            .chunk_size
            .or(defaults.chunk_size)
            .map_or(0, |s| s.0 as u32);
        cfg.max_memory = self
            .max_memory
            .map_or_else(crate::budget::default_max_memory, |s| s.0);
        cfg.queue_timeout = Duration::from_secs(get(self.queue_timeout, defaults.queue_timeout));
        cfg.idle_timeout = Duration::from_secs(get(self.idle_timeout, defaults.idle_timeout));
        cfg.handshake_timeout =
            Duration::from_secs(get(self.handshake_timeout, defaults.handshake_timeout));
        cfg.max_transfers_per_conn = self
            .max_transfers_per_conn
            .or(defaults.max_transfers_per_conn)
            .unwrap_or(64);
        cfg.read_only = self.read_only.unwrap_or(false);
        cfg.allow_delete = self.allow_delete.unwrap_or(false);
        cfg.direct_io = self.direct_io.unwrap_or(true);
        cfg.compress = self
            .compress
            .as_deref()
            .map_or(Ok(xfer_net::Compression::Auto), |c| {
                xfer_cli_util::compress::parse_compression(c)
            })
            .map_err(anyhow::Error::msg)?;
        cfg.window = self.window.or(defaults.window).unwrap_or(2);
        cfg.max_per_address = self
            .max_conns_per_ip
            .or(defaults.max_conns_per_ip)
            .unwrap_or(64);
        if let Some(path) = &self.token_file {
            let token = xfer_cli_util::token::read_token_file(path).context("token_file")?;
            // Anyone who can connect gets a proof made with the token (the early challenge,
            // as a recorded handshake gives one too): a short token can be guessed offline.
            if token.len() < SHORT_TOKEN {
                tracing::warn!(
                    bytes = token.len(),
                    "the token is short enough to guess offline from a proof; make one with \
                     `head -c 32 /dev/urandom | base64`"
                );
            }
            cfg.token = Some(token.into());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            cfg.tls = Some(crate::Tls::from_pem_files(cert, key).context("tls_cert/tls_key")?);
        } else if self.tls == Some(true) {
            let dir = crate::identity::state_dir(self.state_dir.as_deref())?;
            let (cert, key) = crate::identity::load_or_create(&dir).context("state_dir")?;
            cfg.tls = Some(crate::Tls::from_pem_files(&cert, &key).context("state_dir")?);
        }
        if let Some(ca) = &self.copy_ca {
            cfg.copy_trust = Some(crate::CopyTrust::from_pem_file(ca).context("copy_ca")?);
        }
        cfg.socket = xfer_net::SocketOptions {
            sndbuf: self.sndbuf.map(|s| s.0),
            rcvbuf: self.rcvbuf.map(|s| s.0),
            congestion: self.congestion.clone(),
        };
        // On a socket of its own: an algorithm the kernel lacks or refuses us fails the start
        // (and --check-config), not every connection later.
        cfg.socket.check("sndbuf (--sndbuf)", "rcvbuf (--rcvbuf)")?;
        Ok(cfg)
    }

    /// The settings as a configuration file: every key that has a value, then the unset ones as
    /// comments. Prints the token file's path, never the token.
    pub fn render(&self) -> String {
        let mut out = toml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        if let Some(path) = &self.token_file {
            if credential_token_file().as_ref() == Some(path) {
                out.push_str(
                    "# token_file: the systemd credential \"token\" ($CREDENTIALS_DIRECTORY)\n",
                );
            }
            let state = match xfer_cli_util::token::read_token_file(path) {
                Ok(_) => "readable",
                Err(_) => "NOT readable",
            };
            out.push_str(&format!("# token: {state}, contents redacted\n"));
        }
        let unset = [
            ("token_file", self.token_file.is_none()),
            ("tls_cert", self.tls_cert.is_none()),
            ("tls_key", self.tls_key.is_none()),
            ("metrics", self.metrics.is_none()),
            ("sndbuf", self.sndbuf.is_none()),
            ("rcvbuf", self.rcvbuf.is_none()),
            ("congestion", self.congestion.is_none()),
        ];
        for (key, none) in unset {
            if none {
                out.push_str(&format!("# {key}: not set\n"));
            }
        }
        if self.copy_ca.is_none() {
            out.push_str("# copy_ca: not set (copies over TLS trust the system's CAs)\n");
        }
        if self.max_memory.is_none() {
            let default = Size(crate::budget::default_max_memory());
            out.push_str(&format!(
                "# max_memory: not set ({default}: a quarter of this machine's memory, at least 64M, at most 1G)\n"
            ));
        }
        out
    }
}

/// Checks that `openat2` works beneath `root`: every name is resolved with it, and a sandbox can
/// block it (systemd's `RestrictSUIDSGID=`, implied by `DynamicUser=`, answers `ENOSYS`).
///
/// # Errors
/// `openat2` is unavailable, or the root cannot be opened.
pub fn probe_openat2(root: &Path) -> anyhow::Result<()> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
    let dir = rustix::fs::open(root, flags, Mode::empty())
        .with_context(|| format!("root {}", root.display()))?;
    match rustix::fs::openat2(&dir, ".", flags, Mode::empty(), ResolveFlags::BENEATH) {
        Ok(_) => Ok(()),
        Err(rustix::io::Errno::NOSYS) => bail!(
            "openat2() is not available (ENOSYS), and xferd needs it to keep every name beneath \
             its root: it takes Linux 5.6 or later, and under systemd neither DynamicUser= nor \
             RestrictSUIDSGID= (their seccomp filter blocks openat2); the shipped xferd.service \
             sets neither"
        ),
        Err(e) => Err(std::io::Error::from(e))
            .with_context(|| format!("openat2 beneath the root {}", root.display())),
    }
}

/// `$CREDENTIALS_DIRECTORY/token`, if systemd passed that credential.
fn credential_token_file() -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let path = Path::new(&dir).join(TOKEN_CREDENTIAL);
    path.is_file().then_some(path)
}

/// True when every address `listen` names is a loopback address.
pub fn is_loopback(listen: &str) -> bool {
    use std::net::ToSocketAddrs;
    match listen.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_and_sizes_take_suffixes() {
        let s = Settings::parse(
            r#"
            listen = "0.0.0.0:9000"
            root = "/srv/data"
            max_streams = 8
            chunk_size = "4M"
            queue_timeout = 5
            idle_timeout = 60
            max_conns_per_ip = 4
            window = 4
            read_only = true
            token_file = "/etc/xferd/token"
            allow_anonymous = false
            tls_cert = "/etc/xferd/cert.pem"
            tls_key = "/etc/xferd/key.pem"
            copy_ca = "/etc/xferd/peers-ca.pem"
            log_level = "debug"
            metrics = "127.0.0.1:9108"
            sndbuf = "4M"
            rcvbuf = 8388608
            congestion = "reno"
            "#,
        )
        .unwrap();
        assert_eq!(s.chunk_size, Some(Size(4 << 20)));
        assert_eq!(
            (s.sndbuf, s.rcvbuf),
            (Some(Size(4 << 20)), Some(Size(8 << 20)))
        );
        assert_eq!(s.congestion.as_deref(), Some("reno"));
        assert_eq!(s.max_streams, Some(8));
        assert_eq!(s.read_only, Some(true));
        s.check().unwrap();
        assert_eq!(
            Settings::parse("chunk_size = 65536").unwrap().chunk_size,
            Some(Size(65536))
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = Settings::parse("max_stream = 8").unwrap_err().to_string();
        assert!(e.contains("max_stream"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
        let e = Settings::parse("max_streams = \"many\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_streams"), "{e}");
        let e = Settings::parse("chunk_size = \"4X\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("chunk_size"), "{e}");
    }

    #[test]
    fn relative_paths_in_a_file_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("xferd.toml");
        std::fs::write(
            &file,
            "root = \"data\"\ntoken_file = \"/etc/xferd/token\"\ncopy_ca = \"ca.pem\"\n",
        )
        .unwrap();
        let s = Settings::load(&file).unwrap();
        assert_eq!(s.root, Some(dir.path().join("data")));
        assert_eq!(s.copy_ca, Some(dir.path().join("ca.pem")));
        assert_eq!(s.token_file, Some(PathBuf::from("/etc/xferd/token")));
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let file = Settings::parse("max_streams = 8\nwindow = 4").unwrap();
        let flags = Settings {
            max_streams: Some(2),
            ..Settings::default()
        };
        let s = Settings::defaults().overlay(file).overlay(flags);
        assert_eq!(s.max_streams, Some(2));
        assert_eq!(s.window, Some(4));
        assert_eq!(s.idle_timeout, Some(300));
    }

    #[test]
    fn range_checks_name_key_and_flag() {
        let check = |text: &str| {
            Settings::parse(text)
                .unwrap()
                .check()
                .unwrap_err()
                .to_string()
        };
        assert!(check("chunk_size = \"32M\"").contains("chunk_size (--chunk-size)"));
        assert!(check("compress = \"fast\"").contains("compress (--compress)"));
        assert!(check("max_streams = 0").contains("max_streams"));
        assert!(check("window = 0").contains("window"));
        assert!(check("tls_cert = \"c.pem\"").contains("tls_key"));
        assert!(check("metrics = \"nowhere\"").contains("metrics"));
        assert!(check("log_level = \"[\"").contains("log_level"));
    }

    #[test]
    fn non_loopback_needs_a_token_or_anonymous() {
        let s = Settings::defaults();
        s.check_exposure("127.0.0.1:8888").unwrap();
        let e = s.check_exposure("0.0.0.0:8888").unwrap_err().to_string();
        assert!(e.contains("token_file"), "{e}");
        let anon = Settings {
            allow_anonymous: Some(true),
            ..Settings::defaults()
        };
        anon.check_exposure("0.0.0.0:8888").unwrap();
    }

    #[test]
    fn render_round_trips_and_never_prints_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "hunter2-very-secret\n").unwrap();
        let s = Settings {
            token_file: Some(token),
            ..Settings::defaults()
        };
        let text = s.render();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("contents redacted"), "{text}");
        assert!(text.contains("chunk_size = \"16M\""), "{text}");
        assert_eq!(Settings::parse(&text).unwrap(), s);
    }

    #[test]
    fn to_config_applies_every_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Settings {
            root: Some(dir.path().to_path_buf()),
            max_streams: Some(3),
            chunk_size: Some(Size(1 << 20)),
            read_only: Some(true),
            direct_io: Some(false),
            window: Some(5),
            ..Settings::defaults()
        };
        let cfg = s.to_config().unwrap();
        assert_eq!(cfg.max_streams, 3);
        assert_eq!(cfg.chunk_size, 1 << 20);
        assert!(cfg.read_only);
        assert!(!cfg.direct_io);
        assert_eq!(cfg.window, 5);
        assert!(cfg.token.is_none());
        let bad = Settings {
            congestion: Some("nosuchcc".into()),
            ..s
        };
        let e = format!("{:#}", bad.to_config().unwrap_err());
        assert!(
            e.contains("congestion control \"nosuchcc\" is not available here"),
            "{e}"
        );
    }
}
