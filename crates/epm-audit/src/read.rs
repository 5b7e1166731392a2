//! Reading the log without the writer: every record in order, the last N
//! records, and following new ones. Lines are read as bytes and bounded in
//! length, so no file content can make a reader fail on UTF-8 or exhaust
//! memory.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::log::{LIVE_FILE, io_context, log_files, rotated_first_seq, seq_of};
use crate::record::AuditRecord;

/// Lines longer than this are not records (the daemon writes lines of a
/// few KiB): readers report them without holding them in memory.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// How much the backward reader reads at a time.
const CHUNK: usize = 64 * 1024;

/// A line's bytes without its newline, or `None` when it is longer than
/// [`MAX_LINE_BYTES`].
pub(crate) type LineBytes = Option<Vec<u8>>;

/// Reads lines front to back.
pub(crate) struct ForwardLines<R> {
    reader: BufReader<R>,
    line_no: usize,
}

impl<R: Read> ForwardLines<R> {
    pub(crate) fn new(reader: R) -> Self {
        Self {
            reader: BufReader::with_capacity(CHUNK, reader),
            line_no: 0,
        }
    }

    /// The next line with its 1-based number and whether a newline ended it
    /// (the last line of a file may lack one).
    pub(crate) fn next_line(&mut self) -> io::Result<Option<(usize, LineBytes, bool)>> {
        let mut bytes = Vec::new();
        let mut too_long = false;
        let mut started = false;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(available) => available,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                if !started {
                    return Ok(None);
                }
                self.line_no += 1;
                return Ok(Some((self.line_no, (!too_long).then_some(bytes), false)));
            }
            started = true;
            let newline = available.iter().position(|&b| b == b'\n');
            let content = &available[..newline.unwrap_or(available.len())];
            if !too_long {
                if bytes.len() + content.len() > MAX_LINE_BYTES {
                    too_long = true;
                    bytes = Vec::new();
                } else {
                    bytes.extend_from_slice(content);
                }
            }
            let used = newline.map_or(available.len(), |i| i + 1);
            self.reader.consume(used);
            if newline.is_some() {
                self.line_no += 1;
                return Ok(Some((self.line_no, (!too_long).then_some(bytes), true)));
            }
        }
    }
}

/// A line found reading backwards: where it starts, and its bytes.
pub(crate) struct BackLine {
    pub(crate) start: u64,
    pub(crate) bytes: LineBytes,
}

/// Reads lines back to front from a given end, a chunk at a time, so the
/// cost is what is returned, not the file's size.
pub(crate) struct BackwardLines<'f> {
    file: &'f File,
    buf: Vec<u8>,
    /// `buf[..unread]` holds the file's bytes from `buf_start` on that have
    /// not been returned; everything after them has been.
    buf_start: u64,
    unread: usize,
    done: bool,
}

impl<'f> BackwardLines<'f> {
    pub(crate) fn new(file: &'f File, end: u64) -> Self {
        Self {
            file,
            buf: Vec::new(),
            buf_start: end,
            unread: 0,
            done: false,
        }
    }

    /// The first call returns what follows the last newline before `end`
    /// (empty when `end` is just after a newline); each later call the line
    /// before. `None` once the start of the file has been returned.
    pub(crate) fn prev(&mut self) -> io::Result<Option<BackLine>> {
        if self.done {
            return Ok(None);
        }
        // Pieces of the line, last piece first.
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let mut len = 0usize;
        let mut too_long = false;
        loop {
            if self.unread == 0 {
                if self.buf_start == 0 {
                    self.done = true;
                    return Ok(Some(BackLine {
                        start: 0,
                        bytes: join_reversed(pieces, too_long),
                    }));
                }
                let end = self.buf_start;
                let start = end.saturating_sub(CHUNK as u64);
                let size = (end - start) as usize;
                self.buf.resize(size, 0);
                self.file.read_exact_at(&mut self.buf[..size], start)?;
                self.buf_start = start;
                self.unread = size;
            }
            let window = &self.buf[..self.unread];
            let newline = window.iter().rposition(|&b| b == b'\n');
            let from = newline.map_or(0, |i| i + 1);
            let piece = &window[from..];
            if !too_long {
                if len + piece.len() > MAX_LINE_BYTES {
                    too_long = true;
                    pieces.clear();
                } else {
                    len += piece.len();
                    pieces.push(piece.to_vec());
                }
            }
            match newline {
                Some(i) => {
                    // The newline ends the line before this one.
                    self.unread = i;
                    return Ok(Some(BackLine {
                        start: self.buf_start + from as u64,
                        bytes: join_reversed(pieces, too_long),
                    }));
                }
                None => self.unread = 0,
            }
        }
    }
}

