//! The Redis tier: a cache shared by every instance of a fleet, behind the
//! memory and disk tiers (`cache.cache_layers`, `cache.redis`).
//!
//! - **Reads** run on the requesting core's runtime ([`Reader`]): a memory
//!   miss asks Redis for the entry within `operation_timeout_ms`; a hit is
//!   checked (`entry`), put into the memory tier and served. A slow, dead or
//!   refusing Redis is a miss, and after three failures in a row the core's
//!   breaker stops asking for a while, so a dead Redis costs no request its
//!   timeout. Each core holds at most its share of `max_pool_size`
//!   connections; when they are all busy a lookup waits for the next one
//!   freed (Redis answers in well under a millisecond; a miss would cost
//!   an S3 fetch or the fleet lease's polling), within
//!   `operation_timeout_ms`.
//! - **Writes** are off the response path: a fill stored in memory is
//!   offered to a bounded queue ([`RedisTier::offer`], never waits), which
//!   the tier's own thread writes with `SET key value PX ttl` (after a
//!   failure it drops writes, counted, for two seconds). The TTL is
//!   `redis_ttl_seconds`, capped by `redis_max_ttl_seconds` and by how long
//!   the object may still be served (fresh, or stale-if-error).
//! - **Entries** describe themselves (`entry`): the whole cache key (with
//!   the origin fingerprint), headers, ETag, length and a CRC-32 of the
//!   body. A foreign, cut or bit-flipped value is dropped (`DEL`), counted
//!   and read as a miss.
//! - **Keys** are `{prefix}:{<hash of the cache key>}`: the braces are a
//!   Cluster hash tag.
//!
//! - **Purges reach the fleet:** an admin purge deletes the entries its
//!   index sets list, bumps the fleet's purge count and publishes the
//!   prefix; every instance's fleet thread applies it to its memory and
//!   disk tiers. An instance that finds the count moved while it was not
//!   listening drops all its local copies ([`RedisTier::run_fleet`]).
//!
//! `rediss://` connects over TLS (`conn.rs`).
//!
//! Fleet-wide collapsed forwarding is `lease.rs`, fleet-wide limits
//! `limit.rs`. Not yet: Redis Cluster, objects stored as chunks (issue #25).

pub mod conn;
pub mod entry;
pub mod lease;
pub mod limit;

