//! Reading the shared token from a file, the same way for the daemon and the client.

use std::path::{Path, PathBuf};

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file cannot be read.
    #[error("reading token file {}: {source}", path.display())]
    Read {
        /// The token file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file holds nothing but whitespace.
    #[error("token file {}: it is empty", path.display())]
    Empty {
        /// The token file.
        path: PathBuf,
    },
}

/// Reads a token file: its contents without trailing whitespace, which must not be empty.
///
/// # Errors
/// The file cannot be read, or holds no token.
pub fn read_token_file(path: &Path) -> Result<Vec<u8>, TokenError> {
    let bytes = std::fs::read(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = trim_token(&bytes);
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_vec())
}

/// A token without the trailing newline or spaces an editor or `echo` adds.
pub fn trim_token(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_and_must_not_be_empty() {
        assert_eq!(trim_token(b"s3cret\n"), b"s3cret");
        assert_eq!(trim_token(b"a b \r\n"), b"a b");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token_file(&p).is_err());
        std::fs::write(&p, "tok\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), b"tok");
        assert!(read_token_file(&dir.path().join("missing")).is_err());
    }
}
