//! What `xfer` prints: progress bars on a terminal's stderr, one-line or JSON summaries,
//! listings, copy results, man pages and completion scripts. Nothing here decides anything.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use xfer_client::{Progress, Summary, TreeSummary};
use xfer_proto::{CopyDoneMeta, ListEntry};

/// A terminal progress bar as the client library's [`Progress`].
#[derive(Debug)]
pub(crate) struct Bar(ProgressBar);

impl Progress for Bar {
    fn set_length(&self, bytes: u64) {
        self.0.set_length(bytes);
    }

    fn set_position(&self, bytes: u64) {
        self.0.set_position(bytes);
    }

    fn inc(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn set_message(&self, message: String) {
        self.0.set_message(message);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// The bar of a send or receive: drawn on stderr when it is a terminal and not `--quiet`.
pub(crate) fn transfer_bar(quiet: bool) -> Arc<dyn Progress> {
    let bar = if !quiet && std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
            )
            .expect("valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    Arc::new(Bar(bar))
}

/// Asks on the terminal whether to trust a daemon met for the first time; yes pins it.
pub(crate) fn ask_first_use(peer: &str, fingerprint: &str, file: Option<&str>) -> bool {
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "The certificate of {peer} is not known.\nIts fingerprint is {fingerprint} \
         (`xferd --fingerprint` prints it on the server).\nTrust it{}? [y/N] ",
        file.map(|f| format!(" and remember it in {f}"))
            .unwrap_or_default()
    );
    let _ = err.flush();
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim(), "y" | "Y" | "yes" | "Yes" | "YES")
}

/// The bars of several copies at once, one line each.
pub(crate) fn copy_bars(quiet: bool) -> MultiProgress {
    MultiProgress::with_draw_target(if !quiet && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    })
}

/// One copy's line among `bars`, labelled `name`.
pub(crate) fn copy_bar(bars: &MultiProgress, name: &str) -> Bar {
    let bar = bars.add(ProgressBar::new(0));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:30} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec}",
        )
        .expect("valid template"),
    );
    bar.set_message(name.to_string());
    Bar(bar)
}

/// Where a command's summary goes: JSON on stdout with `--json`, else one line on a
/// terminal's stderr unless `--quiet`.
pub(crate) struct Report {
    pub(crate) json: bool,
    pub(crate) quiet: bool,
}

impl Report {
    /// A file sent or received.
    pub(crate) fn transfer(&self, verb: &str, summary: &Summary) -> anyhow::Result<()> {
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

    /// A tree sent or received.
    /// `json` is what `--json` prints: the summary, with its changes under `--itemize`.
    pub(crate) fn tree(
        &self,
        verb: &str,
        summary: &TreeSummary,
        json: &impl serde::Serialize,
    ) -> anyhow::Result<()> {
        self.print(json, || {
            let deleted = match summary.entries_deleted {
                0 => String::new(),
                n => format!(", {n} deleted"),
            };
            let mut line = format!(
                "{verb} {}: {} of {} files ({} unchanged{deleted}), {} bytes in {:.2} s",
                summary.name,
                summary.files_transferred,
                summary.files_total,
                summary.files_skipped,
                summary.bytes_transferred,
                summary.seconds
            );
            if summary.not_chowned > 0 {
                line += &format!("; {} entries not chowned", summary.not_chowned);
            }
            line
        })
    }

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

/// `xfer ls`: SIZE, MTIME (UTC) and NAME tab-separated, or one JSON array.
pub(crate) fn listing(entries: &[ListEntry], json: bool) -> anyhow::Result<()> {
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
        // Names as their bytes, as `ls` prints them: a name that is not UTF-8 can be given
        // back to `xfer recv` as it was printed.
        for e in entries {
            let slash = if e.is_dir { "/" } else { "" };
            let when = xfer_client::list::format_utc(e.mtime_ns);
            write!(out, "{}\t{when}\t", e.size)?;
            out.write_all(&xfer_proto::names::unescape(&e.name))?;
            writeln!(out, "{slash}")?;
        }
    }
    Ok(())
}

/// One line of a copy list, or the command line's pair, with its outcome.
#[derive(serde::Serialize)]
pub(crate) struct CopyOutcome {
    pub(crate) src: String,
    pub(crate) dst: String,
    pub(crate) ok: bool,
    pub(crate) error: Option<String>,
    #[serde(flatten)]
    pub(crate) done: Option<CopyDoneJson>,
    /// With --dry-run or --itemize: what the copy changed, or would change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) changes: Option<Vec<xfer_client::mirror::ChangeLine>>,
}

/// What a finished copy reports, as `--json` shows it.
#[derive(serde::Serialize)]
pub(crate) struct CopyDoneJson {
    files_total: u64,
    files_transferred: u64,
    files_skipped: u64,
    bytes_total: u64,
    bytes_transferred: u64,
    resumed_bytes: u64,
    seconds: f64,
    not_chowned: u64,
    xattrs_refused: u64,
    hard_links: u64,
    entries_skipped: u64,
    /// A single-file copy's transfer, from a source daemon that reports it: whether it went
    /// as a delta, and what it sent and what the destination reused.
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    literal_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    matched_bytes: Option<u64>,
}

impl CopyDoneJson {
    /// The counts of `m`, and what `delta` says the transfer moved.
    pub(crate) fn new(m: &CopyDoneMeta, delta: Option<xfer_proto::CopyDelta>) -> Self {
        let d = &m.done;
        Self {
            files_total: d.files_total,
            files_transferred: d.files_transferred,
            files_skipped: d.files_skipped,
            bytes_total: d.bytes_total,
            bytes_transferred: d.bytes_transferred,
            resumed_bytes: d.resumed_bytes,
            seconds: d.millis as f64 / 1000.0,
            not_chowned: m.not_chowned,
            xattrs_refused: m.xattrs_refused,
            hard_links: m.hard_links,
            entries_skipped: m.entries_skipped,
            delta: delta.map(|d| d.delta),
            literal_bytes: delta.map(|d| d.literal_bytes),
            matched_bytes: delta.map(|d| d.matched_bytes),
        }
    }
}

/// `xfer copy --json`: the totals over `rows`, and every row.
pub(crate) fn copy_summary(
    rows: &[CopyOutcome],
    failed: usize,
    seconds: f64,
) -> anyhow::Result<()> {
    let total = |f: fn(&CopyDoneJson) -> u64| {
        rows.iter()
            .filter_map(|r| r.done.as_ref())
            .map(f)
            .sum::<u64>()
    };
    let summary = serde_json::json!({
        "copies": rows.len(),
        "failed": failed,
        "files_total": total(|d| d.files_total),
        "files_transferred": total(|d| d.files_transferred),
        "files_skipped": total(|d| d.files_skipped),
        "bytes_total": total(|d| d.bytes_total),
        "bytes_transferred": total(|d| d.bytes_transferred),
        "not_chowned": total(|d| d.not_chowned),
        "seconds": seconds,
        "results": rows,
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &summary)?;
    writeln!(out)?;
    Ok(())
}

/// `xfer completions SHELL`.
pub(crate) fn completions(
    shell: clap_complete::Shell,
    mut cmd: clap::Command,
) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "xfer", &mut script);
    print_quietly(&script)
}

/// `xfer man [COMMAND]`: the page for xfer, or for one of its commands.
pub(crate) fn man(mut cmd: clap::Command, command: Option<&str>) -> anyhow::Result<()> {
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
