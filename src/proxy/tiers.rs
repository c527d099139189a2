//! Step "lookup", below memory: the disk and Redis tiers, asked in
//! `cache.cache_layers`' order on a memory miss (`cache.rs`). An entry
//! found is put back into memory and handed to the lookup that follows,
//! which must not miss it even if the memory tier let it go at once, and
//! never replaces a copy a fill stored while the lower tier was read; a
//! large disk entry is sent straight from its file, by reference, without
//! entering memory. A memory hit keeps the disk entry recent.

use super::cache::{conditional_not_answered, StoredBody};
use super::*;
use crate::cache::policy;
use crate::cache::store::Object;

impl CoreGeneration {
    /// Step "disk": a memory miss whose entry is on disk is read (on this
    /// core's driver), checked and put back into memory; the copy read is
    /// handed to the lookup that follows ([`Self::cache_lookup`]), which
    /// must not miss it because the memory tier (bounded, shared with the
    /// other cores) evicted it meanwhile. A bad entry is dropped and reads
    /// as a miss.
    pub(super) async fn promote_from_disk(
        &self,
        c: &Client,
        bucket: usize,
        key: &str,
    ) -> Option<Arc<Object>> {
        let disk = self.shared.process.disk.as_ref()?;
        let (store, k) = self.memory_miss(c, bucket, key)?;
        if !disk.contains(&k) {
            return None;
        }
        let epoch = store.purge_epoch();
        let object = disk.load(&k).await?;
        // A purge while the file was read wins.
        (store.purge_epoch() == epoch).then(|| store.insert_unless_held(k, object))
    }

    /// A memory hit keeps its disk-tier entry recent too, so the disk's LRU
    /// does not evict what memory serves most: at most once per
    /// [`DISK_TOUCH_EVERY_MS`] per copy, the key is queued on this core and
    /// the disk index marked under one lock at the next tick.
    pub(super) fn note_hit_for_disk(&self, c: &Client, bucket: usize, key: &str, copy: &Object) {
        if self.shared.process.disk.is_none() {
            return;
        }
        let now = now_ms().max(1);
        let last = copy.touched_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < DISK_TOUCH_EVERY_MS {
            return;
        }
        copy.touched_ms.store(now, Ordering::Relaxed);
        let k = self.cache_key(bucket, key, &c.s.query);
        self.core.disk_touches.borrow_mut().push(k);
    }

    /// The memory tier and the request's cache key, when the bucket caches,
    /// the memory tier does not hold the key and no fill of it is under way
    /// here for this request to join (a lower tier may be asked).
    fn memory_miss(
        &self,
        c: &Client,
        bucket: usize,
        key: &str,
    ) -> Option<(&crate::cache::store::MemoryStore, String)> {
        let store = self.shared.process.cache.as_ref()?;
        if !self.shared.bucket(bucket).cache.enabled {
            return None;
        }
        let k = self.cache_key(bucket, key, &c.s.query);
        // A whole GET of an object this instance is fetching joins that
        // fill instead (`cache_lookup`): its copy, once stored, is the one
        // the fill's slower readers are still sending, and a copy read
        // from below would replace it under them.
        let joins = || super::cache::plain_get(c) && self.shared.process.fills.is_open(&k);
        (store.get(&k).is_none() && !joins()).then_some((store, k))
    }

    /// Step "redis": a miss in the local tiers asks the Redis tier; an
    /// intact entry is put into memory (and offered to the disk tier) and
    /// handed to the lookup that follows, as a disk entry is. A single
    /// range of a chunked object is answered from the chunks it covers
    /// (`Err`), without entering memory. Anything else (absent, refused,
    /// Redis slow or down) is a miss.
    pub(super) async fn promote_from_redis(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
    ) -> Result<Option<Arc<Object>>, Outcome> {
        use crate::cache::redis::Found;
        let process = &self.shared.process;
        let (Some(tier), Some(reader)) = (&process.redis, &self.core.redis) else {
            return Ok(None);
        };
        if conditional_not_answered(c) {
            return Ok(None);
        }
        let Some((store, k)) = self.memory_miss(c, bucket, key) else {
            return Ok(None);
        };
        let epoch = store.purge_epoch();
        let range = c.s.req.header(Forwarded::Range);
        let stream = range.is_none() && c.s.req.method() == Method::Get;
        let found = reader.get(tier, &k, range, stream).await;
        // A purge while Redis answered wins.
        if store.purge_epoch() != epoch {
            return Ok(None);
        }
        match found {
            Found::Miss => Ok(None),
            Found::Hit(object) => {
                let copy = store.insert_unless_held(k.clone(), object);
                if let Some(disk) = &process.disk {
                    disk.offer(k, copy.clone(), epoch);
                }
                Ok(Some(copy))
            }
            Found::Part(part, offset) => {
                let mid = self.shared.bucket_metric[bucket];
                self.core.metrics.borrow_mut().cache(mid, CacheResult::Hit);
                let source = StoredBody::Part { offset };
                Err(self.answer_stored(c, bucket, &part, "HIT", source).await)
            }
            Found::Stream(head) => {
                let whole = (head, Duration::ZERO);
                let stream = self.stream_chunks(c, (bucket, key, &k), whole, (tier, reader));
                match Box::pin(stream).await {
                    Some(out) => Err(out),
                    None => Ok(None),
                }
            }
        }
    }

