//! The Redis tier: a cache shared by every instance of a fleet, behind the
//! memory and disk tiers (`cache.cache_layers`, `cache.redis`), on one
//! Redis server or a Redis Cluster.
//!
//! - **Reads** run on the requesting core's runtime, over its own
//!   connections ([`Reader`]: per node, routed by slot, a breaker each):
//!   a memory miss asks Redis for the entry within `operation_timeout_ms`
//!   (`lookup.rs`); a hit is checked (`entry.rs`), put into the memory tier
//!   and served; a chunked object is streamed chunk by chunk
//!   (`proxy::tiers`). A slow, dead or refusing Redis is a miss.
//! - **Writes** are off the response path: a fill stored in memory is
//!   offered to a bounded queue ([`RedisTier::offer`], never waits), which
//!   the tier's own thread writes (after a failure it drops writes,
//!   counted, for two seconds). The TTL is `redis_ttl_seconds`, capped by
//!   `redis_max_ttl_seconds` and by how long the object may still be served
//!   (fresh, or stale-if-error).
//! - **Entries** describe themselves (`entry.rs`): the whole cache key (with
//!   the origin fingerprint), headers, ETag, length and CRC-32s; objects
//!   above `chunk_size_kb` are a manifest and chunks. A foreign, cut or
//!   bit-flipped value is dropped (`DEL`), counted and read as a miss.
//! - **Keys** are `{prefix}:{<object's tag>}:<hash of the cache key>`, and
//!   every key of one object (chunks `…:<write>:<n>`, `…:lease`,
//!   `…:stream`, the index set `{prefix}:{<tag>}:o`) shares the hash tag:
//!   one Cluster slot.
//! - **Purges reach the fleet:** an admin purge deletes the entries its
//!   index sets list, bumps the fleet's purge count and publishes the
//!   prefix; every instance's fleet thread applies it to its memory and
//!   disk tiers. An instance that finds the count moved while it was not
//!   listening drops all its local copies ([`RedisTier::run_fleet`]).
//!
//! `rediss://` connects over TLS (`conn.rs`); `cluster.rs` is the slot
//! map's pure part. Fleet-wide collapsed forwarding is `lease.rs` (and
//! `publish.rs`: objects streamed to the fleet while they arrive),
//! fleet-wide limits `limit.rs`.

pub mod batch;
pub mod cluster;
pub mod conn;
pub mod entry;
pub mod lease;
pub mod limit;
pub mod lookup;
pub mod publish;
pub mod reader;
pub mod values;

pub use lookup::Found;
pub use reader::Reader;

use crate::cache::store::Object;
use crate::config::{Level, RedisCache};
use crate::log;
use conn::Conn;
use redis_protocol::resp2::types::OwnedFrame;
use sha2::Digest;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Writes waiting for the writer thread; more are dropped and counted.
const WRITE_QUEUE: usize = 256;
/// How long the writer drops writes after one failed.
const WRITER_PAUSE: Duration = Duration::from_secs(2);

/// `redis_url` read: where, and who.
#[derive(Debug, PartialEq, Eq)]
pub struct Url {
    /// `host:port` (port 6379 when not given).
    pub address: String,
    /// The user name, when one is given with a password.
    pub user: Option<String>,
    /// The password, when given.
    pub password: Option<String>,
    /// The database from the path (`/2`).
    pub db: Option<u32>,
    /// `rediss://`: TLS, the host the certificate must name.
    pub tls_host: Option<String>,
}

