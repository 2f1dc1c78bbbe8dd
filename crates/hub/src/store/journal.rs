//! The embedded store's append-only journal: an append is durable once its record is here.
//!
//! SQLite indexes the same rows later, off the publish path (see `sqlite.rs`); the journal
//! only has to survive until an index checkpoint holds them. Appending ~200 bytes and one
//! `fdatasync` per batch replaces a transaction that wrote a whole 4 KiB page per row.
//!
//! Segments are files `journal-<n>` in the store folder, written in order, each at most
//! [`SEGMENT_BYTES`] (one record may overrun it). A record is
//! `len: u32 | crc32(payload): u32 | payload`, little-endian; the payload is
//! `seq: u64 | ts_ms: i64 | user | frame | key | id`, each string as `len: u32 | bytes`
//! (`key` and `id` empty without an idempotency key). A crash can tear only the last
//! record of the last segment: reading stops there and the tail is cut off.
//!
//! Segments grow in zero-filled steps of [`ZEROED_AHEAD`], and records are written into
//! the zeros: an append that does not change the file's size makes `fdatasync` write the
//! data pages alone, not the inode too (one synchronous write less per batch). A zero
//! length marks the end of a segment's records. A retired segment comes back zeroed as
//! a later one's file (`spare.rs`), so in a steady state segments are neither deleted
//! nor grown.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytestring::ByteString;

use super::spare::Spare;
use crate::ids::{Seq, UserId};

/// A segment is sealed once it holds this much; sealed segments are retired (deleted, or
/// kept as the spare) after the index checkpoint that covers them. Bounds a restart's replay (~250,000 records) and the disk
/// the journal takes while the index keeps up.
/// 64 KiB in tests, so theirs rotate and recycle segments after a few hundred appends.
pub const SEGMENT_BYTES: u64 = if cfg!(test) {
    64 * 1024
} else {
    64 * 1024 * 1024
};
/// How far ahead of the records a segment is zero-filled.
pub const ZEROED_AHEAD: u64 = 1024 * 1024;
const PREFIX: &str = "journal-";
/// No record is this large (payloads are capped far below it); a length above it is a
/// torn or foreign tail, not a record.
const MAX_RECORD: u32 = 64 * 1024 * 1024;

/// One journaled append, as SQLite will index it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub user: UserId,
    pub seq: Seq,
    pub ts_ms: i64,
    pub frame: ByteString,
    /// The idempotency key and the publish's id, when the publish had a key.
    pub key: Option<(String, String)>,
}

/// A sealed or active segment, named by its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentNo(pub u64);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("journal {path} is corrupt at byte {offset}, before its last segment")]
    Corrupt { path: String, offset: u64 },
}

/// The active segment, appended to by the store's writer thread only.
pub struct Journal {
    dir: PathBuf,
    no: SegmentNo,
    file: File,
    /// Where the next record goes.
    len: u64,
    /// The file's size: zeros from `len` up to it.
    zeroed: u64,
    fsync: bool,
    buf: Vec<u8>,
    spare: Arc<Spare>,
}

impl Journal {
    /// Starts a new, empty segment after every existing one; later segments take
    /// `spare`'s file when one is ready.
    pub fn create(dir: &Path, fsync: bool, spare: Arc<Spare>) -> Result<Self, JournalError> {
        let next = segments(dir)?
            .last()
            .map_or(SegmentNo(1), |s| SegmentNo(s.0 + 1));
        Self::create_segment(dir, next, fsync, spare)
    }

