//! The routes in force (docs/contracts.md §3): loaded from `FILTER_ROUTES` at start, reloaded on
//! SIGHUP and whenever the file changes, and recorded in `routes.log`.
//!
//! A reload that does not parse or validate is refused: the routes in force stay, one error
//! line names the problem, and `flowmesh_filter_routes_reloads_total{outcome="invalid"}` counts
//! it. Every version the filter applies is appended (fsynced) to `routes.log` in its data
//! directory before the first record is routed under it, so `verify` can always tell what a
//! stored record's version said.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use flowmesh_common::metrics as m;
use flowmesh_common::record::format_timestamp;
use flowmesh_common::routing::{Routes, RoutesError};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The log of applied versions, in the data directory.
pub const ROUTES_LOG: &str = "routes.log";

/// How long file events are gathered before the file is read again (an editor's save is often
/// several events).
const SETTLE: Duration = Duration::from_millis(150);

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// A new version is in force.
    Applied(String),
    /// The file holds the version already in force.
    Unchanged,
    /// The file was refused; the routes in force stay.
    Invalid(String),
}

impl Reload {
    fn outcome(&self) -> &'static str {
        match self {
            Self::Applied(_) => "applied",
            Self::Unchanged => "unchanged",
            Self::Invalid(_) => "invalid",
        }
    }
}

/// The routes in force, shared by every connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RoutesHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: RwLock<Arc<Routes>>,
    /// The routes file; `None` runs the built-in routes for good.
    path: Option<PathBuf>,
    log: PathBuf,
    /// Serialises reloads (SIGHUP and file events may race).
    reloading: Mutex<()>,
    loaded_at: RwLock<String>,
}

impl RoutesHandle {
    /// Loads the routes file (or the built-in routes without one) and records the version in
    /// `routes.log`. An invalid file is a configuration error.
    pub fn load(path: Option<&Path>, data_dir: &Path) -> Result<Self, RoutesError> {
        let routes = match path {
            Some(path) => Arc::new(read(path)?),
            None => Routes::builtin(),
        };
        let log = data_dir.join(ROUTES_LOG);
        append_log(&log, &routes, path)
            .map_err(|e| RoutesError(format!("recording the routes in {}: {e}", log.display())))?;
        let handle = Self {
            inner: Arc::new(Inner {
                current: RwLock::new(routes.clone()),
                path: path.map(Path::to_path_buf),
                log,
                reloading: Mutex::new(()),
                loaded_at: RwLock::new(format_timestamp(chrono::Utc::now())),
            }),
        };
        handle.publish(&routes, None);
        tracing::info!(
            version = routes.version(),
            routes = %routes.summary(),
            file = path.map(|p| p.display().to_string()),
            "routes in force"
        );
        Ok(handle)
    }

    /// The built-in routes, without touching a data directory (tests of single parts).
    pub fn builtin() -> Self {
        Self {
            inner: Arc::new(Inner {
                current: RwLock::new(Routes::builtin()),
                path: None,
                log: PathBuf::new(),
                reloading: Mutex::new(()),
                loaded_at: RwLock::new(format_timestamp(chrono::Utc::now())),
            }),
        }
    }

    /// The routes in force now. A frame is routed entirely under what this returned once.
    pub fn current(&self) -> Arc<Routes> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the routes file again and puts it in force if it is valid and new.
    pub fn reload(&self, why: &str) -> Reload {
        let Some(path) = &self.inner.path else {
            return Reload::Unchanged;
        };
        let _one_at_a_time = self
            .inner
            .reloading
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let old = self.current();
        let outcome = match read(path) {
            Err(err) => Reload::Invalid(err.0),
            Ok(routes) if routes.version() == old.version() => Reload::Unchanged,
            Ok(routes) => match append_log(&self.inner.log, &routes, Some(path)) {
                Err(err) => Reload::Invalid(format!(
                    "recording the routes in {}: {err}",
                    self.inner.log.display()
                )),
                Ok(()) => {
                    let routes = Arc::new(routes);
                    *self
                        .inner
                        .current
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = routes.clone();
                    *self
                        .inner
                        .loaded_at
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = format_timestamp(chrono::Utc::now());
                    self.publish(&routes, Some(&old));
                    Reload::Applied(routes.version().to_owned())
                }
            },
        };
        metrics::counter!(m::FILTER_ROUTES_RELOADS, "outcome" => outcome.outcome()).increment(1);
        match &outcome {
            Reload::Applied(version) => tracing::info!(
                trigger = why,
                from = old.version(),
                version = %version,
                routes = %self.current().summary(),
                "routes reloaded"
            ),
            Reload::Unchanged => {
                tracing::debug!(trigger = why, version = old.version(), "routes unchanged")
            }
            Reload::Invalid(problem) => tracing::error!(
                trigger = why,
                file = %path.display(),
                error = %problem,
                kept = old.version(),
                "routes file refused; the routes in force stay"
            ),
        }
        outcome
    }

