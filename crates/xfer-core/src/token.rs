//! Reading the shared token from a file, the same way for the daemon and the client.

use std::path::Path;

use crate::{CoreError, Result};

/// Reads a token file: its contents without trailing whitespace, which must not be empty.
///
/// # Errors
/// The file cannot be read, or holds no token.
pub fn read_token_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .map_err(|e| CoreError::io(format!("reading token file {}", path.display()), e))?;
    let token = trim_token(&bytes);
    if token.is_empty() {
        return Err(CoreError::io(
            format!("token file {}", path.display()),
            std::io::Error::other("it is empty"),
        ));
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