    fn create_segment(
        dir: &Path,
        no: SegmentNo,
        fsync: bool,
        spare: Arc<Spare>,
    ) -> Result<Self, JournalError> {
        let path = segment_path(dir, no);
        let err = |source| JournalError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(err)?;
        if fsync {
            // The new name must survive a crash as surely as the records written into it.
            sync_dir(dir).map_err(err)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            no,
            file,
            len: 0,
            zeroed: 0,
            fsync,
            buf: Vec::new(),
            spare,
        })
    }

    /// Writes `records` and makes them durable (one `fdatasync`), or fails as a whole.
    /// After a failure nothing is known about what reached the disk: the caller must stop
    /// appending (a restart replays whatever is whole).
    pub fn append<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a Record>,
    ) -> Result<(), JournalError> {
        self.buf.clear();
        for record in records {
            encode(record, &mut self.buf);
        }
        let path = || segment_path(&self.dir, self.no).display().to_string();
        let end = self.len + self.buf.len() as u64;
        if end > self.zeroed {
            let zeroed = end + ZEROED_AHEAD;
            self.file
                .set_len(zeroed)
                .and_then(|()| write_zeros(&self.file, self.zeroed, zeroed))
                .map_err(|source| JournalError::Io {
                    path: path(),
                    source,
                })?;
            self.zeroed = zeroed;
        }
        write_all_at(&self.file, &self.buf, self.len).map_err(|source| JournalError::Io {
            path: path(),
            source,
        })?;
        if self.fsync {
            self.file.sync_data().map_err(|source| JournalError::Io {
                path: path(),
                source,
            })?;
        }
        self.len += self.buf.len() as u64;
        // A burst must not keep a large buffer for the rest of the process's life.
        if self.buf.capacity() > 1024 * 1024 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Whether the active segment is full and should be sealed.
    pub fn is_full(&self) -> bool {
        self.len >= SEGMENT_BYTES
    }

    /// Seals the active segment and starts the next; answers the sealed one.
    pub fn rotate(&mut self) -> Result<SegmentNo, JournalError> {
        let sealed = self.no;
        let next = SegmentNo(sealed.0 + 1);
        match self.spare.take_as(next)? {
            Some((file, zeroed)) => {
                self.no = next;
                self.file = file;
                self.len = 0;
                self.zeroed = zeroed;
            }
            None => {
                *self = Self::create_segment(&self.dir, next, self.fsync, self.spare.clone())?;
            }
        }
        Ok(sealed)
    }

    pub fn segment(&self) -> SegmentNo {
        self.no
    }
}

/// Makes the folder's entries (a created or renamed segment) durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Writes real zeros (not a hole, which the file system would still have to allocate).
pub(super) fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        write_all_at(file, &zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(unix)]
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(not(unix))]
fn write_all_at(mut file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    use std::io::{Seek, Write};
    file.seek(io::SeekFrom::Start(offset))?;
    file.write_all(buf)
}

