//! [`RangeSet`]: the set of byte ranges a side holds, kept sorted and coalesced.

use std::collections::BTreeMap;

use xfer_proto::ByteRange;

/// Disjoint, non-adjacent byte ranges, keyed by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `range`, merging it with any range it overlaps or touches.
    pub fn insert(&mut self, range: ByteRange) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // The range starting at or before `start` may overlap or touch us.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
                self.total -= e - s;
            }
        }
        // Every range starting inside [start, end] is absorbed.
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            end = end.max(e);
            self.ranges.remove(&s);
            self.total -= e - s;
        }
        self.ranges.insert(start, end);
        self.total += end - start;
    }

    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// True when `range` lies entirely inside the set.
    pub fn contains(&self, range: ByteRange) -> bool {
        range.is_empty()
            || self
                .ranges
                .range(..=range.start)
                .next_back()
                .is_some_and(|(_, &e)| e >= range.end)
    }

    /// The range that contains `pos`, if any.
    pub fn range_at(&self, pos: u64) -> Option<ByteRange> {
        self.ranges
            .range(..=pos)
            .next_back()
            .filter(|(_, &e)| e > pos)
            .map(|(&s, &e)| ByteRange::new(s, e))
    }

    /// The ranges, sorted.
    pub fn iter(&self) -> impl Iterator<Item = ByteRange> + '_ {
        self.ranges.iter().map(|(&s, &e)| ByteRange::new(s, e))
    }

    /// The ranges of `[0, size)` not in the set, sorted.
    pub fn missing(&self, size: u64) -> Vec<ByteRange> {
        let mut out = Vec::new();
        let mut pos = 0;
        for r in self.iter() {
            if r.start >= size {
                break;
            }
            if r.start > pos {
                out.push(ByteRange::new(pos, r.start));
            }
            pos = pos.max(r.end);
        }
        if pos < size {
            out.push(ByteRange::new(pos, size));
        }
        out
    }

    /// Builds a set from ranges in any order.
    pub fn from_ranges(ranges: impl IntoIterator<Item = ByteRange>) -> Self {
        let mut set = Self::new();
        for r in ranges {
            set.insert(r);
        }
        set
    }
}

/// Splits `ranges` into chunks of at most `chunk_size` bytes, in order.
pub fn split_into_chunks(ranges: &[ByteRange], chunk_size: u32) -> Vec<ByteRange> {
    let step = u64::from(chunk_size.max(1));
    let mut out = Vec::new();
    for r in ranges {
        let mut pos = r.start;
        while pos < r.end {
            let end = (pos + step).min(r.end);
            out.push(ByteRange::new(pos, end));
            pos = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: u64, e: u64) -> ByteRange {
        ByteRange::new(s, e)
    }

    #[test]
    fn insert_merges_overlapping_and_adjacent() {
        let mut set = RangeSet::new();
        set.insert(r(10, 20));
        set.insert(r(30, 40));
        assert_eq!(set.total(), 20);
        set.insert(r(20, 30));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![r(10, 40)]);
        set.insert(r(0, 5));
        set.insert(r(3, 12));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![r(0, 40)]);
        set.insert(r(15, 25));
        set.insert(r(0, 0));
        assert_eq!(set.total(), 40);
        set.insert(r(50, 60));
        set.insert(r(45, 70));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![r(0, 40), r(45, 70)]);
        assert_eq!(set.total(), 65);
    }

    #[test]
    fn missing_is_the_complement() {
        let set = RangeSet::from_ranges([r(10, 20), r(30, 40)]);
        assert_eq!(set.missing(50), vec![r(0, 10), r(20, 30), r(40, 50)]);
        assert_eq!(set.missing(35), vec![r(0, 10), r(20, 30)]);
        assert_eq!(RangeSet::new().missing(0), vec![]);
        assert_eq!(RangeSet::from_ranges([r(0, 9)]).missing(9), vec![]);
    }

    #[test]
    fn contains_checks_whole_range() {
        let set = RangeSet::from_ranges([r(10, 20)]);
        assert!(set.contains(r(10, 20)));
        assert!(set.contains(r(12, 13)));
        assert!(!set.contains(r(9, 12)));
        assert!(!set.contains(r(15, 21)));
        assert_eq!(set.range_at(10), Some(r(10, 20)));
        assert_eq!(set.range_at(19), Some(r(10, 20)));
        assert_eq!(set.range_at(20), None);
        assert_eq!(set.range_at(9), None);
    }

    #[test]
    fn chunks_cover_ranges_exactly() {
        let chunks = split_into_chunks(&[r(0, 10), r(20, 25)], 4);
        assert_eq!(
            chunks,
            vec![r(0, 4), r(4, 8), r(8, 10), r(20, 24), r(24, 25)]
        );
    }
}
