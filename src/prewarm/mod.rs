//! Cache pre-warming: the admin API's `/admin/cache/prewarm` (the other
//! system's endpoints and task shape). A task lists a bucket's objects
//! under a path with S3 ListObjectsV2 (paged, signed and failed over across
//! the bucket's replicas) and fetches each into the cache.
//!
//! Each object is fetched through the proxy's own listener, as a client
//! would: routing, signing, failover, collapsing with concurrent client
//! misses and the fill of every tier (memory, disk, Redis) are the request
//! path's, not a second copy of it. The request carries this process's
//! pre-warm secret (random, never logged, in no file), accepted only from a
//! loopback peer while a task runs: it passes the access phases (the
//! operator asked for the objects; the admin API was the guard).
//!
//! Limits: `cache.warming.concurrency` fetches at once and `rate_limit`
//! started per second; objects larger than the bucket's `max_item_size_mb`
//! (they would not be stored) and objects already fresh in memory or held
//! on disk are skipped; the task stops before the bytes it fetched would
//! pass the cache's bound (the larger of memory and disk). A task runs on
//! its own threads, never on a core, and `DELETE` cancels it.
//!
//! This file holds the tasks and their answers; `run.rs` does the work;
//! [`Pacer`] is the pure rate decision.

mod run;

use serde::Deserialize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Finished tasks remembered for the status endpoints.
const KEEP_FINISHED: usize = 100;

/// The request header that carries the pre-warm secret.
pub const HEADER: &str = "x-yatagarasu-prewarm";

/// An admin answer: status, content type, body (as `server::admin`).
pub type Answer = (u16, &'static str, String);

/// Every task of the process, the secret its fetches carry, and totals for
/// the metrics.
pub struct Tasks {
    next_id: AtomicU64,
    list: Mutex<Vec<Arc<Task>>>,
    /// Tasks running now; the request path looks for the secret only
    /// while this is above zero.
    running: AtomicUsize,
    secret: String,
    /// `yatagarasu_prewarm_*` counters.
    pub totals: Totals,
}

/// Process-wide pre-warming counters.
#[derive(Default)]
pub struct Totals {
    /// Tasks created.
    pub tasks: AtomicU64,
    /// Objects fetched into the cache.
    pub files: AtomicU64,
    /// Objects skipped (fresh already, too large, cache bound).
    pub skipped: AtomicU64,
    /// Objects that could not be fetched, and listings that failed.
    pub errors: AtomicU64,
    /// Body bytes fetched.
    pub bytes: AtomicU64,
}

/// What a task was asked (the body of `POST /admin/cache/prewarm`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// The bucket's `name`.
    pub bucket: String,
    /// The key prefix to warm (relative to the bucket; a leading `/` is
    /// dropped); empty for the whole bucket.
    #[serde(default)]
    pub path: String,
    /// Below `path` at every depth (default), or only directly in it.
    #[serde(default = "yes")]
    pub recursive: bool,
    /// With `recursive`: how many levels below `path` (1: directly in it).
    #[serde(default)]
    pub max_depth: Option<u32>,
    /// At most this many objects fetched or skipped.
    #[serde(default)]
    pub max_files: Option<u64>,
}

fn yes() -> bool {
    true
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Created, threads not yet started.
    Pending = 0,
    /// Listing and fetching.
    Running = 1,
    /// Done (perhaps stopped early: see `stopped_reason`).
    Completed = 2,
    /// The listing failed on every replica.
    Failed = 3,
    /// Cancelled through `DELETE`.
    Cancelled = 4,
}

impl Status {
    fn from_u8(v: u8) -> Status {
        match v {
            0 => Status::Pending,
            1 => Status::Running,
            2 => Status::Completed,
            3 => Status::Failed,
            _ => Status::Cancelled,
        }
    }

