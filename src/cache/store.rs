//! The memory tier: one copy of each object per process, shared by every
//! worker, bounded by bytes.
//!
//! Backed by `quick_cache`'s sharded cache: admission and eviction are
//! scan-resistant (hot and cold queues with ghost entries, in the S3-FIFO /
//! CLOCK-Pro family), a lookup takes one shard's lock for the time of a hash
//! probe and an `Arc` clone, and no lock is ever held across I/O: a hit hands
//! the worker an `Arc<Object>` whose body is shared `Bytes`, written to the
//! socket without copying it in the process (large bodies not even in the
//! kernel: `region`).

use super::region::Body;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// One stored response (a 200 to a GET).
#[derive(Debug)]
pub struct Object {
    /// When it was stored (our clock).
    pub stored_at: SystemTime,
    /// How long it is fresh from `stored_at` (see `policy::freshness`).
    pub fresh_for: Duration,
    /// Its `ETag` (may be empty).
    pub etag: String,
    /// Its `Last-Modified`, if any.
    pub last_modified: Option<String>,
    /// Headers relayed with it, `Name: value\r\n` each, without
    /// `Content-Length` (computed per answer: whole or a range).
    pub headers: String,
    /// The body (one slice of it for a slice; empty for slice metadata).
    pub body: Body,
    /// The whole object's length: `body.len()` unless this is a slice or
    /// slice metadata (see `cache::slice`).
    pub total: u64,
    /// When (ms, process clock) a memory hit last refreshed this copy's
    /// recency in the disk tier (0: never); see `proxy::cache`.
    pub touched_ms: std::sync::atomic::AtomicU64,
}

/// Weighs an entry by the memory it holds.
#[derive(Clone)]
struct ByBytes;

/// Fixed cost of an entry beyond its key, headers and body.
const ENTRY_OVERHEAD: u64 = 160;

impl quick_cache::Weighter<String, Arc<Object>> for ByBytes {
    fn weight(&self, key: &String, o: &Arc<Object>) -> u64 {
        ENTRY_OVERHEAD
            + key.len() as u64
            + o.headers.len() as u64
            + o.etag.len() as u64
            + o.body.len() as u64
    }
}

