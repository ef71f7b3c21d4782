//! The client's defaults file, `$XDG_CONFIG_HOME/xfer/config.toml` (`~/.config/xfer/config.toml`
//! when `XDG_CONFIG_HOME` is unset): default `-c` and `--chunk-size`, and a token file per
//! server. Flags override it; a missing file is no error, an unknown key is.
//!
//! ```toml
//! connections = 8
//! chunk_size = "8M"
//! compress = "auto"
//!
//! [hosts."backup:8888"]
//! token_file = "~/.config/xfer/backup.token"
//! ```
//!
//! Relative `token_file` paths are relative to the file's directory, and `~/` is the home
//! directory. A host's token is used when neither `--token-file` nor `XFER_TOKEN` gives one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use xfer_client::Target;

/// What the defaults file holds.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientConfig {
    /// Default for `-c/--connections`.
    pub(crate) connections: Option<usize>,
    /// Default for `--chunk-size`: bytes, or a string like `"8M"`.
    #[serde(default, deserialize_with = "size_text")]
    pub(crate) chunk_size: Option<String>,
    /// Default for `--compress`: `"auto"`, `"off"` or a level such as `"3"`.
    pub(crate) compress: Option<String>,
    /// Settings per server, keyed `"HOST:PORT"` (the port may be left out for 8888).
    #[serde(default)]
    pub(crate) hosts: BTreeMap<String, HostConfig>,
}

/// Settings for one server.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HostConfig {
    /// File holding this server's token.
    pub(crate) token_file: Option<PathBuf>,
}

/// A size written as a number or a string, kept as the string a flag would take.
fn size_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    let text = match Raw::deserialize(d) {
        Ok(Raw::Bytes(n)) => n.to_string(),
        Ok(Raw::Text(t)) => t,
        Err(_) => {
            return Err(serde::de::Error::custom(
                "expected a size: a number of bytes or a string like \"8M\"",
            ))
        }
    };
    xfer_cli_util::units::parse_size(&text).map_err(serde::de::Error::custom)?;
    Ok(Some(text))
}

impl ClientConfig {
    /// Where the file is: `$XDG_CONFIG_HOME/xfer/config.toml`, else
    /// `$HOME/.config/xfer/config.toml`; `None` without either variable.
    pub(crate) fn path() -> Option<PathBuf> {
        path_from(
            std::env::var_os("XDG_CONFIG_HOME"),
            std::env::var_os("HOME"),
        )
    }

    /// Reads the file at [`ClientConfig::path`]; an absent file gives the empty configuration.
    ///
    /// # Errors
    /// The file exists but cannot be read, or [`ClientConfig::parse`] rejects it.
    pub(crate) fn load() -> anyhow::Result<Self> {
        match Self::path() {
            Some(path) => Self::load_from(&path),
            None => Ok(Self::default()),
        }
    }

