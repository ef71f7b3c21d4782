//! `xferd`: settings, logging, signals and systemd integration around [`xferd::run_with`].
//!
//! Settings are the defaults, then the configuration file, then the flags
//! ([`xferd::settings`]). Under systemd the listening socket may be passed in (`LISTEN_FDS`),
//! readiness is reported once it is bound (`READY=1`), `SIGHUP` reloads the configuration and
//! `SIGTERM` drains. Logs go to stderr: coloured on a terminal, one plain line per event with a
//! syslog priority prefix when stderr is the journal.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser};
use sd_notify::NotifyState;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::{reload, EnvFilter, Registry};
use xferd::settings::{Settings, Size, DEFAULT_CONFIG_PATH};

const EXAMPLES: &str = "\
Examples:
  xferd --listen 0.0.0.0:8888 --root /srv/data --token-file /etc/xferd/token
  xferd --config /etc/xferd/xferd.toml --check-config
  xferd --listen 127.0.0.1:8888 --metrics 127.0.0.1:9108

Settings come from /etc/xferd/xferd.toml (or --config FILE) when it exists; every flag overrides
the key of the same name (--max-streams is max_streams). SIGHUP re-reads the file; SIGTERM stops
accepting, lets connections finish their current chunk and exits.";

/// Serve files under a root directory to xfer clients.
#[derive(Debug, Parser)]
#[command(version, about, after_help = EXAMPLES)]
struct Args {
    /// Configuration file (TOML) [default: /etc/xferd/xferd.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration, print the effective settings (secrets redacted) and exit.
    #[arg(long)]
    check_config: bool,
    /// Print xferd's man page (roff) on stdout and exit.
    #[arg(long)]
    man: bool,
    /// Address to listen on (IPv4 or IPv6, e.g. 0.0.0.0:8888 or [::]:8888; port 0 picks one)
    /// [default: 127.0.0.1:8888]. Ignored when systemd passes a socket (xferd.socket).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Directory served; names never resolve outside it [default: .].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Connections served at once; more wait (see --queue-timeout) [default: 64].
    #[arg(long, value_name = "N")]
    max_streams: Option<usize>,
    /// Largest chunk accepted or served (K, M, G suffixes) [default: 16M].
    #[arg(long, value_name = "SIZE")]
    chunk_size: Option<Size>,
    /// Bytes of chunk and frame buffers all connections together may hold (K, M, G suffixes);
    /// past it, connections wait for buffers and their senders are slowed by TCP, at least 34M
    /// [default: a quarter of the machine's memory, at least 64M, at most 1G].
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<Size>,
    /// Seconds a connection may wait for a free stream before it is told the daemon is busy
    /// [default: 30].
    #[arg(long, value_name = "SECS")]
    queue_timeout: Option<u64>,
    /// Seconds a connection may stay silent before it is closed [default: 300].
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Seconds a new connection has to finish its handshake [default: 10].
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<u64>,
    /// Transfers one connection may have open at once [default: 64].
    #[arg(long, value_name = "N")]
    max_transfers_per_conn: Option<usize>,
    /// Chunks a client may have unacknowledged per connection, 1 to 64 (at most this many per
    /// connection are sent again after a crash) [default: 2].
    #[arg(long, value_name = "N")]
    window: Option<u32>,
    /// Connections accepted at once from one client address [default: 64].
    #[arg(long, value_name = "N")]
    max_conns_per_ip: Option<usize>,
    /// How the chunks xferd sends (downloads, copies) are compressed when the client does not
    /// say: auto (where it raises throughput), off, or a zstd level 1-19 [default: auto].
    #[arg(long, value_name = "auto|off|LEVEL")]
    compress: Option<String>,
    /// Refuse uploads.
    #[arg(long)]
    read_only: bool,
    /// Carry out deletions asked for by mirror copies (xfer send -r/copy -r --delete); without
    /// it, and under --read-only, a client asking to delete is refused before anything moves.
    #[arg(long)]
    allow_delete: bool,
    /// Write uploads through the page cache, as plain writes: a file just received stays in
    /// memory for whoever reads it next, at the cost of the receiver's CPU [default: around
    /// the cache, where the filesystem offers direct I/O].
    #[arg(long)]
    no_direct_io: bool,
    /// File holding the shared secret clients must prove they know [default: the systemd
    /// credential "token", if passed].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve every session over TLS; without --tls-cert/--tls-key, with a key and self-signed
    /// certificate made on the first start in --state-dir (clients pin its fingerprint).
    #[arg(long)]
    tls: bool,
    /// Where xferd keeps its own key and certificate [default: $STATE_DIRECTORY under systemd,
    /// else ~/.local/state/xferd].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Print the SHA-256 fingerprint of the certificate clients see (what `xfer` pins) and exit.
    #[arg(long)]
    fingerprint: bool,
    /// PEM certificate chain: with --tls-key, every session must run over TLS.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates to trust for the destination of a copy over TLS (xfer copy --tls)
    /// [default: the system's].
    #[arg(long, value_name = "FILE")]
    copy_ca: Option<PathBuf>,
    /// Serve without a token on a non-loopback address (anyone who can connect may read and write).
    #[arg(long)]
    allow_anonymous: bool,
    /// Log level or filter, e.g. debug or xferd=debug (RUST_LOG overrides) [default: info].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Serve Prometheus metrics over HTTP on ADDR, e.g. 127.0.0.1:9108 (GET /metrics).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Send buffer (SO_SNDBUF) of every connection, K, M, G suffixes; the kernel caps it at
    /// net.core.wmem_max [default: the kernel's, autotuned].
    #[arg(long, value_name = "SIZE")]
    sndbuf: Option<Size>,
    /// Receive buffer (SO_RCVBUF) of every connection, K, M, G suffixes; the kernel caps it at
    /// net.core.rmem_max [default: the kernel's, autotuned].
    #[arg(long, value_name = "SIZE")]
    rcvbuf: Option<Size>,
    /// TCP congestion control of every connection, e.g. bbr or cubic (see
    /// /proc/sys/net/ipv4/tcp_available_congestion_control) [default: the system's].
    #[arg(long, value_name = "NAME")]
    congestion: Option<String>,
}

