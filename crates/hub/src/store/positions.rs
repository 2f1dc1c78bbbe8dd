//! Where each user's indexed rows sit in the embedded store's SQLite table: their rowids in
//! seq order, held in memory in place of a B-tree on (user, seq) on disk.
//!
//! Why: rows append to the end of the `notifications` table, but an index on (user, seq)
//! puts every row's entry at its user's place. Once that index had more leaf pages than a
//! commit had rows, each row dirtied a 4 KiB page of its own, written to the WAL and again
//! by the checkpoint, and a commit's cost grew with the store (BENCHMARKS.md). Here a row
//! costs one 16-byte entry; the map is rebuilt by one scan of the table at open.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::ids::{Seq, UserId};

/// A row of the `notifications` table.
pub type RowId = i64;

/// Every user's indexed rows, `(seq, rowid)` in seq order. Only the indexer changes it, and
/// only with what it committed; readers take a copy of the part they need.
#[derive(Default)]
pub struct Positions(Mutex<HashMap<UserId, VecDeque<(Seq, RowId)>>>);

impl Positions {
    /// Takes each user's rows as a scan of the table found them (in seq order, unless a
    /// file was rebuilt out of order: then they are sorted here).
    pub fn new(mut users: HashMap<UserId, VecDeque<(Seq, RowId)>>) -> Self {
        for held in users.values_mut() {
            let slice = held.make_contiguous();
            if !slice.is_sorted() {
                slice.sort_unstable();
            }
            held.shrink_to_fit();
        }
        Self(Mutex::new(users))
    }

    /// The user's rows with a seq above `after`, oldest first.
    pub fn after(&self, user: &UserId, after: Seq) -> Vec<(Seq, RowId)> {
        let Ok(users) = self.0.lock() else {
            return Vec::new();
        };
        let Some(held) = users.get(user) else {
            return Vec::new();
        };
        let start = held.partition_point(|&(seq, _)| seq <= after);
        held.range(start..).copied().collect()
    }

    /// The user's rows with a seq up to `through`, oldest first.
    pub fn through(&self, user: &UserId, through: Seq) -> Vec<(Seq, RowId)> {
        let Ok(users) = self.0.lock() else {
            return Vec::new();
        };
        users.get(user).map_or_else(Vec::new, |held| {
            held.iter()
                .take_while(|&&(seq, _)| seq <= through)
                .copied()
                .collect()
        })
    }

    /// Records committed rows; each user's arrive in seq order, after the ones held.
    pub fn add(&self, rows: impl IntoIterator<Item = (UserId, Seq, RowId)>) {
        if let Ok(mut users) = self.0.lock() {
            for (user, seq, rowid) in rows {
                users.entry(user).or_default().push_back((seq, rowid));
            }
        }
    }

    /// Forgets deleted rows (nearly always the oldest of their user).
    pub fn remove(&self, rows: impl IntoIterator<Item = (UserId, Seq)>) {
        let Ok(mut users) = self.0.lock() else {
            return;
        };
        for (user, seq) in rows {
            let Some(held) = users.get_mut(&user) else {
                continue;
            };
            if held.front().is_some_and(|&(first, _)| first == seq) {
                held.pop_front();
            } else if let Ok(at) = held.binary_search_by_key(&seq, |&(s, _)| s) {
                held.remove(at);
            }
            if held.is_empty() {
                users.remove(&user);
            }
        }
    }

    /// How many rows are held, over all users.
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .map_or(0, |users| users.values().map(VecDeque::len).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    #[test]
    fn answers_a_users_rows_after_a_seq_in_order() {
        let positions = Positions::default();
        positions.add([
            (user("alice"), 1, 10),
            (user("bob"), 1, 11),
            (user("alice"), 2, 12),
            (user("alice"), 3, 14),
        ]);
        assert_eq!(
            positions.after(&user("alice"), 0),
            [(1, 10), (2, 12), (3, 14)]
        );
        assert_eq!(positions.after(&user("alice"), 1), [(2, 12), (3, 14)]);
        assert_eq!(positions.after(&user("alice"), 3), []);
        assert_eq!(positions.after(&user("carol"), 0), []);
        assert_eq!(positions.through(&user("alice"), 2), [(1, 10), (2, 12)]);
        assert_eq!(positions.len(), 4);
    }

    #[test]
    fn a_scan_out_of_seq_order_is_sorted() {
        let scanned = HashMap::from([(user("alice"), VecDeque::from([(3, 1), (1, 2), (2, 3)]))]);
        let positions = Positions::new(scanned);
        assert_eq!(positions.after(&user("alice"), 0), [(1, 2), (2, 3), (3, 1)]);
    }

    #[test]
    fn forgets_deleted_rows_and_users_left_with_none() {
        let positions = Positions::default();
        positions.add([
            (user("alice"), 1, 1),
            (user("alice"), 2, 2),
            (user("alice"), 3, 3),
        ]);
        positions.remove([(user("alice"), 1), (user("alice"), 3), (user("alice"), 9)]);
        assert_eq!(positions.after(&user("alice"), 0), [(2, 2)]);
        positions.remove([(user("alice"), 2)]);
        assert_eq!(positions.after(&user("alice"), 0), []);
        assert!(
            positions.0.lock().unwrap().is_empty(),
            "no empty entry is kept"
        );
    }
}
