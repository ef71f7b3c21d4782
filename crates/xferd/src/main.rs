//! `xferd`: flags and signals around [`xferd::run`].

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Serve files under a root directory to xfer clients.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Example:\n  xferd --listen 0.0.0.0:8888 --root /srv/data"
)]
struct Args {
    /// Address to listen on (IPv4 or IPv6, e.g. 0.0.0.0:8888 or [::]:8888; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:8888")]
    listen: String,
    /// Directory served; names never resolve outside it.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// Connections served at once; more wait (see --queue-timeout).
    #[arg(long, default_value_t = 64)]
    max_streams: usize,
    /// Largest chunk accepted or served (K, M, G suffixes).
    #[arg(long, default_value = "16M")]
    chunk_size: String,
    /// Seconds a connection may wait for a free stream before it is told the daemon is busy.
    #[arg(long, default_value_t = 30)]
    queue_timeout: u64,
    /// Seconds a connection may stay silent before it is closed.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// Chunks a client may have unacknowledged per connection (at most this many per connection
    /// are sent again after a crash).
    #[arg(long, default_value_t = 2)]
    window: u32,
    /// Connections accepted at once from one client address.
    #[arg(long, default_value_t = 64)]
    max_conns_per_ip: usize,
    /// Refuse uploads.
    #[arg(long)]
    read_only: bool,
    /// File holding the shared secret clients must prove they know.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// PEM certificate chain: with --tls-key, every session must run over TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve without a token on a non-loopback address (anyone who can connect may read and write).
    #[arg(long)]
    allow_anonymous: bool,
    /// Log level or filter (overridden by RUST_LOG).
    #[arg(long, default_value = "info")]
    log_level: String,
}

impl Args {
    fn into_config(self) -> anyhow::Result<xferd::Config> {
        let token = match &self.token_file {
            Some(path) => Some(xfer_core::token::read_token_file(path)?),
            None => None,
        };
        if token.is_none() && !self.allow_anonymous && !is_loopback(&self.listen) {
            bail!(
                "refusing to listen on {} without a token: pass --token-file FILE, \
                 or --allow-anonymous to serve anyone who can connect",
                self.listen
            );
        }
        let chunk = xfer_core::units::parse_size(&self.chunk_size).map_err(anyhow::Error::msg)?;
        if !(u64::from(xfer_proto::MIN_CHUNK_SIZE)..=u64::from(xfer_proto::MAX_CHUNK_SIZE))
            .contains(&chunk)
        {
            bail!("--chunk-size must be between 4K and 16M");
        }
        if self.max_streams == 0 {
            bail!("--max-streams must be at least 1");
        }
        let mut cfg = xferd::Config::new(self.root.clone())
            .with_context(|| format!("root {}", self.root.display()))?;
        cfg.chunk_size = chunk as u32;
        cfg.max_streams = self.max_streams;
        cfg.max_connections = self.max_streams.saturating_mul(4).saturating_add(64);
        cfg.queue_timeout = Duration::from_secs(self.queue_timeout);
        cfg.idle_timeout = Duration::from_secs(self.idle_timeout.max(1));
        cfg.read_only = self.read_only;
        cfg.window = self.window.clamp(1, 64);
        cfg.token = token.map(Into::into);
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            cfg.tls = Some(xferd::Tls::from_pem_files(cert, key)?);
        }
        cfg.max_per_address = self.max_conns_per_ip.max(1);
        Ok(cfg)
    }
}

/// True when every address `listen` names is a loopback address.
fn is_loopback(listen: &str) -> bool {
    use std::net::ToSocketAddrs;
    match listen.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xferd: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: Args) -> anyhow::Result<()> {
    let listen = args.listen.clone();
    let config = args.into_config()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr()?;
        // One line on stdout once bound: scripts and tests read the port from it.
        let mut out = std::io::stdout().lock();
        writeln!(out, "xferd listening on {addr}")?;
        out.flush()?;
        drop(out);
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        xferd::run(listener, config, shutdown).await?;
        Ok(())
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