impl Args {
    /// The settings given as flags; unset flags leave the file's value (or the default).
    fn flags(&self) -> Settings {
        Settings {
            listen: self.listen.clone(),
            root: self.root.clone(),
            max_streams: self.max_streams,
            chunk_size: self.chunk_size,
            max_memory: self.max_memory,
            queue_timeout: self.queue_timeout,
            idle_timeout: self.idle_timeout,
            handshake_timeout: self.handshake_timeout,
            max_transfers_per_conn: self.max_transfers_per_conn,
            max_conns_per_ip: self.max_conns_per_ip,
            window: self.window,
            read_only: self.read_only.then_some(true),
            allow_delete: self.allow_delete.then_some(true),
            direct_io: self.no_direct_io.then_some(false),
            token_file: self.token_file.clone(),
            allow_anonymous: self.allow_anonymous.then_some(true),
            tls: self.tls.then_some(true),
            state_dir: self.state_dir.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            copy_ca: self.copy_ca.clone(),
            log_level: self.log_level.clone(),
            metrics: self.metrics.clone(),
            sndbuf: self.sndbuf,
            rcvbuf: self.rcvbuf,
            congestion: self.congestion.clone(),
            compress: self.compress.clone(),
        }
    }
}

/// Where the settings come from: an optional file under the flags.
#[derive(Debug, Clone)]
struct Sources {
    /// `--config FILE`, which must exist.
    explicit: Option<PathBuf>,
    flags: Settings,
}

