//! POSIX ACLs as the kernel stores them (`system.posix_acl_access` and `_default`, in the
//! `posix_acl_xattr` encoding of `linux/posix_acl_xattr.h`) and as tree copies carry them: with
//! the names of their named user and group entries, so that the receiver maps them to its own
//! ids as it maps owners (by name, the number when the name is unknown, unless `--numeric-ids`).
//!
//! The kernel's value is a little-endian `u32` version (2) and entries of `u16` tag, `u16`
//! permissions and `u32` id. The *named* value (proto.md §6.10) is the version with bit 31 set,
//! a `u32` count, the same entries, then for each `ACL_USER` and `ACL_GROUP` entry in order a
//! `u8` length and that many bytes of its name (0: no name). Values that are neither are carried
//! as they are.

use crate::meta::NameTable;

/// The two attributes that hold ACLs.
pub fn is_acl(name: &str) -> bool {
    name == "system.posix_acl_access" || name == "system.posix_acl_default"
}

const KERNEL_VERSION: u32 = 2;
const NAMED_VERSION: u32 = KERNEL_VERSION | 1 << 31;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;
const ENTRY_LEN: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
    /// The name of a named user or group entry; empty when it has none (or is not named).
    name: String,
}

impl Entry {
    fn is_named(&self) -> bool {
        matches!(self.tag, ACL_USER | ACL_GROUP)
    }
}

fn u32_at(value: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(value.get(at..at + 4)?.try_into().ok()?))
}

fn entries_at(value: &[u8], at: usize, count: usize) -> Option<Vec<Entry>> {
    let raw = value.get(at..at.checked_add(count.checked_mul(ENTRY_LEN)?)?)?;
    Some(
        raw.chunks_exact(ENTRY_LEN)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                name: String::new(),
            })
            .collect(),
    )
}

/// The entries of a kernel or named value; `None` for anything else.
fn parse(value: &[u8]) -> Option<Vec<Entry>> {
    match u32_at(value, 0)? {
        KERNEL_VERSION if (value.len() - 4) % ENTRY_LEN == 0 => {
            entries_at(value, 4, (value.len() - 4) / ENTRY_LEN)
        }
        NAMED_VERSION => {
            let count = u32_at(value, 4)? as usize;
            let mut entries = entries_at(value, 8, count)?;
            let mut at = 8 + count * ENTRY_LEN;
            for entry in entries.iter_mut().filter(|e| e.is_named()) {
                let len = *value.get(at)? as usize;
                let name = value.get(at + 1..at + 1 + len)?;
                entry.name = String::from_utf8(name.to_vec()).ok()?;
                at += 1 + len;
            }
            (at == value.len()).then_some(entries)
        }
        _ => None,
    }
}

fn put_entries(out: &mut Vec<u8>, entries: &[Entry]) {
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        out.extend_from_slice(&e.id.to_le_bytes());
    }
}

fn kernel(entries: &[Entry]) -> Vec<u8> {
    let mut out = KERNEL_VERSION.to_le_bytes().to_vec();
    put_entries(&mut out, entries);
    out
}

fn named(entries: &[Entry]) -> Vec<u8> {
    let mut out = NAMED_VERSION.to_le_bytes().to_vec();
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    put_entries(&mut out, entries);
    for e in entries.iter().filter(|e| e.is_named()) {
        // A name longer than a length byte can say travels as none: the id stands for it.
        let name = if e.name.len() <= usize::from(u8::MAX) {
            e.name.as_bytes()
        } else {
            &[]
        };
        out.push(name.len() as u8);
        out.extend_from_slice(name);
    }
    out
}

/// The named value of an ACL `value` as this system names its ids (a value that is no ACL is
/// returned as it is).
pub fn with_names(value: &[u8], names: &mut impl NameTable) -> Vec<u8> {
    let Some(mut entries) = parse(value) else {
        return value.to_vec();
    };
    for e in &mut entries {
        e.name = match e.tag {
            ACL_USER => names.user_name(e.id),
            ACL_GROUP => names.group_name(e.id),
            _ => String::new(),
        };
    }
    named(&entries)
}

/// The kernel's value of an ACL `value`, names dropped and ids as they are: what a peer that
/// does not know named values is sent.
pub fn without_names(value: &[u8]) -> Vec<u8> {
    match parse(value) {
        Some(entries) => kernel(&entries),
        None => value.to_vec(),
    }
}

/// The kernel's value to store for an ACL `value` received from a peer: each named entry gets
/// the local id of its name as owners do ([`crate::meta::local_id`]), unless `numeric_ids`.
pub fn to_local(value: &[u8], numeric_ids: bool, names: &mut impl NameTable) -> Vec<u8> {
    let Some(mut entries) = parse(value) else {
        return value.to_vec();
    };
    if !numeric_ids {
        for e in &mut entries {
            e.id = match e.tag {
                ACL_USER => crate::meta::local_id(e.id, &e.name, |n| names.user_id(n)),
                ACL_GROUP => crate::meta::local_id(e.id, &e.name, |n| names.group_id(n)),
                _ => e.id,
            };
        }
    }
    kernel(&entries)
}

