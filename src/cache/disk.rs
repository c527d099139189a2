//! The disk tier: stored objects kept in files under `cache.disk.cache_dir`,
//! so the cache survives a restart and holds more than memory.
//!
//! - **Format** ([`encode_head`], [`decode`]): a fixed head (magic, lengths,
//!   CRC-32 of the metadata and of the body), the metadata as JSON (key,
//!   freshness, validators, headers), then the body. An entry whose length or
//!   checksum does not match is dropped and refetched.
//! - **Writes** run on a thread of their own with its own monoio runtime
//!   (io_uring where the kernel allows): a core hands over an `Arc<Object>`
//!   through a bounded queue and never waits (a full queue skips the write).
//!   A file is written under a temporary name and renamed, so a crash never
//!   exposes a partial entry.
//! - **Reads** run on the core that missed in memory, through its own
//!   monoio driver (`monoio::fs`): one `read` of the whole file (a large
//!   one into a mapping of its own, so its hits are sent by reference),
//!   checked (the body's checksum once per entry and process: entries this
//!   process wrote, or read once, are known good), then promoted into the
//!   memory tier. An entry large enough to be sent by reference, whose
//!   pages are in the page cache, is instead sent from its file
//!   ([`DiskStore::open_entry`]), which the core keeps open between hits
//!   (`super::open`).
//! - **Index**: key -> file, rebuilt at start by reading each file's head;
//!   bounded by `max_disk_cache_size_mb` with least-recently-used eviction.
//!   The index lock is held for map operations only, never across I/O.
//! - **Degrading**: a write that fails because the disk is full, read-only or
//!   not ours logs one ERROR and turns writes off (memory-only); requests
//!   never fail because of the disk.

use super::region::{Body, Region, MAPPED_MIN_READ_BYTES};
use super::store::Object;
use bytes::Bytes;
use flume::{Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

const MAGIC: &[u8; 8] = b"YTGCACH1";
/// Bytes of the fixed head: magic, meta length (u32), body length (u64),
/// meta CRC-32, body CRC-32.
pub const HEAD_LEN: usize = 8 + 4 + 8 + 4 + 4;
/// Entry files end with this; temporary files start with [`TMP_PREFIX`].
const SUFFIX: &str = ".entry";
const TMP_PREFIX: &str = ".tmp-";
/// Writes waiting for the disk thread, or being written; more are skipped
/// (and counted). Bounded by count and by bytes: the queue holds its
/// objects, which memory may have let go of meanwhile.
const QUEUE: usize = 4096;
/// Body bytes the queue may hold (see [`QUEUE`]). 256 entries, the bound
/// before, dropped writes in cold starts (loadtest/zipf.sh).
const QUEUE_BYTES: u64 = 64 * 1024 * 1024;
/// Entries the disk thread writes at once. One at a time, its five file
/// operations in a row (create, two writes, close, rename) fell behind a
/// cold start's miss stream on ext4 and the queue dropped writes; with
/// several in flight the kernel overlaps them (loadtest/zipf.sh measures it).
pub const IN_FLIGHT: usize = 16;

/// The metadata of an entry, as stored.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct DiskMeta {
    key: String,
    stored_at_ms: u64,
    fresh_for_ms: u64,
    etag: String,
    last_modified: Option<String>,
    headers: String,
    /// The whole object's length (differs from the body's for slices).
    total: u64,
}

/// The head and metadata of `object` stored under `key`.
pub fn encode_head(key: &str, object: &Object) -> Vec<u8> {
    let meta = DiskMeta {
        key: key.to_string(),
        stored_at_ms: object
            .stored_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        fresh_for_ms: object.fresh_for.as_millis() as u64,
        etag: object.etag.clone(),
        last_modified: object.last_modified.clone(),
        headers: object.headers.clone(),
        total: object.total,
    };
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let mut out = Vec::with_capacity(HEAD_LEN + meta.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(object.body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&meta).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&object.body).to_le_bytes());
    out.extend_from_slice(&meta);
    out
}

