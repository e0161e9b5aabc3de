//! The crash-safe spool: every generated record is appended to a log before it can be sent,
//! and every ack (or reject) after it arrives. After a `kill -9`, the next start replays the log:
//! same `source`, the `seq` sequence continues, and everything never acked is sent again.
//!
//! Lines: `G <record json>` (generated), `A <seq>,<seq>,…` (acked or rejected: forgotten).
//! Generated lines are collected in memory and written in one `write` before any of their
//! records is sent ([`Spool::flush`], called by the window when it hands out a batch); acks are
//! written at once. So a record reaches the OS before it leaves the process, which survives a
//! crash of the process (not of the machine). A record made but lost with the process before
//! its line was written was never sent either: its seq is simply made again by the next run.
//!
//! The log is compacted at startup, and while running whenever it has grown by
//! [`SEGMENT_BYTES`] since its last compaction: a fresh file holding only the records still
//! unacked (at most the window) replaces it atomically. So its size stays below what the window
//! holds plus one segment, at any rate and for any time.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

use flowmesh_common::metrics as m;
use flowmesh_common::record::Record;

/// What a spool held at startup.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The source the spool belongs to, if it was used before.
    pub source: Option<String>,
    /// The last seq generated.
    pub last_seq: u64,
    /// Records generated and never acked, by seq.
    pub unacked: BTreeMap<u64, Record>,
}

/// How much the log may grow past its last compaction before it is compacted again.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// An open spool.
#[derive(Debug)]
pub struct Spool {
    log: Mutex<Log>,
}

#[derive(Debug)]
struct Log {
    dir: PathBuf,
    file: File,
    /// The records logged and not forgotten, by seq: what a compaction keeps. Their JSON is
    /// shared with the window, so this costs no copy of a record.
    live: BTreeMap<u64, Arc<str>>,
    /// The highest seq ever logged (kept by a compaction as its `S` line).
    last_seq: u64,
    /// The log's size now, and the size at which it is compacted next.
    size: u64,
    compact_at: u64,
    /// Lines not yet written (bounded by the window: one per record it holds).
    pending: Vec<u8>,
    /// A write failed part-way: the next one starts on a fresh line, so the torn one stays
    /// alone and is skipped by recovery.
    torn: bool,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovers its content and compacts it.
    /// `source` is the configured source; a spool made for another source is refused.
    pub fn open(dir: &Path, source: Option<&str>) -> anyhow::Result<(Self, Recovered)> {
        fs::create_dir_all(dir)?;
        let source_path = dir.join("source");
        let stored_source = fs::read_to_string(&source_path)
            .ok()
            .map(|s| s.trim().to_owned());
        if let (Some(stored), Some(wanted)) = (&stored_source, source)
            && stored != wanted
        {
            anyhow::bail!(
                "the spool in {} belongs to source {stored:?}, not {wanted:?}: use another --spool-dir",
                dir.display()
            );
        }
        let log = dir.join("records.log");
        let mut recovered = read_log(&log)?;
        recovered.source = stored_source;
        let live = recovered
            .unacked
            .iter()
            .map(|(&seq, record)| (seq, Arc::from(record.to_json())))
            .collect();
        let (file, size) = compact(dir, recovered.last_seq, &live)?;
        Ok((
            Self {
                log: Mutex::new(Log {
                    dir: dir.to_owned(),
                    file,
                    live,
                    last_seq: recovered.last_seq,
                    size,
                    compact_at: size + SEGMENT_BYTES,
                    pending: Vec::new(),
                    torn: false,
                }),
            },
            recovered,
        ))
    }

    /// The log's size in bytes now (what was written to it since its last compaction
    /// included).
    pub fn size(&self) -> u64 {
        self.lock().size
    }

