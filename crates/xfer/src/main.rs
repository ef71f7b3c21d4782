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

use mirror_args::MirrorArgs;

mod mirror_args;

/// Move files to and from an xferd over several TCP connections, resuming where it stopped.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Examples:\n  xfer send big.iso backup\n  xfer recv big.iso backup -o /data/\n  xfer ls backup\n  xfer completions bash > /etc/bash_completion.d/xfer\n\nDefaults for -c, --chunk-size and per-host token files: ~/.config/xfer/config.toml."
)]
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
struct CopyArgs {
    /// Parallel TCP connections from the source to the destination, per copy.
    #[arg(short = 'c', long = "connections", default_value_t = 4)]
    connections: usize,
    /// Chunk size (K, M, G suffixes).
    #[arg(long, default_value = "4M")]
    chunk_size: String,
    /// Copy a whole directory tree.
    #[arg(short = 'r', long)]
    recursive: bool,
    /// File holding the source daemon's token (default: XFER_TOKEN).
    #[arg(long, value_name = "FILE")]
    src_token_file: Option<PathBuf>,
    /// File holding the destination daemon's token: the source gets a grant derived from it,
    /// valid for writing the destination name only, for 24 hours.
    #[arg(long, value_name = "FILE")]
    dst_token_file: Option<PathBuf>,
    /// Run the copies listed in FILE, one `SRC DST` pair per line (# comments).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["src", "dst"])]
    from_list: Option<PathBuf>,
    /// Copies from --from-list run at once.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Run both legs over TLS: to the source daemon, which then checks the destination's
    /// certificate against its own --copy-ca (both daemons need --tls-cert).
    #[arg(long)]
    tls: bool,
    /// PEM file of CA certificates to trust for the source daemon with --tls (default: the
    /// system's).
    #[arg(long, value_name = "FILE", requires = "tls")]
    ca: Option<PathBuf>,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    mirror: MirrorArgs,
    /// Source, SRC_HOST[:PORT]:NAME.
    #[arg(required_unless_present = "from_list")]
    src: Option<String>,
    /// Destination, DST_HOST[:PORT][:DEST] (DEST defaults to NAME).
    #[arg(required_unless_present = "from_list")]
    dst: Option<String>,
}

