//! The `xfer` command line: its commands and flags (clap), and the library options they give.
//! The help text here is a contract; keep it as it is.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use xfer_client::trust::{FirstUse, KnownHosts, PeerTls, Trust};
use xfer_client::{Connector, Options};

use crate::mirror_args::MirrorArgs;
use crate::output;

/// Move files to and from an xferd over several TCP connections, resuming where it stopped.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Examples:\n  xfer send big.iso backup\n  xfer recv big.iso backup -o /data/\n  xfer ls backup\n  xfer completions bash > /etc/bash_completion.d/xfer\n\nDefaults for -c, --chunk-size and per-host token files: ~/.config/xfer/config.toml."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Upload FILE to the server's root.
    #[command(
        after_help = "Examples:\n  xfer send big.iso backup-host\n  xfer send -c 8 --as images/big.iso big.iso 10.0.0.2:9000"
    )]
    Send {
        #[command(flatten)]
        common: Common,
        /// Name to store it under (default: FILE's base name); may contain `/`.
        #[arg(long = "as", value_name = "NAME", value_parser = wire_name())]
        as_name: Option<String>,
        /// Local file to send.
        file: PathBuf,
        /// Server, HOST[:PORT] (default port 8888).
        host: String,
    },
    /// Download NAME from the server's root.
    #[command(
        after_help = "Examples:\n  xfer recv big.iso backup-host\n  xfer recv -c 8 -o /data/big.iso images/big.iso 10.0.0.2:9000"
    )]
    Recv {
        #[command(flatten)]
        common: Common,
        /// Where to write it (default: NAME's base name in the current directory).
        #[arg(short = 'o', value_name = "PATH")]
        output: Option<PathBuf>,
        /// Write through the page cache and leave it there, so a reader right after reads from
        /// memory [default: around the cache, where the filesystem offers direct I/O].
        #[arg(long)]
        no_direct_io: bool,
        /// Name on the server.
        #[arg(value_parser = wire_name())]
        name: String,
        /// Server, HOST[:PORT] (default port 8888).
        host: String,
    },
    /// Copy a file or tree from one daemon straight to another; the data does not pass here.
    #[command(
        after_help = "Examples:\n  xfer copy src-host:data/big.iso dst-host:backups/big.iso\n  xfer copy -r --src-token-file a.tok --dst-token-file b.tok src:9000:photos dst:9000\n  xfer copy --tls --ca ca.pem src:data/big.iso dst:backups/big.iso\n  xfer copy --from-list copies.txt --jobs 4   # lines: SRC_HOST[:PORT]:NAME DST_HOST[:PORT][:DEST]"
    )]
    Copy(CopyArgs),
    /// List a directory on the server: SIZE, MTIME (UTC) and NAME, tab-separated.
    Ls {
        /// Print one JSON array instead.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        auth: TokenArgs,
        /// Server, HOST[:PORT] (default port 8888).
        host: String,
        /// Directory under the server's root (default: the root).
        #[arg(value_parser = wire_name())]
        dir: Option<String>,
    },
    /// Print a shell completion script on stdout.
    #[command(
        after_help = "Examples:\n  xfer completions bash > /etc/bash_completion.d/xfer\n  xfer completions zsh > ~/.zfunc/_xfer\n  xfer completions fish > ~/.config/fish/completions/xfer.fish"
    )]
    Completions {
        /// Shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout: xfer(1), or xfer-COMMAND(1) for one command.
    #[command(after_help = "Examples:\n  xfer man | man -l -\n  xfer man send > xfer-send.1")]
    Man {
        /// A command (send, recv, ls, ...) for its own page.
        command: Option<String>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct CopyArgs {
    /// Parallel TCP connections from the source to the destination, per copy.
    #[arg(short = 'c', long = "connections", default_value_t = 4)]
    pub(crate) connections: usize,
    /// Chunk size (K, M, G suffixes).
    #[arg(long, default_value = "4M")]
    pub(crate) chunk_size: String,
    /// Compress chunks with zstd: auto (where it raises throughput, judged from what the
    /// transfer measures), off, or a level 1-19 for every chunk that shrinks [default: auto;
    /// downloads and copies: the daemon's setting].
    #[arg(long, value_name = "auto|off|LEVEL", value_parser = xfer_cli_util::compress::parse_compression)]
    pub(crate) compress: Option<xfer_net::Compression>,
    /// Copy a whole directory tree.
    #[arg(short = 'r', long)]
    pub(crate) recursive: bool,
    /// File holding the source daemon's token (default: XFER_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub(crate) src_token_file: Option<PathBuf>,
    /// File holding the destination daemon's token: the source gets a grant derived from it,
    /// valid for writing the destination name only, for 24 hours.
    #[arg(long, value_name = "FILE")]
    pub(crate) dst_token_file: Option<PathBuf>,
    /// Run the copies listed in FILE, one `SRC DST` pair per line (# comments).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["src", "dst"])]
    pub(crate) from_list: Option<PathBuf>,
    /// Copies from --from-list run at once.
    #[arg(long, default_value_t = 4)]
    pub(crate) jobs: usize,
    /// Insist on TLS on both legs (without it, each leg runs over TLS whenever its daemon
    /// serves TLS). The source daemon checks the destination by the fingerprint pinned here in
    /// known_hosts, else against its own --copy-ca.
    #[arg(long)]
    pub(crate) tls: bool,
    /// PEM file of CA certificates to trust for the source daemon (default: the system's;
    /// else its fingerprint pinned in ~/.config/xfer/known_hosts).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// Trust the source daemon's certificate the first time without asking, and pin it.
    #[arg(long)]
    pub(crate) accept_new: bool,
    /// Have the source send only what changed against the file the destination holds under
    /// the name [default: the source daemon decides, as `xfer send` does].
    #[arg(long, conflicts_with = "whole_file")]
    pub(crate) delta: bool,
    /// Have the source send the whole file even where it would try a delta.
    #[arg(long)]
    pub(crate) whole_file: bool,
    /// Say on stderr which way each single-file copy went (delta or whole file) and why, as
    /// the source daemon chose (XFER_LOG overrides).
    #[arg(short = 'v', long)]
    pub(crate) verbose: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    pub(crate) quiet: bool,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) keep: KeepArgs,
    #[command(flatten)]
    pub(crate) mirror: MirrorArgs,
    /// Source, SRC_HOST[:PORT]:NAME.
    #[arg(required_unless_present = "from_list")]
    pub(crate) src: Option<String>,
    /// Destination, DST_HOST[:PORT][:DEST] (DEST defaults to NAME).
    #[arg(required_unless_present = "from_list")]
    pub(crate) dst: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct Common {
    /// Parallel TCP connections [default: adaptive: 4, doubled while throughput grows, up to
    /// --max-connections].
    #[arg(short = 'c', long = "connections")]
    pub(crate) connections: Option<usize>,
    /// Without -c: the most connections the adaptive pool may grow to [default: 64].
    #[arg(long, value_name = "N", conflicts_with = "connections")]
    pub(crate) max_connections: Option<usize>,
    /// Log what the transfer does on stderr: whether a file goes as a delta or whole and why,
    /// reconnects, socket options, the pool growing with the throughput it measured (XFER_LOG
    /// overrides).
    #[arg(short = 'v', long)]
    pub(crate) verbose: bool,
    /// Chunk size (K, M, G suffixes).
    #[arg(long, default_value = "4M")]
    pub(crate) chunk_size: String,
    /// Compress chunks with zstd: auto (where it raises throughput, judged from what the
    /// transfer measures), off, or a level 1-19 for every chunk that shrinks [default: auto;
    /// downloads and copies: the daemon's setting].
    #[arg(long, value_name = "auto|off|LEVEL", value_parser = xfer_cli_util::compress::parse_compression)]
    pub(crate) compress: Option<xfer_net::Compression>,
    /// Limit the rate to RATE bytes per second across all connections (K, M, G suffixes).
    #[arg(long, value_name = "RATE")]
    pub(crate) bwlimit: Option<String>,
    /// Send buffer (SO_SNDBUF) of every connection, K, M, G suffixes; the kernel caps it at
    /// net.core.wmem_max [default: the kernel's, autotuned].
    #[arg(long, value_name = "SIZE")]
    pub(crate) sndbuf: Option<String>,
    /// Receive buffer (SO_RCVBUF) of every connection, K, M, G suffixes; the kernel caps it at
    /// net.core.rmem_max [default: the kernel's, autotuned].
    #[arg(long, value_name = "SIZE")]
    pub(crate) rcvbuf: Option<String>,
    /// TCP congestion control of every connection, e.g. bbr or cubic (see
    /// /proc/sys/net/ipv4/tcp_available_congestion_control) [default: the system's].
    #[arg(long, value_name = "NAME")]
    pub(crate) congestion: Option<String>,
    /// Without --congestion: the congestion control of the connections on a long path (round
    /// trip of --long-path-rtt or more), if the kernel allows it; `system` keeps the system's.
    #[arg(long, value_name = "NAME", default_value = xfer_client::engine::LONG_PATH_CONGESTION)]
    pub(crate) long_path_congestion: String,
    /// Round-trip time in milliseconds from which a path counts as long for
    /// --long-path-congestion.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    pub(crate) long_path_rtt: u64,
    /// Seconds to keep reconnecting after the connection drops before giving up.
    #[arg(long, default_value_t = 60)]
    pub(crate) retry_deadline: u64,
    /// Send only what changed against the file the daemon holds under the name [default: only
    /// on a slow path: a round trip of 10 ms or more, or --bwlimit below 256M].
    #[arg(long, conflicts_with = "whole_file")]
    pub(crate) delta: bool,
    /// Send the whole file even where a delta would be tried.
    #[arg(long)]
    pub(crate) whole_file: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    pub(crate) quiet: bool,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    pub(crate) json: bool,
    /// Copy a whole directory tree (FILE or NAME is a directory).
    #[arg(short = 'r', long)]
    pub(crate) recursive: bool,
    /// With -r: compare file contents (whole-file digests) instead of size and mtime.
    #[arg(long, requires = "recursive")]
    pub(crate) checksum: bool,
    #[command(flatten)]
    pub(crate) keep: KeepArgs,
    #[command(flatten)]
    pub(crate) auth: TokenArgs,
    #[command(flatten)]
    pub(crate) mirror: MirrorArgs,
}

/// What a tree copy keeps (`-r`): everything `rsync -aHAX` keeps unless told otherwise.
#[derive(Debug, Args)]
pub(crate) struct KeepArgs {
    /// With -r: keep owners and groups as numbers instead of mapping them by name.
    #[arg(long)]
    numeric_ids: bool,
    /// With -r: leave out symlinks that are absolute or lead out of the tree (by default
    /// links are copied as they are, whatever they point at).
    #[arg(long)]
    safe_links: bool,
    /// With -r: leave out extended attributes and ACLs.
    #[arg(long)]
    no_xattrs: bool,
    /// With -r: copy devices and special files (FIFOs, sockets); same as --devices --specials.
    /// Devices need a privileged receiver.
    #[arg(short = 'D')]
    devices_and_specials: bool,
    /// With -r: copy device files (needs a privileged receiver).
    #[arg(long)]
    devices: bool,
    /// With -r: copy FIFOs and sockets.
    #[arg(long)]
    specials: bool,
}

impl KeepArgs {
    /// The tree options these flags ask for.
    pub(crate) fn options(&self) -> xfer_client::TreeOptions {
        xfer_client::TreeOptions {
            numeric_ids: self.numeric_ids,
            safe_links: self.safe_links,
            xattrs: !self.no_xattrs,
            devices: self.devices_and_specials || self.devices,
            specials: self.devices_and_specials || self.specials,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    /// File holding the server's token (default: the XFER_TOKEN environment variable).
    #[arg(long, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// Run every connection over TLS, never plain TCP (a daemon with a certificate gets TLS
    /// without this flag).
    #[arg(long)]
    pub(crate) tls: bool,
    /// PEM file of CA certificates to trust (default: the system's; a daemon they do not vouch
    /// for is trusted by its fingerprint, pinned in ~/.config/xfer/known_hosts).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// Trust a daemon's certificate the first time without asking, and pin it in known_hosts
    /// (for scripts; a changed certificate is still refused).
    #[arg(long)]
    pub(crate) accept_new: bool,
}

impl TokenArgs {
    /// The token and TLS settings these flags give, for every connection.
    pub(crate) fn connector(&self) -> anyhow::Result<Connector> {
        Ok(Connector {
            token: self.token()?,
            trust: Some(Arc::new(PeerTls::new(self.trust()?))),
            tls_required: self.tls,
            zero_rtt: Some(Arc::new(xfer_client::zero_rtt::ZeroRttMemory::at(
                xfer_client::zero_rtt::ZeroRttMemory::default_path(),
            ))),
            ..Connector::default()
        })
    }

    /// Whom to trust: `--ca` or the system's CAs, the pins in known_hosts, and on a first
    /// meeting `--accept-new`, a question on the terminal, or a refusal saying what to do.
    pub(crate) fn trust(&self) -> anyhow::Result<Trust> {
        use std::io::IsTerminal;
        let known_hosts = KnownHosts::default_path().map(KnownHosts::at);
        let first_use = if self.accept_new {
            FirstUse::Accept
        } else if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
            let file = known_hosts.as_ref().map(|k| k.path().display().to_string());
            FirstUse::Ask(Arc::new(move |peer: &str, fingerprint: &str| {
                output::ask_first_use(peer, fingerprint, file.as_deref())
            }))
        } else {
            FirstUse::Refuse
        };
        Ok(Trust {
            roots: Trust::roots(self.ca.as_deref())?,
            known_hosts,
            first_use,
            pinned: None,
        })
    }

    fn token(&self) -> anyhow::Result<Option<Arc<[u8]>>> {
        if let Some(path) = &self.token_file {
            return Ok(Some(xfer_cli_util::token::read_token_file(path)?.into()));
        }
        use std::os::unix::ffi::OsStrExt;
        match std::env::var_os("XFER_TOKEN") {
            Some(v) if !xfer_cli_util::token::trim_token(v.as_bytes()).is_empty() => {
                Ok(Some(xfer_cli_util::token::trim_token(v.as_bytes()).into()))
            }
            Some(v) if !v.is_empty() => bail!("XFER_TOKEN is blank"),
            _ => Ok(None),
        }
    }
}

impl Common {
    /// The transfer options these flags give.
    pub(crate) fn options(&self) -> anyhow::Result<Options> {
        let parse = |s: &str| xfer_cli_util::units::parse_size(s).map_err(anyhow::Error::msg);
        let chunk = parse(&self.chunk_size)?;
        let (min, max) = (xfer_proto::MIN_CHUNK_SIZE, xfer_proto::MAX_CHUNK_SIZE);
        if !(u64::from(min)..=u64::from(max)).contains(&chunk) {
            bail!("--chunk-size must be between 4K and 16M");
        }
        let connections = match (self.max_connections, self.connections) {
            // A -c from the defaults file yields to an explicit --max-connections.
            (Some(max), _) => {
                if !(1..=128).contains(&max) {
                    bail!("--max-connections must be between 1 and 128");
                }
                xfer_client::Connections::Adaptive { max }
            }
            (None, Some(n)) => {
                if !(1..=128).contains(&n) {
                    bail!("-c must be between 1 and 128");
                }
                xfer_client::Connections::Fixed(n)
            }
            (None, None) => xfer_client::Connections::Adaptive {
                max: xfer_client::engine::ADAPTIVE_MAX,
            },
        };
        let bwlimit = self.bwlimit.as_deref().map(parse).transpose()?;
        if bwlimit == Some(0) {
            bail!("--bwlimit must be above 0");
        }
        let socket = xfer_net::SocketOptions {
            sndbuf: self.sndbuf.as_deref().map(parse).transpose()?,
            rcvbuf: self.rcvbuf.as_deref().map(parse).transpose()?,
            congestion: self.congestion.clone(),
        };
        // An algorithm that cannot be had is an error now, not a silent fallback later.
        socket.check("--sndbuf", "--rcvbuf")?;
        let mut connector = self.auth.connector()?;
        connector.socket = socket;
        connector.compress = self.compress;
        let progress = output::transfer_bar(self.quiet);
        Ok(Options {
            connections,
            chunk_size: chunk as u32,
            bwlimit,
            retry_deadline: Duration::from_secs(self.retry_deadline),
            progress,
            connector,
            keep: self.keep.options(),
            delta: match (self.delta, self.whole_file) {
                (true, _) => xfer_client::engine::DeltaMode::Always,
                (_, true) => xfer_client::engine::DeltaMode::Never,
                _ => xfer_client::engine::DeltaMode::Auto,
            },
            long_path_congestion: (self.long_path_congestion != "system").then(|| {
                xfer_client::engine::LongPathCongestion {
                    name: self.long_path_congestion.clone(),
                    rtt: Duration::from_millis(self.long_path_rtt),
                }
            }),
        })
    }
}

impl Common {
    /// Where this command's summary goes.
    pub(crate) fn report(&self) -> output::Report {
        output::Report {
            json: self.json,
            quiet: self.quiet,
        }
    }
}

/// A name on the server as given on the command line: any bytes, those that are not UTF-8
/// escaped as they travel (proto.md §8.5).
fn wire_name() -> impl clap::builder::TypedValueParser<Value = String> {
    use clap::builder::TypedValueParser;
    use std::os::unix::ffi::OsStrExt;
    clap::builder::OsStringValueParser::new()
        .map(|name| xfer_proto::names::escape(name.as_bytes()).into_owned())
}
