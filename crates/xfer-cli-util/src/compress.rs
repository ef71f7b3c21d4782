//! `--compress auto|off|LEVEL` and the `compress` key of both configuration files.

use xfer_net::Compression;

/// Highest level a user may ask for: zstd's levels above 19 need windows larger than a chunk
/// and gain nothing on one.
pub const MAX_LEVEL: u8 = 19;

/// Parses `auto`, `off` or a zstd level `1..=19`.
///
/// # Errors
/// A message naming what is accepted.
pub fn parse_compression(s: &str) -> Result<Compression, String> {
    match s.trim() {
        "auto" => Ok(Compression::Auto),
        "off" | "0" => Ok(Compression::Off),
        level => match level.parse::<u8>() {
            Ok(level @ 1..=MAX_LEVEL) => Ok(Compression::Level(level)),
            _ => Err(format!(
                "compression must be auto, off or a level from 1 to {MAX_LEVEL}, not {s:?}"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_levels_parse() {
        assert_eq!(parse_compression("auto"), Ok(Compression::Auto));
        assert_eq!(parse_compression("off"), Ok(Compression::Off));
        assert_eq!(parse_compression("3"), Ok(Compression::Level(3)));
        assert!(parse_compression("20").unwrap_err().contains("auto, off"));
        assert!(parse_compression("fast").is_err());
    }
}