/// Reads `redis[s]://[[user]:password@]host[:port][/db]`.
pub fn parse_url(url: &str) -> Result<Url, String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("redis://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("rediss://") {
        (rest, true)
    } else {
        return Err(format!("{url:?} is not a redis:// or rediss:// URL"));
    };
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (Some(auth), rest),
        None => (None, rest),
    };
    let (hostport, db) = match rest.split_once('/') {
        Some((h, "")) => (h, None),
        Some((h, db)) => {
            let n = db
                .parse::<u32>()
                .map_err(|_| format!("database {db:?} in {url:?} is not a number"))?;
            (h, Some(n))
        }
        None => (rest, None),
    };
    if hostport.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let address = if hostport.ends_with(']') || !hostport.contains(':') {
        format!("{hostport}:6379")
    } else {
        let (_, port) = hostport.rsplit_once(':').unwrap_or((hostport, "6379"));
        port.parse::<u16>()
            .map_err(|_| format!("port {port:?} in {url:?} is not a port"))?;
        hostport.to_string()
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let (user, password) = match auth.map(|a| a.split_once(':')) {
        None => (None, None),
        Some(None) => (None, Some(decode(auth.unwrap_or_default()))),
        Some(Some((u, p))) => ((!u.is_empty()).then(|| decode(u)), Some(decode(p))),
    };
    let host = address
        .rsplit_once(':')
        .map_or(address.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok(Url {
        address,
        user,
        password: password.filter(|p| !p.is_empty()),
        db,
        tls_host: tls.then_some(host),
    })
}

/// One write for the writer thread.
pub enum RedisWrite {
    /// A stored object.
    Entry(EntryWrite),
    /// An object being fetched: its stream record (`publish.rs`).
    Stream(publish::StreamWrite),
    /// One chunk of an object being fetched (`publish.rs`).
    Chunk(publish::ChunkWrite),
    /// The manifest of a passed-through object, its chunks all queued
    /// before it (`publish.rs`).
    Finish(publish::FinishWrite),
    /// The fetch of this cache key broke: its stream record and lease end.
    Abort(String),
}

/// An entry ready to write ([`RedisTier::commit`]).
struct Prepared<'a> {
    /// The cache key.
    key: &'a str,
    manifest: &'a [u8],
    /// The chunks not written yet: the last `chunks.len()` of them.
    chunks: &'a [bytes::Bytes],
    chunk_count: usize,
    write_id: &'a str,
    ttl: Duration,
}

/// A stored object to write.
pub struct EntryWrite {
    key: String,
    object: Arc<Object>,
    ttl: Duration,
    /// The memory tier's purge count when the object was stored: a purge
    /// since means the write is not made.
    epoch: u64,
    /// The write whose chunks were published while the object was
    /// fetched, if they were: those written are not written again.
    write_id: Option<String>,
}

/// The process's Redis tier: its settings, counters and write queue.
pub struct RedisTier {
    /// `cache.redis`.
    pub settings: RedisCache,
    queue: SyncSender<RedisWrite>,
    /// Lookups answered by an entry.
    pub hits: AtomicU64,
    /// Lookups that found nothing.
    pub misses: AtomicU64,
    /// Lookups and writes that failed (timeout, refused, closed), or were
    /// skipped while a core's breaker was open.
    pub errors: AtomicU64,
    /// Entries written.
    pub writes: AtomicU64,
    /// Writes not made because the queue was full.
    pub writes_dropped: AtomicU64,
    /// Values under our keys refused (foreign, cut, flipped) and deleted.
    pub bad_entries: AtomicU64,
    /// Purges from the fleet applied to the local tiers.
    pub fleet_purges: AtomicU64,
    /// The fleet's purge count as this instance last saw it.
    seen_epoch: AtomicU64,
    /// This process's part of every write id (random).
    instance: String,
    /// Writes numbered so far (the other part of a write id).
    next_write: AtomicU64,
    /// Bytes of published chunks waiting in the write queue.
    chunks_queued: Arc<AtomicU64>,
    /// A Cluster's primaries, as a reader last read them: where a new
    /// reader (a purge's, the fleet thread's after a loss) looks for the
    /// slot map when `redis_url`'s node is gone. Locked only when a map is
    /// read or sought, never per command.
    cluster_nodes: std::sync::Mutex<Vec<String>>,
    /// `cluster_nodes` is not empty.
    knows_cluster: std::sync::atomic::AtomicBool,
}

impl RedisTier {
    /// Whether the fleet thread has read the fleet's purge count since
    /// this instance started.
    pub fn knows_fleet_epoch(&self) -> bool {
        self.seen_epoch.load(Ordering::Relaxed) != UNSEEN
    }