    /// The health component: the version in force and its route names.
    pub fn component(&self) -> flowmesh_common::health::Component {
        let routes = self.current();
        flowmesh_common::health::Component::new(flowmesh_common::health::ComponentStatus::Up)
            .with_details(json!({
                "version": routes.version(),
                "routes": routes.names(),
                "file": self.inner.path.as_ref().map(|p| p.display().to_string()),
                "since": *self.inner.loaded_at.read().unwrap_or_else(|e| e.into_inner()),
            }))
    }

    /// Reloads on SIGHUP and on every change to the routes file, until `stop` fires.
    pub fn watch(&self, stop: CancellationToken) {
        let Some(path) = self.inner.path.clone() else {
            return;
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<&'static str>(1);
        // The watcher runs on its own thread; a full channel means a reload is already due.
        let watcher = watch_file(&path, tx.clone());
        let hangups = tx;
        let signals = stop.clone();
        // Registered before returning, so a SIGHUP sent once this returns is never the default
        // action (which would end the process).
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGHUP; the routes file reloads only on change")
            }
            Ok(mut hangup) => {
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = signals.cancelled() => break,
                            got = hangup.recv() => {
                                if got.is_none() { break; }
                                let _ = hangups.send("SIGHUP").await;
                            }
                        }
                    }
                });
            }
        }
        let handle = self.clone();
        tokio::spawn(async move {
            let _watcher = watcher;
            loop {
                let why = tokio::select! {
                    _ = stop.cancelled() => break,
                    why = rx.recv() => match why { Some(why) => why, None => break },
                };
                if why == "file changed" {
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                }
                let handle = handle.clone();
                let _ = tokio::task::spawn_blocking(move || handle.reload(why)).await;
            }
        });
    }

    fn publish(&self, routes: &Routes, old: Option<&Routes>) {
        if let Some(old) = old {
            metrics::gauge!(m::FILTER_ROUTES_VERSION, "version" => old.version().to_owned())
                .set(0.0);
        }
        metrics::gauge!(m::FILTER_ROUTES_VERSION, "version" => routes.version().to_owned())
            .set(1.0);
        for route in routes.routes() {
            metrics::counter!(m::FILTER_ROUTED, "route" => route.name().to_owned(), "destination" => route.to().as_str())
                .increment(0);
            metrics::counter!(m::FILTER_ROUTE_ERRORS, "route" => route.name().to_owned())
                .increment(0);
        }
    }
}

/// Watches the directory holding `path` (editors and `mv` replace the file, which a watch on
/// the file itself would lose) and signals on any event that names it.
fn watch_file(
    path: &Path,
    tx: tokio::sync::mpsc::Sender<&'static str>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = path.file_name().map(|n| n.to_owned());
    let watched = path.to_path_buf();
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.kind.is_access() {
                return;
            }
            if event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
                let _ = tx.try_send("file changed");
            }
        },
    ) {
        Ok(watcher) => watcher,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch the routes file; it reloads on SIGHUP only");
            return None;
        }
    };
    if let Err(err) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(file = %watched.display(), error = %err, "cannot watch the routes file; it reloads on SIGHUP only");
        return None;
    }
    Some(watcher)
}

fn read(path: &Path) -> Result<Routes, RoutesError> {
    let text = std::fs::read(path)
        .map_err(|e| RoutesError(format!("reading the routes file {}: {e}", path.display())))?;
    if text.len() > flowmesh_common::routing::MAX_TEXT_BYTES {
        return Err(RoutesError(format!(
            "the routes file {} holds {} bytes; at most {} are accepted",
            path.display(),
            text.len(),
            flowmesh_common::routing::MAX_TEXT_BYTES
        )));
    }
    let text = String::from_utf8(text)
        .map_err(|_| RoutesError(format!("the routes file {} is not UTF-8", path.display())))?;
    Routes::parse(&text)
}

/// Appends one line to `routes.log` and syncs it: when, which version, from where, its text.
fn append_log(log: &Path, routes: &Routes, path: Option<&Path>) -> std::io::Result<()> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let line = json!({
        "applied_at": format_timestamp(chrono::Utc::now()),
        "version": routes.version(),
        "file": path.map(|p| p.display().to_string()),
        "text": routes.text(),
    });
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_data()
}

/// Every version a filter applied, read back from `routes.log` in `data_dir` (for `verify`),
/// with the built-in routes always among them.
pub fn applied_versions(
    data_dir: &Path,
) -> anyhow::Result<std::collections::HashMap<String, Arc<Routes>>> {
    use anyhow::Context as _;
    let mut versions = std::collections::HashMap::new();
    let builtin = Routes::builtin();
    versions.insert(builtin.version().to_owned(), builtin);
    let path = data_dir.join(ROUTES_LOG);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(versions),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    for (n, line) in text.lines().enumerate() {
        let entry: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {} is not JSON", path.display(), n + 1))?;
        let Some(text) = entry.get("text").and_then(|t| t.as_str()) else {
            anyhow::bail!("{} line {} holds no routes text", path.display(), n + 1);
        };
        let routes = Routes::parse(text)
            .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), n + 1))?;
        versions.insert(routes.version().to_owned(), Arc::new(routes));
    }
    Ok(versions)
}
