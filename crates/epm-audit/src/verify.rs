//! Chain verification: name the first record that breaks the chain.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chain::{GENESIS_HASH, canonical_json, hash_record};
use crate::log::{LIVE_FILE, io_context, log_files, rotated_first_seq};
use crate::read::{MAX_LINE_BYTES, RawLines};

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Files read.
    pub files: usize,
    /// Records checked.
    pub records: u64,
    /// First record's sequence number.
    pub first_seq: Option<u64>,
    /// Last record's sequence number.
    pub last_seq: Option<u64>,
    /// Whether the chain starts at record 1. When old rotated files were
    /// deleted by retention, the first remaining record's predecessor is gone
    /// and its `prev_hash` cannot be checked.
    pub starts_at_genesis: bool,
}

/// How the chain broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakKind {
    /// The line is not a record: not UTF-8, longer than
    /// [`MAX_LINE_BYTES`], not a JSON object, or without a positive integer
    /// `seq`. The text says which.
    Unparsable(String),
    /// The record's content does not match its own hash: it was edited.
    HashMismatch,
    /// The line is not in the canonical form the daemon writes (e.g. a
    /// duplicated key, whose first value a parser would hide).
    NotCanonical,
    /// `prev_hash` is not the previous record's hash (or, for the first
    /// record read, not 64 zeros at seq 1 or not a SHA-256 at all): a record
    /// before it was edited or replaced.
    PrevHashMismatch,
    /// Sequence numbers jump: records before this one were deleted.
    Gap {
        /// The sequence number that should have come next.
        expected: u64,
    },
    /// Sequence numbers go backwards or repeat: records were reordered or duplicated.
    NotIncreasing {
        /// The previous record's sequence number.
        previous: u64,
    },
}

/// The first record that breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ChainBreak {
    /// The file, when verifying files.
    pub file: Option<PathBuf>,
    /// 1-based line number in that file (or in the input).
    pub line: usize,
    /// The record's sequence number, when readable.
    pub seq: Option<u64>,
    /// What is wrong.
    pub kind: BreakKind,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}:", file.display())?;
        }
        write!(f, "line {}", self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        match &self.kind {
            BreakKind::Unparsable(why) => write!(f, ": not an audit record: {why}"),
            BreakKind::HashMismatch => {
                write!(f, ": hash mismatch: this record was edited")
            }
            BreakKind::NotCanonical => write!(
                f,
                ": not in the form epmd writes (duplicated or reordered keys, added spaces): this record was edited"
            ),
            BreakKind::PrevHashMismatch => write!(
                f,
                ": prev_hash does not match the record before it: a record was edited, replaced or removed before this one"
            ),
            BreakKind::Gap { expected } => write!(
                f,
                ": expected seq {expected}: records were deleted before this one"
            ),
            BreakKind::NotIncreasing { previous } => write!(
                f,
                ": follows seq {previous}: records were reordered or duplicated"
            ),
        }
    }
}

/// Why verification could not run, or where the chain broke.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file could not be read.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The chain is broken.
    #[error(transparent)]
    Broken(#[from] ChainBreak),
}

struct Verifier {
    previous: Option<(u64, String)>,
    report: VerifyReport,
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Verifier {
    fn new() -> Self {
        Self {
            previous: None,
            report: VerifyReport {
                files: 0,
                records: 0,
                first_seq: None,
                last_seq: None,
                starts_at_genesis: false,
            },
        }
    }

    /// Checks one line (`None` when longer than [`MAX_LINE_BYTES`]);
    /// `expected_first` is the seq the line must have because it opens a
    /// file.
    fn line(
        &mut self,
        file: Option<&Path>,
        line_no: usize,
        line: Option<&[u8]>,
        expected_first: Option<u64>,
    ) -> Result<(), ChainBreak> {
        let broken = |seq, kind| ChainBreak {
            file: file.map(Path::to_owned),
            line: line_no,
            seq,
            kind,
        };
        let unparsable = |why: String| broken(None, BreakKind::Unparsable(why));
        let line = line.ok_or_else(|| unparsable(format!("longer than {MAX_LINE_BYTES} bytes")))?;
        let line = std::str::from_utf8(line).map_err(|e| unparsable(format!("not UTF-8: {e}")))?;
        let value: Value = serde_json::from_str(line).map_err(|e| unparsable(e.to_string()))?;
        let seq = match value.get("seq").and_then(Value::as_u64) {
            Some(0) => return Err(unparsable("seq 0: records are numbered from 1".into())),
            Some(seq) => seq,
            None => return Err(unparsable("no numeric seq".into())),
        };
        // The hash covers the parsed value, and only the canonical text has
        // exactly one parse: anything else (a duplicated key hides a value,
        // an escape re-encodes one) is refused.
        if canonical_json(&value) != line {
            return Err(broken(Some(seq), BreakKind::NotCanonical));
        }
        let Value::Object(record) = value else {
            return Err(unparsable("not a JSON object".into()));
        };
        let stored = record
            .get("hash")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let prev = record
            .get("prev_hash")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if hash_record(record) != stored {
            return Err(broken(Some(seq), BreakKind::HashMismatch));
        }
        if let Some(expected) = expected_first
            && seq != expected
        {
            return Err(broken(Some(seq), BreakKind::Gap { expected }));
        }
        match &self.previous {
            Some((previous, _)) if seq <= *previous => {
                return Err(broken(
                    Some(seq),
                    BreakKind::NotIncreasing {
                        previous: *previous,
                    },
                ));
            }
            Some((previous, _)) if seq != previous + 1 => {
                return Err(broken(
                    Some(seq),
                    BreakKind::Gap {
                        expected: previous + 1,
                    },
                ));
            }
            Some((_, previous_hash)) if prev != *previous_hash => {
                return Err(broken(Some(seq), BreakKind::PrevHashMismatch));
            }
            Some(_) => {}
            None => {
                // Record 1 must start from genesis; a later first record's
                // predecessor was rotated away, so only its form is checked.
                if (seq == 1 && prev != GENESIS_HASH) || !is_sha256_hex(&prev) {
                    return Err(broken(Some(seq), BreakKind::PrevHashMismatch));
                }
                self.report.first_seq = Some(seq);
                self.report.starts_at_genesis = seq == 1;
            }
        }
        self.previous = Some((seq, stored));
        self.report.records += 1;
        self.report.last_seq = Some(seq);
        Ok(())
    }
}

/// Verifies lines given in order (e.g. from a pipe). Blank lines are
/// skipped; the first record may have any seq (as after retention).
pub fn verify_lines<'a>(
    lines: impl IntoIterator<Item = &'a str>,
) -> Result<VerifyReport, ChainBreak> {
    let mut verifier = Verifier::new();
    for (index, line) in lines.into_iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        verifier.line(None, index + 1, Some(line.as_bytes()), None)?;
    }
    Ok(verifier.report)
}