fn join_reversed(pieces: Vec<Vec<u8>>, too_long: bool) -> LineBytes {
    if too_long {
        return None;
    }
    Some(pieces.into_iter().rev().flatten().collect())
}

fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

fn file_id(file: &File) -> io::Result<(u64, u64)> {
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// Opens a file that may have been deleted meanwhile (retention).
fn open_if_exists(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_context(path, "cannot open", e)),
    }
}

/// Lines of several files in order, with the index of the file each comes from.
pub(crate) struct RawLines {
    files: Vec<PathBuf>,
    /// Files opened beforehand (a consistent snapshot of a log being
    /// written), by index; the others are opened by path when reached.
    opened: Vec<Option<File>>,
    next_file: usize,
    current: Option<(usize, ForwardLines<File>)>,
}

impl RawLines {
    pub(crate) fn new(files: Vec<PathBuf>) -> Self {
        let opened = files.iter().map(|_| None).collect();
        Self {
            files,
            opened,
            next_file: 0,
            current: None,
        }
    }

    /// Lines of files already open, read up to their end as they grow.
    pub(crate) fn opened(files: Vec<(PathBuf, File)>) -> Self {
        let (files, opened) = files.into_iter().map(|(p, f)| (p, Some(f))).unzip();
        Self {
            files,
            opened,
            next_file: 0,
            current: None,
        }
    }

    /// How many files.
    pub(crate) fn len(&self) -> usize {
        self.files.len()
    }

    pub(crate) fn path(&self, index: usize) -> &Path {
        self.files
            .get(index)
            .map_or(Path::new(""), PathBuf::as_path)
    }

    /// `(file index, 1-based line number, line, whether a newline ended
    /// it)`. After an error the next call goes on with the next file.
    pub(crate) fn next_line(&mut self) -> io::Result<Option<(usize, usize, LineBytes, bool)>> {
        loop {
            if let Some((index, lines)) = &mut self.current {
                let index = *index;
                match lines.next_line() {
                    Ok(Some((line_no, bytes, ended))) => {
                        return Ok(Some((index, line_no, bytes, ended)));
                    }
                    Ok(None) => self.current = None,
                    Err(e) => {
                        self.current = None;
                        return Err(io_context(self.path(index), "cannot read", e));
                    }
                }
            }
            let index = self.next_file;
            let Some(path) = self.files.get(index) else {
                return Ok(None);
            };
            self.next_file += 1;
            let file = match self.opened.get_mut(index).and_then(Option::take) {
                Some(file) => file,
                None => File::open(path).map_err(|e| io_context(path, "cannot open", e))?,
            };
            self.current = Some((index, ForwardLines::new(file)));
        }
    }
}

/// Why a line is not a record.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The line is longer than [`MAX_LINE_BYTES`].
    #[error("line longer than {MAX_LINE_BYTES} bytes")]
    TooLong,
    /// The line is not a JSON record of this schema.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// One line of the log, parsed.
#[derive(Debug)]
pub struct LogEntry {
    /// The file it is in.
    pub file: PathBuf,
    /// Its 1-based line number in that file.
    pub line: usize,
    /// The record, or why the line is not one.
    pub record: Result<AuditRecord, ParseError>,
}

/// Every record of some log files, in order; see [`read_records`].
pub struct Records {
    lines: RawLines,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("files", &self.lines.files)
            .finish_non_exhaustive()
    }
}

impl Iterator for Records {
    type Item = io::Result<LogEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (index, line, bytes, _) = match self.lines.next_line() {
                Ok(Some(next)) => next,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            let record = match bytes {
                None => Err(ParseError::TooLong),
                Some(bytes) if is_blank(&bytes) => continue,
                Some(bytes) => AuditRecord::from_slice(&bytes).map_err(ParseError::from),
            };
            return Some(Ok(LogEntry {
                file: self.lines.path(index).to_owned(),
                line,
                record,
            }));
        }
    }
}

/// Every record of the log in `dir`, oldest first: the rotated files, then
/// the live file. Blank lines are skipped. An error reading one file is
/// yielded, and iteration goes on with the next file.
pub fn read_records(dir: &Path) -> io::Result<Records> {
    Ok(read_files(log_files(dir)?))
}

/// Every record of `files`, in the order given; see [`read_records`].
pub fn read_files(files: Vec<PathBuf>) -> Records {
    Records {
        lines: RawLines::new(files),
    }
}