    /// The other system's name.
    pub fn label(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    fn finished(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// One pre-warming task and its progress.
pub struct Task {
    /// `prewarm-<n>`.
    pub id: String,
    /// What was asked.
    pub request: TaskSpec,
    status: AtomicU8,
    cancel: AtomicBool,
    /// Objects listed in scope.
    pub scanned: AtomicU64,
    /// Objects fetched into the cache.
    pub cached: AtomicU64,
    /// Objects skipped.
    pub skipped: AtomicU64,
    /// Objects that failed.
    pub failed: AtomicU64,
    /// Body bytes fetched.
    pub bytes: AtomicU64,
    created_at: SystemTime,
    times: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
    /// The last error, or why the task stopped early.
    notes: Mutex<(Option<String>, Option<String>)>,
}

impl Task {
    fn new(id: String, request: TaskSpec) -> Task {
        Task {
            id,
            request,
            status: AtomicU8::new(Status::Pending as u8),
            cancel: AtomicBool::new(false),
            scanned: AtomicU64::new(0),
            cached: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            created_at: SystemTime::now(),
            times: Mutex::new((None, None)),
            notes: Mutex::new((None, None)),
        }
    }

    /// Where the task is.
    pub fn status(&self) -> Status {
        Status::from_u8(self.status.load(Ordering::Acquire))
    }

    /// Whether `DELETE` asked it to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    fn set_status(&self, s: Status) {
        self.status.store(s as u8, Ordering::Release);
        let mut t = self.times.lock().unwrap_or_else(|e| e.into_inner());
        match s {
            Status::Running => t.0 = Some(SystemTime::now()),
            s if s.finished() => t.1 = Some(SystemTime::now()),
            _ => {}
        }
    }

    /// Records the last error (kept for the status answer).
    pub fn note_error(&self, e: String) {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).0 = Some(e);
    }

    /// Records why the task stopped before the end of its listing.
    pub fn note_stopped(&self, why: String) {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(why);
    }

    /// The status answer (the other system's fields, plus skipped and
    /// failed counts).
    pub fn to_json(&self) -> serde_json::Value {
        let secs = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        };
        let (start, end) = *self.times.lock().unwrap_or_else(|e| e.into_inner());
        let (error, stopped) = self.notes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "id": self.id,
            "task_id": self.id,
            "bucket": self.request.bucket,
            "path": self.request.path,
            "status": self.status().label(),
            "options": {
                "recursive": self.request.recursive,
                "max_depth": self.request.max_depth,
                "max_files": self.request.max_files,
            },
            "files_scanned": load(&self.scanned),
            "files_cached": load(&self.cached),
            "files_skipped": load(&self.skipped),
            "files_failed": load(&self.failed),
            "bytes_cached": load(&self.bytes),
            "created_at": secs(Some(self.created_at)),
            "start_time": secs(start),
            "end_time": secs(end),
            "error_message": error,
            "stopped_reason": stopped,
        })
    }
}

impl Default for Tasks {
    fn default() -> Tasks {
        Tasks::new()
    }
}

impl Tasks {
    /// No tasks; a fresh secret.
    pub fn new() -> Tasks {
        Tasks {
            next_id: AtomicU64::new(1),
            list: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            secret: random_secret(),
            totals: Totals::default(),
        }
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Whether `value` (of [`HEADER`]) is this process's secret, while a
    /// task runs. Compared in constant time.
    pub fn admits(&self, value: &str) -> bool {
        self.running() > 0
            && crate::server::admin::constant_time_eq(value.as_bytes(), self.secret.as_bytes())
    }

    fn all(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Task>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find(&self, id: &str) -> Option<Arc<Task>> {
        self.all().iter().find(|t| t.id == id).cloned()
    }
}

/// 32 random bytes from the kernel, hex.
fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the
    // buffer, which lives for the call.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No randomness: a secret nobody can present (never matched).
        return String::new();
    }
    hex::encode(bytes)
}

/// `POST /admin/cache/prewarm`: starts a task.
pub fn create(process: &Arc<crate::shared::Process>, body: &[u8]) -> Answer {
    let request: TaskSpec = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return json(
                400,
                serde_json::json!({"error": "Invalid JSON", "details": e.to_string()}),
            )
        }
    };
    let generation = process.current();
    let Some(bucket) = generation
        .config
        .buckets
        .iter()
        .find(|b| b.name == request.bucket)
    else {
        return json(
            404,
            serde_json::json!({"error": format!("Bucket '{}' not found", request.bucket)}),
        );
    };
    if !bucket.cache.enabled || process.cache.is_none() {
        return json(
            409,
            serde_json::json!({"error": format!("bucket '{}' does not cache; nothing to warm", request.bucket)}),
        );
    }
    if process.prewarm.tasks_secret_missing() {
        return json(
            503,
            serde_json::json!({"error": "no randomness for the pre-warm secret"}),
        );
    }
    let tasks = &process.prewarm;
    let id = format!("prewarm-{}", tasks.next_id.fetch_add(1, Ordering::Relaxed));
    let task = Arc::new(Task::new(id.clone(), request));
    {
        let mut all = tasks.all();
        all.push(task.clone());
        // Forget the oldest finished tasks beyond what the status
        // endpoints keep.
        let finished = all.iter().filter(|t| t.status().finished()).count();
        if finished > KEEP_FINISHED {
            let mut drop = finished - KEEP_FINISHED;
            all.retain(|t| {
                if drop > 0 && t.status().finished() {
                    drop -= 1;
                    return false;
                }
                true
            });
        }
    }
    tasks.totals.tasks.fetch_add(1, Ordering::Relaxed);
    tasks.running.fetch_add(1, Ordering::AcqRel);
    task.set_status(Status::Running);
    let (p, t) = (process.clone(), task.clone());
    let started = std::thread::Builder::new()
        .name("yatagarasu-prewarm".into())
        .spawn(move || {
            let end = run::run(&p, &t);
            t.set_status(end);
            p.prewarm.running.fetch_sub(1, Ordering::AcqRel);
            crate::log!(
                crate::config::Level::Info,
                "Cache pre-warming ended",
                task = t.id,
                status = end.label(),
                scanned = t.scanned.load(Ordering::Relaxed),
                cached = t.cached.load(Ordering::Relaxed),
                skipped = t.skipped.load(Ordering::Relaxed),
                failed = t.failed.load(Ordering::Relaxed),
                bytes = t.bytes.load(Ordering::Relaxed),
            );
        });
    if let Err(e) = started {
        task.note_error(format!("no thread: {e}"));
        task.set_status(Status::Failed);
        tasks.running.fetch_sub(1, Ordering::AcqRel);
        return json(503, serde_json::json!({"error": format!("no thread: {e}")}));
    }
    crate::log!(
        crate::config::Level::Info,
        "Cache pre-warming started",
        task = id,
        bucket = task.request.bucket,
        path = task.request.path,
    );
    json(
        200,
        serde_json::json!({"status": "success", "task_id": id, "message": "Prewarm task created"}),
    )
}