/// Verifies files in the order given (oldest first), as one chain.
///
/// A rotated file's name (`audit-<seq>.jsonl`) says which record must open
/// it, so deleting the first lines of a file, or a whole file in the
/// middle, is detected; when no rotated file is given, the first file must
/// start at seq 1. When the first file is a rotated one that does not start
/// at 1, older files were deleted by retention: the chain is checked from
/// there and the report says `starts_at_genesis: false`.
///
/// Blank lines are skipped. Content never causes an `Err(Io)`: a line that
/// is not UTF-8, not JSON or too long is a [`BreakKind::Unparsable`] break.
pub fn verify_files(files: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    verify_lines_of(RawLines::new(files.to_vec()))
}

fn verify_lines_of(mut lines: RawLines) -> Result<VerifyReport, VerifyError> {
    let mut verifier = Verifier::new();
    let count = lines.len();
    let any_rotated = (0..count).any(|i| rotated_first_seq(lines.path(i)).is_some());
    let mut opened: Option<usize> = None;
    while let Some((index, line_no, line, ended)) = lines.next_line()? {
        if line
            .as_deref()
            .is_some_and(|l| l.iter().all(u8::is_ascii_whitespace))
        {
            continue;
        }
        let path = lines.path(index);
        // The live file's last line without its newline may be a batch
        // being written right now, not a record yet: skipped only while it
        // could still become one. A complete record, or bytes no record
        // starts with (a newline overwritten, say), are checked as a line.
        if !ended
            && path.file_name().is_some_and(|n| n == LIVE_FILE)
            && line.as_deref().is_some_and(is_unfinished_line)
        {
            continue;
        }
        let expected_first = if opened != Some(index) {
            opened = Some(index);
            match rotated_first_seq(path) {
                Some(seq) => Some(seq),
                None if !any_rotated && verifier.previous.is_none() => Some(1),
                None => None,
            }
        } else {
            None
        };
        verifier.line(Some(path), line_no, line.as_deref(), expected_first)?;
    }
    verifier.report.files = count;
    Ok(verifier.report)
}

/// Whether `bytes` is the start of a record line that a writer has not
/// finished: JSON that ends too early, and nothing else (no control
/// character, no text after a complete value).
fn is_unfinished_line(bytes: &[u8]) -> bool {
    // A write can stop inside a multi-byte character.
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) if e.error_len().is_none() => {
            // Valid up to there, by the error's own account.
            std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => return false,
    };
    !text.chars().any(char::is_control)
        && serde_json::from_str::<Value>(text).is_err_and(|e| e.is_eof())
}

/// How many times [`verify_dir`] takes a new snapshot of a log that
/// changed while it was being opened.
const SNAPSHOT_ATTEMPTS: usize = 20;

/// The log's files, opened, when nothing was rotated or deleted while they
/// were: `None` when the set changed (try again).
fn snapshot(dir: &Path) -> io::Result<Option<Vec<(PathBuf, File)>>> {
    let names = log_files(dir)?;
    let mut opened = Vec::with_capacity(names.len());
    for path in &names {
        match File::open(path) {
            Ok(file) => opened.push((path.clone(), file)),
            // Deleted by retention, or renamed by a rotation, meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_context(path, "cannot open", e)),
        }
    }
    // The same names, and the live file still the one opened: no rotation
    // happened in between, so the opened files are one consistent log.
    if log_files(dir)? != names {
        return Ok(None);
    }
    if let Some((path, file)) = opened.last()
        && path.file_name().is_some_and(|n| n == LIVE_FILE)
    {
        let open = file
            .metadata()
            .map_err(|e| io_context(path, "cannot stat", e))?;
        match std::fs::metadata(path) {
            Ok(now) if (now.dev(), now.ino()) == (open.dev(), open.ino()) => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_context(path, "cannot stat", e)),
        }
    }
    Ok(Some(opened))
}

/// Verifies the whole log in `dir`: rotated files, then the live file.
///
/// Safe while `epmd` writes and rotates the log: the files are opened
/// together and checked to be one consistent set (nothing rotated or
/// deleted while they were opened, else they are opened again), and a
/// last line the writer has not finished is not a record yet.
pub fn verify_dir(dir: &Path) -> Result<VerifyReport, VerifyError> {
    for _ in 0..SNAPSHOT_ATTEMPTS {
        if let Some(files) = snapshot(dir)? {
            return verify_lines_of(RawLines::opened(files));
        }
    }
    Err(VerifyError::Io(io::Error::other(format!(
        "{}: the log kept rotating while it was opened ({SNAPSHOT_ATTEMPTS} tries); try again",
        dir.display()
    ))))
}