    /// The tier, and the queue its writer thread drains ([`Self::run_writer`]).
    pub fn new(settings: RedisCache) -> (Arc<RedisTier>, Receiver<RedisWrite>) {
        let (queue, rx) = std::sync::mpsc::sync_channel(WRITE_QUEUE);
        let tier = RedisTier {
            settings,
            queue,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            writes_dropped: AtomicU64::new(0),
            bad_entries: AtomicU64::new(0),
            fleet_purges: AtomicU64::new(0),
            seen_epoch: AtomicU64::new(UNSEEN),
            instance: {
                use std::hash::{BuildHasher, Hasher};
                let random = std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish();
                format!("{:08x}", random as u32)
            },
            next_write: AtomicU64::new(0),
            chunks_queued: Arc::new(AtomicU64::new(0)),
            cluster_nodes: std::sync::Mutex::new(Vec::new()),
            knows_cluster: std::sync::atomic::AtomicBool::new(false),
        };
        (Arc::new(tier), rx)
    }

    /// The hash tag of every key of one object (its entries, their
    /// chunks and leases, its index set): one Cluster slot for them all.
    fn tag(cache_key: &str) -> String {
        let mut parts = cache_key.splitn(3, '\0');
        let bucket = parts.next().unwrap_or("");
        let key = parts.next().unwrap_or("");
        let object = crate::cache::store::object_prefix(bucket, key);
        hex::encode(&sha2::Sha256::digest(object.as_bytes())[..8])
    }

    /// The Redis key of cache key `key` (its entry's manifest):
    /// `{prefix}:{<object's tag>}:<hash of the cache key>`.
    pub fn redis_key(&self, key: &str) -> String {
        let hash = sha2::Sha256::digest(key.as_bytes());
        format!(
            "{}:{{{}}}:{}",
            self.settings.prefix,
            Self::tag(key),
            hex::encode(&hash[..16])
        )
    }

    /// The key of chunk `n` of the entry at `rkey`, written by `write_id`.
    pub fn chunk_key(&self, rkey: &str, write_id: &str, n: usize) -> String {
        format!("{rkey}:{write_id}:{n}")
    }

    /// Remembers a Cluster's primaries (a reader read its slot map).
    fn learn_nodes(&self, nodes: &[String]) {
        if let Ok(mut known) = self.cluster_nodes.lock() {
            if known.as_slice() != nodes {
                *known = nodes.to_vec();
            }
        }
        self.knows_cluster
            .store(!nodes.is_empty(), Ordering::Relaxed);
    }

    /// A Cluster's primaries as last read ([`Self::learn_nodes`]).
    fn cluster_nodes(&self) -> Vec<String> {
        self.cluster_nodes
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default()
    }

    /// A new write's id (no `:`), unique across the fleet.
    pub fn new_write_id(&self) -> String {
        let n = self.next_write.fetch_add(1, Ordering::Relaxed);
        format!("{}{n:x}", self.instance)
    }

    /// Hands a stored object to the writer thread; never waits. `servable`:
    /// how long from now the object may still be served (fresh or stale).
    /// `write_id`: the write its chunks were published under while it was
    /// fetched, if they were.
    pub fn offer(
        &self,
        key: String,
        object: Arc<Object>,
        servable: Duration,
        epoch: u64,
        write_id: Option<String>,
    ) {
        let ttl = ttl(&self.settings, servable);
        self.enqueue(RedisWrite::Entry(EntryWrite {
            key,
            object,
            ttl,
            epoch,
            write_id,
        }));
    }

