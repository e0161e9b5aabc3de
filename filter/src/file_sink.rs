//! The JSON Lines file sink: buffered, group-committed, rotated by size and age, with a stated
//! durability mode. Used for routed records (`records.jsonl`) and for dead letters
//! (`dead-letter.jsonl`).
//!
//! A commit writes every line queued since the last one, flushes, and (in `fsync` mode) syncs the
//! file; only then are its records acked. Each records file holds records of one routes version
//! only: the active file's version is in `{stem}.version` beside it, a rotated file's in its
//! name, and a job of another version rotates the active file first. A failed commit is cut back to the last good length,
//! so a record is never half in the file, and its records are nacked.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flowmesh_common::breaker::Breaker;
use flowmesh_common::metrics as m;
use flowmesh_common::spans::RecordSpan;
use tokio::sync::mpsc;

use crate::config::Durability;
use crate::reply::Completion;

/// Lines per group commit at most.
const MAX_COMMIT_LINES: usize = 20_000;
/// Jobs queued for the writer at most (each job is one frame's worth of lines).
const QUEUE_JOBS: usize = 1024;
/// How often an idle sink checks whether its file has grown too old.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Where and how a file sink writes.
#[derive(Debug, Clone)]
pub struct FileSinkConfig {
    /// Directory of the active and rotated files.
    pub dir: PathBuf,
    /// File name stem: the active file is `{stem}.jsonl`.
    pub stem: &'static str,
    /// Rotate when the active file reaches this size.
    pub max_bytes: u64,
    /// Rotate when the active file is this old.
    pub max_age: Duration,
    /// When a commit counts as stored.
    pub durability: Durability,
    /// How many recently written record ids are remembered (and reloaded from the files at
    /// startup) to drop re-sent records instead of writing them twice; 0 turns this off.
    pub dedupe_window: usize,
    /// Cap on the active and rotated files together; a commit that would pass it fails (the
    /// sink's breaker opens, `flowmesh_filter_file_full` is 1) until files are removed.
    pub max_total_bytes: Option<u64>,
}

impl FileSinkConfig {
    /// Path of the active file.
    pub fn active_path(&self) -> PathBuf {
        self.dir.join(format!("{}.jsonl", self.stem))
    }
}

/// Lines to append and what to do after.
#[derive(Debug)]
pub struct FileJob {
    /// One JSON document per line, without newlines.
    pub lines: Vec<String>,
    /// The record id of each line as [`id_key`], for dropping re-sent records; empty for no
    /// such check.
    pub keys: Vec<u128>,
    /// The routes version the lines were routed under; `None` for lines of no version (dead
    /// letters).
    pub version: Option<String>,
    /// The span of each line's append (empty where traces are off, and for dead letters),
    /// ended when its commit did.
    pub spans: Vec<RecordSpan>,
    /// The answer to give.
    pub completion: Completion,
}

/// A handle to a running file sink. Cheap to clone; the sink stops when every handle is gone.
#[derive(Debug, Clone)]
pub struct FileSink {
    sender: mpsc::Sender<FileJob>,
    breaker: Breaker,
}

impl FileSink {
    /// Starts the sink's writer task.
    pub fn start(config: FileSinkConfig, breaker: Breaker) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(QUEUE_JOBS);
        let task = tokio::spawn(run(config, receiver, breaker.clone()));
        (Self { sender, breaker }, task)
    }

    /// The breaker guarding this sink.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Queues a job, waiting for room (backpressure). Only fails when the sink has stopped.
    pub async fn submit(&self, job: FileJob) -> Result<(), FileJob> {
        self.sender.send(job).await.map_err(|err| err.0)
    }
}

