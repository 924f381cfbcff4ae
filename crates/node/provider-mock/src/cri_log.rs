//! Container logs in the CRI log format (`<RFC3339Nano> stdout|stderr F|P <content>`), as
//! container runtimes write them and the kubelet reads them: written by [`LogWriter`] while a
//! container's main process runs, read back by [`read`] for `kubectl logs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::Timestamp;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::watch;
use updraft_provider::LogOptions;

/// Lines longer than this are split into partial (`P`) records, like containerd does.
const MAX_RECORD: usize = 16 * 1024;

/// Which output a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// The process's stdout.
    Stdout,
    /// The process's stderr.
    Stderr,
}

impl Output {
    fn tag(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// Progress of one log file, for followers: bumped after every flushed write; `ended` once the
/// process that writes it is gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Records written so far.
    pub records: u64,
    /// Whether the writer has finished (the container instance ended).
    pub ended: bool,
}

/// One container instance's log file and the signal followers wait on.
#[derive(Debug, Clone)]
pub(crate) struct LogFile {
    /// Where the records are.
    pub path: PathBuf,
    /// Write progress.
    pub progress: watch::Receiver<Progress>,
}

/// Appends records to a log file; one per container instance, shared by its stdout and stderr
/// pumps (each keeps its own partial line, see [`LineSplitter`]).
#[derive(Debug)]
pub(crate) struct LogWriter {
    file: tokio::fs::File,
    progress: watch::Sender<Progress>,
}

impl LogWriter {
    /// Creates (truncates) the log file at `path`.
    pub async fn create(path: &Path) -> std::io::Result<(Self, LogFile)> {
        let file = tokio::fs::File::create(path).await?;
        let (progress, receiver) = watch::channel(Progress::default());
        Ok((
            Self { file, progress },
            LogFile {
                path: path.to_owned(),
                progress: receiver,
            },
        ))
    }

    /// Writes one record stamped now.
    pub async fn record(&mut self, output: Output, complete: bool, content: &[u8]) {
        let mut line = Vec::with_capacity(content.len() + 48);
        line.extend_from_slice(timestamp(SystemTime::now()).to_string().as_bytes());
        line.push(b' ');
        line.extend_from_slice(output.tag().as_bytes());
        line.extend_from_slice(if complete { b" F " } else { b" P " });
        line.extend_from_slice(content);
        line.push(b'\n');
        // A full disk loses log lines, never the container: the process keeps running.
        if self.file.write_all(&line).await.is_ok() && self.file.flush().await.is_ok() {
            self.progress.send_modify(|p| p.records += 1);
        }
    }

    /// Marks the log as complete: followers stop at its end.
    pub fn finish(&self) {
        self.progress.send_modify(|p| p.ended = true);
    }
}

/// Splits a byte stream into log records: complete lines, and partial records for lines
/// longer than [`MAX_RECORD`] or left unterminated at the end.
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds `chunk`; returns the records it completes as (complete, content).
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<(bool, Vec<u8>)> {
        let mut records = Vec::new();
        for &byte in chunk {
            if byte == b'\n' {
                records.push((true, std::mem::take(&mut self.pending)));
            } else {
                self.pending.push(byte);
                if self.pending.len() >= MAX_RECORD {
                    records.push((false, std::mem::take(&mut self.pending)));
                }
            }
        }
        records
    }

    /// What is left at the end of the stream, as a complete record.
    pub fn finish(&mut self) -> Option<(bool, Vec<u8>)> {
        (!self.pending.is_empty()).then(|| (true, std::mem::take(&mut self.pending)))
    }
}

/// `time` as a Timestamp (the jiff in this build has no `std` conversions).
fn timestamp(time: SystemTime) -> Timestamp {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
    let nanos = i32::try_from(since_epoch.subsec_nanos()).unwrap_or(0);
    Timestamp::new(seconds, nanos).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn system_time(time: Timestamp) -> SystemTime {
    let seconds = u64::try_from(time.as_second()).unwrap_or(0);
    let nanos = u32::try_from(time.subsec_nanosecond()).unwrap_or(0);
    UNIX_EPOCH + Duration::new(seconds, nanos)
}

/// One parsed record.
#[derive(Debug, PartialEq, Eq)]
struct Record<'a> {
    time: Timestamp,
    complete: bool,
    content: &'a [u8],
}

fn parse(line: &[u8]) -> Option<Record<'_>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut fields = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let _output = fields.next()?;
    let complete = match fields.next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    Some(Record {
        time,
        complete,
        content: fields.next().unwrap_or_default(),
    })
}