use crate::cache::store::Object;
use crate::config::{BreakerSettings, Level, RedisCache};
use crate::log;
use crate::upstream::breaker::{Admit, Breaker};
use conn::Conn;
use redis_protocol::resp2::types::OwnedFrame;
use sha2::Digest;
use std::cell::{Cell, RefCell};
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
pub struct RedisWrite {
    key: String,
    object: Arc<Object>,
    ttl: Duration,
    /// The memory tier's purge count when the object was stored: a purge
    /// since means the write is not made.
    epoch: u64,
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
        };
        (Arc::new(tier), rx)
    }

    /// The Redis key of cache key `key`.
    pub fn redis_key(&self, key: &str) -> String {
        let hash = sha2::Sha256::digest(key.as_bytes());
        format!("{}:{{{}}}", self.settings.prefix, hex::encode(&hash[..16]))
    }

    /// Hands a stored object to the writer thread; never waits. `servable`:
    /// how long from now the object may still be served (fresh or stale).
    pub fn offer(&self, key: String, object: Arc<Object>, servable: Duration, epoch: u64) {
        let ttl = ttl(&self.settings, servable);
        match self.queue.try_send(RedisWrite {
            key,
            object,
            ttl,
            epoch,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.writes_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The writer thread's loop: one connection, reopened after a failure;
    /// failures are counted and said at most once per 10 s. An entry is
    /// written with its object's and bucket's index entries (for purges)
    /// in one round trip; one whose object was purged since it was stored
    /// (`purge_epoch` moved) is not written.
    pub async fn run_writer(
        self: Arc<Self>,
        rx: Receiver<RedisWrite>,
        purge_epoch: impl Fn() -> u64,
    ) {
        let mut conn: Option<Conn> = None;
        let mut warned: Option<Instant> = None;
        // After a failure, writes are dropped (counted) for a pause: a dead
        // or stalled Redis costs one timeout per pause, not one per write.
        let mut paused_until: Option<Instant> = None;
        // This thread does nothing else: waiting on the queue blocks no one.
        while let Ok(w) = rx.recv() {
            if purge_epoch() != w.epoch {
                continue;
            }
            if paused_until.is_some_and(|t| Instant::now() < t) {
                self.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let value = entry::encode(&w.key, &w.object);
            let key = self.redis_key(&w.key);
            let px = w.ttl.as_millis().max(1).to_string();
            let keep = self.settings.max_ttl.as_millis().max(1).to_string();
            let (object_index, bucket_index) = self.index_keys(&w.key);
            let lease_key = self.lease_key(&w.key);
            let result = async {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => conn.insert(Conn::open(&self.settings).await?),
                };
                let epoch_key = self.epoch_key();
                // The fleet's purge count as this instance knows it now: a
                // purge it has applied already failed the check above (the
                // local count moved); one it has not heard of yet moved the
                // count in Redis, and the script refuses the write.
                let fleet_epoch = self.known_epoch().await?.to_string();
                let args: [&[u8]; 12] = [
                    b"EVAL",
                    WRITE_SCRIPT.as_bytes(),
                    b"5",
                    epoch_key.as_bytes(),
                    key.as_bytes(),
                    object_index.as_bytes(),
                    bucket_index.as_bytes(),
                    lease_key.as_bytes(),
                    fleet_epoch.as_bytes(),
                    &value,
                    px.as_bytes(),
                    keep.as_bytes(),
                ];
                match c.call(&args, self.settings.operation_timeout).await? {
                    OwnedFrame::Error(e) => Err(format!("Redis said: {e}")),
                    OwnedFrame::Integer(0) => Ok(false),
                    _ => Ok(true),
                }
            }
            .await;
            match result {
                Ok(true) => {
                    self.writes.fetch_add(1, Ordering::Relaxed);
                }
                // A purge came first: not written.
                Ok(false) => {}
                Err(e) => {
                    conn = None;
                    paused_until = Some(Instant::now() + WRITER_PAUSE);
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        warned = Some(Instant::now());
                        log!(
                            Level::Warn,
                            "Redis cache write failed; the object stays in the local tiers",
                            redis = self.settings.address,
                            error = e,
                        );
                    }
                }
            }
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
    /// variant and origin of one key) and its bucket's (every object index).
    fn index_keys(&self, cache_key: &str) -> (String, String) {
        let mut parts = cache_key.splitn(3, '\0');
        let bucket = parts.next().unwrap_or("");
        let key = parts.next().unwrap_or("");
        (
            self.index_key("o", &crate::cache::store::object_prefix(bucket, key)),
            self.index_key("b", &crate::cache::store::bucket_prefix(bucket)),
        )
    }

    fn index_key(&self, kind: &str, prefix: &str) -> String {
        let hash = sha2::Sha256::digest(prefix.as_bytes());
        format!(
            "{}:{kind}:{}",
            self.settings.prefix,
            hex::encode(&hash[..16])
        )
    }

    /// The fleet's purge count (bumped by every purge).
    /// The fleet's lease on fetching `cache_key` (`limit.rs`'s neighbour:
    /// `lease.rs`); the write of its entry removes it.
    pub fn lease_key(&self, cache_key: &str) -> String {
        format!("{}:lease", self.redis_key(cache_key))
    }

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
            let s = &self.settings;
            let t = s.operation_timeout;
            let mut c = Conn::open(s).await?;
            // The count first: a write that checks it after this fails, and
            // one made before it is listed in the index sets deleted below.
            let epoch = match c.call(&[b"INCR", self.epoch_key().as_bytes()], t).await? {
                OwnedFrame::Integer(n) => n,
                other => return Err(format!("INCR answered {other:?}")),
            };
            let object_level = prefix.trim_end_matches('\0').contains('\0');
            let objects: Vec<Vec<u8>> = if object_level {
                vec![self.index_key("o", prefix).into_bytes()]
            } else {
                let bucket_index = self.index_key("b", prefix);
                let listed = members(c.call(&[b"SMEMBERS", bucket_index.as_bytes()], t).await?);
                c.call(&[b"DEL", bucket_index.as_bytes()], t).await?;
                listed
            };
            let mut deleted = 0;
            for object in &objects {
                let entries = members(c.call(&[b"SMEMBERS", object], t).await?);
                for e in entries.iter().chain(std::iter::once(object)) {
                    if let OwnedFrame::Integer(n) = c.call(&[b"DEL", e], t).await? {
                        deleted += usize::from(n > 0 && e != object);
                    }
                }
            }
            let message = format!("{epoch} {}", hex::encode(prefix.as_bytes()));
            c.call(
                &[b"PUBLISH", self.channel().as_bytes(), message.as_bytes()],
                t,
            )
            .await?;
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
        while !stop() {
            if let Err(e) = self.follow(&purge_local, &local_items, &stop).await {
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    warned = Some(Instant::now());
                    log!(
                        Level::Warn,
                        "Redis purge channel lost; retrying (purges from other instances wait)",
                        redis = self.settings.address,
                        error = e,
                    );
                }
                monoio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    async fn follow(
        &self,
        purge_local: &impl Fn(&str) -> usize,
        local_items: &impl Fn() -> usize,
        stop: &impl Fn() -> bool,
    ) -> Result<(), String> {
        let s = &self.settings;
        let mut c = Conn::open(s).await?;
        let epoch = match c
            .call(&[b"GET", self.epoch_key().as_bytes()], s.operation_timeout)
            .await?
        {
            OwnedFrame::BulkString(v) => String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0),
            _ => 0,
        };
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

/// Writes an entry and its index entries only if the fleet's purge count
/// (KEYS[1]) is still the one the writer knew (ARGV[1]): a purge between
/// the fetch and the write wins, on every instance. Returns 1 when written.
/// The key's fleet lease (KEYS[5]) ends either way. The entry is the first
/// write: Redis refuses a script's first write when it is full, and lets
/// the writes after one through.
const WRITE_SCRIPT: &str = "if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then redis.call('DEL', KEYS[5]) return 0 end \
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) redis.call('DEL', KEYS[5]) \
redis.call('SADD', KEYS[3], KEYS[2]) redis.call('PEXPIRE', KEYS[3], ARGV[4]) \
redis.call('SADD', KEYS[4], KEYS[3]) redis.call('PEXPIRE', KEYS[4], ARGV[4]) \
return 1";

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

/// What a lookup found.
pub enum Found {
    /// An intact entry for the key.
    Hit(Object),
    /// Nothing usable (absent, refused, or Redis unavailable).
    Miss,
}

/// Ready once woken (a connection was freed), after queueing its waker.
struct Freed<'a> {
    queue: &'a RefCell<Vec<std::task::Waker>>,
    queued: bool,
}

impl<'a> Freed<'a> {
    fn new(queue: &'a RefCell<Vec<std::task::Waker>>) -> Freed<'a> {
        Freed {
            queue,
            queued: false,
        }
    }
}

impl std::future::Future for Freed<'_> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.queued {
            return std::task::Poll::Ready(());
        }
        self.queue.borrow_mut().push(cx.waker().clone());
        self.queued = true;
        std::task::Poll::Pending
    }
}

/// Three failures in a row stop a core asking Redis for five seconds.
fn breaker_settings() -> BreakerSettings {
    BreakerSettings {
        failure_threshold: 3,
        success_threshold: 1,
        open_for: Duration::from_secs(5),
        half_open_requests: 1,
    }
}

/// One core's way to Redis: its idle connections and its breaker.
pub struct Reader {
    idle: RefCell<Vec<Conn>>,
    open: Cell<usize>,
    max: usize,
    breaker: RefCell<Breaker>,
    /// When this core last said Redis was unavailable (WARN once per 10 s).
    warned: Cell<Option<Instant>>,
    /// Commands waiting for a connection: woken when one is freed.
    waiting: RefCell<Vec<std::task::Waker>>,
    /// The last command failed (timed out, connection lost): nobody waits
    /// for a connection until one succeeds again.
    failing: Cell<bool>,
}

impl Reader {
    /// A reader holding at most `max` connections.
    pub fn new(max: usize) -> Reader {
        Reader {
            idle: RefCell::new(Vec::new()),
            open: Cell::new(0),
            max: max.max(1),
            breaker: RefCell::new(Breaker::new(&breaker_settings())),
            warned: Cell::new(None),
            waiting: RefCell::new(Vec::new()),
            failing: Cell::new(false),
        }
    }

    /// Looks cache key `key` up in Redis.
    pub async fn get(&self, tier: &RedisTier, key: &str) -> Found {
        let now = crate::clock::now_ms();
        let (admit, _) = self.breaker.borrow_mut().admit(now);
        if admit == Admit::Rejected {
            tier.errors.fetch_add(1, Ordering::Relaxed);
            return Found::Miss;
        }
        let rkey = tier.redis_key(key);
        let result = self.call(tier, &[b"GET", rkey.as_bytes()]).await;
        let ok = result.is_ok();
        self.breaker
            .borrow_mut()
            .record(admit, ok, crate::clock::now_ms());
        let value = match result {
            Ok(OwnedFrame::BulkString(v)) => v,
            Ok(OwnedFrame::Null) => {
                tier.misses.fetch_add(1, Ordering::Relaxed);
                return Found::Miss;
            }
            Ok(other) => {
                self.unavailable(tier, &format!("GET answered {other:?}"));
                return Found::Miss;
            }
            Err(e) => {
                self.unavailable(tier, &e);
                return Found::Miss;
            }
        };
        match entry::decode(key, &value) {
            Ok(object) => {
                tier.hits.fetch_add(1, Ordering::Relaxed);
                Found::Hit(object)
            }
            Err(bad) => {
                tier.bad_entries.fetch_add(1, Ordering::Relaxed);
                tier.misses.fetch_add(1, Ordering::Relaxed);
                log!(
                    Level::Warn,
                    "Redis cache entry refused and deleted",
                    key = rkey,
                    reason = format_args!("{bad:?}"),
                );
                let _ = self.call(tier, &[b"DEL", rkey.as_bytes()]).await;
                Found::Miss
            }
        }
    }

    /// One command on an idle connection, a new one within this core's
    /// share, or the next one freed (waiting at most `operation_timeout_ms`
    /// in all).
    pub(super) async fn call(
        &self,
        tier: &RedisTier,
        args: &[&[u8]],
    ) -> Result<OwnedFrame, String> {
        let s = &tier.settings;
        let deadline = Instant::now() + s.operation_timeout;
        let mut conn = self.checkout(s, deadline).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.call(args, left.max(Duration::from_millis(1))).await {
            Ok(reply) => {
                self.failing.set(false);
                self.idle.borrow_mut().push(conn);
                self.wake_waiting();
                match reply {
                    OwnedFrame::Error(e) => Err(format!("Redis said: {e}")),
                    reply => Ok(reply),
                }
            }
            Err(e) => {
                self.failing.set(true);
                self.closed_one();
                Err(e)
            }
        }
    }

    /// A connection for one command: idle, new, or the next freed (not
    /// waited for while Redis is failing).
    async fn checkout(&self, s: &RedisCache, deadline: Instant) -> Result<Conn, String> {
        loop {
            if let Some(c) = self.idle.borrow_mut().pop() {
                return Ok(c);
            }
            if self.open.get() < self.max {
                self.open.set(self.open.get() + 1);
                return Conn::open(s).await.inspect_err(|_| {
                    self.failing.set(true);
                    self.closed_one();
                });
            }
            // A failing Redis is not waited for: a miss at once.
            if self.failing.get() {
                return Err("Redis is failing; not waiting for a busy connection".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || monoio::time::timeout(left, Freed::new(&self.waiting))
                    .await
                    .is_err()
            {
                return Err("every connection of this core stayed busy".into());
            }
        }
    }

    /// A connection was closed (failed, or never opened): room for another.
    fn closed_one(&self) {
        self.open.set(self.open.get().saturating_sub(1));
        self.wake_waiting();
    }

    /// Wakes every command waiting for a connection: each looks again
    /// (on one core, in turn; the losers wait again).
    fn wake_waiting(&self) {
        for w in self.waiting.borrow_mut().drain(..) {
            w.wake();
        }
    }

    fn unavailable(&self, tier: &RedisTier, why: &str) {
        tier.errors.fetch_add(1, Ordering::Relaxed);
        let due = self
            .warned
            .get()
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            self.warned.set(Some(Instant::now()));
            log!(
                Level::Warn,
                "Redis cache unavailable; serving from the other tiers and the origin",
                redis = tier.settings.address,
                error = why,
            );
        }
    }
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
            tls: None,
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
