//! [`Filter`]: which entries of a tree a mirror copy leaves out (`--exclude`, `--include`,
//! `--exclude-from`), with gitignore-style globs matched by `globset`.
//!
//! Precedence, whatever the order of the flags: an entry is left out when it matches an
//! exclude pattern and no include pattern, or when a directory above it is left out (nothing
//! below an excluded directory is looked at, as with gitignore and rsync). So an `--include`
//! always wins over an `--exclude` that matches the same entry, and `--include '*/'
//! --include '*.c' --exclude '*'` keeps only C files.
//!
//! Pattern syntax (gitignore's): `*` and `?` never match `/`, `**` matches any number of
//! directories, `[abc]` a class. A pattern without a `/` matches the last component of a path
//! at any depth (`*.log`, `target`); a pattern with a `/` inside or at its start is anchored at
//! the top of the tree (`/build`, `docs/*.html`); a trailing `/` matches directories only.

use std::collections::HashSet;
use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A filter that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A pattern is not a valid glob.
    #[error("bad filter pattern {pattern:?}: {reason}")]
    BadPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An `--exclude-from` file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The patterns of one side (exclude or include): one set for every entry, one for directories
/// only (patterns ending in `/`).
#[derive(Debug, Clone)]
struct Patterns {
    any: GlobSet,
    dirs: GlobSet,
}

impl Patterns {
    fn build<'a>(patterns: impl Iterator<Item = &'a str>) -> Result<Self, FilterError> {
        let (mut any, mut dirs) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        for pattern in patterns {
            let (body, dir_only) = match pattern.strip_suffix('/') {
                Some(body) => (body, true),
                None => (pattern, false),
            };
            // Anchored at the top when a `/` is at the start or inside, else at any depth.
            let glob = match body.strip_prefix('/') {
                Some(anchored) => anchored.to_string(),
                None if body.contains('/') => body.to_string(),
                None => format!("**/{body}"),
            };
            let bad = |reason: String| FilterError::BadPattern {
                pattern: pattern.to_string(),
                reason,
            };
            if body.is_empty() || glob.is_empty() {
                return Err(bad("empty pattern".into()));
            }
            let glob = GlobBuilder::new(&glob)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| bad(e.kind().to_string()))?;
            if dir_only {
                dirs.add(glob);
            } else {
                any.add(glob);
            }
        }
        let built = |b: GlobSetBuilder| {
            b.build().map_err(|e| FilterError::BadPattern {
                pattern: e.glob().unwrap_or_default().to_string(),
                reason: e.kind().to_string(),
            })
        };
        Ok(Self {
            any: built(any)?,
            dirs: built(dirs)?,
        })
    }

    fn matches(&self, path: &str, is_dir: bool) -> bool {
        self.any.is_match(path) || (is_dir && self.dirs.is_match(path))
    }

    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.dirs.is_empty()
    }
}

/// Which entries of a tree a copy leaves out; see the module documentation for the rules.
#[derive(Debug, Clone)]
pub struct Filter {
    exclude: Patterns,
    include: Patterns,
    /// The rules as given, `(include, pattern)`: what a daemon doing the copy is sent.
    rules: Vec<(bool, String)>,
}

impl Default for Filter {
    fn default() -> Self {
        Self::new(std::iter::empty()).expect("no pattern cannot fail")
    }
}

impl Filter {
    /// A filter from `(include, pattern)` rules, in the order given (the order does not change
    /// the outcome).
    ///
    /// # Errors
    /// [`FilterError::BadPattern`] naming the first pattern that is not a valid glob.
    pub fn new(rules: impl IntoIterator<Item = (bool, String)>) -> Result<Self, FilterError> {
        let rules: Vec<(bool, String)> = rules.into_iter().collect();
        let side = |include: bool| {
            Patterns::build(
                rules
                    .iter()
                    .filter(move |(inc, _)| *inc == include)
                    .map(|(_, p)| p.as_str()),
            )
        };
        Ok(Self {
            exclude: side(false)?,
            include: side(true)?,
            rules,
        })
    }