async fn run(config: FileSinkConfig, mut receiver: mpsc::Receiver<FileJob>, breaker: Breaker) {
    let mut writer = Some(Writer::new(config.clone()));
    // A job of another version than the commit being gathered: it starts the next commit.
    let mut held: Option<FileJob> = None;
    loop {
        let first = if let Some(job) = held.take() {
            job
        } else {
            tokio::select! {
            job = receiver.recv() => match job {
                Some(job) => job,
                None => break,
            },
            _ = tokio::time::sleep(IDLE_CHECK) => {
                writer = run_blocking(writer.take().unwrap_or_else(|| Writer::new(config.clone())), |w| {
                    if let Err(err) = w.rotate_if_due() {
                        tracing::warn!(file = w.config.stem, error = %err, "rotation failed");
                    }
                })
                .await
                .map(|(w, ())| w);
                continue;
            }
            }
        };
        let version = first.version.clone();
        let mut jobs = vec![first];
        let mut count = jobs[0].lines.len();
        while count < MAX_COMMIT_LINES {
            match receiver.try_recv() {
                Ok(job) if job.version != version => {
                    held = Some(job);
                    break;
                }
                Ok(job) => {
                    count += job.lines.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let mut lines: Vec<(Option<u128>, String)> = Vec::with_capacity(count);
        let mut completions = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut keys = job.keys.into_iter();
            lines.extend(job.lines.into_iter().map(|line| (keys.next(), line)));
            completions.push((job.completion, job.spans));
        }
        let stem = config.stem;
        let started = Instant::now();
        let (back, result) = match run_blocking(
            writer.take().unwrap_or_else(|| Writer::new(config.clone())),
            move |w| w.commit(&lines, version.as_deref()),
        )
        .await
        {
            Some((w, result)) => (Some(w), result),
            None => (None, Err(io::Error::other("file writer lost"))),
        };
        writer = back;
        metrics::histogram!(m::FILTER_FILE_COMMIT_SECONDS, "file" => stem)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::FILTER_FILE_COMMIT_RECORDS, "file" => stem).record(count as f64);
        breaker.record(result.is_ok());
        if let Err(err) = &result {
            tracing::error!(file = stem, error = %err, records = count, "file commit failed; records nacked");
        }
        answer(completions, &result, stem, breaker.retry_after());
    }
    tracing::info!(file = config.stem, "file sink closed");
}

/// Runs blocking file work on the blocking pool and hands the writer back with the result.
/// `None` only if the work panicked, which loses the writer (the next commit reopens the file).
async fn run_blocking<F, T>(mut writer: Writer, work: F) -> Option<(Writer, T)>
where
    F: FnOnce(&mut Writer) -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let out = work(&mut writer);
        (writer, out)
    })
    .await
    .ok()
}

/// Ends each line's span and answers each job of a commit by its `result`.
fn answer(
    completions: Vec<(Completion, Vec<RecordSpan>)>,
    result: &io::Result<()>,
    stem: &str,
    retry_after: Duration,
) {
    for (completion, spans) in completions {
        for span in spans {
            span.finish(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|err| format!("{stem} commit failed: {err}")),
            );
        }
        complete(completion, result, retry_after);
    }
}

fn complete(completion: Completion, result: &io::Result<()>, retry_after: Duration) {
    match result {
        Ok(()) => completion.stored(),
        Err(err) => {
            let reason = format!("{} failed: {err}", completion.sink());
            completion.not_stored(&reason, retry_after);
        }
    }
}

/// The blocking side: owns the open file.
struct Writer {
    config: FileSinkConfig,
    file: Option<BufWriter<File>>,
    /// Length of the active file after the last successful commit.
    committed_len: Option<u64>,
    /// Length of all the sink's files, once read (for `max_total_bytes`).
    total_len: Option<u64>,
    opened_at: Instant,
    /// Ids of the records written last (bounded by `dedupe_window`).
    recent: RecentIds,
    recent_loaded: bool,
    /// The routes version of the active file, once read from its `.version` file (`None`
    /// inside: a file of no recorded version, which the built-in routes wrote).
    version: Option<Option<String>>,
}

/// A bounded set of the most recently written record ids: oldest forgotten first. Ids are kept
/// as 128-bit values (a UUID's own size), so 100 000 of them take a few MiB. Hashed with
/// foldhash, seeded per process: several times cheaper than SipHash for one `u128`, and a
/// client choosing its ids still cannot predict the buckets.
#[derive(Debug, Default)]
struct RecentIds {
    set: std::collections::HashSet<u128, foldhash::quality::RandomState>,
    order: std::collections::VecDeque<u128>,
}