/// Counts evictions for `yatagarasu_cache_evictions_total`.
#[derive(Clone, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl quick_cache::Lifecycle<String, Arc<Object>> for CountEvictions {
    type RequestState = ();

    fn begin_request(&self) -> Self::RequestState {}

    fn on_evict(&self, _state: &mut (), _key: String, _val: Arc<Object>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

type Inner = quick_cache::sync::Cache<
    String,
    Arc<Object>,
    ByBytes,
    quick_cache::DefaultHashBuilder,
    CountEvictions,
>;

/// Room per entry beyond its body (key, headers, overhead) when sizing
/// shards.
const ITEM_MARGIN: u64 = 64 * 1024;

/// How many shards the store has: as many as `quick_cache` would use
/// (4 per core), fewer when a shard would be too small for the largest
/// object. A shard admits an entry only within 97% of its share of the
/// capacity (its hot part), so on a 64-core machine a 1 GiB store in 256
/// shards would refuse every 10 MiB object.
fn shards(max_bytes: u64, largest_item: u64, parallelism: usize) -> usize {
    let fits = (max_bytes as f64 * 0.97 / (largest_item + ITEM_MARGIN) as f64) as usize;
    let wanted = (parallelism * 4).min(fits).max(1);
    // A power of two (quick_cache rounds up; rounding down keeps the fit).
    1 << (usize::BITS - 1 - wanted.leading_zeros())
}

/// What fills in flight may hold beyond the stored entries: a quarter of
/// the memory bound, and at least two fills of the largest object (a fill
/// holds its body twice: the copy being stored and the one its waiters
/// stream).
pub fn fill_budget(max_bytes: u64, largest_item: u64) -> u64 {
    (max_bytes / 4).max(largest_item.saturating_mul(4))
}

/// The process-wide memory tier.
pub struct MemoryStore {
    inner: Inner,
    evictions: Arc<AtomicU64>,
    /// Bumped by every purge; a fill that started before a purge is not
    /// stored (a purge during a fill wins).
    purges: AtomicU64,
    max_bytes: u64,
    /// Bytes fills in flight may hold ([`MemoryStore::reserve_fill`]).
    fill_budget: u64,
    /// Bytes fills in flight hold now.
    fill_held: Arc<AtomicU64>,
    /// Fills not started for want of budget (their answers relayed uncached).
    pub fills_refused: AtomicU64,
}

/// Bytes held by one fill in flight, given back to the budget when dropped.
pub struct FillReservation {
    held: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for FillReservation {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl MemoryStore {
    /// A store of at most `max_bytes` (keys, headers and bodies) that
    /// admits objects of up to `largest_item` body bytes.
    pub fn new(max_bytes: u64, largest_item: u64) -> Result<MemoryStore, String> {
        let lifecycle = CountEvictions::default();
        let evictions = lifecycle.0.clone();
        // Sized for 64 KiB objects on average; the weight bound is what limits.
        let items = (max_bytes / (64 * 1024)).clamp(64, 1 << 20) as usize;
        let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(items)
            .weight_capacity(max_bytes)
            .shards(shards(max_bytes, largest_item, parallelism))
            .build()
            .map_err(|e| format!("memory cache: {e:?}"))?;
        Ok(MemoryStore {
            inner: Inner::with_options(options, ByBytes, Default::default(), lifecycle),
            evictions,
            purges: AtomicU64::new(0),
            max_bytes,
            fill_budget: fill_budget(max_bytes, largest_item),
            fill_held: Arc::default(),
            fills_refused: AtomicU64::new(0),
        })
    }

    /// Takes `bytes` from the budget of fills in flight, if they fit: a
    /// fill's bytes (its body being filled, and the copy its waiters
    /// stream) count against it until the fill ends, whatever the pace of
    /// the clients reading them. `None` (counted): relay without a fill.
    pub fn reserve_fill(&self, bytes: u64) -> Option<FillReservation> {
        let reserved = self.reserve_fill_quietly(bytes);
        if reserved.is_none() {
            self.fills_refused.fetch_add(1, Ordering::Relaxed);
        }
        reserved
    }

    /// What fills in flight may hold at once.
    pub fn fill_budget(&self) -> u64 {
        self.fill_budget
    }

    /// [`MemoryStore::reserve_fill`] for a size the caller can do without
    /// (it falls back to a smaller one): a refusal is not counted.
    pub fn reserve_fill_quietly(&self, bytes: u64) -> Option<FillReservation> {
        let mut held = self.fill_held.load(Ordering::Relaxed);
        loop {
            if held.saturating_add(bytes) > self.fill_budget {
                return None;
            }
            match self.fill_held.compare_exchange_weak(
                held,
                held + bytes,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(FillReservation {
                        held: self.fill_held.clone(),
                        bytes,
                    })
                }
                Err(now) => held = now,
            }
        }
    }

    /// Bytes fills in flight hold now.
    pub fn fill_bytes(&self) -> u64 {
        self.fill_held.load(Ordering::Relaxed)
    }

    /// The stored object under `key`.
    pub fn get(&self, key: &str) -> Option<Arc<Object>> {
        self.inner.get(key)
    }

    /// The stored object under `key`, without counting it as used (for
    /// pre-warming's "already held" check).
    pub fn peek(&self, key: &str) -> Option<Arc<Object>> {
        self.inner.peek(key)
    }

    /// Stores (or replaces) `key`; returns the shared copy.
    pub fn insert(&self, key: String, object: Object) -> Arc<Object> {
        let shared = Arc::new(object);
        self.inner.insert(key, shared.clone());
        shared
    }

    /// Stores `key` unless memory holds it already, and returns the copy
    /// held: for a copy promoted from a lower tier, read while memory
    /// missed, which must not replace what a fill stored meanwhile (that
    /// copy is the one the fill's slower readers are still sending).
    pub fn insert_unless_held(&self, key: String, object: Object) -> Arc<Object> {
        let held = self
            .inner
            .get_or_insert_with(&key, || Ok::<_, std::convert::Infallible>(Arc::new(object)));
        match held {
            Ok(copy) => copy,
            Err(never) => match never {},
        }
    }

    /// Stores (or replaces) `key` with an object already shared.
    pub fn insert_shared(&self, key: String, object: Arc<Object>) {
        self.inner.insert(key, object);
    }

    /// Drops the entry under `key`; whether there was one.
    pub fn remove(&self, key: &str) -> bool {
        self.inner.remove(key).is_some()
    }

    /// Drops every entry whose key starts with `prefix` (a bucket's, or an
    /// object's with all its versions); returns how many. Visits every
    /// entry: for purges and reloads, not the request path.
    pub fn remove_prefix(&self, prefix: &str) -> usize {
        let before = self.inner.len();
        self.inner.retain(|k, _| !k.starts_with(prefix));
        before.saturating_sub(self.inner.len())
    }

    /// Entries whose key starts with `prefix`, and the bytes their bodies
    /// hold. Visits every entry: for the admin API, not the request path.
    pub fn prefix_stats(&self, prefix: &str) -> (usize, u64) {
        self.inner
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .fold((0, 0), |(n, b), (_, o)| (n + 1, b + o.body.len() as u64))
    }

    /// Purges every entry whose key starts with `prefix`; fills under way
    /// are not stored. Returns how many entries were dropped.
    pub fn purge(&self, prefix: &str) -> usize {
        self.purges.fetch_add(1, Ordering::SeqCst);
        self.remove_prefix(prefix)
    }

    /// The purge count, taken when a fill starts.
    pub fn purge_epoch(&self) -> u64 {
        self.purges.load(Ordering::SeqCst)
    }

    /// The byte bound (`max_cache_size_mb`).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes held (keys, headers, bodies and per-entry overhead).
    pub fn bytes(&self) -> u64 {
        self.inner.weight()
    }

    /// Entries held.
    pub fn items(&self) -> usize {
        self.inner.len()
    }

    /// Entries evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

/// The cache key of an object: bucket name, encoded key, forwarded query
/// (`versionId`, `partNumber`) and the bucket's origin fingerprint
/// (`config::origin_fingerprint`), NUL-separated (none of them holds a
/// NUL). With the origin in the key, an entry stored while the bucket
/// pointed elsewhere is never found, in memory or on disk.
pub fn key(bucket: &str, origin: &str, encoded_key: &str, query: &str) -> String {
    let mut k = String::new();
    write_key(&mut k, bucket, origin, encoded_key, query);
    k
}

/// Writes [`key`] into `out` (cleared first): a lookup through a reused
/// buffer allocates nothing.
pub fn write_key(out: &mut String, bucket: &str, origin: &str, encoded_key: &str, query: &str) {
    out.clear();
    out.reserve(bucket.len() + encoded_key.len() + query.len() + origin.len() + 3);
    for part in [bucket, "\0", encoded_key, "\0", query, "\0", origin] {
        out.push_str(part);
    }
}

/// The bucket name and origin fingerprint a cache key names (for the disk
/// index rebuild); `None` for a key of no known shape.
pub fn key_origin(key: &str) -> Option<(&str, &str)> {
    let mut parts = key.split('\0');
    let bucket = parts.next()?;
    let _encoded_key = parts.next()?;
    let _query = parts.next()?;
    let origin = parts.next()?;
    Some((bucket, origin))
}

/// The prefix of every key of one object (all versions and parts).
pub fn object_prefix(bucket: &str, encoded_key: &str) -> String {
    format!("{bucket}\0{encoded_key}\0")
}

/// The prefix of every key of `bucket`.
pub fn bucket_prefix(bucket: &str) -> String {
    format!("{bucket}\0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_reserve_within_the_budget_and_give_it_back() {
        const MB: u64 = 1024 * 1024;
        let store = MemoryStore::new(64 * MB, 4 * MB).expect("store");
        assert_eq!(fill_budget(64 * MB, 4 * MB), 16 * MB);
        let a = store.reserve_fill(8 * MB).expect("fits");
        let b = store.reserve_fill(8 * MB).expect("fits");
        assert!(store.reserve_fill(1).is_none(), "past the budget");
        assert_eq!(store.fills_refused.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(store.fill_bytes(), 8 * MB);
        assert!(store.reserve_fill(8 * MB).is_some());
        drop(b);
    }

    #[test]
    fn shards_are_never_too_small_for_the_largest_object() {
        const MB: u64 = 1024 * 1024;
        assert_eq!(shards(1024 * MB, 10 * MB, 2), 8);
        // 64 cores would want 256 shards of 4 MiB: too small for 10 MiB.
        let n = shards(1024 * MB, 10 * MB, 64);
        assert!(n.is_power_of_two(), "{n}");
        assert!((1024 * MB / n as u64) * 97 / 100 > 10 * MB, "{n}");
        assert_eq!(shards(256 * MB, 128 * MB, 2), 1);
        assert_eq!(shards(MB, 8 * MB, 2), 1);
    }

    #[test]
    fn an_object_as_large_as_the_item_limit_is_admitted() {
        const MB: usize = 1024 * 1024;
        let store = MemoryStore::new(256 * MB as u64, 100 * MB as u64).unwrap();
        store.insert(key("b", "o", "big", ""), object(64 * MB));
        let got = store.get(&key("b", "o", "big", "")).map(|o| o.body.len());
        assert_eq!(got, Some(64 * MB));
    }

    #[test]
    fn a_promoted_copy_never_replaces_the_copy_held() {
        let store = MemoryStore::new(1024 * 1024, 64 * 1024).unwrap();
        let k = key("b", "o", "k", "");
        // Memory missed; a fill stored its copy while a lower tier was read.
        let filled = store.insert(k.clone(), object(1));
        let got = store.insert_unless_held(k.clone(), object(2));
        assert!(Arc::ptr_eq(&got, &filled), "the fill's copy is handed out");
        let held = store.get(&k).expect("held");
        assert!(Arc::ptr_eq(&held, &filled), "and stays stored");
        // Nothing held: the promoted copy is stored.
        let other = key("b", "o", "other", "");
        let got = store.insert_unless_held(other.clone(), object(3));
        assert_eq!(got.body.len(), 3);
        let held = store.get(&other).expect("stored");
        assert!(Arc::ptr_eq(&held, &got));
    }

    fn object(len: usize) -> Object {
        Object {
            stored_at: SystemTime::UNIX_EPOCH,
            fresh_for: Duration::from_secs(60),
            etag: "\"e\"".into(),
            last_modified: None,
            headers: String::new(),
            body: bytes::Bytes::from(vec![7u8; len]).into(),
            total: len as u64,
            touched_ms: Default::default(),
        }
    }

    #[test]
    fn bounded_by_bytes_and_counts_evictions() {
        let store = MemoryStore::new(1024 * 1024, 64 * 1024).unwrap();
        for i in 0..200 {
            store.insert(key("b", "o", &format!("k{i}"), ""), object(16 * 1024));
        }
        assert!(store.bytes() <= 1024 * 1024, "{}", store.bytes());
        assert!(store.items() < 200);
        assert!(store.evictions() > 0);
    }

    #[test]
    fn keys_separate_buckets_versions_and_parts() {
        let store = MemoryStore::new(1024 * 1024, 64 * 1024).unwrap();
        store.insert(key("a", "o", "k", ""), object(1));
        store.insert(key("a", "o", "k", "versionId=2"), object(2));
        store.insert(key("ab", "o", "k", ""), object(3));
        assert_eq!(
            store.get(&key("a", "o", "k", "")).map(|o| o.body.len()),
            Some(1)
        );
        assert_eq!(
            store
                .get(&key("a", "o", "k", "versionId=2"))
                .map(|o| o.body.len()),
            Some(2)
        );
        store.remove_prefix(&bucket_prefix("a"));
        assert!(store.get(&key("a", "o", "k", "")).is_none());
        assert_eq!(
            store.get(&key("ab", "o", "k", "")).map(|o| o.body.len()),
            Some(3)
        );
    }
}