    /// Reads exclude patterns from `path`, one per line; blank lines and lines starting with
    /// `#` are skipped, and a trailing `\r` is dropped.
    ///
    /// # Errors
    /// [`FilterError::Read`] if the file cannot be read.
    pub fn read_patterns(path: &Path) -> Result<Vec<String>, FilterError> {
        let text = std::fs::read_to_string(path).map_err(|source| FilterError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(text
            .lines()
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect())
    }

    /// The rules as given, `(include, pattern)`.
    pub fn rules(&self) -> &[(bool, String)] {
        &self.rules
    }

    /// True when the filter leaves nothing out.
    pub fn is_empty(&self) -> bool {
        self.exclude.is_empty()
    }

    /// True when the entry `path` (relative to the top of the tree; the top itself, `""`, is
    /// never excluded) matches an exclude pattern and no include pattern. Directories above it
    /// are not looked at: [`Filter::excluded_set`] does that for a whole listing.
    pub fn excludes(&self, path: &str, is_dir: bool) -> bool {
        !path.is_empty()
            && self.exclude.matches(path, is_dir)
            && !self.include.matches(path, is_dir)
    }

    /// The paths of a listing the filter leaves out, those below an excluded directory
    /// included. `entries` are `(path, is_dir)` with every directory before what is below it
    /// (the order of a tree listing).
    pub fn excluded_set<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a str, bool)>,
    ) -> HashSet<String> {
        let mut out = HashSet::new();
        if self.is_empty() {
            return out;
        }
        let mut dirs_out: HashSet<&str> = HashSet::new();
        for (path, is_dir) in entries {
            let under_excluded = ancestors(path).any(|a| dirs_out.contains(a));
            if under_excluded || self.excludes(path, is_dir) {
                if is_dir {
                    dirs_out.insert(path);
                }
                out.insert(path.to_string());
            }
        }
        out
    }
}

/// The directories above `path`, nearest first, the top (`""`) left out.
pub fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut rest = path;
    std::iter::from_fn(move || {
        let cut = rest.rfind('/')?;
        rest = &rest[..cut];
        Some(rest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(rules: &[(bool, &str)]) -> Filter {
        Filter::new(rules.iter().map(|(i, p)| (*i, (*p).to_string()))).unwrap()
    }

    #[test]
    fn basename_patterns_match_at_any_depth_and_anchored_ones_at_the_top() {
        let f = filter(&[(false, "*.log"), (false, "/build"), (false, "docs/*.html")]);
        assert!(f.excludes("a.log", false));
        assert!(f.excludes("x/y/a.log", false));
        assert!(!f.excludes("a.log.gz", false));
        assert!(f.excludes("build", true));
        assert!(!f.excludes("src/build", true));
        assert!(f.excludes("docs/i.html", false));
        assert!(!f.excludes("docs/sub/i.html", false));
        assert!(!f.excludes("", true));
    }

    #[test]
    fn a_trailing_slash_matches_directories_only() {
        let f = filter(&[(false, "cache/")]);
        assert!(f.excludes("a/cache", true));
        assert!(!f.excludes("a/cache", false));
    }

    #[test]
    fn an_include_wins_whatever_the_order() {
        for rules in [
            [(false, "*.log"), (true, "keep.log")],
            [(true, "keep.log"), (false, "*.log")],
        ] {
            let f = filter(&rules);
            assert!(!f.excludes("d/keep.log", false));
            assert!(f.excludes("d/other.log", false));
        }
        let only_c = filter(&[(true, "*/"), (true, "*.c"), (false, "*")]);
        assert!(!only_c.excludes("src", true));
        assert!(!only_c.excludes("src/main.c", false));
        assert!(only_c.excludes("src/main.h", false));
    }

    #[test]
    fn everything_below_an_excluded_directory_is_excluded() {
        let f = filter(&[(false, "build"), (true, "keep.txt")]);
        let listing = [
            ("", true),
            ("build", true),
            ("build/keep.txt", false),
            ("build/x/y", false),
            ("build-notes", false),
            ("src", true),
            ("src/keep.txt", false),
        ];
        let out = f.excluded_set(listing.iter().copied());
        let mut out: Vec<_> = out.into_iter().collect();
        out.sort();
        assert_eq!(out, ["build", "build/keep.txt", "build/x/y"]);
    }

    #[test]
    fn double_star_spans_directories() {
        let f = filter(&[(false, "a/**/z")]);
        assert!(f.excludes("a/z", false));
        assert!(f.excludes("a/b/c/z", false));
        assert!(!f.excludes("b/a/z", false));
    }

    #[test]
    fn bad_patterns_are_named() {
        let err = Filter::new([(false, "a[".to_string())]).unwrap_err();
        assert!(err.to_string().contains("\"a[\""), "{err}");
    }

    #[test]
    fn pattern_files_skip_comments_and_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ex");
        std::fs::write(&path, "# comment\n\n*.tmp\r\n  \ncache/\n").unwrap();
        assert_eq!(Filter::read_patterns(&path).unwrap(), ["*.tmp", "cache/"]);
    }
}