/// What `kubectl logs` prints for one record.
fn render(record: &Record<'_>, timestamps: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.content.len() + 40);
    if timestamps {
        out.extend_from_slice(record.time.to_string().as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(record.content);
    if record.complete {
        out.push(b'\n');
    }
    out
}

fn wanted(record: &Record<'_>, since: Option<SystemTime>) -> bool {
    since.is_none_or(|since| system_time(record.time) >= since)
}

/// Where [`read`] sends what it renders; the receiving end is the client's log stream.
pub(crate) type LogSink = tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>;

async fn send(out: &LogSink, data: Vec<u8>) -> std::io::Result<()> {
    out.send(Ok(data.into()))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
}

/// Streams `log` to `out` as `options` ask (tail, since, timestamps, follow); `limitBytes` is
/// applied by the caller. Ends at the end of the file, or with `follow` once the instance has
/// ended and everything is sent, or as soon as the client drops its end of `out`.
pub(crate) async fn read(
    mut log: LogFile,
    options: LogOptions,
    out: LogSink,
) -> std::io::Result<()> {
    let file = tokio::fs::File::open(&log.path).await?;
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    // Phase 1: what is already written, with tail applied. `ended` is read before reading, so
    // once it is true and the file is exhausted, nothing more will come.
    let mut ended = log.progress.borrow_and_update().ended;
    let mut tail: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::new();
    let mut complete_in_tail = 0u64;
    loop {
        let n = reader.read_until(b'\n', &mut line).await?;
        if n == 0 || !line.ends_with(b"\n") {
            break;
        }
        if let Some(record) = parse(&line)
            && wanted(&record, options.since)
        {
            let rendered = render(&record, options.timestamps);
            match options.tail_lines {
                Some(0) => {}
                Some(n) => {
                    complete_in_tail += u64::from(rendered.ends_with(b"\n"));
                    tail.push_back(rendered);
                    // Keep whole lines: drop leading records until at most n complete lines remain.
                    while complete_in_tail > n {
                        if let Some(dropped) = tail.pop_front() {
                            complete_in_tail -= u64::from(dropped.ends_with(b"\n"));
                        }
                    }
                }
                None => send(&out, rendered).await?,
            }
        }
        line.clear();
    }
    for rendered in tail {
        send(&out, rendered).await?;
    }
    if !options.follow {
        return Ok(());
    }
    // Phase 2: follow until the instance ends or the client goes away.
    loop {
        if !line.ends_with(b"\n") {
            let n = reader.read_until(b'\n', &mut line).await?;
            if n == 0 || !line.ends_with(b"\n") {
                if ended {
                    return Ok(());
                }
                tokio::select! {
                    changed = log.progress.changed() => {
                        // A dropped writer means the instance is gone, like `ended`.
                        ended = changed.is_err() || log.progress.borrow_and_update().ended;
                    }
                    () = out.closed() => return Ok(()),
                }
                continue;
            }
        }
        if let Some(record) = parse(&line)
            && wanted(&record, options.since)
        {
            send(&out, render(&record, options.timestamps)).await?;
        }
        line.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn long_lines_become_partial_records() {
        let mut splitter = LineSplitter::default();
        let mut input = vec![b'a'; MAX_RECORD + 3];
        input.extend_from_slice(b"\nnext");
        let records = splitter.feed(&input);
        assert_eq!(records.len(), 2);
        assert!(!records[0].0 && records[0].1.len() == MAX_RECORD);
        assert_eq!(records[1], (true, b"aaa".to_vec()));
        assert_eq!(splitter.finish(), Some((true, b"next".to_vec())));
    }

    #[test]
    fn records_parse_and_render() {
        let record = parse(b"2026-01-02T03:04:05.123456789Z stderr F hello world\n").unwrap();
        assert!(record.complete);
        assert_eq!(record.content, b"hello world");
        assert_eq!(
            render(&record, true),
            b"2026-01-02T03:04:05.123456789Z hello world\n".to_vec()
        );
        assert!(parse(b"garbage").is_none());
    }

    #[tokio::test]
    async fn tail_and_follow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let (mut writer, log) = LogWriter::create(&path).await.unwrap();
        for line in ["one", "two", "three"] {
            writer.record(Output::Stdout, true, line.as_bytes()).await;
        }
        let collect = |mut rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>| async move {
            let mut all = Vec::new();
            while let Some(chunk) = rx.recv().await {
                all.extend_from_slice(&chunk.unwrap());
            }
            all
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let options = LogOptions {
            tail_lines: Some(2),
            ..LogOptions::default()
        };
        read(log.clone(), options, tx).await.unwrap();
        assert_eq!(collect(rx).await, b"two\nthree\n");

        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let follower = tokio::spawn(read(
            log,
            LogOptions {
                follow: true,
                tail_lines: Some(1),
                ..LogOptions::default()
            },
            tx,
        ));
        // The last line arrives first; only then is "four" written, so it can only come
        // through following.
        let mut seen = Vec::new();
        while seen.len() < b"three\n".len() {
            seen.extend_from_slice(&rx.recv().await.unwrap().unwrap());
        }
        assert_eq!(seen, b"three\n");
        writer.record(Output::Stderr, true, b"four").await;
        writer.finish();
        follower.await.unwrap().unwrap();
        assert_eq!(collect(rx).await, b"four\n");
    }
}