/// The fixed head's fields: (meta length, body length, meta CRC, body CRC).
fn parse_head(head: &[u8]) -> Result<(usize, u64, u32, u32), String> {
    if head.len() < HEAD_LEN || &head[..8] != MAGIC {
        return Err("not a cache entry (bad magic)".into());
    }
    let u32_at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let mut body_len = [0u8; 8];
    body_len.copy_from_slice(&head[12..20]);
    Ok((
        u32_at(8) as usize,
        u64::from_le_bytes(body_len),
        u32_at(20),
        u32_at(24),
    ))
}

/// An entry's head and metadata (`start` holds at least both), checked
/// against the file's length and the metadata checksum; also returns the
/// metadata length and the body checksum.
fn read_meta(start: &[u8], file_len: u64) -> Result<(DiskMeta, usize, u32), String> {
    let (meta_len, body_len, meta_crc, body_crc) = parse_head(start)?;
    let want = HEAD_LEN as u64 + meta_len as u64 + body_len;
    if want != file_len {
        return Err(format!("length {file_len}, head says {want} (truncated?)"));
    }
    let meta = start
        .get(HEAD_LEN..HEAD_LEN + meta_len)
        .ok_or("metadata cut short")?;
    if crc32fast::hash(meta) != meta_crc {
        return Err("metadata checksum mismatch".into());
    }
    let meta = serde_json::from_slice(meta).map_err(|e| format!("metadata: {e}"))?;
    Ok((meta, meta_len, body_crc))
}

/// The key of an entry from its head and metadata (index rebuild).
fn read_key(start: &[u8], file_len: u64) -> Result<String, String> {
    read_meta(start, file_len).map(|(meta, ..)| meta.key)
}

/// A whole entry file -> `(key, object)`, every length and the metadata's
/// checksum checked, the body's too when `check_body`;
/// the body shares the file's buffer (and so is sent by reference when the
/// file was read into a mapping, see `region`).
pub fn decode(file: Body, check_body: bool) -> Result<(String, Object), String> {
    let (meta, meta_len, body_crc) = read_meta(&file, file.len() as u64)?;
    let body = file.slice(HEAD_LEN + meta_len..);
    if check_body && crc32fast::hash(&body) != body_crc {
        return Err("body checksum mismatch".into());
    }
    Ok(meta.into_object(body))
}

impl DiskMeta {
    /// `(key, object)` with `body`.
    fn into_object(self, body: Body) -> (String, Object) {
        let object = Object {
            stored_at: UNIX_EPOCH + Duration::from_millis(self.stored_at_ms),
            fresh_for: Duration::from_millis(self.fresh_for_ms),
            etag: self.etag,
            last_modified: self.last_modified,
            headers: self.headers,
            body,
            total: self.total,
            touched_ms: Default::default(),
        };
        (self.key, object)
    }
}

/// An entry to be sent straight from its file ([`DiskStore::open_entry`]).
pub struct Resident {
    /// The open entry file (a file is never changed once renamed into
    /// place: a new copy is a new file, so its pages stay what they were).
    pub file: monoio::fs::File,
    /// The stored copy's metadata (its body left empty).
    pub object: Object,
    /// Where the body starts in the file.
    pub body_offset: u64,
    /// The file's length.
    pub file_len: u64,
    /// The index's id of the file (see [`DiskStore::entry`]).
    pub id: u64,
}

impl Resident {
    /// Whether every page of the body is in the page cache, so sending it
    /// never waits for the disk (`false` where cachestat(2) is missing).
    pub fn in_page_cache(&self) -> bool {
        use std::os::fd::AsRawFd;
        resident(
            self.file.as_raw_fd(),
            self.body_offset,
            self.file_len - self.body_offset,
        )
    }
}

/// Bytes read to find an entry's head and metadata (more metadata than
/// this means a normal read instead).
const HEAD_PROBE: usize = 16 * 1024;

/// Whether every page of `len` bytes from `offset` of `fd` is in the page
/// cache (cachestat(2), Linux 6.5+; `false` where it is missing).
fn resident(fd: std::os::fd::RawFd, offset: u64, len: u64) -> bool {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    if len == 0 {
        return true;
    }
    let page = 4096u64;
    let first = offset / page * page;
    let range = Range {
        off: first,
        len: offset + len - first,
    };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live locals
    // of the layouts the kernel defines; `fd` is open for the call.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd,
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    r == 0 && stat.nr_cache >= range.len.div_ceil(page)
}