/// A record id as the 128-bit key the sink remembers it by (a UUID's own value).
pub fn id_key(id: &str) -> u128 {
    match uuid::Uuid::try_parse(id) {
        Ok(uuid) => uuid.as_u128(),
        // Not a UUID (never for validated records): fall back to a hash of the text.
        Err(_) => {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            id.hash(&mut hasher);
            u128::from(hasher.finish())
        }
    }
}

/// The keys of the last `keep` record ids in a file of JSON lines, oldest first, read one line
/// at a time (lines that are not records are skipped).
fn last_ids(mut reader: impl io::BufRead, keep: usize) -> std::collections::VecDeque<u128> {
    #[derive(serde::Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
    }
    let mut ids = std::collections::VecDeque::with_capacity(keep.min(1 << 16));
    let mut line = Vec::new();
    if keep == 0 {
        return ids;
    }
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Ok(record) = serde_json::from_slice::<IdOnly>(&line) {
            if ids.len() == keep {
                ids.pop_front();
            }
            ids.push_back(id_key(&record.id));
        }
    }
    ids
}

impl RecentIds {
    fn contains(&self, id: u128) -> bool {
        self.set.contains(&id)
    }

    fn insert(&mut self, id: u128, capacity: usize) {
        if capacity == 0 || !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

impl Writer {
    fn new(config: FileSinkConfig) -> Self {
        Self {
            config,
            file: None,
            committed_len: None,
            total_len: None,
            opened_at: Instant::now(),
            recent: RecentIds::default(),
            recent_loaded: false,
            version: None,
        }
    }

    fn commit(
        &mut self,
        lines: &[(Option<u128>, String)],
        version: Option<&str>,
    ) -> io::Result<()> {
        let result = self.try_commit(lines, version);
        if result.is_err() {
            self.abandon();
        }
        result
    }

    fn try_commit(
        &mut self,
        lines: &[(Option<u128>, String)],
        version: Option<&str>,
    ) -> io::Result<()> {
        self.check_room(lines)?;
        self.rotate_if_due()?;
        if let Some(version) = version {
            self.switch_version(version)?;
        }
        self.load_recent();
        let durability = self.config.durability;
        let mut fresh_keys = Vec::new();
        let mut in_batch: std::collections::HashSet<u128, foldhash::quality::RandomState> =
            std::collections::HashSet::default();
        let mut duplicates = 0u64;
        let mut written = 0u64;
        let recent = std::mem::take(&mut self.recent);
        let result = (|| -> io::Result<()> {
            let file = self.open()?;
            for (key, line) in lines {
                if let Some(key) = *key {
                    if recent.contains(key) || !in_batch.insert(key) {
                        duplicates += 1;
                        continue;
                    }
                    fresh_keys.push(key);
                }
                file.write_all(line.as_bytes())?;
                file.write_all(b"\n")?;
                written += line.len() as u64 + 1;
            }
            file.flush()?;
            if durability == Durability::Fsync {
                file.get_ref().sync_data()?;
            }
            Ok(())
        })();
        self.recent = recent;
        result?;
        self.committed_len = Some(self.committed_len.unwrap_or(0) + written);
        if let Some(total) = self.total_len.as_mut() {
            *total += written;
        }
        for key in fresh_keys {
            self.recent.insert(key, self.config.dedupe_window);
        }
        if duplicates > 0 {
            metrics::counter!(m::FILTER_FILE_DUPLICATES, "file" => self.config.stem)
                .increment(duplicates);
        }
        Ok(())
    }

    /// Fails when `lines` would take the files past `max_total_bytes`. The total is read from the
    /// directory at first and again whenever the cap is hit, so removing old files frees room.
    fn check_room(&mut self, lines: &[(Option<u128>, String)]) -> io::Result<()> {
        let Some(cap) = self.config.max_total_bytes else {
            return Ok(());
        };
        let needed: u64 = lines.iter().map(|(_, line)| line.len() as u64 + 1).sum();
        let fits = |total: u64| total + needed <= cap;
        if !self.total_len.is_some_and(fits) {
            let total = sink_files(&self.config.dir, self.config.stem)
                .unwrap_or_default()
                .iter()
                .filter_map(|path| std::fs::metadata(path).ok())
                .map(|meta| meta.len())
                .sum();
            self.total_len = Some(total);
        }
        let full = !self.total_len.is_some_and(fits);
        metrics::gauge!(m::FILTER_FILE_FULL, "file" => self.config.stem).set(if full {
            1.0
        } else {
            0.0
        });
        if full {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "the {} files reached their cap of {cap} bytes",
                    self.config.stem
                ),
            ));
        }
        Ok(())
    }

    /// Once per process: remembers the ids of the last `dedupe_window` records already in the
    /// files, so records re-sent after a crash of the filter are not written twice. Reads the
    /// newest files only, as far back as the window reaches, one line at a time: what it holds
    /// is the window's 16-byte keys, not the files (a 64 MiB file read whole, with a string per
    /// id, would lift the process's memory for good at every start).
    fn load_recent(&mut self) {
        let window = self.config.dedupe_window;
        if self.recent_loaded || window == 0 {
            return;
        }
        self.recent_loaded = true;
        let files = sink_files(&self.config.dir, self.config.stem).unwrap_or_default();
        // Newest file first; each gives its last ids (up to what the window still lacks).
        let mut newest_first: Vec<std::collections::VecDeque<u128>> = Vec::new();
        let mut loaded = 0;
        for path in files.iter().rev() {
            if loaded >= window {
                break;
            }
            let Ok(file) = File::open(path) else { continue };
            let ids = last_ids(io::BufReader::new(file), window - loaded);
            loaded += ids.len();
            newest_first.push(ids);
        }
        for id in newest_first.into_iter().rev().flatten() {
            self.recent.insert(id, window);
        }
        if loaded > 0 {
            tracing::info!(
                file = self.config.stem,
                ids = loaded,
                "remembered recently written records to drop re-sent ones"
            );
        }
    }

    /// Drops the buffered bytes of a failed commit and cuts the file back to its last good length.
    fn abandon(&mut self) {
        if let Some(file) = self.file.take() {
            let (file, _unwritten) = file.into_parts();
            if let Some(len) = self.committed_len {
                let _ = file.set_len(len);
            }
        }
    }

    fn open(&mut self) -> io::Result<&mut BufWriter<File>> {
        if self.file.is_none() {
            fs::create_dir_all(&self.config.dir)?;
            let path = self.config.active_path();
            let mut file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)?;
            let len = repair(&mut file, self.committed_len)?;
            if self.committed_len.is_none() {
                self.opened_at = Instant::now();
            }
            self.committed_len = Some(len);
            self.file = Some(BufWriter::with_capacity(256 * 1024, file));
        }
        // Just set above when it was None.
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("file not open"))
    }

    /// The active file's routes version, read once from its `.version` file.
    fn active_version(&mut self) -> io::Result<Option<String>> {
        if self.version.is_none() {
            let read = match fs::read_to_string(version_path(&self.config.dir, self.config.stem)) {
                Ok(text) => Some(text.trim().to_owned()).filter(|v| !v.is_empty()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => None,
                Err(err) => return Err(err),
            };
            self.version = Some(read);
        }
        Ok(self.version.clone().flatten())
    }

    /// Makes the active file one of `version`: a file of another version that holds records is
    /// rotated first (its version goes into the rotated name), then `{stem}.version` is written.
    fn switch_version(&mut self, version: &str) -> io::Result<()> {
        if self.active_version()?.as_deref() == Some(version) {
            return Ok(());
        }
        let len = match self.committed_len {
            Some(len) => len,
            None => match fs::metadata(self.config.active_path()) {
                Ok(meta) => meta.len(),
                Err(err) if err.kind() == io::ErrorKind::NotFound => 0,
                Err(err) => return Err(err),
            },
        };
        if len > 0 {
            self.rotate("routes")?;
        }
        fs::create_dir_all(&self.config.dir)?;
        let path = version_path(&self.config.dir, self.config.stem);
        let temporary = path.with_extension("version.tmp");
        {
            let mut file = File::create(&temporary)?;
            file.write_all(version.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
        }
        fs::rename(&temporary, &path)?;
        File::open(&self.config.dir)?.sync_all()?;
        self.version = Some(Some(version.to_owned()));
        Ok(())
    }

    fn rotate_if_due(&mut self) -> io::Result<()> {
        let len = match self.committed_len {
            Some(len) => len,
            None => match fs::metadata(self.config.active_path()) {
                Ok(meta) => meta.len(),
                Err(_) => return Ok(()),
            },
        };
        if len == 0 {
            return Ok(());
        }
        let reason = if len >= self.config.max_bytes {
            "size"
        } else if self.opened_at.elapsed() >= self.config.max_age {
            "age"
        } else {
            return Ok(());
        };
        self.rotate(reason)
    }

    fn rotate(&mut self, reason: &'static str) -> io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush()?;
            file.get_ref().sync_data()?;
        }
        let from = self.config.active_path();
        let version = self.active_version()?;
        let to = rotated_path(&self.config.dir, self.config.stem, version.as_deref());
        fs::rename(&from, &to)?;
        if self.config.durability == Durability::Fsync {
            File::open(&self.config.dir)?.sync_all()?;
        }
        self.committed_len = Some(0);
        self.opened_at = Instant::now();
        metrics::counter!(m::FILTER_FILE_ROTATIONS, "file" => self.config.stem, "reason" => reason)
            .increment(1);
        tracing::info!(file = self.config.stem, reason, rotated_to = %to.display(), "file rotated");
        Ok(())
    }
}

