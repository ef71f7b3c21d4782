//! The mirroring flags of `send -r`, `recv -r` and `copy -r` (`--delete`, filters, `--dry-run`,
//! `--itemize`) and how their output is printed.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use xfer_client::mirror::{itemize, ChangeLine, Filter};
use xfer_client::{Mirror, TreeSummary};
use xfer_proto::Change;

/// Where `--help` lists these flags.
const HEADING: &str = "Mirroring (with -r)";

#[derive(Debug, Args, Clone, Default)]
pub(crate) struct MirrorArgs {
    /// After the copy succeeded, remove from the destination tree what the source does not
    /// have (excluded entries stay); a daemon must run with --allow-delete.
    #[arg(long, requires = "recursive", help_heading = HEADING)]
    delete: bool,
    /// With --delete: remove excluded entries from the destination too.
    #[arg(long, requires = "delete", help_heading = HEADING)]
    delete_excluded: bool,
    /// Leave out entries matching PATTERN, a gitignore-style glob: `*.log` matches at any
    /// depth, `/build` or `a/b` from the top of the tree, `cache/` directories only, `**` any
    /// number of directories; everything below an excluded directory is left out. Repeatable.
    #[arg(long, value_name = "PATTERN", requires = "recursive", help_heading = HEADING)]
    exclude: Vec<String>,
    /// Keep entries matching PATTERN even when an --exclude matches them: an include always
    /// wins, whatever the order of the flags (`--include '*/' --include '*.c' --exclude '*'`
    /// keeps only C files). Repeatable.
    #[arg(long, value_name = "PATTERN", requires = "recursive", help_heading = HEADING)]
    include: Vec<String>,
    /// Read exclude patterns from FILE, one per line; blank lines and lines starting with `#`
    /// are skipped. Repeatable.
    #[arg(long, value_name = "FILE", requires = "recursive", help_heading = HEADING)]
    exclude_from: Vec<PathBuf>,
    /// Change nothing on either side: print what would be created, updated and deleted, one
    /// itemize line each (see --itemize), or with --json one array of
    /// {"action","kind","path","itemize"}.
    #[arg(short = 'n', long, requires = "recursive", help_heading = HEADING)]
    dry_run: bool,
    /// Print one line per entry changed on stdout, rsync's itemize format: `>f+++++++++ PATH`
    /// file created, `>f.st...... PATH` file updated (c content, s size, t mtime, p
    /// permissions), `cd+++++++++ DIR/` directory created, `cL+++++++++ LINK -> TARGET` link
    /// created, `*deleting   PATH` removed. With --json the summary gets a "changes" array.
    #[arg(short = 'i', long, requires = "recursive", help_heading = HEADING)]
    itemize: bool,
}

impl MirrorArgs {
    /// The mirror these flags ask for.
    pub(crate) fn mirror(&self) -> anyhow::Result<Mirror> {
        let mut rules: Vec<(bool, String)> = Vec::new();
        for path in &self.exclude_from {
            let patterns = Filter::read_patterns(path).context("--exclude-from")?;
            rules.extend(patterns.into_iter().map(|p| (false, p)));
        }
        rules.extend(self.exclude.iter().map(|p| (false, p.clone())));
        rules.extend(self.include.iter().map(|p| (true, p.clone())));
        Ok(Mirror {
            filter: Filter::new(rules)?,
            delete: self.delete,
            delete_excluded: self.delete_excluded,
            dry_run: self.dry_run,
        })
    }

    /// Prints `changes` as a dry run or `--itemize` asks. Returns true when it printed the
    /// command's JSON output (a dry run's array), so no summary is to follow.
    pub(crate) fn print_changes(&self, changes: &[Change], json: bool) -> anyhow::Result<bool> {
        let mut out = std::io::stdout().lock();
        if self.dry_run && json {
            let lines: Vec<ChangeLine> = changes.iter().map(ChangeLine::from).collect();
            serde_json::to_writer(&mut out, &lines)?;
            writeln!(out)?;
            return Ok(true);
        }
        if (self.dry_run || self.itemize) && !json {
            for change in changes {
                writeln!(out, "{}", itemize(change))?;
            }
        }
        Ok(false)
    }

    /// For one copy of `xfer copy -r`: prints its changes as lines, or with `--json` returns
    /// them for its row, as a dry run or `--itemize` asks.
    pub(crate) fn list_changes(&self, changes: &[Change], json: bool) -> Option<Vec<ChangeLine>> {
        if !(self.dry_run || self.itemize) {
            return None;
        }
        if json {
            return Some(changes.iter().map(ChangeLine::from).collect());
        }
        let mut out = std::io::stdout().lock();
        for change in changes {
            // A reader gone away (`| head`) is no reason to fail the copy.
            let _ = writeln!(out, "{}", itemize(change));
        }
        None
    }

    /// Reports a tree copy: its changes as a dry run or `--itemize` asks, then its summary
    /// (under `--json` with `--itemize`, with the changes in it). A copy that left out source
    /// entries it could not read ends in an error after its report.
    pub(crate) fn report(
        &self,
        report: &crate::output::Report,
        verb: &str,
        summary: &TreeSummary,
    ) -> anyhow::Result<()> {
        if !self.print_changes(&summary.changes, report.json)? {
            let json = self.summary_json(summary, &summary.changes)?;
            report.tree(verb, summary, &json)?;
        }
        match summary.unreadable_count() {
            None => Ok(()),
            Some(count) => {
                let s = if summary.entries_unreadable == 1 {
                    ""
                } else {
                    "s"
                };
                bail!("{count} (see the warning{s} above)")
            }
        }
    }

    /// `summary` as JSON, with its changes under "changes" when `--itemize` asks for them.
    fn summary_json(
        &self,
        summary: &impl serde::Serialize,
        changes: &[Change],
    ) -> anyhow::Result<serde_json::Value> {
        let mut value = serde_json::to_value(summary)?;
        if self.itemize {
            let lines: Vec<ChangeLine> = changes.iter().map(ChangeLine::from).collect();
            value["changes"] = serde_json::to_value(lines)?;
        }
        Ok(value)
    }
}
