//! Names that are not UTF-8 (`CAP_RAW_NAMES`, proto.md §8.5): a file name on Linux is bytes,
//! a name on the wire is a UTF-8 string, and [`escape`] and [`unescape`] map one to the other
//! without loss, so that a tree whose names were written in Latin-1 arrives with them as they
//! were.
//!
//! Each byte that is not part of valid UTF-8 becomes one of 128 code points at the very end of
//! Unicode, `U+10FF80` to `U+10FFFF` ([`ESCAPED`]): byte `b` is `U+10FF00 + b`. A name that
//! itself holds one of those code points has each of its four UTF-8 bytes escaped the same
//! way, so that every code point of the range on the wire stands for exactly one byte and
//! [`unescape`] needs no context. Escapes never stand for an ASCII byte: `/`, `.`, NUL and the
//! reserved names read the same escaped or not.

use std::borrow::Cow;

/// The code points that stand for single bytes: `U+10FF00 + b` for `b` in `0x80..=0xFF`.
pub const ESCAPED: std::ops::RangeInclusive<u32> = 0x10_FF80..=0x10_FFFF;

/// Every code point of [`ESCAPED`] starts with this byte in UTF-8; a name without it holds no
/// escape, and most names take the borrowed path for that one byte search.
const ESCAPE_LEAD: u8 = 0xF4;

fn escaped_byte(c: char) -> Option<u8> {
    ESCAPED
        .contains(&u32::from(c))
        .then(|| (u32::from(c) - 0x10_FF00) as u8)
}

fn push_escaped(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        out.push(char::from_u32(0x10_FF00 + u32::from(b)).expect("U+10FF80..U+10FFFF are chars"));
    }
}

/// The wire form of the name `raw`: borrowed when `raw` is UTF-8 and holds no code point of
/// [`ESCAPED`], as nearly every name does.
pub fn escape(raw: &[u8]) -> Cow<'_, str> {
    if let Ok(s) = std::str::from_utf8(raw) {
        if !is_escaped(s) {
            return Cow::Borrowed(s);
        }
    }
    let mut out = String::with_capacity(raw.len() + 8);
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            match escaped_byte(c) {
                Some(_) => push_escaped(&mut out, c.encode_utf8(&mut [0; 4]).as_bytes()),
                None => out.push(c),
            }
        }
        push_escaped(&mut out, chunk.invalid());
    }
    Cow::Owned(out)
}

/// Whether `name` holds an escape: it then stands for bytes that are not UTF-8, or for a name
/// holding one of the escapes' own code points.
pub fn is_escaped(name: &str) -> bool {
    name.as_bytes().contains(&ESCAPE_LEAD) && name.chars().any(|c| escaped_byte(c).is_some())
}

/// The bytes the wire name `name` stands for: borrowed when it holds no escape.
pub fn unescape(name: &str) -> Cow<'_, [u8]> {
    if !is_escaped(name) {
        return Cow::Borrowed(name.as_bytes());
    }
    let mut out = Vec::with_capacity(name.len());
    for c in name.chars() {
        match escaped_byte(c) {
            Some(b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    Cow::Owned(out)
}

/// Whether `name` is the one wire form of the bytes it stands for: escapes that spell valid
/// UTF-8 of an ordinary character (`é` as two escapes) are not, and a server refuses them so
/// that no file has two names.
pub fn is_canonical(name: &str) -> bool {
    !is_escaped(name) || escape(&unescape(name)) == name
}

/// `name` for people: each escape shown as `\xHH`, the byte it stands for.
pub fn display(name: &str) -> Cow<'_, str> {
    if !is_escaped(name) {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match escaped_byte(c) {
            Some(b) => out.push_str(&format!("\\x{b:02x}")),
            None => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_names_are_their_own_wire_form() {
        for name in ["a/b.txt", "é/ü", "日本語", " lead", "x\ny"] {
            assert!(matches!(escape(name.as_bytes()), Cow::Borrowed(n) if n == name));
            assert!(matches!(unescape(name), Cow::Borrowed(b) if b == name.as_bytes()));
            assert!(is_canonical(name));
        }
    }

    #[test]
    fn latin1_bytes_travel_as_escapes_and_come_back() {
        let raw = b"caf\xe9/na\xefve\xff";
        let wire = escape(raw);
        assert!(is_escaped(&wire));
        assert!(wire.contains('/') && wire.starts_with("caf"));
        assert_eq!(&*unescape(&wire), raw);
        assert_eq!(display(&wire), "caf\\xe9/na\\xefve\\xff");
        assert!(is_canonical(&wire));
    }

    #[test]
    fn a_name_holding_an_escape_code_point_is_escaped_itself() {
        let literal = "x\u{10FF80}y\u{10FFFF}";
        let wire = escape(literal.as_bytes());
        assert_ne!(wire, literal);
        assert_eq!(&*unescape(&wire), literal.as_bytes());
        // Sent as they are, the code points would stand for the bytes 0x80 and 0xFF.
        assert_eq!(&*unescape(literal), b"x\x80y\xff");
    }

    #[test]
    fn escapes_that_spell_an_ordinary_character_are_refused() {
        let e_acute = escape(b"\xc3").into_owned() + &escape(b"\xa9");
        assert_eq!(&*unescape(&e_acute), "é".as_bytes());
        assert!(!is_canonical(&e_acute));
    }

    #[test]
    fn every_byte_string_comes_back_whole() {
        // A small linear congruential generator: many short byte strings, heavy in high bytes
        // and in the lead and continuation bytes of the escape range.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 33) as u32
        };
        let alphabet = [
            b'a', b'/', 0x80, 0x8F, 0xBE, 0xBF, 0xC3, 0xA9, 0xE9, 0xF4, 0xFF, 0xF0,
        ];
        for _ in 0..20_000 {
            let len = (next() % 12) as usize;
            let raw: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() as usize) % alphabet.len()])
                .collect();
            let wire = escape(&raw);
            assert_eq!(&*unescape(&wire), &raw[..], "{raw:x?}");
            assert!(is_canonical(&wire), "{raw:x?}");
            // Escapes never stand for ASCII: the separators read the same on both sides.
            assert_eq!(
                wire.matches('/').count(),
                raw.iter().filter(|&&b| b == b'/').count()
            );
        }
    }
}