/// Every segment in `dir`, oldest first.
pub fn segments(dir: &Path) -> Result<Vec<SegmentNo>, JournalError> {
    let err = |source| JournalError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let name = entry.map_err(err)?.file_name();
        let parsed = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(no) = parsed {
            found.push(SegmentNo(no));
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes the given segments (their records are in a checkpointed index).
pub fn remove(dir: &Path, sealed: &[SegmentNo]) -> Result<(), JournalError> {
    for &no in sealed {
        let path = segment_path(dir, no);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(JournalError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Reads every record of every segment, oldest first, into `each`. A torn record at the end
/// of the last segment is cut off (it was never acknowledged); one anywhere else is an error.
pub fn replay(dir: &Path, mut each: impl FnMut(Record)) -> Result<Vec<SegmentNo>, JournalError> {
    let all = segments(dir)?;
    for (i, &no) in all.iter().enumerate() {
        let path = segment_path(dir, no);
        let err = |source| JournalError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut reader = BufReader::new(File::open(&path).map_err(err)?);
        let mut offset = 0u64;
        while let Some(read) = read_record(&mut reader).map_err(err)? {
            match read {
                Found::Whole(record, size) => {
                    each(record);
                    offset += size;
                }
                Found::Torn if i + 1 == all.len() => {
                    tracing::warn!(path = %path.display(), offset, "journal ends in a torn record (a crash mid-write); cut off");
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(offset))
                        .map_err(err)?;
                    break;
                }
                Found::Torn => {
                    return Err(JournalError::Corrupt {
                        path: path.display().to_string(),
                        offset,
                    });
                }
            }
        }
    }
    Ok(all)
}

pub(super) fn segment_path(dir: &Path, no: SegmentNo) -> PathBuf {
    dir.join(format!("{PREFIX}{:08}", no.0))
}

fn encode(record: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&record.seq.to_le_bytes());
    out.extend_from_slice(&record.ts_ms.to_le_bytes());
    let (key, id) = record
        .key
        .as_ref()
        .map_or(("", ""), |(k, i)| (k.as_str(), i.as_str()));
    for s in [record.user.as_str(), &*record.frame, key, id] {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let payload = &out[start + 8..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What one read of a record found.
enum Found {
    Whole(Record, u64),
    Torn,
}

/// The next record; `None` at a clean end of the segment.
fn read_record(reader: &mut impl Read) -> io::Result<Option<Found>> {
    let mut header = [0u8; 8];
    match read_full(reader, &mut header)? {
        0 => return Ok(None),
        8 => {}
        _ => return Ok(Some(Found::Torn)),
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 {
        // The zero-filled space after the last record.
        return Ok(None);
    }
    if len > MAX_RECORD {
        return Ok(Some(Found::Torn));
    }
    let mut payload = vec![0u8; len as usize];
    if read_full(reader, &mut payload)? < payload.len() || crc32fast::hash(&payload) != crc {
        return Ok(Some(Found::Torn));
    }
    Ok(Some(decode(&payload).map_or(Found::Torn, |r| {
        Found::Whole(r, 8 + u64::from(len))
    })))
}

fn decode(payload: &[u8]) -> Option<Record> {
    let mut rest = payload;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let seq = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let ts_ms = i64::from_le_bytes(take(8)?.try_into().ok()?);
    let mut text = || -> Option<String> {
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        String::from_utf8(take(len)?.to_vec()).ok()
    };
    let (user, frame, key, id) = (text()?, text()?, text()?, text()?);
    Some(Record {
        user: UserId::parse(&user).ok()?,
        seq,
        ts_ms,
        frame: ByteString::from(frame),
        key: (!key.is_empty()).then_some((key, id)),
    })
}

/// Reads until `buf` is full or the input ends; answers how much it read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: Seq, key: Option<&str>) -> Record {
        Record {
            user: UserId::parse("alice").unwrap(),
            seq,
            ts_ms: 1_764_000_000_000 + seq as i64,
            frame: ByteString::from(format!(r#"{{"type":"notification","seq":{seq}}}"#)),
            key: key.map(|k| (k.to_owned(), format!("id-{seq}"))),
        }
    }

    fn create(dir: &Path, fsync: bool) -> Journal {
        let spare = Arc::new(Spare::open(dir, fsync).unwrap());
        Journal::create(dir, fsync, spare).unwrap()
    }

    fn replayed(dir: &Path) -> Result<Vec<Record>, JournalError> {
        let mut out = Vec::new();
        replay(dir, |r| out.push(r))?;
        Ok(out)
    }

    #[test]
    fn records_come_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = create(dir.path(), true);
        journal
            .append(&[record(1, None), record(2, Some("k"))])
            .unwrap();
        let sealed = journal.rotate().unwrap();
        journal.append(&[record(3, None)]).unwrap();
        assert_eq!(sealed, SegmentNo(1));
        assert_eq!(journal.segment(), SegmentNo(2));
        assert_eq!(
            replayed(dir.path()).unwrap(),
            vec![record(1, None), record(2, Some("k")), record(3, None)]
        );
        remove(dir.path(), &[sealed]).unwrap();
        assert_eq!(replayed(dir.path()).unwrap(), vec![record(3, None)]);
        assert_eq!(
            create(dir.path(), false).segment(),
            SegmentNo(3),
            "a new segment never reuses a number"
        );
    }

    #[test]
    fn a_torn_tail_of_the_last_segment_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = create(dir.path(), false);
        journal.append(&[record(1, None), record(2, None)]).unwrap();
        let path = segment_path(dir.path(), journal.segment());
        let whole = journal.len;
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            whole + ZEROED_AHEAD,
            "zero-filled ahead"
        );
        // A crash in the middle of the third record's write.
        let mut torn = Vec::new();
        encode(&record(3, None), &mut torn);
        write_all_at(&journal.file, &torn[..torn.len() / 2], whole).unwrap();
        assert_eq!(
            replayed(dir.path()).unwrap(),
            vec![record(1, None), record(2, None)]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole, "tail cut");
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = create(dir.path(), false);
        journal.append(&[record(1, None), record(2, None)]).unwrap();
        let path = segment_path(dir.path(), journal.segment());
        let mut bytes = std::fs::read(&path).unwrap();
        let last = journal.len as usize - 3;
        bytes[last] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(replayed(dir.path()).unwrap(), vec![record(1, None)]);
    }

    #[test]
    fn damage_before_the_last_segment_refuses_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = create(dir.path(), false);
        journal.append(&[record(1, None)]).unwrap();
        let first = segment_path(dir.path(), journal.rotate().unwrap());
        journal.append(&[record(2, None)]).unwrap();
        let mut bytes = std::fs::read(&first).unwrap();
        let last = bytes.iter().rposition(|&b| b != 0).unwrap();
        bytes[last] ^= 0x20;
        std::fs::write(&first, &bytes).unwrap();
        let err = replayed(dir.path()).unwrap_err();
        assert!(
            matches!(err, JournalError::Corrupt { offset: 0, .. }),
            "{err}"
        );
    }
}
