//! The JSON Lines log: `audit.jsonl`, rotated by size into
//! `audit-<first seq, 20 digits>.jsonl` files that are never renamed again
//! (so lexicographic order is chronological and a file's name says which
//! record must open it).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::chain::SealedRecord;

/// The live file's name.
pub const LIVE_FILE: &str = "audit.jsonl";

/// Rotation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Rotate before the live file grows past this many bytes.
    pub max_file_bytes: u64,
    /// Rotated files kept (at least 1); older ones are deleted.
    pub keep_files: usize,
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
    /// Bytes of a torn last line (a crash mid-write) that were cut off. The
    /// record they belonged to is re-appended from the store's outbox.
    pub torn_bytes_removed: u64,
}

/// The log writer. One per daemon.
#[derive(Debug)]
pub struct AuditLog {
    dir: PathBuf,
    options: LogOptions,
    file: File,
    size: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
}

fn io_context(path: &Path, what: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{what} {}: {error}", path.display()))
}

fn seq_of(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// The first seq a rotated file's name promises, `None` for other names.
pub(crate) fn rotated_first_seq(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("audit-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// The log's files, oldest first: rotated files by name, then the live file
/// (if it exists).
pub fn log_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut rotated = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io_context(dir, "cannot read", e))?;
    for entry in entries {
        let path = entry.map_err(|e| io_context(dir, "cannot read", e))?.path();
        if rotated_first_seq(&path).is_some() {
            rotated.push(path);
        }
    }
    rotated.sort();
    let live = dir.join(LIVE_FILE);
    if live.exists() {
        rotated.push(live);
    }
    Ok(rotated)
}

impl AuditLog {
    /// Opens (creating if needed) the log in `dir`, cutting off a torn last line.
    pub fn open(dir: &Path, options: LogOptions) -> io::Result<(AuditLog, OpenReport)> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| io_context(dir, "cannot create", e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
                .map_err(|e| io_context(dir, "cannot set mode of", e))?;
        }
        let path = dir.join(LIVE_FILE);
        let mut file = open_live(&path)?;
        let mut report = OpenReport::default();
        let mut size = file
            .metadata()
            .map_err(|e| io_context(&path, "cannot stat", e))?
            .len();
        if size > 0 {
            let keep = complete_prefix_len(&mut file, size)
                .map_err(|e| io_context(&path, "cannot read", e))?;
            if keep < size {
                file.set_len(keep)
                    .map_err(|e| io_context(&path, "cannot truncate", e))?;
                file.sync_data()
                    .map_err(|e| io_context(&path, "cannot sync", e))?;
                report.torn_bytes_removed = size - keep;
                size = keep;
            }
        }
        let first_seq = first_line(&path)?.as_deref().and_then(seq_of);
        let mut last_seq = last_lines(&path, 1)?.first().and_then(|l| seq_of(l));
        if last_seq.is_none() {
            // Just rotated: the newest rotated file holds the last record.
            let files = log_files(dir)?;
            if let Some(newest) = files.iter().rev().find(|p| rotated_first_seq(p).is_some()) {
                last_seq = last_lines(newest, 1)?.first().and_then(|l| seq_of(l));
            }
        }
        let options = LogOptions {
            keep_files: options.keep_files.max(1),
            ..options
        };
        Ok((
            AuditLog {
                dir: dir.to_owned(),
                options,
                file,
                size,
                first_seq,
                last_seq,
            },
            report,
        ))
    }

    /// The last record's sequence number in the log, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends a batch with one write and one sync, rotating first if the
    /// batch would take the live file past its size limit.
    pub fn append(&mut self, records: &[SealedRecord]) -> io::Result<()> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let mut buf = Vec::with_capacity(records.iter().map(|r| r.line.len() + 1).sum());
        for record in records {
            buf.extend_from_slice(record.line.as_bytes());
            buf.push(b'\n');
        }
        if self.size > 0 && self.size + buf.len() as u64 > self.options.max_file_bytes {
            self.rotate()?;
        }
        let path = self.dir.join(LIVE_FILE);
        self.file
            .write_all(&buf)
            .map_err(|e| io_context(&path, "cannot write", e))?;
        self.file
            .sync_data()
            .map_err(|e| io_context(&path, "cannot sync", e))?;
        self.size += buf.len() as u64;
        self.first_seq.get_or_insert(first.seq);
        self.last_seq = records.last().map(|r| r.seq);
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let live = self.dir.join(LIVE_FILE);
        let first = self.first_seq.or(self.last_seq).unwrap_or(0);
        let rotated = self.dir.join(format!("audit-{first:020}.jsonl"));
        std::fs::rename(&live, &rotated).map_err(|e| io_context(&live, "cannot rotate", e))?;
        self.file = open_live(&live)?;
        if let Ok(dir) = File::open(&self.dir) {
            // Make the rename durable before records land in the new file.
            let _ = dir.sync_all();
        }
        self.size = 0;
        self.first_seq = None;
        let files = log_files(&self.dir)?;
        let rotated: Vec<&PathBuf> = files
            .iter()
            .filter(|p| rotated_first_seq(p).is_some())
            .collect();
        let excess = rotated.len().saturating_sub(self.options.keep_files);
        for old in &rotated[..excess] {
            std::fs::remove_file(old).map_err(|e| io_context(old, "cannot delete", e))?;
        }
        Ok(())
    }
}

