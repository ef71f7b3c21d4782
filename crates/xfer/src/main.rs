//! `xfer`: command line around the client library. Errors end as one line `xfer: <cause>`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use xfer::{Options, Summary, Target};

/// Move files to and from an xferd over several TCP connections, resuming where it stopped.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Upload FILE to the server's root.
    #[command(
        after_help = "Examples:\n  xfer send big.iso backup-host\n  xfer send -c 8 --as images/big.iso big.iso 10.0.0.2:9000"
    )]
    Send {
        #[command(flatten)]
        common: Common,
        /// Name to store it under (default: FILE's base name); may contain `/`.
        #[arg(long = "as", value_name = "NAME")]
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
        /// Name on the server.
        name: String,
        /// Server, HOST[:PORT] (default port 8888).
        host: String,
    },
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
        dir: Option<String>,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Parallel TCP connections.
    #[arg(short = 'c', long = "connections", default_value_t = 4)]
    connections: usize,
    /// Chunk size (K, M, G suffixes).
    #[arg(long, default_value = "4M")]
    chunk_size: String,
    /// Limit the rate to RATE bytes per second across all connections (K, M, G suffixes).
    #[arg(long, value_name = "RATE")]
    bwlimit: Option<String>,
    /// Seconds to keep reconnecting after the connection drops before giving up.
    #[arg(long, default_value_t = 60)]
    retry_deadline: u64,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    auth: TokenArgs,
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// File holding the server's token (default: the XFER_TOKEN environment variable).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Run every connection over TLS (the server needs --tls-cert).
    #[arg(long)]
    tls: bool,
    /// PEM file of CA certificates to trust for --tls (default: the system's).
    #[arg(long, value_name = "FILE", requires = "tls")]
    ca: Option<PathBuf>,
}

impl TokenArgs {
    fn connector(&self) -> anyhow::Result<xfer::Connector> {
        let tls = if self.tls {
            Some(xfer::Connector::tls(self.ca.as_deref())?)
        } else {
            None
        };
        Ok(xfer::Connector {
            token: self.token()?,
            tls,
        })
    }

    fn token(&self) -> anyhow::Result<Option<Arc<[u8]>>> {
        if let Some(path) = &self.token_file {
            return Ok(Some(xfer_core::token::read_token_file(path)?.into()));
        }
        use std::os::unix::ffi::OsStrExt;
        match std::env::var_os("XFER_TOKEN") {
            Some(v) if !xfer_core::token::trim_token(v.as_bytes()).is_empty() => {
                Ok(Some(xfer_core::token::trim_token(v.as_bytes()).into()))
            }
            Some(v) if !v.is_empty() => bail!("XFER_TOKEN is blank"),
            _ => Ok(None),
        }
    }
}

impl Common {
    fn options(&self) -> anyhow::Result<Options> {
        let parse = |s: &str| xfer_core::units::parse_size(s).map_err(anyhow::Error::msg);
        let chunk = parse(&self.chunk_size)?;
        let (min, max) = (xfer_proto::MIN_CHUNK_SIZE, xfer_proto::MAX_CHUNK_SIZE);
        if !(u64::from(min)..=u64::from(max)).contains(&chunk) {
            bail!("--chunk-size must be between 4K and 16M");
        }
        if !(1..=128).contains(&self.connections) {
            bail!("-c must be between 1 and 128");
        }
        let bwlimit = self.bwlimit.as_deref().map(parse).transpose()?;
        if bwlimit == Some(0) {
            bail!("--bwlimit must be above 0");
        }
        let progress = if !self.quiet && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        Ok(Options {
            connections: self.connections,
            chunk_size: chunk as u32,
            bwlimit,
            retry_deadline: Duration::from_secs(self.retry_deadline),
            progress,
            connector: self.auth.connector()?,
        })
    }

    fn report(&self, verb: &str, summary: &Summary) -> anyhow::Result<()> {
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, summary)?;
            writeln!(out)?;
        } else if !self.quiet && std::io::stderr().is_terminal() {
            eprintln!(
                "{verb} {} ({} bytes, {} resumed) in {:.2} s, {:.1} MiB/s",
                summary.name,
                summary.bytes_total,
                summary.resumed_bytes,
                summary.seconds,
                summary.mbytes_per_sec
            );
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XFER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the cause chain joined, newlines flattened.
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("xfer: {line}");
            ExitCode::FAILURE
        }
    }
}

fn base_name(name: &str) -> anyhow::Result<&str> {
    name.rsplit('/')
        .find(|s| !s.is_empty())
        .with_context(|| format!("bad name {name:?}"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    match cli.command {
        Command::Send {
            common,
            as_name,
            file,
            host,
        } => {
            let target: Target = host.parse()?;
            let name = match as_name {
                Some(n) => n,
                None => file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("cannot derive a name from {}", file.display()))?
                    .to_string(),
            };
            let opts = common.options()?;
            let summary = runtime.block_on(xfer::send(&file, &target, &name, &opts))?;
            common.report("sent", &summary)
        }
        Command::Recv {
            common,
            output,
            name,
            host,
        } => {
            let target: Target = host.parse()?;
            let leaf = base_name(&name)?;
            let dest = match output {
                Some(p) if p.is_dir() => p.join(leaf),
                Some(p) => p,
                None => Path::new(leaf).to_path_buf(),
            };
            let opts = common.options()?;
            let summary = runtime.block_on(xfer::recv(&target, &name, &dest, &opts))?;
            common.report("received", &summary)
        }
        Command::Ls {
            json,
            auth,
            host,
            dir,
        } => {
            let target: Target = host.parse()?;
            let connector = auth.connector()?;
            let dir = dir.as_deref().unwrap_or("");
            let entries = runtime.block_on(xfer::list(&target, dir, &connector))?;
            let mut out = std::io::stdout().lock();
            if json {
                let list: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "name": e.name, "size": e.size, "mtime_ns": e.mtime_ns, "is_dir": e.is_dir
                        })
                    })
                    .collect();
                serde_json::to_writer(&mut out, &list)?;
                writeln!(out)?;
            } else {
                for e in entries {
                    let slash = if e.is_dir { "/" } else { "" };
                    writeln!(
                        out,
                        "{}\t{}\t{}{slash}",
                        e.size,
                        xfer::list::format_utc(e.mtime_ns),
                        e.name
                    )?;
                }
            }
            Ok(())
        }
    }
}