impl Sources {
    /// The configuration file in force: `--config FILE`, else the default path if it exists.
    fn file(&self) -> Option<PathBuf> {
        match &self.explicit {
            Some(path) => Some(path.clone()),
            None => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                default.exists().then(|| default.to_path_buf())
            }
        }
    }

    /// Reads the file (if any) and lays the flags over it.
    fn load(&self) -> anyhow::Result<Settings> {
        let file = match self.file() {
            Some(path) => Settings::load(&path)?,
            None => Settings::default(),
        };
        let settings = Settings::effective(file, self.flags.clone());
        settings.check()?;
        Ok(settings)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.man {
        let man = clap_mangen::Man::new(Args::command());
        let mut out = std::io::stdout().lock();
        return match man.render(&mut out).and_then(|()| out.flush()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(anyhow::anyhow!("writing the man page: {e}")),
        };
    }
    let sources = Sources {
        explicit: args.config.clone(),
        flags: args.flags(),
    };
    let settings = match sources.load() {
        Ok(settings) => settings,
        Err(e) => return fail(e),
    };
    if args.fingerprint {
        return match print_fingerprint(&settings) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    if args.check_config {
        return match check_config(&sources, &settings) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    let log = init_logging(settings.log_level.as_deref().unwrap_or("info"));
    match serve(sources, settings, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = xfer_cli_util::message::one_line(e.as_ref());
            let _ = sd_notify::notify(&[NotifyState::Status(&format!("failed: {line}"))]);
            fail(e)
        }
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("xferd: {}", xfer_cli_util::message::one_line(e.as_ref()));
    ExitCode::from(2)
}

/// `--fingerprint`: the SHA-256 fingerprint of the certificate clients see, on stdout.
fn print_fingerprint(settings: &Settings) -> anyhow::Result<()> {
    let Some(cert) = settings.certificate()? else {
        let dir = xferd::identity::state_dir(settings.state_dir.as_deref())?;
        bail!(
            "no certificate in {} yet: `xferd --tls` makes one on its first start (or give \
             --state-dir DIR, or --tls-cert FILE)",
            dir.display()
        );
    };
    println!("{}", xferd::identity::fingerprint(&cert)?);
    Ok(())
}

/// `--check-config`: everything `serve` would check short of binding, then the effective
/// settings on stdout.
fn check_config(sources: &Sources, settings: &Settings) -> anyhow::Result<()> {
    let mut probe = settings.clone();
    if probe.tls == Some(true) && probe.tls_cert.is_none() && probe.certificate()?.is_none() {
        // A check makes nothing: the first start makes the identity, as the user it runs as.
        probe.tls = None;
    }
    probe.to_config()?;
    if activated_listener_fd().is_none() {
        settings.check_exposure(settings.listen.as_deref().unwrap_or_default())?;
    }
    let mut out = std::io::stdout().lock();
    match sources.file() {
        Some(path) => writeln!(out, "# configuration file: {}", path.display())?,
        None => writeln!(out, "# configuration file: none (defaults and flags only)")?,
    }
    write!(out, "{}", settings.render())?;
    out.flush()?;
    Ok(())
}

/// Changes the log filter on `SIGHUP`; `None` when `RUST_LOG` decides.
type LogHandle = Option<reload::Handle<EnvFilter, Registry>>;

/// Logs to stderr at `level` (`RUST_LOG` overrides): plain lines with a syslog priority prefix
/// when stderr is the journal, colour on a terminal, plain with timestamps otherwise.
fn init_logging(level: &str) -> LogHandle {
    use tracing_subscriber::fmt::format;
    use tracing_subscriber::prelude::*;
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_set = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = if stderr_is_journal() {
        // journald adds the time and reads the priority from the `<N>` prefix.
        let inner = format().without_time().with_target(false).with_level(false);
        layer.with_ansi(false).event_format(Journal(inner)).boxed()
    } else if std::io::stderr().is_terminal() {
        layer.boxed()
    } else {
        layer.with_ansi(false).boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .init();
    (!env_set).then_some(handle)
}

/// True when stderr is connected to journald: `JOURNAL_STREAM` holds its device and inode.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse().ok() == Some(stat.st_dev) && ino.parse().ok() == Some(stat.st_ino)
}

/// An event format with the `<N>` syslog priority prefix journald understands.
struct Journal<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journal<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The listening socket systemd passed (socket activation), if any: the first of `LISTEN_FDS`
/// when `LISTEN_PID` is this process.
fn activated_listener_fd() -> Option<std::os::fd::RawFd> {
    sd_notify::listen_fds().ok()?.next()
}

/// Takes the socket systemd passed, checking that it is a listening TCP socket.
fn activated_listener() -> anyhow::Result<Option<std::net::TcpListener>> {
    use std::os::fd::FromRawFd;
    let fds = sd_notify::listen_fds().context("reading LISTEN_FDS")?;
    let count = fds.len();
    let Some(fd) = activated_listener_fd() else {
        return Ok(None);
    };
    if count > 1 {
        warn!(
            count,
            "systemd passed several sockets; serving the first only"
        );
    }
    // SAFETY: systemd hands this process the descriptors from 3 on (LISTEN_PID names us), and
    // nothing else in the process takes ownership of them.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let listening = rustix::net::sockopt::socket_acceptconn(&listener).unwrap_or(false);
    let addr = listener.local_addr();
    match addr {
        Ok(_) if listening => {}
        _ => bail!(
            "the socket systemd passed (fd {fd}) is not a listening TCP socket: \
             check ListenStream= in xferd.socket"
        ),
    }
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

fn serve(sources: Sources, settings: Settings, log: LogHandle) -> anyhow::Result<()> {
    let activated = activated_listener()?;
    let listen = settings.listen.clone().unwrap_or_default();
    let exposed = match &activated {
        Some(l) => l.local_addr()?.to_string(),
        None => listen.clone(),
    };
    settings.check_exposure(&exposed)?;
    let mut config = settings.to_config()?;
    xferd::budget::prefer_mmap_for_chunks();
    let open_files = xferd::fds::raise_nofile_limit();
    xferd::fds::fit(&mut config, open_files);
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async move {
        let listener = match activated {
            Some(std) => {
                let l = tokio::net::TcpListener::from_std(std)?;
                info!(addr = %l.local_addr()?, "serving the socket passed by systemd");
                l
            }
            None => bind(&listen, &config.socket)
                .await
                .map_err(|e| bind_error(e, &listen, "--listen/listen"))?,
        };
        let addr = listener.local_addr()?;
        if xfer_net::sockopt::fast_open_serving() == Some(false) {
            info!(
                "TCP Fast Open is off for servers here (net.ipv4.tcp_fastopen): each connection \
                 answers a round trip later; the package's /usr/lib/sysctl.d/60-xferd.conf turns \
                 it on (GUIDE.md, Tuning)"
            );
        }
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(xferd::metrics::Metrics::default());
        // Made before the address line, so that the first scrape already reports it.
        xferd::budget::shared_budget(&metrics, config.max_memory);
        if let Some(at) = &settings.metrics {
            let http = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| bind_error(e, at, "--metrics/metrics"))?;
            info!(addr = %http.local_addr()?, "metrics served at /metrics");
            let serving = xferd::metrics::serve_http(http, Arc::clone(&metrics), shutdown.clone());
            tokio::spawn(serving);
        }
        // One line on stdout once bound: scripts and tests read the port from it.
        let mut out = std::io::stdout().lock();
        writeln!(out, "xferd listening on {addr}")?;
        out.flush()?;
        drop(out);
        notify(&[
            NotifyState::Ready,
            NotifyState::Status(&format!("listening on {addr}")),
        ]);
        let (reloads, rx) = mpsc::channel(1);
        tokio::spawn(stop_on_signal(shutdown.clone()));
        tokio::spawn(reload_on_hangup(sources, settings, addr, log, reloads));
        let hooks = xferd::Hooks {
            reloads: Some(rx),
            metrics,
        };
        xferd::run_with(listener, config, shutdown, hooks).await?;
        Ok(())
    })
}

/// Binds and listens on the first address `listen` resolves to, as `TcpListener::bind` does,
/// with the socket options set before `listen` so that accepted connections negotiate their
/// window scale for the buffers asked for.
async fn bind(
    listen: &str,
    options: &xfer_net::SocketOptions,
) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(listen).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        options.apply(&socket).map_err(std::io::Error::other)?;
        match socket.bind(addr) {
            Ok(()) => return socket.listen(1024),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "could not resolve to any address",
        )
    }))
}

