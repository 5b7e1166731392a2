//! The JSON Lines log: `audit.jsonl`, rotated by size into
//! `audit-<first seq, 20 digits>.jsonl` files that are never renamed again
//! (so lexicographic order is chronological and a file's name says which
//! record must open it).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::chain::SealedRecord;
use crate::read::{BackwardLines, ForwardLines, LineBytes};

/// The live file's name.
pub const LIVE_FILE: &str = "audit.jsonl";

/// Mode of the log files: the owner (root) writes, a group of admins may
/// read.
const FILE_MODE: u32 = 0o640;
/// Mode of a log directory the log creates itself.
const DIR_MODE: u32 = 0o750;

/// Rotation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// No file grows past this many bytes: a batch that would take the
    /// live file past it is split, the rest going to a fresh file. Only a
    /// single record longer than this (records are bounded, see
    /// [`crate::MAX_STRING_BYTES`]) makes a file larger, alone. Default 16 MiB.
    pub max_file_bytes: u64,
    /// Rotated files kept; older ones are deleted after each rotation.
    /// 0 acts as 1. Default 10.
    pub keep_files: usize,
}

impl LogOptions {
    /// The most bytes the log keeps, rotated files and live file together:
    /// `max_file_bytes × (keep_files + 1)`. Retention deletes the oldest
    /// rotated files past it, and past `keep_files`.
    pub fn max_total_bytes(&self) -> u64 {
        let files = u64::try_from(self.keep_files.max(1)).unwrap_or(u64::MAX);
        self.max_file_bytes.saturating_mul(files.saturating_add(1))
    }
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            max_file_bytes: 16 * 1024 * 1024,
            keep_files: 10,
        }
    }
}

/// What opening the log found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Bytes cut from the end of the live file: a last line without its
    /// newline, and then a last line that is not a record (a crash in the
    /// middle of a write can leave either, e.g. zeros where data was not
    /// flushed). The records they held are re-appended from the outbox.
    pub torn_bytes_removed: u64,
}

/// Rotated files that retention is about to delete, and the first record
/// the log keeps after it ([`AuditLog::retention_due`]). The daemon seals a
/// record of it into the chain *before* the files go, so `verify` can tell
/// retention from someone deleting the oldest files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// The files to delete, oldest first.
    pub files: Vec<PathBuf>,
    /// The seq of the oldest record kept.
    pub first_kept_seq: u64,
}

/// The log writer. One per daemon; readers need none.
#[derive(Debug)]
pub struct AuditLog {
    dir: PathBuf,
    live: PathBuf,
    options: LogOptions,
    /// `None` after a rotation that could neither finish nor be undone:
    /// the next append opens a fresh live file rather than write on into a
    /// rotated one.
    file: Option<File>,
    size: u64,
    /// The live file's first record, which names it when it is rotated.
    first_seq: Option<u64>,
    /// The log's last record: seq and hash.
    last: Option<(u64, String)>,
    /// Retention is left to the caller ([`AuditLog::retention_due`],
    /// [`AuditLog::apply_retention`]) rather than done at each rotation.
    caller_retention: bool,
    /// Rotations so far (this process): a caller doing retention need not
    /// list the directory after a batch that rotated nothing.
    rotations: u64,
}

/// An io error that names the path and what was being done.
pub(crate) fn io_context(path: &Path, what: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{what} {}: {error}", path.display()))
}

/// The two chain fields the writer and readers need from a line, parsed
/// without building the whole record.
#[derive(Deserialize)]
struct ChainFields {
    seq: u64,
    hash: String,
}

/// `(seq, hash)` of a line, `None` when it is not a record.
pub(crate) fn chain_fields(line: &[u8]) -> Option<(u64, String)> {
    serde_json::from_slice::<ChainFields>(line)
        .ok()
        .map(|f| (f.seq, f.hash))
}

/// `seq` of a line, `None` when it is not a record.
pub(crate) fn seq_of(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(line).ok().map(|s| s.seq)
}

fn is_record(line: &LineBytes) -> bool {
    line.as_deref().and_then(chain_fields).is_some()
}

/// The name of a rotated file whose first record is `first_seq`.
fn rotated_name(first_seq: u64) -> String {
    format!("audit-{first_seq:020}.jsonl")
}