    /// Queues a write; a full queue drops it, counted. Never waits.
    fn enqueue(&self, write: RedisWrite) -> bool {
        match self.queue.try_send(write) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.writes_dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// The writer thread's loop: one connection per node, reopened after
    /// a failure; failures are counted and said at most once per 10 s. An
    /// object whose memory copy was purged since it was stored
    /// (`purge_epoch` moved) is not written.
    pub async fn run_writer(
        self: Arc<Self>,
        rx: Receiver<RedisWrite>,
        purge_epoch: impl Fn() -> u64,
    ) {
        let redis = Reader::new(1);
        let mut warned: Option<Instant> = None;
        // After a failure, writes are dropped (counted) for a pause: a dead
        // or stalled Redis costs one timeout per pause, not one per write.
        let mut paused_until: Option<Instant> = None;
        // Chunks published per write id, in order from the first.
        let mut published = std::collections::HashMap::new();
        // This thread does nothing else: waiting on the queue blocks no one.
        while let Ok(w) = rx.recv() {
            if let RedisWrite::Chunk(c) = &w {
                self.chunks_queued
                    .fetch_sub(c.value.len() as u64, Ordering::Relaxed);
            }
            if paused_until.is_some_and(|t| Instant::now() < t) {
                self.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let result = match w {
                RedisWrite::Entry(w) => {
                    let done = w.write_id.as_ref().and_then(|id| published.remove(id));
                    if purge_epoch() == w.epoch {
                        self.write(&redis, &w, done.unwrap_or(0)).await
                    } else {
                        // Purged since it was stored: not written.
                        if w.write_id.is_some() {
                            self.end_stream(&redis, &w.key).await;
                        }
                        Ok(false)
                    }
                }
                RedisWrite::Stream(s) => self.write_stream(&redis, &s).await.map(|()| false),
                RedisWrite::Chunk(c) => self
                    .write_chunk(&redis, &c, &mut published)
                    .await
                    .map(|()| false),
                RedisWrite::Abort(key) => {
                    self.end_stream(&redis, &key).await;
                    Ok(false)
                }
                RedisWrite::Finish(f) => {
                    let written = published.remove(&f.write_id).unwrap_or(0);
                    // Purged since, or a chunk missing: no entry.
                    if purge_epoch() != f.epoch || written != f.chunks {
                        self.end_stream(&redis, &f.key).await;
                        Ok(false)
                    } else {
                        let entry = Prepared {
                            key: &f.key,
                            manifest: &f.manifest,
                            chunks: &[],
                            chunk_count: f.chunks,
                            write_id: &f.write_id,
                            ttl: f.ttl,
                        };
                        self.commit(&redis, entry).await
                    }
                }
            };
            match result {
                Ok(true) => {
                    self.writes.fetch_add(1, Ordering::Relaxed);
                }
                // Not an entry, or a purge came first.
                Ok(false) => {}
                Err(e) => {
                    paused_until = Some(Instant::now() + WRITER_PAUSE);
                    self.write_failed(&mut warned, &e);
                }
            }
        }
    }

    /// Counts a failed write and says so, at most once per 10 s.
    fn write_failed(&self, warned: &mut Option<Instant>, e: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *warned = Some(Instant::now());
            log!(
                Level::Warn,
                "Redis cache write failed; the object stays in the local tiers",
                redis = self.settings.shown(),
                error = e,
            );
        }
    }

    /// Writes one stored object's entry ([`Self::commit`]). Chunks
    /// `..published` of `w.write_id` were written while the object was
    /// fetched: they are not written again.
    async fn write(
        &self,
        redis: &Reader,
        w: &EntryWrite,
        published: usize,
    ) -> Result<bool, String> {
        let s = &self.settings;
        let write_id = w.write_id.clone().unwrap_or_else(|| self.new_write_id());
        let encoded = entry::encode(&w.key, &w.object, s.chunk_bytes, &write_id);
        let from = published.min(encoded.chunks.len());
        let entry = Prepared {
            key: &w.key,
            manifest: &encoded.manifest,
            chunks: &encoded.chunks[from..],
            chunk_count: encoded.chunks.len(),
            write_id: &write_id,
            ttl: w.ttl,
        };
        self.commit(redis, entry).await
    }

    /// Writes an entry: the chunks not written yet (the last ones), then
    /// in one script on its slot the manifest, its place (and its chunks')
    /// in its object's index set and the end of its fleet lease and stream
    /// record; then its object's place in its bucket's index set.
    /// `Ok(false)`: not written, or taken back, because the fleet's purge
    /// count is not (or is no longer) the one this instance knows: a purge
    /// since the fetch wins. The count is read after the writes, so a purge
    /// either finds the entry in the index sets or moved the count first.
    async fn commit(&self, redis: &Reader, e: Prepared<'_>) -> Result<bool, String> {
        let s = &self.settings;
        let key = self.redis_key(e.key);
        let known = self.known_epoch().await?;
        if self.fleet_epoch(redis).await? != known {
            self.end_stream(redis, e.key).await;
            return Ok(false);
        }
        let px = e.ttl.as_millis().max(1).to_string();
        let keep = s.max_ttl.as_millis().max(1).to_string();
        let chunk_keys: Vec<String> = (0..e.chunk_count)
            .map(|i| self.chunk_key(&key, e.write_id, i))
            .collect();
        // The chunks first, a few per round trip: a manifest found has its
        // chunks.
        let unwritten = &chunk_keys[e.chunk_count - e.chunks.len()..];
        let batches = unwritten
            .chunks(CHUNKS_PER_WRITE)
            .zip(e.chunks.chunks(CHUNKS_PER_WRITE));
        for (keys, values) in batches {
            let values: Vec<Vec<u8>> = values.iter().map(|v| entry::chunk_value(v)).collect();
            let commands: Vec<[&[u8]; 5]> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| [&b"SET"[..], k.as_bytes(), &v[..], b"PX", px.as_bytes()])
                .collect();
            let commands: Vec<&[&[u8]]> = commands.iter().map(|c| &c[..]).collect();
            for reply in redis.pipeline(self, key.as_bytes(), &commands).await? {
                conn::ok(reply).map_err(|e| format!("Redis said: {e}"))?;
            }
        }
        let (object_index, bucket_index) = self.index_keys(e.key);
        let lease_key = self.lease_key(e.key);
        let stream_key = self.stream_key(e.key);
        let n_keys = (4 + chunk_keys.len()).to_string();
        let mut args: Vec<&[u8]> = vec![
            b"EVAL",
            WRITE_SCRIPT.as_bytes(),
            n_keys.as_bytes(),
            key.as_bytes(),
            object_index.as_bytes(),
            lease_key.as_bytes(),
            stream_key.as_bytes(),
        ];
        args.extend(chunk_keys.iter().map(|k| k.as_bytes()));
        args.extend([e.manifest, px.as_bytes(), keep.as_bytes()]);
        redis.call(self, key.as_bytes(), &args).await?;
        let listed: [&[&[u8]]; 2] = [
            &[b"SADD", bucket_index.as_bytes(), object_index.as_bytes()],
            &[b"PEXPIRE", bucket_index.as_bytes(), keep.as_bytes()],
        ];
        redis
            .pipeline(self, bucket_index.as_bytes(), &listed)
            .await?;
        if self.fleet_epoch(redis).await? != known {
            redis
                .call(self, key.as_bytes(), &[b"DEL", key.as_bytes()])
                .await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// The fleet's purge count in Redis now.
    async fn fleet_epoch(&self, redis: &Reader) -> Result<u64, String> {
        let key = self.epoch_key();
        match redis
            .call(self, key.as_bytes(), &[b"GET", key.as_bytes()])
            .await?
        {
            OwnedFrame::BulkString(v) => {
                Ok(String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0))
            }
            _ => Ok(0),
        }
    }

    /// The fleet's purge count as this instance last saw it, waiting (on
    /// the writer's thread) up to two seconds for the fleet thread's first
    /// look: a write made without it could undo a purge.
    async fn known_epoch(&self) -> Result<u64, String> {
        for _ in 0..40 {
            let seen = self.seen_epoch.load(Ordering::Relaxed);
            if seen != UNSEEN {
                return Ok(seen);
            }
            monoio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the fleet's purge count is not known yet".into())
    }

    /// The index sets an entry is listed in: its object's (every query
    /// variant and origin of one key, with their chunks; on the entries'
    /// slot) and its bucket's (every object index).
    fn index_keys(&self, cache_key: &str) -> (String, String) {
        let bucket = cache_key.split('\0').next().unwrap_or("");
        (
            format!("{}:{{{}}}:o", self.settings.prefix, Self::tag(cache_key)),
            self.bucket_index(&crate::cache::store::bucket_prefix(bucket)),
        )
    }

    fn bucket_index(&self, prefix: &str) -> String {
        let hash = sha2::Sha256::digest(prefix.as_bytes());
        format!("{}:b:{}", self.settings.prefix, hex::encode(&hash[..16]))
    }

    /// The fleet's lease on fetching `cache_key` (`limit.rs`'s neighbour:
    /// `lease.rs`); the write of its entry removes it.
    pub fn lease_key(&self, cache_key: &str) -> String {
        format!("{}:lease", self.redis_key(cache_key))
    }

    /// The stream record of `cache_key` while it is fetched (`publish.rs`).
    pub fn stream_key(&self, cache_key: &str) -> String {
        format!("{}:stream", self.redis_key(cache_key))
    }

    /// The fleet's purge count (bumped by every purge).
    fn epoch_key(&self) -> String {
        format!("{}:purges", self.settings.prefix)
    }

    /// The channel purges are announced on.
    fn channel(&self) -> String {
        format!("{}:purge", self.settings.prefix)
    }

    /// Purges `prefix` (`bucket\0` or `bucket\0key\0`) from Redis and tells
    /// every instance to drop its local copies: the entries listed in the
    /// index sets are deleted, the fleet's purge count bumped, the purge
    /// published. Blocking (the admin API's thread); the number of entries
    /// deleted, or why it failed.
    pub fn purge_fleet(&self, prefix: &str) -> Result<usize, String> {
        let run = async {
            let redis = Reader::new(1);
            let epoch_key = self.epoch_key();
            // The count first: a write that reads it after this takes its
            // entry back, and one that read it before is listed in the
            // index sets deleted below.
            let epoch = match redis
                .call(self, epoch_key.as_bytes(), &[b"INCR", epoch_key.as_bytes()])
                .await?
            {
                OwnedFrame::Integer(n) => n,
                other => return Err(format!("INCR answered {other:?}")),
            };
            let object_level = prefix.trim_end_matches('\0').contains('\0');
            let objects: Vec<Vec<u8>> = if object_level {
                vec![self.index_keys(prefix).0.into_bytes()]
            } else {
                let index = self.bucket_index(prefix);
                let smembers: [&[u8]; 2] = [b"SMEMBERS", index.as_bytes()];
                let listed = members(redis.call(self, index.as_bytes(), &smembers).await?);
                redis
                    .call(self, index.as_bytes(), &[b"DEL", index.as_bytes()])
                    .await?;
                listed
            };
            let mut deleted = 0;
            for object in &objects {
                let entries = members(redis.call(self, object, &[b"SMEMBERS", object]).await?);
                // The index and everything it lists share one slot.
                let mut del: Vec<&[u8]> = vec![b"DEL", object];
                del.extend(entries.iter().map(|e| &e[..]));
                redis.call(self, object, &del).await?;
                deleted += entries.iter().filter(|e| !is_chunk(e)).count();
            }
            let channel = self.channel();
            let message = format!("{epoch} {}", hex::encode(prefix.as_bytes()));
            let publish: [&[u8]; 3] = [b"PUBLISH", channel.as_bytes(), message.as_bytes()];
            redis.call(self, channel.as_bytes(), &publish).await?;
            self.seen_epoch.store(epoch as u64, Ordering::Relaxed);
            Ok(deleted)
        };
        crate::server::driver::block_on(crate::server::driver::Choice::Epoll, |_| run)
            .map_err(|e| format!("no runtime for the purge: {e}"))?
    }

    /// The fleet thread: keeps a subscription to the purge channel and
    /// applies every purge announced to this instance's local tiers
    /// (`purge_local`, by prefix; `""` for everything). When the fleet's
    /// purge count is not the last one this instance saw (it was
    /// disconnected, or Redis restarted empty) and it holds local copies
    /// (`local_items`), it drops them all: it cannot know what it missed.
    pub async fn run_fleet(
        self: Arc<Self>,
        purge_local: impl Fn(&str) -> usize,
        local_items: impl Fn() -> usize,
        stop: impl Fn() -> bool,
    ) {
        let mut warned: Option<Instant> = None;
        // Kept across reconnections: the nodes of a Cluster it has learnt
        // are where it reconnects when `redis_url`'s node is gone.
        let redis = Reader::new(1);
        while !stop() {
            if let Err(e) = self.follow(&redis, &purge_local, &local_items, &stop).await {
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    warned = Some(Instant::now());
                    log!(
                        Level::Warn,
                        "Redis purge channel lost; retrying (purges from other instances wait)",
                        redis = self.settings.shown(),
                        error = e,
                    );
                }
                monoio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    async fn follow(
        &self,
        redis: &Reader,
        purge_local: &impl Fn(&str) -> usize,
        local_items: &impl Fn() -> usize,
        stop: &impl Fn() -> bool,
    ) -> Result<(), String> {
        let s = &self.settings;
        let epoch = self.fleet_epoch(redis).await?;
        // Any node of a Cluster hears every publication.
        let mut c = None;
        let mut failed = String::from("no Redis node known yet");
        for address in redis.known_nodes(self) {
            match Conn::open_at(s, &address).await {
                Ok(conn) => {
                    c = Some(conn);
                    break;
                }
                Err(e) => failed = e,
            }
        }
        let mut c = c.ok_or(failed)?;
        let seen = self.seen_epoch.swap(epoch, Ordering::Relaxed);
        if seen != epoch && local_items() > 0 {
            let dropped = purge_local("");
            self.fleet_purges.fetch_add(1, Ordering::Relaxed);
            log!(
                Level::Warn,
                "Purges may have been missed (the fleet's purge count changed); local copies dropped",
                seen = if seen == UNSEEN { "none".to_string() } else { seen.to_string() },
                now = epoch,
                dropped = dropped,
            );
        }
        let channel = self.channel();
        c.send(&[&[b"SUBSCRIBE", channel.as_bytes()]], s.operation_timeout)
            .await?;
        let mut pinged = false;
        while !stop() {
            let deadline = Instant::now() + FLEET_QUIET;
            match c.read_frame(deadline).await {
                Ok(OwnedFrame::Array(parts)) => {
                    pinged = false;
                    if let [OwnedFrame::BulkString(kind), _, OwnedFrame::BulkString(payload)] =
                        parts.as_slice()
                    {
                        if kind.as_slice() == b"message" {
                            self.apply(payload, purge_local);
                        }
                    }
                }
                Ok(_) => pinged = false,
                Err(e) if e == conn::TIMED_OUT && !pinged => {
                    // Quiet: make sure the connection still lives.
                    c.send(&[&[b"PING"]], s.operation_timeout).await?;
                    pinged = true;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Applies one announced purge: `<epoch> <hex of the prefix>`.
    fn apply(&self, payload: &[u8], purge_local: &impl Fn(&str) -> usize) {
        let text = String::from_utf8_lossy(payload);
        let Some((epoch, hex_prefix)) = text.split_once(' ') else {
            return;
        };
        let (Ok(epoch), Ok(prefix)) = (epoch.parse::<u64>(), hex::decode(hex_prefix)) else {
            return;
        };
        let prefix = String::from_utf8_lossy(&prefix).into_owned();
        let dropped = purge_local(&prefix);
        self.seen_epoch.store(epoch, Ordering::Relaxed);
        self.fleet_purges.fetch_add(1, Ordering::Relaxed);
        log!(
            Level::Info,
            "Fleet purge applied",
            prefix = prefix.replace('\0', "/"),
            dropped = dropped,
            epoch = epoch,
        );
    }
}

/// Whether an index set's member is a chunk (`<entry>:<write>:<n>`), not
/// an entry.
fn is_chunk(member: &[u8]) -> bool {
    let after_tag = member.rsplit(|&b| b == b'}').next().unwrap_or(member);
    after_tag.iter().filter(|&&b| b == b':').count() >= 3
}

/// The members of an SMEMBERS reply.
fn members(reply: OwnedFrame) -> Vec<Vec<u8>> {
    match reply {
        OwnedFrame::Array(items) => items
            .into_iter()
            .filter_map(|i| match i {
                OwnedFrame::BulkString(b) => Some(b),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Writes an entry's manifest (KEYS[1] = ARGV[1], for ARGV[2] ms), lists
/// it and its chunks (KEYS[4..]) in its object's index set (KEYS[2], kept
/// ARGV[3] ms) and ends the key's fleet lease (KEYS[3]). Every key shares
/// one slot. The manifest is the first write: Redis refuses a script's
/// first write when it is full, and lets the writes after one through.
const WRITE_SCRIPT: &str =
    "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) redis.call('DEL', KEYS[3]) \
for i = 1, #KEYS do if i ~= 3 and i ~= 2 then redis.call('SADD', KEYS[2], KEYS[i]) end end \
redis.call('PEXPIRE', KEYS[2], ARGV[3]) return 1";

/// Chunks written per round trip.
const CHUNKS_PER_WRITE: usize = 8;

/// `seen_epoch` before this instance saw the fleet's purge count.
const UNSEEN: u64 = u64::MAX;
/// A subscription quiet this long is pinged.
const FLEET_QUIET: Duration = Duration::from_secs(15);

/// An entry's TTL: `redis_ttl_seconds`, capped by `redis_max_ttl_seconds`
/// and by how long the object may still be served; at least a second.
pub fn ttl(s: &RedisCache, servable: Duration) -> Duration {
    s.ttl
        .min(s.max_ttl)
        .min(servable)
        .max(Duration::from_secs(1))
}

/// How long from `now` a copy stored at `stored_at`, fresh for
/// `fresh_for`, may be served (stale-if-error included).
pub fn servable(
    stored_at: SystemTime,
    fresh_for: Duration,
    stale: Duration,
    now: SystemTime,
) -> Duration {
    let until = stored_at + fresh_for + stale;
    until.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_with_their_user_password_and_database() {
        let u = parse_url("redis://localhost:6379").expect("plain");
        assert_eq!(u.address, "localhost:6379");
        assert_eq!((u.user, u.password, u.db), (None, None, None));
        let u = parse_url("redis://:s%40cret@10.0.0.1/2").expect("password");
        assert_eq!(u.address, "10.0.0.1:6379");
        assert_eq!((u.password.as_deref(), u.db), (Some("s@cret"), Some(2)));
        let u = parse_url("redis://app:pw@redis:7000/").expect("user");
        assert_eq!(u.address, "redis:7000");
        assert_eq!(u.user.as_deref(), Some("app"));
        let u = parse_url("rediss://:pw@cache.example:6380/1").expect("TLS");
        assert_eq!(u.address, "cache.example:6380");
        assert_eq!(u.tls_host.as_deref(), Some("cache.example"));
        assert_eq!(
            parse_url("rediss://[::1]").expect("v6").tls_host.as_deref(),
            Some("::1")
        );
        assert_eq!(parse_url("redis://x").expect("plain").tls_host, None);
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("redis://x:port").is_err());
        assert!(parse_url("redis://x/db").is_err());
    }

    #[test]
    fn an_entry_lives_no_longer_than_its_object_may_be_served() {
        let s = RedisCache {
            address: "x:1".into(),
            password: None,
            user: None,
            db: 0,
            prefix: "p".into(),
            ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(1),
            max_connections: 1,
            chunk_bytes: 1024,
            tls: None,
            sentinel: None,
            seeds: Vec::new(),
        };
        assert_eq!(
            ttl(&s, Duration::from_secs(86_400)),
            Duration::from_secs(600)
        );
        assert_eq!(ttl(&s, Duration::from_secs(30)), Duration::from_secs(30));
        assert_eq!(ttl(&s, Duration::ZERO), Duration::from_secs(1));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let now = t0 + Duration::from_secs(50);
        assert_eq!(
            servable(t0, Duration::from_secs(60), Duration::from_secs(30), now),
            Duration::from_secs(40)
        );
    }
}
