//! Container logs in the CRI format (`<RFC3339Nano> <stdout|stderr> <F|P> <text>`), one file per
//! container instance (`<dir>/<restartCount>.log`), rotated by size into `<n>.log.1`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use updraft_cell_api::LogOptions;
use updraft_common::sync::lock;

/// Rotate the current file when it grows beyond this.
pub const MAX_LOG_BYTES: u64 = 10 << 20;

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// stdout (or the terminal).
    Stdout,
    /// stderr.
    Stderr,
}

#[derive(Debug)]
struct Current {
    instance: u32,
    file: Option<std::fs::File>,
    size: u64,
    partial: [Vec<u8>; 2],
}

/// The log of one container across its instances.
#[derive(Debug)]
pub struct ContainerLog {
    dir: PathBuf,
    current: Mutex<Current>,
    /// Held by whoever moves bytes from the container's pipes into this log, for one
    /// non-blocking read and its write: an instance's end waits for a read in flight, so
    /// output read before the end can never land in the next instance's file.
    reading: Mutex<()>,
    /// Bumped on every write and when an instance ends; followers wait on it.
    changed: watch::Sender<(u32, u64, bool)>,
}

impl ContainerLog {
    /// A log in `dir` (created).
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            current: Mutex::new(Current {
                instance: 0,
                file: None,
                size: 0,
                partial: [Vec::new(), Vec::new()],
            }),
            reading: Mutex::new(()),
            changed: watch::channel((0, 0, false)).0,
        })
    }

    /// Exclusive right to move pipe output into the log (see the field's comment).
    pub fn reading(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.reading)
    }

    fn path(&self, instance: u32) -> PathBuf {
        self.dir.join(format!("{instance}.log"))
    }

    /// Starts writing the log of instance `instance` (the restart count), appending when it
    /// exists already (an adopted container).
    pub fn begin(&self, instance: u32) -> std::io::Result<()> {
        let mut cur = lock(&self.current);
        let path = self.path(instance);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        cur.size = file.metadata().map(|m| m.len()).unwrap_or(0);
        cur.file = Some(file);
        cur.instance = instance;
        cur.partial = [Vec::new(), Vec::new()];
        self.changed
            .send_modify(|c| *c = (instance, c.1 + 1, false));
        Ok(())
    }

    /// Marks the current instance as ended (followers stop after the last line).
    pub fn end(&self) {
        let mut cur = lock(&self.current);
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let idx = stream as usize;
            let rest = std::mem::take(&mut cur.partial[idx]);
            if !rest.is_empty() {
                write_line(&mut cur, stream, &rest, true);
            }
        }
        let instance = cur.instance;
        self.changed.send_modify(|c| *c = (instance, c.1 + 1, true));
    }

    /// Appends output; complete lines are written tagged `F`, a partial one is kept until its
    /// newline arrives (or written tagged `P` when it grows beyond 16 KiB).
    pub fn write(&self, stream: LogStream, data: &[u8]) {
        let mut cur = lock(&self.current);
        let idx = stream as usize;
        let mut buf = std::mem::take(&mut cur.partial[idx]);
        buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
            let line = buf[start..start + nl].to_vec();
            write_line(&mut cur, stream, &line, true);
            start += nl + 1;
        }
        let rest = buf[start..].to_vec();
        if rest.len() > 16 << 10 {
            write_line(&mut cur, stream, &rest, false);
        } else {
            cur.partial[idx] = rest;
        }
        if cur.size > MAX_LOG_BYTES {
            let path = self.path(cur.instance);
            let _ = std::fs::rename(&path, path.with_extension("log.1"));
            if let Ok(f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                cur.file = Some(f);
                cur.size = 0;
            }
        }
        drop(cur);
        self.changed.send_modify(|c| c.1 += 1);
    }

    /// Follow notifications: (instance, writes, ended).
    pub fn subscribe(&self) -> watch::Receiver<(u32, u64, bool)> {
        self.changed.subscribe()
    }

    /// The instance currently (or last) written.
    pub fn instance(&self) -> u32 {
        lock(&self.current).instance
    }

    /// Complete log text of `instance` (rotated part first).
    pub fn read_instance(&self, instance: u32) -> Vec<u8> {
        let path = self.path(instance);
        let mut out = std::fs::read(path.with_extension("log.1")).unwrap_or_default();
        out.extend(std::fs::read(&path).unwrap_or_default());
        out
    }

    /// Path of the log file of `instance`.
    pub fn file_of(&self, instance: u32) -> PathBuf {
        self.path(instance)
    }
}

