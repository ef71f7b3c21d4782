//! `xfer copy`: one pair from the command line or many from `--from-list`, `--jobs` at once,
//! each run by the source daemon.

use std::sync::Arc;

use anyhow::{bail, Context};
use xfer_client::copy::{CopyOptions, CopySpec};

use crate::args::{CopyArgs, TokenArgs};
use crate::output::{self, CopyDoneJson, CopyOutcome};

/// Runs every copy `args` names; fails naming the first that failed.
pub(crate) fn run(runtime: &tokio::runtime::Runtime, args: &CopyArgs) -> anyhow::Result<()> {
    let chunk = xfer_cli_util::units::parse_size(&args.chunk_size).map_err(anyhow::Error::msg)?;
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
        .map(|(s, d)| CopySpec::parse(s, d))
        .collect::<Result<Vec<_>, _>>()?;
    let connector = TokenArgs {
        token_file: args.src_token_file.clone(),
        tls: args.tls,
        ca: args.ca.clone(),
        accept_new: args.accept_new,
    }
    .connector()?;
    let connector = xfer_client::Connector {
        compress: args.compress,
        ..connector
    };
    let dst_token: Option<Arc<[u8]>> = match &args.dst_token_file {
        Some(path) => Some(xfer_cli_util::token::read_token_file(path)?.into()),
        None => None,
    };
    let opts = CopyOptions {
        dst_token,
        recursive: args.recursive,
        connections: args.connections,
        chunk_size: chunk as u32,
        dst_tls: args.tls,
        keep: args.keep.options(),
        mirror: args.mirror.mirror()?,
        delta: match (args.delta, args.whole_file) {
            (true, _) => xfer_proto::CopyDeltaMode::Delta,
            (_, true) => xfer_proto::CopyDeltaMode::WholeFile,
            _ => xfer_proto::CopyDeltaMode::Auto,
        },
    };
    let bars = output::copy_bars(args.quiet);
    let started = std::time::Instant::now();
    let outcomes = runtime.block_on(async {
        let limit = Arc::new(tokio::sync::Semaphore::new(args.jobs.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let bar = output::copy_bar(&bars, &spec.name);
            let (limit, connector, opts) = (Arc::clone(&limit), connector.clone(), opts.clone());
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let result = xfer_client::copy::copy_mirror(&spec, &connector, &opts, &bar).await;
                xfer_client::Progress::finish(&bar);
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
                Ok(report) => {
                    if args.verbose {
                        say_why(&src, &dst, &report);
                    }
                    CopyOutcome {
                        changes: args.mirror.list_changes(&report.changes, args.json),
                        src,
                        dst,
                        ok: true,
                        error: None,
                        done: Some(CopyDoneJson::new(&report.done, report.delta)),
                    }
                }
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
        output::copy_summary(&rows, failed.len(), started.elapsed().as_secs_f64())?;
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

/// Under `-v`, on stderr: which way a single-file copy went and why, as the source daemon said.
fn say_why(src: &str, dst: &str, report: &xfer_client::copy::CopyReport) {
    match (&report.reason, report.delta) {
        (Some(reason), _) => eprintln!("xfer: {src} -> {dst}: {reason}"),
        (None, Some(d)) => eprintln!(
            "xfer: {src} -> {dst}: {} (the source daemon does not say why)",
            if d.delta {
                "delta transfer"
            } else {
                "whole file"
            }
        ),
        // A tree copy, or a source daemon that says neither.
        (None, None) => {}
    }
}