/// True when the ACL values `a` and `b` grant the same: entries compared by name where both
/// have one and `by_name`, else by id. Values that are no ACL compare as bytes.
pub fn same(a: &[u8], b: &[u8], by_name: bool) -> bool {
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter().zip(&b).all(|(x, y)| {
                    let names = by_name && !x.name.is_empty() && !y.name.is_empty();
                    x.tag == y.tag
                        && x.perm == y.perm
                        && if names {
                            x.name == y.name
                        } else {
                            x.id == y.id
                        }
                })
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A name table of its own, as another machine would have.
    #[derive(Default)]
    struct Table {
        users: HashMap<u32, &'static str>,
        groups: HashMap<u32, &'static str>,
    }

    impl NameTable for Table {
        fn user_name(&mut self, uid: u32) -> String {
            self.users.get(&uid).map_or("", |n| n).to_string()
        }
        fn group_name(&mut self, gid: u32) -> String {
            self.groups.get(&gid).map_or("", |n| n).to_string()
        }
        fn user_id(&mut self, name: &str) -> Option<u32> {
            self.users
                .iter()
                .find(|(_, n)| **n == name)
                .map(|(id, _)| *id)
        }
        fn group_id(&mut self, name: &str) -> Option<u32> {
            self.groups
                .iter()
                .find(|(_, n)| **n == name)
                .map(|(id, _)| *id)
        }
    }

    const UNDEFINED: u32 = u32::MAX;

    /// `user::rw- user:ID1:r-- group::r-- group:ID2:rw- mask::rw- other::---`, as the kernel
    /// stores it.
    fn acl(user: u32, group: u32) -> Vec<u8> {
        let entry = |tag: u16, perm: u16, id: u32| Entry {
            tag,
            perm,
            id,
            name: String::new(),
        };
        kernel(&[
            entry(0x01, 6, UNDEFINED),
            entry(ACL_USER, 4, user),
            entry(0x04, 4, UNDEFINED),
            entry(ACL_GROUP, 6, group),
            entry(0x10, 6, UNDEFINED),
            entry(0x20, 0, UNDEFINED),
        ])
    }

    fn here() -> Table {
        Table {
            users: HashMap::from([(1000, "alice"), (1001, "bob")]),
            groups: HashMap::from([(100, "staff")]),
        }
    }

    fn there() -> Table {
        Table {
            users: HashMap::from([(2000, "alice"), (1000, "carol")]),
            groups: HashMap::from([(300, "staff")]),
        }
    }

    #[test]
    fn the_kernel_encoding_is_read_and_written_back_unchanged() {
        let value = acl(1000, 100);
        assert_eq!(value.len(), 4 + 6 * ENTRY_LEN);
        assert_eq!(&value[..4], &[2, 0, 0, 0]);
        assert_eq!(
            &value[12..20],
            &[2, 0, 4, 0, 0xe8, 3, 0, 0],
            "user:1000:r--"
        );
        assert_eq!(kernel(&parse(&value).unwrap()), value);
        assert_eq!(without_names(&value), value);
    }

    #[test]
    fn named_entries_are_mapped_by_name_with_the_number_as_fallback() {
        let sent = with_names(&acl(1000, 100), &mut here());
        assert_eq!(&sent[..4], &NAMED_VERSION.to_le_bytes());
        assert!(sent.ends_with(b"\x05alice\x05staff"));
        assert_eq!(
            without_names(&sent),
            acl(1000, 100),
            "names dropped, ids kept"
        );
        // alice is 2000 there, staff 300.
        assert_eq!(to_local(&sent, false, &mut there()), acl(2000, 300));
        // --numeric-ids keeps the numbers, even where they name someone else.
        assert_eq!(to_local(&sent, true, &mut there()), acl(1000, 100));
        // A name unknown there, or none at all, keeps the number.
        let nobody = with_names(&acl(1001, 7), &mut here());
        assert_eq!(to_local(&nobody, false, &mut there()), acl(1001, 7));
        // A kernel value from a peer without names keeps its numbers.
        assert_eq!(
            to_local(&acl(1000, 100), false, &mut there()),
            acl(1000, 100)
        );
    }

    #[test]
    fn values_compare_by_name_unless_numeric() {
        let mine = with_names(&acl(1000, 100), &mut here());
        let theirs = with_names(&acl(2000, 300), &mut there());
        assert!(same(&mine, &theirs, true), "the same people, other numbers");
        assert!(!same(&mine, &theirs, false));
        assert!(same(&mine, &acl(1000, 100), false));
        let carol = with_names(&acl(1000, 300), &mut there());
        assert!(!same(&mine, &carol, true), "user 1000 is carol there");
    }

    #[test]
    fn what_is_no_acl_travels_as_it_is() {
        for odd in [
            &b""[..],
            b"\x02\x00\x00\x00\x01",
            b"\x03\x00\x00\x00",
            b"\x02\x00\x00\x80\x09",
        ] {
            assert_eq!(with_names(odd, &mut here()), odd);
            assert_eq!(to_local(odd, false, &mut there()), odd);
            assert_eq!(without_names(odd), odd);
        }
        let mut cut = with_names(&acl(1000, 100), &mut here());
        cut.pop();
        assert_eq!(to_local(&cut, false, &mut there()), cut);
    }
}