fn write_line(cur: &mut Current, stream: LogStream, text: &[u8], full: bool) {
    let name = match stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
    };
    let mut line = format!(
        "{:.9} {name} {} ",
        crate::now(),
        if full { 'F' } else { 'P' }
    )
    .into_bytes();
    line.extend_from_slice(text);
    line.push(b'\n');
    if let Some(f) = cur.file.as_mut()
        && f.write_all(&line).is_ok()
    {
        cur.size += line.len() as u64;
    }
}

/// One parsed CRI log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine<'a> {
    /// The timestamp text.
    pub time: &'a str,
    /// `stdout` or `stderr`.
    pub stream: &'a str,
    /// Complete line (`F`) or partial (`P`).
    pub full: bool,
    /// The text.
    pub text: &'a [u8],
}

/// Parses a CRI line (without its newline); `None` for garbage.
pub fn parse_line(line: &[u8]) -> Option<LogLine<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let stream = std::str::from_utf8(parts.next()?).ok()?;
    let tag = parts.next()?;
    let text = parts.next().unwrap_or_default();
    Some(LogLine {
        time,
        stream,
        full: tag == b"F",
        text,
    })
}

/// Renders CRI lines of `raw` as the user sees them, applying the non-follow filters
/// (`sinceSeconds/sinceTime`, `tailLines`, `timestamps`). `limitBytes` is the caller's job.
pub fn render(raw: &[u8], options: &LogOptions, since: Option<Timestamp>) -> Vec<u8> {
    let lines: Vec<LogLine<'_>> = raw
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(parse_line)
        .filter(|l| since.is_none_or(|s| l.time.parse::<Timestamp>().is_ok_and(|t| t >= s)))
        .collect();
    let skip = options
        .tail_lines
        .map_or(0, |n| lines.len().saturating_sub(n as usize));
    let mut out = Vec::new();
    for l in &lines[skip..] {
        render_line(l, options.timestamps, &mut out);
    }
    out
}

/// Appends one line as shown to users.
pub fn render_line(l: &LogLine<'_>, timestamps: bool, out: &mut Vec<u8>) {
    if timestamps {
        out.extend_from_slice(l.time.as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(l.text);
    if l.full {
        out.push(b'\n');
    }
}

/// The `since` bound of `options`, if any (sinceTime wins over sinceSeconds).
pub fn since_of(options: &LogOptions) -> Result<Option<Timestamp>, String> {
    if let Some(t) = &options.since_time {
        return t
            .parse::<Timestamp>()
            .map(Some)
            .map_err(|e| format!("sinceTime {t:?} is not an RFC 3339 time: {e}"));
    }
    Ok(options.since_seconds.and_then(|s| {
        crate::now()
            .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(s as i64))
            .ok()
    }))
}

/// Is `dir` a log directory of this module (for tests and cleanup).
pub fn is_log_dir(dir: &Path) -> bool {
    dir.join("0.log").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cri_formatted_filtered_and_rendered() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = ContainerLog::new(dir.path().join("c"))?;
        log.begin(0)?;
        log.write(LogStream::Stdout, b"one\ntw");
        log.write(LogStream::Stderr, b"err\n");
        log.write(LogStream::Stdout, b"o\n");
        log.end();
        let raw = log.read_instance(0);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let first = text.lines().next().unwrap_or_default();
        assert!(first.ends_with(" stdout F one"), "{text}");
        assert!(
            first
                .split(' ')
                .next()
                .is_some_and(|t| t.parse::<Timestamp>().is_ok())
        );
        let all = render(&raw, &LogOptions::default(), None);
        assert_eq!(all, b"one\nerr\ntwo\n");
        let tail = render(
            &raw,
            &LogOptions {
                tail_lines: Some(1),
                ..LogOptions::default()
            },
            None,
        );
        assert_eq!(tail, b"two\n");
        assert_eq!(parse_line(b"garbage"), None);
        Ok(())
    }
}
