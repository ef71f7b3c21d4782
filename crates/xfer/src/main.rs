//! `xfer`: the command line around the client library. Flags live in [`args`], what is printed
//! in [`output`]; errors end as one line `xfer: <cause>`.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::CommandFactory;
use xfer_client::Target;

use crate::args::{Cli, Command};

mod args;
mod config;
mod copy_command;
mod mirror_args;
mod output;

fn main() -> ExitCode {
    prefer_mmap_for_chunks();
    // Defaults from ~/.config/xfer/config.toml (flags override them).
    let config = match config::ClientConfig::load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("xfer: {}", xfer_cli_util::message::one_line(e.as_ref()));
            return ExitCode::FAILURE;
        }
    };
    let mut cli: Cli = config.parse_args();
    token_from_config(&mut cli, &config);
    let verbose = match &cli.command {
        Command::Send { common, .. } | Command::Recv { common, .. } => common.verbose,
        Command::Copy(args) => args.verbose,
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
            eprintln!("xfer: {}", xfer_cli_util::message::one_line(e.as_ref()));
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
                    .map(|n| xfer_proto::names::escape(n.as_bytes()).into_owned())
                    .with_context(|| format!("cannot derive a name from {}", file.display()))?,
            };
            if common.recursive && !file.is_dir() {
                if !file.exists() {
                    bail!("no such directory: {}", file.display());
                }
                bail!(
                    "{} is not a directory: drop -r to send one file",
                    file.display()
                );
            }
            let opts = common.options()?;
            if common.recursive {
                let mirror = common.mirror.mirror()?;
                let summary = runtime.block_on(xfer_client::tree::send_dir_mirror(
                    &file,
                    &target,
                    &name,
                    &opts,
                    common.checksum,
                    &mirror,
                ))?;
                return common.mirror.report(&common.report(), "sent", &summary);
            }
            if file.is_dir() {
                bail!("{} is a directory: use -r to send a tree", file.display());
            }
            let summary = runtime.block_on(xfer_client::send(&file, &target, &name, &opts))?;
            common.report().transfer("sent", &summary)
        }
        Command::Recv {
            common,
            output,
            no_direct_io,
            name,
            host,
        } => {
            xfer_core::direct::set_direct_io(!no_direct_io);
            let target: Target = host.parse()?;
            let leaf = xfer_core::on_disk(base_name(&name)?);
            let dest = match output {
                // A tree lands in -o DIR itself; a file given a directory keeps its name.
                Some(p) if p.is_dir() && !common.recursive => p.join(leaf),
                Some(p) => p,
                None => Path::new(&leaf).to_path_buf(),
            };
            let opts = common.options()?;
            if common.recursive {
                let mirror = common.mirror.mirror()?;
                let summary = runtime.block_on(xfer_client::tree::recv_tree_mirror(
                    &target,
                    &name,
                    &dest,
                    &opts,
                    common.checksum,
                    &mirror,
                ))?;
                return common.mirror.report(&common.report(), "received", &summary);
            }
            let summary = runtime.block_on(xfer_client::recv(&target, &name, &dest, &opts))?;
            common.report().transfer("received", &summary)
        }
        Command::Completions { shell } => output::completions(shell, Cli::command()),
        Command::Man { command } => output::man(Cli::command(), command.as_deref()),
        Command::Copy(args) => copy_command::run(&runtime, &args),
        Command::Ls {
            json,
            auth,
            host,
            dir,
        } => {
            let target: Target = host.parse()?;
            let connector = auth.connector()?;
            let dir = dir.as_deref().unwrap_or("");
            let entries = runtime.block_on(xfer_client::list(&target, dir, &connector))?;
            output::listing(&entries, json)
        }
    }
}

/// Uses the defaults file's token for the host when neither `--token-file` nor `XFER_TOKEN`
/// gives one.
fn token_from_config(cli: &mut Cli, config: &config::ClientConfig) {
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

/// Makes glibc serve every chunk buffer with its own `mmap` and unmap it when freed, as the
/// daemon does: otherwise it raises its threshold after the first free and carves later chunks
/// out of per-thread arenas, which keep them, and the memory budget bounds only what is live (a
/// pool of 64 uploading from loopback peaked at 184 MiB instead of 143). And keeps up to 64 MiB
/// of freed small buffers for reuse, as the daemon does (`KEPT_FREE_HEAP`): a tree's small files
/// are read into buffers freed a packed batch at a time, and at glibc's fixed 128 KiB each batch
/// faulted its few MiB in again. Called first, before any other thread exists.
fn prefer_mmap_for_chunks() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes a tunable of the allocator; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