/// The last `n` lines of the log in `dir`, oldest first, across rotation:
/// read backwards from the end of the live file, then of the rotated files
/// before it, so the cost is about the size of what is returned.
///
/// Blank lines, lines longer than [`MAX_LINE_BYTES`] and bytes after the
/// live file's last newline (a record being written) are left out; text
/// that is not UTF-8 is replaced by U+FFFD.
pub fn tail(dir: &Path, n: usize) -> io::Result<Vec<String>> {
    let mut newest_first: Vec<String> = Vec::new();
    if n == 0 {
        return Ok(newest_first);
    }
    // The live file first, then the list: if it rotates in between, it is
    // in the list under its new name too, and is skipped there by identity.
    let live_path = dir.join(LIVE_FILE);
    let mut sources: Vec<(PathBuf, File)> = Vec::new();
    let mut live_id = None;
    if let Some(file) = open_if_exists(&live_path)? {
        live_id = Some(file_id(&file).map_err(|e| io_context(&live_path, "cannot stat", e))?);
        sources.push((live_path.clone(), file));
    }
    for path in log_files(dir)?.into_iter().rev() {
        if path == live_path {
            continue;
        }
        // Gone since the listing: deleted by retention, so older than
        // anything still to read.
        let Some(file) = open_if_exists(&path)? else {
            break;
        };
        sources.push((path, file));
    }
    for (path, file) in sources {
        let is_live = path == live_path;
        let meta = file
            .metadata()
            .map_err(|e| io_context(&path, "cannot stat", e))?;
        if !is_live && live_id == Some((meta.dev(), meta.ino())) {
            continue;
        }
        let mut lines = BackwardLines::new(&file, meta.len());
        let mut after_last_newline = true;
        while newest_first.len() < n {
            let Some(line) = lines
                .prev()
                .map_err(|e| io_context(&path, "cannot read", e))?
            else {
                break;
            };
            if std::mem::take(&mut after_last_newline) && is_live {
                continue;
            }
            if let Some(bytes) = line.bytes.filter(|b| !is_blank(b)) {
                newest_first.push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        if newest_first.len() >= n {
            break;
        }
    }
    newest_first.reverse();
    Ok(newest_first)
}

/// The seq of the last line that is a record.
fn last_seq_in(lines: &[String]) -> Option<u64> {
    lines.iter().rev().find_map(|line| seq_of(line.as_bytes()))
}

/// A file being followed.
#[derive(Debug)]
struct Followed {
    file: File,
    id: (u64, u64),
    /// Where the next read starts.
    pos: u64,
    /// Bytes of a line whose newline has not arrived yet.
    partial: Vec<u8>,
    /// The partial line is longer than [`MAX_LINE_BYTES`]: drop it.
    skipping: bool,
}

impl Followed {
    fn new(file: File, pos: u64) -> io::Result<Self> {
        Ok(Self {
            id: file_id(&file)?,
            file,
            pos,
            partial: Vec::new(),
            skipping: false,
        })
    }

    /// Complete lines appended since the last read.
    fn drain(&mut self, out: &mut Vec<String>) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        if len < self.pos {
            // Truncated: the daemon cut a torn last line at its start. What
            // was cut never had a newline, so nothing returned is lost.
            self.pos = len;
            self.partial.clear();
            self.skipping = false;
        }
        self.file.seek(SeekFrom::Start(self.pos))?;
        let mut data = Vec::new();
        (&mut self.file)
            .take(len - self.pos)
            .read_to_end(&mut data)?;
        self.pos += data.len() as u64;
        for piece in data.split_inclusive(|&b| b == b'\n') {
            let (content, complete) = match piece.split_last() {
                Some((b'\n', content)) => (content, true),
                _ => (piece, false),
            };
            if !self.skipping {
                if self.partial.len() + content.len() > MAX_LINE_BYTES {
                    self.skipping = true;
                    self.partial = Vec::new();
                } else {
                    self.partial.extend_from_slice(content);
                }
            }
            if complete {
                let line = std::mem::take(&mut self.partial);
                if !std::mem::take(&mut self.skipping) && !is_blank(&line) {
                    out.push(String::from_utf8_lossy(&line).into_owned());
                }
            }
        }
        Ok(())
    }
}

/// Yields lines appended to the log, across rotations, like `tail -F`.
/// Call [`poll`](Follower::poll) periodically (a few hundred milliseconds
/// apart is plenty); it never blocks.
///
/// It keeps the file it reads open. When the live file has been replaced by
/// a rotation, it reads the rest of the old file, then any rotated file
/// that came and went between two polls, then the new live file, so no
/// record is skipped however small the files.
#[derive(Debug)]
pub struct Follower {
    dir: PathBuf,
    current: Option<Followed>,
    /// The seq of the last record returned, to place the old file when it
    /// has disappeared.
    last_seq: Option<u64>,
}

impl Follower {
    /// Starts following at the end of the live file's last complete line
    /// (a line still being written will be returned once complete).
    pub fn from_end(dir: &Path) -> io::Result<Follower> {
        let path = dir.join(LIVE_FILE);
        let current = match open_if_exists(&path)? {
            Some(file) => {
                let len = file
                    .metadata()
                    .map_err(|e| io_context(&path, "cannot stat", e))?
                    .len();
                let after_last_newline = BackwardLines::new(&file, len)
                    .prev()
                    .map_err(|e| io_context(&path, "cannot read", e))?
                    .map_or(len, |line| line.start);
                Some(
                    Followed::new(file, after_last_newline)
                        .map_err(|e| io_context(&path, "cannot stat", e))?,
                )
            }
            None => None,
        };
        Ok(Follower {
            dir: dir.to_owned(),
            current,
            last_seq: None,
        })
    }

    /// Complete lines appended since the last call, oldest first (possibly
    /// none). Text that is not UTF-8 is replaced by U+FFFD.
    ///
    /// A record is returned once: one whose seq is not above the last
    /// returned (or passed to [`Follower::skip_through`]) is left out, so
    /// a record read both from a rotated file and from the live file around
    /// a rotation, or already printed by a tail read after the follower
    /// started, is not printed twice. Lines that are not records pass.
    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut lines = self.poll_files()?;
        lines.retain(|line| match (seq_of(line.as_bytes()), self.last_seq) {
            (Some(seq), Some(last)) if seq <= last => false,
            (Some(seq), _) => {
                self.last_seq = Some(seq);
                true
            }
            (None, _) => true,
        });
        Ok(lines)
    }

    /// Records up to `seq` were already shown (by a tail read after this
    /// follower started): [`Follower::poll`] leaves them out.
    pub fn skip_through(&mut self, seq: u64) {
        self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
    }

    fn poll_files(&mut self) -> io::Result<Vec<String>> {
        let live_path = self.dir.join(LIVE_FILE);
        let mut lines = Vec::new();
        if let Some(current) = &mut self.current {
            current
                .drain(&mut lines)
                .map_err(|e| io_context(&live_path, "cannot read", e))?;
        }
        let Some(live) = open_if_exists(&live_path)? else {
            return Ok(lines);
        };
        let live = Followed::new(live, 0).map_err(|e| io_context(&live_path, "cannot stat", e))?;
        if let Some(current) = &mut self.current {
            if current.id == live.id {
                return Ok(lines);
            }
            // Rotated. Whatever was appended before the rename is in the old
            // file; then come the files rotated since, up to the new live one.
            current
                .drain(&mut lines)
                .map_err(|e| io_context(&live_path, "cannot read", e))?;
            let old_id = current.id;
            let after_seq = last_seq_in(&lines).or(self.last_seq);
            self.read_rotated_between(old_id, live.id, after_seq, &mut lines)?;
        }
        // A live file that appeared after we started (or replaced ours) is
        // read from its start.
        let mut live = live;
        live.drain(&mut lines)
            .map_err(|e| io_context(&live_path, "cannot read", e))?;
        self.current = Some(live);
        Ok(lines)
    }

    /// Reads whole the rotated files newer than the one with `old_id` and
    /// older than the one with `live_id` (the live file we just opened, if
    /// it has already been rotated in turn). If the old file is no longer
    /// listed, the files named after `after_seq` are the new ones.
    fn read_rotated_between(
        &self,
        old_id: (u64, u64),
        live_id: (u64, u64),
        after_seq: Option<u64>,
        out: &mut Vec<String>,
    ) -> io::Result<()> {
        let mut rotated = Vec::new();
        for path in log_files(&self.dir)? {
            if rotated_first_seq(&path).is_none() {
                continue;
            }
            if let Some(file) = open_if_exists(&path)? {
                let id = file_id(&file).map_err(|e| io_context(&path, "cannot stat", e))?;
                rotated.push((path, file, id));
            }
        }
        // The old file is not listed when retention outran us or it was
        // deleted by hand (we still read it to its end, through our handle).
        let start = match (
            rotated.iter().position(|(_, _, id)| *id == old_id),
            after_seq,
        ) {
            (Some(i), _) => i + 1,
            (None, Some(last)) => rotated
                .iter()
                .position(|(path, _, _)| rotated_first_seq(path).is_some_and(|first| first > last))
                .unwrap_or(rotated.len()),
            (None, None) => rotated.len(),
        };
        for (path, file, id) in rotated.into_iter().skip(start) {
            if id == live_id {
                break;
            }
            let mut whole =
                Followed::new(file, 0).map_err(|e| io_context(&path, "cannot stat", e))?;
            whole
                .drain(out)
                .map_err(|e| io_context(&path, "cannot read", e))?;
            // A last line without a newline is complete in a rotated file.
            if !whole.skipping && !is_blank(&whole.partial) {
                out.push(String::from_utf8_lossy(&whole.partial).into_owned());
            }
        }
        Ok(())
    }
}
