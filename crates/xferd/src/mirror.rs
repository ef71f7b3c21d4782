//! The daemon's side of mirror copies: whether it carries out deletions (`--allow-delete`, never
//! under `--read-only`), a `MirrorTo` turned into the client library's [`xfer_client::Mirror`], and the
//! `Changes` pages that report what such a copy changed.

use xfer_proto::{Change, Changes, MirrorTo, MAX_LISTING_ENTRIES};

use crate::Config;

/// Bytes of changes in one `Changes` frame, about: well below the control frame limit.
const PAGE_BYTES: usize = 1 << 20;

/// Why this daemon refuses deletions, naming the setting; `None` when it allows them.
pub(crate) fn delete_refusal(config: &Config) -> Option<String> {
    if config.read_only {
        Some("deletion refused: the daemon runs --read-only (read_only = true)".into())
    } else if !config.allow_delete {
        Some(
            "deletion refused: the daemon runs without --allow-delete (allow_delete = false)"
                .into(),
        )
    } else {
        None
    }
}

/// The mirror a `MirrorTo` asks for, or why it cannot be carried out.
pub(crate) fn mirror_of(req: &MirrorTo) -> Result<xfer_client::Mirror, String> {
    if !req.copy.recursive {
        return Err("MirrorTo copies a tree: recursive must be set".into());
    }
    xfer_client::Mirror::from_wire(&req.rules, req.delete, req.delete_excluded, req.dry_run)
        .map_err(|e| e.to_string())
}

/// `changes` split into frames of at most `MAX_LISTING_ENTRIES` entries and about 1 MiB.
pub(crate) fn pages(changes: Vec<Change>) -> Vec<Changes> {
    let mut pages = Vec::new();
    let (mut page, mut bytes) = (Vec::new(), 0);
    for change in changes {
        let size = 32 + change.path.len() + change.target.len();
        if !page.is_empty() && (page.len() == MAX_LISTING_ENTRIES || bytes + size > PAGE_BYTES) {
            pages.push(Changes {
                changes: std::mem::take(&mut page),
            });
            bytes = 0;
        }
        bytes += size;
        page.push(change);
    }
    if !page.is_empty() {
        pages.push(Changes { changes: page });
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use xfer_proto::{ChangeAction, EntryKind};

    #[test]
    fn pages_respect_the_entry_limit() {
        let change = |i: usize| Change {
            action: ChangeAction::Delete,
            kind: EntryKind::File,
            differs: 0,
            path: format!("f{i}"),
            target: String::new(),
        };
        let pages = pages((0..MAX_LISTING_ENTRIES + 1).map(change).collect());
        let sizes: Vec<usize> = pages.iter().map(|p| p.changes.len()).collect();
        assert_eq!(sizes, [MAX_LISTING_ENTRIES, 1]);
        assert!(super::pages(Vec::new()).is_empty());
    }

    #[test]
    fn refusals_name_the_setting() {
        let mut config = Config::new(std::env::temp_dir()).unwrap();
        assert!(delete_refusal(&config).unwrap().contains("--allow-delete"));
        config.allow_delete = true;
        assert!(delete_refusal(&config).is_none());
        config.read_only = true;
        assert!(delete_refusal(&config).unwrap().contains("--read-only"));
    }
}