    /// A disk-tier entry whose pages are all in the page cache answers a
    /// memory miss straight from its file (`Some`), when the client is
    /// plain TCP, `server.zero_copy` sends such a body by reference and
    /// `cache.disk.sendfile` allows it from its size;
    /// otherwise (`None`) the entry is read and promoted as usual
    /// ([`Self::promote_from_disk`]). The core keeps the file open for the
    /// next hit (`cache::open`).
    pub(super) async fn serve_from_disk(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
    ) -> Option<Outcome> {
        let process = &self.shared.process;
        let (Some(store), Some(disk)) = (&process.cache, &process.disk) else {
            return None;
        };
        let settings = &self.shared.bucket(bucket).cache;
        let Some(disk_settings) = &self.shared.config.cache.disk else {
            return None;
        };
        let zero_copy = self.shared.config.server.zero_copy;
        let by_reference =
            |body: u64| zero_copy.send_stored(body) && disk_settings.sends_from_file(body);
        if !settings.enabled
            || conditional_not_answered(c)
            || !matches!(c.stream, MaybeTls::Plain(_))
        {
            return None;
        }
        let k = self.cache_key(bucket, key, &c.s.query);
        if store.get(&k).is_some() {
            return None;
        }
        // The file's size bounds the body's: an entry too small to be sent
        // by reference is not opened twice (here, then to be read).
        let (size, id) = disk.entry(&k)?;
        if !by_reference(size) {
            return None;
        }
        let kept = self.core.open_entries.borrow_mut().get(&k, id);
        let entry = match kept {
            Some(entry) => entry,
            None => {
                let entry = Rc::new(disk.open_entry(&k).await?);
                let mut open = self.core.open_entries.borrow_mut();
                open.put(&k, entry.id, entry.clone());
                entry
            }
        };
        let copy = &entry.object;
        let fresh = policy::is_fresh(copy.stored_at, copy.fresh_for, crate::clock::now());
        if !(by_reference(copy.total) && fresh && entry.in_page_cache()) {
            return None;
        }
        // The pipe is taken before anything is sent: running out of pipes
        // then can never strand a head already sent. Without one the entry
        // is read instead (and that copy's answer counts any fallback).
        let pipe = self.core.take_pipe().ok()?;
        let mid = self.shared.bucket_metric[bucket];
        self.core.metrics.borrow_mut().cache(mid, CacheResult::Hit);
        let source = StoredBody::File {
            file: &entry.file,
            offset: entry.body_offset,
            pipe,
        };
        Some(self.answer_stored(c, bucket, copy, "HIT", source).await)
    }
}

impl CoreGeneration {
    /// Step "fleet": before this instance's leader of a fill goes to S3, it
    /// asks the fleet (`cache::redis::lease`). When another instance holds
    /// the lease, its fetch answers this request from Redis (put into
    /// memory, offered to disk), and this instance's waiters, told the fill
    /// is abandoned, look again and find it. `None`: fetch.
    pub(super) async fn fleet_lead(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
    ) -> Option<Outcome> {
        use crate::cache::redis::lease::Lease;
        let process = &self.shared.process;
        let (Some(tier), Some(reader), Some(store)) =
            (&process.redis, &self.core.redis, &process.cache)
        else {
            return None;
        };
        let k = c.s.leading.as_ref()?.0.clone();
        // As long as a fetch may take: the slowest replica's timeout, twice.
        let hold = self.shared.bucket_replicas[bucket]
            .iter()
            .map(|&r| self.replica(r).timeout)
            .max()
            .unwrap_or(Duration::from_secs(5))
            .saturating_mul(2)
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        // A whole GET can stream an object another instance is fetching.
        let stream = c.s.req.method() == Method::Get
            && c.s.req.header(Forwarded::Range).is_none()
            && !conditional_not_answered(c);
        let object = match reader.lease(tier, &k, hold, stream).await {
            Lease::Fetch => {
                c.s.fleet_hold = Some(hold);
                return None;
            }
            Lease::Fetched(object) => object,
            Lease::Streaming(head) => {
                let follow = self.stream_chunks(c, (bucket, key, &k), (head, hold), (tier, reader));
                return Box::pin(follow).await;
            }
        };
        let epoch = store.purge_epoch();
        let copy = store.insert(k.clone(), object);
        if let Some(disk) = &process.disk {
            disk.offer(k, copy.clone(), epoch);
        }
        self.abandon_fill(c);
        self.core
            .metrics
            .borrow_mut()
            .coalesced(self.shared.bucket_metric[bucket]);
        Some(self.serve_cached(c, bucket, &copy, "HIT").await)
    }