    /// Reads one file; an absent file gives the empty configuration.
    ///
    /// # Errors
    /// The file exists but cannot be read, or [`ClientConfig::parse`] rejects it.
    pub(crate) fn load_from(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut config = Self::parse(&text)
            .with_context(|| format!("{} (fix the key named, or remove it)", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for host in config.hosts.values_mut() {
            if let Some(file) = host.token_file.take() {
                host.token_file = Some(resolve(dir, &file));
            }
        }
        Ok(config)
    }

    /// Parses the file's text.
    ///
    /// # Errors
    /// TOML syntax, a value of the wrong type, an unknown key, a host key that is not
    /// `HOST[:PORT]`, or `connections` out of range; the message names the key.
    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        if let Some(c) = &config.compress {
            if let Err(e) = xfer_cli_util::compress::parse_compression(c) {
                bail!("compress: {e}");
            }
        }
        if let Some(c) = config.connections {
            if !(1..=128).contains(&c) {
                bail!("connections must be between 1 and 128, not {c}");
            }
        }
        for key in config.hosts.keys() {
            if key.parse::<Target>().is_err() {
                bail!(
                    "[hosts.{key:?}]: the key must be \"HOST:PORT\", e.g. [hosts.\"backup:8888\"]"
                );
            }
        }
        Ok(config)
    }

    /// The token file configured for `host` (as given on the command line, `HOST[:PORT]`).
    pub(crate) fn token_file_for(&self, host: &str) -> Option<PathBuf> {
        let want: Target = host.parse().ok()?;
        self.hosts.iter().find_map(|(key, cfg)| {
            let have: Target = key.parse().ok()?;
            let same = have.port == want.port && have.host.eq_ignore_ascii_case(&want.host);
            if same {
                cfg.token_file.clone()
            } else {
                None
            }
        })
    }

    /// `cmd` with the file's `connections` and `chunk_size` as the defaults of every subcommand
    /// that takes them, so that flags still override them and `--help` shows them.
    pub(crate) fn apply_defaults(&self, mut cmd: clap::Command) -> clap::Command {
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        let defaults = [
            ("connections", self.connections.map(|c| c.to_string())),
            ("chunk_size", self.chunk_size.clone()),
            ("compress", self.compress.clone()),
        ];
        for name in names {
            cmd = cmd.mut_subcommand(name, |mut sub| {
                for (id, value) in &defaults {
                    let Some(value) = value else { continue };
                    if sub.get_arguments().any(|a| a.get_id() == id) {
                        sub = sub.mut_arg(id, |a| a.default_value(value.clone()));
                    }
                }
                sub
            });
        }
        cmd
    }

    /// Parses the command line of `P` with this file's defaults applied; exits on a usage error,
    /// like [`clap::Parser::parse`].
    pub(crate) fn parse_args<P: clap::Parser>(&self) -> P {
        let matches = self.apply_defaults(P::command()).get_matches();
        P::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// A TOML error on one line, with the line it is about (which names the key).
pub(crate) fn toml_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    let Some(span) = e.span() else {
        return anyhow::anyhow!("{}", e.message());
    };
    let start = span.start.min(text.len());
    let number = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(number - 1).unwrap_or_default().trim();
    anyhow::anyhow!("line {number} `{line}`: {}", e.message())
}

/// The file's path given `XDG_CONFIG_HOME` and `HOME`.
fn path_from(xdg: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let base = match xdg {
        // The XDG base directory spec says to ignore a relative value.
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        _ => Path::new(&home?).join(".config"),
    };
    Some(base.join("xfer").join("config.toml"))
}

/// `~/x` under the home directory, a relative path under `dir`, an absolute one as it is.
fn resolve(dir: &Path, file: &Path) -> PathBuf {
    if let Ok(rest) = file.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME") {
            return Path::new(&home).join(rest);
        }
    }
    dir.join(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_is_checked_and_becomes_the_flag_default() {
        let config = ClientConfig::parse("compress = \"3\"").unwrap();
        assert_eq!(config.compress.as_deref(), Some("3"));
        let err = ClientConfig::parse("compress = \"fast\"").unwrap_err();
        assert!(err.to_string().contains("compress"), "{err}");
    }

    #[test]
    fn full_file_parses() {
        let c = ClientConfig::parse(
            r#"
            connections = 8
            chunk_size = "8M"
            [hosts."backup:9000"]
            token_file = "/etc/xfer/backup.token"
            [hosts."[::1]"]
            token_file = "local.token"
            "#,
        )
        .unwrap();
        assert_eq!(c.connections, Some(8));
        assert_eq!(c.chunk_size.as_deref(), Some("8M"));
        assert_eq!(
            c.token_file_for("BACKUP:9000"),
            Some(PathBuf::from("/etc/xfer/backup.token"))
        );
        assert_eq!(
            c.token_file_for("backup"),
            None,
            "port 8888 is another server"
        );
        assert_eq!(
            c.token_file_for("[::1]:8888"),
            Some(PathBuf::from("local.token"))
        );
        assert_eq!(
            ClientConfig::parse("chunk_size = 65536")
                .unwrap()
                .chunk_size
                .as_deref(),
            Some("65536")
        );
    }

    #[test]
    fn errors_name_the_key() {
        let err = |t: &str| ClientConfig::parse(t).unwrap_err().to_string();
        assert!(err("conections = 3").contains("conections"));
        assert!(err("connections = 0").contains("connections"));
        assert!(err("chunk_size = \"8X\"").contains("chunk_size"));
        assert!(err("[hosts.\"h:port\"]").contains("h:port"));
        assert!(err("[hosts.\"h:1\"]\ntoken = \"x\"").contains("token"));
    }

    #[test]
    fn missing_file_is_empty_and_paths_resolve_beside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        assert_eq!(
            ClientConfig::load_from(&path).unwrap(),
            ClientConfig::default()
        );
        std::fs::write(&path, "[hosts.\"h:1\"]\ntoken_file = \"t\"\n").unwrap();
        let c = ClientConfig::load_from(&path).unwrap();
        assert_eq!(c.token_file_for("h:1"), Some(dir.path().join("t")));
    }

    #[test]
    fn defaults_apply_to_subcommands_and_flags_win() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: Cmd,
        }
        #[derive(Debug, clap::Subcommand)]
        enum Cmd {
            Send {
                #[arg(short = 'c', long, default_value_t = 4)]
                connections: usize,
                #[arg(long, default_value = "4M")]
                chunk_size: String,
            },
            Ls,
        }
        let c = ClientConfig::parse("connections = 8\nchunk_size = \"1M\"").unwrap();
        let parse = |args: &[&str]| {
            let m = c.apply_defaults(<Cli as clap::CommandFactory>::command());
            let m = m.try_get_matches_from(args).unwrap();
            <Cli as clap::FromArgMatches>::from_arg_matches(&m).unwrap()
        };
        match parse(&["xfer", "send"]).cmd {
            Cmd::Send {
                connections,
                chunk_size,
            } => assert_eq!((connections, chunk_size.as_str()), (8, "1M")),
            Cmd::Ls => unreachable!(),
        }
        match parse(&["xfer", "send", "-c", "2"]).cmd {
            Cmd::Send { connections, .. } => assert_eq!(connections, 2),
            Cmd::Ls => unreachable!(),
        }
        assert!(matches!(parse(&["xfer", "ls"]).cmd, Cmd::Ls));
    }

    #[test]
    fn xdg_config_home_is_respected() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        let at = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            path_from(os("/x"), os("/home/u")),
            at("/x/xfer/config.toml")
        );
        assert_eq!(
            path_from(None, os("/home/u")),
            at("/home/u/.config/xfer/config.toml")
        );
        assert_eq!(
            path_from(os("relative"), os("/home/u")),
            at("/home/u/.config/xfer/config.toml")
        );
        assert_eq!(path_from(None, None), None);
    }
}