    /// Records the source this spool belongs to (once, at first use).
    pub fn set_source(dir: &Path, source: &str) -> io::Result<()> {
        let path: PathBuf = dir.join("source");
        if !path.exists() {
            fs::write(&path, source)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs generated record `seq` (its JSON); it may be sent only after the next
    /// [`Spool::flush`] returned Ok.
    pub fn generated(&self, seq: u64, json: &Arc<str>) {
        let mut log = self.lock();
        log.live.insert(seq, Arc::clone(json));
        log.last_seq = log.last_seq.max(seq);
        log.pending.extend_from_slice(b"G ");
        log.pending.extend_from_slice(json.as_bytes());
        log.pending.push(b'\n');
    }

    /// Writes every line logged so far, in one write.
    pub fn flush(&self) -> io::Result<()> {
        self.lock().flush()
    }

    /// Logs records the generator may forget (written at once, with anything pending).
    pub fn forgotten(&self, seqs: &[u64]) -> io::Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut log = self.lock();
        for seq in seqs {
            log.live.remove(seq);
        }
        log.pending.extend_from_slice(b"A ");
        for (i, seq) in seqs.iter().enumerate() {
            if i > 0 {
                log.pending.push(b',');
            }
            log.pending.extend_from_slice(seq.to_string().as_bytes());
        }
        log.pending.push(b'\n');
        log.flush()
    }
}

impl Log {
    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.size + self.pending.len() as u64 >= self.compact_at {
            // The compacted log holds every live record, those of the pending lines included,
            // so it replaces writing them.
            match compact(&self.dir, self.last_seq, &self.live) {
                Ok((file, size)) => {
                    self.file = file;
                    self.size = size;
                    self.compact_at = size + SEGMENT_BYTES;
                    self.pending.clear();
                    self.torn = false;
                    metrics::counter!(m::GEN_SPOOL_COMPACTIONS).increment(1);
                    metrics::gauge!(m::GEN_SPOOL_BYTES).set(size as f64);
                    return Ok(());
                }
                Err(err) => {
                    // The log stays as it was and keeps growing; the next flush tries again.
                    tracing::warn!(error = %err, "cannot compact the spool");
                }
            }
        }
        if self.torn {
            self.file.write_all(b"\n")?;
            self.size += 1;
            self.torn = false;
        }
        match self.file.write_all(&self.pending) {
            Ok(()) => {
                self.size += self.pending.len() as u64;
                metrics::gauge!(m::GEN_SPOOL_BYTES).set(self.size as f64);
                self.pending.clear();
                Ok(())
            }
            Err(err) => {
                self.torn = true;
                Err(err)
            }
        }
    }
}