#[derive(Debug, Args)]
struct Common {
    /// Parallel TCP connections [default: adaptive: 4, doubled while throughput grows, up to
    /// --max-connections].
    #[arg(short = 'c', long = "connections")]
    connections: Option<usize>,
    /// Without -c: the most connections the adaptive pool may grow to [default: 16].
    #[arg(long, value_name = "N", conflicts_with = "connections")]
    max_connections: Option<usize>,
    /// Log what the transfer does on stderr: reconnects, socket options, the pool growing with
    /// the throughput it measured (XFER_LOG overrides).
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Chunk size (K, M, G suffixes).
    #[arg(long, default_value = "4M")]
    chunk_size: String,
    /// Limit the rate to RATE bytes per second across all connections (K, M, G suffixes).
    #[arg(long, value_name = "RATE")]
    bwlimit: Option<String>,
    /// Send buffer (SO_SNDBUF) of every connection, K, M, G suffixes; the kernel caps it at
    /// net.core.wmem_max [default: the kernel's, autotuned].
    #[arg(long, value_name = "SIZE")]
    sndbuf: Option<String>,
    /// Receive buffer (SO_RCVBUF) of every connection, K, M, G suffixes; the kernel caps it at
    /// net.core.rmem_max [default: the kernel's, autotuned].
    #[arg(long, value_name = "SIZE")]
    rcvbuf: Option<String>,
    /// TCP congestion control of every connection, e.g. bbr or cubic (see
    /// /proc/sys/net/ipv4/tcp_available_congestion_control) [default: the system's].
    #[arg(long, value_name = "NAME")]
    congestion: Option<String>,
    /// Seconds to keep reconnecting after the connection drops before giving up.
    #[arg(long, default_value_t = 60)]
    retry_deadline: u64,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Copy a whole directory tree (FILE or NAME is a directory).
    #[arg(short = 'r', long)]
    recursive: bool,
    /// With -r: compare file contents (whole-file digests) instead of size and mtime.
    #[arg(long, requires = "recursive")]
    checksum: bool,
    #[command(flatten)]
    auth: TokenArgs,
    #[command(flatten)]
    mirror: MirrorArgs,
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
            grant: None,
            socket: xfer::sockopt::SocketOptions::default(),
            meter: None,
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
        let connections = match (self.max_connections, self.connections) {
            // A -c from the defaults file yields to an explicit --max-connections.
            (Some(max), _) => {
                if !(1..=128).contains(&max) {
                    bail!("--max-connections must be between 1 and 128");
                }
                xfer::Connections::Adaptive { max }
            }
            (None, Some(n)) => {
                if !(1..=128).contains(&n) {
                    bail!("-c must be between 1 and 128");
                }
                xfer::Connections::Fixed(n)
            }
            (None, None) => xfer::Connections::Adaptive {
                max: xfer::engine::ADAPTIVE_MAX,
            },
        };
        let bwlimit = self.bwlimit.as_deref().map(parse).transpose()?;
        if bwlimit == Some(0) {
            bail!("--bwlimit must be above 0");
        }
        let socket = xfer::sockopt::SocketOptions {
            sndbuf: self.sndbuf.as_deref().map(parse).transpose()?,
            rcvbuf: self.rcvbuf.as_deref().map(parse).transpose()?,
            congestion: self.congestion.clone(),
        };
        // An algorithm that cannot be had is an error now, not a silent fallback later.
        socket.check("--sndbuf", "--rcvbuf")?;
        let mut connector = self.auth.connector()?;
        connector.socket = socket;
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
            connections,
            chunk_size: chunk as u32,
            bwlimit,
            retry_deadline: Duration::from_secs(self.retry_deadline),
            progress,
            connector,
        })
    }

    fn report(&self, verb: &str, summary: &Summary) -> anyhow::Result<()> {
        self.print(summary, || {
            format!(
                "{verb} {} ({} bytes, {} resumed) in {:.2} s, {:.1} MiB/s",
                summary.name,
                summary.bytes_total,
                summary.resumed_bytes,
                summary.seconds,
                summary.mbytes_per_sec
            )
        })
    }

    fn report_tree(&self, verb: &str, summary: &xfer::TreeSummary) -> anyhow::Result<()> {
        if self.mirror.print_changes(&summary.changes, self.json)? {
            return Ok(());
        }
        let json = self.mirror.summary_json(summary, &summary.changes)?;
        self.print(&json, || {
            let deleted = match summary.entries_deleted {
                0 => String::new(),
                n => format!(", {n} deleted"),
            };
            format!(
                "{verb} {}: {} of {} files ({} unchanged{deleted}), {} bytes in {:.2} s",
                summary.name,
                summary.files_transferred,
                summary.files_total,
                summary.files_skipped,
                summary.bytes_transferred,
                summary.seconds
            )
        })
    }

    /// The summary as JSON on stdout with --json, else one line on a terminal's stderr.
    fn print(
        &self,
        summary: &impl serde::Serialize,
        line: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, summary)?;
            writeln!(out)?;
        } else if !self.quiet && std::io::stderr().is_terminal() {
            eprintln!("{}", line());
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    // Defaults from ~/.config/xfer/config.toml (flags override them).
    let config = match xfer::config::ClientConfig::load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("xfer: {}", format!("{e:#}").replace('\n', " "));
            return ExitCode::FAILURE;
        }
    };
    let mut cli: Cli = config.parse_args();
    token_from_config(&mut cli, &config);
    let verbose = match &cli.command {
        Command::Send { common, .. } | Command::Recv { common, .. } => common.verbose,
        _ => false,
    };
    let default_filter = if verbose { "xfer=debug" } else { "off" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XFER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
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
            if common.recursive {
                let mirror = common.mirror.mirror()?;
                let summary = runtime.block_on(xfer::tree::send_tree_mirror(
                    xfer_core::Root::open(&file)?,
                    &target,
                    &name,
                    &opts,
                    common.checksum,
                    &mirror,
                ))?;
                return common.report_tree("sent", &summary);
            }
            if file.is_dir() {
                bail!("{} is a directory: use -r to send a tree", file.display());
            }
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
                // A tree lands in -o DIR itself; a file given a directory keeps its name.
                Some(p) if p.is_dir() && !common.recursive => p.join(leaf),
                Some(p) => p,
                None => Path::new(leaf).to_path_buf(),
            };
            let opts = common.options()?;
            if common.recursive {
                let mirror = common.mirror.mirror()?;
                let summary = runtime.block_on(xfer::tree::recv_tree_mirror(
                    &target,
                    &name,
                    &dest,
                    &opts,
                    common.checksum,
                    &mirror,
                ))?;
                return common.report_tree("received", &summary);
            }
            let summary = runtime.block_on(xfer::recv(&target, &name, &dest, &opts))?;
            common.report("received", &summary)
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "xfer", &mut script);
            print_quietly(&script)
        }
        Command::Man { command } => print_man(command.as_deref()),
        Command::Copy(args) => run_copy(&runtime, &args),
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