fn open_live(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| io_context(path, "cannot open", e))
}

/// Length of the file up to and including its last newline.
fn complete_prefix_len(file: &mut File, size: u64) -> io::Result<u64> {
    let mut end = size;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(pos) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + pos as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn first_line(path: &Path) -> io::Result<Option<String>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_context(path, "cannot open", e)),
    };
    let mut line = String::new();
    BufReader::new(file)
        .read_line(&mut line)
        .map_err(|e| io_context(path, "cannot read", e))?;
    Ok((!line.trim().is_empty()).then(|| line.trim_end().to_owned()))
}

/// The last `n` complete lines of one file, oldest first, read backwards
/// from the end so a large file costs only what is returned.
fn last_lines(path: &Path, n: usize) -> io::Result<Vec<String>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_context(path, "cannot open", e)),
    };
    let size = file
        .metadata()
        .map_err(|e| io_context(path, "cannot stat", e))?
        .len();
    let mut lines: Vec<String> = Vec::new();
    let mut end = size;
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 && lines.len() < n {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(chunk))
            .map_err(|e| io_context(path, "cannot read", e))?;
        let mut data = chunk.to_vec();
        data.extend_from_slice(&carry);
        let mut parts: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        // The first part may continue in the previous chunk; keep it for later.
        let head = if start > 0 {
            parts.remove(0).to_vec()
        } else {
            Vec::new()
        };
        for part in parts.into_iter().rev() {
            if lines.len() >= n {
                break;
            }
            if !part.is_empty() {
                lines.push(String::from_utf8_lossy(part).into_owned());
            }
        }
        carry = head;
        end = start;
    }
    if end == 0 && !carry.is_empty() && lines.len() < n {
        lines.push(String::from_utf8_lossy(&carry).into_owned());
    }
    lines.reverse();
    Ok(lines)
}

/// The last `n` records of the log in `dir`, oldest first, across rotation.
pub fn tail(dir: &Path, n: usize) -> io::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for file in log_files(dir)?.iter().rev() {
        if out.len() >= n {
            break;
        }
        let mut lines = last_lines(file, n - out.len())?;
        lines.append(&mut out);
        out = lines;
    }
    Ok(out)
}

/// Every line of the log, oldest first: `(file, 1-based line number, line)`.
pub fn read_records(
    dir: &Path,
) -> io::Result<impl Iterator<Item = io::Result<(PathBuf, usize, String)>>> {
    read_files(log_files(dir)?)
}

pub(crate) fn read_files(
    files: Vec<PathBuf>,
) -> io::Result<impl Iterator<Item = io::Result<(PathBuf, usize, String)>>> {
    Ok(files.into_iter().flat_map(|path| {
        let lines: Box<dyn Iterator<Item = io::Result<(PathBuf, usize, String)>>> =
            match File::open(&path) {
                Ok(file) => {
                    let for_lines = path.clone();
                    Box::new(
                        BufReader::new(file)
                            .lines()
                            .enumerate()
                            .map(move |(index, line)| {
                                line.map(|line| (for_lines.clone(), index + 1, line))
                                    .map_err(|e| io_context(&for_lines, "cannot read", e))
                            }),
                    )
                }
                Err(e) => Box::new(std::iter::once(Err(io_context(&path, "cannot open", e)))),
            };
        lines
    }))
}

/// Yields records appended to the log after it was created, across
/// rotations, like `tail -f`.
#[derive(Debug)]
pub struct Follower {
    dir: PathBuf,
    file: Option<File>,
    inode: u64,
    partial: Vec<u8>,
}

impl Follower {
    /// Starts following at the current end of the live file.
    pub fn from_end(dir: &Path) -> io::Result<Follower> {
        let mut follower = Follower {
            dir: dir.to_owned(),
            file: None,
            inode: 0,
            partial: Vec::new(),
        };
        if let Some((mut file, inode)) = follower.open_live()? {
            file.seek(SeekFrom::End(0))
                .map_err(|e| io_context(dir, "cannot seek", e))?;
            follower.file = Some(file);
            follower.inode = inode;
        }
        Ok(follower)
    }

    fn open_live(&self) -> io::Result<Option<(File, u64)>> {
        let path = self.dir.join(LIVE_FILE);
        match File::open(&path) {
            Ok(file) => {
                let inode = file
                    .metadata()
                    .map_err(|e| io_context(&path, "cannot stat", e))?
                    .ino();
                Ok(Some((file, inode)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_context(&path, "cannot open", e)),
        }
    }

    /// New complete lines since the last call (possibly none). Call it
    /// periodically; it never blocks.
    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut lines = self.drain_current()?;
        // After a rotation the open handle is the rotated file, which we have
        // just read to its end; the live path is a new file.
        if let Some((file, inode)) = self.open_live()?
            && inode != self.inode
        {
            self.file = Some(file);
            self.inode = inode;
            self.partial.clear();
            lines.extend(self.drain_current()?);
        }
        Ok(lines)
    }

    fn drain_current(&mut self) -> io::Result<Vec<String>> {
        let Some(file) = &mut self.file else {
            return Ok(Vec::new());
        };
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(|e| io_context(&self.dir, "cannot read", e))?;
        self.partial.extend_from_slice(&data);
        let mut lines = Vec::new();
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if !text.is_empty() {
                lines.push(text);
            }
        }
        Ok(lines)
    }
}