/// The file name of `key`: a hash, so any key maps to a safe name.
fn file_name(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let mut name = String::with_capacity(40);
    crate::s3::push_hex(&mut name, &digest[..16]);
    name.push_str(SUFFIX);
    name
}

struct IndexEntry {
    size: u64,
    /// Which file this is: set when the entry is indexed, new for every
    /// file written under the key (see [`DiskStore::entry`]).
    id: u64,
    /// Higher is more recently used.
    used: u64,
    /// Its body checksum held when this process wrote or last read it:
    /// later reads check lengths and metadata only (a file changed behind
    /// our back after that is not noticed until the next start).
    checked: bool,
}

/// The entries on disk, least recently used first out. Every operation is
/// O(log n) (a prefix removal O(log n) per key removed): the lock around it
/// is held for map operations only, even on a full disk of a hundred
/// thousand entries, and a purge does not scan them all.
#[derive(Default)]
struct Index {
    /// Ordered, so the keys of one object or bucket (a common prefix, see
    /// `store::key`) are one range.
    entries: BTreeMap<String, IndexEntry>,
    /// `used` -> key, oldest first.
    by_use: BTreeMap<u64, String>,
    bytes: u64,
    clock: u64,
}

impl Index {
    fn touch(&mut self, key: &str) -> bool {
        self.clock += 1;
        let clock = self.clock;
        let Some(e) = self.entries.get_mut(key) else {
            return false;
        };
        if let Some(k) = self.by_use.remove(&e.used) {
            self.by_use.insert(clock, k);
        }
        e.used = clock;
        true
    }

    fn insert(&mut self, key: String, size: u64, checked: bool) {
        self.clock += 1;
        let used = self.clock;
        let entry = IndexEntry {
            size,
            id: used,
            used,
            checked,
        };
        self.by_use.insert(used, key.clone());
        if let Some(old) = self.entries.insert(key, entry) {
            self.by_use.remove(&old.used);
            self.bytes -= old.size;
        }
        self.bytes += size;
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                self.by_use.remove(&e.used);
                self.bytes -= e.size;
                true
            }
            None => false,
        }
    }

    /// Removes every key starting with `prefix`; returns them.
    fn remove_prefix(&mut self, prefix: &str) -> Vec<String> {
        use std::ops::Bound;
        let keys: Vec<String> = self
            .entries
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            self.remove(k);
        }
        keys
    }

    /// Least recently used keys to drop so that `bytes <= max` (dropped
    /// from the index).
    fn over(&mut self, max: u64) -> Vec<String> {
        let mut out = Vec::new();
        while self.bytes > max {
            let Some((_, key)) = self.by_use.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&key) {
                self.bytes -= e.size;
            }
            out.push(key);
        }
        out
    }
}

/// One object on its way to the disk thread.
pub struct DiskWrite {
    key: String,
    object: Arc<Object>,
    /// The memory tier's purge count when it was stored.
    epoch: u64,
}

/// The disk tier (process-wide).
pub struct DiskStore {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    queue: Sender<DiskWrite>,
    /// Writes are off (the disk failed us); reads go on.
    degraded: AtomicBool,
    evictions: AtomicU64,
    /// Entries dropped for a bad length or checksum.
    pub corrupt: AtomicU64,
    /// Entries dropped at start because their bucket's origin changed (or
    /// the bucket is gone): see `cache::store::key`.
    pub foreign: AtomicU64,
    /// Writes not made because the writer's queue was full.
    pub writes_dropped: AtomicU64,
    /// Body bytes queued or being written (bounded by [`QUEUE_BYTES`]).
    queued_bytes: AtomicU64,
    /// Entries marked used by memory hits (`touch_all`).
    pub recency_refreshes: AtomicU64,
    tmp_seq: AtomicU64,
}