/// Brings an opened file back to a state of whole lines: to `expected` bytes when this process
/// knows its last good length, else to just after the last newline (a crash may have left a
/// partial line). Returns the resulting length.
fn repair(file: &mut File, expected: Option<u64>) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let good = match expected {
        Some(expected) if expected <= len => expected,
        _ => last_line_end(file, len)?,
    };
    if good != len {
        file.set_len(good)?;
        tracing::warn!(
            cut_bytes = len - good,
            "cut an incomplete tail from the file"
        );
    }
    Ok(good)
}

fn last_line_end(file: &mut File, len: u64) -> io::Result<u64> {
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let size = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..size])?;
        if let Some(pos) = chunk[..size].iter().rposition(|b| *b == b'\n') {
            return Ok(start + pos as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// `{stem}.{UTC time of rotation}-{NNN}.{routes version}.jsonl` (no version part for a file of
/// no recorded version): the counter tells apart rotations within one millisecond, and every
/// name sorts in the order the files were written.
fn rotated_path(dir: &Path, stem: &str, version: Option<&str>) -> PathBuf {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let version = version.map(|v| format!(".{v}")).unwrap_or_default();
    (0..)
        .map(|n| dir.join(format!("{stem}.{stamp}-{n:03}{version}.jsonl")))
        .find(|candidate| !candidate.exists())
        .expect("some counter is free")
}

/// The file holding the active file's routes version.
pub fn version_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.version"))
}

/// The routes version of one of a sink's files: from a rotated file's name, or from
/// `{stem}.version` for the active file. `None` for a file of no recorded version (written
/// before routes had versions, by the built-in routes).
pub fn file_version(dir: &Path, stem: &str, path: &Path) -> io::Result<Option<String>> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name == format!("{stem}.jsonl") {
        return match fs::read_to_string(version_path(dir, stem)) {
            Ok(text) => Ok(Some(text.trim().to_owned()).filter(|v| !v.is_empty())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        };
    }
    // `{stem}.{date}T{time}.{ms}Z-{NNN}[.{version}].jsonl`
    let inner = name
        .strip_prefix(&format!("{stem}."))
        .and_then(|n| n.strip_suffix(".jsonl"))
        .unwrap_or_default();
    Ok(inner
        .split_once("Z-")
        .and_then(|(_, counter)| counter.split_once('.'))
        .map(|(_, version)| version.to_owned()))
}

/// Every file of a sink in write order: rotated files (oldest first), then the active one.
pub fn sink_files(dir: &Path, stem: &str) -> io::Result<Vec<PathBuf>> {
    let mut rotated: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("{stem}."))
                    && n.ends_with(".jsonl")
                    && n != format!("{stem}.jsonl")
            })
        })
        .collect();
    rotated.sort();
    let active = dir.join(format!("{stem}.jsonl"));
    if active.exists() {
        rotated.push(active);
    }
    Ok(rotated)
}

#[cfg(test)]
mod tests;
