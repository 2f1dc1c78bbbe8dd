//! A retired journal segment kept, zeroed, as the file of the next one, instead of deleted.
//!
//! Deleting a 64 MiB segment frees its blocks in the file system's own journal, and on a
//! disk mounted with `discard` (the default of many cloud images) the commit that trims
//! them held the journal's next `fdatasync`, the publish path, for 50–180 ms
//! (bench/analysis.md). A recycled file has its blocks allocated and zeroed already, so
//! appends into it change no metadata and `fdatasync` writes the data pages alone.
//!
//! The indexer, which retires segments once a checkpoint holds their rows, renames one
//! to [`SPARE`] (a name replay never reads), zeroes it and marks it ready; the writer, at
//! its next rotation, renames the ready spare into place as the new segment. A crash
//! leaves at most a spare of unknown content, which the next start deletes.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::journal::{JournalError, SegmentNo, segment_path, sync_dir, write_zeros};

/// The spare's file name in the store folder; `journal::segments` never lists it.
pub const SPARE: &str = "journal.spare";

/// How much of the spare is zeroed between two syncs.
const ZERO_SLICE: u64 = 1024 * 1024;

/// The one spare segment of a store, shared by its writer and its indexer.
pub struct Spare {
    dir: PathBuf,
    fsync: bool,
    state: Mutex<State>,
}

enum State {
    Empty,
    /// The indexer is zeroing it; the writer creates a new segment meanwhile.
    Zeroing,
    Ready {
        file: File,
        size: u64,
    },
}

impl Spare {
    /// Deletes a spare an earlier run left: its zeroing may not have finished.
    pub fn open(dir: &Path, fsync: bool) -> Result<Self, JournalError> {
        let spare = Self {
            dir: dir.to_path_buf(),
            fsync,
            state: Mutex::new(State::Empty),
        };
        spare.discard()?;
        Ok(spare)
    }

    fn path(&self) -> PathBuf {
        self.dir.join(SPARE)
    }

    fn err(&self) -> impl Fn(io::Error) -> JournalError + '_ {
        |source| JournalError::Io {
            path: self.path().display().to_string(),
            source,
        }
    }

    /// Keeps segment `no` (its rows are in a checkpointed index) as the spare when there is
    /// none: renamed, zeroed and synced. Answers false, touching nothing, when a spare
    /// exists already or the segment is gone. Runs on the indexer, off the publish path.
    pub fn recycle(&self, no: SegmentNo) -> Result<bool, JournalError> {
        let err = self.err();
        {
            let Ok(mut state) = self.state.lock() else {
                return Ok(false);
            };
            if !matches!(*state, State::Empty) {
                return Ok(false);
            }
            match std::fs::rename(segment_path(&self.dir, no), self.path()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(err(e)),
            }
            *state = State::Zeroing;
        }
        let zeroed = (|| {
            if self.fsync {
                // After a crash the file is the spare, never a half-zeroed segment.
                sync_dir(&self.dir)?;
            }
            let file = OpenOptions::new().write(true).open(self.path())?;
            let size = file.metadata()?.len();
            // In slices, each synced before the next: one 64 MiB flush kept the disk from
            // the journal's syncs as long as the delete did.
            let mut at = 0;
            while at < size {
                let end = (at + ZERO_SLICE).min(size);
                write_zeros(&file, at, end)?;
                if self.fsync {
                    file.sync_data()?;
                }
                at = end;
            }
            Ok((file, size))
        })();
        let Ok(mut state) = self.state.lock() else {
            return Ok(true);
        };
        match zeroed {
            Ok((file, size)) => {
                *state = State::Ready { file, size };
                Ok(true)
            }
            Err(e) => {
                *state = State::Empty;
                drop(state);
                let _ = std::fs::remove_file(self.path());
                Err(err(e))
            }
        }
    }

    /// The ready spare, renamed into place as segment `no` (the rename durable when
    /// syncing): its file and how far it is zeroed. `None` when no spare is ready.
    pub fn take_as(&self, no: SegmentNo) -> Result<Option<(File, u64)>, JournalError> {
        let Ok(mut state) = self.state.lock() else {
            return Ok(None);
        };
        let (file, size) = match std::mem::replace(&mut *state, State::Empty) {
            State::Ready { file, size } => (file, size),
            other => {
                *state = other;
                return Ok(None);
            }
        };
        let target = segment_path(&self.dir, no);
        let err = |source| JournalError::Io {
            path: target.display().to_string(),
            source,
        };
        std::fs::rename(self.path(), &target).map_err(err)?;
        if self.fsync {
            sync_dir(&self.dir).map_err(err)?;
        }
        Ok(Some((file, size)))
    }

    /// Deletes the spare, if any (a clean stop leaves none behind).
    pub fn discard(&self) -> Result<(), JournalError> {
        if let Ok(mut state) = self.state.lock() {
            *state = State::Empty;
        }
        match std::fs::remove_file(self.path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err()(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::journal::{Journal, Record, replay, segments};

    use bytestring::ByteString;

    use crate::ids::{Seq, UserId};

    fn record(seq: Seq) -> Record {
        Record {
            user: UserId::parse("alice").unwrap(),
            seq,
            ts_ms: 1_764_000_000_000 + seq as i64,
            frame: ByteString::from(format!(r#"{{"seq":{seq}}}"#)),
            key: None,
        }
    }

    fn replayed(dir: &Path) -> Vec<Seq> {
        let mut out = Vec::new();
        replay(dir, |r| out.push(r.seq)).unwrap();
        out
    }

    #[test]
    fn a_retired_segment_comes_back_zeroed_as_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let spare = std::sync::Arc::new(Spare::open(dir.path(), true).unwrap());
        let mut journal = Journal::create(dir.path(), true, spare.clone()).unwrap();
        journal.append(&[record(1), record(2), record(3)]).unwrap();
        let first = journal.rotate().unwrap();
        journal.append(&[record(4)]).unwrap();
        let first_size = std::fs::metadata(segment_path(dir.path(), first))
            .unwrap()
            .len();

        assert!(spare.recycle(first).unwrap(), "kept as the spare");
        assert!(!spare.recycle(first).unwrap(), "one spare at a time");
        assert_eq!(segments(dir.path()).unwrap(), vec![SegmentNo(2)]);
        assert_eq!(
            replayed(dir.path()),
            vec![4],
            "replay never reads the spare"
        );

        let second = journal.rotate().unwrap();
        assert_eq!(second, SegmentNo(2));
        journal.append(&[record(5)]).unwrap();
        let third = segment_path(dir.path(), SegmentNo(3));
        assert_eq!(
            std::fs::metadata(&third).unwrap().len(),
            first_size,
            "the spare's file, not a new one"
        );
        assert!(!dir.path().join(SPARE).exists());
        assert_eq!(
            replayed(dir.path()),
            vec![4, 5],
            "no record of the spare's earlier life"
        );
    }

    #[test]
    fn a_spare_left_by_a_crash_is_deleted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SPARE), b"half zeroed").unwrap();
        let spare = Spare::open(dir.path(), false).unwrap();
        assert!(!dir.path().join(SPARE).exists());
        assert!(spare.take_as(SegmentNo(1)).unwrap().is_none());
    }
}