/// The first seq a rotated file's name promises; `None` for other names.
pub(crate) fn rotated_first_seq(path: &Path) -> Option<u64> {
    let digits = path
        .file_name()?
        .to_str()?
        .strip_prefix("audit-")?
        .strip_suffix(".jsonl")?;
    // Exactly 20 digits, or lexicographic order would not be numeric order.
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The log's files, oldest first: rotated files by name, then the live file
/// (if it exists). Other files in `dir` are ignored.
pub fn log_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| io_context(dir, "cannot list", e))?;
    for entry in entries {
        let path = entry.map_err(|e| io_context(dir, "cannot list", e))?.path();
        if rotated_first_seq(&path).is_some() {
            files.push(path);
        }
    }
    files.sort();
    let live = dir.join(LIVE_FILE);
    if live.exists() {
        files.push(live);
    }
    Ok(files)
}

/// Opens the live file for appending, creating it with [`FILE_MODE`]
/// (whatever the umask) if needed.
fn open_live(path: &Path) -> io::Result<File> {
    let created = OpenOptions::new()
        .append(true)
        .read(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path);
    match created {
        Ok(file) => {
            file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
                .map_err(|e| io_context(path, "cannot set the mode of", e))?;
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new()
            .append(true)
            .read(true)
            .open(path)
            .map_err(|e| io_context(path, "cannot open", e)),
        Err(e) => Err(io_context(path, "cannot create", e)),
    }
}

/// Makes renames and creations in `dir` durable. Best effort: the records
/// themselves are synced, and the outbox has them anyway.
fn sync_dir(dir: &Path) {
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// Cuts a torn end off the file: bytes after the last newline, then a last
/// line that is not a record. Returns the new length.
fn cut_torn_end(file: &File, size: u64) -> io::Result<u64> {
    let mut lines = BackwardLines::new(file, size);
    let Some(after_last_newline) = lines.prev()? else {
        return Ok(size);
    };
    let mut keep = after_last_newline.start;
    if let Some(last) = lines.prev()?
        && !is_record(&last.bytes)
    {
        keep = last.start;
    }
    if keep < size {
        file.set_len(keep)?;
        file.sync_data()?;
    }
    Ok(keep)
}

/// The last line of `file` (before `end`) that is a record.
fn last_record_in(file: &File, end: u64) -> io::Result<Option<(u64, String)>> {
    let mut lines = BackwardLines::new(file, end);
    while let Some(line) = lines.prev()? {
        if let Some(fields) = line.bytes.as_deref().and_then(chain_fields) {
            return Ok(Some(fields));
        }
    }
    Ok(None)
}

/// The seq of the first line of `path` that is a record.
fn first_record_seq(path: &Path) -> io::Result<Option<u64>> {
    let file = File::open(path).map_err(|e| io_context(path, "cannot open", e))?;
    let mut lines = ForwardLines::new(file);
    while let Some((_, line, _)) = lines
        .next_line()
        .map_err(|e| io_context(path, "cannot read", e))?
    {
        if let Some(seq) = line.as_deref().and_then(seq_of) {
            return Ok(Some(seq));
        }
    }
    Ok(None)
}

/// The log's last record: in the live file, or else in the newest rotated
/// file that has one (the live file is empty just after a rotation).
fn last_record(dir: &Path, live: &File, live_size: u64) -> io::Result<Option<(u64, String)>> {
    let live_path = dir.join(LIVE_FILE);
    if let Some(last) =
        last_record_in(live, live_size).map_err(|e| io_context(&live_path, "cannot read", e))?
    {
        return Ok(Some(last));
    }
    for path in log_files(dir)?.iter().rev() {
        if rotated_first_seq(path).is_none() {
            continue;
        }
        let file = File::open(path).map_err(|e| io_context(path, "cannot open", e))?;
        let size = file
            .metadata()
            .map_err(|e| io_context(path, "cannot stat", e))?
            .len();
        if let Some(last) =
            last_record_in(&file, size).map_err(|e| io_context(path, "cannot read", e))?
        {
            return Ok(Some(last));
        }
    }
    Ok(None)
}

impl AuditLog {
    /// Opens the log in `dir`, creating the directory (mode 0750) and the
    /// live file (mode 0640) if needed, and cutting off a torn end left by
    /// a crash (see [`OpenReport`]).
    pub fn open(dir: &Path, options: LogOptions) -> io::Result<(AuditLog, OpenReport)> {
        if !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(|e| io_context(dir, "cannot create", e))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                .map_err(|e| io_context(dir, "cannot set the mode of", e))?;
        }
        let live = dir.join(LIVE_FILE);
        let file = open_live(&live)?;
        sync_dir(dir);
        let found_size = file
            .metadata()
            .map_err(|e| io_context(&live, "cannot stat", e))?
            .len();
        let size = cut_torn_end(&file, found_size)
            .map_err(|e| io_context(&live, "cannot cut the torn end of", e))?;
        let report = OpenReport {
            torn_bytes_removed: found_size - size,
        };
        let first_seq = first_record_seq(&live)?;
        let last = last_record(dir, &file, size)?;
        let log = AuditLog {
            dir: dir.to_owned(),
            live,
            options: LogOptions {
                keep_files: options.keep_files.max(1),
                ..options
            },
            file: Some(file),
            size,
            first_seq,
            last,
            caller_retention: false,
            rotations: 0,
        };
        Ok((log, report))
    }

    /// The last record's sequence number, if the log has any record.
    pub fn last_seq(&self) -> Option<u64> {
        self.last.as_ref().map(|(seq, _)| *seq)
    }

    /// The last record's hash, if the log has any record.
    pub fn last_hash(&self) -> Option<&str> {
        self.last.as_ref().map(|(_, hash)| hash.as_str())
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends a batch with one `fdatasync`, rotating whenever the next
    /// records would take the live file past its size limit (so a large
    /// batch is split across files, each written with one write).
    ///
    /// Records are written as given: the caller seals them in order. If a
    /// write fails, the file is cut back to where it was, so a later batch
    /// does not land on half a line; if only the sync fails, the records
    /// are in the file but may not survive a crash, and an error is
    /// returned.
    pub fn append(&mut self, records: &[SealedRecord]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            self.reopen()?;
        }
        let mut rest = records;
        while !rest.is_empty() {
            let room = self.options.max_file_bytes.saturating_sub(self.size);
            let mut fits = 0;
            let mut len = 0u64;
            for record in rest {
                let next = record.line.len() as u64 + 1;
                // An empty file takes at least one record, however long.
                if len + next > room && !(fits == 0 && self.size == 0) {
                    break;
                }
                len += next;
                fits += 1;
            }
            if fits == 0 {
                self.rotate()?;
                continue;
            }
            let (chunk, after) = rest.split_at(fits);
            self.write_chunk(chunk)?;
            rest = after;
        }
        let Some(file) = &self.file else {
            return Ok(());
        };
        file.sync_data()
            .map_err(|e| io_context(&self.live, "cannot sync", e))
    }

    /// Writes records to the live file with one write.
    fn write_chunk(&mut self, records: &[SealedRecord]) -> io::Result<()> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let mut buf = Vec::with_capacity(records.iter().map(|r| r.line.len() + 1).sum());
        for record in records {
            buf.extend_from_slice(record.line.as_bytes());
            buf.push(b'\n');
        }
        let Some(file) = &mut self.file else {
            return Err(io::Error::other(format!(
                "cannot write {}: not open",
                self.live.display()
            )));
        };
        if let Err(e) = file.write_all(&buf) {
            let _ = file.set_len(self.size);
            return Err(io_context(&self.live, "cannot write", e));
        }
        self.size += buf.len() as u64;
        self.first_seq.get_or_insert(first.seq);
        self.last = Some((last.seq, last.hash.clone()));
        Ok(())
    }

    /// Opens the live file again (after a failed rotation, or when the
    /// one open is no longer `audit.jsonl`), and finds the log's last
    /// record anew.
    fn reopen(&mut self) -> io::Result<()> {
        let file = open_live(&self.live)?;
        sync_dir(&self.dir);
        self.size = file
            .metadata()
            .map_err(|e| io_context(&self.live, "cannot stat", e))?
            .len();
        self.first_seq = first_record_seq(&self.live)?;
        self.last = last_record(&self.dir, &file, self.size)?;
        self.file = Some(file);
        Ok(())
    }

    /// Checks that the file open is still `audit.jsonl`. When it was
    /// deleted, renamed or replaced under the writer (which would keep
    /// writing into a file nobody can read), opens `audit.jsonl` again
    /// (creating it) and returns true: [`AuditLog::last_seq`] then says
    /// what the log holds now, so the caller can write again, from its
    /// own copy, the records that were lost with the file.
    pub fn check_live(&mut self) -> io::Result<bool> {
        let Some(file) = &self.file else {
            return Ok(false);
        };
        let open = file
            .metadata()
            .map_err(|e| io_context(&self.live, "cannot stat", e))?;
        let same = match fs::symlink_metadata(&self.live) {
            Ok(now) => (now.dev(), now.ino()) == (open.dev(), open.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_context(&self.live, "cannot stat", e)),
        };
        if same {
            return Ok(false);
        }
        self.file = None;
        self.reopen()?;
        Ok(true)
    }

    /// How many times this log rotated its live file since it was opened.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Leaves retention to the caller: rotations no longer delete old
    /// files; [`AuditLog::retention_due`] says which to delete, and
    /// [`AuditLog::apply_retention`] deletes them. The daemon does this so
    /// that each deletion is recorded in the chain before it happens.
    pub fn set_caller_retention(&mut self, on: bool) {
        self.caller_retention = on;
    }

    fn rotate(&mut self) -> io::Result<()> {
        let first = self.first_seq.or(self.last_seq()).unwrap_or(0);
        let rotated = self.dir.join(rotated_name(first));
        // Never replace a rotated file: a restarted chain (or a copy put
        // there by hand) must not destroy older records.
        if fs::symlink_metadata(&rotated).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "cannot rotate {}: {} already exists",
                    self.live.display(),
                    rotated.display()
                ),
            ));
        }
        // What was written to the file being rotated is made durable first:
        // only the last file of a batch is synced after the batch.
        if let Some(file) = &self.file {
            file.sync_data()
                .map_err(|e| io_context(&self.live, "cannot sync", e))?;
        }
        fs::rename(&self.live, &rotated).map_err(|e| io_context(&self.live, "cannot rotate", e))?;
        match open_live(&self.live) {
            Ok(file) => self.file = Some(file),
            Err(e) => {
                // Put the file back rather than write on into a rotated one.
                if fs::rename(&rotated, &self.live).is_err() {
                    self.file = None;
                }
                return Err(e);
            }
        }
        // The rename must be durable before records land in the new file.
        sync_dir(&self.dir);
        self.size = 0;
        self.first_seq = None;
        self.rotations += 1;
        if !self.caller_retention {
            self.prune();
        }
        Ok(())
    }

    /// Deletes the oldest rotated files beyond `keep_files`, and beyond
    /// [`LogOptions::max_total_bytes`] with the live file. Best effort: a
    /// failure leaves a file for the next rotation to try again, and must
    /// not fail an append whose records are already written.
    fn prune(&self) {
        if let Some(plan) = self.retention_due() {
            self.delete(&plan);
        }
    }

    /// The rotated files retention would delete now (beyond `keep_files`,
    /// and beyond [`LogOptions::max_total_bytes`] with the live file), and
    /// the first record kept; `None` when nothing is due.
    pub fn retention_due(&self) -> Option<Retention> {
        let files = log_files(&self.dir).ok()?;
        let rotated: Vec<&PathBuf> = files
            .iter()
            .filter(|p| rotated_first_seq(p).is_some())
            .collect();
        let mut total = self.size;
        let mut kept = 0usize;
        let mut doomed = Vec::new();
        let mut first_kept = None;
        // Newest first: keep what fits, delete everything older.
        for path in rotated.iter().rev() {
            let bytes = fs::metadata(path).map_or(0, |m| m.len());
            total = total.saturating_add(bytes);
            if doomed.is_empty()
                && kept < self.options.keep_files
                && total <= self.options.max_total_bytes()
            {
                kept += 1;
                first_kept = rotated_first_seq(path);
                continue;
            }
            doomed.push((*path).clone());
        }
        if doomed.is_empty() {
            return None;
        }
        doomed.reverse();
        let first_kept_seq = first_kept
            .or(self.first_seq)
            .or(self.last_seq().map(|s| s + 1))?;
        Some(Retention {
            files: doomed,
            first_kept_seq,
        })
    }

    /// Deletes the files of a [`Retention`] from [`AuditLog::retention_due`].
    /// Best effort: a file that cannot be deleted is tried again next time.
    pub fn apply_retention(&mut self, plan: &Retention) {
        self.delete(plan);
    }

    fn delete(&self, plan: &Retention) {
        for path in &plan.files {
            let _ = fs::remove_file(path);
        }
        sync_dir(&self.dir);
    }
}