impl DiskStore {
    /// Opens (creating) `dir` and rebuilds the index from the entries in it;
    /// returns the store and the receiving end of its write queue, for
    /// [`DiskStore::run_writer`]. A directory that cannot be created or
    /// written leaves the store degraded (memory-only), logged by the caller.
    /// `origins`: each configured bucket's origin fingerprint; entries of
    /// any other origin are dropped.
    pub fn open(
        dir: &str,
        max_bytes: u64,
        origins: &HashMap<String, String>,
    ) -> (DiskStore, Receiver<DiskWrite>, Result<usize, String>) {
        let (queue, rx) = flume::bounded(QUEUE);
        let store = DiskStore {
            dir: PathBuf::from(dir),
            max_bytes,
            index: Mutex::new(Index::default()),
            queue,
            degraded: AtomicBool::new(false),
            evictions: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            writes_dropped: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            recency_refreshes: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        };
        let rebuilt = store.rebuild(origins);
        if rebuilt.is_err() {
            store.degraded.store(true, Ordering::Relaxed);
        }
        (store, rx, rebuilt)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        match self.index.lock() {
            Ok(i) => i,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Reads every entry's head (at start, before any worker runs): valid
    /// entries are indexed, partial and corrupt ones and temporary files
    /// deleted. Returns how many entries were kept.
    fn rebuild(&self, origins: &HashMap<String, String>) -> Result<usize, String> {
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
            // An existing directory is made ours alone too (0700): its
            // entries are the cached bodies of private objects.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot restrict {}: {e}", self.dir.display()))?;
        }
        let probe = self.dir.join(format!("{TMP_PREFIX}probe"));
        std::fs::write(&probe, b"")
            .map_err(|e| format!("cannot write in {}: {e}", self.dir.display()))?;
        let _ = std::fs::remove_file(&probe);
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| format!("cannot list {}: {e}", self.dir.display()))?;
        let mut index = self.lock();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(SUFFIX) {
                continue;
            }
            match read_entry_key(&path) {
                Ok((key, size)) if file_name(&key) == name => {
                    // Stored while its bucket pointed at another S3
                    // location (or for a bucket no longer configured):
                    // never to be served, so not kept.
                    let current = crate::cache::store::key_origin(&key)
                        .is_some_and(|(b, o)| origins.get(b).is_some_and(|now| now == o));
                    if current {
                        index.insert(key, size, false);
                    } else {
                        self.foreign.fetch_add(1, Ordering::Relaxed);
                        let _ = std::fs::remove_file(&path);
                    }
                }
                Ok(_) | Err(_) => {
                    self.corrupt.fetch_add(1, Ordering::Relaxed);
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let excess = index.over(self.max_bytes);
        drop(index);
        for k in excess {
            let _ = std::fs::remove_file(self.dir.join(file_name(&k)));
        }
        Ok(self.lock().entries.len())
    }

    /// Whether an entry for `key` is on disk (marks it used).
    pub fn contains(&self, key: &str) -> bool {
        self.entry_size(key).is_some()
    }

    /// The size of the entry file for `key`, if there is one (marked used).
    pub fn entry_size(&self, key: &str) -> Option<u64> {
        self.entry(key).map(|(size, _)| size)
    }

    /// `(size, id)` of the entry file for `key`, if there is one (marked
    /// used). The id names the file: a file opened while the index held
    /// this id is still the entry as long as the index holds it.
    pub fn entry(&self, key: &str) -> Option<(u64, u64)> {
        let mut index = self.lock();
        index.touch(key);
        index.entries.get(key).map(|e| (e.size, e.id))
    }

    /// Marks the entries of `keys` used (those still on disk), under one
    /// lock: a core's memory hits, batched (see `proxy::cache`).
    pub fn touch_all(&self, keys: &[String]) {
        let mut index = self.lock();
        let found = keys.iter().filter(|k| index.touch(k)).count();
        drop(index);
        self.recency_refreshes
            .fetch_add(found as u64, Ordering::Relaxed);
    }

    /// The id of the entry file for `key` (not marked used).
    pub fn entry_id(&self, key: &str) -> Option<u64> {
        self.lock().entries.get(key).map(|e| e.id)
    }

    /// Hands `object` to the disk thread; never waits.
    pub fn offer(&self, key: String, object: Arc<Object>, epoch: u64) {
        if self.degraded.load(Ordering::Relaxed) {
            return;
        }
        let size = HEAD_LEN as u64 + object.body.len() as u64 + 512;
        if size > self.max_bytes {
            return;
        }
        let body = object.body.len() as u64;
        let queued = self.queued_bytes.fetch_add(body, Ordering::Relaxed);
        let sent = match queued + body <= QUEUE_BYTES || queued == 0 {
            true => self.queue.try_send(DiskWrite { key, object, epoch }),
            false => Err(TrySendError::Full(DiskWrite { key, object, epoch })),
        };
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued_bytes.fetch_sub(body, Ordering::Relaxed);
                // Counted, and said at most once per interval (by the
                // writer, off the cores): never a silent drop.
                self.writes_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reads the entry for `key` on the calling core's monoio driver; a bad
    /// entry is dropped (and counted) and reads as `None`.
    pub async fn load(&self, key: &str) -> Option<Object> {
        let path = self.dir.join(file_name(key));
        // The size the index recorded saves a stat; a file that changed
        // since fails the length check below and is dropped like any other.
        let (len, body_checked) = {
            let index = self.lock();
            let e = index.entries.get(key)?;
            (e.size as usize, e.checked)
        };
        let result = async {
            let file = monoio::fs::File::open(&path).await?;
            let read = if len as u64 >= MAPPED_MIN_READ_BYTES {
                let (r, buf) = file.read_exact_at(Region::new(len)?, 0).await;
                r.map(|_| buf.freeze())
            } else {
                let (r, buf) = file.read_exact_at(Vec::with_capacity(len), 0).await;
                r.map(|_| Body::from(Bytes::from(buf)))
            };
            let _ = file.close().await;
            read
        }
        .await;
        let outcome = match result {
            Ok(buf) => decode(buf, !body_checked).and_then(|(k, o)| {
                if k == key {
                    Ok(o)
                } else {
                    Err("entry holds another key".into())
                }
            }),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(object) => {
                if let Some(e) = self.lock().entries.get_mut(key) {
                    e.checked = e.size == len as u64;
                }
                Some(object)
            }
            Err(why) => {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                self.lock().remove(key);
                let _ = monoio::fs::remove_file(&path).await;
                crate::log!(
                    crate::config::Level::Warn,
                    "Disk cache entry dropped",
                    file = path.display(),
                    reason = why
                );
                None
            }
        }
    }

    /// Opens the entry for `key` to be sent from its file without reading
    /// its body: only when its body's checksum already held in this process
    /// (whether its pages are in the page cache is the caller's question,
    /// [`Resident::in_page_cache`]). `None` means: read it instead
    /// ([`Self::load`]).
    pub async fn open_entry(&self, key: &str) -> Option<Resident> {
        // The id is taken before the file is opened: a file renamed into
        // place in between is newer than the id says, never older, so a
        // cache of open files drops it at worst once too often.
        let (file_len, checked, id) = {
            let index = self.lock();
            let e = index.entries.get(key)?;
            (e.size, e.checked, e.id)
        };
        if !checked {
            return None;
        }
        let file = monoio::fs::File::open(self.dir.join(file_name(key)))
            .await
            .ok()?;
        let want = (file_len as usize).min(HEAD_PROBE);
        let (r, start) = file.read_exact_at(Vec::with_capacity(want), 0).await;
        let found = r.ok().and_then(|_| read_meta(&start, file_len).ok());
        match found.filter(|(meta, ..)| meta.key == key) {
            Some((meta, meta_len, _)) => Some(Resident {
                file,
                object: meta.into_object(Body::default()).1,
                body_offset: (HEAD_LEN + meta_len) as u64,
                file_len,
                id,
            }),
            None => {
                let _ = file.close().await;
                None
            }
        }
    }

    /// Drops every entry whose key starts with `prefix` (purge, moved
    /// bucket); returns how many. Runs off the cores (admin, reload).
    pub fn remove_prefix(&self, prefix: &str) -> usize {
        let gone = self.lock().remove_prefix(prefix);
        for k in &gone {
            let _ = std::fs::remove_file(self.dir.join(file_name(k)));
        }
        gone.len()
    }

    /// Bytes held on disk (entry files).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Entries held.
    pub fn items(&self) -> usize {
        self.lock().entries.len()
    }

    /// Entries evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Whether writes were turned off.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// The disk thread: writes queued entries until the queue closes, up
    /// to [`IN_FLIGHT`] at once. Two writes of one key never overlap (the
    /// later waits for the earlier, so the newer copy is the one kept).
    /// `purge_epoch` is the memory tier's current purge count: an entry
    /// queued before a purge is not indexed.
    pub async fn run_writer(&self, rx: Receiver<DiskWrite>, purge_epoch: impl Fn() -> u64) {
        self.run_writer_with(rx, purge_epoch, IN_FLIGHT).await
    }

    /// [`DiskStore::run_writer`] with `in_flight` entries written at once
    /// (for `benches/disk_writer.rs`, which compares counts).
    pub async fn run_writer_with(
        &self,
        rx: Receiver<DiskWrite>,
        purge_epoch: impl Fn() -> u64,
        in_flight: usize,
    ) {
        use futures_util::future::{select, Either};
        use futures_util::stream::{FuturesUnordered, StreamExt};
        // Drops happen while the queue is full, so while this loop is busy:
        // it reports them, once per interval at most.
        const DROP_REPORT: std::time::Duration = std::time::Duration::from_secs(10);
        let mut reported = (0u64, std::time::Instant::now());
        let purge_epoch = &purge_epoch;
        let mut writing = FuturesUnordered::new();
        // Keys being written, and the newest write of each waiting on them.
        let mut busy: HashMap<String, Option<DiskWrite>> = HashMap::new();
        let mut open = true;
        while open || !writing.is_empty() {
            let dropped = self.writes_dropped.load(Ordering::Relaxed);
            if dropped > reported.0 && reported.1.elapsed() >= DROP_REPORT {
                crate::log!(
                    crate::config::Level::Warn,
                    "Disk cache writes dropped: the writer's queue was full",
                    dropped = dropped - reported.0,
                    total = dropped,
                );
                reported = (dropped, std::time::Instant::now());
            }
            // A queued write if there is room for one, else a finished one.
            let next = if open && writing.len() < in_flight.max(1) {
                if writing.is_empty() {
                    rx.recv_async().await.ok().map(Either::Left)
                } else {
                    match select(rx.recv_async(), writing.next()).await {
                        Either::Left((w, _)) => w.ok().map(Either::Left),
                        Either::Right((done, _)) => done.map(Either::Right),
                    }
                }
            } else {
                writing.next().await.map(Either::Right)
            };
            match next {
                None if writing.is_empty() => open = false,
                None => open = open && !rx.is_disconnected(),
                Some(Either::Left(w)) => {
                    if self.degraded() {
                        self.dequeued(&w);
                        continue;
                    }
                    match busy.get_mut(&w.key) {
                        Some(waiting) => {
                            if let Some(older) = waiting.replace(w) {
                                self.dequeued(&older);
                            }
                        }
                        None => {
                            busy.insert(w.key.clone(), None);
                            writing.push(self.store_entry(w, purge_epoch));
                        }
                    }
                }
                Some(Either::Right(key)) => {
                    if let Some(Some(w)) = busy.remove(&key) {
                        if self.degraded() {
                            self.dequeued(&w);
                        } else {
                            busy.insert(key, None);
                            writing.push(self.store_entry(w, purge_epoch));
                        }
                    }
                }
            }
        }
    }

    /// Writes one entry, indexes it (unless a purge came after it was
    /// queued) and deletes what the index evicted to make room; returns
    /// its key.
    async fn store_entry(&self, w: DiskWrite, purge_epoch: &impl Fn() -> u64) -> String {
        let written = self.write(&w).await;
        self.dequeued(&w);
        match written {
            Ok(size) => {
                let excess = {
                    let mut index = self.lock();
                    if purge_epoch() != w.epoch {
                        None
                    } else {
                        index.insert(w.key.clone(), size, true);
                        Some(index.over(self.max_bytes))
                    }
                };
                match excess {
                    None => {
                        let _ = monoio::fs::remove_file(self.dir.join(file_name(&w.key))).await;
                    }
                    Some(keys) => {
                        for k in keys {
                            self.evictions.fetch_add(1, Ordering::Relaxed);
                            let _ = monoio::fs::remove_file(self.dir.join(file_name(&k))).await;
                        }
                    }
                }
            }
            Err(e) if disk_unusable(&e) => {
                self.degraded.store(true, Ordering::Relaxed);
                crate::log!(
                    crate::config::Level::Error,
                    "Disk cache unusable; continuing memory-only",
                    dir = self.dir.display(),
                    error = e
                );
            }
            Err(e) => crate::log!(
                crate::config::Level::Warn,
                "Disk cache write failed",
                dir = self.dir.display(),
                error = e
            ),
        }
        w.key
    }

    /// `w` leaves the queue's byte bound (written or given up).
    fn dequeued(&self, w: &DiskWrite) {
        let body = w.object.body.len() as u64;
        self.queued_bytes.fetch_sub(body, Ordering::Relaxed);
    }

    /// Writes one entry: a temporary file, then renamed into place.
    async fn write(&self, w: &DiskWrite) -> std::io::Result<u64> {
        let head = encode_head(&w.key, &w.object);
        let tmp = self.dir.join(format!(
            "{TMP_PREFIX}{}",
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let size = head.len() as u64 + w.object.body.len() as u64;
        let result = async {
            // Cached private objects are for this user alone (0600).
            let file = {
                use std::os::unix::fs::OpenOptionsExt;
                monoio::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .await?
            };
            let head_len = head.len() as u64;
            let (r, _) = file.write_all_at(head, 0).await;
            r?;
            let (r, _) = file
                .write_all_at(w.object.body.bytes().clone(), head_len)
                .await;
            r?;
            file.close().await?;
            monoio::fs::rename(&tmp, self.dir.join(file_name(&w.key))).await
        }
        .await;
        if result.is_err() {
            let _ = monoio::fs::remove_file(&tmp).await;
        }
        result.map(|_| size)
    }
}

/// Failures that mean the disk cannot take entries at all.
fn disk_unusable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC)
            | Some(libc::EROFS)
            | Some(libc::EACCES)
            | Some(libc::EDQUOT)
            | Some(libc::EPERM)
            | Some(libc::ENOENT)
            | Some(libc::ENOTDIR)
    )
}

/// The key and size of the entry file at `path` (reads the head and
/// metadata only).
fn read_entry_key(path: &Path) -> Result<(String, u64), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut head = [0u8; HEAD_LEN];
    f.read_exact(&mut head).map_err(|e| e.to_string())?;
    let (meta_len, ..) = parse_head(&head)?;
    let mut start = head.to_vec();
    start.resize(HEAD_LEN + meta_len, 0);
    f.read_exact(&mut start[HEAD_LEN..])
        .map_err(|e| e.to_string())?;
    read_key(&start, len).map(|k| (k, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(body: &[u8]) -> Object {
        Object {
            stored_at: UNIX_EPOCH + Duration::from_millis(1_800_000_000_123),
            fresh_for: Duration::from_secs(600),
            etag: "\"v1\"".into(),
            last_modified: Some("Wed, 21 Oct 2026 07:28:00 GMT".into()),
            headers: "Content-Type: text/plain\r\n".into(),
            body: Bytes::copy_from_slice(body).into(),
            total: body.len() as u64,
            touched_ms: Default::default(),
        }
    }

    fn dec(file: Vec<u8>) -> Result<(String, Object), String> {
        decode(Bytes::from(file).into(), true)
    }

    fn file(key: &str, o: &Object) -> Vec<u8> {
        let mut f = encode_head(key, o);
        f.extend_from_slice(&o.body);
        f
    }

    #[test]
    fn writes_the_queue_cannot_take_are_counted() {
        let dir = tempfile::tempdir().expect("dir");
        let origins = HashMap::from([("b".to_string(), "o".to_string())]);
        let path = dir.path().to_str().expect("utf-8 path").to_string();
        // No writer runs: the queue fills, then every further write drops.
        let (store, _rx, opened) = DiskStore::open(&path, 1 << 30, &origins);
        assert!(opened.is_ok());
        let o = std::sync::Arc::new(object(b"x"));
        for i in 0..QUEUE + 10 {
            store.offer(format!("b\0k{i}\0\0o"), o.clone(), 0);
        }
        assert_eq!(store.writes_dropped.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn the_queue_is_bounded_by_bytes_too() {
        let dir = tempfile::tempdir().expect("dir");
        let origins = HashMap::from([("b".to_string(), "o".to_string())]);
        let path = dir.path().to_str().expect("utf-8 path").to_string();
        let (store, rx, opened) = DiskStore::open(&path, 1 << 40, &origins);
        assert!(opened.is_ok());
        let big = std::sync::Arc::new(object(&vec![1u8; (QUEUE_BYTES / 2 + 1) as usize]));
        store.offer("b\0a\0\0o".into(), big.clone(), 0);
        store.offer("b\0b\0\0o".into(), big.clone(), 0);
        assert_eq!(store.writes_dropped.load(Ordering::Relaxed), 1);
        // Taken off the queue and written: the bytes are given back.
        let w = rx.try_recv().expect("the first write");
        store.dequeued(&w);
        store.offer("b\0b\0\0o".into(), big, 0);
        assert_eq!(store.writes_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn round_trips() {
        let o = object(b"hello disk");
        let (k, back) = dec(file("b\0k\0", &o)).unwrap();
        assert_eq!(k, "b\0k\0");
        assert_eq!(back.body, o.body);
        assert_eq!(
            (
                back.stored_at,
                back.fresh_for,
                back.etag,
                back.last_modified,
                back.headers
            ),
            (o.stored_at, o.fresh_for, o.etag, o.last_modified, o.headers)
        );
    }

    #[test]
    fn truncation_and_corruption_are_detected() {
        let f = file("k", &object(b"0123456789"));
        let mut short = f.clone();
        short.pop();
        assert!(dec(short).unwrap_err().contains("length"));
        let mut flipped = f.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(dec(flipped).unwrap_err().contains("body checksum"));
        let mut meta = f.clone();
        meta[HEAD_LEN + 2] ^= 1;
        assert!(dec(meta).unwrap_err().contains("metadata checksum"));
        assert!(dec(b"garbage".to_vec()).is_err());
        assert!(read_key(&f, f.len() as u64 + 1).is_err());
        assert_eq!(read_key(&f, f.len() as u64).unwrap(), "k");
    }

    #[test]
    fn index_evicts_least_recently_used() {
        let mut i = Index::default();
        i.insert("a".into(), 40, true);
        i.insert("b".into(), 40, true);
        i.insert("c".into(), 40, true);
        assert!(i.touch("a"));
        assert_eq!(i.over(100), vec!["b".to_string()]);
        assert_eq!(i.bytes, 80);
        assert!(i.over(100).is_empty());
        i.insert("a".into(), 10, true);
        assert_eq!(i.bytes, 50, "a replaced entry is counted once");
        assert!(i.remove("c") && !i.remove("c"));
        assert_eq!(i.by_use.len(), i.entries.len(), "one use mark per entry");
    }

    #[test]
    fn a_prefix_removes_one_object_or_one_bucket_and_nothing_else() {
        use crate::cache::store::{bucket_prefix, key, object_prefix};
        let mut i = Index::default();
        for (b, k, q) in [
            ("a", "x", ""),
            ("a", "x", "versionId=1"),
            ("a", "xy", ""),
            ("ab", "x", ""),
            ("b", "x", ""),
        ] {
            i.insert(key(b, "o", k, q), 10, true);
        }
        let mut gone = i.remove_prefix(&object_prefix("a", "x"));
        gone.sort();
        assert_eq!(
            gone,
            vec![key("a", "o", "x", ""), key("a", "o", "x", "versionId=1")]
        );
        assert_eq!(
            i.remove_prefix(&bucket_prefix("a")).len(),
            1,
            "the rest of bucket a"
        );
        assert_eq!(i.entries.len(), 2);
        assert_eq!((i.bytes, i.by_use.len()), (20, 2));
    }

    #[test]
    fn a_full_index_evicts_in_use_order_one_insert_at_a_time() {
        let mut i = Index::default();
        for n in 0..1000u64 {
            i.insert(format!("k{n}"), 10, true);
            if n % 3 == 0 {
                i.touch("k0");
            }
            let out = i.over(100);
            assert!(i.bytes <= 100 && out.len() <= 1);
        }
        // The ten most recently used: k0 (touched), then the newest nine.
        let mut left: Vec<&String> = i.entries.keys().collect();
        left.sort();
        let mut want: Vec<String> = (991..1000).map(|n| format!("k{n}")).collect();
        want.push("k0".into());
        want.sort();
        assert_eq!(left, want.iter().collect::<Vec<_>>());
        assert_eq!(i.by_use.len(), 10);
    }

    #[test]
    fn file_names_are_safe_for_any_key() {
        let n = file_name("b\0../../etc/passwd\0versionId=1");
        assert!(n.ends_with(SUFFIX) && !n.contains('/') && n.len() == 32 + SUFFIX.len());
    }
}