    /// Streams a chunked object from Redis: chunk by chunk, each checked
    /// before it is sent, the next one read while the last is sent, into a
    /// fill of its own (so this instance's waiters stream it too, and the
    /// object is stored once whole; none when the fill budget is spent)
    /// and to the client. `stall`: how long to wait for a chunk not written
    /// yet (another instance is still fetching the object: the fleet's
    /// stream), zero for a stored entry. When a chunk does not come (the
    /// fetching instance died, Redis failed, a chunk is missing or bad),
    /// this instance's waiters and the client continue with range requests
    /// of their own (`If-Match` the object's ETag): never a short body.
    async fn stream_chunks(
        &self,
        c: &mut Client,
        (bucket, key, k): (usize, &str, &str),
        (head, stall): (crate::cache::redis::entry::StreamHead, Duration),
        (tier, reader): (
            &crate::cache::redis::RedisTier,
            &crate::cache::redis::Reader,
        ),
    ) -> Option<Outcome> {
        use crate::cache::redis::lease::ChunkError;
        let stored = stall.is_zero();
        // A stored entry's chunks are read a batch per round trip; a
        // stream's, one at a time as they land.
        let per_read = if stored { STORED_CHUNKS_PER_READ } else { 1 };
        let count = head.chunk_count();
        let batch = |at: usize| at..(at + per_read).min(count);
        // The first chunks before anything is sent: without them, a miss.
        let mut next = reader.read_chunks(tier, k, &head, batch(0), stall).await;
        if let Err(e) = &next {
            if let (true, ChunkError::Broken(why)) = (stored, e) {
                reader.drop_entry(tier, k, why).await;
            }
            return None;
        }
        if stored {
            tier.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let meta = head.object();
        let fill_head = crate::cache::collapse::FillHead {
            headers: meta.headers.clone(),
            len: meta.total,
            etag: meta.etag.clone(),
            passthrough: false,
        };
        let mut fill = self.fleet_fill(c, bucket, k, meta);
        if fill.is_none() {
            self.abandon_fill(c);
        }
        let mut out = match self.send_fill_head(c, bucket, &fill_head, !stored).await {
            Ok(out) => out,
            Err(out) => {
                if let Some(f) = &fill {
                    f.fail();
                }
                return Some(out);
            }
        };
        let wait = self.shared.config.server.idle_timeout;
        let mut client_gone = false;
        let mut at = 0;
        while at < count {
            let pieces = match next {
                Ok(pieces) => pieces,
                Err(e) => {
                    log!(
                        Level::Warn,
                        "Streaming an object from Redis stopped; continuing from the origin",
                        key = key,
                        error = e,
                    );
                    if let (true, ChunkError::Broken(why)) = (stored, &e) {
                        reader.drop_entry(tier, k, why).await;
                    }
                    if let Some(f) = &fill {
                        f.fail();
                    }
                    if client_gone {
                        out.keep_alive = false;
                        return Some(out);
                    }
                    let resumed =
                        Box::pin(self.resume_waiter(c, bucket, key, &fill_head, out.bytes)).await;
                    out.bytes = resumed.sent;
                    if !resumed.complete {
                        out.keep_alive = false;
                        out.abort = true;
                    }
                    return Some(out);
                }
            };
            at += pieces.len();
            if let Some(f) = &mut fill {
                for p in &pieces {
                    crate::http::body::Tee::push_shared(f, p);
                }
            }
            // The next chunks are read while these are sent.
            let read = async {
                match at < count {
                    true => Some(reader.read_chunks(tier, k, &head, batch(at), stall).await),
                    false => None,
                }
            };
            let send = async {
                let mut sent = 0;
                for p in pieces {
                    let n = p.len() as u64;
                    if client_gone
                        || super::cache::write_bytes(&mut c.stream, p, wait)
                            .await
                            .is_err()
                    {
                        return Err(sent);
                    }
                    sent += n;
                }
                Ok(sent)
            };
            let (sent, read) = monoio::join!(send, read);
            match sent {
                Ok(n) => out.bytes += n,
                Err(n) => {
                    out.bytes += n;
                    client_gone = true;
                }
            }
            // A client gone with nobody else streaming: nothing to pump for.
            if client_gone && !fill.as_ref().is_some_and(|f| f.has_waiters()) {
                if let Some(f) = &fill {
                    f.fail();
                }
                break;
            }
            match read {
                Some(r) => next = r,
                None => break,
            }
        }
        if client_gone {
            out.keep_alive = false;
        }
        Some(out)
    }

    /// After this instance's leader fetched: when its answer is not in the
    /// memory tier (so not on its way to Redis, whose write ends the lease),
    /// the lease is given up, so waiting instances fetch now.
    pub(super) async fn fleet_release(&self, c: &Client) {
        let process = &self.shared.process;
        let (Some(tier), Some(reader), Some(store)) =
            (&process.redis, &self.core.redis, &process.cache)
        else {
            return;
        };
        let Some((k, _)) = &c.s.leading else {
            return;
        };
        if store.peek(k).is_none() && !c.s.fleet_published.get() {
            reader.release(tier, k).await;
        }
    }
}

/// Chunks of a stored Redis entry read per round trip while streaming it.
const STORED_CHUNKS_PER_READ: usize = 8;

/// How often a copy's memory hits refresh its disk-tier entry's recency.
const DISK_TOUCH_EVERY_MS: u64 = 1_000;