/// One line of a copy list, or the command line's pair, with its outcome.
#[derive(serde::Serialize)]
struct CopyOutcome {
    src: String,
    dst: String,
    ok: bool,
    error: Option<String>,
    #[serde(flatten)]
    done: Option<CopyDoneJson>,
    /// With --dry-run or --itemize: what the copy changed, or would change.
    #[serde(skip_serializing_if = "Option::is_none")]
    changes: Option<Vec<xfer::mirror::ChangeLine>>,
}

#[derive(serde::Serialize)]
struct CopyDoneJson {
    files_total: u64,
    files_transferred: u64,
    files_skipped: u64,
    bytes_total: u64,
    bytes_transferred: u64,
    resumed_bytes: u64,
    seconds: f64,
}

fn run_copy(runtime: &tokio::runtime::Runtime, args: &CopyArgs) -> anyhow::Result<()> {
    let chunk = xfer_core::units::parse_size(&args.chunk_size).map_err(anyhow::Error::msg)?;
    let pairs: Vec<(String, String)> = match &args.from_list {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let mut parts = l.split_whitespace();
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(s), Some(d), None) => Ok((s.to_string(), d.to_string())),
                    _ => bail!("bad line in {}: {l:?} (want: SRC DST)", path.display()),
                }
            })
            .collect::<anyhow::Result<_>>()?,
        None => vec![(
            args.src.clone().unwrap_or_default(),
            args.dst.clone().unwrap_or_default(),
        )],
    };
    let specs = pairs
        .iter()
        .map(|(s, d)| xfer::copy::CopySpec::parse(s, d))
        .collect::<Result<Vec<_>, _>>()?;
    let connector = TokenArgs {
        token_file: args.src_token_file.clone(),
        tls: args.tls,
        ca: args.ca.clone(),
    }
    .connector()?;
    let dst_token: Option<Arc<[u8]>> = match &args.dst_token_file {
        Some(path) => Some(xfer_core::token::read_token_file(path)?.into()),
        None => None,
    };
    let opts = xfer::copy::CopyOptions {
        dst_token,
        recursive: args.recursive,
        connections: args.connections,
        chunk_size: chunk as u32,
        dst_tls: connector.tls.is_some(),
        mirror: args.mirror.mirror()?,
    };
    let show = !args.quiet && std::io::stderr().is_terminal();
    let bars = indicatif::MultiProgress::with_draw_target(if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let started = std::time::Instant::now();
    let outcomes = runtime.block_on(async {
        let limit = Arc::new(tokio::sync::Semaphore::new(args.jobs.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let bar = bars.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:30} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec}",
                )
                .expect("valid template"),
            );
            bar.set_message(spec.name.clone());
            let (limit, connector, opts) = (Arc::clone(&limit), connector.clone(), opts.clone());
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let result = xfer::copy::copy_mirror(&spec, &connector, &opts, &bar).await;
                bar.finish_and_clear();
                (i, result)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            results.push(joined.expect("copy task panicked"));
        }
        results.sort_by_key(|(i, _)| *i);
        results
    });
    let mut failed = Vec::new();
    let rows: Vec<CopyOutcome> = outcomes
        .into_iter()
        .map(|(i, result)| {
            let (src, dst) = pairs[i].clone();
            match result {
                Ok((d, changes)) => CopyOutcome {
                    changes: args.mirror.list_changes(&changes, args.json),
                    src,
                    dst,
                    ok: true,
                    error: None,
                    done: Some(CopyDoneJson {
                        files_total: d.files_total,
                        files_transferred: d.files_transferred,
                        files_skipped: d.files_skipped,
                        bytes_total: d.bytes_total,
                        bytes_transferred: d.bytes_transferred,
                        resumed_bytes: d.resumed_bytes,
                        seconds: d.millis as f64 / 1000.0,
                    }),
                },
                Err(e) => {
                    failed.push(format!("{src} -> {dst}: {e}"));
                    CopyOutcome {
                        src,
                        dst,
                        ok: false,
                        error: Some(e.to_string()),
                        done: None,
                        changes: None,
                    }
                }
            }
        })
        .collect();
    if args.json {
        let total = |f: fn(&CopyDoneJson) -> u64| {
            rows.iter()
                .filter_map(|r| r.done.as_ref())
                .map(f)
                .sum::<u64>()
        };
        let summary = serde_json::json!({
            "copies": rows.len(),
            "failed": failed.len(),
            "files_total": total(|d| d.files_total),
            "files_transferred": total(|d| d.files_transferred),
            "files_skipped": total(|d| d.files_skipped),
            "bytes_total": total(|d| d.bytes_total),
            "bytes_transferred": total(|d| d.bytes_transferred),
            "seconds": started.elapsed().as_secs_f64(),
            "results": rows,
        });
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &summary)?;
        writeln!(out)?;
    }
    match failed.as_slice() {
        [] => Ok(()),
        [one] => bail!("{one}"),
        many => bail!(
            "{} of {} copies failed; first: {}",
            many.len(),
            rows.len(),
            many[0]
        ),
    }
}

/// Uses the defaults file's token for the host when neither `--token-file` nor `XFER_TOKEN`
/// gives one.
fn token_from_config(cli: &mut Cli, config: &xfer::config::ClientConfig) {
    let (auth, host) = match &mut cli.command {
        Command::Send { common, host, .. } | Command::Recv { common, host, .. } => {
            (&mut common.auth, host)
        }
        Command::Ls { auth, host, .. } => (auth, host),
        _ => return,
    };
    if auth.token_file.is_none() && std::env::var_os("XFER_TOKEN").is_none() {
        auth.token_file = config.token_file_for(host);
    }
}

/// `xfer man [COMMAND]`: the page for xfer, or for one of its commands.
fn print_man(command: Option<&str>) -> anyhow::Result<()> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let page = match command {
        None => cmd,
        Some(name) => {
            cmd.build();
            let sub = cmd
                .find_subcommand(name)
                .cloned()
                .with_context(|| format!("no command {name:?}: try xfer man send, recv or ls"))?;
            sub.name(format!("xfer-{name}"))
        }
    };
    let mut roff = Vec::new();
    clap_mangen::Man::new(page).render(&mut roff)?;
    print_quietly(&roff)
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is no error.
fn print_quietly(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