/// Writes a fresh log of `live` (after an `S last_seq` line) in `dir`, synced, and swaps it in
/// for `records.log` atomically: a crash at any point leaves the old log or the new one, each
/// holding every unacked record. Returns the new log, opened for appending, and its size.
fn compact(dir: &Path, last_seq: u64, live: &BTreeMap<u64, Arc<str>>) -> io::Result<(File, u64)> {
    let log = dir.join("records.log");
    let tmp = dir.join("records.log.tmp");
    {
        let mut out = io::BufWriter::new(File::create(&tmp)?);
        writeln!(out, "S {last_seq}")?;
        for json in live.values() {
            writeln!(out, "G {json}")?;
        }
        out.flush()?;
        out.get_ref().sync_all()?;
    }
    fs::rename(&tmp, &log)?;
    let file = OpenOptions::new().append(true).open(&log)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

fn read_log(path: &Path) -> io::Result<Recovered> {
    let mut recovered = Recovered::default();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(recovered),
        Err(err) => return Err(err),
    };
    for line in BufReader::new(file).lines() {
        let line = line?;
        // A torn or unreadable line (the crash hit mid-write) is skipped: its record, if any,
        // was never handed on, because the write had not returned.
        if let Some(json) = line.strip_prefix("G ") {
            if let Ok(record) = Record::from_json(json) {
                recovered.last_seq = recovered.last_seq.max(record.seq);
                recovered.unacked.insert(record.seq, record);
            }
        } else if let Some(list) = line.strip_prefix("A ") {
            for seq in list.split(',').filter_map(|s| s.trim().parse::<u64>().ok()) {
                recovered.unacked.remove(&seq);
            }
        } else if let Some(seq) = line
            .strip_prefix("S ")
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            recovered.last_seq = recovered.last_seq.max(seq);
        }
    }
    Ok(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> Record {
        Record::new("spooled", seq, chrono::Utc::now(), 10, None)
    }

    #[test]
    fn a_reopened_spool_returns_the_unacked_records_and_the_last_seq() {
        let dir = tempfile::tempdir().expect("dir");
        let (spool, recovered) = Spool::open(dir.path(), Some("spooled")).expect("open");
        assert_eq!(recovered.last_seq, 0);
        Spool::set_source(dir.path(), "spooled").expect("source");
        for seq in 1..=5 {
            spool.generated(seq, &record(seq).to_json().into());
        }
        spool.forgotten(&[1, 2, 4]).expect("log");
        drop(spool);
        let (spool, recovered) = Spool::open(dir.path(), None).expect("reopen");
        assert_eq!(recovered.source.as_deref(), Some("spooled"));
        assert_eq!(recovered.last_seq, 5);
        assert_eq!(
            recovered.unacked.keys().copied().collect::<Vec<_>>(),
            vec![3, 5]
        );
        // After compaction the last seq survives even when everything was acked.
        spool.forgotten(&[3, 5]).expect("log");
        drop(spool);
        let (_, recovered) = Spool::open(dir.path(), None).expect("reopen");
        assert_eq!(recovered.last_seq, 5);
        assert!(recovered.unacked.is_empty());
    }

    #[test]
    fn generated_lines_reach_the_file_only_when_flushed() {
        let dir = tempfile::tempdir().expect("dir");
        let (spool, _) = Spool::open(dir.path(), Some("spooled")).expect("open");
        spool.generated(1, &record(1).to_json().into());
        spool.generated(2, &record(2).to_json().into());
        let log = dir.path().join("records.log");
        let unflushed = read_log(&log).expect("read");
        assert!(
            unflushed.unacked.is_empty(),
            "nothing written before the flush"
        );
        spool.flush().expect("flush");
        let flushed = read_log(&log).expect("read");
        assert_eq!(
            flushed.unacked.keys().copied().collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().expect("dir");
        let good = record(1).to_json();
        fs::write(
            dir.path().join("records.log"),
            format!("G {good}\nG {{\"id\":\"x"),
        )
        .expect("seed");
        let (_, recovered) = Spool::open(dir.path(), None).expect("open");
        assert_eq!(recovered.unacked.len(), 1);
        assert_eq!(recovered.last_seq, 1);
    }

    #[test]
    fn a_running_spool_compacts_itself_so_its_size_stays_within_the_window_plus_one_segment() {
        let dir = tempfile::tempdir().expect("dir");
        let (spool, _) = Spool::open(dir.path(), Some("spooled")).expect("open");
        let window = 1_000u64;
        // About five segments' worth of records go through a window of 1 000: each batch is
        // logged, flushed, and acked once the window is full, as the generator does.
        let total = 5 * SEGMENT_BYTES / (record(1).to_json().len() as u64);
        // The longest line (`G ` and the JSON of the largest seq).
        let line = record(total).to_json().len() as u64 + 3;
        let mut largest = 0;
        for seq in 1..=total {
            spool.generated(seq, &record(seq).to_json().into());
            if seq % 100 == 0 {
                spool.flush().expect("flush");
                if seq > window {
                    let acked: Vec<u64> = (seq - window - 99..=seq - window).collect();
                    spool.forgotten(&acked).expect("ack");
                }
            }
            largest = largest.max(
                fs::metadata(dir.path().join("records.log"))
                    .expect("log")
                    .len(),
            );
        }
        assert_eq!(
            largest.max(spool.size()),
            largest,
            "size() follows the file"
        );
        assert!(
            largest <= window * line + SEGMENT_BYTES + 100 * line,
            "the log grew to {largest} bytes"
        );
        // What a restart finds is exactly the unacked window and the last seq written (the
        // records after the last flush were never written, so never sent either).
        drop(spool);
        let (_, recovered) = Spool::open(dir.path(), None).expect("reopen");
        let flushed = (total / 100) * 100;
        assert_eq!(recovered.last_seq, flushed);
        assert_eq!(
            recovered.unacked.keys().copied().collect::<Vec<_>>(),
            (flushed - window + 1..=flushed).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_spool_of_another_source_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        Spool::set_source(dir.path(), "a").expect("source");
        assert!(Spool::open(dir.path(), Some("b")).is_err());
    }
}