impl Tasks {
    fn tasks_secret_missing(&self) -> bool {
        self.secret.is_empty()
    }
}

/// `GET /admin/cache/prewarm/tasks`.
pub fn list(process: &crate::shared::Process) -> Answer {
    let tasks: Vec<_> = process.prewarm.all().iter().map(|t| t.to_json()).collect();
    json(200, serde_json::json!({ "tasks": tasks }))
}

/// `GET /admin/cache/prewarm/status/<id>`.
pub fn status(process: &crate::shared::Process, id: &str) -> Answer {
    match process.prewarm.find(id) {
        Some(t) => json(200, t.to_json()),
        None => json(404, serde_json::json!({"error": "Task not found"})),
    }
}

/// `DELETE /admin/cache/prewarm/<id>`: asks the task to stop; fetches
/// under way finish, nothing more starts.
pub fn cancel(process: &crate::shared::Process, id: &str) -> Answer {
    match process.prewarm.find(id) {
        None => json(404, serde_json::json!({"error": "Task not found"})),
        Some(t) if t.status().finished() => json(
            409,
            serde_json::json!({"error": "Task cannot be cancelled (already completed or failed)"}),
        ),
        Some(t) => {
            t.cancel.store(true, Ordering::Release);
            json(
                200,
                serde_json::json!({"status": "cancelled", "task_id": t.id}),
            )
        }
    }
}

fn json(status: u16, body: serde_json::Value) -> Answer {
    (status, "application/json", body.to_string())
}

/// Spaces the starts of fetches `1 / rate` apart (no burst beyond one).
/// Pure: the caller passes the time.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    next: Option<Instant>,
}

impl Pacer {
    /// `rate` starts per second (at least one).
    pub fn new(rate: u32) -> Pacer {
        Pacer {
            interval: Duration::from_secs(1) / rate.max(1),
            next: None,
        }
    }

    /// How long to wait from `now` before the next start; the start is
    /// then booked.
    pub fn wait(&mut self, now: Instant) -> Duration {
        let at = self.next.map_or(now, |n| n.max(now));
        self.next = Some(at + self.interval);
        at - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_spaces_starts_and_allows_no_catch_up_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(4);
        assert_eq!(p.wait(t0), Duration::ZERO);
        assert_eq!(p.wait(t0), Duration::from_millis(250));
        assert_eq!(p.wait(t0), Duration::from_millis(500));
        // Idle for a long while: the next start is due at once, the one
        // after a whole interval later (no burst to catch up).
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.wait(later), Duration::ZERO);
        assert_eq!(p.wait(later), Duration::from_millis(250));
    }

    #[test]
    fn requests_read_the_other_systems_body() {
        let r: TaskSpec =
            serde_json::from_str(r#"{"bucket":"b","path":"test/path","recursive":true}"#)
                .expect("a request");
        assert_eq!(r.path, "test/path");
        assert!(r.recursive);
        assert_eq!(r.max_depth, None);
        let r: TaskSpec = serde_json::from_str(r#"{"bucket":"b"}"#).expect("a request");
        assert!(r.recursive, "recursive by default, as the other system");
        assert!(serde_json::from_str::<TaskSpec>(r#"{"bucket":"b","recursve":false}"#).is_err());
    }

    #[test]
    fn the_secret_is_only_admitted_while_a_task_runs() {
        let t = Tasks::new();
        assert_eq!(t.secret.len(), 64);
        let secret = t.secret.clone();
        assert!(!t.admits(&secret));
        t.running.fetch_add(1, Ordering::AcqRel);
        assert!(t.admits(&secret));
        assert!(!t.admits("0"));
        assert!(!t.admits(""));
        assert_ne!(Tasks::new().secret, secret);
    }
}