/// A bind error with the fix spelled out where there is an obvious one.
fn bind_error(e: std::io::Error, addr: &str, option: &str) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process holds it: stop it, or choose another port with {option})"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need CAP_NET_BIND_SERVICE: use a higher port with {option})"
        }
        std::io::ErrorKind::AddrNotAvailable => " (no interface has this address: check {option})",
        _ => "",
    };
    anyhow::anyhow!(
        "listening on {addr}: {e}{}",
        hint.replace("{option}", option)
    )
}

/// Tells systemd (if it started us with `NOTIFY_SOCKET`) about a state change.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    shutdown.cancel();
}

/// On every `SIGHUP`: re-reads the configuration file, lays the same flags over it and hands
/// the result to the server. A configuration that does not check out is logged and ignored.
async fn reload_on_hangup(
    sources: Sources,
    mut current: Settings,
    addr: SocketAddr,
    log: LogHandle,
    reloads: mpsc::Sender<xferd::Config>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("installing SIGHUP handler");
    while hup.recv().await.is_some() {
        info!("SIGHUP received; reloading the configuration");
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        notify(&states);
        let loading = sources.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let settings = loading.load()?;
            settings.check_exposure(&addr.to_string())?;
            let config = settings.to_config()?;
            Ok::<_, anyhow::Error>((settings, config))
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        match loaded {
            Ok((settings, config)) => {
                for (key, old, new) in [
                    ("listen", &current.listen, &settings.listen),
                    ("metrics", &current.metrics, &settings.metrics),
                ] {
                    if old != new {
                        warn!(key, "{key} changed: takes effect at the next restart");
                    }
                }
                if settings.log_level != current.log_level {
                    apply_log_level(&log, settings.log_level.as_deref().unwrap_or("info"));
                }
                if reloads.send(config).await.is_err() {
                    return;
                }
                current = settings;
            }
            Err(e) => error!(
                "reload failed; keeping the running configuration: {}",
                xfer_cli_util::message::one_line(e.as_ref())
            ),
        }
        notify(&[
            NotifyState::Ready,
            NotifyState::Status(&format!("listening on {addr}")),
        ]);
    }
}

fn apply_log_level(log: &LogHandle, level: &str) {
    let Some(handle) = log else {
        return info!("log_level changed, but RUST_LOG is set and decides");
    };
    match EnvFilter::try_new(level) {
        Ok(filter) => match handle.reload(filter) {
            Ok(()) => info!(log_level = level, "log level changed"),
            Err(e) => warn!(error = %e, "cannot change the log level"),
        },
        Err(e) => warn!(error = %e, "log_level is not a log filter; keeping the current one"),
    }
}
